//! The netstack task and its handle.
//!
//! The task loop: take commands and inbound packets, move user bytes into smoltcp sockets, poll
//! the interface, move received bytes out to the users, then sleep until a packet, a command, a
//! user wake-up, smoltcp's next timer, or room in the channel to WireGuard.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration as SmolDuration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

use super::device::QueueDevice;
use super::raw::{self, Headers};
use super::routed::{Accepting, GateCounters, Intake, RoutedFlow, Rules, read};
use super::tcp::{Shared, TcpListener, TcpStream};
use super::udp::{UDP_QUEUE, UdpShared, UdpSocket};
use crate::firewall::Proto;
use crate::packet::PacketPool;

/// Tunables of the netstack.
#[derive(Clone, Debug)]
pub struct NetstackConfig {
    /// Our addresses with their prefixes.
    pub addresses: Vec<IpNet>,
    /// IP MTU of the tunnel.
    pub mtu: usize,
    /// smoltcp receive and send buffer per TCP socket. Large enough for the bandwidth-delay
    /// product; with it the advertised window scales.
    pub tcp_buffer: usize,
    /// Bytes buffered between each stream and its socket, per direction.
    pub ring: usize,
    /// How long a connection dropped by its user may take to deliver its last bytes and FIN.
    pub linger: Duration,
    /// Listening sockets kept per listened port (smoltcp's listener accepts one connection).
    pub backlog: usize,
    /// How each TCP connection sizes its window and pace.
    pub congestion: Congestion,
    /// Bytes of TCP socket buffers (both directions, every socket) allowed at `tcp_buffer`
    /// size; sockets made beyond it get `TCP_BUFFER_FLOOR` each way.
    pub tcp_buffer_budget: usize,
    /// Hard cap on the buffer bytes of every TCP socket together (socket buffers and rings,
    /// both ways): a connection that would go beyond it is refused (`ConnectError::BufferCap`)
    /// and a listening socket is not replaced until others close.
    pub buffer_cap: usize,
}

/// Each way, for a socket made when the budget is spent: ~100 Mbit/s at a 20 ms RTT.
pub const TCP_BUFFER_FLOOR: usize = 256 * 1024;

/// The global cap on TCP buffers. Each socket's buffers are fixed when smoltcp makes it, and
/// its pages are only touched as data flows, so a budget on what sockets may reserve is what
/// bounds the worst case: the first connections get full-size buffers (enough for a fast, long
/// path), later ones the floor, and past the hard cap none at all; closing a socket gives its
/// share back. Every socket's share counts its user-side rings too, so `cap` bounds all the
/// bytes the netstack can hold for its connections.
#[derive(Debug)]
struct BufferBudget {
    /// Reserved bytes up to which sockets get full-size buffers.
    full_limit: usize,
    /// Reserved bytes never exceeded.
    cap: usize,
    /// Ring bytes per direction each socket's user side may hold.
    ring: usize,
    reserved: usize,
}

impl BufferBudget {
    /// The size of each of a new socket's two buffers, reserved from the budget; None when
    /// not even the floor fits under the cap.
    fn take(&mut self, full: usize) -> Option<usize> {
        let limit = self.full_limit.min(self.cap);
        let size = if self.reserved + self.cost(full) <= limit {
            full
        } else {
            TCP_BUFFER_FLOOR.min(full)
        };
        if self.reserved + self.cost(size) > self.cap {
            return None;
        }
        self.reserved += self.cost(size);
        Some(size)
    }

    /// A socket with buffers of `size` each way is gone.
    fn give_back(&mut self, size: usize) {
        self.reserved = self.reserved.saturating_sub(self.cost(size));
    }

    /// What a socket with buffers of `size` each way reserves.
    fn cost(&self, size: usize) -> usize {
        2 * (size + self.ring)
    }
}

/// How every mesh TCP socket is set up: congestion control, pacing, no Nagle, keep-alives.
/// Public so that the link simulations in tests/ run exactly the sockets the netstack runs.
pub fn tune_tcp_socket(sock: &mut tcp::Socket<'_>, congestion: Congestion) {
    sock.set_congestion_control(match congestion {
        Congestion::Bbr => tcp::CongestionControl::Bbr,
        Congestion::Cubic => tcp::CongestionControl::Cubic,
    });
    // Spread each window over the round trip (our smoltcp patch) instead of bursting it
    // into the peer's socket buffer.
    sock.set_pacing(true);
    sock.set_nagle_enabled(false);
    // A lone segment is acknowledged after 1 ms, not smoltcp's 10 (every second segment is
    // acknowledged at once either way). A delayed ACK saves one packet only when a reply
    // follows within the delay; against that, a sender that is waiting for it stalls. On a
    // sub-millisecond mesh path 10 ms is 25 round trips: relayed transfers sat at 5 Mbit/s,
    // each window ending in one lone segment whose ACK took 10 ms (benches/README.md, "The
    // relayed path"; tests/relay_held_delivery.rs).
    sock.set_ack_delay(Some(SmolDuration::from_millis(ACK_DELAY_MS)));
    // Keep-alives probe an idle connection; the timeout aborts it when the remote stays
    // silent (a vanished peer), which keep-alives alone never do.
    sock.set_keep_alive(Some(SmolDuration::from_secs(KEEPALIVE_SECS)));
    sock.set_timeout(Some(SmolDuration::from_secs(KEEPALIVE_SECS * 4)));
}

/// TCP congestion control for the connections the netstack carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// Model-based (our smoltcp patch, after BBR v1): paces at the measured delivery rate and
    /// does not back off on random loss, so a lossy underlay keeps its bandwidth.
    #[default]
    Bbr,
    /// Loss-based (RFC 9438): halves on loss; fair to other loss-based flows, slow on lossy
    /// paths (about 10 Mbit/s at 0.5 % loss and a 20 ms RTT).
    Cubic,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            other => Err(format!(
                "unknown congestion control {other:?} (bbr or cubic)"
            )),
        }
    }
}

impl NetstackConfig {
    pub fn new(addresses: Vec<IpNet>, mtu: usize) -> Self {
        Self {
            addresses,
            mtu,
            tcp_buffer: 4 * 1024 * 1024,
            ring: 64 * 1024,
            linger: Duration::from_secs(30),
            backlog: 8,
            congestion: Congestion::default(),
            tcp_buffer_budget: 1024 * 1024 * 1024,
            buffer_cap: 4096 * 1024 * 1024,
        }
    }
}

/// Why a connection through the netstack could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused,
    #[error("no local address of the destination's family")]
    NoSourceAddress,
    #[error("no free local port")]
    NoPorts,
    #[error("port {0} is already listened on")]
    PortInUse(u16),
    #[error("the netstack has stopped")]
    Stopped,
    #[error(
        "TCP buffer cap reached: open connections hold {reserved_mib} of {cap_mib} MiB (--max-buffer-mib)"
    )]
    BufferCap { reserved_mib: usize, cap_mib: usize },
}

enum Command {
    Connect {
        remote: SocketAddr,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
    },
    Listen {
        port: u16,
        reply: oneshot::Sender<Result<TcpListener, ConnectError>>,
    },
    UdpBind {
        /// A given port (a service such as the DNS forwarder), or None for an ephemeral one.
        port: Option<u16>,
        /// Datagrams to it start flows the peer ACL decides on (an exposed port), rather than
        /// answer ours.
        gated: bool,
        reply: oneshot::Sender<Result<UdpSocket, ConnectError>>,
    },
    /// Become a routing peer: routed flows go to the returned queue.
    ServeRoutes {
        queue: usize,
        reply: oneshot::Sender<mpsc::Receiver<RoutedFlow>>,
    },
    AcceptRouted {
        src: SocketAddr,
        dst: SocketAddr,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
    },
    RejectRouted {
        src: SocketAddr,
        dst: SocketAddr,
    },
}

/// A handle to the netstack task: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Netstack {
    commands: mpsc::Sender<Command>,
    addresses: Arc<Vec<IpNet>>,
    rules: Arc<RwLock<Rules>>,
    counters: Arc<GateCounters>,
    /// Straight to WireGuard, for packets a routing peer writes itself (UDP replies).
    to_wg: mpsc::Sender<Vec<u8>>,
    pool: Arc<PacketPool>,
    mtu: usize,
}

impl Netstack {
    /// Build the netstack. Returns the handle and the task to spawn; the task ends when `cancel`
    /// fires or every handle and the WireGuard channels are gone.
    pub fn new(
        config: NetstackConfig,
        from_wg: mpsc::Receiver<Vec<u8>>,
        to_wg: mpsc::Sender<Vec<u8>>,
        pool: Arc<PacketPool>,
        cancel: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(256);
        let rules = Arc::new(RwLock::new(Rules::default()));
        let counters = Arc::new(GateCounters::default());
        let handle = Netstack {
            commands: tx,
            addresses: Arc::new(config.addresses.clone()),
            rules: rules.clone(),
            counters: counters.clone(),
            to_wg: to_wg.clone(),
            pool: pool.clone(),
            mtu: config.mtu,
        };
        let task = Stack::new(config, from_wg, to_wg, pool, rx, rules, counters).run(cancel);
        (handle, task)
    }

