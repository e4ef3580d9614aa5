//! The transfer actor: one file moving between this host and a guest, either way.
//!
//! Upload (`cpFileToVM`): hash the local file, `FILE_PUT`, wait for `FILE_READY`
//! (the offset the guest already holds from an earlier attempt), send `FILE_CHUNK`s
//! keeping at most `window` unacknowledged (read in order by the transfer's
//! [`DiskReader`] on the blocking pool), and after the last `FILE_ACK` send
//! `FILE_END`; the guest checks the SHA-256, renames its temporary file into place
//! and answers `FILE_DONE`. Download (`cpFileFromVM`): `FILE_GET` from the offset of
//! our own partial file, `FILE_READY` tells the size (and, from older guests, the
//! SHA-256), chunks that continue the bytes received are handed in order to the
//! transfer's disk worker on the blocking pool ([`DiskWorker`]), which writes them
//! into `<local>.vmc-part-<id>`, hashes them as they come and reports each write
//! back; every write reported is acknowledged. On `FILE_END` the worker flushes the
//! file, checks its SHA-256 against the one `FILE_END` carries (reading the file
//! again only if the transfer resumed mid-way), renames it into place, and the actor
//! sends `FILE_DONE`. The actor's thread never reads, writes, hashes or flushes
//! a file (an upload to an older guest, which wants the digest in `FILE_PUT`, is
//! hashed before the actor starts, by its caller). Every
//! `stall` without progress (a chunk lost with a broker restart), the request is
//! repeated with the same transfer id and the transfer resumes from where the
//! receiving side stands. A failure removes our partial file and ends with the
//! guest's error code. Progress (bytes, rate) is stored as it goes. The actor
//! stays a while after the end for late duplicates, then stops and tells the
//! registry; should it stop before the end, the transfer fails (`io`) and the
//! guest is told to abort.

use super::broker::{BrokerActor, Publish};
use super::{EngineError, EngineEvent, EventSender};
use crate::store::{Store, TransferRecord, TransferState};
use actix::prelude::*;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use vmc_protocol::words::{FileErrorCode, FileOffer, FileRequest, Message as Word};

/// SHA-256 of a file, lowercase hex (blocking).
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex(hasher)))
}

fn hex(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Flushes a received file, checks it against what the guest announced and moves
/// it into place (blocking). `hashed` is the digest of the whole file when every
/// byte was hashed on arrival; otherwise the file is read again.
fn finish_download(
    file: Option<File>,
    part: &Path,
    local: &Path,
    hashed: Option<(u64, Sha256)>,
    size: u64,
    sha256: &str,
) -> Result<(u64, String), (FileErrorCode, String)> {
    let file = match file {
        Some(file) => Some(file),
        // Nothing was written (an empty file): the partial file may not exist yet.
        None if size == 0 => Some(open_part(part).map_err(|e| {
            (
                FileErrorCode::Io,
                format!("cannot write {}: {e}", part.display()),
            )
        })?),
        None => None,
    };
    if let Some(f) = file {
        f.sync_all().map_err(|e| {
            (
                FileErrorCode::Io,
                format!("cannot sync {}: {e}", part.display()),
            )
        })?;
    }
    let (got_size, got_sha) = match hashed {
        Some((n, hasher)) if n == size => (n, hex(hasher)),
        _ => sha256_file(part).map_err(|e| {
            (
                FileErrorCode::Io,
                format!("cannot read {}: {e}", part.display()),
            )
        })?,
    };
    if got_size != size || got_sha != sha256 {
        return Err((
            FileErrorCode::ChecksumMismatch,
            format!(
                "received {got_size} bytes with SHA-256 {got_sha}, the guest sent {size} bytes \
                 with {sha256}"
            ),
        ));
    }
    std::fs::rename(part, local).map_err(|e| {
        (
            FileErrorCode::Io,
            format!("cannot move the file to {}: {e}", local.display()),
        )
    })?;
    Ok((size, got_sha))
}

/// Opens (or creates) a download's partial file for writing, keeping its bytes.
fn open_part(part: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
}

/// Outcome of checking and placing a finished download.
type Finished = Result<(u64, String), (FileErrorCode, String)>;

/// Work for a download's disk worker, done in the order sent.
#[derive(Debug)]
enum DiskWork {
    /// Write (and hash, if it continues the hashed bytes) a chunk at its offset.
    Chunk { offset: u64, data: Bytes },
    /// Cut the file to `len` bytes: the guest resumes from there. Writes reported
    /// from now on carry `epoch`.
    Truncate { len: u64, epoch: u64 },
    /// Flush, check and move the file into place (see [`finish_download`]).
    Finish {
        size: u64,
        sha256: String,
        done: oneshot::Sender<Finished>,
    },
    /// Remove the partial file and stop.
    Discard,
}

/// The disk worker reports a write (or its failure).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Written {
    /// The [`DiskWork::Truncate`] epoch the write belongs to; older ones are stale.
    epoch: u64,
    /// The bytes written contiguously from the start, or why writing failed.
    upto: Result<u64, String>,
}

