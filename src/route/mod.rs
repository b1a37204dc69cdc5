//! NetBird's routes on the client side (networks.md §1): the map's routes decoded (`model`)
//! and each HA group's routing peer elected (`election`). Sans-IO: the engine feeds them the
//! map and the peers' states and applies the outcome to WireGuard's AllowedIPs.

pub mod election;
pub mod model;

pub use election::{PeerState, elect};
pub use model::{Route, RouteError, Target};
