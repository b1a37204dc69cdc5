//! The dev mesh's signal service: one receive stream per peer key (a newer stream replaces the
//! older), and `Send` forwarding sealed messages to the destination's stream. A message to an
//! offline peer is dropped without an error, as NetBird's signal does.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::control::signal::EncryptedMessage;
use crate::control::signal::signal_exchange_server::SignalExchange;

/// Metadata naming the peer that opens a stream.
pub const PEER_ID_HEADER: &str = "x-wiretrustee-peer-id";
/// Metadata the server answers once the stream is registered.
pub const REGISTERED_HEADER: &str = "x-wiretrustee-peer-registered";
/// Messages queued per receiving peer.
const QUEUE: usize = 64;

type Streams = HashMap<String, (u64, mpsc::Sender<Result<EncryptedMessage, Status>>)>;

/// The service.
#[derive(Clone, Default)]
pub struct DevSignal {
    streams: Arc<Mutex<Streams>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl DevSignal {
    fn streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<EncryptedMessage, Status>> + Send>>;

#[tonic::async_trait]
impl SignalExchange for DevSignal {
    async fn send(
        &self,
        request: Request<EncryptedMessage>,
    ) -> Result<Response<EncryptedMessage>, Status> {
        let msg = request.into_inner();
        let target = self
            .streams()
            .get(&msg.remote_key)
            .map(|(_, tx)| tx.clone());
        if let Some(tx) = target {
            // A full queue means a receiver that does not drain: drop, as for an offline peer.
            let _ = tx.try_send(Ok(msg));
        }
        Ok(Response::new(EncryptedMessage::default()))
    }

    type ConnectStreamStream = MessageStream;

    async fn connect_stream(
        &self,
        request: Request<Streaming<EncryptedMessage>>,
    ) -> Result<Response<Self::ConnectStreamStream>, Status> {
        let peer = request
            .metadata()
            .get(PEER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Status::failed_precondition("missing peer id"))?
            .to_string();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(QUEUE);
        // Replacing the entry drops the older stream's sender, which ends that stream.
        self.streams().insert(peer.clone(), (id, tx));
        let streams = self.streams.clone();
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let guard = StreamGuard { streams, peer, id };
        let stream = futures::StreamExt::map(stream, move |m| {
            let _keep = &guard;
            m
        });
        let mut resp = Response::new(Box::pin(stream) as MessageStream);
        resp.metadata_mut()
            .insert(REGISTERED_HEADER, MetadataValue::from_static("1"));
        Ok(resp)
    }
}

/// Unregisters a stream when tonic drops it (the client went away).
struct StreamGuard {
    streams: Arc<Mutex<Streams>>,
    peer: String,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams
            .get(&self.peer)
            .is_some_and(|(id, _)| *id == self.id)
        {
            streams.remove(&self.peer);
        }
    }
}
