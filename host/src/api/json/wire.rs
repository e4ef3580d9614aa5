//! The JSON API's wire types: plain serde structs, camelCase keys, and the
//! conversions from the engine's types (which are not `Serialize`).
//!
//! Answers ([`Vm`], [`Command`], [`CommandResult`], [`Transfer`], ...) are built
//! from engine views and store records at the boundary; requests ([`CreateVm`],
//! [`CommandRequest`], ...) refuse unknown keys, so a misspelt option is an error
//! rather than silently ignored. Conventions, the same everywhere: times are RFC
//! 3339 strings in UTC with milliseconds; absent values are absent keys (never
//! `null`); raw bytes are base64; names of states are those of the XML-RPC API.
//! `openapi.json` describes every type here; the tests check the two agree.

use crate::api::ops;
use crate::engine::command::CommandDetails;
use crate::engine::presence::Presence;
use crate::engine::{FanoutView, VmView};
use crate::hypervisor::{PerformanceData, SnapshotInfo};
use crate::store::{CommandRecord, CommandState, TransferDirection, TransferRecord};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vmc_protocol::stomp::session::LinkState;
use vmc_protocol::words::{CommandSpec, GuestInfo, ResourceUsage};

/// A time as the JSON API writes it.
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An RFC 3339 time written by a guest, normalised as [`time`]; as given if it is
/// not one.
fn guest_time(text: &str) -> String {
    DateTime::parse_from_rfc3339(text)
        .map_or_else(|_| text.to_owned(), |t| time(t.with_timezone(&Utc)))
}

/// Bytes as base64 (standard alphabet, padded).
pub fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------
// Answers.

/// A VM and its guest.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    pub name: String,
    pub id: String,
    pub backend: String,
    pub state: &'static str,
    pub presence: &'static str,
    pub presence_since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heard: Option<String>,
    /// Running, or an unmanaged guest whose agent is alive (as `listRunningVMs`).
    pub running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
}

impl From<&VmView> for Vm {
    fn from(vm: &VmView) -> Vm {
        Vm {
            name: vm.name.clone(),
            id: vm.id.clone(),
            backend: vm.backend.clone(),
            state: vm.state.as_str(),
            presence: vm.presence.as_str(),
            presence_since: time(vm.presence_since),
            last_heard: vm.last_heard.map(time),
            running: ops::is_running(vm),
            guest: vm.guest.as_ref().map(Guest::from),
        }
    }
}

/// What a guest agent said about itself in its HELLO.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Guest {
    pub id: String,
    pub ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub agent_version: String,
    pub protocol: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Unix seconds.
    pub boot_time: u64,
    pub capabilities: Vec<String>,
}

impl From<&GuestInfo> for Guest {
    fn from(guest: &GuestInfo) -> Guest {
        Guest {
            id: guest.id.as_str().to_owned(),
            ips: guest.ips.clone(),
            mac: guest.mac.clone(),
            hostname: guest.hostname.clone(),
            os: guest.os.clone(),
            kernel: guest.kernel.clone(),
            agent_version: guest.agent_version.clone(),
            protocol: guest.protocol,
            cpus: guest.cpus,
            memory_bytes: guest.memory_bytes,
            boot_time: guest.boot_time,
            capabilities: guest.capabilities.clone(),
        }
    }
}

/// Where a VM's guest agent stands.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestPresence {
    pub vm: String,
    pub id: String,
    pub presence: &'static str,
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heard: Option<String>,
    pub state: &'static str,
}

impl From<&VmView> for GuestPresence {
    fn from(vm: &VmView) -> GuestPresence {
        GuestPresence {
            vm: vm.name.clone(),
            id: vm.id.clone(),
            presence: vm.presence.as_str(),
            since: time(vm.presence_since),
            last_heard: vm.last_heard.map(time),
            state: vm.state.as_str(),
        }
    }
}

/// A VM's state after an action.
#[derive(Debug, Serialize)]
pub struct VmState {
    pub vm: String,
    pub state: &'static str,
}

/// One snapshot of a VM.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    pub vm_state_bytes: u64,
}

impl From<&SnapshotInfo> for Snapshot {
    fn from(snapshot: &SnapshotInfo) -> Snapshot {
        Snapshot {
            name: snapshot.name.clone(),
            description: snapshot.description.clone(),
            created_at: DateTime::from_timestamp(snapshot.created_at, 0).map(time),
            vm_state_bytes: snapshot.vm_state_bytes,
        }
    }
}

