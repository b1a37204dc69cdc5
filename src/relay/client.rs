//! Relay client: one authenticated WebSocket to a relay server, carrying WireGuard datagrams to
//! and from any number of peers, with presence subscriptions and health-check echoes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::io::{FrameArena, write_batches};
use super::messages::{self, Frame, PeerId, peer_id};

/// Go's client waits this long for the AuthResponse.
const AUTH_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames queued towards the server.
const OUT_QUEUE: usize = 1024;
/// How long the data path waits for room in a full queue before dropping a datagram: long
/// enough to ride out a burst (the writer drains a full queue in about a millisecond), short
/// enough that a stalled relay cannot hold up traffic to every other peer.
const SEND_WAIT: Duration = Duration::from_millis(50);
/// Without a health check from the server for this long, the connection is considered dead.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(70);

/// Why the relay could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay URL `{0}` is not rel://HOST:PORT or rels://HOST:PORT")]
    BadUrl(String),
    #[error("relay token signature is not base64")]
    BadToken,
    #[error("cannot connect to relay {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("relay {0} refused the token or did not answer")]
    AuthFailed(String),
    #[error("peer is not on the relay (waited {0:?})")]
    PeerOffline(Duration),
    #[error("relay connection closed")]
    Closed,
    #[error("cancelled")]
    Cancelled,
}

/// A datagram that arrived through a relay: a view into the WebSocket message it came in.
#[derive(Debug)]
pub struct Relayed {
    pub client: Arc<RelayClient>,
    pub from: PeerId,
    pub data: Bytes,
}

/// A connection to one relay server.
pub struct RelayClient {
    instance_url: String,
    /// The server address we are connected to (offers advertise it as `relayServerIP`).
    server_ip: std::net::IpAddr,
    out: mpsc::Sender<Bytes>,
    /// Where outgoing Transport frames are built.
    arena: Mutex<FrameArena>,
    online: watch::Sender<HashSet<PeerId>>,
    /// Cancelled when the connection ends (or the owner cancels).
    closed: CancellationToken,
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayClient({})", self.instance_url)
    }
}

/// `rel://h:p` → `ws://h:p/relay`, `rels://h:p` → `wss://h:p/relay`.
pub fn websocket_url(url: &str) -> Result<String, RelayError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| RelayError::BadUrl(url.into()))?;
    let ws = match scheme {
        "rel" => "ws",
        "rels" => "wss",
        _ => return Err(RelayError::BadUrl(url.into())),
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(RelayError::BadUrl(url.into()));
    }
    // Without a port, the scheme's (as the Go client does): the TCP dial needs one.
    let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
    });
    let port = if has_port {
        ""
    } else if ws == "wss" {
        ":443"
    } else {
        ":80"
    };
    Ok(format!("{ws}://{host}{port}/relay"))
}

