//! The WireGuard device: one UDP socket, one boringtun `Tunn` per peer, three tasks.
//!
//! * `rx` reads datagrams, finds the peer (by receiver index, or by decrypting the static key of a
//!   handshake initiation), decapsulates, checks the inner source against that peer's AllowedIPs,
//!   and hands the IP packet to the netstack through a bounded channel (awaiting when it is full,
//!   so a busy netstack pushes back on the socket instead of losing packets in a queue).
//! * `tx` takes IP packets from the netstack, routes them by destination, encapsulates and sends.
//! * `timers` drives boringtun's handshake retries, keepalives and rekeys every 250 ms.
//!
//! Each `Tunn` sits behind its own mutex, held only for the crypto call; socket I/O happens
//! outside it. Endpoint roaming: every authenticated datagram moves the peer's endpoint to the
//! address it came from.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use quinn_udp::RecvMeta;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use super::router::AllowedIps;
use super::rtt::HandshakeRtt;
use super::udp::{BatchSocket, RECV_BATCH, gso_groups};
use crate::ice::turn::{TurnIn, TurnRelay};
use crate::ice::wire::{Datagram, classify};
use crate::packet::PacketPool;
use crate::relay::client::{RelayClient, Relayed};
use crate::relay::messages::PeerId;

/// Largest datagram we accept from the underlay, and so each receive buffer's size (a GRO
/// batch fits in it too).
const MAX_DATAGRAM: usize = 65_535;
/// IP packets taken from the netstack, encrypted and sent per wake-up of the tx loop.
const TX_BATCH: usize = 64;
/// A handshake initiation is the largest message boringtun writes outside the data path.
const HANDSHAKE_INIT_LEN: usize = 148;
/// WireGuard's per-packet overhead (header + tag).
const DATA_OVERHEAD: usize = 32;
/// How often boringtun's timers run.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Kernel socket buffers: large enough to absorb bursts at Gbit/s rates.
const SOCKET_BUFFER: usize = 4 << 20;
/// Handshake messages per second accepted before the rate limiter asks for cookies. Each
/// message is counted twice (our pre-check in `rx_loop`, then `Tunn::decapsulate`, whose verified
/// entry point is private to boringtun), so this allows about 100 handshakes per second.
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// WireGuard message type and size of a cookie reply.
const COOKIE_REPLY_TYPE: u8 = 3;
const COOKIE_REPLY_LEN: usize = 64;

/// Where a peer's datagrams go: a UDP address, a peer ID on a relay connection, or a peer
/// address through our TURN allocation (an ICE pair on our relay candidate).
#[derive(Clone, Debug)]
pub enum PeerEndpoint {
    Udp(SocketAddr),
    Relay(Arc<RelayClient>, PeerId),
    Turn(Arc<TurnRelay>, SocketAddr),
}

impl PartialEq for PeerEndpoint {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PeerEndpoint::Udp(a), PeerEndpoint::Udp(b)) => a == b,
            (PeerEndpoint::Relay(a, x), PeerEndpoint::Relay(b, y)) => Arc::ptr_eq(a, b) && x == y,
            (PeerEndpoint::Turn(a, x), PeerEndpoint::Turn(b, y)) => Arc::ptr_eq(a, b) && x == y,
            _ => false,
        }
    }
}

impl std::fmt::Display for PeerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEndpoint::Udp(a) => write!(f, "{a}"),
            PeerEndpoint::Relay(c, _) => write!(f, "relay {}", c.instance_url()),
            PeerEndpoint::Turn(t, peer) => write!(f, "turn {} to {peer}", t.server()),
        }
    }
}

impl PeerEndpoint {
    /// Whether datagrams can go there: not through a relay connection that has ended.
    pub fn is_usable(&self) -> bool {
        match self {
            PeerEndpoint::Udp(_) => true,
            PeerEndpoint::Relay(c, _) => !c.is_closed(),
            PeerEndpoint::Turn(t, _) => t.is_usable(),
        }
    }

    /// The address the rate limiter keys cookies on (none through a relay).
    fn ip(&self) -> Option<IpAddr> {
        match self {
            PeerEndpoint::Udp(a) => Some(a.ip()),
            PeerEndpoint::Relay(..) | PeerEndpoint::Turn(..) => None,
        }
    }
}

/// A peer as configured.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Per-peer traffic counters.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Inbound packets whose inner source lies outside this peer's AllowedIPs.
    pub rx_spoofed: AtomicU64,
    /// When the peer last sent an authenticated packet (handshake, data or keepalive), as
    /// milliseconds on `monotonic_ms`'s clock plus one; 0 for never. Status reads it to tell a
    /// peer that went away from one that is merely quiet.
    pub last_rx_ms: AtomicU64,
}

/// Time since the first call, on a monotonic clock.
fn monotonic() -> Duration {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed()
}

fn monotonic_ms() -> u64 {
    monotonic().as_millis() as u64
}

fn monotonic_us() -> u64 {
    monotonic().as_micros() as u64
}

/// One WireGuard peer.
pub struct Peer {
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    pub counters: PeerCounters,
    /// Our persistent keepalive towards this peer, in seconds.
    pub keepalive: Option<u16>,
    /// Round trip of the latest handshake.
    pub rtt: HandshakeRtt,
    tunn: Mutex<LazyTunn>,
    endpoint: RwLock<Option<PeerEndpoint>>,
    /// The paths negotiation found: the relay connection and the ICE pair. Direct wins; the
    /// relay stays as the fallback (netbird-protocol.md §7.3).
    paths: RwLock<Paths>,
    /// The remote went idle (GO_IDLE): no path on purpose, woken by traffic.
    idle: std::sync::atomic::AtomicBool,
    /// Prefixes routed through this peer besides its own AllowedIPs (NetBird routes elected to
    /// it, an exit node's default route): set by `WgDevice::set_routed`.
    routed: RwLock<Vec<IpNet>>,
}

/// The paths a mesh peer has besides roaming.
#[derive(Clone, Debug, Default)]
pub struct Paths {
    pub relay: Option<PeerEndpoint>,
    pub direct: Option<DirectPath>,
}