    /// The rules for new inbound flows towards our own addresses (`FirewallRules`).
    pub fn set_peer_acl(&self, acl: crate::firewall::PeerAcl) {
        self.rules.write().unwrap_or_else(|e| e.into_inner()).peer = acl;
    }

    /// The rules for flows this peer routes (`routesFirewallRules`); what the DNS forwarder
    /// resolved so far stays.
    pub fn set_route_acl(&self, mut acl: crate::firewall::RouteAcl) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        acl.keep_resolved(&rules.route);
        rules.route = acl;
    }

    /// The DNS forwarder resolved a DNS route's domain: open the route ACL to these addresses.
    pub fn add_resolved(&self, pattern: &str, ips: impl IntoIterator<Item = IpAddr>) {
        self.rules
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .route
            .add_resolved(pattern, ips);
    }

    /// Whether the route ACL lets this flow through now.
    pub fn route_acl_allows(&self, flow: &crate::firewall::Flow) -> bool {
        read(&self.rules).route.allows(flow)
    }

    /// What the gates dropped and routed.
    pub fn gate_counters(&self) -> &Arc<GateCounters> {
        &self.counters
    }

    /// Route: packets for destinations other than our addresses are handed, flow by flow, to
    /// the returned queue (`queue` deep) instead of being dropped. Dropping the queue stops it.
    pub async fn serve_routes(
        &self,
        queue: usize,
    ) -> Result<mpsc::Receiver<RoutedFlow>, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::ServeRoutes { queue, reply }).await?;
        rx.await.map_err(|_| ConnectError::Stopped)
    }

    /// Complete the handshake of a routed connection whose SYN is held (the forwarder's dial
    /// succeeded): its stream, once established.
    pub async fn accept_routed(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<TcpStream, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::AcceptRouted { src, dst, reply })
            .await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// Refuse a routed connection whose SYN is held: the source gets a RST.
    pub async fn reject_routed(&self, src: SocketAddr, dst: SocketAddr) {
        let _ = self.command(Command::RejectRouted { src, dst }).await;
    }

    /// Send a UDP datagram from `from` (a routed destination) to `to` (a mesh peer) straight to
    /// WireGuard. False when it was dropped: too large for the MTU, or WireGuard's queue full.
    pub fn send_udp(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> bool {
        let mtu = self.mtu;
        self.send_raw(|buf| raw::udp_packet(from, to, payload, mtu, buf))
    }

    /// Send a packet built by `build` (false: nothing to send) straight to WireGuard.
    pub fn send_raw(&self, build: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let mut buf = self.pool.get();
        if !build(&mut buf) {
            self.pool.put(buf);
            return false;
        }
        match self.to_wg.try_send(buf) {
            Ok(()) => true,
            Err(e) => {
                self.pool.put(e.into_inner());
                false
            }
        }
    }

    /// Give a routed packet's buffer back.
    pub fn recycle(&self, packet: Vec<u8>) {
        self.pool.put(packet);
    }

    /// Our addresses.
    pub fn addresses(&self) -> &[IpNet] {
        &self.addresses
    }

    /// Open a TCP connection. Waits for the handshake to complete or be refused; the caller
    /// bounds the wait (dropping the future aborts the attempt).
    pub async fn connect(&self, remote: SocketAddr) -> Result<TcpStream, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Connect { remote, reply }).await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// Listen for TCP connections on `port` of every mesh address.
    pub async fn listen(&self, port: u16) -> Result<TcpListener, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Listen { port, reply }).await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// A UDP socket on an ephemeral port.
    pub async fn udp_bind(&self) -> Result<UdpSocket, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::UdpBind {
            port: None,
            gated: false,
            reply,
        })
        .await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// A UDP socket on `port` of every mesh address (a service); fails if the port is taken.
    pub async fn udp_bind_port(&self, port: u16) -> Result<UdpSocket, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::UdpBind {
            port: Some(port),
            gated: false,
            reply,
        })
        .await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    /// A UDP service on `port` of every mesh address whose every datagram is a new inbound
    /// flow for the peer ACL (`FirewallRules`), as a TCP SYN to an exposed port is.
    pub async fn udp_serve(&self, port: u16) -> Result<UdpSocket, ConnectError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::UdpBind {
            port: Some(port),
            gated: true,
            reply,
        })
        .await?;
        rx.await.map_err(|_| ConnectError::Stopped)?
    }

    async fn command(&self, cmd: Command) -> Result<(), ConnectError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| ConnectError::Stopped)
    }
}

/// A TCP socket the task manages, and its user side.
struct Conn {
    handle: SocketHandle,
    shared: Arc<Shared>,
    local: SocketAddr,
    remote: SocketAddr,
    /// Set while the handshake of an outbound connection is in progress.
    connecting: Option<oneshot::Sender<Result<TcpStream, ConnectError>>>,
    /// When the user dropped the stream: the deadline to finish sending.
    linger_until: Option<Instant>,
    /// The remote's FIN has been seen (its sending side ended cleanly).
    peer_fin: bool,
    /// Aborted after this many interface polls: the socket stays until one more poll has sent
    /// the RST.
    aborted_at: Option<u64>,
    /// A connection this peer routes (its local end is someone else's address).
    routed: bool,
}

impl Conn {
    fn new(
        handle: SocketHandle,
        shared: Arc<Shared>,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Self {
        Self {
            handle,
            shared,
            local,
            remote,
            connecting: None,
            linger_until: None,
            peer_fin: false,
            aborted_at: None,
            routed: false,
        }
    }

    fn abort(&mut self, sock: &mut tcp::Socket, polls: u64) -> bool {
        sock.abort();
        self.aborted_at = Some(polls);
        true
    }
}

struct Listener {
    port: u16,
    sockets: Vec<SocketHandle>,
    accepted: mpsc::Sender<TcpStream>,
    /// SYNs for this port in the device queue (`listen_for_syns`).
    pending_syns: usize,
}

struct UdpEntry {
    handle: SocketHandle,
    shared: Arc<UdpShared>,
    port: u16,
    /// Inbound datagrams pass the peer ACL (see `Netstack::udp_serve`).
    gated: bool,
}

enum Event {
    Stop,
    Command(Option<Command>),
    Packet(Vec<u8>),
    Wake,
}

/// Inbound packets handed to smoltcp per loop round, so commands and users are served between
/// bursts.
/// Bytes of smoltcp's send ring of a UDP socket.
const UDP_TX_RING: usize = 16 * 1024;
const RX_BATCH: usize = 64;
/// Listening sockets a port may have at once: its SYN backlog. smoltcp's listening socket takes
/// one handshake, so a port keeps `NetstackConfig::backlog` of them and, when more SYNs are
/// about to be polled than it has free, makes more on the spot, up to this many; accepted ones
/// are not replaced beyond `backlog`, so a burst's extra sockets (and their buffers) go away.
const MAX_BACKLOG: usize = 128;
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// TCP keep-alive interval; a connection silent for four intervals is aborted.
const KEEPALIVE_SECS: u64 = 30;
/// How long a lone received segment waits for its ACK (see `tune_tcp_socket`).
const ACK_DELAY_MS: u64 = 1;

struct Stack {
    config: NetstackConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    device: QueueDevice,
    from_wg: mpsc::Receiver<Vec<u8>>,
    commands: mpsc::Receiver<Command>,
    wake: Arc<Notify>,
    conns: Vec<Conn>,
    listeners: Vec<Listener>,
    udp: Vec<UdpEntry>,
    ports_in_use: HashSet<u16>,
    buffers: BufferBudget,
    next_port: u16,
    /// Interface polls so far (see `Conn::aborted_at`).
    polls: u64,
    pool: Arc<PacketPool>,
    rules: Arc<RwLock<Rules>>,
    counters: Arc<GateCounters>,
    /// Set while this peer routes (a forwarder is attached).
    intake: Option<Intake>,
    /// Buffers of packets the gates dropped, back to the pool after the round.
    spare: Vec<Vec<u8>>,
}

impl Stack {
    fn new(
        config: NetstackConfig,
        from_wg: mpsc::Receiver<Vec<u8>>,
        to_wg: mpsc::Sender<Vec<u8>>,
        pool: Arc<PacketPool>,
        commands: mpsc::Receiver<Command>,
        rules: Arc<RwLock<Rules>>,
        counters: Arc<GateCounters>,
    ) -> Self {
        let mut device = QueueDevice::new(to_wg, pool.clone(), config.mtu);
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = rand::random();
        let mut iface = Interface::new(iface_config, &mut device, Instant::now());
        iface.update_ip_addrs(|addrs| {
            for net in &config.addresses {
                let cidr = IpCidr::new(IpAddress::from(net.addr()), net.prefix_len());
                if addrs.push(cidr).is_err() {
                    tracing::warn!(%net, "too many addresses; ignored");
                }
            }
        });
        // Everything not on a local prefix goes out of the one interface, where WireGuard's
        // cryptokey routing picks the peer. The same routes let smoltcp take routed packets
        // (`any_ip`), which only the gates' routed flows reach.
        let v4 = config.addresses.iter().find_map(|n| match n.addr() {
            IpAddr::V4(a) => Some(a),
            _ => None,
        });
        let v6 = config.addresses.iter().find_map(|n| match n.addr() {
            IpAddr::V6(a) => Some(a),
            _ => None,
        });
        if let Some(a) = v4 {
            let _ = iface.routes_mut().add_default_ipv4_route(a);
        }
        if let Some(a) = v6 {
            let _ = iface.routes_mut().add_default_ipv6_route(a);
        }
        iface.set_any_ip(true);
        let buffers = BufferBudget {
            full_limit: config.tcp_buffer_budget,
            cap: config.buffer_cap,
            ring: config.ring,
            reserved: 0,
        };
        Self {
            config,
            iface,
            buffers,
            sockets: SocketSet::new(Vec::new()),
            device,
            from_wg,
            commands,
            wake: Arc::new(Notify::new()),
            conns: Vec::new(),
            listeners: Vec::new(),
            udp: Vec::new(),
            ports_in_use: HashSet::new(),
            next_port: *EPHEMERAL.start() + rand::random::<u16>() % 16000,
            polls: 0,
            pool,
            rules,
            counters,
            intake: None,
            spare: Vec::new(),
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut commands_open = true;
        loop {
            while let Ok(cmd) = self.commands.try_recv() {
                self.handle_command(cmd);
            }
            for _ in 0..RX_BATCH {
                if self.device.rx.len() >= RX_BATCH {
                    break;
                }
                match self.from_wg.try_recv() {
                    Ok(p) => self.admit(p, Instant::now()),
                    Err(_) => break,
                }
            }
            self.device.tx_blocked = false;
            for buf in self.spare.drain(..) {
                self.pool.put(buf);
            }
            let now = Instant::now();
            self.listen_for_syns();
            self.pump(now);
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            self.polls += 1;
            self.pump(now);

            if !self.device.rx.is_empty() && !self.device.tx_blocked {
                continue;
            }
            let delay = if self.device.tx_blocked {
                None
            } else {
                self.iface.poll_delay(now, &self.sockets)
            };
            let room_for_rx = self.device.rx.len() < RX_BATCH;
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => Event::Stop,
                cmd = self.commands.recv(), if commands_open => Event::Command(cmd),
                pkt = self.from_wg.recv(), if room_for_rx => match pkt {
                    Some(p) => Event::Packet(p),
                    None => Event::Stop,
                },
                _ = self.wake.notified() => Event::Wake,
                permit = self.device.tx_channel().reserve(), if self.device.tx_blocked => {
                    if permit.is_err() { Event::Stop } else { Event::Wake }
                }
                _ = sleep_opt(delay) => Event::Wake,
            };
            match event {
                Event::Stop => break,
                Event::Command(Some(cmd)) => self.handle_command(cmd),
                // Every handle is gone: nothing can use a new connection, but existing streams
                // and UDP sockets (an exposed UDP port holds no handle) still can, so keep
                // serving them.
                Event::Command(None)
                    if self.conns.is_empty()
                        && self.listeners.is_empty()
                        && self.udp.is_empty() =>
                {
                    break;
                }
                Event::Command(None) => commands_open = false,
                Event::Packet(p) => self.admit(p, Instant::now()),
                Event::Wake => {}
            }
        }
        self.shutdown();
    }

