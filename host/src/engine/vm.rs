//! The VM actor: one VM's hypervisor state and its guest's presence.
//!
//! Lifecycle operations run on tokio's blocking pool (hypervisor calls block) one at
//! a time per VM (`AtomicResponse`), and each is followed by a fresh look at the
//! hypervisor's state, which is stored. A one-second tick re-reads the state of
//! managed VMs (so a VM that powered itself off or whose process died is seen as
//! `PoweredOff` / `Aborted` without anyone asking) and re-evaluates presence.
//! Messages from the guest agent arrive from the registry as [`GuestSaid`]. The
//! actor is `Supervised`: if it stops unexpectedly, the supervisor restarts it and
//! [`Supervised::restarting`] reloads its state from the store.

use super::presence::{Presence, PresenceTracker};
use super::{EngineError, EngineEvent, EventSender, VmView};
use crate::hypervisor::{Hypervisor, SnapshotInfo, VmDefinition, VmState};
use crate::store::{Store, VmRecord};
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use vmc_protocol::words::{GuestInfo, Message as Word};

/// A lifecycle operation of the original API.
#[derive(Clone, Debug, PartialEq)]
pub enum LifecycleOp {
    Start,
    /// ACPI power button.
    Shutdown,
    Sleep,
    Reset,
    PowerOff,
    Pause,
    Resume,
    SaveState,
    DiscardState,
    TakeSnapshot {
        name: String,
        description: String,
    },
    RestoreSnapshot {
        name: String,
    },
    DeleteSnapshot {
        name: String,
    },
}

impl LifecycleOp {
    /// The original API's name of the operation.
    pub fn name(&self) -> &'static str {
        match self {
            LifecycleOp::Start => "start",
            LifecycleOp::Shutdown => "shutdown",
            LifecycleOp::Sleep => "sleep",
            LifecycleOp::Reset => "reset",
            LifecycleOp::PowerOff => "powerOff",
            LifecycleOp::Pause => "pause",
            LifecycleOp::Resume => "resume",
            LifecycleOp::SaveState => "saveState",
            LifecycleOp::DiscardState => "discardState",
            LifecycleOp::TakeSnapshot { .. } => "takeSnapshot",
            LifecycleOp::RestoreSnapshot { .. } => "restoreSnapshot",
            LifecycleOp::DeleteSnapshot { .. } => "deleteSnapshot",
        }
    }
}

/// The actor of one VM.
pub struct VmActor {
    definition: VmDefinition,
    hypervisor: Arc<dyn Hypervisor>,
    store: Arc<Store>,
    state: VmState,
    presence: PresenceTracker,
    guest: Option<GuestInfo>,
    /// A lifecycle operation is in progress: the tick leaves the state alone.
    busy: bool,
    events: EventSender,
    /// The caller's view, republished after every change: readers (the registry's
    /// listings) never queue behind this actor's mailbox.
    published: watch::Sender<VmView>,
    /// Told when the VM stops (its commands in flight are lost).
    on_stop: Recipient<VmStopped>,
}

impl std::fmt::Debug for VmActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmActor")
            .field("name", &self.definition.spec.name)
            .finish()
    }
}

impl VmActor {
    /// An actor for a VM stored in `record`.
    pub fn new(
        record: &VmRecord,
        hypervisor: Arc<dyn Hypervisor>,
        store: Arc<Store>,
        beacon: Duration,
        events: EventSender,
        on_stop: Recipient<VmStopped>,
    ) -> VmActor {
        let mut presence = PresenceTracker::new(beacon);
        presence.restore(
            Presence::parse(&record.presence).unwrap_or(Presence::Unknown),
            record.presence_since,
        );
        let definition = record.definition();
        let state = VmState::parse(&record.last_state).unwrap_or(VmState::Unknown);
        let view = view_of(&definition, state, &presence, None);
        VmActor {
            definition,
            hypervisor,
            store,
            state,
            presence,
            guest: None,
            busy: false,
            events,
            published: watch::Sender::new(view),
            on_stop,
        }
    }

