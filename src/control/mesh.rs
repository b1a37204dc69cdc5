//! What management tells us about the mesh, as a state machine fed `SyncResponse`s.
//!
//! `MeshState::apply_encoded` follows NetBird's client rules (netbird-protocol.md §4.7) and
//! returns the changes for the engine to act on; it does no I/O, so every rule is unit-tested
//! here. It takes the message as sent: the map's big parts (peers, rules, DNS) are decoded only
//! where their bytes changed since the last update (`sections`), so a one-peer change in a
//! 5 000-peer account decodes one peer entry, not 5 000.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use bytes::Bytes;
use ipnet::IpNet;

use super::envelope::parse_key_string;
use super::management::{NetbirdConfig, PeerConfig, SyncResponse};
use super::sections::{self, ByPrint, Sections};

/// A remote peer from the network map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePeer {
    /// Key string (base64 of the WireGuard public key).
    pub key: String,
    pub public_key: [u8; 32],
    pub allowed_ips: Vec<IpNet>,
    pub fqdn: String,
    pub agent_version: String,
}

impl RemotePeer {
    /// Whether the map's entry `rp` says what we know, without allocating. A key string
    /// equal to ours is the same public key.
    fn same_as(&self, rp: &super::management::RemotePeerConfig, has_ipv6: bool) -> bool {
        if rp.fqdn.trim_end_matches('.') != self.fqdn || rp.agent_version != self.agent_version {
            return false;
        }
        let mut ours = self.allowed_ips.iter();
        for value in &rp.allowed_ips {
            let Some(net) = parse_prefix(value) else {
                return false; // decoded again, to say why it is bad
            };
            if net.addr().is_ipv6() && !has_ipv6 {
                continue;
            }
            if ours.next() != Some(&net) {
                return false;
            }
        }
        ours.next().is_none()
    }
}

/// A peer of the map and the fingerprint of its entry as last sent (`sections::print_one`).
#[derive(Clone, Debug)]
struct Known {
    peer: RemotePeer,
    print: u64,
}

/// A TURN server from `NetbirdConfig.turns`: `turn:host:port?transport=udp` and its
/// (management-issued, time-limited) credentials. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnServer {
    /// `turn:host:port?transport=udp`.
    pub uri: String,
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TurnServer({} as {}, <redacted>)", self.uri, self.user)
    }
}

/// Relay settings from `NetbirdConfig.relay`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySettings {
    pub urls: Vec<String>,
    pub token_payload: String,
    pub token_signature: String,
}

/// Our own peer as management configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPeer {
    /// Overlay address with the account network's prefix length.
    pub address: IpNet,
    pub fqdn: String,
    pub mtu: Option<u16>,
}

/// What changed with one update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Our address changed: the engine must be rebuilt.
    AddressChanged {
        old: IpNet,
        new: IpNet,
    },
    /// Relay settings replaced (`None`: relay disabled).
    Relay(Option<RelaySettings>),
    /// The signal server changed.
    Signal(String),
    /// STUN server URIs replaced (`NetbirdConfig.stuns`).
    Stuns(Vec<String>),
    /// TURN servers replaced (`NetbirdConfig.turns`).
    Turns(Vec<TurnServer>),
    PeerAdded(RemotePeer),
    PeerRemoved(String),
    /// AllowedIPs or agent version changed: re-create the peer.
    PeerChanged(RemotePeer),
    /// Only the name changed: update in place.
    PeerRenamed {
        key: String,
        fqdn: String,
    },
    /// Management's lazy-connection setting for this account (`PeerConfig
    /// .LazyConnectionEnabled`) is new or changed; it comes before the map's peers.
    LazyConnections(bool),
    /// The map's routes changed (decoded; the ones refused are in `Refused`).
    Routes(Vec<crate::route::Route>),
    /// The rules for inbound flows to us changed.
    PeerAcl(crate::firewall::PeerAcl),
    /// The rules for flows we route changed.
    RouteAcl(crate::firewall::RouteAcl),
    /// Ingress ports this peer serves changed (`forwardingRules`).
    Ingress(Vec<crate::forward::ingress::IngressRule>),
    /// The DNS part changed: zones, nameserver groups, the forwarder port.
    Dns(crate::dns::DnsConfig),
    /// Part of the map was refused (a route, a rule): why. The rest of the map stands.
    Refused(String),
}

/// Why an update was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[allow(clippy::enum_variant_names)] // Each says what was bad; the prefix is the point.
pub enum SyncError {
    #[error("peer {key}: allowed IP `{value}` is not a prefix")]
    BadAllowedIp { key: String, value: String },
    #[error("peer `{0}`: not a WireGuard key")]
    BadKey(String),
    #[error("our address `{0}` is not IP/prefix")]
    BadAddress(String),
    #[error("{0}")]
    Malformed(String),
}

