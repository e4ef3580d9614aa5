//! One logical STOMP session that survives broker restarts.
//!
//! [`StompClient::start`] spawns a tokio task that owns the socket and returns a
//! cloneable handle plus a stream of [`SessionEvent`]s. The task connects (TCP with
//! `TCP_NODELAY` and keep-alive, optionally TLS), performs the STOMP 1.2 handshake,
//! negotiates heart-beats, and then multiplexes requests from handles with frames
//! from the broker. When the connection fails (I/O error, broker ERROR frame, a peer
//! silent for three times its heart-beat interval, a malformed frame) it reconnects with
//! capped exponential backoff and jitter, re-subscribes every subscription and
//! re-sends, in their original order, every frame whose RECEIPT had not arrived,
//! followed by the frames queued while it was down. Delivery is therefore
//! at-least-once: a frame that reached the broker but whose receipt was lost is sent
//! again, and receivers de-duplicate by their own ids.
//!
//! ACK/NACK of a message from an earlier connection are dropped: the broker
//! redelivers that message on the new connection anyway. Events are delivered on an
//! unbounded channel so that a handle awaiting a receipt can never dead-lock against
//! a full event queue; subscriptions bound memory with a prefetch limit instead.
//! Transactions are not implemented.

use crate::stomp::codec::{CodecError, StompCodec, StompItem, DEFAULT_MAX_FRAME_SIZE};
use crate::stomp::frame::{Command, Frame};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Why a session request failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StompError {
    #[error("the STOMP session has been shut down")]
    Closed,
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the broker refused the request: {0}")]
    Refused(String),
    #[error("{0} frames are already waiting for the broker to come back")]
    OutboxFull(usize),
    #[error("invalid broker address {0:?}: expected stomp://HOST:PORT or stomp+ssl://HOST:PORT")]
    BadAddress(String),
    #[error("TLS configuration is unusable: {0}")]
    Tls(String),
}

/// One broker endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    /// Connect with TLS (needs [`SessionConfig::tls`]).
    pub tls: bool,
}

impl BrokerAddress {
    /// A plain TCP address.
    pub fn tcp(host: impl Into<String>, port: u16) -> BrokerAddress {
        BrokerAddress {
            host: host.into(),
            port,
            tls: false,
        }
    }

    /// Parses `stomp://host:port`, `stomp+ssl://host:port` (or `stomps://`), or `host:port`.
    pub fn parse(url: &str) -> Result<BrokerAddress, StompError> {
        let bad = || StompError::BadAddress(url.to_owned());
        let (tls, rest) = if let Some(rest) = url.strip_prefix("stomp://") {
            (false, rest)
        } else if let Some(rest) = url
            .strip_prefix("stomp+ssl://")
            .or_else(|| url.strip_prefix("stomps://"))
        {
            (true, rest)
        } else if url.contains("://") {
            return Err(bad());
        } else {
            (false, url)
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "stomp+ssl" } else { "stomp" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// TLS settings for broker connections.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    pub ca_file: std::path::PathBuf,
    /// Name to verify in the broker's certificate (default: the address's host).
    pub server_name: Option<String>,
}

/// Everything a session needs to know; see the field docs for defaults.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Brokers to try, in turn, on every (re)connection.
    pub addresses: Vec<BrokerAddress>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// The STOMP `host` header; RabbitMQ takes it as the virtual host, so `/` by default.
    pub virtual_host: String,
    /// How often we promise to send something (0 = never). Default 10 s.
    pub heart_beat_send: Duration,
    /// How often we want to hear from the broker (0 = never). Default 10 s.
    /// A broker silent for three times the negotiated interval is considered dead.
    pub heart_beat_receive: Duration,
    /// Deadline for TCP connect, TLS and the STOMP handshake. Default 10 s.
    pub connect_timeout: Duration,
    /// Deadline for writing one frame to the socket. Default 30 s.
    pub write_timeout: Duration,
    /// First reconnect delay; doubles after each failure up to `reconnect_max`.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Largest frame accepted or sent, head included.
    pub max_frame_size: usize,
    /// Frames buffered while disconnected before sends are refused.
    pub outbox_limit: usize,
    pub tls: Option<TlsSettings>,
}

impl SessionConfig {
    /// Defaults for one broker address.
    pub fn new(address: BrokerAddress) -> SessionConfig {
        SessionConfig {
            addresses: vec![address],
            login: None,
            passcode: None,
            virtual_host: "/".to_owned(),
            heart_beat_send: Duration::from_secs(10),
            heart_beat_receive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            outbox_limit: 100_000,
            tls: None,
        }
    }

    /// Sets login and passcode (builder style).
    #[must_use]
    pub fn with_credentials(mut self, login: &str, passcode: &str) -> SessionConfig {
        self.login = Some(login.to_owned());
        self.passcode = Some(passcode.to_owned());
        self
    }
}

/// How messages of a subscription are acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// The broker forgets a message once it has sent it.
    Auto,
    /// Each message is acknowledged on its own with [`StompClient::ack`].
    ClientIndividual,
}