    /// A receiver of this VM's view, current at every moment.
    pub fn view_receiver(&self) -> watch::Receiver<VmView> {
        self.published.subscribe()
    }

    fn name(&self) -> &str {
        &self.definition.spec.name
    }

    /// Republishes the view if anything in it changed.
    fn publish(&self) {
        let view = view_of(
            &self.definition,
            self.state,
            &self.presence,
            self.guest.as_ref(),
        );
        self.published.send_if_modified(|published| {
            if *published == view {
                false
            } else {
                *published = view;
                true
            }
        });
    }

    /// Whether the VM is known to be off with no operation under way (a start in
    /// progress may already let the guest speak): a guest message now is a late one,
    /// sent just before a save or power-off, and says nothing about presence.
    fn is_off(&self) -> bool {
        self.is_managed()
            && !self.busy
            && matches!(
                self.state,
                VmState::PoweredOff | VmState::Saved | VmState::Aborted
            )
    }

    /// After a sign of life or a `BYE`: a presence change is logged and stored,
    /// anything else only refreshes the published view (its last-heard time).
    fn after_presence(&self, changed: bool) {
        if changed {
            log::info!(
                "VM {}: guest {}",
                self.name(),
                self.presence.state().as_str()
            );
            self.persist();
        } else {
            self.publish();
        }
    }

    fn persist(&self) {
        self.publish();
        let _ = self.events.send(EngineEvent::Vm {
            vm: self.name().to_owned(),
            state: self.state,
            presence: self.presence.state(),
        });
        if let Err(e) = self.store.set_vm_state(
            self.name(),
            self.state.as_str(),
            self.presence.state().as_str(),
            self.presence.since(),
        ) {
            log::error!("cannot store the state of VM {}: {e}", self.name());
        }
    }

    /// Applies a state read from the hypervisor to the presence machine.
    fn observe(&mut self, state: VmState) {
        let before = (self.state, self.presence.state());
        self.state = state;
        match state {
            VmState::Running | VmState::Starting => {
                self.presence.vm_paused(false);
            }
            VmState::Paused => self.presence.vm_paused(true),
            VmState::PoweredOff | VmState::Saved | VmState::Aborted => {
                self.presence.vm_stopped();
            }
            _ => {}
        }
        if before != (self.state, self.presence.state()) {
            log::info!(
                "VM {}: {} / guest {}",
                self.name(),
                self.state,
                self.presence.state().as_str()
            );
            self.persist();
        }
        // Powered off or died (not saved: a saved VM's commands go on when it
        // resumes). From Unknown too: a host restart may first see the VM off.
        if before.0 != state && matches!(state, VmState::PoweredOff | VmState::Aborted) {
            self.on_stop.do_send(VmStopped {
                vm: self.name().to_owned(),
                state,
            });
        }
    }

    fn is_managed(&self) -> bool {
        self.definition.backend != crate::hypervisor::unmanaged::NAME
    }
}

fn view_of(
    definition: &VmDefinition,
    state: VmState,
    presence: &PresenceTracker,
    guest: Option<&GuestInfo>,
) -> VmView {
    VmView {
        name: definition.spec.name.clone(),
        id: definition.mac.clone(),
        backend: definition.backend.clone(),
        state,
        presence: presence.state(),
        presence_since: presence.since(),
        last_heard: presence.last_heard_at(),
        guest: guest.cloned(),
    }
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            if act.presence.tick(tokio::time::Instant::now()) {
                log::info!("VM {}: guest {}", act.name(), act.presence.state().as_str());
                act.persist();
            }
            if act.busy || !act.is_managed() {
                return;
            }
            let (hypervisor, definition) = (act.hypervisor.clone(), act.definition.clone());
            let read = async move {
                tokio::task::spawn_blocking(move || hypervisor.state(&definition)).await
            };
            ctx.spawn(read.into_actor(act).map(|state, act, _| {
                if act.busy {
                    return; // an operation started meanwhile; its own look wins
                }
                match state {
                    Ok(Ok(state)) => act.observe(state),
                    Ok(Err(e)) => log::debug!("cannot read the state of VM {}: {e}", act.name()),
                    Err(e) => log::error!("state probe of VM {} panicked: {e}", act.name()),
                }
            }));
        });
    }
}

