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
use std::io;
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
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use super::router::AllowedIps;
use crate::packet::PacketPool;

/// Largest datagram we accept from the underlay.
const MAX_DATAGRAM: usize = 65_535;
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
}

/// One WireGuard peer.
pub struct Peer {
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    pub counters: PeerCounters,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
}

impl Peer {
    /// The underlay address packets go to (updated by roaming).
    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_endpoint(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            debug!(peer = %short_key(&self.public_key), %addr, "peer endpoint");
            *self.endpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        }
    }

    /// Time since the last completed handshake, if there was one.
    pub fn time_since_handshake(&self) -> Option<Duration> {
        self.lock_tunn().stats().0
    }

    fn lock_tunn(&self) -> std::sync::MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn allows_source(&self, ip: IpAddr) -> bool {
        self.allowed_ips.iter().any(|n| n.contains(&ip))
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

/// The WireGuard device.
pub struct WgDevice {
    socket: UdpSocket,
    socket_is_v6: bool,
    private_key: StaticSecret,
    public_key: PublicKey,
    peers: Vec<Peer>,
    by_key: HashMap<[u8; 32], usize>,
    routes: AllowedIps,
    rate_limiter: Arc<RateLimiter>,
    pool: Arc<PacketPool>,
    pub counters: DeviceCounters,
}

impl WgDevice {
    /// Bind the UDP socket (`listen_port` 0 = any) and set up the peers.
    pub fn new(
        private_key: [u8; 32],
        listen_port: u16,
        peers: Vec<PeerSpec>,
        pool: Arc<PacketPool>,
    ) -> io::Result<Self> {
        let (socket, socket_is_v6) = bind_udp(listen_port)?;
        let private_key = StaticSecret::from(private_key);
        let public_key = PublicKey::from(&private_key);
        let rate_limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));
        let mut routes = AllowedIps::new();
        let mut by_key = HashMap::new();
        let mut built = Vec::with_capacity(peers.len());
        for (i, spec) in peers.into_iter().enumerate() {
            for net in &spec.allowed_ips {
                routes.insert(*net, i);
            }
            by_key.insert(spec.public_key, i);
            let tunn = Tunn::new(
                private_key.clone(),
                PublicKey::from(spec.public_key),
                spec.preshared_key,
                spec.persistent_keepalive,
                peer_index(i),
                Some(rate_limiter.clone()),
            );
            built.push(Peer {
                public_key: PublicKey::from(spec.public_key),
                allowed_ips: spec.allowed_ips,
                counters: PeerCounters::default(),
                tunn: Mutex::new(tunn),
                endpoint: RwLock::new(spec.endpoint.map(canonical)),
            });
        }
        Ok(Self {
            socket,
            socket_is_v6,
            private_key,
            public_key,
            peers: built,
            by_key,
            routes,
            rate_limiter,
            pool,
            counters: DeviceCounters::default(),
        })
    }

    /// Our public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The peers, in configuration order.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The peer whose AllowedIPs contain `ip`.
    pub fn route(&self, ip: IpAddr) -> Option<&Peer> {
        self.routes.lookup(ip).map(|i| &self.peers[i])
    }

    /// Run the device until `cancel` fires. `to_stack` receives decrypted IP packets;
    /// `from_stack` supplies IP packets to encrypt.
    pub async fn run(
        self: Arc<Self>,
        to_stack: mpsc::Sender<Vec<u8>>,
        from_stack: mpsc::Receiver<Vec<u8>>,
        cancel: CancellationToken,
    ) {
        self.initiate_handshakes().await;
        let rx = self.clone().rx_loop(to_stack);
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
        for peer in &self.peers {
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
            self.send_datagram(&buf[..len], endpoint).await;
        }
    }

    async fn rx_loop(self: Arc<Self>, to_stack: mpsc::Sender<Vec<u8>>) {
        let mut datagram = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, src) = match self.socket.recv_from(&mut datagram).await {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some systems; not fatal.
                    trace!("udp recv: {e}");
                    continue;
                }
            };
            let src = canonical(src);
            let data = &datagram[..n];
            // Handshake messages pass mac1 and, under load, the cookie check before any costly
            // work (recovering the sender's key) and before they can move an endpoint.
            if matches!(data.first(), Some(1 | 2)) {
                let mut cookie = [0u8; COOKIE_REPLY_LEN];
                match self
                    .rate_limiter
                    .verify_packet(Some(src.ip()), data, &mut cookie)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        self.try_send(reply, src);
                        continue;
                    }
                    Err(_) => {
                        self.counters.rx_unknown.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            let Some(idx) = self.peer_for_datagram(data) else {
                self.counters.rx_unknown.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Some(pkt) = self.decapsulate(idx, src, data)
                && to_stack.send(pkt).await.is_err()
            {
                return;
            }
        }
    }

    /// Which peer a datagram belongs to: by our receiver index for responses, cookies and data;
    /// by the sender's static key (recovered from the initiation) for initiations.
    fn peer_for_datagram(&self, data: &[u8]) -> Option<usize> {
        let by_index = |receiver_idx: u32| {
            let i = (receiver_idx >> 8) as usize;
            (1..=self.peers.len()).contains(&i).then(|| i - 1)
        };
        match Tunn::parse_incoming_packet(data).ok()? {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.private_key, &self.public_key, &init).ok()?;
                self.by_key.get(&half.peer_static_public).copied()
            }
            Packet::HandshakeResponse(p) => by_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => by_index(p.receiver_idx),
            Packet::PacketData(p) => by_index(p.receiver_idx),
        }
    }

    /// Decrypt one datagram for peer `idx`; returns an IP packet for the netstack, if any.
    /// Handshake replies and packets queued during the handshake are sent from here.
    fn decapsulate(&self, idx: usize, src: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        let peer = &self.peers[idx];
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
        match tunn.decapsulate(Some(src.ip()), data, &mut out) {
            // A cookie reply answers an unverified sender: it moves nothing.
            TunnResult::WriteToNetwork(reply) if reply.first() == Some(&COOKIE_REPLY_TYPE) => {
                self.try_send(reply, src);
            }
            TunnResult::WriteToNetwork(reply) => {
                self.try_send(reply, src);
                // A completed handshake releases packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], &mut out)
                {
                    self.try_send(queued, src);
                }
                peer.set_endpoint(src);
            }
            TunnResult::WriteToTunnelV4(pkt, from) => {
                deliver = Some((pkt.len(), IpAddr::V4(from)));
            }
            TunnResult::WriteToTunnelV6(pkt, from) => {
                deliver = Some((pkt.len(), IpAddr::V6(from)));
            }
            TunnResult::Done => peer.set_endpoint(src),
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
        peer.set_endpoint(src);
        if !peer.allows_source(from) {
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

    async fn tx_loop(self: Arc<Self>, mut from_stack: mpsc::Receiver<Vec<u8>>) {
        let mut out = vec![0u8; self.pool.buf_size() + DATA_OVERHEAD + HANDSHAKE_INIT_LEN];
        while let Some(pkt) = from_stack.recv().await {
            if let Some((len, endpoint)) = self.encapsulate(&pkt, &mut out) {
                self.send_datagram(&out[..len], endpoint).await;
            }
            self.pool.put(pkt);
        }
    }

    /// Encrypt one IP packet into `out`; returns the datagram length and where it goes.
    fn encapsulate(&self, pkt: &[u8], out: &mut [u8]) -> Option<(usize, SocketAddr)> {
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
        let Some(endpoint) = peer.endpoint() else {
            self.counters.tx_no_endpoint.fetch_add(1, Ordering::Relaxed);
            return None;
        };
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
            for peer in &self.peers {
                let len = match peer.lock_tunn().update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(b) => b.len(),
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {
                        trace!(peer = %short_key(&peer.public_key), "session expired");
                        continue;
                    }
                    _ => continue,
                };
                if let Some(endpoint) = peer.endpoint() {
                    self.send_datagram(&buf[..len], endpoint).await;
                }
            }
        }
    }

    async fn send_datagram(&self, data: &[u8], to: SocketAddr) {
        if let Err(e) = self.socket.send_to(data, self.wire_addr(to)).await {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            trace!(%to, "udp send: {e}");
        }
    }

    /// Non-blocking send for replies produced while a peer's lock is held.
    fn try_send(&self, data: &[u8], to: SocketAddr) {
        if self.socket.try_send_to(data, self.wire_addr(to)).is_err() {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
        }
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

/// boringtun stores the index shifted by 8 bits; 0 is never used so a zeroed field matches nothing.
fn peer_index(i: usize) -> u32 {
    (i as u32 + 1) & 0x00ff_ffff
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

    #[test]
    fn peer_index_round_trips_through_receiver_idx() {
        for i in [0usize, 1, 41, 70_000] {
            let stored = peer_index(i) << 8 | 0x2a; // boringtun keeps a counter in the low byte
            assert_eq!((stored >> 8) as usize, i + 1);
        }
    }
}
