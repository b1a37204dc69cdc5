//! The dialler every listener shares: decides where a destination goes and opens the stream.
//!
//! An IP inside some peer's AllowedIPs goes through the tunnel (a routed network's prefix is in
//! its elected routing peer's, an exit node's default route in the exit node's); anything else
//! is dialled from the host, unless direct connections are disabled. Loopback never goes
//! through the tunnel. Host names are resolved by `dns::Resolver`.
//! Failures are typed so each front end can answer precisely (SOCKS reply codes, HTTP statuses).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use crate::dns::{ResolveError, Resolver};
use crate::netstack::{ConnectError, Netstack, TcpStream as MeshStream};
use crate::wg::WgDevice;
use crate::wg::device::{Peer, PeerEndpoint};

/// How often a dial waiting for a peer's endpoint looks again.
const ENDPOINT_POLL: Duration = Duration::from_millis(50);

/// A destination as a client names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Host(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Why a dial failed. The messages are what users read in HTTP error bodies and logs.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0} is outside the mesh and direct connections are disabled (--no-direct)")]
    NotAllowed(IpAddr),
    #[error("network unreachable: {0}")]
    NetworkUnreachable(String),
    #[error("host unreachable: {0}")]
    HostUnreachable(String),
    #[error("{0} did not answer within {1:.1?}")]
    TimedOut(SocketAddr, Duration),
    #[error("{0} refused the connection")]
    Refused(SocketAddr),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("cannot connect to {0}: {1}")]
    Other(SocketAddr, String),
    /// A limit of ours, not the target's answer: try again later.
    #[error("cannot connect to {0}: {1}")]
    Overloaded(SocketAddr, String),
}

/// A connected stream: through the tunnel or straight from the host.
#[derive(Debug)]
pub enum Stream {
    Mesh(MeshStream),
    Direct(tokio::net::TcpStream),
}