/// A subscription request.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub destination: String,
    pub ack: AckMode,
    /// Unacknowledged messages the broker may send at once (RabbitMQ `prefetch-count`,
    /// ActiveMQ `activemq.prefetchSize`); `None` leaves the broker's default.
    pub prefetch: Option<u32>,
    /// Extra headers, e.g. `durable`, `auto-delete` or `selector`.
    pub headers: Vec<(String, String)>,
}

impl Subscription {
    /// A client-individual subscription with a prefetch of 256.
    pub fn new(destination: impl Into<String>) -> Subscription {
        Subscription {
            destination: destination.into(),
            ack: AckMode::ClientIndividual,
            prefetch: Some(256),
            headers: Vec::new(),
        }
    }

    /// Sets the ack mode (builder style).
    #[must_use]
    pub fn with_ack(mut self, ack: AckMode) -> Subscription {
        self.ack = ack;
        self
    }

    /// Adds a header to the SUBSCRIBE frame (builder style).
    #[must_use]
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Subscription {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the prefetch limit (builder style).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: Option<u32>) -> Subscription {
        self.prefetch = prefetch;
        self
    }
}

/// A MESSAGE delivered to one of our subscriptions.
#[derive(Clone, Debug)]
pub struct Message {
    pub frame: Frame,
    /// Our subscription id the message arrived on.
    pub subscription: String,
    /// The connection it arrived on; ACKs for older connections are dropped.
    pub generation: u64,
}

impl Message {
    /// The destination the message was sent to.
    pub fn destination(&self) -> Option<&str> {
        self.frame.header("destination")
    }

    /// The broker's message id.
    pub fn message_id(&self) -> Option<&str> {
        self.frame.header("message-id")
    }

    /// True when the broker says it delivered this message before.
    pub fn redelivered(&self) -> bool {
        self.frame.header("redelivered") == Some("true")
    }
}

/// What the session tells its owner.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// A connection is up, subscriptions restored and pending frames re-sent.
    Connected {
        generation: u64,
        address: BrokerAddress,
        server: Option<String>,
    },
    /// The connection `generation` ended; the session reconnects unless shut down.
    Disconnected {
        generation: u64,
        reason: String,
    },
    /// A connection attempt failed; the next one follows after `retry_in`.
    ConnectFailed {
        address: BrokerAddress,
        reason: String,
        retry_in: Duration,
    },
    /// The broker sent an ERROR frame (it closes the connection after it).
    BrokerError {
        message: String,
        body: String,
    },
    Message(Message),
}

/// Whether the session currently has a working connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Down,
    Up { generation: u64 },
    Closed,
}

/// A cloneable handle to a running session.
#[derive(Clone, Debug)]
pub struct StompClient {
    requests: mpsc::Sender<Request>,
    link: watch::Receiver<LinkState>,
    next_subscription: Arc<AtomicU64>,
    max_frame_size: usize,
}

type Waiter = oneshot::Sender<Result<(), StompError>>;

/// The pending RECEIPT of a frame queued with [`StompClient::queue_with_receipt`].
#[derive(Debug)]
pub struct ReceiptWait(oneshot::Receiver<Result<(), StompError>>);

impl ReceiptWait {
    /// Waits for the broker's RECEIPT (across reconnections) or the session's end.
    pub async fn wait(self) -> Result<(), StompError> {
        self.0.await.unwrap_or(Err(StompError::Closed))
    }
}

enum Request {
    Send {
        frame: Frame,
        receipt: Option<Waiter>,
    },
    Subscribe {
        id: String,
        subscription: Subscription,
        done: Waiter,
    },
    Unsubscribe {
        id: String,
        done: Waiter,
    },
    Ack {
        ack_id: String,
        generation: u64,
        nack: bool,
    },
    Shutdown {
        done: Waiter,
    },
}

impl StompClient {
    /// Starts a session task on the current tokio runtime. It connects in the
    /// background; requests made before the first connection are queued.
    pub fn start(config: SessionConfig) -> (StompClient, mpsc::UnboundedReceiver<SessionEvent>) {
        let (requests_tx, requests_rx) = mpsc::channel(1024);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (link_tx, link_rx) = watch::channel(LinkState::Down);
        let max_frame_size = config.max_frame_size;
        let session = Session::new(config, requests_rx, events_tx, link_tx);
        tokio::spawn(session.run());
        let client = StompClient {
            requests: requests_tx,
            link: link_rx,
            next_subscription: Arc::new(AtomicU64::new(1)),
            max_frame_size,
        };
        (client, events_rx)
    }

    /// Queues a frame (normally a SEND) to be written as soon as possible. Returns
    /// when queued, not when the broker has it: use [`send_with_receipt`] for that.
    ///
    /// [`send_with_receipt`]: StompClient::send_with_receipt
    pub async fn send(&self, frame: Frame) -> Result<(), StompError> {
        self.check_size(&frame)?;
        self.request(Request::Send {
            frame,
            receipt: None,
        })
        .await
    }

