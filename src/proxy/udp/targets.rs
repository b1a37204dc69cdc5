//! One client's side of the world for UDP: the sockets its datagrams leave from (one on our mesh
//! address, one per IP family on the host, each made on first use), where each destination goes,
//! and which sources may answer.
//!
//! Replies are let through only from addresses this client sent to (what a stateful firewall
//! or an address-and-port-dependent NAT does), so an open relay port is not a way in for
//! anyone who finds it. Names are resolved once per client and remembered.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::time::Instant;

use crate::netstack::UdpSocket as MeshSocket;
use crate::proxy::dial::{DialError, Dialer, Route};
use crate::status::UdpCounters;

/// Destinations one client may have contacted at a time; beyond it the longest unused is
/// forgotten (its replies then drop as unsolicited).
pub const MAX_DESTINATIONS: usize = 256;
/// Names one client's resolutions are remembered for.
const MAX_NAMES: usize = 64;

/// The sockets and the state of one client's datagrams.
pub(crate) struct Targets {
    dialer: Dialer,
    counters: Arc<UdpCounters>,
    pub mesh: Option<MeshSocket>,
    pub host4: Option<tokio::net::UdpSocket>,
    pub host6: Option<tokio::net::UdpSocket>,
    contacted: HashMap<SocketAddr, Instant>,
    /// Resolved names (looked up by `&str`: no allocation per datagram).
    names: HashMap<String, IpAddr>,
    /// The mesh socket's receive drops already counted.
    mesh_drops: u64,
}

impl Targets {
    pub fn new(dialer: Dialer, counters: Arc<UdpCounters>) -> Self {
        Self {
            dialer,
            counters,
            mesh: None,
            host4: None,
            host6: None,
            contacted: HashMap::new(),
            names: HashMap::new(),
            mesh_drops: 0,
        }
    }

    /// The address of `name`, resolved as a CONNECT to it would be (first answer, once).
    pub async fn resolve(&mut self, name: &str, port: u16) -> Option<SocketAddr> {
        if let Some(ip) = self.names.get(name) {
            return Some(SocketAddr::new(*ip, port));
        }
        let ip = match self.dialer.resolve(name).await {
            Ok(ips) => ips.into_iter().next()?,
            Err(e) => {
                tracing::debug!(%name, "udp: {e}");
                return None;
            }
        };
        if self.names.len() >= MAX_NAMES {
            self.names.clear();
        }
        self.names.insert(name.to_string(), ip);
        Some(SocketAddr::new(ip, port))
    }

    /// Send `payload` to `to` from the right socket. A datagram that cannot go is counted as
    /// dropped under the returned reason.
    pub async fn send(&mut self, payload: &[u8], to: SocketAddr) -> Result<(), &'static str> {
        let route = self.dialer.route(to).map_err(|e| match e {
            DialError::NotAllowed(_) => "not_allowed",
            _ => "unreachable",
        })?;
        self.remember(to);
        match route {
            Route::Mesh(peer) => {
                self.dialer.want(&peer);
                if self.mesh.is_none() {
                    let s = self
                        .dialer
                        .netstack()
                        .udp_bind()
                        .await
                        .map_err(|_| "send_error")?;
                    self.mesh = Some(s);
                }
                let mesh = self.mesh.as_ref().expect("made above");
                match mesh.send_to(payload, to) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err("queue_full"),
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err("too_big"),
                    Err(_) => Err("send_error"),
                }
            }
            Route::Host => {
                let slot = if to.is_ipv4() {
                    &mut self.host4
                } else {
                    &mut self.host6
                };
                if slot.is_none() {
                    let any: SocketAddr = if to.is_ipv4() {
                        (IpAddr::from([0u8; 4]), 0).into()
                    } else {
                        (IpAddr::from([0u16; 8]), 0).into()
                    };
                    *slot = Some(
                        tokio::net::UdpSocket::bind(any)
                            .await
                            .map_err(|_| "send_error")?,
                    );
                }
                let sock = slot.as_ref().expect("made above");
                match sock.send_to(payload, to).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => Err("too_big"),
                    Err(_) => Err("send_error"),
                }
            }
        }
    }

    /// Whether a datagram from `from` answers something this client sent. (Also counts the
    /// replies the mesh socket had to drop since the last call: its queue was full.)
    pub fn solicited(&mut self, from: SocketAddr) -> bool {
        if let Some(mesh) = &self.mesh {
            let dropped = mesh.dropped();
            self.counters
                .drop_many("receive_queue_full", dropped - self.mesh_drops);
            self.mesh_drops = dropped;
        }
        match self.contacted.get_mut(&from) {
            Some(at) => {
                *at = Instant::now();
                true
            }
            None => {
                self.counters.drop_one("unsolicited");
                false
            }
        }
    }

    fn remember(&mut self, to: SocketAddr) {
        let now = Instant::now();
        if self.contacted.len() >= MAX_DESTINATIONS
            && !self.contacted.contains_key(&to)
            && let Some(oldest) = self
                .contacted
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(a, _)| *a)
        {
            self.contacted.remove(&oldest);
        }
        self.contacted.insert(to, now);
    }
}

/// The next datagram on any of a client's sockets, into `buf`: its length and source.
/// Pending for ever while there is no socket yet.
pub(crate) async fn recv_any(
    mesh: Option<&MeshSocket>,
    host4: Option<&tokio::net::UdpSocket>,
    host6: Option<&tokio::net::UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    // One buffer, three sockets: wait until one is readable, then take its datagram.
    loop {
        let which = tokio::select! {
            r = async { match mesh { Some(m) => m.readable().await, None => std::future::pending().await } } => { r?; 0 }
            r = async { match host4 { Some(s) => s.readable().await, None => std::future::pending().await } } => { r?; 4 }
            r = async { match host6 { Some(s) => s.readable().await, None => std::future::pending().await } } => { r?; 6 }
        };
        let got = match which {
            0 => mesh.map(|m| m.try_recv_into(buf)),
            4 => host4.map(|s| s.try_recv_from(buf)),
            _ => host6.map(|s| s.try_recv_from(buf)),
        };
        match got {
            Some(Ok(r)) => return Ok(r),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Some(Err(e)) => return Err(e),
            None => continue,
        }
    }
}
