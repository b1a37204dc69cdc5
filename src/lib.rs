//! netbird-proxy: a WireGuard (and, later, NetBird) peer entirely in user space, handing the
//! mesh to ordinary programs through SOCKS5, HTTP proxy and port forwards.
//!
//! Layers, each knowing only the one below: `wg` (boringtun peers over one UDP socket) →
//! `netstack` (smoltcp, one task owning the interface) → `proxy` (dialler, listeners).
//! `engine` builds and runs them as one unit with one cancellation tree.

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
    packet;
    proxy;
    relay;
    route;
    wg;
}

pub use peer::{
    DEFAULT_MANAGEMENT_URL, Error, MeshListener, MeshStream, MeshUdpSocket, Peer, PeerBuilder,
    Ready, StatusChanges, WireGuardConfig,
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
