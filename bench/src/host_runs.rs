//! Scenarios driven against a real `vmc-host` process (unmanaged backend, its
//! own destination prefix and state directory, API on a free loopback port):
//! the round trip through XML-RPC, API throughput and latency with many VMs
//! registered by the simulator, and the host's RSS growth per VM and per
//! retained finished command (from `/proc/<pid>/status`).

use crate::http_client::{load, HttpConnection};
use crate::report::Row;
use crate::stats::{ms, percentile};
use crate::{machine, simulator, BenchError, Mode};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmc_tests::agents::{GuestOptions, GuestProcess};

pub const API: &str = "5. API";
pub const MEMORY: &str = "6. Memory";

/// Whether an XML-RPC answer is a fault.
pub fn is_fault(body: &[u8]) -> bool {
    body.windows(7).any(|w| w == b"<fault>")
}

fn xml_call(method: &str, params: &[String]) -> Vec<u8> {
    let params: String = params
        .iter()
        .map(|p| format!("<param><value>{p}</value></param>"))
        .collect();
    format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName>\
         <params>{params}</params></methodCall>"
    )
    .into_bytes()
}

fn string(s: &str) -> String {
    format!("<string>{s}</string>")
}

/// The first string value of an XML-RPC answer (typed or untyped).
fn first_string(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let value = text.split_once("<value>")?.1.split_once("</value>")?.0;
    let value = value
        .strip_prefix("<string>")
        .and_then(|v| v.strip_suffix("</string>"))
        .unwrap_or(value);
    Some(value.to_owned())
}

