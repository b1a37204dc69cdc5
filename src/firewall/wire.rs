//! A `FirewallRule` read in place from the bytes management sent, as smoltcp's `wire/` reads
//! packets: NetBird's default policy sends two rules per peer, so every change to a 5 000-peer
//! account's policy brings 10 000 of them; read in place, no string is copied and nothing is
//! allocated per rule. It reads what prost would decode, and refuses what prost would refuse
//! (a known field of the wrong wire type, a string that is not UTF-8).

use crate::control::management;
use crate::control::sections::fields;

/// What the peer filter reads of a rule, whether decoded or read in place.
pub trait RuleFields {
    fn peer_ip(&self) -> &str;
    fn direction(&self) -> i32;
    fn action(&self) -> i32;
    fn protocol(&self) -> i32;
    fn port(&self) -> &str;
    fn port_info(&self) -> Option<&management::PortInfo>;
    /// The first of `sourcePrefixes`, NetBird's compact encoding of the source.
    fn first_source_prefix(&self) -> Option<&[u8]>;
}

impl RuleFields for management::FirewallRule {
    fn peer_ip(&self) -> &str {
        &self.peer_ip
    }
    fn direction(&self) -> i32 {
        self.direction
    }
    fn action(&self) -> i32 {
        self.action
    }
    fn protocol(&self) -> i32 {
        self.protocol
    }
    fn port(&self) -> &str {
        &self.port
    }
    fn port_info(&self) -> Option<&management::PortInfo> {
        self.port_info.as_ref()
    }
    fn first_source_prefix(&self) -> Option<&[u8]> {
        self.source_prefixes.first().map(Vec::as_slice)
    }
}

/// A `FirewallRule` (proto/management.proto) over its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleView<'a> {
    peer_ip: &'a str,
    direction: i32,
    action: i32,
    protocol: i32,
    port: &'a str,
    /// Rare (a port range): decoded, it holds no heap data.
    port_info: Option<management::PortInfo>,
    first_source_prefix: Option<&'a [u8]>,
}

impl<'a> RuleView<'a> {
    /// Read a rule; the error says what is malformed.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let mut v = RuleView::default();
        for f in fields(bytes) {
            let f = f.map_err(|e| e.to_string())?;
            let want_delimited = match f.number {
                1 | 5 | 6 | 7 | 9 => true,
                2 | 3 | 4 | 8 => false,
                _ => continue, // unknown: skipped, as prost does
            };
            if f.delimited != want_delimited {
                return Err(format!("firewall rule field {}: wrong wire type", f.number));
            }
            let text = |b: &'a [u8]| {
                std::str::from_utf8(b)
                    .map_err(|_| format!("firewall rule field {}: not UTF-8", f.number))
            };
            // Scalars: the last one sent counts, as in protobuf; enums are int32.
            match f.number {
                1 => v.peer_ip = text(f.payload)?,
                2 => v.direction = f.value as i32,
                3 => v.action = f.value as i32,
                4 => v.protocol = f.value as i32,
                5 => v.port = text(f.payload)?,
                6 => {
                    use prost::Message as _;
                    v.port_info
                        .get_or_insert_with(Default::default)
                        .merge(f.payload)
                        .map_err(|e| format!("firewall rule port info: {e}"))?;
                }
                9 if v.first_source_prefix.is_none() => v.first_source_prefix = Some(f.payload),
                _ => {}
            }
        }
        Ok(v)
    }
}

impl RuleFields for RuleView<'_> {
    fn peer_ip(&self) -> &str {
        self.peer_ip
    }
    fn direction(&self) -> i32 {
        self.direction
    }
    fn action(&self) -> i32 {
        self.action
    }
    fn protocol(&self) -> i32 {
        self.protocol
    }
    fn port(&self) -> &str {
        self.port
    }
    fn port_info(&self) -> Option<&management::PortInfo> {
        self.port_info.as_ref()
    }
    fn first_source_prefix(&self) -> Option<&[u8]> {
        self.first_source_prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use management::{PortInfo, port_info};
    use prost::Message as _;

    /// Whatever prost decodes, the view reads alike; whatever it refuses, the view refuses.
    #[test]
    fn the_view_reads_what_prost_decodes() {
        let rule = management::FirewallRule {
            peer_ip: "100.64.0.7".into(),
            direction: 0,
            action: 1,
            protocol: 3,
            port: "8080".into(),
            port_info: Some(PortInfo {
                port_selection: Some(port_info::PortSelection::Range(port_info::Range {
                    start: 8000,
                    end: 8100,
                })),
            }),
            policy_id: b"policy".to_vec(),
            custom_protocol: 0,
            source_prefixes: vec![vec![100, 64, 0, 7, 32], vec![1, 2, 3, 4, 32]],
        };
        let bytes = rule.encode_to_vec();
        let v = RuleView::parse(&bytes).unwrap();
        assert_eq!(v.peer_ip(), rule.peer_ip());
        assert_eq!(
            (v.direction(), v.action(), v.protocol()),
            (rule.direction, rule.action, rule.protocol)
        );
        assert_eq!(v.port(), "8080");
        assert_eq!(v.port_info(), rule.port_info.as_ref());
        assert_eq!(v.first_source_prefix(), Some(&[100, 64, 0, 7, 32][..]));
        // Negative enums travel as ten-byte varints.
        let neg = management::FirewallRule {
            action: -1,
            ..Default::default()
        };
        assert_eq!(RuleView::parse(&neg.encode_to_vec()).unwrap().action(), -1);
        // Refused alike: a string that is not UTF-8, a known field of the wrong type.
        for bad in [&[0x0a, 0x01, 0xff][..], &[0x12, 0x00][..], &[0x0a][..]] {
            assert!(management::FirewallRule::decode(bad).is_err());
            assert!(RuleView::parse(bad).is_err(), "{bad:?}");
        }
    }
}
