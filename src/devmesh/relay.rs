//! The dev mesh's relay: WebSocket at `/relay`, token-authenticated peers, Transport frames
//! forwarded with the source ID rewritten, presence subscriptions, health checks.
//!
//! Each connection has one output queue (`relay::io::OutQueue`): a forwarded datagram is
//! copied once, from the buffer its frame was read into straight into the destination's
//! queue, and that queue's writer sends everything queued with one write per wake-up.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::relay_token;
use crate::relay::io::{EventReader, OutQueue, server_handshake};
use crate::relay::messages::{self, Frame, PeerId};
use crate::relay::ws::{Event, Role, opcode};

const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTH_INTERVAL: Duration = Duration::from_secs(25);
/// A peer that sends nothing (not even its answers to health checks) for this long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a datagram waits for room in its destination's queue before it is dropped.
const FORWARD_WAIT: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Hub {
    /// Connected peers: (connection number, its output queue).
    peers: HashMap<PeerId, (u64, Arc<OutQueue>)>,
    /// Watched peer → who watches it.
    watchers: HashMap<PeerId, HashSet<PeerId>>,
    next_conn: u64,
}

impl Hub {
    fn tell_watchers(&self, about: &PeerId, frame: &[u8]) {
        for watcher in self.watchers.get(about).into_iter().flatten() {
            if let Some((_, q)) = self.peers.get(watcher) {
                q.try_append(|f| f.message(&[frame]));
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

    /// The first message, which must be a valid Auth: the peer's ID.
    async fn authenticate(&self, events: &mut EventReader<OwnedReadHalf>) -> Option<PeerId> {
        let Ok(Some(Event::Binary(first))) = events.next().await else {
            return None;
        };
        match messages::parse(&first) {
            Ok(Frame::Auth {
                peer,
                signature,
                token_payload,
            }) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                if relay_token::verify(&self.secret, token_payload, signature, now) {
                    Some(*peer)
                } else {
                    debug!("relay: bad token");
                    None
                }
            }
            _ => None,
        }
    }

    async fn connection(&self, mut stream: TcpStream) {
        // Every frame is a datagram someone waits for: with Nagle, a frame written while an
        // earlier one is unacknowledged waits until the peer sends something back (its TCP
        // ACK rides on it), and a WireGuard peer that has nothing to send holds its own
        // traffic up for as long. NetBird's Go relay has no Nagle (Go turns it off).
        let _ = stream.set_nodelay(true);
        let Ok(Ok(decoder)) =
            tokio::time::timeout(AUTH_TIMEOUT, server_handshake(&mut stream, "/relay")).await
        else {
            return;
        };
        let (reader, writer) = stream.into_split();
        let mut events = EventReader::new(reader, decoder, AUTH_TIMEOUT);
        // Authentication: the first message, within the timeout; failures close silently.
        let Ok(Some(me)) = tokio::time::timeout(AUTH_TIMEOUT, self.authenticate(&mut events)).await
        else {
            return;
        };
        events.set_idle(IDLE_TIMEOUT);
        let out = Arc::new(OutQueue::new(Role::Server));
        out.append(|f| f.message(&[&messages::auth_response(&self.instance_url)]));
        let conn = {
            let mut hub = self.hub();
            hub.next_conn += 1;
            let conn = hub.next_conn;
            if let Some((_, old)) = hub.peers.insert(me, (conn, out.clone())) {
                // A reconnecting peer replaces its old connection.
                old.close();
            }
            for f in messages::peers_online(&[me]) {
                hub.tell_watchers(&me, &f);
            }
            conn
        };
        let writer = out.write_to(writer);
        // Health checks queue behind the data like any frame.
        let health = async {
            let mut health = tokio::time::interval(HEALTH_INTERVAL);
            health.tick().await;
            loop {
                health.tick().await;
                if !out.append(|f| f.message(&[&messages::health_check()])) {
                    break;
                }
            }
        };
        let reader = async {
            // The destination of the last datagram: a bulk transfer looks the hub up once.
            let mut last: Option<(PeerId, Arc<OutQueue>)> = None;
            loop {
                let data = match events.next().await {
                    Ok(Some(Event::Binary(data))) => data,
                    Ok(Some(Event::Ping(p))) => {
                        out.try_append(|f| f.control(opcode::PONG, &p));
                        continue;
                    }
                    Ok(Some(Event::Text(_) | Event::Pong)) => continue,
                    Ok(Some(Event::Close) | None) => break,
                    Err(e) => {
                        debug!("relay: connection: {e}");
                        break;
                    }
                };
                match messages::parse(&data) {
                    Ok(Frame::Transport { peer, payload }) => {
                        if !last
                            .as_ref()
                            .is_some_and(|(id, q)| id == peer && !q.is_closed())
                        {
                            last = self.hub().peers.get(peer).map(|(_, q)| (*peer, q.clone()));
                        }
                        // As NetBird's relay writes to the destination before reading on, a
                        // full destination slows the sender down (its TCP backs up) rather
                        // than losing datagrams at once; one that stays full loses them.
                        if let Some((_, target)) = &last
                            && target.wait_for_room(FORWARD_WAIT).await
                        {
                            target.append(|f| f.transport(&me, payload));
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
                        for frame in messages::peers_online(&online) {
                            out.try_append(|f| f.message(&[&frame]));
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
        out.close();
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
