//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7): a relay socket for one client, alive while its TCP
//! control connection is.
//!
//! The relay socket is bound on the address the client reached us at (loopback for a local
//! client), never wider. Datagrams count only from the control connection's client IP, and from
//! the port it announced, or, announcing none (port 0, as most clients do), the port of its
//! first datagram: so another local user can neither borrow the association nor take its
//! replies. A
//! fragment (FRAG ≠ 0) is dropped and counted, as most servers do: reassembly would buffer
//! without bound for a feature no client uses. The association ends with its control
//! connection, after `idle` without a datagram either way, or when the listener stops.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tracing::debug;

use super::targets::{Targets, recv_any};
use super::wire::{self, Dest, MAX_REPLY_HEADER};
use crate::status::UdpCounters;

use super::MAX_DATAGRAM;

/// Who may use an association: the control connection's client IP, and the port it announced
/// in its request (0: any port of that IP).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected {
    pub ip: IpAddr,
    pub port: u16,
}

impl Expected {
    fn admits(&self, src: SocketAddr) -> bool {
        src.ip().to_canonical() == self.ip.to_canonical()
            && (self.port == 0 || src.port() == self.port)
    }
}

/// Why an association ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// The client closed its control connection.
    Closed,
    /// Nothing either way for the idle timeout.
    Idle,
    /// The relay socket failed.
    Error(String),
}

/// How an association went: how it ended, and the payload bytes each way.
#[derive(Debug)]
pub(crate) struct Associated {
    pub end: End,
    /// Towards targets.
    pub up: u64,
    /// Back to the client.
    pub down: u64,
}

/// Relay one association until it ends.
pub(crate) async fn run<C: AsyncRead + Unpin>(
    mut control: C,
    relay: UdpSocket,
    mut expected: Expected,
    mut targets: Targets,
    counters: Arc<UdpCounters>,
    idle: Duration,
) -> Associated {
    let _open = counters.open();
    let (mut up, mut down) = (0u64, 0u64);
    let done = |end, up, down| Associated { end, up, down };
    // One byte more than the largest datagram relayed tells a bigger one (cut by the kernel)
    // from one that fits.
    let mut from_client = vec![0u8; MAX_REPLY_HEADER + MAX_DATAGRAM + 1];
    let mut to_client = vec![0u8; MAX_REPLY_HEADER + MAX_DATAGRAM + 1];
    let mut ctl = [0u8; 64];
    let mut client: Option<SocketAddr> = None;
    let mut deadline = Instant::now() + idle;
    loop {
        tokio::select! {
            r = control.read(&mut ctl) => match r {
                // Anything the client sends on the control connection means nothing to us.
                Ok(n) if n > 0 => {}
                _ => return done(End::Closed, up, down),
            },
            r = relay.recv_from(&mut from_client) => {
                let (n, src) = match r {
                    Ok(r) => r,
                    Err(e) => return done(End::Error(e.to_string()), up, down),
                };
                if !expected.admits(src) {
                    counters.drop_one("foreign_source");
                    continue;
                }
                // Most clients announce port 0: the first datagram's port is the client's from
                // then on, so another process of that IP (another user on a shared host) can
                // neither use the association nor take its replies.
                if expected.port == 0 {
                    expected.port = src.port();
                }
                if n > MAX_REPLY_HEADER + MAX_DATAGRAM {
                    counters.drop_one("too_big");
                    continue;
                }
                client = Some(src);
                deadline = Instant::now() + idle;
                up += forward(&from_client[..n], &mut targets, &counters).await;
            }
            r = recv_any(
                targets.mesh.as_ref(),
                targets.host4.as_ref(),
                targets.host6.as_ref(),
                &mut to_client[MAX_REPLY_HEADER..],
            ) => {
                let (n, from) = match r {
                    Ok(r) => r,
                    // The netstack is gone (or a host socket failed): nothing more can come.
                    Err(e) => return done(End::Error(e.to_string()), up, down),
                };
                if n > MAX_DATAGRAM {
                    counters.drop_one("too_big");
                    continue;
                }
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                let Some(client) = client.filter(|_| targets.solicited(from)) else {
                    continue;
                };
                let start = wire::write_reply_header(&mut to_client[..MAX_REPLY_HEADER], from);
                match relay.send_to(&to_client[start..MAX_REPLY_HEADER + n], client).await {
                    Ok(_) => {
                        counters.to_client(n);
                        down += n as u64;
                        deadline = Instant::now() + idle;
                    }
                    Err(_) => counters.drop_one("send_error"),
                }
            }
            _ = tokio::time::sleep_until(deadline) => return done(End::Idle, up, down),
        }
    }
}

/// One datagram from the client: read its header, find its destination, send its payload.
/// The payload bytes sent (0 when dropped).
async fn forward(datagram: &[u8], targets: &mut Targets, counters: &UdpCounters) -> u64 {
    let request = match wire::parse(datagram) {
        Ok(r) => r,
        Err(e) => {
            debug!("udp: dropped a datagram: {e}");
            counters.drop_one("malformed");
            return 0;
        }
    };
    if request.frag != 0 {
        counters.drop_one("fragmented");
        return 0;
    }
    let to = match request.dest {
        Dest::Addr(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Dest::Name(name, port) => match targets.resolve(name, port).await {
            Some(a) => a,
            None => {
                counters.drop_one("unresolved");
                return 0;
            }
        },
    };
    match targets.send(request.payload, to).await {
        Ok(()) => {
            counters.to_target(request.payload.len());
            request.payload.len() as u64
        }
        Err(reason) => {
            counters.drop_one(reason);
            0
        }
    }
}
