//! Cryptokey routing: which peer owns an IP address, by longest AllowedIPs prefix.
//!
//! Outbound packets are sent to the peer whose AllowedIPs contain the destination; inbound packets
//! are accepted only when their source lies in the AllowedIPs of the peer that decrypted them.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// A longest-prefix-match table from prefixes to peer indices.
///
/// One hash map per prefix length in use, longest first: a lookup costs one hash probe per
/// distinct length (a NetBird map has a handful: /32 per peer, a few routes), not one step
/// per entry, so a map of thousands of peers routes each packet as fast as one of ten.
/// Inserting and removing a prefix are O(1); removing a peer is O(its prefixes).
#[derive(Clone, Debug, Default)]
pub struct AllowedIps {
    v4: Vec<Level<u32>>,
    v6: Vec<Level<u128>>,
    /// Each peer's prefixes, for `remove_peer` and `prefixes_of`.
    by_peer: HashMap<usize, Vec<IpNet>>,
}

/// The prefixes of one length: masked network bits → peer.
#[derive(Clone, Debug)]
struct Level<K> {
    len: u8,
    nets: HashMap<K, usize>,
}

fn mask4(addr: std::net::Ipv4Addr, len: u8) -> u32 {
    let bits = u32::from(addr);
    if len == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(len))) }
}

fn mask6(addr: std::net::Ipv6Addr, len: u8) -> u128 {
    let bits = u128::from(addr);
    if len == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(len))) }
}

/// The level for `len` in `levels` (kept longest first), made if missing.
fn level<K>(levels: &mut Vec<Level<K>>, len: u8) -> &mut HashMap<K, usize> {
    let pos = levels.partition_point(|l| l.len > len);
    if levels.get(pos).is_none_or(|l| l.len != len) {
        levels.insert(
            pos,
            Level {
                len,
                nets: HashMap::new(),
            },
        );
    }
    &mut levels[pos].nets
}

