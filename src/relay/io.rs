//! The relay connection's I/O, shared by the client and the dev mesh's relay: the WebSocket
//! handshake over a stream, an output queue that frames are written straight into, and a
//! writer that sends everything queued with one write per wake-up.
//!
//! Why: a relayed bulk transfer moves ~100 000 datagrams a second each way. Each datagram is
//! framed (WebSocket header, relay header, payload, mask) directly into the queue's buffer —
//! one copy, no allocation — and the writer swaps that buffer for its spare and writes it
//! whole, so one `write` carries every frame queued since the last, and one TCP segment many
//! frames, without Nagle's wait. The queue is bounded in bytes: a sender that finds it full
//! waits (backpressure) instead of growing it.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::messages::{self, PeerId};
use super::ws::{self, Role, WsError};

/// Bytes queued towards the other end before senders wait: about 1400 full-size datagrams,
/// a few milliseconds of a Gbit/s transfer.
pub const OUT_LIMIT: usize = 2 << 20;

/// Frames waiting for the connection's writer.
pub struct OutQueue {
    state: Mutex<OutState>,
    /// Wakes the writer: something was queued, or the queue closed.
    data: Notify,
    /// Wakes senders waiting for room: the writer took the queued bytes.
    space: Notify,
}

struct OutState {
    buf: BytesMut,
    closed: bool,
    /// A client masks every frame with a fresh key (RFC 6455 §5.3).
    masks: Option<StdRng>,
}

impl std::fmt::Debug for OutQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutQueue")
    }
}

/// Frames appended under one lock: see `OutQueue::append`.
pub struct Frames<'a> {
    state: &'a mut OutState,
}

impl Frames<'_> {
    /// One frame of `op` whose payload is `parts` concatenated, masked if we are a client.
    fn frame(&mut self, op: u8, parts: &[&[u8]]) {
        let mask = self.state.masks.as_mut().map(|r| r.r#gen::<[u8; 4]>());
        ws::put_frame(&mut self.state.buf, op, parts, mask);
    }

    /// One binary message whose payload is `parts` concatenated.
    pub fn message(&mut self, parts: &[&[u8]]) {
        self.frame(ws::opcode::BINARY, parts);
    }

    /// A Transport frame carrying `payload` to (from the relay: from) `peer`.
    pub fn transport(&mut self, peer: &PeerId, payload: &[u8]) {
        self.message(&messages::transport(peer, payload));
    }

    /// A WebSocket control frame (pong, close).
    pub fn control(&mut self, op: u8, payload: &[u8]) {
        self.frame(op, &[payload]);
    }
}

