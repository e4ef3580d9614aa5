//! `vmc-host relay HOST:PORT`, the program QEMU runs for each guest connection to
//! the broker, as QEMU runs it: the guest's side a TCP socket on its standard input,
//! output and error.

#![allow(clippy::unwrap_used)] // a test fails loudly on any setup error

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A relay to `target` whose standard input/output/error is one end of a loopback
/// TCP connection, like QEMU's; returns it and the other end (the guest's side).
fn relay_to(target: &str) -> (Child, TcpStream) {
    let pair = TcpListener::bind("127.0.0.1:0").expect("bind");
    let guest = TcpStream::connect(pair.local_addr().unwrap()).expect("connect");
    let (relay_end, _) = pair.accept().expect("accept");
    let fd = OwnedFd::from(relay_end);
    let child = Command::new(env!("CARGO_BIN_EXE_vmc-host"))
        .args(["relay", target])
        .stdin(Stdio::from(fd.try_clone().unwrap()))
        .stdout(Stdio::from(fd.try_clone().unwrap()))
        .stderr(Stdio::from(fd))
        .spawn()
        .expect("start vmc-host relay");
    guest
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (child, guest)
}

/// Waits up to 10 s for `child` to exit; its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the relay did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bytes_pass_both_ways_and_the_relay_ends_with_the_broker() {
    let broker = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut relay, mut guest) = relay_to(&broker.local_addr().unwrap().to_string());
    let (broker_side, _) = broker.accept().expect("the relay connects to the broker");
    broker_side
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut from_guest = BufReader::new(broker_side.try_clone().unwrap());
    let mut to_guest = broker_side;

    // Many small frames each way, as a STOMP session sends them.
    let mut guest_reader = BufReader::new(guest.try_clone().unwrap());
    for i in 0..50 {
        guest.write_all(format!("SEND {i}\n").as_bytes()).unwrap();
        let mut line = String::new();
        from_guest.read_line(&mut line).unwrap();
        assert_eq!(line, format!("SEND {i}\n"));
        to_guest
            .write_all(format!("RECEIPT {i}\n").as_bytes())
            .unwrap();
        to_guest
            .write_all(format!("MESSAGE {i}\n").as_bytes())
            .unwrap();
        for word in ["RECEIPT", "MESSAGE"] {
            line.clear();
            guest_reader.read_line(&mut line).unwrap();
            assert_eq!(line, format!("{word} {i}\n"));
        }
    }
    // A large body arrives whole and in order.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    to_guest.write_all(&big).unwrap();
    let mut got = vec![0u8; big.len()];
    guest_reader.read_exact(&mut got).unwrap();
    assert!(got == big, "the body changed on its way");

    // The broker goes away: the guest sees its connection end, the relay exits.
    drop(to_guest);
    drop(from_guest);
    let mut rest = Vec::new();
    guest_reader.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "nothing more after the broker left: {rest:?}"
    );
    drop((guest, guest_reader));
    assert_eq!(exit_code(&mut relay), Some(0));
}

#[test]
fn an_unreachable_broker_closes_the_guests_connection_without_a_word() {
    // A port with nobody listening: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut relay, mut guest) = relay_to(&format!("127.0.0.1:{port}"));
    assert_eq!(exit_code(&mut relay), Some(1));
    let mut said = Vec::new();
    guest.read_to_end(&mut said).unwrap();
    assert!(said.is_empty(), "the relay wrote to the guest: {said:?}");
}
