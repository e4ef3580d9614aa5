//! Group commit: one flush of the store for every write that waits on one.
//!
//! New commands and results are committed crash-safe and must be on disk before
//! the host tells anyone about them (answers `runCmd`, sends `CMD_RUN` or
//! `CMD_ACK`). Each waiter asks the [`Flusher`]; its task flushes the store on the
//! blocking pool, and every request that arrived meanwhile is answered by the next
//! single flush. A lone command pays one `fdatasync`; a fan-out to a thousand guests
//! pays a handful instead of a thousand, and no actor's thread ever waits for the
//! disk.

use super::EngineError;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use vmc_protocol::agent_main::error_chain;

type Waiter = oneshot::Sender<Result<(), String>>;

/// How long a flush that is not urgent ([`Flusher::flush_soon`]) may wait for an
/// urgent one to ride along with.
pub const SOON: Duration = Duration::from_millis(20);

enum Request {
    /// Someone waits on it to answer a caller or send `CMD_RUN`: flush at once.
    Now(Waiter),
    /// Only a `CMD_ACK` waits on it: the next flush within [`SOON`] will do.
    Soon(Waiter),
}

/// A handle on the flusher task (cheap to clone).
#[derive(Clone, Debug)]
pub struct Flusher {
    requests: mpsc::UnboundedSender<Request>,
}

impl Flusher {
    /// Starts the flusher task on the current runtime.
    pub fn start(store: Arc<Store>) -> Flusher {
        let (requests, mut queue) = mpsc::unbounded_channel::<Request>();
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut waiters = Vec::new();
                let mut urgent = matches!(first, Request::Now(_));
                let (Request::Now(waiter) | Request::Soon(waiter)) = first;
                waiters.push(waiter);
                if !urgent {
                    // Wait a little for an urgent flush to share.
                    let deadline = tokio::time::Instant::now() + SOON;
                    while !urgent {
                        match tokio::time::timeout_at(deadline, queue.recv()).await {
                            Ok(Some(Request::Now(waiter))) => {
                                urgent = true;
                                waiters.push(waiter);
                            }
                            Ok(Some(Request::Soon(waiter))) => waiters.push(waiter),
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
                while let Ok(Request::Now(more) | Request::Soon(more)) = queue.try_recv() {
                    waiters.push(more);
                }
                let store = store.clone();
                let outcome = match tokio::task::spawn_blocking(move || store.flush()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(error_chain(&e)),
                    Err(e) => Err(format!("the flush panicked: {e}")),
                };
                if let Err(e) = &outcome {
                    log::error!("{e}");
                }
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
            }
        });
        Flusher { requests }
    }

    /// Waits until everything the store committed before this call is on disk.
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.wait(Request::Now).await
    }

    /// As [`Flusher::flush`], for a write whose only waiter is an acknowledgement
    /// to a guest: it may wait up to [`SOON`] for an urgent flush to share, so a
    /// busy host pays one `fdatasync` for a command and the previous one's result.
    pub async fn flush_soon(&self) -> Result<(), EngineError> {
        self.wait(Request::Soon).await
    }

    async fn wait(&self, request: fn(Waiter) -> Request) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(request(tx))
            .map_err(|_| EngineError::Internal("the store's flusher has stopped".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EngineError::Internal(e)),
            Err(_) => Err(EngineError::Internal(
                "the store's flusher has stopped".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn concurrent_requests_share_flushes_and_all_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open_in(dir.path()).unwrap());
        let flusher = Flusher::start(store);
        let waits: Vec<_> = (0..200).map(|_| flusher.flush()).collect();
        for result in futures_util::future::join_all(waits).await {
            result.unwrap();
        }
    }

    #[actix_rt::test]
    async fn a_flush_soon_rides_with_an_urgent_one_or_comes_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open_in(dir.path()).unwrap());
        let flusher = Flusher::start(store);
        // Alone, it is served within its delay (and not long after).
        let alone = std::time::Instant::now();
        flusher.flush_soon().await.unwrap();
        let took = alone.elapsed();
        assert!(took >= SOON, "{took:?}");
        assert!(took < SOON * 50, "{took:?}");
        // An urgent flush meanwhile serves it at once.
        let together = std::time::Instant::now();
        let (soon, now) = tokio::join!(flusher.flush_soon(), async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            flusher.flush().await
        });
        soon.unwrap();
        now.unwrap();
        assert!(together.elapsed() < SOON, "{:?}", together.elapsed());
    }

    #[actix_rt::test]
    async fn a_flush_that_fails_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let store = Arc::new(Store::open(&path).unwrap());
        // The files vanish under the open store (an operator's rm): nothing to flush.
        let _ = std::fs::remove_file(dir.path().join("state.sqlite-wal"));
        std::fs::remove_file(&path).unwrap();
        let err = Flusher::start(store).flush().await.unwrap_err();
        assert!(err.to_string().contains("state.sqlite"), "{err}");
    }
}