    /// The gates (see `routed`): pass `packet` to smoltcp, hold it for the forwarder, hand it
    /// over, or drop it.
    fn admit(&mut self, packet: Vec<u8>, now: Instant) {
        let Some(h) = raw::inspect(&packet) else {
            // smoltcp drops what it cannot parse, and answers what it must (fragments).
            self.device.rx.push_back(packet);
            return;
        };
        if self.config.addresses.iter().any(|n| n.addr() == h.dst) {
            let new_flow = match h.proto {
                Proto::Tcp => h.syn,
                // Replies to a socket of ours pass; anything else, and anything to an exposed
                // port, starts a flow.
                Proto::Udp => self
                    .udp
                    .iter()
                    .find(|u| u.port == h.dst_port)
                    .is_none_or(|u| u.gated),
                Proto::Icmp => h.echo_request,
                Proto::Other(_) => false,
            };
            if new_flow && !read(&self.rules).peer.allows(&h.flow()) {
                self.counters.denied_inbound.fetch_add(1, Ordering::Relaxed);
                trace!(src = %h.src, dst = %h.dst_addr(), proto = ?h.proto, "inbound flow denied by policy");
                self.spare.push(packet);
                return;
            }
            self.device.rx.push_back(packet);
            return;
        }
        // Routed: only with a forwarder, never towards the mesh's own network.
        let to_mesh = self
            .config
            .addresses
            .iter()
            .any(|n| n.trunc().contains(&h.dst));
        let Some(intake) = self.intake.as_mut().filter(|_| !to_mesh) else {
            self.counters.not_routed.fetch_add(1, Ordering::Relaxed);
            self.spare.push(packet);
            return;
        };
        match h.proto {
            Proto::Tcp => {
                if let Some(p) = intake.tcp(
                    &h,
                    packet,
                    &self.rules,
                    &self.counters,
                    now,
                    &mut self.spare,
                ) {
                    self.device.rx.push_back(p);
                }
            }
            Proto::Udp | Proto::Icmp => self.hand_over(h, packet),
            Proto::Other(_) => {
                self.counters.not_routed.fetch_add(1, Ordering::Relaxed);
                self.spare.push(packet);
            }
        }
    }

    /// A routed UDP datagram or ICMP echo request, to the forwarder if the route ACL allows.
    fn hand_over(&mut self, h: Headers, packet: Vec<u8>) {
        let Some(intake) = self.intake.as_ref() else {
            self.spare.push(packet);
            return;
        };
        if h.proto == Proto::Icmp && !h.echo_request {
            self.counters.not_routed.fetch_add(1, Ordering::Relaxed);
            self.spare.push(packet);
            return;
        }
        if !read(&self.rules).route.allows(&h.flow()) {
            self.counters.denied_routed.fetch_add(1, Ordering::Relaxed);
            self.spare.push(packet);
            return;
        }
        let flow = if h.proto == Proto::Udp {
            RoutedFlow::Udp {
                src: h.src_addr(),
                dst: h.dst_addr(),
                packet,
                payload: h.l4 + 8,
            }
        } else {
            RoutedFlow::Echo { packet, icmp: h.l4 }
        };
        match intake.to_forwarder.try_send(flow) {
            Ok(()) => {
                self.counters.routed_udp.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .routed_overflow
                    .fetch_add(1, Ordering::Relaxed);
                match e.into_inner() {
                    RoutedFlow::Udp { packet, .. } | RoutedFlow::Echo { packet, .. } => {
                        self.spare.push(packet)
                    }
                    RoutedFlow::Tcp { .. } => {}
                }
            }
        }
    }

    /// The forwarder dialled a held SYN's destination: listen on it and feed the SYN.
    fn accept_routed(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
    ) {
        let Some(intake) = self.intake.as_mut() else {
            let _ = reply.send(Err(ConnectError::Stopped));
            return;
        };
        let listening = intake.accepting.iter().any(|a| {
            a.dst == dst && self.sockets.get::<tcp::Socket>(a.handle).state() == tcp::State::Listen
        });
        if listening {
            intake.deferred.push_back((src, dst, reply));
            return;
        }
        let Some((syn, _)) = intake.held.remove(&(src, dst)) else {
            let _ = reply.send(Err(ConnectError::Refused));
            return;
        };
        let Some(mut sock) = self.new_tcp_socket() else {
            self.spare.push(syn);
            let _ = reply.send(Err(self.buffer_cap_error()));
            return;
        };
        let local = IpListenEndpoint {
            addr: Some(IpAddress::from(dst.ip())),
            port: dst.port(),
        };
        if sock.listen(local).is_err() {
            self.buffers.give_back(sock.recv_capacity());
            self.spare.push(syn);
            let _ = reply.send(Err(ConnectError::Refused));
            return;
        }
        let handle = self.sockets.add(sock);
        let intake = self.intake.as_mut().expect("checked above");
        intake.flows.insert((src, dst));
        intake.accepting.push(Accepting {
            handle,
            src,
            dst,
            reply,
            since: Instant::now(),
            injected_at: self.polls,
        });
        // First in line, so it meets its socket in the next poll.
        self.device.rx.push_front(syn);
    }

    /// The forwarder could not reach a held SYN's destination: answer with a RST.
    fn reject_routed(&mut self, src: SocketAddr, dst: SocketAddr) {
        let Some((syn, _)) = self
            .intake
            .as_mut()
            .and_then(|i| i.held.remove(&(src, dst)))
        else {
            return;
        };
        let mut rst = self.pool.get();
        if raw::rst_for_syn(&syn, &mut rst) && self.device.tx_channel().try_send(rst).is_ok() {
            trace!(%src, %dst, "routed connection refused");
        }
        self.spare.push(syn);
    }

