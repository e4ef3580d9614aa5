//! Scenario 1 inside a QEMU VM: the command round trip to a `vmc-guest` that runs
//! in a VM booted from the guest image, side by side with qemu-guest-agent's
//! `guest-exec` + `guest-exec-status` in the same VM.
//!
//! The image is `deploy/guest-image/build.sh` with `VMC_IMAGE_WITH_QGA=1`, into
//! `<target>/tmp/guest-image-qga` (cached by its inputs like the tests' image).
//! A real `vmc-host` (QEMU backend, its own state directory, destination prefix and
//! loopback port, beacon interval 1 s, as `tests/vm/run.sh` starts one) creates and
//! starts one VM from it through the JSON API and waits for its guest to be
//! `alive`. Then, sequentially: `POST /api/v1/vms/{vm}/commands {"cmd": "/bin/true"}`
//! (the peer's program, named the same way: no `PATH` search on either side)
//! and `GET /api/v1/commands/{id}/result?wait=30` (the host answers the second as
//! soon as the result is in: no polling), timed until the result is read; and over
//! the VM's `qga.sock` (the host end of the virtio-serial port
//! `org.qemu.guest_agent.0`, QEMU's chardev), `guest-exec {"path": "/bin/true"}`
//! and `guest-exec-status` polled every [`QGA_POLL`] until `exited`, timed until
//! that answer is read. One call of each is made first and not counted (the first
//! exec pages in the binaries).
//!
//! Scenario 4 in the same VM: the same incompressible bytes (from this process's
//! memory) into the guest's data disk with `PUT /api/v1/vms/{vm}/files` (the host
//! stages the body, then copies it to the guest through the broker; the answer
//! comes once the guest checked size and SHA-256 and renamed its synced file), and
//! with qemu-guest-agent's `guest-file-open`/`guest-file-write` (base64 pieces of
//! [`QGA_CHUNK`])/`guest-file-close`. Each landed file is checked with
//! `sha256sum` in the guest, untimed, and removed.
//!
//! Everything it started ends with it: the VM's QEMU (a daemon) by its pid file,
//! then the host. What it does not do: install QEMU (a machine without
//! `qemu-system-x86_64` gets rows that say so).

use crate::engine_runs::ROUND_TRIP;
use crate::http_client::HttpConnection;
use crate::report::Row;
use crate::stats::{ms, percentile};
use crate::transfer_runs::TRANSFER;
use crate::{BenchError, Mode};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmc_host::engine::transfer::sha256_file;

/// How often `guest-exec-status` is asked while the command runs.
pub const QGA_POLL: Duration = Duration::from_millis(1);
/// The VM's name (a short one: QEMU's sockets live in a directory named after it).
const VM: &str = "rt-vm";
/// Boots under TCG on a busy two-core machine take seconds; give them minutes.
const BOOT_PATIENCE: Duration = Duration::from_secs(240);
const SUBJECT_VMC: &str = "vmc-host JSON API → guest in a QEMU VM";
const SUBJECT_QGA: &str = "qemu-guest-agent in the same VM (peer)";
const SUBJECT_UPLOAD: &str = "vmc upload → guest in a QEMU VM";
const SUBJECT_QGA_WRITE: &str = "qemu-guest-agent guest-file-write (peer)";
/// The bytes of each `guest-file-write` (before base64; the agent takes up to
/// about 48 MiB per call).
pub const QGA_CHUNK: usize = 4 << 20;
/// Where both file transfers land: the guest's data disk (ext4 on virtio-blk),
/// one of its allowed roots.
const GUEST_DIR: &str = "/data";

/// Calls per repetition and repetitions: a VM is slow, so fewer than the
/// process guest's round trips.
fn sizes(mode: &Mode) -> (usize, usize) {
    if mode.name == "short" {
        (20, 1)
    } else {
        (200, 3)
    }
}