/// A VM's performance figures.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Performance {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_read_ops: u64,
    pub disk_write_ops: u64,
    pub uptime_secs: f64,
    pub extra: BTreeMap<String, f64>,
}

impl From<&PerformanceData> for Performance {
    fn from(data: &PerformanceData) -> Performance {
        Performance {
            cpu_secs: data.cpu_secs,
            rss_bytes: data.rss_bytes,
            disk_read_bytes: data.disk_read_bytes,
            disk_write_bytes: data.disk_write_bytes,
            disk_read_ops: data.disk_read_ops,
            disk_write_ops: data.disk_write_ops,
            uptime_secs: data.uptime_secs,
            extra: data.extra.iter().cloned().collect(),
        }
    }
}

/// The answer of a ping.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ping {
    pub vm: String,
    pub alive: bool,
    /// The round-trip time, when the guest answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// A command: what was asked, where it stands, and while it runs the guest's live
/// report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    pub cmd_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub guest_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout_id: Option<String>,
    pub state: &'static str,
    /// The command is over (its state is final).
    pub done: bool,
    pub cmd: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    pub out_bytes: u64,
    pub err_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How it ended, once it has (`exited`, `signalled`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code_or_signal: Option<i32>,
    /// Live usage while it runs, final usage once it has finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveStatus>,
}

/// The guest's report on a running command.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveStatus {
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub resources: ResourceUsage,
    pub out_bytes: u64,
    pub err_bytes: u64,
}

impl From<&CommandRecord> for Command {
    fn from(record: &CommandRecord) -> Command {
        let result = record.result.as_ref();
        Command {
            cmd_id: record.cmd_id.clone(),
            vm: record.vm.clone(),
            guest_id: record.guest_id.clone(),
            fanout_id: record.fanout_id.clone(),
            state: record.state.as_str(),
            done: record.state.is_final(),
            cmd: record.spec.cmd.clone(),
            args: record.spec.args.clone(),
            env: record.spec.env.clone(),
            path: record.spec.path.clone(),
            stdin: record.spec.file_for_stdin.clone(),
            timeout_secs: record.spec.timeout_secs,
            pid: record.pid,
            created_at: time(record.created_at),
            sent_at: record.sent_at.map(time),
            started_at: record.started_at.map(time),
            finished_at: record.finished_at.map(time),
            deadline: record.deadline.map(time),
            out_bytes: record.out_bytes,
            err_bytes: record.err_bytes,
            error: record.error.clone(),
            outcome: result.map(|r| r.state.as_str()),
            exit_code_or_signal: result.map(|r| r.exit_code_or_signal),
            resources: result.map(|r| r.resources.clone()),
            live: None,
        }
    }
}

impl From<&CommandDetails> for Command {
    fn from(details: &CommandDetails) -> Command {
        let mut command = Command::from(&details.record);
        if let Some(live) = &details.live {
            if command.resources.is_none() {
                command.resources = Some(live.usage.clone());
            }
            command.live = Some(LiveStatus {
                state: live.state.as_str(),
                pid: live.pid,
                resources: live.usage.clone(),
                out_bytes: live.out_bytes,
                err_bytes: live.err_bytes,
            });
        }
        command
    }
}

/// The result of a finished command: the original's keys in camelCase, and this
/// version's.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandResult {
    pub cmd_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub state: &'static str,
    pub outcome: &'static str,
    /// True when the command exited; false when a signal ended it or it never ran.
    pub finished: bool,
    pub exit_code_or_signal: i32,
    pub out: String,
    pub err: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub resources: ResourceUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    pub wall_secs: f64,
    pub out_bytes: u64,
    pub err_bytes: u64,
    pub out_truncated: bool,
    pub err_truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err_file: Option<String>,
}

impl From<&ops::CommandResults> for CommandResult {
    fn from(results: &ops::CommandResults) -> CommandResult {
        let (record, result) = (&results.record, &results.result);
        CommandResult {
            cmd_id: result.cmd_id.clone(),
            vm: record.vm.clone(),
            state: record.state.as_str(),
            outcome: result.state.as_str(),
            finished: result.finished,
            exit_code_or_signal: result.exit_code_or_signal,
            out: result.out.clone(),
            err: result.err.clone(),
            error: result.error.clone(),
            resources: result.resources.clone(),
            started_at: result.started_at.as_deref().map(guest_time),
            ended_at: result.ended_at.as_deref().map(guest_time),
            wall_secs: result.wall_secs,
            out_bytes: result.out_bytes,
            err_bytes: result.err_bytes,
            out_truncated: result.out_truncated,
            err_truncated: result.err_truncated,
            out_file: result.out_file.clone(),
            err_file: result.err_file.clone(),
        }
    }
}

