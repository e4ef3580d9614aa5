//! A small STOMP 1.2 client for tokio (and therefore for actix, which runs on tokio).
//!
//! [`frame`] is the frame type, [`codec`] turns bytes into frames and back (escaping,
//! binary bodies with `content-length`, heart-beat EOLs, a size limit), and
//! [`session`] keeps one logical connection to a broker alive across broker restarts:
//! heart-beats and silent-peer detection, receipts, client-individual ACK/NACK,
//! re-subscription and re-sending of unreceipted frames after a reconnect.
//! It deliberately implements only the client side and only what both RabbitMQ's
//! STOMP plugin and ActiveMQ accept; transactions (BEGIN/COMMIT/ABORT) are not used.

pub mod codec;
pub mod frame;
pub mod session;

pub use codec::{CodecError, StompCodec, StompItem};
pub use frame::{Command, Frame};
pub use session::{
    AckMode, BrokerAddress, Message, SessionConfig, SessionEvent, StompClient, StompError,
    Subscription,
};
