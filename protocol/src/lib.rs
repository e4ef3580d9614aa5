//! The wire protocol of vmcontroller, shared by the host agent and the guest agent.
//!
//! This crate owns everything that crosses the broker: the STOMP 1.2 client the
//! agents use ([`stomp`]), the protocol words carried in STOMP bodies ([`words`]),
//! how destinations (queues and topics) are named ([`destinations`]) and guest
//! identities ([`identity`]), and what both agents' `main` share ([`agent_main`]).
//! It knows nothing of actix, HTTP, SQLite or
//! hypervisors; agents convert these plain types to their own at the boundary.
//! `docs/PROTOCOL.md` at the repository root is the normative description.

pub mod agent_main;
pub mod destinations;
pub mod glob;
pub mod identity;
pub mod stomp;
pub mod words;

/// The protocol version spoken by this build, carried in the `vmc-protocol` header.
///
/// Version 0 is the original Python VMController, which sent no such header.
pub const PROTOCOL_VERSION: u32 = 1;
