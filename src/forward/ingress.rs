//! Ingress ports (networks.md §2.4, `forwardingRules`): management asks this peer to take
//! traffic arriving on some of its host ports and send it on to a mesh peer's port. NetBird's
//! kernel mode does it with DNAT; its netstack mode cannot at all. Here each port gets a host
//! listener (TCP) or socket (UDP), and every connection or UDP client goes on through the
//! tunnel from our overlay address.
//!
//! `IngressRule::from_wire` and `target_port` are pure; `serve` does the I/O and follows the
//! rules as maps change.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::control::management::{self, port_info};
use crate::netstack::Netstack;

/// Host ports one map may open at most (a range is many ports).
pub const MAX_PORTS: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_IDLE: Duration = Duration::from_secs(30);
/// UDP clients per port at once.
const MAX_UDP_CLIENTS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IngressProto {
    Tcp,
    Udp,
}

/// One rule: host ports `listen` to `target` (a mesh peer) on `target_ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressRule {
    pub proto: IngressProto,
    pub listen: (u16, u16),
    pub target: IpAddr,
    pub target_ports: (u16, u16),
}

fn ports(info: Option<&management::PortInfo>) -> Option<(u16, u16)> {
    match info?.port_selection.as_ref()? {
        port_info::PortSelection::Port(p) => {
            let p = u16::try_from(*p).ok().filter(|p| *p != 0)?;
            Some((p, p))
        }
        port_info::PortSelection::Range(r) => {
            let (a, b) = (u16::try_from(r.start).ok()?, u16::try_from(r.end).ok()?);
            (a != 0 && a <= b).then_some((a, b))
        }
    }
}

impl IngressRule {
    pub fn from_wire(r: &management::ForwardingRule) -> Result<Self, String> {
        let proto = match r.protocol {
            2 => IngressProto::Tcp,
            3 => IngressProto::Udp,
            p => return Err(format!("protocol {p} is not TCP or UDP")),
        };
        let listen = ports(r.destination_port.as_ref()).ok_or("no valid destination port")?;
        let target_ports = ports(r.translated_port.as_ref()).ok_or("no valid translated port")?;
        let target = match r.translated_address.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(&r.translated_address[..]).expect("4 bytes")),
            16 => IpAddr::from(<[u8; 16]>::try_from(&r.translated_address[..]).expect("16 bytes"))
                .to_canonical(),
            n => return Err(format!("translated address of {n} bytes")),
        };
        let (a, b) = target_ports;
        if a != b && b - a != listen.1 - listen.0 {
            return Err(format!(
                "translated range {a}-{b} is not as long as {}-{}",
                listen.0, listen.1
            ));
        }
        Ok(Self {
            proto,
            listen,
            target,
            target_ports,
        })
    }

    /// Where traffic to host port `port` goes: the same offset into a range, or the one port.
    pub fn target_port(&self, port: u16) -> u16 {
        let (a, b) = self.target_ports;
        if a == b {
            a
        } else {
            a + (port - self.listen.0)
        }
    }
}

/// Decode the map's rules: the usable ones (at most `MAX_PORTS` ports in all) and why the
/// others were refused.
pub fn decode(rules: &[management::ForwardingRule]) -> (Vec<IngressRule>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut total = 0usize;
    for (i, r) in rules.iter().enumerate() {
        match IngressRule::from_wire(r) {
            Ok(rule) => {
                let n = usize::from(rule.listen.1 - rule.listen.0) + 1;
                if total + n > MAX_PORTS {
                    errors.push(format!(
                        "forwarding rule {i}: over {MAX_PORTS} ports in all; skipped"
                    ));
                    continue;
                }
                total += n;
                out.push(rule);
            }
            Err(e) => errors.push(format!("forwarding rule {i}: {e}; skipped")),
        }
    }
    (out, errors)
}

