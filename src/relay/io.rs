//! The relay connection's data path, shared by the client and the dev mesh's relay: Transport
//! frames built into one reused buffer, and a writer that sends whatever is queued with one
//! flush per wake-up.
//!
//! Why: a relayed bulk transfer moves ~80 000 datagrams a second each way. A `Vec` per frame
//! and a flush (a `write` syscall and, without Nagle, a TCP segment) per frame made the relay
//! connection cost more than the WireGuard crypto; batching also lets one TCP segment carry
//! many frames, as Nagle would, without Nagle's wait (see `devmesh::relay` for that wait).

use bytes::{Bytes, BytesMut};
use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::messages::{self, PeerId};

/// Bytes of frames one arena chunk holds: a new chunk is allocated only when the previous
/// one's frames are still queued (about once per 90 full-size datagrams under load); once the
/// writer has sent them, the chunk is reused in place.
const ARENA_CHUNK: usize = 128 * 1024;
/// Most frames handed to the WebSocket per flush.
pub const WRITE_BATCH: usize = 256;

/// Builds Transport frames back to back in one buffer and hands each out as a `Bytes` view
/// of it, so queuing a datagram allocates nothing.
#[derive(Debug)]
pub struct FrameArena {
    buf: BytesMut,
}

impl Default for FrameArena {
    fn default() -> Self {
        Self {
            buf: BytesMut::with_capacity(ARENA_CHUNK),
        }
    }
}

impl FrameArena {
    /// The Transport frame carrying `payload` to (or, from the relay, from) `peer`.
    pub fn transport(&mut self, peer: &PeerId, payload: &[u8]) -> Bytes {
        let len = messages::transport_len(payload);
        // Reclaims the chunk when every frame cut from it is gone, else starts a new one.
        self.buf.reserve(len.max(ARENA_CHUNK / 4));
        messages::transport(&mut self.buf, peer, payload);
        self.buf.split().freeze()
    }
}

/// Send every frame `queue` yields until it closes or the sink fails: waits for the first
/// frame, takes all that are queued then (up to `WRITE_BATCH`), and flushes once. Returns the
/// sink so the caller can say goodbye on it.
pub async fn write_batches<S>(mut sink: S, queue: &mut mpsc::Receiver<Bytes>) -> Option<S>
where
    S: Sink<Message> + Unpin,
{
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        if queue.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            return Some(sink);
        }
        for frame in batch.drain(..) {
            sink.feed(Message::Binary(frame)).await.ok()?;
        }
        sink.flush().await.ok()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::messages::{Frame, parse, peer_id};

    #[test]
    fn frames_are_cut_from_one_chunk_and_parse_back() {
        let mut arena = FrameArena::default();
        let peer = peer_id("k");
        let first = arena.transport(&peer, b"one");
        let second = arena.transport(&peer, &[9; 1400]);
        assert_eq!(
            parse(&first),
            Ok(Frame::Transport {
                peer: &peer,
                payload: b"one"
            })
        );
        assert!(
            matches!(parse(&second), Ok(Frame::Transport { payload, .. }) if payload == [9; 1400])
        );
        // Back to back in the same allocation.
        assert_eq!(
            first.as_ptr().wrapping_add(first.len()),
            second.as_ptr(),
            "not one chunk"
        );
    }

    #[test]
    fn a_chunk_is_reused_once_its_frames_are_gone() {
        let mut arena = FrameArena::default();
        let peer = peer_id("k");
        let first = arena.transport(&peer, &[1; 1400]);
        let start = first.as_ptr();
        drop(first);
        // Fill the chunk past its end: with nothing outstanding it is reused in place.
        for _ in 0..(4 * ARENA_CHUNK / 1400) {
            let f = arena.transport(&peer, &[2; 1400]);
            let offset = f.as_ptr() as usize - start as usize;
            assert!(offset < ARENA_CHUNK, "a new allocation at {offset}");
        }
    }

    /// A sink that records what it is given and how often it is flushed.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<u8>,
        flushes: usize,
    }

    impl Sink<Message> for Recorder {
        type Error = ();

        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn start_send(mut self: std::pin::Pin<&mut Self>, m: Message) -> Result<(), ()> {
            self.frames.push(m.into_data()[0]);
            Ok(())
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ()>> {
            self.flushes += 1;
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), ()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn everything_queued_goes_out_in_order_with_one_flush_per_wake_up() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..10u8 {
            tx.send(Bytes::from(vec![i])).await.unwrap();
        }
        drop(tx);
        let sink = write_batches(Recorder::default(), &mut rx).await.unwrap();
        assert_eq!(sink.frames, (0..10).collect::<Vec<u8>>());
        assert_eq!(sink.flushes, 1);
    }
}