/// The client's view of the mesh.
#[derive(Clone, Debug, Default)]
pub struct MeshState {
    pub serial: u64,
    pub local: Option<LocalPeer>,
    peers: HashMap<String, Known>,
    /// The update that last listed each peer entry, by the entry's fingerprint: an entry sent
    /// again byte for byte is neither decoded nor looked up by key.
    entries: ByPrint<u64>,
    /// `has_ipv6` when `entries` was filled (it decides what an entry decodes to).
    entries_ipv6: bool,
    /// Numbers the updates, to find the peers an update no longer lists without a set.
    generation: u64,
    pub relay: Option<RelaySettings>,
    pub signal: Option<String>,
    /// STUN server URIs for ICE (`NetbirdConfig.stuns`, `stun:host:port`).
    pub stuns: Vec<String>,
    /// TURN servers for ICE relay candidates (`NetbirdConfig.turns`).
    pub turns: Vec<TurnServer>,
    /// Whether we have an IPv6 overlay address (v6 AllowedIPs are skipped without one).
    pub has_ipv6: bool,
    /// The map's routes, decoded.
    pub routes: Vec<crate::route::Route>,
    /// Management's lazy-connection setting, once a map has said it.
    pub lazy_connections: Option<bool>,
    /// The policy parts of the last map as sent, to decode them again only when they change.
    policy_prints: Option<PolicyPrints>,
    /// DNS records decoded from earlier maps (a mesh zone has one per peer).
    dns_records: crate::dns::zone::RecordCache,
}

/// The policy parts an update changed, decoded; None: unchanged.
#[derive(Debug, Default)]
struct ChangedPolicy {
    /// The first map: every part is new, even an empty one.
    first: bool,
    routes: Option<Vec<super::management::Route>>,
    firewall: Option<(crate::firewall::PeerAcl, Vec<crate::firewall::RuleError>)>,
    route_rules: Option<(crate::firewall::RouteAcl, Vec<crate::firewall::RuleError>)>,
    forwarding: Option<(Vec<crate::forward::ingress::IngressRule>, Vec<String>)>,
    dns: Option<(crate::dns::DnsConfig, Vec<String>)>,
}

/// What the parts of a map that `Change::Routes`, `PeerAcl`, `RouteAcl`, `Ingress` and `Dns`
/// come from looked like, as fingerprints: a map of thousands of peers carries as many DNS
/// records and rules, and keeping a copy to compare the next map with cost a copy per update
/// (15 000 allocations for a 5 000-record zone). A fingerprint is `sections::print` of the
/// part as sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PolicyPrints {
    routes: u64,
    firewall: u64,
    firewall_is_empty: bool,
    route_rules: u64,
    dns_resolution: bool,
    dns: u64,
    forwarding: u64,
}

/// Parse `PeerConfig.address`.
pub fn parse_local(pc: &PeerConfig) -> Result<LocalPeer, SyncError> {
    let address: IpNet = pc
        .address
        .parse()
        .map_err(|_| SyncError::BadAddress(pc.address.clone()))?;
    Ok(LocalPeer {
        address,
        fqdn: pc.fqdn.trim_end_matches('.').to_string(),
        mtu: u16::try_from(pc.mtu).ok().filter(|&m| m >= 576),
    })
}

impl MeshState {
    /// Apply the configuration part of a Login or Sync response.
    pub fn apply_config(&mut self, config: &NetbirdConfig, changes: &mut Vec<Change>) {
        let relay = config.relay.as_ref().map(|r| RelaySettings {
            urls: r.urls.clone(),
            token_payload: r.token_payload.clone(),
            token_signature: r.token_signature.clone(),
        });
        if relay != self.relay {
            self.relay = relay.clone();
            changes.push(Change::Relay(relay));
        }
        let turns: Vec<TurnServer> = config
            .turns
            .iter()
            .filter_map(|t| {
                Some(TurnServer {
                    uri: t.host_config.as_ref()?.uri.clone(),
                    user: t.user.clone(),
                    password: t.password.clone(),
                })
            })
            .collect();
        if turns != self.turns {
            self.turns = turns.clone();
            changes.push(Change::Turns(turns));
        }
        let stuns: Vec<String> = config.stuns.iter().map(|h| h.uri.clone()).collect();
        if stuns != self.stuns {
            self.stuns = stuns.clone();
            changes.push(Change::Stuns(stuns));
        }
        if let Some(signal) = &config.signal
            && self.signal.as_deref() != Some(signal.uri.as_str())
        {
            self.signal = Some(signal.uri.clone());
            changes.push(Change::Signal(signal.uri.clone()));
        }
    }

    /// Apply one `SyncResponse`, decoded: encoded again and applied as sent (tests, fuzzing).
    pub fn apply(&mut self, resp: &SyncResponse, own_key: &str) -> Result<Vec<Change>, SyncError> {
        use prost::Message as _;
        self.apply_encoded(&Bytes::from(resp.encode_to_vec()), own_key)
    }

