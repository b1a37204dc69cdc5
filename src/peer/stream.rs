//! The peer's sockets: a connected stream, a listener on our mesh address and a UDP socket on
//! it. They hold the handles an engine published, never the engine itself: a listener whose
//! engine stopped takes the port again on the engine the supervisor builds next.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{Error, Peer};
use crate::proxy::dial::Stream;

/// A TCP connection through the mesh (or, for a target outside it, from this host): a tokio
/// `AsyncRead + AsyncWrite`, so hyper, reqwest's connectors, tokio-rustls and the like take
/// it as they take a `tokio::net::TcpStream`.
#[derive(Debug)]
pub struct MeshStream {
    inner: Stream,
}

impl MeshStream {
    pub(super) fn new(inner: Stream) -> Self {
        Self { inner }
    }

    /// Our end: a mesh address and port, or the host socket's address for a target outside
    /// the mesh.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The other end.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Stream::Mesh(s) => Ok(s.peer_addr()),
            Stream::Direct(s) => s.peer_addr(),
        }
    }

    /// Whether the connection goes through the mesh (false: straight from this host).
    pub fn is_mesh(&self) -> bool {
        matches!(self.inner, Stream::Mesh(_))
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// TCP connections from other peers to a port of our mesh addresses; see [`Peer::listen`].
#[derive(Debug)]
pub struct MeshListener {
    peer: Peer,
    port: u16,
    /// The listener on the engine that is up, and that engine's token.
    bound: Option<(crate::netstack::TcpListener, CancellationToken)>,
}

impl MeshListener {
    pub(super) fn new(peer: Peer, port: u16) -> Self {
        Self {
            peer,
            port,
            bound: None,
        }
    }

    /// The port on our mesh addresses.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Take the port on the engine that is up now (waiting for one).
    pub(super) async fn bind(&mut self) -> Result<(), Error> {
        let live = self.peer.live().await?;
        let listener = live
            .netstack
            .listen(self.port)
            .await
            .map_err(|e| Error::Listen {
                port: self.port,
                reason: e.to_string(),
            })?;
        self.bound = Some((listener, live.cancel));
        Ok(())
    }

    /// The next connection. Across an engine rebuild the port is taken again on the new
    /// engine; [`Error::Stopped`] once the peer has stopped.
    pub async fn accept(&mut self) -> Result<MeshStream, Error> {
        loop {
            if self.bound.is_none() {
                self.bind().await?;
            }
            let Some((listener, engine)) = self.bound.as_mut() else {
                continue;
            };
            let accepted = tokio::select! {
                s = listener.accept() => s,
                _ = engine.cancelled() => None,
                _ = self.peer.inner.stop.cancelled() => return Err(Error::Stopped),
            };
            match accepted {
                Some(s) => return Ok(MeshStream::new(Stream::Mesh(s))),
                // That engine is gone: the next one gets the port.
                None => self.bound = None,
            }
        }
    }
}

/// A UDP socket on our mesh addresses; see [`Peer::bind_udp`].
///
/// It lives on the engine that was up when it was bound: after a rebuild its calls fail with
/// `NotConnected` and a new one must be bound.
#[derive(Debug)]
pub struct MeshUdpSocket {
    socket: crate::netstack::UdpSocket,
    engine: CancellationToken,
    stop: CancellationToken,
    sending: tokio::sync::Mutex<()>,
    receiving: tokio::sync::Mutex<()>,
}

impl MeshUdpSocket {
    pub(super) async fn bind(peer: Peer, port: u16) -> Result<Self, Error> {
        let live = peer.live().await?;
        let socket = if port == 0 {
            live.netstack.udp_bind().await
        } else {
            live.netstack.udp_serve(port).await
        }
        .map_err(|e| Error::Listen {
            port,
            reason: e.to_string(),
        })?;
        Ok(Self {
            socket,
            engine: live.cancel,
            stop: peer.inner.stop.clone(),
            sending: tokio::sync::Mutex::new(()),
            receiving: tokio::sync::Mutex::new(()),
        })
    }

    /// The port on our mesh addresses.
    pub fn local_port(&self) -> u16 {
        self.socket.local_port()
    }

    /// The largest payload a datagram to `to` may carry: the tunnel's MTU less the headers
    /// (nothing is fragmented; a larger datagram is refused with `InvalidInput`).
    pub fn max_payload(&self, to: SocketAddr) -> usize {
        self.socket.max_payload(to)
    }

    fn gone(&self) -> Option<io::Error> {
        (self.engine.is_cancelled() || self.stop.is_cancelled()).then(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the engine this socket was bound on has stopped",
            )
        })
    }

    /// Send one datagram to a mesh address; waits while the send queue is full.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        // Senders waiting for room take turns (the netstack wakes one waiter).
        let _turn = self.sending.lock().await;
        loop {
            if let Some(e) = self.gone() {
                return Err(e);
            }
            match self.socket.send_to(data, to) {
                Ok(()) => return Ok(data.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::select! {
                        _ = self.socket.writable() => {}
                        _ = self.engine.cancelled() => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next datagram into `buf` (cut to its length, as a kernel socket does): its length
    /// and source.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        // Receivers take turns (the netstack wakes one waiter); each gets its own datagram.
        let _turn = self.receiving.lock().await;
        if let Some(e) = self.gone() {
            return Err(e);
        }
        tokio::select! {
            r = self.socket.recv_into(buf) => r,
            _ = self.engine.cancelled() => Err(self.gone().unwrap_or_else(|| io::ErrorKind::NotConnected.into())),
            _ = self.stop.cancelled() => Err(self.gone().unwrap_or_else(|| io::ErrorKind::NotConnected.into())),
        }
    }
}
