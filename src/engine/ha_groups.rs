//! Which peers serve the same route (an HA group), for lazy connections.
//!
//! With lazy connections a standby routing peer would otherwise stay idle until the active
//! one failed, and a failover would wait for the standby's whole set-up on top of the route
//! election. So, as NetBird's lazy manager does, waking one member of a group wakes the
//! others, and a member is not idled while another member of one of its groups carries data.

use std::collections::HashMap;

use crate::route::Route;

/// The map's HA groups: routes with the same HA key served by more than one peer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HaGroups {
    /// For each peer in a group, the other peers of all its groups (key strings), each once,
    /// sorted: worked out once per route change, not on every wake.
    mates: HashMap<String, Vec<String>>,
}

impl HaGroups {
    /// The groups of `routes`. A route served by one peer is no group.
    pub fn from_routes(routes: &[Route]) -> Self {
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for r in routes {
            let peers = by_key.entry(r.ha_key()).or_default();
            if !peers.contains(&r.peer) {
                peers.push(r.peer.clone());
            }
        }
        let mut mates: HashMap<String, Vec<String>> = HashMap::new();
        for g in by_key.values().filter(|p| p.len() > 1) {
            for p in g {
                let list = mates.entry(p.clone()).or_default();
                list.extend(g.iter().filter(|m| *m != p).cloned());
            }
        }
        for list in mates.values_mut() {
            list.sort();
            list.dedup();
        }
        Self { mates }
    }

    /// The other peers sharing a group with `key` (each once).
    pub fn mates<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.mates.get(key).into_iter().flatten()
    }

    /// Every peer in a group.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        self.mates.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.mates.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Target;

    fn route(net_id: &str, net: &str, peer: &str) -> Route {
        Route {
            id: format!("{net_id}-{peer}"),
            target: Target::Network(net.parse().unwrap()),
            peer: peer.into(),
            metric: 100,
            masquerade: true,
            net_id: net_id.into(),
            keep_route: false,
            skip_auto_apply: false,
        }
    }

    #[test]
    fn peers_serving_one_route_are_mates_and_single_routers_are_not() {
        let g = HaGroups::from_routes(&[
            route("lan", "198.19.1.0/24", "a"),
            route("lan", "198.19.1.0/24", "b"),
            route("lan", "198.19.1.0/24", "b"),
            route("other", "198.19.2.0/24", "c"),
            route("exit", "0.0.0.0/0", "b"),
            route("exit", "0.0.0.0/0", "d"),
        ]);
        let mut b: Vec<&String> = g.mates("b").collect();
        b.sort();
        assert_eq!(b, ["a", "d"]);
        assert_eq!(g.mates("a").collect::<Vec<_>>(), ["b"]);
        assert_eq!(g.mates("c").count(), 0, "a route with one peer is no group");
        assert_eq!(g.mates("nobody").count(), 0);
        let mut members: Vec<&String> = g.members().collect();
        members.sort();
        assert_eq!(members, ["a", "b", "d"]);
        // The same net under another NetID is another route.
        let g = HaGroups::from_routes(&[
            route("x", "198.19.1.0/24", "a"),
            route("y", "198.19.1.0/24", "b"),
        ]);
        assert!(g.is_empty());
    }

    #[test]
    fn a_peer_in_two_groups_with_the_same_mate_sees_it_once() {
        let g = HaGroups::from_routes(&[
            route("lan", "198.19.1.0/24", "a"),
            route("lan", "198.19.1.0/24", "b"),
            route("lan2", "198.19.2.0/24", "a"),
            route("lan2", "198.19.2.0/24", "b"),
        ]);
        assert_eq!(g.mates("a").collect::<Vec<_>>(), ["b"]);
    }
}