    /// Apply one Sync message as management sent it (decrypted). `own_key` is our key string.
    /// All or nothing for the map's peers and policy: a malformed part or a bad peer entry
    /// rejects the update before either changes.
    pub fn apply_encoded(&mut self, msg: &Bytes, own_key: &str) -> Result<Vec<Change>, SyncError> {
        use prost::Message as _;
        let malformed = |e: &dyn std::fmt::Display| SyncError::Malformed(e.to_string());
        let parts = sections::split(msg).map_err(|e| malformed(&e))?;
        let resp = SyncResponse::decode(parts.light.as_slice()).map_err(|e| malformed(&e))?;
        let mut changes = Vec::new();
        if let Some(config) = &resp.netbird_config {
            self.apply_config(config, &mut changes);
        }
        let Some(map) = &resp.network_map else {
            return Ok(changes); // config-only update
        };
        let lazy_before = self.lazy_connections;
        // Our own configuration is applied before the serial check.
        if let Some(pc) = map.peer_config.as_ref().or(resp.peer_config.as_ref()) {
            let local = parse_local(pc)?;
            match &self.local {
                Some(old) if old.address != local.address => {
                    changes.push(Change::AddressChanged {
                        old: old.address,
                        new: local.address,
                    });
                    self.local = Some(local);
                    return Ok(changes); // the engine is rebuilt; the map goes to the new one
                }
                _ => self.local = Some(local),
            }
            if self.lazy_connections != Some(pc.lazy_connection_enabled) {
                self.lazy_connections = Some(pc.lazy_connection_enabled);
                changes.push(Change::LazyConnections(pc.lazy_connection_enabled));
            }
        }
        if map.serial < self.serial {
            return Ok(changes);
        }
        let serial_before = std::mem::replace(&mut self.serial, map.serial);

        let dns_resolution = map
            .peer_config
            .as_ref()
            .or(resp.peer_config.as_ref())
            .is_some_and(|pc| pc.routing_peer_dns_resolution_enabled);
        let prints = PolicyPrints {
            routes: sections::print(&parts.routes),
            firewall: sections::print(&parts.firewall),
            firewall_is_empty: map.firewall_rules_is_empty,
            route_rules: sections::print(&parts.route_rules),
            dns_resolution,
            dns: sections::print(&parts.dns),
            forwarding: sections::print(&parts.forwarding),
        };
        let applied = self
            .decode_policy(msg, &parts, prints)
            .map_err(SyncError::Malformed)
            .and_then(|policy| {
                self.apply_peers(
                    msg,
                    &parts.peers,
                    map.remote_peers_is_empty,
                    own_key,
                    &mut changes,
                )?;
                Ok(policy)
            });
        match applied {
            Ok(policy) => {
                self.apply_policy(policy, prints, &mut changes);
                Ok(changes)
            }
            Err(e) => {
                // Its changes are dropped with it: what they said must be said again, and
                // the same serial is applied when it comes again.
                self.lazy_connections = lazy_before;
                self.serial = serial_before;
                Err(e)
            }
        }
    }