/// A download's disk worker: a task on the blocking pool that owns the partial
/// file, so that writing, hashing and the final flush never run on the actors'
/// thread. It stops when its actor drops the sender.
#[derive(Debug)]
struct DiskWorker {
    work: mpsc::UnboundedSender<DiskWork>,
}

impl DiskWorker {
    fn start(part: PathBuf, local: PathBuf, report: Recipient<Written>) -> DiskWorker {
        let (work, mut queue) = mpsc::unbounded_channel();
        tokio::task::spawn_blocking(move || {
            let mut file: Option<File> = None;
            // The digest of bytes `0..n` as written in order; `None` once a resume
            // broke the sequence (then the file is read again at the end).
            let mut hashed = Some((0u64, Sha256::new()));
            let mut epoch = 0;
            let mut failed = false;
            while let Some(item) = queue.blocking_recv() {
                match item {
                    DiskWork::Chunk { .. } if failed => {}
                    DiskWork::Chunk { offset, data } => {
                        let written = match &file {
                            Some(f) => f.write_all_at(&data, offset),
                            None => open_part(&part).and_then(|f| {
                                let written = f.write_all_at(&data, offset);
                                file = Some(f);
                                written
                            }),
                        };
                        let end = offset + data.len() as u64;
                        let upto = match written {
                            Ok(()) => {
                                hashed = match hashed.take() {
                                    Some((n, mut hasher)) if n == offset => {
                                        hasher.update(&data);
                                        Some((end, hasher))
                                    }
                                    _ => None,
                                };
                                Ok(end)
                            }
                            Err(e) => {
                                failed = true;
                                Err(format!("cannot write {}: {e}", part.display()))
                            }
                        };
                        report.do_send(Written { epoch, upto });
                    }
                    DiskWork::Truncate { len, epoch: next } => {
                        epoch = next;
                        failed = false;
                        let cut = match &file {
                            Some(f) => f.set_len(len),
                            None => open_part(&part).and_then(|f| f.set_len(len)),
                        };
                        if let Err(e) = cut {
                            log::debug!("cannot cut {} to {len} bytes: {e}", part.display());
                        }
                        hashed = match hashed.take() {
                            Some((n, hasher)) if n <= len => Some((n, hasher)),
                            _ if len == 0 => Some((0, Sha256::new())),
                            _ => None,
                        };
                    }
                    DiskWork::Finish { size, sha256, done } => {
                        let finished = finish_download(
                            file.take(),
                            &part,
                            &local,
                            hashed.take(),
                            size,
                            &sha256,
                        );
                        let _ = done.send(finished);
                        return;
                    }
                    DiskWork::Discard => {
                        drop(file.take());
                        let _ = std::fs::remove_file(&part);
                        return;
                    }
                }
            }
        });
        DiskWorker { work }
    }

    /// Queues work; false if the worker has stopped.
    fn queue(&self, work: DiskWork) -> bool {
        self.work.send(work).is_ok()
    }
}

/// A chunk an upload's reader is asked for.
#[derive(Debug)]
struct ReadWork {
    offset: u64,
    len: u64,
    epoch: u64,
}

/// The reader hands back a chunk (or why it could not read it).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct ChunkRead {
    offset: u64,
    epoch: u64,
    data: Result<Bytes, String>,
    /// With the chunk that completes the file, when the reader hashes it: the
    /// file's SHA-256, for `FILE_END`.
    digest: Option<String>,
}

