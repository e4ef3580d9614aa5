//! The vmcontroller benchmark harness: each scenario of issue 7 that is measured
//! so far, run against real agents on the real RabbitMQ, side by side with its
//! peer where one exists, and reported as medians with min/max over repetitions.
//!
//! [`engine_runs`] drives the host engine in-process (an actix System) against
//! real `vmc-guest` processes; [`host_runs`] drives a real `vmc-host` process
//! through its XML-RPC and JSON API, with VMs registered by a STOMP guest
//! simulator ([`simulator`]); [`ssh_peer`] is the `ssh`/ControlMaster peer.
//! [`report`] turns rows into the table printed and written to `BENCHMARKS.md`.
//! It deliberately does not assert any limit: benchmarks print figures.

pub mod engine_runs;
pub mod host_runs;
pub mod http_client;
pub mod machine;
pub mod report;
pub mod simulator;
pub mod ssh_peer;
pub mod stats;

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
    /// Simulated VMs registered before the API load.
    pub simulated_vms: usize,
    /// How long each API load repetition lasts.
    pub load_duration: Duration,
    /// Concurrent API connections.
    pub connections: usize,
}

impl Mode {
    pub fn full() -> Mode {
        Mode {
            name: "full",
            repetitions: 5,
            round_trips: 1000,
            peer_round_trips: 40,
            fanout_sizes: vec![10, 100, 1000],
            simulated_vms: 1000,
            load_duration: Duration::from_secs(5),
            connections: 64,
        }
    }

    pub fn short() -> Mode {
        Mode {
            name: "short",
            repetitions: 3,
            round_trips: 30,
            peer_round_trips: 10,
            fanout_sizes: vec![10, 100],
            simulated_vms: 100,
            load_duration: Duration::from_secs(1),
            connections: 64,
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
