//! The host agent's engine through its library API, with real `vmc-guest` processes
//! as unmanaged guests and the real RabbitMQ: presence, commands, fan-out, cancel,
//! lost-guest detection, and records surviving an abrupt end of the host agent.

use std::sync::Arc;
use std::time::Duration;
use vmc_host::engine::presence::Presence;
use vmc_host::engine::{Engine, EngineConfig, EngineError, EngineEvent};
use vmc_host::hypervisor::unmanaged::Unmanaged;
use vmc_host::hypervisor::HypervisorError;
use vmc_host::store::CommandState;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
use vmc_protocol::words::CommandSpec;
use vmc_tests::agents::{GuestOptions, GuestProcess};
use vmc_tests::{init_logging, shared_broker, unique_name, wait_until, BrokerKind};

const PATIENCE: Duration = Duration::from_secs(30);
const BEACON: f64 = 0.3;

fn config(prefix: &str, state_dir: &std::path::Path) -> EngineConfig {
    let port = shared_broker(BrokerKind::RabbitMq);
    let mut config = EngineConfig::new(
        HostId::new(format!("h{}", std::process::id())).unwrap(),
        BrokerKind::RabbitMq.session_config(port),
        state_dir.to_path_buf(),
        Arc::new(Unmanaged),
    );
    config.destinations = Destinations::new(prefix).unwrap();
    config.beacon_interval = Duration::from_secs_f64(BEACON);
    config
}

fn guest(prefix: &str, id: &str) -> GuestProcess {
    let port = shared_broker(BrokerKind::RabbitMq);
    let mut options = GuestOptions::new(port, prefix, Some(id));
    options.beacon_interval = BEACON;
    GuestProcess::start(options)
}

fn sh(script: &str) -> CommandSpec {
    let mut spec = CommandSpec::new("/bin/sh");
    spec.args = vec!["-c".into(), script.into()];
    spec
}

async fn presence_of(engine: &Engine, vm: &str) -> Option<Presence> {
    engine.vm(vm).await.ok().map(|v| v.presence)
}

async fn wait_presence(engine: &Engine, vm: &str, wanted: Presence) {
    wait_until(
        PATIENCE,
        &format!("{vm} to be {}", wanted.as_str()),
        || async { presence_of(engine, vm).await == Some(wanted) },
    )
    .await;
}

fn prefix() -> String {
    unique_name("vmchost").replace('.', "-")
}

/// An engine on its own prefix and state directory, and one real guest it sees
/// alive.
struct Rig {
    engine: Engine,
    guest: GuestProcess,
    dir: tempfile::TempDir,
}

async fn rig(guest_id: &str, tune: impl FnOnce(&mut EngineConfig)) -> Rig {
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&prefix, dir.path());
    tune(&mut config);
    let engine = Engine::start(config).await.unwrap();
    let guest = guest(&prefix, guest_id);
    wait_presence(&engine, guest_id, Presence::Alive).await;
    Rig { engine, guest, dir }
}

async fn wait_state(engine: &Engine, cmd_id: &str, wanted: CommandState) {
    wait_until(
        PATIENCE,
        &format!("{cmd_id} to be {}", wanted.as_str()),
        || async {
            engine
                .command(cmd_id)
                .map(|r| r.state == wanted)
                .unwrap_or(false)
        },
    )
    .await;
}

