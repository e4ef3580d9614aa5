//! STOMP 1.2 framing for `tokio-util`: bytes on the socket to [`StompItem`]s and back.
//!
//! The decoder accepts heart-beat EOLs between frames, `\r\n` or `\n` line ends,
//! escaped header names and values (except in CONNECT/CONNECTED, which the
//! specification leaves unescaped), and bodies that are either delimited by
//! `content-length` (binary safe) or by the first NUL. It scans each byte once, so a
//! multi-megabyte body costs linear time however it is split across reads. Any frame
//! larger than the configured limit is refused: on decode the connection is no longer
//! trustworthy and the caller closes it; on encode nothing is written.
//! The encoder always writes `content-length` for a non-empty body, escapes headers,
//! and never emits `\r`. It does not validate the semantics of a frame (which headers
//! a command needs): that is the session's business.

use crate::stomp::frame::{Command, Frame};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// What travels on a STOMP connection: a frame or a heart-beat EOL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StompItem {
    Frame(Frame),
    HeartBeat,
}

/// Why bytes could not be read or written as STOMP.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    #[error("unknown STOMP command {0:?}")]
    UnknownCommand(String),
    #[error("header line {0:?} has no colon")]
    MalformedHeader(String),
    #[error("header contains the undefined escape sequence \\{0}")]
    BadEscape(char),
    #[error("frame head is not valid UTF-8")]
    InvalidUtf8,
    #[error("content-length {0:?} is not a byte count")]
    BadContentLength(String),
    #[error("frame body of declared length is not followed by NUL")]
    MissingNul,
    #[error("frame of at least {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
}

/// Default limit for one frame, head and body included (16 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16 * 1024 * 1024;

/// Where the decoder is inside the frame it is reading.
#[derive(Debug)]
enum DecodeState {
    /// Looking for the blank line ending the head; `scanned` bytes are known not to end it.
    Head { scanned: usize },
    /// Head parsed; the body is read by length or up to NUL (`scanned` bytes searched).
    Body {
        command: Command,
        headers: Vec<(String, String)>,
        head_len: usize,
        length: Option<usize>,
        scanned: usize,
    },
}

/// The STOMP 1.2 codec, with a frame size limit.
#[derive(Debug)]
pub struct StompCodec {
    max_frame_size: usize,
    state: DecodeState,
}

impl StompCodec {
    /// A codec refusing frames larger than `max_frame_size` bytes.
    pub fn new(max_frame_size: usize) -> StompCodec {
        StompCodec {
            max_frame_size,
            state: DecodeState::Head { scanned: 0 },
        }
    }

    /// The frame size limit in bytes.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    fn too_large(&self, size: usize) -> CodecError {
        CodecError::FrameTooLarge {
            size,
            limit: self.max_frame_size,
        }
    }
}