/// A multicast command: one command per target.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fanout {
    pub fanout_id: String,
    pub commands: Vec<FanoutTarget>,
}

/// One target of a multicast command.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FanoutTarget {
    pub vm: String,
    pub cmd_id: String,
    pub state: &'static str,
    /// Why the command could not be sent to this target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&FanoutView> for Fanout {
    fn from(fanout: &FanoutView) -> Fanout {
        Fanout {
            fanout_id: fanout.fanout_id.clone(),
            commands: fanout
                .commands
                .iter()
                .map(|record| FanoutTarget {
                    vm: record.vm.clone().unwrap_or_else(|| record.guest_id.clone()),
                    cmd_id: record.cmd_id.clone(),
                    state: record.state.as_str(),
                    error: record.error.clone(),
                })
                .collect(),
        }
    }
}

/// One read of a command's output stream.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputPage {
    pub cmd_id: String,
    pub stream: &'static str,
    /// The bytes, base64.
    pub data: String,
    pub offset: u64,
    pub next_offset: u64,
    pub total_bytes: u64,
    /// The command was over before this read: once a read with `finished` brings no
    /// data, the stream is complete.
    pub finished: bool,
    pub state: &'static str,
}

impl OutputPage {
    pub fn new(cmd_id: &str, stream: &'static str, page: &ops::OutputPage) -> OutputPage {
        OutputPage {
            cmd_id: cmd_id.to_owned(),
            stream,
            data: base64(&page.data),
            offset: page.offset,
            next_offset: page.next_offset,
            total_bytes: page.total_bytes,
            finished: page.finished,
            state: page.state.as_str(),
        }
    }
}

/// A file transfer between the host and a guest.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Transfer {
    pub transfer_id: String,
    pub vm: String,
    pub guest_id: String,
    pub direction: &'static str,
    pub host_path: String,
    pub guest_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub bytes_done: u64,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl From<&TransferRecord> for Transfer {
    fn from(transfer: &TransferRecord) -> Transfer {
        Transfer {
            transfer_id: transfer.transfer_id.clone(),
            vm: transfer.vm.clone(),
            guest_id: transfer.guest_id.clone(),
            direction: transfer.direction.as_str(),
            host_path: transfer.local_path.to_string_lossy().into_owned(),
            guest_path: transfer.remote_path.clone(),
            size: transfer.size,
            sha256: transfer.sha256.clone(),
            bytes_done: transfer.bytes_done,
            state: transfer.state.as_str(),
            error: transfer.error.clone(),
            created_at: time(transfer.created_at),
            finished_at: transfer.finished_at.map(time),
        }
    }
}

/// The broker connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Broker {
    /// `up`, `down` (reconnecting) or `closed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub connections: u64,
    pub reconnects: u64,
    pub disconnects: u64,
    pub connect_failures: u64,
}

/// The name of a link state.
pub fn link_name(link: LinkState) -> &'static str {
    match link {
        LinkState::Up { .. } => "up",
        LinkState::Down => "down",
        LinkState::Closed => "closed",
    }
}

/// Bytes moved by the transfers the host remembers, by direction.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferBytes {
    pub to_guest: u64,
    pub from_guest: u64,
}

/// The host agent: who it is, its broker connection, and how many of everything
/// it has in each state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    pub version: &'static str,
    pub protocol: u32,
    pub host_id: String,
    pub backend: &'static str,
    pub broker: Broker,
    pub vms: u64,
    pub vms_by_state: BTreeMap<&'static str, u64>,
    pub guests_by_presence: BTreeMap<&'static str, u64>,
    pub commands_by_state: BTreeMap<&'static str, u64>,
    pub transfers_by_state: BTreeMap<&'static str, u64>,
    pub transfer_bytes: TransferBytes,
}

