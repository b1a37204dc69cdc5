//! The routing peer's DNS forwarder (networks.md §2.3): clients send the names of this peer's
//! DNS routes here (our overlay address, UDP 22054, and 5353 which NetBird DNATs to it); the
//! host resolves them, the answer goes back with TTL 60, and the addresses open the route ACL
//! of the matching domain so the flows that follow are forwarded. A name outside our DNS
//! routes is REFUSED; A and AAAA come from the host resolver (so `/etc/hosts` counts), other
//! types (MX, TXT, SRV, ...) from the host's nameserver. UDP only.
//!
//! `Query::parse` and `reply` are pure; `serve` does the I/O.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dns::zone::in_domain;
use crate::netstack::{Netstack, UdpSocket};

/// NetBird's forwarder port, and the port clients use when management says nothing.
pub const FORWARDER_PORTS: [u16; 2] = [22054, 5353];
/// Host lookups get this long (DFWD's timeout).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
const TTL: u32 = 60;
/// Lookups in flight per port; beyond it queries get SERVFAIL at once.
const MAX_LOOKUPS: usize = 256;
/// Host resolver threads busy at once for the forwarder.
const MAX_LOOKUP_THREADS: usize = 32;

/// A question this forwarder answers.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    pub message: Message,
    pub name: String,
    pub qtype: RecordType,
    /// The pattern of our DNS routes it matched.
    pub pattern: String,
}

/// Why a datagram gets no lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a DNS query at all: dropped.
    Garbage,
    /// An answer to send as is (REFUSED, FORMERR).
    Reply(Vec<u8>),
}

impl Query {
    /// Parse a query and match it against our routes' domain patterns (`*.d` matches d and
    /// below here, as NetBird's forwarder does; an exact domain beats any wildcard, a longer
    /// wildcard a shorter one).
    pub fn parse(bytes: &[u8], patterns: &[String]) -> Result<Self, Refusal> {
        let msg = Message::from_vec(bytes).map_err(|_| Refusal::Garbage)?;
        if msg.metadata.message_type != MessageType::Query {
            return Err(Refusal::Garbage);
        }
        let Some(q) = msg.queries.first().filter(|_| msg.queries.len() == 1) else {
            return Err(Refusal::Reply(bare(&msg, ResponseCode::FormErr)));
        };
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let mut best: Option<(usize, &String)> = None;
        for p in patterns {
            let (hit, rank) = match p.strip_prefix("*.") {
                Some(base) => (in_domain(&name, base), base.len()),
                None => (*p == name, usize::MAX),
            };
            if hit && best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, p));
            }
        }
        let Some((_, pattern)) = best else {
            return Err(Refusal::Reply(bare(&msg, ResponseCode::Refused)));
        };
        Ok(Self {
            qtype: q.query_type(),
            name,
            pattern: pattern.clone(),
            message: msg,
        })
    }

    /// The answer: the addresses of the asked family (others are NODATA), NXDOMAIN, or
    /// SERVFAIL; at most 512 bytes (no EDNS here), truncated with TC otherwise.
    pub fn reply(&self, result: &Result<Vec<IpAddr>, ResponseCode>) -> Vec<u8> {
        let mut msg = response(&self.message);
        match result {
            Err(code) => msg.metadata.response_code = *code,
            Ok(addrs) => {
                let name = self.message.queries[0].name().clone();
                for ip in addrs {
                    let data = match (self.qtype, ip) {
                        (RecordType::A, IpAddr::V4(a)) => RData::A(A(*a)),
                        (RecordType::AAAA, IpAddr::V6(a)) => RData::AAAA(AAAA(*a)),
                        _ => continue,
                    };
                    msg.answers
                        .push(Record::from_rdata(name.clone(), TTL, data));
                }
            }
        }
        let bytes = msg.to_vec().unwrap_or_default();
        if bytes.len() <= 512 {
            return bytes;
        }
        msg.answers.clear();
        msg.metadata.truncation = true;
        msg.to_vec().unwrap_or_default()
    }
}

fn response(query: &Message) -> Message {
    let mut msg = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    msg.metadata.recursion_desired = query.metadata.recursion_desired;
    msg.metadata.recursion_available = true;
    for q in &query.queries {
        msg.add_query(q.clone());
    }
    msg
}

fn bare(query: &Message, code: ResponseCode) -> Vec<u8> {
    let mut msg = response(query);
    msg.metadata.response_code = code;
    msg.to_vec().unwrap_or_default()
}

/// Serve both ports until `cancel`, answering for the patterns `domains` holds.
pub async fn serve(
    netstack: Netstack,
    domains: watch::Receiver<Vec<String>>,
    cancel: CancellationToken,
) {
    serve_with(netstack, domains, None, cancel).await
}

