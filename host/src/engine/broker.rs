//! The broker connection actor: owns the host's STOMP session.
//!
//! It subscribes to this host's reply queue and to the guests' connections topic,
//! decodes every message, hands it to the registry and acknowledges it to the broker
//! only once the registry has dealt with it (so a message whose effect was not yet
//! stored is delivered again after a crash). Other actors send [`Publish`] to talk to
//! guests; persistent words are sent with a receipt and `Publish` answers once the
//! broker confirmed them. Reconnections are the session's business: other actors
//! see them only as delays.

use super::registry::{Incoming, Registry};
use super::EngineError;
use actix::prelude::*;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
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
        }
    }

    /// The queue replies to this host go to.
    pub fn host_queue(&self) -> String {
        self.destinations.host_queue(&self.host_id)
    }
}

impl Actor for BrokerActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        let client = self.client.clone();
        let registry = self.registry.clone();
        let queue = self.host_queue();
        let topic = self.destinations.connections_topic();
        for destination in [queue, topic] {
            let client = client.clone();
            actix::spawn(async move {
                let subscription = Subscription::new(&destination).with_prefetch(Some(512));
                if let Err(e) = client.subscribe(subscription).await {
                    log::error!("cannot subscribe to {destination}: {e}");
                }
            });
        }
        let Some(mut events) = self.events.take() else {
            return;
        };
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
                    }
                    SessionEvent::Disconnected { reason, .. } => {
                        log::warn!("broker connection lost: {reason}");
                    }
                    SessionEvent::ConnectFailed {
                        address,
                        reason,
                        retry_in,
                    } => {
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
