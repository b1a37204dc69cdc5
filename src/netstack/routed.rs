//! The netstack's two gates on inbound packets, and the intake of a routing peer.
//!
//! Every packet from WireGuard is looked at once (`raw::inspect`) before smoltcp sees it:
//! - towards one of our addresses: a new flow (TCP SYN, UDP to a port we did not open, ICMP
//!   echo request) must pass the peer ACL; replies to our own flows always pass (stateful);
//! - towards anything else: a routed packet. Without a forwarder attached it is dropped, and so
//!   is one for the mesh's own network. A new flow must pass the route ACL; then a TCP SYN is
//!   held while the forwarder dials the destination from the host (`RoutedFlow::Tcp`) and is
//!   fed to a listening socket on that destination once the dial succeeded, or answered with a
//!   RST if it failed, as NetBird's userspace forwarder completes the handshake only after its
//!   dial. UDP datagrams and ICMP echo requests go to the forwarder whole.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use smoltcp::iface::SocketHandle;
use smoltcp::time::{Duration as SmolDuration, Instant};
use tokio::sync::{mpsc, oneshot};

use super::raw::Headers;
use super::handle::ConnectError;
use super::tcp::TcpStream;
use crate::firewall::{PeerAcl, RouteAcl};

/// The rules the gates apply; replaced as network maps arrive.
#[derive(Debug)]
pub struct Rules {
    pub peer: PeerAcl,
    pub route: RouteAcl,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            peer: PeerAcl::open(),
            route: RouteAcl::default(),
        }
    }
}

/// Packets the gates dropped, by reason (for /metrics).
#[derive(Debug, Default)]
pub struct GateCounters {
    /// New inbound flows towards us that the peer ACL denied.
    pub denied_inbound: AtomicU64,
    /// Routed flows the route ACL denied.
    pub denied_routed: AtomicU64,
    /// Packets for other destinations while this peer routes nothing, or for the mesh itself.
    pub not_routed: AtomicU64,
    /// Routed flows dropped because the forwarder's queue or the held-SYN table was full.
    pub routed_overflow: AtomicU64,
    /// Routed TCP connections handed to the forwarder.
    pub routed_tcp: AtomicU64,
    /// Routed UDP datagrams handed to the forwarder.
    pub routed_udp: AtomicU64,
}

/// What the netstack hands a routing peer's forwarder.
#[derive(Debug)]
pub enum RoutedFlow {
    /// A new TCP connection from `src` to `dst`, its SYN held: answer with
    /// `Netstack::accept_routed` or `Netstack::reject_routed`.
    Tcp { src: SocketAddr, dst: SocketAddr },
    /// A UDP datagram: the whole IP packet, its payload at `payload..`. Give the buffer back
    /// with `Netstack::recycle`.
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        packet: Vec<u8>,
        payload: usize,
    },
    /// An ICMP echo request (the whole IP packet, its ICMP header at `icmp..`).
    Echo { packet: Vec<u8>, icmp: usize },
}

/// Held SYNs at most: a flood of new routed connections waits for dials no further.
const MAX_HELD_SYNS: usize = 1024;
/// A held SYN (or an accepted socket not yet established) is given up after this long.
const HOLD_LIMIT: SmolDuration = SmolDuration::from_secs(30);

/// A routed connection whose SYN was handed to a listening socket on its destination.
pub(super) struct Accepting {
    pub handle: SocketHandle,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
    pub since: Instant,
    /// The interface poll count when its SYN was queued: a socket still listening after the
    /// next poll did not take it.
    pub injected_at: u64,
}

/// An accept waiting for the destination's listening socket to be taken: smoltcp hands a SYN
/// to the first listening socket on its endpoint, so only one may listen per endpoint at once.
pub(super) type Deferred = (
    SocketAddr,
    SocketAddr,
    oneshot::Sender<Result<TcpStream, ConnectError>>,
);

/// The stack's side of a routing peer: the forwarder's queue and the TCP flows in flight.
pub(super) struct Intake {
    pub to_forwarder: mpsc::Sender<RoutedFlow>,
    /// SYNs waiting for the forwarder's dial, by (source, destination).
    pub held: HashMap<(SocketAddr, SocketAddr), (Vec<u8>, Instant)>,
    /// Routed TCP connections smoltcp holds a socket for.
    pub flows: HashSet<(SocketAddr, SocketAddr)>,
    pub accepting: Vec<Accepting>,
    pub deferred: std::collections::VecDeque<Deferred>,
}

impl Intake {
    pub fn new(to_forwarder: mpsc::Sender<RoutedFlow>) -> Self {
        Self {
            to_forwarder,
            held: HashMap::new(),
            flows: HashSet::new(),
            accepting: Vec::new(),
            deferred: std::collections::VecDeque::new(),
        }
    }

    /// A routed TCP packet: Some(packet) when smoltcp should see it now (a connection it
    /// holds), None when it was held or dropped (given back through `spare`).
    pub fn tcp(
        &mut self,
        h: &Headers,
        packet: Vec<u8>,
        rules: &RwLock<Rules>,
        counters: &GateCounters,
        now: Instant,
        spare: &mut Vec<Vec<u8>>,
    ) -> Option<Vec<u8>> {
        let key = (h.src_addr(), h.dst_addr());
        if self.flows.contains(&key) {
            if h.syn {
                // A retransmitted SYN of a connection whose socket has it already: that socket
                // resends its SYN-ACK itself, and another flow's listening socket on the same
                // destination must never see this SYN.
                spare.push(packet);
                return None;
            }
            return Some(packet);
        }
        if !h.syn {
            // Not a connection of ours (a late segment of one that ended): dropped.
            counters.not_routed.fetch_add(1, Ordering::Relaxed);
            spare.push(packet);
            return None;
        }
        if let Some(slot) = self.held.get_mut(&key) {
            // A retransmitted SYN while the dial goes on: keep the newest.
            spare.push(std::mem::replace(&mut slot.0, packet));
            return None;
        }
        if !read(rules).route.allows(&h.flow()) {
            counters.denied_routed.fetch_add(1, Ordering::Relaxed);
            spare.push(packet);
            return None;
        }
        if self.held.len() >= MAX_HELD_SYNS
            || self
                .to_forwarder
                .try_send(RoutedFlow::Tcp {
                    src: key.0,
                    dst: key.1,
                })
                .is_err()
        {
            counters.routed_overflow.fetch_add(1, Ordering::Relaxed);
            spare.push(packet);
            return None;
        }
        counters.routed_tcp.fetch_add(1, Ordering::Relaxed);
        self.held.insert(key, (packet, now));
        None
    }

    /// Forget SYNs held too long (the forwarder never answered); returns their buffers.
    pub fn expire(&mut self, now: Instant, spare: &mut Vec<Vec<u8>>) {
        if self.held.is_empty() {
            return;
        }
        self.held.retain(|_, (p, since)| {
            let keep = now - *since < HOLD_LIMIT;
            if !keep {
                spare.push(std::mem::take(p));
            }
            keep
        });
    }

    pub fn hold_expired(&self, a: &Accepting, now: Instant) -> bool {
        now - a.since >= HOLD_LIMIT
    }
}

pub(super) fn read(rules: &RwLock<Rules>) -> std::sync::RwLockReadGuard<'_, Rules> {
    rules.read().unwrap_or_else(|e| e.into_inner())
}
