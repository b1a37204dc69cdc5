//! TURN relay candidates (ice.md §1.5): an allocation on a TURN server from management's
//! `turns`, for peers where NetBird's relay is missing on either side (Go gathers relay
//! candidates only then). Like Go, the allocation lives on a socket of its own, not the
//! WireGuard one; one allocation serves every peer (permissions are per peer IP).
//!
//! The protocol (Allocate with long-term credentials, refreshes, permissions, Send and Data
//! indications) is `turn-client-proto`'s sans-IO client; this file owns its socket and timers:
//! `run` receives from the server and hands each peer datagram on, WireGuard's to the device
//! and STUN to the ICE agents; `send_to` relays one datagram, installing the peer's permission
//! first when it is missing (that datagram is dropped: ICE retransmits its checks, and
//! WireGuard traffic only flows once a check through the same permission succeeded).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::DelayedTransmitBuild;
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

use super::wire::{Datagram, classify};

/// STUN's NONCE attribute.
const ATTR_NONCE: u16 = 0x0015;
/// RFC 8489's nonce cookie: four characters of security bits follow it.
const NONCE_COOKIE: &[u8] = b"obMatJos2";

/// Whether a datagram from the TURN server is safe to hand to `turn-client-proto`:
/// stun-proto 2.0.4 slices an RFC 8489 nonce's security bits by byte index and panics when a
/// multi-byte character straddles it (found by `fuzz/fuzz_targets/turn_message.rs`). Such a
/// nonce is malformed anyway (the bits are base64), so the message is dropped.
pub fn safe_for_client(data: &[u8]) -> bool {
    // Wherever the cookie appears (a parser may find attributes this one does not), the four
    // bytes after it must be ASCII.
    let anywhere = data
        .windows(NONCE_COOKIE.len() + 4)
        .filter(|w| w.starts_with(NONCE_COOKIE))
        .all(|w| w[NONCE_COOKIE.len()..].iter().all(u8::is_ascii));
    let tail = data.len().saturating_sub(NONCE_COOKIE.len() + 3);
    let at_end = !data
        .get(tail..)
        .is_some_and(|t| t.windows(NONCE_COOKIE.len()).any(|w| w == NONCE_COOKIE));
    if !anywhere || !at_end {
        return false;
    }
    super::wire::attributes_of(data, ATTR_NONCE).all(|nonce| {
        match nonce.strip_prefix(NONCE_COOKIE) {
            Some(bits) => bits.iter().take(4).all(u8::is_ascii),
            None => true,
        }
    })
}

/// A datagram a peer sent us through the relay.
#[derive(Debug)]
pub struct TurnIn {
    pub relay: Arc<TurnRelay>,
    pub from: SocketAddr,
    pub data: Vec<u8>,
}

/// Where `run` hands what arrives: WireGuard datagrams to the device, STUN to the agents.
pub struct TurnSinks {
    pub wireguard: mpsc::Sender<TurnIn>,
    pub stun: mpsc::Sender<crate::wg::device::StunIn>,
}

/// One allocation on one TURN server.
pub struct TurnRelay {
    socket: UdpSocket,
    server: SocketAddr,
    client: Mutex<TurnClientUdp>,
    /// The relayed address once allocated (None before, or after the allocation failed).
    relayed: watch::Sender<Option<SocketAddr>>,
    /// Wakes `run` when `send_to` queued something for the server.
    kick: tokio::sync::Notify,
    /// The client's time zero.
    epoch: std::time::Instant,
    /// Our address towards the server (the relay candidate's base).
    local: SocketAddr,
}

impl std::fmt::Debug for TurnRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TurnRelay({})", self.server)
    }
}

