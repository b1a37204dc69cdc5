//! The dev mesh's account: groups, access policies and routes from a TOML file
//! (`dev-mesh --networks FILE`), turned into what NetBird's management sends each peer
//! (networks.md §5): the peers it may see, its `FirewallRules`, its `Routes` and, for a routing
//! peer, its `routesFirewallRules`. Pure functions over the file and the registered peers.
//!
//! Peers are named by the host name they register with (`--hostname`). The group `All` holds
//! every peer. Without any policy every peer sees every other and no rules are sent (as a
//! NetBird account with only its default "All" policy behaves towards a client).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

use crate::control::management::{
    CustomZone, FirewallRule, NameServer, NameServerGroup, PortInfo, Route, RouteFirewallRule,
    SimpleRecord, port_info,
};

/// The file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworksFile {
    /// Group name → host names.
    #[serde(default)]
    pub(crate) groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub(crate) policies: Vec<Policy>,
    #[serde(default)]
    pub(crate) routes: Vec<RouteSpec>,
    #[serde(default)]
    pub(crate) nameservers: Vec<NameserverSpec>,
    #[serde(default)]
    pub(crate) zones: Vec<ZoneSpec>,
    #[serde(default)]
    pub(crate) ingress: Vec<IngressSpec>,
    /// NetBird "Networks": routers and the resources behind them (networks.md §6).
    #[serde(default)]
    pub(crate) networks: Vec<NetworkSpec>,
}

/// A Network: its routing peers and its resources; a policy whose destinations include a
/// resource's group gives the policy's sources a route to that resource through every router.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    pub routers: Vec<RouterSpec>,
    pub resources: Vec<ResourceSpec>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub peer_groups: Vec<String>,
    #[serde(default = "default_metric")]
    pub metric: i64,
    #[serde(default = "yes")]
    pub masquerade: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// Its name: the NetID clients select.
    pub name: String,
    /// An IP, a prefix, or a domain (`*.` allowed).
    pub address: String,
    /// Groups it belongs to (policies name these as destinations).
    pub groups: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// A resource's target: a prefix, or a domain.
fn resource_target(address: &str) -> Option<Result<IpNet, String>> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Some(Ok(IpNet::from(ip)));
    }
    if let Ok(net) = address.parse::<IpNet>() {
        return Some(Ok(net.trunc()));
    }
    let d = crate::dns::config::normalize(address);
    crate::dns::config::valid_name(&d).then_some(Err(d))
}

/// An ingress port: host port(s) of a gateway peer forwarded to a port of another peer.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngressSpec {
    /// The gateway peer (host name).
    pub peer: String,
    /// tcp or udp.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// Host port or range on the gateway ("8080", "8000-8010").
    pub port: String,
    /// The peer that receives (host name).
    pub target: String,
    /// Its port, or a range as long as `port`'s.
    pub target_port: String,
}

fn tcp() -> String {
    "tcp".into()
}

/// A nameserver group.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NameserverSpec {
    pub name: String,
    /// `IP` or `IP:PORT` (53 by default).
    pub servers: Vec<String>,
    /// Match domains; none with `primary = true` (the default for every name).
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub primary: bool,
    #[serde(default)]
    pub search_domains: bool,
    /// Who gets it; default: All.
    #[serde(default = "all_group")]
    pub groups: Vec<String>,
}

/// A custom DNS zone.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    pub domain: String,
    #[serde(default)]
    pub records: Vec<RecordSpec>,
    #[serde(default)]
    pub non_authoritative: bool,
    #[serde(default)]
    pub search_domain_disabled: bool,
    #[serde(default = "all_group")]
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    pub name: String,
    /// A, AAAA, CNAME, TXT, MX, SRV, PTR, NS.
    #[serde(rename = "type")]
    pub rtype: String,
    pub value: String,
    #[serde(default = "default_ttl")]
    pub ttl: i64,
}

fn default_ttl() -> i64 {
    300
}

/// DNS record type numbers by name.
fn record_type(name: &str) -> Option<i64> {
    Some(match name.to_ascii_uppercase().as_str() {
        "A" => 1,
        "NS" => 2,
        "CNAME" => 5,
        "PTR" => 12,
        "MX" => 15,
        "TXT" => 16,
        "AAAA" => 28,
        "SRV" => 33,
        _ => return None,
    })
}

