//! The registry actor: owns the map of VMs, supervises their actors, and routes
//! every guest message to the one actor it concerns.
//!
//! It creates one supervised [`VmActor`] per VM (from the store at boot, on
//! `createVM`, and for an unmanaged guest the first time it says HELLO), one
//! [`CommandActor`] per command and one [`TransferActor`] per transfer, and knows
//! them by name, guest id, cmd-id and transfer id. Guest messages arrive from the
//! broker actor as [`Incoming`]; the registry answers only once the actor concerned
//! has handled the message, which is when the broker acknowledges it. Words for a
//! command whose actor is gone (finished long ago, or the host restarted) are
//! handled from the store: a repeated result is acknowledged again, never stored
//! twice. Operations on one VM are forwarded to its actor; the registry itself
//! never calls the hypervisor except to create and remove VMs.

use super::broker::{BrokerActor, CloseSession, GetBrokerStatus, Publish};
use super::command::{self, CommandActor, CommandDetails, CommandStopped};
use super::flush::Flusher;
use super::transfer::{self, TransferActor, TransferPlan};
use super::vm::{self, LifecycleOp, VmActor};
use super::{new_id, EngineConfig, EngineError, EngineStatus, EventSender, FanoutView, VmView};
use crate::hypervisor::foreign::Foreign;
use crate::hypervisor::unmanaged::{self, Unmanaged};
use crate::hypervisor::{default_mac, Hypervisor, SnapshotInfo, VmDefinition, VmSpec, VmState};
use crate::store::{
    CommandQuery, CommandRecord, CommandState, Store, StoreError, TransferDirection,
    TransferRecord, TransferState, VmRecord,
};
use actix::prelude::*;
use chrono::Utc;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use vmc_protocol::glob::glob_match;
use vmc_protocol::identity::GuestId;
use vmc_protocol::words::{CommandSpec, Envelope, FileErrorCode, Message as Word, DIGEST_AT_END};

/// How often a guest whose HELLO is missing is asked for one.
const ASK_HELLO_EVERY: Duration = Duration::from_secs(60);

/// The registry actor.
pub struct Registry {
    config: EngineConfig,
    store: Arc<Store>,
    unmanaged: Arc<dyn Hypervisor>,
    broker: Option<Addr<BrokerActor>>,
    vms: HashMap<String, Addr<VmActor>>,
    /// Each VM's published view, by name (listings read these, not the actors).
    views: BTreeMap<String, watch::Receiver<VmView>>,
    /// Guest id → VM name.
    ids: HashMap<String, String>,
    commands: HashMap<String, Addr<CommandActor>>,
    transfers: HashMap<String, Addr<TransferActor>>,
    pings: HashMap<String, oneshot::Sender<()>>,
    events: EventSender,
    flusher: Flusher,
    /// When each guest whose HELLO we lack was last asked for one.
    asked_hello: HashMap<String, Instant>,
    /// How many times each command's actor was started again after stopping
    /// before the command's end.
    restarts: HashMap<String, u32>,
    /// Set by [`Shutdown`]: actors stopping from then on are not restarted.
    shutting_down: bool,
    /// MACs picked for VMs being created (not yet in `ids`).
    reserved_macs: BTreeSet<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("vms", &self.vms.len())
            .field("commands", &self.commands.len())
            .finish()
    }
}

impl Registry {
    pub fn new(
        config: EngineConfig,
        store: Arc<Store>,
        events: EventSender,
        flusher: Flusher,
    ) -> Registry {
        Registry {
            config,
            store,
            unmanaged: Arc::new(Unmanaged),
            broker: None,
            vms: HashMap::new(),
            views: BTreeMap::new(),
            ids: HashMap::new(),
            commands: HashMap::new(),
            transfers: HashMap::new(),
            pings: HashMap::new(),
            events,
            flusher,
            asked_hello: HashMap::new(),
            restarts: HashMap::new(),
            shutting_down: false,
            reserved_macs: BTreeSet::new(),
        }
    }

    /// A beacon from a guest whose HELLO this host has not seen (it started after
    /// the guest): asks the guest for one, at most once a minute.
    fn ask_hello_if_unknown(&mut self, guest_id: &str) {
        let Some(name) = self.ids.get(guest_id) else {
            return;
        };
        if self
            .views
            .get(name)
            .is_none_or(|view| view.borrow().guest.is_some())
        {
            return;
        }
        let now = Instant::now();
        if let Some(asked) = self.asked_hello.get(guest_id) {
            if now.duration_since(*asked) < ASK_HELLO_EVERY {
                return;
            }
        }
        let (Ok(queue), Ok(broker)) = (self.guest_queue(guest_id), self.broker()) else {
            return;
        };
        self.asked_hello.insert(guest_id.to_owned(), now);
        broker.do_send(Publish {
            destination: queue,
            word: Word::SayHello,
            to: None,
            confirm: false,
        });
    }

    fn broker(&self) -> Result<Addr<BrokerActor>, EngineError> {
        self.broker
            .clone()
            .ok_or_else(|| EngineError::Internal("the engine has not booted".into()))
    }

    /// The backend that manages VMs stored with `backend`: the configured one, the
    /// unmanaged one, or, for a VM another backend made, a stand-in that refuses
    /// every operation and names the backend to run.
    fn hypervisor_for(&self, backend: &str) -> Arc<dyn Hypervisor> {
        if backend == unmanaged::NAME {
            self.unmanaged.clone()
        } else if backend == self.config.hypervisor.name() {
            self.config.hypervisor.clone()
        } else {
            log::warn!(
                "a stored VM belongs to the {backend} backend; this host agent runs {}",
                self.config.hypervisor.name()
            );
            Arc::new(Foreign {
                backend: backend.to_owned(),
                running: self.config.hypervisor.name(),
            })
        }
    }

