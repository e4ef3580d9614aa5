//! Commands: their records, results and streamed output.
//!
//! A [`CommandRecord`] is created when the host accepts a command (one per target
//! guest; the records of one multicast request share a `fanout_id`) and is kept,
//! result included, until [`Store::prune`] deletes it: reading a result never
//! consumes it. [`Store::record_result`] stores the first result of a command and
//! ignores any later one, so that the guests' re-sent `CMD_RESULT`s are harmless;
//! once a result is stored the command's state no longer changes. Output chunks
//! (`CMD_OUTPUT`) are kept as they arrive, one row per (command, stream, offset); a
//! chunk at an offset already stored is ignored, and readers get the contiguous
//! bytes from an offset, stopping at the first gap. Everything is committed
//! crash-safe; results and new commands become power-safe at the caller's next
//! [`Store::flush`] (see [`super`]).
//!
//! This module does not check transitions between states (the engine drives them),
//! does not verify chunks against each other (overlapping chunks are read first
//! come, lowest offset first), and does not limit how much output a command keeps.

use std::fmt;

use chrono::{DateTime, Utc};
use rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE;
use rusqlite::types::Value;
use rusqlite::{named_params, Connection, OptionalExtension, Transaction};
use vmc_protocol::words::{CommandOutcome, CommandResult, CommandSpec, OutputStream};

use super::{
    int, is_constraint, millis, opt_millis, Durability, Failure, RowReader, Store, StoreError,
};

/// Where a command is, as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandState {
    /// Accepted, not yet sent to its guest.
    Queued,
    /// Sent; the guest has not said it started.
    Sent,
    Running,
    /// It ran and ended by itself or by a signal; the result tells how.
    Finished,
    /// It never ran, or the host could not get it to its guest.
    Failed,
    TimedOut,
    Cancelled,
    /// Its guest went away and how the command ended is unknown.
    Lost,
}

impl CommandState {
    /// Every state, from first to last.
    pub const ALL: [CommandState; 8] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Running,
        CommandState::Finished,
        CommandState::Failed,
        CommandState::TimedOut,
        CommandState::Cancelled,
        CommandState::Lost,
    ];

    /// The lowercase name the store writes.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Running => "running",
            CommandState::Finished => "finished",
            CommandState::Failed => "failed",
            CommandState::TimedOut => "timedout",
            CommandState::Cancelled => "cancelled",
            CommandState::Lost => "lost",
        }
    }

    /// Parses a name written by [`as_str`](Self::as_str).
    pub fn parse(name: &str) -> Option<CommandState> {
        CommandState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the command is over (every state but queued, sent and running).
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommandState::Queued | CommandState::Sent | CommandState::Running
        )
    }

    /// The final state of a command whose guest reported this outcome.
    pub fn from_outcome(outcome: CommandOutcome) -> CommandState {
        match outcome {
            CommandOutcome::Exited | CommandOutcome::Signalled => CommandState::Finished,
            CommandOutcome::FailedToStart => CommandState::Failed,
            CommandOutcome::TimedOut => CommandState::TimedOut,
            CommandOutcome::Cancelled => CommandState::Cancelled,
            CommandOutcome::Lost => CommandState::Lost,
        }
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The final states as an SQL list, for `state IN (...)`.
pub(super) const FINAL_STATES_SQL: &str = "'finished', 'failed', 'timedout', 'cancelled', 'lost'";

/// A command as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    /// The key: unique among commands.
    pub cmd_id: String,
    /// The name of the VM it was sent to, when the guest is a known VM. Kept after
    /// the VM is removed.
    pub vm: Option<String>,
    pub guest_id: String,
    /// Shared by the records of one multicast request.
    pub fanout_id: Option<String>,
    pub spec: CommandSpec,
    pub state: CommandState,
    pub created_at: DateTime<Utc>,
    /// When it was first sent.
    pub sent_at: Option<DateTime<Utc>>,
    /// When it first was seen running.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its final state; `None` while it is not final.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the host gives up waiting for it.
    pub deadline: Option<DateTime<Utc>>,
    /// The process id on the guest, from `CMD_STARTED`.
    pub pid: Option<u32>,
    /// The guest's result, once it arrived.
    pub result: Option<CommandResult>,
    /// What went wrong, as the result or the host says.
    pub error: Option<String>,
    /// Bytes of streamed stdout stored (duplicates not counted).
    pub out_bytes: u64,
    /// Bytes of streamed stderr stored.
    pub err_bytes: u64,
}

impl CommandRecord {
    /// A queued command, with nothing sent, started or received yet.
    pub fn new(
        cmd_id: impl Into<String>,
        vm: Option<&str>,
        guest_id: impl Into<String>,
        spec: CommandSpec,
        created_at: DateTime<Utc>,
    ) -> CommandRecord {
        CommandRecord {
            cmd_id: cmd_id.into(),
            vm: vm.map(str::to_owned),
            guest_id: guest_id.into(),
            fanout_id: None,
            spec,
            state: CommandState::Queued,
            created_at,
            sent_at: None,
            started_at: None,
            finished_at: None,
            deadline: None,
            pid: None,
            result: None,
            error: None,
            out_bytes: 0,
            err_bytes: 0,
        }
    }