impl Default for StompCodec {
    fn default() -> StompCodec {
        StompCodec::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl Decoder for StompCodec {
    type Item = StompItem;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<StompItem>, CodecError> {
        loop {
            match &mut self.state {
                DecodeState::Head { scanned } => {
                    // EOLs before a frame are heart-beats; report them once per run.
                    if *scanned == 0 {
                        let eols = leading_eols(src);
                        if eols > 0 {
                            src.advance(eols);
                            return Ok(Some(StompItem::HeartBeat));
                        }
                        if src.len() == 1 && src[0] == b'\r' {
                            return Ok(None);
                        }
                    }
                    let Some(head_len) = find_head_end(src, scanned) else {
                        if src.len() > self.max_frame_size {
                            return Err(self.too_large(src.len()));
                        }
                        return Ok(None);
                    };
                    if head_len > self.max_frame_size {
                        return Err(self.too_large(head_len));
                    }
                    let (command, headers) = parse_head(&src[..head_len])?;
                    let length = match headers.iter().find(|(n, _)| n == "content-length") {
                        Some((_, v)) => {
                            let n = v
                                .trim()
                                .parse::<usize>()
                                .map_err(|_| CodecError::BadContentLength(v.clone()))?;
                            let total = head_len.saturating_add(n).saturating_add(1);
                            if total > self.max_frame_size {
                                return Err(self.too_large(total));
                            }
                            Some(n)
                        }
                        None => None,
                    };
                    self.state = DecodeState::Body {
                        command,
                        headers,
                        head_len,
                        length,
                        scanned: 0,
                    };
                }
                DecodeState::Body {
                    head_len,
                    length,
                    scanned,
                    ..
                } => {
                    let head_len = *head_len;
                    let body_len = match *length {
                        Some(n) => {
                            if src.len() < head_len + n + 1 {
                                src.reserve(head_len + n + 1 - src.len());
                                return Ok(None);
                            }
                            if src[head_len + n] != 0 {
                                return Err(CodecError::MissingNul);
                            }
                            n
                        }
                        None => {
                            let body = &src[head_len + *scanned..];
                            match body.iter().position(|&b| b == 0) {
                                Some(pos) => *scanned + pos,
                                None => {
                                    *scanned += body.len();
                                    if src.len() > self.max_frame_size {
                                        return Err(self.too_large(src.len()));
                                    }
                                    return Ok(None);
                                }
                            }
                        }
                    };
                    let state =
                        std::mem::replace(&mut self.state, DecodeState::Head { scanned: 0 });
                    let DecodeState::Body {
                        command, headers, ..
                    } = state
                    else {
                        unreachable!("state was matched as Body just above");
                    };
                    src.advance(head_len);
                    let body: Bytes = src.split_to(body_len).freeze();
                    src.advance(1); // the NUL
                    return Ok(Some(StompItem::Frame(Frame {
                        command,
                        headers,
                        body,
                    })));
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<StompItem>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.iter().all(|&b| b == b'\r' || b == b'\n') => Ok(None),
            None => Err(CodecError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ))),
        }
    }
}

impl Encoder<StompItem> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, item: StompItem, dst: &mut BytesMut) -> Result<(), CodecError> {
        match item {
            StompItem::HeartBeat => {
                dst.put_u8(b'\n');
                Ok(())
            }
            StompItem::Frame(frame) => self.encode(&frame, dst),
        }
    }
}

impl Encoder<&Frame> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let escape = frame.command.escapes_headers();
        let mut head = BytesMut::with_capacity(64 + frame.headers.len() * 32);
        head.put_slice(frame.command.as_str().as_bytes());
        head.put_u8(b'\n');
        for (name, value) in &frame.headers {
            if name == "content-length" {
                continue;
            }
            put_header_part(&mut head, name, escape);
            head.put_u8(b':');
            put_header_part(&mut head, value, escape);
            head.put_u8(b'\n');
        }
        if !frame.body.is_empty() {
            head.put_slice(b"content-length:");
            head.put_slice(frame.body.len().to_string().as_bytes());
            head.put_u8(b'\n');
        }
        head.put_u8(b'\n');
        let total = head.len() + frame.body.len() + 1;
        if total > self.max_frame_size {
            return Err(self.too_large(total));
        }
        dst.reserve(total);
        dst.put_slice(&head);
        dst.put_slice(&frame.body);
        dst.put_u8(0);
        Ok(())
    }
}

impl Encoder<Frame> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

/// Encodes one frame to bytes (for tests and tools writing raw frames).
pub fn encode_frame(frame: &Frame, max_frame_size: usize) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::new();
    StompCodec::new(max_frame_size).encode(frame, &mut buf)?;
    Ok(buf.freeze())
}

fn put_header_part(dst: &mut BytesMut, text: &str, escape: bool) {
    if !escape {
        // CONNECT/CONNECTED cannot escape: drop what would break the line structure.
        dst.extend(
            text.bytes()
                .filter(|&b| b != b'\n' && b != b'\r' && b != b':'),
        );
        return;
    }
    for b in text.bytes() {
        match b {
            b'\\' => dst.put_slice(b"\\\\"),
            b'\n' => dst.put_slice(b"\\n"),
            b'\r' => dst.put_slice(b"\\r"),
            b':' => dst.put_slice(b"\\c"),
            _ => dst.put_u8(b),
        }
    }
}

fn leading_eols(src: &[u8]) -> usize {
    let mut i = 0;
    while i < src.len() {
        match src[i] {
            b'\n' => i += 1,
            b'\r' if src.get(i + 1) == Some(&b'\n') => i += 2,
            _ => break,
        }
    }
    i
}

