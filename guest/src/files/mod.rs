//! File transfers, the guest's end: receiving PUTs and sending GETs (PROTOCOL.md §6.4).
//!
//! [`Transfers`] is owned by the agent's dispatch loop, which hands it every file
//! word it receives. Each transfer runs as its own tokio task ([`put`] receives,
//! [`get`] sends) fed through a channel, so `handle` never waits for the disk: a
//! slow transfer does not hold up commands or other transfers. Tasks answer through
//! the [`ReplySender`] to the `reply-to` of the `FILE_PUT`/`FILE_GET` that started
//! them. Paths are checked against the allowed roots by [`paths`].
//!
//! A repeated `FILE_PUT`/`FILE_GET` with the id of a transfer in progress replaces
//! it: the old task finishes what it holds and stops first, then the new one starts
//! (for a PUT of the same file, from the bytes already written; a PUT of another
//! file under the same id starts again from 0). A transfer whose host falls silent
//! for [`TRANSFER_IDLE_TIMEOUT`] is forgotten. A PUT that fails or is aborted
//! removes its partial file; one that is forgotten, or interrupted by the agent
//! stopping, keeps it so that a repeated `FILE_PUT` resumes. Partial files idle
//! for [`STALE_PARTIAL_AGE`] are removed when the agent is still running then, and
//! otherwise by the next `FILE_PUT` to the same file.
//!
//! Chunks waiting for their task are bounded (twice the window, at most 256, plus
//! two); a chunk beyond that is dropped as if lost, and the host sends it again.
//!
//! Words for a transfer that is not in progress (late duplicates, or anything
//! after an agent restart) are logged and ignored: they carry no `reply-to`, and
//! the host resumes by repeating its request. Neither is there any timer for
//! re-sending: the host re-sends its request when a transfer stalls.

mod get;
mod paths;
mod put;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vmc_protocol::words::{FileErrorCode, FileOffer, FileRequest, Message};

use crate::outbox::{Reply, ReplySender};
use paths::AllowedRoots;

/// How long a transfer may go without a word from the host before it is forgotten.
pub const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How long a partial file may go unwritten before it is removed as abandoned.
pub const STALE_PARTIAL_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// The most chunks of one transfer waiting for its task: beyond this the host
/// exceeds any sane window, and chunks are dropped (the host re-sends them).
const MAX_QUEUED_WINDOW: usize = 256;

/// What file transfers may touch.
#[derive(Clone, Debug)]
pub struct FileSettings {
    /// Directories under which files may be read and written.
    pub allowed_roots: Vec<PathBuf>,
    /// The largest file a PUT may bring, in bytes.
    pub max_file_size: u64,
}

/// Why a transfer failed; [`TransferError::code`] is the `FILE_ERROR` code.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path:?} is not an absolute path; file transfers need one")]
    NotAbsolute { path: String },
    #[error("{} is outside the directories file transfers may use ({roots})", path.display())]
    OutsideRoots { path: PathBuf, roots: String },
    #[error("{} cannot be written: {} is not an existing directory", path.display(), dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("{} does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("{} is a directory", path.display())]
    IsADirectory { path: PathBuf },
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: {size} bytes is more than this guest accepts ({limit} bytes at most)", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "{}: {needed} more bytes are needed but its file system has only {available} free",
        path.display()
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error(
        "{}: the received bytes have SHA-256 {actual}, not {expected}; the file was not written",
        path.display()
    )]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{} changed while being sent: it now has fewer than the {size} bytes announced", path.display())]
    Shrunk { path: PathBuf, size: u64 },
    #[error("{} was written to while being sent; send it again once it is left alone", path.display())]
    Changed { path: PathBuf },
    #[error("transfer of {path}: {reason}")]
    Protocol { path: String, reason: String },
    #[error("{}: cannot {action}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: the transfer's file work stopped unexpectedly", path.display())]
    Worker {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl TransferError {
    /// The code `FILE_ERROR` carries for this error.
    pub fn code(&self) -> FileErrorCode {
        match self {
            TransferError::NotAbsolute { .. } | TransferError::OutsideRoots { .. } => {
                FileErrorCode::OutsideAllowedRoots
            }
            TransferError::NoDirectory { .. } | TransferError::NotFound { .. } => {
                FileErrorCode::NotFound
            }
            TransferError::IsADirectory { .. } => FileErrorCode::IsADirectory,
            TransferError::TooLarge { .. } => FileErrorCode::TooLarge,
            TransferError::NoSpace { .. } => FileErrorCode::NoSpace,
            TransferError::ChecksumMismatch { .. } => FileErrorCode::ChecksumMismatch,
            TransferError::Protocol { .. } => FileErrorCode::Protocol,
            TransferError::Io { source, .. } => io_code(source),
            TransferError::NotAFile { .. }
            | TransferError::Shrunk { .. }
            | TransferError::Changed { .. }
            | TransferError::Worker { .. } => FileErrorCode::Io,
        }
    }

    /// The message `FILE_ERROR` carries: this error and its causes.
    fn report(&self) -> String {
        vmc_protocol::agent_main::error_chain(self)
    }
}

/// The `FILE_ERROR` code of an operating-system error.
fn io_code(err: &io::Error) -> FileErrorCode {
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => FileErrorCode::NotFound,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            FileErrorCode::PermissionDenied
        }
        io::ErrorKind::StorageFull => FileErrorCode::NoSpace,
        io::ErrorKind::IsADirectory => FileErrorCode::IsADirectory,
        io::ErrorKind::FileTooLarge => FileErrorCode::TooLarge,
        _ if err.raw_os_error() == Some(libc::EDQUOT) => FileErrorCode::NoSpace,
        _ => FileErrorCode::Io,
    }
}

