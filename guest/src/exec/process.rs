//! The operating-system side of a command: spawning, signalling, reaping, measuring.
//!
//! [`spawn`] starts the program with `std::process::Command` — no shell, `PATH`
//! lookup for a bare name, the spec's variables added to the agent's environment —
//! in a process group of its own whose id is the child's pid, with stdout and stderr
//! on pipes turned into non-blocking tokio pipes (not `tokio::process`, whose reaper
//! must not own the child). [`wait_for_exit`] runs on a blocking thread: it waits for
//! the child with `waitid(WNOWAIT)`, which leaves it a zombie, lets the caller kill
//! what is left of the group while the zombie still pins the group id (so a signal
//! can never reach a reused id), then reaps it with `wait4` to get the child's own
//! resource usage. [`group_usage`] reads the usage so far from `/proc`. The few libc
//! calls are the only unsafe code, each in its own small function. This module keeps
//! no state and knows nothing of queues, cancellation or messages.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use tokio::net::unix::pipe;
use vmc_protocol::words::{CommandSpec, ResourceUsage};

use super::ExecError;

/// A started child: its pid (also its process group id) and its output pipes. A pipe
/// is an error when it could not be made asynchronous; the child runs anyway.
#[derive(Debug)]
pub(super) struct Spawned {
    pub pid: libc::pid_t,
    pub stdout: io::Result<pipe::Receiver>,
    pub stderr: io::Result<pipe::Receiver>,
}

/// How the child ended, as `wait4` tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ending {
    /// It exited with this code.
    Exited(i32),
    /// This signal ended it.
    Signalled(i32),
}

/// Starts `spec` with `stdin` as its standard input; see the module documentation.
pub(super) fn spawn(spec: &CommandSpec, stdin: Stdio) -> Result<Spawned, ExecError> {
    let mut command = Command::new(&spec.cmd);
    command
        .args(&spec.args)
        .envs(&spec.env)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = &spec.path {
        command.current_dir(dir);
    }
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        cmd: spec.cmd.clone(),
        source,
    })?;
    // cannot fail because Linux pids are below 2^22, well inside pid_t.
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits in pid_t");
    let missing = || io::Error::other("the pipe was not created");
    let stdout = child
        .stdout
        .take()
        .ok_or_else(missing)
        .and_then(|out| pipe::Receiver::from_owned_fd(OwnedFd::from(out)));
    let stderr = child
        .stderr
        .take()
        .ok_or_else(missing)
        .and_then(|err| pipe::Receiver::from_owned_fd(OwnedFd::from(err)));
    // Dropping `child` neither waits for nor kills the process: `wait_for_exit` reaps it.
    drop(child);
    Ok(Spawned {
        pid,
        stdout,
        stderr,
    })
}

/// Blocks until child `pid` has ended, calls `before_reap` while the child is still
/// a zombie (its pid, and so its process group id, cannot be reused yet), then reaps
/// it. Nothing else may reap `pid` meanwhile.
pub(super) fn wait_for_exit(
    pid: libc::pid_t,
    before_reap: impl FnOnce(),
) -> io::Result<(Ending, ResourceUsage)> {
    wait_without_reaping(pid)?;
    before_reap();
    let (status, usage) = reap(pid)?;
    let ending = if libc::WIFSIGNALED(status) {
        Ending::Signalled(libc::WTERMSIG(status))
    } else {
        Ending::Exited(libc::WEXITSTATUS(status))
    };
    Ok((ending, usage))
}

