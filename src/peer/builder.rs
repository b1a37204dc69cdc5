//! `PeerBuilder`: every option the command line has, as methods, gathered before anything
//! starts. Building checks the options and reads files; nothing touches the network until
//! [`PeerBuilder::spawn`] or [`PeerBuilder::start`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::ProxyOptions;
use crate::engine::netbird::{IceOptions, MeshConfig, SetupKey};
use crate::engine::networks::NetworkOptions;
use crate::netstack::Congestion;
use crate::proxy::admission::Limits;
use crate::proxy::{Credentials, Expose, Forward, ListenAddr};
use crate::route::Selection;
use crate::wg::WgConfig;

use super::{Error, Peer, Ready};

/// NetBird's hosted management service, where a setup key from app.netbird.io belongs.
pub const DEFAULT_MANAGEMENT_URL: &str = crate::control::management_client::DEFAULT_MANAGEMENT_URL;

/// How long a lazily connected peer may be without data before it is idled (NetBird's
/// default inactivity threshold).
const DEFAULT_LAZY_INACTIVITY: Duration = Duration::from_secs(15 * 60);

/// How long [`PeerBuilder::start`] waits for the peer to be ready unless told.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the peer's WireGuard private key comes from.
#[derive(Clone)]
enum Identity {
    /// A new key for this run: management registers a new peer each time.
    Fresh,
    Key([u8; 32]),
    /// A state file, created on first use: the same peer (name, mesh IP) across runs.
    File(PathBuf),
}

/// A WireGuard configuration in wg-quick's format (`[Interface]`, `[Peer]`), for a peer of
/// fixed WireGuard peers rather than a NetBird account.
#[derive(Clone)]
pub struct WireGuardConfig(pub(crate) WgConfig);

impl WireGuardConfig {
    /// Read and check a wg-quick file.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        WgConfig::load(path.as_ref())
            .map(Self)
            .map_err(|e| Error::Config(e.to_string()))
    }
}

impl std::str::FromStr for WireGuardConfig {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        WgConfig::parse(text)
            .map(Self)
            .map_err(|e| Error::Config(e.to_string()))
    }
}

impl std::fmt::Debug for WireGuardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireGuardConfig(<keys redacted>)")
    }
}

/// Options of a [`Peer`], with the command line's defaults.
///
/// ```no_run
/// # async fn run() -> Result<(), netbird_proxy::Error> {
/// let peer = netbird_proxy::Peer::builder()
///     .setup_key(std::env::var("NB_SETUP_KEY").unwrap_or_default())
///     .state_file("/var/lib/my-app/netbird-state")
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `start` or `spawn`"]
pub struct PeerBuilder {
    /// Fixed WireGuard peers instead of a NetBird account.
    wireguard: Option<Box<WgConfig>>,
    management_url: String,
    setup_key: Option<String>,
    hostname: Option<String>,
    identity: Identity,
    /// The NetBird-only options given, to refuse them beside a WireGuard configuration.
    netbird_options: Vec<&'static str>,
    wg_port: u16,
    proxy: ProxyOptions,
    max_connections: usize,
    max_connections_per_listener: usize,
    ice: IceOptions,
    networks: NetworkOptions,
    lazy: LazyConnections,
    lazy_inactivity: Duration,
    ready_peers: usize,
    ready_timeout: Duration,
    status_addr: Option<SocketAddr>,
    on_ready: Option<super::OnReady>,
}

/// Whether mesh peers are set up on first use (see [`PeerBuilder::lazy_connections`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LazyConnections {
    /// Set up on first traffic, idled after the inactivity timeout (this crate's default).
    #[default]
    On,
    /// Every peer of the map set up at once and kept (NetBird's client's default).
    Off,
    /// As the account says (`PeerConfig.LazyConnectionEnabled` in the network map), and
    /// again whenever it changes; off until management has said.
    FollowManagement,
}

impl From<bool> for LazyConnections {
    fn from(on: bool) -> Self {
        if on { Self::On } else { Self::Off }
    }
}

impl std::fmt::Debug for PeerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBuilder").finish_non_exhaustive()
    }
}