impl From<&ops::HostStatus> for HostInfo {
    fn from(status: &ops::HostStatus) -> HostInfo {
        let broker = &status.engine.broker;
        HostInfo {
            version: status.version,
            protocol: status.protocol,
            host_id: status.engine.host_id.clone(),
            backend: status.engine.backend,
            broker: Broker {
                state: link_name(broker.link),
                address: broker.address.clone(),
                connections: broker.connects,
                reconnects: broker.reconnects(),
                disconnects: broker.disconnects,
                connect_failures: broker.connect_failures,
            },
            vms: status.vms.len() as u64,
            vms_by_state: named(status.vms_by_state(), |s| s.as_str()),
            guests_by_presence: named(status.guests_by_presence(), Presence::as_str),
            commands_by_state: named(status.commands.clone(), CommandState::as_str),
            transfers_by_state: named(status.transfers_by_state(), |s| s.as_str()),
            transfer_bytes: TransferBytes {
                to_guest: status.transfer_bytes(TransferDirection::ToGuest),
                from_guest: status.transfer_bytes(TransferDirection::FromGuest),
            },
        }
    }
}

fn named<T>(counts: Vec<(T, u64)>, name: fn(T) -> &'static str) -> BTreeMap<&'static str, u64> {
    counts.into_iter().map(|(t, n)| (name(t), n)).collect()
}

/// `/healthz`: whether the host agent can do its work, and the host's figures.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok` when the broker connection is up, `degraded` otherwise.
    pub status: &'static str,
    #[serde(flatten)]
    pub host: HostInfo,
}

/// The body of every error answer.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: i32,
    pub name: &'static str,
    pub message: String,
}

// ---------------------------------------------------------------------------
// Requests.

/// `POST /api/v1/vms`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    /// The disk image to boot from, an absolute path on the host; none when absent.
    #[serde(default)]
    pub image: String,
}

/// A command to run: on one VM (`POST /api/v1/vms/{vm}/commands`), or on every VM
/// a glob matches (`POST /api/v1/commands`, with `glob`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandRequest {
    #[serde(default)]
    pub glob: Option<String>,
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory on the guest.
    #[serde(default)]
    pub path: Option<String>,
    /// A file on the guest to feed to stdin.
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    #[serde(default)]
    pub output_limit: Option<u64>,
}

impl CommandRequest {
    pub fn spec(&self) -> CommandSpec {
        let mut spec = CommandSpec::new(self.cmd.clone());
        spec.args = self.args.clone();
        spec.env = self.env.clone();
        spec.path = self.path.clone().filter(|p| !p.is_empty());
        spec.file_for_stdin = self.stdin.clone().filter(|p| !p.is_empty());
        spec.timeout_secs = self.timeout_secs;
        spec.output_limit = self.output_limit;
        spec
    }
}

/// `POST /api/v1/vms/{vm}/snapshots`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TakeSnapshot {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `POST /api/v1/vms/{vm}/ping`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PingRequest {
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

/// `POST /api/v1/transfers`: a copy between a file on the host and one on a guest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartTransfer {
    pub vm: String,
    /// `to-guest` or `from-guest`.
    pub direction: String,
    /// The host's file: the source of a copy to the guest, the target of one from
    /// it (then it defaults to `guestPath`).
    #[serde(default)]
    pub host_path: Option<String>,
    /// The guest's file: the source of a copy from the guest, the target of one to
    /// it (then it defaults to `hostPath`).
    #[serde(default)]
    pub guest_path: Option<String>,
    /// Answer once the copy is verified, rather than at once.
    #[serde(default)]
    pub wait: bool,
}

/// `GET /api/v1/commands/{cmd}/result`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResultQuery {
    /// Seconds to wait for the command to finish.
    #[serde(default)]
    pub wait: Option<f64>,
}

/// `GET /api/v1/commands/{cmd}/output`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputQuery {
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

/// `GET /api/v1/commands`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandsQuery {
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub fanout: Option<String>,
    /// A state name, or several separated by commas.
    #[serde(default)]
    pub state: Option<String>,
    /// Only commands in a final state.
    #[serde(default)]
    pub finished: Option<bool>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `GET /api/v1/transfers`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransfersQuery {
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub unfinished: Option<bool>,
}

/// `PUT` and `GET /api/v1/vms/{vm}/files`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileQuery {
    /// The file's absolute path on the guest.
    pub path: String,
}

/// `GET /api/v1/events`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events about these VMs (names separated by commas).
    #[serde(default)]
    pub vm: Option<String>,
    /// Only these commands (ids separated by commas): their output from the start
    /// and their completion, then the stream ends.
    #[serde(default)]
    pub cmd: Option<String>,
}
