//! NetBird's control plane: the generated protocol types, the NaCl envelope, and (next) the
//! management and signal clients.

pub mod envelope;
pub mod identity;
pub mod management_client;
pub mod mesh;
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