impl Supervised for VmActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        log::warn!(
            "VM actor {} restarts: reloading it from the store",
            self.name()
        );
        match self.store.vm(self.name()) {
            Ok(Some(record)) => {
                self.definition = record.definition();
                self.state = VmState::parse(&record.last_state).unwrap_or(VmState::Unknown);
                self.presence.restore(
                    Presence::parse(&record.presence).unwrap_or(Presence::Unknown),
                    record.presence_since,
                );
            }
            Ok(None) => log::error!("VM {} is no longer in the store", self.name()),
            Err(e) => log::error!("cannot reload VM {}: {e}", self.name()),
        }
        self.busy = false;
        self.publish();
    }
}

/// Told to the registry when a VM powers off or its process dies.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct VmStopped {
    pub vm: String,
    pub state: VmState,
}

/// Runs a lifecycle operation; answers the state after it.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmState, EngineError>")]
pub struct Lifecycle {
    pub op: LifecycleOp,
}

impl Handler<Lifecycle> for VmActor {
    type Result = AtomicResponse<Self, Result<VmState, EngineError>>;

    fn handle(&mut self, msg: Lifecycle, _ctx: &mut Context<Self>) -> Self::Result {
        self.busy = true;
        let (hypervisor, definition, store) = (
            self.hypervisor.clone(),
            self.definition.clone(),
            self.store.clone(),
        );
        let op = msg.op.clone();
        let work = async move {
            tokio::task::spawn_blocking(move || {
                let name = definition.spec.name.clone();
                let done = match &op {
                    LifecycleOp::Start => hypervisor.start(&definition),
                    LifecycleOp::Shutdown => hypervisor.shutdown(&definition),
                    LifecycleOp::Sleep => hypervisor.sleep(&definition),
                    LifecycleOp::Reset => hypervisor.reset(&definition),
                    LifecycleOp::PowerOff => hypervisor.power_off(&definition),
                    LifecycleOp::Pause => hypervisor.pause(&definition),
                    LifecycleOp::Resume => hypervisor.resume(&definition),
                    LifecycleOp::SaveState => hypervisor.save_state(&definition),
                    LifecycleOp::DiscardState => hypervisor.discard_state(&definition),
                    LifecycleOp::TakeSnapshot {
                        name: snapshot,
                        description,
                    } => hypervisor
                        .take_snapshot(&definition, snapshot, description)
                        .and_then(|info| {
                            store.put_snapshot(&name, &info).map_err(|e| {
                                crate::hypervisor::HypervisorError::Failed {
                                    vm: name.clone(),
                                    operation: "takeSnapshot",
                                    message: format!(
                                        "the snapshot exists but was not recorded: {e}"
                                    ),
                                }
                            })
                        }),
                    LifecycleOp::RestoreSnapshot { name: snapshot } => {
                        hypervisor.restore_snapshot(&definition, snapshot)
                    }
                    LifecycleOp::DeleteSnapshot { name: snapshot } => {
                        hypervisor.delete_snapshot(&definition, snapshot).map(|()| {
                            if let Err(e) = store.remove_snapshot(&name, snapshot) {
                                log::error!("cannot forget snapshot {snapshot} of {name}: {e}");
                            }
                        })
                    }
                };
                let state = hypervisor.state(&definition);
                (done, state)
            })
            .await
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |outcome, act, _| {
                act.busy = false;
                let (done, state) = outcome.map_err(|e| {
                    EngineError::Internal(format!("a hypervisor call panicked: {e}"))
                })?;
                if let Ok(state) = &state {
                    act.observe(*state);
                }
                if done.is_ok() && msg.op == LifecycleOp::Start {
                    act.presence.vm_started();
                    act.persist();
                }
                done?;
                Ok(act.state)
            },
        )))
    }
}

