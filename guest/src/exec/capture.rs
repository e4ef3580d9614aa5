//! One output stream of one command: streamed, partly retained, wholly kept.
//!
//! A [`StreamCapture`] reads a command's stdout or stderr pipe to its end. Each read
//! (at most [`MAX_OUTPUT_CHUNK`] bytes, so never one message per byte) is counted in
//! a counter that `CMD_QUERY` reads, sent as a `CMD_OUTPUT` at its offset when the
//! spec asks for streaming, and appended to the retained prefix while that is
//! shorter than `output_limit`. The stream is never cut silently: the first time it
//! passes the limit, the file `<output_dir>/<cmd-id>.out` (or `.err`) is created
//! with the retained prefix, and everything after is appended to it through a large
//! buffer, so a command writing 100 MiB fast is not slowed by small writes. The
//! common small case creates no file. If the file cannot be written the capture
//! keeps counting and draining the pipe and reports why the whole stream is not kept.
//! It does not decide when to stop reading before the end: the command task says so
//! when its drain deadline passes; a read already taken is then still fully accounted
//! for, so the counters, the chunks sent and the file always agree.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use vmc_protocol::words::{Message, OutputStream, MAX_OUTPUT_CHUNK};

use super::{error_text, ExecError, StartedNotice};
use crate::outbox::{Reply, ReplySender};

/// Buffer between the pipe and the output file: large, so that 100 MiB take ~100 writes.
const FILE_BUFFER: usize = 1024 * 1024;

/// Where `CMD_OUTPUT` chunks of a stream go.
#[derive(Debug)]
pub(super) struct OutputSink {
    pub cmd_id: String,
    pub reply_to: String,
    pub replies: ReplySender,
    /// Sent before the first chunk, so that `CMD_STARTED` always comes first.
    pub started: Arc<StartedNotice>,
}

/// What became of one stream, for the command's result.
#[derive(Debug)]
pub(super) struct CapturedStream {
    /// The retained prefix, non-UTF-8 replaced by U+FFFD.
    pub text: String,
    /// Bytes the command wrote to the stream in all.
    pub bytes: u64,
    /// Whether `text` holds less than the command wrote.
    pub truncated: bool,
    /// The file holding the whole stream, when it passed the limit and could be kept.
    pub file: Option<String>,
    /// Why the stream is not wholly kept or read, if it is not.
    pub error: Option<String>,
}

/// The output file of a stream that passed its limit.
#[derive(Debug)]
enum Spill {
    /// Not needed yet.
    None,
    Open(BufWriter<File>),
    /// It could not be written; the text says why.
    Failed(String),
}

/// Reads one stream of one command; see the module documentation.
#[derive(Debug)]
pub(super) struct StreamCapture {
    stream: OutputStream,
    sink: Option<OutputSink>,
    limit: u64,
    retained: Vec<u8>,
    total: u64,
    counter: Arc<AtomicU64>,
    spill_path: PathBuf,
    spill: Spill,
    read_error: Option<String>,
    /// Reading stopped before the end of the stream.
    cut_short: bool,
}

impl StreamCapture {
    /// A capture that keeps `limit` bytes, spills into `spill_path`, counts into
    /// `counter` and streams to `sink` when it is given.
    pub fn new(
        stream: OutputStream,
        limit: u64,
        spill_path: PathBuf,
        counter: Arc<AtomicU64>,
        sink: Option<OutputSink>,
    ) -> StreamCapture {
        StreamCapture {
            stream,
            sink,
            limit,
            retained: Vec::new(),
            total: 0,
            counter,
            spill_path,
            spill: Spill::None,
            read_error: None,
            cut_short: false,
        }
    }