/// What an upload's reader hashes as it reads, when the offer went without a
/// digest: every byte once, in order (chunks sent again after a rewind are not
/// hashed again), and the file's size and modification time when it was opened.
struct Hashing {
    hasher: Sha256,
    hashed: u64,
    size: u64,
    opened: Option<std::fs::Metadata>,
}

impl Hashing {
    /// Takes in a chunk read at `offset`; once the whole file is in, its digest,
    /// or why it cannot be trusted (the file changed while it was being sent).
    fn take(&mut self, offset: u64, data: &[u8], file: &File) -> Result<Option<String>, String> {
        if offset != self.hashed || data.is_empty() {
            return Ok(None);
        }
        self.hasher.update(data);
        self.hashed += data.len() as u64;
        if self.hashed < self.size {
            return Ok(None);
        }
        let now = file.metadata().ok();
        let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
            a.len() == b.len() && a.modified().ok() == b.modified().ok()
        };
        match (&self.opened, &now) {
            (Some(before), Some(after)) if same(before, after) => {
                Ok(Some(hex(std::mem::take(&mut self.hasher))))
            }
            _ => Err("the file changed while it was being sent".to_owned()),
        }
    }
}

/// An upload's reader: a task on the blocking pool that reads the chunks asked
/// for, in order, so that the actors' thread never waits for the disk. It stops
/// when its actor drops the sender.
#[derive(Debug)]
struct DiskReader {
    work: mpsc::UnboundedSender<ReadWork>,
}

impl DiskReader {
    /// A reader of `local`; with `hash_size`, it also hashes the file (of that
    /// size) as it reads and hands the digest back with the last chunk.
    fn start(local: PathBuf, hash_size: Option<u64>, report: Recipient<ChunkRead>) -> DiskReader {
        let (work, mut queue) = mpsc::unbounded_channel::<ReadWork>();
        tokio::task::spawn_blocking(move || {
            let file = File::open(&local);
            let mut hashing = hash_size.map(|size| Hashing {
                hasher: Sha256::new(),
                hashed: 0,
                size,
                opened: file.as_ref().ok().and_then(|f| f.metadata().ok()),
            });
            while let Some(ReadWork { offset, len, epoch }) = queue.blocking_recv() {
                let mut digest = None;
                let data = file
                    .as_ref()
                    .map_err(|e| format!("cannot read {}: {e}", local.display()))
                    .and_then(|file| {
                        // A chunk is at most MAX_FILE_CHUNK_SIZE bytes, so it fits.
                        let mut data = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                        file.read_exact_at(&mut data, offset)
                            .map_err(|e| format!("cannot read {}: {e}", local.display()))?;
                        if let Some(hashing) = &mut hashing {
                            digest = hashing
                                .take(offset, &data, file)
                                .map_err(|why| format!("cannot send {}: {why}", local.display()))?;
                        }
                        Ok(Bytes::from(data))
                    });
                report.do_send(ChunkRead {
                    offset,
                    epoch,
                    data,
                    digest,
                });
            }
        });
        DiskReader { work }
    }

    fn queue(&self, work: ReadWork) {
        // The reader only stops when this sender is dropped.
        let _ = self.work.send(work);
    }
}

/// Which way the bytes go, with what each side needs.
#[derive(Debug)]
enum Direction {
    ToGuest {
        /// Started with the first chunk to send.
        reader: Option<DiskReader>,
        size: u64,
        /// The digest `FILE_PUT` offers: computed before the transfer for a guest
        /// that needs it there, else none.
        offered: Option<String>,
        /// The digest `FILE_END` gives: the offered one, or the reader's once it
        /// has read the whole file.
        sha256: Option<String>,
        /// Bytes asked of the reader (and sent once read).
        sent: u64,
        /// Bumped whenever sending starts again from an earlier offset; chunks
        /// read for an older epoch are not sent.
        epoch: u64,
    },
    FromGuest {
        part: PathBuf,
        /// Started with the first chunk (or a resume, or `FILE_END`).
        disk: Option<DiskWorker>,
        /// Bytes handed to the disk worker in order (written, or about to be).
        received: u64,
        /// Bumped on every resume from an earlier offset; writes of older epochs
        /// are not reported as progress.
        epoch: u64,
        size: Option<u64>,
        /// `FILE_END` arrived and the file is being checked: the rest is ignored.
        completing: bool,
    },
}

