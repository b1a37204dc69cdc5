//! A NetBird peer in user space — no root, no TUN device, no kernel module — inside any tokio
//! program, or as the `netbird-proxy` command that hands the mesh to other programs through
//! SOCKS5, an HTTP proxy, port forwards and exposed ports.
//!
//! # A peer in your program
//!
//! A [`Peer`] joins a NetBird account with a setup key (or fixed WireGuard peers with a
//! wg-quick file: [`PeerBuilder::wireguard`]). [`PeerBuilder::start`] returns once the peer
//! is ready; then [`Peer::dial`] opens a TCP stream to another peer by its mesh name,
//! [`Peer::listen`] accepts connections on our mesh address, and [`Peer::bind_udp`] sends and
//! receives datagrams there. Streams are tokio `AsyncRead + AsyncWrite`, so hyper, tonic,
//! tokio-rustls or your own protocol run over them unchanged.
//!
//! ```no_run
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let peer = netbird_proxy::Peer::builder()
//!     .setup_key(std::env::var("NB_SETUP_KEY")?)
//!     // The same peer (name, mesh address) on every run.
//!     .state_file("/var/lib/my-app/netbird")
//!     .start()
//!     .await?;
//!
//! // A client of another peer.
//! let mut db = peer.dial("database.netbird.cloud", 5432).await?;
//! db.write_all(b"...").await?;
//!
//! // A service for other peers, on our mesh address.
//! let mut listener = peer.listen(8080).await?;
//! let mut conn = listener.accept().await?;
//! let mut request = [0u8; 1024];
//! let n = conn.read(&mut request).await?;
//!
//! println!("{} peers known", peer.status().peers.len());
//! peer.stop().await?;
//! # Ok(()) }
//! ```
//!
//! A peer can also serve the proxies the command line has ([`PeerBuilder::socks`],
//! [`PeerBuilder::http`], [`PeerBuilder::forward`], [`PeerBuilder::expose`]), with values
//! from [`config`] in the command line's syntax.
//!
//! # Lifecycle
//!
//! A peer runs a supervised engine: a failed engine is rebuilt after a backoff, and only a
//! failure no retry can fix (a rejected setup key, a listener that cannot bind) ends the peer
//! — [`Peer::wait`] returns it. [`Peer::stop`] ends everything the peer started before it
//! returns, and is final: build a new peer to start again. Dropping the last handle stops it
//! too. Streams and listeners use whichever engine is up, so they outlive rebuilds.
//!
//! # Testing your code against a mesh
//!
//! [`devmesh::TestMesh`] starts a NetBird control plane (management, signal, a relay) and
//! named peers in your test process, on loopback:
//!
//! ```
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mesh = netbird_proxy::devmesh::TestMesh::start(&["api", "worker"]).await?;
//! let mut listener = mesh.peer("api").listen(80).await?;
//! let stream = mesh.peer("worker").dial("api.netbird.test", 80).await?;
//! let accepted = listener.accept().await?;
//! assert_eq!(accepted.peer_addr()?, stream.local_addr()?);
//! mesh.stop().await;
//! # Ok(()) }
//! ```
//!
//! # Status
//!
//! [`Peer::status`] is what `netbird-proxy status` shows and `/status` serves: readiness and
//! why not, our addresses, every peer with its path (direct or relayed), the control plane,
//! listeners and routes ([`status::Snapshot`]); [`Peer::status_changes`] yields it as it
//! changes.
//!
//! Inside, layers know only the one below: WireGuard (boringtun peers over one UDP socket) →
//! a netstack (smoltcp, one task owning the interface) → the proxies; the engine builds and
//! runs them as one unit with one cancellation tree. None of that is public: this page is the
//! whole API.

#![cfg_attr(not(feature = "internals"), deny(missing_docs))]

/// Modules that are the crate's own: private to it, or — with the `internals` feature, which
/// only this crate's tests, benches and fuzzers turn on — public without any promise.
macro_rules! internal_modules {
    ($($name:ident;)*) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) mod $name;
    )*};
}

pub mod devmesh;
mod peer;
pub mod status;

internal_modules! {
    control;
    dns;
    engine;
    firewall;
    forward;
    fuzzing;
    ice;
    netstack;
    one_or_many;
    packet;
    proxy;
    relay;
    route;
    wg;
}

pub use peer::{
    DEFAULT_MANAGEMENT_URL, Error, LazyConnections, MeshListener, MeshStream, MeshUdpSocket, Peer,
    PeerBuilder, Ready, StatusChanges, WireGuardConfig,
};

/// The values listeners and forwards are configured with, in the command line's syntax
/// (`FromStr`), for [`PeerBuilder`].
pub mod config {
    pub use crate::netstack::Congestion;
    pub use crate::proxy::{Credentials, Expose, Forward, ListenAddr};
}

/// The `tracing` target of the access log: one event per connection, association, flow or
/// request (kind, listener, client, target, path, bytes, duration, result). Off unless a
/// subscriber's filter turns it on.
pub const ACCESS_LOG_TARGET: &str = proxy::access::TARGET;

/// Where the command line keeps the peer's state file unless told:
/// `$XDG_STATE_HOME/netbird-proxy/state`, else `~/.local/state/netbird-proxy/state`.
pub fn default_state_path() -> std::path::PathBuf {
    control::identity::default_state_path()
}
