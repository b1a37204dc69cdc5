//! Per-peer connection setup, relay-only (netbird-protocol.md §7.2): offers and answers over
//! signal with empty ICE credentials and our home relay's instance URL; the controller (the
//! larger key string) decides which relay both use; the WireGuard peer's endpoint becomes that
//! relay connection once the relay reports the peer online. Offers repeat with backoff until the
//! peer is connected, because Go peers drop offers that arrive before they listen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::control::mesh::RemotePeer;
use crate::control::signal::{Body, body};
use crate::control::signal_client::{Incoming, SignalClient};
use crate::relay::client::RelayClient;
use crate::relay::messages::peer_id;
use crate::wg::WgDevice;
use crate::wg::device::PeerEndpoint;

/// How long the relay may take to report a peer online.
const ONLINE_WAIT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(3);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Peers joining and leaving, from the network map.
#[derive(Debug)]
pub enum PeerEvent {
    Added(RemotePeer),
    Removed(String),
}

struct PeerState {
    peer: RemotePeer,
    connected: bool,
    connecting: bool,
    next_offer: Instant,
    retry: Duration,
}

/// Outcome of a relay connection attempt.
struct Attached {
    key: String,
    ok: bool,
}

pub struct Negotiator {
    pub own_key: String,
    pub wg: Arc<WgDevice>,
    pub signal: Arc<SignalClient>,
    /// The home relay connection, replaced by the relay guard when it reconnects.
    pub relay: watch::Receiver<Option<Arc<RelayClient>>>,
    pub wg_port: u16,
}

impl Negotiator {
    /// Run until `cancel`: react to peer events and signal messages, re-offer on a timer.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<PeerEvent>,
        mut inbox: mpsc::Receiver<Incoming>,
        cancel: CancellationToken,
    ) {
        let mut peers: HashMap<String, PeerState> = HashMap::new();
        let (attached_tx, mut attached_rx) = mpsc::channel::<Attached>(64);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                e = events.recv() => match e {
                    Some(PeerEvent::Added(peer)) => {
                        let key = peer.key.clone();
                        peers.insert(key.clone(), PeerState {
                            peer,
                            connected: false,
                            connecting: false,
                            next_offer: Instant::now(),
                            retry: FIRST_RETRY,
                        });
                        self.offer(&key, body::Type::Offer).await;
                        if let Some(st) = peers.get_mut(&key) {
                            st.next_offer = Instant::now() + st.retry;
                        }
                    }
                    Some(PeerEvent::Removed(key)) => { peers.remove(&key); }
                    None => return,
                },
                m = inbox.recv() => match m {
                    Some(m) => self.on_message(m, &mut peers, &attached_tx, &cancel).await,
                    None => return,
                },
                a = attached_rx.recv() => if let Some(a) = a && let Some(st) = peers.get_mut(&a.key) {
                    st.connecting = false;
                    st.connected = a.ok;
                    if a.ok {
                        info!(peer = %st.peer.fqdn, "peer connected through the relay");
                    }
                },
                r = self.relay.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A new home relay: every peer is set up again through it, at once.
                    let now = Instant::now();
                    for st in peers.values_mut() {
                        st.connected = false;
                        st.connecting = false;
                        st.retry = FIRST_RETRY;
                        st.next_offer = now;
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let due: Vec<String> = peers
                        .iter()
                        .filter(|(_, s)| !s.connected && !s.connecting && s.next_offer <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in due {
                        self.offer(&key, body::Type::Offer).await;
                        if let Some(st) = peers.get_mut(&key) {
                            st.retry = (st.retry * 2).min(MAX_RETRY);
                            st.next_offer = now + st.retry;
                        }
                    }
                }
            }
        }
    }

    fn is_controller(&self, remote_key: &str) -> bool {
        self.own_key.as_str() > remote_key
    }

    async fn offer(&self, to: &str, kind: body::Type) {
        let body = Body {
            r#type: kind as i32,
            // Relay-only: empty ICE credentials.
            payload: ":".into(),
            wg_listen_port: u32::from(self.wg_port),
            relay_server_address: self
                .relay
                .borrow()
                .as_ref()
                .map(|r| r.instance_url().to_string()),
            rosenpass_config: Some(Default::default()),
            ..Default::default()
        };
        if let Err(e) = self.signal.send(to, body).await {
            debug!(peer = %to, "signal send: {e}");
        }
    }

    async fn on_message(
        &self,
        m: Incoming,
        peers: &mut HashMap<String, PeerState>,
        attached: &mpsc::Sender<Attached>,
        cancel: &CancellationToken,
    ) {
        let Some(st) = peers.get_mut(&m.from) else {
            debug!(from = %m.from, "signal message from a peer not in the map");
            return;
        };
        let kind = body::Type::try_from(m.body.r#type).ok();
        match kind {
            Some(body::Type::Offer) => {
                self.offer(&m.from, body::Type::Answer).await;
            }
            Some(body::Type::Answer) => {}
            Some(body::Type::GoIdle) => {
                st.connected = false;
                return;
            }
            _ => return,
        }
        if st.connected || st.connecting {
            return;
        }
        let Some(relay) = self.relay_for(&m.from, m.body.relay_server_address.as_deref()) else {
            warn!(peer = %st.peer.fqdn, "no relay in common with this peer");
            return;
        };
        st.connecting = true;
        let key = m.from.clone();
        let public_key = st.peer.public_key;
        let controller = self.is_controller(&key);
        let wg = self.wg.clone();
        let attached = attached.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let id = peer_id(&key);
            let ok = match relay.wait_online(&id, ONLINE_WAIT, &cancel).await {
                Ok(()) => {
                    wg.set_peer_endpoint(&public_key, PeerEndpoint::Relay(relay, id));
                    if controller {
                        wg.initiate_handshake(&public_key).await;
                    }
                    true
                }
                Err(e) => {
                    debug!(peer = %key, "relay: {e}");
                    false
                }
            };
            let _ = attached.send(Attached { key, ok }).await;
        });
    }

    /// The controller's relay: ours if we control, else the remote's (only ours can be used
    /// until foreign relays are supported, so it must be the same instance).
    fn relay_for(&self, remote_key: &str, remote_relay: Option<&str>) -> Option<Arc<RelayClient>> {
        let home = self.relay.borrow().clone().filter(|r| !r.is_closed())?;
        if self.is_controller(remote_key) {
            return Some(home);
        }
        match remote_relay {
            Some(url) if url == home.instance_url() => Some(home),
            Some(url) => {
                warn!(relay = %url, "the peer's relay is not ours; foreign relays are not supported yet");
                None
            }
            None => None,
        }
    }
}
