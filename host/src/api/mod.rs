//! The host agent's API: one set of operations over the [`Engine`], and the
//! encodings that put them on the network.
//!
//! [`ops`] implements each operation once (argument checks, defaults, how a result
//! is composed from the engine's records) with typed inputs and outputs; the
//! encodings only translate. [`xmlrpc`] is the original VMController's surface
//! (`POST /RPC2` and `POST /`), kept name for name so 2010 clients work unchanged;
//! [`json`] is the resource-style JSON API under `/api/v1` beside it, with the live
//! [`events`] stream, and [`metrics`] serves `/healthz` and `/metrics`.
//! [`configure`] is the one route table, used by [`server::serve`] and by tests
//! alike, and [`FaultCode`] the stable error codes every encoding reports.
//! What this module does not do: run anything itself (the engine's actors do), or
//! authenticate callers (the listener is loopback by default, as the original's).

pub mod events;
pub mod json;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod xmlrpc;

use crate::engine::Engine;
use actix_web::web;

/// The largest request body any route accepts; larger ones are answered 413.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// The one route table: every API route on one listener, sharing one engine.
pub fn configure(cfg: &mut web::ServiceConfig, engine: Engine) {
    cfg.app_data(web::Data::new(engine));
    xmlrpc::configure(cfg);
    json::configure(cfg);
}

/// The stable error codes of the API, one per kind of failure a caller can act on.
///
/// XML-RPC reports them as `faultCode`, JSON as `error.code` (with `error.name`). Positive codes are about the operation
/// (its VM, command, arguments, hypervisor); the negative ones are the XML-RPC
/// interoperability codes for requests that never reached an operation. A code
/// never changes meaning; new kinds get new codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultCode {
    UnknownVm,
    BadArgument,
    Timeout,
    GuestUnreachable,
    HypervisorFailure,
    NotSupported,
    Internal,
    UnknownCommand,
    UnknownTransfer,
    VmExists,
    NotFinished,
    InvalidState,
    UnknownSnapshot,
    SnapshotExists,
    TransferFailed,
    MalformedRequest,
    UnknownMethod,
    InvalidParams,
}

impl FaultCode {
    /// Every code, in the order of the documentation.
    pub const ALL: [FaultCode; 18] = [
        FaultCode::UnknownVm,
        FaultCode::BadArgument,
        FaultCode::Timeout,
        FaultCode::GuestUnreachable,
        FaultCode::HypervisorFailure,
        FaultCode::NotSupported,
        FaultCode::Internal,
        FaultCode::UnknownCommand,
        FaultCode::UnknownTransfer,
        FaultCode::VmExists,
        FaultCode::NotFinished,
        FaultCode::InvalidState,
        FaultCode::UnknownSnapshot,
        FaultCode::SnapshotExists,
        FaultCode::TransferFailed,
        FaultCode::MalformedRequest,
        FaultCode::UnknownMethod,
        FaultCode::InvalidParams,
    ];

    /// The number callers test for.
    pub fn code(self) -> i32 {
        match self {
            FaultCode::UnknownVm => 1,
            FaultCode::BadArgument => 2,
            FaultCode::Timeout => 3,
            FaultCode::GuestUnreachable => 4,
            FaultCode::HypervisorFailure => 5,
            FaultCode::NotSupported => 6,
            FaultCode::Internal => 7,
            FaultCode::UnknownCommand => 8,
            FaultCode::UnknownTransfer => 9,
            FaultCode::VmExists => 10,
            FaultCode::NotFinished => 11,
            FaultCode::InvalidState => 12,
            FaultCode::UnknownSnapshot => 13,
            FaultCode::SnapshotExists => 14,
            FaultCode::TransferFailed => 15,
            FaultCode::MalformedRequest => -32700,
            FaultCode::UnknownMethod => -32601,
            FaultCode::InvalidParams => -32602,
        }
    }

    /// A short name for the code, e.g. `unknown-vm`.
    pub fn name(self) -> &'static str {
        match self {
            FaultCode::UnknownVm => "unknown-vm",
            FaultCode::BadArgument => "bad-argument",
            FaultCode::Timeout => "timeout",
            FaultCode::GuestUnreachable => "guest-unreachable",
            FaultCode::HypervisorFailure => "hypervisor-failure",
            FaultCode::NotSupported => "not-supported",
            FaultCode::Internal => "internal",
            FaultCode::UnknownCommand => "unknown-command",
            FaultCode::UnknownTransfer => "unknown-transfer",
            FaultCode::VmExists => "vm-exists",
            FaultCode::NotFinished => "not-finished",
            FaultCode::InvalidState => "invalid-state",
            FaultCode::UnknownSnapshot => "unknown-snapshot",
            FaultCode::SnapshotExists => "snapshot-exists",
            FaultCode::TransferFailed => "transfer-failed",
            FaultCode::MalformedRequest => "malformed-request",
            FaultCode::UnknownMethod => "unknown-method",
            FaultCode::InvalidParams => "invalid-params",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn fault_codes_and_names_are_unique() {
        let codes: HashSet<i32> = FaultCode::ALL.iter().map(|c| c.code()).collect();
        let names: HashSet<&str> = FaultCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(codes.len(), FaultCode::ALL.len());
        assert_eq!(names.len(), FaultCode::ALL.len());
    }

    #[test]
    fn every_fault_code_is_documented() {
        let doc = include_str!("../../../docs/API.md");
        for code in FaultCode::ALL {
            let row = format!("| {} | `{}` |", code.code(), code.name());
            assert!(doc.contains(&row), "docs/API.md lacks the row {row:?}");
        }
    }
}
