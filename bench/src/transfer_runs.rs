//! File transfer, and the scenarios repeated against ActiveMQ.
//!
//! For each broker: the host engine in-process (an actix System, unmanaged
//! backend) and a real `vmc-guest` process copy one file of pseudo-random bytes
//! each way (`copy_to_vm`, `copy_from_vm`: chunking, windowing, SHA-256 on both
//! ends, temp file and rename, all included), and in the same repetition the same
//! bytes go through the same broker raw ([`raw_stomp`], the broker's ceiling, at
//! the engine's own chunk size). Once, over the private sshd of [`ssh_peer`],
//! `scp` copies the same file both ways. On ActiveMQ the command round trip runs
//! too, with the same guest (RabbitMQ's is in `engine_runs`). Files live in a
//! temporary directory under `/var/tmp` (a disk, not a RAM-sized tmpfs), and the
//! guest's allowed root is a directory in it.

use crate::engine_runs;
use crate::raw_stomp;
use crate::report::Row;
use crate::ssh_peer::SshPeer;
use crate::{BenchError, Mode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmc_host::engine::presence::Presence;
use vmc_host::engine::transfer::sha256_file;
use vmc_host::engine::{Engine, EngineConfig};
use vmc_host::hypervisor::unmanaged::Unmanaged;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
use vmc_protocol::stomp::{BrokerAddress, SessionConfig};
use vmc_tests::agents::{GuestOptions, GuestProcess};

pub const TRANSFER: &str = "4. File transfer";

/// Raw chunks published but not yet consumed: enough that the window is not
/// what limits the raw figure.
const RAW_WINDOW: usize = 64;

/// A broker to run against.
#[derive(Clone, Copy, Debug)]
pub struct Broker {
    pub name: &'static str,
    pub port: u16,
}

/// Where the files are, removed when dropped.
#[derive(Debug)]
struct Workspace {
    dir: tempfile::TempDir,
    source: PathBuf,
    bytes: u64,
}

impl Workspace {
    fn create(bytes: u64) -> Result<Workspace, BenchError> {
        let base = Path::new("/var/tmp");
        let dir = tempfile::Builder::new()
            .prefix("vmc-bench-transfer-")
            .tempdir_in(if base.is_dir() {
                base.to_path_buf()
            } else {
                std::env::temp_dir()
            })
            .map_err(BenchError::io("creating the transfer directory"))?;
        for sub in ["guest", "host"] {
            std::fs::create_dir(dir.path().join(sub))
                .map_err(BenchError::io("creating the transfer directories"))?;
        }
        let source = dir.path().join("source.bin");
        write_noise(&source, bytes)?;
        // What the guest sends back in a download: the same bytes, on its side.
        std::fs::hard_link(&source, dir.path().join("guest/download.bin"))
            .or_else(|_| std::fs::copy(&source, dir.path().join("guest/download.bin")).map(drop))
            .map_err(BenchError::io("placing the file the guest sends"))?;
        Ok(Workspace { dir, source, bytes })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `bytes` of xorshift output: incompressible, and cheap to make.
fn write_noise(path: &Path, bytes: u64) -> Result<(), BenchError> {
    let file = std::fs::File::create(path).map_err(BenchError::io("creating the source file"))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])
            .map_err(BenchError::io("writing the source file"))?;
        left -= n as u64;
    }
    out.flush()
        .map_err(BenchError::io("writing the source file"))
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

fn size_label(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Runs the transfer scenario on every broker (and ActiveMQ's round trip); the
/// rows and the failures.
pub fn run(mode: &Mode, brokers: &[Broker]) -> (Vec<Row>, Vec<String>) {
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    let work = match Workspace::create(mode.transfer_bytes) {
        Ok(work) => work,
        Err(e) => return (rows, vec![format!("{TRANSFER}: {e}")]),
    };
    let scp = scp_rows(mode, &work).unwrap_or_else(|e| {
        let note = format!("scp could not run here: {e}");
        vec![
            Row::new(
                TRANSFER,
                "scp upload, private sshd (peer)",
                "throughput",
                "MB/s",
                &[],
            )
            .note(note.clone()),
            Row::new(
                TRANSFER,
                "scp download, private sshd (peer)",
                "throughput",
                "MB/s",
                &[],
            )
            .note(note),
        ]
    });
    for broker in brokers {
        let system = actix_rt::System::new();
        match system.block_on(on_broker(mode, *broker, &work, &scp)) {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => failures.push(format!("{TRANSFER} ({}): {e}", broker.name)),
        }
    }
    rows.extend(scp);
    (rows, failures)
}

fn scp_rows(mode: &Mode, work: &Workspace) -> Result<Vec<Row>, BenchError> {
    let peer = SshPeer::start()?;
    let remote = |path: PathBuf| format!("root@127.0.0.1:{}", path.display());
    let source = work.source.display().to_string();
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..mode.heavy_repetitions {
        let target = work.path("guest/scp-upload.bin");
        up.push(mb_per_s(
            work.bytes,
            peer.scp(&source, &remote(target.clone()))?,
        ));
        let _ = std::fs::remove_file(target);
        let target = work.path("host/scp-download.bin");
        let took = peer.scp(
            &remote(work.path("guest/download.bin")),
            &target.display().to_string(),
        )?;
        down.push(mb_per_s(work.bytes, took));
        let _ = std::fs::remove_file(target);
    }
    let note = format!(
        "{} each way over one ControlMaster connection to 127.0.0.1, default cipher, \
         sftp-server in sshd (internal-sftp), from and to disk",
        size_label(work.bytes)
    );
    Ok(vec![
        Row::new(
            TRANSFER,
            "scp upload, private sshd (peer)",
            "throughput",
            "MB/s",
            &up,
        )
        .note(note.clone()),
        Row::new(
            TRANSFER,
            "scp download, private sshd (peer)",
            "throughput",
            "MB/s",
            &down,
        )
        .note(note),
    ])
}

async fn on_broker(
    mode: &Mode,
    broker: Broker,
    work: &Workspace,
    scp: &[Row],
) -> Result<Vec<Row>, BenchError> {
    let prefix = crate::run_tag("transfer");
    let state = tempfile::tempdir().map_err(BenchError::io("creating the engine state dir"))?;
    let mut config = EngineConfig::new(
        HostId::new(format!("{prefix}-host"))
            .map_err(|e| BenchError::Api(format!("host id: {e}")))?,
        SessionConfig::new(BrokerAddress::tcp("127.0.0.1", broker.port))
            .with_credentials("guest", "guest"),
        state.path().to_path_buf(),
        Arc::new(Unmanaged),
    );
    config.destinations = Destinations::new(&prefix)
        .map_err(|e| BenchError::Api(format!("destination prefix: {e}")))?;
    let (chunk, window) = (config.chunk_size as usize, config.window as usize);
    let engine = Engine::start(config).await?;
    let mut options = GuestOptions::new(broker.port, &prefix, Some("xfer-0"));
    options.beacon_interval = 5.0;
    options.env.push((
        "VMC_ALLOWED_ROOTS".into(),
        work.path("guest").display().to_string(),
    ));
    let guest = GuestProcess::start(options);
    let result = measure(mode, broker, work, scp, &engine, chunk, window).await;
    drop(guest);
    engine.shutdown().await;
    result
}

async fn measure(
    mode: &Mode,
    broker: Broker,
    work: &Workspace,
    scp: &[Row],
    engine: &Engine,
    chunk: usize,
    window: usize,
) -> Result<Vec<Row>, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine
        .vm("xfer-0")
        .await
        .is_ok_and(|vm| vm.presence == Presence::Alive)
    {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: format!("the guest xfer-0 saying HELLO through {}", broker.name),
                secs: 30.0,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rows = Vec::new();
    if broker.name != "RabbitMQ" {
        let subject = format!("vmc engine (in-process) → guest process, {}", broker.name);
        rows.extend(engine_runs::round_trip(mode, engine, "xfer-0", &subject, broker.name).await?);
    }

    // One SHA-256 pass over the file (page cache warm), as the engine makes before an
    // upload and after a download: a part of each copy that no peer pays.
    let source = work.source.clone();
    let hashing = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        sha256_file(&source).map(|_| start.elapsed())
    })
    .await
    .map_err(|e| BenchError::Api(format!("hashing panicked: {e}")))?
    .map_err(BenchError::io("hashing the source file"))?;

    let bytes = work.bytes;
    let (mut raw, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
    let (mut up_stall, mut down_stall) = (Vec::new(), Vec::new());
    for _ in 0..mode.heavy_repetitions {
        let port = broker.port;
        let pushed = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(BenchError::io("starting a tokio runtime"))?;
            runtime.block_on(raw_stomp::push(port, bytes, chunk, RAW_WINDOW))
        })
        .await
        .map_err(|e| BenchError::Api(format!("the raw STOMP run panicked: {e}")))??;
        raw.push(mb_per_s(bytes, pushed));

        let remote = work.path("guest/upload.bin");
        let start = Instant::now();
        let copy = engine.copy_to_vm("xfer-0", work.source.clone(), remote.display().to_string());
        let (record, stall) = probing_stalls(engine, copy).await;
        let record = record?;
        up.push(mb_per_s(bytes, start.elapsed()));
        up_stall.push(crate::stats::ms(stall));
        check_size(record.size, bytes, "copy_to_vm")?;
        let landed = std::fs::metadata(&remote).map(|m| m.len()).ok();
        check_size(landed, bytes, "the guest's copy")?;
        let _ = std::fs::remove_file(&remote);

        let local = work.path("host/download.bin");
        let start = Instant::now();
        let copy = engine.copy_from_vm(
            "xfer-0",
            work.path("guest/download.bin").display().to_string(),
            local.clone(),
        );
        let (record, stall) = probing_stalls(engine, copy).await;
        let record = record?;
        down.push(mb_per_s(bytes, start.elapsed()));
        down_stall.push(crate::stats::ms(stall));
        check_size(record.size, bytes, "copy_from_vm")?;
        let landed = std::fs::metadata(&local).map(|m| m.len()).ok();
        check_size(landed, bytes, "the host's copy")?;
        let _ = std::fs::remove_file(&local);
    }

    let size = size_label(bytes);
    let raw_row = Row::new(
        TRANSFER,
        format!(
            "raw STOMP publisher → consumer, {} (peer: the broker's ceiling)",
            broker.name
        ),
        "throughput",
        "MB/s",
        &raw,
    )
    .note(format!(
        "{size} in {} KiB persistent, receipted, individually acked frames; up to \
         {RAW_WINDOW} frames unconsumed; no digest, no files",
        chunk >> 10
    ));
    let versus_scp = |values: &[f64], scp_subject: &str| {
        let ours = crate::stats::Spread::of(values).map(|s| s.median);
        let theirs = scp
            .iter()
            .find(|r| r.subject.starts_with(scp_subject))
            .and_then(|r| r.spread)
            .map(|s| s.median);
        match (ours, theirs) {
            (Some(o), Some(t)) if t > 0.0 => format!("; {:.2}× {scp_subject}", o / t),
            _ => String::new(),
        }
    };
    let note = format!(
        "{size}, chunk {} KiB, window {window}; includes SHA-256 on both ends (one pass \
         over the file takes {:.0} ms here; an upload hashes its file before the first chunk, \
         a download while it sends) and the guest's temp file + rename; files on disk",
        chunk >> 10,
        crate::stats::ms(hashing)
    );
    let stall_note = format!(
        "the longest the engine's thread did not run a probe that asks it for a VM every \
         {} ms during the copy (0 = never late)",
        STALL_PROBE.as_millis()
    );
    for (direction, values, stalls, scp_subject) in [
        (
            "vmc copy_to_vm, engine → guest process",
            &up,
            &up_stall,
            "scp upload",
        ),
        (
            "vmc copy_from_vm, guest process → engine",
            &down,
            &down_stall,
            "scp download",
        ),
    ] {
        let subject = format!("{direction}, {}", broker.name);
        rows.push(
            Row::new(TRANSFER, subject.clone(), "throughput", "MB/s", values)
                .note(format!("{note}{}", versus_scp(values, scp_subject)))
                .against(&raw_row),
        );
        rows.push(
            Row::new(TRANSFER, subject, "engine stall", "ms", stalls).note(stall_note.clone()),
        );
    }
    rows.push(raw_row);
    Ok(rows)
}

