//! The process-wide hub: the current engine's view, listener counters and restarts, turned
//! into snapshots on demand.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;
use crate::control::envelope::key_string;
use crate::control::signal_client::SignalClient;
use crate::dns::MeshNames;
use crate::forward::ForwardCounters;
use crate::relay::client::RelayClient;
use crate::route::{GroupStatus, Target};
use crate::wg::WgDevice;
use crate::wg::device::{Peer, PeerEndpoint};

/// WireGuard drops a session this long after its handshake (REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// Process-wide status: the current engine's view, listener counters, restarts.
pub struct StatusHub {
    started: Instant,
    mode: Mode,
    ready_peers: usize,
    restarts: AtomicU64,
    engine: RwLock<Option<EngineView>>,
    listeners: Mutex<Vec<Arc<ListenerMetrics>>>,
}

impl std::fmt::Debug for StatusHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusHub")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The live parts of a running engine.
pub struct EngineView {
    pub wg: Arc<WgDevice>,
    pub mesh: Vec<IpNet>,
    pub fqdn: String,
    pub names: MeshNames,
    /// Routes and routing (NetBird mode only).
    pub routes: Option<RoutesView>,
    /// The netstack's gates' counters (policy drops, routed flows).
    pub gates: Option<Arc<crate::netstack::GateCounters>>,
    /// Management, signal and relays (NetBird mode only).
    pub control: Option<ControlView>,
}

/// The routes as status shows them; the engine writes, status reads. Defined here, beside
/// its reader, so status needs nothing from the engine.
#[derive(Clone, Debug, Default)]
pub struct RoutesView {
    /// Each HA group offered to us and its election.
    pub groups: Arc<RwLock<Vec<GroupStatus>>>,
    /// Routes this peer serves (NetID and target), empty when it routes nothing.
    pub serving: Arc<RwLock<Vec<(String, Target)>>>,
    /// The forwarder's counters.
    pub forward: Arc<ForwardCounters>,
}

/// The network map as the engine applied it: written after each update, read by status.
#[derive(Debug, Default)]
pub struct MapCounters {
    serial: AtomicU64,
    peers: AtomicU64,
    updates: AtomicU64,
    last_apply_us: AtomicU64,
}

impl MapCounters {
    /// An update was applied: its serial, the peers it left us with, and how long applying
    /// it took (parsing, diffing, WireGuard, names, policies).
    pub fn applied(&self, serial: u64, peers: usize, took: Duration) {
        self.serial.store(serial, Ordering::Relaxed);
        self.peers.store(peers as u64, Ordering::Relaxed);
        self.last_apply_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.updates.fetch_add(1, Ordering::Relaxed);
    }

