//! DNS through the tunnel: queries for A and AAAA records over the netstack's UDP, to the
//! servers of the config's `DNS =` line; the host resolver otherwise.
//!
//! The message codec (`build_query`, `parse_answer`) is pure and unit-tested; `Resolver` adds the
//! exchange with timeouts and retries. Messages come from hickory-proto, not a hand-written codec.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
}

/// Decode a response to transaction `id`; `None` if the bytes are not that response.
pub fn parse_answer(bytes: &[u8], id: u16) -> Option<Answer> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        return None;
    }
    match msg.metadata.response_code {
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
#[derive(Clone, Debug, Default)]
pub struct MeshNames(Arc<RwLock<HashMap<String, IpAddr>>>);

impl MeshNames {
    /// The address of `name` (case-insensitive, trailing dot ignored).
    pub fn lookup(&self, name: &str) -> Option<IpAddr> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied()
    }

    /// Every name by its address (one map, for looking up many peers at once).
    pub fn by_address(&self) -> HashMap<IpAddr, String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, a)| (*a, n.clone()))
            .collect()
    }

    /// Replace every name at once.
    pub fn replace(&self, names: impl IntoIterator<Item = (String, IpAddr)>) {
        let map = names
            .into_iter()
            .map(|(n, ip)| (n.trim_end_matches('.').to_ascii_lowercase(), ip))
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = map;
    }
}

/// Resolves host names for the dialler.
#[derive(Clone)]
pub struct Resolver {
    netstack: Netstack,
    names: MeshNames,
    servers: Vec<IpAddr>,
    search: Vec<String>,
    timeout: Duration,
    attempts: usize,
}

impl Resolver {
    /// Resolve through `servers` over the tunnel; with no servers, use the host resolver.
    pub fn new(
        netstack: Netstack,
        names: MeshNames,
        servers: Vec<IpAddr>,
        search: Vec<String>,
    ) -> Self {
        Self {
            netstack,
            names,
            servers,
            search,
            timeout: Duration::from_secs(2),
            attempts: 2,
        }
    }

    /// Whether names go to DNS servers through the tunnel.
    pub fn uses_tunnel(&self) -> bool {
        !self.servers.is_empty()
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
        if host.is_empty() || host.len() > 253 {
            return Err(ResolveError::InvalidName(host.to_string()));
        }
        if self.servers.is_empty() {
            return self.resolve_host(host).await;
        }
        // A single-label name tries the search domains first, as a stub resolver does.
        let mut candidates: Vec<String> = Vec::new();
        if !host.contains('.') {
            candidates.extend(self.search.iter().map(|d| format!("{host}.{d}")));
        }
        candidates.push(host.to_string());
        let mut last = ResolveError::NotFound(host.to_string());
        for candidate in candidates {
            match self.resolve_tunnel(&candidate).await {
                Ok(addrs) => return Ok(addrs),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn resolve_host(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let lookup = tokio::net::lookup_host((host, 0));
        match tokio::time::timeout(self.timeout * self.attempts as u32 * 2, lookup).await {
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

    /// Ask each server in turn for A and AAAA, `attempts` rounds, `timeout` per round.
    async fn resolve_tunnel(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let name = Name::from_str(&format!("{host}."))
            .map_err(|_| ResolveError::InvalidName(host.to_string()))?;
        let socket = self
            .netstack
            .udp_bind()
            .await
            .map_err(|e| ResolveError::Failed(host.to_string(), e.to_string()))?;
        let mut nxdomain = false;
        for _ in 0..self.attempts {
            for &server in &self.servers {
                let to = SocketAddr::new(server, 53);
                let id_a: u16 = rand::random();
                let id_aaaa = id_a.wrapping_add(1);
                let sent_a = socket.send_to(&build_query(id_a, &name, RecordType::A), to);
                let sent_aaaa = socket.send_to(&build_query(id_aaaa, &name, RecordType::AAAA), to);
                if sent_a.is_err() || sent_aaaa.is_err() {
                    continue;
                }
                let deadline = Instant::now() + self.timeout;
                let mut v4: Option<Vec<IpAddr>> = None;
                let mut v6: Option<Vec<IpAddr>> = None;
                while v4.is_none() || v6.is_none() {
                    let recv = tokio::time::timeout_at(deadline, socket.recv_from()).await;
                    let Ok(Ok((bytes, from))) = recv else { break };
                    if from != to {
                        continue;
                    }
                    let (slot, id) = if v4.is_none() && parse_answer(&bytes, id_a).is_some() {
                        (&mut v4, id_a)
                    } else {
                        (&mut v6, id_aaaa)
                    };
                    match parse_answer(&bytes, id) {
                        Some(Answer::Addresses(a)) => *slot = Some(a),
                        Some(Answer::NoSuchName) => {
                            nxdomain = true;
                            *slot = Some(Vec::new());
                        }
                        Some(Answer::ServerError(code)) => {
                            debug!(%server, ?code, host, "DNS server error");
                            break;
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
                if v4.is_some() && v6.is_some() {
                    return Err(ResolveError::NoAddress(host.to_string()));
                }
            }
        }
        Err(ResolveError::Timeout(host.to_string()))
    }
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
}
