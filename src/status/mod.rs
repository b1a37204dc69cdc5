//! What the proxy is doing, for people and for other programs: readiness, our peer, the other
//! peers, the control plane and the listeners, as JSON (`/status`), Prometheus text
//! (`/metrics`) and two probes (`/healthz`, `/readyz`).
//!
//! [`Snapshot`] is what [`Peer::status`](crate::Peer::status) returns and `/status` serves;
//! [`client`] reads it from a running proxy's status endpoint.
//!
//! Inside, one hub lives as long as the peer and outlives the engines the supervisor builds,
//! so counters and the restart count carry over; each engine attaches a view of its live parts
//! when it is up and detaches it when it stops. Snapshots are read on demand — nothing here
//! sits on the data path except the listeners' counters.

pub mod client;
mod prometheus;
mod snapshot;

internal_modules! {
    hub;
    server;
}

pub(crate) use hub::*;
pub use snapshot::*;