    /// Routed connections whose handshake finished become streams for the forwarder.
    fn pump_accepting(&mut self, now: Instant) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        intake.expire(now, &mut self.spare);
        let mut i = 0;
        while i < intake.accepting.len() {
            let a = &intake.accepting[i];
            let sock = self.sockets.get_mut::<tcp::Socket>(a.handle);
            let state = sock.state();
            let waiting = matches!(state, tcp::State::Listen | tcp::State::SynReceived);
            // Still listening after a poll since its SYN was queued, and the SYN is no longer
            // queued (smoltcp takes nothing while WireGuard's queue is full): it was not taken.
            let missed = state == tcp::State::Listen
                && self.polls > a.injected_at + 1
                && !self.device.rx.iter().any(|p| {
                    raw::inspect(p)
                        .is_some_and(|h| h.syn && h.src_addr() == a.src && h.dst_addr() == a.dst)
                });
            if waiting && !missed && !a.reply.is_closed() && !intake.hold_expired(a, now) {
                i += 1;
                continue;
            }
            let a = intake.accepting.swap_remove(i);
            let established = !waiting && state != tcp::State::Closed && !a.reply.is_closed();
            let shared = Shared::new(self.config.ring, self.wake.clone());
            let mut conn = Conn::new(a.handle, shared.clone(), a.dst, a.src);
            conn.routed = true;
            if !established {
                // Given up: a RST goes out with the next poll (a half-open client learns at
                // once), then the socket, its flow and its buffers go (`pump`).
                let _ = a.reply.send(Err(ConnectError::Refused));
                conn.abort(self.sockets.get_mut::<tcp::Socket>(a.handle), self.polls);
                self.conns.push(conn);
                continue;
            }
            let stream = TcpStream::new(shared, a.dst, a.src);
            if a.reply.send(Ok(stream)).is_err() {
                conn.abort(self.sockets.get_mut::<tcp::Socket>(a.handle), self.polls);
            }
            self.conns.push(conn);
        }
        // Accepts that waited for their destination's listening socket to be taken.
        let deferred = std::mem::take(&mut intake.deferred);
        for (src, dst, reply) in deferred {
            if reply.is_closed() {
                if let Some((syn, _)) = self
                    .intake
                    .as_mut()
                    .and_then(|i| i.held.remove(&(src, dst)))
                {
                    self.spare.push(syn);
                }
                continue;
            }
            self.accept_routed(src, dst, reply);
        }
    }

    /// Stop routing: held SYNs go back to the pool, half-open routed sockets are reset and
    /// freed (a stale one would otherwise listen on its destination for ever); established
    /// routed connections end with their users.
    fn drop_intake(&mut self) {
        let Some(intake) = self.intake.take() else {
            return;
        };
        self.spare.extend(intake.held.into_values().map(|(p, _)| p));
        for a in intake.accepting {
            let _ = a.reply.send(Err(ConnectError::Stopped));
            let mut conn = Conn::new(
                a.handle,
                Shared::new(self.config.ring, self.wake.clone()),
                a.dst,
                a.src,
            );
            conn.routed = true;
            conn.abort(self.sockets.get_mut::<tcp::Socket>(a.handle), self.polls);
            self.conns.push(conn);
        }
        for (_, _, reply) in intake.deferred {
            let _ = reply.send(Err(ConnectError::Stopped));
        }
    }

    /// Fail every user-visible object so that nothing waits on a stopped stack.
    fn shutdown(&mut self) {
        for conn in self.conns.drain(..) {
            if let Some(reply) = conn.connecting {
                let _ = reply.send(Err(ConnectError::Stopped));
            }
            conn.shared.lock().fail(io::ErrorKind::ConnectionAborted);
        }
        for entry in self.udp.drain(..) {
            let mut st = entry.shared.lock();
            st.closed = true;
            if let Some(w) = st.rx_waker.take() {
                w.wake();
            }
        }
        self.listeners.clear();
        if let Some(intake) = self.intake.take() {
            for a in intake.accepting {
                let _ = a.reply.send(Err(ConnectError::Stopped));
            }
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { remote, reply } => {
                if reply.is_closed() {
                    return;
                }
                match self.start_connect(remote) {
                    Ok(mut conn) => {
                        conn.connecting = Some(reply);
                        self.conns.push(conn);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Listen { port, reply } => {
                let _ = reply.send(self.start_listen(port));
            }
            Command::UdpBind { port, gated, reply } => {
                let _ = reply.send(self.udp_bind(port, gated));
            }
            Command::ServeRoutes { queue, reply } => {
                let (tx, rx) = mpsc::channel(queue.max(1));
                if reply.send(rx).is_ok() {
                    self.drop_intake();
                    self.intake = Some(Intake::new(tx));
                }
            }
            Command::AcceptRouted { src, dst, reply } => self.accept_routed(src, dst, reply),
            Command::RejectRouted { src, dst } => self.reject_routed(src, dst),
        }
    }

    /// A TCP socket with buffers from the budget; None when the cap is reached.
    fn new_tcp_socket(&mut self) -> Option<tcp::Socket<'static>> {
        let size = self.buffers.take(self.config.tcp_buffer)?;
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
        );
        tune_tcp_socket(&mut sock, self.config.congestion);
        Some(sock)
    }

    fn buffer_cap_error(&self) -> ConnectError {
        ConnectError::BufferCap {
            reserved_mib: self.buffers.reserved >> 20,
            cap_mib: self.buffers.cap >> 20,
        }
    }

    /// Remove a TCP socket and give its buffers back to the budget.
    fn remove_tcp_socket(&mut self, handle: SocketHandle) {
        let size = self.sockets.get::<tcp::Socket>(handle).recv_capacity();
        self.sockets.remove(handle);
        self.buffers.give_back(size);
    }

    fn alloc_port(&mut self) -> Option<u16> {
        let span = EPHEMERAL.end() - EPHEMERAL.start() + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            if self.ports_in_use.insert(port) {
                return Some(port);
            }
        }
        None
    }

