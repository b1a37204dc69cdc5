//! Relay client: one authenticated WebSocket to a relay server, carrying WireGuard datagrams to
//! and from any number of peers, with presence subscriptions and health-check echoes.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::io::{EventReader, OutQueue, client_handshake};
use super::messages::{self, Frame, PeerId, peer_id};
use super::ws::{self, Decoder, Event, Role};

/// Go's client waits this long for the AuthResponse.
const AUTH_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the data path waits for room in a full queue before dropping a datagram: long
/// enough to ride out a burst (the writer drains a full queue in a few milliseconds), short
/// enough that a stalled relay cannot hold up traffic to every other peer.
const SEND_WAIT: Duration = Duration::from_millis(50);
/// Without a health check (or anything else) from the server for this long, the connection
/// is considered dead.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(70);
/// How long a closing connection may take to send what is queued and its Close frame.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// The relay's WebSocket endpoint.
const PATH: &str = "/relay";

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

/// A datagram that arrived through a relay: a view into the buffer its frame was read into.
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
    server_ip: IpAddr,
    /// Frames towards the server, written into one buffer (see `relay::io`).
    out: Arc<OutQueue>,
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
    Ok(format!("{ws}://{host}{port}{PATH}"))
}

/// TLS for rels://: the webpki roots, as for management and signal.
static TLS: LazyLock<tokio_rustls::TlsConnector> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
});

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// An authenticated connection, before its tasks start.
struct Session {
    events: EventReader<Reader>,
    writer: Writer,
    instance_url: String,
}

/// Send the Auth frame and wait for the AuthResponse: the relay instance's URL.
async fn authenticate(
    reader: Reader,
    mut writer: Writer,
    decoder: Decoder,
    auth: &[u8],
) -> Result<Session, String> {
    let mut frame = BytesMut::new();
    ws::put_frame(
        &mut frame,
        ws::opcode::BINARY,
        &[auth],
        Some(rand::random()),
    );
    writer.write_all(&frame).await.map_err(|e| e.to_string())?;
    writer.flush().await.map_err(|e| e.to_string())?;
    let mut events = EventReader::new(reader, decoder, AUTH_TIMEOUT);
    let answer = loop {
        match events.next().await.map_err(|e| e.to_string())? {
            Some(Event::Binary(m)) => break m,
            Some(Event::Close) | None => return Err("closed before answering".into()),
            Some(_) => {}
        }
    };
    match messages::parse(&answer) {
        Ok(Frame::AuthResponse { url }) => {
            events.set_idle(HEALTH_TIMEOUT);
            Ok(Session {
                instance_url: url.to_string(),
                events,
                writer,
            })
        }
        Ok(_) => Err("answered with something other than an AuthResponse".into()),
        Err(e) => Err(format!("bad answer: {e}")),
    }
}

