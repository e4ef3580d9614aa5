//! A guest simulator: registers many unmanaged VMs with a host by sending the
//! real protocol's HELLO word (`vmc_protocol::words::encode`) for each simulated
//! guest over one STOMP session ([`register`]), and keeps them beaconing
//! `STILL_ALIVE` ([`BeaconFleet`]). Simulated guests never answer commands:
//! figures measured with them are labelled "simulated".
//!
//! A real guest holds one broker connection of its own; the fleet instead
//! multiplexes [`GUESTS_PER_CONNECTION`] simulated guests over each STOMP session
//! (the host tells guests apart by `vmc-from`, not by connection), so that ten
//! thousand guests cost the broker tens of connections rather than ten thousand.
//! Each session sends its guests' beacons round-robin, evenly spread over the
//! interval, without receipts (as the guest agent sends them: `STILL_ALIVE` is
//! not persistent).

use crate::BenchError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::GuestId;
use vmc_protocol::stomp::{BrokerAddress, Frame, SessionConfig, StompClient};
use vmc_protocol::words::{self, GuestInfo, LoadSummary, Message};

/// The id of the `n`th simulated guest.
pub fn simulated_id(n: usize) -> String {
    format!("sim-{n:05}")
}

/// Sends HELLO for `count` simulated guests under `prefix` and waits for the
/// broker's receipts.
pub async fn register(broker_port: u16, prefix: &str, count: usize) -> Result<(), BenchError> {
    let stomp = |e: &dyn std::fmt::Display| BenchError::Stomp(e.to_string());
    let config = SessionConfig::new(BrokerAddress::tcp("127.0.0.1", broker_port))
        .with_credentials("guest", "guest");
    let max = config.max_frame_size;
    let destinations = Destinations::new(prefix).map_err(|e| stomp(&e))?;
    let topic = destinations.connections_topic();
    let (client, _events) = StompClient::start(config);
    let mut receipts = Vec::with_capacity(count);
    for n in 0..count {
        let id = GuestId::new(simulated_id(n)).map_err(|e| stomp(&e))?;
        let reply_to = destinations.guest_queue(&id);
        let info = GuestInfo {
            id: id.clone(),
            ips: vec![format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)],
            mac: None,
            hostname: id.as_str().to_owned(),
            os: "Linux".into(),
            kernel: "simulated".into(),
            agent_version: "vmc-bench simulator".into(),
            protocol: 1,
            cpus: 1,
            memory_bytes: 1 << 30,
            boot_time: 1_700_000_000,
            capabilities: Vec::new(),
        };
        let mut frame = words::encode(&Message::Hello(info), id.as_str(), Some(&reply_to), max)
            .map_err(|e| stomp(&e))?;
        frame.set_header("destination", topic.as_str());
        receipts.push(
            client
                .queue_with_receipt(frame)
                .await
                .map_err(|e| stomp(&e))?,
        );
    }
    let all = async {
        for receipt in receipts {
            receipt.wait().await?;
        }
        Ok::<(), vmc_protocol::stomp::StompError>(())
    };
    match tokio::time::timeout(Duration::from_secs(60), all).await {
        Ok(result) => result.map_err(|e| stomp(&e))?,
        Err(_) => {
            return Err(BenchError::Timeout {
                what: "the broker's receipts for the simulated HELLOs".into(),
                secs: 60.0,
            })
        }
    }
    let _ = client.shutdown().await;
    Ok(())
}

/// Simulated guests sharing one STOMP session in a [`BeaconFleet`].
pub const GUESTS_PER_CONNECTION: usize = 250;

/// What the fleet's sessions and the caller share.
#[derive(Debug)]
struct FleetState {
    start: Instant,
    /// Guests that no longer beacon (as if their VMs had vanished).
    silenced: Vec<AtomicBool>,
    /// When each guest's last beacon was handed to its session, in µs since
    /// `start`; `u64::MAX` before the first.
    last_sent_us: Vec<AtomicU64>,
    sent: AtomicU64,
}

/// `count` simulated guests beaconing `STILL_ALIVE` every `interval` until
/// stopped, over `count / GUESTS_PER_CONNECTION` (rounded up) STOMP sessions.
#[derive(Debug)]
pub struct BeaconFleet {
    clients: Vec<StompClient>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: Arc<FleetState>,
}

