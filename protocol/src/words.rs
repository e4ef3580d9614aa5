//! The protocol words: what a STOMP SEND/MESSAGE frame of vmcontroller says.
//!
//! As in the original VMController, the first token of the body is the word
//! (`HELLO`, `CMD_RUN`, ...). A body is the word alone, or the word, one separator
//! byte and a payload: JSON for most words, raw bytes for `CMD_OUTPUT` and
//! `FILE_CHUNK`. Word-specific headers (`cmd-id`, `transfer-id`, `offset`, ...)
//! stay in headers where the original had them, so that a router can dispatch
//! without parsing the body. [`encode`] turns a [`Message`] into a SEND frame with
//! the common headers (`vmc-protocol`, `vmc-from`, `content-type`, `persistent`,
//! `reply-to`) but without `destination`, which the caller picks with
//! [`crate::destinations`]; [`decode`] turns any received frame into an
//! [`Envelope`] or a [`WordError`] and never panics. Unknown JSON keys are
//! ignored and missing new keys take defaults, so that agents of different
//! versions interoperate; a word nobody knows is [`WordError::Unknown`], answered
//! with `AINT` ([`WordError::aint`]). Header escaping and the frame size limit on
//! the socket belong to the STOMP codec; this module only keeps encoded messages
//! under the limit it is given. `docs/PROTOCOL.md` is the normative description.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::glob::glob_match;
use crate::identity::{GuestId, PeerId};
use crate::stomp::frame::{Command, Frame};
use crate::PROTOCOL_VERSION;

pub use crate::stomp::codec::DEFAULT_MAX_FRAME_SIZE;

/// Bytes [`encode`] keeps free below the frame size limit for the headers added after
/// it (`destination`, `content-length`, `receipt`) and those the broker adds on
/// delivery (`message-id`, `subscription`, `ack`, ...).
pub const FRAME_HEADROOM: usize = 1024;

/// The largest `CMD_OUTPUT` chunk, in bytes.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

/// The `chunk_size` of a file transfer when the request does not give one.
pub const DEFAULT_FILE_CHUNK_SIZE: u32 = 256 * 1024;

/// The largest `chunk_size` of a file transfer (and so of a `FILE_CHUNK`), in bytes.
pub const MAX_FILE_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// The `window` of a file transfer when the request does not give one.
pub const DEFAULT_FILE_WINDOW: u32 = 8;

/// Bytes of each of stdout and stderr kept in `CMD_RESULT` when `output_limit` is absent.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 1024 * 1024;

/// The names of the headers this protocol uses.
pub mod header {
    /// Protocol version of the sender; absent means 0, the original Python agents.
    pub const PROTOCOL: &str = "vmc-protocol";
    /// The sender: a guest id, or `host:<host-id>`.
    pub const FROM: &str = "vmc-from";
    /// Reserved for a message signature; not set and ignored by this version.
    pub const SIGNATURE: &str = "vmc-signature";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const PERSISTENT: &str = "persistent";
    pub const REPLY_TO: &str = "reply-to";
    pub const IP: &str = "ip";
    pub const REASON: &str = "reason";
    pub const PING_ID: &str = "ping-id";
    pub const CMD_ID: &str = "cmd-id";
    pub const TO: &str = "to";
    pub const STREAM: &str = "stream";
    pub const OFFSET: &str = "offset";
    pub const GRACE_SECS: &str = "grace-secs";
    pub const TRANSFER_ID: &str = "transfer-id";
    pub const SIZE: &str = "size";
    pub const SHA256: &str = "sha256";
    pub const WORD: &str = "word";
    /// Version-0 `CMD_RUN` carried its command in headers: these five.
    pub const CMD: &str = "cmd";
    pub const ARGS: &str = "args";
    pub const ENV: &str = "env";
    pub const PATH: &str = "path";
    pub const FILE_FOR_STDIN: &str = "fileForStdin";
}

/// Why a frame is not a protocol message, or a message cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum WordError {
    #[error("a {command} frame does not carry a protocol message")]
    NotAMessage { command: Command },
    #[error("the message body is empty, so it carries no word")]
    Empty,
    #[error("{word:?} is not a word of this protocol")]
    Unknown { word: String },
    #[error("{word} lacks its {header:?} header")]
    MissingHeader {
        word: &'static str,
        header: &'static str,
    },
    #[error("{word} has a bad {header:?} header {value:?}: {reason}")]
    BadHeader {
        word: &'static str,
        header: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("the payload of {word} is not valid")]
    BadPayload {
        word: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{word} would take {size} bytes, more than its limit of {limit}")]
    TooLarge {
        word: &'static str,
        size: usize,
        limit: usize,
    },
}

impl WordError {
    /// The `AINT` a receiver sends back for this error, or `None` when it must stay
    /// silent: for frames that are not messages, encoding errors, and a bad `AINT`
    /// (answering it could start an endless exchange of `AINT`s).
    pub fn aint(&self) -> Option<Message> {
        let word = match self {
            WordError::NotAMessage { .. } | WordError::TooLarge { .. } => return None,
            WordError::Empty => "",
            WordError::Unknown { word } => word.as_str(),
            WordError::MissingHeader { word, .. }
            | WordError::BadHeader { word, .. }
            | WordError::BadPayload { word, .. } => word,
        };
        if word == Word::Aint.as_str() {
            return None;
        }
        let mut reason = self.to_string();
        if let Some(source) = std::error::Error::source(self) {
            reason = format!("{reason}: {source}");
        }
        Some(Message::Aint {
            word: word.to_owned(),
            reason,
        })
    }
}

/// What follows the word in a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// Nothing: the body is the word alone.
    Bare,
    /// A JSON object.
    Json,
    /// Raw bytes.
    Binary,
}

impl PayloadKind {
    /// The `content-type` header of a message with this kind of payload.
    pub fn content_type(self) -> &'static str {
        match self {
            PayloadKind::Bare => "text/plain",
            PayloadKind::Json => "application/json",
            PayloadKind::Binary => "application/octet-stream",
        }
    }
}

/// Every word of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Word {
    Hello,
    StillAlive,
    Bye,
    SayHello,
    Ping,
    Pong,
    CmdRun,
    CmdStarted,
    CmdOutput,
    CmdResult,
    CmdCancel,
    CmdQuery,
    CmdStatus,
    CmdAck,
    FilePut,
    FileGet,
    FileReady,
    FileChunk,
    FileAck,
    FileEnd,
    FileDone,
    FileError,
    FileAbort,
    Aint,
}

impl Word {
    pub const ALL: [Word; 24] = [
        Word::Hello,
        Word::StillAlive,
        Word::Bye,
        Word::SayHello,
        Word::Ping,
        Word::Pong,
        Word::CmdRun,
        Word::CmdStarted,
        Word::CmdOutput,
        Word::CmdResult,
        Word::CmdCancel,
        Word::CmdQuery,
        Word::CmdStatus,
        Word::CmdAck,
        Word::FilePut,
        Word::FileGet,
        Word::FileReady,
        Word::FileChunk,
        Word::FileAck,
        Word::FileEnd,
        Word::FileDone,
        Word::FileError,
        Word::FileAbort,
        Word::Aint,
    ];

    /// The word as written at the start of a body.
    pub fn as_str(self) -> &'static str {
        match self {
            Word::Hello => "HELLO",
            Word::StillAlive => "STILL_ALIVE",
            Word::Bye => "BYE",
            Word::SayHello => "SAY_HELLO",
            Word::Ping => "PING",
            Word::Pong => "PONG",
            Word::CmdRun => "CMD_RUN",
            Word::CmdStarted => "CMD_STARTED",
            Word::CmdOutput => "CMD_OUTPUT",
            Word::CmdResult => "CMD_RESULT",
            Word::CmdCancel => "CMD_CANCEL",
            Word::CmdQuery => "CMD_QUERY",
            Word::CmdStatus => "CMD_STATUS",
            Word::CmdAck => "CMD_ACK",
            Word::FilePut => "FILE_PUT",
            Word::FileGet => "FILE_GET",
            Word::FileReady => "FILE_READY",
            Word::FileChunk => "FILE_CHUNK",
            Word::FileAck => "FILE_ACK",
            Word::FileEnd => "FILE_END",
            Word::FileDone => "FILE_DONE",
            Word::FileError => "FILE_ERROR",
            Word::FileAbort => "FILE_ABORT",
            Word::Aint => "AINT",
        }
    }

    /// The word written at the start of a body, if it is one; `CMD_RESULTS`, the
    /// original's spelling in its body, is read as `CMD_RESULT`.
    pub fn parse(word: &str) -> Option<Word> {
        if word == "CMD_RESULTS" {
            return Some(Word::CmdResult);
        }
        Word::ALL.into_iter().find(|w| w.as_str() == word)
    }

    /// What follows the word in the body.
    pub fn payload_kind(self) -> PayloadKind {
        match self {
            Word::Hello
            | Word::StillAlive
            | Word::CmdRun
            | Word::CmdStarted
            | Word::CmdResult
            | Word::CmdStatus
            | Word::FilePut
            | Word::FileGet
            | Word::FileReady
            | Word::FileDone
            | Word::FileError => PayloadKind::Json,
            Word::CmdOutput | Word::FileChunk => PayloadKind::Binary,
            Word::Bye
            | Word::SayHello
            | Word::Ping
            | Word::Pong
            | Word::CmdCancel
            | Word::CmdQuery
            | Word::CmdAck
            | Word::FileAck
            | Word::FileEnd
            | Word::FileAbort
            | Word::Aint => PayloadKind::Bare,
        }
    }

    /// Whether the message must survive a broker restart (`persistent: true`).
    pub fn is_persistent(self) -> bool {
        matches!(
            self,
            Word::CmdRun
                | Word::CmdResult
                | Word::CmdAck
                | Word::CmdCancel
                | Word::FilePut
                | Word::FileGet
                | Word::FileReady
                | Word::FileChunk
                | Word::FileEnd
                | Word::FileDone
                | Word::FileError
                | Word::FileAbort
        )
    }

    /// Whether the request expects answers, and so must say where (`reply-to`).
    pub fn needs_reply_to(self) -> bool {
        matches!(
            self,
            Word::Ping
                | Word::CmdRun
                | Word::CmdCancel
                | Word::CmdQuery
                | Word::FilePut
                | Word::FileGet
        )
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads a JSON number that a sender wrote as `null` (serde_json's rendering of a
/// non-finite float) as 0.
fn f64_or_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(0.0))
}

fn default_true() -> bool {
    true
}

fn default_chunk_size() -> u32 {
    DEFAULT_FILE_CHUNK_SIZE
}

fn default_window() -> u32 {
    DEFAULT_FILE_WINDOW
}

/// The payload of `HELLO`: who a guest is and what it runs on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub id: GuestId,
    /// Its IP addresses, the one the host should use first.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The MAC address of the NIC its id comes from, upper-case, if any.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub hostname: String,
    /// Operating system name, e.g. `Linux`.
    #[serde(default)]
    pub os: String,
    /// Kernel release, e.g. `6.1.0-18-amd64`.
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub agent_version: String,
    /// The protocol version the guest speaks (as its `vmc-protocol` header).
    #[serde(default)]
    pub protocol: u32,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    /// When the guest booted, in seconds since the Unix epoch.
    #[serde(default)]
    pub boot_time: u64,
    /// Optional features the guest offers, e.g. `file-transfer`.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The payload of `STILL_ALIVE`: a guest's load at the time of the beacon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadSummary {
    /// The guest's main IP address, also sent as the `ip` header (as the original did).
    pub ip: Option<String>,
    #[serde(deserialize_with = "f64_or_null")]
    pub load1: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub load5: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub load15: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// Commands the guest agent is running now.
    pub running_cmds: u32,
    pub uptime_secs: u64,
}

/// What `CMD_RUN` asks a guest to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// The program, looked up in `PATH` when it has no `/`.
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory; the agent's own when absent.
    #[serde(default)]
    pub path: Option<String>,
    /// A file on the guest to feed to stdin; stdin is empty when absent.
    #[serde(default, alias = "fileForStdin")]
    pub file_for_stdin: Option<String>,
    /// Seconds after which the command is killed (result state `timed-out`).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Bytes of each of stdout and stderr kept in the result; [`DEFAULT_OUTPUT_LIMIT`]
    /// when absent.
    #[serde(default)]
    pub output_limit: Option<u64>,
    /// Whether to send `CMD_OUTPUT` chunks while the command runs.
    #[serde(default = "default_true")]
    pub stream: bool,
}

