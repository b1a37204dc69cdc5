//! NetBird's routes as management sends them (networks.md §1.1): one `Route` per (route,
//! routing peer), decoded field by field with a reason for each one refused — a bad route is
//! dropped and logged, the rest of the map stands, as upstream does.

use ipnet::IpNet;

use crate::control::management;

/// What a route carries traffic for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An IPv4 or IPv6 prefix (masked).
    Network(IpNet),
    /// A DNS route: the domains (punycode; `*.` wildcards allowed).
    Domains(Vec<String>),
}

/// One route through one routing peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub id: String,
    pub target: Target,
    /// The routing peer's key string.
    pub peer: String,
    /// 1..=9999, lower is better.
    pub metric: u16,
    pub masquerade: bool,
    pub net_id: String,
    pub keep_route: bool,
    pub skip_auto_apply: bool,
}

/// The largest metric (`route.MaxMetric`).
pub const MAX_METRIC: u16 = 9999;

/// Why a route was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route without an ID")]
    NoId,
    #[error("route {0}: no routing peer")]
    NoPeer(String),
    #[error("route {0}: network type {1} is not IPv4 (1), IPv6 (2) or domain (3)")]
    Type(String, i64),
    #[error("route {0}: network {1:?} is not a prefix")]
    Network(String, String),
    #[error("route {0}: network {1} does not match its type")]
    Family(String, IpNet),
    #[error("route {0}: a domain route without domains")]
    NoDomains(String),
    #[error("route {0}: domain {1:?} is not a domain name")]
    Domain(String, String),
    #[error("route {0}: metric {1} outside 1..=9999")]
    Metric(String, i64),
}

impl Route {
    /// Decode one route from the map.
    pub fn from_wire(r: &management::Route) -> Result<Self, RouteError> {
        let id = r.id.trim().to_string();
        if id.is_empty() {
            return Err(RouteError::NoId);
        }
        if r.peer.trim().is_empty() {
            return Err(RouteError::NoPeer(id));
        }
        let metric = u16::try_from(r.metric)
            .ok()
            .filter(|m| (1..=MAX_METRIC).contains(m))
            .ok_or(RouteError::Metric(id.clone(), r.metric))?;
        // Domains win over the network, whatever the type says (upstream ignores the prefix
        // of a route with domains: it is a placeholder).
        let target = if !r.domains.is_empty() || r.network_type == 3 {
            if r.domains.is_empty() {
                return Err(RouteError::NoDomains(id));
            }
            for d in &r.domains {
                if !valid_domain(d) {
                    return Err(RouteError::Domain(id, d.chars().take(80).collect()));
                }
            }
            Target::Domains(r.domains.iter().map(|d| d.to_ascii_lowercase()).collect())
        } else {
            let net: IpNet = r.network.parse().map_err(|_| {
                RouteError::Network(id.clone(), r.network.chars().take(80).collect())
            })?;
            let net = net.trunc();
            match (r.network_type, net) {
                (1, IpNet::V4(_)) | (2, IpNet::V6(_)) => {}
                (1 | 2, other) => return Err(RouteError::Family(id, other)),
                (t, _) => return Err(RouteError::Type(id, t)),
            }
            Target::Network(net)
        };
        Ok(Self {
            id,
            target,
            peer: r.peer.trim().to_string(),
            metric,
            masquerade: r.masquerade,
            net_id: r.net_id.clone(),
            keep_route: r.keep_route,
            skip_auto_apply: r.skip_auto_apply,
        })
    }

    /// The HA group's key: routes with the same NetID and target are one route served by
    /// several peers (`GetHAUniqueID`: NetID + "|" + the prefix or the joined domains).
    pub fn ha_key(&self) -> String {
        let net = match &self.target {
            Target::Network(n) => n.to_string(),
            Target::Domains(d) => d.join(","),
        };
        format!("{}|{net}", self.net_id)
    }

