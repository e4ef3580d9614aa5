//! The command executor: runs what `CMD_RUN` asks, answers `CMD_CANCEL` and `CMD_QUERY`.
//!
//! [`Executor`] is a cheap handle on one table of commands behind a mutex. It owns
//! every command from [`Executor::run`] until its [`CommandResult`] is handed to the
//! results channel: at most `max_concurrent` run, the rest wait in FIFO order. Each
//! running command is one tokio task that spawns the program without a shell, in a
//! process group of its own (`process`), sends `CMD_STARTED` (once the command has
//! run for [`STARTED_REPORT_DELAY`], or before its first output chunk) and (when the
//! spec streams) `CMD_OUTPUT` straight to the reply channel, and keeps the first
//! `output_limit` bytes of each stream, spilling a stream that passes the limit whole
//! to `<output_dir>/<cmd-id>.out` or `.err` (`capture`). A blocking thread waits
//! for the child; when it ends, whatever is left of its process group is SIGKILLed
//! before the child is reaped with `wait4`, so its resource usage is its own and no
//! descendant outlives it; the pipes are then drained with a short deadline, in case
//! a process that left the group keeps them open. Cancel, timeout and shutdown send
//! SIGTERM to the group, then SIGKILL after a grace. Finished commands are remembered
//! (the last [`FINISHED_MEMORY`]) so that `CMD_QUERY` says `finished` and a duplicate
//! `CMD_RUN` is refused.
//!
//! It does not send `CMD_RESULT`: the agent receives each `(reply_to, result)` on the
//! results channel ([`ResultSender`]), stores it in its spool, then sends it. It keeps
//! nothing across restarts, and cannot follow descendants that leave the group
//! (`setsid`).
//!
//! **Invariant:** nothing else in the agent reaps child processes — no
//! `tokio::process`, no `waitpid(-1)`, no SIGCHLD set to `SIG_IGN` — or a command's
//! status and usage could be taken before `wait4` sees them. Each running command
//! holds one thread of tokio's blocking pool while it waits.

mod capture;
mod process;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use tokio::net::unix::pipe;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinError;
use vmc_protocol::words::{
    CommandOutcome, CommandPhase, CommandResult, CommandSpec, CommandStatus, Message, OutputStream,
    ResourceUsage, DEFAULT_OUTPUT_LIMIT,
};

use crate::outbox::{Reply, ReplySender};
use capture::{spill_path, CapturedStream, OutputSink, StreamCapture};
use process::Ending;

/// The grace between SIGTERM and SIGKILL when none is given.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// How long the pipes are still read after the command's process group is gone.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// How long a command runs before its `CMD_STARTED` is sent. One that ends sooner
/// without streaming any output reports its start only in its `CMD_RESULT`
/// (`startedAt`): for the many short commands, one message fewer each way on the
/// way to the result. Streamed output sends it at once, before the first chunk.
pub const STARTED_REPORT_DELAY: Duration = Duration::from_millis(50);

/// How many finished commands are remembered for `CMD_QUERY` and duplicate checks.
pub const FINISHED_MEMORY: usize = 1024;

/// How the executor runs commands.
#[derive(Clone, Debug)]
pub struct ExecSettings {
    /// Commands running at once; the rest queue in FIFO order. 0 is taken as 1.
    pub max_concurrent: usize,
    /// Where outputs longer than their limit are kept whole; created if missing.
    pub output_dir: PathBuf,
    /// The grace between SIGTERM and SIGKILL for timeouts, shutdown, and cancels
    /// that give none.
    pub kill_grace: Duration,
}

/// Why a command could not start, or its output could not be kept whole; the text,
/// with its source, becomes the result's `error`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("timeout_secs must be a finite number of seconds, at least 0, not {secs}")]
    BadTimeout { secs: f64 },
    #[error("cannot use {path:?} as working directory")]
    WorkingDir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path:?} for stdin")]
    StdinFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {cmd:?}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot keep the whole output in {path:?}")]
    KeepOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest agent is shutting down")]
    ShuttingDown,
}

/// The executor's side of the results channel: each command's final result with the
/// `reply-to` of its `CMD_RUN` (where `CMD_RESULT` goes), for the agent to spool and
/// then send.
pub type ResultSender = mpsc::UnboundedSender<(String, CommandResult)>;

/// The agent's side of the results channel.
pub type ResultReceiver = mpsc::UnboundedReceiver<(String, CommandResult)>;

/// A new results channel.
pub fn result_channel() -> (ResultSender, ResultReceiver) {
    mpsc::unbounded_channel()
}

/// Runs commands; clones share the same commands. See the module documentation.
#[derive(Clone, Debug)]
pub struct Executor {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: ExecSettings,
    replies: ReplySender,
    results: ResultSender,
    runtime: Handle,
    table: Mutex<Table>,
    /// The number of running commands, watched by [`Executor::shutdown`].
    active: watch::Sender<usize>,
}

/// Every command the executor knows.
#[derive(Debug, Default)]
struct Table {
    entries: HashMap<String, Entry>,
    /// Ids of the queued commands, oldest first.
    queue: VecDeque<String>,
    running: usize,
    /// Ids of the remembered finished commands, oldest first.
    finished: VecDeque<String>,
    shutting_down: bool,
}

#[derive(Debug)]
enum Entry {
    Queued { spec: CommandSpec, reply_to: String },
    Running(Arc<LiveCommand>),
    Finished(CommandStatus),
}

/// A command holding a slot: about to start, or running.
#[derive(Debug)]
struct LiveCommand {
    cmd_id: String,
    reply_to: String,
    out_bytes: Arc<AtomicU64>,
    err_bytes: Arc<AtomicU64>,
    control: Mutex<Control>,
}

/// A command's `CMD_STARTED`, sent at most once: by the announcer once the command
/// has run for [`STARTED_REPORT_DELAY`], or before its first streamed output.
#[derive(Debug)]
pub(super) struct StartedNotice {
    reply_to: String,
    replies: ReplySender,
    message: Mutex<Option<Message>>,
}