impl CommandSpec {
    /// A command with no arguments and every option at its default.
    pub fn new(cmd: impl Into<String>) -> CommandSpec {
        CommandSpec {
            cmd: cmd.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            path: None,
            file_for_stdin: None,
            timeout_secs: None,
            output_limit: None,
            stream: true,
        }
    }
}

/// Resources used by a command, named after getrusage(2) fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceUsage {
    /// User CPU time, seconds.
    #[serde(deserialize_with = "f64_or_null")]
    pub ru_utime: f64,
    /// System CPU time, seconds.
    #[serde(deserialize_with = "f64_or_null")]
    pub ru_stime: f64,
    /// Maximum resident set size, KiB.
    pub ru_maxrss: i64,
    pub ru_ixrss: i64,
    pub ru_idrss: i64,
    pub ru_isrss: i64,
    pub ru_minflt: i64,
    pub ru_majflt: i64,
    pub ru_nswap: i64,
    pub ru_inblock: i64,
    pub ru_oublock: i64,
    pub ru_msgsnd: i64,
    pub ru_msgrcv: i64,
    pub ru_nsignals: i64,
    pub ru_nvcsw: i64,
    pub ru_nivcsw: i64,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// It exited by itself; `exitCodeOrSignal` is its exit code.
    #[serde(rename = "exited")]
    Exited,
    /// A signal ended it; `exitCodeOrSignal` is the signal.
    #[serde(rename = "signalled")]
    Signalled,
    /// The agent killed it when `timeout_secs` passed.
    #[serde(rename = "timed-out")]
    TimedOut,
    /// The agent killed it on `CMD_CANCEL`.
    #[serde(rename = "cancelled")]
    Cancelled,
    /// It never ran; `error` says why.
    #[serde(rename = "failed-to-start")]
    FailedToStart,
    /// The guest agent stopped (crash, reboot) while the command ran, so how it
    /// ended is unknown; `error` says so. Reported when the agent starts again.
    #[serde(rename = "lost")]
    Lost,
}

impl CommandOutcome {
    pub const ALL: [CommandOutcome; 6] = [
        CommandOutcome::Exited,
        CommandOutcome::Signalled,
        CommandOutcome::TimedOut,
        CommandOutcome::Cancelled,
        CommandOutcome::FailedToStart,
        CommandOutcome::Lost,
    ];

    /// Its name on the wire (and in both APIs): `exited`, `timed-out`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Exited => "exited",
            CommandOutcome::Signalled => "signalled",
            CommandOutcome::TimedOut => "timed-out",
            CommandOutcome::Cancelled => "cancelled",
            CommandOutcome::FailedToStart => "failed-to-start",
            CommandOutcome::Lost => "lost",
        }
    }
}

/// The payload of `CMD_RESULT`: the original's six keys, then this version's.
///
/// Decoding accepts a result with the original keys only (`cmd-id`, `finished` and
/// `exitCodeOrSignal` are required); the others then take defaults derived from
/// them: `state` from `finished`, `outBytes`/`errBytes` from `out`/`err`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "CommandResultWire")]
pub struct CommandResult {
    #[serde(rename = "cmd-id")]
    pub cmd_id: String,
    /// Standard output, at most `output_limit` bytes, non-UTF-8 replaced by U+FFFD.
    pub out: String,
    /// Standard error, as `out`.
    pub err: String,
    /// True when the command exited, false when a signal ended it or it never ran.
    pub finished: bool,
    #[serde(rename = "exitCodeOrSignal")]
    pub exit_code_or_signal: i32,
    pub resources: ResourceUsage,
    pub state: CommandOutcome,
    /// Why the command failed to start, or what else went wrong; `None` when nothing did.
    pub error: Option<String>,
    /// RFC 3339.
    #[serde(rename = "startedAt")]
    pub started_at: Option<String>,
    /// RFC 3339.
    #[serde(rename = "endedAt")]
    pub ended_at: Option<String>,
    #[serde(rename = "wallSecs")]
    pub wall_secs: f64,
    /// Bytes written to stdout in all, kept or not.
    #[serde(rename = "outBytes")]
    pub out_bytes: u64,
    #[serde(rename = "errBytes")]
    pub err_bytes: u64,
    /// Whether `out` is shorter than what the command wrote.
    #[serde(rename = "outTruncated")]
    pub out_truncated: bool,
    #[serde(rename = "errTruncated")]
    pub err_truncated: bool,
    /// Where on the guest the whole stdout is kept, if it is.
    #[serde(rename = "outFile")]
    pub out_file: Option<String>,
    #[serde(rename = "errFile")]
    pub err_file: Option<String>,
}

/// `CMD_RESULT` as read, with what older agents may leave out made optional.
#[derive(Deserialize)]
struct CommandResultWire {
    #[serde(rename = "cmd-id")]
    cmd_id: String,
    #[serde(default)]
    out: String,
    #[serde(default)]
    err: String,
    finished: bool,
    #[serde(rename = "exitCodeOrSignal")]
    exit_code_or_signal: i32,
    #[serde(default)]
    resources: ResourceUsage,
    #[serde(default)]
    state: Option<CommandOutcome>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "startedAt")]
    started_at: Option<String>,
    #[serde(default, rename = "endedAt")]
    ended_at: Option<String>,
    #[serde(default, rename = "wallSecs", deserialize_with = "f64_or_null")]
    wall_secs: f64,
    #[serde(default, rename = "outBytes")]
    out_bytes: Option<u64>,
    #[serde(default, rename = "errBytes")]
    err_bytes: Option<u64>,
    #[serde(default, rename = "outTruncated")]
    out_truncated: bool,
    #[serde(default, rename = "errTruncated")]
    err_truncated: bool,
    #[serde(default, rename = "outFile")]
    out_file: Option<String>,
    #[serde(default, rename = "errFile")]
    err_file: Option<String>,
}

impl From<CommandResultWire> for CommandResult {
    fn from(wire: CommandResultWire) -> CommandResult {
        let state = wire.state.unwrap_or(if wire.finished {
            CommandOutcome::Exited
        } else {
            CommandOutcome::Signalled
        });
        CommandResult {
            out_bytes: wire.out_bytes.unwrap_or(wire.out.len() as u64),
            err_bytes: wire.err_bytes.unwrap_or(wire.err.len() as u64),
            cmd_id: wire.cmd_id,
            out: wire.out,
            err: wire.err,
            finished: wire.finished,
            exit_code_or_signal: wire.exit_code_or_signal,
            resources: wire.resources,
            state,
            error: wire.error,
            started_at: wire.started_at,
            ended_at: wire.ended_at,
            wall_secs: wire.wall_secs,
            out_truncated: wire.out_truncated,
            err_truncated: wire.err_truncated,
            out_file: wire.out_file,
            err_file: wire.err_file,
        }
    }
}

/// Where a command is in its life, as `CMD_STATUS` tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandPhase {
    Queued,
    Running,
    /// Finished; its `CMD_RESULT` has been or will be (re)sent.
    Finished,
    /// The guest knows no command with this id.
    Unknown,
}

impl CommandPhase {
    pub const ALL: [CommandPhase; 4] = [
        CommandPhase::Queued,
        CommandPhase::Running,
        CommandPhase::Finished,
        CommandPhase::Unknown,
    ];

    /// Its name on the wire (and in both APIs).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandPhase::Queued => "queued",
            CommandPhase::Running => "running",
            CommandPhase::Finished => "finished",
            CommandPhase::Unknown => "unknown",
        }
    }
}

/// The payload of `CMD_STATUS`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandStatus {
    pub state: CommandPhase,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Resources used so far.
    #[serde(default)]
    pub usage: ResourceUsage,
    /// Bytes written to stdout so far.
    #[serde(default)]
    pub out_bytes: u64,
    #[serde(default)]
    pub err_bytes: u64,
}

/// Which output stream a `CMD_OUTPUT` chunk comes from (`stream` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Out,
    Err,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Out => "out",
            OutputStream::Err => "err",
        }
    }
}

impl FromStr for OutputStream {
    type Err = ();
    fn from_str(s: &str) -> Result<OutputStream, ()> {
        match s {
            "out" => Ok(OutputStream::Out),
            "err" => Ok(OutputStream::Err),
            _ => Err(()),
        }
    }
}

/// The payload of `FILE_PUT`: the file the host is about to send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileOffer {
    /// Where to write it on the guest.
    pub path: String,
    pub size: u64,
    /// SHA-256 of the whole file, lowercase hex. Absent when the host gives it only
    /// in `FILE_END` (hashing while it sends), which it does to guests that list
    /// [`DIGEST_AT_END`] among their capabilities; older guests need it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Unix permission bits for the new file; the guest's default when absent.
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// Chunks the sender may have unacknowledged.
    #[serde(default = "default_window")]
    pub window: u32,
}

/// The payload of `FILE_GET`: the file the host wants from the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileRequest {
    pub path: String,
    /// Where to start: the bytes the host already holds from an earlier attempt.
    #[serde(default)]
    pub offset: u64,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    #[serde(default = "default_window")]
    pub window: u32,
}

/// Why a file transfer failed (`FILE_ERROR`), as stable strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileErrorCode {
    #[serde(rename = "not-found")]
    NotFound,
    #[serde(rename = "permission-denied")]
    PermissionDenied,
    /// The path is outside the directories the guest agent allows.
    #[serde(rename = "outside-allowed-roots")]
    OutsideAllowedRoots,
    #[serde(rename = "no-space")]
    NoSpace,
    #[serde(rename = "checksum-mismatch")]
    ChecksumMismatch,
    #[serde(rename = "too-large")]
    TooLarge,
    #[serde(rename = "is-a-directory")]
    IsADirectory,
    #[serde(rename = "io")]
    Io,
    #[serde(rename = "cancelled")]
    Cancelled,
    /// The peer broke the transfer protocol (bad offset, unknown transfer, ...).
    #[serde(rename = "protocol")]
    Protocol,
}

impl FileErrorCode {
    pub const ALL: [FileErrorCode; 10] = [
        FileErrorCode::NotFound,
        FileErrorCode::PermissionDenied,
        FileErrorCode::OutsideAllowedRoots,
        FileErrorCode::NoSpace,
        FileErrorCode::ChecksumMismatch,
        FileErrorCode::TooLarge,
        FileErrorCode::IsADirectory,
        FileErrorCode::Io,
        FileErrorCode::Cancelled,
        FileErrorCode::Protocol,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FileErrorCode::NotFound => "not-found",
            FileErrorCode::PermissionDenied => "permission-denied",
            FileErrorCode::OutsideAllowedRoots => "outside-allowed-roots",
            FileErrorCode::NoSpace => "no-space",
            FileErrorCode::ChecksumMismatch => "checksum-mismatch",
            FileErrorCode::TooLarge => "too-large",
            FileErrorCode::IsADirectory => "is-a-directory",
            FileErrorCode::Io => "io",
            FileErrorCode::Cancelled => "cancelled",
            FileErrorCode::Protocol => "protocol",
        }
    }
}

impl fmt::Display for FileErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The capability (in `HELLO`) of a guest that accepts a `FILE_PUT` without
/// `sha256` and checks the file against the digest in `FILE_END` alone.
pub const DIGEST_AT_END: &str = "file-put-digest-at-end";