impl RelayClient {
    /// Connect and authenticate as `key_string`; relayed datagrams go to `inbound`. With
    /// `dial_ip`, the TCP connection goes to that address instead of resolving the URL's host
    /// (which still names the server for TLS): the fallback when a peer's relay URL does not
    /// resolve or answer from here but its advertised IP does.
    pub async fn connect(
        url: &str,
        dial_ip: Option<std::net::IpAddr>,
        key_string: &str,
        token_payload: &str,
        token_signature: &str,
        inbound: mpsc::Sender<Relayed>,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, RelayError> {
        let ws_url = websocket_url(url)?;
        let signature: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(token_signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(RelayError::BadToken)?;
        let connect = async {
            let authority = ws_url
                .split_once("://")
                .and_then(|(_, rest)| rest.split('/').next())
                .unwrap_or_default();
            let tcp = match dial_ip {
                Some(ip) => {
                    let port = authority
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .ok_or_else(|| RelayError::BadUrl(url.into()))?;
                    tokio::net::TcpStream::connect((ip, port)).await
                }
                None => tokio::net::TcpStream::connect(authority).await,
            }
            .map_err(|e| RelayError::Connect {
                url: url.into(),
                reason: e.to_string(),
            })?;
            // Every frame is a datagram a peer waits for: no Nagle (frames are batched per
            // wake-up instead, see `relay::io`). The socket buffers are left to the kernel's
            // autotuning (up to net.ipv4.tcp_rmem/tcp_wmem's maximum, 4–6 MiB by default):
            // setting SO_RCVBUF/SO_SNDBUF would turn it off and cap them at net.core.*mem_max
            // (208 KiB by default), below a relayed bulk transfer's window.
            let _ = tcp.set_nodelay(true);
            let server_ip = tcp.peer_addr().map_err(|e| RelayError::Connect {
                url: url.into(),
                reason: e.to_string(),
            })?;
            let (ws, _) = tokio_tungstenite::client_async_tls(ws_url.as_str(), tcp)
                .await
                .map_err(|e| RelayError::Connect {
                    url: url.into(),
                    reason: e.to_string(),
                })?;
            Ok::<_, RelayError>((ws, server_ip.ip()))
        };
        let (ws, server_ip) = tokio::select! {
            _ = cancel.cancelled() => return Err(RelayError::Cancelled),
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
                Err(_) => return Err(RelayError::Connect { url: url.into(), reason: "timed out".into() }),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(ws)) => ws,
            },
        };
        let (mut sink, mut source) = ws.split();
        let auth = messages::auth(&peer_id(key_string), &signature, token_payload);
        sink.send(Message::Binary(auth.into()))
            .await
            .map_err(|_| RelayError::AuthFailed(url.into()))?;
        let reply = tokio::select! {
            _ = cancel.cancelled() => return Err(RelayError::Cancelled),
            r = tokio::time::timeout(AUTH_TIMEOUT, source.next()) => r,
        };
        let instance_url = match reply {
            Ok(Some(Ok(Message::Binary(data)))) => match messages::parse(&data) {
                Ok(Frame::AuthResponse { url }) => url.to_string(),
                _ => return Err(RelayError::AuthFailed(url.into())),
            },
            _ => return Err(RelayError::AuthFailed(url.into())),
        };
        info!(relay = %instance_url, "relay connected");
        let (out, mut out_rx) = mpsc::channel::<Bytes>(OUT_QUEUE);
        let (online, _) = watch::channel(HashSet::new());
        let closed = cancel.child_token();
        let client = Arc::new(Self {
            instance_url,
            server_ip,
            out,
            arena: Mutex::default(),
            online,
            closed: closed.clone(),
        });
        let writer = async move {
            if let Some(mut sink) = write_batches(sink, &mut out_rx).await {
                let _ = sink.send(Message::Binary(messages::close().into())).await;
            }
        };
        let weak = Arc::downgrade(&client);
        let reader = async move {
            loop {
                let next = tokio::time::timeout(HEALTH_TIMEOUT, source.next()).await;
                let Ok(Some(Ok(msg))) = next else { break };
                let Message::Binary(data) = msg else {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                let Some(client) = weak.upgrade() else { break };
                match messages::parse(&data) {
                    Ok(Frame::Transport { peer, payload }) => {
                        let relayed = Relayed {
                            client: client.clone(),
                            from: *peer,
                            data: data.slice_ref(payload),
                        };
                        if inbound.send(relayed).await.is_err() {
                            break;
                        }
                    }
                    Ok(Frame::HealthCheck) => {
                        let _ = client.out.try_send(messages::health_check().into());
                    }
                    Ok(Frame::PeersOnline(ids)) => client.online.send_modify(|set| {
                        set.extend(ids.iter().copied());
                    }),
                    Ok(Frame::PeersWentOffline(ids)) => client.online.send_modify(|set| {
                        for id in ids.iter() {
                            set.remove(id);
                        }
                    }),
                    Ok(Frame::Close) => break,
                    Ok(_) => {}
                    Err(e) => debug!("relay: bad frame: {e}"),
                }
            }
        };
        let done = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = done.cancelled() => {}
                _ = writer => {}
                _ = reader => {}
            }
            done.cancel();
        });
        Ok(client)
    }

    /// The relay instance URL the server announced (what offers advertise).
    pub fn instance_url(&self) -> &str {
        &self.instance_url
    }

    /// The relay server's address, as connected.
    pub fn server_ip(&self) -> std::net::IpAddr {
        self.server_ip
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Subscribe to `peer` and wait until the relay says it is connected.
    pub async fn wait_online(
        &self,
        peer: &PeerId,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), RelayError> {
        for frame in messages::subscribe(&[*peer]) {
            self.out
                .send(frame.into())
                .await
                .map_err(|_| RelayError::Closed)?;
        }
        let mut rx = self.online.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => Err(RelayError::Cancelled),
            _ = self.closed.cancelled() => Err(RelayError::Closed),
            r = tokio::time::timeout(limit, rx.wait_for(|s| s.contains(peer))) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(RelayError::Closed),
                Err(_) => Err(RelayError::PeerOffline(limit)),
            },
        }
    }

    /// Whether the relay last said `peer` is connected.
    pub fn is_online(&self, peer: &PeerId) -> bool {
        self.online.borrow().contains(peer)
    }

    fn frame(&self, peer: &PeerId, datagram: &[u8]) -> Bytes {
        self.arena
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .transport(peer, datagram)
    }

    /// Queue one WireGuard datagram for `peer`; false if the connection is gone or its queue
    /// is full (the datagram is dropped, as a full UDP socket would).
    pub fn send_to(&self, peer: &PeerId, datagram: &[u8]) -> bool {
        self.out.try_send(self.frame(peer, datagram)).is_ok()
    }

    /// Queue one WireGuard datagram for `peer`, waiting up to `SEND_WAIT` while the queue is
    /// full (backpressure: the tunnel's TCP slows down instead of losing segments); false if
    /// the connection is gone or stayed full.
    pub async fn send(&self, peer: &PeerId, datagram: &[u8]) -> bool {
        let frame = self.frame(peer, datagram);
        matches!(
            tokio::time::timeout(SEND_WAIT, self.out.send(frame)).await,
            Ok(Ok(()))
        )
    }

    /// Close the connection.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devmesh::relay::DevRelay;
    use crate::devmesh::relay_token;

    #[test]
    fn urls() {
        assert_eq!(
            websocket_url("rel://127.0.0.1:80").unwrap(),
            "ws://127.0.0.1:80/relay"
        );
        assert_eq!(
            websocket_url("rels://r.example:443").unwrap(),
            "wss://r.example:443/relay"
        );
        assert_eq!(
            websocket_url("rels://r.example").unwrap(),
            "wss://r.example:443/relay"
        );
        assert_eq!(websocket_url("rel://[::1]").unwrap(), "ws://[::1]:80/relay");
        assert_eq!(
            websocket_url("rel://[::1]:9").unwrap(),
            "ws://[::1]:9/relay"
        );
        assert!(websocket_url("http://x:1").is_err());
        assert!(websocket_url("rel://").is_err());
    }

    #[tokio::test]
    async fn two_peers_exchange_datagrams_and_see_presence() {
        let secret = b"relay-secret".to_vec();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("rel://{}", listener.local_addr().unwrap());
        let cancel = CancellationToken::new();
        tokio::spawn(DevRelay::new(secret.clone(), url.clone()).serve(listener, cancel.clone()));
        let (payload, sig) = relay_token::issue(&secret, u64::MAX / 2);

        let (a_in, mut a_rx) = mpsc::channel(8);
        let (b_in, mut b_rx) = mpsc::channel(8);
        let a = RelayClient::connect(&url, None, "key-a", &payload, &sig, a_in, cancel.clone())
            .await
            .unwrap();
        assert_eq!(a.instance_url(), url);
        let b_id = peer_id("key-b");
        // B is not there yet: the wait times out cleanly.
        assert!(matches!(
            a.wait_online(&b_id, Duration::from_millis(200), &cancel)
                .await,
            Err(RelayError::PeerOffline(_))
        ));
        let b = RelayClient::connect(&url, None, "key-b", &payload, &sig, b_in, cancel.clone())
            .await
            .unwrap();
        a.wait_online(&b_id, Duration::from_secs(5), &cancel)
            .await
            .unwrap();
        assert!(a.send_to(&b_id, b"datagram from a"));
        let got = b_rx.recv().await.unwrap();
        assert_eq!(
            (got.from, &got.data[..]),
            (peer_id("key-a"), &b"datagram from a"[..])
        );
        assert!(b.send_to(&peer_id("key-a"), b"reply"));
        assert_eq!(a_rx.recv().await.unwrap().data, &b"reply"[..]);
        // B leaves: A is told.
        b.close();
        let mut rx = a.online.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| !s.contains(&b_id)))
            .await
            .unwrap()
            .unwrap();
        // A wrong token is refused.
        let (bad_in, _) = mpsc::channel(1);
        let e = RelayClient::connect(&url, None, "key-c", "1", &sig, bad_in, cancel.clone())
            .await
            .unwrap_err();
        assert!(matches!(e, RelayError::AuthFailed(_)), "{e}");
        cancel.cancel();
    }
}
