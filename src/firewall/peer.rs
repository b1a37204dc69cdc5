//! Inbound access to this peer (networks.md §4): `FirewallRules` as NetBird's userspace filter
//! applies them. Only IN rules count (the filter is stateful: our own outbound flows and their
//! replies pass without rules); DROP rules keyed by the exact source go first, then ACCEPT rules
//! for the exact source, then those for any IPv4 (`0.0.0.0`) and any IPv6 (`::`) source; no
//! match is a drop. An empty list without `firewallRulesIsEmpty` comes from an old management
//! and allows everything.

use std::collections::HashMap;
use std::net::IpAddr;

use super::wire::RuleFields;
use super::{Action, Flow, Ports, RuleError, RuleProto, proto_and_action, trunc};
use crate::control::management;
use crate::one_or_many::OneOrMany;

/// One rule after decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    proto: RuleProto,
    ports: Ports,
}

/// A source's rules: usually one (a policy's rule for a peer), kept without a list of its own,
/// so the rules of a 5 000-peer account decode without an allocation per peer.
type Rules = OneOrMany<Rule>;

fn add(map: &mut HashMap<IpAddr, Rules>, ip: IpAddr, rule: Rule) {
    match map.get_mut(&ip) {
        Some(rules) => rules.push(rule),
        None => {
            map.insert(ip, Rules::One(rule));
        }
    }
}

/// The decoded rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAcl {
    /// Allow everything (old management, or no rules sent at all).
    open: bool,
    drop: HashMap<IpAddr, Rules>,
    accept: HashMap<IpAddr, Rules>,
    accept_any_v4: Vec<Rule>,
    accept_any_v6: Vec<Rule>,
}

impl PeerAcl {
    /// Everything passes: no map yet, or a management that sends no rules.
    pub fn open() -> Self {
        Self {
            open: true,
            ..Self::default()
        }
    }

    /// Decode the map's rules; returns the ACL and the rules skipped, with reasons.
    pub fn from_wire(rules: &[management::FirewallRule], is_empty: bool) -> (Self, Vec<RuleError>) {
        let mut b = PeerAclBuilder::new(is_empty);
        for (index, r) in rules.iter().enumerate() {
            b.add(index, r);
        }
        b.finish()
    }

    /// Whether a new inbound flow may start.
    pub fn allows(&self, flow: &Flow) -> bool {
        if self.open {
            return true;
        }
        let hit = |rules: Option<&[Rule]>| {
            rules.is_some_and(|rs| {
                rs.iter().any(|r| {
                    r.proto.matches(flow.proto) && r.ports.matches(flow.proto, flow.dst_port)
                })
            })
        };
        let src = flow.src.to_canonical();
        if hit(self.drop.get(&src).map(Rules::as_slice)) {
            return false;
        }
        hit(self.accept.get(&src).map(Rules::as_slice))
            || hit(Some(self.accept_any_v4.as_slice()))
            || hit(Some(self.accept_any_v6.as_slice()))
    }

