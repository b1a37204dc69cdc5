//! Port forwards: a local TCP port whose every connection goes to one target through the dialler.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::dial::{Dialer, Target};
use super::{relay, serve_clients};

/// Accept on `listener` and relay each connection to `target` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    dialer: Dialer,
    target: Target,
    cancel: CancellationToken,
) {
    serve_clients(listener, cancel, move |mut client, from| {
        let dialer = dialer.clone();
        let target = target.clone();
        async move {
            match dialer.dial(&target).await {
                Ok(mut upstream) => relay::bidirectional(&mut client, &mut upstream).await,
                // The client sees the connection close; the reason goes to the log.
                Err(e) => warn!(%from, %target, "forward: {e}"),
            }
        }
    })
    .await
}