/// The actor of one transfer.
pub struct TransferActor {
    id: String,
    store: Arc<Store>,
    broker: Addr<BrokerActor>,
    guest_queue: String,
    local: PathBuf,
    remote: String,
    chunk_size: u32,
    window: u32,
    stall: Duration,
    direction: Direction,
    /// Bytes the receiving side holds (acknowledged for uploads, written for downloads).
    done: u64,
    last_progress: Instant,
    stored_at: u64,
    ended: Option<Result<TransferRecord, (FileErrorCode, String)>>,
    waiters: Vec<oneshot::Sender<Result<TransferRecord, EngineError>>>,
    events: EventSender,
    linger: Duration,
    on_stop: Option<Recipient<TransferStopped>>,
}

/// Told to the registry when a transfer's actor stops.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TransferStopped {
    pub transfer_id: String,
}

impl std::fmt::Debug for TransferActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferActor")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish()
    }
}

/// Settings of a new transfer.
#[derive(Debug)]
pub struct TransferPlan {
    pub id: String,
    pub to_guest: bool,
    pub local: PathBuf,
    pub remote: String,
    pub guest_queue: String,
    pub chunk_size: u32,
    pub window: u32,
    pub stall: Duration,
    /// For uploads: the local file's size, and its SHA-256 when computed
    /// beforehand (for a guest that wants it in the offer); without it the file is
    /// hashed while it is read for sending.
    pub local_digest: Option<(u64, Option<String>)>,
    /// How long the actor stays after the end (late duplicates).
    pub linger: Duration,
}

/// Where a download to `local` is written until its digest is checked.
pub fn part_path(local: &Path, transfer_id: &str) -> PathBuf {
    let mut part = local.to_owned().into_os_string();
    part.push(format!(".vmc-part-{transfer_id}"));
    part.into()
}

impl TransferActor {
    pub fn new(
        plan: TransferPlan,
        store: Arc<Store>,
        broker: Addr<BrokerActor>,
        events: EventSender,
        on_stop: Recipient<TransferStopped>,
    ) -> TransferActor {
        let direction = match plan.local_digest {
            Some((size, offered)) if plan.to_guest => Direction::ToGuest {
                reader: None,
                size,
                sha256: offered.clone(),
                offered,
                sent: 0,
                epoch: 0,
            },
            _ => Direction::FromGuest {
                part: part_path(&plan.local, &plan.id),
                disk: None,
                received: 0,
                epoch: 0,
                size: None,
                completing: false,
            },
        };
        TransferActor {
            id: plan.id,
            store,
            broker,
            guest_queue: plan.guest_queue,
            local: plan.local,
            remote: plan.remote,
            chunk_size: plan.chunk_size,
            window: plan.window,
            stall: plan.stall,
            direction,
            done: 0,
            last_progress: Instant::now(),
            stored_at: 0,
            ended: None,
            waiters: Vec::new(),
            events,
            linger: plan.linger,
            on_stop: Some(on_stop),
        }
    }

    fn send(&self, word: Word) {
        self.broker.do_send(Publish {
            destination: self.guest_queue.clone(),
            word,
            to: None,
            confirm: false,
        });
    }

    /// Sends (or repeats) the opening request.
    fn request(&mut self) {
        let word = match &mut self.direction {
            Direction::ToGuest { size, offered, .. } => Word::FilePut {
                transfer_id: self.id.clone(),
                offer: FileOffer {
                    path: self.remote.clone(),
                    size: *size,
                    sha256: offered.clone(),
                    mode: None,
                    chunk_size: self.chunk_size,
                    window: self.window,
                },
            },
            Direction::FromGuest {
                part,
                disk,
                received,
                ..
            } => {
                // Before any chunk: what an earlier attempt left; after: what is
                // written or queued to be (a write failure ends the transfer).
                let held = match disk {
                    Some(_) => *received,
                    None => std::fs::metadata(&*part).map(|m| m.len()).unwrap_or(0),
                };
                *received = held;
                self.done = self.done.min(held);
                if disk.is_none() {
                    self.done = held;
                }
                Word::FileGet {
                    transfer_id: self.id.clone(),
                    request: FileRequest {
                        path: self.remote.clone(),
                        offset: held,
                        chunk_size: self.chunk_size,
                        window: self.window,
                    },
                }
            }
        };
        self.send(word);
    }

