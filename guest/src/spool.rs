//! The result spool: what the guest must not forget across its own restarts.
//!
//! A [`Spool`] is one directory holding one append-only *journal* (`journal`).
//! Every change is one record appended to it, and flushed (`fdatasync`) before the
//! method returns except `acked` and a result stored by
//! [`Spool::store_result_unflushed`] (flushed by [`Spool::flush`] or
//! [`Spool::flush_unacknowledged`] while the result travels): `started` when the agent accepts a `CMD_RUN`; `result` when the command
//! ends, which replaces its started record and any earlier result; `acked` on the host's `CMD_ACK`, which forgets the result and
//! remembers the id (durable with the next flushed record: lost, the result is only
//! sent again), so that a late redelivery of an acknowledged `CMD_RUN` is not run
//! again (the last
//! [`REMEMBERED_ACKS`] ids are remembered). [`Spool::open`] replays the journal into
//! memory; only where each result's record lies is kept there, results are read
//! back from the journal when asked for.
//!
//! A record is one line: 16 hex digits (the first 8 bytes of the SHA-256 of the
//! JSON that follows), a space, the record as JSON, and `\n`; JSON escapes line
//! breaks, so a record never holds one. A line without its `\n` or whose checksum
//! does not match was torn by a crash or damaged: it is logged and left out. Open
//! cuts a torn end off the journal, so the next record never merges with it, and
//! rewrites a journal damaged anywhere else; an append that fails is cut off at
//! once, and the journal is rewritten before the next one.
//!
//! The journal is *compacted* at open when needed and whenever it grows past twice
//! its live state plus 1 MiB, so it stays bounded however many commands pass: the
//! live state (the remembered acknowledged ids in one `remembered` record, then
//! started commands without a result and unacknowledged results, oldest first) is
//! written to a temporary file (`*.tmp`), flushed, renamed over the journal, and
//! the directory flushed. A crash leaves the old
//! journal or the new one; stray temporary files are removed by open.
//!
//! Earlier versions kept one file per record (`<key>.started`, `<key>.result`) and
//! the acknowledged ids in `acked.log`. Open takes such files in once: it writes
//! what they hold to the journal, compacts it, then deletes them (an unreadable one
//! is renamed `*.corrupt` and left out), so an agent upgraded in place forgets
//! nothing.
//!
//! Command ids come from the network and may be any text, so they never become
//! file names. The spool remembers an id by a key: the id itself when it is 1 to
//! 128 characters of `A-Z a-z 0-9 . _ -` not starting with `.`, otherwise `~` and
//! the SHA-256 of the id in hex, so that remembered ids stay small whatever they
//! are (the older format named its files by the same keys). Records keep the real
//! id inside.
//!
//! A method that changes the spool appends one record (as big as the result, for
//! a result) and flushes it at most once; now and then a compaction also rewrites the live
//! state. Reading a result reads its record. Callers on an async runtime that
//! cannot afford that should call them from `spawn_blocking` (a `Spool` is
//! `Send + Sync`, its calls take turns on one lock; share it in an `Arc`). The
//! spool does not decide what an interrupted command's result is, does not resend
//! anything, and does not lock its directory against a second agent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmc_protocol::words::CommandResult;

/// How many acknowledged command ids the spool remembers.
pub const REMEMBERED_ACKS: usize = 10_000;

/// How far the journal may grow past twice its live state before it is compacted.
const COMPACTION_SLACK: u64 = 1 << 20;

const JOURNAL: &str = "journal";
const TEMP_SUFFIX: &str = ".tmp";
const CORRUPT_SUFFIX: &str = ".corrupt";
/// Hex digits of a record's checksum, at the start of its line.
const CHECKSUM_LEN: usize = 16;

const LEGACY_RESULT_SUFFIX: &str = ".result";
const LEGACY_STARTED_SUFFIX: &str = ".started";
const LEGACY_ACK_LOG: &str = "acked.log";

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

/// A journal record as it is written, borrowing what it holds.
#[derive(Serialize)]
#[serde(tag = "record", rename_all = "snake_case")]
enum RecordOut<'a> {
    Started {
        seq: u64,
        cmd_id: &'a str,
        reply_to: &'a str,
    },
    Result {
        seq: u64,
        reply_to: &'a str,
        result: &'a CommandResult,
    },
    Acked {
        key: &'a str,
    },
    Remembered {
        keys: Vec<&'a str>,
    },
}

/// A journal record as it is read back.
#[derive(Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
enum Record {
    /// The agent accepted `cmd_id`; its answers go to `reply_to`.
    Started {
        seq: u64,
        cmd_id: String,
        reply_to: String,
    },
    /// The result of a command, kept until `CMD_ACK`.
    Result {
        seq: u64,
        reply_to: String,
        result: Box<CommandResult>,
    },
    /// The host acknowledged the result of the command with this key.
    Acked { key: String },
    /// Acknowledged keys, oldest first, as a compaction writes them.
    Remembered { keys: Vec<String> },
}

/// What a record changes in the [`Index`], without the result itself. `seq` orders
/// started commands and results: they are listed oldest first.
enum Change<'a> {
    Started {
        key: String,
        seq: u64,
        cmd_id: &'a str,
        reply_to: &'a str,
    },
    Result {
        key: String,
        seq: u64,
    },
    Acked {
        key: String,
    },
}

/// A started marker of the older format.
#[derive(Deserialize)]
struct LegacyStarted {
    seq: u64,
    cmd_id: String,
    reply_to: String,
}

/// A result file of the older format.
#[derive(Deserialize)]
struct LegacyResult {
    seq: u64,
    reply_to: String,
    result: CommandResult,
}

/// A command started and without a result.
#[derive(Debug)]
struct StartedCommand {
    seq: u64,
    cmd_id: String,
    reply_to: String,
    /// Bytes of its record.
    len: usize,
}

/// Where an unacknowledged result's record lies in the journal.
#[derive(Debug, Clone, Copy)]
struct StoredResult {
    seq: u64,
    at: u64,
    len: usize,
}

/// The live state, as the journal's records leave it, by key.
#[derive(Debug)]
struct Index {
    started: HashMap<String, StartedCommand>,
    results: HashMap<String, StoredResult>,
    /// Remembered acknowledged keys, oldest first.
    acked: VecDeque<String>,
    acked_keys: HashSet<String>,
    /// How many acknowledged ids are remembered ([`REMEMBERED_ACKS`] outside tests).
    remembered: usize,
    /// About the bytes a compacted journal holds: those of the records of started
    /// commands and results, and of the remembered keys in one record.
    live_bytes: u64,
    next_seq: u64,
}

/// The open journal file.
#[derive(Debug)]
struct Journal {
    file: File,
    /// Bytes of whole records; appends go there.
    len: u64,
    /// A write failed, so what follows `len` on disk is unknown: the journal is
    /// rewritten before anything is appended.
    needs_rewrite: bool,
}

#[derive(Debug)]
struct SpoolState {
    index: Index,
    journal: Journal,
    /// Keys of results appended unflushed since the last flush.
    unflushed: HashSet<String>,
}

