//! The API's operations, each implemented once over the [`Engine`], with typed
//! inputs and outputs that every encoding (XML-RPC now, JSON next) translates.
//!
//! What lives here is what an operation means beyond one engine call: argument
//! checks the engine does not make (absolute paths, sane timeouts), the original
//! API's defaults (a copy goes to the same path on the other side), and how an
//! answer is composed (a command ended by the host, not by its guest, still gets a
//! result in the original's shape; a page of output tells whether more can come).
//! Errors are [`ApiError`]s, each with its stable [`FaultCode`].
//! Files that travel between a remote API caller and a guest pass through the host
//! as [`StagedFile`]s in the state directory, removed when dropped: [`upload`] takes
//! the caller's byte stream, [`download`] hands one back.
//! What does not live here: wire names and value types (the encodings' business),
//! and any state: every operation reads the engine or its store afresh.

use super::FaultCode;
use crate::engine::command::CommandDetails;
use crate::engine::presence::Presence;
use crate::engine::vm::LifecycleOp;
use crate::engine::{Engine, EngineError, EngineStatus, FanoutView, VmView};
use crate::hypervisor::{HypervisorError, PerformanceData, SnapshotInfo, VmSpec, VmState};
use crate::store::{
    CommandQuery, CommandRecord, CommandState, TransferDirection, TransferRecord, TransferState,
    TransferTotal,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use vmc_protocol::words::{CommandOutcome, CommandResult, CommandSpec, OutputStream};

/// The longest a caller may ask an operation to wait (ping, results).
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The most output one [`command_output`] call returns.
pub const MAX_OUTPUT_PAGE: usize = 8 * 1024 * 1024;

/// The most records one [`commands`] call lists.
pub const MAX_LIST: usize = 10_000;

/// The directory of the state directory where [`StagedFile`]s live.
pub const STAGING_DIR: &str = "api-files";

/// A staged file older than this is a leftover of a crash and is swept away.
const STAGED_FILE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Every presence, in the order of the state machine.
pub const PRESENCES: [Presence; 6] = [
    Presence::Unknown,
    Presence::Booting,
    Presence::Alive,
    Presence::Suspect,
    Presence::Lost,
    Presence::Gone,
];

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("bad argument: {0}")]
    BadArgument(String),
    #[error("command {cmd_id} has not finished yet (it is {state}); ask again later")]
    NotFinished { cmd_id: String, state: CommandState },
    #[error("the file sent to the host could not be read to its end: {0}")]
    Body(String),
    #[error("the host cannot stage a file in {}", path.display())]
    Staging {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ApiError {
    /// The stable code of this failure.
    pub fn fault_code(&self) -> FaultCode {
        match self {
            ApiError::BadArgument(_) => FaultCode::BadArgument,
            ApiError::NotFinished { .. } => FaultCode::NotFinished,
            ApiError::Body(_) => FaultCode::BadArgument,
            ApiError::Staging { .. } => FaultCode::Internal,
            ApiError::Engine(e) => match e {
                EngineError::UnknownVm(_) => FaultCode::UnknownVm,
                EngineError::VmExists(_) | EngineError::GuestIdTaken { .. } => FaultCode::VmExists,
                EngineError::UnknownCommand(_) => FaultCode::UnknownCommand,
                EngineError::UnknownTransfer(_) => FaultCode::UnknownTransfer,
                EngineError::BadArgument(_) => FaultCode::BadArgument,
                EngineError::GuestUnreachable { .. } => FaultCode::GuestUnreachable,
                EngineError::Timeout { .. } => FaultCode::Timeout,
                EngineError::Transfer { .. } => FaultCode::TransferFailed,
                EngineError::Store(_) | EngineError::Internal(_) => FaultCode::Internal,
                EngineError::Hypervisor(h) => match h {
                    HypervisorError::NotSupported { .. } | HypervisorError::WrongBackend { .. } => {
                        FaultCode::NotSupported
                    }
                    HypervisorError::InvalidState { .. } => FaultCode::InvalidState,
                    HypervisorError::NoSuchSnapshot { .. } => FaultCode::UnknownSnapshot,
                    HypervisorError::SnapshotExists { .. } => FaultCode::SnapshotExists,
                    HypervisorError::InvalidSpec(_) => FaultCode::BadArgument,
                    HypervisorError::Timeout { .. } => FaultCode::Timeout,
                    HypervisorError::Failed { .. } | HypervisorError::Io { .. } => {
                        FaultCode::HypervisorFailure
                    }
                },
            },
        }
    }

    /// The message for a person: the error and its causes, on one line.
    pub fn message(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadArgument(message.into())
}

/// A wait given in seconds, checked: finite, not negative, at most [`MAX_WAIT`].
pub fn wait_secs(what: &str, secs: f64) -> Result<Duration, ApiError> {
    if !secs.is_finite() || secs < 0.0 || secs > MAX_WAIT.as_secs_f64() {
        return Err(bad(format!(
            "{what} must be between 0 and {} seconds, not {secs}",
            MAX_WAIT.as_secs()
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn absolute(what: &str, path: &str) -> Result<PathBuf, ApiError> {
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(bad(format!("{what} {path:?} is not an absolute path")))
    }
}

/// The version of this host agent.
pub fn version() -> &'static str {
    crate::VERSION
}

/// Creates a VM booting from `hdd_image_path` (empty: no disk).
pub async fn create_vm(
    engine: &Engine,
    name: &str,
    hdd_image_path: &str,
) -> Result<VmView, ApiError> {
    let mut spec = VmSpec::new(name);
    if !hdd_image_path.is_empty() {
        spec.image = Some(absolute("the disk image", hdd_image_path)?);
    }
    Ok(engine.create_vm(spec).await?)
}

/// Removes a VM and its files; its command history stays.
pub async fn remove_vm(engine: &Engine, vm: &str) -> Result<(), ApiError> {
    Ok(engine.remove_vm(vm).await?)
}

/// A lifecycle operation; answers the VM's state after it.
pub async fn lifecycle(engine: &Engine, vm: &str, op: LifecycleOp) -> Result<VmState, ApiError> {
    Ok(engine.lifecycle(vm, op).await?)
}

/// One VM: state, guest id, presence.
pub async fn vm(engine: &Engine, vm: &str) -> Result<VmView, ApiError> {
    Ok(engine.vm(vm).await?)
}

/// Every VM, unmanaged guests included, by name.
pub async fn vms(engine: &Engine) -> Result<Vec<VmView>, ApiError> {
    Ok(engine.vms().await?)
}

/// Whether a VM counts as running: its hypervisor says `Running`, or it is an
/// unmanaged guest (no hypervisor state) whose agent is alive.
pub fn is_running(vm: &VmView) -> bool {
    vm.state == VmState::Running
        || (vm.backend == crate::hypervisor::unmanaged::NAME && vm.presence == Presence::Alive)
}

/// The VMs that are running (see [`is_running`]).
pub async fn running_vms(engine: &Engine) -> Result<Vec<VmView>, ApiError> {
    Ok(vms(engine).await?.into_iter().filter(is_running).collect())
}

/// A VM's snapshots.
pub async fn snapshots(engine: &Engine, vm: &str) -> Result<Vec<SnapshotInfo>, ApiError> {
    Ok(engine.snapshots(vm).await?)
}

/// A VM's performance figures.
pub async fn performance(engine: &Engine, vm: &str) -> Result<PerformanceData, ApiError> {
    Ok(engine.performance(vm).await?)
}

/// Pings a VM's guest agent: the round-trip time, or `None` when no answer came
/// within `timeout`. An unknown VM is still an error.
pub async fn ping(
    engine: &Engine,
    vm: &str,
    timeout: Duration,
) -> Result<Option<Duration>, ApiError> {
    if timeout.is_zero() {
        return Err(bad("the ping timeout must be more than 0 seconds"));
    }
    match engine.ping(vm, timeout).await {
        Ok(rtt) => Ok(Some(rtt)),
        Err(EngineError::GuestUnreachable { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Runs a command on one VM's guest; answers its id at once.
pub async fn run_command(engine: &Engine, vm: &str, spec: CommandSpec) -> Result<String, ApiError> {
    check_spec(&spec)?;
    Ok(engine.run_command(vm, spec).await?)
}

/// Runs a command on every VM whose name or guest id matches `glob`.
pub async fn run_multicast(
    engine: &Engine,
    glob: &str,
    spec: CommandSpec,
) -> Result<FanoutView, ApiError> {
    if glob.is_empty() {
        return Err(bad("the VM glob is empty"));
    }
    check_spec(&spec)?;
    Ok(engine.run_multicast(glob, spec).await?)
}

fn check_spec(spec: &CommandSpec) -> Result<(), ApiError> {
    if spec.cmd.is_empty() {
        return Err(bad("the command is empty"));
    }
    if let Some(secs) = spec.timeout_secs {
        if !secs.is_finite() || secs <= 0.0 {
            return Err(bad(format!(
                "a command's timeout must be more than 0 seconds, not {secs}"
            )));
        }
    }
    if let Some(key) = spec
        .env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(bad(format!(
            "{key:?} cannot be the name of an environment variable"
        )));
    }
    Ok(())
}

/// The newest commands that match `query`, newest first; `query.limit` must be
/// between 1 and [`MAX_LIST`].
pub fn commands(engine: &Engine, query: &CommandQuery) -> Result<Vec<CommandRecord>, ApiError> {
    match query.limit {
        Some(limit) if (1..=MAX_LIST).contains(&limit) => {}
        other => {
            return Err(bad(format!(
                "limit must be between 1 and {MAX_LIST}, not {}",
                other.map_or("absent".to_owned(), |n| n.to_string())
            )))
        }
    }
    Ok(engine.store().commands(query).map_err(EngineError::from)?)
}

/// The newest `limit` commands in a final state, newest first.
pub fn finished_commands(engine: &Engine, limit: usize) -> Result<Vec<CommandRecord>, ApiError> {
    let query = CommandQuery {
        finished_only: true,
        limit: Some(limit),
        ..CommandQuery::default()
    };
    Ok(engine.store().commands(&query).map_err(EngineError::from)?)
}

/// A finished command: its record and its result in the original's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandResults {
    pub record: CommandRecord,
    /// The guest's result; for a command the host ended by itself (it never reached
    /// its guest, or the guest was lost), one made from the record with
    /// `finished: false`, `exitCodeOrSignal: -1` and the reason in `error`.
    pub result: CommandResult,
}

/// The result of a finished command, waiting up to `wait` for it to finish.
/// Reading it does not consume it. A command still running after `wait` is
/// [`ApiError::NotFinished`].
pub async fn command_results(
    engine: &Engine,
    cmd_id: &str,
    wait: Duration,
) -> Result<CommandResults, ApiError> {
    let mut record = engine.command(cmd_id)?;
    if !record.state.is_final() && !wait.is_zero() {
        match engine.wait_command(cmd_id, wait).await {
            Ok(finished) => record = finished,
            Err(EngineError::Timeout { .. }) => record = engine.command(cmd_id)?,
            Err(e) => return Err(e.into()),
        }
    }
    if !record.state.is_final() {
        return Err(ApiError::NotFinished {
            cmd_id: cmd_id.to_owned(),
            state: record.state,
        });
    }
    let result = record
        .result
        .clone()
        .unwrap_or_else(|| result_from_record(&record));
    Ok(CommandResults { record, result })
}

/// The result of a command that ended without one from its guest.
fn result_from_record(record: &CommandRecord) -> CommandResult {
    let state = match record.state {
        CommandState::TimedOut => CommandOutcome::TimedOut,
        CommandState::Cancelled => CommandOutcome::Cancelled,
        CommandState::Failed => CommandOutcome::FailedToStart,
        _ => CommandOutcome::Lost,
    };
    let error = record
        .error
        .clone()
        .unwrap_or_else(|| format!("the command ended {} without a result", record.state));
    CommandResult {
        cmd_id: record.cmd_id.clone(),
        out: String::new(),
        err: String::new(),
        finished: false,
        exit_code_or_signal: -1,
        resources: Default::default(),
        state,
        error: Some(error),
        started_at: record.started_at.map(|t| t.to_rfc3339()),
        ended_at: record.finished_at.map(|t| t.to_rfc3339()),
        wall_secs: 0.0,
        out_bytes: record.out_bytes,
        err_bytes: record.err_bytes,
        out_truncated: false,
        err_truncated: false,
        out_file: None,
        err_file: None,
    }
}

/// A command's record as stored (state, timestamps, result once finished).
pub fn command_record(engine: &Engine, cmd_id: &str) -> Result<CommandRecord, ApiError> {
    Ok(engine.command(cmd_id)?)
}

/// A command's record and, while it runs, its guest's live report.
pub async fn command_details(engine: &Engine, cmd_id: &str) -> Result<CommandDetails, ApiError> {
    Ok(engine.command_details(cmd_id).await?)
}

/// Cancels a command (a command already over stays as it ended).
pub async fn cancel_command(engine: &Engine, cmd_id: &str) -> Result<(), ApiError> {
    Ok(engine.cancel_command(cmd_id).await?)
}

/// One read of a command's output stream.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputPage {
    /// The bytes from `offset`, up to the first byte not received yet.
    pub data: Vec<u8>,
    pub offset: u64,
    /// Where the next read starts: `offset + data.len()`.
    pub next_offset: u64,
    /// The command was over before this read: once a read with `finished` brings
    /// no data, the stream is complete.
    pub finished: bool,
    pub state: CommandState,
    /// Bytes of this stream the host holds so far.
    pub total_bytes: u64,
}

/// Up to `max_bytes` (at most [`MAX_OUTPUT_PAGE`]) of a command's `stream` from
/// byte `offset`.
pub fn command_output(
    engine: &Engine,
    cmd_id: &str,
    stream: OutputStream,
    offset: u64,
    max_bytes: usize,
) -> Result<OutputPage, ApiError> {
    if max_bytes == 0 {
        return Err(bad("maxBytes must be more than 0"));
    }
    // The state is read first: if the command was over then, every byte it wrote
    // is stored before the read below.
    let record = engine.command(cmd_id)?;
    let data = engine
        .store()
        .read_output(cmd_id, stream, offset, max_bytes.min(MAX_OUTPUT_PAGE))
        .map_err(EngineError::from)?;
    let next_offset = offset.saturating_add(data.len() as u64);
    Ok(OutputPage {
        data,
        offset,
        next_offset,
        finished: record.state.is_final(),
        state: record.state,
        total_bytes: match stream {
            OutputStream::Out => record.out_bytes,
            OutputStream::Err => record.err_bytes,
        },
    })
}

/// The two ends of a copy, with the original's default: the same path on the
/// other side when the second path is absent or empty.
fn copy_paths(
    direction: TransferDirection,
    given: &str,
    other: Option<&str>,
) -> Result<(PathBuf, String), ApiError> {
    let other = other.filter(|p| !p.is_empty()).unwrap_or(given);
    let (local, remote) = match direction {
        TransferDirection::ToGuest => (given, other),
        TransferDirection::FromGuest => (other, given),
    };
    let local = absolute("the host path", local)?;
    if !remote.starts_with('/') {
        return Err(bad(format!(
            "the guest path {remote:?} is not an absolute path"
        )));
    }
    Ok((local, remote.to_owned()))
}

/// Starts copying a file between the host and a VM's guest; answers the transfer
/// id at once. `path` is the source (a host path for [`TransferDirection::ToGuest`],
/// a guest path otherwise); `target` defaults to the same path on the other side.
pub async fn start_copy(
    engine: &Engine,
    vm: &str,
    direction: TransferDirection,
    path: &str,
    target: Option<&str>,
) -> Result<String, ApiError> {
    let (local, remote) = copy_paths(direction, path, target)?;
    Ok(engine.start_transfer(vm, direction, local, remote).await?)
}

/// Copies a file as [`start_copy`] and returns once the receiver verified its
/// size and SHA-256.
pub async fn copy(
    engine: &Engine,
    vm: &str,
    direction: TransferDirection,
    path: &str,
    target: Option<&str>,
) -> Result<TransferRecord, ApiError> {
    let transfer_id = start_copy(engine, vm, direction, path, target).await?;
    Ok(engine.wait_transfer(&transfer_id).await?)
}

/// A transfer and its progress.
pub fn transfer(engine: &Engine, transfer_id: &str) -> Result<TransferRecord, ApiError> {
    Ok(engine.transfer(transfer_id)?)
}

/// The transfers of `vm` (of every VM if `None`), only the unfinished ones if
/// `unfinished_only`, oldest first.
pub fn transfers(
    engine: &Engine,
    vm: Option<&str>,
    unfinished_only: bool,
) -> Result<Vec<TransferRecord>, ApiError> {
    Ok(engine
        .store()
        .transfers(vm, unfinished_only)
        .map_err(EngineError::from)?)
}

/// The host agent as a whole: who it is, its broker connection, and how many VMs,
/// guests, commands and transfers it has in each state. Host information, the
/// health check and the metrics are all read from one of these.
#[derive(Clone, Debug, PartialEq)]
pub struct HostStatus {
    pub version: &'static str,
    pub protocol: u32,
    pub engine: EngineStatus,
    /// Every VM, by name.
    pub vms: Vec<VmView>,
    /// Every command state, with the number of stored commands in it.
    pub commands: Vec<(CommandState, u64)>,
    /// The stored transfers by direction and state, with the bytes they moved.
    pub transfers: Vec<TransferTotal>,
}

impl HostStatus {
    /// Every VM state, with the number of VMs in it.
    pub fn vms_by_state(&self) -> Vec<(VmState, u64)> {
        VmState::ALL
            .into_iter()
            .map(|s| (s, self.vms.iter().filter(|vm| vm.state == s).count() as u64))
            .collect()
    }

    /// Every presence, with the number of guests in it.
    pub fn guests_by_presence(&self) -> Vec<(Presence, u64)> {
        PRESENCES
            .into_iter()
            .map(|p| {
                let n = self.vms.iter().filter(|vm| vm.presence == p).count();
                (p, n as u64)
            })
            .collect()
    }

    /// Every transfer state, with the number of stored transfers in it.
    pub fn transfers_by_state(&self) -> Vec<(TransferState, u64)> {
        TransferState::ALL
            .into_iter()
            .map(|s| {
                let n = self.transfers.iter().filter(|t| t.state == s);
                (s, n.map(|t| t.count).sum())
            })
            .collect()
    }

    /// The bytes the stored transfers of one direction moved.
    pub fn transfer_bytes(&self, direction: TransferDirection) -> u64 {
        self.transfers
            .iter()
            .filter(|t| t.direction == direction)
            .map(|t| t.bytes)
            .sum()
    }
}

/// Gathers the [`HostStatus`].
pub async fn host_status(engine: &Engine) -> Result<HostStatus, ApiError> {
    let status = engine.status().await?;
    let vms = engine.vms().await?;
    let store = engine.store();
    let counted = store.command_counts().map_err(EngineError::from)?;
    let commands = CommandState::ALL
        .into_iter()
        .map(|s| {
            let n = counted.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
            (s, n)
        })
        .collect();
    let transfers = store.transfer_totals().map_err(EngineError::from)?;
    Ok(HostStatus {
        version: crate::VERSION,
        protocol: vmc_protocol::PROTOCOL_VERSION,
        engine: status,
        vms,
        commands,
        transfers,
    })
}

/// A file the host holds between an API caller and a guest, in the state
/// directory's [`STAGING_DIR`]; removed when dropped, whatever happened.
#[derive(Debug)]
pub struct StagedFile {
    path: PathBuf,
}

impl StagedFile {
    /// A fresh name in the staging directory (created if needed); the file itself is
    /// made by whoever writes it. Leftovers older than a day (a crash's) are swept.
    pub fn new(engine: &Engine, purpose: &str) -> Result<StagedFile, ApiError> {
        let state_dir = engine.store().path().parent().unwrap_or(Path::new("."));
        let dir = std::path::absolute(state_dir.join(STAGING_DIR)).map_err(|source| {
            ApiError::Staging {
                path: state_dir.join(STAGING_DIR),
                source,
            }
        })?;
        std::fs::create_dir_all(&dir).map_err(|source| ApiError::Staging {
            path: dir.clone(),
            source,
        })?;
        sweep(&dir);
        let name = format!("{purpose}-{}", uuid::Uuid::new_v4().simple());
        Ok(StagedFile {
            path: dir.join(name),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", self.path.display()),
        }
    }
}

/// Removes staged files older than [`STAGED_FILE_MAX_AGE`].
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STAGED_FILE_MAX_AGE);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Refuses early a copy to or from a guest whose agent is not there, rather than
/// after a whole file went through the host.
async fn reachable(engine: &Engine, vm: &str) -> Result<(), ApiError> {
    let view = engine.vm(vm).await?;
    match view.presence {
        Presence::Alive | Presence::Suspect => Ok(()),
        other => Err(EngineError::GuestUnreachable {
            vm: vm.to_owned(),
            reason: format!("its agent is {}", other.as_str()),
        }
        .into()),
    }
}

/// Copies what `body` yields to `remote` on a VM's guest, through a staged file,
/// and returns once the guest verified it. Checks the VM, its guest and the path
/// before reading the body; the guest's SHA-256 must be that of the bytes received.
pub async fn upload<S, E>(
    engine: &Engine,
    vm: &str,
    remote: &str,
    mut body: S,
) -> Result<TransferRecord, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    if !remote.starts_with('/') {
        return Err(bad(format!(
            "the guest path {remote:?} is not an absolute path"
        )));
    }
    reachable(engine, vm).await?;
    let staged = StagedFile::new(engine, "upload")?;
    let staging = |source| ApiError::Staging {
        path: staged.path().to_owned(),
        source,
    };
    let mut file = tokio::fs::File::create(staged.path())
        .await
        .map_err(staging)?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::Body(e.to_string()))?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(staging)?;
    }
    file.flush().await.map_err(staging)?;
    drop(file);
    let received = hex(&hasher.finalize());
    let record = engine
        .copy_to_vm(vm, staged.path().to_owned(), remote.to_owned())
        .await?;
    if record.sha256.as_deref() != Some(received.as_str()) {
        return Err(EngineError::Internal(format!(
            "transfer {} verified SHA-256 {:?}, but the host received {received}",
            record.transfer_id, record.sha256
        ))
        .into());
    }
    Ok(record)
}

/// A guest's file, copied to the host and verified, ready to be read.
#[derive(Debug)]
pub struct Download {
    pub file: StagedFile,
    pub transfer: TransferRecord,
}

/// Copies `remote` from a VM's guest to a staged file and returns once verified;
/// the file goes away with the [`Download`].
pub async fn download(engine: &Engine, vm: &str, remote: &str) -> Result<Download, ApiError> {
    if !remote.starts_with('/') {
        return Err(bad(format!(
            "the guest path {remote:?} is not an absolute path"
        )));
    }
    reachable(engine, vm).await?;
    let file = StagedFile::new(engine, "download")?;
    let transfer = engine
        .copy_from_vm(vm, remote.to_owned(), file.path().to_owned())
        .await?;
    Ok(Download { file, transfer })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_and_hypervisor_error_has_its_code() {
        let hv = |h| ApiError::Engine(EngineError::Hypervisor(h));
        let cases = [
            (
                ApiError::Engine(EngineError::UnknownVm("x".into())),
                FaultCode::UnknownVm,
            ),
            (
                ApiError::Engine(EngineError::VmExists("x".into())),
                FaultCode::VmExists,
            ),
            (
                ApiError::Engine(EngineError::UnknownCommand("c".into())),
                FaultCode::UnknownCommand,
            ),
            (
                ApiError::Engine(EngineError::UnknownTransfer("t".into())),
                FaultCode::UnknownTransfer,
            ),
            (
                ApiError::Engine(EngineError::BadArgument("b".into())),
                FaultCode::BadArgument,
            ),
            (
                ApiError::Engine(EngineError::GuestUnreachable {
                    vm: "x".into(),
                    reason: "r".into(),
                }),
                FaultCode::GuestUnreachable,
            ),
            (
                ApiError::Engine(EngineError::Timeout {
                    what: "w".into(),
                    secs: 1.0,
                }),
                FaultCode::Timeout,
            ),
            (
                ApiError::Engine(EngineError::Transfer {
                    code: vmc_protocol::words::FileErrorCode::NotFound,
                    message: "m".into(),
                }),
                FaultCode::TransferFailed,
            ),
            (
                ApiError::Engine(EngineError::Internal("i".into())),
                FaultCode::Internal,
            ),
            (
                hv(HypervisorError::NotSupported {
                    backend: "unmanaged",
                    operation: "pause",
                }),
                FaultCode::NotSupported,
            ),
            (
                hv(HypervisorError::InvalidState {
                    vm: "x".into(),
                    operation: "pause",
                    state: VmState::PoweredOff,
                }),
                FaultCode::InvalidState,
            ),
            (
                hv(HypervisorError::NoSuchSnapshot {
                    vm: "x".into(),
                    snapshot: "s".into(),
                }),
                FaultCode::UnknownSnapshot,
            ),
            (
                hv(HypervisorError::SnapshotExists {
                    vm: "x".into(),
                    snapshot: "s".into(),
                }),
                FaultCode::SnapshotExists,
            ),
            (
                hv(HypervisorError::InvalidSpec("s".into())),
                FaultCode::BadArgument,
            ),
            (
                hv(HypervisorError::Failed {
                    vm: "x".into(),
                    operation: "start",
                    message: "m".into(),
                }),
                FaultCode::HypervisorFailure,
            ),
            (
                hv(HypervisorError::Timeout {
                    vm: "x".into(),
                    operation: "start",
                    secs: 3,
                }),
                FaultCode::Timeout,
            ),
            (
                hv(HypervisorError::Io {
                    vm: "x".into(),
                    operation: "start",
                    source: std::io::Error::other("disk on fire"),
                }),
                FaultCode::HypervisorFailure,
            ),
            (bad("b"), FaultCode::BadArgument),
            (
                ApiError::NotFinished {
                    cmd_id: "c".into(),
                    state: CommandState::Running,
                },
                FaultCode::NotFinished,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.fault_code(), code, "{error:?}");
        }
    }

    #[test]
    fn messages_carry_the_causes() {
        let error = ApiError::Engine(EngineError::Hypervisor(HypervisorError::NotSupported {
            backend: "unmanaged",
            operation: "pause",
        }));
        assert_eq!(
            error.message(),
            "the hypervisor failed: the unmanaged backend does not support pause"
        );
    }

    #[test]
    fn a_copy_goes_to_the_same_path_on_the_other_side_by_default() {
        let to = TransferDirection::ToGuest;
        let from = TransferDirection::FromGuest;
        assert_eq!(
            copy_paths(to, "/data/in.txt", None).unwrap(),
            (PathBuf::from("/data/in.txt"), "/data/in.txt".to_owned())
        );
        assert_eq!(
            copy_paths(to, "/data/in.txt", Some("")).unwrap(),
            (PathBuf::from("/data/in.txt"), "/data/in.txt".to_owned())
        );
        assert_eq!(
            copy_paths(to, "/data/in.txt", Some("/tmp/x")).unwrap(),
            (PathBuf::from("/data/in.txt"), "/tmp/x".to_owned())
        );
        assert_eq!(
            copy_paths(from, "/guest/out.txt", Some("/host/out.txt")).unwrap(),
            (PathBuf::from("/host/out.txt"), "/guest/out.txt".to_owned())
        );
        let err = copy_paths(from, "/guest/out.txt", Some("out.txt")).unwrap_err();
        assert_eq!(
            err.message(),
            "bad argument: the host path \"out.txt\" is not an absolute path"
        );
        let err = copy_paths(to, "/in.txt", Some("relative")).unwrap_err();
        assert_eq!(err.fault_code(), FaultCode::BadArgument);
    }

    #[test]
    fn waits_are_checked() {
        assert_eq!(wait_secs("t", 5.0).unwrap(), Duration::from_secs(5));
        assert_eq!(wait_secs("t", 0.0).unwrap(), Duration::ZERO);
        for wrong in [-1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert_eq!(
                wait_secs("t", wrong).unwrap_err().fault_code(),
                FaultCode::BadArgument,
                "{wrong}"
            );
        }
    }

    #[test]
    fn a_command_the_host_ended_gets_a_result_in_the_original_shape() {
        let mut record = CommandRecord::new(
            "cmd-1",
            Some("vm"),
            "vm",
            CommandSpec::new("true"),
            chrono::Utc::now(),
        );
        record.state = CommandState::Lost;
        record.error = Some("the guest went away".into());
        let result = result_from_record(&record);
        assert_eq!(result.cmd_id, "cmd-1");
        assert!(!result.finished);
        assert_eq!(result.exit_code_or_signal, -1);
        assert_eq!(result.state, CommandOutcome::Lost);
        assert_eq!(result.error.as_deref(), Some("the guest went away"));
    }
}
