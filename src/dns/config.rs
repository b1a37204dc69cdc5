//! NetBird's `DNSConfig` decoded (networks.md §3.1): custom zones with their records, and
//! nameserver groups with their match domains. Each entry that cannot be used is refused with
//! a reason; the rest stand (a non-primary group without domains refuses the groups, as
//! upstream's whole upstream update fails on it).

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

use super::zone::{Record, RecordCache, Zone};
use crate::control::sections;
use crate::control::management;

/// A nameserver group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsGroup {
    pub servers: Vec<SocketAddr>,
    /// The default for every name (`Primary`).
    pub primary: bool,
    /// Match domains (lower case, no trailing dot); empty for a primary group.
    pub domains: Vec<String>,
    /// Its domains are search domains for single-label names.
    pub search: bool,
}

/// What the map's DNS part says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    pub enabled: bool,
    pub zones: Vec<Zone>,
    pub groups: Vec<NsGroup>,
    /// The routing peers' DNS forwarder port (0 from management means 5353).
    pub forwarder_port: u16,
    /// `PeerConfig.RoutingPeerDnsResolutionEnabled`: DNS routes are resolved by the routing
    /// peer's forwarder; off, by this peer (upstream's legacy dynamic routes).
    pub routing_peer_resolution: bool,
}

/// Where DNS-route queries go when management says nothing (`ForwarderClientPort`).
pub const DEFAULT_FORWARDER_PORT: u16 = 5353;

impl DnsConfig {
    /// Decode; returns the config and the reasons entries were refused.
    pub fn from_wire(c: &management::DnsConfig) -> (Self, Vec<String>) {
        let zones = c
            .custom_zones
            .iter()
            .map(|z| (z, z.records.iter().map(Record::from_wire).collect()))
            .collect();
        Self::assemble(c, zones)
    }

    /// Decode the DNS part as sent (`occurrences` of `NetworkMap.DNSConfig`, slices of
    /// `whole`), reusing the records `cache` decoded from earlier maps and keeping only those
    /// this one has: a zone's records are found by fingerprint, and only new ones decoded.
    /// The error is malformed protobuf.
    pub fn from_encoded_with(
        whole: &Bytes,
        occurrences: &[&[u8]],
        cache: &mut RecordCache,
    ) -> Result<(Self, Vec<String>), String> {
        use prost::Message as _;
        const CUSTOM_ZONES: u64 = 3;
        const ZONE_RECORDS: u64 = 2;
        // The config without its zones decodes whole (merged, as protobuf does); each zone
        // without its records.
        let mut light = Vec::new();
        let mut raw_zones: Vec<&[u8]> = Vec::new();
        for occurrence in occurrences {
            sections::cut(occurrence, &[CUSTOM_ZONES], &mut light, |_, z| {
                raw_zones.push(z)
            })
            .map_err(|e| e.to_string())?;
        }
        let config = management::DnsConfig::decode(light.as_slice()).map_err(|e| e.to_string())?;
        cache.begin();
        let mut zones = Vec::with_capacity(raw_zones.len());
        let mut zone_light = Vec::new();
        for raw in raw_zones {
            zone_light.clear();
            let mut records = Vec::new();
            let mut malformed = None;
            sections::cut(raw, &[ZONE_RECORDS], &mut zone_light, |_, r| {
                match cache.decode_raw(whole, r) {
                    Ok(record) => records.push(record),
                    Err(e) => malformed = Some(e.to_string()),
                }
            })
            .map_err(|e| e.to_string())?;
            if let Some(e) = malformed {
                return Err(format!("a DNS record: {e}"));
            }
            let zone =
                management::CustomZone::decode(zone_light.as_slice()).map_err(|e| e.to_string())?;
            zones.push((zone, records));
        }
        cache.end();
        let zones = zones
            .iter_mut()
            .map(|(z, r)| (&*z, std::mem::take(r)))
            .collect();
        Ok(Self::assemble(&config, zones))
    }

    /// The config from its decoded parts: `c`'s flags and groups, and each zone with its
    /// records decoded (or refused, with the reason).
    fn assemble(
        c: &management::DnsConfig,
        decoded_zones: Vec<(&management::CustomZone, Vec<Result<Record, String>>)>,
    ) -> (Self, Vec<String>) {
        let mut errors = Vec::new();
        let mut zones = Vec::new();
        let single_zone = decoded_zones.len() == 1;
        for (zi, (z, decoded)) in decoded_zones.into_iter().enumerate() {
            let domain = normalize(&z.domain);
            if domain.is_empty() || !valid_name(&domain) {
                errors.push(format!(
                    "custom zone {zi}: domain {:?} is not a name",
                    trunc(&z.domain)
                ));
                continue;
            }
            let mut records = Vec::with_capacity(decoded.len());
            for (ri, r) in decoded.into_iter().enumerate() {
                match r {
                    Ok(rec) => records.push(rec),
                    Err(e) => errors.push(format!("zone {domain}: record {ri}: {e}")),
                }
            }
            if records.is_empty() {
                continue; // upstream skips zones without records
            }
            zones.push(Zone {
                domain,
                records,
                // Forced off with a single zone (old servers' compatibility).
                non_authoritative: z.non_authoritative && !single_zone,
                search: !z.search_domain_disabled,
            });
        }
        let mut groups = Vec::new();
        let mut groups_ok = true;
        for (gi, g) in c.name_server_groups.iter().enumerate() {
            let mut servers = Vec::new();
            for ns in &g.name_servers {
                if ns.ns_type != 1 {
                    errors.push(format!(
                        "nameserver group {gi}: nameserver type {} is not UDP; skipped",
                        ns.ns_type
                    ));
                    continue;
                }
                let (Ok(ip), Ok(port)) = (ns.ip.trim().parse::<IpAddr>(), u16::try_from(ns.port))
                else {
                    errors.push(format!(
                        "nameserver group {gi}: {:?} port {} is not an address and port",
                        trunc(&ns.ip),
                        ns.port
                    ));
                    continue;
                };
                if port == 0 {
                    errors.push(format!("nameserver group {gi}: {ip} has port 0"));
                    continue;
                }
                servers.push(SocketAddr::new(ip, port));
            }
            if servers.is_empty() {
                continue; // upstream skips groups with no nameservers
            }
            let domains: Vec<String> = g.domains.iter().map(|d| normalize(d)).collect();
            if !g.primary
                && (domains.is_empty() || domains.iter().any(|d| d.is_empty() || !valid_name(d)))
            {
                errors.push(format!(
                    "nameserver group {gi}: a non-primary group needs valid match domains; nameserver groups not applied"
                ));
                groups_ok = false;
                continue;
            }
            groups.push(NsGroup {
                servers,
                primary: g.primary,
                domains: if g.primary { Vec::new() } else { domains },
                search: g.search_domains_enabled,
            });
        }
        if !groups_ok {
            groups.clear();
        }
        let forwarder_port = match u16::try_from(c.forwarder_port) {
            Ok(0) | Err(_) => DEFAULT_FORWARDER_PORT,
            Ok(p) => p,
        };
        (
            Self {
                enabled: c.service_enable,
                zones: if c.service_enable { zones } else { Vec::new() },
                groups: if c.service_enable { groups } else { Vec::new() },
                forwarder_port,
                routing_peer_resolution: true,
            },
            errors,
        )
    }

