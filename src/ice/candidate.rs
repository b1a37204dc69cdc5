//! NetBird's candidate lines (ice.md §1.4): what a Go peer sends as a CANDIDATE message's
//! payload, and what we send back.
//!
//! `<foundation> 1 udp <priority> <ip> <port> typ <host|srflx|prflx|relay> [raddr <ip> rport
//! <port>] [<key> <value>]…` — pion's `Marshal`, without the `candidate:` prefix (accepted when
//! present); unknown extensions (`ufrag`, the fork's `cid`, …) are skipped. The parser is strict
//! about everything the agent uses and never panics (fuzzed in `fuzz/fuzz_targets/ice_wire.rs`).

use std::net::{IpAddr, SocketAddr};

/// A candidate's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Host,
    ServerReflexive,
    PeerReflexive,
    Relay,
}

impl Kind {
    /// The name in a candidate line (and in status).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::ServerReflexive => "srflx",
            Kind::PeerReflexive => "prflx",
            Kind::Relay => "relay",
        }
    }

    pub fn from_ice(k: is::CandidateKind) -> Self {
        match k {
            is::CandidateKind::Host => Kind::Host,
            is::CandidateKind::ServerReflexive => Kind::ServerReflexive,
            is::CandidateKind::PeerReflexive => Kind::PeerReflexive,
            is::CandidateKind::Relayed => Kind::Relay,
        }
    }
}

/// A remote candidate, as parsed from its line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCandidate {
    pub foundation: String,
    pub priority: u32,
    pub addr: SocketAddr,
    pub kind: Kind,
    pub related: Option<SocketAddr>,
}

/// Why a candidate line was dropped (each reason is counted in `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CandidateError {
    #[error("too few fields")]
    Truncated,
    #[error("bad foundation")]
    Foundation,
    #[error("component {0} (only 1, WireGuard's, exists)")]
    Component(String),
    #[error("transport {0} (only udp)")]
    Transport(String),
    #[error("bad priority")]
    Priority,
    #[error("address {0} is not an IP literal (mDNS names are not resolved, as in NetBird)")]
    Address(String),
    #[error("bad port")]
    Port,
    #[error("missing or unknown type")]
    Type,
    #[error("bad related address")]
    Related,
    #[error("unusable address {0}")]
    Unusable(IpAddr),
    #[error("longer than any candidate line")]
    TooLong,
}

/// Longest line accepted (pion's lines are ~150 bytes).
const MAX_LINE: usize = 512;

/// Parse one candidate line.
pub fn parse(line: &str) -> Result<RemoteCandidate, CandidateError> {
    if line.len() > MAX_LINE {
        return Err(CandidateError::TooLong);
    }
    let line = line.trim();
    let line = line.strip_prefix("candidate:").unwrap_or(line);
    let mut f = line.split_ascii_whitespace();
    let mut next = || f.next().ok_or(CandidateError::Truncated);
    let foundation = next()?;
    if foundation.len() > 32
        || !foundation
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return Err(CandidateError::Foundation);
    }
    let component = next()?;
    if component != "1" {
        return Err(CandidateError::Component(
            component.chars().take(8).collect(),
        ));
    }
    let transport = next()?;
    if !transport.eq_ignore_ascii_case("udp") {
        return Err(CandidateError::Transport(
            transport.chars().take(8).collect(),
        ));
    }
    let priority: u32 = next()?.parse().map_err(|_| CandidateError::Priority)?;
    let ip_text = next()?;
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| CandidateError::Address(ip_text.chars().take(64).collect()))?;
    let port: u16 = next()?.parse().map_err(|_| CandidateError::Port)?;
    if port == 0 {
        return Err(CandidateError::Port);
    }
    if next()? != "typ" {
        return Err(CandidateError::Type);
    }
    let kind = match next()? {
        "host" => Kind::Host,
        "srflx" => Kind::ServerReflexive,
        "prflx" => Kind::PeerReflexive,
        "relay" => Kind::Relay,
        _ => return Err(CandidateError::Type),
    };
    let ip = ip.to_canonical();
    if !usable(ip) {
        return Err(CandidateError::Unusable(ip));
    }
    // Extensions: key-value pairs; raddr/rport are read, the rest skipped.
    let (mut raddr, mut rport) = (None, None);
    while let Some(key) = f.next() {
        let value = f.next().ok_or(CandidateError::Truncated)?;
        match key {
            "raddr" => {
                raddr = Some(
                    value
                        .parse::<IpAddr>()
                        .map_err(|_| CandidateError::Related)?,
                )
            }
            "rport" => rport = Some(value.parse::<u16>().map_err(|_| CandidateError::Related)?),
            _ => {}
        }
    }
    let related = match (raddr, rport) {
        (Some(ip), Some(port)) => Some(SocketAddr::new(ip.to_canonical(), port)),
        (None, None) => None,
        _ => return Err(CandidateError::Related),
    };
    Ok(RemoteCandidate {
        foundation: foundation.to_string(),
        priority,
        addr: SocketAddr::new(ip, port),
        kind,
        related,
    })
}

