//! Integration tests of vmcontroller, built as one binary.
//!
//! Every test talks to real brokers started by `deploy/brokers/` (see the harness in
//! `tests/src/lib.rs`); a test that needs a broker starts it or fails loudly.

// In tests an unwrap that fails is the test failing, with its location.
#![allow(clippy::unwrap_used)]

mod guest;
mod host;
mod malformed;
mod restart;
mod transport;
