//! The user-space TCP/IP stack (smoltcp) on our mesh address(es).
//!
//! One task owns the smoltcp `Interface` and `SocketSet` (see `stack`); everything else talks to
//! it through a command channel and per-connection shared state (`tcp`, `udp`). IP packets come
//! from and go to the WireGuard device through bounded channels (`device`).

mod config;
mod device;
mod handle;
pub mod raw;
mod routed;
mod stack;
mod tcp;
mod udp;

pub use routed::{GateCounters, RoutedFlow};
pub use config::{Congestion, NetstackConfig, tune_tcp_socket};
pub use handle::{ConnectError, Netstack};
pub use tcp::{TcpListener, TcpStream};
pub use udp::UdpSocket;