/// Whether `s` is a SHA-256 digest as this protocol writes it: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One protocol message, with its word-specific headers and payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Guest → host (connections topic): the guest is up.
    Hello(GuestInfo),
    /// Guest → host (connections topic): beacon every 10 s.
    StillAlive(LoadSummary),
    /// Guest → host (connections topic): the guest is going away.
    Bye { reason: Option<String> },
    /// Host → guest(s) (its queue or the multicast topic): send `HELLO` now (a host
    /// that started after its guests learns who they are at once).
    SayHello,
    /// Host → guest.
    Ping { ping_id: String },
    /// Guest → host: answer to `PING`.
    Pong { ping_id: String },
    /// Host → guest(s): run a command; `to` is a guest id or a glob over ids.
    CmdRun {
        cmd_id: String,
        to: String,
        spec: CommandSpec,
    },
    /// Guest → host: the command is running.
    CmdStarted {
        cmd_id: String,
        pid: u32,
        started_at: String,
    },
    /// Guest → host: bytes the command wrote, at `offset` in its stream.
    CmdOutput {
        cmd_id: String,
        stream: OutputStream,
        offset: u64,
        data: Bytes,
    },
    /// Guest → host: the command ended (resent until `CMD_ACK`).
    CmdResult(CommandResult),
    /// Host → guest: stop the command (SIGTERM, then SIGKILL after `grace_secs`).
    CmdCancel {
        cmd_id: String,
        grace_secs: Option<f64>,
    },
    /// Host → guest: how is the command doing? Answered by `CMD_STATUS`.
    CmdQuery { cmd_id: String },
    /// Guest → host: answer to `CMD_QUERY`.
    CmdStatus {
        cmd_id: String,
        status: CommandStatus,
    },
    /// Host → guest: the result is stored; the guest may forget it.
    CmdAck { cmd_id: String },
    /// Host → guest: the host will send this file.
    FilePut {
        transfer_id: String,
        offer: FileOffer,
    },
    /// Host → guest: the host wants this file.
    FileGet {
        transfer_id: String,
        request: FileRequest,
    },
    /// Receiver (PUT) or sender (GET) is ready from `offset`; a GET also gets the size and digest.
    FileReady {
        transfer_id: String,
        offset: u64,
        size: Option<u64>,
        sha256: Option<String>,
    },
    /// Sender → receiver: bytes of the file at `offset`.
    FileChunk {
        transfer_id: String,
        offset: u64,
        data: Bytes,
    },
    /// Receiver → sender: `offset` contiguous bytes are written.
    FileAck { transfer_id: String, offset: u64 },
    /// Sender → receiver: everything is sent.
    FileEnd {
        transfer_id: String,
        size: u64,
        sha256: String,
    },
    /// Receiver → sender (host → guest for a GET): verified and in place.
    FileDone {
        transfer_id: String,
        size: u64,
        sha256: String,
    },
    /// Either side: the transfer failed.
    FileError {
        transfer_id: String,
        code: FileErrorCode,
        message: String,
    },
    /// Either side: the transfer is cancelled.
    FileAbort {
        transfer_id: String,
        reason: Option<String>,
    },
    /// Either side: the message named `word` was not understood.
    Aint { word: String, reason: String },
}

impl Message {
    /// Which word this message is.
    pub fn kind(&self) -> Word {
        match self {
            Message::Hello(_) => Word::Hello,
            Message::StillAlive(_) => Word::StillAlive,
            Message::Bye { .. } => Word::Bye,
            Message::SayHello => Word::SayHello,
            Message::Ping { .. } => Word::Ping,
            Message::Pong { .. } => Word::Pong,
            Message::CmdRun { .. } => Word::CmdRun,
            Message::CmdStarted { .. } => Word::CmdStarted,
            Message::CmdOutput { .. } => Word::CmdOutput,
            Message::CmdResult(_) => Word::CmdResult,
            Message::CmdCancel { .. } => Word::CmdCancel,
            Message::CmdQuery { .. } => Word::CmdQuery,
            Message::CmdStatus { .. } => Word::CmdStatus,
            Message::CmdAck { .. } => Word::CmdAck,
            Message::FilePut { .. } => Word::FilePut,
            Message::FileGet { .. } => Word::FileGet,
            Message::FileReady { .. } => Word::FileReady,
            Message::FileChunk { .. } => Word::FileChunk,
            Message::FileAck { .. } => Word::FileAck,
            Message::FileEnd { .. } => Word::FileEnd,
            Message::FileDone { .. } => Word::FileDone,
            Message::FileError { .. } => Word::FileError,
            Message::FileAbort { .. } => Word::FileAbort,
            Message::Aint { .. } => Word::Aint,
        }
    }

    /// The word as written at the start of the body.
    pub fn word(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// A received message with the common headers that came with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// `vmc-from`: a guest id or `host:<host-id>`; absent from version-0 agents.
    pub from: Option<String>,
    /// `reply-to`: where answers go.
    pub reply_to: Option<String>,
    /// `vmc-protocol`; 0 when absent.
    pub protocol: u32,
    pub message: Message,
}

impl Envelope {
    /// The sender, when `vmc-from` is present and valid.
    pub fn sender(&self) -> Option<PeerId> {
        self.from.as_deref().and_then(|from| from.parse().ok())
    }
}

/// The payload of `CMD_STARTED`.
#[derive(Serialize, Deserialize)]
struct StartedPayload {
    pid: u32,
    started_at: String,
}

/// The payload of `FILE_READY`.
#[derive(Serialize, Deserialize)]
struct ReadyPayload {
    offset: u64,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    sha256: Option<String>,
}

/// The payload of `FILE_DONE`.
#[derive(Serialize, Deserialize)]
struct DonePayload {
    size: u64,
    sha256: String,
}

/// The payload of `FILE_ERROR`.
#[derive(Serialize, Deserialize)]
struct ErrorPayload {
    code: FileErrorCode,
    #[serde(default)]
    message: String,
}

/// What [`encode`] puts after the word.
enum Payload {
    Bare,
    Json(Vec<u8>),
    Binary(Bytes),
}

/// Builds the frame of one message, headers first, body last.
struct FrameBuilder {
    word: &'static str,
    frame: Frame,
}

impl FrameBuilder {
    fn header(&mut self, name: &str, value: impl Into<String>) {
        self.frame.headers.push((name.to_owned(), value.into()));
    }

    /// An id header (`cmd-id`, `ping-id`, `transfer-id`), which may not be empty.
    fn id(&mut self, name: &'static str, value: &str) -> Result<(), WordError> {
        if value.is_empty() {
            return Err(bad_header(self.word, name, value, "must not be empty"));
        }
        self.header(name, value);
        Ok(())
    }

    fn json<T: Serialize>(&self, payload: &T) -> Result<Payload, WordError> {
        // Serializing these plain structs (string-keyed maps, no custom Serialize)
        // cannot fail; the error is mapped rather than unwrapped all the same.
        serde_json::to_vec(payload)
            .map(Payload::Json)
            .map_err(|source| WordError::BadPayload {
                word: self.word,
                source,
            })
    }
}

fn bad_header(
    word: &'static str,
    header: &'static str,
    value: &str,
    reason: &'static str,
) -> WordError {
    WordError::BadHeader {
        word,
        header,
        value: clip(value),
        reason,
    }
}

/// Keeps error values short when the offending input is garbage of any length.
fn clip(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    text.chars().take(MAX_CHARS).collect()
}

/// The frame size as the codec will write it, escapes included (an upper bound on
/// what the headers cost, since CONNECT-style unescaped frames are never words).
fn wire_size(frame: &Frame) -> usize {
    let escaped = |s: &str| {
        s.len()
            + s.bytes()
                .filter(|b| matches!(b, b'\\' | b'\r' | b'\n' | b':'))
                .count()
    };
    let head: usize = frame
        .headers
        .iter()
        .map(|(n, v)| escaped(n) + 1 + escaped(v) + 1)
        .sum();
    frame.command.as_str().len() + 1 + head + 1 + frame.body.len() + 1
}

/// Encodes `msg` sent by `from` (a guest id or `host:<host-id>`) as a SEND frame
/// without `destination`. `reply_to` is required for the words that expect answers
/// ([`Word::needs_reply_to`]); the frame, with [`FRAME_HEADROOM`], must fit in
/// `max_frame_size`.
pub fn encode(
    msg: &Message,
    from: &str,
    reply_to: Option<&str>,
    max_frame_size: usize,
) -> Result<Frame, WordError> {
    let kind = msg.kind();
    let word = kind.as_str();
    let mut b = FrameBuilder {
        word,
        frame: Frame::new(Command::Send),
    };
    b.header(header::PROTOCOL, PROTOCOL_VERSION.to_string());
    b.header(header::FROM, from);
    b.header(header::CONTENT_TYPE, kind.payload_kind().content_type());
    if kind.is_persistent() {
        b.header(header::PERSISTENT, "true");
    }
    match reply_to {
        Some(reply_to) => b.header(header::REPLY_TO, reply_to),
        None if kind.needs_reply_to() => {
            return Err(WordError::MissingHeader {
                word,
                header: header::REPLY_TO,
            })
        }
        None => {}
    }
    let payload = match msg {
        Message::Hello(info) => {
            if let Some(ip) = info.ips.first() {
                b.header(header::IP, ip.as_str());
            }
            b.json(info)?
        }
        Message::StillAlive(load) => {
            if let Some(ip) = &load.ip {
                b.header(header::IP, ip.as_str());
            }
            b.json(load)?
        }
        Message::Bye { reason } => {
            if let Some(reason) = reason {
                b.header(header::REASON, reason.as_str());
            }
            Payload::Bare
        }
        Message::SayHello => Payload::Bare,
        Message::Ping { ping_id } | Message::Pong { ping_id } => {
            b.id(header::PING_ID, ping_id)?;
            Payload::Bare
        }
        Message::CmdRun { cmd_id, to, spec } => {
            b.id(header::CMD_ID, cmd_id)?;
            if to.is_empty() {
                return Err(bad_header(word, header::TO, to, "must not be empty"));
            }
            b.header(header::TO, to.as_str());
            b.json(spec)?
        }
        Message::CmdStarted {
            cmd_id,
            pid,
            started_at,
        } => {
            b.id(header::CMD_ID, cmd_id)?;
            b.json(&StartedPayload {
                pid: *pid,
                started_at: started_at.clone(),
            })?
        }
        Message::CmdOutput {
            cmd_id,
            stream,
            offset,
            data,
        } => {
            b.id(header::CMD_ID, cmd_id)?;
            b.header(header::STREAM, stream.as_str());
            b.header(header::OFFSET, offset.to_string());
            if data.len() > MAX_OUTPUT_CHUNK {
                return Err(WordError::TooLarge {
                    word,
                    size: data.len(),
                    limit: MAX_OUTPUT_CHUNK,
                });
            }
            Payload::Binary(data.clone())
        }
        Message::CmdResult(result) => {
            b.id(header::CMD_ID, &result.cmd_id)?;
            b.json(result)?
        }
        Message::CmdCancel { cmd_id, grace_secs } => {
            b.id(header::CMD_ID, cmd_id)?;
            if let Some(grace) = grace_secs {
                let value = grace.to_string();
                if !(grace.is_finite() && *grace >= 0.0) {
                    return Err(bad_header(word, header::GRACE_SECS, &value, GRACE_RULE));
                }
                b.header(header::GRACE_SECS, value);
            }
            Payload::Bare
        }
        Message::CmdQuery { cmd_id } | Message::CmdAck { cmd_id } => {
            b.id(header::CMD_ID, cmd_id)?;
            Payload::Bare
        }
        Message::CmdStatus { cmd_id, status } => {
            b.id(header::CMD_ID, cmd_id)?;
            b.json(status)?
        }
        Message::FilePut { transfer_id, offer } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.json(offer)?
        }
        Message::FileGet {
            transfer_id,
            request,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.json(request)?
        }
        Message::FileReady {
            transfer_id,
            offset,
            size,
            sha256,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.json(&ReadyPayload {
                offset: *offset,
                size: *size,
                sha256: sha256.clone(),
            })?
        }
        Message::FileChunk {
            transfer_id,
            offset,
            data,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.header(header::OFFSET, offset.to_string());
            let limit = MAX_FILE_CHUNK_SIZE as usize;
            if data.len() > limit {
                return Err(WordError::TooLarge {
                    word,
                    size: data.len(),
                    limit,
                });
            }
            Payload::Binary(data.clone())
        }
        Message::FileAck {
            transfer_id,
            offset,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.header(header::OFFSET, offset.to_string());
            Payload::Bare
        }
        Message::FileEnd {
            transfer_id,
            size,
            sha256,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.header(header::SIZE, size.to_string());
            b.header(header::SHA256, sha256.as_str());
            Payload::Bare
        }
        Message::FileDone {
            transfer_id,
            size,
            sha256,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.json(&DonePayload {
                size: *size,
                sha256: sha256.clone(),
            })?
        }
        Message::FileError {
            transfer_id,
            code,
            message,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            b.json(&ErrorPayload {
                code: *code,
                message: message.clone(),
            })?
        }
        Message::FileAbort {
            transfer_id,
            reason,
        } => {
            b.id(header::TRANSFER_ID, transfer_id)?;
            if let Some(reason) = reason {
                b.header(header::REASON, reason.as_str());
            }
            Payload::Bare
        }
        Message::Aint {
            word: not_understood,
            reason,
        } => {
            b.header(header::WORD, not_understood.as_str());
            b.header(header::REASON, reason.as_str());
            Payload::Bare
        }
    };
    let mut frame = b.frame;
    frame.body = match payload {
        Payload::Bare => Bytes::from_static(word.as_bytes()),
        Payload::Json(json) => join_body(word, &json),
        Payload::Binary(data) => join_body(word, &data),
    };
    let size = wire_size(&frame).saturating_add(FRAME_HEADROOM);
    if size > max_frame_size {
        return Err(WordError::TooLarge {
            word,
            size,
            limit: max_frame_size,
        });
    }
    Ok(frame)
}