    fn progress(&mut self, done: u64) {
        if done > self.done {
            self.done = done;
            self.last_progress = Instant::now();
        }
        // Store progress every 4 MiB or so, not on every chunk.
        if self.done >= self.stored_at + 4 * 1024 * 1024 {
            self.stored_at = self.done;
            let _ = self.events.send(EngineEvent::Transfer {
                transfer_id: self.id.clone(),
                bytes_done: self.done,
                state: TransferState::Running,
            });
            if let Err(e) = self.store.update_transfer_progress(&self.id, self.done) {
                log::debug!("cannot store progress of transfer {}: {e}", self.id);
            }
        }
    }

    /// Asks the reader for chunks while the window has room, and sends `FILE_END`
    /// once everything is acknowledged (uploads).
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let window = u64::from(self.window) * u64::from(self.chunk_size);
        let Direction::ToGuest {
            reader,
            size,
            offered,
            sha256,
            sent,
            epoch,
        } = &mut self.direction
        else {
            return;
        };
        while *sent < *size && *sent - self.done.min(*sent) < window {
            let len = u64::from(self.chunk_size).min(*size - *sent);
            let hash_size = offered.is_none().then_some(*size);
            let reader = reader.get_or_insert_with(|| {
                DiskReader::start(self.local.clone(), hash_size, ctx.address().recipient())
            });
            reader.queue(ReadWork {
                offset: *sent,
                len,
                epoch: *epoch,
            });
            *sent += len;
        }
        // The reader's digest comes with the last chunk, before it is sent, so
        // it is there once everything is acknowledged.
        if let (true, Some(sha256)) = (self.done >= *size, sha256.as_ref()) {
            let end = Word::FileEnd {
                transfer_id: self.id.clone(),
                size: *size,
                sha256: sha256.clone(),
            };
            self.send(end);
        }
    }

    /// Sends (again) from `offset`: chunks read for earlier sends are dropped.
    fn rewind(&mut self, offset: u64) {
        if let Direction::ToGuest { sent, epoch, .. } = &mut self.direction {
            *sent = offset;
            *epoch += 1;
        }
    }

    fn end(
        &mut self,
        outcome: Result<(u64, String), (FileErrorCode, String)>,
        ctx: &mut Context<Self>,
    ) {
        if self.ended.is_some() {
            return;
        }
        let (state, size, sha, error) = match &outcome {
            Ok((size, sha)) => (TransferState::Done, Some(*size), Some(sha.clone()), None),
            Err((code, message)) => {
                let state = if *code == FileErrorCode::Cancelled {
                    TransferState::Cancelled
                } else {
                    TransferState::Failed
                };
                (state, None, None, Some(format!("{code}: {message}")))
            }
        };
        if let Direction::FromGuest { part, disk, .. } = &mut self.direction {
            if outcome.is_err() {
                // The worker removes the file after any write still queued.
                let queued = disk
                    .take()
                    .is_some_and(|disk| disk.queue(DiskWork::Discard));
                if !queued {
                    let _ = std::fs::remove_file(&*part);
                }
            }
            *disk = None;
        }
        let _ = self.events.send(EngineEvent::Transfer {
            transfer_id: self.id.clone(),
            bytes_done: self.done,
            state,
        });
        if let Err(e) =
            self.store
                .finish_transfer(&self.id, state, size, sha.as_deref(), error.as_deref())
        {
            log::error!("cannot store the end of transfer {}: {e}", self.id);
        }
        let ended = match outcome {
            Ok(_) => self.store.transfer(&self.id).ok().flatten().ok_or((
                FileErrorCode::Io,
                "the transfer's record vanished".to_owned(),
            )),
            Err(e) => Err(e),
        };
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(as_result(&ended));
        }
        self.ended = Some(ended);
        if ctx.state().alive() {
            ctx.run_later(self.linger, |_, ctx| ctx.stop());
        }
    }

    /// Hands a chunk that continues the received bytes to the disk worker; any
    /// other (a duplicate or a gap) is answered with where we stand.
    fn on_chunk(&mut self, offset: u64, data: Bytes, ctx: &mut Context<Self>) {
        let Direction::FromGuest {
            part,
            disk,
            received,
            completing: false,
            ..
        } = &mut self.direction
        else {
            return;
        };
        if offset != *received {
            self.send(Word::FileAck {
                transfer_id: self.id.clone(),
                offset: self.done,
            });
            return;
        }
        let len = data.len() as u64;
        let disk = disk.get_or_insert_with(|| {
            DiskWorker::start(part.clone(), self.local.clone(), ctx.address().recipient())
        });
        if disk.queue(DiskWork::Chunk { offset, data }) {
            *received += len;
        }
    }

    /// Verifies and moves a finished download into place on the blocking pool, then
    /// answers the guest and ends.
    fn complete_download(&mut self, size: u64, sha256: String, ctx: &mut Context<Self>) {
        let Direction::FromGuest {
            part,
            disk,
            completing,
            ..
        } = &mut self.direction
        else {
            let outcome = Err((FileErrorCode::Protocol, "FILE_END for an upload".into()));
            return self.answer_end(outcome, ctx);
        };
        if *completing {
            return; // a repeated FILE_END while the first is being checked
        }
        *completing = true;
        let disk = disk.get_or_insert_with(|| {
            DiskWorker::start(part.clone(), self.local.clone(), ctx.address().recipient())
        });
        let (done, checked) = oneshot::channel();
        disk.queue(DiskWork::Finish { size, sha256, done });
        ctx.wait(checked.into_actor(self).map(|checked, act, ctx| {
            let outcome = checked.unwrap_or_else(|_| {
                Err((
                    FileErrorCode::Io,
                    "the received file's disk work stopped unexpectedly".to_owned(),
                ))
            });
            if let Direction::FromGuest { disk, .. } = &mut act.direction {
                *disk = None; // it has stopped; nothing is left to remove
            }
            act.answer_end(outcome, ctx);
        }));
    }

    /// Tells the guest how a download ended, then ends.
    fn answer_end(
        &mut self,
        outcome: Result<(u64, String), (FileErrorCode, String)>,
        ctx: &mut Context<Self>,
    ) {
        match &outcome {
            Ok((size, sha)) => self.send(Word::FileDone {
                transfer_id: self.id.clone(),
                size: *size,
                sha256: sha.clone(),
            }),
            Err((code, message)) => self.send(Word::FileError {
                transfer_id: self.id.clone(),
                code: *code,
                message: message.clone(),
            }),
        }
        self.end(outcome, ctx);
    }
}

