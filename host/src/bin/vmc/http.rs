//! A small HTTP/1.1 client over `std::net::TcpStream`, enough for the host agent's
//! JSON API: one request per connection (`Connection: close`), bodies from memory
//! or streamed from a reader (with `Content-Length`, or chunked when the length is
//! unknown), answers read by `Content-Length`, chunked encoding or to the end of
//! the connection, and a Server-Sent Events reader on top.
//!
//! It speaks plain `http://` only (the API listens on loopback by default; put TLS
//! in front with a proxy if it must cross a network) and follows no redirects. Every
//! failure is a [`CliError`]: cannot connect, or an answer that is not HTTP.

use crate::CliError;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest status line or header the client reads.
const MAX_HEADER_LINE: usize = 64 * 1024;

/// The most headers an answer may have.
const MAX_HEADERS: usize = 100;

/// The size of the pieces a streamed body is sent in.
const SEND_CHUNK: usize = 256 * 1024;

/// Where the API is: `http://host:port` and an optional base path.
#[derive(Clone, Debug)]
pub struct Client {
    host: String,
    port: u16,
    base: String,
    url: String,
}

/// A request body.
pub enum Body<'a> {
    None,
    Json(Vec<u8>),
    /// Streamed from `reader`; `len` when known (else chunked). `sent` is told the
    /// bytes sent so far.
    Stream {
        reader: &'a mut dyn Read,
        len: Option<u64>,
        sent: &'a mut dyn FnMut(u64),
    },
}

impl Client {
    /// Parses `http://host[:port][/base]`.
    pub fn new(url: &str) -> Result<Client, CliError> {
        let bad = |why: &str| CliError::Usage(format!("the API URL {url:?} {why}"));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("must start with http://"))?;
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("has an unclosed ["))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(port) => port.parse().map_err(|_| bad("has a bad port"))?,
            None => 80,
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        Ok(Client {
            host: host.to_owned(),
            port,
            base: base.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn connect(&self) -> Result<TcpStream, CliError> {
        let cannot = |source: io::Error| CliError::Connect {
            url: self.url.clone(),
            source,
        };
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(cannot)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(cannot(last))
    }

    /// Sends one request (`target` is the path and query under the base) and reads
    /// the answer's head; the body is read from the [`Response`].
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Body<'_>,
    ) -> Result<Response, CliError> {
        let stream = self.connect()?;
        let broken = |e: io::Error| CliError::Broken(format!("sending to {}: {e}", self.url));
        let mut writer = io::BufWriter::new(stream.try_clone().map_err(broken)?);
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut head = format!(
            "{method} {}{target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vmc/{}\r\n\
             Accept: application/json, text/event-stream, application/octet-stream\r\n\
             Connection: close\r\n",
            self.base,
            vmc_host::VERSION
        );
        match &body {
            Body::None if method == "POST" || method == "PUT" => {
                head += "Content-Length: 0\r\n";
            }
            Body::None => {}
            Body::Json(bytes) => {
                head += &format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    bytes.len()
                );
            }
            Body::Stream { len: Some(len), .. } => {
                head +=
                    &format!("Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n");
            }
            Body::Stream { len: None, .. } => {
                head += "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n";
            }
        }
        head += "\r\n";
        writer.write_all(head.as_bytes()).map_err(broken)?;
        match body {
            Body::None => {}
            Body::Json(bytes) => writer.write_all(&bytes).map_err(broken)?,
            Body::Stream { reader, len, sent } => {
                let chunked = len.is_none();
                let mut buf = vec![0u8; SEND_CHUNK];
                let mut total = 0u64;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(CliError::Read(e)),
                    };
                    if chunked {
                        write!(writer, "{n:x}\r\n").map_err(broken)?;
                    }
                    if writer.write_all(&buf[..n]).is_err() {
                        // The server answered (an error) and closed before the end of
                        // the body: the answer, read below, says why.
                        break;
                    }
                    if chunked {
                        writer.write_all(b"\r\n").map_err(broken)?;
                    }
                    total += n as u64;
                    sent(total);
                }
                if chunked {
                    let _ = writer.write_all(b"0\r\n\r\n");
                }
            }
        }
        // An early answer (an error before the whole body was read) is still read.
        let _ = writer.flush();
        drop(writer);
        Response::read(stream, &self.url)
    }
}

/// An answer: status, headers, and a body to read.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    body: BodyReader,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)
    }
}

