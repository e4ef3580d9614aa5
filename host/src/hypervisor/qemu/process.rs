//! QEMU processes: launching one detached from the host agent, finding it again,
//! and watching it through `/proc`.
//!
//! [`launch`] runs QEMU with `-daemonize`: QEMU forks, calls `setsid`, and its
//! parent exits once the VM is set up (non-zero with a message on stderr if setup
//! failed), so the VM survives a restart of the host agent and is never our child.
//! The daemon's pid comes from QEMU's `-pidfile`; a [`ProcessId`] pairs it with the
//! process's start time from `/proc/<pid>/stat`, so a reused pid is never mistaken
//! for our VM. [`ProcessId::is_alive`] treats a zombie as dead (the daemon's parent
//! is whatever reaps orphans here, which may be slow to do it).
//! What it does not do: decide what a dead process means (`vmdir.rs` and `mod.rs`
//! do), or talk QMP.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Why launching or inspecting a QEMU process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// QEMU's setup failed; `message` is what it printed.
    #[error("QEMU did not start: {message}")]
    StartFailed { message: String },
    #[error("QEMU did not finish its setup within {secs} s")]
    StartTimeout { secs: u64 },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} does not hold a process id: {content:?}")]
    BadPidFile { path: PathBuf, content: String },
}

/// A process, identified by its pid and its start time (clock ticks since boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_ticks: u64,
}

/// Figures of a live process from `/proc`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
    pub rss_bytes: u64,
    /// Seconds since the process started.
    pub uptime_secs: f64,
}

/// The fields of `/proc/<pid>/stat` after the command name.
struct Stat {
    state: char,
    utime: u64,
    stime: u64,
    start_ticks: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 of proc(5) (state); utime is 14, stime 15, starttime 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Clock ticks per second of `/proc`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0 // Linux's USER_HZ on every architecture we run on
    }
}

impl ProcessId {
    /// The process now running as `pid`, if any.
    pub fn of(pid: u32) -> Option<ProcessId> {
        read_stat(pid).map(|stat| ProcessId {
            pid,
            start_ticks: stat.start_ticks,
        })
    }

    /// Whether this very process still runs (not a zombie, not a reused pid).
    pub fn is_alive(self) -> bool {
        match read_stat(self.pid) {
            Some(stat) => stat.start_ticks == self.start_ticks && !matches!(stat.state, 'Z' | 'X'),
            None => false,
        }
    }

    /// CPU time, resident memory and age of the process, if it is alive.
    pub fn stats(self) -> Option<ProcessStats> {
        let stat = read_stat(self.pid).filter(|s| s.start_ticks == self.start_ticks)?;
        let hz = ticks_per_second();
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let boot_uptime: f64 = fs::read_to_string("/proc/uptime")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(ProcessStats {
            cpu_secs: (stat.utime + stat.stime) as f64 / hz,
            rss_bytes: rss_kib * 1024,
            uptime_secs: (boot_uptime - stat.start_ticks as f64 / hz).max(0.0),
        })
    }

    /// Sends SIGKILL (best effort: the process may be gone already).
    pub fn kill(self) {
        if self.is_alive() {
            let Ok(pid) = libc::pid_t::try_from(self.pid) else {
                return;
            };
            // SAFETY: kill(2) has no memory-safety preconditions; the pid was checked
            // to be our process (same start time) just above.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Waits until the process is gone; false if it still runs after `timeout`.
    pub fn wait_gone(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Whether the command line of process `pid` mentions `path` (e.g. its QMP socket).
pub fn command_line_mentions(pid: u32, path: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = path.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Reads the pid QEMU wrote to `pid_file`.
pub fn read_pid_file(pid_file: &Path) -> Result<u32, ProcessError> {
    let content = fs::read_to_string(pid_file).map_err(|source| ProcessError::Read {
        path: pid_file.to_owned(),
        source,
    })?;
    content
        .trim()
        .parse()
        .map_err(|_| ProcessError::BadPidFile {
            path: pid_file.to_owned(),
            content,
        })
}

/// Runs `qemu args... -daemonize` with stderr appended to `log` and waits until the
/// daemon has finished its setup. Returns once the pid file exists.
pub fn launch(
    qemu: &Path,
    args: &[String],
    log: &Path,
    timeout: Duration,
) -> Result<(), ProcessError> {
    let mut log_file = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(log)
        .map_err(|source| ProcessError::Read {
            path: log.to_owned(),
            source,
        })?;
    let log_start = log_file.seek(SeekFrom::End(0)).unwrap_or(0);
    let stderr = log_file.try_clone().map_err(|source| ProcessError::Read {
        path: log.to_owned(),
        source,
    })?;
    let mut parent = Command::new(qemu)
        .args(args)
        .arg("-daemonize")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            binary: qemu.to_owned(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match parent.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                // Best effort: the parent is our child; its daemon (if any) is found
                // through the pid file by the caller's cleanup.
                let _ = parent.kill();
                let _ = parent.wait();
                return Err(ProcessError::StartTimeout {
                    secs: timeout.as_secs(),
                });
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(ProcessError::Read {
                    path: PathBuf::from("QEMU's exit status"),
                    source,
                })
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut message = String::new();
    let _ = log_file.seek(SeekFrom::Start(log_start));
    let _ = log_file.read_to_string(&mut message);
    let message = message
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("warning:"))
        .collect::<Vec<_>>()
        .join("; ");
    let message = if message.is_empty() {
        format!("QEMU exited with {status}")
    } else {
        message
    };
    Err(ProcessError::StartFailed { message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_has_figures() {
        let me = ProcessId::of(std::process::id()).expect("our /proc entry");
        assert!(me.is_alive());
        let stats = me.stats().expect("stats");
        assert!(stats.rss_bytes > 0);
        assert!(stats.uptime_secs >= 0.0);
    }

    #[test]
    fn a_reused_pid_is_not_our_process() {
        let me = ProcessId::of(std::process::id()).expect("our /proc entry");
        let impostor = ProcessId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!impostor.is_alive());
        assert!(impostor.stats().is_none());
    }

    #[test]
    fn an_exited_child_is_gone_even_before_it_is_reaped() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let id = ProcessId::of(child.id()).expect("child /proc entry");
        assert!(
            id.wait_gone(Duration::from_secs(10)),
            "a zombie counts as gone"
        );
        child.wait().expect("reap");
    }

    #[test]
    fn a_failed_setup_reports_what_the_program_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // `sh -c SCRIPT -daemonize`: the script stands in for a QEMU that fails.
        let args = [
            "-c".to_owned(),
            "echo 'qemu: could not open disk image' >&2; exit 1".to_owned(),
        ];
        let error = launch(
            Path::new("/bin/sh"),
            &args,
            &dir.path().join("qemu.log"),
            Duration::from_secs(10),
        )
        .expect_err("must fail");
        assert_eq!(
            error.to_string(),
            "QEMU did not start: qemu: could not open disk image"
        );
    }

    #[test]
    fn a_command_line_is_searched_for_a_path() {
        let me = std::process::id();
        let program = std::env::args().next().expect("argv[0]");
        assert!(command_line_mentions(me, Path::new(&program)));
        assert!(!command_line_mentions(me, Path::new("/some/vm/qmp.sock")));
    }

    #[test]
    fn a_pid_file_with_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qemu.pid");
        fs::write(&path, "not a pid\n").expect("write");
        assert!(matches!(
            read_pid_file(&path),
            Err(ProcessError::BadPidFile { .. })
        ));
        fs::write(&path, "1234\n").expect("write");
        assert_eq!(read_pid_file(&path).expect("pid"), 1234);
    }
}