/// An ICE pair in use, for status.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirectPath {
    pub pair: crate::ice::Selected,
    /// Round trip of the pair's latest connectivity check.
    pub rtt: Option<Duration>,
}

impl Peer {
    /// The underlay address packets go to (updated by roaming).
    pub fn endpoint(&self) -> Option<PeerEndpoint> {
        self.endpoint
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_endpoint(&self, to: &PeerEndpoint) {
        if self.endpoint().as_ref() != Some(to) {
            debug!(peer = %short_key(&self.public_key), endpoint = %to, "peer endpoint");
            *self.endpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(to.clone());
        }
    }

    /// WireGuard roaming: an authenticated datagram from `src` moves the endpoint there —
    /// except one through a relay while an ICE pair is in use (the remote may still send on
    /// the relay while it switches; direct wins).
    fn roam(&self, src: &PeerEndpoint) {
        // Per relayed datagram: look at the direct path under the read lock, no clone.
        if matches!(src, PeerEndpoint::Relay(..))
            && self
                .paths
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .direct
                .is_some()
        {
            return;
        }
        self.set_endpoint(src);
    }

    /// The relay and ICE paths negotiation set up.
    pub fn paths(&self) -> Paths {
        self.paths.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update_paths(&self, f: impl FnOnce(&mut Paths)) -> Paths {
        let mut paths = self.paths.write().unwrap_or_else(|e| e.into_inner());
        f(&mut paths);
        paths.clone()
    }

    /// Whether the remote said it went idle and no path was set up since.
    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// Time since the peer last sent us an authenticated packet, if it ever did.
    pub fn time_since_rx(&self) -> Option<Duration> {
        let at = self.counters.last_rx_ms.load(Ordering::Relaxed);
        (at != 0).then(|| Duration::from_millis(monotonic_ms().saturating_sub(at - 1)))
    }

    fn mark_rx(&self) {
        self.counters
            .last_rx_ms
            .store(monotonic_ms() + 1, Ordering::Relaxed);
    }

    /// Time since the last completed handshake, if there was one.
    pub fn time_since_handshake(&self) -> Option<Duration> {
        self.peek_tunn(|t| t.stats().0).flatten()
    }

    /// The peer's noise state, made on first use (see `LazyTunn`).
    fn lock_tunn(&self) -> TunnGuard<'_> {
        let mut guard = self.tunn.lock().unwrap_or_else(|e| e.into_inner());
        if guard.made.is_none()
            && let Some(r) = guard.recipe.take()
        {
            guard.made = Some(Box::new(Tunn::new(
                r.private_key,
                r.peer,
                r.preshared_key,
                r.keepalive,
                r.index,
                Some(r.rate_limiter),
            )));
        }
        TunnGuard(guard)
    }

    /// `f` on the noise state if it was made; None for a peer never used.
    fn peek_tunn<R>(&self, f: impl FnOnce(&mut Tunn) -> R) -> Option<R> {
        let mut guard = self.tunn.lock().unwrap_or_else(|e| e.into_inner());
        guard.made.as_deref_mut().map(f)
    }

    fn allows_source(&self, ip: IpAddr) -> bool {
        self.allowed_ips.iter().any(|n| n.contains(&ip))
    }

    fn routed_contains(&self, ip: IpAddr) -> bool {
        self.routed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| n.contains(&ip))
    }

    /// The routed prefixes this peer carries now.
    pub fn routed(&self) -> Vec<IpNet> {
        self.routed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Device-wide counters of packets that could not be delivered.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Datagrams that matched no peer or failed to parse.
    pub rx_unknown: AtomicU64,
    /// Outbound packets whose destination is in no peer's AllowedIPs.
    pub tx_no_route: AtomicU64,
    /// Outbound packets for a peer with no known endpoint.
    pub tx_no_endpoint: AtomicU64,
    /// Datagrams too large for a packet buffer (a peer whose MTU exceeds ours).
    pub rx_oversized: AtomicU64,
    /// Datagrams the socket refused to send.
    pub tx_errors: AtomicU64,
}

/// The peers and the routes to them; replaced under a write lock when the mesh changes.
#[derive(Default)]
struct PeerTable {
    /// By our local index (the value boringtun puts in `receiver_idx >> 8`).
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<[u8; 32], u32>,
    routes: AllowedIps,
    next_index: u32,
    /// Routed prefixes by peer key (`WgDevice::set_routed`); kept for a peer re-created or
    /// added later.
    routed: HashMap<[u8; 32], Vec<IpNet>>,
}

impl PeerTable {
    /// A free 24-bit index, never 0 (a zeroed field must match nothing).
    fn allocate_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index % 0x00ff_ffff) + 1;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }
}

/// A peer's boringtun state, made the first time it is needed (a packet to or from the
/// peer, a handshake): `Tunn::new` does an X25519 exchange and holds session buffers.
///
/// Boxed: a `Tunn` holds its sessions' replay windows inline (about 11 KiB), so an unboxed
/// `Option<Tunn>` made every peer that large whether or not it was ever used (5 000 idle
/// peers: 56 MiB).
struct LazyTunn {
    made: Option<Box<Tunn>>,
    recipe: Option<TunnRecipe>,
}

/// What `Tunn::new` takes.
struct TunnRecipe {
    private_key: StaticSecret,
    peer: PublicKey,
    preshared_key: Option<[u8; 32]>,
    keepalive: Option<u16>,
    index: u32,
    rate_limiter: Arc<RateLimiter>,
}

/// The peer's `Tunn`, locked (see `Peer::lock_tunn`).
struct TunnGuard<'a>(std::sync::MutexGuard<'a, LazyTunn>);

impl std::ops::Deref for TunnGuard<'_> {
    type Target = Tunn;
    fn deref(&self) -> &Tunn {
        // lock_tunn makes it before handing out the guard.
        self.0.made.as_ref().expect("made by lock_tunn")
    }
}

