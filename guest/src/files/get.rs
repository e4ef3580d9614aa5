//! The sending end of a GET: one task per transfer, from `FILE_GET` to `FILE_DONE`.
//!
//! The task checks the path, opens the file, and hashes all of it in
//! `spawn_blocking` (the digest and size in `FILE_READY` describe the file as it
//! was read then). It answers `FILE_READY` from the requested offset (0 if that is
//! beyond the end), then sends chunks in order, read asynchronously, as long as
//! each starts below `acked + window × chunk_size`; every `FILE_ACK` that advances
//! `acked` opens the window again. Once `acked` reaches the size it sends
//! `FILE_END` and waits for the host's `FILE_DONE`, `FILE_ERROR` or `FILE_ABORT`,
//! any of which ends the transfer. It keeps no timer for re-sending: a host that
//! misses chunks repeats `FILE_GET`, which replaces this task.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::task::JoinHandle;
use vmc_protocol::words::{FileRequest, Message};

use super::paths::{self, AllowedRoots};
use super::{
    blocking, check_pacing, hex, wait_for, Inbox, Input, Next, TransferContext, TransferError,
};

/// Bytes read at a time when hashing the file.
const HASH_BUFFER: usize = 1024 * 1024;

/// What a GET task starts from.
#[derive(Debug)]
pub(super) struct GetStart {
    pub(super) transfer_id: String,
    pub(super) request: FileRequest,
    pub(super) reply_to: String,
}

