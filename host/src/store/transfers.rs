//! File transfers between the host and a guest: what was asked, how far it got,
//! how it ended.
//!
//! A [`TransferRecord`] is created `pending` when the host accepts a copy, turns
//! `running` with its first progress, and ends `done`, `failed` or `cancelled`
//! through [`Store::finish_transfer`]; the first end wins and later progress is
//! ignored, so a late acknowledgement cannot revive a finished transfer. Creating
//! and ending a transfer are committed power-safe, progress crash-safe (see
//! [`super`]). Like commands, transfers keep their VM's name as text and outlive it.
//!
//! The store does not touch the files: the temporary `.part` file, the digest and
//! the rename belong to the transfer actor, and `bytes_done` is only as recent as
//! its last report.

use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY;
use rusqlite::{named_params, Connection, OptionalExtension};

use super::{
    int, is_constraint, millis, opt_millis, path_value, Durability, Failure, RowReader, Store,
    StoreError,
};

/// Which way the bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferDirection {
    /// `cpFileToVM`: the host sends (`FILE_PUT`).
    ToGuest,
    /// `cpFileFromVM`: the guest sends (`FILE_GET`).
    FromGuest,
}

impl TransferDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferDirection::ToGuest => "to-guest",
            TransferDirection::FromGuest => "from-guest",
        }
    }

    pub fn parse(name: &str) -> Option<TransferDirection> {
        [TransferDirection::ToGuest, TransferDirection::FromGuest]
            .into_iter()
            .find(|d| d.as_str() == name)
    }
}

impl fmt::Display for TransferDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a transfer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferState {
    Pending,
    Running,
    /// The receiver verified the whole file.
    Done,
    Failed,
    Cancelled,
}

impl TransferState {
    pub const ALL: [TransferState; 5] = [
        TransferState::Pending,
        TransferState::Running,
        TransferState::Done,
        TransferState::Failed,
        TransferState::Cancelled,
    ];

    /// The lowercase name the store writes.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Pending => "pending",
            TransferState::Running => "running",
            TransferState::Done => "done",
            TransferState::Failed => "failed",
            TransferState::Cancelled => "cancelled",
        }
    }

    pub fn parse(name: &str) -> Option<TransferState> {
        TransferState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the transfer is over.
    pub fn is_final(self) -> bool {
        !matches!(self, TransferState::Pending | TransferState::Running)
    }
}

impl fmt::Display for TransferState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The final states as an SQL list, for `state IN (...)`.
pub(super) const FINAL_STATES_SQL: &str = "'done', 'failed', 'cancelled'";

/// The transfers of one direction in one state, counted by [`Store::transfer_totals`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferTotal {
    pub direction: TransferDirection,
    pub state: TransferState,
    pub count: u64,
    /// The sum of their `bytes_done`.
    pub bytes: u64,
}

/// A file transfer as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TransferRecord {
    /// The key: unique among transfers.
    pub transfer_id: String,
    pub vm: String,
    pub guest_id: String,
    pub direction: TransferDirection,
    /// The file on the host: the source of a copy to the guest, the target of one
    /// from it.
    pub local_path: PathBuf,
    pub remote_path: String,
    /// The file's size, once known.
    pub size: Option<u64>,
    /// The SHA-256 of the whole file, lowercase hex, once known.
    pub sha256: Option<String>,
    /// Bytes the receiver holds, as last reported.
    pub bytes_done: u64,
    pub state: TransferState,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl TransferRecord {
    /// A pending transfer with nothing known of the file yet.
    pub fn new(
        transfer_id: impl Into<String>,
        vm: impl Into<String>,
        guest_id: impl Into<String>,
        direction: TransferDirection,
        local_path: &Path,
        remote_path: impl Into<String>,
        created_at: DateTime<Utc>,
    ) -> TransferRecord {
        TransferRecord {
            transfer_id: transfer_id.into(),
            vm: vm.into(),
            guest_id: guest_id.into(),
            direction,
            local_path: local_path.to_owned(),
            remote_path: remote_path.into(),
            size: None,
            sha256: None,
            bytes_done: 0,
            state: TransferState::Pending,
            error: None,
            created_at,
            finished_at: None,
        }
    }

    fn from_row(row: &rusqlite::Row<'_>) -> Result<TransferRecord, StoreError> {
        let r = RowReader::new(row, "transfers", "transfer_id")?;
        Ok(TransferRecord {
            transfer_id: r.key.clone(),
            vm: r.get("vm")?,
            guest_id: r.get("guest_id")?,
            direction: r.name("direction", TransferDirection::parse)?,
            local_path: r
                .opt_path("local_path")?
                .ok_or_else(|| r.corrupt("local_path", "it is empty"))?,
            remote_path: r.get("remote_path")?,
            size: r.opt_u64("size")?,
            sha256: r.get("sha256")?,
            bytes_done: r.u64("bytes_done")?,
            state: r.name("state", TransferState::parse)?,
            error: r.get("error")?,
            created_at: r.time("created_at")?,
            finished_at: r.opt_time("finished_at")?,
        })
    }
}