/// Runs the scenario; its rows (the vmc rows compared with the qga peer) and the
/// failures.
pub fn run(mode: &Mode, broker_port: u16, host_bin: &Path, root: &Path) -> (Vec<Row>, Vec<String>) {
    let not_measured = |why: &str| {
        let transfer = [SUBJECT_UPLOAD, SUBJECT_QGA_WRITE]
            .map(|s| Row::new(TRANSFER, s, "throughput", "MB/s", &[]).note(why));
        [SUBJECT_VMC, SUBJECT_QGA]
            .iter()
            .flat_map(|s| ["p50", "p99"].map(|f| Row::new(ROUND_TRIP, *s, f, "ms", &[]).note(why)))
            .chain(transfer)
            .collect::<Vec<_>>()
    };
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_qemu {
        return (
            not_measured("qemu-system-x86_64 is not installed here (deploy/qemu/install.sh)"),
            Vec::new(),
        );
    }
    let mut failures = Vec::new();
    match scenario(mode, broker_port, host_bin, root, &mut failures) {
        Ok(rows) => (rows, failures),
        Err(e) => {
            failures.push(format!("{ROUND_TRIP} (QEMU VM): {e}"));
            (Vec::new(), failures)
        }
    }
}

fn scenario(
    mode: &Mode,
    broker_port: u16,
    host_bin: &Path,
    root: &Path,
    failures: &mut Vec<String>,
) -> Result<Vec<Row>, BenchError> {
    let image = build_image(root)?;
    let lab = VmHost::start(host_bin, broker_port)?;
    let mut api = lab.api()?;
    let booted = Instant::now();
    let (status, body) = api.json(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": VM, "image": image})),
    )?;
    expect(status, 201, "createVM", &body)?;
    let (status, body) = api.json("POST", &format!("/api/v1/vms/{VM}/actions/start"), None)?;
    expect(status, 200, "start", &body)?;
    wait_for(&format!("{VM} to be alive"), BOOT_PATIENCE, || {
        let (status, vm) = api.json("GET", &format!("/api/v1/vms/{VM}"), None)?;
        Ok(status == 200 && vm["presence"] == "alive")
    })?;
    let boot_secs = booted.elapsed().as_secs_f64();
    let accel = lab.accelerator();
    eprintln!("vmc-bench: {VM} ({accel}) alive {boot_secs:.1} s after createVM");

    let (calls, repetitions) = sizes(mode);
    let mut qga = GuestAgent::connect(&lab.vm_dir().join("qga.sock"))?;
    vmc_call(&mut api)?;
    qga.exec_true()?;
    let (mut ours, mut peer) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for _ in 0..repetitions {
        // A fresh connection each time: the server closes one left idle while the
        // peer is measured (its keep-alive timeout is 5 s).
        api = lab.api()?;
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            samples.push(vmc_call(&mut api)?);
        }
        ours.0.push(ms(percentile(&samples, 0.5)));
        ours.1.push(ms(percentile(&samples, 0.99)));
        samples.clear();
        for _ in 0..calls {
            samples.push(qga.exec_true()?);
        }
        peer.0.push(ms(percentile(&samples, 0.5)));
        peer.1.push(ms(percentile(&samples, 0.99)));
    }
    let vm_note = format!(
        "{accel}, 1 vCPU; booted to alive in {boot_secs:.0} s; {calls} sequential calls per \
         repetition, one warm-up call first"
    );
    let qga_p50 = Row::new(ROUND_TRIP, SUBJECT_QGA, "p50", "ms", &peer.0).note(format!(
        "guest-exec /bin/true + guest-exec-status every {} ms until exited, over qga.sock; {vm_note}",
        QGA_POLL.as_millis()
    ));
    let qga_p99 =
        Row::new(ROUND_TRIP, SUBJECT_QGA, "p99", "ms", &peer.1).note(qga_p50.note.clone());
    let vmc_note = format!(
        "POST /api/v1/vms/{{vm}}/commands {{\"cmd\": \"/bin/true\"}} + GET .../result?wait=30, one \
         keep-alive connection, RabbitMQ; {vm_note}"
    );
    let mut rows = vec![
        Row::new(ROUND_TRIP, SUBJECT_VMC, "p50", "ms", &ours.0)
            .note(vmc_note.clone())
            .against(&qga_p50),
        Row::new(ROUND_TRIP, SUBJECT_VMC, "p99", "ms", &ours.1)
            .note(vmc_note)
            .against(&qga_p99),
        qga_p50,
        qga_p99,
    ];
    let vm_note = format!("{accel}, 1 vCPU, 256 MiB");
    match file_transfer(mode, &lab, &mut qga, &vm_note) {
        Ok(mut more) => rows.append(&mut more),
        Err(e) => failures.push(format!("{TRANSFER} (QEMU VM): {e}")),
    }
    Ok(rows)
}

