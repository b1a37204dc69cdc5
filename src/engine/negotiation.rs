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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::control::mesh::RemotePeer;
use crate::control::signal::{Body, body};
use crate::control::signal_client::{Incoming, SignalClient};
use crate::relay::client::RelayClient;
use crate::relay::messages::{PeerId, peer_id};

use super::ha_groups::HaGroups;
use super::relays::Relays;
use crate::control::mesh::TurnServer;
use crate::ice::turn::{TurnRelay, TurnSinks};
use crate::ice::{Agents, Event as IceEvent, LocalNet};
use crate::wg::WgDevice;
use crate::wg::device::{PeerEndpoint, StunIn};

/// How long the relay may take to report a peer online.
const ONLINE_WAIT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(3);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// A re-offer's delay, spread by ±25 %: peers offered together (every peer of a map, in eager
/// mode) are not all offered again in the same tick, which at 5 000 peers was a burst of 5 000
/// signal messages every few seconds, on our cores and on signal.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.75 + rand::random::<f64>() / 2.0)
}
/// How often unused foreign relays are closed.
const RELAY_SWEEP: Duration = Duration::from_secs(5);
/// ICE retries after a failed or lost direct path: from 3 s, doubling, up to a minute (NetBird
/// gives up after three and tries hourly; a minute brings a restored path back sooner).
const ICE_FIRST_RETRY: Duration = Duration::from_secs(3);
const ICE_MAX_RETRY: Duration = Duration::from_secs(60);

/// Peers joining and leaving, from the network map.
#[derive(Debug)]
pub enum PeerEvent {
    Added(RemotePeer),
    Removed(String),
    /// Management turned lazy connections on or off (only when we follow its setting).
    Lazy(bool),
    /// The map's HA groups: peers serving one route wake together and stay up together.
    HaGroups(HaGroups),
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
    /// Data bytes both ways as last seen, and when they last changed (lazy connections).
    activity: (u64, Instant),
    /// The setup attempt in flight (numbered by the negotiator, never reused; 0: none), so
    /// the outcome of one abandoned by `reset` or a peer change is ignored.
    attempt: u64,
    next_offer: Instant,
    retry: Duration,
    /// Traffic already brought an offer forward in this backoff cycle.
    demanded: bool,
    /// Traffic goes over an ICE pair.
    direct: bool,
    /// When ICE is offered again after a failure (None: not waiting to retry).
    ice_retry_at: Option<Instant>,
    ice_retry: Duration,
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
            activity: (0, Instant::now()),
            attempt: 0,
            next_offer: Instant::now(),
            retry: FIRST_RETRY,
            demanded: false,
            direct: false,
            ice_retry_at: None,
            ice_retry: ICE_FIRST_RETRY,
        }
    }

    /// On the relay. Offers repeat until it is, even while a direct path works: the relay is
    /// the standby that a lost direct path falls back to (netbird-protocol.md §7.3), and a
    /// peer that went direct before either side had a relay must still get one.
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
    /// ICE, unless it is off (`--force-relay`): relay-only offers then.
    pub ice: Option<IceSetup>,
    /// Lazy connections (netbird-protocol.md §7.5): a peer is set up on first traffic to it
    /// or when it offers, and goes idle (GO_IDLE) after `lazy_inactivity` without data
    /// either way. Off: every peer is set up at once and kept.
    pub lazy: bool,
    pub lazy_inactivity: Duration,
}

/// Traffic for a peer being set up brings its next offer forward unless it is due within
/// this anyway.
const DEMAND_RETRY: Duration = Duration::from_secs(1);

/// How often peers are checked for inactivity (lazy connections).
const INACTIVITY_CHECK: Duration = Duration::from_secs(5);

/// What ICE needs from the engine.
pub struct IceSetup {
    /// Our host candidates and the overlay to keep out of them.
    pub net: LocalNet,
    /// STUN server URIs from management (`NetbirdConfig.stuns`).
    pub stuns: watch::Receiver<Vec<String>>,
    /// STUN datagrams from the WireGuard socket (and from the TURN allocation: `stun_tx`).
    pub inbox: mpsc::Receiver<StunIn>,
    pub stun_tx: mpsc::Sender<StunIn>,
    /// TURN servers from management (`NetbirdConfig.turns`).
    pub turns: watch::Receiver<Vec<TurnServer>>,
    /// Peers (key string, name or overlay IP) that stay on the relay.
    pub force_relay: Vec<String>,
}

