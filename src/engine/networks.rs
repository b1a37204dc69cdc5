//! The engine's side of NetBird's networks (networks.md §1, §2): the client routes elected and
//! put on WireGuard's AllowedIPs, and the forwarder run while management names this peer the
//! router of a route. One task, under the engine's token; the forwarder and its flows are its
//! children and end with it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::dns::{DnsRoute, DnsState, Learned};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::control::envelope::parse_key_string;
use crate::forward::{Forwarder, ForwarderConfig};
use crate::netstack::Netstack;
use crate::route::{ClientRoutes, GroupStatus, PeerState, Route, Selection, Target};
use crate::wg::WgDevice;
use crate::wg::device::{Peer, PeerEndpoint};

/// What the user chose about networks (`--networks-select`, `--disable-*-routes`, ...).
#[derive(Clone, Debug, Default)]
pub struct NetworkOptions {
    pub selection: Selection,
    /// Ignore the routes of other peers (`--disable-client-routes`).
    pub disable_client_routes: bool,
    /// Never route for others, even when management says so (`--disable-server-routes`).
    pub disable_server_routes: bool,
    pub forwarder: ForwarderConfig,
}

use crate::status::RoutesView;

/// Addresses one DNS route may put on its routing peer (each is a WireGuard route entry).
const MAX_LEARNED: usize = 1024;

/// How often connection states are looked at for a new election.
const ELECTION_TICK: Duration = Duration::from_millis(500);
/// A peer heard from less recently than this (keepalives are every 25 s) is taken as gone.
const SILENT_PEER: Duration = Duration::from_secs(90);

pub(super) struct Networks {
    pub wg: Arc<WgDevice>,
    pub netstack: Netstack,
    pub own_key: String,
    pub options: NetworkOptions,
    pub view: RoutesView,
    /// DNS routes and the exit node go to the resolver; addresses it learns come back.
    pub dns: DnsState,
}

/// Addresses DNS routes resolved, by route (HA key): they follow the route's elected peer.
type LearnedAddrs = HashMap<String, BTreeSet<IpAddr>>;

