//! A routing peer and exit node without root (networks.md §2.1): flows the netstack routes
//! (`RoutedFlow`) are terminated here and re-originated from host sockets, as NetBird's
//! userspace forwarder does — every flow is therefore masqueraded to this host's address.
//!
//! - TCP: the host dial comes first; only when it connects does the netstack complete the mesh
//!   peer's handshake (a failed dial is a RST, so the client sees "refused" or its timeout, not
//!   a connection that dies at once). Then bytes are copied both ways with half-close.
//! - UDP: one host socket per (source, destination), freed after 30 s without traffic.
//! - ICMP echo (IPv4): an unprivileged ICMP socket when the host allows one
//!   (`net.ipv4.ping_group_range`), else the `ping` binary; the reply is synthesised.
//!
//! The host's loopback and its own addresses are never dialled unless `allow_host` is set
//! (`--route-to-host`): otherwise a mesh peer could reach this host's private services, the
//! proxy's own listeners included, by routing through us.
//! Every task hangs off the forwarder's token; dropping the flow queue stops routing.

mod echo;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::netstack::{Netstack, RoutedFlow};

/// Tunables of the forwarder.
#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    /// How long a host dial may take before the mesh peer gets a RST.
    pub connect_timeout: Duration,
    /// Forward to loopback and this host's own addresses too.
    pub allow_host: bool,
    /// TCP connections forwarded at once; beyond it new ones are refused.
    pub max_tcp: usize,
    /// UDP flows at once; beyond it new ones are dropped.
    pub max_udp: usize,
    /// A UDP flow without traffic either way for this long is freed.
    pub udp_idle: Duration,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            allow_host: false,
            max_tcp: 4096,
            max_udp: 1024,
            udp_idle: Duration::from_secs(30),
        }
    }
}

/// What the forwarder did (for /metrics and tests).
#[derive(Debug, Default)]
pub struct ForwardCounters {
    pub tcp_opened: AtomicU64,
    pub tcp_failed: AtomicU64,
    pub tcp_active: AtomicU64,
    /// Flows refused because they target this host (loopback or its own addresses).
    pub host_refused: AtomicU64,
    pub udp_flows_opened: AtomicU64,
    pub udp_flows_active: AtomicU64,
    pub udp_dropped: AtomicU64,
    pub echo_answered: AtomicU64,
    pub echo_failed: AtomicU64,
}

/// Queue of routed flows between the netstack and the forwarder.
pub const FLOW_QUEUE: usize = 1024;

/// The routing peer's forwarder: run it with the netstack's routed flows.
pub struct Forwarder {
    netstack: Netstack,
    config: ForwarderConfig,
    counters: Arc<ForwardCounters>,
}

impl Forwarder {
    pub fn new(
        netstack: Netstack,
        config: ForwarderConfig,
        counters: Arc<ForwardCounters>,
    ) -> Self {
        Self {
            netstack,
            config,
            counters,
        }
    }

    /// Start routing and forward until `cancel` fires (then routing stops and every flow ends).
    pub async fn run(self, cancel: CancellationToken) {
        let Ok(mut flows) = self.netstack.serve_routes(FLOW_QUEUE).await else {
            return;
        };
        info!("routing for the mesh: forwarding routed flows from host sockets");
        let host = HostGuard::new(self.config.allow_host);
        let tcp_slots = Arc::new(Semaphore::new(self.config.max_tcp));
        let mut tasks = JoinSet::new();
        let mut udp = udp::UdpFlows::new(
            self.netstack.clone(),
            self.config.max_udp,
            self.config.udp_idle,
            self.counters.clone(),
        );
        let mut echo = echo::Pinger::new(self.netstack.clone(), self.counters.clone());
        loop {
            let flow = tokio::select! {
                _ = cancel.cancelled() => break,
                f = flows.recv() => match f {
                    Some(f) => f,
                    None => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                key = udp.closed() => {
                    udp.remove(key);
                    continue;
                }
            };
            match flow {
                RoutedFlow::Tcp { src, dst } => {
                    if host.forbids(dst.ip()) {
                        self.counters.host_refused.fetch_add(1, Ordering::Relaxed);
                        debug!(%src, %dst, "routed connection to this host refused (--route-to-host)");
                        self.netstack.reject_routed(src, dst).await;
                        continue;
                    }
                    let Ok(slot) = tcp_slots.clone().try_acquire_owned() else {
                        self.counters.tcp_failed.fetch_add(1, Ordering::Relaxed);
                        self.netstack.reject_routed(src, dst).await;
                        continue;
                    };
                    let netstack = self.netstack.clone();
                    let counters = self.counters.clone();
                    let timeout = self.config.connect_timeout;
                    tasks.spawn(async move {
                        forward_tcp(netstack, src, dst, timeout, &counters).await;
                        drop(slot);
                    });
                }
                RoutedFlow::Udp {
                    src,
                    dst,
                    packet,
                    payload,
                } => {
                    if host.forbids(dst.ip()) {
                        self.counters.host_refused.fetch_add(1, Ordering::Relaxed);
                        self.netstack.recycle(packet);
                        continue;
                    }
                    udp.send(src, dst, &packet[payload..], &mut tasks, &cancel);
                    self.netstack.recycle(packet);
                }
                RoutedFlow::Echo { packet, icmp } => {
                    echo.handle(&packet, icmp, &host, &mut tasks);
                    self.netstack.recycle(packet);
                }
            }
        }
        drop(flows);
        tasks.shutdown().await;
        info!("routing stopped");
    }
}

/// One routed TCP connection: dial, then complete the handshake and copy.
async fn forward_tcp(
    netstack: Netstack,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
    counters: &ForwardCounters,
) {
    let host = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%src, %dst, "routed connection: {e}");
            counters.tcp_failed.fetch_add(1, Ordering::Relaxed);
            netstack.reject_routed(src, dst).await;
            return;
        }
        Err(_) => {
            debug!(%src, %dst, "routed connection: no answer within {timeout:?}");
            counters.tcp_failed.fetch_add(1, Ordering::Relaxed);
            netstack.reject_routed(src, dst).await;
            return;
        }
    };
    let _ = host.set_nodelay(true);
    let mut host = host;
    let Ok(mut mesh) = netstack.accept_routed(src, dst).await else {
        counters.tcp_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    counters.tcp_opened.fetch_add(1, Ordering::Relaxed);
    counters.tcp_active.fetch_add(1, Ordering::Relaxed);
    crate::proxy::relay::bidirectional(&mut mesh, &mut host, None).await;
    counters.tcp_active.fetch_sub(1, Ordering::Relaxed);
}

/// Which destinations are this host itself.
pub(crate) struct HostGuard {
    allow: bool,
    own: Vec<IpAddr>,
}

impl HostGuard {
    fn new(allow: bool) -> Self {
        let own = if allow {
            Vec::new()
        } else {
            if_addrs::get_if_addrs()
                .map(|v| v.into_iter().map(|i| i.ip()).collect())
                .unwrap_or_default()
        };
        Self { allow, own }
    }

    /// Loopback, unspecified, multicast, broadcast, or one of this host's addresses.
    pub(crate) fn forbids(&self, ip: IpAddr) -> bool {
        if self.allow {
            return false;
        }
        let ip = ip.to_canonical();
        let special = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()
            }
            IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast(),
        };
        special || self.own.contains(&ip)
    }
}
