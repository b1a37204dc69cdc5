//! Custom zones answered in process (networks.md §3.1, the local resolver at priority 75):
//! exact records first, then the wildcard `*.<parent>` for a name with no records at all, then
//! a CNAME to follow; a name with other types only is NODATA; an unknown name is NXDOMAIN, or
//! falls through to the next handler in a NonAuthoritative zone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::config::{normalize, trunc, valid_name};
use crate::control::management::SimpleRecord;
use crate::control::sections::ByPrint;
use crate::one_or_many::OneOrMany;

/// A record's data: what resolution uses, and the rest kept as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    /// Another type (MX, TXT, SRV, PTR, NS, ...): its type number and text.
    Other(u16, String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Lower case, no trailing dot. Shared: a mesh zone has a record per peer, and the zone
    /// index, the configuration and the decoding cache hold the same names.
    pub name: Arc<str>,
    pub ttl: u32,
    pub data: RecordData,
}

impl Record {
    pub fn from_wire(r: &SimpleRecord) -> Result<Self, String> {
        if !r.class.eq_ignore_ascii_case("IN") {
            return Err(format!("class {:?} is not IN", trunc(&r.class)));
        }
        let name = normalize(&r.name);
        if !valid_name(&name) {
            return Err(format!("name {:?} is not a name", trunc(&r.name)));
        }
        let rdata = r.r_data.trim();
        let data = match r.r#type {
            1 => RecordData::A(
                rdata
                    .parse()
                    .map_err(|_| format!("A {:?} is not an IPv4 address", trunc(rdata)))?,
            ),
            28 => RecordData::Aaaa(
                rdata
                    .parse()
                    .map_err(|_| format!("AAAA {:?} is not an IPv6 address", trunc(rdata)))?,
            ),
            5 => {
                let target = normalize(rdata);
                if !valid_name(&target) {
                    return Err(format!("CNAME target {:?} is not a name", trunc(rdata)));
                }
                RecordData::Cname(target)
            }
            t @ 1..=65535 => RecordData::Other(t as u16, rdata.to_string()),
            t => return Err(format!("record type {t} out of range")),
        };
        Ok(Self {
            name: name.into(),
            ttl: u32::try_from(r.ttl).unwrap_or(0),
            data,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    pub domain: String,
    pub records: Vec<Record>,
    pub non_authoritative: bool,
    /// The zone is a search domain.
    pub search: bool,
}

/// What the zones say about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    /// No zone holds the name: ask the next handler.
    NotMine,
    /// Addresses of the asked family (possibly both, for an address lookup).
    Addresses(Vec<IpAddr>),
    /// An alias: resolve this name instead.
    Cname(String),
    /// The name exists without addresses.
    NoData,
    NxDomain,
    /// Unknown in a NonAuthoritative zone: the next handler answers.
    FallThrough,
}

/// Every zone, indexed by name.
#[derive(Clone, Debug, Default)]
pub struct Zones {
    domains: Vec<(String, bool)>,
    by_name: HashMap<Arc<str>, Datas>,
}

/// A name's records: one, as a mesh peer's, without a list of its own.
type Datas = OneOrMany<RecordData>;

/// Records decoded from earlier maps, reused while management sends them unchanged: a mesh
/// zone lists every peer, and one peer joining changes the zone, so without this every join
/// decoded and allocated the whole zone again. A record is known by the fingerprint of its
/// bytes as sent (`control::sections::print_one`); one sent again is neither decoded nor
/// copied. Two records with one fingerprint (odds 2^-64 per pair) would answer with the first.
/// Entries an update no longer uses are dropped at its end.
#[derive(Clone, Debug, Default)]
pub struct RecordCache {
    by_print: ByPrint<(Record, u64)>,
    generation: u64,
}

impl RecordCache {
    /// An update starts: records it does not use are forgotten by [`end`](Self::end).
    pub fn begin(&mut self) {
        self.generation += 1;
    }

    /// The record sent as `raw` (a slice of `whole`): from the cache when it was sent before.
    /// The outer error is malformed protobuf; the inner one, a record refused (kept out of the
    /// cache, so it is refused, with its reason, every time it comes).
    pub fn decode_raw(
        &mut self,
        whole: &bytes::Bytes,
        raw: &[u8],
    ) -> Result<Result<Record, String>, prost::DecodeError> {
        use prost::Message as _;
        let print = crate::control::sections::print_one(raw);
        let generation = self.generation;
        if let Some((record, seen)) = self.by_print.get_mut(&print) {
            *seen = generation;
            return Ok(Ok(record.clone()));
        }
        let wire = SimpleRecord::decode(whole.slice_ref(raw))?;
        let record = Record::from_wire(&wire);
        if let Ok(r) = &record {
            self.by_print.insert(print, (r.clone(), generation));
        }
        Ok(record)
    }

