//! The dev mesh's management service: registers peers with one setup key, hands out overlay
//! addresses in 100.64.0.0/16 and names under the mesh domain, and streams network maps in which
//! every peer sees every other.

use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use super::relay_token;
use super::state::{DevMeshState, PeerEntry};
use crate::control::envelope::{self, key_string, parse_key_string, public_key_of};
use crate::control::management::management_service_server::ManagementService;
use crate::control::management::{
    CustomZone, DnsConfig, Empty, EncryptedMessage, HostConfig, LoginRequest, LoginResponse,
    NetbirdConfig, NetworkMap, PeerConfig, ProtectedHostConfig, RelayConfig, RemotePeerConfig,
    ServerKeyResponse, SimpleRecord, SyncRequest, SyncResponse,
};

/// Lifetime of relay tokens handed out.
const RELAY_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Settings of a dev management service.
#[derive(Clone, Debug)]
pub struct ManagementSettings {
    pub domain: String,
    /// What peers are told: the signal server's `host:port`.
    pub signal_uri: String,
    /// Relay URLs (`rel://host:port`). Each peer is given one, round-robin by registration,
    /// so that with several relays peers have different home relays and meet on foreign ones.
    pub relay_urls: Vec<String>,
    /// The STUN server announced in `NetbirdConfig.stuns` (`stun:host:port`).
    pub stun_uri: String,
    /// The TURN server announced in `NetbirdConfig.turns`, if any.
    pub turn: Option<crate::control::mesh::TurnServer>,
    /// Where registrations are saved (`dev-mesh --state`), if anywhere.
    pub state_file: Option<std::path::PathBuf>,
    /// Fault injection: answer logins but refuse every Sync (as a management that is going
    /// down between the two would), so tests can fail an engine start at its last step.
    pub refuse_sync: bool,
    /// Groups, policies and routes (`dev-mesh --networks`); None: everyone sees everyone.
    pub networks: Option<super::networks::NetworksFile>,
    /// The account's lazy-connection setting (`PeerConfig.LazyConnectionEnabled`) at start.
    pub lazy_connections: bool,
}

#[derive(Debug)]
struct PeerRecord {
    key: String,
    public_key: [u8; 32],
    ip: Ipv4Addr,
    fqdn: String,
    /// Open Sync streams.
    online: usize,
}

#[derive(Debug, Default)]
struct Registry {
    peers: Vec<PeerRecord>,
    serial: u64,
}

/// The service (clone it into the tonic server).
#[derive(Clone)]
pub struct DevManagement {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ManagementSettings,
    /// Keys, secrets and registrations as of start; `registry` is the live copy.
    saved: Mutex<DevMeshState>,
    private_key: [u8; 32],
    registry: Mutex<Registry>,
    /// Bumped on every registry change; Sync streams watch it.
    changed: watch::Sender<u64>,
    /// Cancelled to end every open Sync stream (a management outage); then replaced.
    streams: Mutex<tokio_util::sync::CancellationToken>,
    /// The account's lazy-connection setting, now.
    lazy_connections: std::sync::atomic::AtomicBool,
}

impl DevManagement {
    /// A service with the keys, secrets and peers of `state`.
    pub fn new(settings: ManagementSettings, state: DevMeshState) -> Self {
        let (changed, _) = watch::channel(0);
        let registry = Registry {
            peers: state
                .peers
                .iter()
                .map(|p| PeerRecord {
                    key: key_string(&p.public_key),
                    public_key: p.public_key,
                    ip: p.ip,
                    fqdn: p.fqdn.clone(),
                    online: 0,
                })
                .collect(),
            serial: 0,
        };
        Self {
            inner: Arc::new(Inner {
                private_key: state.management_key,
                saved: Mutex::new(state),
                registry: Mutex::new(registry),
                changed,
                streams: Mutex::new(tokio_util::sync::CancellationToken::new()),
                lazy_connections: std::sync::atomic::AtomicBool::new(settings.lazy_connections),
                settings,
            }),
        }
    }

