//! Copying between a client and its upstream, both directions, with half-close, and the idle
//! timeout that ends a connection on which nothing has moved for too long.
//!
//! Why an idle timeout: a client that opens a tunnel and walks away (or a NAT that silently
//! dropped its mapping) would otherwise hold its connection slot, its buffers and a mesh
//! connection for ever. "Idle" means no byte read or written on either side; the check costs
//! one clock read per read or write call (each moves up to 64 KiB), not per packet.

use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::{debug, trace};

use crate::status::ListenerMetrics;

/// Bytes buffered per direction while copying.
const COPY_BUFFER: usize = 64 * 1024;

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished, or one failed.
    Finished,
    /// Nothing moved either way for the idle timeout.
    Idle,
}

/// Copy both ways until both sides have finished; an EOF on one side is passed on as a
/// shutdown of the other's write half. Errors end the relay (both sides are closed when the
/// caller drops them). With `idle` set, the relay also ends once no byte has moved either way
/// for that long.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(idle) = idle else {
        copy(a, b).await;
        return Ended::Finished;
    };
    let activity = Arc::new(Activity::new());
    let mut a = Watched::new(a, activity.clone());
    let mut b = Watched::new(b, activity.clone());
    tokio::select! {
        _ = copy(&mut a, &mut b) => Ended::Finished,
        _ = activity.idle_for(idle) => {
            trace!(?idle, "relay idle");
            Ended::Idle
        }
    }
}

/// How a client's relay went: how it ended and the bytes each way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relayed {
    pub ended: Ended,
    /// From the client towards its target.
    pub up: u64,
    /// From the target back to the client.
    pub down: u64,
}

/// A listener's client relayed to its upstream ([`bidirectional`]); a close for idleness is
/// counted on the listener (`idle_closed` in /status and /metrics) and logged.
pub async fn client<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Option<Duration>,
    metrics: &ListenerMetrics,
    from: SocketAddr,
    to: &(dyn Display + Sync),
) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut counted = Counted {
        inner: client,
        read: 0,
        written: 0,
    };
    let ended = bidirectional(&mut counted, upstream, idle).await;
    if ended == Ended::Idle {
        metrics.count_idle_close();
        debug!(%from, %to, "{}: closed after {idle:?} idle", metrics.kind);
    }
    Relayed {
        ended,
        up: counted.read,
        down: counted.written,
    }
}

/// A stream that counts the bytes read from and written to it (one owner: plain integers).
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

async fn copy<A, B>(a: &mut A, b: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await {
        Ok((up, down)) => trace!(up, down, "relay finished"),
        Err(e) => trace!("relay ended: {e}"),
    }
}

/// When a connection last moved a byte.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream that records in an `Activity` every read or write that moved bytes.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_relay_with_traffic_lives_and_an_idle_one_ends() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            bidirectional(&mut a, &mut b, Some(Duration::from_secs(10))).await
        });
        // A byte every 6 s for a minute: never 10 s idle.
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(&[i]).await.unwrap();
            let mut got = [0u8];
            upstream.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i]);
            assert!(!relay.is_finished());
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(relay.await.unwrap(), Ended::Idle);
        // The relay dropped its ends: both sides see EOF.
        let mut rest = Vec::new();
        assert_eq!(upstream.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_an_idle_relay_stays() {
        let (_client, mut a) = tokio::io::duplex(1024);
        let (mut b, _upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { bidirectional(&mut a, &mut b, None).await });
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!relay.is_finished());
    }
}