/// What every transfer task needs.
#[derive(Debug)]
struct TransferContext {
    roots: AllowedRoots,
    max_file_size: u64,
    idle_timeout: Duration,
    replies: ReplySender,
}

impl TransferContext {
    fn send(&self, reply_to: &str, message: Message) {
        let reply = Reply::new(reply_to, message);
        if self.replies.send(reply).is_err() {
            log::debug!("the agent no longer takes replies; a file word was dropped");
        }
    }

    /// Tells the host that `transfer_id` failed, and why.
    fn fail(&self, transfer_id: &str, reply_to: &str, err: &TransferError) {
        let message = err.report();
        log::warn!("file transfer {transfer_id} failed: {message}");
        self.send(
            reply_to,
            Message::FileError {
                transfer_id: transfer_id.to_owned(),
                code: err.code(),
                message,
            },
        );
    }
}

/// A word from the host for a transfer task.
#[derive(Debug)]
enum Input {
    Chunk {
        offset: u64,
        data: Bytes,
    },
    Ack {
        offset: u64,
    },
    End {
        size: u64,
        sha256: String,
    },
    Done {
        size: u64,
        sha256: String,
    },
    Failed {
        code: FileErrorCode,
        message: String,
    },
    Abort {
        reason: Option<String>,
    },
    /// A new request with this transfer's id replaces it.
    Stop {
        discard_partial: bool,
    },
}

impl Input {
    fn word(&self) -> &'static str {
        match self {
            Input::Chunk { .. } => "FILE_CHUNK",
            Input::Ack { .. } => "FILE_ACK",
            Input::End { .. } => "FILE_END",
            Input::Done { .. } => "FILE_DONE",
            Input::Failed { .. } => "FILE_ERROR",
            Input::Abort { .. } => "FILE_ABORT",
            Input::Stop { .. } => "a repeated request",
        }
    }
}

/// A transfer task's end of its channel.
#[derive(Debug)]
struct Inbox {
    inputs: mpsc::UnboundedReceiver<Input>,
    queued_chunks: Arc<AtomicUsize>,
}

/// What a transfer task waits for.
enum Next {
    Input(Input),
    /// Nothing came for the idle timeout.
    Idle,
    /// [`Transfers`] is gone: the agent is stopping.
    Closed,
}

impl Inbox {
    async fn next(&mut self, idle: Duration) -> Next {
        match tokio::time::timeout(idle, self.inputs.recv()).await {
            Err(_) => Next::Idle,
            Ok(None) => Next::Closed,
            Ok(Some(input)) => {
                if matches!(input, Input::Chunk { .. }) {
                    self.queued_chunks.fetch_sub(1, Ordering::Relaxed);
                }
                Next::Input(input)
            }
        }
    }
}

/// A transfer in progress, as its dispatcher sees it.
#[derive(Debug)]
struct Running {
    inputs: mpsc::UnboundedSender<Input>,
    queued_chunks: Arc<AtomicUsize>,
    max_queued_chunks: usize,
    /// For a PUT, what it receives: a repeated offer of the same file resumes it.
    offer: Option<FileOffer>,
    task: JoinHandle<()>,
}

/// The guest's file transfers in progress.
#[derive(Debug)]
pub struct Transfers {
    context: Arc<TransferContext>,
    running: HashMap<String, Running>,
}

impl Transfers {
    /// Transfers confined to `settings.allowed_roots` (canonicalized now; roots that
    /// do not exist are left out with a warning), answering through `replies`.
    pub fn new(settings: FileSettings, replies: ReplySender) -> Transfers {
        Transfers {
            context: Arc::new(TransferContext {
                roots: AllowedRoots::canonicalize(&settings.allowed_roots),
                max_file_size: settings.max_file_size,
                idle_timeout: TRANSFER_IDLE_TIMEOUT,
                replies,
            }),
            running: HashMap::new(),
        }
    }

