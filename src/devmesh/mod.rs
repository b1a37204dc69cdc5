//! A local NetBird control plane for tests and demos: management and signal (relay next)
//! served on loopback from memory, wire-compatible with the real services, every peer seeing
//! every other.

pub mod management;
pub mod relay;
pub mod relay_token;
pub mod signal;

use std::net::SocketAddr;

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

/// Settings of a dev mesh.
#[derive(Clone, Debug)]
pub struct DevMeshConfig {
    /// Management's address; signal listens on the next port and the relay on the one after
    /// (all ephemeral with port 0).
    pub listen: SocketAddr,
    pub setup_key: String,
    pub domain: String,
    /// Where peers are told signal is, when it is not ours (tests point it at a silent server).
    pub signal_override: Option<String>,
}

/// A running dev mesh.
pub struct DevMesh {
    pub management_url: String,
    pub signal_addr: SocketAddr,
    pub relay_url: String,
    pub setup_key: String,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl DevMesh {
    /// Bind and serve management and signal.
    pub async fn start(config: DevMeshConfig) -> std::io::Result<Self> {
        let management = TcpListener::bind(config.listen).await?;
        let management_addr = management.local_addr()?;
        let signal_port = if config.listen.port() == 0 {
            0
        } else {
            config.listen.port().checked_add(1).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no port after --listen's")
            })?
        };
        let signal = TcpListener::bind(SocketAddr::new(config.listen.ip(), signal_port)).await?;
        let signal_addr = signal.local_addr()?;
        let relay_port = if signal_port == 0 {
            0
        } else {
            signal_port.saturating_add(1)
        };
        let relay = TcpListener::bind(SocketAddr::new(config.listen.ip(), relay_port)).await?;
        let relay_url = format!("rel://{}", relay.local_addr()?);
        let relay_secret = rand::random::<[u8; 32]>().to_vec();
        let service = DevManagement::new(ManagementSettings {
            setup_key: config.setup_key.clone(),
            domain: config.domain.clone(),
            signal_uri: config
                .signal_override
                .clone()
                .unwrap_or_else(|| signal_addr.to_string()),
            relay_urls: vec![relay_url.clone()],
            relay_secret: relay_secret.clone(),
        });
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let stop = cancel.clone();
        tasks.spawn(async move {
            let _ = Server::builder()
                .serve_with_incoming_shutdown(
                    ManagementServiceServer::new(service),
                    TcpIncoming::from(management),
                    stop.cancelled_owned(),
                )
                .await;
        });
        let stop = cancel.clone();
        tasks.spawn(async move {
            let _ = Server::builder()
                .serve_with_incoming_shutdown(
                    SignalExchangeServer::new(DevSignal::default()),
                    TcpIncoming::from(signal),
                    stop.cancelled_owned(),
                )
                .await;
        });
        tasks.spawn(DevRelay::new(relay_secret, relay_url.clone()).serve(relay, cancel.clone()));
        Ok(Self {
            management_url: format!("http://{management_addr}"),
            signal_addr,
            relay_url,
            setup_key: config.setup_key,
            cancel,
            tasks,
        })
    }

    /// Stop serving. Open streams get a moment to close gracefully, then the servers are
    /// aborted: a dev mesh going away must not wait for its clients.
    pub async fn stop(mut self) {
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
