//! Client of NetBird's signal service: a receive stream registered under our key (reconnected
//! with backoff, watched by a heartbeat), and unary `Send` for every outgoing message.
//!
//! `wait_stream_connected` is race-free: checking "connected?" and registering the waiter is one
//! step (`watch::Receiver::wait_for`), and the wait ends on the caller's cancel, the client's
//! cancel, or the connection, whichever comes first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::envelope::{self, key_string, parse_key_string, public_key_of};
use super::management_client::NETBIRD_VERSION;
use super::signal::signal_exchange_client::SignalExchangeClient;
use super::signal::{Body, EncryptedMessage, body};

/// Metadata naming our stream, and the server's acknowledgement.
const PEER_ID_HEADER: &str = "x-wiretrustee-peer-id";
const REGISTERED_HEADER: &str = "x-wiretrustee-peer-registered";
/// Without inbound traffic for this long, we send ourselves a heartbeat...
const HEARTBEAT_AFTER: Duration = Duration::from_secs(30);
/// ...which must come back within this time, or the stream is re-established.
const HEARTBEAT_WAIT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a signal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("signal address `{0}` is not valid: {1}")]
    BadUri(String, String),
    #[error("signal: {0}")]
    Rpc(String),
    #[error("signal: no answer within {0:?}")]
    Timeout(Duration),
    #[error("cancelled")]
    Cancelled,
}

/// A decrypted message from a peer.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Sender's key string.
    pub from: String,
    pub body: Body,
}

/// The signal client.
pub struct SignalClient {
    rpc: SignalExchangeClient<Channel>,
    private_key: [u8; 32],
    key: String,
    uri: String,
    connected: watch::Sender<bool>,
    cancel: CancellationToken,
    /// Messages sent (offers, answers, candidates, GO_IDLE), for status.
    sent: std::sync::atomic::AtomicU64,
}