impl RelayClient {
    /// Connect and authenticate as `key_string`; relayed datagrams go to `inbound`. With
    /// `dial_ip`, the TCP connection goes to that address instead of resolving the URL's host
    /// (which still names the server for TLS): the fallback when a peer's relay URL does not
    /// resolve or answer from here but its advertised IP does.
    pub async fn connect(
        url: &str,
        dial_ip: Option<IpAddr>,
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
        let tls = ws_url.starts_with("wss://");
        let authority = ws_url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or_default()
            .to_string();
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| RelayError::BadUrl(url.into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let auth = messages::auth(&peer_id(key_string), &signature, token_payload);
        let failed = |reason: String| RelayError::Connect {
            url: url.into(),
            reason,
        };
        let (client, start) = {
            let connect = async {
                let tcp = match dial_ip {
                    Some(ip) => tokio::net::TcpStream::connect((ip, port)).await,
                    None => tokio::net::TcpStream::connect((host.as_str(), port)).await,
                }
                .map_err(|e| failed(e.to_string()))?;
                // Every frame is a datagram a peer waits for: no Nagle (frames are batched
                // per wake-up instead, see `relay::io`). The socket buffers are left to the
                // kernel's autotuning (up to net.ipv4.tcp_rmem/tcp_wmem's maximum, 4–6 MiB by
                // default): setting SO_RCVBUF/SO_SNDBUF would turn it off and cap them at
                // net.core.*mem_max (208 KiB by default), below a relayed bulk transfer's
                // window.
                let _ = tcp.set_nodelay(true);
                let server_ip = tcp.peer_addr().map_err(|e| failed(e.to_string()))?.ip();
                let new = |instance_url: &str| {
                    Arc::new(Self {
                        instance_url: instance_url.to_string(),
                        server_ip,
                        out: Arc::new(OutQueue::new(Role::Client)),
                        online: watch::channel(HashSet::new()).0,
                        closed: cancel.child_token(),
                    })
                };
                // One boxed reader and writer for both: a virtual call per read or write of
                // many frames costs nothing next to the frames.
                let (reader, writer, decoder): (Reader, Writer, Decoder) = if tls {
                    let name = rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| failed(format!("`{host}` cannot name a TLS server: {e}")))?;
                    let mut stream = TLS
                        .connect(name, tcp)
                        .await
                        .map_err(|e| failed(format!("TLS: {e}")))?;
                    let decoder = client_handshake(&mut stream, &authority, PATH)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    let (r, w) = tokio::io::split(stream);
                    (Box::new(r), Box::new(w), decoder)
                } else {
                    let mut tcp = tcp;
                    let decoder = client_handshake(&mut tcp, &authority, PATH)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    let (r, w) = tcp.into_split();
                    (Box::new(r), Box::new(w), decoder)
                };
                let session = authenticate(reader, writer, decoder, &auth)
                    .await
                    .map_err(|_| RelayError::AuthFailed(url.into()))?;
                let client = new(&session.instance_url);
                let start = client.clone().start(session, inbound.clone());
                Ok::<_, RelayError>((client, start))
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(RelayError::Cancelled),
                r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
                    Err(_) => return Err(failed("timed out".into())),
                    Ok(r) => r?,
                },
            }
        };
        start();
        info!(relay = %client.instance_url, "relay connected");
        Ok(client)
    }

    /// The connection's tasks, ready to spawn: a reader that hands Transport frames to
    /// `inbound` and answers the server, a writer that drains the queue, and, when either ends
    /// or the connection is closed, a goodbye (the relay's Close frame) sent on the way out.
    fn start(
        self: Arc<Self>,
        session: Session,
        inbound: mpsc::Sender<Relayed>,
    ) -> impl FnOnce() + Send + use<> {
        let Session {
            mut events, writer, ..
        } = session;
        let out = self.out.clone();
        let done = self.closed.clone();
        // The reader holds the client weakly: dropping the last handle closes the connection.
        let weak = Arc::downgrade(&self);
        drop(self);
        let reader = async move {
            loop {
                let event = match events.next().await {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(e) => {
                        debug!("relay connection: {e}");
                        break;
                    }
                };
                let Some(client) = weak.upgrade() else {
                    break;
                };
                let go_on = match event {
                    Event::Binary(data) => client.on_message(data, &inbound).await,
                    Event::Ping(p) => {
                        client.out.try_append(|f| f.control(ws::opcode::PONG, &p));
                        true
                    }
                    Event::Close => false,
                    Event::Text(_) | Event::Pong => true,
                };
                if !go_on {
                    break;
                }
            }
        };
        move || {
            tokio::spawn(async move {
                let writer = out.write_to(writer);
                tokio::pin!(writer);
                tokio::select! {
                    _ = done.cancelled() => {}
                    _ = reader => {}
                    r = &mut writer => {
                        if let Err(e) = r {
                            debug!("relay connection: {e}");
                        }
                        done.cancel();
                        return;
                    }
                }
                done.cancel();
                out.append(|f| f.message(&[&messages::close()]));
                out.close();
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, writer).await;
            });
        }
    }

    /// One relay message from the server; false ends the connection.
    async fn on_message(self: Arc<Self>, data: Bytes, inbound: &mpsc::Sender<Relayed>) -> bool {
        match messages::parse(&data) {
            Ok(Frame::Transport { peer, payload }) => {
                let relayed = Relayed {
                    from: *peer,
                    data: data.slice_ref(payload),
                    client: self,
                };
                return inbound.send(relayed).await.is_ok();
            }
            Ok(Frame::HealthCheck) => {
                self.out
                    .try_append(|f| f.message(&[&messages::health_check()]));
            }
            Ok(Frame::PeersOnline(ids)) => self.online.send_modify(|set| {
                set.extend(ids.iter().copied());
            }),
            Ok(Frame::PeersWentOffline(ids)) => self.online.send_modify(|set| {
                for id in ids.iter() {
                    set.remove(id);
                }
            }),
            Ok(Frame::Close) => return false,
            Ok(_) => {}
            Err(e) => debug!("relay: bad frame: {e}"),
        }
        true
    }

    /// The relay instance URL the server announced (what offers advertise).
    pub fn instance_url(&self) -> &str {
        &self.instance_url
    }

    /// The relay server's address, as connected.
    pub fn server_ip(&self) -> IpAddr {
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
        let frames = messages::subscribe(&[*peer]);
        if !self.out.append(|f| {
            for frame in &frames {
                f.message(&[frame]);
            }
        }) {
            return Err(RelayError::Closed);
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

    /// Queue one WireGuard datagram for `peer`; false if the connection is gone or its queue
    /// is full (the datagram is dropped, as a full UDP socket would).
    pub fn send_to(&self, peer: &PeerId, datagram: &[u8]) -> bool {
        self.out.try_append(|f| f.transport(peer, datagram))
    }

    /// Queue one WireGuard datagram for `peer`, waiting up to `SEND_WAIT` while the queue is
    /// full (backpressure: the tunnel's TCP slows down instead of losing segments); false if
    /// the connection is gone or stayed full.
    pub async fn send(&self, peer: &PeerId, datagram: &[u8]) -> bool {
        self.send_many(peer, [datagram]).await
    }

    /// Queue datagrams for `peer` under one lock, after waiting (as `send`) once for room.
    pub async fn send_many<'a>(
        &self,
        peer: &PeerId,
        datagrams: impl IntoIterator<Item = &'a [u8]>,
    ) -> bool {
        self.out.wait_for_room(SEND_WAIT).await
            && self.out.append(|f| {
                for d in datagrams {
                    f.transport(peer, d);
                }
            })
    }

    /// Close the connection (the relay is told).
    pub fn close(&self) {
        self.closed.cancel();
    }
}

impl Drop for RelayClient {
    fn drop(&mut self) {
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
