//! A follower of the host's live events (`GET /api/v1/events`, Server-Sent
//! Events): a thread reads the stream over a plain `TcpStream` (chunked or not)
//! and hands each event on, stamped with the moment it was read, so that a
//! benchmark times what the host announces without polling it. It understands
//! only what the benchmarks need: `event:` and one `data:` line per event.

use crate::BenchError;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One event as read.
#[derive(Debug)]
pub struct StreamEvent {
    /// When the reader had the whole event.
    pub at: Instant,
    /// The `event:` name (`vm`, `command`, `lagged`, ...).
    pub name: String,
    pub data: serde_json::Value,
}

/// An open event stream; closed when dropped.
#[derive(Debug)]
pub struct EventStream {
    socket: TcpStream,
    events: mpsc::Receiver<StreamEvent>,
    reader: Option<JoinHandle<()>>,
}

impl EventStream {
    /// Opens `GET path` (for example `/api/v1/events?vm=a,b`) and returns once the
    /// host has answered 200 and its headers are read.
    pub fn open(addr: SocketAddr, path: &str) -> Result<EventStream, BenchError> {
        let io = |what: &str| BenchError::io(format!("{what} GET {path}"));
        let socket = TcpStream::connect(addr).map_err(io("connecting for"))?;
        let mut writer = socket.try_clone().map_err(io("cloning the socket of"))?;
        writer
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
                )
                .as_bytes(),
            )
            .map_err(io("sending"))?;
        let mut reader = BufReader::new(socket.try_clone().map_err(io("cloning the socket of"))?);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(io("reading"))?;
        if line.split_whitespace().nth(1) != Some("200") {
            return Err(BenchError::Api(format!("GET {path} answered {line:?}")));
        }
        let mut chunked = false;
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(io("reading"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                }
            }
        }
        let (sender, events) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            if chunked {
                read_events(Dechunk::new(reader), &sender);
            } else {
                read_events(reader, &sender);
            }
        });
        Ok(EventStream {
            socket,
            events,
            reader: Some(reader),
        })
    }

    /// The next event, waiting at most `timeout`; `None` on timeout or when the
    /// stream ended.
    pub fn next(&self, timeout: Duration) -> Option<StreamEvent> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Splits the body into events until it ends or nobody listens any more.
fn read_events(body: impl Read, sender: &mpsc::Sender<StreamEvent>) {
    let mut lines = BufReader::new(body);
    let (mut name, mut data) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = line.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            if !data.is_empty() {
                let event = StreamEvent {
                    at: Instant::now(),
                    name: std::mem::take(&mut name),
                    data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                };
                if sender.send(event).is_err() {
                    return;
                }
            }
            name.clear();
            data.clear();
        } else if let Some(value) = text.strip_prefix("event:") {
            name = value.trim().to_owned();
        } else if let Some(value) = text.strip_prefix("data:") {
            data.push_str(value.trim_start());
        }
        // Comment lines (": keep-alive") and other fields are ignored.
    }
}

/// The payload of a `Transfer-Encoding: chunked` body as a plain reader.
struct Dechunk<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<R: BufRead> Dechunk<R> {
    fn new(inner: R) -> Dechunk<R> {
        Dechunk {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Dechunk<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(0);
            }
            let line = line.trim();
            if line.is_empty() {
                continue; // the CRLF that ends the previous chunk
            }
            let size = line.split(';').next().unwrap_or_default();
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if self.left == 0 {
                self.done = true;
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(0);
        }
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_events_are_split_and_stamped() {
        let body = "5\r\n: hi\n\r\n2e\r\nevent: vm\ndata: {\"vm\":\"a\",\"presence\":\"lost\"}\n\n\r\n0\r\n\r\n";
        let (sender, events) = mpsc::channel();
        read_events(Dechunk::new(body.as_bytes()), &sender);
        let event = events.try_recv().expect("one event");
        assert_eq!(event.name, "vm");
        assert_eq!(event.data["presence"], "lost");
        assert!(events.try_recv().is_err());
    }
}