impl SignalClient {
    /// A client for `uri` (`host:port`; TLS when `tls`). Nothing is dialled until used; the
    /// client's work ends when `cancel` fires.
    pub fn new(
        uri: &str,
        tls: bool,
        private_key: [u8; 32],
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, SignalError> {
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{uri}");
        let bad = |e: String| SignalError::BadUri(uri.to_string(), e);
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if tls {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_webpki_roots())
                .map_err(|e| bad(e.to_string()))?;
        }
        let (connected, _) = watch::channel(false);
        Ok(Arc::new(Self {
            rpc: SignalExchangeClient::new(endpoint.connect_lazy()),
            private_key,
            key: key_string(&public_key_of(&private_key)),
            uri: uri.to_string(),
            connected,
            cancel,
            sent: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Our key string.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Messages sent so far (each counted once it is handed to the RPC).
    pub fn messages_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the receive stream is registered right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Wait until the receive stream is registered, or either token is cancelled.
    pub async fn wait_stream_connected(
        &self,
        cancel: &CancellationToken,
    ) -> Result<(), SignalError> {
        let mut rx = self.connected.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => Err(SignalError::Cancelled),
            _ = self.cancel.cancelled() => Err(SignalError::Cancelled),
            r = rx.wait_for(|c| *c) => r.map(|_| ()).map_err(|_| SignalError::Cancelled),
        }
    }

    /// Seal `body` to `to` (a key string) and send it.
    pub async fn send(&self, to: &str, mut body: Body) -> Result<(), SignalError> {
        let peer = parse_key_string(to).map_err(|e| SignalError::Rpc(e.to_string()))?;
        if body.net_bird_version.is_empty() {
            body.net_bird_version = NETBIRD_VERSION.to_string();
        }
        let msg = EncryptedMessage {
            key: self.key.clone(),
            remote_key: to.to_string(),
            body: envelope::seal_message(&body, &self.private_key, &peer),
        };
        let mut rpc = self.rpc.clone();
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::select! {
            _ = self.cancel.cancelled() => Err(SignalError::Cancelled),
            r = tokio::time::timeout(SEND_TIMEOUT, rpc.send(msg)) => match r {
                Err(_) => Err(SignalError::Timeout(SEND_TIMEOUT)),
                Ok(Err(status)) => Err(SignalError::Rpc(status.message().to_string())),
                Ok(Ok(_)) => Ok(()),
            },
        }
    }

    /// Keep the receive stream up until the client is cancelled, delivering every message from
    /// a peer to `inbox` (heartbeats are consumed here).
    pub async fn run(self: Arc<Self>, inbox: mpsc::Sender<Incoming>) {
        let mut delays = backoff();
        while !self.cancel.is_cancelled() {
            match self.receive(&inbox).await {
                Ok(()) => {
                    // The stream was up: start the backoff from the beginning.
                    delays = backoff();
                }
                Err(SignalError::Cancelled) => break,
                Err(e) => warn!(uri = %self.uri, "signal stream: {e}"),
            }
            self.connected.send_replace(false);
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.connected.send_replace(false);
    }

    /// One life of the receive stream.
    async fn receive(&self, inbox: &mpsc::Sender<Incoming>) -> Result<(), SignalError> {
        // We never send on the stream, but its request side must end with this function:
        // a request body that stays pending keeps the HTTP/2 stream, and so the connection,
        // alive after the response is dropped.
        let life = self.cancel.child_token();
        let _end_request = life.clone().drop_guard();
        let outgoing = futures::StreamExt::filter_map(
            futures::stream::once(life.cancelled_owned()),
            |_| async { None::<EncryptedMessage> },
        );
        let mut request = tonic::Request::new(outgoing);
        request.metadata_mut().insert(
            PEER_ID_HEADER,
            self.key
                .parse()
                .map_err(|_| SignalError::Rpc("key is not valid metadata".into()))?,
        );
        let mut rpc = self.rpc.clone();
        let response = tokio::select! {
            _ = self.cancel.cancelled() => return Err(SignalError::Cancelled),
            r = rpc.connect_stream(request) => r.map_err(|s| SignalError::Rpc(format!("{}: {}", s.code(), s.message())))?,
        };
        if response.metadata().get(REGISTERED_HEADER).is_none() {
            return Err(SignalError::Rpc(
                "stream not registered by the server".into(),
            ));
        }
        let mut stream = response.into_inner();
        info!(uri = %self.uri, "signal connected");
        self.connected.send_replace(true);
        let mut heartbeat_sent = false;
        loop {
            let wait = if heartbeat_sent {
                HEARTBEAT_WAIT
            } else {
                HEARTBEAT_AFTER
            };
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return Err(SignalError::Cancelled),
                r = tokio::time::timeout(wait, stream.message()) => r,
            };
            let msg = match next {
                Err(_) if heartbeat_sent => {
                    return Err(SignalError::Rpc("heartbeat did not come back".into()));
                }
                Err(_) => {
                    heartbeat_sent = true;
                    let beat = Body {
                        r#type: body::Type::Heartbeat as i32,
                        ..Default::default()
                    };
                    if let Err(e) = self.send(&self.key.clone(), beat).await {
                        debug!("signal heartbeat: {e}");
                    }
                    continue;
                }
                Ok(Err(status)) => {
                    return Err(SignalError::Rpc(format!(
                        "{}: {}",
                        status.code(),
                        status.message()
                    )));
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(msg))) => msg,
            };
            heartbeat_sent = false;
            let Ok(sender) = parse_key_string(&msg.key) else {
                continue;
            };
            let body: Body = match envelope::open_message(&msg.body, &self.private_key, &sender) {
                Ok(b) => b,
                Err(e) => {
                    debug!(from = %msg.key, "signal: dropped message: {e}");
                    continue;
                }
            };
            if body.r#type == body::Type::Heartbeat as i32 {
                continue;
            }
            let incoming = Incoming {
                from: msg.key,
                body,
            };
            // Drain promptly: the server cuts streams that do not take messages.
            if inbox.send(incoming).await.is_err() {
                return Err(SignalError::Cancelled);
            }
        }
    }
}

/// Stream reconnects: 800 ms, ×1.7, at most 10 s (as NetBird's signal client).
fn backoff() -> impl Iterator<Item = Duration> {
    super::backoff(Duration::from_millis(800), Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::signal::signal_exchange_server::SignalExchangeServer;
    use crate::devmesh::signal::DevSignal;
    use std::time::Instant;

    async fn serve() -> (String, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(
            tonic::transport::Server::builder().serve_with_incoming_shutdown(
                SignalExchangeServer::new(DevSignal::default()),
                tonic::transport::server::TcpIncoming::from(listener),
                async move { stop.cancelled().await },
            ),
        );
        (addr, cancel)
    }

    #[tokio::test]
    async fn offers_travel_sealed_between_two_peers() {
        let (addr, server) = serve().await;
        let cancel = CancellationToken::new();
        let a = SignalClient::new(&addr, false, [1u8; 32], cancel.clone()).unwrap();
        let b = SignalClient::new(&addr, false, [2u8; 32], cancel.clone()).unwrap();
        let (a_tx, _a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        tokio::spawn(a.clone().run(a_tx));
        tokio::spawn(b.clone().run(b_tx));
        a.wait_stream_connected(&cancel).await.unwrap();
        b.wait_stream_connected(&cancel).await.unwrap();
        let offer = Body {
            r#type: body::Type::Offer as i32,
            payload: ":".into(),
            relay_server_address: Some("rel://127.0.0.1:9".into()),
            ..Default::default()
        };
        a.send(b.key(), offer).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), b_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.from, a.key());
        assert_eq!(got.body.payload, ":");
        assert_eq!(got.body.net_bird_version, NETBIRD_VERSION);
        // To an offline peer: no error, the message is gone.
        let nobody = key_string(&public_key_of(&[9u8; 32]));
        a.send(&nobody, Body::default()).await.unwrap();
        cancel.cancel();
        server.cancel();
    }

    /// A server that accepts TCP and never answers: the wait ends at once on cancel.
    #[tokio::test]
    async fn a_cancel_releases_a_wait_on_a_silent_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hold = std::thread::spawn(move || {
            let conns: Vec<_> = listener.incoming().take(1).collect();
            std::thread::sleep(Duration::from_millis(1500));
            drop(conns);
        });
        let client_cancel = CancellationToken::new();
        let client = SignalClient::new(&addr, false, [3u8; 32], client_cancel.clone()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let runner = tokio::spawn(client.clone().run(tx));
        let caller = CancellationToken::new();
        let waiter = {
            let client = client.clone();
            let caller = caller.clone();
            tokio::spawn(async move { client.wait_stream_connected(&caller).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let start = Instant::now();
        caller.cancel();
        let r = waiter.await.unwrap();
        assert!(matches!(r, Err(SignalError::Cancelled)));
        assert!(start.elapsed() < Duration::from_secs(1));
        // The client's own cancel ends its run loop promptly too.
        let start = Instant::now();
        client_cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), runner)
            .await
            .unwrap()
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        hold.join().unwrap();
    }
}
