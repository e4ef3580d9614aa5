//! A TCP stream that acknowledges what it reads at once.
//!
//! Linux delays the ACK of a received segment (up to ~40 ms) once a connection looks
//! interactive, hoping to carry it on a reply. A peer that sends a small segment only
//! when the previous one is acknowledged (Nagle's algorithm) then waits that long for
//! each second frame in a row. QEMU's user-mode network stack does exactly this
//! towards a guest, and offers no way to turn it off: inside a VM two frames from the
//! broker in a row (a `CMD_ACK`, then the next `CMD_RUN`) cost 40 ms each. The flag
//! `TCP_QUICKACK` ends delayed ACKs, but the kernel clears it again by itself, so
//! [`QuickAck`] sets it after every read that returned data: one `setsockopt` per
//! read. Everything else passes straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A [`TcpStream`] that sets `TCP_QUICKACK` after each read; see the module docs.
#[derive(Debug)]
pub struct QuickAck {
    stream: TcpStream,
}

impl QuickAck {
    pub fn new(stream: TcpStream) -> QuickAck {
        QuickAck { stream }
    }

    /// Asks the kernel to acknowledge received data at once. A failure only costs
    /// latency, never data, so it is logged at debug level and otherwise ignored.
    fn acknowledge_now(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = socket2::SockRef::from(&self.stream).set_tcp_quickack(true) {
            log::debug!("TCP_QUICKACK not set: {e}");
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.acknowledge_now();
        }
        polled
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn bytes_pass_both_ways_unchanged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut ours = QuickAck::new(client.unwrap());
        let (mut theirs, _) = accepted.unwrap();

        ours.write_all(b"SEND\n\nhello\0").await.unwrap();
        let mut got = [0u8; 12];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"SEND\n\nhello\0");

        theirs.write_all(b"MESSAGE\n\nworld\0").await.unwrap();
        theirs.shutdown().await.unwrap();
        let mut back = Vec::new();
        ours.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"MESSAGE\n\nworld\0");
    }
}