/// Finds the end of the head (just past the blank line); `scanned` remembers progress.
fn find_head_end(src: &[u8], scanned: &mut usize) -> Option<usize> {
    // Resume one byte early so a "\n" split from its partner is still seen.
    let mut i = scanned.saturating_sub(2);
    while let Some(pos) = src[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        match src.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') => match src.get(nl + 2) {
                Some(b'\n') => return Some(nl + 3),
                Some(_) => {}
                None => {
                    *scanned = nl;
                    return None;
                }
            },
            Some(_) => {}
            None => {
                *scanned = nl;
                return None;
            }
        }
        i = nl + 1;
    }
    *scanned = src.len();
    None
}

type Head = (Command, Vec<(String, String)>);

fn parse_head(head: &[u8]) -> Result<Head, CodecError> {
    let text = std::str::from_utf8(head).map_err(|_| CodecError::InvalidUtf8)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let command_line = lines.next().unwrap_or_default();
    let command = Command::parse(command_line.as_bytes())
        .ok_or_else(|| CodecError::UnknownCommand(truncate(command_line)))?;
    let escaped = command.escapes_headers();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| CodecError::MalformedHeader(truncate(line)))?;
        if escaped {
            headers.push((unescape(name)?, unescape(value)?));
        } else {
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
    Ok((command, headers))
}

