//! Port forwards: a local TCP port whose every connection goes to one target through the dialler.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::dial::{Dialer, Target};
use super::{relay, serve_clients};
use crate::status::ListenerMetrics;

/// Accept on `listener` and relay each connection to `target` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<ListenerMetrics>,
    dialer: Dialer,
    target: Target,
    cancel: CancellationToken,
) {
    serve_clients(
        listener,
        metrics.clone(),
        cancel,
        move |mut client, from| {
            let dialer = dialer.clone();
            let target = target.clone();
            let metrics = metrics.clone();
            async move {
                match dialer.dial(&target).await {
                    Ok(mut upstream) => {
                        metrics.count("ok");
                        relay::bidirectional(&mut client, &mut upstream).await
                    }
                    // The client sees the connection close; the reason goes to the log.
                    Err(e) => {
                        metrics.count("error");
                        warn!(%from, %target, "forward: {e}")
                    }
                }
            }
        },
    )
    .await
}

/// Accept mesh connections on `listener` and relay each to the local service `local`.
pub async fn serve_exposed(
    mut listener: crate::netstack::TcpListener,
    metrics: Arc<ListenerMetrics>,
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
        let metrics = metrics.clone();
        let open = metrics.open();
        tokio::spawn(async move {
            let _open = open;
            let from = client.peer_addr();
            let work = async {
                match tokio::net::TcpStream::connect(local).await {
                    Ok(mut upstream) => {
                        metrics.count("ok");
                        let _ = upstream.set_nodelay(true);
                        relay::bidirectional(&mut client, &mut upstream).await
                    }
                    // The mesh client sees the connection close; the reason goes to the log.
                    Err(e) => {
                        metrics.count("error");
                        warn!(%from, %local, "expose: {e}")
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = work => {}
            }
        });
    }
}
