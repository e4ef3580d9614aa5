//! The host agent's engine: supervised actix actors over the store, the hypervisor
//! and the broker.
//!
//! [`Engine`] is the handle callers use (the API layer, the binary, tests); every
//! method is one operation, implemented once here and merely encoded by XML-RPC and
//! JSON. Inside, the [`registry::Registry`] actor owns the map of VMs and routes
//! everything: one [`vm::VmActor`] per VM (hypervisor state and guest presence),
//! one [`command::CommandActor`] per command execution, one
//! [`transfer::TransferActor`] per file transfer, and the [`broker::BrokerActor`]
//! that owns the STOMP session. No actor reaches into another's state; they talk by
//! messages. Durable facts go to the [`Store`] before they are acknowledged to a
//! guest, so a restart of the host agent loses nothing that had finished.
//! The engine must be started inside an actix `System` (the binary's, or a test's).

pub mod broker;
pub mod command;
pub mod flush;
pub mod presence;
pub mod registry;
pub mod transfer;
pub mod vm;

use crate::hypervisor::{Hypervisor, HypervisorError, VmSpec, VmState};
use crate::store::{CommandRecord, Store, StoreError, TransferRecord};
use actix::{Actor, Addr, MailboxError};
use chrono::{DateTime, Utc};
use presence::Presence;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
use vmc_protocol::stomp::SessionConfig;
use vmc_protocol::words::{CommandSpec, FileErrorCode};

/// Why an engine operation failed. Each variant maps to one stable API fault code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("there is no VM named {0:?}")]
    UnknownVm(String),
    #[error("a VM named {0:?} already exists")]
    VmExists(String),
    #[error(
        "VM {vm:?} would have the guest id (MAC) {id} of VM {holder:?}: give it another \
         name or an explicit mac, or remove {holder:?}"
    )]
    GuestIdTaken {
        vm: String,
        id: String,
        holder: String,
    },
    #[error("there is no command with id {0:?}")]
    UnknownCommand(String),
    #[error("there is no transfer with id {0:?}")]
    UnknownTransfer(String),
    #[error("bad argument: {0}")]
    BadArgument(String),
    #[error("the hypervisor failed")]
    Hypervisor(#[from] HypervisorError),
    #[error("the host's database failed")]
    Store(#[from] StoreError),
    #[error("the guest of VM {vm:?} cannot be reached: {reason}")]
    GuestUnreachable { vm: String, reason: String },
    #[error("{what} did not finish within {secs:.1} s")]
    Timeout { what: String, secs: f64 },
    #[error("the transfer failed ({code}): {message}")]
    Transfer {
        code: FileErrorCode,
        message: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<MailboxError> for EngineError {
    fn from(e: MailboxError) -> EngineError {
        EngineError::Internal(format!("an engine actor is not answering: {e}"))
    }
}

/// What the engine needs to run.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub host_id: HostId,
    pub session: SessionConfig,
    pub destinations: Destinations,
    pub state_dir: PathBuf,
    /// The backend of the VMs this host creates.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The guests' beacon interval: presence turns suspect after 3, lost after 4.5.
    pub beacon_interval: Duration,
    /// File transfer chunk size and window (chunks in flight).
    pub chunk_size: u32,
    pub window: u32,
    /// A transfer with no progress for this long asks the guest where it stands.
    pub transfer_stall: Duration,
    /// How long a finished command's or transfer's actor stays for late duplicates
    /// before it stops (the registry then answers from the store).
    pub linger: Duration,
}

impl EngineConfig {
    /// Defaults for everything but identity, broker, state and hypervisor.
    pub fn new(
        host_id: HostId,
        session: SessionConfig,
        state_dir: PathBuf,
        hypervisor: Arc<dyn Hypervisor>,
    ) -> EngineConfig {
        EngineConfig {
            host_id,
            session,
            destinations: Destinations::default(),
            state_dir,
            hypervisor,
            beacon_interval: Duration::from_secs(10),
            chunk_size: 1024 * 1024,
            // 16 MiB in flight: with 8 the pipe drained while acknowledgements
            // crossed the broker; 32 was no faster than 16 on two cores and let the
            // broker session's bursts hold the engine's thread for 70-180 ms.
            window: 16,
            transfer_stall: Duration::from_secs(10),
            linger: command::LINGER,
        }
    }
}

/// A VM as callers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmView {
    pub name: String,
    /// The guest id (the NIC's MAC address for VMs).
    pub id: String,
    pub backend: String,
    pub state: VmState,
    pub presence: Presence,
    pub presence_since: DateTime<Utc>,
    pub last_heard: Option<DateTime<Utc>>,
    /// What the guest said in its last HELLO.
    pub guest: Option<vmc_protocol::words::GuestInfo>,
}

/// The per-target outcome of a multicast command.
#[derive(Clone, Debug, PartialEq)]
pub struct FanoutView {
    pub fanout_id: String,
    /// One record per targeted VM.
    pub commands: Vec<CommandRecord>,
}

/// Who this host agent is and where its broker connection stands (health checks,
/// metrics, host information).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStatus {
    pub host_id: String,
    /// The backend of the VMs this host creates.
    pub backend: &'static str,
    pub broker: broker::BrokerStatus,
}

