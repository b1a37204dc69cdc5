//! `TestMesh`: a dev mesh and N peers in this process, for testing a program's own mesh-aware
//! code the way `#[tokio::test]` users expect — a few lines, loopback only, nothing left behind.

use std::time::Duration;

use crate::peer::{Error, Peer, PeerBuilder};

use super::{DevMesh, DevMeshConfig, random_setup_key};

/// The mesh's DNS domain: peer `alpha` is `alpha.netbird.test`.
pub const TEST_DOMAIN: &str = "netbird.test";

/// How long [`TestMesh::start`] waits for every peer to reach every other.
const MESH_UP: Duration = Duration::from_secs(60);

/// A dev mesh (management, signal, a relay) and named peers, all in this process.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// let mesh = netbird_proxy::devmesh::TestMesh::start(&["server", "client"]).await?;
/// let mut listener = mesh.peer("server").listen(7000).await?;
/// tokio::spawn(async move {
///     let mut s = listener.accept().await.unwrap();
///     s.write_all(b"hello").await.unwrap();
/// });
/// let mut s = mesh.peer("client").dial("server.netbird.test", 7000).await?;
/// let mut hello = String::new();
/// s.read_to_string(&mut hello).await?;
/// assert_eq!(hello, "hello");
/// mesh.stop().await;
/// # Ok(()) }
/// ```
pub struct TestMesh {
    mesh: DevMesh,
    peers: Vec<(String, Peer)>,
}

impl std::fmt::Debug for TestMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestMesh")
            .field("management_url", &self.mesh.management_url)
            .field(
                "peers",
                &self.peers.iter().map(|p| &p.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TestMesh {
    /// A dev mesh with a peer for each name, returning once every peer has a WireGuard
    /// session with every other (through the relay, or directly once ICE finds a path).
    pub async fn start(names: &[&str]) -> Result<Self, Error> {
        let mut mesh = Self::empty().await?;
        for name in names {
            let builder = mesh.builder(name).ready_peers(0);
            mesh.add(name, builder).await?;
        }
        let others = names.len().saturating_sub(1);
        for (name, peer) in &mesh.peers {
            let wanted = async {
                loop {
                    let s = peer.status();
                    let connected = s.peers.iter().filter(|p| p.status == "connected").count();
                    if s.ready && connected >= others {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            if tokio::time::timeout(MESH_UP, wanted).await.is_err() {
                let reason = format!(
                    "peer {name} did not reach the {others} other peer(s) within {MESH_UP:?}"
                );
                mesh.stop().await;
                return Err(Error::NotReady {
                    waited: MESH_UP,
                    reason,
                });
            }
        }
        Ok(mesh)
    }

    /// A dev mesh with no peers yet; add them with [`add`](Self::add).
    pub async fn empty() -> Result<Self, Error> {
        let key = random_setup_key();
        let mesh = DevMesh::start(DevMeshConfig::local(&key, TEST_DOMAIN))
            .await
            .map_err(|e| Error::Failed(format!("cannot start the dev mesh: {e}")))?;
        Ok(Self {
            mesh,
            peers: Vec::new(),
        })
    }

    /// The dev mesh these peers are on (its URLs, and account settings to change).
    pub fn dev_mesh(&self) -> &DevMesh {
        &self.mesh
    }

    /// A builder for a peer of this mesh named `name` (management URL, setup key and host
    /// name set), to give more options before [`add`](Self::add).
    pub fn builder(&self, name: &str) -> PeerBuilder {
        Peer::builder()
            .management_url(&self.mesh.management_url)
            .setup_key(&self.mesh.setup_key)
            .hostname(name)
            // Every peer of a test mesh is set up at once, so `start` can promise it.
            .lazy_connections(false)
    }

    /// Start a peer from `builder` (see [`builder`](Self::builder)) under `name`, waiting
    /// until it is ready.
    pub async fn add(&mut self, name: &str, builder: PeerBuilder) -> Result<&Peer, Error> {
        let peer = builder.start().await?;
        self.peers.push((name.to_string(), peer));
        Ok(&self.peers[self.peers.len() - 1].1)
    }

    /// The peer named `name`.
    ///
    /// # Panics
    /// When there is none: a test asking for a peer it did not start is a bug in the test.
    pub fn peer(&self, name: &str) -> &Peer {
        match self.peers.iter().find(|(n, _)| n == name) {
            Some((_, p)) => p,
            None => panic!("no peer named {name} in this TestMesh"),
        }
    }

    /// The management service's URL, for a peer started elsewhere (another process).
    pub fn management_url(&self) -> &str {
        &self.mesh.management_url
    }

    /// The setup key the peers register with.
    pub fn setup_key(&self) -> &str {
        &self.mesh.setup_key
    }

    /// Stop every peer, then the mesh's services.
    pub async fn stop(self) {
        for (_, peer) in &self.peers {
            let _ = peer.stop().await;
        }
        self.mesh.stop().await;
    }
}
