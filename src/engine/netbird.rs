//! The NetBird engine: one connection attempt to the mesh, single-use.
//!
//! Invariants (netbird-protocol.md §8), by construction:
//! * the cancellation token exists from `new`, so `stop` works on an engine never started;
//! * a second `start` is `AlreadyStarted` and a `start` after `stop` is `AlreadyStopped`, both
//!   decided before anything is touched;
//! * `stop` cancels first and locks second, so it releases a `start` parked on any network wait
//!   (every await in `start` selects on the token), and that `start` returns `Cancelled`;
//! * a failed `start` runs the same `stop_locked` as `stop`: one teardown path, tolerant of
//!   partial state and idempotent;
//! * subsystems that give up (the Sync stream, an address change) set the reset marker and
//!   cancel the cycle: the supervisor builds a new engine; nothing here restarts itself.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::negotiation::{Negotiator, PeerEvent};
use super::relays::Relays;
use super::{DataPathError, DataPathSpec, ProxyOptions, Ready, start_datapath};
use crate::control::envelope::key_string;
use crate::control::management::HostConfig;
use crate::control::management::host_config::Protocol;
use crate::control::management_client::{ManagementClient, ManagementError, system_meta};
use crate::control::mesh::{Change, MeshState, RemotePeer, parse_local};
use crate::control::signal_client::{SignalClient, SignalError};
use crate::dns::MeshNames;
use crate::wg::{PeerSpec, WgDevice};

/// Keepalive NetBird uses towards every peer.
const PEER_KEEPALIVE: u16 = 25;
/// How often a slow start step says what it is waiting for.
const STILL_WAITING: Duration = Duration::from_secs(5);
/// How long tasks get to finish on stop before they are aborted.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A setup key; `Debug` never shows it.
#[derive(Clone)]
pub struct SetupKey(pub String);

impl std::fmt::Debug for SetupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetupKey(<redacted>)")
    }
}

/// What an engine needs.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub management_url: String,
    pub setup_key: Option<SetupKey>,
    pub hostname: String,
    pub private_key: [u8; 32],
    pub wg_port: u16,
    pub proxy: ProxyOptions,
    pub ice: IceOptions,
    /// Routes, exit nodes and routing for others.
    pub networks: super::networks::NetworkOptions,
    /// Lazy connections: peers set up on first use and idled after `lazy_inactivity`
    /// (None: as management's map says).
    pub lazy: Option<bool>,
    /// How long a lazily connected peer may go without data before it is idled.
    pub lazy_inactivity: Duration,
}

/// Direct connections (ICE) towards mesh peers.
#[derive(Clone, Debug)]
pub struct IceOptions {
    /// ICE on (the default); off keeps every peer on the relay (`--force-relay`,
    /// `NB_FORCE_RELAY=true` as NetBird's client).
    pub enabled: bool,
    /// Peers (name, overlay IP or key) that stay on the relay.
    pub force_relay_peers: Vec<String>,
}

impl Default for IceOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            force_relay_peers: Vec::new(),
        }
    }
}

impl MeshConfig {
    fn key_string(&self) -> String {
        key_string(&crate::control::envelope::public_key_of(&self.private_key))
    }
}

/// What a subsystem task needs to end with the engine or ask for a new one.
#[derive(Clone)]
struct Lifeline {
    cancel: CancellationToken,
    cycle: CancellationToken,
    reset: Arc<AtomicBool>,
}

impl Lifeline {
    /// Mark the engine for a rebuild and end the cycle; the supervisor does the rest.
    fn request_rebuild(&self) {
        self.reset.store(true, Ordering::SeqCst);
        self.cycle.cancel();
    }
}

/// Why an engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is already started")]
    AlreadyStarted,
    #[error("the engine was stopped; build a new one")]
    AlreadyStopped,
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Management(#[from] ManagementError),
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error("management gave no usable configuration: {0}")]
    Config(String),
    #[error(transparent)]
    DataPath(#[from] DataPathError),
}

