//! The STOMP frame: a command, ordered headers and a binary body.
//!
//! Headers keep their order and may repeat, as STOMP 1.2 allows; when a header
//! repeats, the first occurrence is the one that counts (spec, "Repeated Header
//! Entries"), which is what [`Frame::header`] returns. Escaping and framing live in
//! the codec; a `Frame` holds the unescaped values.

use bytes::Bytes;
use std::fmt;

/// A STOMP 1.2 command, client or server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    // Client frames.
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    // Server frames.
    Connected,
    Message,
    Receipt,
    Error,
}

impl Command {
    /// Every command, in the order of the specification.
    pub const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
        Command::Connected,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    /// The command as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    /// Parses a command line (without its EOL); `None` when it is not a STOMP command.
    pub fn parse(line: &[u8]) -> Option<Command> {
        Command::ALL
            .into_iter()
            .find(|c| c.as_str().as_bytes() == line)
    }

    /// CONNECT and CONNECTED frames carry their headers unescaped (spec, "Value Encoding").
    pub fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One STOMP frame with unescaped header names and values.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    /// A frame with no headers and an empty body.
    pub fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (builder style). Repeating a name keeps both; the first counts.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Frame {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body (builder style).
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// The value of the first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces every header of this name by one with the given value.
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.to_owned(), value.into()));
    }

    /// Removes every header of this name.
    pub fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(n, _)| n != name);
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies can be megabytes of binary: show their size and a short prefix only.
        let prefix_len = self.body.len().min(48);
        f.debug_struct("Frame")
            .field("command", &self.command)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field(
                "body_prefix",
                &String::from_utf8_lossy(&self.body[..prefix_len]),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_parses_back_from_its_wire_name() {
        for command in Command::ALL {
            assert_eq!(Command::parse(command.as_str().as_bytes()), Some(command));
        }
        assert_eq!(Command::parse(b"send"), None);
        assert_eq!(Command::parse(b""), None);
    }

    #[test]
    fn first_repeated_header_counts() {
        let frame = Frame::new(Command::Message)
            .with_header("a", "1")
            .with_header("a", "2");
        assert_eq!(frame.header("a"), Some("1"));
    }

    #[test]
    fn set_header_replaces_all_occurrences() {
        let mut frame = Frame::new(Command::Send)
            .with_header("a", "1")
            .with_header("a", "2");
        frame.set_header("a", "3");
        assert_eq!(frame.headers, vec![("a".to_owned(), "3".to_owned())]);
    }
}
