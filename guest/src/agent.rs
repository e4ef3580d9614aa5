//! The guest agent's main loop: one STOMP session, one dispatch loop.
//!
//! [`run`] opens the spool, turns commands that were running when the agent last
//! stopped into `lost` results, starts the session, subscribes to this guest's own
//! queue and to the multicast topic, and then loops over a closed set of
//! [`LoopEvent`]s: session events (on every connection: `HELLO`, then every spooled
//! result again), replies from the executor and the transfers, finished commands
//! (spooled before their `CMD_RESULT` is sent), the beacon tick, and shutdown. A
//! broker message is acknowledged only after it has been acted on durably (a
//! `CMD_RUN` once its start is recorded in the spool), so a crash in between makes
//! the broker deliver it again, and the spool makes that harmless.
//!
//! Persistent words are queued with a receipt (re-sent across reconnections until
//! the broker confirms them); output chunks, presence and pings are sent plainly.
//! The loop never waits for a receipt itself.

use crate::exec::{ExecSettings, Executor};
use crate::files::{FileSettings, Transfers};
use crate::identity;
use crate::outbox::{self, Reply};
use crate::settings::Settings;
use crate::spool::{Spool, SpoolError};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use vmc_protocol::agent_main::error_chain;
use vmc_protocol::stomp::{Message as StompMessage, SessionEvent, StompClient, Subscription};
use vmc_protocol::words::{self, CommandOutcome, CommandPhase, CommandResult, Envelope, Message};

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use the result spool")]
    Spool(#[from] SpoolError),
    #[error("cannot create {path}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the STOMP session ended unexpectedly")]
    SessionEnded,
}

/// Every HELLO_EVERY-th beacon is a full HELLO, so a host that started after the
/// guest learns its details without waiting for a reconnection.
const HELLO_EVERY: u64 = 30;

/// How long shutdown waits for BYE and pending receipts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What the main loop reacts to.
enum LoopEvent {
    Session(SessionEvent),
    Reply(Reply),
    Finished {
        reply_to: String,
        result: CommandResult,
    },
    Beacon,
    Shutdown,
}

/// Runs the agent until `shutdown` completes (SIGTERM/SIGINT in the binary).
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let spool = Arc::new(Spool::open(&settings.state_dir.join("spool"))?);
    let output_dir = settings.state_dir.join("output");
    std::fs::create_dir_all(&output_dir).map_err(|source| AgentError::StateDir {
        path: output_dir.display().to_string(),
        source,
    })?;
    for (cmd_id, reply_to) in spool.interrupted()? {
        log::warn!("command {cmd_id} was running when the agent stopped: reporting it lost");
        spool.store_result(&reply_to, &lost_result(&cmd_id))?;
    }

    let (replies, mut reply_rx) = outbox::channel();
    let (results_tx, mut results_rx) = mpsc::unbounded_channel();
    let executor = Executor::new(
        ExecSettings {
            max_concurrent: settings.max_concurrent_commands,
            output_dir,
            kill_grace: settings.kill_grace,
        },
        replies.clone(),
        results_tx,
    );
    let transfers = Transfers::new(
        FileSettings {
            allowed_roots: settings.allowed_roots.clone(),
            max_file_size: settings.max_file_size,
        },
        replies.clone(),
    );
    let (client, mut session_events) = StompClient::start(settings.session.clone());
    let own_queue = settings.destinations.guest_queue(&settings.id);
    for destination in [own_queue.clone(), settings.destinations.multicast_topic()] {
        let client = client.clone();
        tokio::spawn(async move {
            let subscription = Subscription::new(&destination).with_prefetch(Some(64));
            if let Err(e) = client.subscribe(subscription).await {
                log::error!("cannot subscribe to {destination}: {e}");
            }
        });
    }
    log::info!(
        "guest {} listening on {own_queue} via {}",
        settings.id,
        settings.session.addresses[0]
    );

    let spool_flushes = start_spool_flusher(Arc::clone(&spool));
    let mut agent = Agent {
        settings,
        client,
        spool,
        spool_flushes,
        executor,
        transfers,
        own_queue,
        beacons: 0,
    };
    let mut beacon = tokio::time::interval(agent.settings.beacon_interval);
    beacon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beacon.tick().await; // the first tick is immediate; HELLO covers it
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            biased;
            () = &mut shutdown => LoopEvent::Shutdown,
            // Replies before results: a command's output and CMD_STARTED, queued
            // before its result, must reach the broker before its CMD_RESULT.
            Some(reply) = reply_rx.recv() => LoopEvent::Reply(reply),
            Some((reply_to, result)) = results_rx.recv() => LoopEvent::Finished { reply_to, result },
            event = session_events.recv() => match event {
                Some(event) => LoopEvent::Session(event),
                None => return Err(AgentError::SessionEnded),
            },
            _ = beacon.tick() => LoopEvent::Beacon,
        };
        match event {
            LoopEvent::Session(event) => agent.on_session_event(event).await,
            LoopEvent::Reply(reply) => agent.send(&reply.destination, &reply.message).await,
            LoopEvent::Finished { reply_to, result } => agent.on_finished(reply_to, result).await,
            LoopEvent::Beacon => agent.beacon().await,
            LoopEvent::Shutdown => {
                agent.shut_down(&mut results_rx, &mut reply_rx).await;
                return Ok(());
            }
        }
    }
}

