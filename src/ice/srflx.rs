//! Our server-reflexive address, learned from STUN servers through the WireGuard socket itself
//! (ice.md §2): a plain Binding request per server, the answer cached 25 s and shared by every
//! peer's agent. Unlike NetBird's mux, a lost request is retried (0.5, 1, 2 s) before giving
//! up, so one dropped datagram does not cost a peer its srflx candidate.
//!
//! Sans-IO: fed responses and time, it returns datagrams to send and the mappings it learns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::wire;

/// How long a mapping is trusted (NetBird's `XORMappedAddrCacheTTL`).
pub const CACHE_TTL: Duration = Duration::from_secs(25);
/// Retransmission delays of one request; after the last one the server is skipped this round.
const RETRIES: [Duration; 4] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(2),
];

/// A mapping a server reported: our address as it sees it, and the local address the answer
/// arrived at (the candidate's base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub server: SocketAddr,
    pub mapped: SocketAddr,
    pub base: SocketAddr,
}

#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    mapping: Option<(Mapping, Instant)>,
    /// The request in flight: its transaction, when it goes out again, and how many went.
    pending: Option<([u8; 12], Instant, usize)>,
}

/// The STUN client of all agents.
#[derive(Debug, Default)]
pub struct Srflx {
    servers: Vec<Server>,
    transmits: Vec<(SocketAddr, [u8; wire::HEADER_LEN])>,
    learned: Vec<Mapping>,
}

impl Srflx {
    /// Replace the server list (from management's `stuns`); known servers keep their cache.
    pub fn set_servers(&mut self, addrs: &[SocketAddr]) {
        let mut old = std::mem::take(&mut self.servers);
        for &addr in addrs {
            match old.iter().position(|s| s.addr == addr) {
                Some(i) => self.servers.push(old.swap_remove(i)),
                None if !self.servers.iter().any(|s| s.addr == addr) => self.servers.push(Server {
                    addr,
                    mapping: None,
                    pending: None,
                }),
                None => {}
            }
        }
    }

    /// An agent is gathering: ask every server whose answer is missing or stale.
    pub fn refresh(&mut self, now: Instant) {
        for s in &mut self.servers {
            let fresh = s.mapping.is_some_and(|(_, at)| now < at + CACHE_TTL);
            if !fresh && s.pending.is_none() {
                let tid: [u8; 12] = rand::random();
                s.pending = Some((tid, now, 0));
            }
        }
        self.handle_timeout(now);
    }

    /// The mappings still fresh.
    pub fn mappings(&self, now: Instant) -> impl Iterator<Item = Mapping> + '_ {
        self.servers
            .iter()
            .filter_map(move |s| s.mapping.filter(|(_, at)| now < *at + CACHE_TTL))
            .map(|(m, _)| m)
    }

    /// A STUN datagram from `src` that arrived at `local`: true if it answered one of our
    /// requests (and so is not for an agent).
    pub fn handle_response(
        &mut self,
        now: Instant,
        src: SocketAddr,
        local: SocketAddr,
        data: &[u8],
    ) -> bool {
        let Ok((tid, mapped)) = wire::parse_binding_success(data) else {
            return false;
        };
        let Some(s) = self
            .servers
            .iter_mut()
            .find(|s| s.addr == src && s.pending.is_some_and(|(t, ..)| t == tid))
        else {
            return false;
        };
        s.pending = None;
        let m = Mapping {
            server: s.addr,
            mapped: SocketAddr::new(mapped.ip().to_canonical(), mapped.port()),
            base: local,
        };
        s.mapping = Some((m, now));
        self.learned.push(m);
        true
    }

    /// Send what is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        for s in &mut self.servers {
            let Some((tid, due, sent)) = s.pending else {
                continue;
            };
            if now < due {
                continue;
            }
            if sent == RETRIES.len() {
                s.pending = None;
                continue;
            }
            self.transmits.push((s.addr, wire::binding_request(tid)));
            s.pending = Some((tid, now + RETRIES[sent], sent + 1));
        }
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, [u8; wire::HEADER_LEN])> {
        self.transmits.pop()
    }

    /// A mapping just learned.
    pub fn poll_mapping(&mut self) -> Option<Mapping> {
        self.learned.pop()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.servers
            .iter()
            .filter_map(|s| s.pending.map(|p| p.1))
            .min()
    }
}

/// The `host:port` to resolve for a STUN URI from management (`stun:host[:port][?…]`, RFC
/// 7064; `stuns:` too, whose TLS we do not speak but whose host may answer plain STUN); port
/// 3478 when none is given. None for anything else (TURN URIs are not STUN servers here).
pub fn server_target(uri: &str) -> Option<String> {
    let rest = uri
        .strip_prefix("stun:")
        .or_else(|| uri.strip_prefix("stuns:"))?;
    let rest = rest.split('?').next().unwrap_or(rest).trim();
    if rest.is_empty() {
        return None;
    }
    let has_port = match rest.rsplit_once(':') {
        // "[v6]:port" or "host:port"; a bare IPv6 literal has colons but no brackets.
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (host.ends_with(']') || !host.contains(':'))
        }
        None => false,
    };
    Some(if has_port {
        rest.to_string()
    } else if rest.contains(':') && !rest.starts_with('[') {
        format!("[{rest}]:3478")
    } else {
        format!("{rest}:3478")
    })
}