/// `IP` or `IP:PORT`.
fn nameserver(s: &str) -> Option<std::net::SocketAddr> {
    s.parse().ok().or_else(|| {
        s.parse::<IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

/// An access policy rule: `sources` may open flows to `destinations`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
    /// all, tcp, udp or icmp.
    #[serde(default = "all")]
    pub protocol: String,
    /// Ports or ranges ("80", "8000-8080"); none: every port.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub bidirectional: bool,
    /// accept or drop.
    #[serde(default = "accept")]
    pub action: String,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// A network route through one or more routing peers (one HA group).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The network's name (NetID), what users select.
    pub net_id: String,
    /// A prefix (`0.0.0.0/0` makes an exit node); or `domains` for a DNS route.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub domains: Vec<String>,
    /// Routing peers by host name, and/or groups of them.
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub peer_groups: Vec<String>,
    #[serde(default = "default_metric")]
    pub metric: i64,
    #[serde(default = "yes")]
    pub masquerade: bool,
    /// Who gets the route (distribution groups); default: All.
    #[serde(default = "all_group")]
    pub groups: Vec<String>,
    /// Groups whose policies limit what the route forwards; none: everything for everyone who
    /// gets the route.
    #[serde(default)]
    pub access_control_groups: Vec<String>,
    #[serde(default)]
    pub skip_auto_apply: bool,
    #[serde(default = "yes")]
    pub keep_route: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn all() -> String {
    "all".into()
}
fn accept() -> String {
    "accept".into()
}
fn yes() -> bool {
    true
}
fn default_metric() -> i64 {
    9999
}
fn all_group() -> Vec<String> {
    vec!["All".into()]
}

/// Why the file is refused.
#[derive(Debug, thiserror::Error)]
pub enum NetworksError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A registered peer as the account sees it.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its DNS label (the host name it registered with, as its name in the mesh has it).
    pub hostname: String,
    pub key: String,
    pub ip: Ipv4Addr,
}

/// What one peer is sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerPolicy {
    /// Indices of the peers it may see (None: all of them).
    pub visible: Option<BTreeSet<usize>>,
    pub firewall_rules: Vec<FirewallRule>,
    /// Whether rules are in force (then an empty list means deny all).
    pub firewall_rules_is_empty: bool,
    pub routes: Vec<Route>,
    pub route_rules: Vec<RouteFirewallRule>,
    pub nameserver_groups: Vec<NameServerGroup>,
    pub zones: Vec<CustomZone>,
    pub forwarding_rules: Vec<crate::control::management::ForwardingRule>,
}

impl NetworksFile {
    /// Read and check a file.
    pub fn load(path: &Path) -> Result<Self, NetworksError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetworksError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| NetworksError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parse and check the text of a file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: NetworksFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        let resource_groups: BTreeSet<&String> = self
            .networks
            .iter()
            .flat_map(|n| n.resources.iter().flat_map(|r| &r.groups))
            .collect();
        for n in &self.networks {
            let what = format!("network {:?}", n.name);
            for r in &n.resources {
                if resource_target(&r.address).is_none() {
                    return Err(format!(
                        "{what}: resource {:?}: {:?} is not an IP, prefix or domain",
                        r.name, r.address
                    ));
                }
            }
            for r in &n.routers {
                if r.peers.is_empty() && r.peer_groups.is_empty() {
                    return Err(format!("{what}: a router without peers or peer_groups"));
                }
                if !(1..=9999).contains(&r.metric) {
                    return Err(format!("{what}: metric {} outside 1..=9999", r.metric));
                }
            }
        }
        let group = |g: &String, what: &str| {
            if g == "All" || self.groups.contains_key(g) || resource_groups.contains(g) {
                Ok(())
            } else {
                Err(format!("{what}: no group {g:?}"))
            }
        };
        for p in &self.policies {
            let what = format!("policy {:?}", p.name);
            for g in p.sources.iter().chain(&p.destinations) {
                group(g, &what)?;
            }
            protocol(&p.protocol).ok_or(format!(
                "{what}: protocol {:?} is not all, tcp, udp or icmp",
                p.protocol
            ))?;
            action(&p.action).ok_or(format!(
                "{what}: action {:?} is not accept or drop",
                p.action
            ))?;
            for port in &p.ports {
                parse_ports(port).ok_or(format!("{what}: {port:?} is not a port or a range"))?;
            }
        }
        for r in &self.routes {
            let what = format!("route {:?}", r.net_id);
            if r.net_id.trim().is_empty() {
                return Err("a route without net_id".into());
            }
            match (&r.network, r.domains.is_empty()) {
                (Some(n), true) => {
                    n.parse::<IpNet>()
                        .map_err(|_| format!("{what}: network {n:?} is not a prefix"))?;
                }
                (None, false) => {}
                _ => return Err(format!("{what}: give either network or domains")),
            }
            if r.peers.is_empty() && r.peer_groups.is_empty() {
                return Err(format!("{what}: no routing peers (peers or peer_groups)"));
            }
            if !(1..=9999).contains(&r.metric) {
                return Err(format!("{what}: metric {} outside 1..=9999", r.metric));
            }
            for g in r
                .peer_groups
                .iter()
                .chain(&r.groups)
                .chain(&r.access_control_groups)
            {
                group(g, &what)?;
            }
        }
        for n in &self.nameservers {
            let what = format!("nameservers {:?}", n.name);
            if n.servers.is_empty() {
                return Err(format!("{what}: no servers"));
            }
            for sv in &n.servers {
                nameserver(sv).ok_or(format!("{what}: {sv:?} is not IP or IP:PORT"))?;
            }
            if !n.primary && n.domains.is_empty() {
                return Err(format!("{what}: give match domains, or primary = true"));
            }
            for d in &n.domains {
                if !crate::dns::config::valid_name(&crate::dns::config::normalize(d)) {
                    return Err(format!("{what}: {d:?} is not a domain"));
                }
            }
            for g in &n.groups {
                group(g, &what)?;
            }
        }
        for i in &self.ingress {
            let what = format!("ingress {} {}", i.peer, i.port);
            if !matches!(i.protocol.to_ascii_lowercase().as_str(), "tcp" | "udp") {
                return Err(format!(
                    "{what}: protocol {:?} is not tcp or udp",
                    i.protocol
                ));
            }
            let (a, b) = parse_ports(&i.port)
                .ok_or(format!("{what}: {:?} is not a port or range", i.port))?;
            let (c, d) = parse_ports(&i.target_port).ok_or(format!(
                "{what}: {:?} is not a port or range",
                i.target_port
            ))?;
            if c != d && d - c != b - a {
                return Err(format!(
                    "{what}: target range is not as long as the port range"
                ));
            }
        }
        for z in &self.zones {
            let what = format!("zone {:?}", z.domain);
            if !crate::dns::config::valid_name(&crate::dns::config::normalize(&z.domain)) {
                return Err(format!("{what}: not a domain"));
            }
            for r in &z.records {
                let t = record_type(&r.rtype).ok_or(format!(
                    "{what}: record type {:?} is not supported",
                    r.rtype
                ))?;
                // The same checks the peers apply.
                crate::dns::zone::Record::from_wire(&SimpleRecord {
                    name: r.name.clone(),
                    r#type: t,
                    class: "IN".into(),
                    ttl: r.ttl,
                    r_data: r.value.clone(),
                })
                .map_err(|e| format!("{what}: {}: {e}", r.name))?;
            }
            for g in &z.groups {
                group(g, &what)?;
            }
        }
        Ok(())
    }

    /// Peers (indices) in these groups.
    fn members(&self, groups: &[String], peers: &[Member]) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        for g in groups {
            for (i, p) in peers.iter().enumerate() {
                let hit = g == "All"
                    || self
                        .groups
                        .get(g)
                        .is_some_and(|names| names.iter().any(|n| same_host(n, &p.hostname)));
                if hit {
                    out.insert(i);
                }
            }
        }
        out
    }

    /// What peer `me` of `peers` is sent.
    pub(crate) fn policy_for(&self, me: usize, peers: &[Member]) -> PeerPolicy {
        let mut out = PeerPolicy::default();
        let has_policies = !self.policies.is_empty();
        // Peers and rules from policies.
        let mut visible = BTreeSet::new();
        if has_policies {
            out.firewall_rules_is_empty = true;
            for p in self.policies.iter().filter(|p| p.enabled) {
                let src = self.members(&p.sources, peers);
                let dst = self.members(&p.destinations, peers);
                // A rule is sent once per peer and direction, as management dedupes them: a
                // bidirectional policy between overlapping groups (All to All) meets each
                // pair twice.
                let mut sent: BTreeSet<(usize, i32)> = BTreeSet::new();
                let mut add = |from: &BTreeSet<usize>, to: &BTreeSet<usize>| {
                    if to.contains(&me) {
                        for &q in from.iter().filter(|&&q| q != me) {
                            visible.insert(q);
                            if sent.insert((q, 0)) {
                                out.firewall_rules.extend(firewall_rules(p, peers[q].ip, 0));
                            }
                        }
                    }
                    if from.contains(&me) {
                        for &q in to.iter().filter(|&&q| q != me) {
                            visible.insert(q);
                            if sent.insert((q, 1)) {
                                out.firewall_rules.extend(firewall_rules(p, peers[q].ip, 1));
                            }
                        }
                    }
                };
                add(&src, &dst);
                if p.bidirectional {
                    add(&dst, &src);
                }
            }
            out.firewall_rules_is_empty = out.firewall_rules.is_empty();
        }
        self.network_resources(me, peers, &mut out, &mut visible);
        if has_policies {
            out.visible = Some(visible.clone());
        }
        let sees = |q: usize| !has_policies || visible.contains(&q);

        // Routes: our own, then those of peers we see, distributed to us, in groups we do not
        // route ourselves.
        let ha = |r: &RouteSpec| (r.net_id.clone(), r.network.clone(), r.domains.clone());
        let mut own_ha = BTreeSet::new();
        for r in self.routes.iter().filter(|r| r.enabled) {
            if self.routers(r, peers).contains(&me) {
                own_ha.insert(ha(r));
            }
        }
        for (index, r) in self.routes.iter().enumerate().filter(|(_, r)| r.enabled) {
            let routers = self.routers(r, peers);
            let distributed = self.members(&r.groups, peers).contains(&me);
            for &q in &routers {
                let mine = q == me;
                if !mine && (!distributed || own_ha.contains(&ha(r)) || !sees(q)) {
                    continue;
                }
                let id = if r.peer_groups.is_empty() {
                    format!("route{index}")
                } else {
                    format!("route{index}:{}", peers[q].hostname)
                };
                out.routes.push(wire_route(r, &id, &peers[q].key));
                if mine {
                    out.route_rules.extend(self.route_rules(r, &id, me, peers));
                }
            }
        }
        // Ingress ports we are the gateway of, towards peers that are registered.
        for i in self
            .ingress
            .iter()
            .filter(|i| same_host(&i.peer, &peers[me].hostname))
        {
            let Some(target) = peers.iter().find(|p| same_host(&i.target, &p.hostname)) else {
                continue;
            };
            let info = |s: &str| {
                let (a, b) = parse_ports(s).expect("checked at load");
                Some(PortInfo {
                    port_selection: Some(if a == b {
                        port_info::PortSelection::Port(u32::from(a))
                    } else {
                        port_info::PortSelection::Range(port_info::Range {
                            start: u32::from(a),
                            end: u32::from(b),
                        })
                    }),
                })
            };
            out.forwarding_rules
                .push(crate::control::management::ForwardingRule {
                    protocol: if i.protocol.eq_ignore_ascii_case("udp") {
                        3
                    } else {
                        2
                    },
                    destination_port: info(&i.port),
                    translated_address: target.ip.octets().to_vec(),
                    translated_port: info(&i.target_port),
                });
        }
        // DNS: groups and zones distributed to us; a group we serve ourselves is left out.
        for n in &self.nameservers {
            if !self.members(&n.groups, peers).contains(&me) {
                continue;
            }
            let servers: Vec<std::net::SocketAddr> =
                n.servers.iter().filter_map(|s| nameserver(s)).collect();
            if servers.iter().any(|s| s.ip() == IpAddr::V4(peers[me].ip)) {
                continue;
            }
            out.nameserver_groups.push(NameServerGroup {
                name_servers: servers
                    .iter()
                    .map(|s| NameServer {
                        ip: s.ip().to_string(),
                        ns_type: 1,
                        port: i64::from(s.port()),
                    })
                    .collect(),
                primary: n.primary,
                domains: n.domains.clone(),
                search_domains_enabled: n.search_domains,
            });
        }
        for z in &self.zones {
            if !self.members(&z.groups, peers).contains(&me) {
                continue;
            }
            out.zones.push(CustomZone {
                domain: format!("{}.", z.domain.trim_end_matches('.')),
                records: z
                    .records
                    .iter()
                    .map(|r| SimpleRecord {
                        name: format!("{}.", r.name.trim_end_matches('.')),
                        r#type: record_type(&r.rtype).unwrap_or(1),
                        class: "IN".into(),
                        ttl: r.ttl,
                        r_data: r.value.clone(),
                    })
                    .collect(),
                search_domain_disabled: z.search_domain_disabled,
                non_authoritative: z.non_authoritative,
            });
        }
        out
    }

    /// Networks' resources as routes (networks.md §6): a source of a policy towards a resource
    /// gets it through every router of its network, and sees the routers; a router gets its
    /// own route with the policies' rules, and sees the sources.
    fn network_resources(
        &self,
        me: usize,
        peers: &[Member],
        out: &mut PeerPolicy,
        visible: &mut BTreeSet<usize>,
    ) {
        for (ni, n) in self.networks.iter().enumerate() {
            let mut routers: Vec<(usize, &RouterSpec)> = Vec::new();
            for r in &n.routers {
                let mut members = self.members(&r.peer_groups, peers);
                for (i, p) in peers.iter().enumerate() {
                    if r.peers.iter().any(|h| same_host(h, &p.hostname)) {
                        members.insert(i);
                    }
                }
                routers.extend(members.into_iter().map(|m| (m, r)));
            }
            for (ri, res) in n.resources.iter().enumerate().filter(|(_, r)| r.enabled) {
                let applied: Vec<&Policy> = self
                    .policies
                    .iter()
                    .filter(|p| p.enabled && p.destinations.iter().any(|d| res.groups.contains(d)))
                    .collect();
                if applied.is_empty() {
                    continue;
                }
                let sources: BTreeSet<usize> = applied
                    .iter()
                    .flat_map(|p| self.members(&p.sources, peers))
                    .collect();
                let target = resource_target(&res.address).expect("checked at load");
                let (network, network_type, domains) = match &target {
                    Ok(net) => (
                        net.to_string(),
                        if net.addr().is_ipv4() { 1 } else { 2 },
                        vec![],
                    ),
                    Err(d) => ("192.0.2.0/32".to_string(), 3, vec![d.clone()]),
                };
                let id = format!("net{ni}res{ri}");
                let route = |router: usize, spec: &RouterSpec| Route {
                    id: format!("{id}:{}", peers[router].hostname),
                    network: network.clone(),
                    network_type,
                    peer: peers[router].key.clone(),
                    metric: spec.metric,
                    masquerade: spec.masquerade,
                    net_id: res.name.clone(),
                    domains: domains.clone(),
                    keep_route: true,
                    skip_auto_apply: false,
                };
                let i_route = routers.iter().any(|(r, _)| *r == me);
                if i_route {
                    let spec = routers.iter().find(|(r, _)| *r == me).expect("checked").1;
                    let own = route(me, spec);
                    for p in &applied {
                        let srcs: Vec<String> = self
                            .members(&p.sources, peers)
                            .into_iter()
                            .filter(|&q| q != me)
                            .map(|q| format!("{}/32", peers[q].ip))
                            .collect();
                        if srcs.is_empty() {
                            continue;
                        }
                        for port in port_infos(&p.ports) {
                            out.route_rules.push(RouteFirewallRule {
                                source_ranges: srcs.clone(),
                                action: action(&p.action).unwrap_or(0),
                                destination: network.clone(),
                                protocol: protocol(&p.protocol).unwrap_or(1),
                                port_info: port,
                                is_dynamic: network_type == 3,
                                domains: domains.clone(),
                                route_id: own.id.clone(),
                                ..Default::default()
                            });
                        }
                    }
                    visible.extend(sources.iter().filter(|&&q| q != me));
                    out.routes.push(own);
                } else if sources.contains(&me) {
                    for (r, spec) in &routers {
                        visible.insert(*r);
                        out.routes.push(route(*r, spec));
                    }
                }
            }
        }
    }

    fn routers(&self, r: &RouteSpec, peers: &[Member]) -> BTreeSet<usize> {
        let mut out = self.members(&r.peer_groups, peers);
        for (i, p) in peers.iter().enumerate() {
            if r.peers.iter().any(|n| same_host(n, &p.hostname)) {
                out.insert(i);
            }
        }
        out
    }

    /// The routing peer's rules for one of its routes (networks.md §2.2, "Who gets which
    /// rule"): a default permit without access-control groups, else the policies towards them.
    fn route_rules(
        &self,
        r: &RouteSpec,
        id: &str,
        me: usize,
        peers: &[Member],
    ) -> Vec<RouteFirewallRule> {
        let destination = r.network.clone().unwrap_or_else(|| "192.0.2.0/32".into());
        let base = RouteFirewallRule {
            destination: destination.clone(),
            is_dynamic: r.network.is_none(),
            domains: r.domains.clone(),
            route_id: id.to_string(),
            ..Default::default()
        };
        if r.access_control_groups.is_empty() {
            return vec![RouteFirewallRule {
                source_ranges: vec!["0.0.0.0/0".into()],
                protocol: 1,
                ..base
            }];
        }
        let distributed = self.members(&r.groups, peers);
        let mut out = Vec::new();
        for p in self.policies.iter().filter(|p| p.enabled) {
            if !p
                .destinations
                .iter()
                .any(|d| r.access_control_groups.contains(d))
            {
                continue;
            }
            let sources: Vec<String> = self
                .members(&p.sources, peers)
                .into_iter()
                .filter(|&q| q != me && distributed.contains(&q))
                .map(|q| format!("{}/32", peers[q].ip))
                .collect();
            if sources.is_empty() {
                continue;
            }
            for port in port_infos(&p.ports) {
                out.push(RouteFirewallRule {
                    source_ranges: sources.clone(),
                    action: action(&p.action).unwrap_or(0),
                    protocol: protocol(&p.protocol).unwrap_or(1),
                    port_info: port,
                    ..base.clone()
                });
            }
        }
        out
    }
}