/// The result reported for a command the agent lost track of by stopping.
fn lost_result(cmd_id: &str) -> CommandResult {
    CommandResult {
        cmd_id: cmd_id.to_owned(),
        out: String::new(),
        err: String::new(),
        finished: false,
        exit_code_or_signal: -1,
        resources: Default::default(),
        state: CommandOutcome::Lost,
        error: Some(
            "the guest agent stopped while the command ran; its outcome is unknown".to_owned(),
        ),
        started_at: None,
        ended_at: Some(chrono::Utc::now().to_rfc3339()),
        wall_secs: 0.0,
        out_bytes: 0,
        err_bytes: 0,
        out_truncated: false,
        err_truncated: false,
        out_file: None,
        err_file: None,
    }
}

struct Agent {
    settings: Settings,
    client: StompClient,
    spool: Arc<Spool>,
    /// Asks the spool's flusher for one more flush (see [`start_spool_flusher`]).
    spool_flushes: Arc<Notify>,
    executor: Executor,
    transfers: Transfers,
    own_queue: String,
    beacons: u64,
}

/// How long a result sent unflushed may wait for the host's `CMD_ACK` before the
/// spool is flushed for it (an acknowledged result needs no flush of its own).
const RESULT_FLUSH_DELAY: Duration = Duration::from_millis(50);

/// A task that, whenever notified, waits [`RESULT_FLUSH_DELAY`] and then flushes the
/// spool on the blocking pool if a result stored since is still unacknowledged;
/// requests that come meanwhile are served by the same flush or one more after it.
fn start_spool_flusher(spool: Arc<Spool>) -> Arc<Notify> {
    let requests = Arc::new(Notify::new());
    let wakeups = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            wakeups.notified().await;
            tokio::time::sleep(RESULT_FLUSH_DELAY).await;
            let spool = Arc::clone(&spool);
            match tokio::task::spawn_blocking(move || spool.flush_unacknowledged()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::error!("{}", error_chain(&e)),
                Err(e) => log::error!("the spool's flush panicked: {e}"),
            }
        }
    });
    requests
}