    fn start_vm_actor(&mut self, record: &VmRecord, ctx: &mut Context<Self>) {
        let hypervisor = self.hypervisor_for(&record.backend);
        let actor = VmActor::new(
            record,
            hypervisor,
            self.store.clone(),
            self.config.beacon_interval,
            self.events.clone(),
            ctx.address().recipient(),
        );
        self.views
            .insert(record.name.clone(), actor.view_receiver());
        let addr = Supervisor::start(move |_| actor);
        if let Some(id) = &record.id {
            self.ids.insert(id.clone(), record.name.clone());
        }
        self.vms.insert(record.name.clone(), addr);
    }

    fn view(&self, vm: &str) -> Result<VmView, EngineError> {
        self.views
            .get(vm)
            .map(|view| view.borrow().clone())
            .ok_or_else(|| EngineError::UnknownVm(vm.to_owned()))
    }

    fn vm_addr(&self, vm: &str) -> Result<Addr<VmActor>, EngineError> {
        self.vms
            .get(vm)
            .cloned()
            .ok_or_else(|| EngineError::UnknownVm(vm.to_owned()))
    }

    fn guest_queue(&self, guest_id: &str) -> Result<String, EngineError> {
        let id = GuestId::new(guest_id).map_err(|e| EngineError::BadArgument(e.to_string()))?;
        Ok(self.config.destinations.guest_queue(&id))
    }

    /// The guest id of a VM (its MAC, or an unmanaged guest's own id).
    fn guest_id_of(&self, vm: &str) -> Result<String, EngineError> {
        let record = self
            .store
            .vm(vm)?
            .ok_or_else(|| EngineError::UnknownVm(vm.to_owned()))?;
        record
            .id
            .or(record.mac)
            .ok_or_else(|| EngineError::BadArgument(format!("VM {vm:?} has no guest id (no NIC)")))
    }

    /// A new command's record (not stored yet).
    fn new_command(
        &self,
        vm: &str,
        spec: CommandSpec,
        fanout_id: Option<String>,
    ) -> Result<CommandRecord, EngineError> {
        if spec.cmd.is_empty() {
            return Err(EngineError::BadArgument("the command is empty".into()));
        }
        let guest_id = self.guest_id_of(vm)?;
        let mut record = CommandRecord::new(new_id("cmd"), Some(vm), guest_id, spec, Utc::now());
        record.fanout_id = fanout_id;
        Ok(record)
    }

    /// Starts the actor of a stored command (it sends `CMD_RUN`).
    fn launch_command(
        &mut self,
        record: &CommandRecord,
        ctx: &mut Context<Self>,
    ) -> Result<(), EngineError> {
        let actor = CommandActor::new(
            record,
            self.store.clone(),
            self.flusher.clone(),
            self.broker()?,
            self.guest_queue(&record.guest_id)?,
            ctx.address().recipient(),
            self.events.clone(),
        )
        .lingering(self.config.linger);
        self.commands.insert(record.cmd_id.clone(), actor.start());
        Ok(())
    }

    /// Starts the actor of a stored command; if it cannot be started (no broker
    /// session), records the command as failed, with why.
    fn launch_or_fail(&mut self, record: &mut CommandRecord, ctx: &mut Context<Self>) {
        if let Err(e) = self.launch_command(record, ctx) {
            let why = e.to_string();
            if let Err(e) = self.store.set_command_state(
                &record.cmd_id,
                CommandState::Failed,
                Utc::now(),
                Some(&why),
            ) {
                log::error!("cannot record that command {} failed: {e}", record.cmd_id);
            }
            record.state = CommandState::Failed;
            record.error = Some(why);
        }
    }

