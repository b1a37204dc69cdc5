//! The netstack's handle: what the rest of the program holds. Every call is a command to the
//! task that owns smoltcp (`stack`), answered on a oneshot channel.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::raw::{self};
use super::routed::{GateCounters, RoutedFlow, Rules, read};
use super::tcp::{TcpListener, TcpStream};
use super::udp::UdpSocket;
use crate::packet::PacketPool;

use super::config::NetstackConfig;
use super::stack::Stack;

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

pub(super) enum Command {
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
