//! The netstack task: the one owner of smoltcp's interface and sockets.
//!
//! The task loop: take commands and inbound packets, move user bytes into smoltcp sockets, poll
//! the interface, move received bytes out to the users, then sleep until a packet, a command, a
//! user wake-up, smoltcp's next timer, or room in the channel to WireGuard. The gates that
//! decide on each inbound packet are in `gates`, the moving of bytes between smoltcp and the
//! users in `pump`.

mod gates;
mod pump;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

use super::config::*;
use super::handle::{Command, ConnectError};
use pump::to_endpoint;

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
    pub(super) fn new(
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

pub(super) struct Stack {
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
    pub(super) fn new(
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

    pub(super) async fn run(mut self, cancel: CancellationToken) {
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
            for w in [st.rx_waker.take(), st.tx_waker.take()].into_iter().flatten() {
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
}

async fn sleep_opt(delay: Option<SmolDuration>) {
    match delay {
        Some(d) => tokio::time::sleep(Duration::from_micros(d.total_micros())).await,
        None => std::future::pending().await,
    }
}