    /// Forget transfers idle for `idle` instead of [`TRANSFER_IDLE_TIMEOUT`]; for
    /// transfers started from now on.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Transfers {
        match Arc::get_mut(&mut self.context) {
            Some(context) => context.idle_timeout = idle,
            None => {
                let context = &self.context;
                self.context = Arc::new(TransferContext {
                    roots: context.roots.clone(),
                    max_file_size: context.max_file_size,
                    idle_timeout: idle,
                    replies: context.replies.clone(),
                });
            }
        }
        self
    }

    /// Handles one file word from the host. `reply_to` is the envelope's; it is
    /// needed by `FILE_PUT` and `FILE_GET` (whose answers, and those of all later
    /// words of the transfer, go there) and ignored on the others. Returns at once:
    /// the work is done by the transfer's task.
    pub async fn handle(&mut self, message: Message, reply_to: Option<String>) {
        self.running
            .retain(|_, running| !running.task.is_finished());
        match message {
            Message::FilePut { transfer_id, offer } => {
                self.start(transfer_id, Request::Put(offer), reply_to)
            }
            Message::FileGet {
                transfer_id,
                request,
            } => self.start(transfer_id, Request::Get(request), reply_to),
            Message::FileChunk {
                transfer_id,
                offset,
                data,
            } => self.forward_chunk(&transfer_id, offset, data),
            Message::FileAck {
                transfer_id,
                offset,
            } => self.forward(&transfer_id, Input::Ack { offset }),
            Message::FileEnd {
                transfer_id,
                size,
                sha256,
            } => self.forward(&transfer_id, Input::End { size, sha256 }),
            Message::FileDone {
                transfer_id,
                size,
                sha256,
            } => self.forward(&transfer_id, Input::Done { size, sha256 }),
            Message::FileError {
                transfer_id,
                code,
                message,
            } => self.forward(&transfer_id, Input::Failed { code, message }),
            Message::FileAbort {
                transfer_id,
                reason,
            } => self.forward(&transfer_id, Input::Abort { reason }),
            other => log::warn!(
                "{} is not a word the guest's file transfers take; ignored",
                other.word()
            ),
        }
    }

    /// How many transfers are in progress.
    pub fn active(&self) -> usize {
        self.running
            .values()
            .filter(|running| !running.task.is_finished())
            .count()
    }

    /// Stops every transfer, keeping partial files for a later resume, and waits
    /// for their tasks to finish. Nothing is sent to the hosts.
    pub async fn shutdown(mut self) {
        let mut tasks = Vec::with_capacity(self.running.len());
        for (_, running) in self.running.drain() {
            let _ = running.inputs.send(Input::Stop {
                discard_partial: false,
            });
            tasks.push(running.task);
        }
        for task in tasks {
            if let Err(err) = task.await {
                log::error!("a file transfer task failed: {err}");
            }
        }
    }

    fn start(&mut self, transfer_id: String, request: Request, reply_to: Option<String>) {
        let Some(reply_to) = reply_to else {
            log::warn!(
                "{} of transfer {transfer_id} has no reply-to, so it cannot be answered; ignored",
                request.word()
            );
            return;
        };
        let previous = self.running.remove(&transfer_id).map(|previous| {
            let discard_partial = match (&previous.offer, &request) {
                (Some(old), Request::Put(new)) => !same_file(old, new),
                (Some(_), Request::Get(_)) => true,
                (None, _) => false,
            };
            log::info!(
                "transfer {transfer_id} is requested again; restarting it{}",
                if discard_partial {
                    " from the beginning"
                } else {
                    ""
                }
            );
            let _ = previous.inputs.send(Input::Stop { discard_partial });
            previous.task
        });
        let (inputs, receiver) = mpsc::unbounded_channel();
        let queued_chunks = Arc::new(AtomicUsize::new(0));
        let inbox = Inbox {
            inputs: receiver,
            queued_chunks: queued_chunks.clone(),
        };
        let window = match &request {
            Request::Put(offer) => offer.window,
            Request::Get(request) => request.window,
        };
        let window =
            usize::try_from(window).map_or(MAX_QUEUED_WINDOW, |w| w.min(MAX_QUEUED_WINDOW));
        let context = self.context.clone();
        let (offer, task) = match request {
            Request::Put(offer) => {
                let start = put::PutStart {
                    transfer_id: transfer_id.clone(),
                    offer: offer.clone(),
                    reply_to,
                };
                (
                    Some(offer),
                    tokio::spawn(put::run(context, start, inbox, previous)),
                )
            }
            Request::Get(request) => {
                let start = get::GetStart {
                    transfer_id: transfer_id.clone(),
                    request,
                    reply_to,
                };
                (
                    None,
                    tokio::spawn(get::run(context, start, inbox, previous)),
                )
            }
        };
        self.running.insert(
            transfer_id,
            Running {
                inputs,
                queued_chunks,
                max_queued_chunks: 2 * window + 2,
                offer,
                task,
            },
        );
    }

    fn forward_chunk(&mut self, transfer_id: &str, offset: u64, data: Bytes) {
        let Some(running) = self.running.get(transfer_id) else {
            log::debug!("FILE_CHUNK for transfer {transfer_id}, not in progress here: ignored");
            return;
        };
        let queued = running.queued_chunks.load(Ordering::Relaxed);
        if queued >= running.max_queued_chunks {
            log::debug!(
                "transfer {transfer_id}: the chunk at {offset} is dropped, {queued} are already \
                 waiting to be written; the host will send it again"
            );
            return;
        }
        running.queued_chunks.fetch_add(1, Ordering::Relaxed);
        if running.inputs.send(Input::Chunk { offset, data }).is_err() {
            running.queued_chunks.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn forward(&mut self, transfer_id: &str, input: Input) {
        match self.running.get(transfer_id) {
            Some(running) => {
                if let Err(mpsc::error::SendError(input)) = running.inputs.send(input) {
                    log::debug!(
                        "{} for transfer {transfer_id}, which just ended: ignored",
                        input.word()
                    );
                }
            }
            None => log::debug!(
                "{} for transfer {transfer_id}, not in progress here: ignored",
                input.word()
            ),
        }
    }
}

/// What starts a transfer.
enum Request {
    Put(FileOffer),
    Get(FileRequest),
}

impl Request {
    fn word(&self) -> &'static str {
        match self {
            Request::Put(_) => "FILE_PUT",
            Request::Get(_) => "FILE_GET",
        }
    }
}

/// Whether two offers bring the same file to the same place.
fn same_file(a: &FileOffer, b: &FileOffer) -> bool {
    let same_digest = match (&a.sha256, &b.sha256) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (None, None) => true,
        _ => false,
    };
    a.path == b.path && a.size == b.size && same_digest
}

/// Lets the task of an earlier attempt at the same transfer finish first.
async fn wait_for(previous: Option<JoinHandle<()>>, transfer_id: &str) {
    if let Some(previous) = previous {
        if let Err(err) = previous.await {
            log::error!("the earlier attempt at transfer {transfer_id} failed: {err}");
        }
    }
}

/// Chunks given to a [`StreamDigest`] but not yet hashed: beyond this, giving
/// waits for the hashing.
const DIGEST_BACKLOG: usize = 16;

/// The SHA-256 of a stream of chunks, computed on a blocking thread as they come,
/// so that hashing overlaps reading, writing and sending.
#[derive(Debug)]
pub(super) struct StreamDigest {
    chunks: mpsc::Sender<Bytes>,
    hasher: JoinHandle<String>,
}