    /// Removes, in the background, a VM the backend created but the store refused.
    fn discard_created(&self, definition: VmDefinition) {
        let hypervisor = self.config.hypervisor.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = hypervisor.remove(&definition) {
                log::warn!(
                    "cannot remove what was made for VM {:?}, which was not created: {e}",
                    definition.spec.name
                );
            }
        });
    }

    /// The VM of an unmanaged guest seen for the first time.
    fn adopt_guest(&mut self, guest_id: &str, ctx: &mut Context<Self>) -> Result<(), EngineError> {
        if self.ids.contains_key(guest_id) {
            return Ok(());
        }
        let record = match self.store.vm_by_id(guest_id)? {
            Some(record) => record,
            None => {
                if self.vms.contains_key(guest_id) {
                    return Err(EngineError::VmExists(guest_id.to_owned()));
                }
                let record = VmRecord::unmanaged(guest_id, Utc::now());
                self.store.put_vm(&record)?;
                log::info!("unmanaged guest {guest_id} appeared");
                record
            }
        };
        self.start_vm_actor(&record, ctx);
        Ok(())
    }

    /// Routes one guest message; the future completes once it was handled.
    fn route(&mut self, envelope: Envelope, ctx: &mut Context<Self>) -> ResponseFuture<()> {
        let from = envelope.from.clone().unwrap_or_default();
        // Any message from a guest is a sign of life.
        let vm = self
            .ids
            .get(&from)
            .and_then(|name| self.vms.get(name))
            .cloned();
        match envelope.message {
            word @ (Word::Hello(_) | Word::StillAlive(_) | Word::Bye { .. }) => {
                if let Word::Hello(info) = &word {
                    if let Err(e) = self.adopt_guest(info.id.as_str(), ctx) {
                        log::error!("cannot adopt guest {}: {e}", info.id);
                    }
                } else if vm.is_none() && !from.is_empty() {
                    if let Err(e) = self.adopt_guest(&from, ctx) {
                        log::warn!("ignoring presence of {from:?}: {e}");
                    }
                }
                match &word {
                    Word::StillAlive(_) => self.ask_hello_if_unknown(&from),
                    Word::Hello(_) => {
                        self.asked_hello.remove(&from);
                    }
                    _ => {}
                }
                let vm = self
                    .ids
                    .get(&from)
                    .and_then(|name| self.vms.get(name))
                    .cloned();
                Box::pin(async move {
                    if let Some(vm) = vm {
                        let _ = vm.send(vm::GuestSaid { word }).await;
                    }
                })
            }
            Word::Pong { ping_id } => {
                if let Some(vm) = vm {
                    vm.do_send(vm::Heard);
                }
                if let Some(waiter) = self.pings.remove(&ping_id) {
                    let _ = waiter.send(());
                }
                Box::pin(async {})
            }
            word @ (Word::CmdStarted { .. }
            | Word::CmdOutput { .. }
            | Word::CmdResult(_)
            | Word::CmdStatus { .. }) => {
                let cmd_id = match &word {
                    Word::CmdStarted { cmd_id, .. }
                    | Word::CmdOutput { cmd_id, .. }
                    | Word::CmdStatus { cmd_id, .. } => cmd_id.clone(),
                    Word::CmdResult(result) => result.cmd_id.clone(),
                    _ => unreachable!("matched above"),
                };
                if let Some(vm) = vm {
                    if matches!(word, Word::CmdResult(_) | Word::CmdStarted { .. }) {
                        vm.do_send(vm::Heard);
                    }
                }
                if let Some(actor) = self.commands.get(&cmd_id).cloned() {
                    return Box::pin(async move {
                        let _ = actor.send(command::FromGuest { word }).await;
                    });
                }
                if let Word::CmdResult(result) = word {
                    self.orphan_result(&from, result);
                }
                Box::pin(async {})
            }
            word @ (Word::FileReady { .. }
            | Word::FileChunk { .. }
            | Word::FileAck { .. }
            | Word::FileEnd { .. }
            | Word::FileDone { .. }
            | Word::FileError { .. }
            | Word::FileAbort { .. }) => {
                let transfer_id = match &word {
                    Word::FileReady { transfer_id, .. }
                    | Word::FileChunk { transfer_id, .. }
                    | Word::FileAck { transfer_id, .. }
                    | Word::FileEnd { transfer_id, .. }
                    | Word::FileDone { transfer_id, .. }
                    | Word::FileError { transfer_id, .. }
                    | Word::FileAbort { transfer_id, .. } => transfer_id.clone(),
                    _ => unreachable!("matched above"),
                };
                match self.transfers.get(&transfer_id).cloned() {
                    Some(actor) => Box::pin(async move {
                        let _ = actor.send(transfer::FromGuest { word }).await;
                    }),
                    None => {
                        log::debug!("{} for unknown transfer {transfer_id}", word.word());
                        Box::pin(async {})
                    }
                }
            }
            Word::Aint { word, reason } => {
                log::warn!("guest {from:?} did not understand our {word}: {reason}");
                Box::pin(async {})
            }
            other => {
                log::debug!("{} from {from:?} is not for a host: ignored", other.word());
                Box::pin(async {})
            }
        }
    }

    /// A transfer that was under way when the host agent stopped: its actor's
    /// state (window, offsets, the hash so far) is gone, so it ends `failed` (`io`)
    /// rather than showing `running` forever. Our partial download is removed and
    /// the guest is told to abort (it drops its partial upload and stops sending).
    fn interrupted_transfer(&self, record: &TransferRecord, broker: &Addr<BrokerActor>) {
        let id = &record.transfer_id;
        let why = "the host agent stopped while the file was being copied; copy it again";
        log::warn!("transfer {id} ({}): {why}", record.direction.as_str());
        let error = format!("{}: {why}", FileErrorCode::Io);
        match self
            .store
            .finish_transfer(id, TransferState::Failed, None, None, Some(&error))
        {
            Ok(_) => {
                let _ = self.events.send(super::EngineEvent::Transfer {
                    transfer_id: id.clone(),
                    bytes_done: record.bytes_done,
                    state: TransferState::Failed,
                });
            }
            Err(e) => log::error!("cannot record that transfer {id} failed: {e}"),
        }
        if record.direction == TransferDirection::FromGuest {
            let part = transfer::part_path(&record.local_path, id);
            tokio::task::spawn_blocking(move || match std::fs::remove_file(&part) {
                Ok(()) => log::info!("removed the partial file {}", part.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove the partial file {}: {e}", part.display()),
            });
        }
        if let Ok(queue) = self.guest_queue(&record.guest_id) {
            broker.do_send(Publish {
                destination: queue,
                word: Word::FileAbort {
                    transfer_id: id.clone(),
                    reason: Some(why.to_owned()),
                },
                to: None,
                confirm: true,
            });
        }
    }

    /// A result for a command without an actor: store it if we know the command
    /// (first result wins) and acknowledge it so the guest can forget it.
    fn orphan_result(&mut self, from: &str, result: vmc_protocol::words::CommandResult) {
        let cmd_id = result.cmd_id.clone();
        match self.store.command(&cmd_id) {
            Ok(Some(record)) => {
                let state = command::final_state(&result);
                if let Err(e) = self.store.record_result(&cmd_id, &result, state) {
                    log::error!("cannot store the result of {cmd_id}: {e}");
                    return;
                }
                let (Ok(queue), Ok(broker)) = (self.guest_queue(&record.guest_id), self.broker())
                else {
                    return;
                };
                let flusher = self.flusher.clone();
                actix::spawn(async move {
                    match flusher.flush_soon().await {
                        Ok(()) => broker.do_send(Publish {
                            destination: queue,
                            word: Word::CmdAck { cmd_id },
                            to: None,
                            confirm: false,
                        }),
                        Err(e) => log::error!(
                            "result of command {cmd_id} not acknowledged (the guest keeps it): {e}"
                        ),
                    }
                });
            }
            Ok(None) => {
                log::warn!("result of unknown command {cmd_id} from {from:?}: kept on the guest")
            }
            Err(e) => log::error!("cannot look up command {cmd_id}: {e}"),
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// Starts the broker session and restores VMs and unfinished commands.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Boot;

impl Handler<Boot> for Registry {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, _msg: Boot, ctx: &mut Context<Self>) -> Self::Result {
        let broker = BrokerActor::new(
            self.config.session.clone(),
            self.config.host_id.clone(),
            self.config.destinations.clone(),
            ctx.address(),
        )
        .start();
        self.broker = Some(broker.clone());
        for record in self.store.vms()? {
            self.start_vm_actor(&record, ctx);
        }
        for record in self.store.unfinished_commands()? {
            let Ok(queue) = self.guest_queue(&record.guest_id) else {
                continue;
            };
            log::info!(
                "recovering command {} ({})",
                record.cmd_id,
                record.state.as_str()
            );
            let actor = CommandActor::new(
                &record,
                self.store.clone(),
                self.flusher.clone(),
                broker.clone(),
                queue,
                ctx.address().recipient(),
                self.events.clone(),
            )
            .recovering()
            .lingering(self.config.linger);
            self.commands.insert(record.cmd_id.clone(), actor.start());
        }
        for record in self.store.transfers(None, true)? {
            self.interrupted_transfer(&record, &broker);
        }
        Ok(())
    }
}

/// Waits until the broker session's subscriptions are confirmed (bounded).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct WaitSubscribed {
    pub timeout: Duration,
}

impl Handler<WaitSubscribed> for Registry {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: WaitSubscribed, _ctx: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        Box::pin(async move {
            match broker {
                Some(broker) => broker
                    .send(super::broker::WaitSubscribed {
                        timeout: msg.timeout,
                    })
                    .await
                    .unwrap_or(false),
                None => false,
            }
        })
    }
}

