//! A Sync message's big parts found in its bytes before anything is decoded (sans-IO).
//!
//! A 5 000-peer account's map is about a megabyte of protobuf: a peer entry, a DNS record and,
//! with NetBird's default policy, two firewall rules per peer. Most updates change one peer.
//! Decoding the whole message and comparing it with the last one cost allocations per peer and
//! milliseconds per update; here the map's big fields are located as byte ranges and
//! fingerprinted with XXH3, so the mesh state decodes only the parts, and the peer entries,
//! whose bytes changed.
//!
//! Only the wire format is read here: tags and lengths. Malformed input is an error, never a
//! panic. Unknown fields stay in the light message, for prost to skip as it always did.

use std::collections::HashMap;

use bytes::Bytes;
use xxhash_rust::xxh3::Xxh3;

/// A map keyed by fingerprints, which are hashes already: used as they are.
pub type ByPrint<V> = HashMap<u64, V, std::hash::BuildHasherDefault<PrintHasher>>;

/// The identity hasher for `ByPrint`.
#[derive(Default)]
pub struct PrintHasher(u64);

impl std::hash::Hasher for PrintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here (write_u64); anything else is folded in, not lost.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `SyncResponse.NetworkMap`.
const SYNC_NETWORK_MAP: u64 = 5;
/// The big fields of `NetworkMap` (proto/management.proto).
const MAP_REMOTE_PEERS: u64 = 3;
const MAP_ROUTES: u64 = 5;
const MAP_DNS_CONFIG: u64 = 6;
const MAP_OFFLINE_PEERS: u64 = 7;
const MAP_FIREWALL_RULES: u64 = 8;
const MAP_ROUTES_FIREWALL_RULES: u64 = 10;
const MAP_FORWARDING_RULES: u64 = 12;

/// A Sync message split: the small rest, and each big field's occurrences as sent.
#[derive(Debug, Default)]
pub struct Sections<'a> {
    /// The message without the map's big fields, to be decoded whole (it is small). A map
    /// that was present stays present, if empty.
    pub light: Vec<u8>,
    /// `NetworkMap.remotePeers`, one entry per peer, in order.
    pub peers: Vec<&'a [u8]>,
    /// `NetworkMap.Routes`.
    pub routes: Vec<&'a [u8]>,
    /// `NetworkMap.DNSConfig`: a single message, merged from its occurrences in order.
    pub dns: Vec<&'a [u8]>,
    /// `NetworkMap.FirewallRules`.
    pub firewall: Vec<&'a [u8]>,
    /// `NetworkMap.routesFirewallRules`.
    pub route_rules: Vec<&'a [u8]>,
    /// `NetworkMap.forwardingRules`.
    pub forwarding: Vec<&'a [u8]>,
}

/// Why a message could not be split.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SectionsError {
    #[error("malformed protobuf: a varint runs past the end or over 10 bytes")]
    Varint,
    #[error("malformed protobuf: a field runs past the end of its message")]
    Truncated,
    #[error("malformed protobuf: wire type {0} is not used by proto3")]
    WireType(u8),
    #[error("malformed protobuf: field number 0")]
    FieldZero,
}

/// One field as sent.
pub struct Field<'a> {
    pub number: u64,
    /// Tag and value, as sent.
    pub whole: &'a [u8],
    /// A length-delimited field's payload (empty for other wire types).
    pub payload: &'a [u8],
    pub delimited: bool,
    /// A varint field's value (0 for other wire types).
    pub value: u64,
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, SectionsError> {
    let mut value = 0u64;
    for shift in 0..10 {
        let byte = *buf.get(*at).ok_or(SectionsError::Varint)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(SectionsError::Varint)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The fields of one message, in order; after an error, nothing more.
pub fn fields(buf: &[u8]) -> impl Iterator<Item = Result<Field<'_>, SectionsError>> {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= buf.len() {
            return None;
        }
        let field = next_field(buf, &mut at);
        failed = field.is_err();
        Some(field)
    })
}