/// What replaying a journal found.
struct Replayed {
    /// Bytes up to the end of the last intact record.
    intact_len: u64,
    file_len: u64,
    /// Whether a damaged record lies before an intact one.
    damaged_inside: bool,
}

/// The directory of started commands and unacknowledged results.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    state: Mutex<SpoolState>,
}

impl Spool {
    /// Opens (creating it, mode 0700, if needed) the spool in `dir`: removes stray
    /// temporary files, replays the journal (leaving out and cutting off what a
    /// crash tore), takes in the files of the older format, and compacts the journal
    /// when it needs it.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Spool::open_remembering(dir, REMEMBERED_ACKS)
    }

    /// [`Spool::open`], remembering `remembered` acknowledged ids.
    fn open_remembering(dir: &Path, remembered: usize) -> Result<Spool, SpoolError> {
        let created = !dir.exists();
        create_private_dir(dir).map_err(|source| SpoolError::Io {
            action: "create the spool directory",
            path: dir.to_owned(),
            source,
        })?;
        if created {
            // Makes the new directory's name durable.
            match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
                _ => sync_dir(Path::new("."))?,
            }
        }
        for entry in read_dir(dir)? {
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|name| name.ends_with(TEMP_SUFFIX))
            {
                let path = dir.join(name);
                log::info!("removing {}, left by an interrupted write", path.display());
                remove_if_present(&path, "remove the stray temporary file")?;
            }
        }

        let path = dir.join(JOURNAL);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| io_error("open", &path, source))?;
        let mut index = Index::new(remembered);
        let replayed =
            replay(&file, &mut index).map_err(|source| io_error("read", &path, source))?;
        if replayed.intact_len < replayed.file_len {
            file.set_len(replayed.intact_len)
                .and_then(|()| file.sync_all())
                .map_err(|source| io_error("cut the torn record off", &path, source))?;
        }
        let mut state = SpoolState {
            index,
            journal: Journal {
                file,
                len: replayed.intact_len,
                needs_rewrite: replayed.damaged_inside,
            },
            unflushed: HashSet::new(),
        };
        let legacy_files = take_in_legacy_files(dir, &mut state)?;
        if state.journal.needs_rewrite || !legacy_files.is_empty() || state.compaction_due() {
            state.compact(dir)?;
        }
        for file in &legacy_files {
            remove_if_present(file, "remove the file of the older format")?;
        }
        // Makes a new journal's name, or the removals, durable.
        sync_dir(dir)?;
        Ok(Spool {
            dir: dir.to_owned(),
            state: Mutex::new(state),
        })
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records durably that `cmd_id` was accepted and its answers go to `reply_to`.
    /// Does nothing when the command's result is already stored.
    pub fn mark_started(&self, cmd_id: &str, reply_to: &str) -> Result<(), SpoolError> {
        let key = id_key(cmd_id)?;
        let mut state = self.lock();
        if state.index.results.contains_key(&key) {
            return Ok(());
        }
        let seq = state.index.next_seq;
        state.write(
            &self.dir,
            &RecordOut::Started {
                seq,
                cmd_id,
                reply_to,
            },
            Change::Started {
                key,
                seq,
                cmd_id,
                reply_to,
            },
        )?;
        state.compact_if_due(&self.dir);
        Ok(())
    }

    /// Whether `cmd_id` was started here, has a stored result, or is among the last
    /// [`REMEMBERED_ACKS`] acknowledged ones: a `CMD_RUN` with this id must not run.
    pub fn is_known(&self, cmd_id: &str) -> bool {
        let Ok(key) = id_key(cmd_id) else {
            return false;
        };
        let state = self.lock();
        state.index.started.contains_key(&key)
            || state.index.results.contains_key(&key)
            || state.index.acked_keys.contains(&key)
    }

    /// Stores `result` until [`Spool::acknowledge`], replacing any earlier result of
    /// the same command and its started marker.
    pub fn store_result(&self, reply_to: &str, result: &CommandResult) -> Result<(), SpoolError> {
        self.append_result(reply_to, result, true)
    }

    /// As [`Spool::store_result`], but not flushed: the caller sends the result at
    /// once and has it flushed meanwhile by [`Spool::flush`] (any later flushed
    /// record also covers it). Lost in a power cut before that flush, the command's
    /// started record (flushed) is still there, so the agent reports it `lost`
    /// after the reboot unless the host already has the result.
    pub fn store_result_unflushed(
        &self,
        reply_to: &str,
        result: &CommandResult,
    ) -> Result<(), SpoolError> {
        self.append_result(reply_to, result, false)
    }

    /// Appends a result record, flushed when `sync`; an unflushed one is remembered
    /// until a flush covers it or the host acknowledges it.
    fn append_result(
        &self,
        reply_to: &str,
        result: &CommandResult,
        sync: bool,
    ) -> Result<(), SpoolError> {
        let key = id_key(&result.cmd_id)?;
        let mut state = self.lock();
        let seq = state.index.next_seq;
        let record = RecordOut::Result {
            seq,
            reply_to,
            result,
        };
        let (at, len) = state.append_with(&self.dir, &record, sync)?;
        if !sync {
            state.unflushed.insert(key.clone());
        }
        state.index.apply(Change::Result { key, seq }, at, len);
        state.compact_if_due(&self.dir);
        Ok(())
    }

    /// Flushes the spool if a result stored by [`Spool::store_result_unflushed`]
    /// since the last flush is still unacknowledged; answers whether it flushed. A
    /// result the host acknowledged meanwhile needs no flush of its own: the host
    /// has it on disk.
    pub fn flush_unacknowledged(&self) -> Result<bool, SpoolError> {
        let pending: Vec<String> = {
            let state = self.lock();
            if state.unflushed.is_empty() {
                return Ok(false);
            }
            state.unflushed.iter().cloned().collect()
        };
        self.flush()?;
        let mut state = self.lock();
        for key in &pending {
            state.unflushed.remove(key);
        }
        Ok(true)
    }

    /// Flushes everything appended so far to disk. The lock is not held while the
    /// disk works, so other changes go on meanwhile (each flush covers all that was
    /// written before it started).
    pub fn flush(&self) -> Result<(), SpoolError> {
        let file = {
            let state = self.lock();
            state.journal.file.try_clone()
        };
        let journal = self.dir.join(JOURNAL);
        let file = file.map_err(|source| io_error("open again", &journal, source))?;
        if let Err(source) = file.sync_data() {
            // What the failed flush leaves on disk is unknown: rewrite the journal
            // (compaction writes and flushes the whole live state) before the next
            // record.
            self.lock().journal.needs_rewrite = true;
            return Err(io_error("flush", &journal, source));
        }
        Ok(())
    }

    /// The host has stored the result of `cmd_id`: forgets the result and remembers
    /// the id as acknowledged. Returns whether there was a result to forget.
    pub fn acknowledge(&self, cmd_id: &str) -> Result<bool, SpoolError> {
        let key = id_key(cmd_id)?;
        let mut state = self.lock();
        if !state.index.results.contains_key(&key) {
            return Ok(false);
        }
        // One record forgets the result and remembers the id, so a crash cannot
        // leave one done without the other. It is not flushed on its own: lost in a
        // power cut, the result is merely sent again, and the host ignores a result
        // it already holds; the next started command's record flushes it anyway.
        let (at, len) = state.append_with(&self.dir, &RecordOut::Acked { key: &key }, false)?;
        state.unflushed.remove(&key);
        state
            .index
            .apply(Change::Acked { key: key.clone() }, at, len);
        state.compact_if_due(&self.dir);
        Ok(true)
    }

    /// The stored result of `cmd_id` and where it goes, if it is still
    /// unacknowledged (to answer a duplicate `CMD_RUN` by resending it).
    pub fn result(&self, cmd_id: &str) -> Result<Option<(String, CommandResult)>, SpoolError> {
        let key = id_key(cmd_id)?;
        let mut state = self.lock();
        let Some(stored) = state.index.results.get(&key).copied() else {
            return Ok(None);
        };
        state.read_result(&self.dir, &key, stored)
    }

    /// Every unacknowledged result with its `reply_to`, oldest first, to resend
    /// after each (re)connection. A record found damaged is logged and left out.
    pub fn pending(&self) -> Result<Vec<(String, CommandResult)>, SpoolError> {
        let mut state = self.lock();
        let mut stored: Vec<(String, StoredResult)> = state
            .index
            .results
            .iter()
            .map(|(key, stored)| (key.clone(), *stored))
            .collect();
        stored.sort_by_key(|(_, stored)| stored.seq);
        let mut results = Vec::with_capacity(stored.len());
        for (key, stored) in stored {
            results.extend(state.read_result(&self.dir, &key, stored)?);
        }
        Ok(results)
    }

    /// `(cmd_id, reply_to)` of every command started but without a result, oldest
    /// first: the agent stopped while they ran. The caller stores a result for each.
    pub fn interrupted(&self) -> Result<Vec<(String, String)>, SpoolError> {
        let state = self.lock();
        let mut started: Vec<&StartedCommand> = state.index.started.values().collect();
        started.sort_by_key(|started| started.seq);
        Ok(started
            .into_iter()
            .map(|started| (started.cmd_id.clone(), started.reply_to.clone()))
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // The state is changed only after its record is on disk, by code that does
        // not panic, so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SpoolState {
    /// Appends `record` durably, then applies `change`, what it means, to the index.
    fn write(
        &mut self,
        dir: &Path,
        record: &RecordOut<'_>,
        change: Change<'_>,
    ) -> Result<(), SpoolError> {
        let (at, len) = self.append(dir, record)?;
        self.index.apply(change, at, len);
        Ok(())
    }

    /// Appends `record` durably; returns where it lies and its length.
    fn append(&mut self, dir: &Path, record: &RecordOut<'_>) -> Result<(u64, usize), SpoolError> {
        self.append_with(dir, record, true)
    }

    /// Appends `record`, flushed to disk when `sync`; otherwise it becomes durable
    /// with the next flushed record (`fdatasync` covers everything written before).
    fn append_with(
        &mut self,
        dir: &Path,
        record: &RecordOut<'_>,
        sync: bool,
    ) -> Result<(u64, usize), SpoolError> {
        let line = encode_line(record).map_err(|source| SpoolError::Encode {
            cmd_id: record.cmd_id().to_owned(),
            source,
        })?;
        if self.journal.needs_rewrite {
            self.compact(dir)?;
        }
        let at = self.journal.len;
        let file = &self.journal.file;
        let written =
            file.write_all_at(&line, at)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if let Err(source) = written {
            // What reached the disk is unknown: cut it off so that nothing is ever
            // appended to a partial record, and rewrite the journal before the next.
            let _ = file.set_len(at);
            self.journal.needs_rewrite = true;
            return Err(io_error("append to", &dir.join(JOURNAL), source));
        }
        self.journal.len = at + line.len() as u64;
        if sync {
            self.unflushed.clear();
        }
        Ok((at, line.len()))
    }

    fn compaction_due(&self) -> bool {
        self.journal.len > self.index.live_bytes.saturating_mul(2) + COMPACTION_SLACK
    }

    /// Compacts the journal if it is due. The change that made it due is already
    /// durable, so a failure is only logged; the next change tries again.
    fn compact_if_due(&mut self, dir: &Path) {
        if self.compaction_due() {
            if let Err(e) = self.compact(dir) {
                log::error!("cannot compact the spool journal: {e}");
            }
        }
    }

    /// Rewrites the journal with only the live state: remembered acknowledged ids
    /// oldest first, then started commands and results in their order.
    fn compact(&mut self, dir: &Path) -> Result<(), SpoolError> {
        let path = dir.join(JOURNAL);
        // Unique without randomness: at early boot a VM may have no entropy yet, and
        // this runs when the agent starts.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let temp = dir.join(format!(
            "{JOURNAL}.{}.{nanos}{TEMP_SUFFIX}",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|source| io_error("create", &temp, source))?;
        let written = self
            .write_live_state(dir, &file, &temp)
            .and_then(|written| {
                fs::rename(&temp, &path)
                    .map(|()| written)
                    .map_err(|source| io_error("rename into place", &path, source))
            });
        let (index, len) = match written {
            Ok(written) => written,
            Err(err) => {
                let _ = fs::remove_file(&temp);
                return Err(err);
            }
        };
        self.index = index;
        self.journal = Journal {
            file,
            len,
            needs_rewrite: false,
        };
        if let Err(err) = sync_dir(dir) {
            // The rename may not last: rewrite again before the next append.
            self.journal.needs_rewrite = true;
            return Err(err);
        }
        self.unflushed.clear();
        Ok(())
    }

    /// Writes the live state to `file` and flushes it; returns the index of what was
    /// written and its length.
    fn write_live_state(
        &self,
        dir: &Path,
        file: &File,
        path: &Path,
    ) -> Result<(Index, u64), SpoolError> {
        enum Live<'a> {
            Started(&'a String, &'a StartedCommand),
            Result(&'a String, StoredResult),
        }
        let write_error = |source| io_error("write", path, source);
        let encode_error = |cmd_id: &str| {
            let cmd_id = cmd_id.to_owned();
            move |source| SpoolError::Encode { cmd_id, source }
        };
        let mut index = Index::new(self.index.remembered);
        index.next_seq = self.index.next_seq;
        let mut out = BufWriter::new(file);
        let mut at = 0;
        if !self.index.acked.is_empty() {
            let keys = self.index.acked.iter().map(String::as_str).collect();
            let line = encode_line(&RecordOut::Remembered { keys })
                .map_err(encode_error("(acknowledged ids)"))?;
            out.write_all(&line).map_err(write_error)?;
            for key in &self.index.acked {
                index.apply(Change::Acked { key: key.clone() }, at, 0);
            }
            at += line.len() as u64;
        }
        let mut live: Vec<(u64, Live<'_>)> = self
            .index
            .started
            .iter()
            .map(|(key, started)| (started.seq, Live::Started(key, started)))
            .chain(
                self.index
                    .results
                    .iter()
                    .map(|(key, stored)| (stored.seq, Live::Result(key, *stored))),
            )
            .collect();
        live.sort_by_key(|(seq, _)| *seq);
        for (seq, item) in live {
            let (line, change) = match item {
                Live::Started(key, started) => {
                    let line = encode_line(&RecordOut::Started {
                        seq,
                        cmd_id: &started.cmd_id,
                        reply_to: &started.reply_to,
                    })
                    .map_err(encode_error(&started.cmd_id))?;
                    let change = Change::Started {
                        key: key.clone(),
                        seq,
                        cmd_id: &started.cmd_id,
                        reply_to: &started.reply_to,
                    };
                    (line, change)
                }
                Live::Result(key, stored) => match self.read_line(dir, stored)? {
                    // Copied as it is: it was checked when the journal was replayed
                    // or written, and again here.
                    Some(line) if line_is_intact(&line) => (
                        line,
                        Change::Result {
                            key: key.clone(),
                            seq,
                        },
                    ),
                    _ => {
                        log::error!(
                            "the spooled result of {key} (bytes {} to {} of {}) is damaged: \
                             left out",
                            stored.at,
                            stored.at + stored.len as u64,
                            dir.join(JOURNAL).display()
                        );
                        continue;
                    }
                },
            };
            out.write_all(&line).map_err(write_error)?;
            index.apply(change, at, line.len());
            at += line.len() as u64;
        }
        out.flush().map_err(write_error)?;
        drop(out);
        file.sync_all().map_err(write_error)?;
        Ok((index, at))
    }

    /// The bytes of a record, `None` if the journal ends before it.
    fn read_line(&self, dir: &Path, stored: StoredResult) -> Result<Option<Vec<u8>>, SpoolError> {
        let mut line = vec![0; stored.len];
        match self.journal.file.read_exact_at(&mut line, stored.at) {
            Ok(()) => Ok(Some(line)),
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(source) => Err(io_error("read", &dir.join(JOURNAL), source)),
        }
    }

    /// Reads back a stored result; a damaged one is logged and forgotten.
    fn read_result(
        &mut self,
        dir: &Path,
        key: &str,
        stored: StoredResult,
    ) -> Result<Option<(String, CommandResult)>, SpoolError> {
        let line = self.read_line(dir, stored)?;
        match line.as_deref().and_then(decode_line) {
            Some(Record::Result {
                reply_to, result, ..
            }) if id_key(&result.cmd_id).is_ok_and(|k| k == key) => Ok(Some((reply_to, *result))),
            _ => {
                log::error!(
                    "the spooled result of {key} (bytes {} to {} of {}) is damaged: left out",
                    stored.at,
                    stored.at + stored.len as u64,
                    dir.join(JOURNAL).display()
                );
                if let Some(stored) = self.index.results.remove(key) {
                    self.index.remove_live(stored.len);
                }
                Ok(None)
            }
        }
    }
}

impl Index {
    fn new(remembered: usize) -> Index {
        Index {
            started: HashMap::new(),
            results: HashMap::new(),
            acked: VecDeque::new(),
            acked_keys: HashSet::new(),
            remembered,
            live_bytes: 0,
            next_seq: 1,
        }
    }

    /// Applies the change of a record of `len` bytes at byte `at` of the journal.
    /// The same rules serve live changes, replays and compactions, so a replayed
    /// journal gives back the state that wrote it. An acknowledged key counts for
    /// what it takes in a `remembered` record, whatever record brought it.
    fn apply(&mut self, change: Change<'_>, at: u64, len: usize) {
        match change {
            Change::Started {
                key,
                seq,
                cmd_id,
                reply_to,
            } => {
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                if self.results.contains_key(&key) {
                    return;
                }
                self.add_live(len);
                let started = StartedCommand {
                    seq,
                    cmd_id: cmd_id.to_owned(),
                    reply_to: reply_to.to_owned(),
                    len,
                };
                if let Some(old) = self.started.insert(key, started) {
                    self.remove_live(old.len);
                }
            }
            Change::Result { key, seq } => {
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                if let Some(old) = self.started.remove(&key) {
                    self.remove_live(old.len);
                }
                self.add_live(len);
                if let Some(old) = self.results.insert(key, StoredResult { seq, at, len }) {
                    self.remove_live(old.len);
                }
            }
            Change::Acked { key } => {
                if let Some(old) = self.results.remove(&key) {
                    self.remove_live(old.len);
                }
                if self.acked_keys.insert(key.clone()) {
                    self.add_live(remembered_len(&key));
                    self.acked.push_back(key);
                }
                while self.acked.len() > self.remembered {
                    if let Some(old) = self.acked.pop_front() {
                        self.acked_keys.remove(&old);
                        self.remove_live(remembered_len(&old));
                    }
                }
            }
        }
    }

    /// Applies an intact record read from the journal; false (and nothing applied)
    /// for a record no spool writes.
    fn apply_record(&mut self, record: &Record, at: u64, len: usize) -> bool {
        match record {
            Record::Started {
                seq,
                cmd_id,
                reply_to,
            } => {
                let Ok(key) = id_key(cmd_id) else {
                    return false;
                };
                let (seq, cmd_id, reply_to) = (*seq, cmd_id.as_str(), reply_to.as_str());
                let change = Change::Started {
                    key,
                    seq,
                    cmd_id,
                    reply_to,
                };
                self.apply(change, at, len);
            }
            Record::Result { seq, result, .. } => {
                let Ok(key) = id_key(&result.cmd_id) else {
                    return false;
                };
                self.apply(Change::Result { key, seq: *seq }, at, len);
            }
            Record::Acked { key } => {
                if !is_key(key) {
                    return false;
                }
                self.apply(Change::Acked { key: key.clone() }, at, len);
            }
            Record::Remembered { keys } => {
                if !keys.iter().all(|key| is_key(key)) {
                    return false;
                }
                for key in keys {
                    self.apply(Change::Acked { key: key.clone() }, at, 0);
                }
            }
        }
        true
    }

    fn add_live(&mut self, len: usize) {
        self.live_bytes = self.live_bytes.saturating_add(len as u64);
    }

    fn remove_live(&mut self, len: usize) {
        self.live_bytes = self.live_bytes.saturating_sub(len as u64);
    }
}

impl RecordOut<'_> {
    fn cmd_id(&self) -> &str {
        match self {
            RecordOut::Started { cmd_id, .. } => cmd_id,
            RecordOut::Result { result, .. } => &result.cmd_id,
            RecordOut::Acked { key } => key,
            RecordOut::Remembered { .. } => "(acknowledged ids)",
        }
    }
}

