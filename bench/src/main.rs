//! `vmc-bench`: runs the benchmark scenarios, prints the table and writes it with
//! the machine it ran on (the full mode to `BENCHMARKS.md` at the workspace root,
//! the short mode to `target/BENCHMARKS.short.md`, a partial run (`--only`) to
//! `target/BENCHMARKS.partial.md`, `--output` to elsewhere).
//! Exits non-zero when any scenario failed.
//!
//!   cargo build --release --bins && cargo run --release -p vmc-bench
//!   cargo build --bins && cargo run -p vmc-bench -- --short

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use vmc_bench::report::{self, Row};
use vmc_bench::transfer_runs::{self, Broker};
use vmc_bench::{engine_runs, host_runs, machine, presence_runs, ssh_peer, stats, Mode};

const USAGE: &str = "usage: vmc-bench [--short] [--only GROUPS] [--output PATH]\n\
  --short   a quick run (small N, few repetitions) that checks every scenario works\n\
  --only    a comma-separated subset of the groups: engine (ssh peer, round trip,\n\
            fan-out), host (XML-RPC round trip, API, memory), presence, transfer\n\
            (file transfer on both brokers, ActiveMQ round trip), vm (round trip in\n\
            a QEMU VM next to qemu-guest-agent); written to\n\
            target/BENCHMARKS.partial.md unless --output says otherwise\n\
  --output  where to write the Markdown report (default: BENCHMARKS.md for the full\n\
            mode, target/BENCHMARKS.short.md for the short one)\n\
  VMC_HOST_BIN / VMC_GUEST_BIN override the agents (default: next to vmc-bench);\n\
  VMC_BENCH_BROKER_PORT the RabbitMQ STOMP port (default 61613, started if down);\n\
  VMC_BENCH_ACTIVEMQ_PORT the ActiveMQ STOMP port (default 61614, started if down);\n\
  RUST_LOG what the in-process engine logs to stderr (default warn)";

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// `VMC_<NAME>_BIN`, or the binary next to this one (`target/<profile>/`).
fn agent_binary(name: &str, var: &str) -> Result<PathBuf, String> {
    let path = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable: {e}"))?
            .with_file_name(name),
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build the agents first (cargo build --bins, with --release for \
             the full mode) or set {var}",
            path.display()
        ))
    }
}