    fn status(&self) -> MapStatus {
        MapStatus {
            serial: self.serial.load(Ordering::Relaxed),
            peers: self.peers.load(Ordering::Relaxed) as usize,
            updates: self.updates.load(Ordering::Relaxed),
            last_apply_ms: self.last_apply_us.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

/// The control plane of a NetBird engine.
pub struct ControlView {
    pub management_url: String,
    /// Whether the Sync stream is open (a network map has arrived on it).
    pub management_synced: Arc<AtomicBool>,
    /// The network map's size and cost.
    pub map: Arc<MapCounters>,
    /// Relay connections the engine made, home and foreign.
    pub relay_connections: Arc<AtomicU64>,
    pub signal: Arc<SignalClient>,
    /// The home relay as the relay manager publishes it (status only reads it).
    pub home_relay: tokio::sync::watch::Receiver<Option<Arc<RelayClient>>>,
}

impl StatusHub {
    /// A hub for a process in `mode` that calls itself ready with `ready_peers` connected peers.
    pub fn new(mode: Mode, ready_peers: usize) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            mode,
            ready_peers,
            restarts: AtomicU64::new(0),
            engine: RwLock::new(None),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// An engine is up.
    pub fn attach(&self, view: EngineView) {
        *self.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    /// The engine stopped.
    pub fn detach(&self) {
        *self.engine.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The supervisor built a new engine after the first.
    pub fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of the listener `kind` configured at `configured`, the same across engine
    /// restarts (a port-0 listener binds anew each time; `bound` is where it is now).
    pub fn listener(
        &self,
        kind: &'static str,
        configured: SocketAddr,
        bound: SocketAddr,
    ) -> Arc<ListenerMetrics> {
        let mut all = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = all
            .iter()
            .find(|l| l.kind == kind && l.configured == configured)
        {
            *l.bound.lock().unwrap_or_else(|e| e.into_inner()) = bound;
            return l.clone();
        }
        let l = Arc::new(ListenerMetrics::new(kind, configured, bound));
        all.push(l.clone());
        l
    }

    /// The counters of the Unix-socket listener of `kind` at `path` (the same ones across
    /// engine restarts).
    pub fn unix_listener(
        &self,
        kind: &'static str,
        path: &std::path::Path,
    ) -> Arc<ListenerMetrics> {
        let mut all = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = all
            .iter()
            .find(|l| l.kind == kind && l.unix_path.as_deref() == Some(path))
        {
            return l.clone();
        }
        let l = Arc::new(ListenerMetrics::new_unix(kind, path));
        all.push(l.clone());
        l
    }

    /// Everything, now.
    pub fn snapshot(&self) -> Snapshot {
        let engine = self.engine.read().unwrap_or_else(|e| e.into_inner());
        let mut snap = Snapshot {
            mode: self.mode,
            ready: false,
            reason: None,
            uptime_seconds: self.started.elapsed().as_secs(),
            engine_restarts: self.restarts.load(Ordering::Relaxed),
            ready_peers: self.ready_peers,
            local: None,
            management: None,
            signal: None,
            relay: None,
            peers: Vec::new(),
            listeners: self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|l| l.status())
                .collect(),
            ice: None,
            routes: Vec::new(),
            routing: None,
            map: None,
        };
        let Some(view) = engine.as_ref() else {
            snap.reason = Some("the engine is not running (starting or between retries)".into());
            return snap;
        };
        snap.local = Some(LocalStatus {
            addresses: view.mesh.iter().map(|n| n.to_string()).collect(),
            fqdn: view.fqdn.clone(),
            public_key: key_string(view.wg.public_key().as_bytes()),
            wireguard_port: view.wg.local_addr().map(|a| a.port()).unwrap_or(0),
        });
        if let Some(c) = &view.control {
            snap.ice = Some(IceCounts::of(&view.wg.ice));
            snap.management = Some(ServiceStatus {
                url: c.management_url.clone(),
                connected: c.management_synced.load(Ordering::Relaxed),
                sent: None,
                opened: None,
            });
            snap.map = Some(c.map.status());
            snap.signal = Some(ServiceStatus {
                url: String::new(),
                connected: c.signal.is_connected(),
                sent: Some(c.signal.messages_sent()),
                opened: None,
            });
            let home = c.home_relay.borrow().clone().filter(|r| !r.is_closed());
            snap.relay = Some(ServiceStatus {
                url: home
                    .as_ref()
                    .map(|r| r.instance_url().to_string())
                    .unwrap_or_default(),
                connected: home.is_some(),
                sent: None,
                opened: Some(c.relay_connections.load(Ordering::Relaxed)),
            });
        }
        let names = view.names.by_address();
        if let Some(r) = &view.routes {
            let (routes, routing) = routes_status(r, &view.wg, &view.gates, &names);
            snap.routes = routes;
            snap.routing = Some(routing);
        }
        snap.peers = view
            .wg
            .peers()
            .iter()
            .map(|p| peer_status(p, &names, self.mode))
            .collect();
        snap.peers
            .sort_by(|a, b| a.fqdn.cmp(&b.fqdn).then(a.ip.cmp(&b.ip)));
        let connected = snap
            .peers
            .iter()
            .filter(|p| p.status == "connected")
            .count();
        snap.reason = if snap.management.as_ref().is_some_and(|m| !m.connected) {
            Some("management has not sent a network map on an open Sync stream".into())
        } else if connected < self.ready_peers {
            Some(format!(
                "{connected} of the {} peer(s) needed have a recent handshake ({} known)",
                self.ready_peers,
                snap.peers.len()
            ))
        } else {
            None
        };
        snap.ready = snap.reason.is_none();
        snap
    }
}

/// The routes view as status shows it: peers by name where the map names them.
fn routes_status(
    r: &RoutesView,
    wg: &WgDevice,
    gates: &Option<Arc<crate::netstack::GateCounters>>,
    names: &HashMap<IpAddr, String>,
) -> (Vec<RouteStatus>, RoutingStatus) {
    let name_of = |key: &str| -> String {
        crate::control::envelope::parse_key_string(key)
            .ok()
            .and_then(|k| wg.peer(&k))
            .and_then(|p| {
                p.allowed_ips
                    .iter()
                    .find_map(|n| names.get(&n.addr()).cloned())
            })
            .unwrap_or_else(|| key.to_string())
    };
    let groups = r.groups.read().unwrap_or_else(|e| e.into_inner()).clone();
    let routes = groups
        .iter()
        .map(|g| RouteStatus {
            network: g.net_id.clone(),
            target: match &g.target {
                crate::route::Target::Network(n) => n.to_string(),
                crate::route::Target::Domains(d) => d.join(","),
            },
            exit_node: g.exit_node,
            selected: g.selected,
            peers: g.peers.iter().map(|k| name_of(k)).collect(),
            routing_peer: g.elected.as_deref().map(name_of),
        })
        .collect();
    let serving = r
        .serving
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(net_id, target)| match target {
            crate::route::Target::Network(n) => format!("{net_id} {n}"),
            crate::route::Target::Domains(d) => format!("{net_id} {}", d.join(",")),
        })
        .collect();
    let mut counters = BTreeMap::new();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    if let Some(g) = gates {
        counters.insert("denied_inbound".into(), get(&g.denied_inbound));
        counters.insert("denied_routed".into(), get(&g.denied_routed));
        counters.insert("not_routed".into(), get(&g.not_routed));
        counters.insert("routed_overflow".into(), get(&g.routed_overflow));
    }
    let f = &r.forward;
    for (name, v) in [
        ("tcp_opened", &f.tcp_opened),
        ("tcp_failed", &f.tcp_failed),
        ("tcp_active", &f.tcp_active),
        ("host_refused", &f.host_refused),
        ("udp_flows_opened", &f.udp_flows_opened),
        ("udp_flows_active", &f.udp_flows_active),
        ("udp_dropped", &f.udp_dropped),
        ("echo_answered", &f.echo_answered),
        ("echo_failed", &f.echo_failed),
    ] {
        counters.insert(name.into(), get(v));
    }
    (routes, RoutingStatus { serving, counters })
}

/// How a peer is doing, from WireGuard's point of view. A peer counts as connected when we can
/// reach it (a relay it is still on, or a UDP endpoint) and its session is alive (handshake
/// under 3 minutes old). NetBird peers keep each other alive (25 s), so there one that was not
/// heard from for three keepalive intervals plus 10 s has gone away; a static peer may well
/// keep quiet (a server whose config has no PersistentKeepalive), so silence alone does not
/// count against it.
fn peer_status(peer: &Peer, names: &HashMap<IpAddr, String>, mode: Mode) -> PeerStatus {
    let handshake = peer.time_since_handshake();
    let heard = peer.time_since_rx();
    let endpoint = peer.endpoint();
    let direct = peer.paths().direct;
    let through_turn = direct.is_some_and(|d| {
        use crate::ice::candidate::Kind::Relay;
        d.pair.local_kind == Relay || d.pair.remote_kind == Relay
    });
    // Through a relay, the relay also says when the peer left it.
    let reachable = match &endpoint {
        Some(PeerEndpoint::Relay(client, id)) => !client.is_closed() && client.is_online(id),
        Some(PeerEndpoint::Udp(_)) => true,
        Some(PeerEndpoint::Turn(relay, _)) => relay.is_usable(),
        None => false,
    };
    let alive = reachable
        && handshake.is_some_and(|h| h < SESSION_LIFETIME)
        && match peer.keepalive.filter(|&k| k > 0 && mode == Mode::Netbird) {
            Some(k) => heard.is_some_and(|h| h < Duration::from_secs(3 * u64::from(k) + 10)),
            None => true,
        };
    // A NetBird peer's first AllowedIPs entry is its own address; a static peer may route a
    // whole network, shown as such.
    let ip = peer
        .allowed_ips
        .first()
        .map(|n| {
            if n.prefix_len() == n.max_prefix_len() {
                n.addr().to_string()
            } else {
                n.to_string()
            }
        })
        .unwrap_or_default();
    let fqdn = peer
        .allowed_ips
        .first()
        .and_then(|n| names.get(&n.addr()).cloned())
        .unwrap_or_default();
    PeerStatus {
        fqdn,
        ip,
        public_key: key_string(peer.public_key.as_bytes()),
        status: if alive {
            "connected"
        } else if handshake.is_some() {
            "disconnected"
        } else {
            "connecting"
        }
        .into(),
        connection: match &endpoint {
            // An ICE pair with a TURN relay candidate at either end is relayed, as NetBird
            // counts it (ICETurn), even when we send straight to the remote's relay address.
            Some(PeerEndpoint::Udp(_)) if through_turn => "relayed",
            Some(PeerEndpoint::Udp(_)) => "direct",
            Some(PeerEndpoint::Relay(..) | PeerEndpoint::Turn(..)) => "relayed",
            None => "none",
        }
        .into(),
        endpoint: endpoint.map(|e| e.to_string()),
        last_handshake_seconds: handshake.map(|d| d.as_secs_f64()),
        rx_bytes: peer.counters.rx_bytes.load(Ordering::Relaxed),
        tx_bytes: peer.counters.tx_bytes.load(Ordering::Relaxed),
        latency_ms: peer.rtt.get().map(|d| d.as_secs_f64() * 1000.0),
        ice: direct.map(|d| IcePair {
            local_type: d.pair.local_kind.as_str().into(),
            local: d.pair.local.to_string(),
            remote_type: d.pair.remote_kind.as_str().into(),
            remote: d.pair.remote.to_string(),
            latency_ms: d.rtt.map(|r| r.as_secs_f64() * 1000.0),
        }),
    }
}

impl IceCounts {
    fn of(c: &crate::ice::IceCounters) -> Self {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let dropped = [
            ("candidate_malformed", get(&c.candidates_malformed)),
            ("candidate_refused", get(&c.candidates_refused)),
            ("credentials_malformed", get(&c.credentials_malformed)),
            ("stun_malformed", get(&c.stun_malformed)),
            ("stun_unmatched", get(&c.stun_unmatched)),
            ("stun_queue_full", get(&c.stun_queue_full)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            agents_started: get(&c.agents_started),
            pairs_selected: get(&c.pairs_selected),
            paths_lost: get(&c.paths_lost),
            dropped,
        }
    }
}

/// UDP relaying counters of one listener.
#[derive(Debug, Default)]
pub struct UdpCounters {
    open: AtomicI64,
    opened: AtomicU64,
    datagrams_to_target: AtomicU64,
    bytes_to_target: AtomicU64,
    datagrams_to_client: AtomicU64,
    bytes_to_client: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
}

impl UdpCounters {
    /// An association or flow is open until the guard drops.
    pub fn open(self: &Arc<Self>) -> UdpOpen {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        UdpOpen(self.clone())
    }

    /// One datagram of `len` payload bytes relayed towards its target.
    pub fn to_target(&self, len: usize) {
        self.datagrams_to_target.fetch_add(1, Ordering::Relaxed);
        self.bytes_to_target
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    /// One datagram of `len` payload bytes relayed back to the client.
    pub fn to_client(&self, len: usize) {
        self.datagrams_to_client.fetch_add(1, Ordering::Relaxed);
        self.bytes_to_client
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    /// One datagram dropped for `reason`.
    pub fn drop_one(&self, reason: &'static str) {
        self.drop_many(reason, 1);
    }

    /// `n` datagrams dropped for `reason`.
    pub fn drop_many(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        *self
            .dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += n;
    }

    fn status(&self) -> Option<UdpStatus> {
        let opened = self.opened.load(Ordering::Relaxed);
        let dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        if opened == 0 && dropped.is_empty() {
            return None;
        }
        Some(UdpStatus {
            open: self.open.load(Ordering::Relaxed),
            opened,
            datagrams_to_target: self.datagrams_to_target.load(Ordering::Relaxed),
            bytes_to_target: self.bytes_to_target.load(Ordering::Relaxed),
            datagrams_to_client: self.datagrams_to_client.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
            dropped: dropped.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        })
    }
}

/// Keeps a UDP association or flow counted as open.
pub struct UdpOpen(Arc<UdpCounters>);

impl Drop for UdpOpen {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerMetrics {
    pub kind: &'static str,
    configured: SocketAddr,
    bound: Mutex<SocketAddr>,
    open: AtomicI64,
    /// The listener's connection cap (0: none set).
    max: AtomicU64,
    results: Mutex<BTreeMap<String, u64>>,
    idle_closed: AtomicU64,
    /// UDP relaying through this listener.
    pub udp: Arc<UdpCounters>,
    /// A Unix-socket listener's path (its address in /status and /metrics).
    unix_path: Option<std::path::PathBuf>,
}

impl ListenerMetrics {
    /// Counters not registered anywhere (for listeners run without a hub).
    pub fn new(kind: &'static str, configured: SocketAddr, bound: SocketAddr) -> Self {
        Self {
            kind,
            configured,
            bound: Mutex::new(bound),
            max: AtomicU64::new(0),
            open: AtomicI64::new(0),
            results: Mutex::new(BTreeMap::new()),
            idle_closed: AtomicU64::new(0),
            udp: Arc::default(),
            unix_path: None,
        }
    }

    /// Counters of a Unix-socket listener at `path`, not registered anywhere.
    pub fn new_unix(kind: &'static str, path: &std::path::Path) -> Self {
        let none = SocketAddr::from(([0, 0, 0, 0], 0));
        Self {
            unix_path: Some(path.to_path_buf()),
            ..Self::new(kind, none, none)
        }
    }

    /// The listener's connection cap, for /status and /metrics.
    pub fn set_max_connections(&self, max: usize) {
        self.max.store(max as u64, Ordering::Relaxed);
    }

    /// The listener's address as /status shows it (`unix:PATH` for a Unix socket).
    pub fn address(&self) -> String {
        match &self.unix_path {
            Some(p) => format!("unix:{}", p.display()),
            None => self
                .bound
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .to_string(),
        }
    }

    /// Count one request that ended in `result`.
    pub fn count(&self, result: &str) {
        let mut r = self.results.lock().unwrap_or_else(|e| e.into_inner());
        match r.get_mut(result) {
            Some(n) => *n += 1,
            None => {
                r.insert(result.to_string(), 1);
            }
        }
    }

    /// Count one client connection closed for idleness.
    pub fn count_idle_close(&self) {
        self.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection is open until the guard drops.
    pub fn open(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    fn status(&self) -> ListenerStatus {
        ListenerStatus {
            kind: self.kind.to_string(),
            addr: self.address(),
            open_connections: self.open.load(Ordering::Relaxed),
            max_connections: self.max.load(Ordering::Relaxed),
            requests: self
                .results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            idle_closed: self.idle_closed.load(Ordering::Relaxed),
            udp: self.udp.status(),
        }
    }
}

/// Keeps a listener's open-connection gauge up while a client is connected.
pub struct OpenConnection(Arc<ListenerMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
