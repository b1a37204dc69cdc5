//! The dev mesh's relay: WebSocket at `/relay`, token-authenticated peers, Transport frames
//! forwarded with the source ID rewritten, presence subscriptions, health checks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::relay_token;
use crate::relay::io::{FrameArena, write_batches};
use crate::relay::messages::{self, Frame, PeerId};

const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTH_INTERVAL: Duration = Duration::from_secs(25);
/// Frames queued per connected peer; a peer that does not drain loses datagrams (as UDP would).
const QUEUE: usize = 1024;
/// How long a datagram waits for room in its destination's queue before it is dropped.
const FORWARD_WAIT: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Hub {
    /// Connected peers: (connection number, frames to send).
    peers: HashMap<PeerId, (u64, mpsc::Sender<Bytes>)>,
    /// Watched peer → who watches it.
    watchers: HashMap<PeerId, HashSet<PeerId>>,
    next_conn: u64,
}

impl Hub {
    fn tell_watchers(&self, about: &PeerId, frame: &[u8]) {
        for watcher in self.watchers.get(about).into_iter().flatten() {
            if let Some((_, tx)) = self.peers.get(watcher) {
                let _ = tx.try_send(Bytes::copy_from_slice(frame));
            }
        }
    }
}

/// The relay service.
#[derive(Clone)]
pub struct DevRelay {
    secret: Arc<Vec<u8>>,
    instance_url: Arc<String>,
    hub: Arc<Mutex<Hub>>,
}

impl DevRelay {
    pub fn new(secret: Vec<u8>, instance_url: String) -> Self {
        Self {
            secret: Arc::new(secret),
            instance_url: Arc::new(instance_url),
            hub: Arc::new(Mutex::new(Hub::default())),
        }
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accept connections until `cancel` fires.
    pub async fn serve(self, listener: TcpListener, cancel: CancellationToken) {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let this = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = this.connection(stream) => {}
                }
            });
        }
    }

    async fn connection(&self, stream: TcpStream) {
        // Every frame is a datagram someone waits for: with Nagle, a frame written while an
        // earlier one is unacknowledged waits until the peer sends something back (its TCP
        // ACK rides on it), and a WireGuard peer that has nothing to send holds its own
        // traffic up for as long. NetBird's Go relay has no Nagle (Go turns it off).
        let _ = stream.set_nodelay(true);
        // The shape of this callback is tungstenite's, large error type included.
        #[allow(clippy::result_large_err)]
        let only_relay_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            if req.uri().path() == "/relay" {
                Ok(resp)
            } else {
                let mut e = ErrorResponse::new(Some("not found".into()));
                *e.status_mut() = http::StatusCode::NOT_FOUND;
                Err(e)
            }
        };
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, only_relay_path).await else {
            return;
        };
        let (mut sink, mut source) = ws.split();
        // Authentication: the first message, within the timeout; failures close silently.
        let first = tokio::time::timeout(AUTH_TIMEOUT, source.next()).await;
        let Ok(Some(Ok(Message::Binary(first)))) = first else {
            return;
        };
        let me: PeerId = match messages::parse(&first) {
            Ok(Frame::Auth {
                peer,
                signature,
                token_payload,
            }) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                if !relay_token::verify(&self.secret, token_payload, signature, now) {
                    debug!("relay: bad token");
                    return;
                }
                *peer
            }
            _ => return,
        };
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
        let conn = {
            let mut hub = self.hub();
            hub.next_conn += 1;
            let conn = hub.next_conn;
            hub.peers.insert(me, (conn, tx.clone()));
            for f in messages::peers_online(&[me]) {
                hub.tell_watchers(&me, &f);
            }
            conn
        };
        if sink
            .send(Message::Binary(
                messages::auth_response(&self.instance_url).into(),
            ))
            .await
            .is_err()
        {
            self.leave(&me, conn);
            return;
        }
        // Frames are written in batches, one flush per wake-up (`relay::io`); health checks
        // queue behind the data like any frame.
        let writer = write_batches(sink, &mut rx);
        let health_tx = tx.clone();
        let health = async move {
            let mut health = tokio::time::interval(HEALTH_INTERVAL);
            health.tick().await;
            loop {
                health.tick().await;
                if health_tx
                    .send(messages::health_check().into())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        let reader = async {
            let mut arena = FrameArena::default();
            while let Some(Ok(msg)) = source.next().await {
                let Message::Binary(data) = msg else {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                match messages::parse(&data) {
                    Ok(Frame::Transport { peer, payload }) => {
                        let target = self.hub().peers.get(peer).map(|(_, t)| t.clone());
                        // As NetBird's relay writes to the destination before reading on, a
                        // full destination slows the sender down (its TCP backs up) rather
                        // than losing datagrams at once; one that stays full loses them.
                        if let Some(target) = target {
                            let frame = arena.transport(&me, payload);
                            let _ = tokio::time::timeout(FORWARD_WAIT, target.send(frame)).await;
                        }
                    }
                    Ok(Frame::Subscribe(ids)) => {
                        let mut hub = self.hub();
                        let mut online = Vec::new();
                        for id in ids.iter() {
                            hub.watchers.entry(*id).or_default().insert(me);
                            if hub.peers.contains_key(id) {
                                online.push(*id);
                            }
                        }
                        for f in messages::peers_online(&online) {
                            let _ = tx.try_send(f.into());
                        }
                    }
                    Ok(Frame::Unsubscribe(ids)) => {
                        let mut hub = self.hub();
                        for id in ids.iter() {
                            if let Some(w) = hub.watchers.get_mut(id) {
                                w.remove(&me);
                            }
                        }
                    }
                    Ok(Frame::Close) => break,
                    Ok(_) => {}
                    Err(e) => debug!("relay: bad frame: {e}"),
                }
            }
        };
        tokio::select! {
            _ = writer => {}
            _ = reader => {}
            _ = health => {}
        }
        self.leave(&me, conn);
    }

    fn leave(&self, me: &PeerId, conn: u64) {
        let mut hub = self.hub();
        if hub.peers.get(me).is_some_and(|(c, _)| *c == conn) {
            hub.peers.remove(me);
            for f in messages::peers_went_offline(&[*me]) {
                hub.tell_watchers(me, &f);
            }
        }
        for watchers in hub.watchers.values_mut() {
            watchers.remove(me);
        }
    }
}
