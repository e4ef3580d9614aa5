//! The real `vmc-guest` process, driven by a test-side host that speaks the
//! documented protocol through the real brokers: presence, commands, durability of
//! results, multicast and file transfer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use vmc_protocol::words::{
    CommandOutcome, CommandResult, CommandSpec, FileErrorCode, Message, OutputStream,
    DEFAULT_OUTPUT_LIMIT,
};
use vmc_tests::agents::{is_hello_from, GuestOptions, GuestProcess, TestHost};
use vmc_tests::transfer::{download, sha256_file, write_pattern_file, Download, Upload};
use vmc_tests::{init_logging, shared_broker, unique_name, BrokerKind, PrivateBroker};

const PATIENCE: Duration = Duration::from_secs(30);

/// A test's world: a host and one guest on a prefix of their own.
struct World {
    host: TestHost,
    guest: GuestProcess,
    id: String,
}

fn prefix() -> String {
    unique_name("vmctest").replace('.', "-")
}

async fn world(kind: BrokerKind, tune: impl FnOnce(&mut GuestOptions)) -> World {
    init_logging();
    let port = shared_broker(kind);
    world_on(kind, port, tune).await
}

async fn world_on(kind: BrokerKind, port: u16, tune: impl FnOnce(&mut GuestOptions)) -> World {
    let prefix = prefix();
    let mut host = TestHost::start(kind, port, &prefix).await;
    let id = format!("g-{}", std::process::id());
    let mut options = GuestOptions::new(port, &prefix, Some(&id));
    tune(&mut options);
    let guest = GuestProcess::start(options);
    host.expect(PATIENCE, "HELLO", |e| is_hello_from(e, &id))
        .await;
    World { host, guest, id }
}

fn new_cmd_id() -> String {
    unique_name("cmd").replace('.', "-")
}

impl World {
    /// Sends CMD_RUN and returns the cmd-id.
    async fn start(&mut self, spec: CommandSpec) -> String {
        let cmd_id = new_cmd_id();
        let run = Message::CmdRun {
            cmd_id: cmd_id.clone(),
            to: self.id.clone(),
            spec,
        };
        self.host.send_to(&self.id, &run).await;
        cmd_id
    }

    async fn result_of(&mut self, cmd_id: &str) -> CommandResult {
        let envelope = self
            .host
            .expect(
                PATIENCE,
                "CMD_RESULT",
                |e| matches!(&e.message, Message::CmdResult(r) if r.cmd_id == cmd_id),
            )
            .await;
        let Message::CmdResult(result) = envelope.message else {
            unreachable!()
        };
        self.host
            .send_to(
                &self.id,
                &Message::CmdAck {
                    cmd_id: cmd_id.to_owned(),
                },
            )
            .await;
        result
    }

    async fn run(&mut self, spec: CommandSpec) -> CommandResult {
        let cmd_id = self.start(spec).await;
        self.result_of(&cmd_id).await
    }
}

fn sh(script: &str) -> CommandSpec {
    let mut spec = CommandSpec::new("/bin/sh");
    spec.args = vec!["-c".into(), script.into()];
    spec
}

/// Process ids whose process group is `pgid`, from /proc.
fn processes_in_group(pgid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(2).and_then(|p| p.parse().ok()) == Some(pgid)
        {
            found.push(pid);
        }
    }
    found
}

async fn hello_beacons_and_bye(kind: BrokerKind) {
    let mut w = world(kind, |o| o.beacon_interval = 0.3).await;
    let id = w.id.clone();
    let beacon = w
        .host
        .expect(PATIENCE, "STILL_ALIVE", |e| {
            matches!(e.message, Message::StillAlive(_)) && e.from.as_deref() == Some(id.as_str())
        })
        .await;
    assert_eq!(beacon.protocol, 1);
    let status = w.guest.terminate().expect("the agent exits");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    w.host
        .expect(PATIENCE, "BYE", |e| {
            matches!(e.message, Message::Bye { .. }) && e.from.as_deref() == Some(id.as_str())
        })
        .await;
}