    /// The update is over: forget what it did not use.
    pub fn end(&mut self) {
        let generation = self.generation;
        self.by_print.retain(|_, (_, seen)| *seen == generation);
    }

    /// How many records are kept.
    pub fn cached(&self) -> usize {
        self.by_print.len()
    }
}

impl Zones {
    pub fn new(zones: &[Zone]) -> Self {
        let records = zones.iter().map(|z| z.records.len()).sum();
        let mut out = Zones {
            domains: Vec::with_capacity(zones.len()),
            // A mesh zone has a record per peer: sized once, not grown 13 times.
            by_name: HashMap::with_capacity(records),
        };
        for z in zones {
            out.domains.push((z.domain.clone(), z.non_authoritative));
            for r in &z.records {
                match out.by_name.get_mut(&r.name) {
                    Some(datas) => datas.push(r.data.clone()),
                    None => {
                        out.by_name.insert(r.name.clone(), Datas::One(r.data.clone()));
                    }
                }
            }
        }
        // Longest domain first: the most specific zone decides.
        out.domains.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
        out
    }

    /// Whether a zone covers `name` (its domain or below), and which is the first.
    pub fn covers(&self, name: &str) -> Option<&str> {
        self.domains
            .iter()
            .find(|(d, _)| in_domain(name, d))
            .map(|(d, _)| d.as_str())
    }