/// A `vmc-host` process, killed when dropped.
#[derive(Debug)]
pub(crate) struct HostProcess {
    child: Child,
    pub(crate) addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl HostProcess {
    fn start(bin: &Path, broker_port: u16, prefix: &str) -> Result<HostProcess, BenchError> {
        // Simulated guests never beacon: keep them from turning lost mid-run.
        HostProcess::start_with_beacon(bin, broker_port, prefix, Duration::from_secs(600))
    }

    /// A host whose presence thresholds follow `beacon_interval` (suspect after 3
    /// intervals of silence, lost after 4.5).
    pub(crate) fn start_with_beacon(
        bin: &Path,
        broker_port: u16,
        prefix: &str,
        beacon_interval: Duration,
    ) -> Result<HostProcess, BenchError> {
        let dir = tempfile::tempdir().map_err(BenchError::io("creating the host state dir"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::io("finding a free port"))?
            .port();
        let child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("VMC_HOST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .env("VMC_BACKEND", "unmanaged")
            .env("VMC_STATE_DIR", dir.path())
            .env("VMC_LISTEN", format!("127.0.0.1:{port}"))
            .env("VMC_PREFIX", prefix)
            .env("VMC_BROKER", format!("stomp://127.0.0.1:{broker_port}"))
            .env("VMC_LOGIN", "guest")
            .env("VMC_PASSCODE", "guest")
            .env("VMC_HOST_ID", format!("{prefix}-host"))
            .env(
                "VMC_BEACON_INTERVAL",
                beacon_interval.as_secs_f64().to_string(),
            )
            .stdin(Stdio::null())
            .spawn()
            .map_err(BenchError::io(format!("starting {}", bin.display())))?;
        Ok(HostProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        })
    }

    pub(crate) fn usage(&self) -> machine::ProcessUsage {
        machine::usage(&self.child.id().to_string())
    }

    /// The VMs the JSON API lists, waiting for the API to answer at first.
    fn vms(&self) -> Result<Vec<serde_json::Value>, BenchError> {
        let mut conn = HttpConnection::connect(self.addr)?;
        let (status, body) = conn.request("GET", "/api/v1/vms", None)?;
        if status != 200 {
            return Err(BenchError::Api(format!(
                "GET /api/v1/vms answered {status}"
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| BenchError::Api(format!("GET /api/v1/vms is not a JSON array: {e}")))
    }

    fn wait_vms(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(vms) = self.vms() {
                if done(&vms) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: what.to_owned(),
                    secs: within.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `vmc-host` process scenarios; rows measured so far and the failures.
pub fn run(mode: &Mode, broker_port: u16, host_bin: &Path) -> (Vec<Row>, Vec<String>) {
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    if let Err(e) = scenarios(mode, broker_port, host_bin, &mut rows, &mut failures) {
        failures.push(format!("vmc-host scenarios: {e}"));
    }
    (rows, failures)
}

fn scenarios(
    mode: &Mode,
    broker_port: u16,
    host_bin: &Path,
    rows: &mut Vec<Row>,
    failures: &mut Vec<String>,
) -> Result<(), BenchError> {
    let prefix = crate::run_tag("host");
    let host = HostProcess::start(host_bin, broker_port, &prefix)?;
    let mut options = GuestOptions::new(broker_port, &prefix, Some("rt-0"));
    options.beacon_interval = 5.0;
    let guest = GuestProcess::start(options);
    host.wait_vms(
        "the vmc-host to list rt-0 alive",
        Duration::from_secs(30),
        |vms| {
            vms.iter()
                .any(|v| v["name"] == "rt-0" && v["presence"] == "alive")
        },
    )?;

    let before = host.usage();
    match round_trip(mode, host.addr) {
        Ok(mut r) => {
            let after = host.usage();
            let commands = (mode.repetitions * mode.round_trips) as f64;
            let per_command = (after.rss_bytes as f64 - before.rss_bytes as f64) / commands;
            rows.append(&mut r);
            rows.push(
                Row::new(
                    MEMORY,
                    "vmc-host process",
                    "RSS growth per retained finished command",
                    "bytes",
                    &[per_command],
                )
                .note(format!(
                    "one run: {commands:.0} commands, RSS {:.1} → {:.1} MiB",
                    before.rss_bytes as f64 / 1048576.0,
                    after.rss_bytes as f64 / 1048576.0
                )),
            );
        }
        Err(e) => failures.push(format!("{} (XML-RPC): {e}", crate::engine_runs::ROUND_TRIP)),
    }
    drop(guest);

    let count = mode.simulated_vms;
    let before = host.usage();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::io("starting a tokio runtime"))?;
    let started = Instant::now();
    runtime.block_on(simulator::register(broker_port, &prefix, count))?;
    host.wait_vms(
        &format!("the vmc-host to list {count} simulated VMs"),
        Duration::from_secs(60),
        |vms| {
            vms.iter()
                .filter(|v| v["name"].as_str().is_some_and(|n| n.starts_with("sim-")))
                .count()
                >= count
        },
    )?;
    let registered_in = started.elapsed();
    let after = host.usage();
    rows.push(
        Row::new(
            MEMORY,
            "vmc-host process",
            "RSS growth per registered VM",
            "bytes",
            &[(after.rss_bytes as f64 - before.rss_bytes as f64) / count as f64],
        )
        .note(format!(
            "one run: {count} simulated HELLOs registered in {:.2} s, RSS {:.1} → {:.1} MiB",
            registered_in.as_secs_f64(),
            before.rss_bytes as f64 / 1048576.0,
            after.rss_bytes as f64 / 1048576.0
        )),
    );

    match api_load(mode, &host, count) {
        Ok(mut r) => rows.append(&mut r),
        Err(e) => failures.push(format!("{API}: {e}")),
    }
    Ok(())
}

fn round_trip(mode: &Mode, addr: SocketAddr) -> Result<Vec<Row>, BenchError> {
    let mut conn = HttpConnection::connect(addr)?;
    let run = xml_call("runCmd", &[string("rt-0"), string("true")]);
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..mode.repetitions {
        let mut samples = Vec::with_capacity(mode.round_trips);
        for _ in 0..mode.round_trips {
            let start = Instant::now();
            let (status, body) = conn.request("POST", "/RPC2", Some(("text/xml", &run)))?;
            let cmd_id = first_string(&body)
                .filter(|_| status == 200 && !is_fault(&body))
                .ok_or_else(|| {
                    BenchError::Api(format!(
                        "runCmd answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ))
                })?;
            let wait = xml_call(
                "getCmdResults",
                &[string(&cmd_id), "<double>30</double>".into()],
            );
            let (status, body) = conn.request("POST", "/RPC2", Some(("text/xml", &wait)))?;
            samples.push(start.elapsed());
            if status != 200 || is_fault(&body) {
                return Err(BenchError::Api(format!(
                    "getCmdResults answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
        }
        p50s.push(ms(percentile(&samples, 0.5)));
        p99s.push(ms(percentile(&samples, 0.99)));
    }
    let subject = "vmc-host XML-RPC → guest process";
    let note = format!(
        "{} sequential runCmd + getCmdResults(id, 30) per repetition, one keep-alive connection",
        mode.round_trips
    );
    Ok(vec![
        Row::new(crate::engine_runs::ROUND_TRIP, subject, "p50", "ms", &p50s).note(note.clone()),
        Row::new(crate::engine_runs::ROUND_TRIP, subject, "p99", "ms", &p99s).note(note),
    ])
}

fn api_load(mode: &Mode, host: &HostProcess, vms: usize) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    let c = mode.connections;
    let label = format!("{c} connections, {vms} simulated VMs registered");
    type Maker = Box<dyn Fn(usize, usize) -> (&'static str, String, Option<Vec<u8>>) + Send + Sync>;
    let cases: [(&str, Maker); 2] = [
        (
            "XML-RPC getState(vm)",
            Box::new(move |t, n| {
                let vm = simulator::simulated_id((t * 7919 + n) % vms.max(1));
                (
                    "POST",
                    "/RPC2".to_owned(),
                    Some(xml_call("getState", &[string(&vm)])),
                )
            }),
        ),
        (
            "JSON GET /api/v1/vms",
            Box::new(|_, _| ("GET", "/api/v1/vms".to_owned(), None)),
        ),
    ];
    for (subject, make) in cases {
        let (mut rps, mut p99, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..mode.repetitions {
            let before = host.usage();
            let result = load(host.addr, c, mode.load_duration, &make)?;
            let after = host.usage();
            rps.push(result.requests as f64 / result.elapsed.as_secs_f64());
            p99.push(ms(percentile(&result.latencies, 0.99)));
            cpu.push((after.cpu_secs - before.cpu_secs) / result.elapsed.as_secs_f64() * 100.0);
        }
        rows.push(Row::new(API, subject, "throughput", "req/s", &rps).note(label.clone()));
        rows.push(Row::new(API, subject, "p99 latency", "ms", &p99).note(label.clone()));
        rows.push(
            Row::new(API, subject, "vmc-host CPU", "% of a core", &cpu)
                .note("during the load; the load client shares the machine"),
        );
    }
    Ok(rows)
}