/// Waits until child `pid` has ended, leaving it a zombie.
#[allow(unsafe_code)]
fn wait_without_reaping(pid: libc::pid_t) -> io::Result<()> {
    // cannot fail because our child's pid is positive.
    let id = libc::id_t::try_from(pid).expect("a child's pid is positive");
    loop {
        // SAFETY: `siginfo_t` is plain old data for which all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable `siginfo_t` that outlives the call, and
        // waitid keeps no pointer to it; WNOWAIT leaves the child unreaped.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Reaps child `pid`, returning its raw wait status and its own resource usage
/// (which includes that of the descendants it reaped itself).
#[allow(unsafe_code)]
fn reap(pid: libc::pid_t) -> io::Result<(libc::c_int, ResourceUsage)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `rusage` is plain old data for which all zeroes is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to valid, writable locals that outlive the call,
        // and wait4 keeps neither.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            return Ok((status, usage_from_rusage(&usage)));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sends `signal` to every process of group `pgid`. A group that no longer exists
/// (`ESRCH`) is not an error.
#[allow(unsafe_code)]
pub(super) fn signal_group(pgid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: killpg takes plain integers and touches no memory of ours. The caller
    // guarantees that `pgid` is a group of one of our unreaped children.
    let rc = unsafe { libc::killpg(pgid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

fn usage_from_rusage(ru: &libc::rusage) -> ResourceUsage {
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    ResourceUsage {
        ru_utime: secs(ru.ru_utime),
        ru_stime: secs(ru.ru_stime),
        ru_maxrss: ru.ru_maxrss,
        ru_ixrss: ru.ru_ixrss,
        ru_idrss: ru.ru_idrss,
        ru_isrss: ru.ru_isrss,
        ru_minflt: ru.ru_minflt,
        ru_majflt: ru.ru_majflt,
        ru_nswap: ru.ru_nswap,
        ru_inblock: ru.ru_inblock,
        ru_oublock: ru.ru_oublock,
        ru_msgsnd: ru.ru_msgsnd,
        ru_msgrcv: ru.ru_msgrcv,
        ru_nsignals: ru.ru_nsignals,
        ru_nvcsw: ru.ru_nvcsw,
        ru_nivcsw: ru.ru_nivcsw,
    }
}

/// Clock ticks per second, the unit of CPU times in `/proc/<pid>/stat`.
#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf takes an integer and touches no memory of ours.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            ticks as f64
        } else {
            100.0
        }
    })
}

/// One process as `/proc/<pid>/stat` describes it; times in clock ticks.
#[derive(Clone, Debug, Default, PartialEq)]
struct ProcStat {
    state: char,
    pgrp: libc::pid_t,
    minflt: i64,
    majflt: i64,
    /// utime + cutime: its own and that of the children it reaped.
    utime: u64,
    stime: u64,
}

/// Parses a `/proc/<pid>/stat` line; the command name may contain spaces and `)`.
fn parse_stat(line: &str) -> Option<ProcStat> {
    let fields: Vec<&str> = line
        .get(line.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // Field n of proc(5) is fields[n - 3]: state is field 3.
    let int = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
    let uint = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: libc::pid_t::try_from(int(5)?).ok()?,
        minflt: int(10)? + int(11)?,
        majflt: int(12)? + int(13)?,
        utime: uint(14)? + uint(16)?,
        stime: uint(15)? + uint(17)?,
    })
}

/// The processes of group `pgid` now, with their stat lines.
fn group_processes(pgid: libc::pid_t) -> Vec<(u32, ProcStat)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
            (stat.pgrp == pgid).then_some((pid, stat))
        })
        .collect()
}

/// The pids of the processes of group `pgid` that are alive (not zombies).
#[cfg(test)]
pub(super) fn live_group_members(pgid: libc::pid_t) -> Vec<u32> {
    group_processes(pgid)
        .into_iter()
        .filter(|(_, stat)| !matches!(stat.state, 'Z' | 'X'))
        .map(|(pid, _)| pid)
        .collect()
}

/// Resources used so far by the processes of group `pgid` (and the children they
/// reaped): CPU times and page faults summed, `ru_maxrss` the largest `VmHWM`.
/// Fields `/proc` does not give stay 0.
pub(super) fn group_usage(pgid: libc::pid_t) -> ResourceUsage {
    let ticks = clock_ticks();
    let mut usage = ResourceUsage::default();
    for (pid, stat) in group_processes(pgid) {
        usage.ru_utime += stat.utime as f64 / ticks;
        usage.ru_stime += stat.stime as f64 / ticks;
        usage.ru_minflt += stat.minflt;
        usage.ru_majflt += stat.majflt;
        let hwm = fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| vm_hwm_kib(&status))
            .unwrap_or(0);
        usage.ru_maxrss = usage.ru_maxrss.max(hwm);
    }
    usage
}

/// The `VmHWM` (peak resident set) of a `/proc/<pid>/status` text, in KiB.
fn vm_hwm_kib(status: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line["VmHWM:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (a) b (c) S 1 4242 4242 0 -1 4194304 10 5 2 1 30 7 4 3 20 0 1 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                pgrp: 4242,
                minflt: 15,
                majflt: 3,
                utime: 34,
                stime: 10,
            }
        );
        assert_eq!(parse_stat("12 (x) R 1"), None);
    }

    #[test]
    fn peak_resident_set_comes_from_vm_hwm() {
        let status = "Name:\tcat\nVmPeak:\t  9000 kB\nVmHWM:\t    1876 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(1876));
        assert_eq!(vm_hwm_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn our_own_group_is_found_in_proc() {
        let me = std::process::id();
        let pgid = parse_stat(&fs::read_to_string("/proc/self/stat").unwrap())
            .unwrap()
            .pgrp;
        assert!(live_group_members(pgid).contains(&me));
        assert!(group_usage(pgid).ru_maxrss > 0);
    }
}