/// Keep one listener per (protocol, host port) of the current rules until `cancel`.
pub async fn serve(
    netstack: Netstack,
    mut rules: watch::Receiver<Vec<IngressRule>>,
    cancel: CancellationToken,
) {
    let mut running: HashMap<(IngressProto, u16), (SocketAddr, CancellationToken)> = HashMap::new();
    // Ports that could not be bound: said once, tried again every second (a listener whose
    // target just changed still holds its port until its task has ended).
    let mut failing: HashMap<(IngressProto, u16), String> = HashMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let mut wanted: BTreeMap<(IngressProto, u16), SocketAddr> = BTreeMap::new();
        for r in rules.borrow_and_update().iter() {
            for port in r.listen.0..=r.listen.1 {
                wanted
                    .entry((r.proto, port))
                    .or_insert(SocketAddr::new(r.target, r.target_port(port)));
            }
        }
        running.retain(|key, (target, token)| {
            let keep = wanted.get(key) == Some(target);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (key, target) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let token = cancel.child_token();
            let (proto, port) = key;
            let listen = SocketAddr::from(([0, 0, 0, 0], port));
            let bound = match proto {
                IngressProto::Tcp => crate::proxy::listen_tcp(listen).map(|l| {
                    tasks.spawn(serve_tcp(l, netstack.clone(), target, token.clone()));
                }),
                IngressProto::Udp => tokio::net::UdpSocket::bind(listen).await.map(|s| {
                    tasks.spawn(serve_udp(
                        Arc::new(s),
                        netstack.clone(),
                        target,
                        token.clone(),
                    ));
                }),
            };
            match bound {
                Ok(()) => {
                    info!(port, ?proto, %target, "ingress port: to the mesh");
                    failing.remove(&key);
                    running.insert(key, (target, token));
                }
                Err(e) => {
                    let said = e.to_string();
                    if failing.get(&key) != Some(&said) {
                        warn!(port, ?proto, %target, "ingress port: cannot listen: {said}; retrying");
                    }
                    failing.insert(key, said);
                }
            }
        }
        failing.retain(|key, _| {
            rules
                .borrow()
                .iter()
                .any(|r| r.proto == key.0 && (r.listen.0..=r.listen.1).contains(&key.1))
        });
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = rules.changed() => if r.is_err() { break },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)), if !failing.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn serve_tcp(
    listener: tokio::net::TcpListener,
    netstack: Netstack,
    target: SocketAddr,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((mut client, from)) = accepted else {
            continue;
        };
        let netstack = netstack.clone();
        conns.spawn(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, netstack.connect(target)).await {
                Ok(Ok(mut mesh)) => {
                    let _ = client.set_nodelay(true);
                    crate::proxy::relay::bidirectional(&mut client, &mut mesh, None).await;
                }
                Ok(Err(e)) => debug!(%from, %target, "ingress: {e}"),
                Err(_) => debug!(%from, %target, "ingress: no answer within {CONNECT_TIMEOUT:?}"),
            }
        });
    }
    conns.shutdown().await;
}