/// `turn-client-proto` counts time on its own clock: nanoseconds since `epoch` (its
/// `from_std` keeps a base per thread, which a task moving between threads would see jump).
fn at(epoch: std::time::Instant, t: std::time::Instant) -> turn_client_proto::stun::Instant {
    let nanos = t.saturating_duration_since(epoch).as_nanos();
    turn_client_proto::stun::Instant::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

impl TurnRelay {
    /// Bind a socket for the allocation on `server` and ask for it (the answer comes in `run`).
    pub async fn new(server: SocketAddr, user: &str, password: &str) -> std::io::Result<Arc<Self>> {
        let any: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any).await?;
        // The client's local address is the one the kernel uses towards the server.
        let probe = std::net::UdpSocket::bind(any)?;
        probe.connect(server)?;
        let local = SocketAddr::new(probe.local_addr()?.ip(), socket.local_addr()?.port());
        let config = TurnConfig::new(TurnCredentials::new(user, password));
        let client = TurnClientUdp::allocate(local, server, config);
        let (relayed, _) = watch::channel(None);
        Ok(Arc::new(Self {
            socket,
            server,
            client: Mutex::new(client),
            relayed,
            kick: tokio::sync::Notify::new(),
            epoch: std::time::Instant::now(),
            local,
        }))
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Our address towards the server.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The allocation's relayed address, once the server granted it.
    pub fn relayed(&self) -> Option<SocketAddr> {
        *self.relayed.borrow()
    }

    /// Told when the relayed address changes.
    pub fn relayed_changes(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.relayed.subscribe()
    }

    /// Whether the allocation is up (datagrams can go through it).
    pub fn is_usable(&self) -> bool {
        self.relayed().is_some()
    }

    fn now(&self) -> turn_client_proto::stun::Instant {
        at(self.epoch, std::time::Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TurnClientUdp> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Relay one datagram to `peer`; false if it could not go (no allocation, no permission
    /// yet — then one is requested — or a full socket).
    pub fn send_to(&self, peer: SocketAddr, data: &[u8]) -> bool {
        let now = self.now();
        let mut client = self.lock();
        if !client.have_permission(TransportType::Udp, peer.ip()) {
            if let Err(e) = client.create_permission(TransportType::Udp, peer.ip(), now) {
                trace!(%peer, "turn permission: {e:?}");
            }
            drop(client);
            self.kick.notify_one();
            return false;
        }
        let built = match client.send_to(TransportType::Udp, peer, data, now) {
            Ok(Some(t)) => t,
            Ok(None) => return true,
            Err(e) => {
                trace!(%peer, "turn send: {e:?}");
                return false;
            }
        };
        drop(client);
        let to = built.to;
        let bytes = built.data.build();
        self.socket.try_send_to(&bytes, to).is_ok()
    }

    /// Drive the allocation until `cancel`: its requests, refreshes and permissions, and the
    /// peers' datagrams to `sinks`. Deletes the allocation on the way out (best effort).
    pub async fn run(self: Arc<Self>, sinks: TurnSinks, cancel: CancellationToken) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let wait = self.flush();
            let Some(wait) = wait else {
                warn!(server = %self.server, "TURN allocation closed");
                self.relayed.send_replace(None);
                return;
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = self.lock().delete(self.now());
                    self.flush();
                    return;
                }
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                r = self.socket.recv_from(&mut buf) => {
                    let (n, from) = match r {
                        Ok(r) => r,
                        Err(e) => {
                            trace!("turn recv: {e}");
                            continue;
                        }
                    };
                    if from != self.server {
                        continue;
                    }
                    self.receive(&buf[..n], &sinks);
                }
            }
        }
    }

    /// Feed one datagram from the server to the client and pass on what a peer sent.
    fn receive(self: &Arc<Self>, data: &[u8], sinks: &TurnSinks) {
        if !safe_for_client(data) {
            debug!(server = %self.server, "TURN message with a malformed NONCE dropped");
            return;
        }
        let now = self.now();
        let local = self.lock().local_addr();
        let transmit = Transmit::new(data, TransportType::Udp, self.server, local);
        let peer_data = match self.lock().recv(transmit, now) {
            TurnRecvRet::PeerData(p) => Some((p.peer, p.data().to_vec())),
            other => {
                trace!("turn: {} bytes from the server: {other:?}", data.len());
                None
            }
        };
        let mut more = Vec::new();
        if let Some(p) = peer_data {
            more.push(p);
        }
        while let Some(p) = self.lock().poll_recv(now) {
            more.push((p.peer, p.data().to_vec()));
        }
        for (from, data) in more {
            match classify(&data) {
                Datagram::WireGuard => {
                    let m = TurnIn {
                        relay: self.clone(),
                        from,
                        data,
                    };
                    if sinks.wireguard.try_send(m).is_err() {
                        trace!("turn: wireguard queue full");
                    }
                }
                Datagram::Stun => {
                    let Some(relayed) = self.relayed() else {
                        continue;
                    };
                    let m = crate::wg::device::StunIn {
                        from,
                        to: relayed,
                        data,
                    };
                    let _ = sinks.stun.try_send(m);
                }
                Datagram::Other => {}
            }
        }
    }

    /// Send what the client queued, note its events; the time until it needs a poll again
    /// (None once the allocation is closed).
    fn flush(&self) -> Option<Duration> {
        let now_std = std::time::Instant::now();
        let now = at(self.epoch, now_std);
        let mut client = self.lock();
        let wait = match client.poll(now) {
            TurnPollRet::WaitUntil(t) => t.saturating_duration_since(now),
            TurnPollRet::Closed => {
                drop(client);
                return None;
            }
            _ => Duration::from_millis(100),
        };
        while let Some(t) = client.poll_transmit(now) {
            let _ = self.socket.try_send_to(t.data.as_ref(), t.to);
        }
        while let Some(e) = client.poll_event() {
            match e {
                TurnEvent::AllocationCreated(_, addr) => {
                    info!(server = %self.server, relayed = %addr, "TURN allocation");
                    self.relayed.send_replace(Some(addr));
                }
                TurnEvent::AllocationCreateFailed(family) => {
                    warn!(server = %self.server, "TURN allocation refused ({family:?})");
                }
                TurnEvent::PermissionCreateFailed(_, ip) => {
                    debug!(server = %self.server, %ip, "TURN permission refused");
                }
                other => trace!(server = %self.server, "turn: {other:?}"),
            }
        }
        Some(wait.clamp(Duration::from_millis(10), Duration::from_secs(30)))
    }

    /// Whether datagrams from `peer` could come through this relay (its permission exists).
    pub fn permits(&self, peer: IpAddr) -> bool {
        self.lock().have_permission(TransportType::Udp, peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_that_would_panic_the_client_are_refused() {
        let msg = |nonce: &[u8]| {
            let pad = (4 - nonce.len() % 4) % 4;
            let mut attr = vec![0x00, 0x15];
            attr.extend_from_slice(&(nonce.len() as u16).to_be_bytes());
            attr.extend_from_slice(nonce);
            attr.extend(std::iter::repeat_n(0, pad));
            let mut m = vec![0x01, 0x13];
            m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
            m.extend_from_slice(&super::super::wire::MAGIC_COOKIE);
            m.extend_from_slice(&[1; 12]);
            m.extend_from_slice(&attr);
            m
        };
        assert!(safe_for_client(&msg(b"abcdef0123456789")));
        assert!(safe_for_client(&msg(b"obMatJos2AAAAnonce")));
        assert!(!safe_for_client(&msg("obMatJos2S4\0\u{29a};9".as_bytes())));
        assert!(
            !safe_for_client(b"obMatJos2AA"),
            "cut short after the cookie"
        );
        assert!(safe_for_client(&[0x40, 0, 0, 4, 1, 2, 3, 4]), "ChannelData");
    }
}
