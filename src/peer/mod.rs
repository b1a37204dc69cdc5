//! The front door: a [`Peer`] of a NetBird mesh (or of fixed WireGuard peers) inside a tokio
//! program.
//!
//! A `Peer` owns one supervised engine: the supervisor builds an engine, rebuilds it after a
//! failure, and ends only on [`Peer::stop`] or a failure no retry can fix. What a program
//! needs from the mesh goes through the peer's handles — [`Peer::dial`], [`Peer::listen`],
//! [`Peer::bind_udp`] — which always use the engine that is up now, so they outlive rebuilds;
//! the engine publishes its data path for them (it is never reached into).

mod builder;
mod stream;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::netbird::{EngineError, MeshConfig};
use crate::engine::supervisor::Supervisor;
use crate::engine::{LiveDataPath, ProxyOptions};
use crate::status::{Mode, Snapshot, StatusHub};
use crate::wg::WgConfig;

pub use builder::{DEFAULT_MANAGEMENT_URL, LazyConnections, PeerBuilder, WireGuardConfig};
pub use stream::{MeshListener, MeshStream, MeshUdpSocket};

/// How often readiness is looked at while waiting for it.
const READY_POLL: Duration = Duration::from_millis(50);
/// Bound on the goodbye to management in [`Peer::logout`].
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a peer could not start, connect or go on.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option or a file it names cannot work; retrying will not help.
    #[error("{0}")]
    Config(String),
    /// The management service refused this peer (no or a rejected setup key, a bad URL).
    #[error("{0}")]
    LoginRefused(String),
    /// The peer stopped for good after a failure no retry can fix.
    #[error("{0}")]
    Failed(String),
    /// The peer was not ready in time; `reason` says what it still waits for.
    #[error("not ready after {waited:.1?}: {reason}")]
    NotReady {
        /// How long was waited.
        waited: Duration,
        /// What readiness still lacks, as `netbird-proxy status` says it.
        reason: String,
    },
    /// The peer was stopped.
    #[error("the peer is stopped")]
    Stopped,
    /// A connection could not be made.
    #[error("{0}")]
    Connect(String),
    /// A port on our mesh address could not be taken.
    #[error("cannot use mesh port {port}: {reason}")]
    Listen {
        /// The port asked for.
        port: u16,
        /// Why not.
        reason: String,
    },
    /// The status endpoint could not be bound.
    #[error("cannot listen on {addr} for the status endpoint: {reason}")]
    StatusEndpoint {
        /// The address asked for.
        addr: SocketAddr,
        /// Why not.
        reason: String,
    },
}

impl Error {
    fn from_engine(e: EngineError) -> Self {
        use crate::control::management_client::ManagementError as M;
        match &e {
            EngineError::Management(M::NeedsLogin | M::SetupKeyRejected(_) | M::BadUrl { .. }) => {
                Error::LoginRefused(e.to_string())
            }
            EngineError::Cancelled => Error::Stopped,
            _ => Error::Failed(e.to_string()),
        }
    }
}

/// What is up once a data path is ready: our mesh addresses, the WireGuard port and the
/// bound listeners. `Display` gives the one-line summary the command line prints.
#[derive(Clone, Debug)]
pub struct Ready {
    mesh: Vec<ipnet::IpNet>,
    wireguard: SocketAddr,
    listeners: Vec<(&'static str, SocketAddr)>,
    line: String,
}

impl Ready {
    fn of(r: &crate::engine::Ready) -> Self {
        Self {
            mesh: r.mesh.clone(),
            wireguard: r.wireguard,
            listeners: r.listeners.iter().map(|(k, a, _)| (*k, *a)).collect(),
            line: r.to_string(),
        }
    }

    /// Our addresses in the mesh, with their prefixes.
    pub fn mesh_addresses(&self) -> &[ipnet::IpNet] {
        &self.mesh
    }

    /// The WireGuard UDP socket's address.
    pub fn wireguard_addr(&self) -> SocketAddr {
        self.wireguard
    }