/// How often the stall probe asks the engine for a VM.
const STALL_PROBE: Duration = Duration::from_millis(20);

/// Awaits `copy` while a task on the engine's own thread asks the engine for a VM
/// every [`STALL_PROBE`]; returns the copy's outcome and how much later than due
/// the probe's worst round came back (a blocked thread delays every task on it).
async fn probing_stalls<T>(
    engine: &Engine,
    copy: impl std::future::Future<Output = T>,
) -> (T, Duration) {
    let done = std::rc::Rc::new(std::cell::Cell::new(false));
    let probe = {
        let (engine, done) = (engine.clone(), done.clone());
        actix_rt::spawn(async move {
            let mut worst = Duration::ZERO;
            while !done.get() {
                let round = Instant::now();
                tokio::time::sleep(STALL_PROBE).await;
                let _ = engine.vm("xfer-0").await;
                worst = worst.max(round.elapsed().saturating_sub(STALL_PROBE));
            }
            worst
        })
    };
    let outcome = copy.await;
    done.set(true);
    (outcome, probe.await.unwrap_or_default())
}

fn check_size(got: Option<u64>, want: u64, what: &str) -> Result<(), BenchError> {
    if got == Some(want) {
        Ok(())
    } else {
        Err(BenchError::Api(format!(
            "{what} recorded {got:?} bytes, not {want}"
        )))
    }
}
