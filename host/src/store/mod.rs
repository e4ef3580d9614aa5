//! The durable state of the host agent: VMs, their snapshots' metadata, commands
//! with their results and streamed output, file transfers.
//!
//! A [`Store`] is one SQLite file (normally [`DATABASE_FILE`] in the host's state
//! directory) behind one connection in a mutex: every method takes the lock, runs
//! one short statement or transaction, and returns owned values, so the store is
//! `Send + Sync` and shared as `Arc<Store>` by the actors. The file is in WAL mode
//! with foreign keys on; [`schema`] creates it and migrates older files forward,
//! and refuses a file written by a newer program. The methods live with the data
//! they own: [`vms`] (VMs, snapshots), [`commands`] (commands, results, output
//! chunks), [`transfers`]; retention ([`Store::prune`]) is here.
//!
//! Durability: every write survives a crash or `kill -9` of `vmc-host` once it
//! returns. A write that the host acknowledges to someone else must also survive a
//! power cut before that acknowledgement: a new VM or transfer, whose id an API
//! caller is given, and a transfer's end commit with `synchronous=FULL`; the two
//! writes on the command path, a new command ([`Store::insert_commands`]) and a
//! result ([`Store::record_result`]), commit with `synchronous=NORMAL` and the
//! caller calls [`Store::flush`] before it tells anyone (the engine sends
//! `CMD_RUN` and answers `runCmd` only after it, and sends `CMD_ACK` only after
//! it), so that many commands share one flush to disk. Other writes (output
//! chunks, progress, state changes) are never flushed on purpose: a power cut may
//! lose the last of them, which the guest re-sends or the engine re-derives. Timestamps are stored as unix
//! milliseconds, so they come back truncated to the millisecond.
//!
//! The store does not decide anything: which state follows which, when to resend
//! or acknowledge, and what to prune when are the engine's business. It does guard
//! its own invariants: the first stored result of a command wins, an output chunk
//! is stored once, and a finished transfer stays finished.

pub mod commands;
pub mod schema;
pub mod transfers;
pub mod vms;

use std::error::Error as StdError;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, Row, Transaction, TransactionBehavior};

pub use commands::{CommandQuery, CommandRecord, CommandState};
pub use transfers::{TransferDirection, TransferRecord, TransferState, TransferTotal};
pub use vms::VmRecord;

/// The name of the database file in the host's state directory.
pub const DATABASE_FILE: &str = "vmc-host.sqlite";

/// How long a statement waits for a lock held by another connection (another
/// process opening the same file) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The WAL file is truncated to this size after a checkpoint, so a burst of output
/// does not leave a huge WAL behind.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Prepared statements kept per connection; the store has about forty distinct ones.
const STATEMENT_CACHE: usize = 64;

/// Why the store could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot bring the state database {path} to schema version {version}")]
    Migrate {
        path: PathBuf,
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the state database {path} has schema version {found}, but this program knows \
         versions up to {known}: the database is newer than this program"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: u32,
    },
    #[error("cannot flush the state database's log {path} to disk")]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state database failed to {operation}")]
    Sqlite {
        operation: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the {column} of {table} row {key:?} is corrupt")]
    Corrupt {
        table: &'static str,
        key: String,
        column: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("cannot encode the {what} of {key:?} as JSON")]
    Encode {
        what: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("there is no VM named {name:?}")]
    NoSuchVm { name: String },
    #[error("there is no command with id {cmd_id:?}")]
    NoSuchCommand { cmd_id: String },
    #[error("there is no transfer with id {transfer_id:?}")]
    NoSuchTransfer { transfer_id: String },
    #[error("guest id {id:?} already belongs to VM {vm:?}")]
    GuestIdTaken { id: String, vm: String },
    #[error("a command with id {cmd_id:?} already exists")]
    DuplicateCommand { cmd_id: String },
    #[error("a transfer with id {transfer_id:?} already exists")]
    DuplicateTransfer { transfer_id: String },
    #[error("{what} {value} is too large to store")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("{state} is not a final state, so it cannot {purpose}")]
    NotFinal {
        state: &'static str,
        purpose: &'static str,
    },
    #[error("the result carries command id {found:?}, not {cmd_id:?}")]
    ResultMismatch { cmd_id: String, found: String },
}