    fn from_row(row: &rusqlite::Row<'_>) -> Result<CommandRecord, StoreError> {
        let r = RowReader::new(row, "commands", "cmd_id")?;
        Ok(CommandRecord {
            cmd_id: r.key.clone(),
            vm: r.get("vm")?,
            guest_id: r.get("guest_id")?,
            fanout_id: r.get("fanout_id")?,
            spec: r.json("spec")?,
            state: r.name("state", CommandState::parse)?,
            created_at: r.time("created_at")?,
            sent_at: r.opt_time("sent_at")?,
            started_at: r.opt_time("started_at")?,
            finished_at: r.opt_time("finished_at")?,
            deadline: r.opt_time("deadline")?,
            pid: r.opt_u32("pid")?,
            result: r.opt_json("result")?,
            error: r.get("error")?,
            out_bytes: r.u64("out_bytes")?,
            err_bytes: r.u64("err_bytes")?,
        })
    }
}

/// Which commands [`Store::commands`] lists; the default lists all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandQuery {
    pub vm: Option<String>,
    pub fanout_id: Option<String>,
    /// Any of these states; empty means any state.
    pub states: Vec<CommandState>,
    /// At most this many, the newest.
    pub limit: Option<usize>,
    /// Only commands in a final state.
    pub finished_only: bool,
}

const COMMAND_COLUMNS: &str = "cmd_id, vm, guest_id, fanout_id, spec, state, created_at, sent_at, \
     started_at, finished_at, deadline, pid, result, error, out_bytes, err_bytes";

impl Store {
    /// Stores a new command. Fails with [`StoreError::DuplicateCommand`] if its id
    /// is taken.
    pub fn insert_command(&self, command: &CommandRecord) -> Result<(), StoreError> {
        self.insert_commands(std::slice::from_ref(command))
    }

    /// Stores new commands, all or none (the records of a multicast request). They
    /// survive a crash at once and a power cut after [`Store::flush`].
    pub fn insert_commands(&self, commands: &[CommandRecord]) -> Result<(), StoreError> {
        self.write("store a new command", Durability::CrashSafe, |tx| {
            for command in commands {
                insert(tx, command)?;
            }
            Ok(())
        })
    }

