//! `/metrics`: the snapshot in Prometheus' text exposition format (version 0.0.4).

use std::fmt::Write;

use super::Snapshot;

/// Render `snap` as Prometheus text.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP netbird_proxy_{name} {help}");
        let _ = writeln!(out, "# TYPE netbird_proxy_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "netbird_proxy_{name}{labels} {value}");
        }
    };
    family(
        "ready",
        "gauge",
        "1 when /readyz answers 200.",
        vec![(String::new(), f64::from(u8::from(snap.ready)))],
    );
    family(
        "uptime_seconds",
        "gauge",
        "Seconds since the process started.",
        vec![(String::new(), snap.uptime_seconds as f64)],
    );
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        family(
            "tasks",
            "gauge",
            "Tokio tasks alive in the process (engines, listeners, connections, flows).",
            vec![(String::new(), rt.metrics().num_alive_tasks() as f64)],
        );
    }
    family(
        "engine_restarts_total",
        "counter",
        "Engines built after the first (reconnects to the mesh).",
        vec![(String::new(), snap.engine_restarts as f64)],
    );
    if let Some(sent) = snap.signal.as_ref().and_then(|s| s.sent) {
        family(
            "signal_messages_sent_total",
            "counter",
            "Messages sent to signal (offers, answers, candidates, GO_IDLE) by this engine.",
            vec![(String::new(), sent as f64)],
        );
    }
    if let Some(opened) = snap.relay.as_ref().and_then(|r| r.opened) {
        family(
            "relay_connections_opened_total",
            "counter",
            "Relay connections (home and foreign) this engine opened.",
            vec![(String::new(), opened as f64)],
        );
    }
    if let Some(map) = &snap.map {
        family(
            "map_peers",
            "gauge",
            "Peers in the network map from management.",
            vec![(String::new(), map.peers as f64)],
        );
        family(
            "map_apply_seconds",
            "gauge",
            "Seconds the latest network map update took to apply.",
            vec![(String::new(), map.last_apply_ms / 1000.0)],
        );
    }
    let peer = |p: &super::PeerStatus| {
        labels(&[
            ("peer", &p.fqdn),
            ("ip", &p.ip),
            ("public_key", &p.public_key),
        ])
    };
    family(
        "peer_connected",
        "gauge",
        "1 when the peer has a live WireGuard session.",
        snap.peers
            .iter()
            .map(|p| (peer(p), f64::from(u8::from(p.status == "connected"))))
            .collect(),
    );
    family(
        "peer_connection_info",
        "gauge",
        "How datagrams reach the peer: direct, relayed or none.",
        snap.peers
            .iter()
            .map(|p| {
                let l = labels(&[
                    ("peer", &p.fqdn),
                    ("ip", &p.ip),
                    ("public_key", &p.public_key),
                    ("connection", &p.connection),
                ]);
                (l, 1.0)
            })
            .collect(),
    );
    family(
        "peer_ice_pair_info",
        "gauge",
        "The ICE pair a direct peer's traffic takes: candidate types and addresses.",
        snap.peers
            .iter()
            .filter_map(|p| {
                let i = p.ice.as_ref()?;
                let l = labels(&[
                    ("peer", &p.fqdn),
                    ("ip", &p.ip),
                    ("public_key", &p.public_key),
                    ("local_type", &i.local_type),
                    ("local", &i.local),
                    ("remote_type", &i.remote_type),
                    ("remote", &i.remote),
                ]);
                Some((l, 1.0))
            })
            .collect(),
    );
    family(
        "peer_ice_latency_seconds",
        "gauge",
        "Round trip of the latest ICE connectivity check on a direct peer's pair.",
        snap.peers
            .iter()
            .filter_map(|p| Some((peer(p), p.ice.as_ref()?.latency_ms? / 1000.0)))
            .collect(),
    );
    family(
        "route_info",
        "gauge",
        "NetBird networks offered to this peer: 1 per network, with its routing peer (empty: none).",
        snap.routes
            .iter()
            .map(|r| {
                let l = labels(&[
                    ("network", &r.network),
                    ("target", &r.target),
                    ("exit_node", if r.exit_node { "true" } else { "false" }),
                    ("selected", if r.selected { "true" } else { "false" }),
                    ("routing_peer", r.routing_peer.as_deref().unwrap_or("")),
                ]);
                (l, 1.0)
            })
            .collect(),
    );
    if let Some(routing) = &snap.routing {
        family(
            "routing_events_total",
            "counter",
            "The policy gates and the routing peer's forwarder, by event.",
            routing
                .counters
                .iter()
                .map(|(event, n)| (labels(&[("event", event)]), *n as f64))
                .collect(),
        );
    }
    if let Some(ice) = &snap.ice {
        family(
            "ice_agents_started_total",
            "counter",
            "ICE attempts: agents started, one per attempt with a peer.",
            vec![(String::new(), ice.agents_started as f64)],
        );
        family(
            "ice_pairs_selected_total",
            "counter",
            "ICE pairs selected (direct paths that came up).",
            vec![(String::new(), ice.pairs_selected as f64)],
        );
        family(
            "ice_paths_lost_total",
            "counter",
            "Direct paths lost (no STUN from the peer for 6 s), the peer back on the relay.",
            vec![(String::new(), ice.paths_lost as f64)],
        );
        family(
            "ice_dropped_total",
            "counter",
            "ICE input dropped, by reason.",
            ice.dropped
                .iter()
                .map(|(reason, n)| (labels(&[("reason", reason)]), *n as f64))
                .collect(),
        );
    }
    family(
        "peer_receive_bytes_total",
        "counter",
        "Bytes of IP packets received from the peer.",
        snap.peers
            .iter()
            .map(|p| (peer(p), p.rx_bytes as f64))
            .collect(),
    );
    family(
        "peer_transmit_bytes_total",
        "counter",
        "Bytes of IP packets sent to the peer.",
        snap.peers
            .iter()
            .map(|p| (peer(p), p.tx_bytes as f64))
            .collect(),
    );
    family(
        "peer_last_handshake_age_seconds",
        "gauge",
        "Seconds since the last completed WireGuard handshake (absent: never).",
        snap.peers
            .iter()
            .filter_map(|p| Some((peer(p), p.last_handshake_seconds?)))
            .collect(),
    );
    family(
        "peer_latency_seconds",
        "gauge",
        "Round trip of the latest WireGuard handshake timed with the peer (absent: none yet).",
        snap.peers
            .iter()
            .filter_map(|p| Some((peer(p), p.latency_ms? / 1000.0)))
            .collect(),
    );
    let listener = |l: &super::ListenerStatus| labels(&[("kind", &l.kind), ("listener", &l.addr)]);
    family(
        "open_connections",
        "gauge",
        "Client connections open on the listener.",
        snap.listeners
            .iter()
            .map(|l| (listener(l), l.open_connections as f64))
            .collect(),
    );
    family(
        "max_connections",
        "gauge",
        "The listener's connection cap (--max-connections-per-listener).",
        snap.listeners
            .iter()
            .map(|l| (listener(l), l.max_connections as f64))
            .collect(),
    );
    family(
        "idle_closed_total",
        "counter",
        "Client connections closed after the idle timeout (--idle-timeout) with no byte either way.",
        snap.listeners
            .iter()
            .map(|l| (listener(l), l.idle_closed as f64))
            .collect(),
    );
    let udp = |l: &super::ListenerStatus, extra: (&str, &str)| {
        labels(&[("kind", &l.kind), ("listener", &l.addr), extra])
    };
    family(
        "udp_open",
        "gauge",
        "UDP associations (SOCKS5) or client flows (forwards, exposed ports) open on the listener.",
        snap.listeners
            .iter()
            .filter_map(|l| Some((listener(l), l.udp.as_ref()?.open as f64)))
            .collect(),
    );
    family(
        "udp_datagrams_total",
        "counter",
        "Datagrams relayed, by direction (to_target, to_client).",
        snap.listeners
            .iter()
            .filter_map(|l| Some((l, l.udp.as_ref()?)))
            .flat_map(|(l, u)| {
                [
                    (
                        udp(l, ("direction", "to_target")),
                        u.datagrams_to_target as f64,
                    ),
                    (
                        udp(l, ("direction", "to_client")),
                        u.datagrams_to_client as f64,
                    ),
                ]
            })
            .collect(),
    );
    family(
        "udp_bytes_total",
        "counter",
        "Payload bytes relayed over UDP, by direction (to_target, to_client).",
        snap.listeners
            .iter()
            .filter_map(|l| Some((l, l.udp.as_ref()?)))
            .flat_map(|(l, u)| {
                [
                    (udp(l, ("direction", "to_target")), u.bytes_to_target as f64),
                    (udp(l, ("direction", "to_client")), u.bytes_to_client as f64),
                ]
            })
            .collect(),
    );
    family(
        "udp_dropped_total",
        "counter",
        "Datagrams dropped, by reason.",
        snap.listeners
            .iter()
            .filter_map(|l| Some((l, l.udp.as_ref()?)))
            .flat_map(|(l, u)| {
                u.dropped
                    .iter()
                    .map(move |(reason, n)| (udp(l, ("reason", reason)), *n as f64))
            })
            .collect(),
    );
    family(
        "proxy_requests_total",
        "counter",
        "Requests by listener and result (SOCKS5 reply code, HTTP status, ok/error, refused, evicted, timeout, rejected).",
        snap.listeners
            .iter()
            .flat_map(|l| {
                l.requests.iter().map(move |(result, n)| {
                    let l = labels(&[("kind", &l.kind), ("listener", &l.addr), ("result", result)]);
                    (l, *n as f64)
                })
            })
            .collect(),
    );
    out
}

/// `{a="x",b="y"}` with values escaped as the format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("a", "x\"y\\z\nw"), ("b", "")]),
            "{a=\"x\\\"y\\\\z\\nw\",b=\"\"}"
        );
    }
}
