//! netbird-proxy: a WireGuard (and, later, NetBird) peer entirely in user space, handing the
//! mesh to ordinary programs through SOCKS5, HTTP proxy and port forwards.
//!
//! Layers, each knowing only the one below: `wg` (boringtun peers over one UDP socket) →
//! `netstack` (smoltcp, one task owning the interface) → `proxy` (dialler, listeners).
//! `engine` builds and runs them as one unit with one cancellation tree.

pub mod cli;
pub mod control;
pub mod devmesh;
pub mod dns;
pub mod engine;
pub mod firewall;
pub mod forward;
pub mod fuzzing;
pub mod ice;
pub mod netstack;
pub mod packet;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod status;
pub mod wg;
