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

/// Accept mesh connections on `listener` and relay each to the local service `local`.
pub async fn serve_exposed(
    mut listener: crate::netstack::TcpListener,
    local: std::net::SocketAddr,
    cancel: CancellationToken,
) {
    loop {
        let mut client = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => match c {
                Some(c) => c,
                None => return,
            },
        };
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let from = client.peer_addr();
            let work = async {
                match tokio::net::TcpStream::connect(local).await {
                    Ok(mut upstream) => {
                        let _ = upstream.set_nodelay(true);
                        relay::bidirectional(&mut client, &mut upstream).await
                    }
                    // The mesh client sees the connection close; the reason goes to the log.
                    Err(e) => warn!(%from, %local, "expose: {e}"),
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = work => {}
            }
        });
    }
}