/// Bytes per transfer and repetitions.
fn transfer_sizes(mode: &Mode) -> (usize, usize) {
    if mode.name == "short" {
        (8 << 20, 1)
    } else {
        (64 << 20, 3)
    }
}

/// The same bytes into the VM's data disk both ways, each checked there with
/// `sha256sum` afterwards (not timed) and removed: `PUT /api/v1/vms/{vm}/files`
/// (the host stages the body, copies it through the broker, the guest writes a
/// temporary file, checks size and SHA-256, syncs and renames; the answer comes
/// after that), then `guest-file-open`/`guest-file-write`/`guest-file-close`.
fn file_transfer(
    mode: &Mode,
    lab: &VmHost,
    qga: &mut GuestAgent,
    vm_note: &str,
) -> Result<Vec<Row>, BenchError> {
    let (bytes, repetitions) = transfer_sizes(mode);
    let data = noise(bytes);
    let source = lab.dir.path().join("upload.bin");
    std::fs::write(&source, &data).map_err(BenchError::io("writing the file to upload"))?;
    let (_, sha256) = sha256_file(&source).map_err(BenchError::io("hashing the file to upload"))?;
    let (ours_at, theirs_at) = (
        format!("{GUEST_DIR}/vmc-upload.bin"),
        format!("{GUEST_DIR}/qga-write.bin"),
    );
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..repetitions {
        let mut api = lab.api()?;
        let start = Instant::now();
        let (status, answer) = api.0.request(
            "PUT",
            &format!("/api/v1/vms/{VM}/files?path={ours_at}"),
            Some(("application/octet-stream", &data)),
        )?;
        let took = start.elapsed();
        if status != 200 {
            return Err(BenchError::Api(format!(
                "the upload answered {status}: {}",
                String::from_utf8_lossy(&answer)
            )));
        }
        ours.push(mb_per_s(bytes, took));
        check_in_guest(lab, &ours_at, &sha256)?;

        let took = qga.write_file(&theirs_at, &data)?;
        peer.push(mb_per_s(bytes, took));
        check_in_guest(lab, &theirs_at, &sha256)?;
    }
    let size = format!("{} MiB", bytes >> 20);
    let qga_row = Row::new(TRANSFER, SUBJECT_QGA_WRITE, "throughput", "MB/s", &peer).note(format!(
        "{size} from this process's memory to {theirs_at} (ext4 on virtio-blk): \
             guest-file-open \"w\", guest-file-write of {} KiB pieces (base64), \
             guest-file-close, over qga.sock; no digest, no sync; {vm_note}; {repetitions} \
             repetition(s), each checked with sha256sum in the guest afterwards",
        QGA_CHUNK >> 10
    ));
    let vmc_row = Row::new(TRANSFER, SUBJECT_UPLOAD, "throughput", "MB/s", &ours)
        .note(format!(
            "{size} from this process's memory in one PUT /api/v1/vms/{{vm}}/files?path=\
             {ours_at} until its answer, RabbitMQ: the host stages the body, the guest \
             (through QEMU user networking to the broker) writes a temporary file, checks \
             SHA-256, syncs and renames; {vm_note}; {repetitions} repetition(s), each checked \
             with sha256sum in the guest afterwards"
        ))
        .against(&qga_row);
    Ok(vec![vmc_row, qga_row])
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// `bytes` of xorshift output: incompressible, and cheap to make.
fn noise(bytes: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut data = Vec::with_capacity(bytes + 8);
    while data.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(bytes);
    data
}

/// `sha256sum path` in the guest (through vmc) must print `sha256`; then the file
/// is removed.
fn check_in_guest(lab: &VmHost, path: &str, sha256: &str) -> Result<(), BenchError> {
    let mut api = lab.api()?;
    let result = guest_command(&mut api, "sha256sum", &[path])?;
    let printed = result["out"].as_str().unwrap_or_default();
    guest_command(&mut api, "rm", &["-f", path])?;
    if printed.split_whitespace().next() == Some(sha256) {
        Ok(())
    } else {
        Err(BenchError::Api(format!(
            "{path} in the guest is not what was sent: sha256sum printed {printed:?}, \
             expected {sha256}"
        )))
    }
}

/// Runs `cmd args` in the VM through the JSON API; its result, when it exited 0.
fn guest_command(api: &mut JsonApi, cmd: &str, args: &[&str]) -> Result<Value, BenchError> {
    let (status, command) = api.json(
        "POST",
        &format!("/api/v1/vms/{VM}/commands"),
        Some(json!({"cmd": cmd, "args": args})),
    )?;
    expect(status, 202, cmd, &command)?;
    let id = command["cmdId"]
        .as_str()
        .ok_or_else(|| BenchError::Api(format!("{cmd} answered no cmdId: {command}")))?;
    let (status, result) = api.json(
        "GET",
        &format!("/api/v1/commands/{id}/result?wait=50"),
        None,
    )?;
    expect(status, 200, cmd, &result)?;
    if result["exitCodeOrSignal"] != 0 {
        return Err(BenchError::Api(format!(
            "`{cmd}` in the VM ended: {result}"
        )));
    }
    Ok(result)
}

/// The qga guest image, built or found cached (the build's log goes to this
/// process's stderr: a first build takes minutes).
fn build_image(root: &Path) -> Result<PathBuf, BenchError> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let image = target.join("tmp/guest-image-qga");
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(root.join("deploy/guest-image/build.sh"))
        .arg(&image)
        .env("VMC_IMAGE_WITH_QGA", "1")
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(BenchError::io("running deploy/guest-image/build.sh"))?;
    if !status.success() {
        return Err(BenchError::Api(format!(
            "deploy/guest-image/build.sh {} failed ({status})",
            image.display()
        )));
    }
    eprintln!(
        "vmc-bench: guest image with qemu-guest-agent ready in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        image.display()
    );
    Ok(image)
}

