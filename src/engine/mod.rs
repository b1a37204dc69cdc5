//! Builds the data path from a configuration and runs it as one unit.
//!
//! Everything started here hangs off one cancellation token and one `JoinSet`: cancelling the
//! token stops the listeners, the netstack and the WireGuard device, and `run_static` returns only
//! after they have finished (bounded by `SHUTDOWN_GRACE`), so ports are free when it returns.
//! The NetBird engine of the control-plane issue will drive the same pieces.

pub mod ha_groups;
pub mod negotiation;
pub mod netbird;
pub mod networks;
pub mod relays;
pub mod supervisor;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dns::{DnsState, MeshNames, Resolver};
use crate::netstack::{Congestion, Netstack, NetstackConfig};
use crate::packet::PacketPool;
use crate::proxy::admission::Limits;
use crate::proxy::dial::Dialer;
use crate::proxy::unix::{ListenAddr, UnixSocketListener};
use crate::proxy::{Credentials, Expose, Forward, forward, http, socks5};
use crate::status::{EngineView, ListenerMetrics, StatusHub};
use crate::wg::config::Endpoint;
use crate::wg::{PeerSpec, WgConfig, WgDevice};

/// How long tasks get to finish after cancellation.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// Packets in flight between WireGuard and the netstack, per direction.
const PACKET_CHANNEL: usize = 1024;
/// Idle packet buffers kept for reuse.
const POOL_IDLE: usize = 4096;

/// The listeners and policies of the proxy side.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    pub socks: Vec<ListenAddr>,
    pub http: Vec<ListenAddr>,
    /// Permissions of Unix-socket listeners.
    pub unix_mode: u32,
    /// SOCKS5 and HTTP on one port each (`--proxy`).
    pub proxy: Vec<SocketAddr>,
    pub forwards: Vec<Forward>,
    pub exposes: Vec<Expose>,
    pub socks_auth: Option<Credentials>,
    pub http_auth: Option<Credentials>,
    pub allow_direct: bool,
    pub connect_timeout: Duration,
    /// Congestion control of the mesh-side TCP connections.
    pub congestion: Congestion,
    /// Bytes of full-size TCP socket buffers (see `NetstackConfig::tcp_buffer_budget`); `None`
    /// keeps the netstack's default.
    pub tcp_buffer_budget: Option<usize>,
    /// Hard cap on all TCP buffer bytes (see `NetstackConfig::buffer_cap`); `None` keeps the
    /// netstack's default.
    pub buffer_cap: Option<usize>,
    /// Where the engine reports its state and the listeners count requests (`--status-addr`).
    pub status: Option<Arc<StatusHub>>,
    /// Connection caps and the clients' handshake timeout, shared by every listener.
    pub limits: Limits,
    /// Where each data path, once up, publishes its handles for the library's front door
    /// (`Peer::dial`, `Peer::listen`).
    pub publish: Option<Publish>,
}

/// A running data path's handles, valid until `cancel` fires (the engine that made them
/// stopped); the front door reads them instead of reaching into the engine.
#[derive(Clone)]
pub struct LiveDataPath {
    pub dialer: Dialer,
    pub netstack: Netstack,
    pub cancel: CancellationToken,
}

impl fmt::Debug for LiveDataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveDataPath")
            .field("addresses", &self.netstack.addresses())
            .finish_non_exhaustive()
    }
}

/// The slot the engines publish their data paths in, one after another.
pub type Publish = Arc<tokio::sync::watch::Sender<Option<LiveDataPath>>>;

