//! A small blocking QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! [`QmpClient::connect`] reads QEMU's greeting and negotiates capabilities;
//! [`QmpClient::execute`] sends one command with an `id` and returns its `return`
//! value, turning a QMP error into [`QmpError::Command`] with QEMU's own
//! `error.desc`. Asynchronous events that arrive meanwhile are kept (see
//! [`QmpClient::events`]) but never waited for. Every read has a deadline, so a
//! wedged QEMU yields [`QmpError::Timeout`], never a hang.
//!
//! What it does not do: reconnect, run a reader thread, or know any command's
//! meaning; the backend opens one short connection per operation (QEMU's monitor
//! serves one client at a time, and a restarted host agent must get in).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Why talking to a QEMU monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error on the QMP socket")]
    Io(#[source] io::Error),
    #[error("QEMU did not answer {what} within {millis} ms")]
    Timeout { what: String, millis: u128 },
    #[error("QEMU closed the QMP connection during {what}")]
    Closed { what: String },
    #[error("QEMU sent something that is not QMP: {0}")]
    Protocol(String),
    /// QEMU refused or failed the command; `desc` is QEMU's own text.
    #[error("QEMU answered {command} with {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One asynchronous QMP event, e.g. `SHUTDOWN`, `RESET`, `STOP`, `RESUME`.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    next_id: u64,
    events: Vec<QmpEvent>,
}

impl QmpClient {
    /// Connects, reads the greeting and leaves negotiation mode; each read waits at
    /// most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(QmpError::Io)?;
        writer
            .set_write_timeout(Some(timeout))
            .map_err(QmpError::Io)?;
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            timeout,
            next_id: 1,
            events: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = client.read_message("the QMP greeting", deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// Runs `command` with optional `arguments` and returns QEMU's `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.io_error(e, command))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.read_message(command, deadline)?;
            if let Some(name) = message.get("event").and_then(Value::as_str) {
                let data = message.get("data").cloned().unwrap_or(Value::Null);
                self.events.push(QmpEvent {
                    name: name.to_owned(),
                    data,
                });
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // an answer to an earlier command that timed out: not ours
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("?");
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class").to_owned(),
                    desc: text("desc").to_owned(),
                });
            }
            return Err(QmpError::Protocol(format!(
                "unexpected answer to {command}: {message}"
            )));
        }
    }

    /// Sends `quit`: QEMU answers and exits, and may close the socket before the
    /// answer is read, which counts as success too.
    pub fn quit(mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The events received so far on this connection, oldest first.
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    fn io_error(&self, error: io::Error, what: &str) -> QmpError {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpError::Timeout {
                what: what.to_owned(),
                millis: self.timeout.as_millis(),
            },
            io::ErrorKind::BrokenPipe => QmpError::Closed {
                what: what.to_owned(),
            },
            _ => QmpError::Io(error),
        }
    }

    /// Reads one JSON line, waiting at most until `deadline`.
    fn read_message(&mut self, what: &str, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    millis: self.timeout.as_millis(),
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(QmpError::Io)?;
            match self.reader.read_line(&mut line) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        what: what.to_owned(),
                    })
                }
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e, what)),
            }
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("{e} in {:?}", line.trim_end())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake QEMU monitor: greets, then answers each request with `reply(request)`
    /// lines (empty: say nothing).
    fn fake_monitor(
        dir: &Path,
        reply: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> (PathBuf, thread::JoinHandle<()>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut writer = stream.try_clone().expect("clone");
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .expect("greet");
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let request: Value = serde_json::from_str(&line).expect("json request");
                for answer in reply(&request) {
                    writer.write_all(answer.as_bytes()).expect("answer");
                    writer.write_all(b"\n").expect("newline");
                }
            }
        });
        (path, handle)
    }

    fn id(request: &Value) -> u64 {
        request["id"].as_u64().expect("id")
    }

    #[test]
    fn returns_results_and_keeps_events_seen_on_the_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _monitor) =
            fake_monitor(dir.path(), |request| match request["execute"].as_str() {
                Some("query-status") => vec![
                    r#"{"event": "STOP", "data": {}, "timestamp": {}}"#.to_owned(),
                    format!(
                        r#"{{"return": {{"status": "paused", "running": false}}, "id": {}}}"#,
                        id(request)
                    ),
                ],
                _ => vec![format!(r#"{{"return": {{}}, "id": {}}}"#, id(request))],
            });
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
        let status = client.execute("query-status", None).expect("query-status");
        assert_eq!(status["status"], "paused");
        assert_eq!(client.events().len(), 1);
        assert_eq!(client.events()[0].name, "STOP");
    }

    #[test]
    fn a_qmp_error_carries_qemus_description() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _monitor) = fake_monitor(dir.path(), |request| {
            match request["execute"].as_str() {
                Some("cont") => vec![format!(
                    r#"{{"error": {{"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}}, "id": {}}}"#,
                    id(request)
                )],
                _ => vec![format!(r#"{{"return": {{}}, "id": {}}}"#, id(request))],
            }
        });
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
        let error = client.execute("cont", None).expect_err("cont must fail");
        assert_eq!(
            error.to_string(),
            "QEMU answered cont with GenericError: Resetting the Virtual Machine is required"
        );
    }

    #[test]
    fn a_silent_monitor_times_out_instead_of_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _monitor) =
            fake_monitor(dir.path(), |request| match request["execute"].as_str() {
                Some("qmp_capabilities") => {
                    vec![format!(r#"{{"return": {{}}, "id": {}}}"#, id(request))]
                }
                _ => Vec::new(),
            });
        let mut client = QmpClient::connect(&path, Duration::from_millis(200)).expect("connect");
        let started = Instant::now();
        let error = client
            .execute("query-status", None)
            .expect_err("must time out");
        assert!(matches!(error, QmpError::Timeout { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn connecting_to_a_missing_socket_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nothing.sock");
        let error = QmpClient::connect(&path, Duration::from_secs(1)).expect_err("no socket");
        assert!(error.to_string().contains("nothing.sock"), "{error}");
    }
}
