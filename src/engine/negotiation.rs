//! Per-peer connection setup, relay-only (netbird-protocol.md §7.2): offers and answers over
//! signal with empty ICE credentials and our home relay's instance URL; the controller (the
//! larger key string) decides which relay both use — its home relay, which the other side opens
//! as a foreign relay when it is not its own; the WireGuard peer's endpoint becomes that relay
//! connection once the relay reports the peer online. Offers repeat with backoff until the peer
//! is connected, because Go peers drop offers that arrive before they listen; a connected peer
//! whose relay connection ends or reports it offline is set up again. A peer that says GO_IDLE
//! (a lazy Go peer closing its side) is left idle, without offers, until we have traffic for it
//! or it speaks again (netbird-protocol.md §7.5).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::control::mesh::RemotePeer;
use crate::control::signal::{Body, body};
use crate::control::signal_client::{Incoming, SignalClient};
use crate::relay::client::RelayClient;
use crate::relay::messages::{PeerId, peer_id};

use super::relays::Relays;
use crate::wg::WgDevice;
use crate::wg::device::PeerEndpoint;

/// How long the relay may take to report a peer online.
const ONLINE_WAIT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(3);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often unused foreign relays are closed.
const RELAY_SWEEP: Duration = Duration::from_secs(5);

/// Peers joining and leaving, from the network map.
#[derive(Debug)]
pub enum PeerEvent {
    Added(RemotePeer),
    Removed(String),
}

struct PeerState {
    peer: RemotePeer,
    id: PeerId,
    /// The relay connection carrying this peer, once set up.
    via: Option<Arc<RelayClient>>,
    /// The relay instance in use or being opened.
    relay_url: Option<String>,
    connecting: bool,
    /// The remote went idle: no offers until traffic for it or a message from it.
    idle: bool,
    /// The setup attempt in flight (numbered by the negotiator, never reused; 0: none), so
    /// the outcome of one abandoned by `reset` or a peer change is ignored.
    attempt: u64,
    next_offer: Instant,
    retry: Duration,
}

impl PeerState {
    fn new(peer: RemotePeer) -> Self {
        Self {
            id: peer_id(&peer.key),
            peer,
            via: None,
            relay_url: None,
            connecting: false,
            idle: false,
            attempt: 0,
            next_offer: Instant::now(),
            retry: FIRST_RETRY,
        }
    }

    fn connected(&self) -> bool {
        self.via.is_some()
    }

    /// Forget the connection and offer again at once.
    fn reset(&mut self) {
        self.via = None;
        self.relay_url = None;
        self.connecting = false;
        self.attempt = 0;
        self.retry = FIRST_RETRY;
        self.next_offer = Instant::now();
    }
}

/// Outcome of a relay connection attempt.
struct Attached {
    key: String,
    attempt: u64,
    via: Option<Arc<RelayClient>>,
}

pub struct Negotiator {
    pub own_key: String,
    pub wg: Arc<WgDevice>,
    pub signal: Arc<SignalClient>,
    pub relays: Arc<Relays>,
    pub wg_port: u16,
}

impl Negotiator {
    /// Run until `cancel`: react to peer events and signal messages, re-offer on a timer.
    pub async fn run(
        self,
        mut events: mpsc::Receiver<PeerEvent>,
        mut inbox: mpsc::Receiver<Incoming>,
        mut wanted: mpsc::Receiver<[u8; 32]>,
        cancel: CancellationToken,
    ) {
        let mut peers: HashMap<String, PeerState> = HashMap::new();
        let (attached_tx, mut attached_rx) = mpsc::channel::<Attached>(64);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut sweep = tokio::time::interval(RELAY_SWEEP);
        let mut home = self.relays.home_changes();
        let mut attempts: u64 = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                e = events.recv() => match e {
                    Some(PeerEvent::Added(peer)) => {
                        // New, or changed (WireGuard replaced the peer: set it up again, but
                        // an idle peer stays idle).
                        let key = peer.key.clone();
                        let idle = peers.get(&key).is_some_and(|s| s.idle);
                        let mut st = PeerState::new(peer);
                        st.idle = idle;
                        peers.insert(key.clone(), st);
                        if !idle {
                            self.offer(&key, body::Type::Offer).await;
                            if let Some(st) = peers.get_mut(&key) {
                                st.next_offer = Instant::now() + st.retry;
                            }
                        }
                    }
                    Some(PeerEvent::Removed(key)) => { peers.remove(&key); }
                    None => return,
                },
                m = inbox.recv() => match m {
                    Some(m) => {
                        self.on_message(m, &mut peers, &mut attempts, &attached_tx, &cancel)
                            .await
                    }
                    None => return,
                },
                a = attached_rx.recv() => if let Some(a) = a
                    && let Some(st) = peers.get_mut(&a.key)
                    && st.attempt == a.attempt
                {
                    // Only the current attempt touches the data path: a late outcome of an
                    // abandoned one must not repoint the peer.
                    st.connecting = false;
                    st.attempt = 0;
                    if let Some(via) = &a.via {
                        info!(peer = %st.peer.fqdn, relay = %via.instance_url(), "peer connected through the relay");
                        let endpoint = PeerEndpoint::Relay(via.clone(), st.id);
                        self.wg.set_peer_endpoint(&st.peer.public_key, endpoint);
                        if self.is_controller(&a.key) {
                            self.wg.initiate_handshake(&st.peer.public_key).await;
                        }
                    } else {
                        st.relay_url = None;
                    }
                    st.via = a.via;
                },
                w = wanted.recv() => {
                    let Some(public_key) = w else { return };
                    let key = crate::control::envelope::key_string(&public_key);
                    if let Some(st) = peers.get_mut(&key)
                        && st.idle
                    {
                        info!(peer = %st.peer.fqdn, "traffic for an idle peer; waking it");
                        st.idle = false;
                        st.reset();
                        self.offer(&key, body::Type::Offer).await;
                        if let Some(st) = peers.get_mut(&key) {
                            st.next_offer = Instant::now() + st.retry;
                        }
                    }
                }
                r = home.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A new home relay (or none): peers that met us on the old one are set up
                    // again, at once — those we control, and those whose relay connection is
                    // gone. Peers on open foreign relays keep flowing.
                    self.relays.close_foreign_home();
                    for (key, st) in peers.iter_mut() {
                        let lost = st.via.as_ref().is_none_or(|v| v.is_closed());
                        if self.is_controller(key) || lost {
                            st.reset();
                        }
                    }
                }
                _ = sweep.tick() => {
                    let in_use: HashSet<String> =
                        peers.values().filter_map(|s| s.relay_url.clone()).collect();
                    self.relays.close_unused(&in_use);
                }
                _ = tick.tick() => {
                    // A relay connection that ended or lost the peer: set the peer up again.
                    for st in peers.values_mut() {
                        if let Some(via) = &st.via
                            && (via.is_closed() || !via.is_online(&st.id))
                        {
                            info!(peer = %st.peer.fqdn, "peer left the relay; setting it up again");
                            st.reset();
                        }
                    }
                    let now = Instant::now();
                    let due: Vec<String> = peers
                        .iter()
                        .filter(|(_, s)| {
                            !s.connected() && !s.connecting && !s.idle && s.next_offer <= now
                        })
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
        let home = self.relays.home();
        let body = Body {
            r#type: kind as i32,
            // Relay-only: empty ICE credentials.
            payload: ":".into(),
            wg_listen_port: u32::from(self.wg_port),
            relay_server_address: home.as_ref().map(|r| r.instance_url().to_string()),
            relay_server_ip: home.as_ref().map(|r| match r.server_ip() {
                std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
                std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
            }),
            rosenpass_config: Some(Default::default()),
            ..Default::default()
        };
        match self.signal.send(to, body).await {
            Ok(()) => debug!(peer = %to, kind = kind.as_str_name(), "signal message sent"),
            Err(e) => debug!(peer = %to, "signal send: {e}"),
        }
    }