const GRACE_RULE: &str = "must be a finite number of seconds, 0 or more";

/// `WORD`, a space, and the payload.
fn join_body(word: &str, payload: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(word.len() + 1 + payload.len());
    body.put_slice(word.as_bytes());
    body.put_u8(b' ');
    body.put_slice(payload);
    body.freeze()
}

/// Splits a body into its word and its payload: the word ends at the first space,
/// tab, CR or LF; one separator (or a CR LF pair) is skipped.
fn split_body(body: &Bytes) -> (&[u8], Bytes) {
    let Some(end) = body
        .iter()
        .position(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
    else {
        return (body, Bytes::new());
    };
    let crlf = body.get(end) == Some(&b'\r') && body.get(end + 1) == Some(&b'\n');
    let start = if crlf { end + 2 } else { end + 1 };
    (&body[..end], body.slice(start..))
}

/// Reads the headers and payload of one word, by name.
struct Reader<'a> {
    word: &'static str,
    frame: &'a Frame,
    payload: Bytes,
}

impl Reader<'_> {
    fn optional(&self, name: &'static str) -> Option<String> {
        self.frame.header(name).map(str::to_owned)
    }

    fn required(&self, name: &'static str) -> Result<&str, WordError> {
        self.frame.header(name).ok_or(WordError::MissingHeader {
            word: self.word,
            header: name,
        })
    }

    fn id(&self, name: &'static str) -> Result<String, WordError> {
        let value = self.required(name)?;
        if value.is_empty() {
            return Err(bad_header(self.word, name, value, "must not be empty"));
        }
        Ok(value.to_owned())
    }

    fn number<T: FromStr>(&self, name: &'static str) -> Result<T, WordError> {
        let value = self.required(name)?;
        value
            .trim()
            .parse()
            .map_err(|_| bad_header(self.word, name, value, "is not an unsigned integer"))
    }

    /// Whether the payload is absent (or only whitespace), as in version-0 messages.
    fn payload_is_empty(&self) -> bool {
        self.payload.iter().all(u8::is_ascii_whitespace)
    }

    fn json<T: DeserializeOwned>(&self) -> Result<T, WordError> {
        serde_json::from_slice(&self.payload).map_err(|source| WordError::BadPayload {
            word: self.word,
            source,
        })
    }

    /// A JSON value in a header, for version-0 `CMD_RUN`.
    fn json_header<T: DeserializeOwned>(
        &self,
        name: &'static str,
        reason: &'static str,
    ) -> Result<Option<T>, WordError> {
        match self.frame.header(name) {
            None => Ok(None),
            Some(value) => serde_json::from_str(value)
                .map(Some)
                .map_err(|_| bad_header(self.word, name, value, reason)),
        }
    }

    /// A path-like header of version-0 `CMD_RUN`, where empty means absent.
    fn non_empty(&self, name: &'static str) -> Option<String> {
        self.frame
            .header(name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }

    /// The command of a version-0 `CMD_RUN`, which had it in headers.
    fn spec_from_headers(&self) -> Result<CommandSpec, WordError> {
        let mut spec = CommandSpec::new(self.required(header::CMD)?);
        spec.args = self
            .json_header(header::ARGS, "is not a JSON array of strings")?
            .unwrap_or_default();
        spec.env = self
            .json_header(header::ENV, "is not a JSON object of strings")?
            .unwrap_or_default();
        spec.path = self.non_empty(header::PATH);
        spec.file_for_stdin = self.non_empty(header::FILE_FOR_STDIN);
        Ok(spec)
    }
}

/// Whether a guest with id `guest` must act on a frame from the multicast topic: its
/// `to` header is a glob ([`crate::glob`]) matching the id. Frames without `to` are
/// for nobody.
pub fn is_addressed_to(frame: &Frame, guest: &GuestId) -> bool {
    frame
        .header(header::TO)
        .is_some_and(|to| glob_match(to, guest.as_str()))
}

/// Decodes a MESSAGE (or SEND) frame. Never panics, whatever the frame holds.
pub fn decode(frame: &Frame) -> Result<Envelope, WordError> {
    if !matches!(frame.command, Command::Message | Command::Send) {
        return Err(WordError::NotAMessage {
            command: frame.command,
        });
    }
    let (word_bytes, payload) = split_body(&frame.body);
    if word_bytes.is_empty() {
        return Err(WordError::Empty);
    }
    let kind = std::str::from_utf8(word_bytes)
        .ok()
        .and_then(Word::parse)
        .ok_or_else(|| WordError::Unknown {
            word: clip(&String::from_utf8_lossy(word_bytes)),
        })?;
    let word = kind.as_str();
    let protocol = match frame.header(header::PROTOCOL) {
        None => 0,
        Some(value) => value
            .trim()
            .parse()
            .map_err(|_| bad_header(word, header::PROTOCOL, value, "is not an unsigned integer"))?,
    };
    let reply_to = frame.header(header::REPLY_TO).map(str::to_owned);
    // Version-0 hosts sent requests without reply-to: answers went to a shared topic.
    if protocol >= 1 && kind.needs_reply_to() && reply_to.is_none() {
        return Err(WordError::MissingHeader {
            word,
            header: header::REPLY_TO,
        });
    }
    let r = Reader {
        word,
        frame,
        payload,
    };
    let message = decode_message(kind, &r)?;
    Ok(Envelope {
        from: r.optional(header::FROM),
        reply_to,
        protocol,
        message,
    })
}