    /// The command with that id.
    pub fn command(&self, cmd_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.read("read a command", |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE cmd_id = ?1"
            ))?;
            let mut rows = stmt.query([cmd_id])?;
            match rows.next()? {
                Some(row) => Ok(Some(CommandRecord::from_row(row)?)),
                None => Ok(None),
            }
        })
    }

    /// The commands that match `query`, newest first.
    pub fn commands(&self, query: &CommandQuery) -> Result<Vec<CommandRecord>, StoreError> {
        let mut sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE true");
        let mut params: Vec<Value> = Vec::new();
        if let Some(vm) = &query.vm {
            params.push(Value::Text(vm.clone()));
            sql += &format!(" AND vm = ?{}", params.len());
        }
        if let Some(fanout_id) = &query.fanout_id {
            params.push(Value::Text(fanout_id.clone()));
            sql += &format!(" AND fanout_id = ?{}", params.len());
        }
        if !query.states.is_empty() {
            let mut placeholders = Vec::new();
            for state in &query.states {
                params.push(Value::Text(state.as_str().to_owned()));
                placeholders.push(format!("?{}", params.len()));
            }
            sql += &format!(" AND state IN ({})", placeholders.join(", "));
        }
        if query.finished_only {
            sql += &format!(" AND state IN ({FINAL_STATES_SQL})");
        }
        sql += " ORDER BY created_at DESC, seq DESC";
        if let Some(limit) = query.limit {
            params.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
            sql += &format!(" LIMIT ?{}", params.len());
        }
        self.read("list commands", |conn| {
            select_commands(conn, &sql, rusqlite::params_from_iter(params))
        })
    }

    /// The commands not yet in a final state (queued, sent, running), oldest first:
    /// what a restarted host must resend, ask about or wait for.
    pub fn unfinished_commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        self.read("list unfinished commands", |conn| {
            select_commands(
                conn,
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands
                     WHERE state IN ('queued', 'sent', 'running') ORDER BY created_at, seq"
                ),
                [],
            )
        })
    }

    /// Moves a command to `state` at time `at`, with `error` saying why (`None`
    /// clears it). Entering `sent` the first time stamps `sent_at`, entering `running`
    /// stamps `started_at` (and `sent_at` if no receipt came first); a final state
    /// stamps `finished_at`, any other clears it. Does nothing and answers false once
    /// the command has a result.
    pub fn set_command_state(
        &self,
        cmd_id: &str,
        state: CommandState,
        at: DateTime<Utc>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.write("change a command's state", Durability::CrashSafe, |tx| {
            let changed = tx
                .prepare_cached(&format!(
                    "UPDATE commands SET
                         state = :state,
                         sent_at = CASE WHEN :state IN ('sent', 'running')
                             THEN coalesce(sent_at, :at) ELSE sent_at END,
                         started_at = CASE WHEN :state = 'running'
                             THEN coalesce(started_at, :at) ELSE started_at END,
                         finished_at = CASE WHEN :state IN ({FINAL_STATES_SQL})
                             THEN :at ELSE NULL END,
                         error = :error
                     WHERE cmd_id = :cmd_id AND result IS NULL"
                ))?
                .execute(named_params! {
                    ":state": state.as_str(),
                    ":at": millis(at),
                    ":error": error,
                    ":cmd_id": cmd_id,
                })?;
            if changed == 0 {
                require_command(tx, cmd_id)?;
            }
            Ok(changed > 0)
        })
    }

    /// Records the process id the guest reported in `CMD_STARTED`.
    pub fn set_command_pid(&self, cmd_id: &str, pid: u32) -> Result<(), StoreError> {
        self.write("store a command's pid", Durability::CrashSafe, |tx| {
            let changed = tx
                .prepare_cached("UPDATE commands SET pid = ?2 WHERE cmd_id = ?1")?
                .execute((cmd_id, pid))?;
            if changed == 0 {
                require_command(tx, cmd_id)?;
            }
            Ok(())
        })
    }

    /// Stores a command's result and moves it to `final_state` (see
    /// [`CommandState::from_outcome`]), stamping `finished_at` with the current
    /// time and `error` with the result's. Answers false, changing nothing, if a
    /// result was already stored: the first result wins. A result supersedes a
    /// final state the host set by itself (`lost`, `failed`, ...). When this returns
    /// the result survives a crash; after [`Store::flush`] also a power cut, and only
    /// then may the host acknowledge it.
    pub fn record_result(
        &self,
        cmd_id: &str,
        result: &CommandResult,
        final_state: CommandState,
    ) -> Result<bool, StoreError> {
        if result.cmd_id != cmd_id {
            return Err(StoreError::ResultMismatch {
                cmd_id: cmd_id.to_owned(),
                found: result.cmd_id.clone(),
            });
        }
        if !final_state.is_final() {
            return Err(StoreError::NotFinal {
                state: final_state.as_str(),
                purpose: "end a command",
            });
        }
        let json = serde_json::to_string(result).map_err(|source| StoreError::Encode {
            what: "result",
            key: cmd_id.to_owned(),
            source,
        })?;
        let now = millis(Utc::now());
        // A short command may come without CMD_STARTED: its start is then the one
        // the guest reports, kept between the command's creation and now (clocks differ).
        let guest_started = result
            .started_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(now, |t| millis(t.with_timezone(&Utc)));
        self.write("store a command's result", Durability::CrashSafe, |tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE commands SET result = ?2, state = ?3, finished_at = ?4, error = ?5,
                         started_at = CASE WHEN ?7 THEN coalesce(started_at,
                             max(created_at, min(?6, ?4))) ELSE started_at END
                     WHERE cmd_id = ?1 AND result IS NULL",
                )?
                .execute((
                    cmd_id,
                    json,
                    final_state.as_str(),
                    now,
                    &result.error,
                    guest_started,
                    result.started_at.is_some(),
                ))?;
            if changed == 0 {
                require_command(tx, cmd_id)?;
            }
            Ok(changed > 0)
        })
    }

    /// Stores a chunk of a command's streamed output that starts at byte `offset`
    /// of `stream`. Answers false, storing nothing, if a chunk at that offset is
    /// already stored or `data` is empty.
    pub fn append_output(
        &self,
        cmd_id: &str,
        stream: OutputStream,
        offset: u64,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        let len = data.len() as u64;
        let start = int(offset, "an output offset")?;
        int(offset.saturating_add(len), "the end of an output chunk")?;
        self.write("store command output", Durability::CrashSafe, |tx| {
            let seq = command_seq(tx, cmd_id)?;
            if data.is_empty() {
                return Ok(false);
            }
            let inserted = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO output_chunks (cmd, stream, offset, len, data)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute((seq, stream.as_str(), start, data.len(), data))?;
            if inserted > 0 {
                let counter = match stream {
                    OutputStream::Out => {
                        "UPDATE commands SET out_bytes = out_bytes + ?2 WHERE seq = ?1"
                    }
                    OutputStream::Err => {
                        "UPDATE commands SET err_bytes = err_bytes + ?2 WHERE seq = ?1"
                    }
                };
                tx.prepare_cached(counter)?.execute((seq, data.len()))?;
            }
            Ok(inserted > 0)
        })
    }

    /// Up to `max_bytes` of `stream`, contiguous from `from_offset`: the read stops
    /// at the first byte no stored chunk holds. Empty if that is `from_offset`.
    /// The store is locked while the bytes are copied: read large output in pages
    /// of a few MiB.
    pub fn read_output(
        &self,
        cmd_id: &str,
        stream: OutputStream,
        from_offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.read("read command output", |conn| {
            let seq = command_seq(conn, cmd_id)?;
            let Ok(from) = i64::try_from(from_offset) else {
                return Ok(Vec::new()); // beyond anything that can be stored
            };
            // The lowest chunk holding byte `from`; later chunks in offset order
            // then continue from it or leave a gap.
            let start: Option<i64> = conn
                .prepare_cached(
                    "SELECT min(offset) FROM output_chunks
                     WHERE cmd = ?1 AND stream = ?2 AND offset <= ?3 AND offset + len > ?3",
                )?
                .query_row((seq, stream.as_str(), from), |row| row.get(0))?;
            let Some(start) = start else {
                return Ok(Vec::new());
            };
            let mut stmt = conn.prepare_cached(
                "SELECT offset, data FROM output_chunks
                 WHERE cmd = ?1 AND stream = ?2 AND offset >= ?3 ORDER BY offset",
            )?;
            let mut rows = stmt.query((seq, stream.as_str(), start))?;
            let mut out = Vec::new();
            let mut pos = from_offset;
            while out.len() < max_bytes {
                let Some(row) = rows.next()? else { break };
                let offset = u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0);
                if offset > pos {
                    break; // a gap
                }
                let data = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
                // offset <= pos here; skip what is already read.
                let skip = usize::try_from(pos - offset).unwrap_or(usize::MAX);
                if skip >= data.len() {
                    continue;
                }
                let take = (data.len() - skip).min(max_bytes - out.len());
                out.extend_from_slice(&data[skip..skip + take]);
                pos += take as u64;
            }
            Ok(out)
        })
    }

    /// How many commands are in each state; states with none are absent. Counts
    /// in the database, reading no records (for metrics and health checks).
    pub fn command_counts(&self) -> Result<Vec<(CommandState, u64)>, StoreError> {
        self.read("count commands by state", |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT state, count(*) FROM commands GROUP BY state")?;
            let mut rows = stmt.query([])?;
            let mut counts = Vec::new();
            while let Some(row) = rows.next()? {
                let (state, count): (String, i64) = (row.get(0)?, row.get(1)?);
                // The column's CHECK constraint admits only the names of the states.
                if let Some(state) = CommandState::parse(&state) {
                    counts.push((state, u64::try_from(count).unwrap_or(0)));
                }
            }
            Ok(counts)
        })
    }

    /// How many bytes of `stream` are stored contiguously from offset 0.
    pub fn output_len(&self, cmd_id: &str, stream: OutputStream) -> Result<u64, StoreError> {
        self.read("measure command output", |conn| {
            let seq = command_seq(conn, cmd_id)?;
            let mut stmt = conn.prepare_cached(
                "SELECT offset, len FROM output_chunks WHERE cmd = ?1 AND stream = ?2
                 ORDER BY offset",
            )?;
            let mut rows = stmt.query((seq, stream.as_str()))?;
            let mut end: i64 = 0;
            while let Some(row) = rows.next()? {
                let (offset, len): (i64, i64) = (row.get(0)?, row.get(1)?);
                if offset > end {
                    break;
                }
                end = end.max(offset.saturating_add(len));
            }
            Ok(u64::try_from(end).unwrap_or(0))
        })
    }
}

