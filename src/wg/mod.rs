//! WireGuard without a TUN device: boringtun tunnels per peer over one UDP socket.
//!
//! `config` parses wg-quick files, `router` does cryptokey routing, `device` runs the peers, `rtt` times
//! their handshakes, `udp` batches the socket's I/O.

pub mod config;
pub mod device;
pub mod router;
pub mod rtt;
pub mod udp;

pub use config::{Key, WgConfig};
pub use device::{PeerSpec, WgDevice};