fn as_result(
    ended: &Result<TransferRecord, (FileErrorCode, String)>,
) -> Result<TransferRecord, EngineError> {
    match ended {
        Ok(record) => Ok(record.clone()),
        Err((code, message)) => Err(EngineError::Transfer {
            code: *code,
            message: message.clone(),
        }),
    }
}

impl Actor for TransferActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.request();
        let every = (self.stall / 2).max(Duration::from_millis(200));
        ctx.run_interval(every, |act, _ctx| {
            if act.ended.is_none() && act.last_progress.elapsed() >= act.stall {
                log::info!(
                    "transfer {} made no progress for {:?}: asking again",
                    act.id,
                    act.stall
                );
                act.last_progress = Instant::now();
                // Resend whatever was not acknowledged.
                act.rewind(act.done);
                act.request();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        if super::tearing_down() {
            // The host agent is stopping: the next start ends the transfer.
            return;
        }
        if self.ended.is_none() {
            let why = "the transfer's actor stopped before its end".to_owned();
            log::error!("transfer {}: {why}", self.id);
            self.send(Word::FileAbort {
                transfer_id: self.id.clone(),
                reason: Some(why.clone()),
            });
            self.end(Err((FileErrorCode::Io, why)), ctx);
        }
        if let Some(on_stop) = self.on_stop.take() {
            on_stop.do_send(TransferStopped {
                transfer_id: self.id.clone(),
            });
        }
    }
}

/// A file word from the guest about this transfer.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FromGuest {
    pub word: Word,
}

impl Handler<FromGuest> for TransferActor {
    type Result = ();

