//! The resolver: NetBird's chain (`plan`) with the I/O — queries for A and AAAA to nameservers
//! through the netstack's UDP or from a host socket, the host resolver, CNAMEs of custom zones
//! followed, DNS routes' answers put on their routing peer.
//!
//! The message codec (`build_query`, `parse_answer`) is pure and unit-tested; `Resolver` adds the
//! exchange with timeouts and retries. Messages come from hickory-proto, not a hand-written codec.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::config::{NsGroup, valid_name};
use super::plan::{DnsRoute, DnsState, Learned, Plan, Step};
use super::zone::Local;
use crate::wg::WgDevice;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::time::Instant;
use tracing::debug;

use crate::netstack::Netstack;

/// Why a name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("`{0}` is not a valid host name")]
    InvalidName(String),
    #[error("`{0}` does not exist")]
    NotFound(String),
    #[error("`{0}` has no address")]
    NoAddress(String),
    #[error("no answer from DNS server(s) for `{0}`")]
    Timeout(String),
    #[error("DNS lookup of `{0}` failed: {1}")]
    Failed(String, String),
}

/// Encode a recursive query for `name` / `rtype` with transaction `id`.
pub fn build_query(id: u16, name: &Name, rtype: RecordType) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name.clone(), rtype));
    msg.to_vec()
        .expect("a single-question query always encodes")
}

/// What one response says.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Addresses (possibly none: the name exists without this record type).
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN.
    NoSuchName,
    /// A server failure or refusal: try another server.
    ServerError(ResponseCode),
    /// The answer did not fit in UDP (TC): ask again over TCP.
    Truncated,
}

/// Decode a response to transaction `id`; `None` if the bytes are not that response.
pub fn parse_answer(bytes: &[u8], id: u16) -> Option<Answer> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        return None;
    }
    match msg.metadata.response_code {
        ResponseCode::NoError if msg.metadata.truncation => return Some(Answer::Truncated),
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Some(Answer::NoSuchName),
        other => return Some(Answer::ServerError(other)),
    }
    let addrs = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Some(Answer::Addresses(addrs))
}

/// Names of mesh peers (FQDNs from the network map), answered before any DNS server.
/// Kept up to date one peer at a time ([`set`](Self::set), [`remove`](Self::remove)), so
/// a map update costs what changed, not the size of the account.
#[derive(Clone, Debug, Default)]
pub struct MeshNames(Arc<RwLock<NameTable>>);

#[derive(Debug, Default)]
struct NameTable {
    /// Lower-case name, without its trailing dot → address, and the peer it is (if known).
    by_name: HashMap<String, (IpAddr, Option<String>)>,
    /// A peer's key → its name there, to rename or remove it.
    of_peer: HashMap<String, String>,
}

fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl MeshNames {
    /// The address of `name` (case-insensitive, trailing dot ignored).
    pub fn lookup(&self, name: &str) -> Option<IpAddr> {
        let key = normal(name);
        self.table().by_name.get(&key).map(|(ip, _)| *ip)
    }

    /// Every name by its address (one map, for looking up many peers at once).
    pub fn by_address(&self) -> HashMap<IpAddr, String> {
        self.table()
            .by_name
            .iter()
            .map(|(n, (a, _))| (*a, n.clone()))
            .collect()
    }

    /// Replace every name at once (a static configuration: names without peers).
    pub fn replace(&self, names: impl IntoIterator<Item = (String, IpAddr)>) {
        let by_name = names
            .into_iter()
            .map(|(n, ip)| (normal(&n), (ip, None)))
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = NameTable {
            by_name,
            of_peer: HashMap::new(),
        };
    }

    /// Peer `peer` is called `name` (empty: nothing) at `ip` (None: nowhere).
    pub fn set(&self, peer: &str, name: &str, ip: Option<IpAddr>) {
        let mut t = self.0.write().unwrap_or_else(|e| e.into_inner());
        Self::forget(&mut t, peer);
        if let (false, Some(ip)) = (name.is_empty(), ip) {
            let name = normal(name);
            t.by_name.insert(name.clone(), (ip, Some(peer.to_string())));
            t.of_peer.insert(peer.to_string(), name);
        }
    }

    /// Peer `peer` left: its name goes.
    pub fn remove(&self, peer: &str) {
        Self::forget(&mut self.0.write().unwrap_or_else(|e| e.into_inner()), peer);
    }

    fn forget(t: &mut NameTable, peer: &str) {
        // A name another peer took since (management never gives two one name) stays.
        if let Some(old) = t.of_peer.remove(peer)
            && t.by_name.get(&old).is_some_and(|(_, p)| p.as_deref() == Some(peer))
        {
            t.by_name.remove(&old);
        }
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, NameTable> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves host names for the dialler, through NetBird's chain (`plan`).
#[derive(Clone)]
pub struct Resolver {
    netstack: Netstack,
    wg: Arc<WgDevice>,
    names: MeshNames,
    state: DnsState,
}

/// A CNAME chain longer than this is a loop.
const MAX_CNAME_DEPTH: usize = 8;
/// A DNS route's forwarder gets this long (`dnsinterceptor`).
const DNS_ROUTE_TIMEOUT: Duration = Duration::from_secs(8);
/// One nameserver alone gets this long (`UpstreamTimeout`).
const SINGLE_SERVER_TIMEOUT: Duration = Duration::from_secs(4);
/// Several share this much, each at least `MIN_SERVER_TIMEOUT`.
const GROUP_BUDGET: Duration = Duration::from_secs(5);
const MIN_SERVER_TIMEOUT: Duration = Duration::from_secs(2);
/// The host resolver's bound.
const HOST_TIMEOUT: Duration = Duration::from_secs(8);

impl Resolver {
    pub fn new(netstack: Netstack, wg: Arc<WgDevice>, names: MeshNames, state: DnsState) -> Self {
        Self {
            netstack,
            wg,
            names,
            state,
        }
    }

    /// Whether some names go to nameservers rather than the host resolver.
    pub fn uses_tunnel(&self) -> bool {
        !self.state.snapshot().groups.is_empty()
    }

    /// The addresses of `host` (an IP literal resolves to itself).
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let host = host.trim_end_matches('.');
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(vec![ip]);
        }
        if let Some(ip) = self.names.lookup(host) {
            return Ok(vec![ip]);
        }
        if host.is_empty() || host.len() > 253 || !valid_name(&host.to_ascii_lowercase()) {
            return Err(ResolveError::InvalidName(host.chars().take(253).collect()));
        }
        let plan = self.state.snapshot();
        // A single-label name tries the search domains first, as a stub resolver does.
        let mut candidates: Vec<String> = Vec::new();
        if !host.contains('.') {
            candidates.extend(plan.search.iter().map(|d| format!("{host}.{d}")));
        }
        candidates.push(host.to_string());
        let mut last = ResolveError::NotFound(host.to_string());
        for candidate in candidates {
            match self.resolve_name(&plan, &candidate, 0, true).await {
                Ok(addrs) => return Ok(addrs),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// One name through the chain; `routes` false leaves DNS routes out (a DNS route's name
    /// resolved here when routing peers do not resolve them).
    async fn resolve_name(
        &self,
        plan: &Plan,
        name: &str,
        depth: usize,
        routes: bool,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        let mut past_local = false;
        loop {
            return match plan.step_from(name, past_local, routes) {
                Step::DnsRoute(route) if plan.routing_peer_resolution => {
                    self.dns_route(&route, name).await
                }
                Step::DnsRoute(route) => {
                    // Resolved here by the rest of the chain; the addresses still go on the
                    // route's routing peer.
                    let addrs = Box::pin(self.resolve_name(plan, name, depth, false)).await?;
                    self.learned(&route, &addrs).await;
                    Ok(addrs)
                }
                Step::Local => match plan.zones.lookup(name) {
                    Local::Addresses(a) => Ok(a),
                    Local::NoData => Err(ResolveError::NoAddress(name.to_string())),
                    Local::NxDomain => Err(ResolveError::NotFound(name.to_string())),
                    Local::FallThrough | Local::NotMine => {
                        past_local = true;
                        continue;
                    }
                    Local::Cname(target) if depth < MAX_CNAME_DEPTH => {
                        Box::pin(self.resolve_name(plan, &target, depth + 1, true)).await
                    }
                    Local::Cname(_) => Err(ResolveError::Failed(
                        name.to_string(),
                        "CNAME chain too long".into(),
                    )),
                },
                Step::Upstream(groups) => self.upstream(&groups, name).await,
                Step::Host if plan.exit_node => self.host_through_tunnel(name).await,
                Step::Host => self.resolve_host(name).await,
            };
        }
    }

    /// A DNS route: ask the elected routing peer's forwarder through the tunnel, and put the
    /// answer's addresses on that peer before answering.
    async fn dns_route(&self, route: &DnsRoute, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let Some(forwarder) = route.forwarder else {
            return Err(ResolveError::Failed(
                name.to_string(),
                "DNS route without a reachable routing peer".into(),
            ));
        };
        let addrs = self
            .exchange(forwarder, name, DNS_ROUTE_TIMEOUT)
            .await
            .map_err(|e| match e {
                // The forwarder answers SERVFAIL when it cannot resolve: say so plainly.
                ResolveError::Timeout(n) => ResolveError::Failed(
                    n,
                    format!("the routing peer's DNS forwarder {forwarder} did not answer"),
                ),
                other => other,
            })?;
        self.learned(route, &addrs).await;
        Ok(addrs)
    }

    /// A DNS route's answer: its addresses go on the route's routing peer before it is used.
    async fn learned(&self, route: &DnsRoute, addrs: &[IpAddr]) {
        if let Some(to) = self.state.learned() {
            let (done, wait) = tokio::sync::oneshot::channel();
            let learned = Learned {
                route: route.route.clone(),
                addrs: addrs.to_vec(),
                done,
            };
            if to.send(learned).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
            }
        }
    }

    /// Nameserver groups: raced; within a group, servers in turn.
    async fn upstream(&self, groups: &[NsGroup], name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let attempts = groups.iter().map(|g| Box::pin(self.group(g, name)));
        match futures::future::select_ok(attempts).await {
            Ok((addrs, _)) => Ok(addrs),
            Err(e) => Err(e),
        }
    }

    async fn group(&self, g: &NsGroup, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let per_server = if g.servers.len() <= 1 {
            SINGLE_SERVER_TIMEOUT
        } else {
            (GROUP_BUDGET / g.servers.len() as u32).max(MIN_SERVER_TIMEOUT)
        };
        let deadline = Instant::now() + GROUP_BUDGET.max(per_server);
        let mut last = ResolveError::Timeout(name.to_string());
        for &server in &g.servers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.exchange(server, name, per_server.min(left)).await {
                Ok(a) => return Ok(a),
                // An answer that settles it: no need to ask another server.
                Err(e @ (ResolveError::NotFound(_) | ResolveError::NoAddress(_))) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The host's nameservers, asked through the tunnel (an exit node carries them).
    async fn host_through_tunnel(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let servers = host_nameservers();
        let usable: Vec<SocketAddr> = servers
            .iter()
            .filter(|ip| !ip.is_loopback() && self.wg.route(**ip).is_some())
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect();
        if usable.is_empty() {
            return Err(ResolveError::Failed(
                name.to_string(),
                "an exit node is in use and no nameserver can be asked through it (the host's \
                 are loopback or none; add a primary nameserver group), so the name is not \
                 sent to the host's resolver"
                    .into(),
            ));
        }
        let group = NsGroup {
            servers: usable,
            primary: true,
            domains: Vec::new(),
            search: false,
        };
        self.group(&group, name).await
    }

    async fn resolve_host(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let lookup = tokio::net::lookup_host((host, 0));
        match tokio::time::timeout(HOST_TIMEOUT, lookup).await {
            Err(_) => Err(ResolveError::Timeout(host.to_string())),
            Ok(Err(e)) => Err(ResolveError::Failed(host.to_string(), e.to_string())),
            Ok(Ok(addrs)) => {
                let mut out: Vec<IpAddr> = Vec::new();
                for a in addrs {
                    if !out.contains(&a.ip()) {
                        out.push(a.ip());
                    }
                }
                if out.is_empty() {
                    Err(ResolveError::NoAddress(host.to_string()))
                } else {
                    Ok(out)
                }
            }
        }
    }

    /// Ask one server for A and AAAA of `host`: through the tunnel when WireGuard routes the
    /// server (a mesh peer, or inside a route: NetBird's iOS rule), from the host otherwise.
    async fn exchange(
        &self,
        server: SocketAddr,
        host: &str,
        timeout: Duration,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        let name = Name::from_str(&format!("{host}."))
            .map_err(|_| ResolveError::InvalidName(host.to_string()))?;
        let failed = |e: String| ResolveError::Failed(host.to_string(), e);
        let socket = if self.wg.route(server.ip()).is_some() && !server.ip().is_loopback() {
            Sock::Mesh(
                self.netstack
                    .udp_bind()
                    .await
                    .map_err(|e| failed(e.to_string()))?,
            )
        } else {
            let bind: SocketAddr = if server.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            Sock::Host(
                tokio::net::UdpSocket::bind(bind)
                    .await
                    .map_err(|e| failed(e.to_string()))?,
            )
        };
        let id_a: u16 = rand::random();
        let id_aaaa = id_a.wrapping_add(1);
        socket
            .send_to(&build_query(id_a, &name, RecordType::A), server)
            .await
            .map_err(|e| failed(e.to_string()))?;
        socket
            .send_to(&build_query(id_aaaa, &name, RecordType::AAAA), server)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut v4: Option<Vec<IpAddr>> = None;
        let mut v6: Option<Vec<IpAddr>> = None;
        let mut nxdomain = false;
        // One type refused or failed (a server without AAAA data answers REFUSED) does not
        // spoil the other's addresses; it decides only when nothing else came.
        let mut failure: Option<ResolveError> = None;
        while v4.is_none() || v6.is_none() {
            let recv = tokio::time::timeout_at(deadline, socket.recv_from()).await;
            let Ok(Ok((bytes, from))) = recv else { break };
            if from != server {
                continue;
            }
            let (slot, id) = if v4.is_none() && parse_answer(&bytes, id_a).is_some() {
                (&mut v4, id_a)
            } else {
                (&mut v6, id_aaaa)
            };
            match parse_answer(&bytes, id) {
                Some(Answer::Addresses(a)) => *slot = Some(a),
                Some(Answer::Truncated) => {
                    let rtype = if id == id_a {
                        RecordType::A
                    } else {
                        RecordType::AAAA
                    };
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.exchange_tcp(server, &name, rtype, id, left).await {
                        Ok(a) => *slot = Some(a),
                        Err(ResolveError::NotFound(_)) => {
                            nxdomain = true;
                            *slot = Some(Vec::new());
                        }
                        Err(e) => {
                            failure = Some(e);
                            *slot = Some(Vec::new());
                        }
                    }
                }
                Some(Answer::NoSuchName) => {
                    nxdomain = true;
                    *slot = Some(Vec::new());
                }
                Some(Answer::ServerError(code)) => {
                    debug!(%server, ?code, host, "DNS server error");
                    failure = Some(failed(format!("{server} answered {code}")));
                    *slot = Some(Vec::new());
                }
                None => {}
            }
        }
        // IPv4 first: most mesh services listen there.
        let mut addrs = v4.clone().unwrap_or_default();
        addrs.extend(v6.clone().unwrap_or_default());
        if !addrs.is_empty() {
            return Ok(addrs);
        }
        if nxdomain {
            return Err(ResolveError::NotFound(host.to_string()));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if v4.is_some() && v6.is_some() {
            return Err(ResolveError::NoAddress(host.to_string()));
        }
        Err(ResolveError::Timeout(host.to_string()))
    }
}

impl Resolver {
    /// One query over TCP (after a truncated UDP answer), through the tunnel when WireGuard
    /// routes the server, from the host otherwise; RFC 1035's two-byte length framing.
    async fn exchange_tcp(
        &self,
        server: SocketAddr,
        name: &Name,
        rtype: RecordType,
        id: u16,
        timeout: Duration,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = name.to_ascii();
        let failed = |e: String| ResolveError::Failed(host.clone(), e);
        let exchange = async {
            let mut stream: Box<dyn Stream> =
                if self.wg.route(server.ip()).is_some() && !server.ip().is_loopback() {
                    Box::new(
                        self.netstack
                            .connect(server)
                            .await
                            .map_err(|e| e.to_string())?,
                    )
                } else {
                    Box::new(
                        tokio::net::TcpStream::connect(server)
                            .await
                            .map_err(|e| e.to_string())?,
                    )
                };
            let query = build_query(id, name, rtype);
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&query);
            stream.write_all(&framed).await.map_err(|e| e.to_string())?;
            let mut len = [0u8; 2];
            stream
                .read_exact(&mut len)
                .await
                .map_err(|e| e.to_string())?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream
                .read_exact(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(answer)
        };
        let answer = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(ResolveError::Timeout(host)),
            Ok(Err(e)) => return Err(failed(format!("{server} over TCP: {e}"))),
            Ok(Ok(a)) => a,
        };
        match parse_answer(&answer, id) {
            Some(Answer::Addresses(a)) => Ok(a),
            Some(Answer::NoSuchName) => Err(ResolveError::NotFound(host)),
            Some(Answer::ServerError(code)) => Err(failed(format!("{server} answered {code}"))),
            Some(Answer::Truncated) | None => {
                Err(failed(format!("{server}: no usable TCP answer")))
            }
        }
    }
}

/// A byte stream to a nameserver (in the netstack or on the host).
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A UDP socket in the netstack or on the host.
enum Sock {
    Mesh(crate::netstack::UdpSocket),
    Host(tokio::net::UdpSocket),
}

impl Sock {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> std::io::Result<()> {
        match self {
            Sock::Mesh(s) => s.send_to(data, to),
            Sock::Host(s) => s.send_to(data, to).await.map(|_| ()),
        }
    }

    async fn recv_from(&self) -> std::io::Result<(Vec<u8>, SocketAddr)> {
        match self {
            Sock::Mesh(s) => s.recv_from().await,
            Sock::Host(s) => {
                let mut buf = vec![0u8; 4096];
                let (n, from) = s.recv_from(&mut buf).await?;
                buf.truncate(n);
                Ok((buf, SocketAddr::new(from.ip().to_canonical(), from.port())))
            }
        }
    }
}

/// The host's nameservers (`/etc/resolv.conf`).
pub(crate) fn host_nameservers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA};

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn response(id: u16, code: ResponseCode, records: Vec<Record>) -> Vec<u8> {
        let mut msg = Message::new(id, MessageType::Response, OpCode::Query);
        msg.metadata.response_code = code;
        for r in records {
            msg.answers.push(r);
        }
        msg.to_vec().unwrap()
    }

    #[test]
    fn names_follow_their_peers_one_at_a_time() {
        let names = MeshNames::default();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        names.set("k1", "Web.Mesh.Test.", ip("100.64.0.2"));
        names.set("k2", "db.mesh.test", ip("100.64.0.3"));
        assert_eq!(names.lookup("web.mesh.test"), ip("100.64.0.2"));
        // Renamed: the old name goes.
        names.set("k1", "www.mesh.test", ip("100.64.0.2"));
        assert_eq!(names.lookup("web.mesh.test"), None);
        assert_eq!(names.lookup("WWW.mesh.test."), ip("100.64.0.2"));
        // A name another peer holds is not taken away by the first one leaving.
        names.set("k3", "db.mesh.test", ip("100.64.0.9"));
        names.remove("k2");
        assert_eq!(names.lookup("db.mesh.test"), ip("100.64.0.9"));
        names.remove("k3");
        assert_eq!(names.lookup("db.mesh.test"), None);
        // No name, or no address: nothing.
        names.set("k1", "", ip("100.64.0.2"));
        names.set("k4", "x.mesh.test", None);
        assert_eq!(names.by_address().len(), 0);
    }

    #[test]
    fn query_round_trips() {
        let q = build_query(7, &name("web.mesh.test."), RecordType::AAAA);
        let msg = Message::from_vec(&q).unwrap();
        assert_eq!(msg.metadata.id, 7);
        assert!(msg.metadata.recursion_desired);
        assert_eq!(msg.queries[0].query_type(), RecordType::AAAA);
        assert_eq!(msg.queries[0].name(), &name("web.mesh.test."));
    }

    #[test]
    fn answers_are_decoded() {
        let n = name("web.mesh.test.");
        let bytes = response(
            9,
            ResponseCode::NoError,
            vec![
                Record::from_rdata(n.clone(), 60, RData::A(A("100.64.0.2".parse().unwrap()))),
                Record::from_rdata(n, 60, RData::AAAA(AAAA("fd00::2".parse().unwrap()))),
            ],
        );
        assert_eq!(
            parse_answer(&bytes, 9),
            Some(Answer::Addresses(vec![
                "100.64.0.2".parse().unwrap(),
                "fd00::2".parse().unwrap()
            ]))
        );
        assert_eq!(parse_answer(&bytes, 10), None, "wrong transaction id");
    }

    #[test]
    fn mesh_names_are_case_insensitive() {
        let names = MeshNames::default();
        names.replace([(
            "Bravo.NetBird.Test.".to_string(),
            "100.64.0.3".parse().unwrap(),
        )]);
        assert_eq!(
            names.lookup("bravo.netbird.test"),
            Some("100.64.0.3".parse().unwrap())
        );
        assert_eq!(
            names.lookup("BRAVO.netbird.test."),
            Some("100.64.0.3".parse().unwrap())
        );
        assert_eq!(names.lookup("alpha.netbird.test"), None);
    }

    #[test]
    fn errors_and_garbage() {
        let nx = response(1, ResponseCode::NXDomain, vec![]);
        assert_eq!(parse_answer(&nx, 1), Some(Answer::NoSuchName));
        let fail = response(1, ResponseCode::ServFail, vec![]);
        assert_eq!(
            parse_answer(&fail, 1),
            Some(Answer::ServerError(ResponseCode::ServFail))
        );
        assert_eq!(parse_answer(b"\x00\x01garbage", 1), None);
        assert_eq!(parse_answer(&[], 1), None);
        let query = build_query(1, &name("x.test."), RecordType::A);
        assert_eq!(parse_answer(&query, 1), None, "a query is not an answer");
    }

    /// A resolver over real host sockets, with a primary nameserver group at `server`.
    fn resolver(server: SocketAddr) -> (Resolver, tokio_util::sync::CancellationToken) {
        let pool = Arc::new(crate::packet::PacketPool::new(1500, 4));
        let wg = Arc::new(WgDevice::new([7; 32], 0, Vec::new(), pool.clone()).unwrap());
        let (_tx, from_wg) = tokio::sync::mpsc::channel(4);
        let (to_wg, _rx) = tokio::sync::mpsc::channel(4);
        let cancel = tokio_util::sync::CancellationToken::new();
        let config =
            crate::netstack::NetstackConfig::new(vec!["100.64.0.1/16".parse().unwrap()], 1280);
        let (netstack, task) =
            crate::netstack::Netstack::new(config, from_wg, to_wg, pool, cancel.clone());
        tokio::spawn(task);
        let state = DnsState::default();
        state.set_config(crate::dns::DnsConfig {
            enabled: true,
            groups: vec![NsGroup {
                servers: vec![server],
                primary: true,
                domains: Vec::new(),
                search: false,
            }],
            ..Default::default()
        });
        (
            Resolver::new(netstack, wg, MeshNames::default(), state),
            cancel,
        )
    }

    /// A nameserver that answers every UDP query truncated and the same query over TCP in
    /// full: the resolver asks again over TCP, as upstream does.
    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(server).await.unwrap();
        let answer = |query: &[u8], truncated: bool| {
            let q = Message::from_vec(query).unwrap();
            let mut msg = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            msg.metadata.truncation = truncated;
            let question = q.queries[0].clone();
            if !truncated && question.query_type() == RecordType::A {
                msg.answers.push(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A("198.19.1.10".parse().unwrap())),
                ));
            }
            msg.add_query(question);
            msg.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                udp.send_to(&answer(&buf[..n], true), from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len).await.unwrap();
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    s.read_exact(&mut q).await.unwrap();
                    let a = answer(&q, false);
                    s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
                    s.write_all(&a).await.unwrap();
                });
            }
        });
        let (r, cancel) = resolver(server);
        assert_eq!(
            r.resolve("big.corp.example").await.unwrap(),
            vec!["198.19.1.10".parse::<IpAddr>().unwrap()]
        );
        cancel.cancel();
    }

    /// Without routing-peer resolution (`RoutingPeerDnsResolutionEnabled` off), a DNS route's
    /// name is resolved here by the rest of the chain, and its addresses still go to the route.
    #[tokio::test]
    async fn dns_routes_resolve_here_when_routing_peers_do_not() {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut msg = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                let question = q.queries[0].clone();
                if question.query_type() == RecordType::A {
                    msg.answers.push(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(A("198.19.3.10".parse().unwrap())),
                    ));
                } else {
                    // A server that refuses AAAA: the A answer still counts.
                    msg.metadata.response_code = ResponseCode::Refused;
                }
                msg.add_query(question);
                udp.send_to(&msg.to_vec().unwrap(), from).await.unwrap();
            }
        });
        let (r, cancel) = resolver(server);
        let route = DnsRoute {
            route: "apps|*.apps.example".into(),
            patterns: vec!["*.apps.example".into()],
            forwarder: None,
        };
        r.state.set_routes(vec![route], false);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        r.state.report_learned(tx);
        tokio::spawn(async move {
            while let Some(l) = rx.recv().await {
                assert_eq!(l.route, "apps|*.apps.example");
                assert_eq!(l.addrs, vec!["198.19.3.10".parse::<IpAddr>().unwrap()]);
                let _ = l.done.send(());
            }
        });
        assert!(!r.state.snapshot().routing_peer_resolution);
        assert_eq!(
            r.resolve("web.apps.example").await.unwrap(),
            vec!["198.19.3.10".parse::<IpAddr>().unwrap()]
        );
        // With routing-peer resolution on and no routing peer, the name fails.
        let on = crate::dns::DnsConfig {
            enabled: true,
            groups: r.state.snapshot().groups.clone(),
            routing_peer_resolution: true,
            ..Default::default()
        };
        r.state.set_config(on);
        assert!(r.resolve("web.apps.example").await.is_err());
        cancel.cancel();
    }
}