/// A name in the file against a peer's DNS label (its host name as registered).
fn same_host(name: &str, label: &str) -> bool {
    super::management::dns_label(name) == label
}

fn wire_route(r: &RouteSpec, id: &str, peer: &str) -> Route {
    let (network, network_type) = match &r.network {
        Some(n) => {
            let net: IpNet = n.parse().expect("checked at load");
            (
                net.trunc().to_string(),
                if net.addr().is_ipv4() { 1 } else { 2 },
            )
        }
        None => ("192.0.2.0/32".to_string(), 3),
    };
    Route {
        id: id.to_string(),
        network,
        network_type,
        peer: peer.to_string(),
        metric: r.metric,
        masquerade: r.masquerade,
        net_id: r.net_id.clone(),
        domains: r.domains.clone(),
        keep_route: r.keep_route,
        skip_auto_apply: r.skip_auto_apply,
    }
}

/// `direction` 0 = IN (towards the receiver), 1 = OUT.
fn firewall_rules(p: &Policy, peer_ip: Ipv4Addr, direction: i32) -> Vec<FirewallRule> {
    let proto = protocol(&p.protocol).unwrap_or(1);
    let ports = if matches!(proto, 2 | 3) {
        port_infos(&p.ports)
    } else {
        vec![None]
    };
    ports
        .into_iter()
        .map(|port_info| FirewallRule {
            peer_ip: peer_ip.to_string(),
            direction,
            action: action(&p.action).unwrap_or(0),
            protocol: proto,
            port: match &port_info {
                Some(PortInfo {
                    port_selection: Some(port_info::PortSelection::Port(p)),
                }) => p.to_string(),
                _ => String::new(),
            },
            port_info,
            policy_id: p.name.as_bytes().to_vec(),
            source_prefixes: vec![compact(IpAddr::V4(peer_ip))],
            ..Default::default()
        })
        .collect()
}

