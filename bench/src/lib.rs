//! The vmcontroller benchmark harness: each scenario of issue 7 that is measured
//! so far, run against real agents on the real brokers, side by side with its
//! peer where one exists, and reported as medians with min/max over repetitions.
//!
//! [`engine_runs`] drives the host engine in-process (an actix System) against
//! real `vmc-guest` processes; [`host_runs`] drives a real `vmc-host` process
//! through its XML-RPC and JSON API, with VMs registered by a STOMP guest
//! simulator ([`simulator`]); [`presence_runs`] keeps thousands of simulated
//! guests beaconing at a real `vmc-host` and times its detection of lost ones on
//! its event stream ([`event_stream`]); [`transfer_runs`] copies files both ways
//! through each broker next to the broker's raw ceiling ([`raw_stomp`]) and `scp`,
//! and repeats the round trip on ActiveMQ; [`ssh_peer`] is the `ssh`/`scp` peer;
//! [`vm_runs`] times the round trip to a guest in a QEMU VM next to
//! qemu-guest-agent in the same VM.
//! [`report`] turns rows into the table printed and written to `BENCHMARKS.md`.
//! It deliberately does not assert any limit: benchmarks print figures.

pub mod engine_runs;
pub mod event_stream;
pub mod host_runs;
pub mod http_client;
pub mod machine;
pub mod presence_runs;
pub mod raw_stomp;
pub mod report;
pub mod simulator;
pub mod ssh_peer;
pub mod stats;
pub mod transfer_runs;
pub mod vm_runs;

use std::time::Duration;

/// How much work each scenario does.
#[derive(Clone, Debug)]
pub struct Mode {
    pub name: &'static str,
    /// Repetitions of every figure (the median and min/max are over these).
    pub repetitions: usize,
    /// Sequential round trips per repetition.
    pub round_trips: usize,
    /// Sequential round trips of the ssh peer per repetition (each is a process
    /// start, so fewer: its percentiles are coarser).
    pub peer_round_trips: usize,
    /// Fan-out sizes (real guest processes).
    pub fanout_sizes: Vec<usize>,
    /// Fan-out sizes on ActiveMQ (fewer in the short mode: CI's time is short).
    pub activemq_fanout_sizes: Vec<usize>,
    /// Simulated VMs registered before the API load.
    pub simulated_vms: usize,
    /// How long each API load repetition lasts.
    pub load_duration: Duration,
    /// Concurrent API connections.
    pub connections: usize,
    /// Repetitions of the long scenarios (presence, file transfer).
    pub heavy_repetitions: usize,
    /// Simulated guests beaconing in the presence scenario.
    pub presence_guests: usize,
    /// Their beacon interval (also the host's `beacon_interval`).
    pub beacon_interval: Duration,
    /// How long each host CPU measurement of the presence scenario lasts.
    pub presence_window: Duration,
    /// Guests silenced at once in each detection repetition.
    pub lost_guests: usize,
    /// Repetitions of the presence scenario on ActiveMQ (the same guests and
    /// windows as on RabbitMQ).
    pub activemq_presence_repetitions: usize,
    /// Bytes of each file transfer.
    pub transfer_bytes: u64,
}

impl Mode {
    pub fn full() -> Mode {
        Mode {
            name: "full",
            repetitions: 5,
            round_trips: 1000,
            peer_round_trips: 40,
            fanout_sizes: vec![10, 100, 1000],
            activemq_fanout_sizes: vec![10, 100, 1000],
            simulated_vms: 1000,
            load_duration: Duration::from_secs(5),
            connections: 64,
            heavy_repetitions: 3,
            presence_guests: 10_000,
            beacon_interval: Duration::from_secs(10),
            presence_window: Duration::from_secs(20),
            lost_guests: 100,
            activemq_presence_repetitions: 3,
            transfer_bytes: 1 << 30,
        }
    }

    pub fn short() -> Mode {
        Mode {
            name: "short",
            repetitions: 3,
            round_trips: 30,
            peer_round_trips: 10,
            fanout_sizes: vec![10, 100],
            activemq_fanout_sizes: vec![10],
            simulated_vms: 100,
            load_duration: Duration::from_secs(1),
            connections: 64,
            heavy_repetitions: 2,
            presence_guests: 500,
            beacon_interval: Duration::from_secs(1),
            presence_window: Duration::from_secs(2),
            lost_guests: 100,
            activemq_presence_repetitions: 1,
            transfer_bytes: 32 << 20,
        }
    }
}

/// Why a scenario could not produce its figures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what} did not happen within {secs:.0} s")]
    Timeout { what: String, secs: f64 },
    #[error("the engine refused: {0}")]
    Engine(#[from] vmc_host::engine::EngineError),
    #[error("I/O failed while {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the API answered unexpectedly: {0}")]
    Api(String),
    #[error("the STOMP session failed: {0}")]
    Stomp(String),
    #[error(
        "{0} is missing: build it first (cargo build --bins, with --release for the full mode)"
    )]
    MissingBinary(String),
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

/// A process-unique name for destinations and ids, so runs never share queues.
pub fn run_tag(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("bench-{what}-{}-{nanos}", std::process::id())
}