impl std::ops::DerefMut for TunnGuard<'_> {
    fn deref_mut(&mut self) -> &mut Tunn {
        self.0.made.as_mut().expect("made by lock_tunn")
    }
}

/// The WireGuard device.
pub struct WgDevice {
    socket: BatchSocket,
    socket_is_v6: bool,
    /// The socket's port (STUN's destination address is our IP with it).
    port: u16,
    private_key: StaticSecret,
    public_key: PublicKey,
    table: RwLock<PeerTable>,
    rate_limiter: Arc<RateLimiter>,
    pool: Arc<PacketPool>,
    pub counters: DeviceCounters,
    /// Told the public key of a peer that has traffic but no endpoint (an idle mesh peer to
    /// wake); a hint, so a full channel drops it.
    wanted: std::sync::OnceLock<mpsc::Sender<[u8; 32]>>,
    /// Where STUN datagrams from the socket go (the negotiator's ICE agents); unset without
    /// ICE, and then they are dropped as unknown.
    stun: std::sync::OnceLock<mpsc::Sender<StunIn>>,
    /// ICE's counters: dropped input by reason, pairs selected, paths lost.
    pub ice: Arc<crate::ice::IceCounters>,
    /// WireGuard datagrams that came through our TURN allocation (its task sends them here).
    turn_tx: mpsc::Sender<TurnIn>,
    turn_rx: Mutex<Option<mpsc::Receiver<TurnIn>>>,
}

/// Datagrams from the TURN allocation queued for the rx loop; beyond it they are dropped.
const TURN_QUEUE: usize = 1024;

/// A STUN datagram from the WireGuard socket.
#[derive(Debug)]
pub struct StunIn {
    pub from: SocketAddr,
    /// Our address it arrived at (IP_PKTINFO), with the socket's port.
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// STUN datagrams queued for the ICE agents; beyond it they are dropped and counted.
pub const STUN_QUEUE: usize = 256;

impl WgDevice {
    /// Bind the UDP socket (`listen_port` 0 = any) and set up the peers.
    pub fn new(
        private_key: [u8; 32],
        listen_port: u16,
        peers: Vec<PeerSpec>,
        pool: Arc<PacketPool>,
    ) -> io::Result<Self> {
        let (socket, socket_is_v6) = bind_udp(listen_port)?;
        let socket = BatchSocket::new(socket)?;
        let port = socket.socket().local_addr()?.port();
        let private_key = StaticSecret::from(private_key);
        let public_key = PublicKey::from(&private_key);
        let rate_limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));
        let (turn_tx, turn_rx) = mpsc::channel(TURN_QUEUE);
        let device = Self {
            socket,
            socket_is_v6,
            port,
            private_key,
            public_key,
            table: RwLock::new(PeerTable::default()),
            rate_limiter,
            pool,
            counters: DeviceCounters::default(),
            wanted: std::sync::OnceLock::new(),
            stun: std::sync::OnceLock::new(),
            ice: Arc::default(),
            turn_tx,
            turn_rx: Mutex::new(Some(turn_rx)),
        };
        for spec in peers {
            device.add_peer(spec);
        }
        Ok(device)
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, PeerTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a peer, replacing any peer with the same public key (its session and counters
    /// start afresh). Its AllowedIPs take over those prefixes from other peers.
    pub fn add_peer(&self, spec: PeerSpec) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        remove_locked(&mut table, &spec.public_key);
        let index = table.allocate_index();
        for net in &spec.allowed_ips {
            table.routes.insert(*net, index as usize);
        }
        let routed = table
            .routed
            .get(&spec.public_key)
            .cloned()
            .unwrap_or_default();
        for net in &routed {
            // A routed prefix never takes another peer's own prefix (an address a DNS route
            // learned may be a peer's overlay address).
            if !table.routes.has_exact(*net) {
                table.routes.insert(*net, index as usize);
            }
        }
        table.by_key.insert(spec.public_key, index);
        // Made on first use: a map of thousands of peers, most never used, costs no X25519
        // exchange and no session state for those (the largest part of a big map's cost).
        let tunn = LazyTunn {
            made: None,
            recipe: Some(TunnRecipe {
                private_key: self.private_key.clone(),
                peer: PublicKey::from(spec.public_key),
                preshared_key: spec.preshared_key,
                keepalive: spec.persistent_keepalive,
                index,
                rate_limiter: self.rate_limiter.clone(),
            }),
        };
        let peer = Arc::new(Peer {
            public_key: PublicKey::from(spec.public_key),
            allowed_ips: spec.allowed_ips,
            counters: PeerCounters::default(),
            keepalive: spec.persistent_keepalive,
            rtt: HandshakeRtt::default(),
            tunn: Mutex::new(tunn),
            endpoint: RwLock::new(spec.endpoint.map(|a| PeerEndpoint::Udp(canonical(a)))),
            paths: RwLock::default(),
            idle: Default::default(),
            routed: RwLock::new(routed),
        });
        table.by_index.insert(index, peer);
    }