    /// Whether management sent rules (otherwise everything passes).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Rules held, for status.
    pub fn len(&self) -> usize {
        let held = |m: &HashMap<IpAddr, Rules>| m.values().map(|r| r.as_slice().len()).sum::<usize>();
        held(&self.drop)
            + held(&self.accept)
            + self.accept_any_v4.len()
            + self.accept_any_v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds a [`PeerAcl`] one rule at a time, so the rules can come from a decoder that reuses
/// one message for all of them (`control::sections::for_each_decoded`).
#[derive(Debug)]
pub struct PeerAclBuilder {
    acl: PeerAcl,
    errors: Vec<RuleError>,
    rules: usize,
    is_empty: bool,
}

impl PeerAclBuilder {
    /// `is_empty`: the map's `firewallRulesIsEmpty`.
    pub fn new(is_empty: bool) -> Self {
        Self {
            acl: PeerAcl::default(),
            errors: Vec::new(),
            rules: 0,
            is_empty,
        }
    }

    /// Room for `rules` rules' sources, when the count is known: a policy's per-peer rules
    /// then fill the source table without growing it a dozen times.
    pub fn reserve(&mut self, rules: usize) {
        // IN and OUT rules come in pairs; only IN rules are kept.
        self.acl.accept.reserve(rules / 2);
    }

    /// The map's rule number `index`, decoded or read in place.
    pub fn add(&mut self, index: usize, r: &(impl RuleFields + ?Sized)) {
        self.rules += 1;
        let acl = &mut self.acl;
        let err = |reason: String| RuleError { index, reason };
        // OUT rules only matter to a stateless filter.
        if r.direction() != 0 {
            return;
        }
        let decoded = proto_and_action(r.protocol(), r.action()).and_then(|(proto, action)| {
            let source = source_of(r)?;
            let ports = match Ports::from_port_info(r.port_info())? {
                Some(p) => p,
                None if r.port().trim().is_empty() => Ports::Any,
                None => match r.port().trim().parse::<u16>() {
                    Ok(p) if p != 0 => Ports::Range(p, p),
                    _ => return Err(format!("port {:?} is not a port", trunc(r.port()))),
                },
            };
            Ok((Rule { proto, ports }, action, source))
        });
        let (rule, action, source) = match decoded {
            Ok(d) => d,
            Err(e) => {
                self.errors.push(err(e));
                return;
            }
        };
        match (action, source) {
            (Action::Drop, Some(ip)) => add(&mut acl.drop, ip, rule),
            // Wildcard DROP rules are never consulted upstream.
            (Action::Drop, None) => {}
            (Action::Accept, Some(ip)) => add(&mut acl.accept, ip, rule),
            (Action::Accept, None) => {
                if source_is_v6(r) {
                    acl.accept_any_v6.push(rule)
                } else {
                    acl.accept_any_v4.push(rule)
                }
            }
        }
    }

    /// The ACL and the rules skipped, with reasons. No rules without `firewallRulesIsEmpty`
    /// comes from an old management: everything is allowed.
    pub fn finish(self) -> (PeerAcl, Vec<RuleError>) {
        if self.rules == 0 && !self.is_empty {
            return (PeerAcl::open(), self.errors);
        }
        (self.acl, self.errors)
    }
}

/// The rule's source: the first source prefix's address (compact encoding: 4 or 16 address
/// bytes and a prefix length), else `PeerIP`; None for "any" (`0.0.0.0` or `::`).
fn source_of(r: &(impl RuleFields + ?Sized)) -> Result<Option<IpAddr>, String> {
    let ip = match r.first_source_prefix() {
        Some(b) => decode_compact_addr(b)?,
        None => r
            .peer_ip()
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| format!("peer IP {:?} is not an address", trunc(r.peer_ip())))?,
    };
    let ip = ip.to_canonical();
    Ok((!ip.is_unspecified()).then_some(ip))
}

fn source_is_v6(r: &(impl RuleFields + ?Sized)) -> bool {
    matches!(source_of(r), Ok(None))
        && match r.first_source_prefix() {
            Some(b) => b.len() == 17,
            None => r.peer_ip().contains(':'),
        }
}

/// An address in NetBird's compact prefix encoding (`netiputil`): 4 or 16 bytes and a length.
pub fn decode_compact_addr(b: &[u8]) -> Result<IpAddr, String> {
    match b.len() {
        5 if b[4] <= 32 => Ok(IpAddr::from([b[0], b[1], b[2], b[3]])),
        17 if b[16] <= 128 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[..16]);
            Ok(IpAddr::from(a).to_canonical())
        }
        n => Err(format!(
            "source prefix of {n} bytes is not 4 or 16 bytes and a length"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::management::{FirewallRule, PortInfo, port_info};
    use crate::firewall::Proto;

    fn rule(src: &str, proto: i32, port: &str) -> FirewallRule {
        FirewallRule {
            peer_ip: src.into(),
            direction: 0,
            action: 0,
            protocol: proto,
            port: port.into(),
            ..Default::default()
        }
    }

    fn flow(src: &str, proto: Proto, port: u16) -> Flow {
        crate::firewall::flow(src, "100.64.0.2", proto, port)
    }

    #[test]
    fn no_rules_from_old_management_allow_all_and_an_empty_flag_denies_all() {
        let (acl, _) = PeerAcl::from_wire(&[], false);
        assert!(acl.allows(&flow("100.64.0.9", Proto::Tcp, 22)));
        let (acl, _) = PeerAcl::from_wire(&[], true);
        assert!(!acl.allows(&flow("100.64.0.9", Proto::Tcp, 22)));
        assert!(!acl.allows(&flow("100.64.0.9", Proto::Icmp, 0)));
    }

    #[test]
    fn a_tcp_80_rule_allows_only_tcp_80_from_its_source() {
        let (acl, errors) = PeerAcl::from_wire(&[rule("100.64.0.5", 2, "80")], true);
        assert!(errors.is_empty());
        assert!(acl.allows(&flow("100.64.0.5", Proto::Tcp, 80)));
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Tcp, 22)));
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Udp, 80)));
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Icmp, 0)));
        assert!(!acl.allows(&flow("100.64.0.6", Proto::Tcp, 80)));
    }

    #[test]
    fn several_rules_for_one_source_each_count() {
        let rules = [
            rule("100.64.0.5", 2, "80"),
            rule("100.64.0.5", 2, "443"),
            rule("100.64.0.5", 2, "8080"),
        ];
        let (acl, errors) = PeerAcl::from_wire(&rules, true);
        assert!(errors.is_empty());
        assert_eq!(acl.len(), 3);
        for port in [80, 443, 8080] {
            assert!(acl.allows(&flow("100.64.0.5", Proto::Tcp, port)), "{port}");
        }
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Tcp, 22)));
        assert!(!acl.allows(&flow("100.64.0.6", Proto::Tcp, 80)));
    }

    #[test]
    fn source_prefixes_win_over_peer_ip_and_ranges_over_the_port_string() {
        let mut r = rule("100.64.0.5", 3, "");
        r.source_prefixes = vec![vec![100, 64, 0, 7, 32]];
        r.port_info = Some(PortInfo {
            port_selection: Some(port_info::PortSelection::Range(port_info::Range {
                start: 5000,
                end: 5010,
            })),
        });
        let (acl, _) = PeerAcl::from_wire(&[r], true);
        assert!(acl.allows(&flow("100.64.0.7", Proto::Udp, 5005)));
        assert!(!acl.allows(&flow("100.64.0.7", Proto::Udp, 5011)));
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Udp, 5005)));
    }

    #[test]
    fn drop_rules_beat_accept_rules_and_any_source_buckets_apply_to_all() {
        let mut drop = rule("100.64.0.5", 2, "22");
        drop.action = 1;
        let rules = [drop, rule("0.0.0.0", 1, "")];
        let (acl, _) = PeerAcl::from_wire(&rules, true);
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Tcp, 22)));
        assert!(acl.allows(&flow("100.64.0.5", Proto::Tcp, 23)));
        assert!(acl.allows(&flow("100.64.0.6", Proto::Icmp, 0)));
    }

    #[test]
    fn out_rules_are_ignored_and_bad_rules_are_skipped_with_a_reason() {
        let mut out = rule("100.64.0.5", 1, "");
        out.direction = 1;
        let rules = [
            out,
            rule("not-an-ip", 2, "80"),
            rule("100.64.0.5", 2, "http"),
            rule("100.64.0.5", 6, "22"),
            rule("100.64.0.6", 2, "443"),
        ];
        let (acl, errors) = PeerAcl::from_wire(&rules, true);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0].index, 1);
        assert!(!acl.allows(&flow("100.64.0.5", Proto::Tcp, 80)));
        assert!(acl.allows(&flow("100.64.0.6", Proto::Tcp, 443)));
        let mut bad = rule("", 2, "");
        bad.source_prefixes = vec![vec![1, 2, 3]];
        assert_eq!(PeerAcl::from_wire(&[bad], true).1.len(), 1);
    }
}