impl BeaconFleet {
    /// Connects the sessions and starts beaconing; call from a tokio runtime.
    pub async fn start(
        broker_port: u16,
        prefix: &str,
        count: usize,
        interval: Duration,
    ) -> Result<BeaconFleet, BenchError> {
        let stomp = |e: &dyn std::fmt::Display| BenchError::Stomp(e.to_string());
        let destinations = Destinations::new(prefix).map_err(|e| stomp(&e))?;
        let topic = destinations.connections_topic();
        let state = Arc::new(FleetState {
            start: Instant::now(),
            silenced: (0..count).map(|_| AtomicBool::new(false)).collect(),
            last_sent_us: (0..count).map(|_| AtomicU64::new(u64::MAX)).collect(),
            sent: AtomicU64::new(0),
        });
        let sessions = count.div_ceil(GUESTS_PER_CONNECTION).max(1);
        let (mut clients, mut tasks) = (Vec::new(), Vec::new());
        for s in 0..sessions {
            let config = SessionConfig::new(BrokerAddress::tcp("127.0.0.1", broker_port))
                .with_credentials("guest", "guest");
            let max = config.max_frame_size;
            // Guests s, s + sessions, s + 2 sessions, ...: a lost group of
            // consecutive guests spans every session.
            let mut guests = Vec::new();
            for n in (s..count).step_by(sessions) {
                let id = GuestId::new(simulated_id(n)).map_err(|e| stomp(&e))?;
                let ip = format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255);
                let summary = LoadSummary {
                    ip: Some(ip),
                    load1: 0.1,
                    load5: 0.1,
                    load15: 0.1,
                    mem_used_bytes: 256 << 20,
                    mem_total_bytes: 1 << 30,
                    running_cmds: 0,
                    uptime_secs: 3600,
                };
                let reply_to = destinations.guest_queue(&id);
                let mut frame = words::encode(
                    &Message::StillAlive(summary),
                    id.as_str(),
                    Some(&reply_to),
                    max,
                )
                .map_err(|e| stomp(&e))?;
                frame.set_header("destination", topic.as_str());
                guests.push((n, frame));
            }
            let (client, events) = StompClient::start(config);
            // Nothing is subscribed: the events are connection changes only.
            drop(events);
            let period = interval / guests.len().max(1) as u32;
            let offset = period * s as u32 / sessions as u32;
            tasks.push(tokio::spawn(beacon_loop(
                client.clone(),
                guests,
                period,
                offset,
                state.clone(),
            )));
            clients.push(client);
        }
        Ok(BeaconFleet {
            clients,
            tasks,
            state,
        })
    }

    /// How many STOMP sessions carry the fleet.
    pub fn sessions(&self) -> usize {
        self.clients.len()
    }

    /// Beacons handed to the sessions so far.
    pub fn beacons_sent(&self) -> u64 {
        self.state.sent.load(Ordering::Relaxed)
    }

    /// Stops the beacons of guests `guests` (numbers as in [`simulated_id`]).
    pub fn silence(&self, guests: std::ops::Range<usize>) {
        for n in guests {
            if let Some(flag) = self.state.silenced.get(n) {
                flag.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Lets guests `guests` beacon again.
    pub fn resume(&self, guests: std::ops::Range<usize>) {
        for n in guests {
            if let Some(flag) = self.state.silenced.get(n) {
                flag.store(false, Ordering::Relaxed);
            }
        }
    }

    /// When guest `n`'s last beacon was sent, if it ever was.
    pub fn last_sent(&self, n: usize) -> Option<Instant> {
        let us = self.state.last_sent_us.get(n)?.load(Ordering::Relaxed);
        (us != u64::MAX).then(|| self.state.start + Duration::from_micros(us))
    }

    /// Stops beaconing and closes the sessions.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        for client in &self.clients {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        }
    }
}

/// One session's beacons: the next guest's every `period`, round-robin.
async fn beacon_loop(
    client: StompClient,
    guests: Vec<(usize, Frame)>,
    period: Duration,
    offset: Duration,
    state: Arc<FleetState>,
) {
    if guests.is_empty() {
        return;
    }
    let start = tokio::time::Instant::now() + offset;
    // The default (burst) catch-up keeps the average rate when the runtime lags.
    let mut ticker = tokio::time::interval_at(start, period.max(Duration::from_micros(100)));
    for (n, frame) in guests.iter().cycle() {
        ticker.tick().await;
        if state.silenced[*n].load(Ordering::Relaxed) {
            continue;
        }
        if client.send(frame.clone()).await.is_err() {
            return; // the session was shut down
        }
        let us = state.start.elapsed().as_micros() as u64;
        state.last_sent_us[*n].store(us, Ordering::Relaxed);
        state.sent.fetch_add(1, Ordering::Relaxed);
    }
}
