//! The database schema and its forward-only migrations.
//!
//! `schema_version` holds one row per migration applied, with its time. On open,
//! [`migrate`] reads the highest version; if it is above [`LATEST`] the file was
//! written by a newer program and is refused untouched, otherwise each missing
//! migration of [`MIGRATIONS`] runs, all in one transaction, so a file is either
//! left as it was or brought fully up to date. A migration is never edited once
//! released: a change of schema is a new entry at the end of the list. This module
//! does not downgrade, repair or back up files.
//!
//! Conventions of the tables: times are unix milliseconds (INTEGER), enums are
//! lowercase text with a CHECK, specs and results are JSON text, paths are text
//! (or a blob when not UTF-8). Commands keep the name of their VM as plain text, not
//! as a foreign key, so that a command's history outlives its VM; snapshots belong
//! to their VM and go with it.

use std::path::Path;

use chrono::Utc;
use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// The schema version this program writes.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

/// Migration `i` brings a file from version `i` to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    "
    CREATE TABLE vms (
        name TEXT PRIMARY KEY NOT NULL,
        id TEXT UNIQUE,
        backend TEXT NOT NULL,
        image, -- a path: TEXT, or BLOB when not UTF-8
        kernel,
        initrd,
        kernel_args TEXT,
        memory_mib INTEGER NOT NULL,
        cpus INTEGER NOT NULL,
        mac TEXT,
        dir,
        created_at INTEGER NOT NULL,
        last_state TEXT NOT NULL,
        presence TEXT NOT NULL,
        presence_since INTEGER NOT NULL
    );

    CREATE TABLE snapshots (
        vm TEXT NOT NULL REFERENCES vms (name) ON DELETE CASCADE ON UPDATE CASCADE,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at INTEGER NOT NULL, -- unix seconds, as the hypervisor reports it
        vm_state_bytes INTEGER NOT NULL,
        PRIMARY KEY (vm, name)
    );

    CREATE TABLE commands (
        seq INTEGER PRIMARY KEY,
        cmd_id TEXT NOT NULL UNIQUE,
        vm TEXT,
        guest_id TEXT NOT NULL,
        fanout_id TEXT,
        spec TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'sent', 'running', 'finished', 'failed', 'timedout', 'cancelled', 'lost')),
        created_at INTEGER NOT NULL,
        sent_at INTEGER,
        started_at INTEGER,
        finished_at INTEGER,
        deadline INTEGER,
        pid INTEGER,
        result TEXT,
        error TEXT,
        out_bytes INTEGER NOT NULL DEFAULT 0,
        err_bytes INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX commands_by_vm ON commands (vm, created_at);
    CREATE INDEX commands_by_fanout ON commands (fanout_id) WHERE fanout_id IS NOT NULL;
    CREATE INDEX commands_by_state ON commands (state, finished_at);

    -- Streamed output. `len` comes before `data` and is in the second index so that
    -- finding contiguous ranges reads the index, not the blobs.
    CREATE TABLE output_chunks (
        cmd INTEGER NOT NULL REFERENCES commands (seq) ON DELETE CASCADE,
        stream TEXT NOT NULL CHECK (stream IN ('out', 'err')),
        offset INTEGER NOT NULL CHECK (offset >= 0),
        len INTEGER NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (cmd, stream, offset)
    );
    CREATE INDEX output_chunks_extents ON output_chunks (cmd, stream, offset, len);

    CREATE TABLE transfers (
        transfer_id TEXT PRIMARY KEY NOT NULL,
        vm TEXT NOT NULL,
        guest_id TEXT NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('to-guest', 'from-guest')),
        local_path NOT NULL,
        remote_path TEXT NOT NULL,
        size INTEGER,
        sha256 TEXT,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
        error TEXT,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX transfers_by_vm ON transfers (vm, created_at);
    CREATE INDEX transfers_by_state ON transfers (state, finished_at);
    ",
];

/// Brings the database to [`LATEST`], or refuses it if it is newer.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let failed = |version: u32| {
        move |source| StoreError::Migrate {
            path: path.to_owned(),
            version,
            source,
        }
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed(LATEST))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        )",
    )
    .map_err(failed(LATEST))?;
    let found: i64 = tx
        .query_row("SELECT max(version) FROM schema_version", [], |row| {
            row.get::<_, Option<i64>>(0)
        })
        .map_err(failed(LATEST))?
        .unwrap_or(0);
    if found > i64::from(LATEST) {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known: LATEST,
        });
    }
    // `found` is within 0..=LATEST here, so it fits.
    let from = usize::try_from(found).unwrap_or(0);
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        let version = index as u32 + 1;
        tx.execute_batch(sql).map_err(failed(version))?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            (version, Utc::now().timestamp_millis()),
        )
        .map_err(failed(version))?;
        log::info!(
            "state database {} migrated to schema version {version}",
            path.display()
        );
    }
    tx.commit().map_err(failed(LATEST))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, DATABASE_FILE};

    fn versions(path: &Path) -> Vec<i64> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[test]
    fn a_new_file_gets_every_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        drop(Store::open(&path).unwrap());
        drop(Store::open(&path).unwrap());
        assert_eq!(versions(&path), (1..=i64::from(LATEST)).collect::<Vec<_>>());
    }

    #[test]
    fn a_database_from_a_newer_program_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        drop(Store::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (99, 0)",
                [],
            )
            .unwrap();

        let err = Store::open(&path).unwrap_err();
        match &err {
            StoreError::NewerSchema { found, known, .. } => {
                assert_eq!((*found, *known), (99, LATEST))
            }
            other => panic!("expected NewerSchema, got {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains("newer than this program"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert_eq!(
            versions(&path).last(),
            Some(&99),
            "the file is left as it was"
        );
    }

    #[test]
    fn a_failed_migration_leaves_the_file_unchanged_and_names_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        // Another program's database with a table of the same name.
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE vms (x)")
            .unwrap();

        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::Migrate { version: 1, .. }),
            "{err:?}"
        );
        let conn = Connection::open(&path).unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the migration was rolled back");
    }
}
