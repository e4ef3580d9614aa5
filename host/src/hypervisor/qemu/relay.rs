//! `vmc-host relay HOST:PORT`: the program QEMU runs for each connection a guest
//! opens to the broker (see [`super::broker_link`]).
//!
//! QEMU's user networking hands the guest's connection to the program as a TCP
//! socket on its standard input, output and error: one end of a socket pair over
//! the host's loopback that has `TCP_NODELAY` on neither end. Its own end we cannot
//! change, so Nagle's algorithm holds each small segment it writes until ours is
//! acknowledged, and Linux delays that acknowledgement up to 40 ms once traffic looks
//! interactive; on our end the same happens the other way. With a relay that sets
//! nothing (`socat -`) a command inside a VM took ~100 ms where ~25 ms was work. This
//! relay sets `TCP_NODELAY` on both its sockets and `TCP_QUICKACK` after every read
//! from the guest's side (the kernel clears that flag by itself), and otherwise
//! copies bytes both ways until either side ends.
//!
//! Standard output and error are the guest's connection, so the relay never prints:
//! when the broker cannot be reached it exits with status 1 and the guest sees its
//! connection close, which its agent retries with backoff.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use socket2::SockRef;

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The size of one read.
const BUFFER: usize = 64 * 1024;

/// Relays between standard input/output and `target` (`HOST:PORT`, `[V6]:PORT`).
pub fn run(target: &str) -> ExitCode {
    match relay(target) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn relay(target: &str) -> io::Result<()> {
    // Unbuffered handles on the guest's socket (std's stdout buffers by lines).
    let mut guest_in = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let mut guest_out = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let broker = connect(target)?;
    // Socket options fail harmlessly where the guest's side is no socket (a relay
    // started by hand on a terminal or pipe).
    let _ = SockRef::from(&broker).set_tcp_nodelay(true);
    let _ = SockRef::from(&guest_out).set_tcp_nodelay(true);
    let mut to_broker = broker.try_clone()?;
    let mut from_broker = broker;
    let upstream = thread::spawn(move || {
        copy(&mut guest_in, &mut to_broker, |guest| {
            acknowledge_now(guest)
        });
        let _ = to_broker.shutdown(Shutdown::Write);
    });
    copy(&mut from_broker, &mut guest_out, |_| {});
    let _ = SockRef::from(&guest_out).shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

/// Connects to `HOST:PORT`, trying each address the host name resolves to.
fn connect(target: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
    for address in target.to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Asks the kernel to acknowledge what `socket` received at once.
fn acknowledge_now(socket: &impl AsFd) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = SockRef::from(socket).set_tcp_quickack(true);
}

/// Copies `from` into `to` until either ends, calling `after_read(from)` after each
/// read that returned data.
fn copy<R: Read, W: Write>(from: &mut R, to: &mut W, after_read: impl Fn(&R)) {
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        after_read(from);
        if to.write_all(&buffer[..n]).is_err() {
            return;
        }
    }
}