    /// Each TCP or UDP listener's kind (`socks5`, `http`, `proxy`, `forward`, `expose`) and
    /// bound address — TCP listeners first, then UDP ones, each in the order configured; a
    /// port 0 asked for is the port the system gave.
    pub fn listeners(&self) -> &[(&'static str, SocketAddr)] {
        &self.listeners
    }

    /// The bound address of the first listener of `kind`.
    pub fn listener(&self, kind: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

/// What the builder checked, ready to run.
struct Plan {
    status_addr: Option<SocketAddr>,
    ready_peers: usize,
    connect_timeout: Duration,
    on_ready: Option<OnReady>,
    logout: Option<Logout>,
    run: Run,
}

/// What a user's readiness callback is kept as.
type OnReady = Arc<dyn Fn(&Ready) + Send + Sync>;

enum Run {
    Static(Box<(WgConfig, ProxyOptions)>),
    Netbird(Box<MeshConfig>),
}

/// What a logout needs.
struct Logout {
    management_url: String,
    private_key: [u8; 32],
    state: Option<PathBuf>,
}

/// A peer of a NetBird mesh (or of fixed WireGuard peers) running in this process.
///
/// Cloning gives another handle to the same peer. The peer stops on [`stop`](Self::stop),
/// or when the last handle is dropped; a [`MeshListener`] and a [`StatusChanges`] hold a
/// handle too (a listener takes its port again after an engine rebuild), so a program that
/// keeps one in a task should stop the peer explicitly.
///
/// ```no_run
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let peer = netbird_proxy::Peer::builder()
///     .setup_key(std::env::var("NB_SETUP_KEY")?)
///     .start()
///     .await?;
/// let mut stream = peer.dial("build-cache.netbird.cloud", 80).await?;
/// stream.write_all(b"GET / HTTP/1.0\r\nHost: build-cache\r\n\r\n").await?;
/// let mut page = Vec::new();
/// stream.read_to_end(&mut page).await?;
/// peer.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Peer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("ready", &self.inner.hub.snapshot().ready)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Cancelled by `stop` or when the last handle goes: the root of the peer's tasks.
    stop: CancellationToken,
    /// Cancelled when the run task has ended and everything it started is gone.
    finished: CancellationToken,
    outcome: Mutex<Option<Result<(), Error>>>,
    hub: Arc<StatusHub>,
    live: watch::Receiver<Option<LiveDataPath>>,
    connect_timeout: Duration,
    status_addr: Option<SocketAddr>,
    logout: Option<Logout>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Plan {
    async fn spawn(self) -> Result<Peer, Error> {
        let mode = match self.run {
            Run::Static(..) => Mode::Static,
            Run::Netbird(_) => Mode::Netbird,
        };
        let hub = StatusHub::new(mode, self.ready_peers);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let status_addr = match self.status_addr {
            None => None,
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    Error::StatusEndpoint {
                        addr,
                        reason: e.to_string(),
                    }
                })?;
                let bound = listener.local_addr().unwrap_or(addr);
                tracing::info!(addr = %bound, "status endpoint listening");
                tasks.spawn(crate::status::server::serve(
                    listener,
                    hub.clone(),
                    stop.child_token(),
                ));
                Some(bound)
            }
        };
        let (publish, live) = watch::channel(None);
        let publish = Arc::new(publish);
        let on_ready: crate::engine::supervisor::OnReady = match self.on_ready {
            Some(f) => Arc::new(move |r| f(&Ready::of(r))),
            None => Arc::new(|_| {}),
        };
        let finished = CancellationToken::new();
        let inner = Arc::new(Inner {
            stop: stop.clone(),
            finished: finished.clone(),
            outcome: Mutex::new(None),
            hub: hub.clone(),
            live,
            connect_timeout: self.connect_timeout,
            status_addr,
            logout: self.logout,
        });
        let weak = Arc::downgrade(&inner);
        let run = self.run;
        let slot = publish.clone();
        let engine_stop = stop.clone();
        // The engine runs in a task of its own so that a panic in it (or in the user's
        // `on_ready`, which runs there) still ends the peer with an error instead of leaving
        // `stop` and `wait` waiting forever.
        let engine = async move {
            let stop = engine_stop;
            match run {
                Run::Static(parts) => {
                    let (config, mut options) = *parts;
                    options.status = Some(hub);
                    options.publish = Some(publish);
                    crate::engine::run_static(config, options, stop.clone(), |r| on_ready(r))
                        .await
                        .map_err(|e| Error::Failed(e.to_string()))
                }
                Run::Netbird(mut config) => {
                    config.proxy.status = Some(hub);
                    config.proxy.publish = Some(publish);
                    let supervisor = Supervisor::new();
                    supervisor.spawn(*config, on_ready).await;
                    let r = tokio::select! {
                        _ = stop.cancelled() => supervisor.stop().await,
                        r = supervisor.wait() => r,
                    };
                    r.map_err(Error::from_engine)
                }
            }
        };
        tokio::spawn(async move {
            let result = match tokio::spawn(engine).await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(Error::Failed("the peer's engine panicked".into())),
                Err(_) => Err(Error::Stopped),
            };
            // Nothing of the engine stays reachable (its handles hold the WireGuard socket),
            // and the peer's other tasks (the status endpoint) end with it.
            slot.send_replace(None);
            stop.cancel();
            while tasks.join_next().await.is_some() {}
            if let Some(inner) = weak.upgrade() {
                *inner.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            }
            finished.cancel();
        });
        Ok(Peer { inner })
    }
}

