//! Port forwards: a local TCP port whose every connection goes to one target through the dialler.

use std::sync::Arc;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::admission::{Limits, Ticket};
use super::dial::{Dialer, Target};
use super::{relay, serve_clients};
use crate::status::ListenerMetrics;

/// Accept on `listener` and relay each connection to `target` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<ListenerMetrics>,
    limits: Limits,
    dialer: Dialer,
    target: Target,
    cancel: CancellationToken,
) {
    let counters = metrics.clone();
    let idle = limits.idle_timeout;
    let handle_client = move |mut client: TcpStream, from: SocketAddr, ticket: Arc<Ticket>| {
        // A forward has no handshake: the client is established on arrival.
        ticket.established();
        let dialer = dialer.clone();
        let target = target.clone();
        let metrics = metrics.clone();
        async move {
            let started = tokio::time::Instant::now();
            let mut entry = super::access::Entry {
                listener: &metrics,
                client: from,
                target: &target,
                resolved: None,
                path: "",
                up: 0,
                down: 0,
                started,
                result: "error",
            };
            match dialer.dial(&target).await {
                Ok(mut upstream) => {
                    metrics.count("ok");
                    (entry.resolved, entry.path) = dialer.path_of(&upstream);
                    let r =
                        relay::client(&mut client, &mut upstream, idle, &metrics, from, &target)
                            .await;
                    (entry.up, entry.down, entry.result) = (r.up, r.down, "ok");
                }
                // The client sees the connection close; the reason goes to the log.
                Err(e) => {
                    metrics.count("error");
                    warn!(%from, %target, "forward: {e}")
                }
            }
            entry.log();
        }
    };
    // Over the limits, a forwarded client can only be closed.
    let refuse = |client: TcpStream| async move { drop(client) };
    serve_clients(listener, counters, &limits, cancel, handle_client, refuse).await
}

/// Accept mesh connections on `listener` and relay each to the local service `local`.
pub async fn serve_exposed(
    mut listener: crate::netstack::TcpListener,
    metrics: Arc<ListenerMetrics>,
    local: std::net::SocketAddr,
    idle: Option<std::time::Duration>,
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
                let started = tokio::time::Instant::now();
                let (result, relayed) = match tokio::net::TcpStream::connect(local).await {
                    Ok(mut upstream) => {
                        metrics.count("ok");
                        let _ = upstream.set_nodelay(true);
                        let r =
                            relay::client(&mut client, &mut upstream, idle, &metrics, from, &local)
                                .await;
                        ("ok", Some(r))
                    }
                    // The mesh client sees the connection close; the reason goes to the log.
                    Err(e) => {
                        metrics.count("error");
                        warn!(%from, %local, "expose: {e}");
                        ("error", None)
                    }
                };
                super::access::Entry {
                    listener: &metrics,
                    client: from,
                    target: &local,
                    resolved: relayed.map(|_| local),
                    path: if relayed.is_some() { "host" } else { "" },
                    up: relayed.map_or(0, |r| r.up),
                    down: relayed.map_or(0, |r| r.down),
                    started,
                    result,
                }
                .log();
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = work => {}
            }
        });
    }
}