    /// The map's peers against ours, in O(changes) allocations and decodes: an entry sent
    /// before byte for byte is found by its fingerprint and nothing else is done for it; a
    /// changed entry is decoded and compared in place (a new ssh key, say, changes nothing we
    /// keep). All or nothing: a bad entry rejects the update before any peer changes. A peer
    /// listed twice keeps the entry it had (or the first one, when new), so the map's order
    /// cannot make it flap between two.
    fn apply_peers(
        &mut self,
        whole: &Bytes,
        entries: &[&[u8]],
        is_empty: bool,
        own_key: &str,
        changes: &mut Vec<Change>,
    ) -> Result<(), SyncError> {
        use prost::Message as _;
        if self.entries_ipv6 != self.has_ipv6 {
            // What an entry decodes to depends on it: every entry is looked at again.
            self.entries.clear();
            self.entries_ipv6 = self.has_ipv6;
        }
        self.generation += 1;
        let generation = self.generation;
        let mut updates: Vec<(RemotePeer, u64)> = Vec::new();
        // Keys a decoded entry of this update spoke for (changed, or re-pointed).
        let mut claimed: HashSet<String> = HashSet::new();
        let entries: &[&[u8]] = if is_empty { &[] } else { entries };
        // Entries re-pointed at a new fingerprint (their bytes changed, not what we keep).
        let mut repoint: Vec<(String, u64)> = Vec::new();
        for entry in entries {
            let print = sections::print_one(entry);
            if let Some(seen) = self.entries.get_mut(&print) {
                *seen = generation;
                continue;
            }
            let rp = super::management::RemotePeerConfig::decode(whole.slice_ref(entry))
                .map_err(|e| SyncError::Malformed(format!("a peer entry: {e}")))?;
            if rp.wg_pub_key == own_key {
                continue;
            }
            if let Some(known) = self.peers.get(&rp.wg_pub_key) {
                if self.entries.get(&known.print) == Some(&generation)
                    || claimed.contains(&rp.wg_pub_key)
                {
                    continue; // listed already
                }
                if known.peer.same_as(&rp, self.has_ipv6) {
                    claimed.insert(rp.wg_pub_key.clone());
                    repoint.push((rp.wg_pub_key, print));
                    continue;
                }
            }
            if !claimed.insert(rp.wg_pub_key.clone()) {
                continue;
            }
            updates.push((self.decode_peer(&rp)?, print));
        }
        for (key, print) in repoint {
            if let Some(known) = self.peers.get_mut(&key) {
                self.entries.remove(&known.print);
                known.print = print;
                self.entries.insert(print, generation);
            }
        }
        let entries_seen = &mut self.entries;
        self.peers.retain(|key, known| {
            let listed =
                entries_seen.get(&known.print) == Some(&generation) || claimed.contains(key);
            if !listed {
                entries_seen.remove(&known.print);
                changes.push(Change::PeerRemoved(key.clone()));
            }
            listed
        });
        for (peer, print) in updates {
            let change = match self.peers.get(&peer.key) {
                None => Change::PeerAdded(peer.clone()),
                Some(old)
                    if old.peer.allowed_ips != peer.allowed_ips
                        || old.peer.agent_version != peer.agent_version =>
                {
                    Change::PeerChanged(peer.clone())
                }
                Some(_) => Change::PeerRenamed {
                    key: peer.key.clone(),
                    fqdn: peer.fqdn.clone(),
                },
            };
            changes.push(change);
            if let Some(old) = self.peers.get(&peer.key) {
                self.entries.remove(&old.print);
            }
            self.entries.insert(print, generation);
            self.peers.insert(peer.key.clone(), Known { peer, print });
        }
        Ok(())
    }

    fn decode_peer(&self, rp: &super::management::RemotePeerConfig) -> Result<RemotePeer, SyncError> {
        let public_key = parse_key_string(&rp.wg_pub_key)
            .map_err(|_| SyncError::BadKey(rp.wg_pub_key.clone()))?;
        let mut allowed_ips = Vec::with_capacity(rp.allowed_ips.len());
        for value in &rp.allowed_ips {
            let net = parse_prefix(value).ok_or_else(|| SyncError::BadAllowedIp {
                key: rp.wg_pub_key.clone(),
                value: value.clone(),
            })?;
            if net.addr().is_ipv6() && !self.has_ipv6 {
                continue;
            }
            allowed_ips.push(net);
        }
        Ok(RemotePeer {
            key: rp.wg_pub_key.clone(),
            public_key,
            allowed_ips,
            fqdn: rp.fqdn.trim_end_matches('.').to_string(),
            agent_version: rp.agent_version.clone(),
        })
    }

    /// Every peer of the map.
    pub fn peers(&self) -> impl Iterator<Item = &RemotePeer> {
        self.peers.values().map(|k| &k.peer)
    }