/// A sign of life from the guest agent in a message that is not about presence
/// (a PONG, a command's start or result).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heard;

impl Handler<Heard> for VmActor {
    type Result = ();

    fn handle(&mut self, _msg: Heard, _ctx: &mut Context<Self>) {
        if self.is_off() {
            return;
        }
        let changed = self.presence.heard();
        self.after_presence(changed);
    }
}

/// Something the guest agent said (routed here by its id).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct GuestSaid {
    pub word: Word,
}

impl Handler<GuestSaid> for VmActor {
    type Result = ();

    fn handle(&mut self, msg: GuestSaid, _ctx: &mut Context<Self>) {
        if self.is_off() {
            log::debug!(
                "VM {}: ignoring a guest message that arrived while the VM is {}",
                self.name(),
                self.state
            );
            return;
        }
        let changed = match msg.word {
            Word::Bye { .. } => self.presence.bye(),
            Word::Hello(info) => {
                self.guest = Some(info);
                self.presence.heard()
            }
            _ => self.presence.heard(),
        };
        self.after_presence(changed);
    }
}

/// The VM's definition (for removal and transfers).
#[derive(Debug, Message)]
#[rtype(result = "VmDefinition")]
pub struct GetDefinition;

impl Handler<GetDefinition> for VmActor {
    type Result = MessageResult<GetDefinition>;

    fn handle(&mut self, _msg: GetDefinition, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.definition.clone())
    }
}

/// Lists snapshots from the hypervisor, with the descriptions the store keeps.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<SnapshotInfo>, EngineError>")]
pub struct ListSnapshots;

impl Handler<ListSnapshots> for VmActor {
    type Result = ResponseFuture<Result<Vec<SnapshotInfo>, EngineError>>;

    fn handle(&mut self, _msg: ListSnapshots, _ctx: &mut Context<Self>) -> Self::Result {
        let (hypervisor, definition) = (self.hypervisor.clone(), self.definition.clone());
        Box::pin(async move {
            let listed =
                tokio::task::spawn_blocking(move || hypervisor.list_snapshots(&definition))
                    .await
                    .map_err(|e| {
                        EngineError::Internal(format!("a hypervisor call panicked: {e}"))
                    })?;
            Ok(listed?)
        })
    }
}

/// Performance data from the hypervisor.
#[derive(Debug, Message)]
#[rtype(result = "Result<crate::hypervisor::PerformanceData, EngineError>")]
pub struct Performance;

impl Handler<Performance> for VmActor {
    type Result = ResponseFuture<Result<crate::hypervisor::PerformanceData, EngineError>>;

    fn handle(&mut self, _msg: Performance, _ctx: &mut Context<Self>) -> Self::Result {
        let (hypervisor, definition) = (self.hypervisor.clone(), self.definition.clone());
        Box::pin(async move {
            let data = tokio::task::spawn_blocking(move || hypervisor.performance(&definition))
                .await
                .map_err(|e| EngineError::Internal(format!("a hypervisor call panicked: {e}")))?;
            Ok(data?)
        })
    }
}

/// Stops the actor as a crash would (tests of supervision use it).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for VmActor {
    type Result = ();

    fn handle(&mut self, _msg: Crash, ctx: &mut Context<Self>) {
        log::warn!("VM actor {} told to crash", self.name());
        self.state = VmState::Unknown;
        self.guest = None;
        self.publish();
        ctx.stop();
    }
}

/// Stops the actor for good (the VM was removed).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for VmActor {
    type Result = ();

    fn handle(&mut self, _msg: Retire, ctx: &mut Context<Self>) {
        ctx.terminate();
    }
}