impl OutQueue {
    pub fn new(role: Role) -> Self {
        Self {
            state: Mutex::new(OutState {
                buf: BytesMut::with_capacity(64 * 1024),
                closed: false,
                masks: (role == Role::Client).then(StdRng::from_entropy),
            }),
            data: Notify::new(),
            space: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether there is room under the limit (and the queue is open).
    pub fn has_room(&self) -> bool {
        let s = self.lock();
        !s.closed && s.buf.len() < OUT_LIMIT
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Append what `f` writes, unless the queue is closed; false if closed. The limit is not
    /// checked here (see `wait_for_room`): a sender that saw room appends its whole batch.
    pub fn append(&self, f: impl FnOnce(&mut Frames<'_>)) -> bool {
        {
            let mut s = self.lock();
            if s.closed {
                return false;
            }
            f(&mut Frames { state: &mut s });
        }
        self.data.notify_one();
        true
    }

    /// Append only if there is room now: for replies that must not wait.
    pub fn try_append(&self, f: impl FnOnce(&mut Frames<'_>)) -> bool {
        {
            let mut s = self.lock();
            if s.closed || s.buf.len() >= OUT_LIMIT {
                return false;
            }
            f(&mut Frames { state: &mut s });
        }
        self.data.notify_one();
        true
    }

    /// Wait up to `limit` for room; false if the queue closed or stayed full.
    pub async fn wait_for_room(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let freed = self.space.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                {
                    let s = self.lock();
                    if s.closed {
                        return false;
                    }
                    if s.buf.len() < OUT_LIMIT {
                        return true;
                    }
                }
                freed.await;
            }
        };
        if self.has_room() {
            return true;
        }
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }

    /// Close the queue: nothing more is accepted; the writer sends what is queued, then ends.
    pub fn close(&self) {
        self.lock().closed = true;
        self.data.notify_one();
        self.space.notify_waiters();
    }

    /// Write everything queued to `w` until the queue is closed and drained, or `w` fails.
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, mut w: W) -> io::Result<()> {
        let mut spare = BytesMut::with_capacity(64 * 1024);
        loop {
            let closed = loop {
                let queued = self.data.notified();
                let drained_and_closed = {
                    let mut s = self.lock();
                    if !s.buf.is_empty() {
                        std::mem::swap(&mut s.buf, &mut spare);
                        break s.closed;
                    }
                    s.closed
                };
                if drained_and_closed {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                queued.await;
            };
            self.space.notify_waiters();
            w.write_all(&spare).await?;
            // TLS buffers inside the stream; a plain socket's flush does nothing.
            w.flush().await?;
            spare.clear();
            if closed && self.lock().buf.is_empty() {
                let _ = w.shutdown().await;
                return Ok(());
            }
        }
    }
}

/// Why a relay connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Ws(#[from] WsError),
    #[error("connection closed during the WebSocket handshake")]
    Eof,
}

/// Read an HTTP head from `r`: the head, and the bytes read past it.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Vec<u8>, Vec<u8>), HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = ws::head_end(&buf)? {
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Open a WebSocket on `stream` as a client: the upgrade request for `path` on `host`, the
/// server's answer checked. Returns the decoder, holding any bytes read past the answer.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
    path: &str,
) -> Result<ws::Decoder, HandshakeError> {
    let key = ws::new_key();
    stream
        .write_all(ws::client_request(host, path, &key).as_bytes())
        .await?;
    stream.flush().await?;
    let (head, rest) = read_head(stream).await?;
    ws::check_response(&head, &key)?;
    Ok(ws::Decoder::new(Role::Client, &rest))
}

/// Accept a WebSocket on `stream` as a server, for `path` only (404 otherwise); a request that
/// is not a valid upgrade is answered with its HTTP error and refused.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
) -> Result<ws::Decoder, HandshakeError> {
    let (head, rest) = read_head(stream).await?;
    let refused = match ws::parse_request(&head) {
        Ok(up) if up.path.split('?').next() == Some(path) => {
            stream
                .write_all(ws::accept_response(&up.key).as_bytes())
                .await?;
            stream.flush().await?;
            return Ok(ws::Decoder::new(Role::Server, &rest));
        }
        Ok(_) => ws::Refusal {
            status: 404,
            reason: "no such WebSocket endpoint",
        },
        Err(r) => r,
    };
    let _ = stream
        .write_all(ws::refusal_response(&refused).as_bytes())
        .await;
    let _ = stream.shutdown().await;
    Err(WsError::Handshake(format!(
        "refused with {}: {}",
        refused.status, refused.reason
    ))
    .into())
}

/// Reads WebSocket events from one side of a connection: bytes go straight into the
/// decoder's buffer, events come out as views of it.
pub struct EventReader<R> {
    reader: R,
    decoder: ws::Decoder,
    /// A read that waits longer than this ends the connection with `TimedOut`.
    idle: Duration,
}