async fn serve_udp(
    socket: Arc<tokio::net::UdpSocket>,
    netstack: Netstack,
    target: SocketAddr,
    cancel: CancellationToken,
) {
    let mut clients: HashMap<SocketAddr, Arc<crate::netstack::UdpSocket>> = HashMap::new();
    let mut readers = JoinSet::new();
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(addr) = gone_rx.recv() => {
                clients.remove(&addr);
                continue;
            }
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let mesh = match clients.get(&from) {
            Some(m) => m.clone(),
            None => {
                if clients.len() >= MAX_UDP_CLIENTS {
                    continue;
                }
                let Ok(m) = netstack.udp_bind().await else {
                    continue;
                };
                let m = Arc::new(m);
                clients.insert(from, m.clone());
                let (socket, m2, gone) = (socket.clone(), m.clone(), gone_tx.clone());
                readers.spawn(async move {
                    loop {
                        match tokio::time::timeout(UDP_IDLE, m2.recv_from()).await {
                            Ok(Ok((data, src))) if src == target => {
                                let _ = socket.send_to(&data, from).await;
                            }
                            Ok(Ok(_)) => {}
                            _ => break,
                        }
                    }
                    let _ = gone.send(from);
                });
                m
            }
        };
        let _ = mesh.send_to(&buf[..n], target);
    }
    readers.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::management::{ForwardingRule, PortInfo};

    fn port(p: u32) -> Option<PortInfo> {
        Some(PortInfo {
            port_selection: Some(port_info::PortSelection::Port(p)),
        })
    }

    fn range(a: u32, b: u32) -> Option<PortInfo> {
        Some(PortInfo {
            port_selection: Some(port_info::PortSelection::Range(port_info::Range {
                start: a,
                end: b,
            })),
        })
    }

    /// A's ingress ports reach B through the tunnel: TCP to B's listener, UDP to B's socket
    /// and back to the host client.
    #[tokio::test]
    async fn host_ports_reach_a_mesh_peer_over_tcp_and_udp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b, cancel) = crate::forward::tests::pair();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (tcp_port, udp_port) = (free(), free());
        let rule = |proto, port, to| IngressRule {
            proto,
            listen: (port, port),
            target: "100.64.0.2".parse().unwrap(),
            target_ports: (to, to),
        };
        let (tx, rx) = watch::channel(vec![
            rule(IngressProto::Tcp, tcp_port, 80),
            rule(IngressProto::Udp, udp_port, 53),
        ]);
        let task = tokio::spawn(serve(a.clone(), rx, cancel.child_token()));
        let mut listener = b.listen(80).await.unwrap();
        tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            let who = s.peer_addr().ip().to_string();
            s.write_all(who.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let dns = b.udp_bind_port(53).await.unwrap();
        tokio::spawn(async move {
            loop {
                let (data, from) = dns.recv_from().await.unwrap();
                dns.send_to(&data, from).unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
            .await
            .unwrap();
        let mut who = String::new();
        c.read_to_string(&mut who).await.unwrap();
        assert_eq!(who, "100.64.0.1", "from our overlay address");
        let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        u.send_to(b"ping", ("127.0.0.1", udp_port)).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), u.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"ping");
        // Rules gone: the ports close.
        tx.send_replace(Vec::new());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
                .await
                .is_err()
        );
        cancel.cancel();
        let _ = task.await;
    }

    #[test]
    fn rules_decode_map_ports_and_are_refused_with_reasons() {
        let ok = ForwardingRule {
            protocol: 2,
            destination_port: range(18080, 18082),
            translated_address: vec![100, 64, 0, 7],
            translated_port: range(8080, 8082),
        };
        let r = IngressRule::from_wire(&ok).unwrap();
        assert_eq!(r.target, "100.64.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(r.target_port(18081), 8081);
        let one = ForwardingRule {
            translated_port: port(80),
            ..ok.clone()
        };
        assert_eq!(IngressRule::from_wire(&one).unwrap().target_port(18082), 80);
        let bad = [
            ForwardingRule {
                protocol: 1,
                ..ok.clone()
            },
            ForwardingRule {
                translated_address: vec![1, 2, 3],
                ..ok.clone()
            },
            ForwardingRule {
                destination_port: port(0),
                ..ok.clone()
            },
            ForwardingRule {
                translated_port: range(1, 2),
                ..ok.clone()
            },
            ForwardingRule {
                destination_port: range(9, 1),
                ..ok.clone()
            },
        ];
        for b in &bad {
            assert!(IngressRule::from_wire(b).is_err(), "{b:?}");
        }
        let huge = ForwardingRule {
            destination_port: range(1000, 3000),
            translated_port: port(80),
            ..ok.clone()
        };
        let (rules, errors) = decode(&[ok, huge]);
        assert_eq!((rules.len(), errors.len()), (1, 1), "{errors:?}");
    }
}