/// NetBird's compact prefix encoding of a host address.
fn compact(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => [v4.octets().as_slice(), &[32]].concat(),
        IpAddr::V6(v6) => [v6.octets().as_slice(), &[128]].concat(),
    }
}

fn port_infos(ports: &[String]) -> Vec<Option<PortInfo>> {
    if ports.is_empty() {
        return vec![None];
    }
    ports
        .iter()
        .filter_map(|p| parse_ports(p))
        .map(|(a, b)| {
            Some(PortInfo {
                port_selection: Some(if a == b {
                    port_info::PortSelection::Port(u32::from(a))
                } else {
                    port_info::PortSelection::Range(port_info::Range {
                        start: u32::from(a),
                        end: u32::from(b),
                    })
                }),
            })
        })
        .collect()
}

fn parse_ports(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a != 0 && a <= b).then_some((a, b))
}

fn protocol(s: &str) -> Option<i32> {
    match s.to_ascii_lowercase().as_str() {
        "all" => Some(1),
        "tcp" => Some(2),
        "udp" => Some(3),
        "icmp" => Some(4),
        _ => None,
    }
}

fn action(s: &str) -> Option<i32> {
    match s.to_ascii_lowercase().as_str() {
        "accept" => Some(0),
        "drop" => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{PeerAcl, Proto, RouteAcl};

    const FILE: &str = r#"
[groups]
clients = ["client"]
routers = ["router-a", "router-b"]
outsiders = ["outsider"]

[[policies]]
name = "web"
sources = ["clients"]
destinations = ["routers"]
protocol = "tcp"
ports = ["80"]

[[routes]]
net_id = "corp-lan"
network = "198.19.1.0/24"
peer_groups = ["routers"]
groups = ["clients", "outsiders"]
access_control_groups = ["routers"]

[[routes]]
net_id = "exit"
network = "0.0.0.0/0"
peers = ["router-b"]
groups = ["clients"]
"#;

    fn peers() -> Vec<Member> {
        ["client", "router-a", "router-b", "outsider"]
            .iter()
            .enumerate()
            .map(|(i, h)| Member {
                hostname: h.to_string(),
                key: format!("key-{h}"),
                ip: Ipv4Addr::new(100, 64, 0, i as u8 + 1),
            })
            .collect()
    }

    use crate::firewall::flow;

    #[test]
    fn a_client_sees_its_routers_and_gets_their_routes_in_one_ha_group() {
        let f = NetworksFile::parse(FILE).unwrap();
        let p = f.policy_for(0, &peers());
        assert_eq!(p.visible, Some(BTreeSet::from([1, 2])));
        let lan: Vec<_> = p.routes.iter().filter(|r| r.net_id == "corp-lan").collect();
        assert_eq!(lan.len(), 2);
        assert_eq!(lan[0].id, "route0:router-a");
        assert_eq!(lan[1].peer, "key-router-b");
        assert!(
            p.routes
                .iter()
                .any(|r| r.network == "0.0.0.0/0" && r.peer == "key-router-b")
        );
        assert!(p.route_rules.is_empty(), "route rules go to routers only");
        // The client's OUT rules do not open anything inbound.
        let (acl, errors) = PeerAcl::from_wire(&p.firewall_rules, p.firewall_rules_is_empty);
        assert!(errors.is_empty());
        assert!(!acl.allows(&flow("100.64.0.2", "100.64.0.1", Proto::Tcp, 80)));
    }

    #[test]
    fn a_router_gets_in_rules_its_routes_and_route_rules_from_the_policies() {
        let f = NetworksFile::parse(FILE).unwrap();
        let p = f.policy_for(1, &peers());
        let (acl, _) = PeerAcl::from_wire(&p.firewall_rules, p.firewall_rules_is_empty);
        assert!(acl.allows(&flow("100.64.0.1", "100.64.0.2", Proto::Tcp, 80)));
        assert!(!acl.allows(&flow("100.64.0.1", "100.64.0.2", Proto::Tcp, 22)));
        assert!(!acl.allows(&flow("100.64.0.1", "100.64.0.2", Proto::Icmp, 0)));
        assert!(!acl.allows(&flow("100.64.0.4", "100.64.0.2", Proto::Tcp, 80)));
        // Its own routes only (the other router's member of the HA group is not a client route).
        assert!(p.routes.iter().all(|r| r.peer == "key-router-a"));
        let (racl, errors) = RouteAcl::from_wire(&p.route_rules, true);
        assert!(errors.is_empty());
        assert!(racl.allows(&flow("100.64.0.1", "198.19.1.10", Proto::Tcp, 80)));
        assert!(!racl.allows(&flow("100.64.0.1", "198.19.1.10", Proto::Tcp, 22)));
        assert!(
            !racl.allows(&flow("100.64.0.4", "198.19.1.10", Proto::Tcp, 80)),
            "outsider"
        );
        assert!(!racl.allows(&flow("100.64.0.1", "203.0.113.9", Proto::Udp, 53)));
        // The exit node's route has no access-control groups: a default permit.
        let b = f.policy_for(2, &peers());
        let (racl, _) = RouteAcl::from_wire(&b.route_rules, true);
        assert!(racl.allows(&flow("100.64.0.4", "203.0.113.9", Proto::Udp, 53)));
    }

    /// NetBird's default policy (All to All, both ways) meets every pair twice; management
    /// sends one rule per peer and direction all the same.
    #[test]
    fn all_to_all_sends_one_rule_per_peer_and_direction() {
        let f = NetworksFile::parse(
            r#"
[[policies]]
name = "Default"
sources = ["All"]
destinations = ["All"]
bidirectional = true
"#,
        )
        .unwrap();
        let p = f.policy_for(0, &peers());
        assert_eq!(p.firewall_rules.len(), 2 * 3, "{:?}", p.firewall_rules);
        let mut keys: Vec<_> = p
            .firewall_rules
            .iter()
            .map(|r| (r.peer_ip.clone(), r.direction))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 6);
    }

    #[test]
    fn an_outsider_sees_nobody_and_gets_no_route() {
        let f = NetworksFile::parse(FILE).unwrap();
        let p = f.policy_for(3, &peers());
        assert_eq!(p.visible, Some(BTreeSet::new()));
        assert!(p.routes.is_empty());
        assert!(p.firewall_rules_is_empty);
    }

    #[test]
    fn without_policies_everyone_sees_everyone_and_no_rules_are_sent() {
        let f = NetworksFile::parse(
            "[[routes]]\nnet_id = \"lan\"\nnetwork = \"198.19.1.0/24\"\npeers = [\"router-a\"]\n",
        )
        .unwrap();
        let p = f.policy_for(0, &peers());
        assert_eq!(p.visible, None);
        assert!(!p.firewall_rules_is_empty && p.firewall_rules.is_empty());
        assert_eq!(p.routes.len(), 1);
        let r = f.policy_for(1, &peers());
        assert_eq!(
            r.route_rules[0].source_ranges,
            vec!["0.0.0.0/0".to_string()]
        );
    }

    #[test]
    fn network_resources_become_routes_for_policy_sources_and_rules_for_routers() {
        let f = NetworksFile::parse(
            r#"
[groups]
clients = ["client"]

[[policies]]
name = "to-db"
sources = ["clients"]
destinations = ["db-res"]
protocol = "tcp"
ports = ["5432"]

[[networks]]
name = "corp"
routers = [{ peers = ["router-a"], metric = 10 }, { peers = ["router-b"] }]
resources = [
  { name = "db", address = "198.19.1.20", groups = ["db-res"] },
  { name = "apps", address = "*.apps.example", groups = ["db-res"] },
  { name = "unused", address = "198.19.9.0/24", groups = ["nobody"] },
]
"#,
        )
        .unwrap();
        let client = f.policy_for(0, &peers());
        assert_eq!(client.visible, Some(BTreeSet::from([1, 2])), "the routers");
        let db: Vec<_> = client.routes.iter().filter(|r| r.net_id == "db").collect();
        assert_eq!(db.len(), 2, "one HA group through both routers");
        assert_eq!(
            (db[0].network.as_str(), db[0].metric),
            ("198.19.1.20/32", 10)
        );
        assert!(db.iter().all(|r| r.keep_route));
        let apps = client.routes.iter().find(|r| r.net_id == "apps").unwrap();
        assert_eq!(
            (apps.network_type, apps.domains.clone()),
            (3, vec!["*.apps.example".to_string()])
        );
        assert!(
            client.routes.iter().all(|r| r.net_id != "unused"),
            "no policy applies"
        );

        let router = f.policy_for(1, &peers());
        assert!(
            router.visible.as_ref().unwrap().contains(&0),
            "sees the source"
        );
        assert!(router.routes.iter().all(|r| r.peer == "key-router-a"));
        let (acl, errors) = RouteAcl::from_wire(&router.route_rules, true);
        assert!(errors.is_empty());
        assert!(acl.allows(&flow("100.64.0.1", "198.19.1.20", Proto::Tcp, 5432)));
        assert!(!acl.allows(&flow("100.64.0.1", "198.19.1.21", Proto::Tcp, 5432)));
        assert!(!acl.allows(&flow("100.64.0.4", "198.19.1.20", Proto::Tcp, 5432)));
        assert!(f.policy_for(3, &peers()).routes.is_empty(), "the outsider");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, needle) in [
            (
                "[[policies]]\nname=\"p\"\nsources=[\"x\"]\ndestinations=[\"All\"]\n",
                "no group \"x\"",
            ),
            (
                "[[policies]]\nname=\"p\"\nsources=[\"All\"]\ndestinations=[\"All\"]\nprotocol=\"sctp\"\n",
                "sctp",
            ),
            (
                "[[policies]]\nname=\"p\"\nsources=[\"All\"]\ndestinations=[\"All\"]\nports=[\"9-1\"]\n",
                "9-1",
            ),
            (
                "[[routes]]\nnet_id=\"r\"\nnetwork=\"10.0.0.0/33\"\npeers=[\"a\"]\n",
                "not a prefix",
            ),
            (
                "[[routes]]\nnet_id=\"r\"\nnetwork=\"10.0.0.0/8\"\n",
                "no routing peers",
            ),
            (
                "[[routes]]\nnet_id=\"r\"\npeers=[\"a\"]\n",
                "either network or domains",
            ),
            (
                "[[routes]]\nnet_id=\"r\"\nnetwork=\"10.0.0.0/8\"\npeers=[\"a\"]\nmetric=0\n",
                "metric",
            ),
            ("[[routez]]\n", "unknown field"),
        ] {
            let e = NetworksFile::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
