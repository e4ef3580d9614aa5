//! A minimal HTTP/1.1 keep-alive client over `std::net::TcpStream`, enough for
//! the API's JSON and XML-RPC answers (Content-Length or chunked bodies), and a
//! multi-threaded load loop over it. No TLS, no redirects, no pooling.

use crate::BenchError;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One keep-alive connection.
#[derive(Debug)]
pub struct HttpConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpConnection {
    pub fn connect(addr: SocketAddr) -> Result<HttpConnection, BenchError> {
        let stream = TcpStream::connect(addr).map_err(BenchError::io("connecting to the API"))?;
        stream
            .set_nodelay(true)
            .map_err(BenchError::io("setting TCP_NODELAY"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(BenchError::io("setting a read timeout"))?;
        let writer = stream
            .try_clone()
            .map_err(BenchError::io("cloning the API socket"))?;
        Ok(HttpConnection {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and reads the whole answer: (status, body).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<(u16, Vec<u8>), BenchError> {
        let io = |what: &str| BenchError::io(format!("{what} {method} {path}"));
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        if let Some((content_type, bytes)) = body {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                bytes.len()
            ));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        if let Some((_, bytes)) = body {
            request.extend_from_slice(bytes);
        }
        self.writer.write_all(&request).map_err(io("sending"))?;

        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(io("reading"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Api(format!("no HTTP status line: {line:?}")))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).map_err(io("reading"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).map_err(io("reading"))?;
                let size = usize::from_str_radix(line.trim(), 16)
                    .map_err(|_| BenchError::Api(format!("bad chunk size {line:?}")))?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).map_err(io("reading"))?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.reader.read_exact(&mut body).map_err(io("reading"))?;
        }
        Ok((status, body))
    }
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadResult {
    pub requests: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

/// `connections` threads, each on its own keep-alive connection, send requests
/// made by `request(thread, n)` for `duration`; any non-2xx answer is an error.
pub fn load<F>(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    request: F,
) -> Result<LoadResult, BenchError>
where
    F: Fn(usize, usize) -> (&'static str, String, Option<Vec<u8>>) + Send + Sync,
{
    let start = Instant::now();
    let deadline = start + duration;
    let per_thread: Vec<Result<Vec<Duration>, BenchError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..connections)
            .map(|t| {
                let request = &request;
                scope.spawn(move || {
                    let mut conn = HttpConnection::connect(addr)?;
                    let mut latencies = Vec::new();
                    let mut n = 0;
                    while Instant::now() < deadline {
                        let (method, path, body) = request(t, n);
                        let sent = Instant::now();
                        let (status, answer) =
                            conn.request(method, &path, body.as_deref().map(|b| ("text/xml", b)))?;
                        latencies.push(sent.elapsed());
                        if !(200..300).contains(&status) || crate::host_runs::is_fault(&answer) {
                            return Err(BenchError::Api(format!(
                                "{method} {path} answered {status}: {}",
                                String::from_utf8_lossy(&answer)
                            )));
                        }
                        n += 1;
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Api("a load thread panicked".into())))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut latencies = Vec::new();
    for result in per_thread {
        latencies.extend(result?);
    }
    Ok(LoadResult {
        requests: latencies.len(),
        elapsed,
        latencies,
    })
}
