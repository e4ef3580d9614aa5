//! Presence at scale: a real `vmc-host` process (unmanaged backend) and many
//! simulated guests ([`simulator::BeaconFleet`], the real protocol's HELLO and
//! STILL_ALIVE over real broker sessions, several guests per session) beaconing
//! at the host's own interval. Measured: the host's CPU (from `/proc/<pid>/stat`
//! over a window in which nothing but the beacons reaches it) and RSS, then the
//! time until the host reports a group of guests silenced at once as `suspect` and
//! as `lost`, timed on its live event stream (`GET /api/v1/events?vm=...`), and
//! how late that came past the threshold (3 intervals after each guest's last
//! beacon). It runs on RabbitMQ and again on ActiveMQ, each time with a host, a
//! destination prefix and a fleet of its own. There is no peer: no other tool
//! tracks guests this way.

use crate::event_stream::EventStream;
use crate::host_runs::HostProcess;
use crate::http_client::HttpConnection;
use crate::report::Row;
use crate::simulator::{self, BeaconFleet, GUESTS_PER_CONNECTION};
use crate::transfer_runs::Broker;
use crate::{machine, BenchError, Mode};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

pub const PRESENCE: &str = "3. Presence";

/// Runs the presence scenario through `broker`, `repetitions` times each figure;
/// its rows and the failures.
pub fn run(
    mode: &Mode,
    broker: Broker,
    repetitions: usize,
    host_bin: &Path,
) -> (Vec<Row>, Vec<String>) {
    match scenario(mode, broker, repetitions, host_bin) {
        Ok(rows) => (rows, Vec::new()),
        Err(e) => (
            Vec::new(),
            vec![format!("{PRESENCE} ({}): {e}", broker.name)],
        ),
    }
}

/// The number the host's `/metrics` gives for `vmc_guests{presence="..."}`.
fn guests_in(host: &HostProcess, presence: &str) -> Result<usize, BenchError> {
    let mut conn = HttpConnection::connect(host.addr)?;
    let (status, body) = conn.request("GET", "/metrics", None)?;
    if status != 200 {
        return Err(BenchError::Api(format!("GET /metrics answered {status}")));
    }
    let series = format!("vmc_guests{{presence=\"{presence}\"}} ");
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as usize)
}