fn insert(tx: &Transaction<'_>, command: &CommandRecord) -> Result<(), Failure> {
    let encode = |what, source| StoreError::Encode {
        what,
        key: command.cmd_id.clone(),
        source,
    };
    let spec = serde_json::to_string(&command.spec).map_err(|e| encode("spec", e))?;
    let result = match &command.result {
        Some(result) => Some(serde_json::to_string(result).map_err(|e| encode("result", e))?),
        None => None,
    };
    let inserted = tx
        .prepare_cached(
            "INSERT INTO commands (cmd_id, vm, guest_id, fanout_id, spec, state, created_at,
                 sent_at, started_at, finished_at, deadline, pid, result, error, out_bytes,
                 err_bytes)
             VALUES (:cmd_id, :vm, :guest_id, :fanout_id, :spec, :state, :created_at,
                 :sent_at, :started_at, :finished_at, :deadline, :pid, :result, :error,
                 :out_bytes, :err_bytes)",
        )?
        .execute(named_params! {
            ":cmd_id": command.cmd_id,
            ":vm": command.vm,
            ":guest_id": command.guest_id,
            ":fanout_id": command.fanout_id,
            ":spec": spec,
            ":state": command.state.as_str(),
            ":created_at": millis(command.created_at),
            ":sent_at": opt_millis(command.sent_at),
            ":started_at": opt_millis(command.started_at),
            ":finished_at": opt_millis(command.finished_at),
            ":deadline": opt_millis(command.deadline),
            ":pid": command.pid,
            ":result": result,
            ":error": command.error,
            ":out_bytes": int(command.out_bytes, "a command's stdout size")?,
            ":err_bytes": int(command.err_bytes, "a command's stderr size")?,
        })
        .map_err(Failure::from);
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_constraint(&e, SQLITE_CONSTRAINT_UNIQUE) => {
            Err(StoreError::DuplicateCommand {
                cmd_id: command.cmd_id.clone(),
            }
            .into())
        }
        Err(e) => Err(e),
    }
}

fn select_commands(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<CommandRecord>, Failure> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut commands = Vec::new();
    while let Some(row) = rows.next()? {
        commands.push(CommandRecord::from_row(row)?);
    }
    Ok(commands)
}