    /// Route these prefixes through these peers (every routed prefix at once, replacing the
    /// last call's), as NetBird's client adds a route's prefix to the AllowedIPs of the peer it
    /// elected. A peer's own AllowedIPs stay; a key not (yet) in the table gets its prefixes
    /// when it is added.
    pub fn set_routed(&self, routed: HashMap<[u8; 32], Vec<IpNet>>) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::take(&mut table.routed);
        for (key, nets) in &old {
            if let Some(&index) = table.by_key.get(key) {
                let own = table
                    .by_index
                    .get(&index)
                    .map(|p| p.allowed_ips.clone())
                    .unwrap_or_default();
                for net in nets.iter().filter(|n| !own.contains(n)) {
                    table.routes.remove(*net, index as usize);
                }
            }
        }
        for (key, nets) in &routed {
            if let Some(&index) = table.by_key.get(key) {
                for net in nets {
                    // The old routed entries are gone: an exact entry left is a peer's own
                    // prefix, which a route never takes over.
                    if !table.routes.has_exact(*net) {
                        table.routes.insert(*net, index as usize);
                    }
                }
            }
        }
        for peer in table.by_index.values() {
            let key = peer.public_key.to_bytes();
            let nets = routed.get(&key).cloned().unwrap_or_default();
            *peer.routed.write().unwrap_or_else(|e| e.into_inner()) = nets;
        }
        table.routed = routed;
    }

    /// Whether `peer` may send packets from `ip`: its own AllowedIPs, or a routed prefix
    /// through which WireGuard would send to `ip` via this very peer (cryptokey routing: an
    /// exit node's 0.0.0.0/0 does not let it speak for another peer's more specific address).
    fn source_allowed(&self, peer: &Peer, ip: IpAddr) -> bool {
        peer.allows_source(ip)
            || (peer.routed_contains(ip)
                && self
                    .route(ip)
                    .is_some_and(|p| std::ptr::eq(Arc::as_ptr(&p), peer)))
    }

    /// The peer with this public key.
    pub fn peer(&self, public_key: &[u8; 32]) -> Option<Arc<Peer>> {
        let table = self.table();
        let index = table.by_key.get(public_key)?;
        table.by_index.get(index).cloned()
    }

    /// Remove the peer with this public key; returns whether there was one.
    pub fn remove_peer(&self, public_key: &[u8; 32]) -> bool {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        remove_locked(&mut table, public_key)
    }

    /// Our public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.socket().local_addr()
    }

    /// A snapshot of the peers.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.table().by_index.values().cloned().collect()
    }

    /// The peer whose AllowedIPs contain `ip`.
    pub fn route(&self, ip: IpAddr) -> Option<Arc<Peer>> {
        let table = self.table();
        let index = table.routes.lookup(ip)? as u32;
        table.by_index.get(&index).cloned()
    }

    /// Run the device until `cancel` fires. `to_stack` receives decrypted IP packets;
    /// `from_stack` supplies IP packets to encrypt.
    pub async fn run(
        self: Arc<Self>,
        to_stack: mpsc::Sender<Vec<u8>>,
        from_stack: mpsc::Receiver<Vec<u8>>,
        relayed: mpsc::Receiver<Relayed>,
        cancel: CancellationToken,
    ) {
        self.initiate_handshakes().await;
        let rx = self.clone().rx_loop(to_stack, relayed);
        let tx = self.clone().tx_loop(from_stack);
        let timers = self.clone().timer_loop();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = rx => debug!("wireguard rx loop ended"),
            _ = tx => debug!("wireguard tx loop ended"),
            _ = timers => {}
        }
    }

    /// Start a handshake with every peer we know how to reach, so the first connection does not
    /// wait for one.
    async fn initiate_handshakes(&self) {
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        for peer in self.peers() {
            let Some(endpoint) = peer.endpoint() else {
                continue;
            };
            let len = match peer
                .lock_tunn()
                .format_handshake_initiation(&mut buf, false)
            {
                TunnResult::WriteToNetwork(b) => b.len(),
                _ => continue,
            };
            peer.rtt.on_sent(&buf[..len], monotonic_us);
            self.send_datagram(&buf[..len], &endpoint).await;
        }
    }

    /// Receive in batches (recvmmsg, GRO) from the socket, and datagrams from the relays.
    async fn rx_loop(
        self: Arc<Self>,
        to_stack: mpsc::Sender<Vec<u8>>,
        mut relayed: mpsc::Receiver<Relayed>,
    ) {
        let mut storage = vec![0u8; MAX_DATAGRAM * RECV_BATCH];
        let mut meta = [RecvMeta::default(); RECV_BATCH];
        let mut relay_open = true;
        // Relayed datagrams are taken as many as are queued per wake-up, as the socket's are.
        let mut from_relays = Vec::with_capacity(RECV_BATCH);
        let mut from_turn = self
            .turn_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        loop {
            let mut slots = storage.chunks_mut(MAX_DATAGRAM);
            let mut bufs: [IoSliceMut; RECV_BATCH] =
                std::array::from_fn(|_| IoSliceMut::new(slots.next().unwrap_or_default()));
            tokio::select! {
                r = self.socket.recv(&mut bufs, &mut meta) => match r {
                    Ok(n) => {
                        for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                            let src = PeerEndpoint::Udp(canonical(m.addr));
                            for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                                match classify(datagram) {
                                    Datagram::WireGuard => {}
                                    Datagram::Stun => {
                                        self.to_ice(datagram, m);
                                        continue;
                                    }
                                    // The "nb" punch of Go peers, and junk.
                                    Datagram::Other => {
                                        self.counters.rx_unknown.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    }
                                }
                                if !self.receive(datagram, &src, &to_stack).await {
                                    return;
                                }
                            }
                        }
                    }
                    // ICMP errors from earlier sends surface here on some systems.
                    Err(e) => trace!("udp recv: {e}"),
                },
                Some(m) = async {
                    match from_turn.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let src = PeerEndpoint::Turn(m.relay, m.from);
                    if !self.receive(&m.data, &src, &to_stack).await {
                        return;
                    }
                }
                n = relayed.recv_many(&mut from_relays, RECV_BATCH), if relay_open => {
                    if n == 0 {
                        relay_open = false;
                    }
                    // A run from one peer through one relay shares its endpoint.
                    let mut previous: Option<PeerEndpoint> = None;
                    for m in from_relays.drain(..) {
                        let src = match previous.take() {
                            Some(PeerEndpoint::Relay(c, p))
                                if Arc::ptr_eq(&c, &m.client) && p == m.from =>
                            {
                                PeerEndpoint::Relay(c, p)
                            }
                            _ => PeerEndpoint::Relay(m.client.clone(), m.from),
                        };
                        if !self.receive(&m.data, &src, &to_stack).await {
                            return;
                        }
                        previous = Some(src);
                    }
                }
            }
        }
    }

    /// Hand a STUN datagram to the ICE agents (dropped and counted when they lag).
    fn to_ice(&self, data: &[u8], meta: &RecvMeta) {
        let Some(stun) = self.stun.get() else {
            self.counters.rx_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let port = self.port;
        let to = match meta.dst_ip {
            Some(ip) => SocketAddr::new(ip.to_canonical(), port),
            None => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
        };
        let message = StunIn {
            from: canonical(meta.addr),
            to,
            data: data.to_vec(),
        };
        if stun.try_send(message).is_err() {
            self.ice.stun_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Where the TURN allocation's task hands WireGuard datagrams.
    pub fn turn_inbox(&self) -> mpsc::Sender<TurnIn> {
        self.turn_tx.clone()
    }

    /// Where STUN datagrams go (set once, by the engine, when ICE runs).
    pub fn report_stun(&self, to: mpsc::Sender<StunIn>) {
        let _ = self.stun.set(to);
    }

    /// Send a STUN datagram from the WireGuard socket (never blocks: a full socket drops it,
    /// and ICE retransmits). Overlay destinations are the caller's to refuse.
    pub fn send_stun(&self, to: SocketAddr, data: &[u8]) {
        if let Err(e) = self.socket.socket().try_send_to(data, self.wire_addr(to)) {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            trace!(%to, "stun send: {e}");
        }
    }

    /// One datagram from `src`: checked, decrypted and handed to the netstack. False once the
    /// netstack is gone.
    async fn receive(
        &self,
        data: &[u8],
        src: &PeerEndpoint,
        to_stack: &mpsc::Sender<Vec<u8>>,
    ) -> bool {
        // Handshake messages pass mac1 and, under load, the cookie check before any costly
        // work (recovering the sender's key) and before they can move an endpoint.
        if matches!(data.first(), Some(1 | 2)) {
            let mut cookie = [0u8; COOKIE_REPLY_LEN];
            match self.rate_limiter.verify_packet(src.ip(), data, &mut cookie) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(reply)) => {
                    self.try_send(reply, src);
                    return true;
                }
                Err(_) => {
                    self.counters.rx_unknown.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            }
        }
        let Some(peer) = self.peer_for_datagram(data) else {
            self.counters.rx_unknown.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        match self.decapsulate(&peer, src, data) {
            Some(pkt) => to_stack.send(pkt).await.is_ok(),
            None => true,
        }
    }

    /// Which peer a datagram belongs to: by our receiver index for responses, cookies and data;
    /// by the sender's static key (recovered from the initiation) for initiations.
    fn peer_for_datagram(&self, data: &[u8]) -> Option<Arc<Peer>> {
        let table = self.table();
        let by_index = |receiver_idx: u32| table.by_index.get(&(receiver_idx >> 8)).cloned();
        match Tunn::parse_incoming_packet(data).ok()? {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.private_key, &self.public_key, &init).ok()?;
                let index = table.by_key.get(&half.peer_static_public)?;
                table.by_index.get(index).cloned()
            }
            Packet::HandshakeResponse(p) => by_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => by_index(p.receiver_idx),
            Packet::PacketData(p) => by_index(p.receiver_idx),
        }
    }

    /// Decrypt one datagram for peer `idx`; returns an IP packet for the netstack, if any.
    /// Handshake replies and packets queued during the handshake are sent from here.
    fn decapsulate(&self, peer: &Peer, src: &PeerEndpoint, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() > self.pool.buf_size() {
            self.counters.rx_oversized.fetch_add(1, Ordering::Relaxed);
            trace!(
                len = data.len(),
                "dropped datagram larger than the packet buffers"
            );
            return None;
        }
        let mut out = self.pool.get();
        let mut deliver = None;
        let mut tunn = peer.lock_tunn();
        match tunn.decapsulate(src.ip(), data, &mut out) {
            // A cookie reply answers an unverified sender: it moves nothing.
            TunnResult::WriteToNetwork(reply) if reply.first() == Some(&COOKIE_REPLY_TYPE) => {
                self.try_send(reply, src);
            }
            TunnResult::WriteToNetwork(reply) => {
                peer.mark_rx();
                peer.rtt.on_received(data, monotonic_us);
                self.try_send(reply, src);
                peer.rtt.on_sent(reply, monotonic_us);
                // A completed handshake releases packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], &mut out)
                {
                    self.try_send(queued, src);
                    // Sending a queued packet may need a new session (an initiation).
                    peer.rtt.on_sent(queued, monotonic_us);
                }
                peer.roam(src);
            }
            TunnResult::WriteToTunnelV4(pkt, from) => {
                peer.mark_rx();
                peer.rtt.on_received(data, monotonic_us);
                deliver = Some((pkt.len(), IpAddr::V4(from)));
            }
            TunnResult::WriteToTunnelV6(pkt, from) => {
                peer.mark_rx();
                peer.rtt.on_received(data, monotonic_us);
                deliver = Some((pkt.len(), IpAddr::V6(from)));
            }
            TunnResult::Done => {
                peer.mark_rx();
                peer.rtt.on_received(data, monotonic_us);
                peer.roam(src);
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {}
            TunnResult::Err(e) => {
                trace!(peer = %short_key(&peer.public_key), "decapsulate: {e:?}");
            }
        }
        drop(tunn);
        let Some((len, from)) = deliver else {
            self.pool.put(out);
            return None;
        };
        peer.roam(src);
        if !self.source_allowed(peer, from) {
            peer.counters.rx_spoofed.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %short_key(&peer.public_key), %from, "dropped packet: source outside AllowedIPs");
            self.pool.put(out);
            return None;
        }
        peer.counters
            .rx_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        out.truncate(len);
        Some(out)
    }

    /// Take what the netstack has queued (up to `TX_BATCH` packets), encrypt it back to back
    /// into one buffer and send it: runs of same-size datagrams to one address in one GSO
    /// call each, relayed ones into their relay's queue.
    async fn tx_loop(self: Arc<Self>, mut from_stack: mpsc::Receiver<Vec<u8>>) {
        let slot = self.pool.buf_size() + DATA_OVERHEAD + HANDSHAKE_INIT_LEN;
        let mut out = vec![0u8; slot * TX_BATCH];
        let mut packets = Vec::with_capacity(TX_BATCH);
        // (offset in `out`, length, destination) of each datagram.
        let mut sealed: Vec<(usize, usize, PeerEndpoint)> = Vec::with_capacity(TX_BATCH);
        loop {
            if from_stack.recv_many(&mut packets, TX_BATCH).await == 0 {
                return;
            }
            let mut offset = 0;
            for pkt in packets.drain(..) {
                if let Some((len, endpoint)) =
                    self.encapsulate(&pkt, &mut out[offset..offset + slot])
                {
                    sealed.push((offset, len, endpoint));
                    offset += len;
                }
                self.pool.put(pkt);
            }
            for group in gso_groups(&sealed, |len| self.socket.max_segments(len)) {
                let (start, size, ref to) = sealed[group.start];
                let (end_start, end_len, _) = sealed[group.end - 1];
                let bytes = &out[start..end_start + end_len];
                let segment = (group.len() > 1).then_some(size);
                match to {
                    PeerEndpoint::Udp(addr) => {
                        if let Err(e) = self
                            .socket
                            .send(self.wire_addr(*addr), bytes, segment)
                            .await
                        {
                            self.counters
                                .tx_errors
                                .fetch_add(group.len() as u64, Ordering::Relaxed);
                            trace!(%addr, "udp send: {e}");
                        }
                    }
                    // TURN: one Send indication per datagram.
                    PeerEndpoint::Turn(relay, peer) => {
                        for (o, l, _) in &sealed[group.clone()] {
                            if !relay.send_to(*peer, &out[*o..*o + *l]) {
                                self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    // A relay takes datagrams one frame each, the run queued under one lock.
                    PeerEndpoint::Relay(client, peer) => {
                        let run = &sealed[group.clone()];
                        let datagrams = run.iter().map(|(o, l, _)| &out[*o..*o + *l]);
                        if !client.send_many(peer, datagrams).await {
                            self.counters
                                .tx_errors
                                .fetch_add(group.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
            sealed.clear();
        }
    }

    /// Encrypt one IP packet into `out`; returns the datagram length and where it goes.
    fn encapsulate(&self, pkt: &[u8], out: &mut [u8]) -> Option<(usize, PeerEndpoint)> {
        if pkt.len() + DATA_OVERHEAD > out.len() {
            return None;
        }
        let dst = Tunn::dst_address(pkt)?;
        let Some(peer) = self.route(dst) else {
            self.counters.tx_no_route.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let len = match peer.lock_tunn().encapsulate(pkt, out) {
            TunnResult::WriteToNetwork(b) => b.len(),
            // Queued until the handshake completes (boringtun bounds that queue).
            _ => return None,
        };
        let Some(endpoint) = peer.endpoint().filter(PeerEndpoint::is_usable) else {
            self.counters.tx_no_endpoint.fetch_add(1, Ordering::Relaxed);
            self.want(&peer);
            return None;
        };
        // A handshake initiation when a session is needed.
        peer.rtt.on_sent(&out[..len], monotonic_us);
        peer.counters
            .tx_bytes
            .fetch_add(pkt.len() as u64, Ordering::Relaxed);
        Some((len, endpoint))
    }

    async fn timer_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; HANDSHAKE_INIT_LEN + DATA_OVERHEAD];
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            if ticks.is_multiple_of(4) {
                self.rate_limiter.reset_count();
            }
            for peer in self.peers() {
                // A peer never used has no timers to run.
                let Some(result) = peer.peek_tunn(|t| match t.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(b) => Ok(b.len()),
                    TunnResult::Err(e) => Err(Some(e)),
                    _ => Err(None),
                }) else {
                    continue;
                };
                let len = match result {
                    Ok(len) => len,
                    Err(Some(WireGuardError::ConnectionExpired)) => {
                        trace!(peer = %short_key(&peer.public_key), "session expired");
                        continue;
                    }
                    Err(_) => continue,
                };
                if let Some(endpoint) = peer.endpoint() {
                    peer.rtt.on_sent(&buf[..len], monotonic_us);
                    self.send_datagram(&buf[..len], &endpoint).await;
                }
            }
        }
    }

    async fn send_datagram(&self, data: &[u8], to: &PeerEndpoint) {
        match to {
            PeerEndpoint::Udp(addr) => {
                if let Err(e) = self.socket.send(self.wire_addr(*addr), data, None).await {
                    self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                    trace!(%addr, "udp send: {e}");
                }
            }
            PeerEndpoint::Relay(client, peer) => {
                if !client.send(peer, data).await {
                    self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            PeerEndpoint::Turn(relay, peer) => {
                if !relay.send_to(*peer, data) {
                    self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Non-blocking send for replies produced while a peer's lock is held.
    fn try_send(&self, data: &[u8], to: &PeerEndpoint) {
        let sent = match to {
            PeerEndpoint::Udp(addr) => self
                .socket
                .socket()
                .try_send_to(data, self.wire_addr(*addr))
                .is_ok(),
            PeerEndpoint::Relay(client, peer) => client.send_to(peer, data),
            PeerEndpoint::Turn(relay, peer) => relay.send_to(*peer, data),
        };
        if !sent {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Where to report peers that have traffic but no endpoint (set once, by the engine).
    pub fn report_wanted_peers(&self, to: mpsc::Sender<[u8; 32]>) {
        let _ = self.wanted.set(to);
    }

    /// Report that `peer` has traffic waiting but no endpoint (see `report_wanted_peers`).
    pub fn want(&self, peer: &Peer) {
        if let Some(wanted) = self.wanted.get() {
            let _ = wanted.try_send(peer.public_key.to_bytes());
        }
    }

    fn peer_by_key(&self, public_key: &[u8; 32]) -> Option<Arc<Peer>> {
        let table = self.table();
        table
            .by_key
            .get(public_key)
            .and_then(|i| table.by_index.get(i))
            .cloned()
    }

    /// Forget a peer's endpoint and paths (the remote went idle); its traffic is then reported
    /// wanted.
    pub fn clear_peer_endpoint(&self, public_key: &[u8; 32]) {
        if let Some(peer) = self.peer_by_key(public_key) {
            debug!(peer = %short_key(&peer.public_key), "peer endpoint cleared");
            peer.idle.store(true, Ordering::Relaxed);
            peer.update_paths(|p| *p = Paths::default());
            *peer.endpoint.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// The peer's relay path (after negotiation): its endpoint unless a direct path is in use.
    /// Returns false for an unknown peer.
    pub fn set_peer_endpoint(&self, public_key: &[u8; 32], endpoint: PeerEndpoint) -> bool {
        let Some(peer) = self.peer_by_key(public_key) else {
            return false;
        };
        peer.idle.store(false, Ordering::Relaxed);
        let paths = peer.update_paths(|p| p.relay = Some(endpoint.clone()));
        if paths.direct.is_none() {
            peer.set_endpoint(&endpoint);
        }
        true
    }

    /// The peer's ICE pair: its endpoint from now on, the relay kept as the fallback. Open
    /// connections keep flowing (WireGuard's session does not depend on the endpoint).
    /// `turn`: the pair starts at our TURN relay candidate, so datagrams go through it.
    pub fn set_direct_path(
        &self,
        public_key: &[u8; 32],
        pair: crate::ice::Selected,
        turn: Option<Arc<TurnRelay>>,
    ) -> bool {
        let Some(peer) = self.peer_by_key(public_key) else {
            return false;
        };
        peer.idle.store(false, Ordering::Relaxed);
        peer.update_paths(|p| p.direct = Some(DirectPath { pair, rtt: None }));
        let remote = canonical(pair.remote);
        peer.set_endpoint(&match turn {
            Some(relay) => PeerEndpoint::Turn(relay, remote),
            None => PeerEndpoint::Udp(remote),
        });
        true
    }

    /// The latest round trip of the peer's ICE pair, for status.
    pub fn set_direct_rtt(&self, public_key: &[u8; 32], rtt: Option<Duration>) {
        if let Some(peer) = self.peer_by_key(public_key) {
            peer.update_paths(|p| {
                if let Some(d) = &mut p.direct {
                    d.rtt = rtt;
                }
            });
        }
    }

    /// The relay path is gone (the remote left the relay, or the relay connection ended).
    /// The endpoint stays as it is: one learned by roaming (the remote's ICE picked a pair
    /// before ours did) may be a live remote's only working path. But with neither a relay
    /// path nor an ICE pair of ours to vouch for it, the route election no longer counts it
    /// as connected (`engine::networks::state_of`): a remote killed in that instant would
    /// otherwise look connected until silent for 90 s (the HA failover flake of issue 20).
    pub fn clear_relay_path(&self, public_key: &[u8; 32]) {
        if let Some(peer) = self.peer_by_key(public_key) {
            peer.update_paths(|p| p.relay = None);
        }
    }

    /// The ICE pair is gone: back to the relay if it is up, else no endpoint (traffic then
    /// asks for the peer to be set up again).
    pub fn clear_direct_path(&self, public_key: &[u8; 32]) {
        let Some(peer) = self.peer_by_key(public_key) else {
            return;
        };
        let paths = peer.update_paths(|p| p.direct = None);
        match paths.relay.filter(PeerEndpoint::is_usable) {
            Some(relay) => peer.set_endpoint(&relay),
            None => {
                debug!(peer = %short_key(&peer.public_key), "direct path lost, no relay");
                *peer.endpoint.write().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }

    /// Start a handshake with a peer now (the initiating side after negotiation).
    pub async fn initiate_handshake(&self, public_key: &[u8; 32]) {
        let peer = {
            let table = self.table();
            table
                .by_key
                .get(public_key)
                .and_then(|i| table.by_index.get(i))
                .cloned()
        };
        let Some(peer) = peer else { return };
        let Some(endpoint) = peer.endpoint() else {
            return;
        };
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        let len = match peer
            .lock_tunn()
            .format_handshake_initiation(&mut buf, false)
        {
            TunnResult::WriteToNetwork(b) => b.len(),
            _ => return,
        };
        peer.rtt.on_sent(&buf[..len], monotonic_us);
        self.send_datagram(&buf[..len], &endpoint).await;
    }

    /// A dual-stack IPv6 socket needs IPv4 destinations in mapped form.
    fn wire_addr(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.socket_is_v6 => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }
}

fn remove_locked(table: &mut PeerTable, public_key: &[u8; 32]) -> bool {
    let Some(index) = table.by_key.remove(public_key) else {
        return false;
    };
    table.by_index.remove(&index);
    table.routes.remove_peer(index as usize);
    true
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Bind a dual-stack socket when the host has IPv6, IPv4 otherwise.
fn bind_udp(port: u16) -> io::Result<(UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let make = |v6: bool| -> io::Result<Socket> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if v6 {
            s.set_only_v6(false)?;
        }
        // Best effort: the kernel caps these at its configured maximum.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        s.set_nonblocking(true)?;
        let addr: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        };
        s.bind(&addr.into())?;
        Ok(s)
    };
    let (sock, v6) = match make(true) {
        Ok(s) => (s, true),
        Err(e) => {
            info!("no IPv6 UDP socket ({e}); using IPv4 only");
            (make(false)?, false)
        }
    };
    Ok((UdpSocket::from_std(sock.into())?, v6))
}

/// The first characters of a public key, enough to tell peers apart in logs.
pub fn short_key(key: &PublicKey) -> String {
    use base64::Engine as _;
    let mut s = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
    s.truncate(8);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u8, net: &str) -> PeerSpec {
        PeerSpec {
            public_key: *PublicKey::from(&StaticSecret::from([seed; 32])).as_bytes(),
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec![net.parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    #[tokio::test]
    async fn peers_are_added_replaced_and_removed_with_their_routes() {
        let pool = Arc::new(PacketPool::new(1500, 4));
        let dev = WgDevice::new([9; 32], 0, vec![spec(1, "100.64.0.2/32")], pool).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = dev.route(ip("100.64.0.2")).unwrap();
        dev.add_peer(spec(2, "100.64.0.0/16"));
        assert_eq!(dev.peers().len(), 2);
        assert!(
            Arc::ptr_eq(&dev.route(ip("100.64.0.2")).unwrap(), &first),
            "longest prefix"
        );
        assert_eq!(
            dev.route(ip("100.64.0.3")).unwrap().public_key,
            PublicKey::from(spec(2, "0.0.0.0/0").public_key)
        );
        // Same key again: replaced, with the new AllowedIPs only.
        dev.add_peer(spec(1, "100.64.0.9/32"));
        assert_eq!(dev.peers().len(), 2);
        assert_eq!(
            dev.route(ip("100.64.0.2")).unwrap().public_key,
            PublicKey::from(spec(2, "0.0.0.0/0").public_key)
        );
        assert!(dev.remove_peer(&spec(2, "0.0.0.0/0").public_key));
        assert!(!dev.remove_peer(&spec(2, "0.0.0.0/0").public_key));
        assert!(dev.route(ip("100.64.0.3")).is_none());
        assert!(dev.route(ip("100.64.0.9")).is_some());
    }

    #[tokio::test]
    async fn a_lost_relay_leaves_a_roamed_endpoint_unproven_and_an_ice_pair_connected() {
        let pool = Arc::new(PacketPool::new(1500, 4));
        let a = spec(1, "100.64.0.2/32");
        let dev = WgDevice::new([9; 32], 0, vec![a.clone()], pool).unwrap();
        let peer = dev.peer(&a.public_key).unwrap();
        let remote: SocketAddr = "198.18.2.2:51820".parse().unwrap();
        // The remote's ICE picked a pair before ours: its datagrams roamed us to it.
        peer.roam(&PeerEndpoint::Udp(remote));
        dev.clear_relay_path(&a.public_key);
        assert_eq!(
            peer.endpoint(),
            Some(PeerEndpoint::Udp(remote)),
            "a live remote's roamed path keeps carrying traffic"
        );
        assert!(
            matches!(
                crate::engine::networks::state_of(&peer),
                crate::route::PeerState::Idle { .. }
            ),
            "but is no proof of life for the route election once the relay says it left"
        );
        // With our own ICE pair the direct path stays.
        let pair = crate::ice::Selected {
            local_kind: crate::ice::candidate::Kind::Host,
            local: "198.18.1.2:51820".parse().unwrap(),
            remote_kind: crate::ice::candidate::Kind::Host,
            remote,
        };
        assert!(dev.set_direct_path(&a.public_key, pair, None));
        dev.clear_relay_path(&a.public_key);
        assert_eq!(peer.endpoint(), Some(PeerEndpoint::Udp(remote)));
        assert!(matches!(
            crate::engine::networks::state_of(&peer),
            crate::route::PeerState::Connected { relayed: false, .. }
        ));
    }

    #[tokio::test]
    async fn routed_prefixes_follow_the_elected_peer_and_survive_its_re_creation() {
        let pool = Arc::new(PacketPool::new(1500, 4));
        let a = spec(1, "100.64.0.2/32");
        let b = spec(2, "100.64.0.3/32");
        let dev = WgDevice::new([9; 32], 0, vec![a.clone(), b.clone()], pool).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lan: IpNet = "198.19.1.0/24".parse().unwrap();
        let key_of = |p: &Arc<Peer>| p.public_key.to_bytes();
        assert!(dev.route(ip("198.19.1.10")).is_none());
        dev.set_routed(HashMap::from([(a.public_key, vec![lan])]));
        assert_eq!(key_of(&dev.route(ip("198.19.1.10")).unwrap()), a.public_key);
        let allowed =
            |key: &[u8; 32], at: &str| dev.source_allowed(&dev.peer(key).unwrap(), ip(at));
        assert!(allowed(&a.public_key, "198.19.1.10"));
        assert!(!allowed(&b.public_key, "198.19.1.10"));
        // Failover: the prefix moves.
        dev.set_routed(HashMap::from([(b.public_key, vec![lan])]));
        assert_eq!(key_of(&dev.route(ip("198.19.1.10")).unwrap()), b.public_key);
        assert!(!allowed(&a.public_key, "198.19.1.10"));
        // Re-created (new AllowedIPs from the map): it keeps its routed prefix.
        dev.add_peer(spec(2, "100.64.0.4/32"));
        assert_eq!(key_of(&dev.route(ip("198.19.1.10")).unwrap()), b.public_key);
        assert_eq!(dev.peer(&b.public_key).unwrap().routed(), vec![lan]);
        // An exit node takes everything else, never a peer's own address.
        let default: IpNet = "0.0.0.0/0".parse().unwrap();
        dev.set_routed(HashMap::from([(
            a.public_key,
            vec![default, "100.64.0.0/16".parse().unwrap()],
        )]));
        assert_eq!(key_of(&dev.route(ip("203.0.113.7")).unwrap()), a.public_key);
        assert_eq!(key_of(&dev.route(ip("100.64.0.4")).unwrap()), b.public_key);
        assert!(dev.route(ip("198.19.1.10")).is_some());
        // The exit node speaks for the internet, never for another peer's address.
        assert!(allowed(&a.public_key, "203.0.113.7"));
        assert!(!allowed(&a.public_key, "100.64.0.4"), "B's own address");
        // A routed /32 equal to a peer's own address does not take it, and survives updates.
        let b_own: IpNet = "100.64.0.4/32".parse().unwrap();
        dev.set_routed(HashMap::from([(a.public_key, vec![b_own])]));
        assert_eq!(key_of(&dev.route(ip("100.64.0.4")).unwrap()), b.public_key);
        dev.set_routed(HashMap::from([(b.public_key, vec![b_own])]));
        dev.set_routed(HashMap::new());
        assert_eq!(key_of(&dev.route(ip("100.64.0.4")).unwrap()), b.public_key);
        assert!(dev.route(ip("203.0.113.7")).is_none());
        assert!(dev.route(ip("100.64.0.9")).is_none());
    }
}