    /// An exit node: a default route (`0.0.0.0/0` or `::/0`).
    pub fn is_exit_node(&self) -> bool {
        matches!(self.target, Target::Network(n) if n.prefix_len() == 0)
    }
}

/// A DNS name as NetBird's routes carry it: labels of letters, digits and hyphens (punycode),
/// an optional leading `*.` wildcard, at most 253 characters.
fn valid_domain(d: &str) -> bool {
    let name = d.strip_prefix("*.").unwrap_or(d);
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Decode every route of a map: the good ones, and a reason for each one dropped.
pub fn decode(routes: &[management::Route]) -> (Vec<Route>, Vec<RouteError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for r in routes {
        match Route::from_wire(r) {
            Ok(r) => good.push(r),
            Err(e) => bad.push(e),
        }
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(
        id: &str,
        net: &str,
        ty: i64,
        peer: &str,
        metric: i64,
        net_id: &str,
    ) -> management::Route {
        management::Route {
            id: id.into(),
            network: net.into(),
            network_type: ty,
            peer: peer.into(),
            metric,
            net_id: net_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn routes_decode_and_group_by_net_id_and_target() {
        let a = Route::from_wire(&wire("r1:p1", "10.1.0.7/16", 1, "P1", 100, "db")).unwrap();
        assert_eq!(
            a.target,
            Target::Network("10.1.0.0/16".parse().unwrap()),
            "masked"
        );
        let b = Route::from_wire(&wire("r1:p2", "10.1.0.0/16", 1, "P2", 50, "db")).unwrap();
        assert_eq!(a.ha_key(), b.ha_key());
        assert_eq!(a.ha_key(), "db|10.1.0.0/16");
        let exit = Route::from_wire(&wire("e", "0.0.0.0/0", 1, "P3", 1, "exit")).unwrap();
        assert!(exit.is_exit_node() && !a.is_exit_node());
        let mut dns = wire("d", "invalid Prefix", 3, "P1", 9999, "corp");
        dns.domains = vec!["*.Corp.Internal".into(), "app.example.com".into()];
        let dns = Route::from_wire(&dns).unwrap();
        assert_eq!(
            dns.target,
            Target::Domains(vec!["*.corp.internal".into(), "app.example.com".into()])
        );
        assert_eq!(dns.ha_key(), "corp|*.corp.internal,app.example.com");
    }

    #[test]
    fn bad_routes_say_why_and_the_rest_stand() {
        let mut no_domains = wire("d", "192.0.2.0/32", 3, "P", 1, "x");
        no_domains.domains.clear();
        let mut bad_domain = wire("d2", "", 3, "P", 1, "x");
        bad_domain.domains = vec!["exa mple.com".into()];
        let routes = vec![
            wire("", "10.0.0.0/8", 1, "P", 1, "x"),
            wire("a", "10.0.0.0/8", 1, "", 1, "x"),
            wire("b", "10.0.0.0/8", 5, "P", 1, "x"),
            wire("c", "not a prefix", 1, "P", 1, "x"),
            wire("e", "fd00::/8", 1, "P", 1, "x"),
            wire("f", "10.0.0.0/8", 1, "P", 0, "x"),
            wire("g", "10.0.0.0/8", 1, "P", 10_000, "x"),
            no_domains,
            bad_domain,
            wire("ok", "fd00::/8", 2, "P", 1, "x"),
        ];
        let (good, bad) = decode(&routes);
        assert_eq!(good.len(), 1, "{bad:?}");
        assert_eq!(good[0].id, "ok");
        assert_eq!(
            bad,
            vec![
                RouteError::NoId,
                RouteError::NoPeer("a".into()),
                RouteError::Type("b".into(), 5),
                RouteError::Network("c".into(), "not a prefix".into()),
                RouteError::Family("e".into(), "fd00::/8".parse().unwrap()),
                RouteError::Metric("f".into(), 0),
                RouteError::Metric("g".into(), 10_000),
                RouteError::NoDomains("d".into()),
                RouteError::Domain("d2".into(), "exa mple.com".into()),
            ]
        );
    }
}