impl Peer {
    /// Options for a new peer; see [`PeerBuilder`].
    pub fn builder() -> PeerBuilder {
        PeerBuilder::new()
    }

    /// Wait until the peer is ready: NetBird's management has sent a network map on an open
    /// stream and enough peers have a recent handshake (see [`PeerBuilder::ready_peers`]).
    /// Fails at once when the peer stopped for good.
    pub async fn ready(&self) -> Result<(), Error> {
        loop {
            if self.inner.hub.snapshot().ready {
                return Ok(());
            }
            tokio::select! {
                _ = self.inner.finished.cancelled() => return Err(self.outcome_error()),
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }
    }

    /// [`ready`](Self::ready), at most `timeout`; [`Error::NotReady`] says what is missing.
    pub async fn ready_within(&self, timeout: Duration) -> Result<(), Error> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.ready()).await {
            Ok(r) => r,
            Err(_) => Err(Error::NotReady {
                waited: started.elapsed(),
                reason: self.status().reason.unwrap_or_default(),
            }),
        }
    }

    /// Everything about the peer now: readiness (and why not), our addresses, the other
    /// peers and their paths, the control plane, listeners and routes — what `/status` serves.
    pub fn status(&self) -> Snapshot {
        self.inner.hub.snapshot()
    }

    /// Status snapshots as they change (readiness, reason, peers' connections), for a
    /// program that reacts to the mesh; see [`StatusChanges`].
    pub fn status_changes(&self) -> StatusChanges {
        StatusChanges {
            peer: self.clone(),
            last: None,
        }
    }

    /// The status endpoint's bound address, when one was asked for.
    pub fn status_endpoint(&self) -> Option<SocketAddr> {
        self.inner.status_addr
    }

    /// Our mesh addresses, once a data path is up (empty before).
    pub fn mesh_addresses(&self) -> Vec<IpAddr> {
        self.inner
            .live
            .borrow()
            .as_ref()
            .map(|l| l.netstack.addresses().iter().map(|n| n.addr()).collect())
            .unwrap_or_default()
    }

    /// Connect to `host:port` through the mesh: a peer's name (`web`, `web.netbird.cloud`),
    /// a name the mesh's DNS answers, or an address. Outside the mesh the target is reached
    /// from this host unless [`PeerBuilder::mesh_only`] says no. Waits for a data path, all
    /// within the connect timeout.
    pub async fn dial(&self, host: &str, port: u16) -> Result<MeshStream, Error> {
        let target = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => crate::proxy::dial::Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => crate::proxy::dial::Target::Host(host.to_string(), port),
        };
        let deadline = Instant::now() + self.inner.connect_timeout;
        let live = self.live_until(deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let dial = live.dialer.dial(&target);
        tokio::select! {
            r = tokio::time::timeout(left.max(Duration::from_millis(1)), dial) => match r {
                Ok(Ok(stream)) => Ok(MeshStream::new(stream)),
                Ok(Err(e)) => Err(Error::Connect(e.to_string())),
                Err(_) => Err(Error::Connect(format!(
                    "{target} did not answer within {:.1?}",
                    self.inner.connect_timeout
                ))),
            },
            _ = self.inner.stop.cancelled() => Err(Error::Stopped),
        }
    }

    /// [`dial`](Self::dial) an address.
    pub async fn dial_addr(&self, addr: SocketAddr) -> Result<MeshStream, Error> {
        self.dial(&addr.ip().to_string(), addr.port()).await
    }

    /// Accept TCP connections from other peers on `port` of our mesh addresses, as a service
    /// of ours; the peers' access policies apply as to any exposed port. The listener goes on
    /// across engine rebuilds.
    pub async fn listen(&self, port: u16) -> Result<MeshListener, Error> {
        let mut listener = MeshListener::new(self.clone(), port);
        listener.bind().await?;
        Ok(listener)
    }

    /// A UDP socket on `port` of our mesh addresses for datagrams to and from other peers.
    /// A given port is a service: each datagram to it passes the peers' access policies as a
    /// new flow does. Port 0 picks a free port for a client socket, whose datagrams are not
    /// checked (as replies to ours pass a stateful firewall); its port is not announced.
    pub async fn bind_udp(&self, port: u16) -> Result<MeshUdpSocket, Error> {
        MeshUdpSocket::bind(self.clone(), port).await
    }

    /// Stop the peer and wait until everything it started is gone; its ports are free when
    /// this returns. Stopping is final: a stopped peer cannot be started again (build a new
    /// one). Returns the failure that ended the peer, if one did before.
    pub async fn stop(&self) -> Result<(), Error> {
        self.inner.stop.cancel();
        self.wait().await
    }

    /// Wait until the peer ends: after [`stop`](Self::stop), or a failure no retry can fix.
    pub async fn wait(&self) -> Result<(), Error> {
        self.inner.finished.cancelled().await;
        self.outcome().unwrap_or(Ok(()))
    }

    /// How the run ended, once it has.
    fn outcome(&self) -> Option<Result<(), Error>> {
        self.inner
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stop, then deregister the peer from management (bounded to a few seconds) and delete
    /// its state file: for a peer that was this run's alone. A failure to say goodbye is
    /// returned; the peer is stopped whatever happens.
    pub async fn logout(&self) -> Result<(), Error> {
        let _ = self.stop().await;
        let Some(l) = &self.inner.logout else {
            return Ok(());
        };
        let attempt = async {
            let mut client = crate::control::management_client::ManagementClient::connect(
                &l.management_url,
                l.private_key,
            )
            .await?;
            client.logout().await
        };
        match tokio::time::timeout(LOGOUT_TIMEOUT, attempt).await {
            Ok(Ok(())) => {
                // The key is no longer registered: a later run starts afresh with its key.
                if let Some(state) = &l.state {
                    let _ = std::fs::remove_file(state);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(Error::Failed(format!("logout: {e}"))),
            Err(_) => Err(Error::Failed(format!(
                "logout: no answer within {LOGOUT_TIMEOUT:?}"
            ))),
        }
    }

    fn outcome_error(&self) -> Error {
        match self.outcome() {
            Some(Err(e)) => e,
            _ => Error::Stopped,
        }
    }

    /// The data path that is up now, waiting for one until `deadline`.
    async fn live_until(&self, deadline: Instant) -> Result<LiveDataPath, Error> {
        let mut live = self.inner.live.clone();
        loop {
            if self.inner.stop.is_cancelled() {
                return Err(self.outcome_error());
            }
            if let Some(l) = live.borrow_and_update().as_ref()
                && !l.cancel.is_cancelled()
            {
                return Ok(l.clone());
            }
            let wait = tokio::time::timeout_at(deadline.into(), live.changed());
            tokio::select! {
                r = wait => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(Error::Stopped),
                    Err(_) => {
                        let reason = self.status().reason.unwrap_or_default();
                        return Err(Error::Connect(format!("the mesh is not up: {reason}")));
                    }
                },
                // A stopped engine empties the slot and its successor fills it: both are
                // changes, so a cancelled entry seen above is never waited on for long.
                _ = self.inner.stop.cancelled() => return Err(self.outcome_error()),
            }
        }
    }

    /// The data path that is up now, waiting as long as it takes (until stop).
    async fn live(&self) -> Result<LiveDataPath, Error> {
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        self.live_until(far).await
    }
}

/// Status snapshots as the peer changes; see [`Peer::status_changes`].
///
/// Snapshots are taken on demand (nothing runs in the background): [`next`](Self::next)
/// looks a few times a second and returns when readiness, its reason or a peer's connection
/// differs from what it returned last.
#[derive(Debug)]
pub struct StatusChanges {
    peer: Peer,
    last: Option<String>,
}

/// How often [`StatusChanges::next`] looks.
const CHANGE_POLL: Duration = Duration::from_millis(250);

impl StatusChanges {
    /// The next changed snapshot (the first call returns the current one); `None` once the
    /// peer has ended.
    pub async fn next(&mut self) -> Option<Snapshot> {
        loop {
            let snap = self.peer.status();
            let key = change_key(&snap);
            if self.last.as_ref() != Some(&key) {
                self.last = Some(key);
                return Some(snap);
            }
            tokio::select! {
                _ = self.peer.inner.finished.cancelled() => return None,
                _ = tokio::time::sleep(CHANGE_POLL) => {}
            }
        }
    }
}

/// What counts as a change: readiness, its reason, and each peer's connection and path.
fn change_key(s: &Snapshot) -> String {
    let mut key = format!("{}|{}", s.ready, s.reason.as_deref().unwrap_or(""));
    for p in &s.peers {
        key.push_str(&format!("|{} {} {}", p.ip, p.status, p.connection));
    }
    key
}