fn wait_for(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: what.to_owned(),
                secs: within.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn scenario(
    mode: &Mode,
    broker: Broker,
    repetitions: usize,
    host_bin: &Path,
) -> Result<Vec<Row>, BenchError> {
    let broker_port = broker.port;
    let prefix = crate::run_tag("presence");
    let interval = mode.beacon_interval;
    let count = mode.presence_guests;
    let host = HostProcess::start_with_beacon(host_bin, broker_port, &prefix, interval)?;
    wait_for(
        "the vmc-host to answer /healthz with its broker connected",
        Duration::from_secs(30),
        || {
            HttpConnection::connect(host.addr)
                .and_then(|mut c| c.request("GET", "/healthz", None))
                .is_ok_and(|(status, body)| {
                    status == 200 && String::from_utf8_lossy(&body).contains("\"ok\"")
                })
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(BenchError::io("starting a tokio runtime"))?;
    let started = Instant::now();
    runtime.block_on(simulator::register(broker_port, &prefix, count))?;
    let fleet = runtime.block_on(BeaconFleet::start(broker_port, &prefix, count, interval))?;
    let result = measure(mode, broker.name, repetitions, &host, &fleet, started);
    runtime.block_on(fleet.stop());
    result
}

fn measure(
    mode: &Mode,
    broker: &str,
    repetitions: usize,
    host: &HostProcess,
    fleet: &BeaconFleet,
    started: Instant,
) -> Result<Vec<Row>, BenchError> {
    let (count, interval, lost) = (mode.presence_guests, mode.beacon_interval, mode.lost_guests);
    wait_for(
        &format!("the vmc-host to report {count} simulated guests alive"),
        Duration::from_secs(60 + count as u64 / 50),
        || guests_in(host, "alive").is_ok_and(|n| n >= count),
    )?;
    let registered_in = started.elapsed();
    // One more interval: every guest has beaconed since it was adopted, and
    // whatever queued up while the host registered them is drained.
    std::thread::sleep(interval);

    let label = format!(
        "{count} simulated guests over {} STOMP sessions ({GUESTS_PER_CONNECTION} per \
         session), STILL_ALIVE every {:.0} s, {broker}; all alive {:.1} s after the first HELLO",
        fleet.sessions(),
        interval.as_secs_f64(),
        registered_in.as_secs_f64()
    );
    let (mut cpu, mut rss, mut rates, mut own) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut quiet = Vec::new();
    // Pause and drain together well under an interval: every guest misses at most
    // one beacon, so nobody can turn suspect while the beacons pause.
    let (drain, pause) = (
        Duration::from_millis(200),
        mode.presence_window.min(interval.mul_f64(0.7)),
    );
    for _ in 0..repetitions {
        let (before, me, sent) = (host.usage(), machine::usage("self"), fleet.beacons_sent());
        let window = Instant::now();
        std::thread::sleep(mode.presence_window);
        let secs = window.elapsed().as_secs_f64();
        let after = host.usage();
        cpu.push((after.cpu_secs - before.cpu_secs) / secs * 100.0);
        own.push((machine::usage("self").cpu_secs - me.cpu_secs) / secs * 100.0);
        rss.push(after.rss_bytes as f64 / 1048576.0);
        rates.push((fleet.beacons_sent() - sent) as f64 / secs);

        // The same host with every beacon paused: what its timers cost alone.
        fleet.silence(0..count);
        std::thread::sleep(drain);
        let (before, window) = (host.usage(), Instant::now());
        std::thread::sleep(pause);
        let secs = window.elapsed().as_secs_f64();
        quiet.push((host.usage().cpu_secs - before.cpu_secs) / secs * 100.0);
        fleet.resume(0..count);
        // Every guest beacons again before anything else is measured.
        std::thread::sleep(interval);
    }
    let median = |v: &[f64]| crate::stats::Spread::of(v).map_or(0.0, |s| s.median);
    let subject = match broker {
        "RabbitMQ" => format!("vmc-host, {count} simulated guests"),
        _ => format!("vmc-host, {count} simulated guests, {broker}"),
    };
    let mut rows = vec![
        Row::new(PRESENCE, subject.clone(), "host CPU", "% of a core", &cpu).note(format!(
            "{label}; {:.0} beacons/s sent; over {:.0} s windows; target < 25 %; the simulator \
             itself used {:.0} % of a core",
            median(&rates),
            mode.presence_window.as_secs_f64(),
            median(&own)
        )),
        Row::new(
            PRESENCE,
            subject.clone(),
            "host CPU, beacons paused",
            "% of a core",
            &quiet,
        )
        .note(format!(
            "the same guests registered and alive, no beacon for {:.1} s (less than an \
             interval, so no presence changes): the host's own timers",
            pause.as_secs_f64()
        )),
        Row::new(PRESENCE, subject.clone(), "host RSS", "MiB", &rss).note(format!(
            "at the end of each window; peak (VmHWM) {:.1} MiB; target < 500 MiB",
            host.usage().hwm_bytes as f64 / 1048576.0
        )),
    ];

    let (mut suspect, mut all_lost, mut late) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repetitions {
        let first = (rep * lost) % count.max(1);
        let group = first..(first + lost).min(count);
        let detection = detect(host, fleet, group, interval)?;
        suspect.push(detection.all_suspect.as_secs_f64());
        all_lost.push(detection.all_lost.as_secs_f64());
        late.push(detection.worst_delay_ms);
    }
    let thresholds = format!(
        "host beacon_interval {:.0} s: suspect after 3 intervals of silence ({:.0} s), lost \
         after 4.5 ({:.1} s), checked by each VM's 1 s tick",
        interval.as_secs_f64(),
        interval.as_secs_f64() * 3.0,
        interval.as_secs_f64() * 4.5
    );
    let timed = format!(
        "{lost} of {count} simulated guests stop beaconing at once, timed on GET /api/v1/events"
    );
    rows.push(
        Row::new(
            PRESENCE,
            subject.clone(),
            "time to detect, all suspect",
            "s",
            &suspect,
        )
        .note(format!("{timed}; {thresholds}")),
    );
    rows.push(
        Row::new(
            PRESENCE,
            subject.clone(),
            "time to detect, all lost",
            "s",
            &all_lost,
        )
        .note(timed.clone()),
    );
    rows.push(
        Row::new(
            PRESENCE,
            subject,
            "detection past the threshold",
            "ms",
            &late,
        )
        .note("worst guest of the group: its suspect event minus (its last beacon + 3 intervals)"),
    );
    Ok(rows)
}

/// What one detection repetition measured.
#[derive(Debug)]
struct Detection {
    /// From silencing the group until the last of it was reported suspect (or
    /// lost, when a tick skipped suspect).
    all_suspect: Duration,
    /// Until the last of it was reported lost.
    all_lost: Duration,
    /// The worst lateness past each guest's own suspect threshold.
    worst_delay_ms: f64,
}

fn detect(
    host: &HostProcess,
    fleet: &BeaconFleet,
    group: std::ops::Range<usize>,
    interval: Duration,
) -> Result<Detection, BenchError> {
    let names: HashMap<String, usize> = group
        .clone()
        .map(|n| (simulator::simulated_id(n), n))
        .collect();
    let mut vms: Vec<&str> = names.keys().map(String::as_str).collect();
    vms.sort_unstable();
    let stream = EventStream::open(host.addr, &format!("/api/v1/events?vm={}", vms.join(",")))?;
    let silenced = Instant::now();
    fleet.silence(group.clone());
    let deadline = silenced + interval.mul_f64(4.5) + Duration::from_secs(30).max(interval * 3);
    let (mut suspect, mut lost) = (HashMap::new(), HashMap::new());
    while lost.len() < names.len() {
        let now = Instant::now();
        if now > deadline {
            return Err(BenchError::Timeout {
                what: format!(
                    "the host to report {} silenced guests lost ({} suspect, {} lost so far)",
                    names.len(),
                    suspect.len(),
                    lost.len()
                ),
                secs: (deadline - silenced).as_secs_f64(),
            });
        }
        let Some(event) = stream.next(deadline - now) else {
            continue;
        };
        match event.name.as_str() {
            "lagged" => {
                return Err(BenchError::Api(format!(
                    "the event stream lagged: {}",
                    event.data
                )))
            }
            "vm" => {}
            _ => continue,
        }
        let Some(vm) = event.data["vm"]
            .as_str()
            .filter(|vm| names.contains_key(*vm))
        else {
            continue;
        };
        match event.data["presence"].as_str() {
            Some("suspect") => {
                suspect.entry(vm.to_owned()).or_insert(event.at);
            }
            Some("lost") => {
                suspect.entry(vm.to_owned()).or_insert(event.at);
                lost.entry(vm.to_owned()).or_insert(event.at);
            }
            _ => {}
        }
    }
    let last = |times: &HashMap<String, Instant>| {
        times
            .values()
            .map(|t| t.saturating_duration_since(silenced))
            .max()
            .unwrap_or_default()
    };
    let worst_delay_ms = suspect
        .iter()
        .filter_map(|(vm, at)| {
            let threshold = fleet.last_sent(names[vm])? + interval * 3;
            Some(if *at >= threshold {
                (*at - threshold).as_secs_f64() * 1e3
            } else {
                -((threshold - *at).as_secs_f64() * 1e3)
            })
        })
        .fold(f64::NEG_INFINITY, f64::max);
    Ok(Detection {
        all_suspect: last(&suspect),
        all_lost: last(&lost),
        worst_delay_ms,
    })
}