    /// Reads `pipe` to its end, or until `stop` turns true.
    pub async fn pump(&mut self, mut pipe: pipe::Receiver, mut stop: watch::Receiver<bool>) {
        let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
        loop {
            let read = tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => {
                    self.cut_short = true;
                    return;
                }
                read = pipe.read(&mut buf) => read,
            };
            match read {
                Ok(0) => return,
                Ok(n) => self.take(&buf[..n]).await,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    self.read_error = Some(format!(
                        "reading its std{} failed: {err}",
                        self.stream.as_str()
                    ));
                    return;
                }
            }
        }
    }

    /// Notes that the pipe could not be read at all.
    pub fn unreadable(&mut self, err: &io::Error) {
        self.read_error = Some(format!(
            "its std{} could not be read: {err}",
            self.stream.as_str()
        ));
    }

    /// Accounts for one read.
    async fn take(&mut self, data: &[u8]) {
        let offset = self.total;
        self.total += data.len() as u64;
        self.counter.store(self.total, Ordering::Relaxed);
        if let Some(sink) = &self.sink {
            let message = Message::CmdOutput {
                cmd_id: sink.cmd_id.clone(),
                stream: self.stream,
                offset,
                data: Bytes::copy_from_slice(data),
            };
            sink.started.send();
            // A closed channel means the agent is going away; the result still counts.
            let _ = sink
                .replies
                .send_paced(Reply::new(sink.reply_to.clone(), message))
                .await;
        }
        let room = self.limit.saturating_sub(self.retained.len() as u64);
        let kept = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.retained.extend_from_slice(&data[..kept]);
        if self.total > self.limit {
            self.spill(&data[kept..]).await;
        }
    }

    /// Appends `rest` to the output file, creating it with the retained prefix first.
    async fn spill(&mut self, rest: &[u8]) {
        if let Spill::None = self.spill {
            self.spill = match self.open_spill().await {
                Ok(file) => Spill::Open(file),
                Err(err) => Spill::Failed(error_text(&err)),
            };
        }
        if let Spill::Open(file) = &mut self.spill {
            if let Err(source) = file.write_all(rest).await {
                self.spill_failed(source).await;
            }
        }
    }

    async fn open_spill(&self) -> Result<BufWriter<File>, ExecError> {
        let keep_error = |source| ExecError::KeepOutput {
            path: self.spill_path.clone(),
            source,
        };
        if let Some(dir) = self.spill_path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(keep_error)?;
        }
        let file = File::create(&self.spill_path).await.map_err(keep_error)?;
        let mut file = BufWriter::with_capacity(FILE_BUFFER, file);
        file.write_all(&self.retained).await.map_err(keep_error)?;
        Ok(file)
    }

    /// Gives up the output file after a write error, removing what it holds.
    async fn spill_failed(&mut self, source: io::Error) {
        let err = ExecError::KeepOutput {
            path: self.spill_path.clone(),
            source,
        };
        self.spill = Spill::Failed(error_text(&err));
        // Best effort: a partial file would pass for the whole output.
        let _ = tokio::fs::remove_file(&self.spill_path).await;
    }

    /// Flushes the output file and says what became of the stream.
    pub async fn finish(mut self) -> CapturedStream {
        if let Spill::Open(file) = &mut self.spill {
            if let Err(source) = file.flush().await {
                self.spill_failed(source).await;
            }
        }
        let (file, spill_error) = match self.spill {
            Spill::None => (None, None),
            Spill::Open(_) => (Some(self.spill_path.display().to_string()), None),
            Spill::Failed(why) => (None, Some(why)),
        };
        let cut_short = self.cut_short.then(|| {
            format!(
                "stopped reading its std{} after it ended, because a process outside its \
                 process group kept it open: the output may be incomplete",
                self.stream.as_str()
            )
        });
        let error = [self.read_error, cut_short, spill_error]
            .into_iter()
            .flatten()
            .reduce(|all, one| format!("{all}; {one}"));
        CapturedStream {
            text: String::from_utf8_lossy(&self.retained).into_owned(),
            bytes: self.total,
            truncated: self.total > self.limit,
            file,
            error,
        }
    }
}

/// The file that keeps a command's whole `stream`: `<dir>/<cmd-id>.out` or `.err`,
/// the id made safe as a file name by [`file_stem`].
pub(super) fn spill_path(dir: &Path, cmd_id: &str, stream: OutputStream) -> PathBuf {
    dir.join(format!("{}.{}", file_stem(cmd_id), stream.as_str()))
}