/// Applies every intact record of the journal to `index`, logging the others.
fn replay(file: &File, index: &mut Index) -> io::Result<Replayed> {
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut at = 0;
    let mut intact_len = 0;
    let mut damaged_since = None;
    let mut damaged_inside = false;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        let applied =
            decode_line(&line).is_some_and(|record| index.apply_record(&record, at, read));
        if applied {
            if let Some(from) = damaged_since.take() {
                log::error!(
                    "the spool journal is damaged from byte {from} to {at}: records left out"
                );
                damaged_inside = true;
            }
            intact_len = at + read as u64;
        } else {
            damaged_since.get_or_insert(at);
        }
        at += read as u64;
    }
    if damaged_since.is_some() {
        log::warn!(
            "the spool journal ends with a record torn by a crash (bytes {intact_len} to \
             {at}): left out"
        );
    }
    Ok(Replayed {
        intact_len,
        file_len: at,
        damaged_inside,
    })
}

/// Reads the files of the older format, appends what they hold to the journal,
/// and returns the files to delete once the journal is compacted. An unreadable
/// record file is renamed `*.corrupt` and left out.
fn take_in_legacy_files(dir: &Path, state: &mut SpoolState) -> Result<Vec<PathBuf>, SpoolError> {
    enum LegacyRecord {
        Started(LegacyStarted),
        Result(Box<LegacyResult>),
    }
    let mut files = Vec::new();
    let mut acked = Vec::new();
    let mut records = Vec::new();
    for entry in read_dir(dir)? {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = dir.join(name);
        if name == LEGACY_ACK_LOG {
            let bytes = fs::read(&path).map_err(|source| io_error("read", &path, source))?;
            let text = String::from_utf8_lossy(&bytes);
            // Only whole lines: a torn last one was never acknowledged (its result
            // is still there).
            let whole = text.rfind('\n').map_or("", |end| &text[..end]);
            acked.extend(whole.lines().filter(|l| is_key(l)).map(str::to_owned));
        } else if name.ends_with(LEGACY_RESULT_SUFFIX) {
            match read_legacy::<LegacyResult>(&path)? {
                Some(record) => records.push((record.seq, LegacyRecord::Result(Box::new(record)))),
                None => continue,
            }
        } else if name.ends_with(LEGACY_STARTED_SUFFIX) {
            match read_legacy::<LegacyStarted>(&path)? {
                Some(record) => records.push((record.seq, LegacyRecord::Started(record))),
                None => continue,
            }
        } else {
            continue;
        }
        files.push(path);
    }
    if files.is_empty() {
        return Ok(files);
    }
    log::info!(
        "taking {} files of the older spool format in {} into its journal",
        files.len(),
        dir.display()
    );
    if !acked.is_empty() {
        let keys = acked.iter().map(String::as_str).collect();
        let (at, _) = state.append(dir, &RecordOut::Remembered { keys })?;
        for key in acked {
            state.index.apply(Change::Acked { key }, at, 0);
        }
    }
    records.sort_by_key(|(seq, _)| *seq);
    for (seq, record) in &records {
        let seq = *seq;
        match record {
            LegacyRecord::Started(started) => {
                let Ok(key) = id_key(&started.cmd_id) else {
                    continue;
                };
                if state.index.results.contains_key(&key) {
                    continue;
                }
                let (cmd_id, reply_to) = (started.cmd_id.as_str(), started.reply_to.as_str());
                state.write(
                    dir,
                    &RecordOut::Started {
                        seq,
                        cmd_id,
                        reply_to,
                    },
                    Change::Started {
                        key,
                        seq,
                        cmd_id,
                        reply_to,
                    },
                )?;
            }
            LegacyRecord::Result(stored) => {
                let Ok(key) = id_key(&stored.result.cmd_id) else {
                    continue;
                };
                state.write(
                    dir,
                    &RecordOut::Result {
                        seq,
                        reply_to: &stored.reply_to,
                        result: &stored.result,
                    },
                    Change::Result { key, seq },
                )?;
            }
        }
    }
    Ok(files)
}