    /// Sends a frame and waits for the broker's RECEIPT, re-sending it after
    /// reconnects until one arrives. Wrap in a timeout to bound the wait.
    pub async fn send_with_receipt(&self, frame: Frame) -> Result<(), StompError> {
        self.queue_with_receipt(frame).await?.wait().await
    }

    /// Queues a frame that will be re-sent until the broker's RECEIPT arrives, and
    /// returns as soon as it is queued; the returned [`ReceiptWait`] tells when the
    /// receipt came. Frames queued this way keep their order with all other sends.
    pub async fn queue_with_receipt(&self, frame: Frame) -> Result<ReceiptWait, StompError> {
        self.check_size(&frame)?;
        let (done, wait) = oneshot::channel();
        self.request(Request::Send {
            frame,
            receipt: Some(done),
        })
        .await?;
        Ok(ReceiptWait(wait))
    }

    /// Subscribes, waiting until the broker has confirmed the subscription. It is
    /// renewed on every reconnection. Returns the subscription id.
    pub async fn subscribe(&self, subscription: Subscription) -> Result<String, StompError> {
        let id = format!(
            "sub-{}",
            self.next_subscription.fetch_add(1, Ordering::Relaxed)
        );
        let (done, wait) = oneshot::channel();
        self.request(Request::Subscribe {
            id: id.clone(),
            subscription,
            done,
        })
        .await?;
        wait.await.unwrap_or(Err(StompError::Closed))?;
        Ok(id)
    }

    /// Ends a subscription, waiting for the broker's confirmation when connected.
    pub async fn unsubscribe(&self, id: &str) -> Result<(), StompError> {
        let (done, wait) = oneshot::channel();
        self.request(Request::Unsubscribe {
            id: id.to_owned(),
            done,
        })
        .await?;
        wait.await.unwrap_or(Err(StompError::Closed))
    }

    /// Acknowledges a message of a client-individual subscription.
    pub async fn ack(&self, message: &Message) -> Result<(), StompError> {
        self.ack_or_nack(message, false).await
    }

    /// Refuses a message: the broker redelivers it (or dead-letters it).
    pub async fn nack(&self, message: &Message) -> Result<(), StompError> {
        self.ack_or_nack(message, true).await
    }

    /// Sends DISCONNECT (waiting briefly for its receipt), closes the connection and
    /// stops the session. Pending requests fail with [`StompError::Closed`].
    pub async fn shutdown(&self) -> Result<(), StompError> {
        let (done, wait) = oneshot::channel();
        self.request(Request::Shutdown { done }).await?;
        wait.await.unwrap_or(Ok(()))
    }

    /// The current state of the link.
    pub fn link_state(&self) -> LinkState {
        *self.link.borrow()
    }

    /// Waits until the session is connected (or closed); returns the final state.
    pub async fn wait_connected(&self) -> LinkState {
        let mut link = self.link.clone();
        let result = link.wait_for(|s| !matches!(s, LinkState::Down)).await;
        result.map(|s| *s).unwrap_or(LinkState::Closed)
    }

    /// The frame size limit of this session.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    async fn ack_or_nack(&self, message: &Message, nack: bool) -> Result<(), StompError> {
        let Some(ack_id) = message.frame.header("ack") else {
            return Ok(()); // auto-ack subscription: nothing to do
        };
        let request = Request::Ack {
            ack_id: ack_id.to_owned(),
            generation: message.generation,
            nack,
        };
        self.request(request).await
    }

    async fn request(&self, request: Request) -> Result<(), StompError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| StompError::Closed)
    }

    fn check_size(&self, frame: &Frame) -> Result<(), StompError> {
        let size = encoded_len_estimate(frame);
        if size > self.max_frame_size {
            return Err(StompError::TooLarge {
                size,
                limit: self.max_frame_size,
            });
        }
        Ok(())
    }
}

