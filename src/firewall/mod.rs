//! NetBird's access rules, enforced in process (networks.md §2.2, §4): `peer` decides which new
//! inbound flows towards this peer's own address pass (`FirewallRules`, default deny once
//! management sends rules), `routed` which flows this peer forwards as a routing peer
//! (`routesFirewallRules`, always default deny). Both are sans-IO: decoded from the map, fed a
//! `Flow`, answering allow or deny; the netstack asks them for each new flow.

pub mod peer;
pub mod routed;
pub mod wire;

use std::net::IpAddr;

use crate::control::management;

pub use peer::PeerAcl;
pub use routed::RouteAcl;

/// The transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Other(u8),
}

/// What the rules look at in a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    /// 0 for ICMP and other transports.
    pub dst_port: u16,
}

/// A rule's protocol (`RuleProtocol`): the ones a client can enforce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleProto {
    All,
    Tcp,
    Udp,
    Icmp,
}

impl RuleProto {
    /// `RuleProtocol` 1..=4; UNKNOWN, CUSTOM and NETBIRD_SSH are skipped, as upstream does.
    pub fn from_wire(p: i32) -> Option<Self> {
        match p {
            1 => Some(Self::All),
            2 => Some(Self::Tcp),
            3 => Some(Self::Udp),
            4 => Some(Self::Icmp),
            _ => None,
        }
    }

    fn matches(self, p: Proto) -> bool {
        matches!(
            (self, p),
            (Self::All, _)
                | (Self::Tcp, Proto::Tcp)
                | (Self::Udp, Proto::Udp)
                | (Self::Icmp, Proto::Icmp)
        )
    }
}

/// Destination ports a rule allows: any, or an inclusive range (a single port is a range of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    Any,
    Range(u16, u16),
}

impl Ports {
    /// From `PortInfo`: a port, or a range whose start and end are both set (one that is not
    /// counts as empty, `portInfoEmpty`); None when the info says nothing.
    pub fn from_port_info(info: Option<&management::PortInfo>) -> Result<Option<Self>, String> {
        use management::port_info::PortSelection;
        let Some(sel) = info.and_then(|i| i.port_selection.as_ref()) else {
            return Ok(None);
        };
        match sel {
            PortSelection::Port(0) => Ok(None),
            PortSelection::Port(p) => u16::try_from(*p)
                .map(|p| Some(Self::Range(p, p)))
                .map_err(|_| format!("port {p} out of range")),
            PortSelection::Range(r) if r.start == 0 || r.end == 0 => Ok(None),
            PortSelection::Range(r) => {
                let (Ok(a), Ok(b)) = (u16::try_from(r.start), u16::try_from(r.end)) else {
                    return Err(format!("port range {}-{} out of range", r.start, r.end));
                };
                if a > b {
                    return Err(format!("port range {a}-{b} is reversed"));
                }
                Ok(Some(Self::Range(a, b)))
            }
        }
    }

    /// Ports only constrain TCP and UDP (ICMP and ALL match whatever the port).
    fn matches(self, proto: Proto, port: u16) -> bool {
        match self {
            Self::Any => true,
            Self::Range(a, b) => match proto {
                Proto::Tcp | Proto::Udp => (a..=b).contains(&port),
                _ => true,
            },
        }
    }
}

/// `RuleAction`: ACCEPT = 0, DROP = 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
}

impl Action {
    fn from_wire(a: i32) -> Option<Self> {
        match a {
            0 => Some(Self::Accept),
            1 => Some(Self::Drop),
            _ => None,
        }
    }
}

/// A rule's protocol and action, or why it cannot be enforced.
fn proto_and_action(protocol: i32, action: i32) -> Result<(RuleProto, Action), String> {
    let proto = RuleProto::from_wire(protocol)
        .ok_or_else(|| format!("protocol {protocol} is not enforced"))?;
    let action = Action::from_wire(action).ok_or_else(|| format!("unknown action {action}"))?;
    Ok((proto, action))
}

/// At most 60 characters of a value quoted in an error.
fn trunc(s: &str) -> String {
    s.chars().take(60).collect()
}

/// A flow for tests.
#[cfg(test)]
pub(crate) fn flow(src: &str, dst: &str, proto: Proto, dst_port: u16) -> Flow {
    Flow {
        src: src.parse().expect("test address"),
        dst: dst.parse().expect("test address"),
        proto,
        dst_port,
    }
}

/// Why a rule was skipped (logged; the other rules stand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("firewall rule {index}: {reason}; skipped")]
pub struct RuleError {
    pub index: usize,
    pub reason: String,
}
