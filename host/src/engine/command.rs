//! The command actor: one command execution on one guest, from `queued` to a final
//! state.
//!
//! It sends `CMD_RUN` to the guest's queue (with a broker receipt: then it is
//! `sent`), follows `CMD_STARTED` (`running`, with the pid), stores every
//! `CMD_OUTPUT` chunk (idempotently, by offset), and on `CMD_RESULT` stores the
//! result (the first one wins: duplicates after a reconnection are ignored) and only
//! then sends `CMD_ACK`, so the guest deletes its spooled copy only once the host
//! holds it. Its state after that is `finished`, `failed` (never started),
//! `timed out`, `cancelled` or `lost` (the guest lost track of it, or no result came
//! within its deadline). A command recovered after a host restart sends `CMD_RUN`
//! again with the same id: the guest runs a command id at most once and answers a
//! repeated one with its spooled result. After its end the actor lingers briefly
//! for late duplicates, then stops; the registry answers from the store after that.
//! Should it stop before its command's end, the registry (its supervisor) starts
//! it again as after a host restart, handing over whoever was waiting.

use super::broker::{BrokerActor, Publish};
use super::flush::Flusher;
use super::{EngineError, EngineEvent, EventSender};
use crate::store::{CommandRecord, CommandState, Store};
use actix::prelude::*;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use vmc_protocol::words::{CommandOutcome, CommandResult, CommandStatus, Message as Word};

/// How long a finished command's actor waits for late duplicates before stopping
/// (unless the engine's configuration says otherwise).
pub const LINGER: Duration = Duration::from_secs(30);

/// Extra time past a command's own timeout before the host gives up on its result.
const DEADLINE_SLACK: Duration = Duration::from_secs(60);

/// A command's record and, while it runs, the guest's latest live report.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandDetails {
    pub record: CommandRecord,
    pub live: Option<CommandStatus>,
}

/// The final state a guest's result puts a command in.
pub fn final_state(result: &CommandResult) -> CommandState {
    match result.state {
        CommandOutcome::Exited | CommandOutcome::Signalled => CommandState::Finished,
        CommandOutcome::TimedOut => CommandState::TimedOut,
        CommandOutcome::Cancelled => CommandState::Cancelled,
        CommandOutcome::FailedToStart => CommandState::Failed,
        CommandOutcome::Lost => CommandState::Lost,
    }
}

/// The actor of one command.
pub struct CommandActor {
    cmd_id: String,
    store: Arc<Store>,
    flusher: Flusher,
    broker: Addr<BrokerActor>,
    guest_queue: String,
    guest_id: String,
    spec: vmc_protocol::words::CommandSpec,
    recovering: bool,
    finished: bool,
    /// `CMD_STARTED` came (possibly before the broker's receipt for `CMD_RUN`).
    started: bool,
    live: Option<CommandStatus>,
    waiters: Vec<oneshot::Sender<CommandRecord>>,
    status_waiters: Vec<oneshot::Sender<Option<CommandStatus>>>,
    on_stop: Option<Recipient<CommandStopped>>,
    events: EventSender,
    vm: Option<String>,
    linger: Duration,
}

impl std::fmt::Debug for CommandActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandActor")
            .field("cmd_id", &self.cmd_id)
            .finish()
    }
}

/// Told to the registry when a command actor stops. `finished` false means it
/// stopped before its command's end (a crash): `waiters` are the callers still
/// waiting for that end, for the actor that takes over.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CommandStopped {
    pub cmd_id: String,
    pub finished: bool,
    pub waiters: Vec<oneshot::Sender<CommandRecord>>,
}

impl CommandActor {
    /// An actor for the stored (committed) command `record`; it sends `CMD_RUN` at
    /// once, while the caller waits for the record's flush before answering.
    pub fn new(
        record: &CommandRecord,
        store: Arc<Store>,
        flusher: Flusher,
        broker: Addr<BrokerActor>,
        guest_queue: String,
        on_stop: Recipient<CommandStopped>,
        events: EventSender,
    ) -> CommandActor {
        CommandActor {
            cmd_id: record.cmd_id.clone(),
            store,
            flusher,
            broker,
            guest_queue,
            guest_id: record.guest_id.clone(),
            spec: record.spec.clone(),
            recovering: false,
            finished: false,
            started: false,
            live: None,
            waiters: Vec::new(),
            status_waiters: Vec::new(),
            on_stop: Some(on_stop),
            events,
            vm: record.vm.clone(),
            linger: LINGER,
        }
    }

    /// How long the actor stays after its command's end (late duplicates are
    /// answered from memory meanwhile).
    pub fn lingering(mut self, linger: Duration) -> CommandActor {
        self.linger = linger;
        self
    }

    /// Callers already waiting for the command's end (handed over from an actor
    /// that stopped before it).
    pub fn with_waiters(mut self, waiters: Vec<oneshot::Sender<CommandRecord>>) -> CommandActor {
        self.waiters = waiters;
        self
    }

