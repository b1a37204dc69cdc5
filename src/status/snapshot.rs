//! What `/status` serves and [`Peer::status`](crate::Peer::status) returns: readiness, our
//! peer, the other peers and their paths, the control plane, listeners and routes. The JSON
//! field names are a contract: scripts read them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How the peer is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Mode {
    /// A wg-quick file: ready once the data path is up and enough peers have a session.
    Static,
    /// NetBird: ready once management has sent a network map.
    Netbird,
}

/// The ICE pair a direct peer's traffic takes (NetBird's "local/remote ICE candidate").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct IcePair {
    /// `host`, `srflx`, `prflx` or `relay`.
    pub local_type: String,
    /// Our candidate's address.
    pub local: String,
    /// The peer's candidate type, as `local_type`.
    pub remote_type: String,
    /// The peer's candidate's address.
    pub remote: String,
    /// Round trip of the pair's latest connectivity check.
    pub latency_ms: Option<f64>,
}

/// `/status`: everything, as JSON. The `status` command reads the same structure.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// NetBird or a static WireGuard configuration.
    pub mode: Mode,
    /// Whether the peer is ready (`/readyz` answers 200).
    pub ready: bool,
    /// Why not ready (absent when ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the peer started.
    pub uptime_seconds: u64,
    /// Engines the supervisor built after the first (each a recovery from a failure).
    pub engine_restarts: u64,
    /// Connected peers readiness needs.
    pub ready_peers: usize,
    /// Our peer (absent while no engine is up).
    pub local: Option<LocalStatus>,
    /// The management service (NetBird mode).
    pub management: Option<ServiceStatus>,
    /// The signal service (NetBird mode).
    pub signal: Option<ServiceStatus>,
    /// Our home relay (NetBird mode).
    pub relay: Option<ServiceStatus>,
    /// The other peers, by name.
    pub peers: Vec<PeerStatus>,
    /// Our listeners and their counters.
    pub listeners: Vec<ListenerStatus>,
    /// ICE's counters (absent on the static path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ice: Option<IceCounts>,
    /// NetBird routes offered to us, each with its elected routing peer (NetBird mode).
    #[serde(default)]
    pub routes: Vec<RouteStatus>,
    /// What this peer routes for others, and its gates' and forwarder's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingStatus>,
    /// The network map from management: its size and what applying it cost (NetBird mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapStatus>,
}

/// The network map as applied.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MapStatus {
    /// The map's serial.
    pub serial: u64,
    /// The peers it lists (not counting us).
    pub peers: usize,
    /// Updates applied since the engine started.
    pub updates: u64,
    /// Milliseconds the latest update took to apply.
    pub last_apply_ms: f64,
}

/// One network (HA group) offered to us.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RouteStatus {
    /// The network's name (NetID), what `--networks-select` takes.
    pub network: String,
    /// A prefix, or the domains of a DNS route.
    pub target: String,
    /// A default route (0.0.0.0/0 or ::/0): the group is an exit node.
    pub exit_node: bool,
    /// On by the selection (`--networks-select` / `--networks-deselect`).
    pub selected: bool,
    /// The routing peers of the group (names where known).
    pub peers: Vec<String>,
    /// The routing peer carrying the network now (absent: none reachable, or not selected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_peer: Option<String>,
}

/// This peer as a router, and its gates.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RoutingStatus {
    /// Networks management has this peer route (empty: it routes nothing).
    pub serving: Vec<String>,
    /// Counters: gates (`denied_inbound`, `denied_routed`, `not_routed`, `routed_overflow`)
    /// and the forwarder's flows.
    pub counters: BTreeMap<String, u64>,
}

/// ICE since the engine started: pairs selected, direct paths lost, and input dropped by reason.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IceCounts {
    /// ICE agents started (one per connection attempt with a peer).
    pub agents_started: u64,
    /// Candidate pairs selected: direct paths found.
    pub pairs_selected: u64,
    /// Direct paths that stopped answering (the peer went back to the relay).
    pub paths_lost: u64,
    /// Dropped input by reason: `candidate_malformed`, `candidate_refused`,
    /// `credentials_malformed`, `stun_malformed`, `stun_unmatched`, `stun_queue_full`.
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// Our peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LocalStatus {
    /// Our mesh addresses with their prefixes (`100.64.0.2/16`).
    pub addresses: Vec<String>,
    /// Our name in the mesh (NetBird mode; empty for a static configuration).
    pub fqdn: String,
    /// Our WireGuard public key, base64.
    pub public_key: String,
    /// Our WireGuard UDP port.
    pub wireguard_port: u16,
}

/// A control-plane service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServiceStatus {
    /// Its URL (empty where we do not know one).
    pub url: String,
    /// Whether we are connected to it now.
    pub connected: bool,
    /// Messages sent to it since the engine started (signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    /// Connections opened since the engine started, home and foreign (relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened: Option<u64>,
}

/// Another peer, as WireGuard sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeerStatus {
    /// Its name in the mesh (empty for a static peer).
    pub fqdn: String,
    /// Its mesh address.
    pub ip: String,
    /// Its WireGuard public key, base64.
    pub public_key: String,
    /// `connected`, `disconnected` (had a session, lost it) or `connecting` (never had one).
    pub status: String,
    /// `direct`, `relayed` or `none`.
    pub connection: String,
    /// Where its WireGuard packets go: a UDP address, or the relay.
    pub endpoint: Option<String>,
    /// Seconds since its latest WireGuard handshake.
    pub last_handshake_seconds: Option<f64>,
    /// Bytes received from it through the tunnel.
    pub rx_bytes: u64,
    /// Bytes sent to it through the tunnel.
    pub tx_bytes: u64,
    /// Round-trip time of the latest WireGuard handshake timed with this peer (absent before
    /// the first).
    pub latency_ms: Option<f64>,
    /// The ICE pair in use when the connection is direct through ICE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ice: Option<IcePair>,
}

/// One of our listeners.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ListenerStatus {
    /// `socks5`, `http`, `proxy`, `forward`, `expose` (and `-udp` forms).
    pub kind: String,
    /// Its bound address, or `unix:PATH`.
    pub addr: String,
    /// Client connections open now.
    pub open_connections: i64,
    /// Its connection limit.
    pub max_connections: u64,
    /// Requests by result: a SOCKS5 reply code (`0x00` is success), an HTTP status, or for
    /// forwards and exposed ports `ok` / `error`; `rejected` and `timeout` for handshakes that
    /// never got as far as a request; `refused` (over the connection limits) and `evicted`
    /// (made room for a newcomer during its handshake).
    pub requests: BTreeMap<String, u64>,
    /// Client connections closed because nothing moved either way for the idle timeout.
    #[serde(default)]
    pub idle_closed: u64,
    /// UDP relaying (SOCKS5 UDP ASSOCIATE, UDP forwards and exposed ports), once used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpStatus>,
}

/// What a listener relayed over UDP.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct UdpStatus {
    /// Associations (SOCKS5) or client flows (forwards, exposed ports) open now.
    pub open: i64,
    /// Opened since start.
    pub opened: u64,
    /// Datagrams towards targets.
    pub datagrams_to_target: u64,
    /// Payload bytes towards targets.
    pub bytes_to_target: u64,
    /// Datagrams back to clients.
    pub datagrams_to_client: u64,
    /// Payload bytes back to clients.
    pub bytes_to_client: u64,
    /// Datagrams dropped, by reason (fragmented, foreign_source, malformed, too_big,
    /// unreachable, not_allowed, unresolved, queue_full, unsolicited, send_error).
    pub dropped: BTreeMap<String, u64>,
}
