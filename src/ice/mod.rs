//! Direct paths between peers: ICE on the WireGuard socket, NetBird's way (ice.md).
//!
//! * `wire` tells WireGuard, STUN and junk apart on the shared socket, and speaks the STUN
//!   server exchange;
//! * `candidate` and `creds` are NetBird's signal payloads;
//! * `srflx` learns our server-reflexive address through the same socket;
//! * `agents` runs one agent per peer (str0m's sans-IO `is` crate) under NetBird's rules.
//!
//! All of it is sans-IO: the negotiator (engine/negotiation.rs) feeds it and does the I/O, so
//! ICE owns no task, socket or timer of its own and ends with the negotiator.

pub mod agents;
pub mod candidate;
pub mod creds;
pub mod srflx;
pub mod turn;
pub mod wire;

pub use agents::{Agents, Event, IceCounters, LocalNet, Offered, Selected};