    /// Search domains for single-label names: zones unless disabled, groups that ask for it.
    pub fn search_domains(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .zones
            .iter()
            .filter(|z| z.search)
            .map(|z| z.domain.clone())
            .collect();
        for g in self.groups.iter().filter(|g| g.search) {
            out.extend(g.domains.iter().cloned());
        }
        out.dedup();
        out
    }
}

/// Lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// A DNS name: labels of 1..=63 letters, digits, `-`, `_` (and a leading `*` label).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, l)| {
            (i == 0 && l == "*")
                || (!l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        })
}

pub(crate) fn trunc(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::management::{CustomZone, NameServer, NameServerGroup, SimpleRecord};

    fn rec(name: &str, t: i64, data: &str) -> SimpleRecord {
        SimpleRecord {
            name: name.into(),
            r#type: t,
            class: "IN".into(),
            ttl: 300,
            r_data: data.into(),
        }
    }

    #[test]
    fn zones_and_groups_decode_and_bad_entries_are_refused_one_by_one() {
        let c = management::DnsConfig {
            service_enable: true,
            custom_zones: vec![
                CustomZone {
                    domain: "corp.example.".into(),
                    records: vec![
                        rec("app.corp.example.", 1, "198.19.1.10"),
                        rec("bad.corp.example.", 1, "not-an-ip"),
                    ],
                    non_authoritative: true,
                    ..Default::default()
                },
                CustomZone {
                    domain: "empty.example.".into(),
                    ..Default::default()
                },
            ],
            name_server_groups: vec![
                NameServerGroup {
                    name_servers: vec![
                        NameServer {
                            ip: "198.19.1.53".into(),
                            ns_type: 1,
                            port: 53,
                        },
                        NameServer {
                            ip: "nope".into(),
                            ns_type: 1,
                            port: 53,
                        },
                        NameServer {
                            ip: "198.19.1.54".into(),
                            ns_type: 2,
                            port: 53,
                        },
                    ],
                    domains: vec!["Corp.Internal.".into()],
                    search_domains_enabled: true,
                    ..Default::default()
                },
                NameServerGroup {
                    name_servers: vec![NameServer {
                        ip: "9.9.9.9".into(),
                        ns_type: 1,
                        port: 53,
                    }],
                    primary: true,
                    ..Default::default()
                },
            ],
            forwarder_port: 0,
        };
        let (d, errors) = DnsConfig::from_wire(&c);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(d.zones.len(), 1, "the empty zone is skipped");
        assert!(d.zones[0].non_authoritative, "two zones in the map");
        assert_eq!(d.zones[0].records.len(), 1);
        assert_eq!(d.groups[0].servers, vec!["198.19.1.53:53".parse().unwrap()]);
        assert_eq!(d.groups[0].domains, vec!["corp.internal".to_string()]);
        assert!(d.groups[1].primary);
        assert_eq!(d.forwarder_port, 5353);
        assert_eq!(
            d.search_domains(),
            vec!["corp.example".to_string(), "corp.internal".to_string()]
        );
    }

    #[test]
    fn a_non_primary_group_without_domains_refuses_the_groups_and_disabled_dns_is_empty() {
        let ns = vec![NameServer {
            ip: "198.19.1.53".into(),
            ns_type: 1,
            port: 53,
        }];
        let c = management::DnsConfig {
            service_enable: true,
            name_server_groups: vec![
                NameServerGroup {
                    name_servers: ns.clone(),
                    domains: vec!["a.example".into()],
                    ..Default::default()
                },
                NameServerGroup {
                    name_servers: ns,
                    ..Default::default()
                },
            ],
            forwarder_port: 22054,
            ..Default::default()
        };
        let (d, errors) = DnsConfig::from_wire(&c);
        assert!(d.groups.is_empty() && errors.len() == 1);
        assert_eq!(d.forwarder_port, 22054);
        let (d, _) = DnsConfig::from_wire(&management::DnsConfig {
            service_enable: false,
            ..c
        });
        assert!(!d.enabled && d.groups.is_empty());
    }
}