/// The STOMP port of a broker: `var` when set, else the default instance, started
/// by its `deploy/brokers/` script if it is down.
fn broker(root: &Path, var: &str, script: &str, port: u16) -> Result<u16, String> {
    if let Ok(value) = std::env::var(var) {
        return value
            .parse()
            .map_err(|_| format!("{var}={value:?} is not a port"));
    }
    let script = root.join("deploy/brokers").join(script);
    match Command::new("bash").arg(&script).arg("start").output() {
        Ok(out) if out.status.success() => Ok(port),
        Ok(out) => Err(format!(
            "{} start failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("cannot run {}: {e}", script.display())),
    }
}

fn ssh_rows(mode: &Mode) -> Vec<Row> {
    let subject = "ssh + ControlMaster (peer)";
    let unavailable = |why: String| {
        ["p50", "p99"]
            .map(|f| Row::new(engine_runs::ROUND_TRIP, subject, f, "ms", &[]).note(why.clone()))
            .to_vec()
    };
    let peer = match ssh_peer::SshPeer::start() {
        Ok(peer) => peer,
        Err(e) => return unavailable(format!("sshd could not run here: {e}")),
    };
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..mode.repetitions {
        let mut samples = Vec::with_capacity(mode.peer_round_trips);
        for _ in 0..mode.peer_round_trips {
            match peer.call() {
                Ok(d) => samples.push(d),
                Err(e) => return unavailable(format!("ssh failed mid-run: {e}")),
            }
        }
        p50s.push(stats::ms(stats::percentile(&samples, 0.5)));
        p99s.push(stats::ms(stats::percentile(&samples, 0.99)));
    }
    let note = format!(
        "{} sequential `ssh root@127.0.0.1 true` per repetition over one master, private sshd",
        mode.peer_round_trips
    );
    vec![
        Row::new(engine_runs::ROUND_TRIP, subject, "p50", "ms", &p50s).note(note.clone()),
        Row::new(engine_runs::ROUND_TRIP, subject, "p99", "ms", &p99s).note(note),
    ]
}

fn main() -> ExitCode {
    const GROUPS: [&str; 5] = ["engine", "host", "presence", "transfer", "vm"];
    // The in-process engine's warnings (a broker session lost, a command resent)
    // explain an outlier figure; RUST_LOG=debug tells more.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let (mut mode, mut output, mut only) = (Mode::full(), None, None::<Vec<String>>);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--short" => mode = Mode::short(),
            "--output" => output = args.next().map(PathBuf::from),
            "--only" => {
                let groups: Vec<String> = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                if let Some(bad) = groups.iter().find(|g| !GROUPS.contains(&g.as_str())) {
                    eprintln!("vmc-bench: unknown group {bad:?} for --only\n{USAGE}");
                    return ExitCode::from(2);
                }
                only = Some(groups);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("vmc-bench: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let root = workspace_root();
    let output = output.unwrap_or_else(|| match (mode.name, &only) {
        (_, Some(_)) => root.join("target/BENCHMARKS.partial.md"),
        ("full", None) => root.join("BENCHMARKS.md"),
        _ => root.join("target/BENCHMARKS.short.md"),
    });
    let wanted = |group: &str| only.as_ref().is_none_or(|g| g.iter().any(|g| g == group));
    let (host_bin, guest_bin) = match (
        agent_binary("vmc-host", "VMC_HOST_BIN"),
        agent_binary("vmc-guest", "VMC_GUEST_BIN"),
    ) {
        (Ok(h), Ok(g)) => (h, g),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmc-bench: {e}");
            return ExitCode::from(2);
        }
    };
    // vmc_tests::agents::GuestProcess finds the guest through this variable.
    std::env::set_var("VMC_GUEST_BIN", &guest_bin);
    let (broker_port, activemq_port) = match (
        broker(&root, "VMC_BENCH_BROKER_PORT", "rabbitmq.sh", 61613),
        broker(&root, "VMC_BENCH_ACTIVEMQ_PORT", "activemq.sh", 61614),
    ) {
        (Ok(rabbitmq), Ok(activemq)) => (rabbitmq, activemq),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmc-bench: {e}");
            return ExitCode::from(2);
        }
    };

    let machine = machine::Machine::probe();
    eprintln!("vmc-bench: {} mode on {machine}", mode.name);
    // Every subject's rows, and the ssh peer's apart (the round trip rows are
    // compared with it below).
    let (mut ssh, mut measured, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    if wanted("engine") {
        eprintln!("vmc-bench: ssh peer ...");
        ssh = ssh_rows(&mode);
        eprintln!("vmc-bench: in-process engine (round trip, fan-out on both brokers) ...");
        let (rows, more) = engine_runs::run(&mode, broker_port, activemq_port);
        measured.extend(rows);
        failures.extend(more);
    }
    if wanted("host") {
        eprintln!("vmc-bench: vmc-host process (XML-RPC round trip, API, memory) ...");
        let (rows, more) = host_runs::run(&mode, broker_port, &host_bin);
        measured.extend(rows);
        failures.extend(more);
    }
    let brokers = [
        Broker {
            name: "RabbitMQ",
            port: broker_port,
        },
        Broker {
            name: "ActiveMQ",
            port: activemq_port,
        },
    ];
    if wanted("presence") {
        for (broker, repetitions) in [
            (brokers[0], mode.heavy_repetitions),
            (brokers[1], mode.activemq_presence_repetitions),
        ] {
            eprintln!(
                "vmc-bench: presence at scale ({} simulated guests, {}) ...",
                mode.presence_guests, broker.name
            );
            let (rows, more) = presence_runs::run(&mode, broker, repetitions, &host_bin);
            measured.extend(rows);
            failures.extend(more);
        }
    }
    if wanted("transfer") {
        eprintln!(
            "vmc-bench: file transfer (both brokers, raw STOMP, scp), ActiveMQ round trip ..."
        );
        let (rows, more) = transfer_runs::run(&mode, &brokers);
        measured.extend(rows);
        failures.extend(more);
    }

    let mut rows: Vec<Row> = Vec::new();
    for row in measured {
        let peer = ssh
            .iter()
            .find(|p| p.scenario == row.scenario && p.figure == row.figure);
        rows.push(match peer {
            Some(peer) => row.against(peer),
            None => row,
        });
    }
    rows.extend(ssh);
    if wanted("vm") {
        eprintln!(
            "vmc-bench: round trip and file transfer in a QEMU VM, qemu-guest-agent peer ..."
        );
        let (vm_rows, more) = vmc_bench::vm_runs::run(&mode, broker_port, &host_bin, &root);
        rows.extend(vm_rows);
        failures.extend(more);
    }
    rows.sort_by_key(|r| r.scenario);

    let command = match mode.name {
        "full" => "cargo build --release --bins && cargo run --release -p vmc-bench",
        _ => "cargo build --bins && cargo run -p vmc-bench -- --short",
    };
    println!("{}", report::table(&rows));
    for f in &failures {
        eprintln!("vmc-bench: FAILED: {f}");
    }
    let document = report::document(&machine, mode.name, command, &rows, &failures);
    if let Err(e) = std::fs::write(&output, document) {
        eprintln!("vmc-bench: cannot write {}: {e}", output.display());
        return ExitCode::FAILURE;
    }
    eprintln!("vmc-bench: wrote {}", output.display());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