impl StartedNotice {
    /// Sends the `CMD_STARTED` unless it was sent already.
    pub(super) fn send(&self) {
        if let Some(message) = lock(&self.message).take() {
            // A closed channel means the agent is going away.
            let _ = self
                .replies
                .send(Reply::new(self.reply_to.clone(), message));
        }
    }
}

/// What signals may be sent to a command; every signal is sent with this locked.
#[derive(Debug)]
struct Control {
    /// The child's pid and process group id, once spawned.
    pid: Option<libc::pid_t>,
    /// The child has ended: its group may be gone and its pid reused, so no more signals.
    exited: bool,
    /// Why the agent stops it, the first reason given.
    stop: Option<StopReason>,
    /// The grace of the latest stop request.
    grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    TimedOut,
    Shutdown,
}

impl StopReason {
    fn outcome(self) -> CommandOutcome {
        match self {
            StopReason::Cancelled | StopReason::Shutdown => CommandOutcome::Cancelled,
            StopReason::TimedOut => CommandOutcome::TimedOut,
        }
    }

    fn note(self) -> Option<String> {
        (self == StopReason::Shutdown).then(|| "the guest agent shut down".to_owned())
    }
}

/// Locks `mutex`, also after a panic elsewhere: the data behind it stays consistent
/// because every critical section only assigns fields.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Executor {
    /// An executor sending `CMD_STARTED`/`CMD_OUTPUT` to `replies` and final results to
    /// `results`. The output directory is created when first needed.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the commands run on the runtime it is created in.
    pub fn new(
        mut settings: ExecSettings,
        replies: ReplySender,
        results: ResultSender,
    ) -> Executor {
        settings.max_concurrent = settings.max_concurrent.max(1);
        let shared = Shared {
            settings,
            replies,
            results,
            runtime: Handle::current(),
            table: Mutex::new(Table::default()),
            active: watch::Sender::new(0),
        };
        Executor {
            shared: Arc::new(shared),
        }
    }

    /// Starts `spec` as `cmd_id`, or queues it when `max_concurrent` commands run; its
    /// messages go to `reply_to`. Returns false, and does nothing, when `cmd_id` is
    /// queued, running or among the recently finished. Every accepted command ends
    /// with one result on the results channel, also when it cannot start (after
    /// shutdown too).
    pub fn run(&self, cmd_id: String, spec: CommandSpec, reply_to: String) -> bool {
        let shared = &self.shared;
        let mut table = lock(&shared.table);
        if table.entries.contains_key(&cmd_id) {
            return false;
        }
        if table.shutting_down {
            let error = Some(error_text(&ExecError::ShuttingDown));
            let result = unstarted(cmd_id, CommandOutcome::FailedToStart, error);
            shared.record_finished(&mut table, reply_to, result);
        } else if table.running < shared.settings.max_concurrent {
            shared.start(&mut table, cmd_id, spec, reply_to);
        } else {
            table.queue.push_back(cmd_id.clone());
            table
                .entries
                .insert(cmd_id, Entry::Queued { spec, reply_to });
        }
        true
    }

    /// Stops `cmd_id`: a queued command is dropped and reported `cancelled`; a running
    /// one gets SIGTERM on its whole process group, then SIGKILL after `grace` (or
    /// `kill_grace`). Returns false when the command is unknown or already finished.
    pub fn cancel(&self, cmd_id: &str, grace: Option<Duration>) -> bool {
        let shared = &self.shared;
        let grace = grace.unwrap_or(shared.settings.kill_grace);
        let mut table = lock(&shared.table);
        let live = match table.entries.get(cmd_id) {
            None | Some(Entry::Finished(_)) => return false,
            Some(Entry::Running(live)) => Arc::clone(live),
            Some(Entry::Queued { .. }) => {
                table.queue.retain(|id| id != cmd_id);
                if let Some(Entry::Queued { reply_to, .. }) = table.entries.remove(cmd_id) {
                    let result = unstarted(cmd_id.to_owned(), CommandOutcome::Cancelled, None);
                    shared.record_finished(&mut table, reply_to, result);
                }
                return true;
            }
        };
        drop(table);
        live.stop(StopReason::Cancelled, grace, &shared.runtime);
        true
    }

    /// Where `cmd_id` is: queued; running, with its pid, the usage of its process group
    /// so far (from `/proc`) and the bytes it wrote so far; finished, with its final
    /// figures; or unknown.
    pub fn status(&self, cmd_id: &str) -> CommandStatus {
        let mut status = CommandStatus {
            state: CommandPhase::Unknown,
            pid: None,
            usage: ResourceUsage::default(),
            out_bytes: 0,
            err_bytes: 0,
        };
        let live = match lock(&self.shared.table).entries.get(cmd_id) {
            None => return status,
            Some(Entry::Queued { .. }) => {
                status.state = CommandPhase::Queued;
                return status;
            }
            Some(Entry::Finished(finished)) => return finished.clone(),
            Some(Entry::Running(live)) => Arc::clone(live),
        };
        let (pid, exited) = {
            let control = lock(&live.control);
            (control.pid, control.exited)
        };
        status.state = CommandPhase::Running;
        status.pid = pid.map(libc::pid_t::unsigned_abs);
        if let (Some(pid), false) = (pid, exited) {
            status.usage = process::group_usage(pid);
        }
        status.out_bytes = live.out_bytes.load(Ordering::Relaxed);
        status.err_bytes = live.err_bytes.load(Ordering::Relaxed);
        status
    }

    /// Commands running or queued, for `STILL_ALIVE`.
    pub fn running(&self) -> usize {
        let table = lock(&self.shared.table);
        table.running + table.queue.len()
    }

    /// Stops everything, for the agent's shutdown: at once, queued commands are
    /// reported `cancelled` without starting and running ones get SIGTERM (SIGKILL
    /// after `kill_grace`); the returned future, which does not borrow the executor,
    /// completes when all are reaped and their results sent. Commands given to
    /// [`Executor::run`] afterwards fail to start.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = &self.shared;
        let mut active = shared.active.subscribe();
        let running: Vec<Arc<LiveCommand>> = {
            let mut table = lock(&shared.table);
            table.shutting_down = true;
            while let Some(id) = table.queue.pop_front() {
                if let Some(Entry::Queued { reply_to, .. }) = table.entries.remove(&id) {
                    let note = Some("the guest agent shut down before it started".to_owned());
                    let result = unstarted(id, CommandOutcome::Cancelled, note);
                    shared.record_finished(&mut table, reply_to, result);
                }
            }
            table
                .entries
                .values()
                .filter_map(|entry| match entry {
                    Entry::Running(live) => Some(Arc::clone(live)),
                    _ => None,
                })
                .collect()
        };
        for live in running {
            live.stop(
                StopReason::Shutdown,
                shared.settings.kill_grace,
                &shared.runtime,
            );
        }
        let keep_open = Arc::clone(shared);
        async move {
            // `keep_open` holds the sender, so the channel cannot close while we wait.
            let _ = active.wait_for(|running| *running == 0).await;
            drop(keep_open);
        }
    }
}