impl StreamDigest {
    /// A digest that continues `hasher` (which may already hold a prefix).
    pub(super) fn start(hasher: Sha256) -> StreamDigest {
        let (chunks, mut receiver) = mpsc::channel::<Bytes>(DIGEST_BACKLOG);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = hasher;
            while let Some(chunk) = receiver.blocking_recv() {
                hasher.update(&chunk);
            }
            hex(&hasher.finalize())
        });
        StreamDigest { chunks, hasher }
    }

    /// Adds the next bytes; waits only when the hashing is [`DIGEST_BACKLOG`] behind.
    pub(super) async fn update(&self, chunk: Bytes) {
        // The receiver lives until `finish`, which takes `self`.
        let _ = self.chunks.send(chunk).await;
    }

    /// The digest of everything added.
    pub(super) async fn finish(self, path: &std::path::Path) -> Result<String, TransferError> {
        drop(self.chunks);
        self.hasher.await.map_err(|source| TransferError::Worker {
            path: path.to_owned(),
            source,
        })
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T, F>(path: &std::path::Path, work: F) -> Result<T, TransferError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, TransferError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| TransferError::Worker {
            path: path.to_owned(),
            source,
        })?
}

/// Lowercase hex, as digests are written on the wire.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
            // Writing to a String cannot fail.
            let _ = write!(text, "{byte:02x}");
            text
        })
}