    /// For a command that was in flight when the host stopped: `CMD_RUN` is sent
    /// again (the guest runs an id at most once) and the state is left as stored.
    pub fn recovering(mut self) -> CommandActor {
        self.recovering = true;
        self
    }

    fn record(&self) -> Result<CommandRecord, EngineError> {
        self.store
            .command(&self.cmd_id)?
            .ok_or_else(|| EngineError::UnknownCommand(self.cmd_id.clone()))
    }

    fn announce(&self, state: CommandState) {
        let _ = self.events.send(EngineEvent::Command {
            cmd_id: self.cmd_id.clone(),
            vm: self.vm.clone(),
            state,
        });
    }

    /// Stores a state change, then announces it (a follower that reads the record
    /// on the event finds the new state).
    fn set_state(&self, state: CommandState, error: Option<&str>) {
        match self
            .store
            .set_command_state(&self.cmd_id, state, Utc::now(), error)
        {
            Ok(_) => self.announce(state),
            Err(e) => log::error!("cannot store the state of command {}: {e}", self.cmd_id),
        }
    }

    /// Marks the command ended without a result from the guest.
    fn end_without_result(&mut self, state: CommandState, why: &str, ctx: &mut Context<Self>) {
        self.set_state(state, Some(why));
        self.finish(ctx);
    }

    fn finish(&mut self, ctx: &mut Context<Self>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.live = None;
        if let Ok(record) = self.record() {
            for waiter in self.waiters.drain(..) {
                let _ = waiter.send(record.clone());
            }
        }
        for waiter in self.status_waiters.drain(..) {
            let _ = waiter.send(None);
        }
        ctx.run_later(self.linger, |_, ctx| ctx.stop());
    }