#[actix_rt::test]
async fn unmanaged_guest_runs_commands_and_refuses_lifecycle_calls() {
    let Rig {
        engine,
        guest: _guest,
        dir: _dir,
    } = rig("box-1", |_| {}).await;
    let view = engine.vm("box-1").await.unwrap();
    assert_eq!(view.backend, "unmanaged");
    assert_eq!(view.guest.as_ref().map(|g| g.id.as_str()), Some("box-1"));

    let mut events = engine.events();
    let cmd_id = engine
        .run_command("box-1", sh("echo hello; echo oops >&2; exit 4"))
        .await
        .unwrap();
    let record = engine.wait_command(&cmd_id, PATIENCE).await.unwrap();
    assert_eq!(record.state, CommandState::Finished);
    let result = record
        .result
        .clone()
        .expect("a finished command has its result");
    assert_eq!(
        (
            result.out.as_str(),
            result.err.as_str(),
            result.exit_code_or_signal
        ),
        ("hello\n", "oops\n", 4)
    );
    // Callers can follow the command live instead of polling.
    let (mut saw_output, mut saw_finished) = (false, false);
    while let Ok(event) = events.try_recv() {
        match event {
            EngineEvent::Output {
                cmd_id: c, data, ..
            } if c == cmd_id => saw_output |= data.as_ref() == b"hello\n",
            EngineEvent::Command {
                cmd_id: c,
                state: CommandState::Finished,
                ..
            } if c == cmd_id => saw_finished = true,
            _ => {}
        }
    }
    assert!(
        saw_output && saw_finished,
        "output and completion events were sent"
    );
    // Results are not read-once: asking again gives the same answer.
    assert_eq!(engine.command(&cmd_id).unwrap().result, Some(result));
    assert_eq!(
        engine
            .store()
            .read_output(&cmd_id, vmc_protocol::words::OutputStream::Out, 0, 1 << 20)
            .unwrap(),
        b"hello\n"
    );

    let rtt = engine.ping("box-1", Duration::from_secs(5)).await.unwrap();
    assert!(rtt < Duration::from_secs(5));

    match engine
        .lifecycle("box-1", vmc_host::engine::vm::LifecycleOp::Pause)
        .await
    {
        Err(EngineError::Hypervisor(HypervisorError::NotSupported { .. })) => {}
        other => panic!("pause of an unmanaged guest: {other:?}"),
    }
    assert!(matches!(
        engine.vm("nope").await,
        Err(EngineError::UnknownVm(_))
    ));
    assert!(matches!(
        engine.run_command("nope", sh("true")).await,
        Err(EngineError::UnknownVm(_))
    ));
    engine.shutdown().await;
}

#[actix_rt::test]
async fn fan_out_to_twenty_guests_and_cancel() {
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(&prefix, dir.path())).await.unwrap();
    let guests: Vec<GuestProcess> = (0..20)
        .map(|n| guest(&prefix, &format!("fan-{n:02}")))
        .collect();
    let _other = guest(&prefix, "other-1");
    for n in 0..20 {
        wait_presence(&engine, &format!("fan-{n:02}"), Presence::Alive).await;
    }
    wait_presence(&engine, "other-1", Presence::Alive).await;

    let fanout = engine
        .run_multicast("fan-*", sh("echo from $(hostname)"))
        .await
        .unwrap();
    assert_eq!(
        fanout.commands.len(),
        20,
        "one command per matching VM, none for other-1"
    );
    for record in &fanout.commands {
        let done = engine.wait_command(&record.cmd_id, PATIENCE).await.unwrap();
        assert_eq!(done.state, CommandState::Finished, "{done:?}");
        assert_eq!(done.fanout_id.as_deref(), Some(fanout.fanout_id.as_str()));
    }

    let cmd_id = engine.run_command("fan-00", sh("sleep 60")).await.unwrap();
    wait_state(&engine, &cmd_id, CommandState::Running).await;
    let details = engine.command_details(&cmd_id).await.unwrap();
    assert!(
        details.live.is_some_and(|s| s.pid.is_some()),
        "live details of a running command"
    );
    engine.cancel_command(&cmd_id).await.unwrap();
    let record = engine.wait_command(&cmd_id, PATIENCE).await.unwrap();
    assert_eq!(record.state, CommandState::Cancelled);
    drop(guests);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_killed_guest_turns_suspect_then_lost_and_bye_means_gone() {
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(&prefix, dir.path())).await.unwrap();
    let mut killed = guest(&prefix, "doomed");
    let mut polite = guest(&prefix, "polite");
    wait_presence(&engine, "doomed", Presence::Alive).await;
    wait_presence(&engine, "polite", Presence::Alive).await;
    killed.kill();
    wait_presence(&engine, "doomed", Presence::Suspect).await;
    wait_presence(&engine, "doomed", Presence::Lost).await;
    polite.terminate();
    wait_presence(&engine, "polite", Presence::Gone).await;
    engine.shutdown().await;
}