const TRANSFER_COLUMNS: &str = "transfer_id, vm, guest_id, direction, local_path, remote_path, \
     size, sha256, bytes_done, state, error, created_at, finished_at";

impl Store {
    /// Stores a new transfer. Fails with [`StoreError::DuplicateTransfer`] if its id
    /// is taken.
    pub fn insert_transfer(&self, transfer: &TransferRecord) -> Result<(), StoreError> {
        let size = transfer.size.map(|s| int(s, "a file size")).transpose()?;
        let bytes_done = int(transfer.bytes_done, "a transfer's progress")?;
        self.write("store a new transfer", Durability::PowerSafe, |tx| {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO transfers (transfer_id, vm, guest_id, direction, local_path,
                         remote_path, size, sha256, bytes_done, state, error, created_at,
                         finished_at)
                     VALUES (:transfer_id, :vm, :guest_id, :direction, :local_path,
                         :remote_path, :size, :sha256, :bytes_done, :state, :error,
                         :created_at, :finished_at)",
                )?
                .execute(named_params! {
                    ":transfer_id": transfer.transfer_id,
                    ":vm": transfer.vm,
                    ":guest_id": transfer.guest_id,
                    ":direction": transfer.direction.as_str(),
                    ":local_path": path_value(&transfer.local_path),
                    ":remote_path": transfer.remote_path,
                    ":size": size,
                    ":sha256": transfer.sha256,
                    ":bytes_done": bytes_done,
                    ":state": transfer.state.as_str(),
                    ":error": transfer.error,
                    ":created_at": millis(transfer.created_at),
                    ":finished_at": opt_millis(transfer.finished_at),
                })
                .map_err(Failure::from);
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_constraint(&e, SQLITE_CONSTRAINT_PRIMARYKEY) => {
                    Err(StoreError::DuplicateTransfer {
                        transfer_id: transfer.transfer_id.clone(),
                    }
                    .into())
                }
                Err(e) => Err(e),
            }
        })
    }

    /// The transfer with that id.
    pub fn transfer(&self, transfer_id: &str) -> Result<Option<TransferRecord>, StoreError> {
        self.read("read a transfer", |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = ?1"
            ))?;
            let mut rows = stmt.query([transfer_id])?;
            match rows.next()? {
                Some(row) => Ok(Some(TransferRecord::from_row(row)?)),
                None => Ok(None),
            }
        })
    }

    /// How many transfers there are and how many bytes they moved, by direction and
    /// state; pairs with none are absent. Sums in the database (for metrics).
    pub fn transfer_totals(&self) -> Result<Vec<TransferTotal>, StoreError> {
        self.read("sum transfers by direction and state", |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT direction, state, count(*), coalesce(sum(bytes_done), 0)
                 FROM transfers GROUP BY direction, state",
            )?;
            let mut rows = stmt.query([])?;
            let mut totals = Vec::new();
            while let Some(row) = rows.next()? {
                let (direction, state): (String, String) = (row.get(0)?, row.get(1)?);
                let (count, bytes): (i64, i64) = (row.get(2)?, row.get(3)?);
                // The columns' CHECK constraints admit only these names.
                if let (Some(direction), Some(state)) = (
                    TransferDirection::parse(&direction),
                    TransferState::parse(&state),
                ) {
                    totals.push(TransferTotal {
                        direction,
                        state,
                        count: u64::try_from(count).unwrap_or(0),
                        bytes: u64::try_from(bytes).unwrap_or(0),
                    });
                }
            }
            Ok(totals)
        })
    }

    /// The transfers of `vm` (of every VM if `None`), only those not finished if
    /// `unfinished_only`, oldest first.
    pub fn transfers(
        &self,
        vm: Option<&str>,
        unfinished_only: bool,
    ) -> Result<Vec<TransferRecord>, StoreError> {
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers
             WHERE (?1 IS NULL OR vm = ?1) AND (NOT ?2 OR state NOT IN ({FINAL_STATES_SQL}))
             ORDER BY created_at, rowid"
        );
        self.read("list transfers", |conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query((vm, unfinished_only))?;
            let mut transfers = Vec::new();
            while let Some(row) = rows.next()? {
                transfers.push(TransferRecord::from_row(row)?);
            }
            Ok(transfers)
        })
    }

    /// Records that the receiver holds `bytes_done` bytes; a pending transfer
    /// becomes running. Answers false, changing nothing, once the transfer is
    /// finished.
    pub fn update_transfer_progress(
        &self,
        transfer_id: &str,
        bytes_done: u64,
    ) -> Result<bool, StoreError> {
        let bytes_done = int(bytes_done, "a transfer's progress")?;
        self.write("store a transfer's progress", Durability::CrashSafe, |tx| {
            let changed = tx
                .prepare_cached(&format!(
                    "UPDATE transfers SET bytes_done = ?2, state = 'running'
                     WHERE transfer_id = ?1 AND state NOT IN ({FINAL_STATES_SQL})"
                ))?
                .execute((transfer_id, bytes_done))?;
            if changed == 0 {
                require_transfer(tx, transfer_id)?;
            }
            Ok(changed > 0)
        })
    }

    /// Records the file's size and digest once they are known (a `FILE_READY`
    /// before any chunk); `None` keeps what is stored. Answers false, changing
    /// nothing, once the transfer is finished.
    pub fn set_transfer_size(
        &self,
        transfer_id: &str,
        size: Option<u64>,
        sha256: Option<&str>,
    ) -> Result<bool, StoreError> {
        let size = size.map(|s| int(s, "a file size")).transpose()?;
        self.write(
            "store a transfer's file size",
            Durability::CrashSafe,
            |tx| {
                let changed = tx
                    .prepare_cached(&format!(
                    "UPDATE transfers SET size = coalesce(?2, size), sha256 = coalesce(?3, sha256)
                     WHERE transfer_id = ?1 AND state NOT IN ({FINAL_STATES_SQL})"
                ))?
                    .execute((transfer_id, size, sha256))?;
                if changed == 0 {
                    require_transfer(tx, transfer_id)?;
                }
                Ok(changed > 0)
            },
        )
    }

    /// Ends a transfer in `state` (`done`, `failed` or `cancelled`) at the current
    /// time. `size` and `sha256` replace what is stored when given; `done` with a
    /// known size sets `bytes_done` to it. Answers false, changing nothing, if the
    /// transfer had already ended: the first end wins.
    pub fn finish_transfer(
        &self,
        transfer_id: &str,
        state: TransferState,
        size: Option<u64>,
        sha256: Option<&str>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        if !state.is_final() {
            return Err(StoreError::NotFinal {
                state: state.as_str(),
                purpose: "end a transfer",
            });
        }
        let size = size.map(|s| int(s, "a file size")).transpose()?;
        self.write("end a transfer", Durability::PowerSafe, |tx| {
            let changed = tx
                .prepare_cached(&format!(
                    "UPDATE transfers SET
                         state = :state,
                         size = coalesce(:size, size),
                         sha256 = coalesce(:sha256, sha256),
                         bytes_done = CASE WHEN :state = 'done'
                             THEN coalesce(:size, size, bytes_done) ELSE bytes_done END,
                         error = :error,
                         finished_at = :at
                     WHERE transfer_id = :transfer_id AND state NOT IN ({FINAL_STATES_SQL})"
                ))?
                .execute(named_params! {
                    ":state": state.as_str(),
                    ":size": size,
                    ":sha256": sha256,
                    ":error": error,
                    ":at": millis(Utc::now()),
                    ":transfer_id": transfer_id,
                })?;
            if changed == 0 {
                require_transfer(tx, transfer_id)?;
            }
            Ok(changed > 0)
        })
    }
}