async fn commands_get_args_env_cwd_and_stdin_literally(kind: BrokerKind) {
    let mut w = world(kind, |_| {}).await;
    let stdin = w.guest.files_dir.join("stdin.txt");
    std::fs::write(&stdin, "from the stdin file\n").unwrap();
    let mut spec = sh(r#"printf '[%s]' "$@"; printf '{%s}' "$GREETING"; pwd; cat"#);
    let tricky = [
        "a b",
        "\"quoted\"",
        "$(id)",
        "; rm -rf /tmp/x",
        "it's",
        "ünï",
    ];
    spec.args.push("sh".into());
    spec.args.extend(tricky.iter().map(|s| s.to_string()));
    spec.env.insert("GREETING".into(), "hello there".into());
    spec.path = Some(w.guest.files_dir.display().to_string());
    spec.file_for_stdin = Some(stdin.display().to_string());
    let result = w.run(spec).await;
    let expected_args: String = tricky.iter().map(|a| format!("[{a}]")).collect();
    assert_eq!(
        result.out,
        format!(
            "{expected_args}{{hello there}}{}\nfrom the stdin file\n",
            w.guest.files_dir.canonicalize().unwrap().display()
        )
    );
    assert_eq!(
        (result.state, result.finished, result.exit_code_or_signal),
        (CommandOutcome::Exited, true, 0)
    );
    assert!(result.started_at.is_some() && result.ended_at.is_some());
}

async fn exit_codes_signals_and_start_failures(kind: BrokerKind) {
    let mut w = world(kind, |_| {}).await;
    let exited = w.run(sh("echo oops >&2; exit 3")).await;
    assert_eq!(
        (exited.state, exited.finished, exited.exit_code_or_signal),
        (CommandOutcome::Exited, true, 3)
    );
    assert_eq!(exited.err, "oops\n");
    let killed = w.run(sh("kill -9 $$")).await;
    assert_eq!(
        (killed.state, killed.finished, killed.exit_code_or_signal),
        (CommandOutcome::Signalled, false, 9)
    );
    let missing = w.run(CommandSpec::new("no-such-command-anywhere")).await;
    assert_eq!(missing.state, CommandOutcome::FailedToStart);
    assert!(
        missing
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no-such-command-anywhere"),
        "{missing:?}"
    );
    let mut no_stdin = sh("cat");
    no_stdin.file_for_stdin = Some("/nonexistent/stdin".into());
    let failed = w.run(no_stdin).await;
    assert_eq!(failed.state, CommandOutcome::FailedToStart);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("/nonexistent/stdin"),
        "{failed:?}"
    );
}

async fn timeout_and_cancel_leave_no_process_behind(kind: BrokerKind) {
    let mut w = world(kind, |_| {}).await;
    let mut slow = sh("echo $$; sleep 60 & sleep 60 & wait");
    slow.timeout_secs = Some(0.5);
    let timed_out = w.run(slow).await;
    assert_eq!(timed_out.state, CommandOutcome::TimedOut);
    let pgid: u32 = timed_out.out.trim().parse().unwrap();
    assert_eq!(
        processes_in_group(pgid),
        Vec::<u32>::new(),
        "nothing left after the timeout"
    );

    let cmd_id = w.start(sh("echo $$; sleep 60 & sleep 60 & wait")).await;
    let id = cmd_id.clone();
    let first = w
        .host
        .expect(
            PATIENCE,
            "the shell's pid",
            |e| matches!(&e.message, Message::CmdOutput { cmd_id, .. } if *cmd_id == id),
        )
        .await;
    let Message::CmdOutput { data, .. } = first.message else {
        unreachable!()
    };
    let pgid: u32 = String::from_utf8_lossy(&data).trim().parse().unwrap();
    vmc_tests::wait_until(PATIENCE, "the children to start", || {
        let n = processes_in_group(pgid).len();
        async move { n >= 3 }
    })
    .await;
    let cancel = Message::CmdCancel {
        cmd_id: cmd_id.clone(),
        grace_secs: Some(1.0),
    };
    w.host.send_to(&w.id, &cancel).await;
    let cancelled = w.result_of(&cmd_id).await;
    assert_eq!(cancelled.state, CommandOutcome::Cancelled);
    assert!(!cancelled.finished);
    assert_eq!(
        processes_in_group(pgid),
        Vec::<u32>::new(),
        "no orphan after the cancel"
    );
}

