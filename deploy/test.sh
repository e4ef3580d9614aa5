#!/usr/bin/env bash
# deploy/test.sh -- the project's one test command (README "Run every test").
#
# On a fresh Debian 12 machine (root, no systemd) it installs what the tests need,
# starts the real brokers (RabbitMQ with STOMP on 127.0.0.1:61613, ActiveMQ on
# 127.0.0.1:61614), installs QEMU and builds the tiny test guest, then checks
# formatting, runs clippy with warnings as errors, runs every test of the workspace
# against those brokers and real QEMU VMs, and finally the API's interoperability
# tests with Python's standard xmlrpc.client against a real vmc-host process, and
# the end-to-end suite on real QEMU VMs booted from the guest image
# (deploy/guest-image/build.sh; the first run builds it, ~4 minutes).
# The two brokers are test brokers: their queues and messages are deleted first
# (`reset`), because every run leaves durable queues behind (each test and
# benchmark uses its own queue names) and a RabbitMQ holding tens of thousands
# of them takes minutes to start. VMC_TEST_KEEP_BROKER_DATA=1 keeps them.
# Brokers started here keep running afterwards (stop them with
# deploy/brokers/down.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "brokers"
if [[ ${VMC_TEST_KEEP_BROKER_DATA:-0} != 1 ]]; then
    bash deploy/brokers/rabbitmq.sh reset
    bash deploy/brokers/activemq.sh reset
fi
bash deploy/brokers/up.sh

step "QEMU, libvirt and the tiny test guest"
bash deploy/qemu/install.sh
bash deploy/libvirt/install.sh
bash deploy/qemu/tiny-guest.sh "${CARGO_TARGET_DIR:-target}/tmp/tiny-guest"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the agents' binaries (the integration tests start them as processes)"
cargo build --workspace --bins --locked

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    # Each test in its own process, two at a time (the machine has two cores and
    # the broker-restart tests are slow rather than busy).
    cargo nextest run --workspace --locked --no-fail-fast --test-threads 4
    # nextest does not run doctests.
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked --no-fail-fast
fi

step "API interoperability (Python's standard clients against a real vmc-host)"
bash tests/python/run.sh

step "end to end on real QEMU VMs (guest image, vmc-host with the QEMU backend, xmlrpc.client)"
bash tests/vm/run.sh

step "benchmarks, short mode (checks that they run; figures are in BENCHMARKS.md)"
cargo run --locked -p vmc-bench -- --short