/// `serve`, asking `upstream` instead of the host's nameserver for types other than A/AAAA.
pub async fn serve_with(
    netstack: Netstack,
    domains: watch::Receiver<Vec<String>>,
    upstream: Option<SocketAddr>,
    cancel: CancellationToken,
) {
    let mut sockets = Vec::new();
    for port in FORWARDER_PORTS {
        match netstack.udp_bind_port(port).await {
            Ok(s) => sockets.push(s),
            Err(e) => warn!(port, "DNS forwarder: cannot listen: {e}"),
        }
    }
    if sockets.is_empty() {
        return;
    }
    info!(ports = ?FORWARDER_PORTS, "DNS forwarder for this peer's DNS routes listening on the mesh");
    // getaddrinfo runs on blocking threads that a timeout or an abort does not stop: each
    // holds a permit until it returns, so a flood of slow names cannot use up the pool.
    let threads = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUP_THREADS));
    let serve_one = |socket: UdpSocket| {
        let threads = threads.clone();
        let netstack = netstack.clone();
        let domains = domains.clone();
        async move {
            let socket = std::sync::Arc::new(socket);
            // Lookups in flight: owned here, so they end with the forwarder.
            let mut lookups = tokio::task::JoinSet::new();
            loop {
                let received = tokio::select! {
                    r = socket.recv_from() => r,
                    Some(_) = lookups.join_next(), if !lookups.is_empty() => continue,
                };
                let Ok((bytes, from)) = received else { return };
                let parsed = Query::parse(&bytes, &domains.borrow());
                let query = match parsed {
                    Ok(q) => q,
                    Err(Refusal::Garbage) => continue,
                    Err(Refusal::Reply(r)) => {
                        let _ = socket.send_to(&r, from);
                        continue;
                    }
                };
                if lookups.len() >= MAX_LOOKUPS {
                    let _ = socket.send_to(&query.reply(&Err(ResponseCode::ServFail)), from);
                    continue;
                }
                let socket = socket.clone();
                let netstack = netstack.clone();
                let threads = threads.clone();
                lookups.spawn(async move {
                    if !matches!(query.qtype, RecordType::A | RecordType::AAAA) {
                        // Other types: the host's nameserver answers, as NetBird's forwarder
                        // asks the host resolver.
                        let reply = relay_to_host(&query, upstream)
                            .await
                            .unwrap_or_else(|| query.reply(&Err(ResponseCode::ServFail)));
                        let _ = socket.send_to(&reply, from);
                        return;
                    }
                    let result = lookup(&query, &threads).await;
                    if let Ok(addrs) = &result
                        && !addrs.is_empty()
                    {
                        netstack.add_resolved(&query.pattern, addrs.iter().copied());
                    }
                    debug!(name = %query.name, ?result, %from, "DNS forwarder");
                    let _ = socket.send_to(&query.reply(&result), from);
                });
            }
        }
    };
    let tasks = sockets.into_iter().map(serve_one);
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = futures::future::join_all(tasks) => {}
    }
}

/// Ask the host's first nameserver (`/etc/resolv.conf`) the query as it came; its answer,
/// truncated with TC past 512 bytes (no EDNS here). None when there is none or it is silent.
async fn relay_to_host(q: &Query, upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let server = match upstream {
        Some(s) => s,
        None => SocketAddr::new(*crate::dns::resolver::host_nameservers().first()?, 53),
    };
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
    socket.connect(server).await.ok()?;
    socket.send(&q.message.to_vec().ok()?).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let mut answer = Message::from_vec(&buf[..n]).ok()?;
    if answer.metadata.id != q.message.metadata.id {
        return None;
    }
    let bytes = answer.to_vec().ok()?;
    if bytes.len() <= 512 {
        return Some(bytes);
    }
    answer.answers.clear();
    answer.metadata.truncation = true;
    answer.to_vec().ok()
}