impl Default for PeerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerBuilder {
    /// A NetBird peer of NetBird's hosted service, a fresh identity, no listeners.
    pub fn new() -> Self {
        let limits = Limits::new(1024, 4096, Duration::from_secs(10));
        Self {
            wireguard: None,
            management_url: DEFAULT_MANAGEMENT_URL.into(),
            setup_key: None,
            hostname: None,
            identity: Identity::Fresh,
            netbird_options: Vec::new(),
            wg_port: 0,
            proxy: ProxyOptions {
                unix_mode: 0o600,
                allow_direct: true,
                connect_timeout: Duration::from_secs(10),
                limits,
                ..ProxyOptions::default()
            },
            max_connections: 4096,
            max_connections_per_listener: 1024,
            ice: IceOptions::default(),
            networks: NetworkOptions::default(),
            lazy: LazyConnections::On,
            lazy_inactivity: DEFAULT_LAZY_INACTIVITY,
            ready_peers: 1,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            status_addr: None,
            on_ready: None,
        }
    }

    /// The management service's URL (default [`DEFAULT_MANAGEMENT_URL`]).
    pub fn management_url(mut self, url: impl Into<String>) -> Self {
        self.netbird_options.push("management URL");
        self.management_url = url.into();
        self
    }

    /// The setup key that registers this peer on its first start. A peer already registered
    /// (its key in a [`state_file`](Self::state_file)) needs none.
    pub fn setup_key(mut self, key: impl Into<String>) -> Self {
        self.netbird_options.push("setup key");
        self.setup_key = Some(key.into()).filter(|k| !k.is_empty());
        self
    }