async fn fifty_commands_at_once_and_ping_still_answers(kind: BrokerKind) {
    let mut w = world(kind, |o| o.max_concurrent_commands = 64).await;
    let mut expected = BTreeMap::new();
    for n in 0..50 {
        let mut spec = sh("sleep 2; echo \"$0\"");
        spec.args.push(format!("job-{n}"));
        expected.insert(w.start(spec).await, format!("job-{n}\n"));
    }
    let ping = Message::Ping {
        ping_id: "p1".into(),
    };
    w.host.send_to(&w.id, &ping).await;
    // Results and the PONG interleave: take both as they come.
    let mut got = BTreeMap::new();
    let mut ponged = false;
    while got.len() < expected.len() || !ponged {
        let envelope = w
            .host
            .expect(PATIENCE, "the PONG and all 50 results", |e| {
                match &e.message {
                    Message::Pong { ping_id } => ping_id == "p1",
                    Message::CmdResult(_) => true,
                    _ => false,
                }
            })
            .await;
        let result = match envelope.message {
            Message::CmdResult(result) => result,
            _ => {
                ponged = true;
                assert!(
                    got.len() < expected.len(),
                    "PONG came while commands still ran"
                );
                continue;
            }
        };
        let ack = Message::CmdAck {
            cmd_id: result.cmd_id.clone(),
        };
        w.host.send_to(&w.id, &ack).await;
        assert_eq!(result.state, CommandOutcome::Exited);
        got.insert(result.cmd_id, result.out);
    }
    assert_eq!(got, expected);
}

async fn cpu_time_and_memory_are_accounted(kind: BrokerKind) {
    let mut w = world(kind, |_| {}).await;
    let result = w
        .run(sh("i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done"))
        .await;
    let cpu = result.resources.ru_utime + result.resources.ru_stime;
    assert!(cpu > 0.1, "a busy loop used CPU: {:?}", result.resources);
    assert!(
        cpu <= result.wall_secs + 0.05,
        "CPU {cpu} within wall {}",
        result.wall_secs
    );
    assert!(result.resources.ru_maxrss > 0);
    assert!(result.resources.ru_minflt > 0);
}