/// Runs an engine on its own actix system in a thread until told to die, then
/// drops everything at once, as a crash of the host agent would.
fn engine_in_thread(
    config: EngineConfig,
    work: impl FnOnce(Engine) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
        + Send
        + 'static,
) {
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let engine = Engine::start(config).await.unwrap();
            work(engine).await;
            // Returning drops the system with every actor mid-flight: no shutdown.
        });
    })
    .join()
    .unwrap();
}

#[test]
fn records_survive_an_abrupt_end_of_the_host_agent() {
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let _guest = guest(&prefix, "durable-1");
    let finished = Arc::new(std::sync::Mutex::new(String::new()));
    let in_flight = Arc::new(std::sync::Mutex::new(String::new()));
    let (f, i) = (finished.clone(), in_flight.clone());
    engine_in_thread(config(&prefix, dir.path()), move |engine| {
        Box::pin(async move {
            wait_presence(&engine, "durable-1", Presence::Alive).await;
            let done = engine
                .run_command("durable-1", sh("echo before"))
                .await
                .unwrap();
            engine.wait_command(&done, PATIENCE).await.unwrap();
            *f.lock().unwrap() = done;
            let running = engine
                .run_command("durable-1", sh("sleep 2; echo during"))
                .await
                .unwrap();
            wait_until(PATIENCE, "the command to be sent", || async {
                engine
                    .command(&running)
                    .map(|r| r.state != CommandState::Queued)
                    .unwrap_or(false)
            })
            .await;
            *i.lock().unwrap() = running;
        })
    });
    let (finished, in_flight) = (
        finished.lock().unwrap().clone(),
        in_flight.lock().unwrap().clone(),
    );
    engine_in_thread(config(&prefix, dir.path()), move |engine| {
        Box::pin(async move {
            let before = engine.command(&finished).unwrap();
            assert_eq!(
                before.result.unwrap().out,
                "before\n",
                "a finished result survives"
            );
            let during = engine.wait_command(&in_flight, PATIENCE).await.unwrap();
            assert_eq!(during.state, CommandState::Finished);
            assert_eq!(
                during.result.unwrap().out,
                "during\n",
                "the in-flight command's result arrives"
            );
            let vm = engine.vm("durable-1").await.unwrap();
            assert_eq!(vm.backend, "unmanaged", "the guest's VM record survives");
            engine.shutdown().await;
        })
    });
}

#[actix_rt::test]
async fn crashed_vm_actor_is_restarted_from_the_store() {
    let Rig {
        engine,
        guest: _guest,
        dir: _dir,
    } = rig("phoenix", |_| {}).await;
    engine.crash_vm_actor("phoenix").await.unwrap();
    // The supervisor restarts the actor with its state reloaded; it keeps working.
    wait_presence(&engine, "phoenix", Presence::Alive).await;
    let cmd_id = engine
        .run_command("phoenix", sh("echo still here"))
        .await
        .unwrap();
    let record = engine.wait_command(&cmd_id, PATIENCE).await.unwrap();
    assert_eq!(record.result.unwrap().out, "still here\n");
    engine.shutdown().await;
}