/// Fails with [`StoreError::NoSuchTransfer`] unless the transfer exists.
fn require_transfer(conn: &Connection, transfer_id: &str) -> Result<(), Failure> {
    let found: Option<i64> = conn
        .prepare_cached("SELECT 1 FROM transfers WHERE transfer_id = ?1")?
        .query_row([transfer_id], |row| row.get(0))
        .optional()?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::NoSuchTransfer {
            transfer_id: transfer_id.to_owned(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{at, temp_store};

    fn put(id: &str, vm: &str, created: i64) -> TransferRecord {
        TransferRecord::new(
            id,
            vm,
            "52:54:00:00:00:01",
            TransferDirection::ToGuest,
            Path::new("/srv/files/payload.tar"),
            "/root/payload.tar",
            at(created),
        )
    }

    fn ids(transfers: &[TransferRecord]) -> Vec<&str> {
        transfers.iter().map(|t| t.transfer_id.as_str()).collect()
    }

    #[test]
    fn names_round_trip() {
        for state in TransferState::ALL {
            assert_eq!(TransferState::parse(state.as_str()), Some(state));
        }
        let finals: Vec<String> = TransferState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(FINAL_STATES_SQL, finals.join(", "));
        for direction in [TransferDirection::ToGuest, TransferDirection::FromGuest] {
            assert_eq!(
                TransferDirection::parse(direction.as_str()),
                Some(direction)
            );
        }
    }

    #[test]
    fn transfers_are_summed_by_direction_and_state() {
        let (_dir, store) = temp_store();
        assert_eq!(store.transfer_totals().unwrap(), []);
        for (id, created) in [("t1", 1), ("t2", 2), ("t3", 3)] {
            store.insert_transfer(&put(id, "web", created)).unwrap();
        }
        store.update_transfer_progress("t1", 100).unwrap();
        store
            .finish_transfer("t2", TransferState::Done, Some(1000), Some("ab"), None)
            .unwrap();
        store.update_transfer_progress("t3", 10).unwrap();
        let mut totals = store.transfer_totals().unwrap();
        totals.sort_by_key(|t| t.state.as_str());
        let total = |state, count, bytes| TransferTotal {
            direction: TransferDirection::ToGuest,
            state,
            count,
            bytes,
        };
        assert_eq!(
            totals,
            [
                total(TransferState::Done, 1, 1000),
                total(TransferState::Running, 2, 110)
            ]
        );
    }

    #[test]
    fn a_transfer_with_every_field_set_round_trips() {
        let (_dir, store) = temp_store();
        let full = TransferRecord {
            transfer_id: "t-full".into(),
            vm: "web".into(),
            guest_id: "52:54:00:AA:BB:01".into(),
            direction: TransferDirection::FromGuest,
            local_path: PathBuf::from("/srv/in/log.txt"),
            remote_path: "/var/log/syslog".into(),
            size: Some(1 << 40),
            sha256: Some("ab".repeat(32)),
            bytes_done: 1 << 39,
            state: TransferState::Failed,
            error: Some("checksum-mismatch".into()),
            created_at: at(0),
            finished_at: Some(at(9)),
        };
        store.insert_transfer(&full).unwrap();
        assert_eq!(store.transfer("t-full").unwrap(), Some(full));
        assert_eq!(store.transfer("t-none").unwrap(), None);
        let err = store.insert_transfer(&put("t-full", "web", 0)).unwrap_err();
        assert!(
            matches!(err, StoreError::DuplicateTransfer { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn progress_then_done_is_the_life_of_a_transfer() {
        let (_dir, store) = temp_store();
        store.insert_transfer(&put("t-1", "web", 0)).unwrap();
        assert!(store
            .set_transfer_size("t-1", Some(10_000), Some("cd"))
            .unwrap());
        assert!(store.update_transfer_progress("t-1", 4096).unwrap());
        let t = store.transfer("t-1").unwrap().unwrap();
        assert_eq!(
            (t.state, t.bytes_done, t.size),
            (TransferState::Running, 4096, Some(10_000))
        );

        assert!(store
            .finish_transfer("t-1", TransferState::Done, None, None, None)
            .unwrap());
        let t = store.transfer("t-1").unwrap().unwrap();
        assert_eq!(t.state, TransferState::Done);
        assert_eq!((t.bytes_done, t.sha256.as_deref()), (10_000, Some("cd")));
        assert!(t.finished_at.is_some());

        // Late news changes nothing.
        assert!(!store.update_transfer_progress("t-1", 5000).unwrap());
        assert!(!store
            .finish_transfer("t-1", TransferState::Failed, None, None, Some("late"))
            .unwrap());
        let t = store.transfer("t-1").unwrap().unwrap();
        assert_eq!(
            (t.state, t.bytes_done, t.error),
            (TransferState::Done, 10_000, None)
        );
    }

    #[test]
    fn a_failed_transfer_keeps_its_progress_and_error() {
        let (_dir, store) = temp_store();
        store.insert_transfer(&put("t-1", "web", 0)).unwrap();
        store.update_transfer_progress("t-1", 100).unwrap();
        store
            .finish_transfer(
                "t-1",
                TransferState::Failed,
                Some(300),
                None,
                Some("no-space: disk full"),
            )
            .unwrap();
        let t = store.transfer("t-1").unwrap().unwrap();
        assert_eq!((t.bytes_done, t.size), (100, Some(300)));
        assert_eq!(t.error.as_deref(), Some("no-space: disk full"));
    }

    #[test]
    fn transfers_are_listed_by_vm_and_unfinished_oldest_first() {
        let (_dir, store) = temp_store();
        store.insert_transfer(&put("t-3", "web", 3)).unwrap();
        store.insert_transfer(&put("t-1", "web", 1)).unwrap();
        store.insert_transfer(&put("t-2", "db", 2)).unwrap();
        store
            .finish_transfer("t-1", TransferState::Cancelled, None, None, None)
            .unwrap();
        assert_eq!(
            ids(&store.transfers(None, false).unwrap()),
            ["t-1", "t-2", "t-3"]
        );
        assert_eq!(
            ids(&store.transfers(Some("web"), false).unwrap()),
            ["t-1", "t-3"]
        );
        assert_eq!(ids(&store.transfers(None, true).unwrap()), ["t-2", "t-3"]);
        assert_eq!(ids(&store.transfers(Some("web"), true).unwrap()), ["t-3"]);
        assert!(store.transfers(Some("nope"), false).unwrap().is_empty());
    }

    #[test]
    fn changing_an_unknown_transfer_or_ending_it_badly_is_refused() {
        let (_dir, store) = temp_store();
        let err = store.update_transfer_progress("t-404", 1).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchTransfer { .. }), "{err:?}");
        let err = store
            .finish_transfer("t-404", TransferState::Done, None, None, None)
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSuchTransfer { .. }), "{err:?}");
        store.insert_transfer(&put("t-1", "web", 0)).unwrap();
        let err = store
            .finish_transfer("t-1", TransferState::Running, None, None, None)
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFinal { .. }), "{err:?}");
        let err = store.update_transfer_progress("t-1", u64::MAX).unwrap_err();
        assert!(matches!(err, StoreError::OutOfRange { .. }), "{err:?}");
    }
}