fn next_field<'a>(buf: &'a [u8], at: &mut usize) -> Result<Field<'a>, SectionsError> {
    let start = *at;
    let key = varint(buf, at)?;
    let number = key >> 3;
    if number == 0 {
        return Err(SectionsError::FieldZero);
    }
    let take = |at: &mut usize, n: usize| -> Result<&'a [u8], SectionsError> {
        let end = at.checked_add(n).ok_or(SectionsError::Truncated)?;
        let bytes = buf.get(*at..end).ok_or(SectionsError::Truncated)?;
        *at = end;
        Ok(bytes)
    };
    let mut value = 0;
    let (payload, delimited) = match key & 7 {
        0 => {
            value = varint(buf, at)?;
            (&buf[..0], false)
        }
        1 => (take(at, 8).map(|_| &buf[..0])?, false),
        2 => {
            let len = usize::try_from(varint(buf, at)?).map_err(|_| SectionsError::Truncated)?;
            (take(at, len)?, true)
        }
        5 => (take(at, 4).map(|_| &buf[..0])?, false),
        other => return Err(SectionsError::WireType(other as u8)),
    };
    Ok(Field {
        number,
        whole: &buf[start..*at],
        payload,
        delimited,
        value,
    })
}

/// Split a `SyncResponse` as sent.
pub fn split(msg: &[u8]) -> Result<Sections<'_>, SectionsError> {
    let mut out = Sections {
        light: Vec::with_capacity(256),
        ..Sections::default()
    };
    let mut map_light = Vec::new();
    for field in fields(msg) {
        let field = field?;
        if field.number != SYNC_NETWORK_MAP || !field.delimited {
            out.light.extend_from_slice(field.whole);
            continue;
        }
        map_light.clear();
        for f in fields(field.payload) {
            let f = f?;
            let list = match f.number {
                _ if !f.delimited => None,
                MAP_REMOTE_PEERS => Some(&mut out.peers),
                MAP_ROUTES => Some(&mut out.routes),
                MAP_DNS_CONFIG => Some(&mut out.dns),
                MAP_FIREWALL_RULES => Some(&mut out.firewall),
                MAP_ROUTES_FIREWALL_RULES => Some(&mut out.route_rules),
                MAP_FORWARDING_RULES => Some(&mut out.forwarding),
                // Offline peers are not ours to connect to, and nothing here shows them.
                MAP_OFFLINE_PEERS => continue,
                _ => None,
            };
            match list {
                Some(list) => list.push(f.payload),
                None => map_light.extend_from_slice(f.whole),
            }
        }
        put_varint(&mut out.light, (SYNC_NETWORK_MAP << 3) | 2);
        put_varint(&mut out.light, map_light.len() as u64);
        out.light.extend_from_slice(&map_light);
    }
    Ok(out)
}

/// Split one message: the length-delimited fields numbered in `fields` go to `on_cut` (field
/// number, payload) in order, every other field is copied to `light` as sent.
pub fn cut<'a>(
    msg: &'a [u8],
    fields_cut: &[u64],
    light: &mut Vec<u8>,
    mut on_cut: impl FnMut(u64, &'a [u8]),
) -> Result<(), SectionsError> {
    for f in fields(msg) {
        let f = f?;
        if f.delimited && fields_cut.contains(&f.number) {
            on_cut(f.number, f.payload);
        } else {
            light.extend_from_slice(f.whole);
        }
    }
    Ok(())
}

/// The fingerprint of a part: its entries as sent, each with its length (so entries cannot
/// run into each other). Two different parts hashing alike (odds 2^-64 per update) would leave
/// that part as it was until its next change.
pub fn print(entries: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    for e in entries {
        h.update(&(e.len() as u64).to_le_bytes());
        h.update(e);
    }
    h.digest()
}

/// The fingerprint of one entry.
pub fn print_one(entry: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(entry)
}

/// Each entry of a repeated field, decoded. `whole` holds the entries: decoding from it (not
/// from a plain slice) lets prost take strings and bytes without a temporary copy each.
pub fn decode_each<M: prost::Message + Default>(
    whole: &Bytes,
    entries: &[&[u8]],
) -> Result<Vec<M>, prost::DecodeError> {
    entries.iter().map(|e| M::decode(whole.slice_ref(e))).collect()
}