fn unescape(text: &str) -> Result<String, CodecError> {
    if !text.contains('\\') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('c') => out.push(':'),
            Some(other) => return Err(CodecError::BadEscape(other)),
            None => return Err(CodecError::BadEscape(' ')),
        }
    }
    Ok(out)
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(codec: &mut StompCodec, bytes: &[u8]) -> Result<Vec<StompItem>, CodecError> {
        let mut buf = BytesMut::from(bytes);
        let mut items = Vec::new();
        while let Some(item) = codec.decode(&mut buf)? {
            items.push(item);
        }
        Ok(items)
    }

    fn frames(items: Vec<StompItem>) -> Vec<Frame> {
        items
            .into_iter()
            .filter_map(|i| match i {
                StompItem::Frame(f) => Some(f),
                StompItem::HeartBeat => None,
            })
            .collect()
    }

    #[test]
    fn decodes_frame_delimited_by_nul() {
        let mut codec = StompCodec::default();
        let items = decode_all(&mut codec, b"MESSAGE\ndestination:/queue/a\n\nhello\0").unwrap();
        let frame = &frames(items)[0];
        assert_eq!(frame.command, Command::Message);
        assert_eq!(frame.header("destination"), Some("/queue/a"));
        assert_eq!(&frame.body[..], b"hello");
    }

    #[test]
    fn content_length_body_may_contain_nul() {
        let mut codec = StompCodec::default();
        let items = decode_all(&mut codec, b"MESSAGE\ncontent-length:3\n\na\0b\0").unwrap();
        assert_eq!(&frames(items)[0].body[..], b"a\0b");
    }

    #[test]
    fn heart_beats_and_crlf_are_accepted() {
        let mut codec = StompCodec::default();
        let items = decode_all(&mut codec, b"\n\r\n\nRECEIPT\r\nreceipt-id:7\r\n\r\n\0\n").unwrap();
        assert_eq!(items[0], StompItem::HeartBeat);
        let frame = &frames(items.clone())[0];
        assert_eq!(frame.header("receipt-id"), Some("7"));
        assert_eq!(items.last(), Some(&StompItem::HeartBeat));
    }

    #[test]
    fn escapes_are_decoded_except_in_connected() {
        let mut codec = StompCodec::default();
        let items = decode_all(&mut codec, b"MESSAGE\na\\cb:c\\\\d\\ne\\rf\n\n\0").unwrap();
        assert_eq!(
            frames(items)[0].headers,
            vec![("a:b".into(), "c\\d\ne\rf".into())]
        );
        let items = decode_all(&mut codec, b"CONNECTED\nserver:x\\c\n\n\0").unwrap();
        assert_eq!(frames(items)[0].header("server"), Some("x\\c"));
    }

    #[test]
    fn frame_split_at_every_byte_decodes_the_same() {
        let frame = Frame::new(Command::Send)
            .with_header("destination", "/queue/x:y")
            .with_header("multi\nline", "v\\al")
            .with_body(Bytes::from_static(b"bin\0ary\n\n"));
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_SIZE).unwrap();
        for split in 0..bytes.len() {
            let mut codec = StompCodec::default();
            let mut buf = BytesMut::from(&bytes[..split]);
            let mut got = Vec::new();
            while let Some(i) = codec.decode(&mut buf).unwrap() {
                got.push(i);
            }
            buf.extend_from_slice(&bytes[split..]);
            while let Some(i) = codec.decode(&mut buf).unwrap() {
                got.push(i);
            }
            let mut expected = frame.clone();
            expected.headers.push(("content-length".into(), "9".into()));
            assert_eq!(frames(got), vec![expected], "split at {split}");
        }
    }

    #[test]
    fn unknown_command_is_an_error() {
        let mut codec = StompCodec::default();
        let err = decode_all(&mut codec, b"HELLO\n\n\0").unwrap_err();
        assert!(matches!(err, CodecError::UnknownCommand(c) if c == "HELLO"));
    }

    #[test]
    fn bad_escape_and_missing_colon_are_errors() {
        let err = decode_all(&mut StompCodec::default(), b"MESSAGE\na:\\t\n\n\0").unwrap_err();
        assert!(matches!(err, CodecError::BadEscape('t')));
        let err = decode_all(&mut StompCodec::default(), b"MESSAGE\nnocolon\n\n\0").unwrap_err();
        assert!(matches!(err, CodecError::MalformedHeader(_)));
    }

    #[test]
    fn content_length_without_nul_is_an_error() {
        let err = decode_all(
            &mut StompCodec::default(),
            b"MESSAGE\ncontent-length:1\n\nab\0",
        )
        .unwrap_err();
        assert!(matches!(err, CodecError::MissingNul));
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let mut codec = StompCodec::new(64);
        let err = decode_all(&mut codec, b"MESSAGE\ncontent-length:100\n\n").unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { limit: 64, .. }));
        let mut codec = StompCodec::new(64);
        let err = decode_all(&mut codec, &[b'M'; 65]).unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { .. }));
        let big = Frame::new(Command::Send).with_body(vec![7u8; 100]);
        let mut out = BytesMut::new();
        assert!(StompCodec::new(64).encode(&big, &mut out).is_err());
        assert!(out.is_empty(), "nothing is written for a refused frame");
    }

    #[test]
    fn eof_inside_a_frame_is_an_error_but_trailing_eols_are_not() {
        let mut codec = StompCodec::default();
        let mut buf = BytesMut::from(&b"MESSAGE\n"[..]);
        assert!(codec.decode_eof(&mut buf).is_err());
        let mut codec = StompCodec::default();
        let mut buf = BytesMut::from(&b"\r"[..]);
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop::sample::select(Command::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn any_escaped_frame_round_trips(
            command in arb_command().prop_filter("escaping", |c| c.escapes_headers()),
            headers in prop::collection::vec(("[^\\x00]{1,12}", "[^\\x00]{0,24}"), 0..6),
            body in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let headers: Vec<(String, String)> =
                headers.into_iter().filter(|(n, _)| n != "content-length").collect();
            let frame = Frame { command, headers, body: Bytes::from(body) };
            let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_SIZE).unwrap();
            let mut got = frames(decode_all(&mut StompCodec::default(), &bytes).unwrap());
            prop_assert_eq!(got.len(), 1);
            let mut decoded = got.remove(0);
            decoded.remove_header("content-length");
            prop_assert_eq!(decoded, frame);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = StompCodec::new(256);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..600 {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn garbage_after_valid_prefix_never_panics(
            tail in prop::collection::vec(prop::sample::select(b"\n\r\0:\\cSENDMESSAGE-length7".to_vec()), 0..200),
        ) {
            let mut bytes = b"MESSAGE\n".to_vec();
            bytes.extend(tail);
            let mut codec = StompCodec::new(1024);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..300 {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