    /// The name the peer registers with (default: this machine's host name).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.netbird_options.push("host name");
        self.hostname = Some(name.into());
        self
    }

    /// Keep the peer's private key in this file (created with mode 0600 on first use), so
    /// every run is the same peer with the same name and mesh address. Without one, each
    /// start registers a new peer.
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.netbird_options.push("state file");
        self.identity = Identity::File(path.into());
        self
    }

    /// Use this WireGuard private key instead of a state file.
    pub fn private_key(mut self, key: [u8; 32]) -> Self {
        self.netbird_options.push("private key");
        self.identity = Identity::Key(key);
        self
    }

    /// Join fixed WireGuard peers instead of a NetBird account (the NetBird options —
    /// management URL, setup key, host name, identity — then have no place: giving one is an
    /// error at start).
    pub fn wireguard(mut self, config: WireGuardConfig) -> Self {
        self.wireguard = Some(Box::new(config.0));
        self
    }

    /// The WireGuard UDP port (default 0: any free port). NetBird peers only; a wg-quick
    /// configuration names its own `ListenPort`.
    pub fn wireguard_port(mut self, port: u16) -> Self {
        self.wg_port = port;
        self
    }

    /// A SOCKS5 listener (TCP or Unix socket).
    pub fn socks(mut self, listen: ListenAddr) -> Self {
        self.proxy.socks.push(listen);
        self
    }

    /// An HTTP proxy listener (TCP or Unix socket).
    pub fn http(mut self, listen: ListenAddr) -> Self {
        self.proxy.http.push(listen);
        self
    }

    /// SOCKS5 and HTTP on one TCP port.
    pub fn proxy(mut self, listen: SocketAddr) -> Self {
        self.proxy.proxy.push(listen);
        self
    }

    /// The permissions of Unix-socket listeners (default 0o600).
    pub fn unix_mode(mut self, mode: u32) -> Self {
        self.proxy.unix_mode = mode;
        self
    }

    /// A local port forwarded to a target through the mesh.
    pub fn forward(mut self, forward: Forward) -> Self {
        self.proxy.forwards.push(forward);
        self
    }

    /// A port on our mesh address passed to a local service.
    pub fn expose(mut self, expose: Expose) -> Self {
        self.proxy.exposes.push(expose);
        self
    }

    /// Credentials SOCKS5 clients must give.
    pub fn socks_auth(mut self, credentials: Credentials) -> Self {
        self.proxy.socks_auth = Some(credentials);
        self
    }

    /// Credentials HTTP proxy clients must give (Basic).
    pub fn http_auth(mut self, credentials: Credentials) -> Self {
        self.proxy.http_auth = Some(credentials);
        self
    }

    /// Refuse targets outside the mesh instead of reaching them from this host (default off).
    pub fn mesh_only(mut self, mesh_only: bool) -> Self {
        self.proxy.allow_direct = !mesh_only;
        self
    }

    /// How long a connection to a target may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.proxy.connect_timeout = timeout;
        self.networks.forwarder.connect_timeout = timeout;
        self
    }

    /// Congestion control of mesh-side TCP connections (default BBR).
    pub fn tcp_congestion(mut self, congestion: Congestion) -> Self {
        self.proxy.congestion = congestion;
        self
    }

    /// Bytes of full-size TCP socket buffers before new connections get smaller ones.
    pub fn tcp_buffer_budget(mut self, bytes: usize) -> Self {
        self.proxy.tcp_buffer_budget = Some(bytes);
        self
    }

    /// Hard cap on all TCP buffer bytes.
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.proxy.buffer_cap = Some(bytes);
        self
    }

    /// Connections on all listeners together (default 4096).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Connections on one listener (default 1024).
    pub fn max_connections_per_listener(mut self, n: usize) -> Self {
        self.max_connections_per_listener = n.max(1);
        self
    }

    /// Time a proxy client has for its greeting and request (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.proxy.limits.handshake_timeout = timeout;
        self
    }

    /// Close proxied connections idle this long (default 15 min; `None`: never).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.proxy.limits.idle_timeout = timeout;
        self
    }

    /// End UDP associations and flows idle this long (default 60 s).
    pub fn udp_idle_timeout(mut self, timeout: Duration) -> Self {
        self.proxy.limits.udp_idle_timeout = timeout;
        self
    }

    /// Direct connections to other peers (ICE); off keeps every peer on the relay.
    pub fn ice(mut self, enabled: bool) -> Self {
        self.ice.enabled = enabled;
        self
    }

    /// Keep this peer (name, mesh IP or key) on the relay.
    pub fn force_relay_peer(mut self, peer: impl Into<String>) -> Self {
        self.ice.force_relay_peers.push(peer.into());
        self
    }

    /// Lazy connections (default on): a peer is set up when there is traffic for it (a
    /// connection, a routed packet) or when it offers, and goes idle again after the
    /// [`lazy_inactivity`](Self::lazy_inactivity) without data. A job that talks to two peers
    /// of an account of thousands then costs what a small account does. Off sets up every
    /// peer of the map at once and keeps it, as NetBird's client does by default. With it on
    /// a NetBird peer is ready once its map is here: [`ready_peers`](Self::ready_peers) is
    /// not waited for, since no peer connects before it is used.
    ///
    /// Takes a [`LazyConnections`] or a `bool` (on or off).
    pub fn lazy_connections(mut self, mode: impl Into<LazyConnections>) -> Self {
        self.netbird_options.push("lazy connections");
        self.lazy = mode.into();
        self
    }

    /// How long a lazily connected peer may go without data either way before it is idled
    /// (default 15 minutes, NetBird's).
    pub fn lazy_inactivity(mut self, timeout: Duration) -> Self {
        self.netbird_options.push("lazy inactivity");
        self.lazy_inactivity = timeout;
        self
    }

    /// Which networks (routes) to use: names to select and to deselect; `all` for every one.
    pub fn networks(mut self, select: &[String], deselect: &[String]) -> Self {
        self.networks.selection = Selection::from_flags(select, deselect);
        self
    }

    /// Use routes other peers offer (default on).
    pub fn client_routes(mut self, enabled: bool) -> Self {
        self.networks.disable_client_routes = !enabled;
        self
    }

    /// Route for other peers when management makes us a routing peer (default on).
    pub fn server_routes(mut self, enabled: bool) -> Self {
        self.networks.disable_server_routes = !enabled;
        self
    }

    /// As a routing peer, also forward to this host's own addresses (default off).
    pub fn route_to_host(mut self, allowed: bool) -> Self {
        self.networks.forwarder.allow_host = allowed;
        self
    }

    /// Ready once this many other peers have a recent WireGuard handshake (default 1; 0 for
    /// a peer that may be alone in its mesh). A NetBird peer also needs its network map from
    /// management.
    pub fn ready_peers(mut self, n: usize) -> Self {
        self.ready_peers = n;
        self
    }

    /// How long [`start`](Self::start) waits for the peer to be ready (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Serve `/status`, `/metrics`, `/healthz` and `/readyz` over HTTP on this address.
    pub fn status_endpoint(mut self, addr: SocketAddr) -> Self {
        self.status_addr = Some(addr);
        self
    }

    /// Called each time the peer's data path is up: at start, and again after a rebuild.
    pub fn on_ready(mut self, f: impl Fn(&Ready) + Send + Sync + 'static) -> Self {
        self.on_ready = Some(Arc::new(f));
        self
    }

    /// Start the peer in the background and return at once; [`Peer::ready`] waits for it.
    /// Fails only for options that cannot work (a state file that cannot be read, a status
    /// address that cannot be bound).
    pub async fn spawn(self) -> Result<Peer, Error> {
        self.into_plan()?.spawn().await
    }

    /// Start the peer and wait until it is ready (see [`Peer::ready`]), at most the
    /// [`ready_timeout`](Self::ready_timeout); a peer not ready by then is stopped.
    pub async fn start(self) -> Result<Peer, Error> {
        let timeout = self.ready_timeout;
        let peer = self.spawn().await?;
        match peer.ready_within(timeout).await {
            Ok(()) => Ok(peer),
            Err(e) => {
                let _ = peer.stop().await;
                Err(e)
            }
        }
    }

    /// Check the options and read what they name.
    fn into_plan(mut self) -> Result<super::Plan, Error> {
        let connect_timeout = self.proxy.connect_timeout;
        self.proxy.limits = Limits {
            idle_timeout: self.proxy.limits.idle_timeout,
            udp_idle_timeout: self.proxy.limits.udp_idle_timeout,
            ..Limits::new(
                self.max_connections_per_listener,
                self.max_connections,
                self.proxy.limits.handshake_timeout,
            )
        };
        let mut logout = None;
        let run = match self.wireguard {
            Some(_) if !self.netbird_options.is_empty() => {
                self.netbird_options.dedup();
                return Err(Error::Config(format!(
                    "a WireGuard configuration joins fixed peers, not a NetBird account: \
                     leave out the {}",
                    self.netbird_options.join(", ")
                )));
            }
            Some(config) => super::Run::Static(Box::new((*config, self.proxy))),
            None => {
                let (management_url, setup_key, hostname, identity) = (
                    self.management_url,
                    self.setup_key,
                    self.hostname,
                    self.identity,
                );
                let (private_key, state) = match identity {
                    Identity::Fresh => (rand::random(), None),
                    Identity::Key(k) => (k, None),
                    Identity::File(path) => {
                        let id = crate::control::identity::Identity::load_or_create(&path)
                            .map_err(|e| Error::Config(e.to_string()))?;
                        (id.private_key, Some(path))
                    }
                };
                logout = Some(super::Logout {
                    management_url: management_url.clone(),
                    private_key,
                    state,
                });
                super::Run::Netbird(Box::new(MeshConfig {
                    management_url,
                    setup_key: setup_key.map(SetupKey),
                    hostname: hostname.unwrap_or_else(host_name),
                    private_key,
                    wg_port: self.wg_port,
                    proxy: self.proxy,
                    ice: self.ice,
                    networks: self.networks,
                    lazy: match self.lazy {
                        LazyConnections::On => Some(true),
                        LazyConnections::Off => Some(false),
                        LazyConnections::FollowManagement => None,
                    },
                    lazy_inactivity: self.lazy_inactivity,
                }))
            }
        };
        // Lazily, no peer connects before it is used: readiness is the map alone. Following
        // management, whether it will be lazy is not known before its map.
        let ready_peers = match &run {
            super::Run::Netbird(c) if c.lazy != Some(false) => 0,
            _ => self.ready_peers,
        };
        Ok(super::Plan {
            status_addr: self.status_addr,
            ready_peers,
            connect_timeout,
            on_ready: self.on_ready,
            logout,
            run,
        })
    }
}

/// This machine's host name, as NetBird's client registers.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "netbird-proxy".into())
}