/// Fails with the answer unless `status` is `want`.
fn expect(status: u16, want: u16, what: &str, body: &Value) -> Result<(), BenchError> {
    if status == want {
        Ok(())
    } else {
        Err(BenchError::Api(format!("{what} answered {status}: {body}")))
    }
}

/// Polls `done` every 200 ms until it holds; errors from it count as "not yet".
fn wait_for(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> Result<bool, BenchError>,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(true) = done() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: what.to_owned(),
                secs: within.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One `runCmd(vm, "/bin/true")` through the JSON API until its result is read.
fn vmc_call(api: &mut JsonApi) -> Result<Duration, BenchError> {
    let start = Instant::now();
    let (status, command) = api.json(
        "POST",
        &format!("/api/v1/vms/{VM}/commands"),
        Some(json!({"cmd": "/bin/true"})),
    )?;
    expect(status, 202, "runCmd", &command)?;
    let id = command["cmdId"]
        .as_str()
        .ok_or_else(|| BenchError::Api(format!("runCmd answered no cmdId: {command}")))?;
    let (status, result) = api.json(
        "GET",
        &format!("/api/v1/commands/{id}/result?wait=30"),
        None,
    )?;
    let elapsed = start.elapsed();
    expect(status, 200, "getCmdResults", &result)?;
    if result["exitCodeOrSignal"] != 0 {
        return Err(BenchError::Api(format!("`true` in the VM ended: {result}")));
    }
    Ok(elapsed)
}

/// A keep-alive connection to the JSON API.
struct JsonApi(HttpConnection);

impl JsonApi {
    fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), BenchError> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let (status, answer) = self.0.request(
            method,
            path,
            bytes.as_deref().map(|b| ("application/json", b)),
        )?;
        let value = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer).into_owned()))
        };
        Ok((status, value))
    }
}