/// Addresses a check can go to: not unspecified, multicast, broadcast or link-local (as
/// NetBird's Go client, which gathers none of these).
pub fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            !(v.is_unspecified() || v.is_multicast() || v.is_broadcast() || v.is_link_local())
        }
        IpAddr::V6(v) => !(v.is_unspecified() || v.is_multicast() || v.is_unicast_link_local()),
    }
}

impl RemoteCandidate {
    /// The agent's view of this candidate.
    pub fn to_ice(&self) -> Result<is::Candidate, is::IceError> {
        let mut line = format!(
            "candidate:{} 1 udp {} {} {} typ {}",
            self.foundation,
            self.priority,
            self.addr.ip(),
            self.addr.port(),
            self.kind.as_str()
        );
        if let Some(r) = self.related {
            line.push_str(&format!(" raddr {} rport {}", r.ip(), r.port()));
        } else if self.kind != Kind::Host {
            // The agent wants a related address on every non-host candidate.
            let any = if self.addr.is_ipv4() { "0.0.0.0" } else { "::" };
            line.push_str(&format!(" raddr {any} rport 0"));
        }
        is::Candidate::from_sdp_string(&line)
    }
}

/// Our candidate as a line for a CANDIDATE message: the agent's SDP form without the
/// `candidate:` prefix (pion before the fork rejects it).
pub fn to_line(c: &is::Candidate) -> String {
    let s = c.to_sdp_string();
    s.strip_prefix("candidate:").unwrap_or(&s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_peers_lines_parse() {
        let host = parse(
            "2638508698 1 udp 2130706431 10.0.1.2 51820 typ host ufrag abcdefghijklmnop cid \
             Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4",
        )
        .unwrap();
        assert_eq!(host.kind, Kind::Host);
        assert_eq!(host.addr, "10.0.1.2:51820".parse().unwrap());
        assert_eq!(host.priority, 2130706431);
        assert_eq!(host.related, None);
        let srflx = parse(
            "candidate:571043787 1 UDP 1694498815 198.19.1.2 40001 typ srflx raddr 0.0.0.0 rport 51820",
        )
        .unwrap();
        assert_eq!(srflx.kind, Kind::ServerReflexive);
        assert_eq!(srflx.related, Some("0.0.0.0:51820".parse().unwrap()));
        let v6 = parse("1 1 udp 2130706431 2001:db8::1 51820 typ host").unwrap();
        assert_eq!(v6.addr, "[2001:db8::1]:51820".parse().unwrap());
        for c in [host, srflx, v6] {
            let ice = c.to_ice().unwrap();
            assert_eq!(ice.addr(), c.addr);
            assert_eq!(Kind::from_ice(ice.kind()), c.kind);
        }
    }

    #[test]
    fn bad_lines_say_why() {
        use CandidateError::*;
        let cases: &[(&str, CandidateError)] = &[
            ("", Truncated),
            ("1 1 udp 1 10.0.0.1 5 typ", Truncated),
            ("1 2 udp 1 10.0.0.1 5 typ host", Component("2".into())),
            (
                "1 1 tcp 1 10.0.0.1 5 typ host tcptype active",
                Transport("tcp".into()),
            ),
            ("1 1 udp x 10.0.0.1 5 typ host", Priority),
            (
                "1 1 udp 1 4a5e.local 5 typ host",
                Address("4a5e.local".into()),
            ),
            ("1 1 udp 1 10.0.0.1 0 typ host", Port),
            ("1 1 udp 1 10.0.0.1 70000 typ host", Port),
            ("1 1 udp 1 10.0.0.1 5 type host", Type),
            ("1 1 udp 1 10.0.0.1 5 typ cosmic", Type),
            (
                "1 1 udp 1 0.0.0.0 5 typ host",
                Unusable("0.0.0.0".parse().unwrap()),
            ),
            (
                "1 1 udp 1 224.0.0.1 5 typ host",
                Unusable("224.0.0.1".parse().unwrap()),
            ),
            ("1 1 udp 1 10.0.0.1 5 typ srflx raddr", Truncated),
            (
                "1 1 udp 1 10.0.0.1 5 typ srflx raddr 1.2.3.4 rport x",
                Related,
            ),
            ("1 1 udp 1 10.0.0.1 5 typ srflx raddr 1.2.3.4", Related),
            ("1 1 udp 1 10.0.0.1 5 typ srflx rport 9", Related),
            ("ab-c 1 udp 1 10.0.0.1 5 typ host", Foundation),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).as_ref().err(), Some(want), "{line:?}");
        }
        assert_eq!(parse(&"1 ".repeat(300)).err(), Some(TooLong));
    }

    #[test]
    fn our_lines_are_what_go_parses() {
        let c = is::Candidate::host("10.0.1.2:51820".parse().unwrap(), "udp").unwrap();
        let line = to_line(&c);
        assert!(!line.starts_with("candidate:"), "{line}");
        let back = parse(&line).unwrap();
        assert_eq!(back.addr, "10.0.1.2:51820".parse().unwrap());
        assert_eq!(back.kind, Kind::Host);
        let s = is::Candidate::server_reflexive(
            "198.19.1.2:51820".parse().unwrap(),
            "10.0.1.2:51820".parse().unwrap(),
            "udp",
        )
        .unwrap();
        let back = parse(&to_line(&s)).unwrap();
        assert_eq!(back.kind, Kind::ServerReflexive);
    }
}