impl AllowedIps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Route `net` to `peer`. A later insert of the same prefix replaces the earlier one, as
    /// WireGuard does when two peers claim the same prefix.
    pub fn insert(&mut self, net: IpNet, peer: usize) {
        let net = net.trunc();
        let previous = match net {
            IpNet::V4(n) => level(&mut self.v4, n.prefix_len())
                .insert(mask4(n.addr(), n.prefix_len()), peer),
            IpNet::V6(n) => level(&mut self.v6, n.prefix_len())
                .insert(mask6(n.addr(), n.prefix_len()), peer),
        };
        if let Some(old) = previous {
            self.forget(old, net);
        }
        self.by_peer.entry(peer).or_default().push(net);
    }

    /// The peer owning `ip`, if any.
    pub fn lookup(&self, ip: IpAddr) -> Option<usize> {
        match ip {
            IpAddr::V4(a) => self
                .v4
                .iter()
                .find_map(|l| l.nets.get(&mask4(a, l.len)).copied()),
            IpAddr::V6(a) => self
                .v6
                .iter()
                .find_map(|l| l.nets.get(&mask6(a, l.len)).copied()),
        }
    }

    /// The owner of exactly this prefix.
    fn owner(&self, net: IpNet) -> Option<usize> {
        let net = net.trunc();
        match net {
            IpNet::V4(n) => self
                .v4
                .iter()
                .find(|l| l.len == n.prefix_len())
                .and_then(|l| l.nets.get(&mask4(n.addr(), n.prefix_len())).copied()),
            IpNet::V6(n) => self
                .v6
                .iter()
                .find(|l| l.len == n.prefix_len())
                .and_then(|l| l.nets.get(&mask6(n.addr(), n.prefix_len())).copied()),
        }
    }

    /// Whether exactly this prefix is routed (to anyone).
    pub fn has_exact(&self, net: IpNet) -> bool {
        self.owner(net).is_some()
    }

    /// Drop `net` if it is routed to `peer`.
    pub fn remove(&mut self, net: IpNet, peer: usize) {
        let net = net.trunc();
        if self.owner(net) != Some(peer) {
            return;
        }
        match net {
            IpNet::V4(n) => {
                level(&mut self.v4, n.prefix_len()).remove(&mask4(n.addr(), n.prefix_len()));
            }
            IpNet::V6(n) => {
                level(&mut self.v6, n.prefix_len()).remove(&mask6(n.addr(), n.prefix_len()));
            }
        }
        self.forget(peer, net);
        self.v4.retain(|l| !l.nets.is_empty());
        self.v6.retain(|l| !l.nets.is_empty());
    }

    /// Drop every prefix routed to `peer`.
    pub fn remove_peer(&mut self, peer: usize) {
        for net in self.by_peer.remove(&peer).unwrap_or_default() {
            match net {
                IpNet::V4(n) => {
                    level(&mut self.v4, n.prefix_len()).remove(&mask4(n.addr(), n.prefix_len()));
                }
                IpNet::V6(n) => {
                    level(&mut self.v6, n.prefix_len()).remove(&mask6(n.addr(), n.prefix_len()));
                }
            }
        }
        self.v4.retain(|l| !l.nets.is_empty());
        self.v6.retain(|l| !l.nets.is_empty());
    }

    /// Every prefix routed to `peer`.
    pub fn prefixes_of(&self, peer: usize) -> impl Iterator<Item = &IpNet> {
        self.by_peer.get(&peer).into_iter().flatten()
    }

    /// Take `net` off `peer`'s list (its owner changed or it was removed).
    fn forget(&mut self, peer: usize, net: IpNet) {
        if let Some(list) = self.by_peer.get_mut(&peer) {
            list.retain(|n| *n != net);
            if list.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_regardless_of_insert_order() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.7/32"), 2);
        t.insert(net("fd00::/8"), 3);
        assert_eq!(t.lookup(ip("100.64.0.7")), Some(2));
        assert_eq!(t.lookup(ip("100.64.0.8")), Some(1));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(0));
        assert_eq!(t.lookup(ip("fd00::1")), Some(3));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
    }

    #[test]
    fn same_prefix_moves_to_the_last_peer_and_host_bits_are_ignored() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.1/24"), 0);
        t.insert(net("10.0.0.0/24"), 1);
        assert_eq!(t.lookup(ip("10.0.0.200")), Some(1));
        assert_eq!(t.prefixes_of(0).count(), 0);
        assert_eq!(t.prefixes_of(1).next(), Some(&net("10.0.0.0/24")));
    }

    #[test]
    fn removals_leave_the_rest_and_a_moved_prefix_stays_with_its_new_owner() {
        let mut t = AllowedIps::new();
        t.insert(net("100.64.0.2/32"), 1);
        t.insert(net("10.1.0.0/16"), 1);
        t.insert(net("100.64.0.3/32"), 2);
        t.insert(net("10.1.0.0/16"), 2);
        // Removing a prefix for its old owner does nothing.
        t.remove(net("10.1.0.0/16"), 1);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(2));
        t.remove_peer(2);
        assert_eq!(t.lookup(ip("10.1.2.3")), None);
        assert_eq!(t.lookup(ip("100.64.0.3")), None);
        assert_eq!(t.lookup(ip("100.64.0.2")), Some(1));
        assert_eq!(t.prefixes_of(1).collect::<Vec<_>>(), vec![&net("100.64.0.2/32")]);
        assert!(t.has_exact(net("100.64.0.2/32")) && !t.has_exact(net("100.64.0.0/16")));
        t.remove(net("100.64.0.2/32"), 1);
        assert_eq!(t.lookup(ip("100.64.0.2")), None);
        assert!(t.v4.is_empty() && t.by_peer.is_empty());
    }

    /// The table against a plain list scanned for the longest match, over random prefixes,
    /// owners and addresses (inserts, moves and removals mixed).
    #[test]
    fn agrees_with_a_linear_scan_on_random_operations() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut t = AllowedIps::new();
        let mut list: Vec<(IpNet, usize)> = Vec::new();
        for _ in 0..4000 {
            let r = next();
            let len = [0u8, 8, 16, 24, 30, 32][(r % 6) as usize];
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (next() as u32 & 0x00ff_ffff));
            let n = IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap()).trunc();
            let peer = (next() % 8) as usize;
            if r % 5 == 0 {
                t.remove(n, peer);
                list.retain(|&(m, p)| !(m == n && p == peer));
            } else if r % 97 == 0 {
                t.remove_peer(peer);
                list.retain(|&(_, p)| p != peer);
            } else {
                t.insert(n, peer);
                list.retain(|&(m, _)| m != n);
                list.push((n, peer));
            }
            let probe = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | (next() as u32 & 0x00ff_ffff)));
            let want = list
                .iter()
                .filter(|(m, _)| m.contains(&probe))
                .max_by_key(|(m, _)| m.prefix_len())
                .map(|&(_, p)| p);
            assert_eq!(t.lookup(probe), want, "{probe}");
        }
    }
}