    /// End every open Sync stream with `Unavailable`, as a management going down does.
    pub fn end_streams(&self) {
        let mut token = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = tokio_util::sync::CancellationToken::new();
    }

    /// Change the account's lazy-connection setting; every peer gets a new map saying it.
    pub fn set_lazy_connections(&self, on: bool) {
        self.inner
            .lazy_connections
            .store(on, std::sync::atomic::Ordering::Relaxed);
        let mut reg = self.registry();
        reg.serial += 1;
        self.inner.changed.send_replace(reg.serial);
    }

    /// The server's key string.
    pub fn server_key(&self) -> String {
        key_string(&public_key_of(&self.inner.private_key))
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, DevMeshState> {
        self.inner.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Save the registrations (when a state file is set), then bump the serial and wake
    /// every Sync stream.
    fn publish(&self, reg: &mut Registry) {
        if let Some(path) = &self.inner.settings.state_file {
            let mut saved = self.inner.saved.lock().unwrap_or_else(|e| e.into_inner());
            saved.peers = reg
                .peers
                .iter()
                .map(|p| PeerEntry {
                    public_key: p.public_key,
                    ip: p.ip,
                    fqdn: p.fqdn.clone(),
                })
                .collect();
            if let Err(e) = saved.save(path) {
                tracing::warn!("{e}");
            }
        }
        reg.serial += 1;
        let serial = reg.serial;
        self.inner.changed.send_replace(serial);
    }

    fn open<M: prost::Message + Default>(
        &self,
        msg: &EncryptedMessage,
    ) -> Result<(M, [u8; 32]), Status> {
        let peer = parse_key_string(&msg.wg_pub_key)
            .map_err(|_| Status::invalid_argument("invalid peer key"))?;
        let inner = envelope::open_message(&msg.body, &self.inner.private_key, &peer)
            .map_err(|_| Status::invalid_argument("invalid request message"))?;
        Ok((inner, peer))
    }

    fn seal<M: prost::Message>(&self, msg: &M, peer: &[u8; 32]) -> EncryptedMessage {
        EncryptedMessage {
            wg_pub_key: self.server_key(),
            body: envelope::seal_message(msg, &self.inner.private_key, peer),
            version: 0,
        }
    }

    /// The peer at registry index `me`'s config: signal, and its relay with a fresh token.
    fn netbird_config(&self, me: usize) -> NetbirdConfig {
        let s = &self.inner.settings;
        let secret = self.saved().relay_secret;
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + RELAY_TOKEN_TTL.as_secs();
        let (token_payload, token_signature) = relay_token::issue(&secret, expiry);
        NetbirdConfig {
            signal: Some(HostConfig {
                uri: s.signal_uri.clone(),
                protocol: 2, // HTTP: plain gRPC on loopback
            }),
            relay: (!s.relay_urls.is_empty()).then(|| RelayConfig {
                urls: vec![s.relay_urls[me % s.relay_urls.len()].clone()],
                token_payload,
                token_signature,
            }),
            stuns: vec![HostConfig {
                uri: s.stun_uri.clone(),
                protocol: 0, // UDP
            }],
            turns: s
                .turn
                .iter()
                .map(|t| ProtectedHostConfig {
                    host_config: Some(HostConfig {
                        uri: t.uri.clone(),
                        protocol: 0, // UDP
                    }),
                    user: t.user.clone(),
                    password: t.password.clone(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn peer_config(&self, rec: &PeerRecord) -> PeerConfig {
        PeerConfig {
            address: format!("{}/16", rec.ip),
            fqdn: rec.fqdn.clone(),
            mtu: 1280,
            // New NetBird accounts resolve DNS routes on the routing peer.
            routing_peer_dns_resolution_enabled: true,
            lazy_connection_enabled: self
                .inner
                .lazy_connections
                .load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        }
    }

    /// Register `public_key` (idempotent); returns its record index.
    fn register(&self, reg: &mut Registry, public_key: [u8; 32], hostname: &str) -> usize {
        if let Some(i) = reg.peers.iter().position(|p| p.public_key == public_key) {
            return i;
        }
        let ip = (1usize..)
            .map(|n| Ipv4Addr::new(100, 64, (n / 250) as u8, (n % 250) as u8 + 1))
            .find(|ip| reg.peers.iter().all(|p| p.ip != *ip))
            .unwrap_or(Ipv4Addr::new(100, 64, 255, 254));
        let label = dns_label(hostname);
        let mut fqdn = format!("{label}.{}", self.inner.settings.domain);
        let mut n = 2;
        while reg.peers.iter().any(|p| p.fqdn == fqdn) {
            fqdn = format!("{label}-{n}.{}", self.inner.settings.domain);
            n += 1;
        }
        reg.peers.push(PeerRecord {
            key: key_string(&public_key),
            public_key,
            ip,
            fqdn,
            online: 0,
        });
        self.publish(reg);
        reg.peers.len() - 1
    }

    fn network_map(&self, reg: &Registry, me: usize) -> SyncResponse {
        let members: Vec<super::networks::Member> = reg
            .peers
            .iter()
            .map(|p| super::networks::Member {
                hostname: p.fqdn.split('.').next().unwrap_or_default().to_string(),
                key: p.key.clone(),
                ip: p.ip,
            })
            .collect();
        let policy = self
            .inner
            .settings
            .networks
            .as_ref()
            .map(|n| n.policy_for(me, &members))
            .unwrap_or_default();
        let visible = |i: usize| i == me || policy.visible.as_ref().is_none_or(|v| v.contains(&i));
        let remote = |p: &PeerRecord| RemotePeerConfig {
            wg_pub_key: p.key.clone(),
            allowed_ips: vec![format!("{}/32", p.ip)],
            fqdn: p.fqdn.clone(),
            agent_version: crate::control::management_client::NETBIRD_VERSION.to_string(),
            ..Default::default()
        };
        // As NetBird's management does, every registered peer is listed whether or not it is
        // connected right now (`offlinePeers` are peers whose login expired: none here).
        let remote_peers: Vec<_> = reg
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me && visible(*i))
            .map(|(_, p)| remote(p))
            .collect();
        let records = reg
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| visible(*i))
            .map(|(_, p)| SimpleRecord {
                name: format!("{}.", p.fqdn),
                r#type: 1,
                class: "IN".into(),
                ttl: 300,
                r_data: p.ip.to_string(),
            })
            .collect();
        let peer_config = self.peer_config(&reg.peers[me]);
        SyncResponse {
            netbird_config: Some(self.netbird_config(me)),
            peer_config: Some(peer_config.clone()),
            network_map: Some(NetworkMap {
                serial: reg.serial,
                peer_config: Some(peer_config),
                remote_peers_is_empty: remote_peers.is_empty(),
                remote_peers,
                routes: policy.routes,
                firewall_rules: policy.firewall_rules,
                firewall_rules_is_empty: policy.firewall_rules_is_empty,
                routes_firewall_rules_is_empty: policy.route_rules.is_empty(),
                routes_firewall_rules: policy.route_rules,
                forwarding_rules: policy.forwarding_rules,
                dns_config: Some(DnsConfig {
                    service_enable: true,
                    custom_zones: std::iter::once(CustomZone {
                        domain: format!("{}.", self.inner.settings.domain),
                        records,
                        ..Default::default()
                    })
                    .chain(policy.zones)
                    .collect(),
                    name_server_groups: policy.nameserver_groups,
                    // Every peer reports a NetBird version that takes the new port.
                    forwarder_port: 22054,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A DNS label from a host name: lower-case letters, digits and dashes.
pub(crate) fn dns_label(hostname: &str) -> String {
    let label: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_string();
    if label.is_empty() {
        "peer".into()
    } else {
        label
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<EncryptedMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ManagementService for DevManagement {
    async fn login(
        &self,
        request: Request<EncryptedMessage>,
    ) -> Result<Response<EncryptedMessage>, Status> {
        let (login, peer): (LoginRequest, _) = self.open(request.get_ref())?;
        let meta = login
            .meta
            .ok_or_else(|| Status::failed_precondition("peer system meta is missing"))?;
        let mut reg = self.registry();
        let idx = match reg.peers.iter().position(|p| p.public_key == peer) {
            Some(i) => i,
            None if login.setup_key.is_empty() => {
                return Err(Status::permission_denied("peer is not registered"));
            }
            None if !login
                .setup_key
                .eq_ignore_ascii_case(&self.saved().setup_key) =>
            {
                return Err(Status::permission_denied("invalid setup key"));
            }
            None => self.register(&mut reg, peer, &meta.hostname),
        };
        let resp = LoginResponse {
            netbird_config: Some(self.netbird_config(idx)),
            peer_config: Some(self.peer_config(&reg.peers[idx])),
            ..Default::default()
        };
        Ok(Response::new(self.seal(&resp, &peer)))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<EncryptedMessage>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (_, peer): (SyncRequest, _) = self.open(request.get_ref())?;
        if self.inner.settings.refuse_sync {
            return Err(Status::unavailable(
                "sync refused (dev mesh fault injection)",
            ));
        }
        {
            let mut reg = self.registry();
            let Some(rec) = reg.peers.iter_mut().find(|p| p.public_key == peer) else {
                return Err(Status::permission_denied("peer is not registered"));
            };
            rec.online += 1;
            self.publish(&mut reg);
        }
        let (tx, rx) = mpsc::channel(8);
        let this = self.clone();
        let mut changed = self.inner.changed.subscribe();
        let outage = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio::spawn(async move {
            let mut outage_ended_it = false;
            loop {
                let msg = {
                    let reg = this.registry();
                    let me = reg.peers.iter().position(|p| p.public_key == peer);
                    me.map(|me| this.seal(&this.network_map(&reg, me), &peer))
                };
                let Some(msg) = msg else { break };
                changed.borrow_and_update();
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = outage.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("management is going down"))).await;
                        outage_ended_it = true;
                        break;
                    }
                    r = changed.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
            let mut reg = this.registry();
            if let Some(rec) = reg.peers.iter_mut().find(|p| p.public_key == peer) {
                rec.online = rec.online.saturating_sub(1);
            }
            // A management outage says nothing about the peers: tell nobody they left.
            if !outage_ended_it {
                this.publish(&mut reg);
            }
        });
        let stream = tokio_stream_from(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_server_key(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<ServerKeyResponse>, Status> {
        Ok(Response::new(ServerKeyResponse {
            key: self.server_key(),
            ..Default::default()
        }))
    }

    async fn is_healthy(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn logout(&self, request: Request<EncryptedMessage>) -> Result<Response<Empty>, Status> {
        let (_, peer): (Empty, _) = self.open(request.get_ref())?;
        let mut reg = self.registry();
        reg.peers.retain(|p| p.public_key != peer);
        self.publish(&mut reg);
        Ok(Response::new(Empty {}))
    }

    async fn sync_meta(
        &self,
        request: Request<EncryptedMessage>,
    ) -> Result<Response<Empty>, Status> {
        let _: (crate::control::management::SyncMetaRequest, _) = self.open(request.get_ref())?;
        Ok(Response::new(Empty {}))
    }
}

/// An mpsc receiver as a stream.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::management::management_service_server::ManagementServiceServer;
    use crate::control::management_client::{ManagementClient, ManagementError, system_meta};
    use crate::control::mesh::{Change, MeshState};
    use crate::devmesh::state::DevMeshState;
    use tokio_util::sync::CancellationToken;

    async fn serve() -> (String, CancellationToken) {
        let svc = DevManagement::new(
            ManagementSettings {
                domain: "mesh.test".into(),
                signal_uri: "127.0.0.1:1".into(),
                relay_urls: vec!["rel://127.0.0.1:2".into()],
                stun_uri: "stun:127.0.0.1:3".into(),
                turn: None,
                state_file: None,
                refuse_sync: false,
                networks: None,
                lazy_connections: false,
            },
            DevMeshState::new("A1B2C3D4-0000-4000-8000-000000000001".into()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(
            tonic::transport::Server::builder().serve_with_incoming_shutdown(
                ManagementServiceServer::new(svc),
                tonic::transport::server::TcpIncoming::from(listener),
                async move { stop.cancelled().await },
            ),
        );
        (url, cancel)
    }

    #[tokio::test]
    async fn login_registers_with_the_setup_key_and_sync_streams_the_mesh() {
        let (url, cancel) = serve().await;
        let a_key = [1u8; 32];
        let mut a = ManagementClient::connect(&url, a_key).await.unwrap();
        assert!(matches!(
            a.login(None, system_meta("alpha", true)).await,
            Err(ManagementError::NeedsLogin)
        ));
        assert!(matches!(
            a.login(Some("wrong"), system_meta("alpha", true)).await,
            Err(ManagementError::SetupKeyRejected(_))
        ));
        // Case-insensitive, as NetBird's management treats setup keys.
        let login = a
            .login(
                Some("a1b2c3d4-0000-4000-8000-000000000001"),
                system_meta("alpha", true),
            )
            .await
            .unwrap();
        let pc = login.peer_config.unwrap();
        assert_eq!(pc.fqdn, "alpha.mesh.test");
        let a_addr = pc.address.clone();
        // Registered now: a plain login works.
        assert_eq!(
            a.login(None, system_meta("alpha", true))
                .await
                .unwrap()
                .peer_config
                .unwrap()
                .address,
            a_addr
        );

        let mut sync = a.sync(system_meta("alpha", true)).await.unwrap();
        let mut state = MeshState::default();
        let first = sync.next().await.unwrap();
        state.apply(&first, a.key()).unwrap();
        assert_eq!(state.peer_count(), 0);
        assert!(state.relay.is_some());

        let mut b = ManagementClient::connect(&url, [2u8; 32]).await.unwrap();
        b.login(
            Some("A1B2C3D4-0000-4000-8000-000000000001"),
            system_meta("alpha", true),
        )
        .await
        .unwrap();
        let mut b_sync = b.sync(system_meta("alpha", true)).await.unwrap();
        let b_first = b_sync.next().await.unwrap();
        assert_eq!(
            b_first
                .network_map
                .as_ref()
                .unwrap()
                .peer_config
                .as_ref()
                .unwrap()
                .fqdn,
            "alpha-2.mesh.test",
            "names are unique"
        );
        // A sees B come online.
        let mut added = None;
        for _ in 0..5 {
            let changes = state.apply(&sync.next().await.unwrap(), a.key()).unwrap();
            if let Some(Change::PeerAdded(p)) = changes
                .into_iter()
                .find(|c| matches!(c, Change::PeerAdded(_)))
            {
                added = Some(p);
                break;
            }
        }
        let b_peer = added.expect("B appears in A's map");
        assert_eq!(b_peer.fqdn, "alpha-2.mesh.test");
        // B's stream closes: as with NetBird, a disconnected peer stays in the map (its
        // reachability is the relay's business), so A keeps it.
        drop(b_sync);
        while let Ok(Ok(update)) =
            tokio::time::timeout(std::time::Duration::from_millis(500), sync.next()).await
        {
            let changes = state.apply(&update, a.key()).unwrap();
            assert!(!changes.contains(&Change::PeerRemoved(b_peer.key.clone())));
        }
        assert!(state.peer(&b_peer.key).is_some());
        cancel.cancel();
    }

    #[tokio::test]
    async fn unreachable_management_is_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let e = ManagementClient::connect(&url, [1u8; 32])
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ManagementError::Unreachable { .. }), "{e}");
        assert!(!e.is_permanent());
        let e = ManagementClient::connect("ftp://x", [1u8; 32])
            .await
            .err()
            .unwrap();
        assert!(e.is_permanent(), "{e}");
    }
}