    fn on_result(&mut self, result: CommandResult, ctx: &mut Context<Self>) {
        let state = final_state(&result);
        match self.store.record_result(&self.cmd_id, &result, state) {
            Ok(true) => {
                log::debug!("command {} {}", self.cmd_id, state.as_str());
                self.announce(state);
            }
            Ok(false) => log::debug!("duplicate result of command {} ignored", self.cmd_id),
            Err(e) => {
                // Not stored: do not acknowledge, so the guest keeps it and resends.
                log::error!("cannot store the result of command {}: {e}", self.cmd_id);
                return;
            }
        }
        self.finish(ctx);
        // The guest forgets the result on CMD_ACK: only once it is on our disk.
        let (flusher, broker) = (self.flusher.clone(), self.broker.clone());
        let ack = Publish {
            destination: self.guest_queue.clone(),
            word: Word::CmdAck {
                cmd_id: self.cmd_id.clone(),
            },
            to: None,
            confirm: false,
        };
        let cmd_id = self.cmd_id.clone();
        ctx.spawn(
            async move {
                match flusher.flush_soon().await {
                    Ok(()) => broker.do_send(ack),
                    Err(e) => log::error!(
                        "result of command {cmd_id} not acknowledged (the guest keeps it): {e}"
                    ),
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for CommandActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let publish = Publish {
            destination: self.guest_queue.clone(),
            word: Word::CmdRun {
                cmd_id: self.cmd_id.clone(),
                to: self.guest_id.clone(),
                spec: self.spec.clone(),
            },
            to: Some(self.guest_id.clone()),
            confirm: true,
        };
        let recovering = self.recovering;
        ctx.spawn(self.broker.send(publish).into_actor(self).map(
            move |sent, act, ctx| match sent {
                // The guest may have answered before the broker's receipt came:
                // `sent` never replaces `running` or a final state.
                Ok(Ok(())) if act.started || act.finished => {}
                Ok(Ok(())) if !recovering => act.set_state(CommandState::Sent, None),
                Ok(Ok(())) => log::info!("command {} asked for again after a restart", act.cmd_id),
                Ok(Err(e)) => act.end_without_result(CommandState::Failed, &e.to_string(), ctx),
                Err(e) => act.end_without_result(CommandState::Failed, &e.to_string(), ctx),
            },
        ));
        if let Some(timeout) = self
            .spec
            .timeout_secs
            .and_then(|t| Duration::try_from_secs_f64(t).ok())
        {
            ctx.run_later(timeout + DEADLINE_SLACK, |act, ctx| {
                if !act.finished {
                    let why = "no result arrived from the guest within the command's deadline";
                    act.end_without_result(CommandState::Lost, why, ctx);
                }
            });
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if super::tearing_down() {
            // The host agent is stopping: the next start recovers the command.
            return;
        }
        if !self.finished {
            log::warn!(
                "the actor of command {} stopped before the command's end",
                self.cmd_id
            );
        }
        if let Some(on_stop) = self.on_stop.take() {
            on_stop.do_send(CommandStopped {
                cmd_id: self.cmd_id.clone(),
                finished: self.finished,
                waiters: std::mem::take(&mut self.waiters),
            });
        }
    }
}

/// A word from the guest about this command.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FromGuest {
    pub word: Word,
}

impl Handler<FromGuest> for CommandActor {
    type Result = ();

    fn handle(&mut self, msg: FromGuest, ctx: &mut Context<Self>) {
        match msg.word {
            Word::CmdStarted { pid, .. } => {
                self.started = true;
                if !self.finished {
                    let stored = self
                        .store
                        .set_command_state(&self.cmd_id, CommandState::Running, Utc::now(), None)
                        .and_then(|_| self.store.set_command_pid(&self.cmd_id, pid));
                    match stored {
                        Ok(()) => self.announce(CommandState::Running),
                        Err(e) => {
                            log::error!("cannot store the start of command {}: {e}", self.cmd_id)
                        }
                    }
                }
            }
            Word::CmdOutput {
                stream,
                offset,
                data,
                ..
            } => {
                match self
                    .store
                    .append_output(&self.cmd_id, stream, offset, &data)
                {
                    Ok(true) => {
                        let _ = self.events.send(EngineEvent::Output {
                            cmd_id: self.cmd_id.clone(),
                            stream,
                            offset,
                            data,
                        });
                    }
                    Ok(false) => {} // a duplicate chunk
                    Err(e) => log::error!("cannot store output of command {}: {e}", self.cmd_id),
                }
            }
            Word::CmdStatus { status, .. } => {
                for waiter in self.status_waiters.drain(..) {
                    let _ = waiter.send(Some(status.clone()));
                }
                self.live = Some(status);
            }
            Word::CmdResult(result) => self.on_result(result, ctx),
            other => log::debug!("command {}: {} ignored", self.cmd_id, other.word()),
        }
    }
}

/// The command's VM stopped (powered off or its process died): a command still
/// running there can no longer report. A result that arrives later (the guest's
/// spool, after the VM boots again) still supersedes this.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct VmStopped {
    pub why: String,
}

impl Handler<VmStopped> for CommandActor {
    type Result = ();

    fn handle(&mut self, msg: VmStopped, ctx: &mut Context<Self>) {
        if !self.finished {
            self.end_without_result(CommandState::Lost, &msg.why, ctx);
        }
    }
}

/// Waits for the command's end.
#[derive(Debug, Message)]
#[rtype(result = "Result<CommandRecord, EngineError>")]
pub struct WaitFinished;

impl Handler<WaitFinished> for CommandActor {
    type Result = ResponseFuture<Result<CommandRecord, EngineError>>;

    fn handle(&mut self, _msg: WaitFinished, _ctx: &mut Context<Self>) -> Self::Result {
        if self.finished {
            let record = self.record();
            return Box::pin(async move { record });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        let cmd_id = self.cmd_id.clone();
        Box::pin(async move {
            rx.await.map_err(|_| {
                EngineError::Internal(format!("command {cmd_id} stopped unexpectedly"))
            })
        })
    }
}

/// Stops the actor as a crash would, whatever its command's state (tests of
/// supervision use it).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for CommandActor {
    type Result = ();

    fn handle(&mut self, _msg: Crash, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Asks the guest for live details (waits up to 3 s for `CMD_STATUS`).
#[derive(Debug, Message)]
#[rtype(result = "Result<CommandDetails, EngineError>")]
pub struct Details;

impl Handler<Details> for CommandActor {
    type Result = ResponseActFuture<Self, Result<CommandDetails, EngineError>>;

    fn handle(&mut self, _msg: Details, _ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if !self.finished {
            self.status_waiters.push(tx);
            self.broker.do_send(Publish {
                destination: self.guest_queue.clone(),
                word: Word::CmdQuery {
                    cmd_id: self.cmd_id.clone(),
                },
                to: None,
                confirm: false,
            });
        } else {
            let _ = tx.send(None);
        }
        let wait = async move { tokio::time::timeout(Duration::from_secs(3), rx).await };
        Box::pin(wait.into_actor(self).map(|answered, act, _| {
            let live = match answered {
                Ok(Ok(status)) => status,
                _ => act.live.clone(),
            };
            Ok(CommandDetails {
                record: act.record()?,
                live,
            })
        }))
    }
}

/// Cancels the command.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Cancel;

impl Handler<Cancel> for CommandActor {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, _msg: Cancel, _ctx: &mut Context<Self>) -> Self::Result {
        if self.finished {
            return Ok(()); // nothing left to cancel
        }
        self.broker.do_send(Publish {
            destination: self.guest_queue.clone(),
            word: Word::CmdCancel {
                cmd_id: self.cmd_id.clone(),
                grace_secs: None,
            },
            to: None,
            confirm: false,
        });
        Ok(())
    }
}
