//! NetBird's control plane: the generated protocol types, the NaCl envelope, and (next) the
//! management and signal clients.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// NetBird's reconnect delays: from `first`, ×1.7 each time, at most `max`, jittered, endless.
pub fn backoff(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_factor(1.7)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

pub mod envelope;
pub mod identity;
pub mod management_client;
pub mod mesh;
pub mod sections;
pub mod signal_client;

/// Management service messages and gRPC stubs (package `management`).
#[allow(clippy::all, missing_docs)]
pub mod management {
    tonic::include_proto!("management");
}

/// Signal service messages and gRPC stubs (package `signalexchange`).
#[allow(clippy::all, missing_docs)]
pub mod signal {
    tonic::include_proto!("signalexchange");
}
