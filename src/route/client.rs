//! The client side of NetBird's routes, whole (networks.md §1): the map's routes grouped into
//! HA groups (NetID + target), groups this peer routes itself left out, the user's selection
//! applied, and one routing peer elected per selected group. The outcome is which prefixes each
//! peer carries (for WireGuard's AllowedIPs) and a status line per group.
//!
//! A group is elected again when the map changes or when one of its peers' connection state
//! changes (connected, relayed, gone); latency alone does not move a route, as upstream.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;

use super::election::{PeerState, elect};
use super::model::{Route, Target};
use super::selection::{Candidate, Selection};

/// One HA group as status shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStatus {
    pub net_id: String,
    pub target: Target,
    pub exit_node: bool,
    pub selected: bool,
    /// Routing peers (key strings) of the group, in map order.
    pub peers: Vec<String>,
    /// The elected routing peer, if any.
    pub elected: Option<String>,
}

/// What the routes want now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Prefixes per routing peer (key string).
    pub prefixes: BTreeMap<String, Vec<IpNet>>,
    /// DNS routes' domains per routing peer, for the resolver.
    pub domains: BTreeMap<String, Vec<String>>,
    pub groups: Vec<GroupStatus>,
}

/// The client's route state between updates.
#[derive(Debug, Default)]
pub struct ClientRoutes {
    own_key: String,
    selection: Selection,
    routes: Vec<Route>,
    /// Elected route ID per HA key (for hysteresis).
    current: HashMap<String, String>,
    /// The members' connection states at the last election, per HA key.
    seen: HashMap<String, Vec<Kind>>,
}

/// The part of a peer's state that triggers a new election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unreachable,
    Idle,
    Connected { relayed: bool },
}

impl From<PeerState> for Kind {
    fn from(s: PeerState) -> Self {
        match s {
            PeerState::Unreachable => Kind::Unreachable,
            PeerState::Idle { .. } => Kind::Idle,
            PeerState::Connected { relayed, .. } => Kind::Connected { relayed },
        }
    }
}

impl ClientRoutes {
    pub fn new(own_key: String, selection: Selection) -> Self {
        Self {
            own_key,
            selection,
            ..Self::default()
        }
    }

    /// The map's routes changed (elections of changed groups start afresh).
    pub fn set_routes(&mut self, routes: Vec<Route>) {
        self.routes = routes;
        self.seen.clear();
    }

    /// Routes this peer serves itself (it is their routing peer).
    pub fn server_routes(&self) -> Vec<&Route> {
        self.routes
            .iter()
            .filter(|r| r.peer == self.own_key)
            .collect()
    }

