//! The dev mesh's STUN server: answers Binding requests with the sender's address, so peers on
//! one machine, or in namespaces behind NATs, learn server-reflexive candidates. It listens on
//! UDP at management's address and port and is announced in `NetbirdConfig.stuns`.

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::trace;

use crate::ice::wire;

/// Serve until `cancel`.
pub async fn serve(socket: UdpSocket, cancel: CancellationToken) {
    let mut buf = [0u8; 1500];
    let mut out = [0u8; 44];
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    trace!("stun recv: {e}");
                    continue;
                }
            },
        };
        match wire::binding_success(&buf[..n], from, &mut out) {
            Ok(len) => {
                if let Err(e) = socket.send_to(&out[..len], from).await {
                    trace!(%from, "stun send: {e}");
                }
            }
            Err(e) => trace!(%from, "stun: {e}"),
        }
    }
}