/// What [`Store::prune`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub commands: u64,
    pub transfers: u64,
    /// Bytes of streamed output deleted with the commands.
    pub output_bytes: u64,
}

/// The host agent's durable state; see the module documentation.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// The write-ahead log, opened by [`Store::flush`] (which never takes `conn`).
    wal: Mutex<Option<File>>,
}

/// How a write transaction is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    /// `synchronous=FULL`: the WAL is flushed to disk at commit, so the write
    /// survives a power cut.
    PowerSafe,
    /// `synchronous=NORMAL`: survives the process dying, not a power cut.
    CrashSafe,
}

/// An error inside one store operation, before it is named after the operation:
/// lets the operations use `?` on both rusqlite and store errors.
#[derive(Debug)]
enum Failure {
    Sql(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Failure {
        Failure::Sql(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

impl Failure {
    fn name(self, operation: &'static str) -> StoreError {
        match self {
            Failure::Sql(source) => StoreError::Sqlite { operation, source },
            Failure::Store(e) => e,
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to the
    /// current schema. A new file is made readable by its owner only: it holds
    /// command output. The parent directory must exist.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let is_new = !path.exists();
        let mut conn = Connection::open(path).map_err(open_error)?;
        if is_new {
            restrict_permissions(path);
        }
        configure(&conn, is_new).map_err(open_error)?;
        schema::migrate(&mut conn, path)?;
        log::debug!("state database {} is open", path.display());
        Ok(Store {
            path: path.to_owned(),
            conn: Mutex::new(conn),
            wal: Mutex::new(None),
        })
    }

    /// Makes every write committed so far survive a power cut, not only a crash of
    /// this process: `fdatasync` of the write-ahead log, which is exactly what
    /// `synchronous=FULL` does at each commit, done once for any number of commits.
    /// It does not take the connection's lock, so other writes go on meanwhile (a
    /// write that commits during the flush may or may not be covered: flush again).
    /// Callers batch it: [`crate::engine`] has one flusher task for all its actors.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut wal_path = self.path.clone().into_os_string();
        wal_path.push("-wal");
        let wal_path = PathBuf::from(wal_path);
        let failed = |source| StoreError::Flush {
            path: wal_path.clone(),
            source,
        };
        let mut wal = self.wal.lock().unwrap_or_else(PoisonError::into_inner);
        // The log is the same file for as long as the connection is open; should it
        // ever have been replaced, open the new one (a flush of the old is no flush).
        let current = match std::fs::metadata(&wal_path) {
            Ok(meta) => Some(meta.ino()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(failed(e)),
        };
        let Some(current) = current else {
            // No log: every commit has been checkpointed into the database file.
            *wal = None;
            return File::open(&self.path)
                .and_then(|db| db.sync_data())
                .map_err(|source| StoreError::Flush {
                    path: self.path.clone(),
                    source,
                });
        };
        let same = match wal.as_ref() {
            Some(file) => file.metadata().map_err(failed)?.ino() == current,
            None => false,
        };
        if !same {
            *wal = Some(File::open(&wal_path).map_err(failed)?);
        }
        match wal.as_ref() {
            Some(file) => file.sync_data().map_err(failed),
            None => Ok(()),
        }
    }

    /// Opens [`DATABASE_FILE`] in the host's state directory `dir`.
    pub fn open_in(dir: &Path) -> Result<Store, StoreError> {
        Store::open(&dir.join(DATABASE_FILE))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes finished commands (with their output) and finished transfers that
    /// ended before `older_than`. Unfinished ones stay whatever their age. Freed
    /// pages are returned to the file system afterwards.
    pub fn prune(&self, older_than: DateTime<Utc>) -> Result<PruneReport, StoreError> {
        let cutoff = millis(older_than);
        let report = self.write(
            "prune old commands and transfers",
            Durability::CrashSafe,
            |tx| {
                let prunable = format!(
                    "SELECT seq FROM commands WHERE state IN ({}) AND finished_at < ?1",
                    commands::FINAL_STATES_SQL
                );
                let output_bytes: i64 = tx.query_row(
                    &format!(
                        "SELECT coalesce(sum(len), 0) FROM output_chunks WHERE cmd IN ({prunable})"
                    ),
                    [cutoff],
                    |row| row.get(0),
                )?;
                tx.execute(
                    &format!("DELETE FROM output_chunks WHERE cmd IN ({prunable})"),
                    [cutoff],
                )?;
                let commands = tx.execute(
                    &format!(
                        "DELETE FROM commands WHERE state IN ({}) AND finished_at < ?1",
                        commands::FINAL_STATES_SQL
                    ),
                    [cutoff],
                )?;
                let transfers = tx.execute(
                    &format!(
                        "DELETE FROM transfers WHERE state IN ({}) AND finished_at < ?1",
                        transfers::FINAL_STATES_SQL
                    ),
                    [cutoff],
                )?;
                Ok(PruneReport {
                    commands: commands as u64,
                    transfers: transfers as u64,
                    output_bytes: u64::try_from(output_bytes).unwrap_or(0),
                })
            },
        )?;
        if report != PruneReport::default() {
            // Outside the pruning transaction: a write of its own, which frees one
            // page per row it returns.
            let conn = self.lock();
            let vacuum = || -> rusqlite::Result<()> {
                let mut stmt = conn.prepare("PRAGMA incremental_vacuum")?;
                let mut pages = stmt.query([])?;
                while pages.next()?.is_some() {}
                Ok(())
            };
            vacuum().map_err(|source| StoreError::Sqlite {
                operation: "return freed pages to the file system",
                source,
            })?;
            log::info!(
                "pruned {} commands ({} bytes of output) and {} transfers finished before {}",
                report.commands,
                report.output_bytes,
                report.transfers,
                older_than.to_rfc3339()
            );
        }
        Ok(report)
    }

    /// Runs `f` on the connection, outside any explicit transaction.
    fn read<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Connection) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        f(&self.lock()).map_err(|e| e.name(operation))
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, committed if `f` succeeds and
    /// rolled back otherwise.
    fn write<T>(
        &self,
        operation: &'static str,
        durability: Durability,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        if durability == Durability::PowerSafe {
            set_synchronous(&conn, "FULL").map_err(|e| Failure::from(e).name(operation))?;
        }
        let outcome = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })();
        if durability == Durability::PowerSafe {
            if let Err(e) = set_synchronous(&conn, "NORMAL") {
                // Only costs speed: later writes are flushed as if power-safe.
                log::warn!("cannot set the state database back to synchronous=NORMAL: {e}");
            }
        }
        outcome.map_err(|e: Failure| e.name(operation))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held left no transaction open (a dropped
        // rusqlite Transaction rolls back), so the connection is still usable.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sets the connection's pragmas. `is_new`: the file was just created, so settings
/// that only apply to an empty database can still be made.
fn configure(conn: &Connection, is_new: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if is_new {
        // Must precede the first table: lets prune give space back to the file system.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!("the state database cannot use WAL mode (it uses {mode}): writes are slower");
    }
    set_synchronous(conn, "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    Ok(())
}

fn set_synchronous(conn: &Connection, level: &str) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", level)
}

/// Makes a new database file private to its owner; SQLite gives its WAL and shared
/// memory files the same mode.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        log::warn!("cannot make {} private: {e}", path.display());
    }
}

/// Whether `e` is the failure of a constraint of the given extended code
/// (`rusqlite::ffi::SQLITE_CONSTRAINT_*`).
fn is_constraint(e: &Failure, extended: i32) -> bool {
    matches!(e, Failure::Sql(rusqlite::Error::SqliteFailure(f, _)) if f.extended_code == extended)
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn opt_millis(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(millis)
}

/// A number for an INTEGER column; SQLite integers are signed 64-bit.
fn int(value: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

/// A path as SQLite text when it is UTF-8 (readable with the `sqlite3` shell), as a
/// blob of its bytes otherwise, so that every path comes back exactly.
fn path_value(path: &Path) -> Value {
    match path.to_str() {
        Some(text) => Value::Text(text.to_owned()),
        None => Value::Blob(path.as_os_str().as_bytes().to_vec()),
    }
}

fn opt_path_value(path: Option<&Path>) -> Value {
    path.map_or(Value::Null, path_value)
}

/// Reads the columns of one row by name, turning anything unexpected into
/// [`StoreError::Corrupt`] naming the row.
struct RowReader<'r, 's> {
    row: &'r Row<'s>,
    table: &'static str,
    key: String,
}

impl<'r, 's> RowReader<'r, 's> {
    /// A reader for a row of `table` whose key is in column `key_column`.
    fn new(
        row: &'r Row<'s>,
        table: &'static str,
        key_column: &'static str,
    ) -> Result<RowReader<'r, 's>, StoreError> {
        let mut reader = RowReader {
            row,
            table,
            key: String::from("?"),
        };
        reader.key = reader.get(key_column)?;
        Ok(reader)
    }

    fn corrupt(
        &self,
        column: &'static str,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> StoreError {
        StoreError::Corrupt {
            table: self.table,
            key: self.key.clone(),
            column,
            source: source.into(),
        }
    }

    fn get<T: rusqlite::types::FromSql>(&self, column: &'static str) -> Result<T, StoreError> {
        self.row.get(column).map_err(|e| self.corrupt(column, e))
    }

    fn u64(&self, column: &'static str) -> Result<u64, StoreError> {
        let value: i64 = self.get(column)?;
        u64::try_from(value).map_err(|_| self.corrupt(column, format!("{value} is negative")))
    }

    fn opt_u64(&self, column: &'static str) -> Result<Option<u64>, StoreError> {
        match self.get::<Option<i64>>(column)? {
            None => Ok(None),
            Some(value) => u64::try_from(value)
                .map(Some)
                .map_err(|_| self.corrupt(column, format!("{value} is negative"))),
        }
    }

    fn u32(&self, column: &'static str) -> Result<u32, StoreError> {
        let value: i64 = self.get(column)?;
        u32::try_from(value).map_err(|_| self.corrupt(column, format!("{value} is out of range")))
    }

    fn opt_u32(&self, column: &'static str) -> Result<Option<u32>, StoreError> {
        match self.get::<Option<i64>>(column)? {
            None => Ok(None),
            Some(value) => u32::try_from(value)
                .map(Some)
                .map_err(|_| self.corrupt(column, format!("{value} is out of range"))),
        }
    }

    fn time(&self, column: &'static str) -> Result<DateTime<Utc>, StoreError> {
        let ms: i64 = self.get(column)?;
        DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| self.corrupt(column, format!("{ms} ms is not a representable time")))
    }

    fn opt_time(&self, column: &'static str) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.get::<Option<i64>>(column)? {
            None => Ok(None),
            Some(_) => self.time(column).map(Some),
        }
    }

    fn opt_path(&self, column: &'static str) -> Result<Option<PathBuf>, StoreError> {
        let value = self
            .row
            .get_ref(column)
            .map_err(|e| self.corrupt(column, e))?;
        match value {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                Ok(Some(PathBuf::from(OsStr::from_bytes(bytes))))
            }
            other => Err(self.corrupt(column, format!("a {} is not a path", other.data_type()))),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, column: &'static str) -> Result<T, StoreError> {
        let text: String = self.get(column)?;
        serde_json::from_str(&text).map_err(|e| self.corrupt(column, e))
    }

    fn opt_json<T: serde::de::DeserializeOwned>(
        &self,
        column: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.get::<Option<String>>(column)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| self.corrupt(column, e)),
        }
    }

    /// A text column holding one of an enum's names, parsed by `parse`.
    fn name<T>(&self, column: &'static str, parse: fn(&str) -> Option<T>) -> Result<T, StoreError> {
        let text: String = self.get(column)?;
        parse(&text).ok_or_else(|| self.corrupt(column, format!("{text:?} is not a known value")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::VmSpec;
    use chrono::TimeZone;
    use std::sync::Arc;
    use vmc_protocol::words::{CommandSpec, OutputStream};

    /// A fixed time, `secs` after an arbitrary epoch, with millisecond precision.
    pub(crate) fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("a valid time")
    }

    pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open_in(dir.path()).expect("the store opens");
        (dir, store)
    }

    pub(crate) fn command(cmd_id: &str, vm: &str, created: DateTime<Utc>) -> CommandRecord {
        CommandRecord::new(
            cmd_id,
            Some(vm),
            "52:54:00:00:00:01",
            CommandSpec::new("true"),
            created,
        )
    }

    #[test]
    fn a_new_database_is_in_wal_mode_with_foreign_keys_and_private() {
        let (dir, store) = temp_store();
        let conn = store.lock();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL between power-safe writes");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(DATABASE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_power_safe_write_leaves_the_connection_at_synchronous_normal() {
        let (_dir, store) = temp_store();
        store
            .put_vm(&VmRecord::unmanaged("52:54:00:00:00:01", at(0)))
            .unwrap();
        let sync: i64 = store
            .lock()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1);
    }

    #[test]
    fn everything_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = VmSpec::new("web");
        spec.image = Some(PathBuf::from("/images/base.qcow2"));
        let definition = crate::hypervisor::VmDefinition {
            spec,
            backend: "qemu".into(),
            mac: "52:54:00:AA:BB:CC".into(),
            dir: PathBuf::from("/var/lib/vmc/vms/web"),
        };
        let vm = VmRecord::from_definition(&definition, at(0));
        let finished = command("c-1", "web", at(1));
        let running = command("c-2", "web", at(2));
        let transfer = TransferRecord::new(
            "t-1",
            "web",
            "52:54:00:AA:BB:CC",
            TransferDirection::ToGuest,
            Path::new("/tmp/a"),
            "/root/a",
            at(3),
        );
        {
            let store = Store::open_in(dir.path()).unwrap();
            store.put_vm(&vm).unwrap();
            store
                .put_snapshot(
                    "web",
                    &crate::hypervisor::SnapshotInfo {
                        name: "clean".into(),
                        description: "after install".into(),
                        created_at: 1_700_000_000,
                        vm_state_bytes: 0,
                    },
                )
                .unwrap();
            store.insert_command(&finished).unwrap();
            store.insert_command(&running).unwrap();
            store
                .set_command_state("c-2", CommandState::Running, at(4), None)
                .unwrap();
            store
                .append_output("c-2", OutputStream::Out, 0, b"partial ")
                .unwrap();
            store
                .set_command_state("c-1", CommandState::Failed, at(5), Some("no guest"))
                .unwrap();
            store.insert_transfer(&transfer).unwrap();
            store.update_transfer_progress("t-1", 4096).unwrap();
            // Dropped without any shutdown step, as after kill -9.
        }
        let store = Store::open_in(dir.path()).unwrap();
        assert_eq!(store.vm("web").unwrap(), Some(vm));
        assert_eq!(store.snapshots("web").unwrap().len(), 1);
        let c1 = store.command("c-1").unwrap().unwrap();
        assert_eq!(c1.state, CommandState::Failed);
        assert_eq!(c1.error.as_deref(), Some("no guest"));
        let unfinished: Vec<String> = store
            .unfinished_commands()
            .unwrap()
            .into_iter()
            .map(|c| c.cmd_id)
            .collect();
        assert_eq!(unfinished, ["c-2"]);
        assert_eq!(
            store.read_output("c-2", OutputStream::Out, 0, 100).unwrap(),
            b"partial "
        );
        let t = store.transfer("t-1").unwrap().unwrap();
        assert_eq!((t.state, t.bytes_done), (TransferState::Running, 4096));
    }

    #[test]
    fn prune_removes_only_old_finished_commands_and_transfers_and_their_output() {
        let (_dir, store) = temp_store();
        store
            .insert_command(&command("old-done", "vm", at(0)))
            .unwrap();
        store
            .append_output("old-done", OutputStream::Out, 0, &[b'x'; 1000])
            .unwrap();
        store
            .append_output("old-done", OutputStream::Err, 0, &[b'y'; 24])
            .unwrap();
        store
            .set_command_state("old-done", CommandState::Finished, at(10), None)
            .unwrap();
        store
            .insert_command(&command("old-running", "vm", at(0)))
            .unwrap();
        store
            .append_output("old-running", OutputStream::Out, 0, b"still here")
            .unwrap();
        store
            .set_command_state("old-running", CommandState::Running, at(10), None)
            .unwrap();
        store
            .insert_command(&command("new-done", "vm", at(0)))
            .unwrap();
        store
            .set_command_state("new-done", CommandState::Cancelled, at(1000), None)
            .unwrap();

        let transfer = |id: &str| {
            TransferRecord::new(
                id,
                "vm",
                "g",
                TransferDirection::FromGuest,
                Path::new("/x"),
                "/y",
                at(0),
            )
        };
        store.insert_transfer(&transfer("t-old")).unwrap();
        store.insert_transfer(&transfer("t-unfinished")).unwrap();
        store
            .finish_transfer("t-old", TransferState::Done, Some(5), Some("ab"), None)
            .unwrap();
        // finish_transfer stamps the current time; age this one by hand.
        store
            .lock()
            .execute("UPDATE transfers SET finished_at = ?1", [millis(at(10))])
            .unwrap();

        let report = store.prune(at(100)).unwrap();
        assert_eq!(
            report,
            PruneReport {
                commands: 1,
                transfers: 1,
                output_bytes: 1024
            }
        );
        assert!(store.command("old-done").unwrap().is_none());
        assert!(store.command("old-running").unwrap().is_some());
        assert!(store.command("new-done").unwrap().is_some());
        assert!(store.transfer("t-old").unwrap().is_none());
        assert!(store.transfer("t-unfinished").unwrap().is_some());
        assert_eq!(
            store.output_len("old-running", OutputStream::Out).unwrap(),
            10
        );
        let chunks: i64 = store
            .lock()
            .query_row("SELECT count(*) FROM output_chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(chunks, 1, "only the running command's chunk is left");
        assert_eq!(store.prune(at(100)).unwrap(), PruneReport::default());
    }

    #[test]
    fn several_threads_share_one_store() {
        let (_dir, store) = temp_store();
        let store = Arc::new(store);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let id = format!("c-{t}-{i}");
                        store
                            .insert_command(&command(&id, &format!("vm-{t}"), at(i)))
                            .unwrap();
                        store
                            .append_output(&id, OutputStream::Out, 0, id.as_bytes())
                            .unwrap();
                        if i % 2 == 0 {
                            store
                                .set_command_state(&id, CommandState::Sent, at(i), None)
                                .unwrap();
                        }
                        assert!(store.command(&id).unwrap().is_some());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no thread panicked");
        }
        let all = store.commands(&CommandQuery::default()).unwrap();
        assert_eq!(all.len(), 2000);
        let query = CommandQuery {
            vm: Some("vm-2".into()),
            ..CommandQuery::default()
        };
        assert_eq!(store.commands(&query).unwrap().len(), 500);
        let sent = CommandQuery {
            states: vec![CommandState::Sent],
            ..CommandQuery::default()
        };
        assert_eq!(store.commands(&sent).unwrap().len(), 1000);
        assert_eq!(
            store
                .read_output("c-3-499", OutputStream::Out, 0, 64)
                .unwrap(),
            b"c-3-499"
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        std::fs::write(&path, vec![b'#'; 8192]).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_missing_state_directory_is_an_open_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open_in(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("absent"), "{err}");
    }
}