    /// Elect and report, asking `state` for each routing peer's state (by key string).
    /// Returns None when nothing changed since the last call.
    pub fn update(&mut self, state: impl Fn(&str) -> PeerState) -> Option<Outcome> {
        let mut groups: BTreeMap<String, Vec<&Route>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for r in &self.routes {
            let key = r.ha_key();
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(r);
        }
        // A group we route ourselves is not a client route here.
        order.retain(|k| groups[k].iter().all(|r| r.peer != self.own_key));

        let candidates: Vec<Candidate> = order
            .iter()
            .map(|k| {
                let first = groups[k][0];
                Candidate {
                    net_id: &first.net_id,
                    exit: first.is_exit_node(),
                    skip_auto_apply: first.skip_auto_apply,
                }
            })
            .collect();
        let on = self.selection.apply(&candidates);

        let mut changed = self.seen.len() != order.len();
        let mut out = Outcome::default();
        for (key, selected) in order.iter().zip(on) {
            let members = &groups[key];
            let states: Vec<PeerState> = members.iter().map(|r| state(&r.peer)).collect();
            let kinds: Vec<Kind> = states.iter().map(|&s| s.into()).collect();
            let elected = if !selected {
                self.current.remove(key);
                None
            } else if self.seen.get(key) == Some(&kinds) && self.current.contains_key(key) {
                // Nothing that moves a route changed: keep the elected peer.
                members
                    .iter()
                    .position(|r| Some(&r.id) == self.current.get(key))
            } else {
                changed = true;
                let pairs: Vec<(&Route, PeerState)> = members
                    .iter()
                    .copied()
                    .zip(states.iter().copied())
                    .collect();
                let pick = elect(&pairs, self.current.get(key).map(String::as_str));
                match pick {
                    Some(i) => {
                        if self.current.get(key) != Some(&members[i].id) {
                            changed = true;
                        }
                        self.current.insert(key.clone(), members[i].id.clone());
                    }
                    None => {
                        self.current.remove(key);
                    }
                }
                pick
            };
            if self.seen.get(key) != Some(&kinds) {
                changed = true;
                self.seen.insert(key.clone(), kinds);
            }
            let first = members[0];
            if let Some(i) = elected {
                let peer = &members[i].peer;
                match &first.target {
                    Target::Network(net) => {
                        // The same prefix from another group stays with the first one.
                        let taken = out.prefixes.values().any(|v| v.contains(net));
                        if !taken {
                            out.prefixes.entry(peer.clone()).or_default().push(*net);
                        }
                    }
                    Target::Domains(d) => out
                        .domains
                        .entry(peer.clone())
                        .or_default()
                        .extend(d.iter().cloned()),
                }
            }
            out.groups.push(GroupStatus {
                net_id: first.net_id.clone(),
                target: first.target.clone(),
                exit_node: first.is_exit_node(),
                selected,
                peers: members.iter().map(|r| r.peer.clone()).collect(),
                elected: elected.map(|i| members[i].peer.clone()),
            });
        }
        self.seen.retain(|k, _| order.contains(k));
        changed.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(id: &str, net_id: &str, net: &str, peer: &str, metric: u16) -> Route {
        Route {
            id: id.into(),
            target: Target::Network(net.parse().unwrap()),
            peer: peer.into(),
            metric,
            masquerade: true,
            net_id: net_id.into(),
            keep_route: false,
            skip_auto_apply: false,
        }
    }

    fn connected() -> PeerState {
        PeerState::Connected {
            relayed: true,
            latency: Some(Duration::from_millis(5)),
        }
    }

    #[test]
    fn the_elected_peer_carries_the_prefix_and_failover_moves_it() {
        let mut rc = ClientRoutes::new("me".into(), Selection::default());
        rc.set_routes(vec![
            route("r:a", "lan", "198.19.1.0/24", "A", 100),
            route("r:b", "lan", "198.19.1.0/24", "B", 100),
        ]);
        let lan: IpNet = "198.19.1.0/24".parse().unwrap();
        let out = rc.update(|_| connected()).unwrap();
        assert_eq!(out.prefixes, BTreeMap::from([("A".to_string(), vec![lan])]));
        assert!(rc.update(|_| connected()).is_none(), "nothing changed");
        // A's peer is gone: B takes the prefix.
        let out = rc
            .update(|p| {
                if p == "A" {
                    PeerState::Unreachable
                } else {
                    connected()
                }
            })
            .unwrap();
        assert_eq!(out.prefixes, BTreeMap::from([("B".to_string(), vec![lan])]));
        assert_eq!(out.groups[0].elected.as_deref(), Some("B"));
        // A is back: B stays (same score, hysteresis); a direct A beats a relayed B.
        assert!(
            rc.update(|_| connected())
                .unwrap()
                .prefixes
                .contains_key("B")
        );
        let out = rc
            .update(|p| {
                if p == "A" {
                    PeerState::Connected {
                        relayed: false,
                        latency: Some(Duration::from_millis(5)),
                    }
                } else {
                    connected()
                }
            })
            .unwrap();
        assert!(out.prefixes.contains_key("A"));
    }

    #[test]
    fn own_groups_deselected_groups_and_duplicate_prefixes() {
        let mut rc = ClientRoutes::new(
            "me".into(),
            Selection::from_flags(&[], &["k8s".to_string()]),
        );
        rc.set_routes(vec![
            route("1", "lan", "198.19.1.0/24", "A", 100),
            route("2", "lan", "198.19.1.0/24", "me", 100),
            route("3", "k8s", "10.96.0.0/12", "B", 100),
            route("4", "db", "198.19.2.0/24", "A", 100),
            route("5", "db2", "198.19.2.0/24", "B", 100),
        ]);
        let out = rc.update(|_| connected()).unwrap();
        assert_eq!(rc.server_routes().len(), 1);
        assert_eq!(out.groups.len(), 3, "the group we serve is left out");
        assert!(!out.groups[0].selected);
        assert_eq!(
            out.prefixes,
            BTreeMap::from([("A".to_string(), vec!["198.19.2.0/24".parse().unwrap()])]),
            "the same prefix from a second group stays with the first"
        );
    }
}