impl EngineError {
    /// Errors a retry cannot fix: the supervisor stops instead of retrying.
    pub fn is_permanent(&self) -> bool {
        match self {
            EngineError::Management(e) => e.is_permanent(),
            EngineError::DataPath(DataPathError::Listen { .. }) => true,
            _ => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    New,
    Started,
    Stopped,
}

struct State {
    phase: Phase,
    tasks: JoinSet<()>,
}

/// One attempt to be a peer of the mesh.
pub struct Engine {
    config: MeshConfig,
    /// This engine's token: a child of the cycle token.
    cancel: CancellationToken,
    /// The cycle's token, cancelled by subsystems that need a rebuild.
    cycle: CancellationToken,
    reset: Arc<AtomicBool>,
    state: Mutex<State>,
}

impl Engine {
    /// An engine for one cycle; nothing runs until `start`.
    pub fn new(config: MeshConfig, cycle: &CancellationToken) -> Self {
        Self {
            config,
            cancel: cycle.child_token(),
            cycle: cycle.clone(),
            reset: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(State {
                phase: Phase::New,
                tasks: JoinSet::new(),
            }),
        }
    }

    fn lifeline(&self) -> Lifeline {
        Lifeline {
            cancel: self.cancel.clone(),
            cycle: self.cycle.clone(),
            reset: self.reset.clone(),
        }
    }

    /// Whether a subsystem asked for a new engine.
    pub fn needs_reset(&self) -> bool {
        self.reset.load(Ordering::SeqCst)
    }

    /// Tasks still owned by this engine (0 after a stop).
    pub async fn task_count(&self) -> usize {
        self.state.lock().await.tasks.len()
    }

    /// Log in, connect signal, build the data path and start following the network map.
    /// `on_ready` runs once everything is up.
    pub async fn start(&self, on_ready: impl FnOnce(&Ready)) -> Result<(), EngineError> {
        let mut state = self.state.lock().await;
        match state.phase {
            Phase::Started => return Err(EngineError::AlreadyStarted),
            Phase::Stopped => return Err(EngineError::AlreadyStopped),
            Phase::New => {}
        }
        if self.cancel.is_cancelled() {
            state.phase = Phase::Stopped;
            return Err(EngineError::Cancelled);
        }
        state.phase = Phase::Started;
        match self.start_locked(&mut state).await {
            Ok(ready) => {
                on_ready(&ready);
                Ok(())
            }
            Err(e) => {
                // A cancel anywhere in the sequence is reported as such, whatever the await
                // it interrupted made of it (read before the teardown cancels the token).
                let cancelled = self.cancel.is_cancelled();
                self.stop_locked(&mut state).await;
                Err(if cancelled { EngineError::Cancelled } else { e })
            }
        }
    }

    /// Stop: cancel first (releasing a `start` waiting on the network), then tear down.
    pub async fn stop(&self) {
        self.cancel.cancel();
        let mut state = self.state.lock().await;
        self.stop_locked(&mut state).await;
    }

    /// The one teardown path.
    async fn stop_locked(&self, state: &mut State) {
        self.cancel.cancel();
        super::unpublish(&self.config.proxy.publish);
        if let Some(hub) = &self.config.proxy.status {
            hub.detach();
        }
        state.phase = Phase::Stopped;
        let drain = async { while state.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_GRACE, drain).await.is_err() {
            warn!("engine tasks did not stop in time; aborting them");
            state.tasks.abort_all();
            while state.tasks.join_next().await.is_some() {}
        }
    }

    /// Await `fut` unless the engine is cancelled first; while it takes long, say every
    /// `STILL_WAITING` what the start is waiting for.
    async fn step<T, E>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, EngineError>
    where
        EngineError: From<E>,
    {
        tokio::pin!(fut);
        let started = tokio::time::Instant::now();
        let mut ticks = tokio::time::interval_at(started + STILL_WAITING, STILL_WAITING);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(EngineError::Cancelled),
                r = &mut fut => return r.map_err(EngineError::from),
                _ = ticks.tick() => {
                    info!("still waiting for {what} ({} s)", started.elapsed().as_secs());
                }
            }
        }
    }

