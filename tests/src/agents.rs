//! Real agent processes and a test-side host that speaks the documented protocol.
//!
//! [`GuestProcess`] runs the real `vmc-guest` binary (built by the workspace's test
//! run; `VMC_GUEST_BIN` overrides its path) with its own state directory, an
//! explicit broker on loopback and, unless the test asks otherwise, an explicit id.
//! [`TestHost`] is a STOMP session subscribed to a host queue and the connections
//! topic under a destination prefix unique to the test, so tests sharing a broker
//! never see each other's messages. It drives guests only through protocol words
//! (`vmc_protocol::words`), exactly as a host agent written from `docs/PROTOCOL.md`
//! would, and acknowledges every message it receives.

use crate::{within, BrokerKind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::{GuestId, HostId};
use vmc_protocol::stomp::{SessionConfig, SessionEvent, StompClient, Subscription};
use vmc_protocol::words::{self, Envelope, Message};

/// The `vmc-guest` binary next to the test executable (`target/<profile>/`).
pub fn guest_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMC_GUEST_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test-binary> -> target/<profile>/vmc-guest
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/*/deps");
    let binary = dir.join("vmc-guest");
    assert!(
        binary.exists(),
        "{} is missing: build the workspace first (cargo build --workspace, or run the tests \
         with --workspace)",
        binary.display()
    );
    binary
}

/// How to start a guest agent.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    pub broker_port: u16,
    pub prefix: String,
    /// `None` lets the agent take its NIC's MAC address.
    pub id: Option<String>,
    pub beacon_interval: f64,
    pub max_concurrent_commands: usize,
    /// Extra `VMC_*` settings.
    pub env: Vec<(String, String)>,
}

impl GuestOptions {
    pub fn new(broker_port: u16, prefix: &str, id: Option<&str>) -> GuestOptions {
        GuestOptions {
            broker_port,
            prefix: prefix.to_owned(),
            id: id.map(str::to_owned),
            beacon_interval: 10.0,
            max_concurrent_commands: 16,
            env: Vec::new(),
        }
    }
}

/// A running `vmc-guest` process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct GuestProcess {
    child: Option<Child>,
    options: GuestOptions,
    /// Its state directory (spool, outputs); kept across restarts.
    pub state_dir: PathBuf,
    /// The one directory file transfers may touch.
    pub files_dir: PathBuf,
    _temp: tempfile::TempDir,
}

impl GuestProcess {
    /// Starts a guest agent with a fresh state directory.
    pub fn start(options: GuestOptions) -> GuestProcess {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let state_dir = temp.path().join("state");
        let files_dir = temp.path().join("files");
        std::fs::create_dir_all(&files_dir).expect("files dir");
        let mut guest = GuestProcess {
            child: None,
            options,
            state_dir,
            files_dir,
            _temp: temp,
        };
        guest.spawn();
        guest
    }

    fn spawn(&mut self) {
        let o = &self.options;
        let mut command = Command::new(guest_binary());
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("VMC_GUEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("VMC_BROKER", format!("stomp://127.0.0.1:{}", o.broker_port))
            .env("VMC_LOGIN", "guest")
            .env("VMC_PASSCODE", "guest")
            .env("VMC_PREFIX", &o.prefix)
            .env("VMC_BEACON_INTERVAL", o.beacon_interval.to_string())
            .env(
                "VMC_MAX_CONCURRENT_COMMANDS",
                o.max_concurrent_commands.to_string(),
            )
            .env("VMC_KILL_GRACE", "1")
            .env("VMC_STATE_DIR", &self.state_dir)
            .env("VMC_ALLOWED_ROOTS", &self.files_dir)
            .stdin(Stdio::null());
        if let Some(id) = &o.id {
            command.env("VMC_ID", id);
        }
        for (name, value) in &o.env {
            command.env(name, value);
        }
        self.child = Some(command.spawn().expect("vmc-guest starts"));
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL, as a crash or a power cut would; the state directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit (up to 20 s); returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Starts the agent again with the same settings and state directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The host side of the protocol, for tests.
#[derive(Debug)]
pub struct TestHost {
    pub client: StompClient,
    events: UnboundedReceiver<SessionEvent>,
    pub id: HostId,
    pub queue: String,
    pub destinations: Destinations,
    max_frame_size: usize,
}

impl TestHost {
    /// Connects to the broker and subscribes to its own queue and the connections
    /// topic under `prefix`.
    pub async fn start(kind: BrokerKind, port: u16, prefix: &str) -> TestHost {
        Self::start_with(kind.session_config(port), prefix).await
    }

    /// As [`start`](Self::start), with a session configuration of the caller's.
    pub async fn start_with(config: SessionConfig, prefix: &str) -> TestHost {
        let max_frame_size = config.max_frame_size;
        let (client, events) = StompClient::start(config);
        let destinations = Destinations::new(prefix).expect("a valid test prefix");
        let id = HostId::new(format!("test-{}", std::process::id())).expect("a valid host id");
        let queue = destinations.host_queue(&id);
        within(Duration::from_secs(30), "the host subscriptions", async {
            client
                .subscribe(Subscription::new(&queue).with_prefetch(Some(512)))
                .await
                .expect("the host queue subscription");
            client
                .subscribe(Subscription::new(destinations.connections_topic()))
                .await
                .expect("the connections topic subscription");
        })
        .await;
        TestHost {
            client,
            events,
            id,
            queue,
            destinations,
            max_frame_size,
        }
    }

    fn frame(&self, message: &Message, destination: &str) -> vmc_protocol::stomp::Frame {
        let from = format!("host:{}", self.id.as_str());
        let mut frame = words::encode(message, &from, Some(&self.queue), self.max_frame_size)
            .unwrap_or_else(|e| panic!("cannot encode {message:?}: {e}"));
        frame.set_header("destination", destination);
        frame
    }

    /// Sends a word to one guest's queue (with a receipt).
    pub async fn send_to(&self, guest: &str, message: &Message) {
        let guest = GuestId::new(guest).expect("a valid guest id");
        let frame = self.frame(message, &self.destinations.guest_queue(&guest));
        self.client
            .send_with_receipt(frame)
            .await
            .expect("the broker takes the message");
    }

    /// Sends a word to every guest whose id matches the glob `to`.
    pub async fn multicast(&self, to: &str, message: &Message) {
        let mut frame = self.frame(message, &self.destinations.multicast_topic());
        frame.set_header(words::header::TO, to);
        self.client
            .send_with_receipt(frame)
            .await
            .expect("the broker takes the message");
    }

    /// The next protocol message for which `wanted` holds, within `timeout`;
    /// messages before it are acknowledged and dropped.
    pub async fn expect<F>(&mut self, timeout: Duration, what: &str, mut wanted: F) -> Envelope
    where
        F: FnMut(&Envelope) -> bool,
    {
        let events = &mut self.events;
        let client = &self.client;
        within(timeout, what, async {
            loop {
                match events.recv().await {
                    Some(SessionEvent::Message(m)) => {
                        let _ = client.ack(&m).await;
                        match words::decode(&m.frame) {
                            Ok(envelope) if wanted(&envelope) => return envelope,
                            Ok(_) => {}
                            Err(e) => {
                                panic!("a guest sent an undecodable message: {e}: {:?}", m.frame)
                            }
                        }
                    }
                    Some(_) => {}
                    None => panic!("the test host's session ended"),
                }
            }
        })
        .await
    }

    /// Collects every message arriving within `window` for which `wanted` holds.
    pub async fn collect<F>(&mut self, window: Duration, mut wanted: F) -> Vec<Envelope>
    where
        F: FnMut(&Envelope) -> bool,
    {
        let mut found = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let SessionEvent::Message(m) = event {
                let _ = self.client.ack(&m).await;
                if let Ok(envelope) = words::decode(&m.frame) {
                    if wanted(&envelope) {
                        found.push(envelope);
                    }
                }
            }
        }
        found
    }
}

/// Whether `envelope` is a HELLO from `guest`.
pub fn is_hello_from(envelope: &Envelope, guest: &str) -> bool {
    matches!(&envelope.message, Message::Hello(info) if info.id.as_str() == guest)
}
