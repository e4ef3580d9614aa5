//! The result spool: what the guest must not forget across its own restarts.
//!
//! A [`Spool`] is one directory. When the agent accepts a `CMD_RUN` it writes a
//! *started marker* (`<name>.started`); when the command ends the marker is
//! replaced by its *result* (`<name>.result`), which stays until the host's
//! `CMD_ACK`. Acknowledged ids go to `acked.log`, which keeps the last
//! [`REMEMBERED_ACKS`] of them, so that a late redelivery of an acknowledged
//! `CMD_RUN` is not run again. Every record is written to a temporary file
//! (`*.tmp`), flushed to disk, renamed into place and the directory flushed, so a
//! crash leaves either the old record or the new one, never half of one; stray
//! temporary files are removed by [`Spool::open`].
//!
//! Command ids come from the network and may be any text, so they never become
//! file names as they are: an id of 1 to 128 characters of `A-Z a-z 0-9 . _ -`
//! that does not start with `.` is used as is, any other id is replaced by `~` and
//! the SHA-256 of the id in hex. Records keep the real id inside.
//!
//! Methods that change the spool do a few small synchronous writes, each followed
//! by `fsync`; the others read small files. Callers on an async runtime that cannot
//! afford a few milliseconds should call them from `spawn_blocking` (a `Spool` is
//! `Send + Sync`; share it in an `Arc`). The spool does not decide what an
//! interrupted command's result is, does not resend anything, and does not lock
//! its directory against a second agent.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmc_protocol::words::CommandResult;

/// How many acknowledged command ids the spool remembers.
pub const REMEMBERED_ACKS: usize = 10_000;

const RESULT_SUFFIX: &str = ".result";
const STARTED_SUFFIX: &str = ".started";
const TEMP_SUFFIX: &str = ".tmp";
const CORRUPT_SUFFIX: &str = ".corrupt";
const ACK_LOG: &str = "acked.log";

/// Why the spool could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("a command id must not be empty")]
    EmptyId,
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode the spool record of command {cmd_id:?}")]
    Encode {
        cmd_id: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A command the agent accepted, as kept on disk until its result replaces it.
#[derive(Serialize, Deserialize)]
struct StartedRecord {
    seq: u64,
    cmd_id: String,
    reply_to: String,
}

/// A result waiting for `CMD_ACK`, as kept on disk.
#[derive(Serialize, Deserialize)]
struct ResultRecord {
    seq: u64,
    reply_to: String,
    result: CommandResult,
}

/// Only the ordering key of a record, to find the highest one on open.
#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The acknowledged ids (as file-name tokens), in memory and in `acked.log`.
#[derive(Debug)]
struct AckLog {
    file: File,
    order: VecDeque<String>,
    known: HashSet<String>,
    /// How many ids are remembered ([`REMEMBERED_ACKS`] outside tests).
    capacity: usize,
    /// Lines in the file, duplicates of evicted entries included; the file is
    /// rewritten when it holds twice what is remembered.
    lines_in_file: usize,
}

/// The directory of started commands and unacknowledged results.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// The ordering key of the next record: records are listed in this order.
    next_seq: AtomicU64,
    acked: Mutex<AckLog>,
}

