//! Live events: `GET /api/v1/events`, a Server-Sent Events stream of what the
//! engine does, so that no caller has to poll.
//!
//! Each stream follows [`Engine::events`] and writes one SSE event per engine
//! event it lets through: `vm` (a VM's state or its guest's presence changed),
//! `command` (a command changed state; a final state carries its outcome and exit
//! code), `output` (a chunk of a command's output: `stream`, byte `offset`, `data`
//! in base64), `transfer` (a transfer progressed or ended), and `lagged` (`missed`:
//! how many events this stream lost because its caller read too slowly: the
//! engine's broadcast never waits for a follower, so a slow caller cannot slow the
//! engine, it misses events instead). A comment line is sent at once and every
//! [`KEEP_ALIVE`], so proxies keep the stream open and a vanished caller is noticed.
//!
//! Filters: `?vm=a,b` passes only events about those VMs. `?cmd=id1,id2` follows
//! those commands only, and losslessly: their output so far is replayed from the
//! store first, a gap (a lag, a chunk out of order) is filled from the store, and
//! the stream ends after the last of them finished (its `command` event is the
//! last one), which is what `vmc run` reads. What this module does not do: resume
//! a broken stream from an event id (the output endpoint reads from any offset).

use super::json::wire::{self, EventsQuery};
use super::json::{Answer, JsonError};
use super::ops::{self, ApiError};
use crate::engine::{Engine, EngineEvent};
use crate::store::{CommandRecord, CommandState};
use actix_web::{web, HttpResponse};
use bytes::Bytes;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use vmc_protocol::words::OutputStream;

/// How often an idle stream sends a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The most output one replayed `output` event carries.
const REPLAY_PAGE: usize = 256 * 1024;

/// The most commands one stream follows.
pub const MAX_FOLLOWED_COMMANDS: usize = 1000;

/// Commands whose VM a stream remembers (for `?vm=`) before it starts afresh.
const VM_CACHE: usize = 10_000;

/// How soon a followed command whose end was announced, but is not stored yet,
/// is looked at again.
const RECHECK: Duration = Duration::from_millis(50);

/// Event streams open now.
static OPEN_STREAMS: AtomicU64 = AtomicU64::new(0);

/// Events that streams missed because their callers read too slowly.
static MISSED_EVENTS: AtomicU64 = AtomicU64::new(0);

/// How many event streams are open.
pub fn open_streams() -> u64 {
    OPEN_STREAMS.load(Ordering::Relaxed)
}