/// Reads a record file of the older format; `None` if it is corrupt (then set aside).
fn read_legacy<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, SpoolError> {
    let bytes = fs::read(path).map_err(|source| io_error("read", path, source))?;
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

/// The line of a record: checksum, space, JSON, `\n`.
fn encode_line(record: &RecordOut<'_>) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(&[b'0'; CHECKSUM_LEN]);
    line.push(b' ');
    serde_json::to_writer(&mut line, record)?;
    let sum = checksum(&line[CHECKSUM_LEN + 1..]);
    line[..CHECKSUM_LEN].copy_from_slice(&sum);
    line.push(b'\n');
    Ok(line)
}

/// The JSON of a whole line whose checksum matches.
fn intact_json(line: &[u8]) -> Option<&[u8]> {
    let body = line.strip_suffix(b"\n")?;
    if body.len() <= CHECKSUM_LEN || body[CHECKSUM_LEN] != b' ' {
        return None;
    }
    let (sum, json) = body.split_at(CHECKSUM_LEN);
    let json = &json[1..];
    (checksum(json) == sum).then_some(json)
}

fn line_is_intact(line: &[u8]) -> bool {
    intact_json(line).is_some()
}

/// The record of a whole, intact line.
fn decode_line(line: &[u8]) -> Option<Record> {
    serde_json::from_slice(intact_json(line)?).ok()
}

/// The first 8 bytes of the SHA-256 of `json`, in hex.
fn checksum(json: &[u8]) -> [u8; CHECKSUM_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(json);
    let mut sum = [0; CHECKSUM_LEN];
    for (i, byte) in digest.iter().take(CHECKSUM_LEN / 2).enumerate() {
        sum[2 * i] = HEX[usize::from(byte >> 4)];
        sum[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    sum
}

/// The key the spool remembers a command id by: the id itself when it is a plain
/// name, otherwise `~` and the id's SHA-256 in hex.
fn id_key(cmd_id: &str) -> Result<String, SpoolError> {
    if cmd_id.is_empty() {
        return Err(SpoolError::EmptyId);
    }
    if is_plain_name(cmd_id) {
        return Ok(cmd_id.to_owned());
    }
    let digest = Sha256::digest(cmd_id.as_bytes());
    let mut key = String::with_capacity(65);
    key.push('~');
    for byte in digest {
        key.push_str(&format!("{byte:02x}"));
    }
    Ok(key)
}

/// 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
fn is_plain_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The bytes `key` takes in a `remembered` record.
fn remembered_len(key: &str) -> usize {
    key.len() + 3
}

fn is_key(s: &str) -> bool {
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
    use serde_json::json;
    use std::sync::Arc;
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
    const OTHER_HOST: &str = "/queue/vmc.host.other";

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Each line of the journal, checked, as `record key-or-id [out]`.
    fn journal_records(dir: &Path) -> Vec<String> {
        let bytes = fs::read(dir.join(JOURNAL)).unwrap();
        bytes
            .split_inclusive(|b| *b == b'\n')
            .map(|line| match decode_line(line).expect("an intact record") {
                Record::Started { cmd_id, .. } => format!("started {cmd_id}"),
                Record::Result { result, .. } => format!("result {} {}", result.cmd_id, result.out),
                Record::Acked { key } => format!("acked {key}"),
                Record::Remembered { keys } => format!("remembered {}", keys.join(" ")),
            })
            .collect()
    }

    /// What a spool reports: pending results, interrupted commands, and which of
    /// `ids` it knows.
    type Reported = (
        Vec<(String, CommandResult)>,
        Vec<(String, String)>,
        Vec<bool>,
    );

    fn reported(spool: &Spool, ids: &[&str]) -> Reported {
        (
            spool.pending().unwrap(),
            spool.interrupted().unwrap(),
            ids.iter().map(|id| spool.is_known(id)).collect(),
        )
    }

    fn journal_len(spool: &Spool) -> u64 {
        spool.lock().journal.len
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
    fn an_unflushed_result_is_kept_like_a_flushed_one_and_flushes_with_others_going_on() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        spool.mark_started("c-1", HOST).unwrap();
        spool
            .store_result_unflushed(HOST, &result("c-1", "fast\n"))
            .unwrap();
        // Appends go on while another thread flushes.
        let flusher = {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || (0..50).try_for_each(|_| spool.flush()))
        };
        for i in 0..50 {
            let id = format!("d-{i}");
            spool.mark_started(&id, HOST).unwrap();
            spool
                .store_result_unflushed(HOST, &result(&id, "x"))
                .unwrap();
        }
        flusher.join().unwrap().unwrap();
        spool.flush().unwrap();
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        let pending = spool.pending().unwrap();
        assert_eq!(pending.len(), 51);
        assert_eq!(pending[0], (HOST.to_owned(), result("c-1", "fast\n")));
        assert!(spool.interrupted().unwrap().is_empty());
    }

    #[test]
    fn an_unflushed_result_acknowledged_in_time_needs_no_flush_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.mark_started("a", HOST).unwrap();
        spool.mark_started("b", HOST).unwrap();
        spool
            .store_result_unflushed(HOST, &result("a", ""))
            .unwrap();
        assert!(spool.acknowledge("a").unwrap());
        assert!(
            !spool.flush_unacknowledged().unwrap(),
            "acknowledged: nothing to flush"
        );
        spool
            .store_result_unflushed(HOST, &result("b", ""))
            .unwrap();
        assert!(
            spool.flush_unacknowledged().unwrap(),
            "b still waits for its ack"
        );
        assert!(!spool.flush_unacknowledged().unwrap(), "and is flushed now");
        // A flushed record (a start) covers the results before it.
        spool.mark_started("c", HOST).unwrap();
        spool
            .store_result_unflushed(HOST, &result("c", ""))
            .unwrap();
        spool.mark_started("d", HOST).unwrap();
        assert!(!spool.flush_unacknowledged().unwrap());
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
        spool.store_result(OTHER_HOST, &result("b", "b")).unwrap();
        spool.store_result(HOST, &result("a", "again")).unwrap();
        let order: Vec<(String, String, String)> = spool
            .pending()
            .unwrap()
            .into_iter()
            .map(|(reply_to, r)| (r.cmd_id, reply_to, r.out))
            .collect();
        let expected = vec![
            ("z".to_owned(), HOST.to_owned(), "z".to_owned()),
            ("m".to_owned(), HOST.to_owned(), "m".to_owned()),
            ("b".to_owned(), OTHER_HOST.to_owned(), "b".to_owned()),
            ("a".to_owned(), HOST.to_owned(), "again".to_owned()),
        ];
        assert_eq!(order, expected, "a replaced result moves to the end");
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
        spool.lock().compact(dir.path()).unwrap();
        let kept: Vec<String> = (first_kept..total).map(|i| format!("c-{i}")).collect();
        assert_eq!(
            journal_records(dir.path()),
            vec![format!("remembered {}", kept.join(" "))],
            "a compacted journal holds the remembered ids only"
        );
        drop(spool);

        let spool = Spool::open_remembering(dir.path(), REMEMBERED).unwrap();
        assert!(!spool.is_known(&format!("c-{}", first_kept - 1)));
        assert!(spool.is_known(&format!("c-{first_kept}")));
        assert!(spool.is_known(&format!("c-{}", total - 1)));
    }

    #[test]
    fn interrupted_lists_started_commands_without_a_result() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.mark_started("c-1", HOST).unwrap();
        spool.mark_started("c-2", OTHER_HOST).unwrap();
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
            "journal",
            "journal.x.tmp",
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
        assert_eq!(names(&spool_dir), vec![JOURNAL], "ids are no file names");
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
        assert_eq!(names(&spool_dir), vec![JOURNAL]);
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
    fn a_compaction_interrupted_by_a_crash_leaves_the_journal_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.store_result(HOST, &result("c-1", "kept")).unwrap();
        drop(spool);
        let journal = fs::read(dir.path().join(JOURNAL)).unwrap();
        // A compaction's half-written file, and a temporary file of the older format.
        fs::write(
            dir.path().join("journal.0123abcd.tmp"),
            &journal[..journal.len() / 2],
        )
        .unwrap();
        fs::write(
            dir.path().join("c-2.4567.tmp"),
            br#"{"seq":9,"reply_to":"/qu"#,
        )
        .unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(names(dir.path()), vec![JOURNAL]);
        assert_eq!(
            spool.pending().unwrap(),
            vec![(HOST.to_owned(), result("c-1", "kept"))]
        );
        assert!(!spool.is_known("c-2"));
    }

    #[test]
    fn a_damaged_result_is_left_out_not_resent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.store_result(HOST, &result("good", "")).unwrap();
        let damaged_at = journal_len(&spool) + 40;
        spool.store_result(HOST, &result("bad", "")).unwrap();
        spool.store_result(HOST, &result("also-good", "")).unwrap();
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(JOURNAL))
            .unwrap();
        file.write_all_at(b"#", damaged_at).unwrap();
        drop(file);

        let ids = |pending: Vec<(String, CommandResult)>| -> Vec<String> {
            pending.into_iter().map(|(_, r)| r.cmd_id).collect()
        };
        assert_eq!(ids(spool.pending().unwrap()), vec!["good", "also-good"]);
        assert_eq!(spool.result("bad").unwrap(), None);
        assert_eq!(ids(spool.pending().unwrap()), vec!["good", "also-good"]);
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(spool.pending().unwrap()), vec!["good", "also-good"]);
        assert_eq!(
            journal_records(dir.path()),
            vec!["result good ", "result also-good "],
            "the journal was rewritten without the damaged record"
        );
    }

    #[test]
    fn a_damaged_record_inside_the_journal_leaves_the_state_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.mark_started("c-1", HOST).unwrap();
        spool.mark_started("c-2", HOST).unwrap();
        let damaged_at = journal_len(&spool) + 20;
        spool.store_result(HOST, &result("c-2", "two")).unwrap();
        spool.mark_started("c-3", HOST).unwrap();
        drop(spool);
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(JOURNAL))
            .unwrap();
        file.write_all_at(b"\n", damaged_at).unwrap();
        drop(file);

        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.pending().unwrap().is_empty());
        assert_eq!(
            spool.interrupted().unwrap(),
            vec![
                ("c-1".to_owned(), HOST.to_owned()),
                ("c-2".to_owned(), HOST.to_owned()),
                ("c-3".to_owned(), HOST.to_owned())
            ],
            "without its result, c-2 is as it was before (and will be reported lost)"
        );
        assert_eq!(
            journal_records(dir.path()),
            vec!["started c-1", "started c-2", "started c-3"]
        );
    }

    #[test]
    fn a_torn_last_record_is_left_out_and_cut_off_at_every_length_and_never_merges() {
        let ids = ["c-1", "c-2", "c-3", "c-4", "next"];
        type Step = fn(&Spool);
        let last_steps: [(&str, Step); 3] = [
            ("started", |spool| spool.mark_started("c-4", HOST).unwrap()),
            ("result", |spool| {
                let out = "the last result\nwith \"quotes\" and ümlauts\n";
                spool.store_result(OTHER_HOST, &result("c-3", out)).unwrap();
            }),
            ("acked", |spool| assert!(spool.acknowledge("c-2").unwrap())),
        ];
        for (what, last_step) in last_steps {
            let source = tempfile::tempdir().unwrap();
            let spool = Spool::open(source.path()).unwrap();
            spool.mark_started("c-1", HOST).unwrap();
            spool.mark_started("c-2", HOST).unwrap();
            spool.store_result(HOST, &result("c-2", "two")).unwrap();
            spool.mark_started("c-3", HOST).unwrap();
            let before_state = reported(&spool, &ids);
            let before = fs::read(source.path().join(JOURNAL)).unwrap();
            last_step(&spool);
            let after_state = reported(&spool, &ids);
            let after = fs::read(source.path().join(JOURNAL)).unwrap();
            drop(spool);
            assert!(after.len() > before.len() && after.starts_with(&before));

            for cut in before.len()..after.len() {
                let dir = tempfile::tempdir().unwrap();
                let journal = dir.path().join(JOURNAL);
                fs::write(&journal, &after[..cut]).unwrap();
                let spool = Spool::open(dir.path()).unwrap();
                assert_eq!(
                    reported(&spool, &ids),
                    before_state,
                    "{what} record torn after {} bytes",
                    cut - before.len()
                );
                assert_eq!(fs::read(&journal).unwrap(), before, "{what}: cut off");
                spool.mark_started("next", HOST).unwrap();
                drop(spool);
                let spool = Spool::open(dir.path()).unwrap();
                assert!(
                    spool.interrupted().unwrap().last()
                        == Some(&("next".to_owned(), HOST.to_owned())),
                    "{what} record torn after {} bytes: the next record is intact",
                    cut - before.len()
                );
            }

            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(JOURNAL), &after).unwrap();
            let spool = Spool::open(dir.path()).unwrap();
            assert_eq!(reported(&spool, &ids), after_state, "{what}: whole");
        }
    }

    #[test]
    fn a_changed_byte_in_the_last_record_is_caught_by_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.mark_started("c-1", HOST).unwrap();
        let last_at = journal_len(&spool);
        spool.store_result(HOST, &result("c-1", "0")).unwrap();
        let len = journal_len(&spool);
        drop(spool);
        let whole = fs::read(dir.path().join(JOURNAL)).unwrap();
        let digit = whole
            .iter()
            .rposition(|b| *b == b'0')
            .expect("the output's digit");
        assert!(digit as u64 > last_at + CHECKSUM_LEN as u64);
        let mut changed = whole.clone();
        changed[digit] = b'1';
        fs::write(dir.path().join(JOURNAL), &changed).unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.pending().unwrap().is_empty());
        assert_eq!(
            spool.interrupted().unwrap(),
            vec![("c-1".to_owned(), HOST.to_owned())]
        );
        assert!(journal_len(&spool) < len);
    }

    #[test]
    fn compaction_keeps_exactly_the_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_remembering(dir.path(), 3).unwrap();
        for id in ["a-1", "a-2", "a-3", "a-4", "a-5"] {
            spool.mark_started(id, HOST).unwrap();
            spool.store_result(HOST, &result(id, "acked")).unwrap();
            spool.acknowledge(id).unwrap();
        }
        spool.mark_started("s-1", HOST).unwrap();
        spool.mark_started("r-1", HOST).unwrap();
        spool.store_result(HOST, &result("r-1", "first")).unwrap();
        spool.mark_started("s-2", OTHER_HOST).unwrap();
        spool.store_result(HOST, &result("r-2", "only")).unwrap();
        spool
            .store_result(OTHER_HOST, &result("r-1", "second"))
            .unwrap();
        spool.mark_started("s-3", HOST).unwrap();
        spool.mark_started("s-3", OTHER_HOST).unwrap();
        let hostile = "../../r-3";
        spool.store_result(HOST, &result(hostile, "h")).unwrap();

        let ids = [
            "a-1", "a-2", "a-3", "a-4", "a-5", "s-1", "s-2", "s-3", "r-1", "r-2", hostile,
        ];
        let live = reported(&spool, &ids);
        let before = journal_len(&spool);
        spool.lock().compact(dir.path()).unwrap();
        assert!(journal_len(&spool) < before);
        assert_eq!(
            fs::metadata(dir.path().join(JOURNAL)).unwrap().len(),
            journal_len(&spool)
        );
        assert_eq!(
            journal_records(dir.path()),
            vec![
                "remembered a-3 a-4 a-5",
                "started s-1",
                "started s-2",
                "result r-2 only",
                "result r-1 second",
                "started s-3",
                "result ../../r-3 h",
            ]
        );
        {
            let state = spool.lock();
            let (live, len) = (state.index.live_bytes, state.journal.len);
            assert!(
                live <= len && len < live + 64,
                "{live} bytes live, {len} kept"
            );
        }
        assert_eq!(reported(&spool, &ids), live, "the same state in memory");
        spool.store_result(HOST, &result("s-1", "after")).unwrap();
        assert!(spool.acknowledge("r-2").unwrap());
        let live = reported(&spool, &ids);
        drop(spool);

        let spool = Spool::open_remembering(dir.path(), 3).unwrap();
        assert_eq!(
            reported(&spool, &ids),
            live,
            "the same state after a restart"
        );
        assert_eq!(names(dir.path()), vec![JOURNAL]);
    }

    #[test]
    fn the_journal_stays_bounded_over_ten_thousand_commands() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let out = "x".repeat(400);
        let mut one_command = 0;
        let mut compactions = 0;
        for i in 0..10_000 {
            let id = format!("c-{i}");
            let before = journal_len(&spool);
            spool.mark_started(&id, HOST).unwrap();
            spool.store_result(HOST, &result(&id, &out)).unwrap();
            assert!(spool.acknowledge(&id).unwrap());
            let (len, live) = {
                let state = spool.lock();
                (state.journal.len, state.index.live_bytes)
            };
            if i == 0 {
                one_command = len;
            }
            if len < before {
                compactions += 1;
            }
            assert!(
                len <= 2 * live + COMPACTION_SLACK,
                "command {i}: {len} bytes for {live} live"
            );
        }
        let len = journal_len(&spool);
        assert_eq!(fs::metadata(dir.path().join(JOURNAL)).unwrap().len(), len);
        assert!(compactions > 0);
        assert!(
            len < 3 * 1024 * 1024 && 10_000 * one_command > 4 * len,
            "{len} bytes kept of about {} written",
            10_000 * one_command
        );
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.is_known("c-0") && spool.is_known("c-9999"));
        assert!(spool.pending().unwrap().is_empty());
        assert!(spool.interrupted().unwrap().is_empty());
    }

    #[test]
    fn a_big_acknowledged_result_is_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let big = "y".repeat(3 * 1024 * 1024);
        spool.store_result(HOST, &result("small", "")).unwrap();
        spool.store_result(HOST, &result("big", &big)).unwrap();
        assert!(journal_len(&spool) > 3 * 1024 * 1024);
        assert_eq!(spool.result("big").unwrap().unwrap().1.out, big);
        assert!(spool.acknowledge("big").unwrap());
        assert!(journal_len(&spool) < 4096);
        assert_eq!(
            spool.pending().unwrap(),
            vec![(HOST.to_owned(), result("small", ""))]
        );
    }

    #[test]
    fn what_is_on_disk_after_any_change_is_the_whole_state() {
        // Every change is flushed before it returns, so the journal as it is on
        // disk at any moment holds everything, whatever happens to the process.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_remembering(dir.path(), 2).unwrap();
        let ids = ["c-1", "c-2", "c-3", "c-4"];
        let steps: [fn(&Spool); 9] = [
            |spool| spool.mark_started("c-1", HOST).unwrap(),
            |spool| spool.mark_started("c-2", OTHER_HOST).unwrap(),
            |spool| spool.store_result(HOST, &result("c-1", "one")).unwrap(),
            |spool| assert!(spool.acknowledge("c-1").unwrap()),
            |spool| {
                spool
                    .store_result(OTHER_HOST, &result("c-2", "two"))
                    .unwrap()
            },
            |spool| spool.store_result(HOST, &result("c-3", "three")).unwrap(),
            |spool| assert!(spool.acknowledge("c-3").unwrap()),
            |spool| assert!(spool.acknowledge("c-2").unwrap()),
            |spool| spool.mark_started("c-4", HOST).unwrap(),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(&spool);
            let copy = tempfile::tempdir().unwrap();
            fs::copy(dir.path().join(JOURNAL), copy.path().join(JOURNAL)).unwrap();
            let reopened = Spool::open_remembering(copy.path(), 2).unwrap();
            assert_eq!(
                reported(&reopened, &ids),
                reported(&spool, &ids),
                "after step {i}"
            );
        }
        let live = reported(&spool, &ids);
        // Gone without any clean-up: no destructor runs.
        std::mem::forget(spool);
        let spool = Spool::open_remembering(dir.path(), 2).unwrap();
        assert_eq!(reported(&spool, &ids), live);
        assert_eq!(
            live.2,
            vec![false, true, true, true],
            "c-1 was forgotten: only 2 acknowledged ids are remembered"
        );
    }

    #[test]
    fn a_spool_of_the_older_format_is_taken_in_once_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path();
        let write = |name: &str, record: serde_json::Value| {
            fs::write(old.join(name), serde_json::to_vec(&record).unwrap()).unwrap();
        };
        let hostile = "../../etc/passwd";
        let hostile_key = id_key(hostile).unwrap();
        let acked_hostile_key = id_key("a/b").unwrap();
        // c-1 was running.
        write(
            "c-1.started",
            json!({"seq": 1, "cmd_id": "c-1", "reply_to": HOST}),
        );
        // c-2 finished after c-3; neither is acknowledged.
        write(
            "c-2.result",
            json!({"seq": 4, "reply_to": HOST, "result": result("c-2", "two")}),
        );
        // c-3 finished, and the agent stopped before removing its marker.
        write(
            "c-3.started",
            json!({"seq": 2, "cmd_id": "c-3", "reply_to": OTHER_HOST}),
        );
        write(
            "c-3.result",
            json!({"seq": 3, "reply_to": OTHER_HOST, "result": result("c-3", "three")}),
        );
        write(
            &format!("{hostile_key}.result"),
            json!({"seq": 5, "reply_to": HOST, "result": result(hostile, "h")}),
        );
        // c-5 was acknowledged, and the agent stopped before removing its result.
        write(
            "c-5.result",
            json!({"seq": 6, "reply_to": HOST, "result": result("c-5", "five")}),
        );
        fs::write(
            old.join("acked.log"),
            format!("a-1\na-2\n{acked_hostile_key}\nc-5\nnot a key\na-3"),
        )
        .unwrap();
        fs::write(old.join("bad.result"), b"not json").unwrap();
        fs::write(old.join("c-9.0123abcd.tmp"), br#"{"seq":9,"#).unwrap();

        let spool = Spool::open(old).unwrap();
        assert_eq!(names(old), vec!["bad.result.corrupt", JOURNAL]);
        let ids = ["c-1", "c-2", "c-3", hostile, "c-5", "a-1", "a-2", "a/b"];
        let expected = (
            vec![
                (OTHER_HOST.to_owned(), result("c-3", "three")),
                (HOST.to_owned(), result("c-2", "two")),
                (HOST.to_owned(), result(hostile, "h")),
                (HOST.to_owned(), result("c-5", "five")),
            ],
            vec![("c-1".to_owned(), HOST.to_owned())],
            vec![true; ids.len()],
        );
        assert_eq!(reported(&spool, &ids), expected);
        assert!(!spool.is_known("c-9"));
        drop(spool);

        let spool = Spool::open(old).unwrap();
        assert_eq!(reported(&spool, &ids), expected, "after a second start");
        drop(spool);

        // A crash before the last old files were deleted: they are taken in again,
        // to the same effect.
        write(
            "c-3.started",
            json!({"seq": 2, "cmd_id": "c-3", "reply_to": OTHER_HOST}),
        );
        write(
            "c-2.result",
            json!({"seq": 4, "reply_to": HOST, "result": result("c-2", "two")}),
        );
        fs::write(old.join("acked.log"), "a-2\n").unwrap();
        let spool = Spool::open(old).unwrap();
        assert_eq!(reported(&spool, &ids), expected, "taken in twice");
        assert_eq!(names(old), vec!["bad.result.corrupt", JOURNAL]);

        assert!(spool.acknowledge("c-5").unwrap());
        spool.store_result(HOST, &result("c-1", "lost")).unwrap();
        drop(spool);
        let spool = Spool::open(old).unwrap();
        let pending: Vec<String> = spool
            .pending()
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.cmd_id)
            .collect();
        assert_eq!(pending, vec!["c-3", "c-2", hostile, "c-1"]);
        assert!(spool.interrupted().unwrap().is_empty());
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
        assert_eq!(names(dir.path()), vec![JOURNAL]);
    }
}
