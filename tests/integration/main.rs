//! Integration tests of vmcontroller, built as one binary.
//!
//! Every test talks to real brokers started by `deploy/brokers/` (see the harness in
//! `tests/src/lib.rs`); a test that needs a broker starts it or fails loudly.

mod malformed;
mod transport;