    async fn on_message(
        &self,
        m: Incoming,
        peers: &mut HashMap<String, PeerState>,
        attempts: &mut u64,
        attached: &mpsc::Sender<Attached>,
        cancel: &CancellationToken,
    ) {
        let Some(st) = peers.get_mut(&m.from) else {
            debug!(from = %m.from, "signal message from a peer not in the map");
            return;
        };
        let kind = body::Type::try_from(m.body.r#type).ok();
        if matches!(kind, Some(body::Type::Offer | body::Type::Answer)) {
            // An OFFER or ANSWER wakes an idle peer (GO_IDLE idles it; others are ignored).
            st.idle = false;
        }
        match kind {
            Some(body::Type::Offer) => {
                self.offer(&m.from, body::Type::Answer).await;
            }
            Some(body::Type::Answer) => {}
            Some(body::Type::GoIdle) => {
                info!(peer = %st.peer.fqdn, "peer went idle; it is woken when there is traffic for it");
                st.reset();
                st.idle = true;
                self.wg.clear_peer_endpoint(&st.peer.public_key);
                return;
            }
            _ => return,
        }
        let controller = self.is_controller(&m.from);
        // The relay both sides use: our home if we control, else the one the remote names.
        let (url, ip) = if controller {
            (
                self.relays.home().map(|r| r.instance_url().to_string()),
                None,
            )
        } else {
            (
                m.body
                    .relay_server_address
                    .clone()
                    .filter(|u| !u.is_empty()),
                m.body.relay_server_ip.as_deref().and_then(ip_from_bytes),
            )
        };
        let Some(url) = url else {
            debug!(peer = %st.peer.fqdn, controller, "no relay to meet this peer on yet");
            return;
        };
        if st.connected() && st.relay_url.as_deref() != Some(url.as_str()) {
            // The controller moved to another relay: follow it.
            info!(peer = %st.peer.fqdn, relay = %url, "peer moved to another relay");
            st.reset();
        }
        if st.connected() || st.connecting {
            return;
        }
        st.connecting = true;
        *attempts += 1;
        st.attempt = *attempts;
        let attempt = st.attempt;
        st.relay_url = Some(url.clone());
        let key = m.from.clone();
        let id = st.id;
        let relays = self.relays.clone();
        let attached = attached.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let setup = async {
                let relay = relays.open(&url, ip).await?;
                relay.wait_online(&id, ONLINE_WAIT, &cancel).await?;
                Ok::<_, crate::relay::client::RelayError>(relay)
            };
            let via = match setup.await {
                Ok(relay) => Some(relay),
                Err(e) => {
                    debug!(peer = %key, relay = %url, "relay: {e}");
                    None
                }
            };
            let _ = attached.send(Attached { key, attempt, via }).await;
        });
    }
}

/// `relayServerIP`: 4 or 16 bytes.
pub(crate) fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        // An IPv4-mapped IPv6 address is dialled as IPv4.
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(b).ok()?).to_canonical()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_server_ip_is_4_or_16_bytes() {
        assert_eq!(
            ip_from_bytes(&[198, 18, 0, 1]),
            Some(std::net::IpAddr::from([198, 18, 0, 1]))
        );
        let v6 = std::net::Ipv6Addr::LOCALHOST;
        assert_eq!(ip_from_bytes(&v6.octets()), Some(v6.into()));
        assert_eq!(ip_from_bytes(&[]), None);
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    }
}