impl Spool {
    /// Opens (creating it, mode 0700, if needed) the spool in `dir`, removes stray
    /// temporary files and started markers whose result was stored, and loads the
    /// acknowledged ids.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Spool::open_remembering(dir, REMEMBERED_ACKS)
    }

    /// [`Spool::open`], remembering `remembered` acknowledged ids.
    fn open_remembering(dir: &Path, remembered: usize) -> Result<Spool, SpoolError> {
        create_private_dir(dir).map_err(|source| SpoolError::Io {
            action: "create the spool directory",
            path: dir.to_owned(),
            source,
        })?;
        let mut max_seq = 0;
        let mut results = HashSet::new();
        let mut started = Vec::new();
        for entry in read_dir(dir)? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = dir.join(name);
            if name.ends_with(TEMP_SUFFIX) {
                log::info!("removing {}, left by an interrupted write", path.display());
                remove_if_present(&path, "remove the stray temporary file")?;
            } else if let Some(token) = name.strip_suffix(RESULT_SUFFIX) {
                max_seq = max_seq.max(read_seq(&path));
                results.insert(token.to_owned());
            } else if let Some(token) = name.strip_suffix(STARTED_SUFFIX) {
                max_seq = max_seq.max(read_seq(&path));
                started.push(token.to_owned());
            }
        }
        for token in started.iter().filter(|t| results.contains(*t)) {
            // The agent stopped between storing the result and removing the marker.
            remove_if_present(
                &dir.join(format!("{token}{STARTED_SUFFIX}")),
                "remove the started marker",
            )?;
        }
        let acked = AckLog::load(dir, remembered)?;
        Ok(Spool {
            dir: dir.to_owned(),
            next_seq: AtomicU64::new(max_seq + 1),
            acked: Mutex::new(acked),
        })
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records durably that `cmd_id` was accepted and its answers go to `reply_to`.
    /// Does nothing when the command's result is already stored.
    pub fn mark_started(&self, cmd_id: &str, reply_to: &str) -> Result<(), SpoolError> {
        let token = file_token(cmd_id)?;
        if self.result_path(&token).exists() {
            return Ok(());
        }
        let record = StartedRecord {
            seq: self.next_seq(),
            cmd_id: cmd_id.to_owned(),
            reply_to: reply_to.to_owned(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|source| SpoolError::Encode {
            cmd_id: cmd_id.to_owned(),
            source,
        })?;
        self.write_atomically(&token, &self.started_path(&token), &bytes)
    }

    /// Whether `cmd_id` was started here, has a stored result, or is among the last
    /// [`REMEMBERED_ACKS`] acknowledged ones: a `CMD_RUN` with this id must not run.
    pub fn is_known(&self, cmd_id: &str) -> bool {
        let Ok(token) = file_token(cmd_id) else {
            return false;
        };
        if self.result_path(&token).exists() || self.started_path(&token).exists() {
            return true;
        }
        self.lock_acked().known.contains(&token)
    }

    /// Stores `result` until [`Spool::acknowledge`], replacing any earlier result of
    /// the same command and its started marker.
    pub fn store_result(&self, reply_to: &str, result: &CommandResult) -> Result<(), SpoolError> {
        let token = file_token(&result.cmd_id)?;
        let record = ResultRecord {
            seq: self.next_seq(),
            reply_to: reply_to.to_owned(),
            result: result.clone(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|source| SpoolError::Encode {
            cmd_id: result.cmd_id.clone(),
            source,
        })?;
        self.write_atomically(&token, &self.result_path(&token), &bytes)?;
        remove_if_present(&self.started_path(&token), "remove the started marker")?;
        Ok(())
    }

    /// The host has stored the result of `cmd_id`: forgets the result and remembers
    /// the id as acknowledged. Returns whether there was a result to forget.
    pub fn acknowledge(&self, cmd_id: &str) -> Result<bool, SpoolError> {
        let token = file_token(cmd_id)?;
        let path = self.result_path(&token);
        if !path.exists() {
            return Ok(false);
        }
        // The id is logged before the result goes: a crash in between resends the
        // result (the host acknowledges it again) rather than forgetting the id.
        self.lock_acked().remember(&self.dir, token)?;
        remove_if_present(&path, "remove the acknowledged result")
    }

    /// The stored result of `cmd_id` and where it goes, if it is still
    /// unacknowledged (to answer a duplicate `CMD_RUN` by resending it).
    pub fn result(&self, cmd_id: &str) -> Result<Option<(String, CommandResult)>, SpoolError> {
        let token = file_token(cmd_id)?;
        Ok(self
            .read_record::<ResultRecord>(&self.result_path(&token))?
            .map(|record| (record.reply_to, record.result)))
    }

    /// Every unacknowledged result with its `reply_to`, oldest first, to resend
    /// after each (re)connection. A record that cannot be read is renamed
    /// `*.corrupt`, logged, and left out.
    pub fn pending(&self) -> Result<Vec<(String, CommandResult)>, SpoolError> {
        let mut records: Vec<ResultRecord> = self.read_all(RESULT_SUFFIX)?;
        records.sort_by_key(|record| record.seq);
        Ok(records
            .into_iter()
            .map(|record| (record.reply_to, record.result))
            .collect())
    }

    /// `(cmd_id, reply_to)` of every command started but without a result, oldest
    /// first: the agent stopped while they ran. The caller stores a result for each.
    pub fn interrupted(&self) -> Result<Vec<(String, String)>, SpoolError> {
        let mut records: Vec<StartedRecord> = self.read_all(STARTED_SUFFIX)?;
        records.retain(|record| {
            file_token(&record.cmd_id).is_ok_and(|token| !self.result_path(&token).exists())
        });
        records.sort_by_key(|record| record.seq);
        Ok(records
            .into_iter()
            .map(|record| (record.cmd_id, record.reply_to))
            .collect())
    }

    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn result_path(&self, token: &str) -> PathBuf {
        self.dir.join(format!("{token}{RESULT_SUFFIX}"))
    }

    fn started_path(&self, token: &str) -> PathBuf {
        self.dir.join(format!("{token}{STARTED_SUFFIX}"))
    }

    fn lock_acked(&self) -> std::sync::MutexGuard<'_, AckLog> {
        // A panic while holding the lock leaves the log consistent enough (at worst
        // one id is missing from memory), so a poisoned lock is still used.
        self.acked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_atomically(&self, token: &str, path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
        let temp = self.dir.join(format!(
            "{token}.{}{TEMP_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        ));
        let written = write_synced(&temp, bytes)
            .map_err(|source| io_error("write", &temp, source))
            .and_then(|()| {
                fs::rename(&temp, path)
                    .map_err(|source| io_error("rename into place", path, source))
            });
        if let Err(err) = written {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        sync_dir(&self.dir)
    }

    /// Reads one record; `None` when it does not exist or is corrupt (then set aside).
    fn read_record<T: for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, SpoolError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error("read", path, source)),
        };
        match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some(record)),
            Err(err) => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(CORRUPT_SUFFIX);
                log::error!(
                    "spool record {} is corrupt ({err}); moving it to {}",
                    path.display(),
                    Path::new(&aside).display()
                );
                fs::rename(path, &aside)
                    .map_err(|source| io_error("set aside the corrupt record", path, source))?;
                Ok(None)
            }
        }
    }

    fn read_all<T: for<'de> Deserialize<'de>>(&self, suffix: &str) -> Result<Vec<T>, SpoolError> {
        let mut records = Vec::new();
        for entry in read_dir(&self.dir)? {
            let name = entry.file_name();
            if name.to_str().is_some_and(|name| name.ends_with(suffix)) {
                records.extend(self.read_record(&self.dir.join(name))?);
            }
        }
        Ok(records)
    }
}