impl Agent {
    async fn on_session_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Connected {
                generation,
                address,
                ..
            } => {
                log::info!("connected to {address} (connection {generation})");
                self.hello().await;
                self.resend_results().await;
            }
            SessionEvent::Disconnected { reason, .. } => {
                log::warn!("broker connection lost: {reason}")
            }
            SessionEvent::ConnectFailed {
                address,
                reason,
                retry_in,
            } => {
                log::warn!(
                    "cannot reach the broker at {address}: {reason}; retrying in {retry_in:?}"
                );
            }
            SessionEvent::BrokerError { message, body } => {
                log::error!("the broker reported an error: {message} {body}");
            }
            SessionEvent::Message(message) => self.on_message(message).await,
        }
    }

    async fn on_message(&mut self, message: StompMessage) {
        let multicast = self.settings.destinations.multicast_topic();
        if message.destination() == Some(multicast.as_str())
            && !words::is_addressed_to(&message.frame, &self.settings.id)
        {
            self.ack(&message).await;
            return;
        }
        match words::decode(&message.frame) {
            Ok(envelope) => self.dispatch(envelope).await,
            Err(e) => {
                log::warn!(
                    "cannot understand a message on {:?}: {e}",
                    message.destination()
                );
                if let Some(aint) = e.aint() {
                    let destination = message
                        .frame
                        .header(words::header::REPLY_TO)
                        .map(str::to_owned)
                        .or_else(|| self.sender_queue(message.frame.header(words::header::FROM)));
                    if let Some(destination) = destination {
                        self.send(&destination, &aint).await;
                    }
                }
            }
        }
        self.ack(&message).await;
    }

    /// The queue of the peer named in a `vmc-from` header.
    fn sender_queue(&self, from: Option<&str>) -> Option<String> {
        match from?.parse().ok()? {
            vmc_protocol::identity::PeerId::Host(host) => {
                Some(self.settings.destinations.host_queue(&host))
            }
            vmc_protocol::identity::PeerId::Guest(guest) => {
                Some(self.settings.destinations.guest_queue(&guest))
            }
        }
    }

    async fn dispatch(&mut self, envelope: Envelope) {
        let reply_to = envelope
            .reply_to
            .clone()
            .or_else(|| self.sender_queue(envelope.from.as_deref()));
        match envelope.message {
            Message::Ping { ping_id } => {
                if let Some(to) = reply_to {
                    self.send(&to, &Message::Pong { ping_id }).await;
                }
            }
            Message::SayHello => self.hello().await,
            Message::CmdRun { cmd_id, spec, .. } => {
                log::debug!("CMD_RUN {cmd_id} received");
                let Some(reply_to) = reply_to else {
                    log::warn!("CMD_RUN {cmd_id} has no reply-to: ignored");
                    return;
                };
                self.on_cmd_run(cmd_id, spec, reply_to).await;
            }
            Message::CmdCancel { cmd_id, grace_secs } => {
                let grace = grace_secs.and_then(|s| Duration::try_from_secs_f64(s).ok());
                if !self.executor.cancel(&cmd_id, grace) {
                    log::info!("CMD_CANCEL {cmd_id}: not queued or running (already finished?)");
                }
            }
            Message::CmdQuery { cmd_id } => {
                let mut status = self.executor.status(&cmd_id);
                if status.state == CommandPhase::Unknown && self.spool.is_known(&cmd_id) {
                    status.state = CommandPhase::Finished;
                }
                if let Some(to) = reply_to {
                    self.send(&to, &Message::CmdStatus { cmd_id, status }).await;
                }
            }
            Message::CmdAck { cmd_id } => match self.spool.acknowledge(&cmd_id) {
                Ok(true) => log::debug!("result of {cmd_id} acknowledged"),
                Ok(false) => log::debug!("CMD_ACK for {cmd_id}, which holds no result"),
                Err(e) => log::error!("cannot drop the result of {cmd_id} from the spool: {e}"),
            },
            message @ (Message::FilePut { .. }
            | Message::FileGet { .. }
            | Message::FileChunk { .. }
            | Message::FileAck { .. }
            | Message::FileEnd { .. }
            | Message::FileDone { .. }
            | Message::FileError { .. }
            | Message::FileAbort { .. }) => self.transfers.handle(message, reply_to).await,
            Message::Aint { word, reason } => {
                log::warn!("a peer did not understand our {word}: {reason}");
            }
            other => log::debug!("{} is not a request to a guest: ignored", other.word()),
        }
    }

    async fn on_cmd_run(&mut self, cmd_id: String, spec: words::CommandSpec, reply_to: String) {
        if self.spool.is_known(&cmd_id) {
            // A redelivery: the command ran or runs already. Answer with its result
            // if the host may have missed it.
            match self.spool.result(&cmd_id) {
                Ok(Some((to, result))) => self.send(&to, &Message::CmdResult(result)).await,
                Ok(None) => log::info!("CMD_RUN {cmd_id} delivered again: already running or done"),
                Err(e) => log::error!("cannot read the spooled result of {cmd_id}: {e}"),
            }
            return;
        }
        if let Err(e) = self.spool.mark_started(&cmd_id, &reply_to) {
            log::error!("cannot record CMD_RUN {cmd_id} in the spool: {e}");
            let mut result = lost_result(&cmd_id);
            result.state = CommandOutcome::FailedToStart;
            result.error = Some(format!("the guest cannot record the command: {e}"));
            self.send(&reply_to, &Message::CmdResult(result)).await;
            return;
        }
        log::debug!("CMD_RUN {cmd_id} recorded in the spool");
        if !self.executor.run(cmd_id.clone(), spec, reply_to) {
            log::info!("CMD_RUN {cmd_id} is already queued or running");
        }
    }

    async fn on_finished(&mut self, reply_to: String, result: CommandResult) {
        // The result goes out at once and reaches the disk meanwhile unless the
        // host acknowledges it first: a power cut before either leaves the
        // command's flushed started record, so the result is then reported lost,
        // never silently dropped.
        match self.spool.store_result_unflushed(&reply_to, &result) {
            Ok(()) => self.spool_flushes.notify_one(),
            // Still send it: losing durability is better than losing the result.
            Err(e) => log::error!("cannot spool the result of {}: {e}", result.cmd_id),
        }
        let cmd_id = result.cmd_id.clone();
        self.send(&reply_to, &Message::CmdResult(result)).await;
        log::debug!("CMD_RESULT {cmd_id} sent");
    }

    async fn resend_results(&mut self) {
        match self.spool.pending() {
            Ok(results) => {
                for (reply_to, result) in results {
                    self.send(&reply_to, &Message::CmdResult(result)).await;
                }
            }
            Err(e) => log::error!("cannot read the result spool: {e}"),
        }
    }

    async fn hello(&mut self) {
        let info = identity::guest_info(&self.settings);
        let topic = self.settings.destinations.connections_topic();
        self.send(&topic, &Message::Hello(info)).await;
    }

    async fn beacon(&mut self) {
        self.beacons += 1;
        if self.beacons.is_multiple_of(HELLO_EVERY) {
            self.hello().await;
            return;
        }
        let summary = identity::load_summary(&self.settings, self.executor.running());
        let topic = self.settings.destinations.connections_topic();
        self.send(&topic, &Message::StillAlive(summary)).await;
    }

    /// Encodes and sends; persistent words are queued with a receipt.
    async fn send(&self, destination: &str, message: &Message) {
        let max = self.settings.session.max_frame_size;
        let mut frame = match words::encode(
            message,
            self.settings.id.as_str(),
            Some(&self.own_queue),
            max,
        ) {
            Ok(frame) => frame,
            Err(e) => {
                log::error!("cannot encode {}: {e}", message.word());
                return;
            }
        };
        frame.set_header("destination", destination);
        let result = if message.kind().is_persistent() {
            self.client.queue_with_receipt(frame).await.map(drop)
        } else {
            self.client.send(frame).await
        };
        if let Err(e) = result {
            log::error!("cannot send {} to {destination}: {e}", message.word());
        }
    }

    async fn ack(&self, message: &StompMessage) {
        if let Err(e) = self.client.ack(message).await {
            log::debug!("cannot acknowledge a message: {e}");
        }
    }

    /// Stops running commands (their results are spooled and, if the broker is
    /// reachable, sent), says BYE and closes the session.
    async fn shut_down(
        &mut self,
        results: &mut mpsc::UnboundedReceiver<(String, CommandResult)>,
        replies: &mut outbox::ReplyReceiver,
    ) {
        log::info!("shutting down");
        let stopping = self.executor.shutdown();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                biased;
                Some(reply) = replies.recv() => self.send(&reply.destination, &reply.message).await,
                Some((reply_to, result)) = results.recv() => self.on_finished(reply_to, result).await,
                () = &mut stopping => break,
            }
        }
        while let Ok((reply_to, result)) = results.try_recv() {
            self.on_finished(reply_to, result).await;
        }
        if let Err(e) = self.spool.flush() {
            log::error!("{}", error_chain(&e));
        }
        let bye = Message::Bye {
            reason: Some("agent shutting down".to_owned()),
        };
        let topic = self.settings.destinations.connections_topic();
        let max = self.settings.session.max_frame_size;
        if let Ok(mut frame) = words::encode(&bye, self.settings.id.as_str(), None, max) {
            frame.set_header("destination", topic);
            // Wait briefly: with no broker the BYE cannot go, and the host will see
            // the beacons stop instead.
            let sent =
                tokio::time::timeout(SHUTDOWN_GRACE, self.client.send_with_receipt(frame)).await;
            if !matches!(sent, Ok(Ok(()))) {
                log::warn!("BYE could not be delivered to the broker");
            }
        }
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.client.shutdown()).await;
    }
}