/// Checks a request's `chunk_size` and `window` as PROTOCOL.md §6.4 requires.
fn check_pacing(path: &str, chunk_size: u32, window: u32) -> Result<(), TransferError> {
    use vmc_protocol::words::MAX_FILE_CHUNK_SIZE;
    let reason = if chunk_size == 0 || chunk_size > MAX_FILE_CHUNK_SIZE {
        format!("chunk_size {chunk_size} is not between 1 and {MAX_FILE_CHUNK_SIZE} bytes")
    } else if window == 0 {
        "window 0 would never let a chunk through; it must be at least 1".to_owned()
    } else {
        return Ok(());
    };
    Err(TransferError::Protocol {
        path: path.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{self, ReplyReceiver};
    use sha2::{Digest, Sha256};
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::Path;
    use std::time::{Instant, SystemTime};
    use vmc_protocol::words::{DEFAULT_FILE_WINDOW, MAX_FILE_CHUNK_SIZE};

    const HOST: &str = "/queue/vmc.host.lab-1";
    const CHUNK: u32 = 256 * 1024;
    const MIB: usize = 1024 * 1024;

    /// Reproducible bytes that do not compress or repeat.
    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    fn sha256_hex(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    fn guest(root: &Path) -> (Transfers, ReplyReceiver) {
        let (replies, receiver) = outbox::channel();
        let settings = FileSettings {
            allowed_roots: vec![root.to_owned()],
            max_file_size: 64 * MIB as u64,
        };
        (Transfers::new(settings, replies), receiver)
    }

    fn offer(path: &Path, data: &[u8], mode: Option<u32>) -> FileOffer {
        FileOffer {
            path: path.display().to_string(),
            size: data.len() as u64,
            sha256: Some(sha256_hex(data)),
            mode,
            chunk_size: CHUNK,
            window: 4,
        }
    }

    fn put(id: &str, offer: FileOffer) -> Message {
        Message::FilePut {
            transfer_id: id.to_owned(),
            offer,
        }
    }

    fn get(id: &str, path: &Path, offset: u64, window: u32) -> Message {
        Message::FileGet {
            transfer_id: id.to_owned(),
            request: FileRequest {
                path: path.display().to_string(),
                offset,
                chunk_size: CHUNK,
                window,
            },
        }
    }

    fn ready(id: &str, offset: u64) -> Message {
        Message::FileReady {
            transfer_id: id.to_owned(),
            offset,
            size: None,
            sha256: None,
        }
    }

    /// The guest's next answer, which must go to [`HOST`].
    async fn reply(replies: &mut ReplyReceiver) -> Message {
        let reply = tokio::time::timeout(Duration::from_secs(30), replies.recv())
            .await
            .expect("the guest answers within 30 s")
            .expect("the reply channel is open");
        assert_eq!(reply.destination, HOST);
        reply.message
    }

    /// The code and message of a `FILE_ERROR` for `id`.
    async fn error(replies: &mut ReplyReceiver, id: &str) -> (FileErrorCode, String) {
        match reply(replies).await {
            Message::FileError {
                transfer_id,
                code,
                message,
            } if transfer_id == id => (code, message),
            other => panic!("expected FILE_ERROR for {id}, got {other:?}"),
        }
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Plays the host sending `data[from..until]` in chunks, at most `window` of
    /// them unacknowledged, until the guest acknowledges `until`.
    async fn send_chunks(
        transfers: &mut Transfers,
        replies: &mut ReplyReceiver,
        id: &str,
        data: &[u8],
        from: usize,
        until: usize,
        window: usize,
    ) {
        let chunk = CHUNK as usize;
        let (mut next, mut acked) = (from, from);
        loop {
            while next < until && next < acked + window * chunk {
                let end = (next + chunk).min(until);
                let message = Message::FileChunk {
                    transfer_id: id.to_owned(),
                    offset: next as u64,
                    data: Bytes::copy_from_slice(&data[next..end]),
                };
                transfers.handle(message, None).await;
                next = end;
            }
            if acked == until {
                return;
            }
            match reply(replies).await {
                Message::FileAck {
                    transfer_id,
                    offset,
                } if transfer_id == id => {
                    assert!(offset as usize <= next, "acknowledged bytes never sent");
                    acked = acked.max(offset as usize);
                }
                other => panic!("expected FILE_ACK, got {other:?}"),
            }
        }
    }

    async fn end(transfers: &mut Transfers, id: &str, data: &[u8]) {
        let message = Message::FileEnd {
            transfer_id: id.to_owned(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
        };
        transfers.handle(message, None).await;
    }

    fn done(id: &str, data: &[u8]) -> Message {
        Message::FileDone {
            transfer_id: id.to_owned(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
        }
    }

    #[tokio::test]
    async fn a_put_in_chunks_arrives_whole_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(3 * MIB, 1);
        let path = dir.path().join("data.bin");

        transfers
            .handle(
                put("t-1", offer(&path, &data, Some(0o640))),
                Some(HOST.into()),
            )
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(&mut transfers, &mut replies, "t-1", &data, 0, data.len(), 4).await;
        end(&mut transfers, "t-1", &data).await;
        assert_eq!(reply(&mut replies).await, done("t-1", &data));

        assert!(
            fs::read(&path).unwrap() == data,
            "the file is byte-identical"
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);
        assert_eq!(
            names(dir.path()),
            vec!["data.bin"],
            "no partial file is left"
        );
        wait_until("the transfer is over", || transfers.active() == 0).await;
    }

    #[tokio::test]
    async fn a_put_offered_without_a_digest_is_checked_against_file_end() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(2 * MIB, 7);
        let path = dir.path().join("streamed.bin");
        let mut streamed = offer(&path, &data, None);
        streamed.sha256 = None;

        transfers
            .handle(put("t-1", streamed.clone()), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(&mut transfers, &mut replies, "t-1", &data, 0, data.len(), 4).await;
        end(&mut transfers, "t-1", &data).await;
        assert_eq!(
            reply(&mut replies).await,
            done("t-1", &data),
            "FILE_DONE carries the digest of what arrived"
        );
        assert!(
            fs::read(&path).unwrap() == data,
            "the file is byte-identical"
        );

        // The same, ended with a digest that is not the file's: refused, no file.
        let other = dir.path().join("refused.bin");
        let mut streamed = offer(&other, &data, None);
        streamed.sha256 = None;
        transfers
            .handle(put("t-2", streamed), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-2", 0));
        send_chunks(&mut transfers, &mut replies, "t-2", &data, 0, data.len(), 4).await;
        let message = Message::FileEnd {
            transfer_id: "t-2".into(),
            size: data.len() as u64,
            sha256: sha256_hex(b"not these bytes"),
        };
        transfers.handle(message, None).await;
        let (code, _) = error(&mut replies, "t-2").await;
        assert_eq!(code, FileErrorCode::ChecksumMismatch);
        assert!(!other.exists(), "a refused file is not put in place");
        wait_until("the transfers are over", || transfers.active() == 0).await;
        assert_eq!(
            names(dir.path()),
            vec!["streamed.bin"],
            "no partial file is left"
        );
    }

    #[tokio::test]
    async fn a_put_replaces_an_existing_file_and_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let path = dir.path().join("config");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let data = b"new contents".to_vec();

        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(&mut transfers, &mut replies, "t-1", &data, 0, data.len(), 4).await;
        end(&mut transfers, "t-1", &data).await;
        assert_eq!(reply(&mut replies).await, done("t-1", &data));
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o600
        );
    }

    #[tokio::test]
    async fn an_empty_file_goes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let path = dir.path().join("empty");

        transfers
            .handle(put("t-1", offer(&path, b"", None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        end(&mut transfers, "t-1", b"").await;
        assert_eq!(reply(&mut replies).await, done("t-1", b""));
        assert_eq!(fs::read(&path).unwrap(), b"");

        transfers
            .handle(get("t-2", &path, 0, 8), Some(HOST.into()))
            .await;
        assert_eq!(
            reply(&mut replies).await,
            Message::FileReady {
                transfer_id: "t-2".into(),
                offset: 0,
                size: Some(0),
                sha256: None,
            }
        );
        assert_eq!(
            reply(&mut replies).await,
            Message::FileEnd {
                transfer_id: "t-2".into(),
                size: 0,
                sha256: sha256_hex(b""),
            }
        );
    }

    #[tokio::test]
    async fn a_wrong_digest_leaves_neither_file_nor_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(MIB, 2);
        let path = dir.path().join("data.bin");
        let mut wrong = offer(&path, &data, None);
        wrong.sha256 = Some(sha256_hex(b"something else"));

        transfers
            .handle(put("t-1", wrong.clone()), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(&mut transfers, &mut replies, "t-1", &data, 0, data.len(), 4).await;
        let message = Message::FileEnd {
            transfer_id: "t-1".into(),
            size: wrong.size,
            sha256: wrong.sha256.clone().unwrap_or_default(),
        };
        transfers.handle(message, None).await;
        let (code, message) = error(&mut replies, "t-1").await;
        assert_eq!(code, FileErrorCode::ChecksumMismatch);
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&sha256_hex(&data)), "{message}");
        assert!(
            names(dir.path()).is_empty(),
            "left behind: {:?}",
            names(dir.path())
        );
    }

    #[tokio::test]
    async fn a_put_resumes_after_the_agent_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let data = random_bytes(3 * MIB, 3);
        let path = dir.path().join("data.bin");
        let half = data.len() / 2;

        let (mut transfers, mut replies) = guest(dir.path());
        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(&mut transfers, &mut replies, "t-1", &data, 0, half, 4).await;
        drop(transfers);
        drop(replies);
        let partial = dir.path().join(".data.bin.t-1.part");
        wait_until("the partial file holds the first half", || {
            fs::metadata(&partial).is_ok_and(|meta| meta.len() == half as u64)
        })
        .await;

        let (mut transfers, mut replies) = guest(dir.path());
        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", half as u64));
        send_chunks(
            &mut transfers,
            &mut replies,
            "t-1",
            &data,
            half,
            data.len(),
            4,
        )
        .await;
        end(&mut transfers, "t-1", &data).await;
        assert_eq!(reply(&mut replies).await, done("t-1", &data));
        assert!(
            fs::read(&path).unwrap() == data,
            "the file is byte-identical"
        );
        assert_eq!(names(dir.path()), vec!["data.bin"]);
    }

    #[tokio::test]
    async fn a_repeated_put_resumes_and_a_changed_one_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(MIB, 4);
        let path = dir.path().join("data.bin");
        let chunk = CHUNK as usize;

        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(&mut transfers, &mut replies, "t-1", &data, 0, 2 * chunk, 4).await;

        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 2 * CHUNK as u64));

        let other = random_bytes(MIB, 5);
        transfers
            .handle(put("t-1", offer(&path, &other, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(
            &mut transfers,
            &mut replies,
            "t-1",
            &other,
            0,
            other.len(),
            4,
        )
        .await;
        end(&mut transfers, "t-1", &other).await;
        assert_eq!(reply(&mut replies).await, done("t-1", &other));
        assert!(fs::read(&path).unwrap() == other);
    }

    #[tokio::test]
    async fn chunks_out_of_order_are_dropped_or_ignored_and_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(2 * CHUNK as usize + 10, 6);
        let path = dir.path().join("data.bin");
        let chunk = CHUNK as usize;
        let send = |offset: usize, len: usize| Message::FileChunk {
            transfer_id: "t-1".into(),
            offset: offset as u64,
            data: Bytes::copy_from_slice(&data[offset..offset + len]),
        };
        let ack = |offset: usize| Message::FileAck {
            transfer_id: "t-1".into(),
            offset: offset as u64,
        };

        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        transfers.handle(send(chunk, chunk), None).await;
        assert_eq!(reply(&mut replies).await, ack(0), "a gap is dropped");
        transfers.handle(send(0, chunk), None).await;
        assert_eq!(reply(&mut replies).await, ack(chunk));
        transfers.handle(send(0, chunk), None).await;
        assert_eq!(
            reply(&mut replies).await,
            ack(chunk),
            "a duplicate is ignored"
        );
        transfers.handle(send(chunk / 2, chunk), None).await;
        assert_eq!(reply(&mut replies).await, ack(chunk + chunk / 2), "overlap");
        transfers
            .handle(send(chunk + chunk / 2, chunk / 2), None)
            .await;
        transfers.handle(send(2 * chunk, 10), None).await;
        assert_eq!(reply(&mut replies).await, ack(2 * chunk));
        assert_eq!(reply(&mut replies).await, ack(data.len()));
        end(&mut transfers, "t-1", &data).await;
        assert_eq!(reply(&mut replies).await, done("t-1", &data));
        assert!(fs::read(&path).unwrap() == data);
    }

    #[tokio::test]
    async fn a_chunk_past_the_end_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(100, 7);
        let path = dir.path().join("data.bin");

        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        let message = Message::FileChunk {
            transfer_id: "t-1".into(),
            offset: 50,
            data: Bytes::from(vec![0; 51]),
        };
        transfers.handle(message, None).await;
        let (code, message) = error(&mut replies, "t-1").await;
        assert_eq!(code, FileErrorCode::Protocol);
        assert!(message.contains("past"), "{message}");
        wait_until("the transfer is over", || transfers.active() == 0).await;
        assert!(
            names(dir.path()).is_empty(),
            "left behind: {:?}",
            names(dir.path())
        );
    }

    #[tokio::test]
    async fn bad_pacing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let path = dir.path().join("data.bin");
        let mut too_big = offer(&path, b"x", None);
        too_big.chunk_size = MAX_FILE_CHUNK_SIZE + 1;
        transfers
            .handle(put("t-1", too_big), Some(HOST.into()))
            .await;
        assert_eq!(error(&mut replies, "t-1").await.0, FileErrorCode::Protocol);

        fs::write(&path, b"x").unwrap();
        transfers
            .handle(get("t-2", &path, 0, 0), Some(HOST.into()))
            .await;
        let (code, message) = error(&mut replies, "t-2").await;
        assert_eq!(code, FileErrorCode::Protocol);
        assert!(message.contains("window"), "{message}");
    }

    #[tokio::test]
    async fn paths_outside_the_roots_are_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        symlink(&outside, root.join("link")).unwrap();
        symlink(outside.join("secret"), root.join("secret-link")).unwrap();
        let (mut transfers, mut replies) = guest(&root);

        let refused = [
            outside.join("new"),
            root.join("..").join("outside").join("new"),
            root.join("link").join("new"),
            root.join("missing")
                .join("..")
                .join("..")
                .join("outside")
                .join("new"),
            PathBuf::from("relative/new"),
            PathBuf::from("/etc/vmc-test-new"),
        ];
        for (i, path) in refused.iter().enumerate() {
            let id = format!("t-{i}");
            transfers
                .handle(put(&id, offer(path, b"data", None)), Some(HOST.into()))
                .await;
            let (code, message) = error(&mut replies, &id).await;
            assert_eq!(
                code,
                FileErrorCode::OutsideAllowedRoots,
                "{}",
                path.display()
            );
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        assert_eq!(
            names(&outside),
            vec!["secret"],
            "nothing was created outside"
        );
        assert!(!Path::new("/etc/vmc-test-new").exists());

        for (i, path) in [
            root.join("link").join("secret"),
            root.join("secret-link"),
            root.join("..").join("outside").join("secret"),
        ]
        .iter()
        .enumerate()
        {
            let id = format!("g-{i}");
            transfers
                .handle(get(&id, path, 0, 8), Some(HOST.into()))
                .await;
            let (code, _) = error(&mut replies, &id).await;
            assert_eq!(
                code,
                FileErrorCode::OutsideAllowedRoots,
                "{}",
                path.display()
            );
        }
    }

    #[tokio::test]
    async fn directories_missing_parents_and_big_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        let (mut transfers, mut replies) = guest(dir.path());

        let sub = dir.path().join("sub");
        transfers
            .handle(put("t-1", offer(&sub, b"data", None)), Some(HOST.into()))
            .await;
        assert_eq!(
            error(&mut replies, "t-1").await.0,
            FileErrorCode::IsADirectory
        );
        transfers
            .handle(get("t-2", &sub, 0, 8), Some(HOST.into()))
            .await;
        assert_eq!(
            error(&mut replies, "t-2").await.0,
            FileErrorCode::IsADirectory
        );

        let orphan = dir.path().join("no-such-dir").join("file");
        transfers
            .handle(put("t-3", offer(&orphan, b"data", None)), Some(HOST.into()))
            .await;
        let (code, message) = error(&mut replies, "t-3").await;
        assert_eq!(code, FileErrorCode::NotFound);
        assert!(message.contains("no-such-dir"), "{message}");

        let mut huge = offer(&dir.path().join("huge"), b"", None);
        huge.size = 65 * MIB as u64;
        transfers.handle(put("t-4", huge), Some(HOST.into())).await;
        assert_eq!(error(&mut replies, "t-4").await.0, FileErrorCode::TooLarge);

        assert_eq!(names(dir.path()), vec!["sub"], "nothing was created");
        assert!(names(&sub).is_empty());
    }

    #[tokio::test]
    async fn a_get_keeps_to_its_window_and_ends_after_the_last_ack() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(3 * MIB, 8);
        let path = dir.path().join("out.bin");
        fs::write(&path, &data).unwrap();
        let window = 4;
        let limit = u64::from(window * CHUNK);
        let size = data.len() as u64;

        transfers
            .handle(get("t-1", &path, 0, window), Some(HOST.into()))
            .await;
        assert_eq!(
            reply(&mut replies).await,
            Message::FileReady {
                transfer_id: "t-1".into(),
                offset: 0,
                size: Some(size),
                sha256: None,
            }
        );
        let mut received = Vec::new();
        let mut acked = 0;
        loop {
            match reply(&mut replies).await {
                Message::FileChunk {
                    transfer_id,
                    offset,
                    data: chunk,
                } => {
                    assert_eq!(transfer_id, "t-1");
                    assert_eq!(offset, received.len() as u64, "chunks come in order");
                    assert!(chunk.len() <= CHUNK as usize);
                    let end = offset + chunk.len() as u64;
                    assert!(
                        end <= acked + limit,
                        "chunk ending at {end} exceeds the window"
                    );
                    received.extend_from_slice(&chunk);
                    // Acknowledge lazily, so that the guest meets its window.
                    let held = received.len() as u64;
                    if held == size || held == acked + limit {
                        acked = if held == size {
                            size
                        } else {
                            acked + limit / 2
                        };
                        let ack = Message::FileAck {
                            transfer_id: "t-1".into(),
                            offset: acked,
                        };
                        transfers.handle(ack, None).await;
                    }
                }
                Message::FileEnd {
                    transfer_id,
                    size: end_size,
                    sha256,
                } => {
                    assert_eq!(transfer_id, "t-1");
                    assert_eq!(acked, size, "FILE_END comes after the last ack");
                    assert_eq!((end_size, sha256), (size, sha256_hex(&data)));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(received == data, "the reassembled bytes are identical");
        transfers.handle(done("t-1", &data), None).await;
        wait_until("the transfer is forgotten", || transfers.active() == 0).await;
    }

    /// Plays the host receiving a GET from `offset`, acknowledging every chunk.
    async fn receive_all(
        transfers: &mut Transfers,
        replies: &mut ReplyReceiver,
        id: &str,
        offset: u64,
    ) -> (Vec<u8>, String) {
        let mut received = Vec::new();
        loop {
            match reply(replies).await {
                Message::FileChunk {
                    offset: at, data, ..
                } => {
                    assert_eq!(at, offset + received.len() as u64);
                    received.extend_from_slice(&data);
                    let ack = Message::FileAck {
                        transfer_id: id.into(),
                        offset: offset + received.len() as u64,
                    };
                    transfers.handle(ack, None).await;
                }
                Message::FileEnd { sha256, .. } => return (received, sha256),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_get_resumes_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(3 * MIB, 9);
        let path = dir.path().join("out.bin");
        fs::write(&path, &data).unwrap();
        let offset = MIB as u64 + 5;

        transfers
            .handle(
                get("t-1", &path, offset, DEFAULT_FILE_WINDOW),
                Some(HOST.into()),
            )
            .await;
        match reply(&mut replies).await {
            Message::FileReady {
                offset: at,
                size,
                sha256,
                ..
            } => {
                assert_eq!(at, offset);
                assert_eq!(size, Some(data.len() as u64));
                assert_eq!(sha256, None, "the digest comes in FILE_END");
            }
            other => panic!("expected FILE_READY, got {other:?}"),
        }
        let (tail, sha256) = receive_all(&mut transfers, &mut replies, "t-1", offset).await;
        assert!(tail == data[offset as usize..], "the tail is identical");
        assert_eq!(
            sha256,
            sha256_hex(&data),
            "FILE_END has the whole file's digest"
        );

        transfers
            .handle(get("t-2", &path, 10 * MIB as u64, 8), Some(HOST.into()))
            .await;
        match reply(&mut replies).await {
            Message::FileReady { offset, .. } => assert_eq!(offset, 0, "beyond the end: from 0"),
            other => panic!("expected FILE_READY, got {other:?}"),
        }
        let (whole, sha256) = receive_all(&mut transfers, &mut replies, "t-2", 0).await;
        assert!(whole == data);
        assert_eq!(sha256, sha256_hex(&data));
    }

    #[tokio::test]
    async fn a_file_written_to_while_sent_ends_in_an_error_not_a_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(MIB, 13);
        let path = dir.path().join("growing.log");
        fs::write(&path, &data).unwrap();

        transfers
            .handle(get("t-1", &path, 0, 1), Some(HOST.into()))
            .await;
        assert!(matches!(
            reply(&mut replies).await,
            Message::FileReady { sha256: None, .. }
        ));
        let mut sent = 0;
        while sent < data.len() as u64 {
            match reply(&mut replies).await {
                Message::FileChunk { offset, data, .. } => {
                    sent = offset + data.len() as u64;
                    if offset == 0 {
                        // Someone rewrites the file while it is being sent.
                        let mut file = fs::OpenOptions::new().write(true).open(&path).unwrap();
                        std::io::Write::write_all(&mut file, b"rewritten").unwrap();
                        file.set_modified(SystemTime::now() + Duration::from_secs(5))
                            .unwrap();
                    }
                    let ack = Message::FileAck {
                        transfer_id: "t-1".into(),
                        offset: sent,
                    };
                    transfers.handle(ack, None).await;
                }
                other => panic!("expected FILE_CHUNK, got {other:?}"),
            }
        }
        let (code, message) = error(&mut replies, "t-1").await;
        assert_eq!(code, FileErrorCode::Io);
        assert!(message.contains("written to while being sent"), "{message}");
    }

    #[tokio::test]
    async fn a_get_of_a_missing_file_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let path = dir.path().join("missing.txt");
        transfers
            .handle(get("t-1", &path, 0, 8), Some(HOST.into()))
            .await;
        let (code, message) = error(&mut replies, "t-1").await;
        assert_eq!(code, FileErrorCode::NotFound);
        assert_eq!(message, format!("{} does not exist", path.display()));
    }

    #[tokio::test]
    async fn an_abort_mid_put_removes_the_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(MIB, 10);
        let path = dir.path().join("data.bin");

        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(
            &mut transfers,
            &mut replies,
            "t-1",
            &data,
            0,
            2 * CHUNK as usize,
            4,
        )
        .await;
        assert_eq!(names(dir.path()), vec![".data.bin.t-1.part"]);

        let abort = Message::FileAbort {
            transfer_id: "t-1".into(),
            reason: Some("cancelled by user".into()),
        };
        transfers.handle(abort, None).await;
        wait_until("the transfer is over", || transfers.active() == 0).await;
        assert!(
            names(dir.path()).is_empty(),
            "left behind: {:?}",
            names(dir.path())
        );
        assert!(replies.try_recv().is_err(), "an abort is not answered");
    }

    #[tokio::test]
    async fn idle_transfers_are_forgotten_and_a_put_keeps_its_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let (replies, mut receiver) = outbox::channel();
        let settings = FileSettings {
            allowed_roots: vec![dir.path().to_owned()],
            max_file_size: u64::MAX,
        };
        let mut transfers =
            Transfers::new(settings, replies).with_idle_timeout(Duration::from_millis(200));
        let data = random_bytes(MIB, 11);
        let source = dir.path().join("out.bin");
        fs::write(&source, &data).unwrap();

        transfers
            .handle(get("g-1", &source, 0, 1), Some(HOST.into()))
            .await;
        let path = dir.path().join("in.bin");
        transfers
            .handle(put("p-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(transfers.active(), 2);
        wait_until("both transfers are forgotten", || transfers.active() == 0).await;
        let mut words = Vec::new();
        while let Ok(reply) = receiver.try_recv() {
            words.push(reply.message.word());
        }
        words.sort_unstable();
        assert_eq!(
            words,
            vec!["FILE_CHUNK", "FILE_READY", "FILE_READY"],
            "one window's worth"
        );
        assert!(
            dir.path().join(".in.bin.p-1.part").exists(),
            "kept for a resume"
        );
    }

    #[tokio::test]
    async fn a_new_put_removes_stale_partial_files_of_the_same_target() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let stale = dir.path().join(".data.bin.old.part");
        let recent = dir.path().join(".data.bin.recent.part");
        fs::write(&stale, b"abandoned").unwrap();
        fs::write(&recent, b"in progress").unwrap();
        let day_and_more = SystemTime::now() - STALE_PARTIAL_AGE - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(day_and_more)
            .unwrap();

        let path = dir.path().join("data.bin");
        transfers
            .handle(put("t-1", offer(&path, b"data", None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        assert_eq!(
            names(dir.path()),
            vec![".data.bin.recent.part", ".data.bin.t-1.part"]
        );
    }

    #[tokio::test]
    async fn words_for_unknown_transfers_and_requests_without_reply_to_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let path = dir.path().join("data.bin");
        transfers
            .handle(put("t-1", offer(&path, b"x", None)), None)
            .await;
        let chunk = Message::FileChunk {
            transfer_id: "t-9".into(),
            offset: 0,
            data: Bytes::from_static(b"x"),
        };
        transfers.handle(chunk, Some(HOST.into())).await;
        end(&mut transfers, "t-9", b"x").await;
        assert_eq!(transfers.active(), 0);
        assert!(replies.try_recv().is_err());
        assert!(names(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn shutdown_stops_transfers_and_keeps_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut transfers, mut replies) = guest(dir.path());
        let data = random_bytes(MIB, 12);
        let path = dir.path().join("data.bin");
        transfers
            .handle(put("t-1", offer(&path, &data, None)), Some(HOST.into()))
            .await;
        assert_eq!(reply(&mut replies).await, ready("t-1", 0));
        send_chunks(
            &mut transfers,
            &mut replies,
            "t-1",
            &data,
            0,
            CHUNK as usize,
            4,
        )
        .await;
        transfers.shutdown().await;
        assert_eq!(
            fs::metadata(dir.path().join(".data.bin.t-1.part"))
                .unwrap()
                .len(),
            u64::from(CHUNK)
        );
    }
}
