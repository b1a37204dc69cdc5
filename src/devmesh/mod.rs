//! A local NetBird control plane for tests and demos: management, signal and one or more relays
//! served on loopback, wire-compatible with the real services, every peer seeing every other.
//!
//! Ports follow `--listen`'s: management on PORT, signal on PORT+1, relay *i* on PORT+2+*i*.
//! Each service can run in its own process (`Services`), sharing a state file for keys, the
//! relay secret and registrations, so tests can kill and restart one service for real.

internal_modules! {
    management;
    networks;
    relay;
    relay_token;
    signal;
    state;
    stun;
}

mod testing;

pub use crate::control::mesh::TurnServer;
pub use networks::NetworksFile;
pub use testing::{TEST_DOMAIN, TestMesh};

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::control::management::management_service_server::ManagementServiceServer;
use crate::control::signal::signal_exchange_server::SignalExchangeServer;
use management::{DevManagement, ManagementSettings};
use relay::DevRelay;
use signal::DevSignal;
use state::DevMeshState;

/// Which services this process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Services {
    /// The management service (gRPC).
    pub management: bool,
    /// The signal service (gRPC).
    pub signal: bool,
    /// The relays (WebSocket).
    pub relay: bool,
}

impl Default for Services {
    fn default() -> Self {
        Self {
            management: true,
            signal: true,
            relay: true,
        }
    }
}

/// Settings of a dev mesh.
#[derive(Clone, Debug)]
pub struct DevMeshConfig {
    /// Management's address; the other services take the following ports (all ephemeral with
    /// port 0, which needs every service in this process).
    pub listen: SocketAddr,
    /// The setup key (default: the state file's, else a random one).
    pub setup_key: Option<String>,
    /// The mesh's DNS domain: peer `web` is `web.DOMAIN`.
    pub domain: String,
    /// Where peers are told signal is, when it is not ours (tests point it at a silent server).
    pub signal_override: Option<String>,
    /// The host name or address peers reach signal and the relays at (default: the listen
    /// address), e.g. a container's service name when listening on 0.0.0.0.
    pub advertise: Option<String>,
    /// How many relays (at least 1); peers get one each, round-robin.
    pub relays: usize,
    /// Which services this process serves (the others run elsewhere).
    pub services: Services,
    /// Keys, secrets and registrations survive restarts here.
    pub state: Option<PathBuf>,
    /// Fault injection for tests: logins succeed, every Sync is refused (`Unavailable`).
    pub refuse_sync: bool,
    /// Registered peers that never connect, as most of a large account's are: each peer's
    /// map lists them (`dev-mesh --simulated-peers`), to measure what a big map costs.
    pub simulated_peers: usize,
    /// A TURN server to announce (`NetbirdConfig.turns`).
    pub turn: Option<TurnServer>,
    /// Groups, policies and routes (`--networks FILE`).
    pub networks: Option<NetworksFile>,
    /// The account's lazy-connection setting (`PeerConfig.LazyConnectionEnabled`), which
    /// peers with `--lazy-connections auto` follow; [`DevMesh::set_lazy_connections`]
    /// changes it.
    pub lazy_connections: bool,
    /// Serve `/healthz` and `/readyz` here (200 while this process serves its services), for
    /// a container's HEALTHCHECK (`netbird-proxy wait --healthz`) or an orchestrator's probe.
    pub status_addr: Option<SocketAddr>,
}

impl DevMeshConfig {
    /// Everything in this process on ephemeral loopback ports, one relay, nothing saved.
    pub fn local(setup_key: &str, domain: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            setup_key: Some(setup_key.into()),
            domain: domain.into(),
            signal_override: None,
            advertise: None,
            relays: 1,
            services: Services::default(),
            state: None,
            refuse_sync: false,
            simulated_peers: 0,
            turn: None,
            networks: None,
            lazy_connections: false,
            status_addr: None,
        }
    }
}

/// Why a dev mesh cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevMeshError {
    /// A service's port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
    #[error(
        "serving only some services needs a fixed --listen port (the others are found from it)"
    )]
    /// Services split over processes find each other from a fixed port.
    SplitNeedsPort,
    #[error("no port {0} after --listen's for all services")]
    /// The ports after the listen port ran out (the relay's index).
    PortRange(usize),
    /// The state file could not be read or written.
    #[error("{0}")]
    State(String),
}

/// A running dev mesh (the services this process serves).
pub struct DevMesh {
    /// Management's URL (served here or not).
    pub management_url: String,
    /// Signal's address.
    pub signal_addr: SocketAddr,
    /// Each relay's URL (`rel://127.0.0.1:PORT`).
    pub relay_urls: Vec<String>,
    /// The setup key peers register with.
    pub setup_key: String,
    management: Option<DevManagement>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DevMeshError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DevMeshError::Bind { addr, source })
}