impl Shared {
    /// Gives `cmd_id` a slot and starts its task.
    fn start(
        self: &Arc<Self>,
        table: &mut Table,
        cmd_id: String,
        spec: CommandSpec,
        reply_to: String,
    ) {
        let live = Arc::new(LiveCommand {
            cmd_id: cmd_id.clone(),
            reply_to,
            out_bytes: Arc::new(AtomicU64::new(0)),
            err_bytes: Arc::new(AtomicU64::new(0)),
            control: Mutex::new(Control {
                pid: None,
                exited: false,
                stop: None,
                grace: self.settings.kill_grace,
            }),
        });
        table
            .entries
            .insert(cmd_id, Entry::Running(Arc::clone(&live)));
        table.running += 1;
        self.active.send_replace(table.running);
        let shared = Arc::clone(self);
        self.runtime.spawn(async move {
            let result = shared.execute(&live, spec).await;
            shared.finish(&live, result);
        });
    }

    /// Frees the slot of a command that ended and starts queued ones.
    fn finish(self: &Arc<Self>, live: &LiveCommand, result: CommandResult) {
        let mut table = lock(&self.table);
        table.running -= 1;
        self.record_finished(&mut table, live.reply_to.clone(), result);
        while table.running < self.settings.max_concurrent && !table.shutting_down {
            let Some(id) = table.queue.pop_front() else {
                break;
            };
            if let Some(Entry::Queued { spec, reply_to }) = table.entries.remove(&id) {
                self.start(&mut table, id, spec, reply_to);
            }
        }
        self.active.send_replace(table.running);
    }

    /// Remembers `result` as finished and hands it to the agent.
    fn record_finished(&self, table: &mut Table, reply_to: String, result: CommandResult) {
        let status = CommandStatus {
            state: CommandPhase::Finished,
            pid: None,
            usage: result.resources.clone(),
            out_bytes: result.out_bytes,
            err_bytes: result.err_bytes,
        };
        let cmd_id = result.cmd_id.clone();
        table
            .entries
            .insert(cmd_id.clone(), Entry::Finished(status));
        table.finished.push_back(cmd_id.clone());
        while table.finished.len() > FINISHED_MEMORY {
            if let Some(old) = table.finished.pop_front() {
                if let Some(Entry::Finished(_)) = table.entries.get(&old) {
                    table.entries.remove(&old);
                }
            }
        }
        if self.results.send((reply_to, result)).is_err() {
            log::warn!("the result of command {cmd_id} is lost: nobody receives results");
        }
    }

    /// Runs one command to its end; see the module documentation.
    async fn execute(
        self: &Arc<Self>,
        live: &Arc<LiveCommand>,
        spec: CommandSpec,
    ) -> CommandResult {
        let cmd_id = live.cmd_id.clone();
        let failed = |err: ExecError| {
            let error = Some(error_text(&err));
            unstarted(cmd_id.clone(), CommandOutcome::FailedToStart, error)
        };
        let (stdin, timeout) = match prepare(&spec) {
            Ok(prepared) => prepared,
            Err(err) => return failed(err),
        };
        if let Some(reason) = lock(&live.control).stop {
            return unstarted(cmd_id, reason.outcome(), reason.note());
        }
        let spawned = match process::spawn(&spec, stdin) {
            Ok(spawned) => spawned,
            Err(err) => return failed(err),
        };
        let started = Instant::now();
        let started_at = now_rfc3339();
        let pid = spawned.pid;
        log::debug!("command {cmd_id} started as pid {pid}");
        let notice = Arc::new(StartedNotice {
            reply_to: live.reply_to.clone(),
            replies: self.replies.clone(),
            message: Mutex::new(Some(Message::CmdStarted {
                cmd_id: cmd_id.clone(),
                pid: pid.unsigned_abs(),
                started_at: started_at.clone(),
            })),
        });
        let announcer = {
            let (live, notice) = (Arc::clone(live), Arc::clone(&notice));
            self.runtime.spawn(async move {
                tokio::time::sleep(STARTED_REPORT_DELAY).await;
                // Under the lock that `exited` is set with: never after the result.
                let control = lock(&live.control);
                if !control.exited {
                    notice.send();
                }
            })
        };
        {
            let mut control = lock(&live.control);
            control.pid = Some(pid);
            if control.stop.is_some() {
                live.terminate(pid, control.grace, &self.runtime);
            }
        }
        let timer = timeout.map(|after| {
            let (live, runtime) = (Arc::clone(live), self.runtime.clone());
            let grace = self.settings.kill_grace;
            self.runtime.spawn(async move {
                tokio::time::sleep(after).await;
                live.stop(StopReason::TimedOut, grace, &runtime);
            })
        });

        let limit = spec.output_limit.unwrap_or(DEFAULT_OUTPUT_LIMIT);
        let capture = |stream, counter: &Arc<AtomicU64>| {
            let sink = spec.stream.then(|| OutputSink {
                cmd_id: cmd_id.clone(),
                reply_to: live.reply_to.clone(),
                replies: self.replies.clone(),
                started: Arc::clone(&notice),
            });
            let path = spill_path(&self.settings.output_dir, &cmd_id, stream);
            StreamCapture::new(stream, limit, path, Arc::clone(counter), sink)
        };
        let mut out = capture(OutputStream::Out, &live.out_bytes);
        let mut err = capture(OutputStream::Err, &live.err_bytes);
        let waiter_live = Arc::clone(live);
        let waiter = tokio::task::spawn_blocking(move || {
            process::wait_for_exit(pid, || waiter_live.ended(pid))
        });
        let (stop_reading, reading_stopped) = watch::channel(false);
        let waited = {
            let pumps = async {
                tokio::join!(
                    pump(&mut out, spawned.stdout, reading_stopped.clone()),
                    pump(&mut err, spawned.stderr, reading_stopped)
                )
            };
            tokio::pin!(pumps);
            let mut waiter = waiter;
            tokio::select! {
                waited = &mut waiter => {
                    // Its group is gone: what is left in the pipes comes at once, unless
                    // a process that left the group holds them open.
                    if tokio::time::timeout(DRAIN_DEADLINE, &mut pumps).await.is_err() {
                        stop_reading.send_replace(true);
                        pumps.await;
                    }
                    waited
                }
                _ = &mut pumps => waiter.await,
            }
        };
        if let Some(timer) = timer {
            timer.abort();
        }
        announcer.abort();
        let wall_secs = started.elapsed().as_secs_f64();
        let ended_at = now_rfc3339();
        let stop = {
            let mut control = lock(&live.control);
            control.exited = true;
            control.stop
        };
        let out = out.finish().await;
        let err = err.finish().await;
        log::debug!("command {cmd_id} ended: {waited:?}");
        let mut result = ended(cmd_id, waited, stop, &out, &err);
        result.started_at = Some(started_at);
        result.ended_at = Some(ended_at);
        result.wall_secs = wall_secs;
        result.out = out.text;
        result.err = err.text;
        result
    }
}