impl AckLog {
    /// Reads `acked.log`, keeping its last `capacity` well-formed lines, and rewrites
    /// it if it held more, or a torn last line.
    fn load(dir: &Path, capacity: usize) -> Result<AckLog, SpoolError> {
        let path = dir.join(ACK_LOG);
        let text = match fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(io_error("read", &path, source)),
        };
        let lines: Vec<&str> = text.lines().collect();
        let torn = !text.is_empty() && !text.ends_with('\n');
        let mut order = VecDeque::new();
        let mut known = HashSet::new();
        for line in lines.iter().rev() {
            if order.len() == capacity {
                break;
            }
            if is_file_token(line) && known.insert((*line).to_owned()) {
                order.push_front((*line).to_owned());
            }
        }
        if torn || order.len() != lines.len() {
            rewrite_log(dir, &order)?;
        }
        let file = open_log(&path)?;
        Ok(AckLog {
            file,
            lines_in_file: order.len(),
            order,
            known,
            capacity,
        })
    }

    fn remember(&mut self, dir: &Path, token: String) -> Result<(), SpoolError> {
        if self.known.contains(&token) {
            return Ok(());
        }
        let path = dir.join(ACK_LOG);
        // One write, so that a crash tears at most this line.
        self.file
            .write_all(format!("{token}\n").as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|source| io_error("append to", &path, source))?;
        self.lines_in_file += 1;
        self.known.insert(token.clone());
        self.order.push_back(token);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
        if self.lines_in_file > 2 * self.capacity {
            rewrite_log(dir, &self.order)?;
            self.file = open_log(&path)?;
            self.lines_in_file = self.order.len();
        }
        Ok(())
    }
}