    /// The peer with key string `key`.
    pub fn peer(&self, key: &str) -> Option<&RemotePeer> {
        self.peers.get(key).map(|k| &k.peer)
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The policy parts whose bytes changed since the last map, decoded and built (nothing
    /// the engine sees changes yet: a malformed part rejects the update whole). The error is
    /// malformed protobuf.
    fn decode_policy(
        &mut self,
        whole: &Bytes,
        parts: &Sections<'_>,
        new: PolicyPrints,
    ) -> Result<ChangedPolicy, String> {
        let old = self.policy_prints;
        if old == Some(new) {
            return Ok(ChangedPolicy::default()); // the common case: a peer came or went
        }
        let first = old.is_none();
        let old = old.unwrap_or_default();
        let changed = |a: u64, b: u64| a != b || first;
        let text = |e: prost::DecodeError| e.to_string();
        let mut policy = ChangedPolicy {
            first,
            ..ChangedPolicy::default()
        };
        if changed(new.routes, old.routes) {
            policy.routes = Some(sections::decode_each(whole, &parts.routes).map_err(text)?);
        }
        if changed(new.firewall, old.firewall) || new.firewall_is_empty != old.firewall_is_empty {
            // A policy's rules are two per peer: read in place, nothing copied.
            let mut acl = crate::firewall::peer::PeerAclBuilder::new(new.firewall_is_empty);
            acl.reserve(parts.firewall.len());
            for (i, raw) in parts.firewall.iter().enumerate() {
                let rule = crate::firewall::wire::RuleView::parse(raw)
                    .map_err(|e| format!("firewall rule {i}: {e}"))?;
                acl.add(i, &rule);
            }
            policy.firewall = Some(acl.finish());
        }
        if changed(new.route_rules, old.route_rules) || new.dns_resolution != old.dns_resolution {
            let rules: Vec<super::management::RouteFirewallRule> =
                sections::decode_each(whole, &parts.route_rules).map_err(text)?;
            policy.route_rules = Some(crate::firewall::RouteAcl::from_wire(
                &rules,
                new.dns_resolution,
            ));
        }
        if changed(new.forwarding, old.forwarding) {
            let rules: Vec<super::management::ForwardingRule> =
                sections::decode_each(whole, &parts.forwarding).map_err(text)?;
            policy.forwarding = Some(crate::forward::ingress::decode(&rules));
        }
        if changed(new.dns, old.dns) || new.dns_resolution != old.dns_resolution {
            let (mut dns, errors) = crate::dns::DnsConfig::from_encoded_with(
                whole,
                &parts.dns,
                &mut self.dns_records,
            )
            .map_err(|e| format!("DNS: {e}"))?;
            dns.routing_peer_resolution = new.dns_resolution;
            policy.dns = Some((dns, errors));
        }
        Ok(policy)
    }

    /// The policy parts that changed, said; a bad entry is refused with its reason and the
    /// others stand.
    fn apply_policy(&mut self, policy: ChangedPolicy, new: PolicyPrints, changes: &mut Vec<Change>) {
        self.policy_prints = Some(new);
        if let Some(wire) = policy.routes {
            let mut routes = Vec::with_capacity(wire.len());
            for r in &wire {
                match crate::route::Route::from_wire(r) {
                    Ok(route) => routes.push(route),
                    Err(e) => changes.push(Change::Refused(e.to_string())),
                }
            }
            if routes != self.routes || policy.first {
                self.routes.clone_from(&routes);
                changes.push(Change::Routes(routes));
            }
        }
        if let Some((acl, errors)) = policy.firewall {
            changes.extend(errors.into_iter().map(|e| Change::Refused(e.to_string())));
            changes.push(Change::PeerAcl(acl));
        }
        if let Some((acl, errors)) = policy.route_rules {
            changes.extend(
                errors
                    .into_iter()
                    .map(|e| Change::Refused(format!("route {e}"))),
            );
            changes.push(Change::RouteAcl(acl));
        }
        if let Some((rules, errors)) = policy.forwarding {
            changes.extend(errors.into_iter().map(Change::Refused));
            changes.push(Change::Ingress(rules));
        }
        if let Some((dns, errors)) = policy.dns {
            changes.extend(
                errors
                    .into_iter()
                    .map(|e| Change::Refused(format!("DNS: {e}"))),
            );
            changes.push(Change::Dns(dns));
        }
    }

    /// The peer owning an FQDN (case-insensitive, trailing dot ignored).
    pub fn peer_by_fqdn(&self, name: &str) -> Option<&RemotePeer> {
        let name = name.trim_end_matches('.');
        self.peers()
            .find(|p| !p.fqdn.is_empty() && p.fqdn.eq_ignore_ascii_case(name))
    }

    /// The overlay IP of a peer: the first host prefix of its AllowedIPs.
    pub fn overlay_ip(peer: &RemotePeer) -> Option<IpAddr> {
        peer.allowed_ips
            .iter()
            .find(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr())
    }
}

fn parse_prefix(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::envelope::{key_string, public_key_of};
    use crate::control::management::{HostConfig, NetworkMap, RelayConfig, RemotePeerConfig};

    fn key(seed: u8) -> String {
        key_string(&public_key_of(&[seed; 32]))
    }

    fn peer(seed: u8, ip: &str, fqdn: &str) -> RemotePeerConfig {
        RemotePeerConfig {
            wg_pub_key: key(seed),
            allowed_ips: vec![format!("{ip}/32")],
            fqdn: fqdn.into(),
            agent_version: "0.77.1".into(),
            ..Default::default()
        }
    }

    fn map(serial: u64, address: &str, peers: Vec<RemotePeerConfig>) -> SyncResponse {
        SyncResponse {
            network_map: Some(NetworkMap {
                serial,
                peer_config: Some(PeerConfig {
                    address: address.into(),
                    fqdn: "me.mesh.test".into(),
                    ..Default::default()
                }),
                remote_peers_is_empty: peers.is_empty(),
                remote_peers: peers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The changes about peers only (the first map also carries its policy changes).
    fn peer_changes(c: Vec<Change>) -> Vec<Change> {
        c.into_iter()
            .filter(|c| {
                matches!(
                    c,
                    Change::PeerAdded(_)
                        | Change::PeerRemoved(_)
                        | Change::PeerChanged(_)
                        | Change::PeerRenamed { .. }
                )
            })
            .collect()
    }

    #[test]
    fn routes_rules_and_dns_are_decoded_once_per_change_with_reasons_for_refused_entries() {
        use crate::control::management::{FirewallRule, Route};
        let me = key(1);
        let mut s = MeshState::default();
        let with = |serial: u64, routes: Vec<Route>, rules: Vec<FirewallRule>| {
            let mut m = map(serial, "100.64.0.1/16", vec![peer(2, "100.64.0.2", "b")]);
            let nm = m.network_map.as_mut().unwrap();
            nm.routes = routes;
            nm.firewall_rules = rules;
            nm.firewall_rules_is_empty = nm.firewall_rules.is_empty();
            m
        };
        let good = Route {
            id: "r1".into(),
            network: "198.19.1.0/24".into(),
            network_type: 1,
            peer: key(2),
            metric: 100,
            net_id: "lan".into(),
            ..Default::default()
        };
        let bad = Route {
            id: "r2".into(),
            network: "not a prefix".into(),
            network_type: 1,
            peer: key(2),
            metric: 100,
            ..Default::default()
        };
        let rule = FirewallRule {
            peer_ip: "100.64.0.2".into(),
            protocol: 2,
            port: "80".into(),
            ..Default::default()
        };
        let c = s
            .apply(&with(1, vec![good.clone(), bad], vec![rule.clone()]), &me)
            .unwrap();
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::Routes(r) if r.len() == 1)),
            "{c:?}"
        );
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::Refused(r) if r.contains("r2")))
        );
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::PeerAcl(a) if !a.is_open()))
        );
        assert!(c.iter().any(|c| matches!(c, Change::RouteAcl(_))));
        assert!(c.iter().any(|c| matches!(c, Change::Dns(_))));
        // The same map again: nothing to redo.
        let c = s
            .apply(&with(2, vec![good.clone()], vec![rule]), &me)
            .unwrap();
        assert!(
            c.iter()
                .all(|c| !matches!(c, Change::PeerAcl(_) | Change::Dns(_))),
            "{c:?}"
        );
        assert!(c.iter().all(|c| !matches!(c, Change::Routes(_))), "{c:?}");
        // Rules gone with the flag set: deny all.
        let c = s.apply(&with(3, vec![good], vec![]), &me).unwrap();
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::PeerAcl(a) if !a.is_open() && a.is_empty()))
        );
    }

    #[test]
    fn the_lazy_connection_setting_is_said_first_and_again_only_when_it_changes() {
        let me = key(1);
        let mut s = MeshState::default();
        let with = |serial: u64, lazy: bool| {
            let mut m = map(serial, "100.64.0.1/16", vec![peer(2, "100.64.0.2", "b")]);
            let nm = m.network_map.as_mut().unwrap();
            nm.peer_config.as_mut().unwrap().lazy_connection_enabled = lazy;
            m
        };
        let c = s.apply(&with(1, true), &me).unwrap();
        // Before the peers, so they start in the mode management asked for.
        assert_eq!(c.first(), Some(&Change::LazyConnections(true)), "{c:?}");
        assert!(c.iter().any(|c| matches!(c, Change::PeerAdded(_))));
        let c = s.apply(&with(2, true), &me).unwrap();
        assert!(!c.iter().any(|c| matches!(c, Change::LazyConnections(_))), "{c:?}");
        let c = s.apply(&with(3, false), &me).unwrap();
        assert_eq!(c, vec![Change::LazyConnections(false)]);
    }

    /// The incremental path keeps the whole-map semantics: all or nothing, one entry per
    /// key, and a peer absent from the next map removed even when others changed with it.
    #[test]
    fn a_bad_entry_rejects_the_whole_update_and_duplicates_count_once() {
        let me = key(1);
        let mut s = MeshState::default();
        let two = vec![peer(2, "100.64.0.2", "b"), peer(3, "100.64.0.3", "c")];
        s.apply(&map(1, "100.64.0.1/16", two), &me).unwrap();
        let mut bad = peer(4, "100.64.0.4", "d");
        bad.allowed_ips = vec!["nonsense".into()];
        let err = s.apply(
            &map(2, "100.64.0.1/16", vec![peer(2, "100.64.0.9", "b2"), bad]),
            &me,
        );
        assert!(matches!(err, Err(SyncError::BadAllowedIp { .. })), "{err:?}");
        assert_eq!(s.peer_count(), 2, "nothing changed");
        assert_eq!(s.peer(&key(2)).unwrap().fqdn, "b");
        // c leaves, b changes, d comes twice: one removal, one change, one addition.
        let c = s
            .apply(
                &map(
                    3,
                    "100.64.0.1/16",
                    vec![
                        peer(2, "100.64.0.9", "b"),
                        peer(4, "100.64.0.4", "d"),
                        peer(4, "100.64.0.4", "d"),
                    ],
                ),
                &me,
            )
            .unwrap();
        let c = peer_changes(c);
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c.contains(&Change::PeerRemoved(key(3))));
        assert!(c.iter().any(|c| matches!(c, Change::PeerChanged(p) if p.key == key(2))));
        assert!(c.iter().any(|c| matches!(c, Change::PeerAdded(p) if p.key == key(4))));
        assert_eq!(s.peer_count(), 2);
        // Listed twice with different entries: the first stands, and stays.
        for serial in [4, 5] {
            let c = s
                .apply(
                    &map(
                        serial,
                        "100.64.0.1/16",
                        vec![
                            peer(2, "100.64.0.9", "b"),
                            peer(4, "100.64.0.4", "d"),
                            peer(4, "100.64.0.7", "d-other"),
                        ],
                    ),
                    &me,
                )
                .unwrap();
            assert!(peer_changes(c).is_empty(), "serial {serial}");
        }
        assert_eq!(s.peer(&key(4)).unwrap().fqdn, "d");
        // The same map again: nothing.
        let again = s
            .apply(
                &map(
                    6,
                    "100.64.0.1/16",
                    vec![peer(2, "100.64.0.9", "b"), peer(4, "100.64.0.4", "d")],
                ),
                &me,
            )
            .unwrap();
        assert!(peer_changes(again).is_empty());
    }

    #[test]
    fn peers_are_added_changed_renamed_and_removed() {
        let me = key(1);
        let mut s = MeshState::default();
        let c = s
            .apply(
                &map(
                    1,
                    "100.64.0.1/16",
                    vec![peer(1, "100.64.0.1", "me"), peer(2, "100.64.0.2", "b.mesh")],
                ),
                &me,
            )
            .unwrap();
        let c = peer_changes(c);
        assert!(
            matches!(&c[..], [Change::PeerAdded(p)] if p.fqdn == "b.mesh"),
            "own key skipped: {c:?}"
        );
        assert_eq!(
            s.local.as_ref().unwrap().address.to_string(),
            "100.64.0.1/16"
        );

        let c = s
            .apply(
                &map(2, "100.64.0.1/16", vec![peer(2, "100.64.0.2", "b2.mesh")]),
                &me,
            )
            .unwrap();
        assert_eq!(
            c,
            vec![Change::PeerRenamed {
                key: key(2),
                fqdn: "b2.mesh".into()
            }]
        );

        let c = s
            .apply(
                &map(
                    3,
                    "100.64.0.1/16",
                    vec![peer(2, "100.64.0.9", "b2.mesh"), peer(3, "100.64.0.3", "c")],
                ),
                &me,
            )
            .unwrap();
        assert!(
            matches!(&c[..], [Change::PeerAdded(p3), Change::PeerChanged(p2)] | [Change::PeerChanged(p2), Change::PeerAdded(p3)]
            if p2.key == key(2) && p3.key == key(3)),
            "{c:?}"
        );
        assert_eq!(
            MeshState::overlay_ip(s.peer(&key(2)).unwrap()),
            Some("100.64.0.9".parse().unwrap())
        );
        assert_eq!(s.peer_by_fqdn("B2.MESH.").unwrap().key, key(2));

        let c = s.apply(&map(4, "100.64.0.1/16", vec![]), &me).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| matches!(c, Change::PeerRemoved(_))));
        assert!(s.peer_count() == 0);
    }

    #[test]
    fn older_serials_are_ignored_and_equal_ones_reapplied() {
        let me = key(1);
        let mut s = MeshState::default();
        s.apply(
            &map(5, "100.64.0.1/16", vec![peer(2, "100.64.0.2", "b")]),
            &me,
        )
        .unwrap();
        let c = s.apply(&map(4, "100.64.0.1/16", vec![]), &me).unwrap();
        assert!(c.is_empty());
        assert_eq!(s.peer_count(), 1);
        let c = s.apply(&map(5, "100.64.0.1/16", vec![]), &me).unwrap();
        assert_eq!(c, vec![Change::PeerRemoved(key(2))]);
    }

    #[test]
    fn address_change_stops_the_update_for_a_rebuild() {
        let me = key(1);
        let mut s = MeshState::default();
        s.apply(&map(1, "100.64.0.1/16", vec![]), &me).unwrap();
        // Even with an older serial, our own address is applied first.
        let c = s
            .apply(
                &map(0, "100.64.0.7/16", vec![peer(2, "100.64.0.2", "b")]),
                &me,
            )
            .unwrap();
        assert!(
            matches!(&c[..], [Change::AddressChanged { new, .. }] if new.to_string() == "100.64.0.7/16")
        );
        assert!(s.peer_count() == 0, "the map is left for the new engine");
    }

    #[test]
    fn config_only_updates_and_relay_rules() {
        let me = key(1);
        let mut s = MeshState::default();
        s.apply(
            &map(1, "100.64.0.1/16", vec![peer(2, "100.64.0.2", "b")]),
            &me,
        )
        .unwrap();
        let with_relay = SyncResponse {
            netbird_config: Some(NetbirdConfig {
                signal: Some(HostConfig {
                    uri: "127.0.0.1:1".into(),
                    protocol: 2,
                }),
                relay: Some(RelayConfig {
                    urls: vec!["rel://127.0.0.1:2".into()],
                    token_payload: "9999999999".into(),
                    token_signature: "c2ln".into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = s.apply(&with_relay, &me).unwrap();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(s.peer_count(), 1, "a config-only update keeps the peers");
        let c = s.apply(&with_relay, &me).unwrap();
        assert!(c.is_empty(), "unchanged config is no change");
        let without_relay = SyncResponse {
            netbird_config: Some(NetbirdConfig::default()),
            ..Default::default()
        };
        assert_eq!(
            s.apply(&without_relay, &me).unwrap(),
            vec![Change::Relay(None)]
        );
        assert!(s.relay.is_none(), "a config without relay disables it");
    }

    #[test]
    fn bad_input_is_rejected_whole() {
        let me = key(1);
        let mut s = MeshState::default();
        let mut bad = peer(2, "100.64.0.2", "b");
        bad.allowed_ips.push("not-a-prefix".into());
        let e = s
            .apply(&map(1, "100.64.0.1/16", vec![bad]), &me)
            .unwrap_err();
        assert!(matches!(e, SyncError::BadAllowedIp { .. }));
        assert!(s.peer_count() == 0);
        let mut bad_key = peer(2, "100.64.0.2", "b");
        bad_key.wg_pub_key = "xyz".into();
        assert!(
            s.apply(&map(1, "100.64.0.1/16", vec![bad_key]), &me)
                .is_err()
        );
        assert!(s.apply(&map(1, "garbage", vec![]), &me).is_err());
    }

    #[test]
    fn entries_whose_bytes_change_but_not_what_we_keep_change_nothing() {
        use crate::control::management::SshConfig;
        let me = key(1);
        let mut s = MeshState::default();
        let peers = vec![peer(2, "100.64.0.2", "b"), peer(3, "100.64.0.3", "c")];
        s.apply(&map(1, "100.64.0.1/16", peers.clone()), &me)
            .unwrap();
        // b's entry gains an SSH key: other bytes, the same peer for us, now and after.
        let mut b = peers[0].clone();
        b.ssh_config = Some(SshConfig {
            ssh_enabled: true,
            ssh_pub_key: b"ssh-ed25519 AAAA".to_vec(),
        });
        for serial in [2, 3] {
            let c = s
                .apply(&map(serial, "100.64.0.1/16", vec![b.clone(), peers[1].clone()]), &me)
                .unwrap();
            assert!(peer_changes(c).is_empty(), "serial {serial}");
        }
        // Back to the first bytes: still nothing; then c leaves.
        s.apply(&map(4, "100.64.0.1/16", peers.clone()), &me).unwrap();
        let c = s
            .apply(&map(5, "100.64.0.1/16", vec![peers[0].clone()]), &me)
            .unwrap();
        assert_eq!(peer_changes(c), vec![Change::PeerRemoved(key(3))]);
        assert_eq!(s.entries.len(), 1, "one fingerprint per peer kept");
    }

    #[test]
    fn malformed_bytes_are_rejected_before_anything_changes() {
        let me = key(1);
        let mut s = MeshState::default();
        s.apply(&map(1, "100.64.0.1/16", vec![peer(2, "100.64.0.2", "b")]), &me)
            .unwrap();
        // A map whose one peer entry is not protobuf inside.
        let bad = [0x2a, 0x06, 0x08, 0x02, 0x1a, 0x02, 0xff, 0xff];
        let e = s
            .apply_encoded(&Bytes::copy_from_slice(&bad), &me)
            .unwrap_err();
        assert!(matches!(e, SyncError::Malformed(ref m) if m.contains("peer entry")), "{e}");
        assert_eq!(s.peer_count(), 1, "b stays");
        // Cut short, and not protobuf at all.
        let whole = {
            use prost::Message as _;
            map(3, "100.64.0.1/16", vec![]).encode_to_vec()
        };
        assert!(matches!(
            s.apply_encoded(&Bytes::copy_from_slice(&whole[..whole.len() - 1]), &me),
            Err(SyncError::Malformed(_))
        ));
        assert!(s.apply_encoded(&Bytes::from_static(&[0xff; 12]), &me).is_err());
        assert_eq!(s.peer_count(), 1);
        assert_eq!(s.serial, 1);
    }

    #[test]
    fn v6_prefixes_need_a_local_v6_address() {
        let me = key(1);
        let mut s = MeshState::default();
        let mut p = peer(2, "100.64.0.2", "b");
        p.allowed_ips.push("fd00::2/128".into());
        s.apply(&map(1, "100.64.0.1/16", vec![p.clone()]), &me)
            .unwrap();
        assert_eq!(s.peer(&key(2)).unwrap().allowed_ips.len(), 1);
        let mut s6 = MeshState {
            has_ipv6: true,
            ..Default::default()
        };
        s6.apply(&map(1, "100.64.0.1/16", vec![p]), &me).unwrap();
        assert_eq!(s6.peer(&key(2)).unwrap().allowed_ips.len(), 2);
    }
}