    async fn start_locked(&self, state: &mut State) -> Result<Ready, EngineError> {
        let cfg = &self.config;
        let meta = system_meta(&cfg.hostname, cfg.lazy == Some(true));
        info!(url = %cfg.management_url, "connecting to management");
        let mut management = self
            .step(
                "management to accept the connection",
                ManagementClient::connect(&cfg.management_url, cfg.private_key),
            )
            .await?;
        let setup_key = cfg.setup_key.as_ref().map(|k| k.0.as_str());
        let login = self
            .step(
                "management to answer the login",
                management.login(setup_key, meta.clone()),
            )
            .await?;
        let local = login
            .peer_config
            .as_ref()
            .ok_or_else(|| EngineError::Config("login response without peer config".into()))
            .and_then(|pc| parse_local(pc).map_err(|e| EngineError::Config(e.to_string())))?;
        let mut mesh = MeshState::default();
        let mut ignored = Vec::new();
        if let Some(nc) = &login.netbird_config {
            mesh.apply_config(nc, &mut ignored);
        }
        let signal_host = login
            .netbird_config
            .as_ref()
            .and_then(|c| c.signal.clone())
            .ok_or_else(|| EngineError::Config("no signal server in the login response".into()))?;
        info!(address = %local.address, fqdn = %local.fqdn, "logged in to management");
        let local_address = local.address;

        // Signal: the engine does not go on until its receive stream is registered.
        let signal = signal_client(&signal_host, cfg.private_key, self.cancel.child_token())?;
        let (inbox_tx, inbox_rx) = mpsc::channel(64);
        state.tasks.spawn(signal.clone().run(inbox_tx));
        self.step(
            "signal to accept our receive stream",
            signal.wait_stream_connected(&self.cancel),
        )
        .await?;

        // Data path on our overlay address; peers and their names arrive with the network map.
        let names = MeshNames::default();
        let dns = crate::dns::DnsState::default();
        let spec = DataPathSpec {
            private_key: cfg.private_key,
            listen_port: cfg.wg_port,
            addresses: vec![local.address],
            mtu: local
                .mtu
                .map_or(crate::wg::config::DEFAULT_MTU as usize, usize::from),
            peers: Vec::new(),
            dns_servers: Vec::new(),
            dns_search: Vec::new(),
            names: names.clone(),
            dns: Some(dns.clone()),
        };
        let datapath =
            start_datapath(spec, cfg.proxy.clone(), &self.cancel, &mut state.tasks).await?;

        // Relays: a guard keeps the home relay connected (and reconnects it after a loss, with
        // backoff); foreign relays open on demand. The engine does not wait for them: without a
        // relay, only mesh peers are out of reach, and only until it is back.
        let (relay_settings, relay_settings_rx) = tokio::sync::watch::channel(mesh.relay.clone());
        let (stun_settings, stun_settings_rx) = tokio::sync::watch::channel(mesh.stuns.clone());
        let (turn_settings, turn_settings_rx) = tokio::sync::watch::channel(mesh.turns.clone());
        let relays = Relays::start(
            cfg.key_string(),
            relay_settings_rx,
            datapath.relay_inbound.clone(),
            self.cancel.clone(),
            &mut state.tasks,
        );

        let sync = self
            .step("management to open the Sync stream", management.sync(meta))
            .await?;
        let synced = Arc::new(AtomicBool::new(false));
        let map_counters = Arc::new(crate::status::MapCounters::default());
        let routes_view = crate::status::RoutesView::default();
        if let Some(hub) = &cfg.proxy.status {
            hub.attach(crate::status::EngineView {
                wg: datapath.wg.clone(),
                mesh: datapath.ready.mesh.clone(),
                fqdn: local.fqdn.clone(),
                names: names.clone(),
                routes: Some(routes_view.clone()),
                gates: Some(datapath.netstack.gate_counters().clone()),
                control: Some(crate::status::ControlView {
                    management_url: cfg.management_url.clone(),
                    management_synced: synced.clone(),
                    map: map_counters.clone(),
                    relay_connections: relays.opened(),
                    signal: signal.clone(),
                    home_relay: relays.home_changes(),
                }),
            });
        }
        mesh.local = Some(local);
        let (events_tx, events_rx) = mpsc::channel(256);
        // Routes: elected and applied by their own task; the map's routes reach it by a watch.
        let (routes_tx, routes_rx) = tokio::sync::watch::channel(Vec::new());
        let (ingress_tx, ingress_rx) = tokio::sync::watch::channel(Vec::new());
        let networks = super::networks::Networks {
            wg: datapath.wg.clone(),
            netstack: datapath.netstack.clone(),
            own_key: cfg.key_string(),
            options: cfg.networks.clone(),
            view: routes_view,
            dns: dns.clone(),
        };
        state
            .tasks
            .spawn(networks.run(routes_rx, ingress_rx, self.cancel.clone()));
        let source = SyncSource {
            url: cfg.management_url.clone(),
            private_key: cfg.private_key,
            meta: system_meta(&cfg.hostname, cfg.lazy == Some(true)),
            stream: sync,
            synced,
            map: map_counters,
        };
        state.tasks.spawn(follow_sync(
            source,
            mesh,
            cfg.key_string(),
            MapSinks {
                wg: datapath.wg.clone(),
                events: events_tx,
                relay_settings,
                stun_settings,
                turn_settings,
                names,
                routes: routes_tx,
                netstack: datapath.netstack.clone(),
                dns: dns.clone(),
                ingress: ingress_tx,
                follow_lazy: cfg.lazy.is_none(),
            },
            self.lifeline(),
        ));
        // ICE: STUN from the WireGuard socket goes to the negotiator's agents.
        let ice = cfg.ice.enabled.then(|| {
            let (stun_tx, stun_rx) = mpsc::channel(crate::wg::device::STUN_QUEUE);
            datapath.wg.report_stun(stun_tx.clone());
            let port = datapath.ready.wireguard.port();
            let ipv6 = datapath.ready.wireguard.is_ipv6();
            super::negotiation::IceSetup {
                net: crate::ice::LocalNet {
                    port,
                    host_ips: host_addresses(ipv6, local_address),
                    overlay: Some(local_address.trunc()),
                },
                stuns: stun_settings_rx,
                inbox: stun_rx,
                stun_tx,
                turns: turn_settings_rx,
                force_relay: cfg.ice.force_relay_peers.clone(),
            }
        });
        let negotiator = Negotiator {
            own_key: cfg.key_string(),
            wg: datapath.wg.clone(),
            signal,
            relays,
            wg_port: datapath.ready.wireguard.port(),
            ice,
            // Following management, its first map says before any peer is added.
            lazy: cfg.lazy.unwrap_or(false),
            lazy_inactivity: cfg.lazy_inactivity,
        };
        let (wanted_tx, wanted_rx) = mpsc::channel(64);
        datapath.wg.report_wanted_peers(wanted_tx);
        state
            .tasks
            .spawn(negotiator.run(events_rx, inbox_rx, wanted_rx, self.cancel.clone()));
        Ok(datapath.ready)
    }
}

