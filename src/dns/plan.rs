//! NetBird's DNS handler chain, decided per name (networks.md §3.1): DNS routes (priority 100)
//! to their routing peer's forwarder, custom zones (75) answered here, nameserver groups by
//! match domain (50, the most specific domain; groups sharing it are raced), the primary groups
//! (1), and last the host (NetBird in netstack mode answers REFUSED there; a proxy whose users
//! also reach the internet resolves such names as the host does — through the exit node's
//! tunnel when one is selected, so nothing leaks).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};

use super::config::{DnsConfig, NsGroup, normalize};
use super::zone::{Zones, in_domain};

/// A DNS route as the client uses it: its domains, and the forwarder of its elected routing
/// peer (None while no routing peer is reachable: its names fail).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRoute {
    /// The HA group's key (where learned addresses are kept).
    pub route: String,
    /// `name` or `*.domain` (lower case, no trailing dot).
    pub patterns: Vec<String>,
    pub forwarder: Option<SocketAddr>,
}

/// What to do for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    DnsRoute(DnsRoute),
    Local,
    /// Ask these groups (raced), each trying its servers in turn.
    Upstream(Vec<NsGroup>),
    Host,
}

/// Everything the chain needs, rebuilt when the map or the routes change.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub routes: Vec<DnsRoute>,
    pub zones: Zones,
    pub groups: Vec<NsGroup>,
    pub search: Vec<String>,
    /// An exit node carries everything else: the host's nameservers are asked through it.
    pub exit_node: bool,
    /// DNS routes' names go to the routing peer's forwarder; off, the rest of the chain
    /// resolves them here (and the addresses still go on the routing peer).
    pub routing_peer_resolution: bool,
}

impl Plan {
    /// The handler for `name`; `past_local` after a NonAuthoritative zone fell through.
    pub fn step(&self, name: &str, past_local: bool) -> Step {
        self.step_from(name, past_local, true)
    }

    /// The DNS route a name belongs to, if any.
    pub fn dns_route(&self, name: &str) -> Option<DnsRoute> {
        match self.step(name, false) {
            Step::DnsRoute(r) => Some(r),
            _ => None,
        }
    }

    /// `step`, leaving DNS routes out when `routes` is false.
    pub fn step_from(&self, name: &str, past_local: bool, routes: bool) -> Step {
        let name = normalize(name);
        let mut best: Option<(usize, &DnsRoute)> = None;
        for r in self.routes.iter().filter(|_| routes) {
            for p in &r.patterns {
                let hit = match p.strip_prefix("*.") {
                    Some(base) => name.len() > base.len() && in_domain(&name, base),
                    None => *p == name,
                };
                // Exact beats wildcard; a longer wildcard beats a shorter one.
                let rank = if p.starts_with("*.") {
                    p.len()
                } else {
                    usize::MAX
                };
                if hit && best.is_none_or(|(b, _)| rank > b) {
                    best = Some((rank, r));
                }
            }
        }
        if let Some((_, r)) = best {
            return Step::DnsRoute(r.clone());
        }
        if !past_local && self.zones.covers(&name).is_some() {
            return Step::Local;
        }
        let mut matched: Option<(usize, Vec<NsGroup>)> = None;
        for g in self.groups.iter().filter(|g| !g.primary) {
            for d in &g.domains {
                if !in_domain(&name, d) {
                    continue;
                }
                match &mut matched {
                    Some((len, gs)) if *len == d.len() => {
                        if !gs.contains(g) {
                            gs.push(g.clone())
                        }
                    }
                    Some((len, _)) if *len > d.len() => {}
                    _ => matched = Some((d.len(), vec![g.clone()])),
                }
            }
        }
        if let Some((_, gs)) = matched {
            return Step::Upstream(gs);
        }
        let primary: Vec<NsGroup> = self.groups.iter().filter(|g| g.primary).cloned().collect();
        if !primary.is_empty() {
            return Step::Upstream(primary);
        }
        Step::Host
    }
}

/// Addresses a DNS route's answer carried, for its routing peer's AllowedIPs; `done` is sent
/// once they are in place (the answer waits for it).
#[derive(Debug)]
pub struct Learned {
    pub route: String,
    pub addrs: Vec<std::net::IpAddr>,
    pub done: oneshot::Sender<()>,
}

#[derive(Default)]
struct Parts {
    config: DnsConfig,
    /// Search domains and servers given locally (a wg-quick `DNS =` line).
    static_search: Vec<String>,
    static_servers: Vec<std::net::IpAddr>,
    routes: Vec<DnsRoute>,
    exit_node: bool,
    plan: Arc<Plan>,
}

/// The shared DNS state: the engine writes its parts, resolvers read a snapshot.
#[derive(Clone, Default)]
pub struct DnsState {
    parts: Arc<RwLock<Parts>>,
    learned: Arc<RwLock<Option<mpsc::Sender<Learned>>>>,
}

impl DnsState {
    /// Servers (port 53) and search domains of a static configuration: a primary group.
    pub fn with_static(servers: Vec<std::net::IpAddr>, search: Vec<String>) -> Self {
        let s = Self::default();
        s.update(|p| {
            p.static_servers = servers;
            p.static_search = search;
        });
        s
    }