#[actix_rt::test]
async fn files_go_both_ways_through_the_engine() {
    let Rig { engine, guest, dir } = rig("files-1", |_| {}).await;
    let local = dir.path().join("payload.bin");
    vmc_tests::transfer::write_pattern_file(&local, 20 * 1024 * 1024 + 123, 9);
    let remote = guest.files_dir.join("payload.bin");
    let sent = engine
        .copy_to_vm("files-1", local.clone(), remote.display().to_string())
        .await
        .unwrap();
    let sha = vmc_tests::transfer::sha256_file(&local);
    assert_eq!(sent.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(vmc_tests::transfer::sha256_file(&remote), sha);
    let back = dir.path().join("back.bin");
    let got = engine
        .copy_from_vm("files-1", remote.display().to_string(), back.clone())
        .await
        .unwrap();
    assert_eq!(got.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(vmc_tests::transfer::sha256_file(&back), sha);
    let refused = engine
        .copy_to_vm("files-1", local.clone(), "/etc/vmc-nope".into())
        .await;
    match refused {
        Err(EngineError::Transfer { code, .. }) => {
            assert_eq!(
                code,
                vmc_protocol::words::FileErrorCode::OutsideAllowedRoots
            )
        }
        other => panic!("a path outside the roots: {other:?}"),
    }
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_host_that_starts_after_its_guests_learns_who_they_are_at_once() {
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    // Beacons every 2 s: the guests' own periodic HELLO would come only after 60 s.
    let beacon = 2.0;
    let port = shared_broker(BrokerKind::RabbitMq);
    let guests: Vec<GuestProcess> = ["early-1", "early-2"]
        .into_iter()
        .map(|id| {
            let mut options = GuestOptions::new(port, &prefix, Some(id));
            options.beacon_interval = beacon;
            GuestProcess::start(options)
        })
        .collect();
    // Their start-up HELLOs go to a topic nobody listens to yet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut config = config(&prefix, dir.path());
    config.beacon_interval = Duration::from_secs_f64(beacon);
    let engine = Engine::start(config).await.unwrap();
    let known = |vm: &'static str| {
        let engine = engine.clone();
        async move {
            engine
                .vm(vm)
                .await
                .ok()
                .and_then(|v| v.guest)
                .is_some_and(|g| g.id.as_str() == vm && !g.agent_version.is_empty())
        }
    };
    for vm in ["early-1", "early-2"] {
        wait_until(
            Duration::from_secs(5),
            &format!("{vm}'s HELLO details after the host started"),
            || known(vm),
        )
        .await;
    }
    // A VM actor restarted from the store has lost them: the next beacon of its
    // guest makes the host ask that guest again.
    engine.crash_vm_actor("early-1").await.unwrap();
    wait_until(
        Duration::from_secs(3 * beacon as u64),
        "early-1's HELLO details again after its actor restarted",
        || known("early-1"),
    )
    .await;
    drop(guests);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_vm_another_backend_made_is_refused_with_the_backend_to_run() {
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    // A state directory that a QEMU host agent used, opened by one that runs another
    // backend (here the unmanaged one).
    {
        let store = vmc_host::store::Store::open_in(dir.path()).unwrap();
        let definition = vmc_host::hypervisor::VmDefinition {
            spec: vmc_host::hypervisor::VmSpec::new("old-qemu-vm"),
            backend: "qemu".into(),
            mac: "52:54:00:00:00:01".into(),
            dir: dir.path().join("qemu/vms/old-qemu-vm"),
        };
        store
            .put_vm(&vmc_host::store::VmRecord::from_definition(
                &definition,
                chrono::Utc::now(),
            ))
            .unwrap();
    }
    let engine = Engine::start(config(&prefix, dir.path())).await.unwrap();
    let err = engine
        .lifecycle("old-qemu-vm", vmc_host::engine::vm::LifecycleOp::Start)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Hypervisor(HypervisorError::WrongBackend { .. })
        ),
        "{err:?}"
    );
    let text = vmc_protocol::agent_main::error_chain(&err);
    assert!(text.contains("VMC_BACKEND=qemu"), "{text}");
    // Still listed, its state honestly unknown.
    let view = engine.vm("old-qemu-vm").await.unwrap();
    assert_eq!(
        (view.backend.as_str(), view.state.as_str()),
        ("qemu", "Unknown")
    );
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_crashed_command_actor_is_restarted_and_its_callers_get_the_result() {
    let Rig {
        engine,
        guest: _guest,
        dir,
    } = rig("phoenix-cmd", |_| {}).await;
    let runs = dir.path().join("runs");
    let cmd_id = engine
        .run_command(
            "phoenix-cmd",
            sh(&format!(
                "echo run >> '{}'; sleep 1; echo survived",
                runs.display()
            )),
        )
        .await
        .unwrap();
    wait_state(&engine, &cmd_id, CommandState::Running).await;
    // A caller already waiting when the actor crashes.
    let waiting = {
        let (engine, cmd_id) = (engine.clone(), cmd_id.clone());
        actix_rt::spawn(async move { engine.wait_command(&cmd_id, PATIENCE).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    engine.crash_command_actor(&cmd_id).await.unwrap();
    let record = waiting.await.unwrap().unwrap();
    assert_eq!(record.state, CommandState::Finished, "{record:?}");
    assert_eq!(record.result.unwrap().out, "survived\n");
    // The restarted actor asked the guest again: it still ran the command once.
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_transfer_whose_actor_has_gone_is_answered_from_the_store() {
    let Rig { engine, guest, dir } = rig("files-linger", |config| {
        config.linger = Duration::from_millis(200)
    })
    .await;
    let local = dir.path().join("small.bin");
    vmc_tests::transfer::write_pattern_file(&local, 100_000, 3);
    let remote = guest.files_dir.join("small.bin");
    let sent = engine
        .copy_to_vm("files-linger", local, remote.display().to_string())
        .await
        .unwrap();
    // Well past the actor's stay after the end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = engine.wait_transfer(&sent.transfer_id).await.unwrap();
    assert_eq!(again.sha256, sent.sha256);
    assert_eq!(again.state, vmc_host::store::TransferState::Done);
    engine.shutdown().await;
}

#[test]
fn a_transfer_cut_by_an_abrupt_end_of_the_host_agent_fails_clearly_after_restart() {
    use vmc_host::store::{TransferDirection, TransferState};
    init_logging();
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let guest = guest(&prefix, "files-cut");
    let remote = guest.files_dir.join("big.bin");
    vmc_tests::transfer::write_pattern_file(&remote, 64 * 1024 * 1024, 5);
    let local = dir.path().join("big.bin");
    let transfer_id = Arc::new(std::sync::Mutex::new(String::new()));
    let slow = |prefix: &str, dir: &std::path::Path| {
        // Small chunks, one at a time: slow enough to be cut mid-way.
        let mut config = config(prefix, dir);
        config.chunk_size = 16 * 1024;
        config.window = 1;
        config
    };
    let (id, target) = (transfer_id.clone(), local.clone());
    engine_in_thread(slow(&prefix, dir.path()), move |engine| {
        Box::pin(async move {
            wait_presence(&engine, "files-cut", Presence::Alive).await;
            let started = engine
                .start_transfer(
                    "files-cut",
                    TransferDirection::FromGuest,
                    target,
                    remote.display().to_string(),
                )
                .await
                .unwrap();
            wait_until(PATIENCE, "some bytes to arrive", || async {
                engine
                    .transfer(&started)
                    .map(|t| t.bytes_done > 0)
                    .unwrap_or(false)
            })
            .await;
            *id.lock().unwrap() = started;
        })
    });
    let transfer_id = transfer_id.lock().unwrap().clone();
    let part = vmc_host::engine::transfer::part_path(&local, &transfer_id);
    assert!(
        part.exists(),
        "the partial download is there after the crash"
    );
    let dir_path = dir.path().to_path_buf();
    engine_in_thread(slow(&prefix, &dir_path), move |engine| {
        Box::pin(async move {
            let record = engine.transfer(&transfer_id).unwrap();
            assert_eq!(record.state, TransferState::Failed, "{record:?}");
            let error = record.error.unwrap_or_default();
            assert!(
                error.starts_with("io: the host agent stopped"),
                "the reason says what happened: {error}"
            );
            match engine.wait_transfer(&transfer_id).await {
                Err(EngineError::Transfer { code, .. }) => {
                    assert_eq!(code, vmc_protocol::words::FileErrorCode::Io)
                }
                other => panic!("waiting for the cut transfer: {other:?}"),
            }
            wait_until(PATIENCE, "the partial download to be removed", || async {
                !part.exists()
            })
            .await;
            assert!(!local.exists(), "no half file in place of the target");
            engine.shutdown().await;
        })
    });
    drop(guest);
}