/// A message from a guest, decoded by the broker actor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Incoming {
    pub envelope: Envelope,
}

impl Handler<Incoming> for Registry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Incoming, ctx: &mut Context<Self>) -> Self::Result {
        self.route(msg.envelope, ctx)
    }
}

impl Handler<transfer::TransferStopped> for Registry {
    type Result = ();

    fn handle(&mut self, msg: transfer::TransferStopped, _ctx: &mut Context<Self>) {
        self.transfers.remove(&msg.transfer_id);
    }
}

impl Handler<CommandStopped> for Registry {
    type Result = ();

    /// A command's actor stopped. After its command's end that is the plan; before
    /// it, a crash: the actor is started again as after a host restart (it sends
    /// `CMD_RUN` again, which the guest runs at most once) and takes over the
    /// callers waiting, up to [`MAX_RESTARTS`] times, then the command is lost.
    fn handle(&mut self, msg: CommandStopped, ctx: &mut Context<Self>) {
        self.commands.remove(&msg.cmd_id);
        if msg.finished || self.shutting_down {
            self.restarts.remove(&msg.cmd_id);
            return;
        }
        let cmd_id = msg.cmd_id;
        let record = match self.store.command(&cmd_id) {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(e) => {
                log::error!("cannot read command {cmd_id} to restart its actor: {e}");
                return;
            }
        };
        let answer = |record: &CommandRecord, waiters: Vec<oneshot::Sender<CommandRecord>>| {
            for waiter in waiters {
                let _ = waiter.send(record.clone());
            }
        };
        if record.state.is_final() {
            self.restarts.remove(&cmd_id);
            answer(&record, msg.waiters);
            return;
        }
        let restarts = self.restarts.entry(cmd_id.clone()).or_insert(0);
        *restarts += 1;
        let restarts = *restarts;
        let links = if restarts > MAX_RESTARTS {
            Err(EngineError::Internal(format!(
                "its actor stopped {restarts} times before the command's end"
            )))
        } else {
            self.guest_queue(&record.guest_id)
                .and_then(|queue| Ok((queue, self.broker()?)))
        };
        match links {
            Ok((queue, broker)) => {
                log::warn!(
                    "restarting the actor of command {cmd_id} ({restarts} of {MAX_RESTARTS})"
                );
                let actor = CommandActor::new(
                    &record,
                    self.store.clone(),
                    self.flusher.clone(),
                    broker,
                    queue,
                    ctx.address().recipient(),
                    self.events.clone(),
                )
                .recovering()
                .lingering(self.config.linger)
                .with_waiters(msg.waiters);
                self.commands.insert(cmd_id.clone(), actor.start());
            }
            Err(e) => {
                self.restarts.remove(&cmd_id);
                let why = format!("the host lost track of the command: {e}");
                log::error!("command {cmd_id}: {why}");
                match self.store.set_command_state(
                    &cmd_id,
                    CommandState::Lost,
                    Utc::now(),
                    Some(&why),
                ) {
                    Ok(_) => {
                        let _ = self.events.send(super::EngineEvent::Command {
                            cmd_id: cmd_id.clone(),
                            vm: record.vm.clone(),
                            state: CommandState::Lost,
                        });
                        if let Ok(Some(record)) = self.store.command(&cmd_id) {
                            answer(&record, msg.waiters);
                        }
                    }
                    Err(e) => log::error!("cannot record that command {cmd_id} is lost: {e}"),
                }
            }
        }
    }
}

