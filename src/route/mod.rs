//! NetBird's routes on the client side (networks.md §1): the map's routes decoded (`model`),
//! the user's selection (`selection`), each HA group's routing peer elected (`election`), and
//! all of it together (`client`). Sans-IO: the engine feeds them the map and the peers' states
//! and applies the outcome to WireGuard's AllowedIPs.

pub mod client;
pub mod election;
pub mod model;
pub mod selection;

pub use client::{ClientRoutes, GroupStatus, Outcome};
pub use election::{PeerState, elect};
pub use model::{Route, RouteError, Target};
pub use selection::Selection;
