//! SOCKS5 and the HTTP proxy on one port (`--proxy`): each client is told apart by its first
//! byte — 0x05 opens a SOCKS5 greeting, a letter an HTTP request line — and served by the same
//! code as on the dedicated listeners, with each protocol's own credentials. A SOCKS4 client
//! (0x04) gets SOCKS4's "rejected" answer rather than a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::admission::Limits;
use super::dial::Dialer;
use super::{Credentials, http, serve_clients, socks5};
use crate::status::ListenerMetrics;

/// Which protocol a client speaks, from its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Socks5,
    Socks4,
    Http,
}

/// The protocol a first byte announces: SOCKS by its version byte, HTTP by a method's first
/// letter; anything else is not a proxy client.
pub fn sniff(first: u8) -> Option<Protocol> {
    match first {
        5 => Some(Protocol::Socks5),
        4 => Some(Protocol::Socks4),
        b'A'..=b'Z' | b'a'..=b'z' => Some(Protocol::Http),
        _ => None,
    }
}

/// The first byte, without taking it; None when the client closes or stays silent.
async fn first_byte(client: &TcpStream, wait: Duration) -> Option<u8> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, client.peek(&mut b)).await {
        Ok(Ok(1)) => Some(b[0]),
        _ => None,
    }
}

/// SOCKS4's "request rejected or failed" (VN 0, CD 91).
async fn reject_socks4(mut client: TcpStream) {
    let _ = client.write_all(&[0, 91, 0, 0, 0, 0, 0, 0]).await;
    let _ = client.shutdown().await;
}

/// Serve both protocols on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<ListenerMetrics>,
    limits: Limits,
    dialer: Dialer,
    socks_auth: Option<Arc<Credentials>>,
    http_auth: Option<Arc<Credentials>>,
    cancel: CancellationToken,
) {
    let wait = limits.handshake_timeout;
    let refuse_auth = socks_auth.is_some();
    let socks = Arc::new(socks5::client_handler(
        metrics.clone(),
        &limits,
        dialer.clone(),
        socks_auth,
    ));
    let web = Arc::new(http::client_handler(
        metrics.clone(),
        &limits,
        dialer,
        http_auth,
        cancel.clone(),
    ));
    let counters = metrics.clone();
    let handle = move |client: TcpStream, from: SocketAddr, ticket| {
        let (socks, web, metrics) = (socks.clone(), web.clone(), counters.clone());
        async move {
            match first_byte(&client, wait).await.map(sniff) {
                Some(Some(Protocol::Socks5)) => socks(client, from, ticket).await,
                Some(Some(Protocol::Http)) => web(client, from, ticket).await,
                Some(Some(Protocol::Socks4)) => {
                    metrics.count("socks4");
                    debug!(%from, "proxy: a SOCKS4 client; only SOCKS5 is spoken");
                    reject_socks4(client).await;
                }
                Some(None) => {
                    metrics.count("rejected");
                    debug!(%from, "proxy: neither SOCKS5 nor HTTP");
                }
                None => metrics.count("timeout"),
            }
        }
    };
    let refuse = move |client: TcpStream| async move {
        match first_byte(&client, Duration::from_secs(2))
            .await
            .and_then(sniff)
        {
            Some(Protocol::Socks5) => socks5::refuse(client, refuse_auth).await,
            Some(Protocol::Http) => http::refuse(client).await,
            Some(Protocol::Socks4) => reject_socks4(client).await,
            None => {}
        }
    };
    serve_clients(listener, metrics, &limits, cancel, handle, refuse).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocols_apart() {
        assert_eq!(sniff(5), Some(Protocol::Socks5));
        assert_eq!(sniff(4), Some(Protocol::Socks4));
        for m in [b'G', b'C', b'P', b'O', b'd'] {
            assert_eq!(sniff(m), Some(Protocol::Http));
        }
        assert_eq!(sniff(0x16), None, "a TLS ClientHello is neither");
        assert_eq!(sniff(0), None);
    }
}