/// Empty the slot when it holds a data path that was cancelled: its handles keep the
/// WireGuard socket open, and a successor binding the same port must find it closed.
pub(crate) fn unpublish(publish: &Option<Publish>) {
    if let Some(p) = publish {
        p.send_if_modified(|live| {
            let stale = live.as_ref().is_some_and(|l| l.cancel.is_cancelled());
            if stale {
                *live = None;
            }
            stale
        });
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("cannot resolve Endpoint {endpoint} of the [Peer] at line {line}: {reason}")]
    Endpoint {
        endpoint: String,
        line: usize,
        reason: String,
    },
    #[error("cannot open the WireGuard UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot expose mesh port {port}: {reason}")]
    Expose { port: u16, reason: String },
    #[error("cannot listen on unix:{} for {what}: {source}", path.display())]
    ListenUnix {
        path: std::path::PathBuf,
        what: &'static str,
        source: crate::proxy::unix::UnixBindError,
    },
    #[error("cannot listen on {addr} for {what}: {source}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

/// What is up once the engine is ready.
#[derive(Debug)]
pub struct Ready {
    pub mesh: Vec<IpNet>,
    pub wireguard: SocketAddr,
    /// (kind, bound address, detail) per listener.
    pub listeners: Vec<(&'static str, SocketAddr, String)>,
    /// (kind, path) per Unix-socket listener.
    pub unix: Vec<(&'static str, std::path::PathBuf)>,
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mesh: Vec<String> = self.mesh.iter().map(|n| n.to_string()).collect();
        write!(f, "netbird-proxy ready: mesh {}", mesh.join(","))?;
        for (kind, addr, detail) in &self.listeners {
            write!(f, "; {kind} {addr}{detail}")?;
        }
        for (kind, path) in &self.unix {
            write!(f, "; {kind} unix:{}", path.display())?;
        }
        write!(f, "; wireguard udp {}", self.wireguard)
    }
}

/// Run a static WireGuard configuration with the given listeners until `cancel` fires.
/// `on_ready` is called once every listener is bound.
pub async fn run_static(
    config: WgConfig,
    options: ProxyOptions,
    cancel: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), DataPathError> {
    let mut tasks = JoinSet::new();
    let options_status = options.status.clone();
    let publish = options.publish.clone();
    let result = start_static(config, options, &cancel, &mut tasks, on_ready).await;
    if result.is_ok() {
        cancel.cancelled().await;
    }
    // One teardown path, for a failed start and for a stop alike.
    cancel.cancel();
    unpublish(&publish);
    if let Some(hub) = &options_status {
        hub.detach();
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!("some tasks did not stop in time; aborting them");
        tasks.abort_all();
    }
    result
}

async fn start_static(
    config: WgConfig,
    options: ProxyOptions,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<()>,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), DataPathError> {
    for (line, key) in &config.ignored {
        warn!("line {line}: `{key}` configures a kernel interface and is ignored");
    }
    let mut peers = Vec::with_capacity(config.peers.len());
    for p in &config.peers {
        let endpoint = match &p.endpoint {
            None => None,
            Some(Endpoint::Addr(a)) => Some(*a),
            Some(Endpoint::Host(host, port)) => Some(resolve_endpoint(host, *port, p.line).await?),
        };
        peers.push(PeerSpec {
            public_key: p.public_key.0,
            preshared_key: p.preshared_key.as_ref().map(|k| k.0),
            endpoint,
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
        });
    }

    let spec = DataPathSpec {
        private_key: config.interface.private_key.0,
        listen_port: config.interface.listen_port.unwrap_or(0),
        addresses: config.interface.addresses.clone(),
        mtu: config.mtu() as usize,
        peers,
        dns_servers: config.interface.dns.clone(),
        dns_search: config.interface.dns_search.clone(),
        names: MeshNames::default(),
        dns: None,
    };
    let hub = options.status.clone();
    let datapath = start_datapath(spec, options, cancel, tasks).await?;
    if let Some(hub) = hub {
        hub.attach(EngineView {
            wg: datapath.wg.clone(),
            mesh: datapath.ready.mesh.clone(),
            fqdn: String::new(),
            names: MeshNames::default(),
            routes: None,
            gates: Some(datapath.netstack.gate_counters().clone()),
            control: None,
        });
    }
    on_ready(&datapath.ready);
    Ok(())
}

/// What the data path is built from, whatever configured it (a wg-quick file or management).
pub struct DataPathSpec {
    pub private_key: [u8; 32],
    pub listen_port: u16,
    pub addresses: Vec<IpNet>,
    pub mtu: usize,
    pub peers: Vec<PeerSpec>,
    pub dns_servers: Vec<std::net::IpAddr>,
    pub dns_search: Vec<String>,
    /// Peer names from the network map (empty for a static config).
    pub names: MeshNames,
    /// NetBird's DNS (zones, nameserver groups, DNS routes), fed by the engine; None builds
    /// it from `dns_servers` and `dns_search`.
    pub dns: Option<DnsState>,
}

/// A running data path: its tasks are in the `JoinSet` given to `start_datapath`.
pub struct DataPath {
    pub wg: Arc<WgDevice>,
    pub netstack: Netstack,
    pub ready: Ready,
    /// Where relay clients deliver the datagrams they receive.
    pub relay_inbound: mpsc::Sender<crate::relay::client::Relayed>,
}

/// Build WireGuard, the netstack, the dialler and every listener; each task goes into `tasks`
/// under a child of `cancel`. On error, what was started is already in `tasks` for the
/// caller's one teardown path.
pub async fn start_datapath(
    spec: DataPathSpec,
    options: ProxyOptions,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<DataPath, DataPathError> {
    let mtu = spec.mtu;
    // Room for the inner packet plus WireGuard's header and tag; at least a full Ethernet-sized
    // packet, since a peer with a larger MTU than ours may send one.
    let pool = Arc::new(PacketPool::new(mtu.max(1500) + 64, POOL_IDLE));
    let wg = WgDevice::new(spec.private_key, spec.listen_port, spec.peers, pool.clone())
        .map_err(DataPathError::Socket)?;
    let wg = Arc::new(wg);
    let wg_addr = wg.local_addr().map_err(DataPathError::Socket)?;

    let (to_stack, from_wg) = mpsc::channel(PACKET_CHANNEL);
    let (to_wg, from_stack) = mpsc::channel(PACKET_CHANNEL);
    let (netstack, stack_task) = Netstack::new(
        {
            let defaults = NetstackConfig::new(spec.addresses.clone(), mtu);
            NetstackConfig {
                congestion: options.congestion,
                tcp_buffer_budget: options
                    .tcp_buffer_budget
                    .unwrap_or(defaults.tcp_buffer_budget),
                buffer_cap: options.buffer_cap.unwrap_or(defaults.buffer_cap),
                ..defaults
            }
        },
        from_wg,
        to_wg,
        pool,
        cancel.child_token(),
    );
    tasks.spawn(stack_task);
    let (relay_inbound, relayed) = mpsc::channel(PACKET_CHANNEL);
    tasks.spawn(
        wg.clone()
            .run(to_stack, from_stack, relayed, cancel.child_token()),
    );

    let dns_state = match spec.dns {
        Some(state) => state,
        None => {
            let mut dns = Vec::new();
            for server in &spec.dns_servers {
                if wg.route(*server).is_some() {
                    dns.push(*server);
                } else {
                    warn!(%server, "DNS server is outside every peer's AllowedIPs; not used");
                }
            }
            DnsState::with_static(dns, spec.dns_search)
        }
    };
    let resolver = Resolver::new(netstack.clone(), wg.clone(), spec.names, dns_state);
    if resolver.uses_tunnel() {
        info!("host names resolve through the tunnel");
    }
    let dialer = Dialer::new(
        netstack.clone(),
        wg.clone(),
        resolver,
        options.allow_direct,
        options.connect_timeout,
    );

    let mut ready = Ready {
        mesh: spec.addresses,
        wireguard: wg_addr,
        listeners: Vec::new(),
        unix: Vec::new(),
    };
    let metrics = |kind: &'static str, configured: SocketAddr, bound: SocketAddr| {
        let m = match &options.status {
            Some(hub) => hub.listener(kind, configured, bound),
            None => Arc::new(ListenerMetrics::new(kind, configured, bound)),
        };
        if kind != "expose" {
            m.set_max_connections(options.limits.per_listener);
        }
        m
    };
    let socks_auth = options.socks_auth.map(Arc::new);
    let http_auth = options.http_auth.map(Arc::new);
    let unix_metrics = |kind: &'static str, path: &std::path::Path| {
        let m = match &options.status {
            Some(hub) => hub.unix_listener(kind, path),
            None => Arc::new(ListenerMetrics::new_unix(kind, path)),
        };
        m.set_max_connections(options.limits.per_listener);
        m
    };
    for (protocol, listens, auth) in [
        (Protocol::Socks5, &options.socks, &socks_auth),
        (Protocol::Http, &options.http, &http_auth),
    ] {
        let kind = protocol.kind();
        for listen in listens {
            let serve = Serve {
                protocol,
                limits: options.limits.clone(),
                dialer: dialer.clone(),
                auth: auth.clone(),
                cancel: cancel.child_token(),
            };
            match listen {
                ListenAddr::Tcp(addr) => {
                    let l = bind(*addr, kind).await?;
                    let bound = l.local_addr().unwrap_or(*addr);
                    ready.listeners.push((kind, bound, String::new()));
                    serve.spawn(tasks, l, metrics(kind, *addr, bound));
                }
                ListenAddr::Unix(path) => {
                    let l = bind_unix(path, options.unix_mode, kind)?;
                    ready.unix.push((kind, path.clone()));
                    serve.spawn(tasks, l, unix_metrics(kind, path));
                }
            }
        }
    }
    for addr in &options.proxy {
        let l = bind(*addr, "proxy").await?;
        let bound = l.local_addr().unwrap_or(*addr);
        ready.listeners.push(("proxy", bound, String::new()));
        tasks.spawn(crate::proxy::mixed::serve(
            l,
            metrics("proxy", *addr, bound),
            options.limits.clone(),
            dialer.clone(),
            socks_auth.clone(),
            http_auth.clone(),
            cancel.child_token(),
        ));
    }
    for f in options.forwards.iter().filter(|f| !f.udp) {
        let l = bind(f.listen, "forward").await?;
        let bound = l.local_addr().unwrap_or(f.listen);
        ready
            .listeners
            .push(("forward", bound, format!("->{}", f.target)));
        tasks.spawn(forward::serve(
            l,
            metrics("forward", f.listen, bound),
            options.limits.clone(),
            dialer.clone(),
            f.target.clone(),
            cancel.child_token(),
        ));
    }
    for e in options.exposes.iter().filter(|e| !e.udp) {
        let listener = netstack
            .listen(e.mesh_port)
            .await
            .map_err(|err| DataPathError::Expose {
                port: e.mesh_port,
                reason: err.to_string(),
            })?;
        let mesh_addr = spec_first_addr(&ready.mesh, e.mesh_port);
        ready
            .listeners
            .push(("expose", mesh_addr, format!("->{}", e.local)));
        tasks.spawn(crate::proxy::forward::serve_exposed(
            listener,
            metrics("expose", mesh_addr, mesh_addr),
            e.local,
            options.limits.idle_timeout,
            cancel.child_token(),
        ));
    }
    // UDP after TCP: the ready line lists TCP forwards and exposes first.
    for f in options.forwards.iter().filter(|f| f.udp) {
        let socket = tokio::net::UdpSocket::bind(f.listen)
            .await
            .map_err(|source| DataPathError::Listen {
                addr: f.listen,
                what: "UDP forward",
                source,
            })?;
        let bound = socket.local_addr().unwrap_or(f.listen);
        ready
            .listeners
            .push(("forward", bound, format!("->{}/udp", f.target)));
        tasks.spawn(crate::proxy::udp::flows::serve_forward(
            socket,
            metrics("forward-udp", f.listen, bound),
            options.limits.per_listener,
            options.limits.udp_idle_timeout,
            dialer.clone(),
            f.target.clone(),
            cancel.child_token(),
        ));
    }
    for e in options.exposes.iter().filter(|e| e.udp) {
        let socket =
            netstack
                .udp_serve(e.mesh_port)
                .await
                .map_err(|err| DataPathError::Expose {
                    port: e.mesh_port,
                    reason: err.to_string(),
                })?;
        let mesh_addr = spec_first_addr(&ready.mesh, e.mesh_port);
        ready
            .listeners
            .push(("expose", mesh_addr, format!("->{}/udp", e.local)));
        tasks.spawn(crate::proxy::udp::flows::serve_exposed(
            socket,
            metrics("expose-udp", mesh_addr, mesh_addr),
            e.local,
            options.limits.per_listener,
            options.limits.udp_idle_timeout,
            cancel.child_token(),
        ));
    }
    if let Some(publish) = &options.publish {
        publish.send_replace(Some(LiveDataPath {
            dialer,
            netstack: netstack.clone(),
            cancel: cancel.clone(),
        }));
    }
    Ok(DataPath {
        wg,
        netstack,
        ready,
        relay_inbound,
    })
}

/// The protocols a listener of `--socks` or `--http` speaks.
#[derive(Clone, Copy)]
enum Protocol {
    Socks5,
    Http,
}

impl Protocol {
    fn kind(self) -> &'static str {
        match self {
            Protocol::Socks5 => "socks5",
            Protocol::Http => "http",
        }
    }
}