/// A singular message field sent in several occurrences: merged in order, as protobuf does.
pub fn decode_merged<M: prost::Message + Default>(
    whole: &Bytes,
    entries: &[&[u8]],
) -> Result<Option<M>, prost::DecodeError> {
    let Some((first, rest)) = entries.split_first() else {
        return Ok(None);
    };
    let mut m = M::decode(whole.slice_ref(first))?;
    for e in rest {
        m.merge(whole.slice_ref(e))?;
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::management::{
        DnsConfig, FirewallRule, NetworkMap, PeerConfig, RemotePeerConfig, Route, SyncResponse,
    };
    use prost::Message;

    fn sample() -> SyncResponse {
        let peer = |n: u8| RemotePeerConfig {
            wg_pub_key: format!("key-{n}"),
            allowed_ips: vec![format!("100.64.0.{n}/32")],
            fqdn: format!("p{n}.mesh.test"),
            ..Default::default()
        };
        SyncResponse {
            peer_config: Some(PeerConfig {
                address: "100.64.0.1/16".into(),
                ..Default::default()
            }),
            network_map: Some(NetworkMap {
                serial: 7,
                remote_peers: (2..200).map(peer).collect(),
                offline_peers: vec![peer(250)],
                routes: vec![Route {
                    id: "r1".into(),
                    network: "198.19.1.0/24".into(),
                    ..Default::default()
                }],
                dns_config: Some(DnsConfig {
                    service_enable: true,
                    forwarder_port: 22054,
                    ..Default::default()
                }),
                firewall_rules: vec![FirewallRule {
                    peer_ip: "100.64.0.2".into(),
                    ..Default::default()
                }],
                firewall_rules_is_empty: false,
                routes_firewall_rules_is_empty: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_light_part_and_the_sections_decode_to_the_message() {
        let resp = sample();
        let bytes = Bytes::from(resp.encode_to_vec());
        let s = split(&bytes).unwrap();
        let light = SyncResponse::decode(s.light.as_slice()).unwrap();
        assert_eq!(light.peer_config, resp.peer_config);
        let map = light.network_map.expect("the map stays present");
        let want = resp.network_map.unwrap();
        assert_eq!(map.serial, 7);
        assert!(map.remote_peers.is_empty() && map.offline_peers.is_empty());
        assert!(map.routes_firewall_rules_is_empty);
        assert_eq!(
            decode_each::<RemotePeerConfig>(&bytes, &s.peers).unwrap(),
            want.remote_peers
        );
        assert_eq!(decode_each::<Route>(&bytes, &s.routes).unwrap(), want.routes);
        assert_eq!(decode_each::<FirewallRule>(&bytes, &s.firewall).unwrap(), want.firewall_rules);
        assert_eq!(decode_merged::<DnsConfig>(&bytes, &s.dns).unwrap(), want.dns_config);
        assert!(s.route_rules.is_empty() && s.forwarding.is_empty());
        assert!(s.light.len() < 64, "{} bytes", s.light.len());
    }

    #[test]
    fn a_map_sent_in_two_pieces_merges_as_protobuf_does() {
        let a = SyncResponse {
            network_map: Some(NetworkMap {
                serial: 1,
                dns_config: Some(DnsConfig {
                    service_enable: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = SyncResponse {
            network_map: Some(NetworkMap {
                serial: 2,
                dns_config: Some(DnsConfig {
                    forwarder_port: 5353,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        let bytes = Bytes::from(bytes);
        let s = split(&bytes).unwrap();
        let whole = SyncResponse::decode(bytes.clone()).unwrap();
        let light = SyncResponse::decode(s.light.as_slice()).unwrap();
        assert_eq!(light.network_map.unwrap().serial, 2);
        assert_eq!(
            decode_merged::<DnsConfig>(&bytes, &s.dns).unwrap(),
            whole.network_map.unwrap().dns_config
        );
    }

    #[test]
    fn prints_follow_the_bytes_and_their_boundaries() {
        assert_eq!(print(&[b"ab", b"c"]), print(&[b"ab", b"c"]));
        assert_ne!(print(&[b"ab", b"c"]), print(&[b"a", b"bc"]));
        assert_ne!(print(&[]), print(&[b""]));
        assert_ne!(print_one(b"x"), print_one(b"y"));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let bytes = sample().encode_to_vec();
        // Cut anywhere inside the map: its length now runs past the end.
        assert_eq!(
            split(&bytes[..bytes.len() - 3]).unwrap_err(),
            SectionsError::Truncated
        );
        assert_eq!(split(&[0x80]).unwrap_err(), SectionsError::Varint);
        assert_eq!(split(&[0x0b]).unwrap_err(), SectionsError::WireType(3));
        assert_eq!(split(&[0x02, 0x00]).unwrap_err(), SectionsError::FieldZero);
        assert_eq!(split(&[0xff; 11]).unwrap_err(), SectionsError::Varint);
        // A map whose inside is broken.
        assert_eq!(split(&[0x2a, 0x02, 0x1a, 0x05]).unwrap_err(), SectionsError::Truncated);
        // Unknown fields pass through untouched, for prost to skip.
        let s = split(&[0xf8, 0x07, 0x01]).unwrap();
        assert_eq!(s.light, [0xf8, 0x07, 0x01]);
    }
}