/// The ICE side of the negotiator's state; absent when ICE is off.
struct Ice {
    agents: Agents,
    force_relay: Vec<String>,
    stun_tx: mpsc::Sender<StunIn>,
    turn_servers: Vec<TurnServer>,
    /// Our TURN allocation, made the first time an agent needs a relay candidate; its task
    /// ends with the negotiator (child token, and aborted on drop).
    turn: Option<Turn>,
}

struct Turn {
    relay: Arc<TurnRelay>,
    changes: watch::Receiver<Option<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Ice {
    /// Make the TURN allocation unless there is one (or no usable TURN server).
    async fn ensure_turn(&mut self, wg: &WgDevice, cancel: &CancellationToken) {
        if self.turn.as_ref().is_some_and(|t| !t.task.is_finished()) {
            return;
        }
        self.turn = None;
        for server in &self.turn_servers {
            let Some(target) = crate::ice::srflx::turn_target(&server.uri) else {
                continue;
            };
            let lookup =
                tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(target));
            let Ok(Ok(mut addrs)) = lookup.await else {
                info!(uri = %server.uri, "TURN server not resolved");
                continue;
            };
            let Some(addr) = addrs.next() else { continue };
            let relay = match TurnRelay::new(addr, &server.user, &server.password).await {
                Ok(r) => r,
                Err(e) => {
                    info!(uri = %server.uri, "TURN socket: {e}");
                    continue;
                }
            };
            let sinks = TurnSinks {
                wireguard: wg.turn_inbox(),
                stun: self.stun_tx.clone(),
            };
            let task = tokio::spawn(relay.clone().run(sinks, cancel.child_token()));
            self.turn = Some(Turn {
                changes: relay.relayed_changes(),
                relay,
                task,
            });
            return;
        }
    }

    /// Whether ICE runs towards this peer.
    fn wanted(&self, peer: &RemotePeer) -> bool {
        let ip = peer.allowed_ips.first().map(|n| n.addr().to_string());
        !self.force_relay.iter().any(|f| {
            f == &peer.key
                || f == &peer.fqdn
                || peer.fqdn.split('.').next() == Some(f.as_str())
                || ip.as_deref() == Some(f.as_str())
        })
    }
}

