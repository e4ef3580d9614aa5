//! The host's end of file transfers, for tests: uploads and downloads driven word
//! by word as `docs/PROTOCOL.md` describes (FILE_PUT/FILE_GET, FILE_READY, windowed
//! FILE_CHUNKs and cumulative FILE_ACKs, FILE_END, FILE_DONE or FILE_ERROR).
//!
//! Steps are separate methods so that a test can interrupt a transfer (restart the
//! broker, kill the guest) between them and resume it with the same transfer id.

use crate::agents::TestHost;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;
use vmc_protocol::words::{FileErrorCode, FileOffer, FileRequest, Message};

const PATIENCE: Duration = Duration::from_secs(60);

/// Why a transfer failed, as the guest said it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferFailure {
    pub code: FileErrorCode,
    pub message: String,
}

/// SHA-256 of a local file, lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).expect("file to hash");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `size` bytes of a deterministic, incompressible-looking pattern.
pub fn write_pattern_file(path: &Path, size: u64, seed: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state = seed | 1;
    let mut left = size;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n]).expect("write");
        left -= n as u64;
    }
    file.flush().expect("flush");
}

/// An upload of a local file to a path on a guest.
#[derive(Debug)]
pub struct Upload {
    pub transfer_id: String,
    pub guest: String,
    pub offer: FileOffer,
    local: std::fs::File,
    /// Bytes the guest has acknowledged.
    pub acked: u64,
    sent: u64,
}

impl Upload {
    pub fn new(guest: &str, local: &Path, remote: &str, chunk_size: u32, window: u32) -> Upload {
        let size = std::fs::metadata(local).expect("local file").len();
        Upload {
            transfer_id: format!("put-{}", crate::unique_name("t")).replace('.', "-"),
            guest: guest.to_owned(),
            offer: FileOffer {
                path: remote.to_owned(),
                size,
                sha256: Some(sha256_file(local)),
                mode: Some(0o640),
                chunk_size,
                window,
            },
            local: std::fs::File::open(local).expect("local file"),
            acked: 0,
            sent: 0,
        }
    }

    /// Sends FILE_PUT and waits for FILE_READY; returns the offset the guest holds.
    pub async fn begin(&mut self, host: &mut TestHost) -> Result<u64, TransferFailure> {
        let put = Message::FilePut {
            transfer_id: self.transfer_id.clone(),
            offer: self.offer.clone(),
        };
        host.send_to(&self.guest, &put).await;
        let id = self.transfer_id.clone();
        let reply = host
            .expect(PATIENCE, "FILE_READY or FILE_ERROR", |e| match &e.message {
                Message::FileReady { transfer_id, .. } | Message::FileError { transfer_id, .. } => {
                    *transfer_id == id
                }
                _ => false,
            })
            .await;
        match reply.message {
            Message::FileReady { offset, .. } => {
                self.acked = offset;
                self.sent = offset;
                Ok(offset)
            }
            Message::FileError { code, message, .. } => Err(TransferFailure { code, message }),
            _ => unreachable!("filtered above"),
        }
    }

    /// Sends chunks, keeping at most `window` unacknowledged, until `until` bytes are
    /// acknowledged (or the whole file).
    pub async fn pump(&mut self, host: &mut TestHost, until: u64) -> Result<(), TransferFailure> {
        let until = until.min(self.offer.size);
        let chunk = self.offer.chunk_size as u64;
        let window = self.offer.window as u64 * chunk;
        let id = self.transfer_id.clone();
        while self.acked < until {
            while self.sent < self.offer.size
                && self.sent - self.acked < window
                && self.sent < until + window
            {
                let n = chunk.min(self.offer.size - self.sent) as usize;
                let mut data = vec![0u8; n];
                self.local.seek(SeekFrom::Start(self.sent)).expect("seek");
                self.local.read_exact(&mut data).expect("read");
                let message = Message::FileChunk {
                    transfer_id: id.clone(),
                    offset: self.sent,
                    data: Bytes::from(data),
                };
                host.send_to(&self.guest, &message).await;
                self.sent += n as u64;
            }
            let reply = host
                .expect(PATIENCE, "FILE_ACK", |e| match &e.message {
                    Message::FileAck { transfer_id, .. }
                    | Message::FileError { transfer_id, .. } => *transfer_id == id,
                    _ => false,
                })
                .await;
            match reply.message {
                // One session keeps chunks in order, so acknowledgements only grow.
                Message::FileAck { offset, .. } => self.acked = self.acked.max(offset),
                Message::FileError { code, message, .. } => {
                    return Err(TransferFailure { code, message })
                }
                _ => unreachable!("filtered above"),
            }
        }
        Ok(())
    }