/// How many candidate MACs of a name createVM tries (see [`default_mac`]).
const MAC_CANDIDATES: u32 = 64;

/// How many times a command's actor is started again after stopping before its
/// command's end, before the command is given up as lost.
const MAX_RESTARTS: u32 = 3;

/// `createVM`.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmView, EngineError>")]
pub struct CreateVm {
    pub spec: VmSpec,
}

impl Handler<CreateVm> for Registry {
    type Result = ResponseActFuture<Self, Result<VmView, EngineError>>;

    fn handle(&mut self, msg: CreateVm, _ctx: &mut Context<Self>) -> Self::Result {
        let name = msg.spec.name.clone();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            let err = EngineError::BadArgument(format!(
                "VM name {name:?} must be 1 to 64 characters of letters, digits, '-', '_' and '.'"
            ));
            return Box::pin(actix::fut::ready(Err(err)));
        }
        if self.vms.contains_key(&name) {
            return Box::pin(actix::fut::ready(Err(EngineError::VmExists(name))));
        }
        let mut spec = msg.spec;
        // The MAC is the guest's id: take the first candidate for the name that no
        // other VM here has or is being given (a given MAC is checked by the store).
        let reserved = if spec.mac.is_none() {
            let free = (0..MAC_CANDIDATES)
                .map(|n| default_mac(&name, n))
                .find(|mac| !self.ids.contains_key(mac) && !self.reserved_macs.contains(mac));
            let Some(mac) = free else {
                let err = EngineError::BadArgument(format!(
                    "no free MAC among {MAC_CANDIDATES} candidates for the name {name:?}; pick another name"
                ));
                return Box::pin(actix::fut::ready(Err(err)));
            };
            self.reserved_macs.insert(mac.clone());
            spec.mac = Some(mac.clone());
            Some(mac)
        } else {
            None
        };
        let hypervisor = self.config.hypervisor.clone();
        let create =
            async move { tokio::task::spawn_blocking(move || hypervisor.create(&spec)).await };
        Box::pin(create.into_actor(self).then(move |created, act, ctx| {
            if let Some(mac) = &reserved {
                act.reserved_macs.remove(mac);
            }
            let outcome = (|| {
                let definition = created.map_err(|e| EngineError::Internal(e.to_string()))??;
                let record = VmRecord::from_definition(&definition, Utc::now());
                if let Err(e) = act.store.put_vm(&record) {
                    // Not recorded, so not kept: what the backend made goes again.
                    act.discard_created(definition);
                    return Err(match e {
                        StoreError::GuestIdTaken { id, vm: holder } => EngineError::GuestIdTaken {
                            vm: name,
                            id,
                            holder,
                        },
                        other => other.into(),
                    });
                }
                act.start_vm_actor(&record, ctx);
                act.view(&name)
            })();
            actix::fut::ready(outcome)
        }))
    }
}

/// `removeVM`.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct RemoveVm {
    pub vm: String,
}

impl Handler<RemoveVm> for Registry {
    type Result = ResponseActFuture<Self, Result<(), EngineError>>;

    fn handle(&mut self, msg: RemoveVm, _ctx: &mut Context<Self>) -> Self::Result {
        let addr = match self.vm_addr(&msg.vm) {
            Ok(addr) => addr,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let record = self.store.vm(&msg.vm).ok().flatten();
        let hypervisor = record
            .as_ref()
            .map(|r| self.hypervisor_for(&r.backend))
            .unwrap_or_else(|| self.unmanaged.clone());
        let work = async move {
            let definition = addr.send(vm::GetDefinition).await?;
            tokio::task::spawn_blocking(move || hypervisor.remove(&definition))
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))??;
            addr.do_send(vm::Retire);
            Ok::<(), EngineError>(())
        };
        let name = msg.vm;
        Box::pin(work.into_actor(self).map(move |done, act, _| {
            done?;
            act.store.remove_vm(&name)?;
            act.vms.remove(&name);
            act.views.remove(&name);
            act.ids.retain(|_, n| *n != name);
            Ok(())
        }))
    }
}

/// A lifecycle operation on one VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmState, EngineError>")]
pub struct Lifecycle {
    pub vm: String,
    pub op: LifecycleOp,
}

impl Handler<Lifecycle> for Registry {
    type Result = ResponseFuture<Result<VmState, EngineError>>;

    fn handle(&mut self, msg: Lifecycle, _ctx: &mut Context<Self>) -> Self::Result {
        let addr = self.vm_addr(&msg.vm);
        Box::pin(async move { addr?.send(vm::Lifecycle { op: msg.op }).await? })
    }
}

/// One VM's view.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmView, EngineError>")]
pub struct GetVm {
    pub vm: String,
}

impl Handler<GetVm> for Registry {
    type Result = ResponseFuture<Result<VmView, EngineError>>;

    fn handle(&mut self, msg: GetVm, _ctx: &mut Context<Self>) -> Self::Result {
        let view = self.view(&msg.vm);
        Box::pin(async move { view })
    }
}

/// Every VM's view, by name.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<VmView>, EngineError>")]
pub struct ListVms;

impl Handler<ListVms> for Registry {
    type Result = ResponseFuture<Result<Vec<VmView>, EngineError>>;

    fn handle(&mut self, _msg: ListVms, _ctx: &mut Context<Self>) -> Self::Result {
        let views = self.views.values().map(|v| v.borrow().clone()).collect();
        Box::pin(async move { Ok(views) })
    }
}