async fn multicast_reaches_exactly_the_matching_guests(kind: BrokerKind) {
    init_logging();
    let port = shared_broker(kind);
    let prefix = prefix();
    let mut host = TestHost::start(kind, port, &prefix).await;
    let ids = ["rack1-a", "rack1-b", "rack2-a"];
    let _guests: Vec<GuestProcess> = ids
        .iter()
        .map(|id| GuestProcess::start(GuestOptions::new(port, &prefix, Some(id))))
        .collect();
    let mut hello = BTreeSet::new();
    while hello.len() < ids.len() {
        let e = host
            .expect(PATIENCE, "three HELLOs", |e| {
                matches!(e.message, Message::Hello(_))
            })
            .await;
        hello.insert(e.from.unwrap());
    }
    let cmd_id = new_cmd_id();
    let run = Message::CmdRun {
        cmd_id: cmd_id.clone(),
        to: "rack1-*".into(),
        spec: sh("echo hi"),
    };
    host.multicast("rack1-*", &run).await;
    let results = host
        .collect(
            Duration::from_secs(4),
            |e| matches!(&e.message, Message::CmdResult(r) if r.cmd_id == cmd_id),
        )
        .await;
    let from: BTreeSet<String> = results.iter().filter_map(|e| e.from.clone()).collect();
    assert_eq!(
        from,
        ["rack1-a", "rack1-b"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert_eq!(results.len(), 2, "one result per matching guest");
}

macro_rules! guest_tests {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hello_beacons_and_bye() {
                super::hello_beacons_and_bye($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commands_get_args_env_cwd_and_stdin_literally() {
                super::commands_get_args_env_cwd_and_stdin_literally($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exit_codes_signals_and_start_failures() {
                super::exit_codes_signals_and_start_failures($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn timeout_and_cancel_leave_no_process_behind() {
                super::timeout_and_cancel_leave_no_process_behind($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fifty_commands_at_once_and_ping_still_answers() {
                super::fifty_commands_at_once_and_ping_still_answers($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cpu_time_and_memory_are_accounted() {
                super::cpu_time_and_memory_are_accounted($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multicast_reaches_exactly_the_matching_guests() {
                super::multicast_reaches_exactly_the_matching_guests($kind).await;
            }
        }
    };
}

guest_tests!(rabbitmq, BrokerKind::RabbitMq);
guest_tests!(activemq, BrokerKind::ActiveMq);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_without_an_id_is_named_by_its_nic_mac() {
    use vmc_guest_identity::expected_mac;
    init_logging();
    let port = shared_broker(BrokerKind::RabbitMq);
    let prefix = prefix();
    let mut host = TestHost::start(BrokerKind::RabbitMq, port, &prefix).await;
    let _guest = GuestProcess::start(GuestOptions::new(port, &prefix, None));
    let mac = expected_mac();
    let hello = host
        .expect(PATIENCE, "HELLO", |e| {
            matches!(e.message, Message::Hello(_))
        })
        .await;
    let Message::Hello(info) = hello.message else {
        unreachable!()
    };
    assert_eq!(info.id.as_str(), mac);
    assert_eq!(info.mac.as_deref(), Some(mac.as_str()));
    assert!(!info.ips.is_empty(), "HELLO lists the guest's addresses");
}

/// The MAC the agent should pick, read independently from /sys/class/net: the first
/// Ethernet interface (type 1) with a device link, by name.
mod vmc_guest_identity {
    pub fn expected_mac() -> String {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                let base = std::path::Path::new("/sys/class/net").join(n);
                std::fs::read_to_string(base.join("type"))
                    .map(|t| t.trim() == "1")
                    .unwrap_or(false)
                    && base.join("device").exists()
            })
            .collect();
        names.sort();
        let first = names.first().expect("this machine has a physical NIC");
        std::fs::read_to_string(format!("/sys/class/net/{first}/address"))
            .unwrap()
            .trim()
            .to_uppercase()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_of_100_mib_is_streamed_whole_and_kept() {
    let mut w = world(BrokerKind::RabbitMq, |_| {}).await;
    let total: u64 = 100 * 1024 * 1024;
    let cmd_id = w
        .start(sh(&format!("yes 0123456789abcdef | head -c {total}")))
        .await;
    let mut next_offset = 0u64;
    let id = cmd_id.clone();
    let result = loop {
        let e = w
            .host
            .expect(PATIENCE, "output or result", |e| match &e.message {
                Message::CmdOutput { cmd_id, .. } => *cmd_id == id,
                Message::CmdResult(r) => r.cmd_id == id,
                _ => false,
            })
            .await;
        match e.message {
            Message::CmdOutput {
                stream,
                offset,
                data,
                ..
            } => {
                assert_eq!(stream, OutputStream::Out);
                assert_eq!(offset, next_offset, "chunks arrive in order without gaps");
                assert!(data.len() <= 64 * 1024);
                next_offset += data.len() as u64;
            }
            Message::CmdResult(result) => break result,
            _ => unreachable!(),
        }
    };
    w.host.send_to(&w.id, &Message::CmdAck { cmd_id }).await;
    assert_eq!(next_offset, total, "every byte was streamed");
    assert_eq!(result.out_bytes, total);
    assert!(result.out_truncated);
    assert_eq!(result.out.len() as u64, DEFAULT_OUTPUT_LIMIT);
    assert!(result.out.starts_with("0123456789abcdef\n0123"));
    let kept = result
        .out_file
        .expect("the full output is kept on the guest");
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_resent_after_a_guest_restart_until_acknowledged() {
    let mut w = world(BrokerKind::RabbitMq, |_| {}).await;
    let cmd_id = w.start(sh("echo durable")).await;
    let id = cmd_id.clone();
    let is_result = move |e: &vmc_protocol::words::Envelope| matches!(&e.message, Message::CmdResult(r) if r.cmd_id == id);
    let first = w
        .host
        .expect(PATIENCE, "the result", is_result.clone())
        .await;
    // No CMD_ACK: the guest must keep the result, even across a crash.
    w.guest.restart();
    let again = w
        .host
        .expect(
            PATIENCE,
            "the result again after the restart",
            is_result.clone(),
        )
        .await;
    assert_eq!(first.message, again.message);
    w.host
        .send_to(
            &w.id,
            &Message::CmdAck {
                cmd_id: cmd_id.clone(),
            },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.guest.restart();
    let id = w.id.clone();
    w.host
        .expect(PATIENCE, "HELLO after the second restart", |e| {
            is_hello_from(e, &id)
        })
        .await;
    let late = w.host.collect(Duration::from_secs(2), is_result).await;
    assert!(
        late.is_empty(),
        "an acknowledged result is not sent again: {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_running_when_the_guest_dies_is_reported_lost() {
    let mut w = world(BrokerKind::RabbitMq, |_| {}).await;
    let cmd_id = w.start(sh("echo started; sleep 60")).await;
    let id = cmd_id.clone();
    w.host
        .expect(
            PATIENCE,
            "the command's output",
            |e| matches!(&e.message, Message::CmdOutput { cmd_id, .. } if *cmd_id == id),
        )
        .await;
    w.guest.restart();
    let result = w.result_of(&cmd_id).await;
    assert_eq!(result.state, CommandOutcome::Lost);
    assert!(result.error.is_some());
}

async fn result_crosses_a_broker_restart(kind: BrokerKind, port: u16) {
    init_logging();
    let broker = PrivateBroker::start(kind, "guest-restart", port);
    let mut w = world_on(kind, port, |_| {}).await;
    let cmd_id = w.start(sh("sleep 2; echo survived")).await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        broker.start_again();
        broker
    })
    .await
    .unwrap();
    let result = w.result_of(&cmd_id).await;
    assert_eq!(result.out, "survived\n");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_result_crosses_a_broker_restart() {
    result_crosses_a_broker_restart(BrokerKind::RabbitMq, 61730).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activemq_result_crosses_a_broker_restart() {
    result_crosses_a_broker_restart(BrokerKind::ActiveMq, 61740).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_of_256_mib_goes_both_ways_intact() {
    let mut w = world(BrokerKind::RabbitMq, |_| {}).await;
    let local_dir = tempfile::tempdir().unwrap();
    let source = local_dir.path().join("source.bin");
    write_pattern_file(&source, 256 * 1024 * 1024, 7);
    let remote = w.guest.files_dir.join("big.bin");
    let upload = Upload::new(&w.id, &source, remote.to_str().unwrap(), 1024 * 1024, 8);
    let (size, sha) = upload.run(&mut w.host).await.unwrap();
    assert_eq!(size, 256 * 1024 * 1024);
    assert_eq!(sha, sha256_file(&source));
    assert_eq!(
        sha256_file(&remote),
        sha,
        "the guest's file is the host's file"
    );

    let back = local_dir.path().join("back.bin");
    let done = download(
        &mut w.host,
        &Download {
            guest: &w.id,
            transfer_id: "get-big",
            remote: remote.to_str().unwrap(),
            local: &back,
            chunk_size: 1024 * 1024,
            window: 8,
        },
        None,
    )
    .await
    .unwrap()
    .expect("the download completes");
    assert_eq!(done.1, sha);
    let leftovers: Vec<_> = std::fs::read_dir(&w.guest.files_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "no partial file left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_allowed_roots_are_refused() {
    let mut w = world(BrokerKind::RabbitMq, |_| {}).await;
    let local_dir = tempfile::tempdir().unwrap();
    let source = local_dir.path().join("small.bin");
    write_pattern_file(&source, 1000, 1);
    let escape = format!("{}/../escaped.bin", w.guest.files_dir.display());
    for target in ["/etc/vmc-should-not-exist", escape.as_str()] {
        let failure = Upload::new(&w.id, &source, target, 65536, 4)
            .run(&mut w.host)
            .await
            .unwrap_err();
        assert_eq!(
            failure.code,
            FileErrorCode::OutsideAllowedRoots,
            "{target}: {failure:?}"
        );
        assert!(!std::path::Path::new(target).exists());
    }
    let back = local_dir.path().join("passwd");
    let failure = download(
        &mut w.host,
        &Download {
            guest: &w.id,
            transfer_id: "get-passwd",
            remote: "/etc/passwd",
            local: &back,
            chunk_size: 65536,
            window: 4,
        },
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(failure.code, FileErrorCode::OutsideAllowedRoots);
    let missing = format!("{}/missing.bin", w.guest.files_dir.display());
    let failure = download(
        &mut w.host,
        &Download {
            guest: &w.id,
            transfer_id: "get-missing",
            remote: &missing,
            local: &back,
            chunk_size: 65536,
            window: 4,
        },
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(failure.code, FileErrorCode::NotFound);
}

async fn transfer_resumes_after_a_broker_restart(kind: BrokerKind, port: u16) {
    init_logging();
    let broker = PrivateBroker::start(kind, "transfer", port);
    let mut w = world_on(kind, port, |_| {}).await;
    let local_dir = tempfile::tempdir().unwrap();
    let source = local_dir.path().join("source.bin");
    let size = 32 * 1024 * 1024;
    write_pattern_file(&source, size, 3);
    let remote = w.guest.files_dir.join("resumed.bin");
    let mut upload = Upload::new(&w.id, &source, remote.to_str().unwrap(), 256 * 1024, 8);
    assert_eq!(upload.begin(&mut w.host).await.unwrap(), 0);
    upload.pump(&mut w.host, size / 2).await.unwrap();
    let broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        broker.start_again();
        broker
    })
    .await
    .unwrap();
    // Ask again with the same transfer id: the guest resumes from what it holds.
    let offset = upload.begin(&mut w.host).await.unwrap();
    assert!(offset >= size / 2, "resumed at {offset}, not from scratch");
    let (_, sha) = upload.finish(&mut w.host).await.unwrap();
    assert_eq!(sha256_file(&remote), sha);
    assert_eq!(sha, sha256_file(&source));

    // Downloads resume the same way: stop half-way, then ask from where we are.
    let back = local_dir.path().join("back.bin");
    let partial = download(
        &mut w.host,
        &Download {
            guest: &w.id,
            transfer_id: "get-resumed",
            remote: remote.to_str().unwrap(),
            local: &back,
            chunk_size: 256 * 1024,
            window: 8,
        },
        Some(size / 2),
    )
    .await
    .unwrap();
    assert!(partial.is_none());
    let (_, sha_back) = download(
        &mut w.host,
        &Download {
            guest: &w.id,
            transfer_id: "get-resumed",
            remote: remote.to_str().unwrap(),
            local: &back,
            chunk_size: 256 * 1024,
            window: 8,
        },
        None,
    )
    .await
    .unwrap()
    .expect("the resumed download completes");
    assert_eq!(sha_back, sha);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_transfer_resumes_after_a_broker_restart() {
    transfer_resumes_after_a_broker_restart(BrokerKind::RabbitMq, 61750).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activemq_transfer_resumes_after_a_broker_restart() {
    transfer_resumes_after_a_broker_restart(BrokerKind::ActiveMq, 61760).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_status_is_answered_for_running_and_finished_commands() {
    use vmc_protocol::words::CommandPhase;
    let mut w = world(BrokerKind::RabbitMq, |_| {}).await;
    let cmd_id = w
        .start(sh(
            "echo working; i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done",
        ))
        .await;
    let id = cmd_id.clone();
    w.host
        .expect(
            PATIENCE,
            "the command's output",
            |e| matches!(&e.message, Message::CmdOutput { cmd_id, .. } if *cmd_id == id),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = query(&mut w, &cmd_id).await;
    assert_eq!(status.state, CommandPhase::Running);
    assert!(status.pid.is_some());
    assert_eq!(status.out_bytes, "working\n".len() as u64);
    assert!(
        status.usage.ru_utime + status.usage.ru_stime > 0.0,
        "live CPU time: {status:?}"
    );
    let cancel = Message::CmdCancel {
        cmd_id: cmd_id.clone(),
        grace_secs: None,
    };
    w.host.send_to(&w.id, &cancel).await;
    w.result_of(&cmd_id).await;
    assert_eq!(query(&mut w, &cmd_id).await.state, CommandPhase::Finished);
    assert_eq!(
        query(&mut w, "never-sent").await.state,
        CommandPhase::Unknown
    );
}

async fn query(w: &mut World, cmd_id: &str) -> vmc_protocol::words::CommandStatus {
    w.host
        .send_to(
            &w.id,
            &Message::CmdQuery {
                cmd_id: cmd_id.to_owned(),
            },
        )
        .await;
    let reply = w
        .host
        .expect(
            PATIENCE,
            "CMD_STATUS",
            |e| matches!(&e.message, Message::CmdStatus { cmd_id: c, .. } if c == cmd_id),
        )
        .await;
    let Message::CmdStatus { status, .. } = reply.message else {
        unreachable!()
    };
    status
}

#[test]
fn help_explains_every_setting_and_mistakes_are_named() {
    let binary = vmc_tests::agents::guest_binary();
    let help = std::process::Command::new(&binary)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    for key in vmc_guest::settings::KEYS {
        assert!(help.contains(key), "--help does not explain {key}");
    }
    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    assert!(
        version.starts_with("vmc-guest ") && version.contains("protocol 1"),
        "{version}"
    );

    let bad = std::process::Command::new(&binary)
        .env("VMC_BROKER", "stomp://127.0.0.1:61613")
        .env("VMC_ID", "has space")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("`id`"),
        "the bad setting is named: {stderr}"
    );
    let unknown = std::process::Command::new(&binary)
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}
