//! Scenarios driven through the host engine's library API in-process (an actix
//! System, the unmanaged backend, like `tests/integration/host.rs`), against real
//! `vmc-guest` processes on the real RabbitMQ: the command round trip and the
//! multicast fan-out, with this process's CPU time and RSS from `/proc/self`; then
//! the fan-out again on ActiveMQ, with an engine and guests of its own.

use crate::machine;
use crate::report::Row;
use crate::stats::{ms, percentile};
use crate::{BenchError, Mode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmc_host::engine::presence::Presence;
use vmc_host::engine::{Engine, EngineConfig};
use vmc_host::hypervisor::unmanaged::Unmanaged;
use vmc_host::store::CommandState;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
use vmc_protocol::stomp::{BrokerAddress, SessionConfig};
use vmc_protocol::words::CommandSpec;
use vmc_tests::agents::{GuestOptions, GuestProcess};

pub const ROUND_TRIP: &str = "1. Command round trip";
pub const FANOUT: &str = "2. Fan-out";
const PATIENCE: Duration = Duration::from_secs(120);

/// Runs the engine scenarios (round trip and fan-out on RabbitMQ, the fan-out
/// again on ActiveMQ at `mode.activemq_fanout_sizes`); rows measured so far and
/// the failures.
pub fn run(mode: &Mode, broker_port: u16, activemq_port: u16) -> (Vec<Row>, Vec<String>) {
    let system = actix_rt::System::new();
    system.block_on(async {
        let mut rows = Vec::new();
        let mut failures = Vec::new();
        if let Err(e) = scenarios(mode, broker_port, &mut rows, &mut failures).await {
            failures.push(format!("engine scenarios: {e}"));
        }
        let sizes = &mode.activemq_fanout_sizes;
        if !sizes.is_empty() {
            let broker = ("ActiveMQ", activemq_port);
            if let Err(e) = fanouts(sizes, broker, mode, &mut rows, &mut failures).await {
                failures.push(format!("{FANOUT} (ActiveMQ): {e}"));
            }
        }
        (rows, failures)
    })
}

async fn alive_count(engine: &Engine, prefix: &str, limit: usize) -> usize {
    engine
        .vms()
        .await
        .map(|vms| {
            vms.iter()
                .filter(|v| v.presence == Presence::Alive)
                .filter_map(|v| v.name.strip_prefix(prefix)?.parse::<usize>().ok())
                .filter(|n| *n < limit)
                .count()
        })
        .unwrap_or(0)
}

async fn wait_alive(
    engine: &Engine,
    prefix: &str,
    count: usize,
    within: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    while alive_count(engine, prefix, count).await < count {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: format!("{count} guests named {prefix}* saying HELLO"),
                secs: within.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// An engine in-process (unmanaged backend) on the broker at `broker_port`, its
/// destinations under `prefix`, its state in `dir`.
async fn start_engine(
    broker_port: u16,
    prefix: &str,
    dir: &std::path::Path,
) -> Result<Engine, BenchError> {
    let mut config = EngineConfig::new(
        HostId::new(format!("{prefix}-host"))
            .map_err(|e| BenchError::Api(format!("host id: {e}")))?,
        SessionConfig::new(BrokerAddress::tcp("127.0.0.1", broker_port))
            .with_credentials("guest", "guest"),
        dir.to_path_buf(),
        Arc::new(Unmanaged),
    );
    config.destinations = Destinations::new(prefix)
        .map_err(|e| BenchError::Api(format!("destination prefix: {e}")))?;
    Ok(Engine::start(config).await?)
}

/// A guest process named `id` on the broker at `broker_port`, under `prefix`.
fn guest(broker_port: u16, prefix: &str, id: &str) -> GuestProcess {
    let mut options = GuestOptions::new(broker_port, prefix, Some(id));
    options.beacon_interval = 5.0;
    GuestProcess::start(options)
}

async fn scenarios(
    mode: &Mode,
    broker_port: u16,
    rows: &mut Vec<Row>,
    failures: &mut Vec<String>,
) -> Result<(), BenchError> {
    let prefix = crate::run_tag("engine");
    let dir = tempfile::tempdir().map_err(BenchError::io("creating the engine state dir"))?;
    let engine = start_engine(broker_port, &prefix, dir.path()).await?;
    let rt_guest = guest(broker_port, &prefix, "rt-0");
    wait_alive(&engine, "rt-", 1, Duration::from_secs(30)).await?;
    let subject = "vmc engine (in-process) → guest process";
    match round_trip(mode, &engine, "rt-0", subject, "RabbitMQ").await {
        Ok(mut r) => rows.append(&mut r),
        Err(e) => failures.push(format!("{ROUND_TRIP} (engine): {e}")),
    }
    drop(rt_guest);
    engine.shutdown().await;
    fanouts(
        &mode.fanout_sizes,
        ("RabbitMQ", broker_port),
        mode,
        rows,
        failures,
    )
    .await
}

/// The fan-out at each of `sizes` (ascending) through one broker (name, port),
/// with an engine of its own and guests added as N grows.
async fn fanouts(
    sizes: &[usize],
    (broker, broker_port): (&str, u16),
    mode: &Mode,
    rows: &mut Vec<Row>,
    failures: &mut Vec<String>,
) -> Result<(), BenchError> {
    let prefix = crate::run_tag("fanout");
    let dir = tempfile::tempdir().map_err(BenchError::io("creating the engine state dir"))?;
    let engine = start_engine(broker_port, &prefix, dir.path()).await?;
    let mut guests = Vec::new();
    for &n in sizes {
        while guests.len() < n {
            guests.push(guest(
                broker_port,
                &prefix,
                &format!("fan-{:04}", guests.len()),
            ));
        }
        let started = Instant::now();
        if let Err(e) = wait_alive(&engine, "fan-", n, Duration::from_secs(30 + n as u64 / 5)).await
        {
            failures.push(format!("{FANOUT} N={n}, {broker}: {e}"));
            break;
        }
        let start_secs = started.elapsed().as_secs_f64();
        match fanout(mode, &engine, n, (broker, broker_port)).await {
            Ok(mut r) => {
                for row in &mut r {
                    row.note = format!("{}; {n} guests said HELLO in {start_secs:.1} s", row.note);
                }
                rows.append(&mut r);
            }
            Err(e) => failures.push(format!("{FANOUT} N={n}, {broker}: {e}")),
        }
    }
    drop(guests);
    engine.shutdown().await;
    Ok(())
}

/// `mode.round_trips` sequential `runCmd(vm, "true")` + wait per repetition:
/// p50 and p99 rows of `subject`.
pub(crate) async fn round_trip(
    mode: &Mode,
    engine: &Engine,
    vm: &str,
    subject: &str,
    broker: &str,
) -> Result<Vec<Row>, BenchError> {
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..mode.repetitions {
        let mut samples = Vec::with_capacity(mode.round_trips);
        for _ in 0..mode.round_trips {
            let start = Instant::now();
            let cmd_id = engine.run_command(vm, CommandSpec::new("true")).await?;
            let record = engine.wait_command(&cmd_id, PATIENCE).await?;
            samples.push(start.elapsed());
            if record.state != CommandState::Finished {
                return Err(BenchError::Api(format!("`true` ended {:?}", record.state)));
            }
        }
        p50s.push(ms(percentile(&samples, 0.5)));
        p99s.push(ms(percentile(&samples, 0.99)));
    }
    let note = format!(
        "{} sequential runCmd(\"true\") + wait per repetition, {broker}",
        mode.round_trips
    );
    Ok(vec![
        Row::new(ROUND_TRIP, subject, "p50", "ms", &p50s).note(note.clone()),
        Row::new(ROUND_TRIP, subject, "p99", "ms", &p99s).note(note),
    ])
}

fn machine_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn fanout(
    mode: &Mode,
    engine: &Engine,
    n: usize,
    (broker, broker_port): (&str, u16),
) -> Result<Vec<Row>, BenchError> {
    // fan-0000.. fan-0009 for 10, fan-0000.. fan-0099 for 100, all four digits for 1000.
    let digits = n.to_string().len() - 1;
    let glob = format!("fan-{}{}", "0".repeat(4 - digits), "?".repeat(digits));
    let (mut e2e, mut cpu, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut busy, mut broker_cpu) = (Vec::new(), Vec::new());
    let broker_pid = machine::listener_pid(broker_port).map(|pid| pid.to_string());
    let broker_usage = || {
        broker_pid
            .as_deref()
            .map_or(0.0, |pid| machine::usage(pid).cpu_secs)
    };
    for _ in 0..mode.repetitions {
        let (busy_before, broker_before) = (machine::busy_cpu_secs(), broker_usage());
        let before = machine::usage("self");
        let start = Instant::now();
        let view = engine
            .run_multicast(&glob, CommandSpec::new("true"))
            .await?;
        if view.commands.len() != n {
            return Err(BenchError::Api(format!(
                "{glob} targeted {} VMs, not {n}",
                view.commands.len()
            )));
        }
        for record in &view.commands {
            let done = engine.wait_command(&record.cmd_id, PATIENCE).await?;
            if done.state != CommandState::Finished {
                return Err(BenchError::Api(format!(
                    "{}: `true` ended {:?}",
                    done.vm.as_deref().unwrap_or("?"),
                    done.state
                )));
            }
        }
        e2e.push(ms(start.elapsed()));
        busy.push((machine::busy_cpu_secs() - busy_before) * 1e3);
        broker_cpu.push((broker_usage() - broker_before) * 1e3);
        let after = machine::usage("self");
        cpu.push((after.cpu_secs - before.cpu_secs) * 1e3);
        rss.push(after.rss_bytes as f64 / 1048576.0);
    }
    let peak = machine::usage("self").hwm_bytes as f64 / 1048576.0;
    let subject = match broker {
        "RabbitMQ" => format!("vmc engine, N = {n} guest processes"),
        _ => format!("vmc engine, N = {n} guest processes, {broker}"),
    };
    let note = format!("one multicast runCmd(\"true\") until every result is in, {broker}");
    Ok(vec![
        Row::new(FANOUT, subject.clone(), "end to end", "ms", &e2e).note(note),
        Row::new(FANOUT, subject.clone(), "host CPU time", "ms", &cpu)
            .note("user+sys of the engine's process, 10 ms ticks"),
        Row::new(
            FANOUT,
            subject.clone(),
            "broker CPU time",
            "ms",
            &broker_cpu,
        )
        .note(match broker_pid {
            Some(_) => format!(
                "user+sys of the {broker} process (found by its listening port), 10 ms ticks"
            ),
            None => format!("the {broker} process was not found by its port: not measured"),
        }),
        Row::new(FANOUT, subject.clone(), "machine CPU time", "ms", &busy).note(format!(
            "every process on the machine (guests, their `true`s, the broker, the host, this \
             client), from /proc/stat; the {} CPUs offer {} × end to end",
            machine_cpus(),
            machine_cpus()
        )),
        Row::new(FANOUT, subject, "host RSS", "MiB", &rss).note(format!(
            "after the fan-out; peak (VmHWM) {peak:.1} MiB{}",
            match broker {
                "RabbitMQ" => "",
                _ => " (this process ran the RabbitMQ fan-outs first)",
            }
        )),
    ])
}