    fn start_connect(&mut self, remote: SocketAddr) -> Result<Conn, ConnectError> {
        let src = self
            .config
            .addresses
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv4() == remote.is_ipv4())
            .ok_or(ConnectError::NoSourceAddress)?;
        let Some(mut sock) = self.new_tcp_socket() else {
            return Err(self.buffer_cap_error());
        };
        let Some(port) = self.alloc_port() else {
            self.buffers.give_back(sock.recv_capacity());
            return Err(ConnectError::NoPorts);
        };
        let local = IpListenEndpoint {
            addr: Some(IpAddress::from(src)),
            port,
        };
        if let Err(e) = sock.connect(self.iface.context(), to_endpoint(remote), local) {
            self.ports_in_use.remove(&port);
            self.buffers.give_back(sock.recv_capacity());
            debug!(%remote, "connect: {e:?}");
            return Err(ConnectError::Refused);
        }
        let handle = self.sockets.add(sock);
        trace!(%remote, port, "connecting");
        Ok(Conn::new(
            handle,
            Shared::new(self.config.ring, self.wake.clone()),
            SocketAddr::new(src, port),
            remote,
        ))
    }

    fn start_listen(&mut self, port: u16) -> Result<TcpListener, ConnectError> {
        // A listener dropped just now is not in the way.
        self.reap_closed_listeners();
        if port == 0 || self.listeners.iter().any(|l| l.port == port) {
            return Err(ConnectError::PortInUse(port));
        }
        // Connections handed over but not yet accepted: as many as the SYN backlog.
        let (tx, rx) = mpsc::channel(MAX_BACKLOG);
        let mut listener = Listener {
            port,
            sockets: Vec::new(),
            accepted: tx,
            pending_syns: 0,
        };
        // At least one listening socket, or no listener; the rest are topped up as the budget
        // allows (`pump_listeners`).
        let first = self
            .new_listen_socket(port)
            .ok_or_else(|| self.buffer_cap_error())?;
        listener.sockets.push(first);
        self.listeners.push(listener);
        Ok(TcpListener { port, incoming: rx })
    }

    fn new_listen_socket(&mut self, port: u16) -> Option<SocketHandle> {
        let mut sock = self.new_tcp_socket()?;
        // On our one address when there is one (NetBird's case), so that a routed connection
        // to the same port elsewhere never meets this socket; on every address otherwise.
        let addr = match self.config.addresses.as_slice() {
            [one] => Some(IpAddress::from(one.addr())),
            _ => None,
        };
        sock.listen(IpListenEndpoint { addr, port })
            .expect("port is non-zero and socket is fresh");
        Some(self.sockets.add(sock))
    }

    fn udp_bind(&mut self, port: Option<u16>, gated: bool) -> Result<UdpSocket, ConnectError> {
        let port = match port {
            None => self.alloc_port().ok_or(ConnectError::NoPorts)?,
            Some(p) if p != 0 && self.ports_in_use.insert(p) => p,
            Some(p) => return Err(ConnectError::PortInUse(p)),
        };
        let meta = || vec![udp::PacketMetadata::EMPTY; UDP_QUEUE];
        // Each pump moves what smoltcp holds to the socket's own queue, so its rings only
        // bridge one poll. Receiving, one poll may hand a socket a whole batch (RX_BATCH
        // packets) before the pump runs: the ring holds that many full-size datagrams (its
        // pages are touched only as it fills). Sending, our queue waits for room: small.
        let mut sock = udp::Socket::new(
            udp::PacketBuffer::new(meta(), vec![0; RX_BATCH * self.config.mtu]),
            udp::PacketBuffer::new(meta(), vec![0; UDP_TX_RING]),
        );
        if sock.bind(port).is_err() {
            self.ports_in_use.remove(&port);
            return Err(ConnectError::NoPorts);
        }
        let handle = self.sockets.add(sock);
        let shared = UdpShared::new(self.wake.clone(), self.pool.clone(), self.config.mtu);
        self.udp.push(UdpEntry {
            handle,
            shared: shared.clone(),
            port,
            gated,
        });
        Ok(UdpSocket::new(shared, port))
    }

    /// Move bytes and state between smoltcp sockets and their users; retire finished sockets.
    fn pump(&mut self, now: Instant) {
        // Listeners first: a connection accepted now may already hold data (it came with the
        // handshake's last ACK, in the same poll), and nothing else may wake the task to move
        // it if it waited for the next pump.
        self.pump_listeners();
        if self
            .intake
            .as_ref()
            .is_some_and(|i| i.to_forwarder.is_closed())
        {
            // The forwarder is gone: routing stops; its open connections end with their users.
            self.drop_intake();
        }
        self.pump_accepting(now);
        let mut i = 0;
        while i < self.conns.len() {
            let handle = self.conns[i].handle;
            let keep = pump_conn(
                &mut self.conns[i],
                self.sockets.get_mut::<tcp::Socket>(handle),
                now,
                self.config.linger,
                self.polls,
            );
            if keep {
                i += 1;
            } else {
                let conn = self.conns.swap_remove(i);
                self.remove_tcp_socket(conn.handle);
                if conn.routed {
                    if let Some(intake) = self.intake.as_mut() {
                        intake.flows.remove(&(conn.remote, conn.local));
                    }
                } else {
                    self.ports_in_use.remove(&conn.local.port());
                }
            }
        }
        self.pump_udp();
    }

    /// Remove the listeners whose `TcpListener` was dropped, with their listening sockets.
    fn reap_closed_listeners(&mut self) {
        let (closed, open) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| l.accepted.is_closed());
        self.listeners = open;
        for l in closed {
            for h in l.sockets {
                self.remove_tcp_socket(h);
            }
        }
    }

    /// Give every listened port a free listening socket for each SYN waiting in the device
    /// (up to `MAX_BACKLOG` sockets), so a burst of connections is not answered with resets.
    /// A SYN still queued from an earlier pass is counted again, but so is the socket made for
    /// it then (still listening until the SYN is delivered): only the shortfall is made. A
    /// retransmitted SYN of a half-open connection may add one spare, dropped after accept.
    fn listen_for_syns(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        for packet in &self.device.rx {
            let Some(port) = syn_destination_port(packet) else {
                continue;
            };
            if let Some(l) = self.listeners.iter_mut().find(|l| l.port == port) {
                l.pending_syns += 1;
            }
        }
        for li in 0..self.listeners.len() {
            let wanted = std::mem::take(&mut self.listeners[li].pending_syns);
            if wanted == 0 {
                continue;
            }
            let port = self.listeners[li].port;
            let free = self.listeners[li]
                .sockets
                .iter()
                .filter(|h| self.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Listen)
                .count();
            for _ in free..wanted {
                if self.listeners[li].sockets.len() >= MAX_BACKLOG {
                    break;
                }
                match self.new_listen_socket(port) {
                    Some(h) => self.listeners[li].sockets.push(h),
                    None => break,
                }
            }
        }
    }

    fn pump_listeners(&mut self) {
        self.reap_closed_listeners();
        for li in 0..self.listeners.len() {
            let port = self.listeners[li].port;
            // Top up to the backlog: sockets that could not be replaced under the buffer cap.
            while self.listeners[li].sockets.len() < self.config.backlog {
                match self.new_listen_socket(port) {
                    Some(h) => self.listeners[li].sockets.push(h),
                    None => break,
                }
            }
            let mut si = 0;
            while si < self.listeners[li].sockets.len() {
                let h = self.listeners[li].sockets[si];
                let sock = self.sockets.get_mut::<tcp::Socket>(h);
                match sock.state() {
                    tcp::State::Listen | tcp::State::SynReceived => {
                        si += 1;
                        continue;
                    }
                    tcp::State::Closed => {
                        // A handshake that failed: listen again on the same socket.
                        let _ = sock.listen(port);
                        si += 1;
                        continue;
                    }
                    _ => {}
                }
                let (Some(local), Some(remote)) = (sock.local_endpoint(), sock.remote_endpoint())
                else {
                    si += 1;
                    continue;
                };
                let shared = Shared::new(self.config.ring, self.wake.clone());
                let local = from_endpoint(local);
                let remote = from_endpoint(remote);
                let stream = TcpStream::new(shared.clone(), local, remote);
                // Replaced while the port has no more than its backlog; past it (a burst's
                // extra sockets) or under the buffer cap, the slot goes (the top-up refills).
                let replacement = if self.listeners[li].sockets.len() <= self.config.backlog {
                    self.new_listen_socket(port)
                } else {
                    None
                };
                match replacement {
                    Some(replacement) => {
                        self.listeners[li].sockets[si] = replacement;
                        si += 1;
                    }
                    None => {
                        self.listeners[li].sockets.swap_remove(si);
                    }
                }
                let conn = Conn::new(h, shared, local, remote);
                if self.listeners[li].accepted.try_send(stream).is_err() {
                    // Accept queue full: the stream was dropped, so the connection closes.
                    debug!(port, %remote, "accept queue full");
                }
                self.conns.push(conn);
            }
        }
    }

    fn pump_udp(&mut self) {
        let mut i = 0;
        while i < self.udp.len() {
            let entry = &self.udp[i];
            let sock = self.sockets.get_mut::<udp::Socket>(entry.handle);
            let mut st = entry.shared.lock();
            // A datagram smoltcp has no room for yet stays first in our queue (the poll
            // drains smoltcp's ring, and the next pump goes on): nothing is dropped here.
            while let Some((to, data)) = st.tx.pop_front() {
                match sock.send_slice(&data, to_endpoint(to)) {
                    Ok(()) => entry.shared.pool.put(data),
                    Err(udp::SendError::BufferFull) => {
                        st.tx.push_front((to, data));
                        break;
                    }
                    Err(e) => {
                        debug!(%to, "udp send: {e:?}");
                        st.tx_failed += 1;
                        entry.shared.pool.put(data);
                    }
                }
            }
            if st.dropped {
                // As a kernel socket's: what was sent before the close still goes out; the
                // socket goes once both queues are empty.
                let flushed = st.tx.is_empty() && sock.send_queue() == 0;
                drop(st);
                if flushed {
                    let e = self.udp.swap_remove(i);
                    self.sockets.remove(e.handle);
                    self.ports_in_use.remove(&e.port);
                } else {
                    i += 1;
                }
                continue;
            }
            // With our queue full, what smoltcp holds stays there until the reader catches
            // up; only a full smoltcp ring drops (as a full kernel socket buffer does).
            let mut got = false;
            while st.rx.len() < UDP_QUEUE {
                let Ok((data, meta)) = sock.recv() else { break };
                let data = entry.shared.copy(data);
                st.rx.push_back((from_endpoint(meta.endpoint), data));
                got = true;
            }
            st.rx_dropped = sock.rx_dropped();
            if got && let Some(w) = st.rx_waker.take() {
                w.wake();
            }
            drop(st);
            i += 1;
        }
    }
}

/// Pump one connection; returns false when its socket is finished and can be removed.
fn pump_conn(
    conn: &mut Conn,
    sock: &mut tcp::Socket,
    now: Instant,
    linger: Duration,
    polls: u64,
) -> bool {
    if let Some(at) = conn.aborted_at {
        // Removed once a poll has put the RST on the wire.
        return polls <= at;
    }
    if let Some(reply) = &conn.connecting {
        if reply.is_closed() {
            // The dialler gave up (timeout or its client left).
            return conn.abort(sock, polls);
        }
        match sock.state() {
            tcp::State::SynSent | tcp::State::SynReceived => return true,
            tcp::State::Closed => {
                let reply = conn.connecting.take().expect("checked above");
                let _ = reply.send(Err(ConnectError::Refused));
                return false;
            }
            _ => {
                let reply = conn.connecting.take().expect("checked above");
                let stream = TcpStream::new(conn.shared.clone(), conn.local, conn.remote);
                trace!(remote = %conn.remote, "connected");
                if reply.send(Ok(stream)).is_err() {
                    return conn.abort(sock, polls);
                }
            }
        }
    }

    let mut st = conn.shared.lock();

    // User → socket.
    let mut sent = false;
    while !st.tx.is_empty() && sock.can_send() {
        let (a, _) = st.tx.as_slices();
        match sock.send_slice(a) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                st.tx.drain(..n);
                sent = true;
            }
        }
    }
    if sent {
        st.wake_writer();
    }
    if (st.tx_shutdown || st.dropped) && st.tx.is_empty() {
        sock.close();
    }

    // Socket → user.
    if st.dropped {
        while sock.can_recv() {
            let _ = sock.recv(|d| (d.len(), ()));
        }
    } else {
        let mut received = false;
        while sock.can_recv() && st.rx.len() < st.ring_cap {
            let room = st.ring_cap - st.rx.len();
            let got = sock.recv(|d| {
                let n = d.len().min(room);
                st.rx.extend(&d[..n]);
                (n, n)
            });
            match got {
                Ok(0) | Err(_) => break,
                Ok(_) => received = true,
            }
        }
        st.task_wants_rx_room = sock.can_recv();
        if received {
            st.wake_reader();
        }
    }

    // End of stream and failures.
    let state = sock.state();
    if matches!(
        state,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    ) {
        conn.peer_fin = true;
    }
    if conn.peer_fin && !st.rx_eof && !sock.can_recv() {
        // Every byte before the remote's FIN is in the ring.
        st.rx_eof = true;
        st.wake_reader();
    }
    if state == tcp::State::Closed {
        // Closed after both FINs (LAST-ACK done) is a clean end; anything else (a RST, the
        // timeout) fails the stream, after the bytes and any EOF already received.
        let clean = conn.peer_fin && (st.tx_shutdown || st.dropped) && st.tx.is_empty();
        if !clean {
            st.fail(io::ErrorKind::ConnectionReset);
        }
    }

    // A finished socket may still hold received bytes that did not fit the user's ring: it
    // stays until they have been moved (the user's reads wake the task).
    let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
        && (st.dropped || !sock.can_recv());
    let dropped = st.dropped;
    drop(st);
    if dropped && !finished {
        let deadline = *conn
            .linger_until
            .get_or_insert(now + SmolDuration::from(linger));
        if now >= deadline {
            return conn.abort(sock, polls);
        }
    }
    // The user keeps its rings; the socket itself is done.
    !finished
}