impl Negotiator {
    /// Run until `cancel`: react to peer events and signal messages, re-offer on a timer, and
    /// drive ICE (its agents are sans-IO state owned by this task: no task, socket or timer of
    /// their own, so they end with it).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<PeerEvent>,
        mut inbox: mpsc::Receiver<Incoming>,
        mut wanted: mpsc::Receiver<[u8; 32]>,
        cancel: CancellationToken,
    ) {
        let (mut ice, mut stun_inbox, mut stuns, mut turns) = match self.ice.take() {
            Some(setup) => (
                Some(Ice {
                    agents: Agents::new(setup.net, self.wg.ice.clone()),
                    force_relay: setup.force_relay,
                    stun_tx: setup.stun_tx,
                    turn_servers: Vec::new(),
                    turn: None,
                }),
                Some(setup.inbox),
                Some(setup.stuns),
                Some(setup.turns),
            ),
            None => (None, None, None, None),
        };
        if let (Some(ice), Some(turns)) = (&mut ice, &mut turns) {
            ice.turn_servers = turns.borrow_and_update().clone();
        }
        if let (Some(ice), Some(stuns)) = (&mut ice, &mut stuns) {
            let uris = stuns.borrow_and_update().clone();
            let servers = resolve_stuns(&uris, &cancel).await;
            ice.agents.set_stun_servers(&servers);
        }
        let mut peers: HashMap<String, PeerState> = HashMap::new();
        let (attached_tx, mut attached_rx) = mpsc::channel::<Attached>(64);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut sweep = tokio::time::interval(RELAY_SWEEP);
        let mut inactivity = tokio::time::interval(INACTIVITY_CHECK);
        // Gated on lazy mode, which management may turn on after hours off: no burst of the
        // checks missed meanwhile.
        inactivity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut home = self.relays.home_changes();
        let mut attempts: u64 = 0;
        let mut groups = HaGroups::default();
        loop {
            let ice_due = ice.as_mut().and_then(|i| i.agents.poll_timeout());
            tokio::select! {
                _ = cancel.cancelled() => return,
                e = events.recv() => match e {
                    Some(PeerEvent::Added(peer)) => {
                        // New, or changed (WireGuard replaced the peer: set it up again, but
                        // an idle peer stays idle; a direct path carries over).
                        let key = peer.key.clone();
                        // A peer new to us starts idle in lazy mode: set up on first use.
                        let idle = match peers.get(&key) {
                            Some(s) => s.idle,
                            // A standby router whose group is up is set up with it.
                            None => {
                                self.lazy
                                    && !groups.mates(&key).any(|m| peers.get(m).is_some_and(|s| !s.idle))
                            }
                        };
                        let mut st = PeerState::new(peer);
                        st.idle = idle;
                        if idle {
                            // Idle on purpose: its traffic is reported wanted (a wake-up), and
                            // route elections count it as idle, not unreachable.
                            self.wg.clear_peer_endpoint(&st.peer.public_key);
                        }
                        if let Some(ice) = &ice
                            && let Some(pair) = ice.agents.selected(&key)
                        {
                            let turn = (pair.local_kind == crate::ice::candidate::Kind::Relay)
                                .then(|| ice.turn.as_ref().map(|t| t.relay.clone()))
                                .flatten();
                            self.wg.set_direct_path(&st.peer.public_key, pair, turn);
                            st.direct = true;
                        }
                        peers.insert(key.clone(), st);
                        if !idle {
                            self.offer(&key, body::Type::Offer, &peers, ice.as_mut()).await;
                            if let Some(st) = peers.get_mut(&key) {
                                st.next_offer = Instant::now() + jittered(st.retry);
                            }
                        }
                    }
                    Some(PeerEvent::Removed(key)) => {
                        peers.remove(&key);
                        if let Some(ice) = &mut ice {
                            ice.agents.remove(&key);
                        }
                    }
                    Some(PeerEvent::Lazy(on)) => {
                        if on != self.lazy {
                            info!("management turned lazy connections {}", if on { "on" } else { "off" });
                            self.lazy = on;
                        }
                        if !on {
                            // Every idle peer is set up now (offers go out on the next tick).
                            for st in peers.values_mut().filter(|s| s.idle) {
                                wake(st);
                            }
                        }
                    }
                    Some(PeerEvent::HaGroups(new)) => {
                        groups = new;
                        let up: Vec<String> = groups
                            .members()
                            .filter(|k| peers.get(*k).is_some_and(|s| !s.idle))
                            .cloned()
                            .collect();
                        for key in up {
                            wake_mates(&groups, &key, &mut peers);
                        }
                    }
                    None => return,
                },
                m = inbox.recv() => match m {
                    Some(m) => {
                        let from = m.from.clone();
                        let was_idle = peers.get(&from).is_some_and(|s| s.idle);
                        self.on_message(m, &mut peers, &mut attempts, &attached_tx, &cancel, ice.as_mut())
                            .await;
                        if was_idle && peers.get(&from).is_some_and(|s| !s.idle) {
                            wake_mates(&groups, &from, &mut peers);
                        }
                    }
                    None => return,
                },
                Some(stun) = async {
                    match stun_inbox.as_mut() {
                        Some(i) => i.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(ice) = &mut ice {
                        ice.agents.on_stun(Instant::now().into_std(), stun.from, stun.to, &stun.data);
                    }
                }
                _ = async {
                    match ice_due {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(ice) = &mut ice {
                        ice.agents.handle_timeout(Instant::now().into_std());
                    }
                }
                Ok(()) = async {
                    match stuns.as_mut() {
                        Some(s) => s.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Some(ice), Some(stuns)) = (&mut ice, &mut stuns) {
                        let uris = stuns.borrow_and_update().clone();
                        let servers = resolve_stuns(&uris, &cancel).await;
                        ice.agents.set_stun_servers(&servers);
                    }
                }
                Ok(()) = async {
                    match turns.as_mut() {
                        Some(t) => t.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Some(ice), Some(turns)) = (&mut ice, &mut turns) {
                        ice.turn_servers = turns.borrow_and_update().clone();
                    }
                }
                Ok(()) = async {
                    match ice.as_mut().and_then(|i| i.turn.as_mut()) {
                        Some(t) => t.changes.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(ice) = &mut ice {
                        let turn = ice.turn.as_mut().and_then(|t| {
                            let relayed = (*t.changes.borrow_and_update())?;
                            Some((relayed, t.relay.local_addr()))
                        });
                        ice.agents.set_turn(Instant::now().into_std(), turn);
                    }
                }
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
                        if self.is_controller(&a.key) && !st.direct {
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
                    let now = Instant::now();
                    let offer_now = match peers.get_mut(&key) {
                        Some(st) if st.idle => {
                            info!(peer = %st.peer.fqdn, "traffic for an idle peer; waking it");
                            wake(st);
                            // This offer is the traffic's: the dial's next reports must not
                            // bring another forward in this cycle.
                            st.demanded = true;
                            true
                        }
                        // Waiting out a backoff while there is traffic for it (our last offer
                        // came before it knew us, or it left and may be back): try now, from
                        // the first step. Once per backoff cycle: the dial behind the traffic
                        // says it again every 50 ms.
                        Some(st) if !st.connected()
                            && !st.connecting
                            && !st.demanded
                            && st.next_offer > now + DEMAND_RETRY =>
                        {
                            debug!(peer = %st.peer.fqdn, "traffic for a peer being set up; offering now");
                            st.reset();
                            st.demanded = true;
                            true
                        }
                        _ => false,
                    };
                    if offer_now {
                        wake_mates(&groups, &key, &mut peers);
                        self.offer(&key, body::Type::Offer, &peers, ice.as_mut()).await;
                        if let Some(st) = peers.get_mut(&key) {
                            st.next_offer = Instant::now() + jittered(st.retry);
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
                _ = inactivity.tick(), if self.lazy => {
                    self.idle_inactive(&mut peers, &groups, ice.as_mut()).await;
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
                            self.wg.clear_relay_path(&st.peer.public_key);
                        }
                    }
                    let now = Instant::now();
                    let due: Vec<String> = peers
                        .iter()
                        .filter(|(_, s)| {
                            (!s.connected() && !s.connecting && !s.idle && s.next_offer <= now)
                                || (!s.idle && s.ice_retry_at.is_some_and(|t| t <= now))
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in due {
                        self.offer(&key, body::Type::Offer, &peers, ice.as_mut()).await;
                        if let Some(st) = peers.get_mut(&key) {
                            if st.ice_retry_at.is_some_and(|t| t <= now) {
                                st.ice_retry_at = None;
                            }
                            st.retry = (st.retry * 2).min(MAX_RETRY);
                            st.next_offer = now + jittered(st.retry);
                            st.demanded = false;
                        }
                    }
                    if let Some(ice) = &ice {
                        for (key, st) in &peers {
                            if st.direct {
                                self.wg.set_direct_rtt(&st.peer.public_key, ice.agents.rtt(key));
                            }
                        }
                    }
                }
            }
            if let Some(ice) = &mut ice {
                self.flush_ice(ice, &mut peers).await;
            }
        }
    }

    /// Lazy connections: peers with a path and no data either way for the inactivity
    /// timeout go idle — GO_IDLE to the remote (so it closes its side too), no path, woken
    /// again by traffic for it or its offer.
    async fn idle_inactive(
        &self,
        peers: &mut HashMap<String, PeerState>,
        groups: &HaGroups,
        mut ice: Option<&mut Ice>,
    ) {
        if !self.lazy {
            return;
        }
        let timeout = self.lazy_inactivity;
        let now = Instant::now();
        let mut going = Vec::new();
        for (key, st) in peers.iter_mut() {
            if st.idle {
                continue;
            }
            let bytes = self
                .wg
                .peer(&st.peer.public_key)
                .map(|p| {
                    p.counters.rx_bytes.load(std::sync::atomic::Ordering::Relaxed)
                        + p.counters.tx_bytes.load(std::sync::atomic::Ordering::Relaxed)
                })
                .unwrap_or(0);
            if bytes != st.activity.0 {
                st.activity = (bytes, now);
            } else if now.duration_since(st.activity.1) >= timeout {
                going.push(key.clone());
            }
        }
        // A standby router stays up while a mate carries data (it is not going idle).
        let inactive: HashSet<String> = going.iter().cloned().collect();
        going.retain(|key| {
            !groups
                .mates(key)
                .any(|m| peers.get(m).is_some_and(|s| !s.idle) && !inactive.contains(m))
        });
        for key in going {
            let Some(st) = peers.get_mut(&key) else { continue };
            info!(peer = %st.peer.fqdn, "no traffic for {timeout:?}; going idle until it is needed");
            st.reset();
            st.idle = true;
            st.direct = false;
            st.ice_retry_at = None;
            if let Some(ice) = ice.as_deref_mut() {
                ice.agents.close(&key, "the peer went idle");
            }
            self.wg.clear_peer_endpoint(&st.peer.public_key);
            let body = Body {
                r#type: body::Type::GoIdle as i32,
                ..Default::default()
            };
            if let Err(e) = self.signal.send(&key, body).await {
                debug!(peer = %key, "GO_IDLE not sent: {e}");
            }
        }
    }

    fn is_controller(&self, remote_key: &str) -> bool {
        self.own_key.as_str() > remote_key
    }

    /// Send what the ICE agents have for the network and signal, and act on their events.
    async fn flush_ice(&self, ice: &mut Ice, peers: &mut HashMap<String, PeerState>) {
        let relayed = ice.agents.turn_relayed();
        while let Some((from, to, data)) = ice.agents.poll_transmit() {
            match (&ice.turn, from) {
                // From our relay candidate: through the TURN allocation.
                (Some(turn), Some(from)) if Some(from) == relayed => {
                    turn.relay.send_to(to, &data);
                }
                _ => self.wg.send_stun(to, &data),
            }
        }
        while let Some(event) = ice.agents.poll_event() {
            match event {
                IceEvent::Candidate { peer, line } => {
                    let body = Body {
                        r#type: body::Type::Candidate as i32,
                        payload: line,
                        ..Default::default()
                    };
                    if let Err(e) = self.signal.send(&peer, body).await {
                        debug!(%peer, "signal send: {e}");
                    }
                }
                IceEvent::Selected { peer, pair } => {
                    let Some(st) = peers.get_mut(&peer) else {
                        continue;
                    };
                    info!(
                        peer = %st.peer.fqdn,
                        local = %format!("{} {}", pair.local_kind.as_str(), pair.local),
                        remote = %format!("{} {}", pair.remote_kind.as_str(), pair.remote),
                        "peer connected directly (ICE)"
                    );
                    let first = !st.direct;
                    st.direct = true;
                    st.ice_retry = ICE_FIRST_RETRY;
                    st.ice_retry_at = None;
                    let turn = (pair.local_kind == crate::ice::candidate::Kind::Relay)
                        .then(|| ice.turn.as_ref().map(|t| t.relay.clone()))
                        .flatten();
                    self.wg.set_direct_path(&st.peer.public_key, pair, turn);
                    if first && st.via.is_none() && self.is_controller(&peer) {
                        self.wg.initiate_handshake(&st.peer.public_key).await;
                    }
                }
                IceEvent::Lost { peer, reason } => {
                    let Some(st) = peers.get_mut(&peer) else {
                        continue;
                    };
                    if st.direct {
                        info!(peer = %st.peer.fqdn, reason, "direct path lost; back to the relay");
                        self.wg.clear_direct_path(&st.peer.public_key);
                        st.direct = false;
                        if st.via.is_none() {
                            st.next_offer = Instant::now();
                        }
                    }
                    // Try again later (unless the peer went idle or relay-only meanwhile).
                    if !st.idle && ice.wanted(&st.peer) && reason != "the peer is relay-only" {
                        st.ice_retry_at = Some(Instant::now() + st.ice_retry);
                        st.ice_retry = (st.ice_retry * 2).min(ICE_MAX_RETRY);
                    }
                }
            }
        }
    }

    async fn offer(
        &self,
        to: &str,
        kind: body::Type,
        peers: &HashMap<String, PeerState>,
        ice: Option<&mut Ice>,
    ) {
        let home = self.relays.home();
        // Our ICE credentials and session, or relay-only's empty ones.
        let (payload, session) = match (ice, peers.get(to)) {
            (Some(ice), Some(st)) if ice.wanted(&st.peer) => {
                let (payload, session) = ice.agents.local_offer(to);
                (payload, Some(session.0.to_vec()))
            }
            _ => (":".to_string(), None),
        };
        let body = Body {
            r#type: kind as i32,
            payload,
            session_id: session,
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
        mut ice: Option<&mut Ice>,
    ) {
        let Some(st) = peers.get_mut(&m.from) else {
            debug!(from = %m.from, "signal message from a peer not in the map");
            return;
        };
        let kind = body::Type::try_from(m.body.r#type).ok();
        if matches!(kind, Some(body::Type::Offer | body::Type::Answer)) {
            // An OFFER or ANSWER wakes an idle peer (GO_IDLE idles it; others are ignored).
            st.idle = false;
                        st.activity.1 = Instant::now();
        }
        let controller = self.is_controller(&m.from);
        let ice_wanted = ice.as_ref().is_some_and(|i| i.wanted(&st.peer));
        match kind {
            Some(body::Type::Offer | body::Type::Answer) => {
                if let Some(ice) = ice.as_deref_mut().filter(|_| ice_wanted) {
                    // Go gathers TURN relay candidates only where NetBird's relay is missing
                    // on either side.
                    let use_turn = self.relays.home().is_none()
                        || m.body
                            .relay_server_address
                            .as_deref()
                            .unwrap_or("")
                            .is_empty();
                    if use_turn {
                        ice.ensure_turn(&self.wg, cancel).await;
                    }
                    let now = Instant::now().into_std();
                    ice.agents.on_offer(
                        now,
                        &m.from,
                        &m.body.payload,
                        m.body.session_id.as_deref(),
                        controller,
                        use_turn,
                    );
                }
                if kind == Some(body::Type::Offer) {
                    // The ANSWER goes before our candidates (flushed after this message).
                    self.offer(&m.from, body::Type::Answer, peers, ice.as_deref_mut())
                        .await;
                }
            }
            Some(body::Type::Candidate) => {
                if let Some(ice) = ice.filter(|_| ice_wanted) {
                    let now = Instant::now().into_std();
                    ice.agents.on_candidate(now, &m.from, &m.body.payload);
                }
                return;
            }
            Some(body::Type::GoIdle) => {
                info!(peer = %st.peer.fqdn, "peer went idle; it is woken when there is traffic for it");
                st.reset();
                st.idle = true;
                st.direct = false;
                st.ice_retry_at = None;
                if let Some(ice) = ice {
                    ice.agents.close(&m.from, "the peer went idle");
                }
                self.wg.clear_peer_endpoint(&st.peer.public_key);
                return;
            }
            _ => return,
        }
        let Some(st) = peers.get_mut(&m.from) else {
            return;
        };
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
        if st.via.is_some() && st.relay_url.as_deref() != Some(url.as_str()) {
            // The controller moved to another relay: follow it.
            info!(peer = %st.peer.fqdn, relay = %url, "peer moved to another relay");
            st.reset();
        }
        if st.via.is_some() || st.connecting {
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

/// Take an idle peer out of idleness: it is offered to at once (the next tick).
fn wake(st: &mut PeerState) {
    st.idle = false;
    st.activity.1 = Instant::now();
    st.reset();
}

/// `key` woke or is up: wake the idle peers that serve a route with it, so a failover finds
/// the standby ready.
fn wake_mates(groups: &HaGroups, key: &str, peers: &mut HashMap<String, PeerState>) {
    for mate in groups.mates(key) {
        if let Some(st) = peers.get_mut(mate)
            && st.idle
        {
            info!(peer = %st.peer.fqdn, "setting up a peer that serves a route with one in use");
            wake(st);
        }
    }
}

/// Resolve STUN URIs (`stun:host:port`, port 3478 when absent) to addresses; ones that do not
/// resolve within 2 s are skipped (and logged). Runs when management's list changes.
async fn resolve_stuns(uris: &[String], cancel: &CancellationToken) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for uri in uris {
        let Some(target) = crate::ice::srflx::server_target(uri) else {
            debug!(%uri, "not a STUN URI; skipped");
            continue;
        };
        let lookup = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(target));
        let found = tokio::select! {
            _ = cancel.cancelled() => return out,
            r = lookup => r,
        };
        match found {
            Ok(Ok(addrs)) => {
                out.extend(addrs.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())))
            }
            Ok(Err(e)) => info!(%uri, "STUN server not resolved: {e}"),
            Err(_) => info!(%uri, "STUN server not resolved within 2 s"),
        }
    }
    out
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