impl DevMesh {
    /// Bind and serve this process's services.
    pub async fn start(config: DevMeshConfig) -> Result<Self, DevMeshError> {
        let relays = config.relays.max(1);
        let ip = config.listen.ip();
        let fixed = config.listen.port() != 0;
        if !fixed && config.services != Services::default() {
            return Err(DevMeshError::SplitNeedsPort);
        }
        let port = |offset: usize| -> Result<u16, DevMeshError> {
            if !fixed {
                return Ok(0);
            }
            let p = usize::from(config.listen.port()) + offset;
            u16::try_from(p).map_err(|_| DevMeshError::PortRange(p))
        };

        let fresh = DevMeshState::new(config.setup_key.clone().unwrap_or_else(random_setup_key));
        let mut state = match &config.state {
            Some(path) => DevMeshState::load_or_create(path, fresh)
                .map_err(|e| DevMeshError::State(e.to_string()))?,
            None => fresh,
        };
        if let Some(key) = &config.setup_key {
            state.setup_key = key.clone();
        }
        state::add_simulated(&mut state, config.simulated_peers, &config.domain);

        // Bind everything first: with ephemeral ports the URLs come from the listeners.
        let management = if config.services.management {
            Some(bind(SocketAddr::new(ip, port(0)?)).await?)
        } else {
            None
        };
        let management_addr = match &management {
            Some(l) => l.local_addr().map_err(|source| DevMeshError::Bind {
                addr: config.listen,
                source,
            })?,
            None => config.listen,
        };
        let signal_at = SocketAddr::new(ip, port(1)?);
        let signal = if config.services.signal {
            Some(bind(signal_at).await?)
        } else {
            None
        };
        let signal_addr = match &signal {
            Some(l) => l.local_addr().unwrap_or(signal_at),
            None => signal_at,
        };
        // STUN on UDP at management's address and port.
        let stun = match &management {
            Some(_) => Some(tokio::net::UdpSocket::bind(management_addr).await.map_err(
                |source| DevMeshError::Bind {
                    addr: management_addr,
                    source,
                },
            )?),
            None => None,
        };
        let advertised = |addr: SocketAddr| match &config.advertise {
            Some(host) => format!("{host}:{}", addr.port()),
            None => addr.to_string(),
        };
        let mut relay_listeners = Vec::new();
        let mut relay_urls = Vec::new();
        for i in 0..relays {
            let at = SocketAddr::new(ip, port(2 + i)?);
            if config.services.relay {
                let l = bind(at).await?;
                relay_urls.push(format!(
                    "rel://{}",
                    advertised(l.local_addr().unwrap_or(at))
                ));
                relay_listeners.push(l);
            } else {
                relay_urls.push(format!("rel://{}", advertised(at)));
            }
        }

        let health = match config.status_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if let Some(listener) = health {
            // Every service listens once start returns; the process answering is the health.
            tasks.spawn(crate::status::server::serve_with(
                listener,
                cancel.clone(),
                |method, path| {
                    use http::StatusCode;
                    match (method.as_str(), path) {
                        ("GET" | "HEAD", "/healthz" | "/readyz") => crate::status::server::reply(
                            StatusCode::OK,
                            "text/plain",
                            "ok\n".into(),
                        ),
                        _ => crate::status::server::reply(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "a dev mesh serves /healthz and /readyz\n".into(),
                        ),
                    }
                },
            ));
        }
        let mut service = None;
        if let Some(listener) = management {
            let svc = DevManagement::new(
                ManagementSettings {
                    domain: config.domain.clone(),
                    signal_uri: config
                        .signal_override
                        .clone()
                        .unwrap_or_else(|| advertised(signal_addr)),
                    relay_urls: relay_urls.clone(),
                    stun_uri: format!("stun:{}", advertised(management_addr)),
                    turn: config.turn.clone(),
                    state_file: config.state.clone(),
                    refuse_sync: config.refuse_sync,
                    lazy_connections: config.lazy_connections,
                    networks: config.networks.clone(),
                },
                state.clone(),
            );
            let stop = cancel.clone();
            let server = svc.clone();
            tasks.spawn(async move {
                let _ = Server::builder()
                    .serve_with_incoming_shutdown(
                        ManagementServiceServer::new(server),
                        TcpIncoming::from(listener),
                        stop.cancelled_owned(),
                    )
                    .await;
            });
            service = Some(svc);
        }
        if let Some(socket) = stun {
            tasks.spawn(stun::serve(socket, cancel.clone()));
        }
        if let Some(listener) = signal {
            let stop = cancel.clone();
            tasks.spawn(async move {
                let _ = Server::builder()
                    .serve_with_incoming_shutdown(
                        SignalExchangeServer::new(DevSignal::default()),
                        TcpIncoming::from(listener),
                        stop.cancelled_owned(),
                    )
                    .await;
            });
        }
        for (listener, url) in relay_listeners.into_iter().zip(&relay_urls) {
            let relay = DevRelay::new(state.relay_secret.to_vec(), url.clone());
            tasks.spawn(relay.serve(listener, cancel.clone()));
        }
        Ok(Self {
            management_url: format!("http://{management_addr}"),
            signal_addr,
            relay_urls,
            setup_key: state.setup_key,
            management: service,
            cancel,
            tasks,
        })
    }

    /// Change the account's lazy-connection setting; every peer is sent a map that says it.
    /// Does nothing when management is served elsewhere.
    pub fn set_lazy_connections(&self, on: bool) {
        if let Some(m) = &self.management {
            m.set_lazy_connections(on);
        }
    }

    /// Stop serving. Open streams get a moment to close gracefully, then the servers are
    /// aborted: a dev mesh going away must not wait for its clients.
    pub async fn stop(mut self) {
        if let Some(m) = &self.management {
            m.end_streams();
        }
        self.cancel.cancel();
        let graceful = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(std::time::Duration::from_millis(500), graceful)
            .await
            .is_err()
        {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// A setup key in NetBird's format (an upper-case UUID).
pub fn random_setup_key() -> String {
    let b: [u8; 16] = rand::random();
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02X}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}
