//! How the guest agent's parts hand messages to the broker session.
//!
//! The executor, the file transfer endpoints and the presence beacons do not own the
//! STOMP session: they push [`Reply`]s into a channel that the agent's main loop
//! drains, encodes with `vmc_protocol::words::encode` and sends (with a receipt when
//! the word is persistent). The channel itself is unbounded, so that a sender that
//! is not async never blocks, but bulk output is paced: [`ReplySender::send_paced`]
//! takes one of [`OUTPUT_CREDIT`] credits that the main loop gives back when it has
//! handed the message to the session. A command writing faster than the broker
//! takes its output therefore blocks in its pipe instead of filling the agent's
//! memory. File chunks need no credit: the transfer window already bounds them.

use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use vmc_protocol::words::Message;

/// Paced messages (command output chunks) that may wait in the channel at once:
/// at most 64 × 64 KiB = 4 MiB.
pub const OUTPUT_CREDIT: usize = 64;

/// The agent's main loop is gone (it is shutting down): the reply was dropped.
#[derive(Debug, thiserror::Error)]
#[error("the agent no longer takes replies")]
pub struct AgentGone;

/// A message for one destination (normally the `reply-to` of the request).
#[derive(Debug)]
pub struct Reply {
    /// The STOMP destination, e.g. `/queue/vmc.host.h1`.
    pub destination: String,
    pub message: Message,
    /// The pacing credit of a paced message, returned when the reply is dropped.
    credit: Option<OwnedSemaphorePermit>,
}

impl Reply {
    /// A reply to `destination`.
    pub fn new(destination: impl Into<String>, message: Message) -> Reply {
        Reply {
            destination: destination.into(),
            message,
            credit: None,
        }
    }
}

/// The sending side, cloned into every part of the agent.
#[derive(Clone, Debug)]
pub struct ReplySender {
    tx: mpsc::UnboundedSender<Reply>,
    credit: Arc<Semaphore>,
}

impl ReplySender {
    /// Queues a reply at once; fails only when the agent is going away.
    pub fn send(&self, reply: Reply) -> Result<(), AgentGone> {
        self.tx.send(reply).map_err(|_| AgentGone)
    }

    /// Queues a reply once one of the [`OUTPUT_CREDIT`] credits is free.
    pub async fn send_paced(&self, mut reply: Reply) -> Result<(), AgentGone> {
        // The semaphore is never closed, so acquiring fails only in theory.
        reply.credit = Some(
            self.credit
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| AgentGone)?,
        );
        self.send(reply)
    }
}

/// The receiving side, owned by the agent's main loop.
pub type ReplyReceiver = mpsc::UnboundedReceiver<Reply>;

/// A new reply channel.
pub fn channel() -> (ReplySender, ReplyReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        ReplySender {
            tx,
            credit: Arc::new(Semaphore::new(OUTPUT_CREDIT)),
        },
        rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(n: usize) -> Message {
        Message::Ping {
            ping_id: n.to_string(),
        }
    }

    #[tokio::test]
    async fn paced_sends_wait_for_credit_and_plain_sends_never_do() {
        let (tx, mut rx) = channel();
        for n in 0..OUTPUT_CREDIT {
            tx.send_paced(Reply::new("/queue/a", ping(n)))
                .await
                .unwrap();
        }
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            tx.send_paced(Reply::new("/queue/a", ping(99))),
        )
        .await;
        assert!(blocked.is_err(), "the credit is used up");
        tx.send(Reply::new("/queue/a", ping(100))).unwrap();
        drop(rx.recv().await); // handing one over returns its credit
        tx.send_paced(Reply::new("/queue/a", ping(101)))
            .await
            .unwrap();
    }
}
