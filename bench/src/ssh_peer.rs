//! The round-trip peer: `ssh root@127.0.0.1 true` over a reused master connection
//! (ControlMaster) to a private `sshd` on a free loopback port, with a throwaway
//! host key and a throwaway client key; and the file transfer peer, `scp` over the
//! same master. Its sftp subsystem is sshd's `internal-sftp`, so `scp` (SFTP mode)
//! starts no shell and root's shell start-up files cost it nothing. It never
//! touches the system's sshd, keys or known_hosts, and it stops its own `sshd` (by
//! pid) and master when dropped.

use crate::BenchError;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private sshd and the ssh arguments that reach it through one master.
#[derive(Debug)]
pub struct SshPeer {
    sshd: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn sshd_binary() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn keygen(path: &Path) -> Result<(), BenchError> {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .map_err(BenchError::io("running ssh-keygen"))?;
    if status.success() {
        Ok(())
    } else {
        Err(BenchError::Api(format!("ssh-keygen failed: {status}")))
    }
}

fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(BenchError::io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(BenchError::io("finding a free port"))?
        .port())
}

impl SshPeer {
    /// Starts sshd and opens the master connection; an error says why ssh cannot be
    /// the peer on this machine.
    pub fn start() -> Result<SshPeer, BenchError> {
        let sshd_bin = sshd_binary().ok_or_else(|| {
            BenchError::MissingBinary("sshd (apt-get install openssh-server)".into())
        })?;
        let dir = tempfile::tempdir().map_err(BenchError::io("creating the sshd directory"))?;
        let d = dir.path();
        keygen(&d.join("host_key"))?;
        keygen(&d.join("client_key"))?;
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))
            .map_err(BenchError::io("writing authorized_keys"))?;
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port()?;
        let config = format!(
            "HostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nLogLevel ERROR\nSubsystem sftp internal-sftp\n",
            dir = d.display()
        );
        std::fs::write(d.join("sshd_config"), config)
            .map_err(BenchError::io("writing sshd_config"))?;
        let sshd = Command::new(sshd_bin)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .args(["-p", &port.to_string(), "-o", "ListenAddress=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(BenchError::io("starting sshd"))?;
        let peer = SshPeer { sshd, port, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match peer.call() {
                Ok(_) => return peer.check_master().map(|()| peer),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn ssh(&self) -> Command {
        let mut command = self.client("ssh");
        command.args(["-p", &self.port.to_string()]);
        command
    }

    /// `ssh` or `scp` with the key, the master connection and quiet defaults.
    fn client(&self, program: &str) -> Command {
        let d = self.dir.path();
        let mut command = Command::new(program);
        command
            .arg("-i")
            .arg(d.join("client_key"))
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ControlMaster=auto",
                "-o",
            ])
            .arg(format!("ControlPath={}/cm", d.display()))
            .args(["-o", "ControlPersist=60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// Fails unless the master connection is up, so every timed call reuses it.
    fn check_master(&self) -> Result<(), BenchError> {
        let status = self
            .ssh()
            .args(["-O", "check", "root@127.0.0.1"])
            .status()
            .map_err(BenchError::io("running ssh -O check"))?;
        if status.success() {
            Ok(())
        } else {
            Err(BenchError::Api(
                "ssh did not keep a master connection (ControlMaster)".into(),
            ))
        }
    }

    /// One `scp -q FROM TO` over the master (SFTP mode); a remote side is written
    /// `root@127.0.0.1:/path`. Timed.
    pub fn scp(&self, from: &str, to: &str) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let status = self
            .client("scp")
            .args(["-q", "-P", &self.port.to_string(), from, to])
            .status()
            .map_err(BenchError::io("running scp"))?;
        if status.success() {
            Ok(start.elapsed())
        } else {
            Err(BenchError::Api(format!("scp {from} {to} failed: {status}")))
        }
    }

    /// One `ssh ... root@127.0.0.1 true`, timed.
    pub fn call(&self) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let status = self
            .ssh()
            .args(["root@127.0.0.1", "true"])
            .status()
            .map_err(BenchError::io("running ssh"))?;
        if status.success() {
            Ok(start.elapsed())
        } else {
            Err(BenchError::Api(format!(
                "ssh to the private sshd failed: {status}"
            )))
        }
    }
}

impl Drop for SshPeer {
    fn drop(&mut self) {
        let _ = self.ssh().args(["-O", "exit", "root@127.0.0.1"]).status();
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}
