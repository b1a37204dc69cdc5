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

pub mod dns;
mod echo;
pub mod ingress;
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

#[cfg(test)]
pub(crate) mod tests {
    //! Two netstacks back to back; B routes with a real forwarder towards real host sockets on
    //! loopback (allowed here with `allow_host`, which is what it guards).
    use super::*;
    use crate::netstack::NetstackConfig;
    use crate::packet::PacketPool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two netstacks back to back: A 100.64.0.1, B 100.64.0.2.
    pub(crate) fn pair() -> (Netstack, Netstack, CancellationToken) {
        let pool = Arc::new(PacketPool::new(1500, 64));
        let (a_out, b_in) = mpsc::channel(256);
        let (b_out, a_in) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let config =
            |ip: &str| NetstackConfig::new(vec![format!("{ip}/16").parse().unwrap()], 1420);
        let (a, ta) = Netstack::new(
            config("100.64.0.1"),
            a_in,
            a_out,
            pool.clone(),
            cancel.clone(),
        );
        let (b, tb) = Netstack::new(config("100.64.0.2"), b_in, b_out, pool, cancel.clone());
        tokio::spawn(ta);
        tokio::spawn(tb);
        (a, b, cancel)
    }

    fn allow_all() -> crate::firewall::RouteAcl {
        let rule = crate::control::management::RouteFirewallRule {
            source_ranges: vec!["0.0.0.0/0".into()],
            destination: "0.0.0.0/0".into(),
            protocol: 1,
            ..Default::default()
        };
        crate::firewall::RouteAcl::from_wire(&[rule], true).0
    }

    use tokio::sync::mpsc;

    #[tokio::test]
    async fn routed_tcp_and_udp_reach_host_sockets_and_a_closed_port_is_refused() {
        let (a, b, cancel) = pair();
        b.set_route_acl(allow_all());
        let counters = Arc::new(ForwardCounters::default());
        let config = ForwarderConfig {
            allow_host: true,
            udp_idle: Duration::from_millis(500),
            ..ForwarderConfig::default()
        };
        let fwd = Forwarder::new(b.clone(), config, counters.clone());
        let task = tokio::spawn(fwd.run(cancel.child_token()));
        tokio::time::sleep(Duration::from_millis(50)).await;

        // TCP: an echo server on the host.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, peer) = server.accept().await.unwrap();
            assert!(peer.ip().is_loopback(), "re-originated from the host");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            buf.reverse();
            s.write_all(&buf).await.unwrap();
        });
        let mut c = a
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        back.reverse();
        assert_eq!(back, data);

        // A closed port: the dial fails, the mesh side gets a RST (refused), not a hang.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            a.connect(closed).await,
            Err(crate::netstack::ConnectError::Refused)
        ));

        // UDP: an echo server; the flow is freed after its idle time.
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                udp.send_to(&buf[..n], from).await.unwrap();
            }
        });
        let s = a.udp_bind().await.unwrap();
        for i in 0..3u8 {
            s.send_to(&[i; 100], udp_addr).unwrap();
            let (got, from) = tokio::time::timeout(Duration::from_secs(5), s.recv_from())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((got, from), (vec![i; 100], udp_addr));
        }
        assert_eq!(
            counters.udp_flows_opened.load(Ordering::Relaxed),
            1,
            "one flow"
        );
        assert_eq!(counters.udp_flows_active.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            counters.udp_flows_active.load(Ordering::Relaxed),
            0,
            "idle flow freed"
        );
        assert_eq!(counters.tcp_opened.load(Ordering::Relaxed), 1);
        assert_eq!(counters.tcp_failed.load(Ordering::Relaxed), 1);
        cancel.cancel();
        let _ = task.await;
    }

    #[tokio::test]
    async fn this_hosts_own_addresses_are_refused_unless_allowed() {
        let (a, b, cancel) = pair();
        b.set_route_acl(allow_all());
        let counters = Arc::new(ForwardCounters::default());
        let fwd = Forwarder::new(b.clone(), ForwarderConfig::default(), counters.clone());
        let task = tokio::spawn(fwd.run(cancel.child_token()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        assert!(matches!(
            a.connect(addr).await,
            Err(crate::netstack::ConnectError::Refused)
        ));
        assert_eq!(counters.host_refused.load(Ordering::Relaxed), 1);
        cancel.cancel();
        let _ = task.await;
    }
}