/// Sends one GET (see the module documentation). `previous` is the task of an
/// earlier attempt with the same id, which must finish first.
pub(super) async fn run(
    context: Arc<TransferContext>,
    start: GetStart,
    mut inbox: Inbox,
    previous: Option<JoinHandle<()>>,
) {
    let GetStart {
        transfer_id,
        request,
        reply_to,
    } = start;
    wait_for(previous, &transfer_id).await;
    let mut sender = match Sender::open(&context, &request).await {
        Ok(sender) => sender,
        Err(err) => return context.fail(&transfer_id, &reply_to, &err),
    };
    log::info!(
        "transfer {transfer_id}: sending {} ({} bytes) from byte {}",
        sender.path.display(),
        sender.size,
        sender.acked
    );
    context.send(
        &reply_to,
        Message::FileReady {
            transfer_id: transfer_id.clone(),
            offset: sender.acked,
            size: Some(sender.size),
            sha256: Some(sender.sha256.clone()),
        },
    );
    if let Err(err) = sender.fill(&context, &transfer_id, &reply_to).await {
        return context.fail(&transfer_id, &reply_to, &err);
    }
    loop {
        let input = match inbox.next(context.idle_timeout).await {
            Next::Input(input) => input,
            Next::Idle => {
                log::info!(
                    "transfer {transfer_id}: nothing from the host for {:?}; forgetting it",
                    context.idle_timeout
                );
                return;
            }
            Next::Closed => return,
        };
        match input {
            Input::Ack { offset } => {
                let sent = match sender.acknowledged(offset) {
                    Ok(()) => sender.fill(&context, &transfer_id, &reply_to).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = sent {
                    return context.fail(&transfer_id, &reply_to, &err);
                }
            }
            Input::Done { size, sha256 } => {
                if size == sender.size && sha256.eq_ignore_ascii_case(&sender.sha256) {
                    log::info!(
                        "transfer {transfer_id}: the host has {}",
                        sender.path.display()
                    );
                } else {
                    log::warn!(
                        "transfer {transfer_id}: the host took {size} bytes with SHA-256 {sha256}, \
                         but {} bytes with {} were sent",
                        sender.size,
                        sender.sha256
                    );
                }
                return;
            }
            Input::Failed { code, message } => {
                log::warn!("transfer {transfer_id}: the host gave up: {code}: {message}");
                return;
            }
            Input::Abort { reason } => {
                log::info!(
                    "transfer {transfer_id}: aborted by the host ({})",
                    reason.as_deref().unwrap_or("no reason given")
                );
                return;
            }
            Input::Stop { .. } => return,
            other @ (Input::Chunk { .. } | Input::End { .. }) => log::debug!(
                "transfer {transfer_id}: {} ignored, the guest is the sender",
                other.word()
            ),
        }
    }
}

/// A GET in progress.
#[derive(Debug)]
struct Sender {
    /// The path as requested, for messages.
    path: PathBuf,
    file: tokio::fs::File,
    size: u64,
    sha256: String,
    chunk_size: u64,
    window: u64,
    /// The highest offset the host acknowledged (at first, where sending starts).
    acked: u64,
    /// The offset of the next chunk to send; the file is positioned there.
    next: u64,
    end_sent: bool,
}

impl Sender {
    async fn open(
        context: &TransferContext,
        request: &FileRequest,
    ) -> Result<Sender, TransferError> {
        check_pacing(&request.path, request.chunk_size, request.window)?;
        let path = PathBuf::from(&request.path);
        let roots = context.roots.clone();
        let requested = request.path.clone();
        let (file, size, sha256) =
            blocking(&path, move || open_and_hash(&roots, &requested)).await?;
        let offset = if request.offset > size {
            0
        } else {
            request.offset
        };
        let mut file = tokio::fs::File::from_std(file);
        file.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|source| TransferError::Io {
                path: path.clone(),
                action: "seek in the file",
                source,
            })?;
        Ok(Sender {
            path,
            file,
            size,
            sha256,
            chunk_size: u64::from(request.chunk_size),
            window: u64::from(request.window),
            acked: offset,
            next: offset,
            end_sent: false,
        })
    }

    /// Takes the host's cumulative `FILE_ACK`.
    fn acknowledged(&mut self, offset: u64) -> Result<(), TransferError> {
        if offset > self.next {
            return Err(TransferError::Protocol {
                path: self.path.display().to_string(),
                reason: format!(
                    "FILE_ACK acknowledges {offset} bytes, but only {} were sent",
                    self.next
                ),
            });
        }
        self.acked = self.acked.max(offset);
        Ok(())
    }

    /// Sends the chunks the window allows, then `FILE_END` once all are acknowledged.
    async fn fill(
        &mut self,
        context: &TransferContext,
        transfer_id: &str,
        reply_to: &str,
    ) -> Result<(), TransferError> {
        let limit = self
            .acked
            .saturating_add(self.window.saturating_mul(self.chunk_size));
        while self.next < self.size && self.next < limit {
            let len = self.chunk_size.min(self.size - self.next);
            // A chunk is at most MAX_FILE_CHUNK_SIZE (checked on open), so it fits.
            let mut data = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
            if let Err(source) = self.file.read_exact(&mut data).await {
                return Err(if source.kind() == io::ErrorKind::UnexpectedEof {
                    TransferError::Shrunk {
                        path: self.path.clone(),
                        size: self.size,
                    }
                } else {
                    TransferError::Io {
                        path: self.path.clone(),
                        action: "read the file",
                        source,
                    }
                });
            }
            context.send(
                reply_to,
                Message::FileChunk {
                    transfer_id: transfer_id.to_owned(),
                    offset: self.next,
                    data: Bytes::from(data),
                },
            );
            self.next += len;
        }
        if self.acked == self.size && !self.end_sent {
            self.end_sent = true;
            context.send(
                reply_to,
                Message::FileEnd {
                    transfer_id: transfer_id.to_owned(),
                    size: self.size,
                    sha256: self.sha256.clone(),
                },
            );
        }
        Ok(())
    }
}

/// Checks and opens the requested file and hashes it. Blocking.
fn open_and_hash(
    roots: &AllowedRoots,
    requested: &str,
) -> Result<(File, u64, String), TransferError> {
    let canonical = paths::resolve_get(roots, requested)?;
    let mut file = paths::open_for_get(roots, &canonical)?;
    let mut hasher = Sha256::new();
    let mut size = 0;
    let mut buffer = vec![0; HASH_BUFFER];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(TransferError::Io {
                    path: PathBuf::from(requested),
                    action: "read the file",
                    source,
                })
            }
        };
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((file, size, hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_large_file_is_hashed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::canonicalize(&[dir.path().to_owned()]);
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..3 * HASH_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        let (_file, size, sha256) = open_and_hash(&roots, &path.display().to_string()).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(sha256, hex(&Sha256::digest(&data)));
    }

    #[test]
    fn a_fifo_is_refused_rather_than_read_forever() {
        let dir = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::canonicalize(&[dir.path().to_owned()]);
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success(), "mkfifo works");
        let err = open_and_hash(&roots, &fifo.display().to_string()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is not a regular file", fifo.display())
        );
    }
}