impl Networks {
    pub async fn run(
        self,
        mut routes: watch::Receiver<Vec<Route>>,
        ingress: watch::Receiver<Vec<crate::forward::ingress::IngressRule>>,
        cancel: CancellationToken,
    ) {
        // Ingress ports follow their own rules; owned here, so they end with this task.
        let mut aux = JoinSet::new();
        aux.spawn(crate::forward::ingress::serve(
            self.netstack.clone(),
            ingress,
            cancel.child_token(),
        ));
        let mut client = ClientRoutes::new(self.own_key.clone(), self.options.selection.clone());
        let mut forwarder: Option<(CancellationToken, JoinSet<()>)> = None;
        let (dns_domains, _) = watch::channel(Vec::new());
        let (learned_tx, mut learned_rx) = mpsc::channel::<Learned>(64);
        self.dns.report_learned(learned_tx);
        let mut learned: LearnedAddrs = HashMap::new();
        let mut last: Option<crate::route::Outcome> = None;
        let mut tick = tokio::time::interval(ELECTION_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = routes.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let list = routes.borrow_and_update().clone();
                    client.set_routes(list);
                    self.serve(&client, &mut forwarder, &dns_domains, &cancel);
                }
                _ = tick.tick() => {}
                Some(l) = learned_rx.recv() => {
                    let set = learned.entry(l.route.clone()).or_default();
                    let before = set.len();
                    for a in l.addrs.iter().map(|a| a.to_canonical()) {
                        if set.len() >= MAX_LEARNED && !set.contains(&a) {
                            warn!(route = %l.route, "DNS route: over {MAX_LEARNED} addresses learned; new ones are not routed");
                            break;
                        }
                        set.insert(a);
                    }
                    if set.len() != before && let Some(outcome) = &last {
                        self.apply(outcome, &learned);
                    }
                    let _ = l.done.send(());
                    continue;
                }
            }
            if self.options.disable_client_routes {
                continue;
            }
            if let Some(outcome) = client.update(|key| self.peer_state(key)) {
                self.apply(&outcome, &learned);
                self.log_changes(&outcome.groups);
                *self.view.groups.write().unwrap_or_else(|e| e.into_inner()) =
                    outcome.groups.clone();
                last = Some(outcome);
            }
        }
        if let Some((token, mut tasks)) = forwarder.take() {
            token.cancel();
            tasks.shutdown().await;
        }
    }

    /// Put the elected routes on WireGuard (with what DNS routes learned) and tell the resolver
    /// where DNS routes go and whether an exit node is in use.
    fn apply(&self, outcome: &crate::route::Outcome, learned: &LearnedAddrs) {
        let mut routed: HashMap<[u8; 32], Vec<IpNet>> = HashMap::new();
        for (key, nets) in &outcome.prefixes {
            if let Ok(k) = parse_key_string(key) {
                routed.entry(k).or_default().extend(nets.iter().copied());
            }
        }
        let port = self.dns.forwarder_port();
        let mut dns_routes = Vec::new();
        let mut exit_node = false;
        for g in outcome.groups.iter().filter(|g| g.selected) {
            let peer = g.elected.as_deref().and_then(|k| parse_key_string(k).ok());
            match &g.target {
                Target::Domains(domains) => {
                    let route = format!("{}|{}", g.net_id, domains.join(","));
                    let forwarder = peer
                        .and_then(|k| self.wg.peer(&k))
                        .and_then(|p| overlay_v4(&p))
                        .map(|ip| SocketAddr::new(ip, port));
                    if let (Some(k), Some(addrs)) = (peer, learned.get(&route)) {
                        routed
                            .entry(k)
                            .or_default()
                            .extend(addrs.iter().map(|a| IpNet::from(*a)));
                    }
                    dns_routes.push(DnsRoute {
                        route,
                        patterns: domains.clone(),
                        forwarder,
                    });
                }
                Target::Network(_) => exit_node |= g.exit_node && peer.is_some(),
            }
        }
        self.wg.set_routed(routed);
        self.dns.set_routes(dns_routes, exit_node);
    }

    /// Run the forwarder while we are the router of some route, stop it when we are not.
    fn serve(
        &self,
        client: &ClientRoutes,
        forwarder: &mut Option<(CancellationToken, JoinSet<()>)>,
        dns_domains: &watch::Sender<Vec<String>>,
        cancel: &CancellationToken,
    ) {
        let domains: Vec<String> = client
            .server_routes()
            .iter()
            .filter_map(|r| match &r.target {
                Target::Domains(d) => Some(d.clone()),
                Target::Network(_) => None,
            })
            .flatten()
            .collect();
        dns_domains.send_replace(domains);
        let serving: Vec<(String, Target)> = client
            .server_routes()
            .iter()
            .map(|r| (r.net_id.clone(), r.target.clone()))
            .collect();
        let wanted = !serving.is_empty() && !self.options.disable_server_routes;
        if !serving.is_empty() && self.options.disable_server_routes {
            warn!(
                routes = serving.len(),
                "management names this peer a routing peer; not routing (--disable-server-routes)"
            );
        }
        for (net_id, target) in &serving {
            info!(network = %net_id, target = ?target, "routing for the mesh");
        }
        *self.view.serving.write().unwrap_or_else(|e| e.into_inner()) =
            if wanted { serving } else { Vec::new() };
        match (wanted, forwarder.is_some()) {
            (true, false) => {
                let token = cancel.child_token();
                let mut tasks = JoinSet::new();
                let fwd = Forwarder::new(
                    self.netstack.clone(),
                    self.options.forwarder.clone(),
                    self.view.forward.clone(),
                );
                tasks.spawn(fwd.run(token.clone()));
                // The DNS forwarder for our DNS routes (it answers REFUSED while there are none).
                tasks.spawn(crate::forward::dns::serve(
                    self.netstack.clone(),
                    dns_domains.subscribe(),
                    token.clone(),
                ));
                *forwarder = Some((token, tasks));
            }
            (false, true) => {
                if let Some((token, _tasks)) = forwarder.take() {
                    // The tasks end on the token; dropping the set aborts what is left.
                    token.cancel();
                }
            }
            _ => {}
        }
    }

    fn log_changes(&self, groups: &[GroupStatus]) {
        let old = self.view.groups.read().unwrap_or_else(|e| e.into_inner());
        for g in groups {
            let before = old
                .iter()
                .find(|o| o.net_id == g.net_id && o.target == g.target)
                .and_then(|o| o.elected.clone());
            if before != g.elected {
                let fqdn_or_key = |k: &Option<String>| k.clone().unwrap_or_else(|| "none".into());
                info!(
                    network = %g.net_id,
                    target = ?g.target,
                    from = %fqdn_or_key(&before),
                    to = %fqdn_or_key(&g.elected),
                    "route: routing peer elected"
                );
            }
        }
    }

    /// The election's view of a routing peer.
    fn peer_state(&self, key: &str) -> PeerState {
        let Ok(k) = parse_key_string(key) else {
            return PeerState::Unreachable;
        };
        match self.wg.peer(&k) {
            Some(p) => state_of(&p),
            None => PeerState::Unreachable,
        }
    }
}

/// A peer's overlay IPv4 address (where its DNS forwarder listens).
fn overlay_v4(p: &Peer) -> Option<IpAddr> {
    p.allowed_ips
        .iter()
        .find(|n| n.addr().is_ipv4() && n.prefix_len() == 32)
        .map(|n| n.addr())
}

/// Connected when it has a path that works (a relay whose remote is online, or a direct path)
/// and was heard from lately; idle when it said GO_IDLE, or when all it has is a roamed path
/// the relay no longer vouches for; unreachable otherwise.
pub(crate) fn state_of(p: &Peer) -> PeerState {
    let paths = p.paths();
    let latency = paths.direct.as_ref().and_then(|d| d.rtt).or_else(|| p.rtt.get());
    let silent = p.time_since_rx().is_some_and(|t| t > SILENT_PEER);
    match p.endpoint() {
        Some(e) if e.is_usable() && !silent => match &e {
            PeerEndpoint::Relay(relay, id) if !relay.is_online(id) => PeerState::Unreachable,
            // Learned only by roaming, and the relay says the remote left: maybe alive, maybe
            // killed mid-setup. Elected only when no member is connected, like an idle one.
            PeerEndpoint::Udp(_) if paths.direct.is_none() && paths.relay.is_none() => {
                PeerState::Idle { latency }
            }
            PeerEndpoint::Udp(_) => PeerState::Connected {
                relayed: false,
                latency,
            },
            _ => PeerState::Connected {
                relayed: true,
                latency,
            },
        },
        _ if p.is_idle() => PeerState::Idle { latency },
        _ => PeerState::Unreachable,
    }
}
