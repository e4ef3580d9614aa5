//! The broker connection actor: owns the host's STOMP session.
//!
//! It subscribes to this host's reply queue and to the guests' connections topic,
//! decodes every message, hands it to the registry and acknowledges it to the broker
//! only once the registry has dealt with it (so a message whose effect was not yet
//! stored is delivered again after a crash). Other actors send [`Publish`] to talk to
//! guests; persistent words are sent with a receipt and `Publish` answers once the
//! broker confirmed them. Reconnections are the session's business: other actors
//! see them only as delays; the actor counts them for [`BrokerStatus`] (health and
//! metrics).

use super::registry::{Incoming, Registry};
use super::EngineError;
use actix::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
use vmc_protocol::stomp::session::LinkState;
use vmc_protocol::stomp::{SessionEvent, StompClient, Subscription};
use vmc_protocol::words::{self, Message as Word};

/// The STOMP session actor.
#[derive(Debug)]
pub struct BrokerActor {
    client: StompClient,
    events: Option<tokio::sync::mpsc::UnboundedReceiver<SessionEvent>>,
    host_id: HostId,
    destinations: Destinations,
    max_frame_size: usize,
    registry: Addr<Registry>,
    counters: Arc<LinkCounters>,
    /// Becomes true once both subscriptions are confirmed by the broker.
    subscribed: tokio::sync::watch::Sender<bool>,
}

/// What the session's events told so far, counted by the event loop.
#[derive(Debug, Default)]
struct LinkCounters {
    connects: AtomicU64,
    disconnects: AtomicU64,
    connect_failures: AtomicU64,
    /// The broker of the last connection that came up.
    address: Mutex<Option<String>>,
}

/// The broker connection as health checks and metrics see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerStatus {
    pub link: LinkState,
    /// The broker of the current (or last) connection, `stomp://host:port`.
    pub address: Option<String>,
    /// Connections that came up since the host agent started; every one after the
    /// first is a reconnection.
    pub connects: u64,
    /// Connections that went down.
    pub disconnects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
}

impl BrokerStatus {
    /// Connections after the first.
    pub fn reconnects(&self) -> u64 {
        self.connects.saturating_sub(1)
    }
}

impl BrokerActor {
    /// Starts the session (it connects in the background).
    pub fn new(
        session: vmc_protocol::stomp::SessionConfig,
        host_id: HostId,
        destinations: Destinations,
        registry: Addr<Registry>,
    ) -> BrokerActor {
        let max_frame_size = session.max_frame_size;
        let (client, events) = StompClient::start(session);
        BrokerActor {
            client,
            events: Some(events),
            host_id,
            destinations,
            max_frame_size,
            registry,
            counters: Arc::default(),
            subscribed: tokio::sync::watch::channel(false).0,
        }
    }

    /// The queue replies to this host go to.
    pub fn host_queue(&self) -> String {
        self.destinations.host_queue(&self.host_id)
    }
}

impl Actor for BrokerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let client = self.client.clone();
        let registry = self.registry.clone();
        let queue = self.host_queue();
        let topic = self.destinations.connections_topic();
        let subscribed = self.subscribed.clone();
        let subscriber = client.clone();
        // Every guest says HELLO when asked: a host that (re)connects learns at once
        // who its guests are and what they run on, not at their next periodic HELLO.
        let me = ctx.address();
        let multicast = self.destinations.multicast_topic();
        let say_hello = move || {
            me.do_send(Publish {
                destination: multicast.clone(),
                word: Word::SayHello,
                to: Some("*".to_owned()),
                confirm: false,
            });
        };
        let first_hello = say_hello.clone();
        actix::spawn(async move {
            for destination in [queue, topic] {
                let subscription = Subscription::new(&destination).with_prefetch(Some(512));
                if let Err(e) = subscriber.subscribe(subscription).await {
                    log::error!("cannot subscribe to {destination}: {e}");
                    return;
                }
            }
            let _ = subscribed.send(true);
            first_hello();
        });
        let resubscribed = self.subscribed.subscribe();
        let Some(mut events) = self.events.take() else {
            return;
        };
        let counters = self.counters.clone();
        actix::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    SessionEvent::Message(message) => {
                        match words::decode(&message.frame) {
                            Ok(envelope) => {
                                if let Err(e) = registry.send(Incoming { envelope }).await {
                                    log::error!("the registry did not take a guest message: {e}");
                                    continue; // not acknowledged: the broker delivers it again
                                }
                            }
                            Err(e) => log::warn!(
                                "ignoring a message on {:?} that is not protocol: {e}",
                                message.destination()
                            ),
                        }
                        if let Err(e) = client.ack(&message).await {
                            log::debug!("cannot acknowledge: {e}");
                        }
                    }
                    SessionEvent::Connected {
                        address,
                        generation,
                        ..
                    } => {
                        log::info!("broker connection {generation} to {address} is up");
                        counters.connects.fetch_add(1, Ordering::Relaxed);
                        // A reconnection (the session restored the subscriptions
                        // already); after the first, the subscriber above asks.
                        if *resubscribed.borrow() {
                            say_hello();
                        }
                        *counters
                            .address
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(address.to_string());
                    }
                    SessionEvent::Disconnected { reason, .. } => {
                        log::warn!("broker connection lost: {reason}");
                        counters.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    SessionEvent::ConnectFailed {
                        address,
                        reason,
                        retry_in,
                    } => {
                        counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                        log::warn!("cannot reach the broker at {address}: {reason}; retrying in {retry_in:?}");
                    }
                    SessionEvent::BrokerError { message, body } => {
                        log::error!("the broker reported: {message} {body}");
                    }
                }
            }
        });
    }
}