impl LiveCommand {
    /// Asks the command to stop: SIGTERM to its group now (or as soon as it is
    /// spawned), SIGKILL after `grace`. Nothing happens once it has ended.
    fn stop(self: &Arc<Self>, reason: StopReason, grace: Duration, runtime: &Handle) {
        let mut control = lock(&self.control);
        if control.exited {
            return;
        }
        control.stop.get_or_insert(reason);
        control.grace = grace;
        if let Some(pid) = control.pid {
            self.terminate(pid, grace, runtime);
        }
    }

    /// SIGTERM to group `pid` now, SIGKILL after `grace` unless the child has ended.
    /// Called with `control` locked and the child not ended.
    fn terminate(self: &Arc<Self>, pid: libc::pid_t, grace: Duration, runtime: &Handle) {
        if let Err(err) = process::signal_group(pid, libc::SIGTERM) {
            log::warn!("cannot send SIGTERM to command {}: {err}", self.cmd_id);
        }
        let live = Arc::clone(self);
        runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            let control = lock(&live.control);
            if !control.exited {
                if let Err(err) = process::signal_group(pid, libc::SIGKILL) {
                    log::warn!("cannot send SIGKILL to command {}: {err}", live.cmd_id);
                }
            }
        });
    }

    /// The child `pid` has ended but is not reaped yet: kill what is left of its group,
    /// while the zombie keeps the group id from being reused, and send no more signals.
    fn ended(&self, pid: libc::pid_t) {
        let mut control = lock(&self.control);
        control.exited = true;
        if let Err(err) = process::signal_group(pid, libc::SIGKILL) {
            log::warn!("cannot kill what is left of command {}: {err}", self.cmd_id);
        }
    }
}

