//! Runs the unit tests of our smoltcp patch's SACK scoreboard (vendor/smoltcp cannot run its
//! own test suite here: its dev-dependencies are not vendored). The module is compiled in this
//! test crate against smoltcp's public sequence-number type.

#![allow(dead_code)]

/// What `crate::time` means inside the patched module.
mod time {
    pub use smoltcp::time::{Duration, Instant};
}

/// What `crate::wire` means inside the patched module.
mod wire {
    pub use smoltcp::wire::TcpSeqNumber;
}

#[path = "../vendor/smoltcp/src/socket/tcp/recovery.rs"]
mod recovery;
