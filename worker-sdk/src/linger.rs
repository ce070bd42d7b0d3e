//! The lingering close of a served connection: half-close, read what the
//! client still sends, then close.
//!
//! Closing a TCP socket whose receive queue holds unread bytes makes the
//! kernel answer with a reset instead of a FIN, and so does every byte that
//! arrives after the close. A client that sent a request a moment before it
//! saw the server's `Connection: close` or HTTP/2 GOAWAY then gets a reset
//! (a "broken pipe" on its next write, or the reset discards the GOAWAY it
//! had not read yet), and cannot tell that its request was never processed.
//! So once hyper is done with a connection, the server sends its FIN
//! (`shutdown`), reads and discards until the client closes its side (or
//! [`LINGER`] passes), and only then closes: the client reads the GOAWAY or
//! the response and then a clean end of stream, and retries what the
//! server said it did not take. nginx's `lingering_close` does the same.
//!
//! hyper owns the stream while it serves, so it serves a [`Held`] stream
//! whose inner stream comes back once hyper has dropped it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// How long a closing connection waits for the client to close its side.
/// Well-behaved clients close at once after a `Connection: close` response
/// or once their last HTTP/2 stream is done; this bounds the others.
pub const LINGER: Duration = Duration::from_secs(2);

/// A stream served by hyper that can be taken back after hyper drops it.
pub struct Held<I>(Arc<Mutex<I>>);

/// The way back to a [`Held`] stream.
pub struct Claim<I>(Arc<Mutex<I>>);

/// Wraps `io` for hyper, keeping a [`Claim`] on it.
pub fn hold<I>(io: I) -> (Held<I>, Claim<I>) {
    let shared = Arc::new(Mutex::new(io));
    (Held(shared.clone()), Claim(shared))
}

impl<I> Held<I> {
    fn inner(&self) -> MutexGuard<'_, I> {
        // One task polls the stream; a poisoned lock only means a panic
        // elsewhere in that task, and the stream itself is still whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Held<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner()).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Held<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner()).poll_shutdown(cx)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Claim<I> {
    /// Closes the stream the lingering way, if hyper has let go of it. A
    /// stream still held elsewhere (an upgraded connection belongs to its
    /// handler) is left alone.
    pub async fn close(self) {
        let Ok(io) = Arc::try_unwrap(self.0) else {
            return;
        };
        let mut io = io.into_inner().unwrap_or_else(|p| p.into_inner());
        let _ = tokio::time::timeout(LINGER, async {
            // hyper may have shut the write side already; a second
            // shutdown's error changes nothing.
            let _ = io.shutdown().await;
            let mut discard = [0u8; 4096];
            while matches!(io.read(&mut discard).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The client sends a second request right behind its first one; the
    /// server answers the first and closes with the second unread, as a
    /// server does that said `Connection: close` or GOAWAY.
    async fn close_with_unread_bytes(linger: bool) -> std::io::Result<Vec<u8>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let client = std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(b"firstsecond").unwrap();
            closed_rx.recv().unwrap();
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).map(|_| reply)
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (mut held, claim) = hold(stream);
        let mut got = [0u8; 5];
        held.read_exact(&mut got).await.unwrap();
        held.write_all(b"reply").await.unwrap();
        drop(held);
        let closing = async {
            if linger {
                claim.close().await;
            } else {
                drop(claim);
            }
        };
        // The client reads only once the server has closed (or, lingering,
        // is waiting for the client's end of stream).
        closed_tx.send(()).unwrap();
        closing.await;
        tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_lingering_close_lets_the_client_read_the_reply_and_a_clean_end() {
        let reply = close_with_unread_bytes(true).await;
        assert_eq!(reply.expect("a clean end of stream, not a reset"), b"reply");
    }

    #[tokio::test]
    async fn a_plain_close_with_unread_bytes_resets_the_client() {
        // What the lingering close is for: the kernel answers a close with
        // unread bytes by a reset, and the reply is lost with it.
        let reply = close_with_unread_bytes(false).await;
        let e = reply.expect_err("a reset");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }

    #[tokio::test]
    async fn a_stream_still_held_elsewhere_is_left_alone() {
        let (a, _b) = tokio::io::duplex(64);
        let (held, claim) = hold(a);
        claim.close().await;
        drop(held);
    }
}