/// A `vmc-host` with the QEMU backend in a state directory of its own; dropping
/// it kills the QEMU it launched (by the VM's pid file, when its command line
/// names our directory), then the host.
struct VmHost {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl VmHost {
    fn start(bin: &Path, broker_port: u16) -> Result<VmHost, BenchError> {
        if !bin.exists() {
            return Err(BenchError::MissingBinary(bin.display().to_string()));
        }
        let dir = tempfile::Builder::new()
            .prefix("vmc-bench-vm.")
            .tempdir()
            .map_err(BenchError::io("creating the host state dir"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::io("finding a free port"))?
            .port();
        let prefix = crate::run_tag("vm");
        let log = std::fs::File::create(dir.path().join("vmc-host.log"))
            .map_err(BenchError::io("creating the host's log"))?;
        let child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("VMC_HOST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("VMC_BACKEND", "qemu")
            .env("VMC_STATE_DIR", dir.path().join("host"))
            .env("VMC_LISTEN", format!("127.0.0.1:{port}"))
            .env("VMC_PREFIX", &prefix)
            .env("VMC_BROKER", format!("stomp://127.0.0.1:{broker_port}"))
            .env("VMC_LOGIN", "guest")
            .env("VMC_PASSCODE", "guest")
            .env("VMC_HOST_ID", format!("{prefix}-host"))
            .env("VMC_BEACON_INTERVAL", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(BenchError::io(format!("starting {}", bin.display())))?;
        let host = VmHost {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        wait_for(
            "the vmc-host API to answer",
            Duration::from_secs(30),
            || {
                let (status, _) = host.api()?.json("GET", "/api/v1/host", None)?;
                Ok(status == 200)
            },
        )?;
        Ok(host)
    }

    fn api(&self) -> Result<JsonApi, BenchError> {
        Ok(JsonApi(HttpConnection::connect(self.addr)?))
    }

    fn vm_dir(&self) -> PathBuf {
        self.dir.path().join("host/qemu/vms").join(VM)
    }

    /// The VM's QEMU pid, when its command line names our state directory (a
    /// reused pid is never taken for ours).
    fn qemu_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.vm_dir().join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = self.dir.path().to_string_lossy();
        String::from_utf8_lossy(&cmdline)
            .contains(&*ours)
            .then_some(pid)
    }

    /// The accelerator the VM's QEMU runs with (`-accel`), for the notes.
    fn accelerator(&self) -> String {
        let args = self
            .qemu_pid()
            .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .unwrap_or_default();
        let args: Vec<String> = args
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        match args.iter().skip_while(|a| *a != "-accel").nth(1) {
            Some(accel) => accel.to_uppercase(),
            None => "QEMU".into(),
        }
    }
}

impl Drop for VmHost {
    fn drop(&mut self) {
        if let Some(pid) = self.qemu_pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let gone = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < gone {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP-like JSON session with qemu-guest-agent over the VM's chardev socket.
struct GuestAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl GuestAgent {
    /// Connects and synchronizes: `guest-sync` with an id of ours after a 0xFF
    /// (which resets the agent's parser), answers to anything else dropped; the
    /// agent may still be starting, so it is asked again every 2 s for 60 s, with
    /// a new id each time (the agent answers in order: once the latest id is back,
    /// nothing older is pending).
    fn connect(socket: &Path) -> Result<GuestAgent, BenchError> {
        let io = |what: &str| BenchError::io(format!("{what} {}", socket.display()));
        let stream = UnixStream::connect(socket).map_err(io("connecting to"))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(io("setting a read timeout on"))?;
        let writer = stream.try_clone().map_err(io("cloning"))?;
        let mut agent = GuestAgent {
            reader: BufReader::new(stream),
            writer,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        for attempt in 0u64.. {
            let id = u64::from(std::process::id()) * 1000 + attempt;
            agent.writer.write_all(&[0xff]).map_err(io("writing to"))?;
            agent.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))?;
            let next = Instant::now() + Duration::from_secs(2);
            while Instant::now() < next {
                if matches!(agent.receive(), Ok(answer) if answer["return"] == id) {
                    agent
                        .reader
                        .get_ref()
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .map_err(io("setting a read timeout on"))?;
                    return Ok(agent);
                }
            }
            if Instant::now() > deadline {
                break;
            }
        }
        Err(BenchError::Timeout {
            what: format!(
                "qemu-guest-agent to answer guest-sync on {}",
                socket.display()
            ),
            secs: 60.0,
        })
    }

    fn send(&mut self, request: &Value) -> Result<(), BenchError> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(BenchError::io("writing to qga.sock"))
    }

    fn receive(&mut self) -> Result<Value, BenchError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(BenchError::io("reading qga.sock"))?;
            if n == 0 {
                return Err(BenchError::Api("qga.sock closed".into()));
            }
            // A line of its own may be the 0xFF of a delimited sync, or blank.
            if let Ok(value) = serde_json::from_str::<Value>(line.trim()) {
                return Ok(value);
            }
        }
    }

    fn execute(&mut self, request: Value) -> Result<Value, BenchError> {
        self.send(&request)?;
        let answer = self.receive()?;
        match answer.get("return") {
            Some(value) => Ok(value.clone()),
            None => Err(BenchError::Api(format!(
                "qemu-guest-agent answered {answer} to {request}"
            ))),
        }
    }

    /// Writes `data` to `path` in the guest: `guest-file-open` (mode `w`),
    /// `guest-file-write` of [`QGA_CHUNK`] bytes at a time (base64), and
    /// `guest-file-close`; timed from the open until the close is answered.
    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<Duration, BenchError> {
        use base64::Engine as _;
        let start = Instant::now();
        let handle = self.execute(
            json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}),
        )?;
        let handle = handle
            .as_i64()
            .ok_or_else(|| BenchError::Api(format!("guest-file-open answered {handle}")))?;
        for piece in data.chunks(QGA_CHUNK) {
            let written = self.execute(json!({
                "execute": "guest-file-write",
                "arguments": {
                    "handle": handle,
                    "buf-b64": base64::engine::general_purpose::STANDARD.encode(piece),
                },
            }))?;
            if written["count"].as_u64() != Some(piece.len() as u64) {
                return Err(BenchError::Api(format!(
                    "guest-file-write of {} bytes answered {written}",
                    piece.len()
                )));
            }
        }
        self.execute(json!({"execute": "guest-file-close", "arguments": {"handle": handle}}))?;
        Ok(start.elapsed())
    }

    /// `guest-exec /bin/true`, then `guest-exec-status` until it exited.
    fn exec_true(&mut self) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let started =
            self.execute(json!({"execute": "guest-exec", "arguments": {"path": "/bin/true"}}))?;
        let pid = started["pid"]
            .as_i64()
            .ok_or_else(|| BenchError::Api(format!("guest-exec answered no pid: {started}")))?;
        loop {
            let status =
                self.execute(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}))?;
            if status["exited"] == true {
                let elapsed = start.elapsed();
                if status["exitcode"] != 0 {
                    return Err(BenchError::Api(format!(
                        "/bin/true in the VM ended: {status}"
                    )));
                }
                return Ok(elapsed);
            }
            std::thread::sleep(QGA_POLL);
        }
    }
}
