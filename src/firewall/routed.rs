//! What a routing peer forwards (networks.md §2.2): `routesFirewallRules` as NetBird's userspace
//! router evaluates them. DROP rules first, then the rest by route ID; the first rule that
//! matches protocol, destination port, destination and source decides; no match is a drop,
//! whatever `routesFirewallRulesIsEmpty` says (the userspace router has no legacy mode).
//! DNS-route rules match the addresses the DNS forwarder resolved for their domains (merged in,
//! never removed), or any destination when routing peers do not resolve DNS routes.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Action, Flow, Ports, RuleError, RuleProto, proto_and_action, trunc};
use crate::control::management;

/// Resolved addresses kept per DNS-route pattern.
pub const MAX_RESOLVED: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Destination {
    Prefix(IpNet),
    /// A DNS route's domains (lower case, `*.` kept): matched against `RouteAcl::resolved`.
    Domains(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    sources: Vec<IpNet>,
    action: Action,
    destination: Destination,
    proto: RuleProto,
    ports: Ports,
    route_id: String,
}

/// The decoded rules, in evaluation order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteAcl {
    rules: Vec<Rule>,
    /// Addresses the DNS forwarder resolved, by domain pattern.
    resolved: HashMap<String, HashSet<IpAddr>>,
}

impl RouteAcl {
    /// Decode the map's rules. `dns_resolution` is `PeerConfig.RoutingPeerDnsResolutionEnabled`.
    pub fn from_wire(
        rules: &[management::RouteFirewallRule],
        dns_resolution: bool,
    ) -> (Self, Vec<RuleError>) {
        let mut errors = Vec::new();
        let mut out = Vec::new();
        for (index, r) in rules.iter().enumerate() {
            let err = |reason: String| RuleError { index, reason };
            if r.source_ranges.is_empty() {
                errors.push(err("no source ranges".into()));
                continue;
            }
            let sources: Result<Vec<IpNet>, _> = r
                .source_ranges
                .iter()
                .map(|s| {
                    s.trim()
                        .parse::<IpNet>()
                        .map(|n| n.trunc())
                        .map_err(|_| format!("source {:?} is not a prefix", trunc(s)))
                })
                .collect();
            let sources = match sources {
                Ok(s) => s,
                Err(e) => {
                    errors.push(err(e));
                    continue;
                }
            };
            let (proto, action) = match proto_and_action(r.protocol, r.action) {
                Ok(pa) => pa,
                Err(e) => {
                    errors.push(err(e));
                    continue;
                }
            };
            let ports = match Ports::from_port_info(r.port_info.as_ref()) {
                Ok(p) => p.unwrap_or(Ports::Any),
                Err(e) => {
                    errors.push(err(e));
                    continue;
                }
            };
            let destination = if r.is_dynamic {
                if dns_resolution && !r.domains.is_empty() {
                    Destination::Domains(r.domains.iter().map(|d| d.to_ascii_lowercase()).collect())
                } else {
                    // Any destination: the client resolved the name itself.
                    Destination::Prefix("0.0.0.0/0".parse().expect("literal"))
                }
            } else {
                match r.destination.trim().parse::<IpNet>() {
                    Ok(n) => Destination::Prefix(n.trunc()),
                    Err(_) => {
                        errors.push(err(format!(
                            "destination {:?} is not a prefix",
                            trunc(&r.destination)
                        )));
                        continue;
                    }
                }
            };
            let any_v4 = matches!(&destination, Destination::Prefix(n) if n.prefix_len() == 0);
            out.push(Rule {
                sources,
                action,
                destination,
                proto,
                ports,
                route_id: r.route_id.clone(),
            });
            // The dynamic "any" destination holds for both families.
            if r.is_dynamic && any_v4 {
                let mut twin = out.last().expect("just pushed").clone();
                twin.destination = Destination::Prefix("::/0".parse().expect("literal"));
                out.push(twin);
            }
        }
        // DROP first, then by route ID (stable: the map's order within one route).
        out.sort_by(|a, b| {
            (a.action != Action::Drop, &a.route_id).cmp(&(b.action != Action::Drop, &b.route_id))
        });
        (
            Self {
                rules: out,
                resolved: HashMap::new(),
            },
            errors,
        )
    }

    /// Keep what the DNS forwarder resolved so far across a new set of rules.
    pub fn keep_resolved(&mut self, old: &RouteAcl) {
        self.resolved = old.resolved.clone();
    }

    /// The DNS forwarder resolved `domain` (the pattern that matched, e.g. `*.corp.example`) to
    /// these addresses: flows to them pass the rules of that domain from now on.
    /// At most `MAX_RESOLVED` addresses per pattern are kept (a wildcard over a large zone
    /// would otherwise grow without bound).
    pub fn add_resolved(&mut self, pattern: &str, ips: impl IntoIterator<Item = IpAddr>) {
        let set = self
            .resolved
            .entry(pattern.to_ascii_lowercase())
            .or_default();
        for ip in ips {
            if set.len() >= MAX_RESOLVED {
                break;
            }
            set.insert(ip.to_canonical());
        }
    }