/// Snapshots of one VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<SnapshotInfo>, EngineError>")]
pub struct ListSnapshots {
    pub vm: String,
}

impl Handler<ListSnapshots> for Registry {
    type Result = ResponseFuture<Result<Vec<SnapshotInfo>, EngineError>>;

    fn handle(&mut self, msg: ListSnapshots, _ctx: &mut Context<Self>) -> Self::Result {
        let addr = self.vm_addr(&msg.vm);
        Box::pin(async move { addr?.send(vm::ListSnapshots).await? })
    }
}

/// Performance data of one VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<crate::hypervisor::PerformanceData, EngineError>")]
pub struct Performance {
    pub vm: String,
}

impl Handler<Performance> for Registry {
    type Result = ResponseFuture<Result<crate::hypervisor::PerformanceData, EngineError>>;

    fn handle(&mut self, msg: Performance, _ctx: &mut Context<Self>) -> Self::Result {
        let addr = self.vm_addr(&msg.vm);
        Box::pin(async move { addr?.send(vm::Performance).await? })
    }
}

/// Makes a VM's actor stop as if it crashed (supervision tests).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct CrashVm {
    pub vm: String,
}

impl Handler<CrashVm> for Registry {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, msg: CrashVm, _ctx: &mut Context<Self>) -> Self::Result {
        self.vm_addr(&msg.vm)?.do_send(vm::Crash);
        Ok(())
    }
}

/// Makes a command's actor stop as if it crashed (supervision tests).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct CrashCommand {
    pub cmd_id: String,
}

impl Handler<CrashCommand> for Registry {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, msg: CrashCommand, _ctx: &mut Context<Self>) -> Self::Result {
        self.commands
            .get(&msg.cmd_id)
            .ok_or(EngineError::UnknownCommand(msg.cmd_id))?
            .do_send(command::Crash);
        Ok(())
    }
}

impl Handler<vm::VmStopped> for Registry {
    type Result = ();

    /// Its commands in flight can no longer report: each is marked lost.
    fn handle(&mut self, msg: vm::VmStopped, _ctx: &mut Context<Self>) {
        let query = CommandQuery {
            vm: Some(msg.vm.clone()),
            states: CommandState::ALL
                .into_iter()
                .filter(|s| !s.is_final())
                .collect(),
            ..CommandQuery::default()
        };
        let commands = match self.store.commands(&query) {
            Ok(commands) => commands,
            Err(e) => {
                log::error!("cannot list the commands of VM {}: {e}", msg.vm);
                return;
            }
        };
        let why = format!(
            "the VM {} while the command ran ({}); a result the guest kept may still arrive \
             when it runs again",
            if msg.state == VmState::Aborted {
                "stopped unexpectedly"
            } else {
                "was powered off"
            },
            msg.state
        );
        for record in commands.iter().filter(|c| !c.state.is_final()) {
            if let Some(actor) = self.commands.get(&record.cmd_id) {
                log::info!("command {} on VM {} is lost: {why}", record.cmd_id, msg.vm);
                actor.do_send(command::VmStopped { why: why.clone() });
            }
        }
    }
}

/// `runCmd`.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, EngineError>")]
pub struct RunCommand {
    pub vm: String,
    pub spec: CommandSpec,
}

impl Handler<RunCommand> for Registry {
    type Result = ResponseActFuture<Self, Result<String, EngineError>>;

    fn handle(&mut self, msg: RunCommand, ctx: &mut Context<Self>) -> Self::Result {
        let record = self.vm_addr(&msg.vm).and_then(|_| {
            let record = self.new_command(&msg.vm, msg.spec, None)?;
            self.store.insert_command(&record)?;
            Ok(record)
        });
        let mut record = match record {
            Ok(record) => record,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        // Committed, so it survives a crash of this process. `CMD_RUN` goes out while
        // the flusher makes the record survive a power cut too; the caller hears of
        // the id only once it has.
        self.launch_or_fail(&mut record, ctx);
        let flushed = self.flusher.clone();
        Box::pin(
            async move {
                let flushed = flushed.flush().await;
                match record.error {
                    Some(why) if record.state == CommandState::Failed => {
                        Err(EngineError::Internal(why))
                    }
                    _ => flushed.map(|()| record.cmd_id.clone()).map_err(|e| {
                        EngineError::Internal(format!(
                            "command {} went to the guest but its record may not survive a \
                             power cut: {e}",
                            record.cmd_id
                        ))
                    }),
                }
            }
            .into_actor(self),
        )
    }
}

/// A command on every VM whose name or guest id matches a glob.
#[derive(Debug, Message)]
#[rtype(result = "Result<FanoutView, EngineError>")]
pub struct RunMulticast {
    pub glob: String,
    pub spec: CommandSpec,
}

impl Handler<RunMulticast> for Registry {
    type Result = ResponseActFuture<Self, Result<FanoutView, EngineError>>;