fn to_endpoint(addr: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(IpAddress::from(addr.ip()), addr.port())
}

fn from_endpoint(ep: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ep.addr), ep.port)
}

async fn sleep_opt(delay: Option<SmolDuration>) {
    match delay {
        Some(d) => tokio::time::sleep(Duration::from_micros(d.total_micros())).await,
        None => std::future::pending().await,
    }
}

/// The destination port of a TCP SYN (without ACK) in an IPv4 or IPv6 packet, read in place.
fn syn_destination_port(packet: &[u8]) -> Option<u16> {
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
    let segment = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp).then_some(())?;
            &packet[usize::from(ip.header_len())..]
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp).then_some(())?;
            &packet[ip.header_len()..]
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(segment).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| tcp.dst_port())
}

#[cfg(test)]
mod tests {
    //! Two netstacks wired back to back (A's outbound packets are B's inbound and vice versa):
    //! the whole TCP/UDP machinery without WireGuard or sockets.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const A: &str = "100.64.0.1";
    const B: &str = "100.64.0.2";

    fn pair() -> (Netstack, Netstack, CancellationToken) {
        pair_with_linger(Duration::from_secs(30))
    }

    fn pair_with_linger(linger: Duration) -> (Netstack, Netstack, CancellationToken) {
        pair_with(|c| NetstackConfig { linger, ..c })
    }

    /// A pair whose configurations `adjust` changes from the defaults.
    fn pair_with(
        adjust: impl Fn(NetstackConfig) -> NetstackConfig,
    ) -> (Netstack, Netstack, CancellationToken) {
        let pool = Arc::new(PacketPool::new(1500, 64));
        let (a_out, b_in) = mpsc::channel(256);
        let (b_out, a_in) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let config = |ip: &str| {
            adjust(NetstackConfig::new(
                vec![format!("{ip}/16").parse().unwrap()],
                1420,
            ))
        };
        let (a, task_a) = Netstack::new(config(A), a_in, a_out, pool.clone(), cancel.clone());
        let (b, task_b) = Netstack::new(config(B), b_in, b_out, pool, cancel.clone());
        tokio::spawn(task_a);
        tokio::spawn(task_b);
        (a, b, cancel)
    }

