//! A local NetBird control plane for tests and demos: management (and, next, signal and relay)
//! served on loopback from memory, wire-compatible with the real services, every peer seeing
//! every other.

pub mod management;
pub mod relay_token;
pub mod signal;