    fn handle(&mut self, msg: RunMulticast, ctx: &mut Context<Self>) -> Self::Result {
        // Names that match, and names whose guest id matches.
        let mut targets: BTreeSet<&String> = self
            .vms
            .keys()
            .filter(|name| glob_match(&msg.glob, name))
            .collect();
        targets.extend(
            self.ids
                .iter()
                .filter(|(id, name)| self.vms.contains_key(*name) && glob_match(&msg.glob, id))
                .map(|(_, name)| name),
        );
        if targets.is_empty() {
            let err = EngineError::BadArgument(format!("no VM matches {:?}", msg.glob));
            return Box::pin(actix::fut::ready(Err(err)));
        }
        let fanout_id = new_id("fan");
        // One record per target, stored in one transaction and flushed once; a target
        // that cannot take a command is recorded as failed.
        let commands: Vec<CommandRecord> = targets
            .into_iter()
            .map(|vm| {
                self.new_command(vm, msg.spec.clone(), Some(fanout_id.clone()))
                    .unwrap_or_else(|e| {
                        let mut record = CommandRecord::new(
                            new_id("cmd"),
                            Some(vm),
                            String::new(),
                            msg.spec.clone(),
                            Utc::now(),
                        );
                        record.fanout_id = Some(fanout_id.clone());
                        record.state = CommandState::Failed;
                        record.error = Some(e.to_string());
                        record
                    })
            })
            .collect();
        if let Err(e) = self.store.insert_commands(&commands) {
            return Box::pin(actix::fut::ready(Err(e.into())));
        }
        // As for one command: sent at once, answered once on disk.
        let mut commands = commands;
        for record in &mut commands {
            if record.state != CommandState::Failed {
                self.launch_or_fail(record, ctx);
            }
        }
        let flusher = self.flusher.clone();
        Box::pin(
            async move {
                flusher.flush().await?;
                Ok(FanoutView {
                    fanout_id,
                    commands,
                })
            }
            .into_actor(self),
        )
    }
}

/// Waits for a command's end.
#[derive(Debug, Message)]
#[rtype(result = "Result<CommandRecord, EngineError>")]
pub struct WaitCommand {
    pub cmd_id: String,
}

impl Handler<WaitCommand> for Registry {
    type Result = ResponseFuture<Result<CommandRecord, EngineError>>;

    fn handle(&mut self, msg: WaitCommand, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(actor) = self.commands.get(&msg.cmd_id).cloned() {
            return Box::pin(async move { actor.send(command::WaitFinished).await? });
        }
        let record = self.store.command(&msg.cmd_id);
        Box::pin(async move {
            let record = record?.ok_or(EngineError::UnknownCommand(msg.cmd_id.clone()))?;
            if record.state.is_final() {
                Ok(record)
            } else {
                Err(EngineError::Internal(format!(
                    "command {} is {} with no actor",
                    msg.cmd_id,
                    record.state.as_str()
                )))
            }
        })
    }
}

/// `getCmdDetails`: the record and the guest's live report.
#[derive(Debug, Message)]
#[rtype(result = "Result<CommandDetails, EngineError>")]
pub struct QueryCommand {
    pub cmd_id: String,
}

impl Handler<QueryCommand> for Registry {
    type Result = ResponseFuture<Result<CommandDetails, EngineError>>;

    fn handle(&mut self, msg: QueryCommand, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(actor) = self.commands.get(&msg.cmd_id).cloned() {
            return Box::pin(async move { actor.send(command::Details).await? });
        }
        let record = self.store.command(&msg.cmd_id);
        Box::pin(async move {
            let record = record?.ok_or(EngineError::UnknownCommand(msg.cmd_id))?;
            Ok(CommandDetails { record, live: None })
        })
    }
}

/// Cancels a command.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct CancelCommand {
    pub cmd_id: String,
}

impl Handler<CancelCommand> for Registry {
    type Result = ResponseFuture<Result<(), EngineError>>;

    fn handle(&mut self, msg: CancelCommand, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(actor) = self.commands.get(&msg.cmd_id).cloned() {
            return Box::pin(async move { actor.send(command::Cancel).await? });
        }
        let known = self.store.command(&msg.cmd_id);
        Box::pin(async move {
            known?
                .map(|_| ())
                .ok_or(EngineError::UnknownCommand(msg.cmd_id)) // already over
        })
    }
}

/// `ping`: PING to the guest, waiting for PONG.
#[derive(Debug, Message)]
#[rtype(result = "Result<Duration, EngineError>")]
pub struct Ping {
    pub vm: String,
    pub timeout: Duration,
}

impl Handler<Ping> for Registry {
    type Result = ResponseFuture<Result<Duration, EngineError>>;

    fn handle(&mut self, msg: Ping, _ctx: &mut Context<Self>) -> Self::Result {
        let prepared = (|| {
            self.vm_addr(&msg.vm)?;
            let queue = self.guest_queue(&self.guest_id_of(&msg.vm)?)?;
            Ok::<_, EngineError>((queue, self.broker()?))
        })();
        let (queue, broker) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let ping_id = new_id("ping");
        let (tx, rx) = oneshot::channel();
        self.pings.insert(ping_id.clone(), tx);
        let vm = msg.vm;
        Box::pin(async move {
            let started = Instant::now();
            broker
                .send(Publish {
                    destination: queue,
                    word: Word::Ping { ping_id },
                    to: None,
                    confirm: false,
                })
                .await??;
            match tokio::time::timeout(msg.timeout, rx).await {
                Ok(Ok(())) => Ok(started.elapsed()),
                _ => Err(EngineError::GuestUnreachable {
                    vm,
                    reason: format!("no PONG within {:.1} s", msg.timeout.as_secs_f64()),
                }),
            }
        })
    }
}

/// `cpFileToVM` / `cpFileFromVM`: starts a transfer, answers its id.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, EngineError>")]
pub struct StartTransfer {
    pub vm: String,
    pub to_guest: bool,
    pub local: PathBuf,
    pub remote: String,
}

impl Handler<StartTransfer> for Registry {
    type Result = ResponseActFuture<Self, Result<String, EngineError>>;

