//! NetBird's relay: WireGuard datagrams between peers over a WebSocket to a relay server, for
//! peers that cannot reach each other directly. `messages` is the frame codec (sans-IO).

pub mod client;
pub mod io;
pub mod messages;
pub mod ws;
