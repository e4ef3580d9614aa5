//! The harness the integration tests share: real brokers, real processes, and
//! waiting on conditions with deadlines.
//!
//! Brokers are started through the project's own scripts in `deploy/brokers/`, the
//! same ones an operator uses: the shared default instances (RabbitMQ STOMP on
//! 127.0.0.1:61613, ActiveMQ on 127.0.0.1:61614) for tests that only talk, and
//! private named instances for tests that restart or kill a broker, so that those do
//! not disturb tests running in parallel. [`TcpProxy`] sits between a client and a
//! real broker to cut or freeze the link, which is how a network partition looks to
//! the client. Nothing here listens on anything but loopback.

pub mod agents;
pub mod transfer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use vmc_protocol::stomp::{BrokerAddress, SessionConfig};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Starts env_logger once, honouring `RUST_LOG` (default: warnings).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
}

/// The two real brokers the project supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    RabbitMq,
    ActiveMq,
}

impl BrokerKind {
    fn script(self) -> PathBuf {
        let name = match self {
            BrokerKind::RabbitMq => "rabbitmq.sh",
            BrokerKind::ActiveMq => "activemq.sh",
        };
        repo_root().join("deploy/brokers").join(name)
    }

    /// STOMP port of the default instance.
    pub fn default_port(self) -> u16 {
        match self {
            BrokerKind::RabbitMq => 61613,
            BrokerKind::ActiveMq => 61614,
        }
    }

    /// A session configuration for this broker at `port`, with the test credentials.
    pub fn session_config(self, port: u16) -> SessionConfig {
        SessionConfig::new(BrokerAddress::tcp("127.0.0.1", port)).with_credentials("guest", "guest")
    }
}

fn run_script(kind: BrokerKind, args: &[&str]) {
    let script = kind.script();
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} {} failed ({}):\n{}\n{}",
        script.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Makes sure the default instance of `kind` runs (starting it if needed) and
/// returns its STOMP port. A broker that cannot start fails the test loudly.
pub fn shared_broker(kind: BrokerKind) -> u16 {
    static STARTED: OnceLock<Mutex<Vec<BrokerKind>>> = OnceLock::new();
    let started = STARTED.get_or_init(|| Mutex::new(Vec::new()));
    let mut started = started.lock().unwrap_or_else(|e| e.into_inner());
    if !started.contains(&kind) {
        run_script(kind, &["start"]);
        started.push(kind);
    }
    kind.default_port()
}

/// A named broker instance of its own, stopped when dropped.
#[derive(Debug)]
pub struct PrivateBroker {
    pub kind: BrokerKind,
    pub name: String,
    pub port: u16,
}

impl PrivateBroker {
    /// Starts (or reuses) the instance `name` listening for STOMP on `port`.
    pub fn start(kind: BrokerKind, name: &str, port: u16) -> PrivateBroker {
        let broker = PrivateBroker {
            kind,
            name: name.to_owned(),
            port,
        };
        run_script(kind, &broker.args("start"));
        broker
    }

    fn args<'a>(&'a self, verb: &'a str) -> Vec<&'a str> {
        vec![verb, "--instance", &self.name, "--port", self.port_str()]
    }

    fn port_str(&self) -> &'static str {
        // The scripts take the port as text; leak one small string per broker.
        Box::leak(self.port.to_string().into_boxed_str())
    }

    /// Stops the broker gracefully; its persistent data stays.
    pub fn stop(&self) {
        run_script(self.kind, &self.args("stop"));
    }

    /// Kills the broker process with SIGKILL, as a crash would.
    pub fn kill(&self) {
        run_script(self.kind, &self.args("kill"));
    }

    /// Starts the broker again after [`stop`](Self::stop) or [`kill`](Self::kill).
    pub fn start_again(&self) {
        run_script(self.kind, &self.args("start"));
    }

    /// A session configuration for this instance.
    pub fn session_config(&self) -> SessionConfig {
        self.kind.session_config(self.port)
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.kind.script())
            .args(self.args("stop"))
            .output();
    }
}

/// A name no other test (and no earlier run) uses, for queues and topics.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}.{}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `future`, panicking with `what` if it takes longer than `timeout`.
pub async fn within<T>(timeout: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// A loopback TCP relay to a real server that can freeze its live links, as a
/// network partition or a hung peer would: bytes stop flowing but no socket closes.
#[derive(Debug)]
pub struct TcpProxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts relaying 127.0.0.1:(ephemeral) to 127.0.0.1:`target_port`.
    pub async fn start(target_port: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (frozen2, generation2) = (frozen.clone(), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let my_generation = generation2.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let gate = Gate {
                    frozen: frozen2.clone(),
                    generation: generation2.clone(),
                    my_generation,
                };
                tokio::spawn(relay(cr, sw, gate.clone()));
                tokio::spawn(relay(sr, cw, gate));
            }
        });
        TcpProxy {
            port,
            frozen,
            generation,
            task,
        }
    }

    /// Stops moving bytes on every link opened so far; new links still work.
    pub fn freeze_existing_links(&self) {
        self.frozen.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Gate {
    frozen: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    my_generation: u64,
}

impl Gate {
    fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
            && self.my_generation < self.generation.load(Ordering::SeqCst)
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    gate: Gate,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if gate.is_frozen() {
            // Hold the link open and silent until the test ends.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The STOMP-over-TLS port of the shared RabbitMQ (see `deploy/brokers/rabbitmq.sh`).
pub const RABBITMQ_TLS_PORT: u16 = 61615;

/// The CA certificate that signed the shared RabbitMQ's TLS certificate.
pub fn broker_tls_ca_file() -> PathBuf {
    let state = std::env::var_os("VMC_BROKER_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/vmc-brokers"));
    state.join("tls/ca.pem")
}