    fn handle(&mut self, msg: StartTransfer, _ctx: &mut Context<Self>) -> Self::Result {
        let checked = (|| {
            self.vm_addr(&msg.vm)?;
            if !msg.local.is_absolute() {
                return Err(EngineError::BadArgument(format!(
                    "{} is not an absolute path",
                    msg.local.display()
                )));
            }
            if !msg.remote.starts_with('/') {
                return Err(EngineError::BadArgument(format!(
                    "{} is not an absolute path on the guest",
                    msg.remote
                )));
            }
            let guest_id = self.guest_id_of(&msg.vm)?;
            Ok((
                guest_id.clone(),
                self.guest_queue(&guest_id)?,
                self.broker()?,
            ))
        })();
        let (guest_id, queue, broker) = match checked {
            Ok(c) => c,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let local = msg.local.clone();
        let to_guest = msg.to_guest;
        // A guest that takes the digest in FILE_END gets the file hashed while it
        // is sent, not read twice with a wait before the first chunk.
        let digest_at_end = self.views.get(&msg.vm).is_some_and(|view| {
            view.borrow()
                .guest
                .as_ref()
                .is_some_and(|guest| guest.capabilities.iter().any(|c| c == DIGEST_AT_END))
        });
        // The local file is looked at on the blocking pool, never on this thread.
        let check_local = move || {
            if !to_guest {
                return if local.parent().is_some_and(|p| p.is_dir()) {
                    Ok(None)
                } else {
                    Err(EngineError::BadArgument(format!(
                        "the directory of {} does not exist",
                        local.display()
                    )))
                };
            }
            let unreadable = |e: std::io::Error| {
                EngineError::BadArgument(format!("cannot read {}: {e}", local.display()))
            };
            let meta = std::fs::metadata(&local).map_err(unreadable)?;
            if !meta.is_file() {
                return Err(EngineError::BadArgument(format!(
                    "{} is not a regular file",
                    local.display()
                )));
            }
            if digest_at_end && meta.len() > 0 {
                std::fs::File::open(&local).map_err(unreadable)?;
                return Ok(Some((meta.len(), None)));
            }
            let (size, sha256) = transfer::sha256_file(&local).map_err(unreadable)?;
            Ok(Some((size, Some(sha256))))
        };
        let digest = async move {
            tokio::task::spawn_blocking(check_local)
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))?
        };
        Box::pin(digest.into_actor(self).map(move |digest, act, ctx| {
            let digest = digest?;
            let id = new_id("xfer");
            let record = TransferRecord::new(
                id.clone(),
                msg.vm.clone(),
                guest_id,
                if to_guest {
                    TransferDirection::ToGuest
                } else {
                    TransferDirection::FromGuest
                },
                &msg.local,
                msg.remote.clone(),
                Utc::now(),
            );
            act.store.insert_transfer(&record)?;
            let plan = TransferPlan {
                id: id.clone(),
                to_guest,
                local: msg.local,
                remote: msg.remote,
                guest_queue: queue,
                chunk_size: act.config.chunk_size,
                window: act.config.window,
                stall: act.config.transfer_stall,
                local_digest: digest,
                linger: act.config.linger,
            };
            let actor = TransferActor::new(
                plan,
                act.store.clone(),
                broker,
                act.events.clone(),
                ctx.address().recipient(),
            )
            .start();
            act.transfers.insert(id.clone(), actor);
            Ok(id)
        }))
    }
}

/// Waits for a transfer's end.
#[derive(Debug, Message)]
#[rtype(result = "Result<TransferRecord, EngineError>")]
pub struct WaitTransfer {
    pub transfer_id: String,
}

impl Handler<WaitTransfer> for Registry {
    type Result = ResponseFuture<Result<TransferRecord, EngineError>>;

    fn handle(&mut self, msg: WaitTransfer, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(actor) = self.transfers.get(&msg.transfer_id).cloned() {
            return Box::pin(async move { actor.send(transfer::WaitEnded).await? });
        }
        let record = self.store.transfer(&msg.transfer_id);
        Box::pin(async move {
            let record = record?.ok_or(EngineError::UnknownTransfer(msg.transfer_id))?;
            match record.state {
                TransferState::Done => Ok(record),
                _ => {
                    // The transfer actor stores errors as "<code>: <message>".
                    let error = record.error.clone().unwrap_or_default();
                    let (code, message) = FileErrorCode::ALL
                        .into_iter()
                        .find_map(|code| {
                            let rest = error.strip_prefix(code.as_str())?.strip_prefix(": ")?;
                            Some((code, rest.to_owned()))
                        })
                        .unwrap_or((FileErrorCode::Io, error));
                    let message = if message.is_empty() {
                        "the transfer did not finish".to_owned()
                    } else {
                        message
                    };
                    Err(EngineError::Transfer { code, message })
                }
            }
        })
    }
}

/// Who this host is and where its broker connection stands.
#[derive(Debug, Message)]
#[rtype(result = "Result<EngineStatus, EngineError>")]
pub struct Status;

impl Handler<Status> for Registry {
    type Result = ResponseFuture<Result<EngineStatus, EngineError>>;

    fn handle(&mut self, _msg: Status, _ctx: &mut Context<Self>) -> Self::Result {
        let host_id = self.config.host_id.as_str().to_owned();
        let backend = self.config.hypervisor.name();
        let broker = self.broker();
        Box::pin(async move {
            Ok(EngineStatus {
                host_id,
                backend,
                broker: broker?.send(GetBrokerStatus).await?,
            })
        })
    }
}

/// Closes the broker session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Registry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let broker = self.broker.clone();
        Box::pin(async move {
            if let Some(broker) = broker {
                let _ = broker.send(CloseSession).await;
            }
        })
    }
}