impl<R: AsyncRead + Unpin> EventReader<R> {
    pub fn new(reader: R, decoder: ws::Decoder, idle: Duration) -> Self {
        Self {
            reader,
            decoder,
            idle,
        }
    }

    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// The next event; `None` once the stream has ended.
    pub async fn next(&mut self) -> io::Result<Option<ws::Event>> {
        loop {
            match self.decoder.next_event() {
                Ok(Some(e)) => return Ok(Some(e)),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let read = self.reader.read_buf(self.decoder.buffer());
            let n = tokio::time::timeout(self.idle, read)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nothing received"))??;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::messages::{Frame, parse, peer_id};
    use crate::relay::ws::{Decoder, Event};

    fn decode(role: Role, bytes: &[u8]) -> Vec<Event> {
        let mut d = Decoder::new(role, bytes);
        std::iter::from_fn(|| d.next_event().unwrap()).collect()
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_in_one_write() {
        let q = OutQueue::new(Role::Client);
        let peer = peer_id("k");
        for i in 0..10u8 {
            assert!(q.append(|f| f.transport(&peer, &[i; 1400])));
        }
        q.close();
        assert!(!q.append(|f| f.transport(&peer, b"late")));
        let mut wire = Vec::new();
        q.write_to(&mut wire).await.unwrap();
        // Masked (a client's), and the server's decoder reads them back in order.
        let events = decode(Role::Server, &wire);
        assert_eq!(events.len(), 10);
        for (i, e) in events.iter().enumerate() {
            let Event::Binary(m) = e else { panic!("{e:?}") };
            assert_eq!(
                parse(m),
                Ok(Frame::Transport {
                    peer: &peer,
                    payload: &[i as u8; 1400]
                })
            );
        }
    }

    /// A writer that records each write.
    struct Writes(Vec<usize>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.0.push(buf.len());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn one_write_per_wake_up_and_a_full_queue_makes_senders_wait() {
        let q = std::sync::Arc::new(OutQueue::new(Role::Server));
        let peer = peer_id("k");
        // Fill past the limit: the next sender waits, and gives up after its limit.
        while q.has_room() {
            q.append(|f| f.transport(&peer, &[0; 1400]));
        }
        let start = tokio::time::Instant::now();
        assert!(!q.wait_for_room(Duration::from_millis(50)).await);
        assert!(start.elapsed() >= Duration::from_millis(50));
        // A waiting sender is let go as soon as the writer takes the bytes.
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.wait_for_room(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        let writer = tokio::spawn({
            let q = q.clone();
            async move {
                let mut w = Writes(Vec::new());
                q.write_to(&mut w).await.unwrap();
                w.0
            }
        });
        assert!(waiter.await.unwrap());
        q.close();
        let writes = writer.await.unwrap();
        // Everything queued before the wake-up went out in one write.
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(writes[0] >= OUT_LIMIT);
    }

    #[tokio::test]
    async fn handshake_and_messages_over_a_stream() {
        let (mut c, mut s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let dec = server_handshake(&mut s, "/relay").await.unwrap();
            let (r, w) = tokio::io::split(s);
            let q = std::sync::Arc::new(OutQueue::new(Role::Server));
            let writer = tokio::spawn({
                let q = q.clone();
                async move { q.write_to(w).await }
            });
            // Echo every binary message, answer pings, stop at close.
            let mut events = EventReader::new(r, dec, Duration::from_secs(5));
            while let Some(e) = events.next().await.unwrap() {
                match e {
                    Event::Binary(m) => q.append(|f| f.message(&[&m])),
                    Event::Ping(p) => q.append(|f| f.control(ws::opcode::PONG, &p)),
                    _ => break,
                };
            }
            q.close();
            writer.await.unwrap().unwrap();
        });
        let dec = client_handshake(&mut c, "relay.test", "/relay")
            .await
            .unwrap();
        let q = OutQueue::new(Role::Client);
        q.append(|f| {
            f.message(&[b"hello"]);
            f.control(ws::opcode::PING, b"p");
            f.control(ws::opcode::CLOSE, b"");
        });
        q.close();
        let (r, w) = tokio::io::split(c);
        q.write_to(w).await.unwrap();
        let mut events = EventReader::new(r, dec, Duration::from_secs(5));
        let mut got = Vec::new();
        while let Some(e) = events.next().await.unwrap() {
            got.push(e);
        }
        assert_eq!(
            got,
            vec![
                Event::Binary(bytes::Bytes::from_static(b"hello")),
                Event::Pong
            ]
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_path_gets_404_and_a_plain_request_426() {
        for (req, status) in [
            (
                ws::client_request("x", "/other", &ws::new_key()),
                "HTTP/1.1 404",
            ),
            (
                "GET /relay HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
                "HTTP/1.1 426",
            ),
        ] {
            let (mut c, mut s) = tokio::io::duplex(4096);
            c.write_all(req.as_bytes()).await.unwrap();
            assert!(server_handshake(&mut s, "/relay").await.is_err());
            drop(s);
            let mut answer = String::new();
            c.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with(status), "{answer}");
        }
    }
}
