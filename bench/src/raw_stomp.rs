//! The broker's own ceiling for moving bytes: a minimal STOMP publisher and
//! consumer (`vmc_protocol::stomp`, two sessions, so two connections like a host
//! and a guest) push the same number of bytes through one queue in frames of the
//! transfer protocol's chunk size, as the transfer's `FILE_CHUNK`s go: persistent,
//! each SEND receipted, the consumer acknowledging each message individually. No
//! protocol word, no file, no digest, no acknowledgement travelling back through
//! the broker: the publisher only stops when `window` chunks are published but
//! not yet consumed, a limit kept in memory between the two ends.

use crate::BenchError;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use vmc_protocol::stomp::{
    BrokerAddress, Command, Frame, SessionConfig, SessionEvent, StompClient, Subscription,
};

/// Unacknowledged messages the consumer's subscription takes at once (the guest
/// agent's own prefetch).
const PREFETCH: u32 = 64;

/// Pushes `bytes` through a fresh queue on the broker at `port` in frames of
/// `chunk` bytes; returns the time from the first SEND until the consumer had
/// every byte and the publisher every receipt. Call from a tokio runtime.
pub async fn push(
    port: u16,
    bytes: u64,
    chunk: usize,
    window: usize,
) -> Result<Duration, BenchError> {
    let stomp = |e: &dyn std::fmt::Display| BenchError::Stomp(e.to_string());
    let config = || {
        let mut config = SessionConfig::new(BrokerAddress::tcp("127.0.0.1", port))
            .with_credentials("guest", "guest");
        config.max_frame_size = config.max_frame_size.max(chunk + 64 * 1024);
        config
    };
    let queue = format!("/queue/{}", crate::run_tag("raw"));
    let (consumer, mut events) = StompClient::start(config());
    consumer
        .subscribe(Subscription::new(&queue).with_prefetch(Some(PREFETCH)))
        .await
        .map_err(|e| stomp(&e))?;
    let (publisher, _publisher_events) = StompClient::start(config());
    publisher.wait_connected().await;

    let (consumed_tx, mut consumed_rx) = tokio::sync::watch::channel(0u64);
    let receiver = tokio::spawn(async move {
        let mut received = 0u64;
        while received < bytes {
            match events.recv().await {
                Some(SessionEvent::Message(message)) => {
                    received += message.frame.body.len() as u64;
                    consumer.ack(&message).await.map_err(|e| e.to_string())?;
                    let _ = consumed_tx.send(received);
                }
                Some(SessionEvent::BrokerError { message, body }) => {
                    return Err(format!("the broker sent ERROR {message}: {body}"));
                }
                Some(_) => {}
                None => return Err("the consumer's session ended".to_owned()),
            }
        }
        let _ = consumer.shutdown().await;
        Ok(Instant::now())
    });

    let template = Frame::new(Command::Send)
        .with_header("destination", queue.as_str())
        .with_header("persistent", "true")
        .with_header("content-type", "application/octet-stream")
        .with_body(vec![0xa5u8; chunk]);
    let start = Instant::now();
    let mut receipts = VecDeque::new();
    let mut sent = 0u64;
    let in_flight = (window * chunk) as u64;
    while sent < bytes {
        let n = (chunk as u64).min(bytes - sent);
        let mut frame = template.clone();
        if n < chunk as u64 {
            frame.body = frame.body.slice(..n as usize);
        }
        receipts.push_back(
            publisher
                .queue_with_receipt(frame)
                .await
                .map_err(|e| stomp(&e))?,
        );
        sent += n;
        while sent - *consumed_rx.borrow() > in_flight {
            if consumed_rx.changed().await.is_err() {
                break; // the consumer ended: its result says why
            }
        }
        // Keep the receipts awaited as they come, so none piles up unseen.
        while receipts.len() > window {
            if let Some(receipt) = receipts.pop_front() {
                receipt.wait().await.map_err(|e| stomp(&e))?;
            }
        }
    }
    for receipt in receipts {
        receipt.wait().await.map_err(|e| stomp(&e))?;
    }
    let done = match tokio::time::timeout(Duration::from_secs(600), receiver).await {
        Ok(Ok(Ok(done))) => done,
        Ok(Ok(Err(e))) => return Err(BenchError::Stomp(e)),
        Ok(Err(e)) => return Err(stomp(&e)),
        Err(_) => {
            return Err(BenchError::Timeout {
                what: "the raw consumer to receive every byte".into(),
                secs: 600.0,
            })
        }
    };
    let _ = publisher.shutdown().await;
    Ok(done.max(Instant::now()) - start)
}
