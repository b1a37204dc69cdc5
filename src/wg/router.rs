//! Cryptokey routing: which peer owns an IP address, by longest AllowedIPs prefix.
//!
//! Outbound packets are sent to the peer whose AllowedIPs contain the destination; inbound packets
//! are accepted only when their source lies in the AllowedIPs of the peer that decrypted them.

use std::net::IpAddr;

use ipnet::IpNet;

/// A longest-prefix-match table from prefixes to peer indices.
///
/// Entries are kept sorted by prefix length, longest first, so the first hit is the answer. The
/// linear scan is right for the tens of prefixes a static config holds; a trie can replace it
/// behind the same API when network maps grow.
#[derive(Clone, Debug, Default)]
pub struct AllowedIps {
    entries: Vec<(IpNet, usize)>,
}

impl AllowedIps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Route `net` to `peer`. A later insert of the same prefix replaces the earlier one, as
    /// WireGuard does when two peers claim the same prefix.
    pub fn insert(&mut self, net: IpNet, peer: usize) {
        let net = net.trunc();
        self.entries.retain(|(n, _)| *n != net);
        let pos = self
            .entries
            .partition_point(|(n, _)| n.prefix_len() >= net.prefix_len());
        self.entries.insert(pos, (net, peer));
    }

    /// The peer owning `ip`, if any.
    pub fn lookup(&self, ip: IpAddr) -> Option<usize> {
        self.entries
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|&(_, peer)| peer)
    }

    /// Whether exactly this prefix is routed (to anyone).
    pub fn has_exact(&self, net: IpNet) -> bool {
        let net = net.trunc();
        self.entries.iter().any(|(n, _)| *n == net)
    }

    /// Drop `net` if it is routed to `peer`.
    pub fn remove(&mut self, net: IpNet, peer: usize) {
        let net = net.trunc();
        self.entries.retain(|&(n, p)| !(n == net && p == peer));
    }

    /// Drop every prefix routed to `peer`.
    pub fn remove_peer(&mut self, peer: usize) {
        self.entries.retain(|(_, p)| *p != peer);
    }

    /// Every prefix routed to `peer`.
    pub fn prefixes_of(&self, peer: usize) -> impl Iterator<Item = &IpNet> {
        self.entries
            .iter()
            .filter(move |(_, p)| *p == peer)
            .map(|(n, _)| n)
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
}