fn rewrite_log(dir: &Path, order: &VecDeque<String>) -> Result<(), SpoolError> {
    let path = dir.join(ACK_LOG);
    let temp = dir.join(format!(
        "{ACK_LOG}.{}{TEMP_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut text = String::with_capacity(order.len() * 40);
    for token in order {
        text.push_str(token);
        text.push('\n');
    }
    write_synced(&temp, text.as_bytes())
        .and_then(|()| fs::rename(&temp, &path))
        .map_err(|source| {
            let _ = fs::remove_file(&temp);
            io_error("rewrite", &path, source)
        })?;
    sync_dir(dir)
}

fn open_log(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| io_error("open", path, source))
}

/// The file-name form of a command id: the id itself when it is a safe name,
/// otherwise `~` and the id's SHA-256 in hex.
fn file_token(cmd_id: &str) -> Result<String, SpoolError> {
    if cmd_id.is_empty() {
        return Err(SpoolError::EmptyId);
    }
    if is_plain_name(cmd_id) {
        return Ok(cmd_id.to_owned());
    }
    let digest = Sha256::digest(cmd_id.as_bytes());
    let mut token = String::with_capacity(65);
    token.push('~');
    for byte in digest {
        token.push_str(&format!("{byte:02x}"));
    }
    Ok(token)
}

/// 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
fn is_plain_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_file_token(s: &str) -> bool {
    match s.strip_prefix('~') {
        Some(hex) => hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => is_plain_name(s),
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, SpoolError> {
    fs::read_dir(dir)
        .and_then(|entries| entries.collect::<io::Result<Vec<_>>>())
        .map_err(|source| io_error("list", dir, source))
}

/// The ordering key of a record, 0 if it cannot be read (it is dealt with later).
fn read_seq(path: &Path) -> u64 {
    fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<SeqOnly>(&bytes).ok())
        .map_or(0, |record| record.seq)
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_error("flush the directory", dir, source))
}

/// Removes `path`, returning whether it was there.
fn remove_if_present(path: &Path, action: &'static str) -> Result<bool, SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(io_error(action, path, source)),
    }
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> SpoolError {
    SpoolError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmc_protocol::words::{CommandOutcome, ResourceUsage};

    fn result(cmd_id: &str, out: &str) -> CommandResult {
        CommandResult {
            cmd_id: cmd_id.to_owned(),
            out: out.to_owned(),
            err: String::new(),
            finished: true,
            exit_code_or_signal: 0,
            resources: ResourceUsage::default(),
            state: CommandOutcome::Exited,
            error: None,
            started_at: Some("2024-05-01T12:00:00Z".to_owned()),
            ended_at: Some("2024-05-01T12:00:01Z".to_owned()),
            wall_secs: 1.0,
            out_bytes: out.len() as u64,
            err_bytes: 0,
            out_truncated: false,
            err_truncated: false,
            out_file: None,
            err_file: None,
        }
    }

    const HOST: &str = "/queue/vmc.host.lab-1";

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_stored_result_survives_a_restart_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.mark_started("c-1", HOST).unwrap();
        spool.store_result(HOST, &result("c-1", "hello\n")).unwrap();
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(
            spool.pending().unwrap(),
            vec![(HOST.to_owned(), result("c-1", "hello\n"))]
        );
        assert!(
            spool.interrupted().unwrap().is_empty(),
            "the result replaced the marker"
        );
        assert_eq!(
            spool.result("c-1").unwrap(),
            Some((HOST.to_owned(), result("c-1", "hello\n")))
        );

        assert!(spool.acknowledge("c-1").unwrap());
        assert!(
            !spool.acknowledge("c-1").unwrap(),
            "a second ACK finds nothing"
        );
        assert!(spool.pending().unwrap().is_empty());
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert!(
            spool.pending().unwrap().is_empty(),
            "still gone after a restart"
        );
        assert_eq!(spool.result("c-1").unwrap(), None);
    }

    #[test]
    fn pending_results_come_oldest_first_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for id in ["z", "a", "m"] {
            spool.store_result(HOST, &result(id, id)).unwrap();
        }
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        spool
            .store_result("/queue/vmc.host.other", &result("b", "b"))
            .unwrap();
        let order: Vec<(String, String)> = spool
            .pending()
            .unwrap()
            .into_iter()
            .map(|(reply_to, r)| (r.cmd_id, reply_to))
            .collect();
        assert_eq!(
            order,
            vec![
                ("z".to_owned(), HOST.to_owned()),
                ("a".to_owned(), HOST.to_owned()),
                ("m".to_owned(), HOST.to_owned()),
                ("b".to_owned(), "/queue/vmc.host.other".to_owned()),
            ]
        );
    }

    #[test]
    fn is_known_covers_started_finished_and_acknowledged_commands() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(!spool.is_known("c-1"));
        spool.mark_started("c-1", HOST).unwrap();
        assert!(spool.is_known("c-1"), "started");
        spool.store_result(HOST, &result("c-1", "")).unwrap();
        assert!(spool.is_known("c-1"), "finished");
        spool.acknowledge("c-1").unwrap();
        assert!(spool.is_known("c-1"), "acknowledged");
        assert!(!spool.is_known("c-2"));
        assert!(!spool.is_known(""));
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.is_known("c-1"), "acknowledged ids survive a restart");
    }

    #[test]
    fn only_the_last_acknowledged_ids_are_remembered() {
        const REMEMBERED: usize = 50;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_remembering(dir.path(), REMEMBERED).unwrap();
        let total = 2 * REMEMBERED + 5;
        for i in 0..total {
            let id = format!("c-{i}");
            spool.store_result(HOST, &result(&id, "")).unwrap();
            assert!(spool.acknowledge(&id).unwrap());
        }
        let first_kept = total - REMEMBERED;
        assert!(!spool.is_known("c-0"));
        assert!(!spool.is_known(&format!("c-{}", first_kept - 1)));
        assert!(spool.is_known(&format!("c-{first_kept}")));
        assert!(spool.is_known(&format!("c-{}", total - 1)));
        let lines = fs::read_to_string(dir.path().join(ACK_LOG)).unwrap();
        assert!(
            lines.lines().count() <= 2 * REMEMBERED,
            "the log is compacted as it grows"
        );
        drop(spool);

        let spool = Spool::open_remembering(dir.path(), REMEMBERED).unwrap();
        assert!(!spool.is_known(&format!("c-{}", first_kept - 1)));
        assert!(spool.is_known(&format!("c-{first_kept}")));
        let lines = fs::read_to_string(dir.path().join(ACK_LOG)).unwrap();
        assert_eq!(
            lines.lines().count(),
            REMEMBERED,
            "the log was compacted on open"
        );
    }

    #[test]
    fn interrupted_lists_started_commands_without_a_result() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.mark_started("c-1", HOST).unwrap();
        spool.mark_started("c-2", "/queue/vmc.host.other").unwrap();
        spool.mark_started("c-3", HOST).unwrap();
        spool.store_result(HOST, &result("c-2", "")).unwrap();
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(
            spool.interrupted().unwrap(),
            vec![
                ("c-1".to_owned(), HOST.to_owned()),
                ("c-3".to_owned(), HOST.to_owned())
            ]
        );
        spool.mark_started("c-2", HOST).unwrap();
        assert_eq!(
            spool.interrupted().unwrap().len(),
            2,
            "a finished command is not restarted"
        );
    }

    #[test]
    fn hostile_ids_stay_inside_the_spool_and_empty_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let spool = Spool::open(&spool_dir).unwrap();
        let hostile = [
            "../escape",
            "/etc/passwd",
            "..",
            ".hidden",
            "a/b",
            "new\nline",
            "ümlaut",
            "acked.log",
            &"x".repeat(300),
        ];
        for id in hostile {
            spool.mark_started(id, HOST).unwrap();
            assert!(spool.is_known(id), "{id:?}");
            spool.store_result(HOST, &result(id, "out")).unwrap();
        }
        assert_eq!(
            names(dir.path()),
            vec!["spool"],
            "nothing written outside the spool"
        );
        let pending: Vec<String> = spool
            .pending()
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.cmd_id)
            .collect();
        assert_eq!(pending, hostile.map(str::to_owned).to_vec());
        for id in hostile {
            assert!(spool.acknowledge(id).unwrap(), "{id:?}");
        }
        drop(spool);

        let spool = Spool::open(&spool_dir).unwrap();
        for id in hostile {
            assert!(spool.is_known(id), "{id:?} remembered after a restart");
        }
        assert!(matches!(
            spool.mark_started("", HOST),
            Err(SpoolError::EmptyId)
        ));
        assert!(matches!(
            spool.store_result(HOST, &result("", "")),
            Err(SpoolError::EmptyId)
        ));
        assert_eq!(
            spool.acknowledge("").unwrap_err().to_string(),
            "a command id must not be empty"
        );
    }

    #[test]
    fn torn_temporary_files_are_ignored_and_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.store_result(HOST, &result("c-1", "kept")).unwrap();
        drop(spool);
        fs::write(
            dir.path().join("c-2.0123abcd.tmp"),
            br#"{"seq":9,"reply_to":"/qu"#,
        )
        .unwrap();
        fs::write(dir.path().join("c-1.4567.tmp"), b"").unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(names(dir.path()), vec!["acked.log", "c-1.result"]);
        assert_eq!(
            spool.pending().unwrap(),
            vec![(HOST.to_owned(), result("c-1", "kept"))]
        );
        assert!(!spool.is_known("c-2"));
    }

    #[test]
    fn a_corrupt_record_is_set_aside_not_resent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.store_result(HOST, &result("good", "")).unwrap();
        fs::write(dir.path().join("bad.result"), b"not json").unwrap();
        let pending = spool.pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].1.cmd_id, "good");
        assert!(dir.path().join("bad.result.corrupt").exists());
        assert!(spool.pending().unwrap().len() == 1);
    }

    #[test]
    fn a_torn_line_in_the_ack_log_does_not_merge_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.store_result(HOST, &result("c-1", "")).unwrap();
        spool.acknowledge("c-1").unwrap();
        drop(spool);
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.path().join(ACK_LOG))
            .unwrap();
        log.write_all(b"c-2").unwrap();
        drop(log);

        let spool = Spool::open(dir.path()).unwrap();
        spool.store_result(HOST, &result("c-3", "")).unwrap();
        spool.acknowledge("c-3").unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.is_known("c-1"));
        assert!(spool.is_known("c-3"));
        assert!(!spool.is_known("c-2c-3"));
    }

    #[test]
    fn a_thousand_results_store_and_acknowledge() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 0..1000 {
            let id = format!("c-{i}");
            spool.mark_started(&id, HOST).unwrap();
            spool.store_result(HOST, &result(&id, "output")).unwrap();
        }
        let pending = spool.pending().unwrap();
        assert_eq!(pending.len(), 1000);
        assert_eq!(pending[0].1.cmd_id, "c-0");
        assert_eq!(pending[999].1.cmd_id, "c-999");
        for i in 0..1000 {
            assert!(spool.acknowledge(&format!("c-{i}")).unwrap());
        }
        assert!(spool.pending().unwrap().is_empty());
        assert!(spool.interrupted().unwrap().is_empty());
        assert_eq!(names(dir.path()), vec!["acked.log"]);
    }
}