/// Checks the spec and opens its stdin: what must hold before spawning.
fn prepare(spec: &CommandSpec) -> Result<(Stdio, Option<Duration>), ExecError> {
    let timeout = match spec.timeout_secs {
        None => None,
        // Too large for a Duration: as good as no timeout.
        Some(secs) if secs.is_finite() && secs >= 0.0 => Duration::try_from_secs_f64(secs).ok(),
        Some(secs) => return Err(ExecError::BadTimeout { secs }),
    };
    if let Some(path) = &spec.path {
        let working_dir = |source| ExecError::WorkingDir {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(working_dir)?;
        if !meta.is_dir() {
            return Err(working_dir(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
    }
    let stdin = match &spec.file_for_stdin {
        None => Stdio::null(),
        Some(path) => File::open(path)
            .map(Stdio::from)
            .map_err(|source| ExecError::StdinFile {
                path: path.clone(),
                source,
            })?,
    };
    Ok((stdin, timeout))
}

/// Reads one pipe into `capture`, to its end or until `stop`.
async fn pump(
    capture: &mut StreamCapture,
    pipe: io::Result<pipe::Receiver>,
    stop: watch::Receiver<bool>,
) {
    match pipe {
        Ok(pipe) => capture.pump(pipe, stop).await,
        Err(err) => capture.unreadable(&err),
    }
}

/// The result of a command that never ran.
fn unstarted(cmd_id: String, state: CommandOutcome, error: Option<String>) -> CommandResult {
    CommandResult {
        cmd_id,
        out: String::new(),
        err: String::new(),
        finished: false,
        exit_code_or_signal: -1,
        resources: ResourceUsage::default(),
        state,
        error,
        started_at: None,
        ended_at: Some(now_rfc3339()),
        wall_secs: 0.0,
        out_bytes: 0,
        err_bytes: 0,
        out_truncated: false,
        err_truncated: false,
        out_file: None,
        err_file: None,
    }
}

/// The result of a command that ran, but for its times and retained texts.
fn ended(
    cmd_id: String,
    waited: Result<io::Result<(Ending, ResourceUsage)>, JoinError>,
    stop: Option<StopReason>,
    out: &CapturedStream,
    err: &CapturedStream,
) -> CommandResult {
    let mut error = None;
    let (finished, code, natural, resources) = match waited {
        Ok(Ok((Ending::Exited(code), usage))) => (true, code, CommandOutcome::Exited, usage),
        Ok(Ok((Ending::Signalled(signal), usage))) => {
            (false, signal, CommandOutcome::Signalled, usage)
        }
        Ok(Err(lost)) => {
            error = Some(format!("its end could not be observed: {lost}"));
            (
                false,
                -1,
                CommandOutcome::Signalled,
                ResourceUsage::default(),
            )
        }
        Err(lost) => {
            error = Some(format!("its end could not be observed: {lost}"));
            (
                false,
                -1,
                CommandOutcome::Signalled,
                ResourceUsage::default(),
            )
        }
    };
    for note in [
        stop.and_then(StopReason::note),
        out.error.clone(),
        err.error.clone(),
    ] {
        error = join_notes(error, note);
    }
    CommandResult {
        cmd_id,
        out: String::new(),
        err: String::new(),
        finished,
        exit_code_or_signal: code,
        resources,
        state: stop.map_or(natural, StopReason::outcome),
        error,
        started_at: None,
        ended_at: None,
        wall_secs: 0.0,
        out_bytes: out.bytes,
        err_bytes: err.bytes,
        out_truncated: out.truncated,
        err_truncated: err.truncated,
        out_file: out.file.clone(),
        err_file: err.file.clone(),
    }
}

fn join_notes(first: Option<String>, second: Option<String>) -> Option<String> {
    match (first, second) {
        (Some(first), Some(second)) => Some(format!("{first}; {second}")),
        (first, second) => first.or(second),
    }
}

/// An error and its sources as one line, without the `(os error N)` suffix that
/// `io::Error` adds, e.g. `cannot run "x": No such file or directory`.
fn error_text(err: &dyn std::error::Error) -> String {
    strip_os_error_suffixes(&vmc_protocol::agent_main::error_chain(err))
}

fn strip_os_error_suffixes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" (os error ") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + " (os error ".len()..];
        match tail.find(')') {
            Some(close) if tail[..close].bytes().all(|b| b.is_ascii_digit()) => {
                rest = &tail[close + 1..];
            }
            _ => {
                out.push_str(" (os error ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, FixedOffset};
    use tempfile::TempDir;
    use vmc_protocol::words::MAX_OUTPUT_CHUNK;

    use super::*;
    use crate::outbox::{self, ReplyReceiver};

    const REPLY_TO: &str = "/queue/vmc.host.test";

    /// An executor with its channels, collecting what it reports.
    struct Harness {
        exec: Executor,
        replies: ReplyReceiver,
        results: ResultReceiver,
        /// Messages received so far, in order.
        messages: Vec<Message>,
        done: HashMap<String, CommandResult>,
        dir: TempDir,
    }

    fn harness(max_concurrent: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (replies_tx, replies) = outbox::channel();
        let (results_tx, results) = result_channel();
        let settings = ExecSettings {
            max_concurrent,
            output_dir: dir.path().join("output"),
            kill_grace: DEFAULT_KILL_GRACE,
        };
        Harness {
            exec: Executor::new(settings, replies_tx, results_tx),
            replies,
            results,
            messages: Vec::new(),
            done: HashMap::new(),
            dir,
        }
    }

    fn spec(cmd: &str, args: &[&str]) -> CommandSpec {
        let mut spec = CommandSpec::new(cmd);
        spec.args = args.iter().map(|a| a.to_string()).collect();
        spec
    }

    fn sh(script: &str) -> CommandSpec {
        spec("/bin/sh", &["-c", script])
    }

    impl Harness {
        fn run(&self, cmd_id: &str, spec: CommandSpec) -> bool {
            self.exec.run(cmd_id.to_owned(), spec, REPLY_TO.to_owned())
        }

        /// The result of `cmd_id`, waiting for it.
        async fn result(&mut self, cmd_id: &str) -> CommandResult {
            loop {
                if let Some(result) = self.done.remove(cmd_id) {
                    return result;
                }
                let wait = tokio::time::timeout(Duration::from_secs(60), self.results.recv());
                let (reply_to, result) = wait.await.expect("no result within 60 s").unwrap();
                assert_eq!(reply_to, REPLY_TO);
                assert!(self.done.insert(result.cmd_id.clone(), result).is_none());
            }
        }

        /// The messages about `cmd_id` sent so far.
        fn messages_of(&mut self, cmd_id: &str) -> Vec<Message> {
            while let Ok(reply) = self.replies.try_recv() {
                assert_eq!(reply.destination, REPLY_TO);
                self.messages.push(reply.message);
            }
            self.messages
                .iter()
                .filter(|m| match m {
                    Message::CmdStarted { cmd_id: id, .. }
                    | Message::CmdOutput { cmd_id: id, .. } => id == cmd_id,
                    _ => false,
                })
                .cloned()
                .collect()
        }

        /// The pid in the `CMD_STARTED` of `cmd_id`, waiting for it.
        async fn started_pid(&mut self, cmd_id: &str) -> libc::pid_t {
            let mut pid = None;
            wait_until("CMD_STARTED", || {
                pid = self.messages_of(cmd_id).iter().find_map(|m| match m {
                    Message::CmdStarted { pid, .. } => Some(*pid),
                    _ => None,
                });
                pid.is_some()
            })
            .await;
            libc::pid_t::try_from(pid.unwrap()).unwrap()
        }

        fn output_files(&self) -> Vec<PathBuf> {
            match std::fs::read_dir(self.dir.path().join("output")) {
                Ok(dir) => dir.map(|e| e.unwrap().path()).collect(),
                Err(_) => Vec::new(),
            }
        }
    }

    /// Polls `cond` every 10 ms until it holds; fails after 20 s.
    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn time(rfc3339: &Option<String>) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(rfc3339.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn error_text_reads_like_a_sentence() {
        let err = ExecError::Spawn {
            cmd: "nosuchcmd".to_owned(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            error_text(&err),
            "cannot run \"nosuchcmd\": No such file or directory"
        );
        assert_eq!(
            strip_os_error_suffixes("a (os error x) b"),
            "a (os error x) b"
        );
    }

    #[tokio::test]
    async fn arguments_reach_the_program_literally_without_a_shell() {
        let mut h = harness(4);
        let args = [
            "%s|\n",
            "a b",
            "\"q\" 'r'",
            "$(id)",
            ";",
            "`x` && y",
            "é ✓",
            "",
        ];
        assert!(h.run("args", spec("/usr/bin/printf", &args)));
        let r = h.result("args").await;
        assert_eq!(r.out, "a b|\n\"q\" 'r'|\n$(id)|\n;|\n`x` && y|\né ✓|\n|\n");
        assert_eq!(
            (r.state, r.finished, r.exit_code_or_signal),
            (CommandOutcome::Exited, true, 0)
        );
        assert_eq!(r.error, None);
    }

    #[tokio::test]
    async fn environment_is_added_and_working_directory_is_set() {
        let mut h = harness(4);
        let workdir = tempfile::tempdir().unwrap();
        let mut spec = sh(r#"printf '%s|%s\n' "$VMC_EXEC_TEST" "${PATH:+path kept}"; pwd -P"#);
        spec.env = BTreeMap::from([("VMC_EXEC_TEST".to_owned(), "x y=z".to_owned())]);
        spec.path = Some(workdir.path().display().to_string());
        h.run("env", spec);
        let r = h.result("env").await;
        let cwd = workdir.path().canonicalize().unwrap();
        assert_eq!(r.out, format!("x y=z|path kept\n{}\n", cwd.display()));
    }

    #[tokio::test]
    async fn stdin_is_the_given_file_or_else_empty() {
        let mut h = harness(4);
        let file = h.dir.path().join("input.txt");
        std::fs::write(&file, "line one\nline two\n").unwrap();
        let mut with_file = spec("cat", &[]);
        with_file.file_for_stdin = Some(file.display().to_string());
        h.run("file", with_file);
        h.run("empty", spec("cat", &[]));
        assert_eq!(h.result("file").await.out, "line one\nline two\n");
        let r = h.result("empty").await;
        assert_eq!((r.out.as_str(), r.exit_code_or_signal), ("", 0));
    }

    #[tokio::test]
    async fn a_missing_stdin_file_fails_to_start() {
        let mut h = harness(4);
        let mut spec = spec("cat", &[]);
        spec.file_for_stdin = Some("/nonexistent/vmc-stdin".to_owned());
        h.run("nostdin", spec);
        let r = h.result("nostdin").await;
        assert_eq!(r.state, CommandOutcome::FailedToStart);
        assert_eq!((r.finished, r.exit_code_or_signal), (false, -1));
        assert_eq!(
            r.error.as_deref(),
            Some("cannot open \"/nonexistent/vmc-stdin\" for stdin: No such file or directory")
        );
        assert!(
            h.messages_of("nostdin").is_empty(),
            "no CMD_STARTED for what never ran"
        );
    }

    #[tokio::test]
    async fn an_unknown_program_fails_to_start_with_the_reason() {
        let mut h = harness(4);
        h.run("nosuch", spec("nosuchcmd-vmc-test", &["x"]));
        let r = h.result("nosuch").await;
        assert_eq!(r.state, CommandOutcome::FailedToStart);
        assert_eq!((r.finished, r.exit_code_or_signal), (false, -1));
        assert_eq!(
            r.error.as_deref(),
            Some("cannot run \"nosuchcmd-vmc-test\": No such file or directory")
        );
        assert!(h.messages_of("nosuch").is_empty());
    }

    #[tokio::test]
    async fn a_missing_working_directory_fails_to_start() {
        let mut h = harness(4);
        let mut spec = spec("true", &[]);
        spec.path = Some("/nonexistent/vmc-dir".to_owned());
        h.run("nodir", spec);
        let r = h.result("nodir").await;
        assert_eq!(r.state, CommandOutcome::FailedToStart);
        assert_eq!(
            r.error.as_deref(),
            Some("cannot use \"/nonexistent/vmc-dir\" as working directory: No such file or directory")
        );
    }

    #[tokio::test]
    async fn exit_code_stderr_and_started_message_are_reported() {
        let mut h = harness(4);
        h.run("exit3", sh("echo oops >&2; exit 3"));
        let r = h.result("exit3").await;
        assert_eq!(
            (r.state, r.finished, r.exit_code_or_signal),
            (CommandOutcome::Exited, true, 3)
        );
        assert_eq!((r.out.as_str(), r.err.as_str()), ("", "oops\n"));
        assert_eq!((r.out_bytes, r.err_bytes), (0, 5));
        assert!(!r.err_truncated && r.err_file.is_none());
        assert!(time(&r.started_at) <= time(&r.ended_at));
        assert!(r.wall_secs >= 0.0);
        let messages = h.messages_of("exit3");
        match &messages[0] {
            Message::CmdStarted {
                pid, started_at, ..
            } => {
                assert!(*pid > 0);
                assert_eq!(Some(started_at), r.started_at.as_ref());
            }
            other => panic!("CMD_STARTED must come first, not {other:?}"),
        }
        match &messages[1..] {
            [Message::CmdOutput {
                stream: OutputStream::Err,
                offset: 0,
                data,
                ..
            }] => {
                assert_eq!(&data[..], b"oops\n");
            }
            other => panic!("expected one stderr chunk, got {other:?}"),
        }
        assert!(h.output_files().is_empty(), "small outputs make no file");
    }

    #[tokio::test]
    async fn death_by_signal_is_reported() {
        let mut h = harness(4);
        h.run("kill9", sh("kill -9 $$"));
        let r = h.result("kill9").await;
        assert_eq!(
            (r.state, r.finished, r.exit_code_or_signal),
            (CommandOutcome::Signalled, false, 9)
        );
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let mut h = harness(4);
        let mut spec = spec("sleep", &["30"]);
        spec.timeout_secs = Some(0.3);
        h.run("slow", spec);
        let r = h.result("slow").await;
        assert_eq!(
            (r.state, r.finished, r.exit_code_or_signal),
            (CommandOutcome::TimedOut, false, libc::SIGTERM)
        );
        assert!(r.wall_secs >= 0.3 && r.wall_secs < 10.0, "{}", r.wall_secs);
    }

    #[tokio::test]
    async fn a_negative_timeout_is_refused() {
        let mut h = harness(4);
        let mut spec = spec("true", &[]);
        spec.timeout_secs = Some(-1.0);
        h.run("neg", spec);
        let r = h.result("neg").await;
        assert_eq!(r.state, CommandOutcome::FailedToStart);
        assert!(r.error.unwrap().contains("timeout_secs"));
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_process_tree() {
        let mut h = harness(4);
        h.run("tree", sh("sleep 100 & sleep 100 & wait"));
        let pgid = h.started_pid("tree").await;
        wait_until("the shell and its two sleeps", || {
            process::live_group_members(pgid).len() == 3
        })
        .await;
        assert!(h.exec.cancel("tree", Some(Duration::from_millis(500))));
        let r = h.result("tree").await;
        assert_eq!(
            (r.state, r.finished, r.exit_code_or_signal),
            (CommandOutcome::Cancelled, false, libc::SIGTERM)
        );
        assert_eq!(process::live_group_members(pgid), Vec::<u32>::new());
        assert!(!h.exec.cancel("tree", None), "nothing left to cancel");
        assert!(!h.exec.cancel("never-heard-of", None));
    }

    #[tokio::test]
    async fn a_command_ignoring_sigterm_is_killed_after_the_grace() {
        let mut h = harness(4);
        h.run("stubborn", sh("trap '' TERM; sleep 100 & wait; wait"));
        let pgid = h.started_pid("stubborn").await;
        wait_until("the sleep", || process::live_group_members(pgid).len() == 2).await;
        h.exec.cancel("stubborn", Some(Duration::from_millis(200)));
        let r = h.result("stubborn").await;
        assert_eq!(
            (r.state, r.exit_code_or_signal),
            (CommandOutcome::Cancelled, libc::SIGKILL)
        );
        assert_eq!(process::live_group_members(pgid), Vec::<u32>::new());
    }

    #[tokio::test]
    async fn descendants_left_running_are_killed_when_the_command_ends() {
        let mut h = harness(4);
        // The background sleep keeps stdout open: the result must not wait for it.
        h.run("orphan", sh("sleep 100 & echo hi"));
        let pgid = h.started_pid("orphan").await;
        let r = h.result("orphan").await;
        assert_eq!(
            (r.state, r.exit_code_or_signal, r.out.as_str()),
            (CommandOutcome::Exited, 0, "hi\n")
        );
        assert_eq!(r.error, None);
        assert_eq!(process::live_group_members(pgid), Vec::<u32>::new());
    }

    #[tokio::test]
    async fn a_process_escaping_the_group_with_the_pipe_does_not_hold_the_result() {
        let mut h = harness(4);
        // The marker file says the background process has left the group.
        let marker = h.dir.path().join("escaped").display().to_string();
        let script = r#"setsid sh -c ': > "$1"; exec sleep 3' sh "$1" &
            while [ ! -e "$1" ]; do sleep 0.01; done; echo hi"#;
        h.run("escape", spec("/bin/sh", &["-c", script, "sh", &marker]));
        let r = h.result("escape").await;
        assert_eq!((r.state, r.out.as_str()), (CommandOutcome::Exited, "hi\n"));
        let error = r
            .error
            .expect("the possibly incomplete output is explained");
        assert!(error.contains("may be incomplete"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_commands_run_at_once_with_their_own_results() {
        let mut h = harness(64);
        for i in 0..50 {
            let id = format!("c{i}");
            let code = (i % 5).to_string();
            let spec = spec(
                "/bin/sh",
                &["-c", r#"printf %s "$1"; exit "$2""#, "sh", &id, &code],
            );
            assert!(h.run(&id, spec));
        }
        for i in 0..50 {
            let id = format!("c{i}");
            let r = h.result(&id).await;
            assert_eq!(r.state, CommandOutcome::Exited);
            assert_eq!(
                (r.out.as_str(), r.exit_code_or_signal),
                (id.as_str(), i % 5)
            );
            assert_eq!(r.out_bytes, id.len() as u64);
        }
        assert_eq!(h.exec.running(), 0);
    }

    #[tokio::test]
    async fn beyond_max_concurrent_commands_wait_their_turn_in_order() {
        let mut h = harness(2);
        let ids: Vec<String> = (0..6).map(|i| format!("q{i}")).collect();
        for id in &ids {
            h.run(id, spec("sleep", &["0.2"]));
        }
        assert_eq!(h.exec.running(), 6);
        for id in &ids[2..] {
            assert_eq!(h.exec.status(id).state, CommandPhase::Queued);
        }
        let mut spans = Vec::new();
        for id in &ids {
            let r = h.result(id).await;
            assert_eq!(r.state, CommandOutcome::Exited);
            spans.push((time(&r.started_at), time(&r.ended_at)));
        }
        for (start, _) in &spans {
            let running = spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count();
            assert!(running <= 2, "{running} commands ran at once: {spans:?}");
        }
        assert!(
            spans.windows(2).all(|w| w[0].0 <= w[1].0),
            "FIFO order: {spans:?}"
        );
        assert_eq!(h.exec.running(), 0);
    }

    #[tokio::test]
    async fn a_queued_command_can_be_cancelled_without_starting() {
        let mut h = harness(1);
        h.run("busy", spec("sleep", &["100"]));
        h.run("waiting", spec("true", &[]));
        assert_eq!(h.exec.status("waiting").state, CommandPhase::Queued);
        assert!(h.exec.cancel("waiting", None));
        let r = h.result("waiting").await;
        assert_eq!(r.state, CommandOutcome::Cancelled);
        assert_eq!(
            (r.finished, r.exit_code_or_signal, r.started_at),
            (false, -1, None)
        );
        assert!(h.messages_of("waiting").is_empty());
        assert_eq!(h.exec.status("waiting").state, CommandPhase::Finished);
        h.exec.cancel("busy", Some(Duration::ZERO));
        assert_eq!(h.result("busy").await.state, CommandOutcome::Cancelled);
    }

    #[tokio::test]
    async fn a_command_id_runs_at_most_once() {
        let mut h = harness(4);
        assert!(h.run("dup", spec("sleep", &["0.1"])));
        assert!(!h.run("dup", spec("false", &[])), "running: refused");
        assert_eq!(h.result("dup").await.exit_code_or_signal, 0);
        assert!(!h.run("dup", spec("false", &[])), "finished: refused");
        assert_eq!(h.exec.status("dup").state, CommandPhase::Finished);
        assert_eq!(h.exec.status("other").state, CommandPhase::Unknown);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_mebibytes_of_output_are_kept_whole() {
        const TOTAL: u64 = 100 * 1024 * 1024;
        let mut h = harness(4);
        // Check the stream while it flows, so that it is not held in memory.
        let mut replies = std::mem::replace(&mut h.replies, outbox::channel().1);
        let checker = tokio::spawn(async move {
            let (mut next, mut chunks) = (0u64, 0usize);
            while let Some(reply) = replies.recv().await {
                if let Message::CmdOutput {
                    stream,
                    offset,
                    data,
                    ..
                } = reply.message
                {
                    assert_eq!((stream, offset), (OutputStream::Out, next));
                    assert!(!data.is_empty() && data.len() <= MAX_OUTPUT_CHUNK);
                    next += data.len() as u64;
                    chunks += 1;
                    if next == TOTAL {
                        return chunks;
                    }
                }
            }
            panic!("the stream stopped at {next}");
        });
        let mut spec = spec("head", &["-c", &TOTAL.to_string(), "/dev/zero"]);
        spec.output_limit = Some(1000);
        h.run("big", spec);
        let r = h.result("big").await;
        assert_eq!(
            (r.state, r.exit_code_or_signal),
            (CommandOutcome::Exited, 0)
        );
        assert_eq!((r.out_bytes, r.out_truncated), (TOTAL, true));
        assert_eq!(r.out, "\0".repeat(1000));
        let file = PathBuf::from(r.out_file.expect("the whole output is in a file"));
        assert_eq!(file, h.dir.path().join("output").join("big.out"));
        assert_eq!(std::fs::metadata(&file).unwrap().len(), TOTAL);
        assert_eq!((r.err_bytes, r.err_file), (0, None));
        let chunks = checker.await.unwrap();
        assert!(chunks < 100_000, "{chunks} chunks: reads are sent whole");
    }

    #[tokio::test]
    async fn output_past_the_limit_keeps_its_order_in_the_file_and_is_not_streamed_unasked() {
        let mut h = harness(4);
        let mut spec = spec("seq", &["1", "200000"]);
        spec.output_limit = Some(1000);
        spec.stream = false;
        h.run("seq", spec);
        let r = h.result("seq").await;
        let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
        assert_eq!(r.out, expected[..1000]);
        assert_eq!(r.out_bytes, expected.len() as u64);
        let kept = std::fs::read_to_string(r.out_file.unwrap()).unwrap();
        assert!(kept == expected, "the file differs from the output");
        let messages = h.messages_of("seq");
        assert!(
            !messages
                .iter()
                .any(|m| matches!(m, Message::CmdOutput { .. })),
            "{messages:?}"
        );
    }

    #[tokio::test]
    async fn cpu_time_and_memory_of_the_command_are_measured() {
        let mut h = harness(4);
        h.run(
            "burn",
            sh("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"),
        );
        let r = h.result("burn").await;
        let usage = &r.resources;
        assert!(usage.ru_utime + usage.ru_stime > 0.1, "{usage:?}");
        assert!(usage.ru_maxrss > 0 && usage.ru_minflt > 0, "{usage:?}");
        assert_eq!(h.exec.status("burn").usage, r.resources);
    }

    #[tokio::test]
    async fn status_of_a_running_command_shows_its_progress() {
        let mut h = harness(4);
        h.run("ticker", sh("while :; do echo tick; sleep 0.02; done"));
        let pid = h.started_pid("ticker").await;
        let mut first = 0;
        wait_until("some output", || {
            first = h.exec.status("ticker").out_bytes;
            first > 0
        })
        .await;
        wait_until("more output", || h.exec.status("ticker").out_bytes > first).await;
        let status = h.exec.status("ticker");
        assert_eq!(status.state, CommandPhase::Running);
        assert_eq!(status.pid, Some(pid.unsigned_abs()));
        assert!(status.usage.ru_maxrss > 0, "{:?}", status.usage);
        h.exec.cancel("ticker", None);
        let r = h.result("ticker").await;
        let status = h.exec.status("ticker");
        assert_eq!((status.state, status.pid), (CommandPhase::Finished, None));
        assert_eq!(status.out_bytes, r.out_bytes);
    }

    #[tokio::test]
    async fn shutdown_stops_everything_and_still_reports_it() {
        let mut h = harness(1);
        h.run("long", spec("sleep", &["100"]));
        h.run("queued", spec("true", &[]));
        let pgid = h.started_pid("long").await;
        h.exec.shutdown().await;
        assert_eq!(h.exec.running(), 0);
        assert_eq!(process::live_group_members(pgid), Vec::<u32>::new());
        let long = h.result("long").await;
        assert_eq!(
            (long.state, long.exit_code_or_signal),
            (CommandOutcome::Cancelled, libc::SIGTERM)
        );
        assert_eq!(long.error.as_deref(), Some("the guest agent shut down"));
        let queued = h.result("queued").await;
        assert_eq!(
            (queued.state, queued.started_at),
            (CommandOutcome::Cancelled, None)
        );
        assert!(h.run("late", spec("true", &[])));
        let late = h.result("late").await;
        assert_eq!(late.state, CommandOutcome::FailedToStart);
        assert_eq!(
            late.error.as_deref(),
            Some("the guest agent is shutting down")
        );
    }
}