/// An upper bound of the encoded size of a frame (escaping at most doubles a header).
fn encoded_len_estimate(frame: &Frame) -> usize {
    let head: usize = frame
        .headers
        .iter()
        .map(|(n, v)| 2 * (n.len() + v.len()) + 2)
        .sum();
    frame.command.as_str().len() + head + 40 + frame.body.len()
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Incoming = Result<StompItem, CodecError>;

/// A live connection: the write half, and the reader task's channel.
struct Connection {
    generation: u64,
    writer: FramedWrite<WriteHalf<Box<dyn Io>>, StompCodec>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    reader: tokio::task::JoinHandle<()>,
    send_every: Option<Duration>,
    silent_after: Option<Duration>,
    last_rx: Instant,
    last_tx: Instant,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A frame waiting for its RECEIPT.
struct PendingReceipt {
    frame: Frame,
    waiter: Option<Waiter>,
    /// Still in the outbox (never written since it was requested).
    queued: bool,
}

enum Outgoing {
    /// A pending-receipt entry, by sequence number.
    Receipted(u64),
    Plain(Frame),
}

struct SubscriptionEntry {
    subscription: Subscription,
    /// Waiting for the broker to confirm this subscription.
    waiters: Vec<Waiter>,
}

/// Why a connection ended.
enum LinkFailure {
    Failed(String),
    ShutdownRequested(Waiter),
    HandlesGone,
}

/// The state owned by the session task.
struct Session {
    config: SessionConfig,
    requests: mpsc::Receiver<Request>,
    events: mpsc::UnboundedSender<SessionEvent>,
    link: watch::Sender<LinkState>,
    generation: u64,
    next_receipt: u64,
    pending: BTreeMap<u64, PendingReceipt>,
    outbox: VecDeque<Outgoing>,
    subscriptions: BTreeMap<String, SubscriptionEntry>,
    /// Receipt ids of SUBSCRIBE/UNSUBSCRIBE frames on the current connection.
    control_receipts: BTreeMap<String, ControlReceipt>,
    next_address: usize,
    backoff: Duration,
    jitter_state: u64,
}

enum ControlReceipt {
    Subscribed(String),
    Unsubscribed(Waiter),
    Disconnected,
}

impl Session {
    fn new(
        config: SessionConfig,
        requests: mpsc::Receiver<Request>,
        events: mpsc::UnboundedSender<SessionEvent>,
        link: watch::Sender<LinkState>,
    ) -> Session {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Session {
            backoff: config.reconnect_initial,
            config,
            requests,
            events,
            link,
            generation: 0,
            next_receipt: 1,
            pending: BTreeMap::new(),
            outbox: VecDeque::new(),
            subscriptions: BTreeMap::new(),
            control_receipts: BTreeMap::new(),
            next_address: 0,
            jitter_state: seed | 1,
        }
    }

    async fn run(mut self) {
        loop {
            let address =
                self.config.addresses[self.next_address % self.config.addresses.len()].clone();
            self.next_address += 1;
            match self.connect(&address).await {
                Ok((conn, server)) => {
                    self.backoff = self.config.reconnect_initial;
                    let generation = conn.generation;
                    match self.serve(conn, address, server).await {
                        LinkFailure::Failed(reason) => {
                            log::warn!("STOMP connection {generation} lost: {reason}");
                            let _ = self.link.send(LinkState::Down);
                            self.emit(SessionEvent::Disconnected { generation, reason });
                            self.control_receipts.clear();
                        }
                        LinkFailure::ShutdownRequested(done) => {
                            self.close(Some(done));
                            return;
                        }
                        LinkFailure::HandlesGone => {
                            self.close(None);
                            return;
                        }
                    }
                }
                Err(reason) => {
                    let retry_in = self.next_backoff();
                    log::warn!(
                        "STOMP connect to {address} failed: {reason}; retrying in {retry_in:?}"
                    );
                    self.emit(SessionEvent::ConnectFailed {
                        address,
                        reason,
                        retry_in,
                    });
                    if let Some(end) = self.wait_down(retry_in).await {
                        self.close(end);
                        return;
                    }
                }
            }
        }
    }

    /// Serves requests while no connection exists, for `delay`. Returns `Some` when
    /// the session must end (with the shutdown waiter, if any).
    async fn wait_down(&mut self, delay: Duration) -> Option<Option<Waiter>> {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return None,
                request = self.requests.recv() => match request {
                    None => return Some(None),
                    Some(Request::Shutdown { done }) => return Some(Some(done)),
                    Some(request) => self.queue_while_down(request),
                },
            }
        }
    }

    fn queue_while_down(&mut self, request: Request) {
        match request {
            Request::Send { frame, receipt } => {
                if self.outbox.len() >= self.config.outbox_limit {
                    if let Some(waiter) = receipt {
                        let _ = waiter.send(Err(StompError::OutboxFull(self.outbox.len())));
                    } else {
                        log::error!(
                            "dropping a frame for {:?}: {} frames already wait for the broker",
                            frame.header("destination"),
                            self.outbox.len()
                        );
                    }
                    return;
                }
                match receipt {
                    Some(waiter) => {
                        let seq = self.add_pending(frame, Some(waiter), true);
                        self.outbox.push_back(Outgoing::Receipted(seq));
                    }
                    None => self.outbox.push_back(Outgoing::Plain(frame)),
                }
            }
            Request::Subscribe {
                id,
                subscription,
                done,
            } => {
                self.subscriptions.insert(
                    id,
                    SubscriptionEntry {
                        subscription,
                        waiters: vec![done],
                    },
                );
            }
            Request::Unsubscribe { id, done } => {
                self.subscriptions.remove(&id);
                let _ = done.send(Ok(()));
            }
            Request::Ack { .. } => {} // stale: the broker redelivers after reconnect
            Request::Shutdown { .. } => unreachable!("handled by the callers"),
        }
    }

    fn add_pending(&mut self, frame: Frame, waiter: Option<Waiter>, queued: bool) -> u64 {
        let seq = self.next_receipt;
        self.next_receipt += 1;
        self.pending.insert(
            seq,
            PendingReceipt {
                frame,
                waiter,
                queued,
            },
        );
        seq
    }

    fn next_backoff(&mut self) -> Duration {
        let base = self.backoff;
        self.backoff = (self.backoff * 2).min(self.config.reconnect_max);
        // xorshift jitter in [0.8, 1.2) so that many agents do not reconnect in step.
        self.jitter_state ^= self.jitter_state << 13;
        self.jitter_state ^= self.jitter_state >> 7;
        self.jitter_state ^= self.jitter_state << 17;
        let factor = 0.8 + (self.jitter_state % 400) as f64 / 1000.0;
        base.mul_f64(factor)
    }

    fn emit(&self, event: SessionEvent) {
        let _ = self.events.send(event);
    }

    fn close(&mut self, done: Option<Waiter>) {
        let _ = self.link.send(LinkState::Closed);
        for (_, pending) in std::mem::take(&mut self.pending) {
            if let Some(waiter) = pending.waiter {
                let _ = waiter.send(Err(StompError::Closed));
            }
        }
        for (_, entry) in std::mem::take(&mut self.subscriptions) {
            for waiter in entry.waiters {
                let _ = waiter.send(Err(StompError::Closed));
            }
        }
        if let Some(done) = done {
            let _ = done.send(Ok(()));
        }
    }

    /// Opens a socket and performs the STOMP handshake.
    async fn connect(
        &mut self,
        address: &BrokerAddress,
    ) -> Result<(Connection, Option<String>), String> {
        let timeout = self.config.connect_timeout;
        let io = tokio::time::timeout(timeout, open_stream(address, self.config.tls.as_ref()))
            .await
            .map_err(|_| format!("no connection within {timeout:?}"))??;
        let (read_half, write_half) = tokio::io::split(io);
        let mut writer = FramedWrite::new(write_half, StompCodec::new(self.config.max_frame_size));
        // Unbounded on purpose: the socket must be read even while `serve` waits on a
        // write. ActiveMQ stops reading a connection while its own write to that
        // connection waits; had we stopped reading too, neither side would ever move.
        // What the broker may send is bounded by the subscriptions' prefetch.
        let (incoming_tx, mut incoming) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_frames(
            FramedRead::new(read_half, StompCodec::new(self.config.max_frame_size)),
            incoming_tx,
        ));
        let mut connect = Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("host", self.config.virtual_host.clone())
            .with_header(
                "heart-beat",
                format!(
                    "{},{}",
                    self.config.heart_beat_send.as_millis(),
                    self.config.heart_beat_receive.as_millis()
                ),
            );
        if let Some(login) = &self.config.login {
            connect = connect.with_header("login", login.clone());
        }
        if let Some(passcode) = &self.config.passcode {
            connect = connect.with_header("passcode", passcode.clone());
        }
        writer
            .send(&connect)
            .await
            .map_err(|e| format!("cannot send CONNECT: {e}"))?;
        let deadline = Instant::now() + timeout;
        let connected = loop {
            let item = tokio::time::timeout_at(deadline, incoming.recv())
                .await
                .map_err(|_| format!("no CONNECTED within {timeout:?}"))?;
            match item {
                None => return Err("the broker closed the connection during the handshake".into()),
                Some(Err(e)) => return Err(format!("bad handshake reply: {e}")),
                Some(Ok(StompItem::HeartBeat)) => continue,
                Some(Ok(StompItem::Frame(frame))) => match frame.command {
                    Command::Connected => break frame,
                    Command::Error => {
                        return Err(format!(
                            "the broker refused the connection: {} {}",
                            frame.header("message").unwrap_or_default(),
                            String::from_utf8_lossy(&frame.body).trim()
                        ))
                    }
                    other => return Err(format!("expected CONNECTED, got {other}")),
                },
            }
        };
        let (server_send, server_receive) = parse_heart_beat(connected.header("heart-beat"));
        let send_every = negotiate(self.config.heart_beat_send, server_receive);
        // A broker that checks for idleness once per interval and skips a check that
        // follows a write (ActiveMQ does) leaves up to two intervals between writes
        // when it has nothing to send: only a third interval of silence means death.
        let silent_after = negotiate(self.config.heart_beat_receive, server_send).map(|d| d * 3);
        self.generation += 1;
        let now = Instant::now();
        let conn = Connection {
            generation: self.generation,
            writer,
            incoming,
            reader,
            send_every,
            silent_after,
            last_rx: now,
            last_tx: now,
        };
        Ok((conn, connected.header("server").map(str::to_owned)))
    }

    /// Restores the session state on a fresh connection, then serves it until it fails.
    async fn serve(
        &mut self,
        mut conn: Connection,
        address: BrokerAddress,
        server: Option<String>,
    ) -> LinkFailure {
        if let Err(reason) = self.restore(&mut conn).await {
            return LinkFailure::Failed(reason);
        }
        log::info!("STOMP connection {} to {address} is up", conn.generation);
        let _ = self.link.send(LinkState::Up {
            generation: conn.generation,
        });
        self.emit(SessionEvent::Connected {
            generation: conn.generation,
            address,
            server,
        });
        // Heart-beats go out after half the promised interval of quiet, so that one
        // is never late however the ticks fall (ActiveMQ closes a link whose
        // heart-beat is 1.5 intervals late).
        let beat_after = conn.send_every.map(|d| d / 2);
        let tick = beat_after
            .into_iter()
            .chain(conn.silent_after.map(|d| d / 4))
            .min()
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                incoming = conn.incoming.recv() => {
                    conn.last_rx = Instant::now();
                    match incoming {
                        None => return LinkFailure::Failed("the broker closed the connection".into()),
                        Some(Err(e)) => {
                            log::error!("malformed data from the broker: {e}");
                            return LinkFailure::Failed(format!("malformed data from the broker: {e}"));
                        }
                        Some(Ok(StompItem::HeartBeat)) => {}
                        Some(Ok(StompItem::Frame(frame))) => {
                            if let Err(reason) = self.on_frame(frame, conn.generation) {
                                return LinkFailure::Failed(reason);
                            }
                        }
                    }
                }
                request = self.requests.recv() => {
                    let Some(request) = request else { return LinkFailure::HandlesGone };
                    if let Request::Shutdown { done } = request {
                        self.disconnect_gracefully(&mut conn).await;
                        return LinkFailure::ShutdownRequested(done);
                    }
                    if let Err(reason) = self.on_request(request, &mut conn).await {
                        return LinkFailure::Failed(reason);
                    }
                }
                _ = ticker.tick() => {
                    let now = Instant::now();
                    if let Some(limit) = conn.silent_after {
                        if now.duration_since(conn.last_rx) > limit {
                            return LinkFailure::Failed(format!(
                                "the broker sent nothing for {:?} (heart-beat timeout)",
                                now.duration_since(conn.last_rx)
                            ));
                        }
                    }
                    if let Some(after) = beat_after {
                        if now.duration_since(conn.last_tx) >= after {
                            if let Err(reason) = self.write(&mut conn, StompItem::HeartBeat).await {
                                return LinkFailure::Failed(reason);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Re-subscribes, then re-sends unreceipted frames and the outbox, in order.
    async fn restore(&mut self, conn: &mut Connection) -> Result<(), String> {
        let ids: Vec<String> = self.subscriptions.keys().cloned().collect();
        for id in ids {
            let frame = self.subscribe_frame(&id);
            self.write(conn, StompItem::Frame(frame)).await?;
        }
        let written: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.queued)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in written {
            let frame = receipted(&self.pending[&seq].frame, seq);
            self.write(conn, StompItem::Frame(frame)).await?;
        }
        while let Some(out) = self.outbox.pop_front() {
            let frame = match out {
                Outgoing::Plain(frame) => frame,
                Outgoing::Receipted(seq) => match self.pending.get_mut(&seq) {
                    Some(pending) => {
                        pending.queued = false;
                        receipted(&pending.frame, seq)
                    }
                    None => continue,
                },
            };
            if let Err(e) = self.write(conn, StompItem::Frame(frame.clone())).await {
                // Keep the frame for the next connection, at the front, as it was.
                if frame.header("receipt").is_none() {
                    self.outbox.push_front(Outgoing::Plain(frame));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn subscribe_frame(&mut self, id: &str) -> Frame {
        let sub = &self.subscriptions[id].subscription;
        let mut frame = Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", sub.destination.clone())
            .with_header(
                "ack",
                match sub.ack {
                    AckMode::Auto => "auto",
                    AckMode::ClientIndividual => "client-individual",
                },
            );
        if let Some(prefetch) = sub.prefetch {
            frame = frame
                .with_header("prefetch-count", prefetch.to_string())
                .with_header("activemq.prefetchSize", prefetch.to_string());
        }
        for (name, value) in &sub.headers {
            frame = frame.with_header(name.clone(), value.clone());
        }
        let receipt = format!("s-{}-{}", id, self.generation);
        self.control_receipts
            .insert(receipt.clone(), ControlReceipt::Subscribed(id.to_owned()));
        frame.with_header("receipt", receipt)
    }

    async fn on_request(&mut self, request: Request, conn: &mut Connection) -> Result<(), String> {
        match request {
            Request::Send { frame, receipt } => match receipt {
                Some(waiter) => {
                    let seq = self.add_pending(frame, Some(waiter), false);
                    let frame = receipted(&self.pending[&seq].frame, seq);
                    self.write(conn, StompItem::Frame(frame)).await
                }
                None => {
                    let result = self.write(conn, StompItem::Frame(frame.clone())).await;
                    if result.is_err() {
                        // Not known to have reached the broker: send it after reconnecting.
                        self.outbox.push_back(Outgoing::Plain(frame));
                    }
                    result
                }
            },
            Request::Subscribe {
                id,
                subscription,
                done,
            } => {
                self.subscriptions.insert(
                    id.clone(),
                    SubscriptionEntry {
                        subscription,
                        waiters: vec![done],
                    },
                );
                let frame = self.subscribe_frame(&id);
                self.write(conn, StompItem::Frame(frame)).await
            }
            Request::Unsubscribe { id, done } => {
                if self.subscriptions.remove(&id).is_none() {
                    let _ = done.send(Ok(()));
                    return Ok(());
                }
                let receipt = format!("u-{id}-{}", self.generation);
                self.control_receipts
                    .insert(receipt.clone(), ControlReceipt::Unsubscribed(done));
                let frame = Frame::new(Command::Unsubscribe)
                    .with_header("id", id)
                    .with_header("receipt", receipt);
                self.write(conn, StompItem::Frame(frame)).await
            }
            Request::Ack {
                ack_id,
                generation,
                nack,
            } => {
                if generation != conn.generation {
                    log::debug!("dropping ACK of a message from connection {generation}");
                    return Ok(());
                }
                let command = if nack { Command::Nack } else { Command::Ack };
                self.write(
                    conn,
                    StompItem::Frame(Frame::new(command).with_header("id", ack_id)),
                )
                .await
            }
            Request::Shutdown { .. } => unreachable!("handled in serve"),
        }
    }

    fn on_frame(&mut self, frame: Frame, generation: u64) -> Result<(), String> {
        match frame.command {
            Command::Message => {
                let Some(subscription) = frame.header("subscription").map(str::to_owned) else {
                    log::error!("MESSAGE without a subscription header ignored: {frame:?}");
                    return Ok(());
                };
                if !self.subscriptions.contains_key(&subscription) {
                    log::debug!("MESSAGE for ended subscription {subscription} ignored");
                    return Ok(());
                }
                self.emit(SessionEvent::Message(Message {
                    frame,
                    subscription,
                    generation,
                }));
                Ok(())
            }
            Command::Receipt => {
                let Some(id) = frame.header("receipt-id") else {
                    log::error!("RECEIPT without receipt-id ignored");
                    return Ok(());
                };
                self.on_receipt(id);
                Ok(())
            }
            Command::Error => {
                let message = frame.header("message").unwrap_or("(no message)").to_owned();
                let body = String::from_utf8_lossy(&frame.body).trim().to_owned();
                log::error!("the broker sent ERROR: {message} {body}");
                self.emit(SessionEvent::BrokerError {
                    message: message.clone(),
                    body,
                });
                Err(format!("the broker sent ERROR: {message}"))
            }
            other => {
                log::error!("unexpected {other} frame from the broker ignored");
                Ok(())
            }
        }
    }

    fn on_receipt(&mut self, id: &str) {
        if let Some(seq) = id.strip_prefix("p-").and_then(|s| s.parse::<u64>().ok()) {
            if let Some(pending) = self.pending.remove(&seq) {
                if let Some(waiter) = pending.waiter {
                    let _ = waiter.send(Ok(()));
                }
            }
            return;
        }
        match self.control_receipts.remove(id) {
            Some(ControlReceipt::Subscribed(sub)) => {
                if let Some(entry) = self.subscriptions.get_mut(&sub) {
                    for waiter in entry.waiters.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                }
            }
            Some(ControlReceipt::Unsubscribed(done)) => {
                let _ = done.send(Ok(()));
            }
            Some(ControlReceipt::Disconnected) => {}
            None => log::debug!("RECEIPT {id} matches nothing pending"),
        }
    }

    async fn disconnect_gracefully(&mut self, conn: &mut Connection) {
        let receipt = "d-0".to_owned();
        self.control_receipts
            .insert(receipt.clone(), ControlReceipt::Disconnected);
        let frame = Frame::new(Command::Disconnect).with_header("receipt", receipt.clone());
        if self.write(conn, StompItem::Frame(frame)).await.is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(Some(Ok(item))) = tokio::time::timeout_at(deadline, conn.incoming.recv()).await
        {
            if let StompItem::Frame(frame) = item {
                if frame.command == Command::Receipt && frame.header("receipt-id") == Some(&receipt)
                {
                    return;
                }
                let _ = self.on_frame(frame, conn.generation);
            }
        }
    }

    async fn write(&mut self, conn: &mut Connection, item: StompItem) -> Result<(), String> {
        let timeout = self.config.write_timeout;
        match tokio::time::timeout(timeout, conn.writer.send(item)).await {
            Ok(Ok(())) => {
                conn.last_tx = Instant::now();
                Ok(())
            }
            Ok(Err(CodecError::FrameTooLarge { size, limit })) => {
                log::error!("refusing to send a frame of {size} bytes (limit {limit})");
                Ok(())
            }
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err(format!("a write did not finish within {timeout:?}")),
        }
    }
}

/// A copy of a pending frame carrying its receipt header.
fn receipted(frame: &Frame, seq: u64) -> Frame {
    let mut frame = frame.clone();
    frame.set_header("receipt", format!("p-{seq}"));
    frame
}

async fn read_frames(
    mut reader: FramedRead<ReadHalf<Box<dyn Io>>, StompCodec>,
    tx: mpsc::UnboundedSender<Incoming>,
) {
    while let Some(item) = reader.next().await {
        let failed = item.is_err();
        if tx.send(item).is_err() || failed {
            return;
        }
    }
}

async fn open_stream(
    address: &BrokerAddress,
    tls: Option<&TlsSettings>,
) -> Result<Box<dyn Io>, String> {
    let stream = TcpStream::connect((address.host.as_str(), address.port))
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    // Without TCP_NODELAY an ACK followed by a SEND waits ~40 ms for Nagle's algorithm.
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        log::debug!("TCP keep-alive not set: {e}");
    }
    if !address.tls {
        return Ok(Box::new(stream));
    }
    tls_stream(stream, address, tls).await
}

#[cfg(feature = "tls")]
async fn tls_stream(
    stream: TcpStream,
    address: &BrokerAddress,
    tls: Option<&TlsSettings>,
) -> Result<Box<dyn Io>, String> {
    let settings = tls.ok_or("a stomp+ssl address needs TLS settings (a CA file)")?;
    let connector = tls_connector(settings).map_err(|e| e.to_string())?;
    let name = settings
        .server_name
        .clone()
        .unwrap_or_else(|| address.host.clone());
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| format!("invalid TLS server name {name:?}: {e}"))?;
    let stream = connector
        .connect(server_name, stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(Box::new(stream))
}

#[cfg(not(feature = "tls"))]
async fn tls_stream(
    _stream: TcpStream,
    _address: &BrokerAddress,
    _tls: Option<&TlsSettings>,
) -> Result<Box<dyn Io>, String> {
    Err("this build has no TLS support (feature `tls`)".into())
}

/// Builds a TLS connector trusting the CA certificates of `settings.ca_file`.
#[cfg(feature = "tls")]
pub fn tls_connector(settings: &TlsSettings) -> Result<tokio_rustls::TlsConnector, StompError> {
    let pem = std::fs::read(&settings.ca_file)
        .map_err(|e| StompError::Tls(format!("cannot read {}: {e}", settings.ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| StompError::Tls(format!("bad PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| StompError::Tls(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(StompError::Tls(format!(
            "{} holds no certificate",
            settings.ca_file.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StompError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Parses a `heart-beat:x,y` header into durations (0 = none).
fn parse_heart_beat(value: Option<&str>) -> (Duration, Duration) {
    let Some((x, y)) = value.and_then(|v| v.split_once(',')) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let ms = |s: &str| Duration::from_millis(s.trim().parse().unwrap_or(0));
    (ms(x), ms(y))
}

/// STOMP 1.2 heart-beat negotiation: the larger of the two wishes, unless either is 0.
fn negotiate(ours: Duration, theirs: Duration) -> Option<Duration> {
    if ours.is_zero() || theirs.is_zero() {
        None
    } else {
        Some(ours.max(theirs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse() {
        assert_eq!(
            BrokerAddress::parse("stomp://127.0.0.1:61613").unwrap(),
            BrokerAddress::tcp("127.0.0.1", 61613)
        );
        let tls = BrokerAddress::parse("stomp+ssl://[::1]:61615/").unwrap();
        assert_eq!((tls.host.as_str(), tls.port, tls.tls), ("::1", 61615, true));
        assert_eq!(BrokerAddress::parse("localhost:1").unwrap().port, 1);
        for bad in [
            "http://x:1",
            "stomp://x",
            "stomp://:1",
            "stomp://x:0",
            "x:99999",
        ] {
            assert!(BrokerAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn heart_beats_negotiate_as_the_spec_says() {
        assert_eq!(
            parse_heart_beat(Some("0,10000")),
            (Duration::ZERO, Duration::from_secs(10))
        );
        assert_eq!(parse_heart_beat(None), (Duration::ZERO, Duration::ZERO));
        assert_eq!(
            parse_heart_beat(Some("junk")),
            (Duration::ZERO, Duration::ZERO)
        );
        let s = Duration::from_secs;
        assert_eq!(negotiate(s(10), s(4)), Some(s(10)));
        assert_eq!(negotiate(s(1), s(4)), Some(s(4)));
        assert_eq!(negotiate(s(0), s(4)), None);
        assert_eq!(negotiate(s(4), s(0)), None);
    }

    #[test]
    fn size_estimate_is_an_upper_bound() {
        let frame = Frame::new(Command::Send)
            .with_header("destination", "/queue/a:b\\c")
            .with_body(vec![0u8; 1000]);
        let exact = crate::stomp::codec::encode_frame(&frame, usize::MAX)
            .unwrap()
            .len();
        assert!(encoded_len_estimate(&frame) >= exact);
    }
}