    /// The addresses (A and AAAA) of `name`.
    pub fn lookup(&self, name: &str) -> Local {
        let name = normalize(name);
        let Some(&(_, non_auth)) = self.domains.iter().find(|(d, _)| in_domain(&name, d)) else {
            return Local::NotMine;
        };
        let records = self
            .by_name
            .get(name.as_str())
            .or_else(|| {
                let parent = name.split_once('.')?.1;
                self.by_name.get(format!("*.{parent}").as_str())
            })
            .map(Datas::as_slice);
        let Some(records) = records else {
            return if non_auth {
                Local::FallThrough
            } else {
                Local::NxDomain
            };
        };
        let addrs: Vec<IpAddr> = records
            .iter()
            .filter_map(|d| match d {
                RecordData::A(a) => Some(IpAddr::V4(*a)),
                RecordData::Aaaa(a) => Some(IpAddr::V6(*a)),
                _ => None,
            })
            .collect();
        if !addrs.is_empty() {
            return Local::Addresses(addrs);
        }
        if let Some(target) = records.iter().find_map(|d| match d {
            RecordData::Cname(t) => Some(t.clone()),
            _ => None,
        }) {
            return Local::Cname(target);
        }
        Local::NoData
    }
}

/// `name` is `domain` or below it.
pub fn in_domain(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(domain: &str, non_auth: bool, recs: &[(&str, RecordData)]) -> Zone {
        Zone {
            domain: domain.into(),
            records: recs
                .iter()
                .map(|(n, d)| Record {
                    name: (*n).into(),
                    ttl: 60,
                    data: d.clone(),
                })
                .collect(),
            non_authoritative: non_auth,
            search: true,
        }
    }

    /// A record sent again is the one decoded before (its name shared, not copied); one no
    /// longer sent is forgotten at the end of the update; a bad one is refused every time.
    #[test]
    fn the_record_cache_reuses_unchanged_records_and_forgets_old_ones() {
        let rec = |name: &str, ip: &str| SimpleRecord {
            name: name.into(),
            r#type: 1,
            class: "IN".into(),
            ttl: 300,
            r_data: ip.into(),
        };
        let whole = |r: &SimpleRecord| bytes::Bytes::from(prost::Message::encode_to_vec(r));
        let mut cache = RecordCache::default();
        let decode = |cache: &mut RecordCache, r: SimpleRecord| {
            let bytes = whole(&r);
            cache.decode_raw(&bytes, &bytes).unwrap()
        };
        cache.begin();
        let a = decode(&mut cache, rec("A.mesh.test.", "100.64.0.2")).unwrap();
        let b = decode(&mut cache, rec("b.mesh.test.", "100.64.0.3")).unwrap();
        assert!(decode(&mut cache, rec("bad name!", "100.64.0.4")).is_err());
        cache.end();
        assert_eq!(cache.cached(), 2);
        assert_eq!(&*a.name, "a.mesh.test");
        cache.begin();
        let a2 = decode(&mut cache, rec("A.mesh.test.", "100.64.0.2")).unwrap();
        assert!(Arc::ptr_eq(&a.name, &a2.name), "reused, not decoded again");
        let b2 = decode(&mut cache, rec("b.mesh.test.", "100.64.0.9")).unwrap();
        assert!(!Arc::ptr_eq(&b.name, &b2.name));
        assert_eq!(b2.data, RecordData::A("100.64.0.9".parse().unwrap()));
        assert!(decode(&mut cache, rec("bad name!", "100.64.0.4")).is_err());
        let bad = bytes::Bytes::from_static(&[0x0a, 0x09, 0x61]);
        assert!(cache.decode_raw(&bad, &bad).is_err(), "malformed protobuf");
        cache.end();
        assert_eq!(cache.cached(), 2, "b's old record is gone");
    }

    #[test]
    fn exact_wildcard_cname_nodata_and_nxdomain() {
        let z = Zones::new(&[zone(
            "corp.example",
            false,
            &[
                (
                    "app.corp.example",
                    RecordData::A("198.19.1.10".parse().unwrap()),
                ),
                (
                    "*.dev.corp.example",
                    RecordData::A("198.19.1.20".parse().unwrap()),
                ),
                (
                    "www.corp.example",
                    RecordData::Cname("app.corp.example".into()),
                ),
                (
                    "mail.corp.example",
                    RecordData::Other(16, "\"v=spf1\"".into()),
                ),
            ],
        )]);
        assert_eq!(
            z.lookup("APP.corp.example."),
            Local::Addresses(vec!["198.19.1.10".parse().unwrap()])
        );
        assert_eq!(
            z.lookup("x.dev.corp.example"),
            Local::Addresses(vec!["198.19.1.20".parse().unwrap()])
        );
        assert_eq!(
            z.lookup("www.corp.example"),
            Local::Cname("app.corp.example".into())
        );
        assert_eq!(z.lookup("mail.corp.example"), Local::NoData);
        assert_eq!(z.lookup("nope.corp.example"), Local::NxDomain);
        assert_eq!(z.lookup("example.org"), Local::NotMine);
        assert_eq!(z.lookup("xcorp.example"), Local::NotMine);
    }

    #[test]
    fn a_non_authoritative_zone_falls_through_and_the_most_specific_zone_decides() {
        let z = Zones::new(&[
            zone(
                "example",
                true,
                &[("a.example", RecordData::A("198.19.9.1".parse().unwrap()))],
            ),
            zone("in.example", false, &[]),
        ]);
        assert_eq!(z.lookup("b.example"), Local::FallThrough);
        assert_eq!(z.lookup("b.in.example"), Local::NxDomain);
        assert_eq!(z.covers("b.in.example"), Some("in.example"));
    }

    #[test]
    fn records_are_refused_with_reasons() {
        let r = |t: i64, class: &str, name: &str, data: &str| {
            Record::from_wire(&SimpleRecord {
                name: name.into(),
                r#type: t,
                class: class.into(),
                ttl: 60,
                r_data: data.into(),
            })
        };
        assert!(r(1, "IN", "a.example.", "198.19.1.1").is_ok());
        assert!(
            r(1, "CH", "a.example.", "198.19.1.1")
                .unwrap_err()
                .contains("class")
        );
        assert!(
            r(1, "IN", "a..example.", "198.19.1.1")
                .unwrap_err()
                .contains("name")
        );
        assert!(
            r(28, "IN", "a.example.", "198.19.1.1")
                .unwrap_err()
                .contains("IPv6")
        );
        assert!(
            r(5, "IN", "a.example.", "bad name!")
                .unwrap_err()
                .contains("CNAME")
        );
        assert!(
            r(70000, "IN", "a.example.", "x")
                .unwrap_err()
                .contains("range")
        );
        assert_eq!(
            r(16, "IN", "a.example.", "\"hi\"").unwrap().data,
            RecordData::Other(16, "\"hi\"".into())
        );
    }
}