impl Response {
    fn read(stream: TcpStream, url: &str) -> Result<Response, CliError> {
        let not_http = |why: String| CliError::Broken(format!("the answer of {url} {why}"));
        let mut reader = BufReader::new(stream);
        let status = loop {
            let line = read_line(&mut reader).map_err(|e| not_http(format!("broke off: {e}")))?;
            let mut parts = line.splitn(3, ' ');
            let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !version.starts_with("HTTP/1.") {
                return Err(not_http(format!("is not HTTP: {line:?}")));
            }
            let status: u16 = code
                .parse()
                .map_err(|_| not_http(format!("has a bad status line: {line:?}")))?;
            if (100..200).contains(&status) {
                // An interim answer (100 Continue): its headers, then the real one.
                while !read_line(&mut reader)
                    .map_err(|e| not_http(format!("broke off: {e}")))?
                    .is_empty()
                {}
                continue;
            }
            break status;
        };
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader).map_err(|e| not_http(format!("broke off: {e}")))?;
            if line.is_empty() {
                break;
            }
            if headers.len() == MAX_HEADERS {
                return Err(not_http("has too many headers".into()));
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| not_http(format!("has a bad header {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let framing = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            Framing::Chunked {
                left: 0,
                done: false,
            }
        } else if let Some(len) = find("content-length") {
            let len = len
                .parse()
                .map_err(|_| not_http(format!("has a bad Content-Length {len:?}")))?;
            Framing::Length(len)
        } else if status == 204 || status == 304 {
            Framing::Length(0)
        } else {
            Framing::Close
        };
        Ok(Response {
            status,
            headers,
            body: BodyReader { reader, framing },
        })
    }

    /// A header's value (names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body's length, when the answer says it.
    pub fn content_length(&self) -> Option<u64> {
        match self.body.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The whole body.
    pub fn bytes(mut self) -> Result<Vec<u8>, CliError> {
        let mut data = Vec::new();
        self.body
            .read_to_end(&mut data)
            .map_err(|e| CliError::Broken(format!("reading an answer: {e}")))?;
        Ok(data)
    }

    /// The body, to read as it arrives.
    pub fn body(&mut self) -> &mut BodyReader {
        &mut self.body
    }

    /// The body as Server-Sent Events.
    pub fn events(self) -> EventReader {
        EventReader {
            reader: BufReader::new(self.body),
        }
    }
}

/// Reads one CRLF- (or LF-) terminated line, without its end.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = reader
        .take(MAX_HEADER_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a line is too long",
        ));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked { left: u64, done: bool },
    Close,
}

/// An answer's body, decoded from its framing.
pub struct BodyReader {
    reader: BufReader<TcpStream>,
    framing: Framing,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.framing {
            Framing::Close => self.reader.read(buf),
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the connection closed {left} bytes before the end"),
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let line = read_line(&mut self.reader)?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad chunk size {line:?}"),
                        )
                    })?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while !read_line(&mut self.reader)?.is_empty() {}
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed inside a chunk",
                    ));
                }
                *left -= n as u64;
                if *left == 0 {
                    let end = read_line(&mut self.reader)?;
                    if !end.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a chunk does not end with CRLF",
                        ));
                    }
                }
                Ok(n)
            }
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: String,
}

/// Reads Server-Sent Events from a body.
pub struct EventReader {
    reader: BufReader<BodyReader>,
}

impl EventReader {
    /// The next event; `None` when the stream ended.
    pub fn next_event(&mut self) -> Result<Option<Event>, CliError> {
        next_event(&mut self.reader)
    }
}

/// Parses the next event from SSE text: `event:` and `data:` lines up to an empty
/// line; comment lines (`:`) and other fields are skipped.
pub fn next_event(reader: &mut impl BufRead) -> Result<Option<Event>, CliError> {
    let mut name = String::new();
    let mut data: Option<String> = None;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| CliError::Broken(format!("the event stream broke: {e}")))?;
        if n == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            if let Some(data) = data.take() {
                let name = if name.is_empty() {
                    "message".to_owned()
                } else {
                    name
                };
                return Ok(Some(Event { name, data }));
            }
            name.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = value.to_owned(),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
}

/// Percent-encodes a path segment or a query value.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let c = Client::new("http://127.0.0.1:50505").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("127.0.0.1", 50505, "")
        );
        let c = Client::new("http://vmhost/prefix/").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("vmhost", 80, "/prefix")
        );
        let c = Client::new("http://[::1]:8080").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 8080));
        for bad in [
            "https://x",
            "127.0.0.1:50505",
            "http://:80",
            "http://h:port",
        ] {
            assert!(matches!(Client::new(bad), Err(CliError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn events_are_parsed_and_comments_skipped() {
        let text = ": keep-alive\n\nevent: vm\ndata: {\"a\":1}\n\n\
                    event: output\r\ndata: one\r\ndata: two\r\n\r\ndata:bare\n\n";
        let mut reader = io::Cursor::new(text);
        let mut events = Vec::new();
        while let Some(event) = next_event(&mut reader).unwrap() {
            events.push(event);
        }
        let event = |name: &str, data: &str| Event {
            name: name.into(),
            data: data.into(),
        };
        assert_eq!(
            events,
            [
                event("vm", "{\"a\":1}"),
                event("output", "one\ntwo"),
                event("message", "bare")
            ]
        );
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode("box-1"), "box-1");
        assert_eq!(encode("/tmp/a b&c=d"), "%2Ftmp%2Fa%20b%26c%3Dd");
        assert_eq!(encode("ü"), "%C3%BC");
    }
}