impl Stream {
    /// The local end: mesh IP and port, or the host socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Stream::Mesh(s) => Ok(s.local_addr()),
            Stream::Direct(s) => s.local_addr(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Mesh(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Direct(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Mesh(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Direct(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Mesh(s) => Pin::new(s).poll_flush(cx),
            Stream::Direct(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Mesh(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Direct(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where traffic for an address goes.
pub(crate) enum Route {
    /// Through the tunnel to this peer.
    Mesh(Arc<Peer>),
    /// Out of the host's own network.
    Host,
}

/// Opens streams to targets.
#[derive(Clone)]
pub struct Dialer {
    netstack: Netstack,
    wg: Arc<WgDevice>,
    resolver: Resolver,
    allow_direct: bool,
    connect_timeout: Duration,
}

impl Dialer {
    pub fn new(
        netstack: Netstack,
        wg: Arc<WgDevice>,
        resolver: Resolver,
        allow_direct: bool,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            netstack,
            wg,
            resolver,
            allow_direct,
            connect_timeout,
        }
    }

    /// Connect to `target`. Every address of a name is tried in turn, all within one
    /// `connect_timeout`.
    pub async fn dial(&self, target: &Target) -> Result<Stream, DialError> {
        match target {
            Target::Addr(addr) => self.dial_addr(*addr, self.connect_timeout).await,
            Target::Host(host, port) => {
                let addrs = self.resolver.resolve(host).await?;
                let deadline = Instant::now() + self.connect_timeout;
                let mut last = None;
                for ip in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match self.dial_addr(SocketAddr::new(ip, *port), left).await {
                        Ok(s) => return Ok(s),
                        Err(e) => {
                            debug!(%host, %ip, "dial failed: {e}");
                            last = Some(e);
                        }
                    }
                }
                Err(last.unwrap_or(DialError::HostUnreachable(host.clone())))
            }
        }
    }

    /// Where traffic for `addr` goes: through the tunnel to the peer whose AllowedIPs hold it,
    /// or out of the host; an error when neither may carry it.
    pub(crate) fn route(&self, addr: SocketAddr) -> Result<Route, DialError> {
        // This host's loopback is never anyone's route, an exit node's default route included.
        let routable = !addr.ip().is_loopback() && !addr.ip().is_unspecified();
        if let Some(peer) = self.wg.route(addr.ip()).filter(|_| routable) {
            return Ok(Route::Mesh(peer));
        }
        // The mesh's own network is never reached from the host: an address there without a
        // peer is a peer that is offline or gone.
        if self
            .netstack
            .addresses()
            .iter()
            .any(|net| net.trunc().contains(&addr.ip()))
        {
            return Err(DialError::HostUnreachable(format!(
                "{addr}: no peer with this mesh address is connected"
            )));
        }
        if !self.allow_direct {
            return Err(DialError::NotAllowed(addr.ip()));
        }
        Ok(Route::Host)
    }

    /// Where a connected stream goes, for the access log: the address reached and the path.
    pub(crate) fn path_of(&self, stream: &Stream) -> (Option<SocketAddr>, &'static str) {
        match stream {
            Stream::Mesh(s) => {
                let to = s.peer_addr();
                (Some(to), self.mesh_path(to.ip()))
            }
            Stream::Direct(s) => (s.peer_addr().ok(), "host"),
        }
    }

    /// The path to the mesh peer that carries `ip` now: `direct` (UDP, ICE included),
    /// `relayed` (NetBird's relay), `turn` (an ICE relay candidate), or `host` when no peer
    /// carries it.
    pub(crate) fn mesh_path(&self, ip: IpAddr) -> &'static str {
        match self.wg.route(ip).and_then(|p| p.endpoint()) {
            Some(PeerEndpoint::Udp(_)) => "direct",
            Some(PeerEndpoint::Relay(..)) => "relayed",
            Some(PeerEndpoint::Turn(..)) => "turn",
            None if self.wg.route(ip).is_some() => "-",
            None => "host",
        }
    }

    /// The mesh's netstack (for UDP sockets on our mesh address).
    pub(crate) fn netstack(&self) -> &Netstack {
        &self.netstack
    }

    /// Wake an idle peer: traffic for it is about to come.
    pub(crate) fn want(&self, peer: &Arc<Peer>) {
        self.wg.want(peer);
    }

    /// The addresses of `host`, as a dial resolves them.
    pub(crate) async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        self.resolver.resolve(host).await
    }

    async fn dial_addr(&self, addr: SocketAddr, timeout: Duration) -> Result<Stream, DialError> {
        if let Route::Mesh(peer) = self.route(addr)? {
            // A peer still being set up (relay negotiation) gets the connect timeout to
            // become reachable, so a first request right after start-up does not fail.
            let deadline = Instant::now() + timeout;
            // Through a relay, the remote must also be online there: just after start-up our
            // relay connection may be up before the remote's has announced itself.
            let usable = || match peer.endpoint() {
                Some(e @ PeerEndpoint::Relay(..)) => {
                    e.is_usable() && matches!(&e, PeerEndpoint::Relay(r, id) if r.is_online(id))
                }
                Some(e) => e.is_usable(),
                None => false,
            };
            // A peer we had a session with and now have no path to went away (its relay and
            // direct path are both gone): say so at once rather than after the timeout. An
            // idle one (GO_IDLE) is woken and waited for instead.
            let went_away = !usable() && !peer.is_idle() && peer.time_since_handshake().is_some();
            if !usable() {
                // Even a peer that went away is wanted: its setup is tried again now rather
                // than at its next backoff step, so a retry soon after it is back succeeds.
                self.wg.want(&peer);
            }
            while !usable() && !went_away && Instant::now() < deadline {
                // An idle peer is woken by the wish to reach it (said again each round: the
                // hint channel may be full).
                self.wg.want(&peer);
                tokio::time::sleep(ENDPOINT_POLL).await;
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            match peer.endpoint().filter(|e| e.is_usable()) {
                // A mesh peer with no path to it (never reached, or its relay and direct path
                // both gone) is a peer that is not connected: 0x04 / 504, as the README's
                // table says, whatever path it last had.
                None => {
                    return Err(DialError::HostUnreachable(format!(
                        "{addr}: its peer is not connected (no path to it)"
                    )));
                }
                Some(PeerEndpoint::Relay(relay, id)) if !relay.is_online(&id) => {
                    return Err(DialError::HostUnreachable(format!(
                        "{addr}: its peer is not connected"
                    )));
                }
                Some(_) => {}
            }
            return match tokio::time::timeout(timeout, self.netstack.connect(addr)).await {
                Err(_) => Err(DialError::TimedOut(addr, timeout)),
                Ok(Ok(s)) => Ok(Stream::Mesh(s)),
                Ok(Err(ConnectError::Refused)) => Err(DialError::Refused(addr)),
                Ok(Err(ConnectError::NoSourceAddress)) => Err(DialError::NetworkUnreachable(
                    format!("no mesh address of {addr}'s family"),
                )),
                Ok(Err(e @ ConnectError::BufferCap { .. })) => {
                    Err(DialError::Overloaded(addr, e.to_string()))
                }
                Ok(Err(e)) => Err(DialError::Other(addr, e.to_string())),
            };
        }
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => Err(DialError::TimedOut(addr, timeout)),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(Stream::Direct(s))
            }
            Ok(Err(e)) => Err(match e.kind() {
                io::ErrorKind::ConnectionRefused => DialError::Refused(addr),
                io::ErrorKind::NetworkUnreachable => {
                    DialError::NetworkUnreachable(addr.to_string())
                }
                io::ErrorKind::HostUnreachable => DialError::HostUnreachable(addr.to_string()),
                _ => DialError::Other(addr, e.to_string()),
            }),
        }
    }
}