/// What serving one SOCKS5 or HTTP listener needs, whatever it listens on (TCP or a Unix
/// socket).
struct Serve {
    protocol: Protocol,
    limits: Limits,
    dialer: Dialer,
    auth: Option<Arc<Credentials>>,
    cancel: CancellationToken,
}

impl Serve {
    fn spawn<L: crate::proxy::Accept>(
        self,
        tasks: &mut JoinSet<()>,
        listener: L,
        metrics: Arc<ListenerMetrics>,
    ) {
        let Serve {
            protocol,
            limits,
            dialer,
            auth,
            cancel,
        } = self;
        match protocol {
            Protocol::Socks5 => {
                tasks.spawn(socks5::serve(listener, metrics, limits, dialer, auth, cancel))
            }
            Protocol::Http => {
                tasks.spawn(http::serve(listener, metrics, limits, dialer, auth, cancel))
            }
        };
    }
}

/// Our first mesh address with `port`, for display.
fn spec_first_addr(mesh: &[IpNet], port: u16) -> SocketAddr {
    let ip = mesh
        .first()
        .map(|n| n.addr())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    SocketAddr::new(ip, port)
}

fn bind_unix(
    path: &std::path::Path,
    mode: u32,
    what: &'static str,
) -> Result<UnixSocketListener, DataPathError> {
    UnixSocketListener::bind(path, mode).map_err(|source| DataPathError::ListenUnix {
        path: path.to_path_buf(),
        what,
        source,
    })
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, DataPathError> {
    crate::proxy::listen_tcp(addr).map_err(|source| DataPathError::Listen { addr, what, source })
}

async fn resolve_endpoint(host: &str, port: u16, line: usize) -> Result<SocketAddr, DataPathError> {
    let fail = |reason: String| DataPathError::Endpoint {
        endpoint: format!("{host}:{port}"),
        line,
        reason,
    };
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| fail(e.to_string()))?;
    addrs.next().ok_or_else(|| fail("no address".into()))
}