    pub fn snapshot(&self) -> Arc<Plan> {
        self.parts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .plan
            .clone()
    }

    /// The map's DNS part.
    pub fn set_config(&self, config: DnsConfig) {
        self.update(|p| p.config = config);
    }

    /// The DNS routes with their elected forwarders, and whether an exit node is in use.
    pub fn set_routes(&self, routes: Vec<DnsRoute>, exit_node: bool) {
        self.update(|p| {
            p.routes = routes;
            p.exit_node = exit_node;
        });
    }

    /// The port routing peers' DNS forwarders answer on (from the map; 5353 before one).
    pub fn forwarder_port(&self) -> u16 {
        let p = self.parts.read().unwrap_or_else(|e| e.into_inner());
        if p.config == DnsConfig::default() {
            super::config::DEFAULT_FORWARDER_PORT
        } else {
            p.config.forwarder_port
        }
    }

    /// Where addresses learned from DNS routes go (the networks task).
    pub fn report_learned(&self, to: mpsc::Sender<Learned>) {
        *self.learned.write().unwrap_or_else(|e| e.into_inner()) = Some(to);
    }

    pub(super) fn learned(&self) -> Option<mpsc::Sender<Learned>> {
        self.learned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Parts)) {
        let mut p = self.parts.write().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
        let mut groups = p.config.groups.clone();
        if !p.static_servers.is_empty() {
            groups.push(NsGroup {
                servers: p
                    .static_servers
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, 53))
                    .collect(),
                primary: true,
                domains: Vec::new(),
                search: false,
            });
        }
        let mut search = p.config.search_domains();
        search.extend(p.static_search.iter().map(|d| normalize(d)));
        search.dedup();
        p.plan = Arc::new(Plan {
            routes: p.routes.clone(),
            zones: Zones::new(&p.config.zones),
            groups,
            search,
            exit_node: p.exit_node,
            routing_peer_resolution: p.config.routing_peer_resolution
                || p.config == DnsConfig::default(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::zone::{Record, RecordData, Zone};

    fn group(primary: bool, domains: &[&str], server: &str) -> NsGroup {
        NsGroup {
            servers: vec![server.parse().unwrap()],
            primary,
            domains: domains.iter().map(|d| d.to_string()).collect(),
            search: false,
        }
    }

    fn plan() -> Plan {
        Plan {
            routes: vec![DnsRoute {
                route: "r|*.corp.example".into(),
                patterns: vec!["*.corp.example".into(), "exact.example".into()],
                forwarder: Some("100.64.0.9:5353".parse().unwrap()),
            }],
            zones: Zones::new(&[Zone {
                domain: "mesh.test".into(),
                records: vec![Record {
                    name: "a.mesh.test".into(),
                    ttl: 60,
                    data: RecordData::A("100.64.0.2".parse().unwrap()),
                }],
                non_authoritative: false,
                search: true,
            }]),
            groups: vec![
                group(false, &["internal"], "198.19.1.53:53"),
                group(false, &["corp.internal"], "198.19.1.54:53"),
                group(false, &["corp.internal"], "198.19.1.55:53"),
                group(true, &[], "198.19.9.9:53"),
            ],
            search: Vec::new(),
            exit_node: false,
            routing_peer_resolution: true,
        }
    }

    #[test]
    fn the_chain_picks_routes_zones_match_domains_and_the_primary_in_that_order() {
        let p = plan();
        assert!(matches!(
            p.step("app.corp.example", false),
            Step::DnsRoute(_)
        ));
        assert!(matches!(p.step("exact.example.", false), Step::DnsRoute(_)));
        assert!(
            !matches!(p.step("corp.example", false), Step::DnsRoute(_)),
            "a wildcard does not match its apex"
        );
        assert_eq!(p.step("b.mesh.test", false), Step::Local);
        let Step::Upstream(gs) = p.step("db.corp.internal", false) else {
            panic!()
        };
        assert_eq!(
            gs.len(),
            2,
            "the most specific match domain, its groups raced"
        );
        let Step::Upstream(gs) = p.step("x.internal", false) else {
            panic!()
        };
        assert_eq!(gs[0].servers[0].port(), 53);
        assert_eq!(gs.len(), 1);
        let Step::Upstream(gs) = p.step("b.mesh.test", true) else {
            panic!()
        };
        assert!(gs[0].primary, "past a zone that fell through");
        let Step::Upstream(gs) = p.step("example.org", false) else {
            panic!()
        };
        assert!(gs[0].primary);
        let none = Plan::default();
        assert_eq!(none.step("example.org", false), Step::Host);
    }

    #[test]
    fn the_state_combines_the_map_static_servers_and_routes() {
        let s = DnsState::with_static(vec!["100.64.0.53".parse().unwrap()], vec!["corp".into()]);
        let plan = s.snapshot();
        assert!(matches!(plan.step("example.org", false), Step::Upstream(g) if g[0].primary));
        assert_eq!(plan.search, vec!["corp".to_string()]);
        s.set_routes(plan_routes(), true);
        assert!(s.snapshot().exit_node);
        assert!(matches!(
            s.snapshot().step("a.corp.example", false),
            Step::DnsRoute(_)
        ));
    }

    fn plan_routes() -> Vec<DnsRoute> {
        plan().routes
    }
}