    fn handle(&mut self, msg: FromGuest, ctx: &mut Context<Self>) {
        if self.ended.is_some() {
            return;
        }
        let upload = matches!(self.direction, Direction::ToGuest { .. });
        match msg.word {
            Word::FileReady {
                offset,
                size,
                sha256,
                ..
            } => {
                self.last_progress = Instant::now();
                match &mut self.direction {
                    Direction::ToGuest { .. } => {
                        self.done = offset;
                        self.rewind(offset);
                        self.pump(ctx);
                    }
                    Direction::FromGuest {
                        completing: true, ..
                    } => {}
                    Direction::FromGuest {
                        size: s,
                        part,
                        disk,
                        received,
                        epoch,
                        ..
                    } => {
                        // The digest, if this guest announces one, is checked
                        // against the one FILE_END carries.
                        let _ = sha256;
                        *s = size;
                        if offset < *received {
                            *epoch += 1;
                            let disk = disk.get_or_insert_with(|| {
                                DiskWorker::start(
                                    part.clone(),
                                    self.local.clone(),
                                    ctx.address().recipient(),
                                )
                            });
                            disk.queue(DiskWork::Truncate {
                                len: offset,
                                epoch: *epoch,
                            });
                            *received = offset;
                            self.done = self.done.min(offset);
                        }
                    }
                }
            }
            Word::FileAck { offset, .. } if upload => {
                self.progress(offset);
                self.pump(ctx);
            }
            Word::FileChunk { offset, data, .. } if !upload => self.on_chunk(offset, data, ctx),
            Word::FileEnd { size, sha256, .. } if !upload => {
                self.complete_download(size, sha256, ctx);
            }
            Word::FileDone { size, sha256, .. } if upload => {
                self.progress(size);
                self.end(Ok((size, sha256)), ctx);
            }
            Word::FileError { code, message, .. } => self.end(Err((code, message)), ctx),
            Word::FileAbort { reason, .. } => self.end(
                Err((
                    FileErrorCode::Cancelled,
                    reason.unwrap_or_else(|| "the guest aborted".into()),
                )),
                ctx,
            ),
            other => log::debug!("transfer {}: unexpected {}", self.id, other.word()),
        }
    }
}

impl Handler<ChunkRead> for TransferActor {
    type Result = ();

    fn handle(&mut self, msg: ChunkRead, ctx: &mut Context<Self>) {
        let current = match &self.direction {
            Direction::ToGuest { epoch, .. } => *epoch == msg.epoch,
            Direction::FromGuest { .. } => false,
        };
        if self.ended.is_some() || !current {
            return;
        }
        if let (Some(digest), Direction::ToGuest { sha256, .. }) = (msg.digest, &mut self.direction)
        {
            *sha256 = Some(digest);
        }
        match msg.data {
            Ok(data) => self.send(Word::FileChunk {
                transfer_id: self.id.clone(),
                offset: msg.offset,
                data,
            }),
            Err(message) => {
                self.send(Word::FileAbort {
                    transfer_id: self.id.clone(),
                    reason: Some(message.clone()),
                });
                self.end(Err((FileErrorCode::Io, message)), ctx);
            }
        }
    }
}

impl Handler<Written> for TransferActor {
    type Result = ();

    fn handle(&mut self, msg: Written, ctx: &mut Context<Self>) {
        let current = match &self.direction {
            Direction::FromGuest {
                epoch, completing, ..
            } => *epoch == msg.epoch && !*completing,
            Direction::ToGuest { .. } => false,
        };
        if self.ended.is_some() || !current {
            return;
        }
        match msg.upto {
            Ok(upto) => {
                self.progress(upto);
                self.send(Word::FileAck {
                    transfer_id: self.id.clone(),
                    offset: upto,
                });
            }
            Err(message) => {
                self.send(Word::FileAbort {
                    transfer_id: self.id.clone(),
                    reason: Some(message.clone()),
                });
                self.end(Err((FileErrorCode::Io, message)), ctx);
            }
        }
    }
}

/// Waits for the transfer's end.
#[derive(Debug, Message)]
#[rtype(result = "Result<TransferRecord, EngineError>")]
pub struct WaitEnded;

impl Handler<WaitEnded> for TransferActor {
    type Result = ResponseFuture<Result<TransferRecord, EngineError>>;

    fn handle(&mut self, _msg: WaitEnded, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(ended) = &self.ended {
            let result = as_result(ended);
            return Box::pin(async move { result });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        let id = self.id.clone();
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(EngineError::Internal(format!(
                    "transfer {id} stopped unexpectedly"
                )))
            })
        })
    }
}