/// How many events slow callers missed, in all streams since the start.
pub fn missed_events() -> u64 {
    MISSED_EVENTS.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// The events as sent.

#[derive(Debug, Serialize)]
struct VmEvent<'a> {
    vm: &'a str,
    state: &'static str,
    presence: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CommandEvent<'a> {
    cmd_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<&'a str>,
    state: &'static str,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code_or_signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OutputEvent<'a> {
    cmd_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<&'a str>,
    stream: &'static str,
    offset: u64,
    data: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TransferEvent<'a> {
    transfer_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<&'static str>,
    bytes_done: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct LaggedEvent {
    missed: u64,
}

/// One SSE event: `event: <name>` and one `data:` line of compact JSON.
fn sse<T: Serialize>(name: &str, data: &T) -> Bytes {
    // The event types above have no maps with non-string keys and no floats, so
    // they always serialize.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

fn vm_frame(vm: &str, state: crate::hypervisor::VmState, presence: &'static str) -> Bytes {
    sse(
        "vm",
        &VmEvent {
            vm,
            state: state.as_str(),
            presence,
        },
    )
}

/// A command's state; with the outcome and error when the record has them.
fn command_frame(
    cmd_id: &str,
    vm: Option<&str>,
    state: CommandState,
    record: Option<&CommandRecord>,
) -> Bytes {
    let result = record.and_then(|r| r.result.as_ref());
    sse(
        "command",
        &CommandEvent {
            cmd_id,
            vm,
            state: state.as_str(),
            done: state.is_final(),
            outcome: result.map(|r| r.state.as_str()),
            exit_code_or_signal: result.map(|r| r.exit_code_or_signal),
            error: record.and_then(|r| r.error.as_deref()),
        },
    )
}

fn output_frame(
    cmd_id: &str,
    vm: Option<&str>,
    stream: OutputStream,
    offset: u64,
    data: &[u8],
) -> Bytes {
    sse(
        "output",
        &OutputEvent {
            cmd_id,
            vm,
            stream: stream.as_str(),
            offset,
            data: wire::base64(data),
        },
    )
}

fn lagged_frame(missed: u64) -> Bytes {
    sse("lagged", &LaggedEvent { missed })
}

const KEEP_ALIVE_FRAME: &[u8] = b": keep-alive\n\n";

// ---------------------------------------------------------------------------
// Following the engine.

/// Counts an open stream while it lives.
#[derive(Debug)]
struct OpenStream;

impl OpenStream {
    fn new() -> OpenStream {
        OPEN_STREAMS.fetch_add(1, Ordering::Relaxed);
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a followed command's streams stand.
#[derive(Debug, Default)]
struct Followed {
    vm: Option<String>,
    /// Bytes of each stream sent so far.
    out: u64,
    err: u64,
    /// The store holds more output than was sent.
    behind: bool,
    /// Its final state was sent.
    done: bool,
}

impl Followed {
    fn sent(&mut self, stream: OutputStream) -> &mut u64 {
        match stream {
            OutputStream::Out => &mut self.out,
            OutputStream::Err => &mut self.err,
        }
    }
}

/// One event stream: the engine's events, filtered and encoded.
#[derive(Debug)]
struct Follower {
    engine: Engine,
    events: Receiver<EngineEvent>,
    /// `?vm=`: only these VMs.
    vms: Option<HashSet<String>>,
    /// `?cmd=`: only these commands, replayed and followed to their end.
    commands: Option<BTreeMap<String, Followed>>,
    /// Command id → VM, for output events under `?vm=`.
    vm_of: HashMap<String, Option<String>>,
    pending: VecDeque<Bytes>,
    /// Followed commands to look at again shortly: `true` for those announced as
    /// over but not yet stored so (until they are), `false` after a lag (once).
    recheck: HashMap<String, bool>,
    keep_alive: tokio::time::Interval,
    ended: bool,
    _open: OpenStream,
}

/// A comma-separated list, without empty items.
fn list(text: Option<&str>) -> Option<Vec<String>> {
    let items: Vec<String> = text?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    (!items.is_empty()).then_some(items)
}

impl Follower {
    /// Subscribes first, then (for `?cmd=`) checks the commands and replays what
    /// they wrote so far, so nothing falls between the two.
    fn new(engine: &Engine, query: &EventsQuery) -> Result<Follower, JsonError> {
        let vms = list(query.vm.as_deref());
        let commands = list(query.cmd.as_deref());
        if vms.is_some() && commands.is_some() {
            return Err(JsonError::Api(ApiError::BadArgument(
                "give vm or cmd, not both (a command's events are about its VM anyway)".into(),
            )));
        }
        if commands
            .as_ref()
            .is_some_and(|c| c.len() > MAX_FOLLOWED_COMMANDS)
        {
            return Err(JsonError::Api(ApiError::BadArgument(format!(
                "one stream follows at most {MAX_FOLLOWED_COMMANDS} commands"
            ))));
        }
        let events = engine.events();
        let mut follower = Follower {
            engine: engine.clone(),
            events,
            vms: vms.map(|v| v.into_iter().collect()),
            commands: None,
            vm_of: HashMap::new(),
            pending: VecDeque::new(),
            recheck: HashMap::new(),
            keep_alive: tokio::time::interval(KEEP_ALIVE),
            ended: false,
            _open: OpenStream::new(),
        };
        if let Some(ids) = commands {
            let mut followed = BTreeMap::new();
            for cmd_id in ids {
                let record = ops::command_record(engine, &cmd_id)?;
                let entry = Followed {
                    vm: record.vm.clone(),
                    ..Followed::default()
                };
                followed.insert(cmd_id, entry);
            }
            let ids: Vec<String> = followed.keys().cloned().collect();
            follower.commands = Some(followed);
            for cmd_id in ids {
                follower.catch_up(&cmd_id);
            }
        }
        Ok(follower)
    }

    /// The next bytes to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Some(bytes);
            }
            if self.ended {
                return None;
            }
            if let Some(cmd_id) = self.behind() {
                self.catch_up(&cmd_id);
                continue;
            }
            let recheck = !self.recheck.is_empty();
            tokio::select! {
                received = self.events.recv() => self.on_received(received),
                _ = self.keep_alive.tick() => return Some(Bytes::from_static(KEEP_ALIVE_FRAME)),
                () = tokio::time::sleep(RECHECK), if recheck => {
                    let ids: Vec<(String, bool)> = self.recheck.drain().collect();
                    for (cmd_id, announced) in ids {
                        self.catch_up(&cmd_id);
                        if announced && !self.is_done(&cmd_id) {
                            self.recheck.insert(cmd_id, true);
                        }
                    }
                }
            }
        }
    }

    fn on_received(&mut self, received: Result<EngineEvent, RecvError>) {
        match received {
            Ok(event) => self.on_event(event),
            Err(RecvError::Lagged(missed)) => {
                MISSED_EVENTS.fetch_add(missed, Ordering::Relaxed);
                self.pending.push_back(lagged_frame(missed));
                let ids: Vec<String> = self
                    .commands
                    .iter()
                    .flat_map(|c| c.keys().cloned())
                    .collect();
                for cmd_id in ids {
                    self.catch_up(&cmd_id);
                    // An end lost in the lag may be stored a moment later.
                    if !self.is_done(&cmd_id) {
                        self.recheck.entry(cmd_id).or_insert(false);
                    }
                }
            }
            Err(RecvError::Closed) => self.ended = true,
        }
    }

    fn on_event(&mut self, event: EngineEvent) {
        if self.commands.is_some() {
            self.on_followed_command_event(event);
            return;
        }
        match event {
            EngineEvent::Vm {
                vm,
                state,
                presence,
            } => {
                if self.passes(Some(&vm)) {
                    self.pending
                        .push_back(vm_frame(&vm, state, presence.as_str()));
                }
            }
            EngineEvent::Command { cmd_id, vm, state } => {
                self.remember_vm(&cmd_id, vm.clone());
                if self.passes(vm.as_deref()) {
                    // The outcome, when the result is stored by now.
                    let record = state
                        .is_final()
                        .then(|| ops::command_record(&self.engine, &cmd_id).ok())
                        .flatten();
                    self.pending.push_back(command_frame(
                        &cmd_id,
                        vm.as_deref(),
                        state,
                        record.as_ref(),
                    ));
                }
            }
            EngineEvent::Output {
                cmd_id,
                stream,
                offset,
                data,
            } => {
                let vm = self.vm_of(&cmd_id);
                if self.passes(vm.as_deref()) {
                    self.pending.push_back(output_frame(
                        &cmd_id,
                        vm.as_deref(),
                        stream,
                        offset,
                        &data,
                    ));
                }
            }
            EngineEvent::Transfer {
                transfer_id,
                bytes_done,
                state,
            } => {
                let record = ops::transfer(&self.engine, &transfer_id).ok();
                let vm = record.as_ref().map(|r| r.vm.as_str());
                if self.passes(vm) {
                    let frame = sse(
                        "transfer",
                        &TransferEvent {
                            transfer_id: &transfer_id,
                            vm,
                            direction: record.as_ref().map(|r| r.direction.as_str()),
                            bytes_done,
                            size: record.as_ref().and_then(|r| r.size),
                            state: state.as_str(),
                            error: record.as_ref().and_then(|r| r.error.as_deref()),
                        },
                    );
                    self.pending.push_back(frame);
                }
            }
        }
    }

    /// Under `?cmd=`: output in order without gaps, and the end of each command.
    fn on_followed_command_event(&mut self, event: EngineEvent) {
        match event {
            EngineEvent::Output {
                cmd_id,
                stream,
                offset,
                data,
            } => {
                let Some(followed) = self.commands.as_mut().and_then(|c| c.get_mut(&cmd_id)) else {
                    return;
                };
                if followed.done {
                    return;
                }
                let vm = followed.vm.clone();
                let sent = followed.sent(stream);
                let end = offset + data.len() as u64;
                if end <= *sent {
                    return; // already sent (replayed from the store)
                }
                if offset > *sent {
                    self.catch_up(&cmd_id); // a gap: the store has it all
                    return;
                }
                let skip = usize::try_from(*sent - offset).unwrap_or(data.len());
                let fresh = &data[skip.min(data.len())..];
                let frame = output_frame(&cmd_id, vm.as_deref(), stream, *sent, fresh);
                *sent = end;
                self.pending.push_back(frame);
            }
            EngineEvent::Command { cmd_id, state, vm } => {
                let Some(followed) = self.commands.as_ref().and_then(|c| c.get(&cmd_id)) else {
                    return;
                };
                if followed.done {
                    return;
                }
                if state.is_final() {
                    self.catch_up(&cmd_id);
                    if !self.is_done(&cmd_id) {
                        // Announced before it was stored: look again shortly.
                        self.recheck.insert(cmd_id, true);
                    }
                } else {
                    self.pending
                        .push_back(command_frame(&cmd_id, vm.as_deref(), state, None));
                }
            }
            EngineEvent::Vm { .. } | EngineEvent::Transfer { .. } => {}
        }
    }

    /// Sends the next page (at most [`REPLAY_PAGE`] bytes) of each of a followed
    /// command's streams from where this stream stands; when both are sent up to
    /// what the store holds and the command was over before these reads (so every
    /// byte it wrote is stored), its final state. A command with more to send is
    /// left `behind`, and [`next`](Self::next) goes on once these pages are sent,
    /// so a long replay never sits in memory at once. The stream ends when every
    /// followed command has.
    fn catch_up(&mut self, cmd_id: &str) {
        let Some(followed) = self.commands.as_mut().and_then(|c| c.get_mut(cmd_id)) else {
            return;
        };
        if followed.done {
            return;
        }
        let record = match ops::command_record(&self.engine, cmd_id) {
            Ok(record) => record,
            Err(e) => {
                log::warn!(
                    "event stream: cannot read command {cmd_id}: {}",
                    e.message()
                );
                return;
            }
        };
        let mut complete = true;
        for stream in [OutputStream::Out, OutputStream::Err] {
            let from = *followed.sent(stream);
            match ops::command_output(&self.engine, cmd_id, stream, from, REPLAY_PAGE) {
                Ok(page) => {
                    if page.data.len() >= REPLAY_PAGE {
                        complete = false;
                    }
                    if !page.data.is_empty() {
                        self.pending.push_back(output_frame(
                            cmd_id,
                            followed.vm.as_deref(),
                            stream,
                            from,
                            &page.data,
                        ));
                        *followed.sent(stream) = page.next_offset;
                    }
                }
                Err(e) => {
                    log::warn!(
                        "event stream: cannot read output of {cmd_id}: {}",
                        e.message()
                    );
                    return;
                }
            }
        }
        followed.behind = !complete;
        if complete && record.state.is_final() {
            followed.done = true;
            self.pending.push_back(command_frame(
                cmd_id,
                record.vm.as_deref(),
                record.state,
                Some(&record),
            ));
            if self
                .commands
                .as_ref()
                .is_some_and(|c| c.values().all(|f| f.done))
            {
                self.ended = true;
            }
        }
    }

    /// A followed command with more stored output to send.
    fn behind(&self) -> Option<String> {
        self.commands
            .as_ref()?
            .iter()
            .find(|(_, f)| f.behind && !f.done)
            .map(|(id, _)| id.clone())
    }

    /// Whether a followed command's end was sent.
    fn is_done(&self, cmd_id: &str) -> bool {
        self.commands
            .as_ref()
            .and_then(|c| c.get(cmd_id))
            .is_some_and(|f| f.done)
    }

    fn passes(&self, vm: Option<&str>) -> bool {
        match &self.vms {
            None => true,
            Some(vms) => vm.is_some_and(|vm| vms.contains(vm)),
        }
    }

    fn remember_vm(&mut self, cmd_id: &str, vm: Option<String>) {
        if self.vms.is_none() {
            return;
        }
        if self.vm_of.len() >= VM_CACHE {
            self.vm_of.clear();
        }
        self.vm_of.insert(cmd_id.to_owned(), vm);
    }

    /// The VM of a command (only needed under `?vm=`).
    fn vm_of(&mut self, cmd_id: &str) -> Option<String> {
        self.vms.as_ref()?;
        if let Some(vm) = self.vm_of.get(cmd_id) {
            return vm.clone();
        }
        let vm = ops::command_record(&self.engine, cmd_id)
            .ok()
            .and_then(|r| r.vm);
        self.remember_vm(cmd_id, vm.clone());
        vm
    }
}

/// `GET /api/v1/events`.
pub async fn stream(engine: web::Data<Engine>, query: web::Query<EventsQuery>) -> Answer {
    let follower = Follower::new(&engine, &query)?;
    let body = futures_util::stream::unfold(follower, |mut follower| async move {
        let bytes = follower.next().await?;
        Some((Ok::<Bytes, Infallible>(bytes), follower))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::presence::Presence;
    use crate::hypervisor::VmState;

    #[test]
    fn events_are_one_json_line_each() {
        let frame = vm_frame("box-1", VmState::Running, Presence::Alive.as_str());
        assert_eq!(
            frame,
            "event: vm\ndata: {\"vm\":\"box-1\",\"state\":\"Running\",\"presence\":\"alive\"}\n\n"
        );
        let frame = output_frame("cmd-1", None, OutputStream::Err, 7, b"a\nb\x00");
        assert_eq!(
            frame,
            "event: output\ndata: {\"cmdId\":\"cmd-1\",\"stream\":\"err\",\"offset\":7,\
             \"data\":\"YQpiAA==\"}\n\n"
        );
    }

    #[tokio::test]
    async fn a_follower_that_lags_is_told_how_many_events_it_missed() {
        // The engine's channel, as small as can be: a follower that does not read
        // misses what does not fit, and the sender never waits for it.
        let (sender, mut receiver) = tokio::sync::broadcast::channel(2);
        for i in 0..5 {
            sender
                .send(EngineEvent::Vm {
                    vm: format!("vm-{i}"),
                    state: VmState::Running,
                    presence: Presence::Alive,
                })
                .expect("a receiver exists");
        }
        let missed = match receiver.recv().await {
            Err(RecvError::Lagged(missed)) => missed,
            other => panic!("expected a lag, got {other:?}"),
        };
        assert_eq!(
            lagged_frame(missed),
            "event: lagged\ndata: {\"missed\":3}\n\n"
        );
        assert!(matches!(
            receiver.recv().await,
            Ok(EngineEvent::Vm { vm, .. }) if vm == "vm-3"
        ));
    }

    #[test]
    fn lists_drop_empty_items() {
        assert_eq!(list(Some("a, b,,")), Some(vec!["a".into(), "b".into()]));
        assert_eq!(list(Some(" , ")), None);
        assert_eq!(list(None), None);
    }
}
