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
    relay_addr: SocketAddr,
    relay_secret: Vec<u8>,
    relay_stop: CancellationToken,
    relay_task: Option<tokio::task::JoinHandle<()>>,
    management: DevManagement,
    management_addr: SocketAddr,
    management_stop: CancellationToken,
    management_task: Option<tokio::task::JoinHandle<()>>,
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
        let management_stop = cancel.child_token();
        let management_task = tokio::spawn(serve_management(
            service.clone(),
            management,
            management_stop.clone(),
        ));
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
        let relay_addr = relay.local_addr()?;
        let relay_stop = cancel.child_token();
        let relay_task = tokio::spawn(
            DevRelay::new(relay_secret.clone(), relay_url.clone()).serve(relay, relay_stop.clone()),
        );
        Ok(Self {
            relay_addr,
            relay_secret,
            relay_stop,
            relay_task: Some(relay_task),
            management: service,
            management_addr,
            management_stop,
            management_task: Some(management_task),
            management_url: format!("http://{management_addr}"),
            signal_addr,
            relay_url,
            setup_key: config.setup_key,
            cancel,
            tasks,
        })
    }

    /// Take management down (its Sync streams end, its port closes); signal and the relay stay.
    pub async fn stop_management(&mut self) {
        self.management.end_streams();
        self.management_stop.cancel();
        if let Some(task) = self.management_task.take()
            && tokio::time::timeout(std::time::Duration::from_secs(2), task)
                .await
                .is_err()
        {
            tracing::warn!("dev management did not stop in time");
        }
    }

    /// Bring management back on the same address, with the same registrations.
    pub async fn start_management(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.management_addr).await?;
        self.management_stop = self.cancel.child_token();
        self.management_task = Some(tokio::spawn(serve_management(
            self.management.clone(),
            listener,
            self.management_stop.clone(),
        )));
        Ok(())
    }

    /// Take the relay down: every relay connection ends and its port closes.
    pub async fn stop_relay(&mut self) {
        self.relay_stop.cancel();
        if let Some(task) = self.relay_task.take() {
            let _ = task.await;
        }
    }

    /// Bring a fresh relay back on the same address (peers must reconnect to it).
    pub async fn start_relay(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.relay_addr).await?;
        self.relay_stop = self.cancel.child_token();
        let relay = DevRelay::new(self.relay_secret.clone(), self.relay_url.clone());
        self.relay_task = Some(tokio::spawn(relay.serve(listener, self.relay_stop.clone())));
        Ok(())
    }

    /// Stop serving. Open streams get a moment to close gracefully, then the servers are
    /// aborted: a dev mesh going away must not wait for its clients.
    pub async fn stop(mut self) {
        self.management.end_streams();
        self.cancel.cancel();
        if let Some(task) = self.management_task.take() {
            task.abort();
        }
        if let Some(task) = self.relay_task.take() {
            task.abort();
        }
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

async fn serve_management(service: DevManagement, listener: TcpListener, stop: CancellationToken) {
    let _ = Server::builder()
        .serve_with_incoming_shutdown(
            ManagementServiceServer::new(service),
            TcpIncoming::from(listener),
            stop.cancelled_owned(),
        )
        .await;
}