/// The row number of a command, which its output chunks refer to.
fn command_seq(conn: &Connection, cmd_id: &str) -> Result<i64, Failure> {
    conn.prepare_cached("SELECT seq FROM commands WHERE cmd_id = ?1")?
        .query_row([cmd_id], |row| row.get(0))
        .optional()?
        .ok_or_else(|| {
            StoreError::NoSuchCommand {
                cmd_id: cmd_id.to_owned(),
            }
            .into()
        })
}

/// Fails with [`StoreError::NoSuchCommand`] unless the command exists.
fn require_command(conn: &Connection, cmd_id: &str) -> Result<(), Failure> {
    command_seq(conn, cmd_id).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{at, command, temp_store};
    use std::time::Instant;
    use vmc_protocol::words::ResourceUsage;

    fn result(cmd_id: &str, out: &str, code: i32) -> CommandResult {
        CommandResult {
            cmd_id: cmd_id.into(),
            out: out.into(),
            err: String::new(),
            finished: true,
            exit_code_or_signal: code,
            resources: ResourceUsage {
                ru_utime: 0.5,
                ru_maxrss: 2048,
                ..ResourceUsage::default()
            },
            state: CommandOutcome::Exited,
            error: None,
            started_at: Some("2024-05-01T12:00:00Z".into()),
            ended_at: Some("2024-05-01T12:00:01.5Z".into()),
            wall_secs: 1.5,
            out_bytes: out.len() as u64,
            err_bytes: 0,
            out_truncated: false,
            err_truncated: false,
            out_file: None,
            err_file: None,
        }
    }

    fn ids(commands: &[CommandRecord]) -> Vec<&str> {
        commands.iter().map(|c| c.cmd_id.as_str()).collect()
    }

    #[test]
    fn state_names_round_trip_and_outcomes_map_to_final_states() {
        for state in CommandState::ALL {
            assert_eq!(CommandState::parse(state.as_str()), Some(state));
            assert_eq!(state.as_str(), format!("{state:?}").to_lowercase());
        }
        let finals: Vec<_> = CommandState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(
            FINAL_STATES_SQL,
            finals
                .iter()
                .map(|s| format!("'{s}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(
            CommandState::from_outcome(CommandOutcome::Signalled),
            CommandState::Finished
        );
        assert_eq!(
            CommandState::from_outcome(CommandOutcome::FailedToStart),
            CommandState::Failed
        );
        assert_eq!(
            CommandState::from_outcome(CommandOutcome::Lost),
            CommandState::Lost
        );
    }

    #[test]
    fn commands_are_counted_by_state() {
        let (_dir, store) = temp_store();
        assert_eq!(store.command_counts().unwrap(), []);
        for (i, id) in ["c1", "c2", "c3"].into_iter().enumerate() {
            store
                .insert_command(&command(id, "web", at(i as i64)))
                .unwrap();
        }
        store
            .set_command_state("c3", CommandState::Running, at(5), None)
            .unwrap();
        let mut counts = store.command_counts().unwrap();
        counts.sort_by_key(|(state, _)| state.as_str());
        assert_eq!(
            counts,
            [(CommandState::Queued, 2), (CommandState::Running, 1)]
        );
    }

    #[test]
    fn a_command_with_every_field_set_round_trips() {
        let (_dir, store) = temp_store();
        let mut spec = CommandSpec::new("/bin/sh");
        spec.args = vec!["-c".into(), "echo hi; exit 3".into()];
        spec.env.insert("LANG".into(), "C.UTF-8".into());
        spec.path = Some("/tmp".into());
        spec.timeout_secs = Some(2.5);
        spec.output_limit = Some(4096);
        let full = CommandRecord {
            cmd_id: "c-full".into(),
            vm: None,
            guest_id: "52:54:00:00:00:09".into(),
            fanout_id: Some("f-1".into()),
            spec,
            state: CommandState::Finished,
            created_at: at(0),
            sent_at: Some(at(1)),
            started_at: Some(at(2)),
            finished_at: Some(at(3)),
            deadline: Some(at(60)),
            pid: Some(4242),
            result: Some(result("c-full", "hi\n", 3)),
            error: Some("exit status 3".into()),
            out_bytes: 3,
            err_bytes: 0,
        };
        store.insert_command(&full).unwrap();
        assert_eq!(store.command("c-full").unwrap(), Some(full));
        assert_eq!(store.command("c-none").unwrap(), None);
    }

    #[test]
    fn a_command_id_is_stored_once() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        let err = store
            .insert_command(&command("c-1", "other", at(1)))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::DuplicateCommand { cmd_id } if cmd_id == "c-1"),
            "{err:?}"
        );
        assert_eq!(
            store.command("c-1").unwrap().unwrap().vm.as_deref(),
            Some("vm")
        );
    }

    #[test]
    fn a_multicast_is_stored_all_or_nothing_and_listed_by_fanout() {
        let (_dir, store) = temp_store();
        let fanout = |id: &str| {
            let mut c = command(id, id, at(0));
            c.fanout_id = Some("f-7".into());
            c
        };
        store
            .insert_commands(&[fanout("a"), fanout("b"), fanout("c")])
            .unwrap();
        store.insert_command(&command("solo", "a", at(0))).unwrap();
        let query = CommandQuery {
            fanout_id: Some("f-7".into()),
            ..CommandQuery::default()
        };
        assert_eq!(store.commands(&query).unwrap().len(), 3);

        let err = store
            .insert_commands(&[fanout("d"), fanout("a")])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::DuplicateCommand { .. }),
            "{err:?}"
        );
        assert_eq!(
            store.command("d").unwrap(),
            None,
            "the batch was rolled back"
        );
    }

    #[test]
    fn queries_filter_by_vm_state_and_finish_newest_first() {
        let (_dir, store) = temp_store();
        for (i, (id, vm)) in [
            ("c-1", "web"),
            ("c-2", "db"),
            ("c-3", "web"),
            ("c-4", "web"),
        ]
        .iter()
        .enumerate()
        {
            store
                .insert_command(&command(id, vm, at(i as i64)))
                .unwrap();
        }
        store
            .set_command_state("c-1", CommandState::Finished, at(10), None)
            .unwrap();
        store
            .set_command_state("c-3", CommandState::Running, at(10), None)
            .unwrap();
        store
            .set_command_state("c-4", CommandState::Lost, at(10), Some("guest gone"))
            .unwrap();

        let all = store.commands(&CommandQuery::default()).unwrap();
        assert_eq!(ids(&all), ["c-4", "c-3", "c-2", "c-1"]);
        let web = CommandQuery {
            vm: Some("web".into()),
            ..CommandQuery::default()
        };
        assert_eq!(ids(&store.commands(&web).unwrap()), ["c-4", "c-3", "c-1"]);
        let finished = CommandQuery {
            finished_only: true,
            ..web.clone()
        };
        assert_eq!(ids(&store.commands(&finished).unwrap()), ["c-4", "c-1"]);
        let running_or_queued = CommandQuery {
            states: vec![CommandState::Running, CommandState::Queued],
            ..CommandQuery::default()
        };
        assert_eq!(
            ids(&store.commands(&running_or_queued).unwrap()),
            ["c-3", "c-2"]
        );
        let last_two = CommandQuery {
            limit: Some(2),
            ..web
        };
        assert_eq!(ids(&store.commands(&last_two).unwrap()), ["c-4", "c-3"]);
    }

    #[test]
    fn state_changes_stamp_their_times() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        assert!(store
            .set_command_state("c-1", CommandState::Sent, at(1), None)
            .unwrap());
        assert!(store
            .set_command_state("c-1", CommandState::Sent, at(2), None)
            .unwrap());
        assert!(store
            .set_command_state("c-1", CommandState::Running, at(3), None)
            .unwrap());
        store.set_command_pid("c-1", 777).unwrap();
        assert!(store
            .set_command_state("c-1", CommandState::Lost, at(4), Some("guest gone"))
            .unwrap());
        let c = store.command("c-1").unwrap().unwrap();
        assert_eq!(c.state, CommandState::Lost);
        assert_eq!(
            (c.sent_at, c.started_at, c.finished_at),
            (Some(at(1)), Some(at(3)), Some(at(4)))
        );
        assert_eq!((c.pid, c.error.as_deref()), (Some(777), Some("guest gone")));

        // The guest came back: running again, no longer finished, error cleared.
        assert!(store
            .set_command_state("c-1", CommandState::Running, at(5), None)
            .unwrap());
        let c = store.command("c-1").unwrap().unwrap();
        assert_eq!(
            (c.state, c.started_at, c.finished_at, c.error),
            (CommandState::Running, Some(at(3)), None, None)
        );

        let err = store
            .set_command_state("c-404", CommandState::Sent, at(1), None)
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSuchCommand { .. }), "{err:?}");
        let err = store.set_command_pid("c-404", 1).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchCommand { .. }), "{err:?}");
    }

    #[test]
    fn the_first_result_wins_and_duplicates_are_ignored() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        store
            .set_command_state("c-1", CommandState::Running, at(1), None)
            .unwrap();
        let first = result("c-1", "first\n", 0);
        assert!(store
            .record_result("c-1", &first, CommandState::Finished)
            .unwrap());
        let again = result("c-1", "second\n", 1);
        assert!(!store
            .record_result("c-1", &again, CommandState::Failed)
            .unwrap());

        let c = store.command("c-1").unwrap().unwrap();
        assert_eq!(c.state, CommandState::Finished);
        assert_eq!(c.result, Some(first.clone()));
        assert!(c.finished_at.is_some());
        // Results are not read-once.
        assert_eq!(store.command("c-1").unwrap().unwrap().result, Some(first));
        // Nor can a late state change undo the result.
        assert!(!store
            .set_command_state("c-1", CommandState::Running, at(9), None)
            .unwrap());
        assert_eq!(
            store.command("c-1").unwrap().unwrap().state,
            CommandState::Finished
        );
    }

    #[test]
    fn a_result_without_a_start_before_it_stamps_the_start_the_guest_reports() {
        let (_dir, store) = temp_store();
        let created = Utc::now() - chrono::Duration::seconds(10);
        store
            .insert_command(&command("c-1", "vm", created))
            .unwrap();
        let mut quick = result("c-1", "", 0);
        let started = Utc::now() - chrono::Duration::seconds(3);
        quick.started_at = Some(started.to_rfc3339());
        assert!(store
            .record_result("c-1", &quick, CommandState::Finished)
            .unwrap());
        let c = store.command("c-1").unwrap().unwrap();
        assert_eq!(
            c.started_at.map(|t| t.timestamp_millis()),
            Some(started.timestamp_millis())
        );

        // A guest clock far off is kept within the command's life on the host.
        store
            .insert_command(&command("c-2", "vm", created))
            .unwrap();
        let mut skewed = result("c-2", "", 0);
        skewed.started_at = Some("2001-01-01T00:00:00Z".into());
        store
            .record_result("c-2", &skewed, CommandState::Finished)
            .unwrap();
        let c = store.command("c-2").unwrap().unwrap();
        assert_eq!(
            c.started_at.map(|t| t.timestamp_millis()),
            Some(created.timestamp_millis())
        );

        // A start the host saw (CMD_STARTED) stays.
        store
            .insert_command(&command("c-3", "vm", created))
            .unwrap();
        store
            .set_command_state("c-3", CommandState::Running, at(5), None)
            .unwrap();
        store
            .record_result("c-3", &result("c-3", "", 0), CommandState::Finished)
            .unwrap();
        assert_eq!(
            store.command("c-3").unwrap().unwrap().started_at,
            Some(at(5))
        );
    }

    #[test]
    fn a_result_supersedes_a_state_the_host_guessed() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        store
            .set_command_state("c-1", CommandState::Lost, at(1), Some("guest gone"))
            .unwrap();
        let mut timed_out = result("c-1", "", -1);
        timed_out.state = CommandOutcome::TimedOut;
        timed_out.error = Some("killed after 2 s".into());
        let state = CommandState::from_outcome(timed_out.state);
        assert!(store.record_result("c-1", &timed_out, state).unwrap());
        let c = store.command("c-1").unwrap().unwrap();
        assert_eq!(
            (c.state, c.error.as_deref()),
            (CommandState::TimedOut, Some("killed after 2 s"))
        );
    }

    #[test]
    fn bad_results_are_refused_with_a_reason() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        let err = store
            .record_result("c-404", &result("c-404", "", 0), CommandState::Finished)
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSuchCommand { .. }), "{err:?}");
        let err = store
            .record_result("c-1", &result("c-2", "", 0), CommandState::Finished)
            .unwrap_err();
        assert!(matches!(err, StoreError::ResultMismatch { .. }), "{err:?}");
        let err = store
            .record_result("c-1", &result("c-1", "", 0), CommandState::Running)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "running is not a final state, so it cannot end a command"
        );
        assert_eq!(store.command("c-1").unwrap().unwrap().result, None);
    }

    #[test]
    fn unfinished_commands_are_listed_oldest_first_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open_in(dir.path()).unwrap();
            for (i, id) in ["q", "s", "r", "f", "x"].iter().enumerate() {
                store
                    .insert_command(&command(id, "vm", at(i as i64)))
                    .unwrap();
            }
            store
                .set_command_state("s", CommandState::Sent, at(10), None)
                .unwrap();
            store
                .set_command_state("r", CommandState::Running, at(10), None)
                .unwrap();
            store
                .record_result("f", &result("f", "", 0), CommandState::Finished)
                .unwrap();
            store
                .set_command_state("x", CommandState::Cancelled, at(10), None)
                .unwrap();
        }
        let store = Store::open_in(dir.path()).unwrap();
        let unfinished = store.unfinished_commands().unwrap();
        assert_eq!(ids(&unfinished), ["q", "s", "r"]);
        assert_eq!(unfinished[1].state, CommandState::Sent);
    }

    #[test]
    fn output_chunks_out_of_order_and_duplicated_reassemble() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        let out = OutputStream::Out;
        assert!(store.append_output("c-1", out, 10, b"klmnopqrst").unwrap());
        assert!(store.append_output("c-1", out, 0, b"abcdefghij").unwrap());
        assert!(
            !store.append_output("c-1", out, 10, b"klmnopqrst").unwrap(),
            "a duplicate"
        );
        assert!(store.append_output("c-1", out, 20, b"uvwxyz").unwrap());
        assert!(
            !store.append_output("c-1", out, 0, b"abcdefghij").unwrap(),
            "a duplicate"
        );

        assert_eq!(
            store.read_output("c-1", out, 0, 1000).unwrap(),
            b"abcdefghijklmnopqrstuvwxyz"
        );
        assert_eq!(store.read_output("c-1", out, 5, 10).unwrap(), b"fghijklmno");
        assert_eq!(store.read_output("c-1", out, 25, 10).unwrap(), b"z");
        assert_eq!(store.read_output("c-1", out, 26, 10).unwrap(), b"");
        assert_eq!(store.output_len("c-1", out).unwrap(), 26);
        let c = store.command("c-1").unwrap().unwrap();
        assert_eq!(
            (c.out_bytes, c.err_bytes),
            (26, 0),
            "duplicates are not counted"
        );
        // The other stream is separate.
        assert_eq!(store.output_len("c-1", OutputStream::Err).unwrap(), 0);
        assert_eq!(
            store.read_output("c-1", OutputStream::Err, 0, 10).unwrap(),
            b""
        );
    }

    #[test]
    fn reading_output_stops_at_a_gap_until_it_is_filled() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        let err = OutputStream::Err;
        store.append_output("c-1", err, 0, b"0123").unwrap();
        store.append_output("c-1", err, 8, b"89").unwrap();
        assert_eq!(store.read_output("c-1", err, 0, 100).unwrap(), b"0123");
        assert_eq!(
            store.read_output("c-1", err, 4, 100).unwrap(),
            b"",
            "nothing at the gap"
        );
        assert_eq!(store.read_output("c-1", err, 8, 100).unwrap(), b"89");
        assert_eq!(store.output_len("c-1", err).unwrap(), 4);

        store.append_output("c-1", err, 4, b"4567").unwrap();
        assert_eq!(
            store.read_output("c-1", err, 0, 100).unwrap(),
            b"0123456789"
        );
        assert_eq!(store.output_len("c-1", err).unwrap(), 10);
        assert_eq!(store.command("c-1").unwrap().unwrap().err_bytes, 10);
    }

    #[test]
    fn overlapping_chunks_read_as_one_stream() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        let out = OutputStream::Out;
        store.append_output("c-1", out, 0, b"abcdefghij").unwrap();
        store.append_output("c-1", out, 4, b"ef").unwrap();
        store.append_output("c-1", out, 8, b"ijklmn").unwrap();
        assert_eq!(
            store.read_output("c-1", out, 0, 100).unwrap(),
            b"abcdefghijklmn"
        );
        // Byte 6 is held by the first chunk, not by the short one at 4.
        assert_eq!(store.read_output("c-1", out, 6, 100).unwrap(), b"ghijklmn");
        assert_eq!(store.output_len("c-1", out).unwrap(), 14);
    }

    #[test]
    fn output_of_unknown_commands_and_impossible_offsets_is_refused() {
        let (_dir, store) = temp_store();
        let out = OutputStream::Out;
        let err = store.append_output("c-404", out, 0, b"x").unwrap_err();
        assert!(matches!(err, StoreError::NoSuchCommand { .. }), "{err:?}");
        let err = store.read_output("c-404", out, 0, 1).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchCommand { .. }), "{err:?}");
        let err = store.output_len("c-404", out).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchCommand { .. }), "{err:?}");

        store.insert_command(&command("c-1", "vm", at(0))).unwrap();
        let err = store.append_output("c-1", out, u64::MAX, b"x").unwrap_err();
        assert!(matches!(err, StoreError::OutOfRange { .. }), "{err:?}");
        assert!(
            !store.append_output("c-1", out, 0, b"").unwrap(),
            "an empty chunk adds nothing"
        );
        assert_eq!(store.read_output("c-1", out, u64::MAX, 10).unwrap(), b"");
    }

    #[test]
    fn a_corrupt_row_is_reported_naming_the_row_and_column() {
        let (_dir, store) = temp_store();
        store
            .insert_command(&command("c-bad", "vm", at(0)))
            .unwrap();
        store
            .lock()
            .execute("UPDATE commands SET spec = '{\"cmd\": 3'", [])
            .unwrap();
        let err = store.command("c-bad").unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { table: "commands", key, column: "spec", .. } if key == "c-bad"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the spec of commands row \"c-bad\" is corrupt"
        );
        store
            .lock()
            .execute(
                "UPDATE commands SET spec = '{\"cmd\": \"true\"}', created_at = 'May'",
                [],
            )
            .unwrap();
        let err = store.unfinished_commands().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    column: "created_at",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// Not a limit: prints how fast 64 KiB chunks go in (run with --nocapture).
    #[test]
    fn a_hundred_mib_of_output_in_64_kib_chunks() {
        let (_dir, store) = temp_store();
        store.insert_command(&command("big", "vm", at(0))).unwrap();
        const CHUNK: usize = 64 * 1024;
        const TOTAL: usize = 100 * 1024 * 1024;
        let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        for offset in (0..TOTAL).step_by(CHUNK) {
            assert!(store
                .append_output("big", OutputStream::Out, offset as u64, &chunk)
                .unwrap());
        }
        let elapsed = started.elapsed();
        println!(
            "stored 100 MiB of output in 64 KiB chunks in {:.2} s: {:.0} MB/s ({} build)",
            elapsed.as_secs_f64(),
            TOTAL as f64 / 1e6 / elapsed.as_secs_f64(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
        assert_eq!(
            store.output_len("big", OutputStream::Out).unwrap(),
            TOTAL as u64
        );
        let started = Instant::now();
        let tail = store
            .read_output("big", OutputStream::Out, (TOTAL - 100) as u64, 1 << 20)
            .unwrap();
        assert_eq!(tail, &chunk[CHUNK - 100..]);
        let mut read = 0;
        while read < TOTAL {
            let page = store
                .read_output("big", OutputStream::Out, read as u64, 1 << 20)
                .unwrap();
            assert!(!page.is_empty());
            read += page.len();
        }
        println!(
            "read it back in 1 MiB pages in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(
            store.command("big").unwrap().unwrap().out_bytes,
            TOTAL as u64
        );
    }
}