    fn addr(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    /// Carry packets from `from` to `to`, dropping every `drop_every`-th and swapping every
    /// `swap_every`-th with the one after it (loss and reordering, deterministic).
    fn lossy_link(
        mut from: mpsc::Receiver<Vec<u8>>,
        to: mpsc::Sender<Vec<u8>>,
        drop_every: u64,
        swap_every: u64,
    ) {
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut held: Option<Vec<u8>> = None;
            while let Some(p) = from.recv().await {
                n += 1;
                if n.is_multiple_of(drop_every) {
                    continue;
                }
                if n.is_multiple_of(swap_every) && held.is_none() {
                    held = Some(p);
                    continue;
                }
                if to.send(p).await.is_err() {
                    return;
                }
                if let Some(h) = held.take()
                    && to.send(h).await.is_err()
                {
                    return;
                }
            }
        });
    }

    /// A pair whose links lose and reorder packets both ways.
    fn lossy_pair(drop_every: u64, swap_every: u64) -> (Netstack, Netstack, CancellationToken) {
        let pool = Arc::new(PacketPool::new(1500, 64));
        let (a_out, a_link) = mpsc::channel(256);
        let (a_link_out, b_in) = mpsc::channel(256);
        let (b_out, b_link) = mpsc::channel(256);
        let (b_link_out, a_in) = mpsc::channel(256);
        lossy_link(a_link, a_link_out, drop_every, swap_every);
        lossy_link(b_link, b_link_out, drop_every + 4, swap_every + 2);
        let cancel = CancellationToken::new();
        let config =
            |ip: &str| NetstackConfig::new(vec![format!("{ip}/16").parse().unwrap()], 1420);
        let (a, task_a) = Netstack::new(config(A), a_in, a_out, pool.clone(), cancel.clone());
        let (b, task_b) = Netstack::new(config(B), b_in, b_out, pool, cancel.clone());
        tokio::spawn(task_a);
        tokio::spawn(task_b);
        (a, b, cancel)
    }

    /// Loss recovery (our smoltcp patch: SACK scoreboard, NewReno partial ACKs, 200 ms minimum
    /// RTO) must deliver every byte in order through 2 % loss and reordering both ways; the
    /// 60 s bound only catches a stall.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_survive_loss_and_reordering_both_ways() {
        let (a, b, cancel) = lossy_pair(50, 17);
        let mut listener = b.listen(90).await.unwrap();
        const LEN: usize = 2 << 20;
        let data: Vec<u8> = (0..LEN as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let expect = data.clone();
        let server = tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            let mut got = Vec::with_capacity(LEN);
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.shutdown().await.unwrap();
            got
        });
        let work = async {
            let c = a.connect(addr(B, 90)).await.unwrap();
            let (mut r, mut w) = tokio::io::split(c);
            let writer = async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let reader = async move {
                let mut back = Vec::with_capacity(LEN);
                r.read_to_end(&mut back).await.unwrap();
                back
            };
            let ((), back) = tokio::join!(writer, reader);
            (server.await.unwrap(), back)
        };
        let (there, back) = tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .expect("transfer stalled");
        assert!(there == expect, "bytes arrived altered");
        assert!(back == expect, "bytes came back altered");
        cancel.cancel();
    }

    #[test]
    fn the_buffer_budget_hands_out_full_sizes_then_the_floor_and_takes_them_back() {
        const FULL: usize = 4 << 20;
        const RING: usize = 64 << 10;
        let cost = |size| 2 * (size + RING);
        let mut budget = BufferBudget {
            full_limit: 2 * cost(FULL) + cost(FULL) / 2,
            cap: 2 * cost(FULL) + 3 * cost(TCP_BUFFER_FLOOR),
            ring: RING,
            reserved: 0,
        };
        assert_eq!(budget.take(FULL), Some(FULL));
        assert_eq!(budget.take(FULL), Some(FULL));
        // Room for half a socket more: the third gets the floor, and so do the next two.
        assert_eq!(budget.take(FULL), Some(TCP_BUFFER_FLOOR));
        assert_eq!(budget.reserved, 2 * cost(FULL) + cost(TCP_BUFFER_FLOOR));
        assert_eq!(budget.take(FULL), Some(TCP_BUFFER_FLOOR));
        assert_eq!(budget.take(FULL), Some(TCP_BUFFER_FLOOR));
        // The cap: nothing more, and nothing reserved for the refusal.
        assert_eq!(budget.take(FULL), None);
        assert_eq!(budget.reserved, budget.cap);
        budget.give_back(FULL);
        budget.give_back(TCP_BUFFER_FLOOR);
        assert_eq!(
            budget.take(FULL),
            Some(FULL),
            "a closed socket's share is free again"
        );
        // A configured size below the floor is never raised.
        budget.give_back(FULL);
        assert_eq!(budget.take(1024), Some(1024));
    }

    #[tokio::test]
    async fn connections_beyond_the_buffer_budget_still_carry_data() {
        // No budget at all: every socket, listening ones too, gets the floor.
        let (a, b, cancel) = pair_with(|c| NetstackConfig {
            tcp_buffer_budget: 0,
            ..c
        });
        echo_a_reversed_megabyte(&a, &b, 80).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn listen_accept_and_move_a_megabyte_each_way_with_half_close() {
        let (a, b, cancel) = pair();
        echo_a_reversed_megabyte(&a, &b, 80).await;
        cancel.cancel();
    }

    /// B listens on `port` and echoes what A sends, reversed, after A's FIN (half-close keeps
    /// the other way open); 1 MiB each way, checked.
    async fn echo_a_reversed_megabyte(a: &Netstack, b: &Netstack, port: u16) {
        let mut listener = b.listen(port).await.unwrap();
        assert!(matches!(
            b.listen(port).await,
            Err(ConnectError::PortInUse(p)) if p == port
        ));
        let server = tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            assert_eq!(s.local_addr(), addr(B, port));
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // Echo reversed after the client's FIN: proves half-close keeps the other way open.
            got.reverse();
            s.write_all(&got).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut c = a.connect(addr(B, port)).await.unwrap();
        assert_eq!(c.peer_addr(), addr(B, port));
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        back.reverse();
        assert_eq!(back, data);
        server.await.unwrap();
    }

    /// Connection churn over a lossy, reordering link, as the soak benchmark found it: each
    /// round a new connection; the server echoes, then shuts down; the client reads to EOF.
    /// Caught two smoltcp faults (vendor/smoltcp/PATCHES.md items 8 and 9): a lost FIN never
    /// resent (the client waits for ever) and a retransmitted SYN taken by a second listening
    /// socket (a reset); and one of ours: a connection accepted with data already in its socket
    /// was first pumped only at the next wake, which in a quiet moment never came.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn churn_of_echo_rounds_over_a_lossy_link_always_ends_in_eof() {
        let (a, b, cancel) = lossy_pair(50, 17);
        let mut listener = b.listen(91).await.unwrap();
        tokio::spawn(async move {
            while let Some(mut s) = listener.accept().await {
                tokio::spawn(async move {
                    let mut len = [0u8; 8];
                    s.read_exact(&mut len).await.unwrap();
                    let mut data = vec![0u8; u64::from_be_bytes(len) as usize];
                    s.read_exact(&mut data).await.unwrap();
                    s.write_all(&data).await.unwrap();
                    s.shutdown().await.unwrap();
                    // Hold the (half-closed) stream until the client is done.
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                });
            }
        });
        let workers: Vec<_> = (0..16u64)
            .map(|w| {
                let a = a.clone();
                tokio::spawn(async move {
                    let mut seed = w + 1;
                    for round in 0..40 {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let len = 1024 + (seed % (127 * 1024)) as usize;
                        let mut c = a.connect(addr(B, 91)).await.unwrap();
                        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                        c.write_all(&(len as u64).to_be_bytes()).await.unwrap();
                        c.write_all(&data).await.unwrap();
                        let mut back = Vec::new();
                        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut back))
                            .await
                            .unwrap_or_else(|_| {
                                panic!(
                                    "worker {w} round {round}: no EOF after {} of {len}",
                                    back.len()
                                )
                            })
                            .unwrap_or_else(|e| {
                                panic!(
                                    "worker {w} round {round}: {e} after {} of {len}",
                                    back.len()
                                )
                            });
                        assert_eq!(back.len(), len);
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_burst_of_connections_beyond_the_backlog_is_accepted_not_reset() {
        // 100 connects at once against a backlog of 8: every SYN finds a listening socket.
        let (a, b, cancel) = pair();
        let mut listener = b.listen(90).await.unwrap();
        let server = tokio::spawn(async move {
            let mut accepted = Vec::new();
            for _ in 0..100 {
                let mut s = listener.accept().await.unwrap();
                s.write_all(b"hi").await.unwrap();
                accepted.push(s);
            }
            accepted
        });
        let clients: Vec<_> = (0..100)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move {
                    let mut c = a.connect(addr(B, 90)).await?;
                    let mut hi = [0u8; 2];
                    c.read_exact(&mut hi).await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hi)
                })
            })
            .collect();
        for c in clients {
            assert_eq!(&c.await.unwrap().unwrap(), b"hi");
        }
        assert_eq!(server.await.unwrap().len(), 100);
        cancel.cancel();
    }

    #[test]
    fn syn_ports_are_read_from_ipv4_and_ipv6_packets_and_nothing_else() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, Ipv6Address, Ipv6Packet, Ipv6Repr,
            TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
        };
        let tcp = |control, ack| TcpRepr {
            src_port: 50000,
            dst_port: 80,
            control,
            seq_number: TcpSeqNumber(1),
            ack_number: ack,
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let caps = ChecksumCapabilities::default();
        let v4 = |t: TcpRepr| {
            let ip = Ipv4Repr {
                src_addr: Ipv4Address::new(100, 64, 0, 2),
                dst_addr: Ipv4Address::new(100, 64, 0, 1),
                next_header: IpProtocol::Tcp,
                payload_len: t.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ip.buffer_len() + t.buffer_len()];
            let mut p = Ipv4Packet::new_unchecked(&mut buf);
            ip.emit(&mut p, &caps);
            t.emit(
                &mut TcpPacket::new_unchecked(p.payload_mut()),
                &ip.src_addr.into(),
                &ip.dst_addr.into(),
                &caps,
            );
            buf
        };
        let v6 = |t: TcpRepr| {
            let ip = Ipv6Repr {
                src_addr: Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
                dst_addr: Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
                next_header: IpProtocol::Tcp,
                payload_len: t.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ip.buffer_len() + t.buffer_len()];
            let mut p = Ipv6Packet::new_unchecked(&mut buf);
            ip.emit(&mut p);
            t.emit(
                &mut TcpPacket::new_unchecked(p.payload_mut()),
                &ip.src_addr.into(),
                &ip.dst_addr.into(),
                &caps,
            );
            buf
        };
        let syn = tcp(TcpControl::Syn, None);
        let syn_ack = tcp(TcpControl::Syn, Some(TcpSeqNumber(5)));
        let ack = tcp(TcpControl::None, Some(TcpSeqNumber(5)));
        assert_eq!(syn_destination_port(&v4(syn)), Some(80));
        assert_eq!(syn_destination_port(&v6(syn)), Some(80));
        assert_eq!(syn_destination_port(&v4(syn_ack)), None);
        assert_eq!(syn_destination_port(&v6(ack)), None);
        let truncated = v4(syn);
        assert_eq!(syn_destination_port(&truncated[..30]), None);
        assert_eq!(syn_destination_port(&[]), None);
        assert_eq!(syn_destination_port(&[0x45; 3]), None);
    }

    #[tokio::test]
    async fn closed_port_is_refused_and_reset_is_reported() {
        let (a, b, cancel) = pair();
        assert!(matches!(
            a.connect(addr(B, 81)).await,
            Err(ConnectError::Refused)
        ));
        // No mesh address of the destination's family.
        assert!(matches!(
            a.connect("[fd00::2]:80".parse().unwrap()).await,
            Err(ConnectError::NoSourceAddress)
        ));
        let mut listener = b.listen(82).await.unwrap();
        let c = a.connect(addr(B, 82)).await.unwrap();
        let s = listener.accept().await.unwrap();
        drop(c);
        // The client's FIN arrives as a clean end of stream.
        let mut s = s;
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        cancel.cancel();
    }

    /// B routes: A's connections to a LAN address are held until B's "forwarder" answers;
    /// accepted ones carry bytes both ways from the LAN address, refused ones get a RST; a
    /// LAN port B also listens on locally is not taken by the local listener.
    #[tokio::test]
    async fn a_routing_peer_holds_the_syn_until_the_forwarder_answers() {
        let (a, b, cancel) = pair();
        // Without a forwarder, routed packets are dropped: the connect times out.
        assert!(
            tokio::time::timeout(
                Duration::from_millis(300),
                a.connect(addr("198.19.1.10", 80))
            )
            .await
            .is_err()
        );
        assert!(b.gate_counters().not_routed.load(Ordering::Relaxed) > 0);
        let mut flows = b.serve_routes(8).await.unwrap();
        let acl = crate::control::management::RouteFirewallRule {
            source_ranges: vec![format!("{A}/32")],
            destination: "198.19.1.0/24".into(),
            protocol: 2,
            ..Default::default()
        };
        b.set_route_acl(crate::firewall::RouteAcl::from_wire(&[acl], true).0);
        let _local = b.listen(80).await.unwrap();
        let b2 = b.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(flow) = flows.recv().await {
                let RoutedFlow::Tcp { src, dst } = flow else {
                    continue;
                };
                if dst.port() == 81 {
                    b2.reject_routed(src, dst).await;
                    continue;
                }
                let mut s = b2.accept_routed(src, dst).await.unwrap();
                assert_eq!(s.local_addr(), dst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 5];
                    s.read_exact(&mut buf).await.unwrap();
                    s.write_all(format!("{}", dst.ip()).as_bytes())
                        .await
                        .unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let mut c = a.connect(addr("198.19.1.10", 80)).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "198.19.1.10");
        assert!(matches!(
            a.connect(addr("198.19.1.10", 81)).await,
            Err(ConnectError::Refused)
        ));
        // Denied by the route ACL (UDP is not allowed, another prefix neither): dropped.
        let denied = b.gate_counters().denied_routed.load(Ordering::Relaxed);
        assert!(
            tokio::time::timeout(
                Duration::from_millis(300),
                a.connect(addr("198.19.2.10", 80))
            )
            .await
            .is_err()
        );
        assert!(b.gate_counters().denied_routed.load(Ordering::Relaxed) > denied);
        // The mesh's own network is never routed.
        assert!(
            tokio::time::timeout(
                Duration::from_millis(300),
                a.connect(addr("100.64.9.9", 80))
            )
            .await
            .is_err()
        );
        cancel.cancel();
        let _ = forwarder.await;
    }

    /// Many connections at once to one routed destination: each is handed to the socket of
    /// its own SYN (smoltcp gives a SYN to the first socket listening on the endpoint, so the
    /// stack lets only one listen there at a time), never cross-wired.
    #[tokio::test]
    async fn concurrent_routed_connections_to_one_destination_are_not_cross_wired() {
        let (a, b, cancel) = pair();
        let mut flows = b.serve_routes(256).await.unwrap();
        let acl = crate::control::management::RouteFirewallRule {
            source_ranges: vec!["0.0.0.0/0".into()],
            destination: "0.0.0.0/0".into(),
            protocol: 1,
            ..Default::default()
        };
        b.set_route_acl(crate::firewall::RouteAcl::from_wire(&[acl], true).0);
        let b2 = b.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(flow) = flows.recv().await {
                let RoutedFlow::Tcp { src, dst } = flow else {
                    continue;
                };
                let b3 = b2.clone();
                tokio::spawn(async move {
                    // Answer each with the source port its stream says it has.
                    let mut s = b3.accept_routed(src, dst).await.unwrap();
                    let said = s.peer_addr().port().to_string();
                    assert_eq!(said, src.port().to_string());
                    s.write_all(said.as_bytes()).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let mut clients = Vec::new();
        for _ in 0..64 {
            let a = a.clone();
            clients.push(tokio::spawn(async move {
                let mut c = a.connect(addr("198.19.1.10", 80)).await.unwrap();
                let mut got = String::new();
                c.read_to_string(&mut got).await.unwrap();
                assert_eq!(got, c.local_addr().port().to_string(), "its own stream");
            }));
        }
        for c in clients {
            tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .unwrap()
                .unwrap();
        }
        cancel.cancel();
        let _ = forwarder.await;
    }

    /// ICMP echo to our address is answered while the peer ACL allows it, dropped once
    /// management's rules leave the sender out.
    #[tokio::test]
    async fn echo_requests_follow_the_peer_acl() {
        let pool = Arc::new(PacketPool::new(1500, 8));
        let (to_stack, from_wg) = mpsc::channel(8);
        let (to_wg, mut out) = mpsc::channel(8);
        let cancel = CancellationToken::new();
        let config = NetstackConfig::new(vec![format!("{B}/16").parse().unwrap()], 1420);
        let (b, task) = Netstack::new(config, from_wg, to_wg, pool, cancel.clone());
        tokio::spawn(task);
        let mut echo = Vec::new();
        // An echo request is an echo reply's mirror: build a reply from A to B, flip its type.
        assert!(raw::echo_reply_v4(
            A.parse().unwrap(),
            B.parse().unwrap(),
            9,
            1,
            b"ping",
            &mut echo
        ));
        let at = 20;
        echo[at] = 8;
        echo[at + 2] = 0;
        echo[at + 3] = 0;
        let sum = {
            let mut acc = 0u32;
            for c in echo[at..].chunks(2) {
                acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            !(acc as u16)
        };
        echo[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
        assert!(raw::inspect(&echo).unwrap().echo_request);
        to_stack.send(echo.clone()).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(2), out.recv())
            .await
            .unwrap()
            .unwrap();
        let h = raw::inspect(&reply).unwrap();
        assert_eq!((h.proto, h.dst), (Proto::Icmp, A.parse().unwrap()));
        // Rules that allow only TCP 80 from A: the echo is dropped and counted.
        let allow_80 = crate::control::management::FirewallRule {
            peer_ip: A.into(),
            protocol: 2,
            port: "80".into(),
            ..Default::default()
        };
        b.set_peer_acl(crate::firewall::PeerAcl::from_wire(&[allow_80], true).0);
        to_stack.send(echo).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), out.recv())
                .await
                .is_err()
        );
        assert_eq!(b.gate_counters().denied_inbound.load(Ordering::Relaxed), 1);
        cancel.cancel();
    }

    #[tokio::test]
    async fn the_peer_acl_gates_new_inbound_flows_but_not_replies_to_ours() {
        let (a, b, cancel) = pair();
        let allow_80 = crate::control::management::FirewallRule {
            peer_ip: A.into(),
            protocol: 2,
            port: "80".into(),
            ..Default::default()
        };
        b.set_peer_acl(crate::firewall::PeerAcl::from_wire(&[allow_80], true).0);
        let mut l80 = b.listen(80).await.unwrap();
        let _l22 = b.listen(22).await.unwrap();
        let _c = a.connect(addr(B, 80)).await.unwrap();
        let _s = l80.accept().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), a.connect(addr(B, 22)))
                .await
                .is_err(),
            "port 22 is not in the policy"
        );
        assert!(b.gate_counters().denied_inbound.load(Ordering::Relaxed) >= 1);
        // B's own connection to A is answered although A is not allowed anything else.
        let mut la = a.listen(9000).await.unwrap();
        let _out = b.connect(addr(A, 9000)).await.unwrap();
        la.accept().await.unwrap();
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_dropped_listener_frees_its_port_at_once() {
        let (a, b, cancel) = pair();
        let listener = b.listen(84).await.unwrap();
        drop(listener);
        let mut listener = b.listen(84).await.unwrap();
        let _c = a.connect(addr(B, 84)).await.unwrap();
        assert_eq!(listener.accept().await.unwrap().local_addr(), addr(B, 84));
        cancel.cancel();
    }

    #[tokio::test]
    async fn clean_close_with_a_slow_reader_ends_in_eof_not_reset() {
        let (a, b, cancel) = pair();
        let mut listener = b.listen(85).await.unwrap();
        let mut c = a.connect(addr(B, 85)).await.unwrap();
        let mut s = listener.accept().await.unwrap();
        // More than the ring and socket buffer hold while nobody reads.
        let data: Vec<u8> = (0..900 * 1024).map(|i: u32| (i % 253) as u8).collect();
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                s.write_all(&data).await.unwrap();
                s.shutdown().await.unwrap();
                s
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.expect("a clean close is EOF");
        assert_eq!(got, data);
        drop(writer.await.unwrap());
        cancel.cancel();
    }

    #[tokio::test]
    async fn writes_fail_after_fin_then_reset() {
        // B lingers 100 ms after its user drops the stream, then aborts with a RST.
        let (a, b, cancel) = pair_with_linger(Duration::from_millis(100));
        let mut listener = b.listen(86).await.unwrap();
        let mut c = a.connect(addr(B, 86)).await.unwrap();
        let mut s = listener.accept().await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).await.unwrap(), 0, "FIN first");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let big = vec![7u8; 256 * 1024];
        let write = async {
            for _ in 0..16 {
                c.write_all(&big).await?;
            }
            Ok::<_, io::Error>(())
        };
        let r = tokio::time::timeout(Duration::from_secs(10), write).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "writes after a RST must fail, got {r:?}"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn udp_datagrams_round_trip() {
        let (a, b, cancel) = pair();
        let ua = a.udp_bind().await.unwrap();
        let ub = b.udp_bind().await.unwrap();
        ua.send_to(b"ping", addr(B, ub.local_port())).unwrap();
        let (data, from) = ub.recv_from().await.unwrap();
        assert_eq!(
            (data.as_slice(), from),
            (&b"ping"[..], addr(A, ua.local_port()))
        );
        ub.send_to(b"pong", from).unwrap();
        let (data, _) = ua.recv_from().await.unwrap();
        assert_eq!(data, b"pong");
        cancel.cancel();
    }

    /// As with a kernel socket, datagrams sent just before the socket is dropped still go out
    /// (the last answer of a UDP service used to be lost this way), and the port is freed
    /// after.
    #[tokio::test]
    async fn datagrams_sent_before_a_drop_still_go_out() {
        let (a, b, cancel) = pair();
        let ub = b.udp_bind().await.unwrap();
        let ua = a.udp_bind_port(4000).await.unwrap();
        for i in 0..20u8 {
            ua.send_to(&[i; 100], addr(B, ub.local_port())).unwrap();
        }
        drop(ua);
        for i in 0..20u8 {
            let (data, _) = tokio::time::timeout(Duration::from_secs(5), ub.recv_from())
                .await
                .expect("every datagram arrives")
                .unwrap();
            assert_eq!(data, [i; 100]);
        }
        let again = async {
            loop {
                match a.udp_bind_port(4000).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), again)
            .await
            .expect("the port is freed once the queue is sent");
        cancel.cancel();
    }

    #[tokio::test]
    async fn stopping_the_stack_fails_waiting_users() {
        let (a, b, cancel) = pair();
        let mut listener = b.listen(83).await.unwrap();
        let mut c = a.connect(addr(B, 83)).await.unwrap();
        let _s = listener.accept().await.unwrap();
        cancel.cancel();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
        assert!(matches!(
            a.connect(addr(B, 83)).await,
            Err(ConnectError::Stopped)
        ));
    }
}