fn signal_client(
    host: &HostConfig,
    private_key: [u8; 32],
    cancel: CancellationToken,
) -> Result<Arc<SignalClient>, EngineError> {
    let tls = host.protocol == Protocol::Https as i32;
    Ok(SignalClient::new(&host.uri, tls, private_key, cancel)?)
}

/// Apply network-map updates to the data path until the stream ends or the engine stops. A
/// stream failure or an address change asks the supervisor for a new engine.
/// Where network maps come from, and how to reopen the stream.
struct SyncSource {
    url: String,
    private_key: [u8; 32],
    /// What we say about ourselves when the stream is reopened.
    meta: crate::control::management::PeerSystemMeta,
    stream: crate::control::management_client::SyncStream,
    /// Up while a network map has arrived on the open stream (for status).
    synced: Arc<AtomicBool>,
    /// How big the map is and what applying it cost (for status).
    map: Arc<crate::status::MapCounters>,
}

impl SyncSource {
    /// Reopen the Sync stream with backoff (the data path keeps running meanwhile). Returns
    /// false when the engine must be rebuilt instead: the peer is no longer registered.
    async fn reconnect(&mut self, life: &Lifeline) -> bool {
        let mut delays = crate::engine::supervisor::backoff();
        loop {
            let delay = delays.next().unwrap_or(Duration::from_secs(15));
            tokio::select! {
                _ = life.cancel.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            let attempt = async {
                let mut client = ManagementClient::connect(&self.url, self.private_key).await?;
                client.sync(self.meta.clone()).await
            };
            let result = tokio::select! {
                _ = life.cancel.cancelled() => return false,
                r = attempt => r,
            };
            match result {
                Ok(stream) => {
                    info!("management sync stream reopened");
                    self.stream = stream;
                    return true;
                }
                Err(ManagementError::Rpc {
                    code: tonic::Code::PermissionDenied,
                    message,
                }) => {
                    warn!("management: {message}; rebuilding the engine");
                    return false;
                }
                Err(e) => warn!("management sync: {e}; retrying"),
            }
        }
    }
}

/// Where the network map's changes go.
struct MapSinks {
    /// WireGuard peers and their allowed IPs.
    wg: Arc<WgDevice>,
    /// Peers joining and leaving, for the negotiator.
    events: mpsc::Sender<PeerEvent>,
    /// Relay URLs and token, for the relays.
    relay_settings: tokio::sync::watch::Sender<Option<crate::control::mesh::RelaySettings>>,
    /// STUN server URIs, for ICE.
    stun_settings: tokio::sync::watch::Sender<Vec<String>>,
    /// TURN servers, for ICE's relay candidates.
    turn_settings: tokio::sync::watch::Sender<Vec<crate::control::mesh::TurnServer>>,
    /// Peer names, for the resolver.
    names: MeshNames,
    /// The map's routes, for the networks task.
    routes: tokio::sync::watch::Sender<Vec<crate::route::Route>>,
    /// Where the access rules go.
    netstack: crate::netstack::Netstack,
    /// Where the DNS configuration goes.
    dns: crate::dns::DnsState,
    /// Ingress ports, for the networks task.
    ingress: tokio::sync::watch::Sender<Vec<crate::forward::ingress::IngressRule>>,
    /// Whether management's lazy-connection setting goes to the negotiator (no local choice).
    follow_lazy: bool,
}

async fn follow_sync(
    mut source: SyncSource,
    mut mesh: MeshState,
    own_key: String,
    sinks: MapSinks,
    life: Lifeline,
) {
    let MapSinks {
        wg,
        events,
        relay_settings,
        stun_settings,
        turn_settings,
        names,
        routes,
        netstack,
        dns,
        ingress,
        follow_lazy,
    } = sinks;
    loop {
        let update = tokio::select! {
            _ = life.cancel.cancelled() => return,
            u = source.stream.next_encoded() => u,
        };
        let update = match update {
            Ok(u) => u,
            Err(e) => {
                // Open connections keep flowing while we reconnect; the first map of a new
                // stream is a full snapshot, whatever its serial.
                warn!("management sync: {e}; reconnecting");
                source.synced.store(false, Ordering::Relaxed);
                if !source.reconnect(&life).await {
                    break;
                }
                mesh.serial = 0;
                continue;
            }
        };
        let applying = std::time::Instant::now();
        let changes = match mesh.apply_encoded(&bytes::Bytes::from(update), &own_key) {
            Ok(c) => c,
            Err(e) => {
                warn!("network map rejected: {e}");
                continue;
            }
        };
        for change in changes {
            match change {
                Change::PeerAdded(p) | Change::PeerChanged(p) => {
                    debug!(peer = %p.fqdn, "peer added");
                    names.set(&p.key, &p.fqdn, MeshState::overlay_ip(&p));
                    wg.add_peer(peer_spec(&p));
                    let _ = events.send(PeerEvent::Added(p)).await;
                }
                Change::PeerRemoved(key) => {
                    names.remove(&key);
                    if let Ok(k) = crate::control::envelope::parse_key_string(&key) {
                        wg.remove_peer(&k);
                    }
                    let _ = events.send(PeerEvent::Removed(key)).await;
                }
                Change::AddressChanged { old, new } => {
                    info!(%old, %new, "our address changed; rebuilding the engine");
                    life.request_rebuild();
                    return;
                }
                Change::Relay(settings) => {
                    // A refreshed token, moved URLs, or the relay disabled.
                    relay_settings.send_replace(settings);
                }
                Change::Stuns(uris) => {
                    stun_settings.send_replace(uris);
                }
                Change::Turns(servers) => {
                    turn_settings.send_replace(servers);
                }
                Change::Routes(list) => {
                    info!(routes = list.len(), "routes from management");
                    let groups = super::ha_groups::HaGroups::from_routes(&list);
                    let _ = events.send(PeerEvent::HaGroups(groups)).await;
                    routes.send_replace(list);
                }
                Change::LazyConnections(on) => {
                    if follow_lazy {
                        let _ = events.send(PeerEvent::Lazy(on)).await;
                    } else {
                        debug!(management = on, "lazy connections: the local setting stands");
                    }
                }
                Change::PeerAcl(acl) => {
                    if acl.is_open() {
                        debug!("no access rules from management: inbound flows are open");
                    } else {
                        info!(rules = acl.len(), "access rules for inbound flows applied");
                    }
                    netstack.set_peer_acl(acl);
                }
                Change::RouteAcl(acl) => {
                    debug!(rules = acl.len(), "rules for routed flows applied");
                    netstack.set_route_acl(acl);
                }
                Change::Ingress(rules) => {
                    ingress.send_replace(rules);
                }
                Change::Dns(config) => {
                    debug!(
                        zones = config.zones.len(),
                        nameserver_groups = config.groups.len(),
                        "DNS configuration applied"
                    );
                    dns.set_config(config);
                }
                Change::Refused(reason) => warn!("network map: {reason}"),
                Change::PeerRenamed { key, fqdn } => {
                    names.set(&key, &fqdn, mesh.peer(&key).and_then(MeshState::overlay_ip));
                }
                Change::Signal(_) => {}
            }
        }
        if let Some(local) = &mesh.local {
            names.set(&own_key, &local.fqdn, Some(local.address.addr()));
        }
        source.map.applied(mesh.serial, mesh.peer_count(), applying.elapsed());
        if !source.synced.swap(true, Ordering::Relaxed) {
            info!(peers = mesh.peer_count(), "network map received");
        }
    }
    if !life.cancel.is_cancelled() {
        life.request_rebuild();
    }
}

/// Our host candidates' addresses (ice.md §2): every address of every up interface, except
/// loopback, link-local, our overlay address, and interfaces NetBird's client leaves out
/// (tunnels, containers' bridges); IPv6 only on a dual-stack socket.
fn host_addresses(ipv6: bool, overlay: ipnet::IpNet) -> Vec<std::net::IpAddr> {
    const SKIP: &[&str] = &[
        "wt",
        "utun",
        "tun",
        "zt",
        "ZeroTier",
        "wg",
        "ts",
        "Tailscale",
        "tailscale",
        "docker",
        "veth",
        "br-",
        "lo",
    ];
    let Ok(interfaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut out: Vec<std::net::IpAddr> = interfaces
        .into_iter()
        .filter(|i| !i.is_loopback() && !SKIP.iter().any(|p| i.name.starts_with(p)))
        .map(|i| i.ip())
        .filter(|ip| match ip {
            std::net::IpAddr::V4(v4) => !v4.is_link_local(),
            std::net::IpAddr::V6(v6) => ipv6 && !v6.is_unicast_link_local() && !v6.is_loopback(),
        })
        .filter(|ip| !overlay.contains(ip) && crate::ice::candidate::usable(*ip))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn peer_spec(p: &RemotePeer) -> PeerSpec {
    PeerSpec {
        public_key: p.public_key,
        preshared_key: None,
        endpoint: None,
        allowed_ips: p.allowed_ips.clone(),
        persistent_keepalive: Some(PEER_KEEPALIVE),
    }
}