/// The `host:port` of a TURN URI we can use (`turn:host[:port][?transport=udp]`, port 3478
/// when none is given); None for TURN over TCP or TLS (`turns:`), which we do not speak.
pub fn turn_target(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("turn:")?;
    let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
    if query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("transport=tcp"))
    {
        return None;
    }
    server_target(&format!("stun:{addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_uris_over_udp_become_addresses() {
        assert_eq!(
            turn_target("turn:turn.netbird.io:443?transport=udp").as_deref(),
            Some("turn.netbird.io:443")
        );
        assert_eq!(
            turn_target("turn:198.19.0.1").as_deref(),
            Some("198.19.0.1:3478")
        );
        assert_eq!(turn_target("turn:198.19.0.1:3478?transport=tcp"), None);
        assert_eq!(turn_target("turns:turn.netbird.io:443"), None);
        assert_eq!(turn_target("stun:198.19.0.1"), None);
    }

    #[test]
    fn stun_uris_become_addresses_to_resolve() {
        assert_eq!(
            server_target("stun:stun.netbird.io:5555").as_deref(),
            Some("stun.netbird.io:5555")
        );
        assert_eq!(
            server_target("stun:198.19.0.1").as_deref(),
            Some("198.19.0.1:3478")
        );
        assert_eq!(
            server_target("stun:[2001:db8::1]:3479").as_deref(),
            Some("[2001:db8::1]:3479")
        );
        assert_eq!(
            server_target("stun:[2001:db8::1]").as_deref(),
            Some("[2001:db8::1]:3478")
        );
        assert_eq!(
            server_target("stun:2001:db8::1").as_deref(),
            Some("[2001:db8::1]:3478")
        );
        assert_eq!(
            server_target("stun:host:3478?transport=udp").as_deref(),
            Some("host:3478")
        );
        assert_eq!(server_target("turn:turn.netbird.io:443"), None);
        assert_eq!(server_target("stun:"), None);
        assert_eq!(server_target("198.19.0.1:3478"), None);
    }

    #[test]
    fn a_request_is_retried_then_answered_and_cached() {
        let server: SocketAddr = "198.19.0.1:3478".parse().unwrap();
        let local: SocketAddr = "10.0.1.2:51820".parse().unwrap();
        let mut c = Srflx::default();
        c.set_servers(&[server, server]);
        let t0 = Instant::now();
        c.refresh(t0);
        let (to, first) = c.poll_transmit().unwrap();
        assert_eq!(to, server);
        assert!(c.poll_transmit().is_none(), "one server, one request");
        // Lost: the same transaction goes again after 500 ms.
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(500)));
        c.handle_timeout(t0 + Duration::from_millis(500));
        let (_, again) = c.poll_transmit().unwrap();
        assert_eq!(first, again);
        // An answer from elsewhere, or for another transaction, is not ours.
        let mut out = [0u8; 44];
        let n =
            wire::binding_success(&again, "198.19.1.2:40000".parse().unwrap(), &mut out).unwrap();
        assert!(!c.handle_response(t0, "198.19.0.9:3478".parse().unwrap(), local, &out[..n]));
        let n2 =
            wire::binding_success(&wire::binding_request([0; 12]), local, &mut [0u8; 44]).unwrap();
        assert!(n2 > 0);
        assert!(c.handle_response(t0, server, local, &out[..n]));
        let m = c.poll_mapping().unwrap();
        assert_eq!(m.mapped, "198.19.1.2:40000".parse().unwrap());
        assert_eq!(m.base, local);
        assert_eq!(c.mappings(t0).count(), 1);
        // Cached for 25 s: no new request until then.
        c.refresh(t0 + Duration::from_secs(10));
        assert!(c.poll_transmit().is_none());
        assert_eq!(c.mappings(t0 + CACHE_TTL).count(), 0);
        c.refresh(t0 + CACHE_TTL);
        assert!(c.poll_transmit().is_some());
    }

    #[test]
    fn an_unanswered_server_is_given_up_after_the_retries() {
        let mut c = Srflx::default();
        c.set_servers(&["198.19.0.1:3478".parse().unwrap()]);
        let mut now = Instant::now();
        c.refresh(now);
        let mut sent = 0;
        while let Some(at) = c.poll_timeout() {
            while c.poll_transmit().is_some() {
                sent += 1;
            }
            now = at;
            c.handle_timeout(now);
        }
        assert_eq!(sent, RETRIES.len());
    }
}