    /// Whether this peer forwards a new flow.
    pub fn allows(&self, flow: &Flow) -> bool {
        let src = flow.src.to_canonical();
        let dst = flow.dst.to_canonical();
        for rule in &self.rules {
            if !rule.proto.matches(flow.proto) || !rule.ports.matches(flow.proto, flow.dst_port) {
                continue;
            }
            let dst_ok = match &rule.destination {
                Destination::Prefix(n) => n.contains(&dst),
                Destination::Domains(ds) => ds
                    .iter()
                    .any(|d| self.resolved.get(d).is_some_and(|set| set.contains(&dst))),
            };
            if !dst_ok || !rule.sources.iter().any(|s| s.contains(&src)) {
                continue;
            }
            return rule.action == Action::Accept;
        }
        false
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::management::{PortInfo, RouteFirewallRule, port_info};
    use crate::firewall::Proto;

    fn rule(src: &str, dst: &str, proto: i32, port: u32) -> RouteFirewallRule {
        RouteFirewallRule {
            source_ranges: vec![src.into()],
            destination: dst.into(),
            protocol: proto,
            port_info: (port != 0).then_some(PortInfo {
                port_selection: Some(port_info::PortSelection::Port(port)),
            }),
            route_id: "r1".into(),
            ..Default::default()
        }
    }

    use crate::firewall::flow;

    #[test]
    fn no_rules_forward_nothing() {
        let (acl, _) = RouteAcl::from_wire(&[], true);
        assert!(!acl.allows(&flow("100.64.0.5", "198.19.1.10", Proto::Tcp, 80)));
    }

    #[test]
    fn a_rule_limits_source_destination_protocol_and_port() {
        let (acl, errors) =
            RouteAcl::from_wire(&[rule("100.64.0.5/32", "198.19.1.0/24", 2, 80)], true);
        assert!(errors.is_empty());
        assert!(acl.allows(&flow("100.64.0.5", "198.19.1.10", Proto::Tcp, 80)));
        assert!(!acl.allows(&flow("100.64.0.5", "198.19.1.10", Proto::Tcp, 81)));
        assert!(!acl.allows(&flow("100.64.0.5", "198.19.1.10", Proto::Udp, 80)));
        assert!(!acl.allows(&flow("100.64.0.5", "198.19.2.10", Proto::Tcp, 80)));
        assert!(!acl.allows(&flow("100.64.0.6", "198.19.1.10", Proto::Tcp, 80)));
    }

    #[test]
    fn drop_rules_come_first_whatever_their_place() {
        let mut drop = rule("0.0.0.0/0", "198.19.1.66/32", 1, 0);
        drop.action = 1;
        drop.route_id = "z".into();
        let rules = [rule("0.0.0.0/0", "198.19.1.0/24", 1, 0), drop];
        let (acl, _) = RouteAcl::from_wire(&rules, true);
        assert!(acl.allows(&flow("100.64.0.5", "198.19.1.10", Proto::Icmp, 0)));
        assert!(!acl.allows(&flow("100.64.0.5", "198.19.1.66", Proto::Tcp, 443)));
    }

    #[test]
    fn dns_route_rules_match_resolved_addresses_or_anything_without_resolution() {
        let mut r = rule("100.64.0.5/32", "192.0.2.0/32", 1, 0);
        r.is_dynamic = true;
        r.domains = vec!["*.corp.example".into()];
        let (mut acl, _) = RouteAcl::from_wire(std::slice::from_ref(&r), true);
        let f = flow("100.64.0.5", "198.19.1.10", Proto::Tcp, 80);
        assert!(!acl.allows(&f), "not resolved yet");
        acl.add_resolved("*.corp.example", ["198.19.1.10".parse().unwrap()]);
        assert!(acl.allows(&f));
        let (fresh, _) = RouteAcl::from_wire(std::slice::from_ref(&r), true);
        let mut kept = fresh.clone();
        kept.keep_resolved(&acl);
        assert!(kept.allows(&f) && !fresh.allows(&f));
        let (acl, _) = RouteAcl::from_wire(&[r], false);
        assert!(
            acl.allows(&f),
            "without resolution on the router the client chose the IP"
        );
        assert!(acl.allows(&flow("100.64.0.5", "2001:db8::1", Proto::Tcp, 80)));
    }

    #[test]
    fn bad_rules_are_skipped_with_reasons() {
        let mut empty = rule("100.64.0.5/32", "198.19.1.0/24", 1, 0);
        empty.source_ranges.clear();
        let rules = [
            empty,
            rule("nope", "198.19.1.0/24", 1, 0),
            rule("100.64.0.5/32", "nope", 1, 0),
            rule("100.64.0.5/32", "198.19.1.0/24", 5, 0),
            rule("100.64.0.5/32", "198.19.1.0/24", 2, 70000),
            rule("100.64.0.5/32", "198.19.1.0/24", 1, 0),
        ];
        let (acl, errors) = RouteAcl::from_wire(&rules, true);
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert_eq!(acl.len(), 1);
    }
}