/// `cmd_id` as a file name: letters, digits, `-`, `_` and inner `.` stay, every other
/// byte becomes `%XX`, so that distinct ids give distinct names and none escapes the
/// directory (`/`, `..`) or hides (leading `.`).
pub(super) fn file_stem(cmd_id: &str) -> String {
    let mut stem = String::with_capacity(cmd_id.len());
    for (i, byte) in cmd_id.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_';
        if plain || (byte == b'.' && i > 0) {
            stem.push(char::from(byte));
        } else {
            stem.push_str(&format!("%{byte:02X}"));
        }
    }
    stem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_safe_distinct_file_names() {
        assert_eq!(file_stem("c-42_x.y"), "c-42_x.y");
        assert_eq!(file_stem("../etc/passwd"), "%2E.%2Fetc%2Fpasswd");
        assert_eq!(file_stem(".hidden"), "%2Ehidden");
        assert_ne!(file_stem("a/b"), file_stem("a_b"));
        assert_ne!(file_stem("a%2Fb"), file_stem("a/b"));
        assert_eq!(file_stem("é"), "%C3%A9");
        let dir = Path::new("/var/out");
        assert_eq!(
            spill_path(dir, "c/1", OutputStream::Err),
            Path::new("/var/out/c%2F1.err")
        );
    }

    fn capture(dir: &Path, limit: u64, sink: Option<OutputSink>) -> StreamCapture {
        StreamCapture::new(
            OutputStream::Out,
            limit,
            spill_path(dir, "c", OutputStream::Out),
            Arc::new(AtomicU64::new(0)),
            sink,
        )
    }

    #[tokio::test]
    async fn output_past_the_limit_is_kept_whole_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (replies, mut rx) = crate::outbox::channel();
        let sink = OutputSink {
            cmd_id: "c".to_owned(),
            reply_to: "/queue/r".to_owned(),
            replies: replies.clone(),
            // Already sent: only output follows.
            started: Arc::new(StartedNotice {
                reply_to: "/queue/r".to_owned(),
                replies,
                message: std::sync::Mutex::new(None),
            }),
        };
        let mut cap = capture(dir.path(), 5, Some(sink));
        cap.take(b"abc").await;
        assert!(!cap.spill_path.exists(), "no file while under the limit");
        cap.take(b"defg").await;
        cap.take(b"hij").await;
        let got = cap.finish().await;
        assert_eq!(got.text, "abcde");
        assert_eq!(got.bytes, 10);
        assert!(got.truncated);
        assert_eq!(got.error, None);
        let file = got.file.expect("a file keeps the whole stream");
        assert_eq!(std::fs::read(file).unwrap(), b"abcdefghij");
        let mut offsets = Vec::new();
        while let Ok(reply) = rx.try_recv() {
            assert_eq!(reply.destination, "/queue/r");
            match reply.message {
                Message::CmdOutput { offset, data, .. } => offsets.push((offset, data.len())),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(offsets, vec![(0, 3), (3, 4), (7, 3)]);
    }

    #[tokio::test]
    async fn output_within_the_limit_makes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut cap = capture(dir.path(), 5, None);
        cap.take(b"abcde").await;
        let got = cap.finish().await;
        assert_eq!(
            (got.text.as_str(), got.bytes, got.truncated),
            ("abcde", 5, false)
        );
        assert_eq!(got.file, None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_unwritable_output_file_is_reported_not_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"").unwrap();
        let mut cap = capture(&blocker, 2, None);
        cap.take(b"abcd").await;
        let got = cap.finish().await;
        assert_eq!(
            (got.text.as_str(), got.bytes, got.truncated),
            ("ab", 4, true)
        );
        assert_eq!(got.file, None);
        let error = got.error.expect("the lost output is explained");
        assert!(error.contains("not-a-dir"), "{error}");
    }
}