/// Resolve with the host resolver; both families, filtered when the reply is built.
async fn lookup(
    q: &Query,
    threads: &std::sync::Arc<tokio::sync::Semaphore>,
) -> Result<Vec<IpAddr>, ResponseCode> {
    if !matches!(q.qtype, RecordType::A | RecordType::AAAA) {
        return Ok(Vec::new());
    }
    let Ok(permit) = threads.clone().try_acquire_owned() else {
        return Err(ResponseCode::ServFail);
    };
    let host = q.name.clone();
    let resolve = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 0)).map(|a| a.collect::<Vec<_>>())
    });
    match tokio::time::timeout(LOOKUP_TIMEOUT, resolve).await {
        Err(_) | Ok(Err(_)) => Err(ResponseCode::ServFail),
        Ok(Ok(Err(e)))
            if e.to_string().contains("not known") || e.kind() == std::io::ErrorKind::NotFound =>
        {
            Err(ResponseCode::NXDomain)
        }
        Ok(Ok(Err(_))) => Err(ResponseCode::ServFail),
        Ok(Ok(Ok(addrs))) => {
            let mut out: Vec<IpAddr> = Vec::new();
            for a in addrs.into_iter().map(|a: SocketAddr| a.ip()) {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::build_query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn q(name: &str, t: RecordType) -> Vec<u8> {
        build_query(7, &Name::from_str(name).unwrap(), t)
    }

    /// A mesh peer asks the forwarder through the tunnel: A from the host resolver (and the
    /// address opened in the route ACL), TXT from the nameserver, other names REFUSED.
    #[tokio::test]
    async fn the_forwarder_answers_over_the_mesh() {
        use crate::control::management::RouteFirewallRule;
        use crate::firewall::{Flow, Proto, RouteAcl};
        let (a, b, cancel) = crate::forward::tests::pair();
        // The route rule of a DNS route: open only for what the forwarder resolved.
        let rule = RouteFirewallRule {
            source_ranges: vec!["0.0.0.0/0".into()],
            protocol: 1,
            is_dynamic: true,
            domains: vec!["localhost".into()],
            ..Default::default()
        };
        b.set_route_acl(RouteAcl::from_wire(&[rule], true).0);
        // A nameserver answering TXT queries.
        let ns = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ns_addr = ns.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = ns.recv_from(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = response(&q);
                r.answers.push(Record::from_rdata(
                    q.queries[0].name().clone(),
                    60,
                    RData::TXT(hickory_proto::rr::rdata::TXT::new(vec!["hello".into()])),
                ));
                ns.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        });
        let (_tx, domains) = watch::channel(vec!["localhost".to_string()]);
        let fwd = tokio::spawn(serve_with(
            b.clone(),
            domains,
            Some(ns_addr),
            cancel.child_token(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = a.udp_bind().await.unwrap();
        let to: SocketAddr = "100.64.0.2:22054".parse().unwrap();
        let ask = |name: &str, t: RecordType| build_query(9, &Name::from_str(name).unwrap(), t);
        let flow = Flow {
            src: "100.64.0.1".parse().unwrap(),
            dst: "127.0.0.1".parse().unwrap(),
            proto: Proto::Tcp,
            dst_port: 80,
        };
        assert!(
            !b.route_acl_allows(&flow),
            "closed before the name is resolved"
        );
        s.send_to(&ask("localhost.", RecordType::A), to).unwrap();
        let r = answer(&s).await;
        assert_eq!(r.answers.len(), 1, "{r:?}");
        assert!(
            b.route_acl_allows(&flow),
            "the resolved address is open now"
        );
        s.send_to(&ask("localhost.", RecordType::TXT), to).unwrap();
        let r = answer(&s).await;
        assert!(matches!(&r.answers[0].data, RData::TXT(_)), "{r:?}");
        s.send_to(&ask("example.org.", RecordType::A), to).unwrap();
        assert_eq!(
            answer(&s).await.metadata.response_code,
            ResponseCode::Refused
        );
        // The same on 5353, NetBird's client port.
        s.send_to(
            &ask("example.org.", RecordType::A),
            "100.64.0.2:5353".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            answer(&s).await.metadata.response_code,
            ResponseCode::Refused
        );
        cancel.cancel();
        let _ = fwd.await;
    }

    async fn answer(s: &crate::netstack::UdpSocket) -> Message {
        let (bytes, _) = tokio::time::timeout(Duration::from_secs(5), s.recv_from())
            .await
            .unwrap()
            .unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    #[test]
    fn queries_match_our_patterns_or_are_refused() {
        let pats = vec!["*.corp.example".to_string(), "db.corp.example".to_string()];
        let m = Query::parse(&q("app.corp.example.", RecordType::A), &pats).unwrap();
        assert_eq!(m.pattern, "*.corp.example");
        assert_eq!(
            Query::parse(&q("corp.example.", RecordType::A), &pats)
                .unwrap()
                .pattern,
            "*.corp.example",
            "apex"
        );
        assert_eq!(
            Query::parse(&q("DB.corp.example.", RecordType::A), &pats)
                .unwrap()
                .pattern,
            "db.corp.example"
        );
        let Err(Refusal::Reply(r)) = Query::parse(&q("example.org.", RecordType::A), &pats) else {
            panic!()
        };
        let r = Message::from_vec(&r).unwrap();
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (7, ResponseCode::Refused)
        );
        assert_eq!(Query::parse(b"junk", &pats), Err(Refusal::Garbage));
        let answer = bare(
            &Message::from_vec(&q("a.corp.example.", RecordType::A)).unwrap(),
            ResponseCode::NoError,
        );
        assert_eq!(
            Query::parse(&answer, &pats),
            Err(Refusal::Garbage),
            "a response is not a query"
        );
    }

    #[test]
    fn replies_carry_the_asked_family_nxdomain_or_servfail() {
        let pats = vec!["*.corp.example".to_string()];
        let m = Query::parse(&q("app.corp.example.", RecordType::A), &pats).unwrap();
        let addrs: Vec<IpAddr> = vec!["198.19.1.10".parse().unwrap(), "fd00::1".parse().unwrap()];
        let r = Message::from_vec(&m.reply(&Ok(addrs))).unwrap();
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, TTL);
        let r = Message::from_vec(&m.reply(&Err(ResponseCode::NXDomain))).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let many: Vec<IpAddr> = (0..60).map(|i| IpAddr::from([198, 19, 1, i])).collect();
        let r = Message::from_vec(&m.reply(&Ok(many))).unwrap();
        assert!(r.metadata.truncation && r.answers.is_empty());
    }
}