fn decode_message(kind: Word, r: &Reader<'_>) -> Result<Message, WordError> {
    Ok(match kind {
        Word::Hello => Message::Hello(r.json()?),
        Word::StillAlive => {
            let mut load: LoadSummary = if r.payload_is_empty() {
                LoadSummary::default()
            } else {
                r.json()?
            };
            // Version-0 guests sent their address in the header only.
            if load.ip.is_none() {
                load.ip = r.optional(header::IP);
            }
            Message::StillAlive(load)
        }
        Word::Bye => Message::Bye {
            reason: r.optional(header::REASON),
        },
        Word::SayHello => Message::SayHello,
        Word::Ping => Message::Ping {
            ping_id: r.id(header::PING_ID)?,
        },
        Word::Pong => Message::Pong {
            ping_id: r.id(header::PING_ID)?,
        },
        Word::CmdRun => {
            let cmd_id = r.id(header::CMD_ID)?;
            let to = r.required(header::TO)?.to_owned();
            let spec = if r.payload_is_empty() {
                r.spec_from_headers()?
            } else {
                r.json()?
            };
            Message::CmdRun { cmd_id, to, spec }
        }
        Word::CmdStarted => {
            let cmd_id = r.id(header::CMD_ID)?;
            let StartedPayload { pid, started_at } = r.json()?;
            Message::CmdStarted {
                cmd_id,
                pid,
                started_at,
            }
        }
        Word::CmdOutput => {
            let cmd_id = r.id(header::CMD_ID)?;
            let value = r.required(header::STREAM)?;
            let stream = value.parse().map_err(|()| {
                bad_header(r.word, header::STREAM, value, "is neither out nor err")
            })?;
            let offset = r.number(header::OFFSET)?;
            Message::CmdOutput {
                cmd_id,
                stream,
                offset,
                data: r.payload.clone(),
            }
        }
        Word::CmdResult => {
            let result: CommandResult = r.json()?;
            // Version-0 agents also put cmd-id in the headers; where both are, they agree.
            if let Some(value) = r.frame.header(header::CMD_ID) {
                if value != result.cmd_id {
                    let reason = "differs from the payload's cmd-id";
                    return Err(bad_header(r.word, header::CMD_ID, value, reason));
                }
            }
            Message::CmdResult(result)
        }
        Word::CmdCancel => {
            let cmd_id = r.id(header::CMD_ID)?;
            let grace_secs = match r.frame.header(header::GRACE_SECS) {
                None => None,
                Some(value) => match value.trim().parse::<f64>() {
                    Ok(grace) if grace.is_finite() && grace >= 0.0 => Some(grace),
                    _ => return Err(bad_header(r.word, header::GRACE_SECS, value, GRACE_RULE)),
                },
            };
            Message::CmdCancel { cmd_id, grace_secs }
        }
        Word::CmdQuery => Message::CmdQuery {
            cmd_id: r.id(header::CMD_ID)?,
        },
        Word::CmdStatus => Message::CmdStatus {
            cmd_id: r.id(header::CMD_ID)?,
            status: r.json()?,
        },
        Word::CmdAck => Message::CmdAck {
            cmd_id: r.id(header::CMD_ID)?,
        },
        Word::FilePut => Message::FilePut {
            transfer_id: r.id(header::TRANSFER_ID)?,
            offer: r.json()?,
        },
        Word::FileGet => Message::FileGet {
            transfer_id: r.id(header::TRANSFER_ID)?,
            request: r.json()?,
        },
        Word::FileReady => {
            let transfer_id = r.id(header::TRANSFER_ID)?;
            let ReadyPayload {
                offset,
                size,
                sha256,
            } = r.json()?;
            Message::FileReady {
                transfer_id,
                offset,
                size,
                sha256,
            }
        }
        Word::FileChunk => Message::FileChunk {
            transfer_id: r.id(header::TRANSFER_ID)?,
            offset: r.number(header::OFFSET)?,
            data: r.payload.clone(),
        },
        Word::FileAck => Message::FileAck {
            transfer_id: r.id(header::TRANSFER_ID)?,
            offset: r.number(header::OFFSET)?,
        },
        Word::FileEnd => Message::FileEnd {
            transfer_id: r.id(header::TRANSFER_ID)?,
            size: r.number(header::SIZE)?,
            sha256: r.required(header::SHA256)?.to_owned(),
        },
        Word::FileDone => {
            let transfer_id = r.id(header::TRANSFER_ID)?;
            let DonePayload { size, sha256 } = r.json()?;
            Message::FileDone {
                transfer_id,
                size,
                sha256,
            }
        }
        Word::FileError => {
            let transfer_id = r.id(header::TRANSFER_ID)?;
            let ErrorPayload { code, message } = r.json()?;
            Message::FileError {
                transfer_id,
                code,
                message,
            }
        }
        Word::FileAbort => Message::FileAbort {
            transfer_id: r.id(header::TRANSFER_ID)?,
            reason: r.optional(header::REASON),
        },
        // Lenient on purpose: a bad AINT is never answered, so read what there is.
        Word::Aint => Message::Aint {
            word: r.optional(header::WORD).unwrap_or_default(),
            reason: r.optional(header::REASON).unwrap_or_default(),
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn outcome_and_phase_names_are_their_wire_names() {
        for outcome in CommandOutcome::ALL {
            let wire = serde_json::to_value(outcome).unwrap();
            assert_eq!(wire, outcome.as_str(), "{outcome:?}");
        }
        for phase in CommandPhase::ALL {
            let wire = serde_json::to_value(phase).unwrap();
            assert_eq!(wire, phase.as_str(), "{phase:?}");
        }
    }
    use super::*;
    use proptest::prelude::*;

    const HOST: &str = "host:lab-1";
    const GUEST: &str = "52:54:00:AB:CD:EF";
    const REPLY: &str = "/queue/vmc.host.lab-1";
    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn guest_info() -> GuestInfo {
        GuestInfo {
            id: GuestId::new(GUEST).unwrap(),
            ips: vec!["192.168.56.101".into(), "fe80::5054:ff:feab:cdef".into()],
            mac: Some(GUEST.into()),
            hostname: "cernvm".into(),
            os: "Linux".into(),
            kernel: "6.1.0-18-amd64".into(),
            agent_version: "0.1.0".into(),
            protocol: 1,
            cpus: 2,
            memory_bytes: 2_147_483_648,
            boot_time: 1_700_000_000,
            capabilities: vec!["file-transfer".into(), "cmd-output".into()],
        }
    }

    fn command_result() -> CommandResult {
        CommandResult {
            cmd_id: "c-42".into(),
            out: "hello\n".into(),
            err: String::new(),
            finished: true,
            exit_code_or_signal: 0,
            resources: ResourceUsage {
                ru_utime: 0.5,
                ru_stime: 0.25,
                ru_maxrss: 2048,
                ru_minflt: 120,
                ru_nvcsw: 3,
                ..ResourceUsage::default()
            },
            state: CommandOutcome::Exited,
            error: None,
            started_at: Some("2024-05-01T12:00:00Z".into()),
            ended_at: Some("2024-05-01T12:00:01.5Z".into()),
            wall_secs: 1.5,
            out_bytes: 6,
            err_bytes: 0,
            out_truncated: false,
            err_truncated: false,
            out_file: None,
            err_file: None,
        }
    }

    /// One example of every word, with who sends it and the `reply-to` it carries.
    /// `docs/PROTOCOL.md` shows exactly these frames (see the test at the end).
    fn examples() -> Vec<(Message, &'static str, Option<&'static str>)> {
        let mut spec = CommandSpec::new("/bin/echo");
        spec.args = vec!["hello".into()];
        spec.env.insert("LANG".into(), "C".into());
        spec.path = Some("/tmp".into());
        spec.timeout_secs = Some(60.0);
        vec![
            (Message::Hello(guest_info()), GUEST, None),
            (
                Message::StillAlive(LoadSummary {
                    ip: Some("192.168.56.101".into()),
                    load1: 0.5,
                    load5: 0.25,
                    load15: 0.125,
                    mem_used_bytes: 536_870_912,
                    mem_total_bytes: 2_147_483_648,
                    running_cmds: 1,
                    uptime_secs: 3600,
                }),
                GUEST,
                None,
            ),
            (
                Message::Bye {
                    reason: Some("shutdown".into()),
                },
                GUEST,
                None,
            ),
            (Message::SayHello, HOST, None),
            (
                Message::Ping {
                    ping_id: "p-7".into(),
                },
                HOST,
                Some(REPLY),
            ),
            (
                Message::Pong {
                    ping_id: "p-7".into(),
                },
                GUEST,
                None,
            ),
            (
                Message::CmdRun {
                    cmd_id: "c-42".into(),
                    to: GUEST.into(),
                    spec,
                },
                HOST,
                Some(REPLY),
            ),
            (
                Message::CmdStarted {
                    cmd_id: "c-42".into(),
                    pid: 4242,
                    started_at: "2024-05-01T12:00:00Z".into(),
                },
                GUEST,
                None,
            ),
            (
                Message::CmdOutput {
                    cmd_id: "c-42".into(),
                    stream: OutputStream::Out,
                    offset: 0,
                    data: Bytes::from_static(b"hello\n"),
                },
                GUEST,
                None,
            ),
            (Message::CmdResult(command_result()), GUEST, None),
            (
                Message::CmdCancel {
                    cmd_id: "c-42".into(),
                    grace_secs: Some(5.0),
                },
                HOST,
                Some(REPLY),
            ),
            (
                Message::CmdQuery {
                    cmd_id: "c-42".into(),
                },
                HOST,
                Some(REPLY),
            ),
            (
                Message::CmdStatus {
                    cmd_id: "c-42".into(),
                    status: CommandStatus {
                        state: CommandPhase::Running,
                        pid: Some(4242),
                        usage: ResourceUsage {
                            ru_utime: 0.5,
                            ..ResourceUsage::default()
                        },
                        out_bytes: 6,
                        err_bytes: 0,
                    },
                },
                GUEST,
                None,
            ),
            (
                Message::CmdAck {
                    cmd_id: "c-42".into(),
                },
                HOST,
                None,
            ),
            (
                Message::FilePut {
                    transfer_id: "t-1".into(),
                    offer: FileOffer {
                        path: "/tmp/input.dat".into(),
                        size: 4,
                        sha256: Some(SHA.into()),
                        mode: Some(0o644),
                        chunk_size: DEFAULT_FILE_CHUNK_SIZE,
                        window: DEFAULT_FILE_WINDOW,
                    },
                },
                HOST,
                Some(REPLY),
            ),
            (
                Message::FileGet {
                    transfer_id: "t-2".into(),
                    request: FileRequest {
                        path: "/tmp/output.dat".into(),
                        offset: 0,
                        chunk_size: DEFAULT_FILE_CHUNK_SIZE,
                        window: DEFAULT_FILE_WINDOW,
                    },
                },
                HOST,
                Some(REPLY),
            ),
            (
                Message::FileReady {
                    transfer_id: "t-2".into(),
                    offset: 0,
                    size: Some(4),
                    sha256: Some(SHA.into()),
                },
                GUEST,
                None,
            ),
            (
                Message::FileChunk {
                    transfer_id: "t-1".into(),
                    offset: 0,
                    data: Bytes::from_static(b"test"),
                },
                HOST,
                None,
            ),
            (
                Message::FileAck {
                    transfer_id: "t-1".into(),
                    offset: 4,
                },
                GUEST,
                None,
            ),
            (
                Message::FileEnd {
                    transfer_id: "t-1".into(),
                    size: 4,
                    sha256: SHA.into(),
                },
                HOST,
                None,
            ),
            (
                Message::FileDone {
                    transfer_id: "t-1".into(),
                    size: 4,
                    sha256: SHA.into(),
                },
                GUEST,
                None,
            ),
            (
                Message::FileError {
                    transfer_id: "t-2".into(),
                    code: FileErrorCode::NotFound,
                    message: "/tmp/output.dat: No such file or directory".into(),
                },
                GUEST,
                None,
            ),
            (
                Message::FileAbort {
                    transfer_id: "t-2".into(),
                    reason: Some("cancelled by user".into()),
                },
                HOST,
                None,
            ),
            (
                Message::Aint {
                    word: "FROB".into(),
                    reason: "\"FROB\" is not a word of this protocol".into(),
                },
                GUEST,
                None,
            ),
        ]
    }

    fn example(word: Word) -> Frame {
        let (msg, from, reply_to) = examples()
            .into_iter()
            .find(|(m, _, _)| m.kind() == word)
            .expect("every word has an example");
        encode(&msg, from, reply_to, DEFAULT_MAX_FRAME_SIZE).unwrap()
    }

    /// The headers every message starts with.
    fn common(
        from: &str,
        content_type: &str,
        persistent: bool,
        reply_to: Option<&str>,
    ) -> Vec<(String, String)> {
        let mut headers = h(&[
            ("vmc-protocol", "1"),
            ("vmc-from", from),
            ("content-type", content_type),
        ]);
        if persistent {
            headers.extend(h(&[("persistent", "true")]));
        }
        if let Some(reply_to) = reply_to {
            headers.extend(h(&[("reply-to", reply_to)]));
        }
        headers
    }

    /// Checks one example's exact headers and the first token of its body.
    fn check(word: Word, expected_headers: Vec<(String, String)>, payload: Option<&[u8]>) {
        let frame = example(word);
        assert_eq!(frame.command, Command::Send);
        assert_eq!(frame.headers, expected_headers, "{word}");
        let (first, rest) = split_body(&frame.body);
        assert_eq!(first, word.as_str().as_bytes());
        match payload {
            None => assert_eq!(&frame.body[..], word.as_str().as_bytes()),
            Some(payload) => {
                assert_eq!(frame.body[word.as_str().len()], b' ');
                assert_eq!(&rest[..], payload, "{word}");
            }
        }
        let decoded = decode(&frame).unwrap();
        let (msg, from, reply_to) = examples()
            .into_iter()
            .find(|(m, _, _)| m.kind() == word)
            .unwrap();
        assert_eq!(decoded.message, msg);
        assert_eq!(decoded.from.as_deref(), Some(from));
        assert_eq!(decoded.reply_to.as_deref(), reply_to);
        assert_eq!(decoded.protocol, PROTOCOL_VERSION);
    }

    fn json_of(frame: &Frame) -> serde_json::Value {
        serde_json::from_slice(&split_body(&frame.body).1).unwrap()
    }

    const JSON: &str = "application/json";
    const BARE: &str = "text/plain";
    const BINARY: &str = "application/octet-stream";

    #[test]
    fn hello() {
        let mut headers = common(GUEST, JSON, false, None);
        headers.extend(h(&[("ip", "192.168.56.101")]));
        check(
            Word::Hello,
            headers,
            Some(&serde_json::to_vec(&guest_info()).unwrap()),
        );
        let json = json_of(&example(Word::Hello));
        for key in [
            "id",
            "ips",
            "mac",
            "hostname",
            "os",
            "kernel",
            "agent_version",
            "protocol",
            "cpus",
            "memory_bytes",
            "boot_time",
            "capabilities",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn still_alive() {
        let frame = example(Word::StillAlive);
        let mut headers = common(GUEST, JSON, false, None);
        headers.extend(h(&[("ip", "192.168.56.101")]));
        check(Word::StillAlive, headers, Some(&split_body(&frame.body).1));
        let json = json_of(&frame);
        for key in [
            "ip",
            "load1",
            "load5",
            "load15",
            "mem_used_bytes",
            "mem_total_bytes",
            "running_cmds",
            "uptime_secs",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn bye() {
        let mut headers = common(GUEST, BARE, false, None);
        headers.extend(h(&[("reason", "shutdown")]));
        check(Word::Bye, headers, None);
    }

    #[test]
    fn say_hello() {
        check(Word::SayHello, common(HOST, BARE, false, None), None);
    }

    #[test]
    fn ping_and_pong() {
        let mut headers = common(HOST, BARE, false, Some(REPLY));
        headers.extend(h(&[("ping-id", "p-7")]));
        check(Word::Ping, headers, None);
        let mut headers = common(GUEST, BARE, false, None);
        headers.extend(h(&[("ping-id", "p-7")]));
        check(Word::Pong, headers, None);
    }

    #[test]
    fn cmd_run() {
        let mut headers = common(HOST, JSON, true, Some(REPLY));
        headers.extend(h(&[("cmd-id", "c-42"), ("to", GUEST)]));
        let frame = example(Word::CmdRun);
        check(Word::CmdRun, headers, Some(&split_body(&frame.body).1));
        let json = json_of(&frame);
        assert_eq!(json["cmd"], "/bin/echo");
        assert_eq!(json["args"], serde_json::json!(["hello"]));
        assert_eq!(json["env"], serde_json::json!({"LANG": "C"}));
        assert_eq!(json["path"], "/tmp");
        assert_eq!(json["file_for_stdin"], serde_json::Value::Null);
        assert_eq!(json["timeout_secs"], 60.0);
        assert_eq!(json["output_limit"], serde_json::Value::Null);
        assert_eq!(json["stream"], true);
    }

    #[test]
    fn cmd_started() {
        let mut headers = common(GUEST, JSON, false, None);
        headers.extend(h(&[("cmd-id", "c-42")]));
        check(
            Word::CmdStarted,
            headers,
            Some(br#"{"pid":4242,"started_at":"2024-05-01T12:00:00Z"}"#),
        );
    }

    #[test]
    fn cmd_output() {
        let mut headers = common(GUEST, BINARY, false, None);
        headers.extend(h(&[("cmd-id", "c-42"), ("stream", "out"), ("offset", "0")]));
        check(Word::CmdOutput, headers, Some(b"hello\n"));
    }

    #[test]
    fn cmd_result() {
        let mut headers = common(GUEST, JSON, true, None);
        headers.extend(h(&[("cmd-id", "c-42")]));
        let frame = example(Word::CmdResult);
        check(Word::CmdResult, headers, Some(&split_body(&frame.body).1));
        let json = json_of(&frame);
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "cmd-id",
            "out",
            "err",
            "finished",
            "exitCodeOrSignal",
            "resources",
            "state",
            "error",
            "startedAt",
            "endedAt",
            "wallSecs",
            "outBytes",
            "errBytes",
            "outTruncated",
            "errTruncated",
            "outFile",
            "errFile",
        ];
        let mut keys = keys;
        keys.sort_unstable();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(json["state"], "exited");
        let resources: Vec<&String> = json["resources"].as_object().unwrap().keys().collect();
        assert_eq!(resources.len(), 16);
        assert!(resources.iter().all(|k| k.starts_with("ru_")));
    }

    #[test]
    fn cmd_cancel_query_ack() {
        let mut headers = common(HOST, BARE, true, Some(REPLY));
        headers.extend(h(&[("cmd-id", "c-42"), ("grace-secs", "5")]));
        check(Word::CmdCancel, headers, None);
        let mut headers = common(HOST, BARE, false, Some(REPLY));
        headers.extend(h(&[("cmd-id", "c-42")]));
        check(Word::CmdQuery, headers, None);
        let mut headers = common(HOST, BARE, true, None);
        headers.extend(h(&[("cmd-id", "c-42")]));
        check(Word::CmdAck, headers, None);
    }

    #[test]
    fn cmd_status() {
        let mut headers = common(GUEST, JSON, false, None);
        headers.extend(h(&[("cmd-id", "c-42")]));
        let frame = example(Word::CmdStatus);
        check(Word::CmdStatus, headers, Some(&split_body(&frame.body).1));
        let json = json_of(&frame);
        assert_eq!(json["state"], "running");
        assert_eq!(json["pid"], 4242);
        assert_eq!(json["usage"]["ru_utime"], 0.5);
    }

    #[test]
    fn file_put_and_get() {
        let mut headers = common(HOST, JSON, true, Some(REPLY));
        headers.extend(h(&[("transfer-id", "t-1")]));
        let payload = format!(
            r#"{{"path":"/tmp/input.dat","size":4,"sha256":"{SHA}","mode":420,"chunk_size":262144,"window":8}}"#
        );
        check(Word::FilePut, headers, Some(payload.as_bytes()));
        let mut headers = common(HOST, JSON, true, Some(REPLY));
        headers.extend(h(&[("transfer-id", "t-2")]));
        let payload = r#"{"path":"/tmp/output.dat","offset":0,"chunk_size":262144,"window":8}"#;
        check(Word::FileGet, headers, Some(payload.as_bytes()));
    }

    #[test]
    fn file_ready_chunk_ack_end_done() {
        let mut headers = common(GUEST, JSON, true, None);
        headers.extend(h(&[("transfer-id", "t-2")]));
        let payload = format!(r#"{{"offset":0,"size":4,"sha256":"{SHA}"}}"#);
        check(Word::FileReady, headers, Some(payload.as_bytes()));
        let mut headers = common(HOST, BINARY, true, None);
        headers.extend(h(&[("transfer-id", "t-1"), ("offset", "0")]));
        check(Word::FileChunk, headers, Some(b"test"));
        let mut headers = common(GUEST, BARE, false, None);
        headers.extend(h(&[("transfer-id", "t-1"), ("offset", "4")]));
        check(Word::FileAck, headers, None);
        let mut headers = common(HOST, BARE, true, None);
        headers.extend(h(&[("transfer-id", "t-1"), ("size", "4"), ("sha256", SHA)]));
        check(Word::FileEnd, headers, None);
        let mut headers = common(GUEST, JSON, true, None);
        headers.extend(h(&[("transfer-id", "t-1")]));
        check(
            Word::FileDone,
            headers,
            Some(format!(r#"{{"size":4,"sha256":"{SHA}"}}"#).as_bytes()),
        );
    }

    #[test]
    fn file_error_and_abort() {
        let mut headers = common(GUEST, JSON, true, None);
        headers.extend(h(&[("transfer-id", "t-2")]));
        let payload =
            r#"{"code":"not-found","message":"/tmp/output.dat: No such file or directory"}"#;
        check(Word::FileError, headers, Some(payload.as_bytes()));
        let mut headers = common(HOST, BARE, true, None);
        headers.extend(h(&[
            ("transfer-id", "t-2"),
            ("reason", "cancelled by user"),
        ]));
        check(Word::FileAbort, headers, None);
    }

    #[test]
    fn aint() {
        let mut headers = common(GUEST, BARE, false, None);
        headers.extend(h(&[
            ("word", "FROB"),
            ("reason", "\"FROB\" is not a word of this protocol"),
        ]));
        check(Word::Aint, headers, None);
    }

    #[test]
    fn every_word_has_an_example_and_parses_back_from_its_name() {
        for word in Word::ALL {
            assert_eq!(Word::parse(word.as_str()), Some(word));
            assert_eq!(
                examples()
                    .iter()
                    .filter(|(m, _, _)| m.kind() == word)
                    .count(),
                1,
                "{word}"
            );
        }
        assert_eq!(Word::parse("CMD_RESULTS"), Some(Word::CmdResult));
        assert_eq!(Word::parse("hello"), None);
    }

    #[test]
    fn file_error_codes_are_the_documented_strings() {
        for code in FileErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<FileErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn outcomes_and_phases_are_the_documented_strings() {
        let outcomes = [
            (CommandOutcome::Exited, "exited"),
            (CommandOutcome::Signalled, "signalled"),
            (CommandOutcome::TimedOut, "timed-out"),
            (CommandOutcome::Cancelled, "cancelled"),
            (CommandOutcome::FailedToStart, "failed-to-start"),
            (CommandOutcome::Lost, "lost"),
        ];
        for (outcome, name) in outcomes {
            assert_eq!(serde_json::to_value(outcome).unwrap(), name);
        }
        let phases = [
            (CommandPhase::Queued, "queued"),
            (CommandPhase::Running, "running"),
            (CommandPhase::Finished, "finished"),
            (CommandPhase::Unknown, "unknown"),
        ];
        for (phase, name) in phases {
            assert_eq!(serde_json::to_value(phase).unwrap(), name);
        }
    }

    fn frame(headers: &[(&str, &str)], body: &[u8]) -> Frame {
        let mut frame = Frame::new(Command::Message).with_body(body.to_vec());
        frame.headers = h(headers);
        frame
    }

    #[test]
    fn original_style_result_with_six_keys_decodes() {
        let body = br#"CMD_RESULTS {"cmd-id": "42", "out": "hi\n", "err": "", "finished": false,
            "exitCodeOrSignal": 9, "resources": {"ru_utime": 0.01, "ru_stime": 0.002,
            "ru_maxrss": 1234, "ru_minflt": 5, "ru_majflt": 0, "ru_inblock": 0, "ru_oublock": 8,
            "ru_nvcsw": 2, "ru_nivcsw": 1, "ru_ixrss": 0, "ru_idrss": 0, "ru_isrss": 0,
            "ru_nswap": 0, "ru_msgsnd": 0, "ru_msgrcv": 0, "ru_nsignals": 0}}"#;
        let envelope = decode(&frame(&[("cmd-id", "42")], body)).unwrap();
        assert_eq!(envelope.protocol, 0);
        assert_eq!(envelope.from, None);
        let Message::CmdResult(result) = envelope.message else {
            panic!("not a result")
        };
        assert_eq!(result.cmd_id, "42");
        assert_eq!(result.out, "hi\n");
        assert!(!result.finished);
        assert_eq!(result.exit_code_or_signal, 9);
        assert_eq!(result.resources.ru_maxrss, 1234);
        assert_eq!(result.resources.ru_utime, 0.01);
        assert_eq!(result.state, CommandOutcome::Signalled);
        assert_eq!(result.out_bytes, 3);
        assert_eq!(result.err_bytes, 0);
        assert_eq!(
            (result.error, result.started_at, result.out_file),
            (None, None, None)
        );
        assert!(!result.out_truncated);
    }

    #[test]
    fn result_with_unknown_keys_and_mismatched_header() {
        let body =
            br#"CMD_RESULT {"cmd-id":"1","finished":true,"exitCodeOrSignal":0,"future":[1]}"#;
        let Message::CmdResult(result) = decode(&frame(&[], body)).unwrap().message else {
            panic!("not a result")
        };
        assert_eq!(result.state, CommandOutcome::Exited);
        let err = decode(&frame(&[("cmd-id", "2")], body)).unwrap_err();
        assert!(
            matches!(
                err,
                WordError::BadHeader {
                    header: "cmd-id",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn version_0_cmd_run_takes_its_spec_from_headers() {
        let headers = [
            ("to", "52:54:00:*"),
            ("cmd-id", "7"),
            ("cmd", "/bin/ls"),
            ("args", r#"["-l", "/tmp"]"#),
            ("env", r#"{"A": "1"}"#),
            ("path", "/"),
            ("fileForStdin", ""),
        ];
        let envelope = decode(&frame(&headers, b"CMD_RUN")).unwrap();
        assert_eq!(envelope.protocol, 0);
        assert_eq!(envelope.reply_to, None);
        let Message::CmdRun { cmd_id, to, spec } = envelope.message else {
            panic!("not CMD_RUN")
        };
        assert_eq!((cmd_id.as_str(), to.as_str()), ("7", "52:54:00:*"));
        assert_eq!(spec.cmd, "/bin/ls");
        assert_eq!(spec.args, ["-l", "/tmp"]);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.path.as_deref(), Some("/"));
        assert_eq!(spec.file_for_stdin, None);
        assert!(spec.stream);

        let minimal = decode(&frame(
            &[("to", "*"), ("cmd-id", "8"), ("cmd", "true")],
            b"CMD_RUN\n",
        ));
        let Message::CmdRun { spec, .. } = minimal.unwrap().message else {
            panic!("not CMD_RUN")
        };
        assert_eq!(spec, CommandSpec::new("true"));

        let bad_args = decode(&frame(
            &[("to", "*"), ("cmd-id", "8"), ("cmd", "ls"), ("args", "-l")],
            b"CMD_RUN",
        ));
        assert!(matches!(
            bad_args,
            Err(WordError::BadHeader { header: "args", .. })
        ));
        let no_cmd = decode(&frame(&[("to", "*"), ("cmd-id", "8")], b"CMD_RUN"));
        assert!(matches!(
            no_cmd,
            Err(WordError::MissingHeader { header: "cmd", .. })
        ));
    }

    #[test]
    fn version_1_requests_need_reply_to() {
        let headers = [("vmc-protocol", "1"), ("ping-id", "p")];
        let err = decode(&frame(&headers, b"PING")).unwrap_err();
        assert!(matches!(
            err,
            WordError::MissingHeader {
                header: "reply-to",
                ..
            }
        ));
        assert!(decode(&frame(&[("ping-id", "p")], b"PING")).is_ok());
        let err = encode(
            &Message::Ping {
                ping_id: "p".into(),
            },
            HOST,
            None,
            DEFAULT_MAX_FRAME_SIZE,
        );
        assert!(matches!(
            err,
            Err(WordError::MissingHeader {
                header: "reply-to",
                ..
            })
        ));
    }

    #[test]
    fn version_0_beacons_decode() {
        let alive = decode(&frame(&[("ip", "10.0.0.2")], b"STILL_ALIVE")).unwrap();
        let expected = LoadSummary {
            ip: Some("10.0.0.2".into()),
            ..LoadSummary::default()
        };
        assert_eq!(alive.message, Message::StillAlive(expected));
        let bye = decode(&frame(&[("ip", "10.0.0.2")], b"BYE")).unwrap();
        assert_eq!(bye.message, Message::Bye { reason: None });
    }

    #[test]
    fn separators() {
        let ping = |body: &[u8]| decode(&frame(&[("ping-id", "p")], body)).map(|e| e.message);
        let expected = Message::Ping {
            ping_id: "p".into(),
        };
        for body in [
            &b"PING"[..],
            b"PING ",
            b"PING\n",
            b"PING\r\n",
            b"PING\t",
            b"PING\nignored",
        ] {
            assert_eq!(ping(body).unwrap(), expected, "{body:?}");
        }
        let chunk = |body: &[u8]| {
            let headers = [("transfer-id", "t"), ("offset", "0")];
            match decode(&frame(&headers, body)).unwrap().message {
                Message::FileChunk { data, .. } => data,
                other => panic!("{other:?}"),
            }
        };
        // Exactly one separator is skipped: the rest is data, whitespace included.
        assert_eq!(&chunk(b"FILE_CHUNK  \n")[..], b" \n");
        assert_eq!(&chunk(b"FILE_CHUNK\r\n\r\n")[..], b"\r\n");
        assert_eq!(&chunk(b"FILE_CHUNK\n\0\xff")[..], b"\0\xff");
        assert_eq!(&chunk(b"FILE_CHUNK")[..], b"");
    }

    #[test]
    fn unknown_and_empty_bodies() {
        let err = decode(&frame(&[], b"FROB the thing")).unwrap_err();
        assert!(matches!(&err, WordError::Unknown { word } if word == "FROB"));
        let Some(Message::Aint { word, reason }) = err.aint() else {
            panic!("no AINT")
        };
        assert_eq!(word, "FROB");
        assert!(reason.contains("FROB"));
        assert!(matches!(decode(&frame(&[], b"")), Err(WordError::Empty)));
        assert!(matches!(
            decode(&frame(&[], b" PING")),
            Err(WordError::Empty)
        ));
        let long = vec![b'X'; 100_000];
        let Err(WordError::Unknown { word }) = decode(&frame(&[], &long)) else {
            panic!()
        };
        assert!(word.len() <= 64);
        let invalid_utf8 = decode(&frame(&[], b"\xff\xfe rest"));
        assert!(matches!(invalid_utf8, Err(WordError::Unknown { .. })));
    }

    #[test]
    fn aint_is_never_answered_with_aint() {
        // A malformed AINT cannot happen (AINT is lenient), but a bad protocol header can.
        let err = decode(&frame(&[("vmc-protocol", "x")], b"AINT")).unwrap_err();
        assert!(matches!(err, WordError::BadHeader { word: "AINT", .. }));
        assert!(err.aint().is_none());
        assert_eq!(
            decode(&frame(&[], b"AINT")).unwrap().message,
            Message::Aint {
                word: String::new(),
                reason: String::new()
            }
        );
    }

    #[test]
    fn bad_headers_are_reported_by_name() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [u8], &'a str);
        let cases: [Case<'_>; 6] = [
            (&[("vmc-protocol", "one")], b"BYE", "vmc-protocol"),
            (
                &[("cmd-id", "c"), ("stream", "both"), ("offset", "0")],
                b"CMD_OUTPUT x",
                "stream",
            ),
            (
                &[("cmd-id", "c"), ("stream", "out"), ("offset", "-1")],
                b"CMD_OUTPUT x",
                "offset",
            ),
            (
                &[("cmd-id", "c"), ("grace-secs", "NaN")],
                b"CMD_CANCEL",
                "grace-secs",
            ),
            (&[("cmd-id", "")], b"CMD_ACK", "cmd-id"),
            (
                &[("transfer-id", "t"), ("size", "4x"), ("sha256", SHA)],
                b"FILE_END",
                "size",
            ),
        ];
        for (headers, body, name) in cases {
            let err = decode(&frame(headers, body)).unwrap_err();
            assert!(
                matches!(err, WordError::BadHeader { header, .. } if header == name),
                "{err}"
            );
            assert!(err.aint().is_some());
        }
        let err = decode(&frame(&[], b"FILE_ACK")).unwrap_err();
        assert!(matches!(
            err,
            WordError::MissingHeader {
                word: "FILE_ACK",
                header: "transfer-id"
            }
        ));
        let err = decode(&frame(&[("cmd-id", "c")], b"CMD_STARTED {\"pid\":-1}")).unwrap_err();
        assert!(matches!(
            err,
            WordError::BadPayload {
                word: "CMD_STARTED",
                ..
            }
        ));
        assert!(err
            .aint()
            .is_some_and(|m| matches!(m, Message::Aint { reason, .. } if reason.contains("u32"))));
    }

    #[test]
    fn other_frames_are_not_messages() {
        let err = decode(&Frame::new(Command::Receipt).with_body("PING")).unwrap_err();
        assert!(matches!(
            err,
            WordError::NotAMessage {
                command: Command::Receipt
            }
        ));
        assert!(err.aint().is_none());
    }

    #[test]
    fn non_finite_floats_read_back_as_zero() {
        let load = LoadSummary {
            load1: f64::NAN,
            ..LoadSummary::default()
        };
        let frame = encode(
            &Message::StillAlive(load),
            GUEST,
            None,
            DEFAULT_MAX_FRAME_SIZE,
        )
        .unwrap();
        let Message::StillAlive(load) = decode(&frame).unwrap().message else {
            panic!()
        };
        assert_eq!(load.load1, 0.0);
        let cancel = Message::CmdCancel {
            cmd_id: "c".into(),
            grace_secs: Some(f64::INFINITY),
        };
        let err = encode(&cancel, HOST, Some(REPLY), DEFAULT_MAX_FRAME_SIZE).unwrap_err();
        assert!(matches!(
            err,
            WordError::BadHeader {
                header: "grace-secs",
                ..
            }
        ));
    }

    #[test]
    fn size_limits() {
        let output = |len| Message::CmdOutput {
            cmd_id: "c".into(),
            stream: OutputStream::Err,
            offset: 0,
            data: Bytes::from(vec![0u8; len]),
        };
        assert!(encode(
            &output(MAX_OUTPUT_CHUNK),
            GUEST,
            None,
            DEFAULT_MAX_FRAME_SIZE
        )
        .is_ok());
        let err = encode(
            &output(MAX_OUTPUT_CHUNK + 1),
            GUEST,
            None,
            DEFAULT_MAX_FRAME_SIZE,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            WordError::TooLarge {
                word: "CMD_OUTPUT",
                limit: MAX_OUTPUT_CHUNK,
                ..
            }
        ));
        let chunk = |len| Message::FileChunk {
            transfer_id: "t".into(),
            offset: 0,
            data: Bytes::from(vec![0u8; len]),
        };
        let max = MAX_FILE_CHUNK_SIZE as usize;
        assert!(encode(&chunk(max), HOST, None, DEFAULT_MAX_FRAME_SIZE).is_ok());
        assert!(matches!(
            encode(&chunk(max + 1), HOST, None, DEFAULT_MAX_FRAME_SIZE),
            Err(WordError::TooLarge { .. })
        ));
        // A small limit is honoured, headroom included.
        let frame = encode(&chunk(1000), HOST, None, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let needed = wire_size(&frame) + FRAME_HEADROOM;
        assert!(encode(&chunk(1000), HOST, None, needed).is_ok());
        let err = encode(&chunk(1000), HOST, None, needed - 1).unwrap_err();
        assert!(
            matches!(err, WordError::TooLarge { size, limit, .. } if size == needed && limit == needed - 1)
        );
        assert!(err.aint().is_none());
    }

    #[test]
    fn wire_size_counts_escapes() {
        let frame = Frame::new(Command::Send)
            .with_header("a:b", "c\nd")
            .with_body("xy");
        // "SEND\n" + "a\cb:c\nd\n" + "\n" + "xy" + NUL
        assert_eq!(wire_size(&frame), 5 + 10 + 1 + 2 + 1);
    }

    #[test]
    fn empty_ids_are_refused_on_encode() {
        let err = encode(
            &Message::CmdAck {
                cmd_id: String::new(),
            },
            HOST,
            None,
            DEFAULT_MAX_FRAME_SIZE,
        );
        assert!(matches!(
            err,
            Err(WordError::BadHeader {
                header: "cmd-id",
                ..
            })
        ));
        let run = Message::CmdRun {
            cmd_id: "c".into(),
            to: String::new(),
            spec: CommandSpec::new("ls"),
        };
        let err = encode(&run, HOST, Some(REPLY), DEFAULT_MAX_FRAME_SIZE);
        assert!(matches!(
            err,
            Err(WordError::BadHeader { header: "to", .. })
        ));
    }

    #[test]
    fn multicast_frames_are_for_guests_their_to_matches() {
        let guest = GuestId::new(GUEST).unwrap();
        let frame = |to: Option<&str>| {
            let frame = Frame::new(Command::Message).with_body("CMD_QUERY");
            match to {
                Some(to) => frame.with_header("to", to),
                None => frame,
            }
        };
        assert!(is_addressed_to(&frame(Some("52:54:00:*")), &guest));
        assert!(is_addressed_to(&frame(Some(GUEST)), &guest));
        assert!(!is_addressed_to(&frame(Some("52:54:01:*")), &guest));
        assert!(!is_addressed_to(&frame(None), &guest));
    }

    #[test]
    fn envelope_names_its_sender() {
        let frame = example(Word::CmdRun);
        assert_eq!(decode(&frame).unwrap().sender().unwrap().to_string(), HOST);
    }

    #[test]
    fn sha256_hex_check() {
        assert!(is_sha256_hex(SHA));
        assert!(!is_sha256_hex(&SHA.to_uppercase()));
        assert!(!is_sha256_hex(&SHA[1..]));
    }

    /// Renders a frame as `docs/PROTOCOL.md` shows it: destination and content-length
    /// added as the caller and the codec add them, NUL written `^@`.
    fn render(mut frame: Frame, destination: &str) -> String {
        frame.set_header("destination", destination);
        frame.set_header("content-length", frame.body.len().to_string());
        let mut text = format!("{}\n", frame.command);
        for (name, value) in &frame.headers {
            text.push_str(&format!("{name}:{value}\n"));
        }
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&frame.body));
        text.push_str("^@");
        text
    }

    fn example_destination(msg: &Message, from: &str) -> &'static str {
        match msg {
            Message::Hello(_) | Message::StillAlive(_) | Message::Bye { .. } => {
                "/topic/vmc.connections"
            }
            _ if from == HOST => "/queue/vmc.guest.52:54:00:AB:CD:EF",
            _ => REPLY,
        }
    }

    #[test]
    fn protocol_md_shows_every_word_as_encoded() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
        let doc = std::fs::read_to_string(path).expect("docs/PROTOCOL.md is readable");
        let mut missing = Vec::new();
        for (msg, from, reply_to) in examples() {
            let frame = encode(&msg, from, reply_to, DEFAULT_MAX_FRAME_SIZE).unwrap();
            let text = render(frame, example_destination(&msg, from));
            if !doc.contains(&text) {
                missing.push(text);
            }
        }
        assert!(
            missing.is_empty(),
            "PROTOCOL.md lacks these example frames:\n\n{}",
            missing.join("\n\n")
        );
    }

    // Property tests.

    /// Any string: controls, newlines, colons, NULs and non-ASCII included.
    fn any_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                2 => any::<char>(),
                1 => prop::sample::select(vec!['\n', '\r', ':', '\\', ' ', '\0', 'é', '😀']),
            ],
            0..24,
        )
        .prop_map(String::from_iter)
    }

    fn id_text() -> impl Strategy<Value = String> {
        any_text().prop_filter("ids are not empty", |s| !s.is_empty())
    }

    fn bytes() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    /// Finite floats that print and parse back exactly (dyadic, few digits).
    fn float() -> impl Strategy<Value = f64> {
        (0u32..10_000_000).prop_map(|n| f64::from(n) / 1024.0)
    }

    fn guest_id() -> impl Strategy<Value = GuestId> {
        let chars: Vec<char> = ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain(['_', ':', '-'])
            .collect();
        prop::collection::vec(prop::sample::select(chars), 1..=64)
            .prop_filter_map("valid id", |c| GuestId::new(String::from_iter(c)).ok())
    }

    fn usage() -> impl Strategy<Value = ResourceUsage> {
        (float(), float(), prop::collection::vec(any::<i64>(), 14)).prop_map(|(ut, st, n)| {
            ResourceUsage {
                ru_utime: ut,
                ru_stime: st,
                ru_maxrss: n[0],
                ru_ixrss: n[1],
                ru_idrss: n[2],
                ru_isrss: n[3],
                ru_minflt: n[4],
                ru_majflt: n[5],
                ru_nswap: n[6],
                ru_inblock: n[7],
                ru_oublock: n[8],
                ru_msgsnd: n[9],
                ru_msgrcv: n[10],
                ru_nsignals: n[11],
                ru_nvcsw: n[12],
                ru_nivcsw: n[13],
            }
        })
    }

    fn guest_info_strategy() -> impl Strategy<Value = GuestInfo> {
        (
            guest_id(),
            prop::collection::vec(any_text(), 0..3),
            prop::option::of(any_text()),
            (any_text(), any_text(), any_text(), any_text()),
            (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
            prop::collection::vec(any_text(), 0..3),
        )
            .prop_map(
                |(
                    id,
                    ips,
                    mac,
                    (hostname, os, kernel, agent_version),
                    (protocol, cpus, memory_bytes, boot_time),
                    capabilities,
                )| {
                    GuestInfo {
                        id,
                        ips,
                        mac,
                        hostname,
                        os,
                        kernel,
                        agent_version,
                        protocol,
                        cpus,
                        memory_bytes,
                        boot_time,
                        capabilities,
                    }
                },
            )
    }

    fn load_strategy() -> impl Strategy<Value = LoadSummary> {
        (
            prop::option::of(any_text()),
            (float(), float(), float()),
            (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()),
        )
            .prop_map(
                |(
                    ip,
                    (load1, load5, load15),
                    (mem_used_bytes, mem_total_bytes, running_cmds, uptime_secs),
                )| LoadSummary {
                    ip,
                    load1,
                    load5,
                    load15,
                    mem_used_bytes,
                    mem_total_bytes,
                    running_cmds,
                    uptime_secs,
                },
            )
    }

    fn spec_strategy() -> impl Strategy<Value = CommandSpec> {
        (
            any_text(),
            prop::collection::vec(any_text(), 0..4),
            prop::collection::btree_map(any_text(), any_text(), 0..4),
            (prop::option::of(any_text()), prop::option::of(any_text())),
            (
                prop::option::of(float()),
                prop::option::of(any::<u64>()),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(cmd, args, env, (path, file_for_stdin), (timeout_secs, output_limit, stream))| {
                    CommandSpec {
                        cmd,
                        args,
                        env,
                        path,
                        file_for_stdin,
                        timeout_secs,
                        output_limit,
                        stream,
                    }
                },
            )
    }

    fn outcome() -> impl Strategy<Value = CommandOutcome> {
        prop::sample::select(CommandOutcome::ALL.to_vec())
    }

    fn result_strategy() -> impl Strategy<Value = CommandResult> {
        (
            (
                id_text(),
                any_text(),
                any_text(),
                any::<bool>(),
                any::<i32>(),
                usage(),
            ),
            (
                outcome(),
                prop::option::of(any_text()),
                prop::option::of(any_text()),
                prop::option::of(any_text()),
                float(),
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>(),
                prop::option::of(any_text()),
                prop::option::of(any_text()),
            ),
        )
            .prop_map(
                |(
                    (cmd_id, out, err, finished, exit_code_or_signal, resources),
                    (state, error, started_at, ended_at, wall_secs),
                    (out_bytes, err_bytes, out_truncated, err_truncated, out_file, err_file),
                )| CommandResult {
                    cmd_id,
                    out,
                    err,
                    finished,
                    exit_code_or_signal,
                    resources,
                    state,
                    error,
                    started_at,
                    ended_at,
                    wall_secs,
                    out_bytes,
                    err_bytes,
                    out_truncated,
                    err_truncated,
                    out_file,
                    err_file,
                },
            )
    }

    fn status_strategy() -> impl Strategy<Value = CommandStatus> {
        (
            prop::sample::select(vec![
                CommandPhase::Queued,
                CommandPhase::Running,
                CommandPhase::Finished,
                CommandPhase::Unknown,
            ]),
            prop::option::of(any::<u32>()),
            usage(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(state, pid, usage, out_bytes, err_bytes)| CommandStatus {
                state,
                pid,
                usage,
                out_bytes,
                err_bytes,
            })
    }

    fn presence_and_commands() -> impl Strategy<Value = Message> {
        prop_oneof![
            guest_info_strategy().prop_map(Message::Hello),
            load_strategy().prop_map(Message::StillAlive),
            prop::option::of(any_text()).prop_map(|reason| Message::Bye { reason }),
            Just(Message::SayHello),
            id_text().prop_map(|ping_id| Message::Ping { ping_id }),
            id_text().prop_map(|ping_id| Message::Pong { ping_id }),
            (id_text(), id_text(), spec_strategy())
                .prop_map(|(cmd_id, to, spec)| Message::CmdRun { cmd_id, to, spec }),
            (id_text(), any::<u32>(), any_text()).prop_map(|(cmd_id, pid, started_at)| {
                Message::CmdStarted {
                    cmd_id,
                    pid,
                    started_at,
                }
            }),
            (id_text(), any::<bool>(), any::<u64>(), bytes()).prop_map(
                |(cmd_id, out, offset, data)| {
                    let stream = if out {
                        OutputStream::Out
                    } else {
                        OutputStream::Err
                    };
                    Message::CmdOutput {
                        cmd_id,
                        stream,
                        offset,
                        data,
                    }
                }
            ),
            result_strategy().prop_map(Message::CmdResult),
        ]
    }

    fn command_control() -> impl Strategy<Value = Message> {
        prop_oneof![
            (id_text(), prop::option::of(float()))
                .prop_map(|(cmd_id, grace_secs)| Message::CmdCancel { cmd_id, grace_secs }),
            id_text().prop_map(|cmd_id| Message::CmdQuery { cmd_id }),
            (id_text(), status_strategy())
                .prop_map(|(cmd_id, status)| Message::CmdStatus { cmd_id, status }),
            id_text().prop_map(|cmd_id| Message::CmdAck { cmd_id }),
            (any_text(), any_text()).prop_map(|(word, reason)| Message::Aint { word, reason }),
        ]
    }

    fn file_words() -> impl Strategy<Value = Message> {
        let code = prop::sample::select(FileErrorCode::ALL.to_vec());
        prop_oneof![
            (
                id_text(),
                any_text(),
                any::<u64>(),
                prop::option::of(any_text()),
                prop::option::of(any::<u32>()),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(
                    |(transfer_id, path, size, sha256, mode, chunk_size, window)| {
                        Message::FilePut {
                            transfer_id,
                            offer: FileOffer {
                                path,
                                size,
                                sha256,
                                mode,
                                chunk_size,
                                window,
                            },
                        }
                    }
                ),
            (
                id_text(),
                any_text(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(transfer_id, path, offset, chunk_size, window)| {
                    Message::FileGet {
                        transfer_id,
                        request: FileRequest {
                            path,
                            offset,
                            chunk_size,
                            window,
                        },
                    }
                }),
            (
                id_text(),
                any::<u64>(),
                prop::option::of(any::<u64>()),
                prop::option::of(any_text())
            )
                .prop_map(|(transfer_id, offset, size, sha256)| Message::FileReady {
                    transfer_id,
                    offset,
                    size,
                    sha256
                }),
            (id_text(), any::<u64>(), bytes()).prop_map(|(transfer_id, offset, data)| {
                Message::FileChunk {
                    transfer_id,
                    offset,
                    data,
                }
            }),
            (id_text(), any::<u64>()).prop_map(|(transfer_id, offset)| Message::FileAck {
                transfer_id,
                offset
            }),
            (id_text(), any::<u64>(), any_text()).prop_map(|(transfer_id, size, sha256)| {
                Message::FileEnd {
                    transfer_id,
                    size,
                    sha256,
                }
            }),
            (id_text(), any::<u64>(), any_text()).prop_map(|(transfer_id, size, sha256)| {
                Message::FileDone {
                    transfer_id,
                    size,
                    sha256,
                }
            }),
            (id_text(), code, any_text()).prop_map(|(transfer_id, code, message)| {
                Message::FileError {
                    transfer_id,
                    code,
                    message,
                }
            }),
            (id_text(), prop::option::of(any_text())).prop_map(|(transfer_id, reason)| {
                Message::FileAbort {
                    transfer_id,
                    reason,
                }
            }),
        ]
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![presence_and_commands(), command_control(), file_words()]
    }

    /// Frames a receiver might be handed: known words with junk, or junk.
    fn garbage_frame() -> impl Strategy<Value = Frame> {
        let names: Vec<&str> = vec![
            header::PROTOCOL,
            header::FROM,
            header::REPLY_TO,
            header::CMD_ID,
            header::TO,
            header::STREAM,
            header::OFFSET,
            header::GRACE_SECS,
            header::TRANSFER_ID,
            header::SIZE,
            header::SHA256,
            header::PING_ID,
            header::WORD,
            header::REASON,
            header::CMD,
            header::ARGS,
            header::ENV,
            header::PATH,
            header::FILE_FOR_STDIN,
        ];
        let header_name = prop_oneof![
            prop::sample::select(names).prop_map(str::to_owned),
            any_text()
        ];
        let header_value = prop_oneof![
            any_text(),
            Just("1".to_owned()),
            Just("out".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("[\"a\"]".to_owned()),
            Just("{}".to_owned()),
        ];
        let words: Vec<String> = Word::ALL.iter().map(|w| w.as_str().to_owned()).collect();
        let first = prop_oneof![prop::sample::select(words), any_text()];
        let separator = prop::sample::select(vec!["", " ", "\n", "\r\n", "\r", "\t", "  "]);
        let payload = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            any_text().prop_map(String::into_bytes),
            Just(b"{}".to_vec()),
            Just(br#"{"cmd-id":"x","finished":true,"exitCodeOrSignal":1,"state":"nope"}"#.to_vec()),
            Just(br#"{"offset":1e400,"size":-1,"pid":null}"#.to_vec()),
        ];
        (
            prop::sample::select(vec![Command::Message, Command::Send, Command::Error]),
            prop::collection::vec((header_name, header_value), 0..8),
            first,
            separator,
            payload,
        )
            .prop_map(|(command, headers, first, separator, payload)| {
                let mut body = format!("{first}{separator}").into_bytes();
                body.extend(payload);
                let mut frame = Frame::new(command).with_body(body);
                frame.headers = headers;
                frame
            })
    }

    proptest! {
        #[test]
        fn every_message_survives_encode_then_decode(
            msg in any_message(),
            from in any_text(),
            reply_to in prop::option::of(any_text()),
        ) {
            let reply_to = if msg.kind().needs_reply_to() {
                Some(reply_to.unwrap_or_default())
            } else {
                reply_to
            };
            let frame = encode(&msg, &from, reply_to.as_deref(), DEFAULT_MAX_FRAME_SIZE).unwrap();
            prop_assert_eq!(frame.header("content-type"), Some(msg.kind().payload_kind().content_type()));
            prop_assert_eq!(frame.header("persistent").is_some(), msg.kind().is_persistent());
            prop_assert!(frame.body.starts_with(msg.word().as_bytes()));
            let envelope = decode(&frame).unwrap();
            prop_assert_eq!(envelope.message, msg);
            prop_assert_eq!(envelope.from, Some(from));
            prop_assert_eq!(envelope.reply_to, reply_to);
            prop_assert_eq!(envelope.protocol, PROTOCOL_VERSION);
        }

        #[test]
        fn garbage_never_panics(frame in garbage_frame()) {
            if let Err(err) = decode(&frame) {
                let _ = err.to_string();
                let _ = err.aint();
            }
        }

        #[test]
        fn mangled_messages_never_panic(
            msg in any_message(),
            cut in any::<prop::sample::Index>(),
            drop_header in any::<prop::sample::Index>(),
        ) {
            let mut frame = encode(&msg, "x", Some("y"), DEFAULT_MAX_FRAME_SIZE).unwrap();
            let at = cut.index(frame.body.len() + 1);
            frame.body = frame.body.slice(..at);
            let _ = decode(&frame);
            if !frame.headers.is_empty() {
                frame.headers.remove(drop_header.index(frame.headers.len()));
            }
            let _ = decode(&frame);
        }
    }
}