/// Waits (up to `timeout`) until the host's subscriptions are confirmed, so that
/// guests started after the engine are heard from their first HELLO. Answers
/// whether they were; a broker that is down only delays them.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct WaitSubscribed {
    pub timeout: std::time::Duration,
}

impl Handler<WaitSubscribed> for BrokerActor {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: WaitSubscribed, _ctx: &mut Context<Self>) -> Self::Result {
        let mut subscribed = self.subscribed.subscribe();
        Box::pin(async move {
            tokio::time::timeout(msg.timeout, subscribed.wait_for(|done| *done))
                .await
                .is_ok_and(|waited| waited.is_ok())
        })
    }
}

/// Sends one protocol word.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Publish {
    pub destination: String,
    pub word: Word,
    /// The `to` header (a guest id or glob), for CMD_RUN and multicast.
    pub to: Option<String>,
    /// Wait for the broker's receipt (persistent words only).
    pub confirm: bool,
}

impl Handler<Publish> for BrokerActor {
    type Result = ResponseFuture<Result<(), EngineError>>;

    fn handle(&mut self, msg: Publish, _ctx: &mut Context<Self>) -> Self::Result {
        let from = format!("host:{}", self.host_id.as_str());
        let reply_to = self.host_queue();
        let encoded = words::encode(&msg.word, &from, Some(&reply_to), self.max_frame_size);
        let client = self.client.clone();
        Box::pin(async move {
            let mut frame =
                encoded.map_err(|e| EngineError::Internal(format!("cannot encode: {e}")))?;
            frame.set_header("destination", msg.destination.clone());
            if let Some(to) = msg.to {
                frame.set_header(words::header::TO, to);
            }
            let broken =
                |e| EngineError::Internal(format!("cannot send to {}: {e}", msg.destination));
            if msg.word.kind().is_persistent() {
                let receipt = client.queue_with_receipt(frame).await.map_err(broken)?;
                if msg.confirm {
                    receipt.wait().await.map_err(broken)?;
                }
                Ok(())
            } else {
                client.send(frame).await.map_err(broken)
            }
        })
    }
}

/// Tells where the broker connection stands.
#[derive(Debug, Message)]
#[rtype(result = "BrokerStatus")]
pub struct GetBrokerStatus;

impl Handler<GetBrokerStatus> for BrokerActor {
    type Result = MessageResult<GetBrokerStatus>;

    fn handle(&mut self, _msg: GetBrokerStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let counters = &self.counters;
        MessageResult(BrokerStatus {
            link: self.client.link_state(),
            address: counters
                .address
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            connects: counters.connects.load(Ordering::Relaxed),
            disconnects: counters.disconnects.load(Ordering::Relaxed),
            connect_failures: counters.connect_failures.load(Ordering::Relaxed),
        })
    }
}

/// Closes the session cleanly.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CloseSession;

impl Handler<CloseSession> for BrokerActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: CloseSession, _ctx: &mut Context<Self>) -> Self::Result {
        let client = self.client.clone();
        Box::pin(async move {
            let _ = client.shutdown().await;
        })
    }
}