/// Something that happened, for callers who follow the engine live (the API's event
/// stream): nobody has to poll. Slow followers miss events (they are told how many)
/// rather than slow the engine down.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// A VM's hypervisor state or its guest's presence changed.
    Vm {
        vm: String,
        state: VmState,
        presence: Presence,
    },
    /// A command changed state (sent, running, or a final state).
    Command {
        cmd_id: String,
        vm: Option<String>,
        state: crate::store::CommandState,
    },
    /// A chunk of a command's output.
    Output {
        cmd_id: String,
        stream: vmc_protocol::words::OutputStream,
        offset: u64,
        data: bytes::Bytes,
    },
    /// A transfer progressed or ended.
    Transfer {
        transfer_id: String,
        bytes_done: u64,
        state: crate::store::TransferState,
    },
}

/// The sending side of the event stream, handed to every actor.
pub type EventSender = tokio::sync::broadcast::Sender<EngineEvent>;

/// The engine handle: cheap to clone, usable from any task of the actix system.
#[derive(Clone, Debug)]
pub struct Engine {
    registry: Addr<registry::Registry>,
    store: Arc<Store>,
    events: EventSender,
}

impl Engine {
    /// Opens the store, starts the broker session and the actors, and restores
    /// every VM and every unfinished command from the store.
    pub async fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            EngineError::Internal(format!("cannot create {}: {e}", config.state_dir.display()))
        })?;
        let store = Arc::new(Store::open(&config.state_dir.join("vmc-host.sqlite"))?);
        let (events, _) = tokio::sync::broadcast::channel(4096);
        let flusher = flush::Flusher::start(store.clone());
        let registry =
            registry::Registry::new(config, store.clone(), events.clone(), flusher).start();
        registry.send(registry::Boot).await??;
        // Be listening before callers start guests, so their first HELLO is heard; a
        // broker that is down only delays this (the session keeps trying).
        let timeout = Duration::from_secs(10);
        if !registry.send(registry::WaitSubscribed { timeout }).await? {
            log::warn!("the broker has not confirmed the host's subscriptions within {timeout:?}; going on");
        }
        Ok(Engine {
            registry,
            store,
            events,
        })
    }

    /// Follows everything that happens from now on.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<EngineEvent> {
        self.events.subscribe()
    }

    /// The store, for read-only queries.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Creates a VM (`createVM`).
    pub async fn create_vm(&self, spec: VmSpec) -> Result<VmView, EngineError> {
        self.registry.send(registry::CreateVm { spec }).await?
    }

    /// Removes a VM and its files (`removeVM`); its command history stays.
    pub async fn remove_vm(&self, vm: &str) -> Result<(), EngineError> {
        self.registry
            .send(registry::RemoveVm { vm: vm.to_owned() })
            .await?
    }

    /// A lifecycle operation (`start`, `shutdown`, `pause`, ...).
    pub async fn lifecycle(&self, vm: &str, op: vm::LifecycleOp) -> Result<VmState, EngineError> {
        self.registry
            .send(registry::Lifecycle {
                vm: vm.to_owned(),
                op,
            })
            .await?
    }

    /// One VM.
    pub async fn vm(&self, vm: &str) -> Result<VmView, EngineError> {
        self.registry
            .send(registry::GetVm { vm: vm.to_owned() })
            .await?
    }

    /// Every VM, by name.
    pub async fn vms(&self) -> Result<Vec<VmView>, EngineError> {
        self.registry.send(registry::ListVms).await?
    }

    /// Runs a command on one VM's guest; returns its id at once (`runCmd`).
    pub async fn run_command(&self, vm: &str, spec: CommandSpec) -> Result<String, EngineError> {
        self.registry
            .send(registry::RunCommand {
                vm: vm.to_owned(),
                spec,
            })
            .await?
    }

    /// Runs a command on every VM whose name or id matches `glob` (one command per
    /// target); returns the fan-out with each target's command id.
    pub async fn run_multicast(
        &self,
        glob: &str,
        spec: CommandSpec,
    ) -> Result<FanoutView, EngineError> {
        self.registry
            .send(registry::RunMulticast {
                glob: glob.to_owned(),
                spec,
            })
            .await?
    }

    /// The record of a command (state, timestamps, result once finished). Results
    /// are never consumed by reading them.
    pub fn command(&self, cmd_id: &str) -> Result<CommandRecord, EngineError> {
        self.store
            .command(cmd_id)?
            .ok_or_else(|| EngineError::UnknownCommand(cmd_id.to_owned()))
    }

    /// Waits until a command has finished (any final state) or `timeout` passes.
    pub async fn wait_command(
        &self,
        cmd_id: &str,
        timeout: Duration,
    ) -> Result<CommandRecord, EngineError> {
        let wait = self.registry.send(registry::WaitCommand {
            cmd_id: cmd_id.to_owned(),
        });
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result?,
            Err(_) => Err(EngineError::Timeout {
                what: format!("command {cmd_id}"),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Asks the guest for a running command's live state and usage (`getCmdDetails`).
    pub async fn command_details(
        &self,
        cmd_id: &str,
    ) -> Result<command::CommandDetails, EngineError> {
        self.registry
            .send(registry::QueryCommand {
                cmd_id: cmd_id.to_owned(),
            })
            .await?
    }

    /// Cancels a command: the guest kills its whole process group.
    pub async fn cancel_command(&self, cmd_id: &str) -> Result<(), EngineError> {
        self.registry
            .send(registry::CancelCommand {
                cmd_id: cmd_id.to_owned(),
            })
            .await?
    }

    /// Sends PING and waits for PONG (`ping`); returns the round-trip time.
    pub async fn ping(&self, vm: &str, timeout: Duration) -> Result<Duration, EngineError> {
        self.registry
            .send(registry::Ping {
                vm: vm.to_owned(),
                timeout,
            })
            .await?
    }

    /// Copies a local file to the guest; returns when the guest has verified it
    /// (`cpFileToVM`).
    pub async fn copy_to_vm(
        &self,
        vm: &str,
        local: PathBuf,
        remote: String,
    ) -> Result<TransferRecord, EngineError> {
        let start = registry::StartTransfer {
            vm: vm.to_owned(),
            to_guest: true,
            local,
            remote,
        };
        let transfer_id = self.registry.send(start).await??;
        self.wait_transfer(&transfer_id).await
    }

    /// Copies a guest's file here; returns when verified (`cpFileFromVM`).
    pub async fn copy_from_vm(
        &self,
        vm: &str,
        remote: String,
        local: PathBuf,
    ) -> Result<TransferRecord, EngineError> {
        let start = registry::StartTransfer {
            vm: vm.to_owned(),
            to_guest: false,
            local,
            remote,
        };
        let transfer_id = self.registry.send(start).await??;
        self.wait_transfer(&transfer_id).await
    }

    /// Starts a copy without waiting for it (`startCpFileToVM`, `startCpFileFromVM`):
    /// answers the transfer id once the copy is accepted; follow it with
    /// [`transfer`](Self::transfer) or [`wait_transfer`](Self::wait_transfer).
    pub async fn start_transfer(
        &self,
        vm: &str,
        direction: crate::store::TransferDirection,
        local: PathBuf,
        remote: String,
    ) -> Result<String, EngineError> {
        self.registry
            .send(registry::StartTransfer {
                vm: vm.to_owned(),
                to_guest: direction == crate::store::TransferDirection::ToGuest,
                local,
                remote,
            })
            .await?
    }

    /// Waits for a transfer's end; a failed transfer is an error with its code.
    pub async fn wait_transfer(&self, transfer_id: &str) -> Result<TransferRecord, EngineError> {
        self.registry
            .send(registry::WaitTransfer {
                transfer_id: transfer_id.to_owned(),
            })
            .await?
    }

    /// A transfer's record with its progress.
    pub fn transfer(&self, transfer_id: &str) -> Result<TransferRecord, EngineError> {
        self.store
            .transfer(transfer_id)?
            .ok_or_else(|| EngineError::UnknownTransfer(transfer_id.to_owned()))
    }

    /// Snapshots of a VM (`listSnapshots`).
    pub async fn snapshots(
        &self,
        vm: &str,
    ) -> Result<Vec<crate::hypervisor::SnapshotInfo>, EngineError> {
        self.registry
            .send(registry::ListSnapshots { vm: vm.to_owned() })
            .await?
    }

    /// Performance data of a VM (`getPerformanceData`).
    pub async fn performance(
        &self,
        vm: &str,
    ) -> Result<crate::hypervisor::PerformanceData, EngineError> {
        self.registry
            .send(registry::Performance { vm: vm.to_owned() })
            .await?
    }

    /// This host's identity, backend and broker connection.
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        self.registry.send(registry::Status).await?
    }

    /// Makes a VM's actor stop as a crash would; its supervisor restarts it from the
    /// store. For tests of supervision.
    pub async fn crash_vm_actor(&self, vm: &str) -> Result<(), EngineError> {
        self.registry
            .send(registry::CrashVm { vm: vm.to_owned() })
            .await?
    }

    /// Makes a running command's actor stop as a crash would; the registry starts
    /// it again and it carries on. For tests of supervision.
    pub async fn crash_command_actor(&self, cmd_id: &str) -> Result<(), EngineError> {
        self.registry
            .send(registry::CrashCommand {
                cmd_id: cmd_id.to_owned(),
            })
            .await?
    }

    /// Stops the broker session cleanly (the actors stop with the actix system).
    pub async fn shutdown(&self) {
        let _ = self.registry.send(registry::Shutdown).await;
    }
}

/// Whether the actix system is being torn down (its runtime is gone): actors
/// stopped then are stopping with the host agent, not crashing, and must leave
/// their records for the next start to deal with.
pub(crate) fn tearing_down() -> bool {
    tokio::runtime::Handle::try_current().is_err()
}

/// A fresh unique id with a prefix, e.g. `cmd-5f0c…`.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