    /// Sends FILE_END and waits for FILE_DONE; returns the guest's size and digest.
    pub async fn finish(&mut self, host: &mut TestHost) -> Result<(u64, String), TransferFailure> {
        self.pump(host, self.offer.size).await?;
        let end = Message::FileEnd {
            transfer_id: self.transfer_id.clone(),
            size: self.offer.size,
            sha256: self.offer.sha256.clone().unwrap_or_default(),
        };
        host.send_to(&self.guest, &end).await;
        let id = self.transfer_id.clone();
        let reply = host
            .expect(PATIENCE, "FILE_DONE", |e| match &e.message {
                Message::FileDone { transfer_id, .. } | Message::FileError { transfer_id, .. } => {
                    *transfer_id == id
                }
                _ => false,
            })
            .await;
        match reply.message {
            Message::FileDone { size, sha256, .. } => Ok((size, sha256)),
            Message::FileError { code, message, .. } => Err(TransferFailure { code, message }),
            _ => unreachable!("filtered above"),
        }
    }

    /// The whole upload in one call.
    pub async fn run(mut self, host: &mut TestHost) -> Result<(u64, String), TransferFailure> {
        self.begin(host).await?;
        self.finish(host).await
    }
}

/// A download of a file from a guest to a local path.
#[derive(Clone, Debug)]
pub struct Download<'a> {
    pub guest: &'a str,
    pub transfer_id: &'a str,
    pub remote: &'a str,
    pub local: &'a Path,
    pub chunk_size: u32,
    pub window: u32,
}

/// Downloads, verifying size and SHA-256 as it ends, and returns them; resumes from
/// `local`'s current length when it exists (same transfer id). With `stop_after`,
/// returns `None` once that many bytes are held, as an interrupted download would.
pub async fn download(
    host: &mut TestHost,
    d: &Download<'_>,
    stop_after: Option<u64>,
) -> Result<Option<(u64, String)>, TransferFailure> {
    let (guest, transfer_id, remote, local) = (d.guest, d.transfer_id, d.remote, d.local);
    let (chunk_size, window) = (d.chunk_size, d.window);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(local)
        .expect("local file");
    let mut offset = file.metadata().expect("metadata").len();
    let request = FileRequest {
        path: remote.to_owned(),
        offset,
        chunk_size,
        window,
    };
    host.send_to(
        guest,
        &Message::FileGet {
            transfer_id: transfer_id.to_owned(),
            request,
        },
    )
    .await;
    let id = transfer_id.to_owned();
    let mine = move |m: &Message| match m {
        Message::FileReady { transfer_id, .. }
        | Message::FileChunk { transfer_id, .. }
        | Message::FileEnd { transfer_id, .. }
        | Message::FileError { transfer_id, .. } => *transfer_id == id,
        _ => false,
    };
    loop {
        let reply = host
            .expect(PATIENCE, "a FILE_GET reply", |e| mine(&e.message))
            .await;
        match reply.message {
            Message::FileReady { offset: start, .. } => {
                if start < offset {
                    file.set_len(start).expect("truncate");
                    offset = start;
                }
            }
            Message::FileChunk {
                offset: at, data, ..
            } => {
                if at == offset {
                    file.write_all(&data).expect("write");
                    offset += data.len() as u64;
                }
                let ack = Message::FileAck {
                    transfer_id: transfer_id.to_owned(),
                    offset,
                };
                host.send_to(guest, &ack).await;
                if stop_after.is_some_and(|limit| offset >= limit) {
                    return Ok(None);
                }
            }
            Message::FileEnd { size, sha256, .. } => {
                file.flush().expect("flush");
                drop(file);
                let got = sha256_file(local);
                assert_eq!(offset, size, "FILE_END size matches the bytes received");
                assert_eq!(got, sha256, "the received bytes hash as the guest says");
                let done = Message::FileDone {
                    transfer_id: transfer_id.to_owned(),
                    size,
                    sha256: got.clone(),
                };
                host.send_to(guest, &done).await;
                return Ok(Some((size, got)));
            }
            Message::FileError { code, message, .. } => {
                return Err(TransferFailure { code, message })
            }
            _ => unreachable!("filtered above"),
        }
    }
}
