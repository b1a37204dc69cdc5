//! Routed ICMP echo (IPv4): the request is sent from the host — through an unprivileged ICMP
//! socket when `net.ipv4.ping_group_range` allows one, else with the `ping` binary (5 s, at most
//! three at once, as NetBird does) — and a reply from the destination is synthesised.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};
use tokio::task::JoinSet;
use tracing::debug;

use super::{ForwardCounters, HostGuard};
use crate::netstack::{Netstack, raw};

/// How long a request waits for its reply.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests in flight at once; more are dropped.
const MAX_SOCKET_ECHOES: usize = 64;
const MAX_PING_PROCESSES: usize = 3;

pub(super) struct Pinger {
    netstack: Netstack,
    counters: Arc<ForwardCounters>,
    in_flight: Arc<AtomicUsize>,
}

impl Pinger {
    pub fn new(netstack: Netstack, counters: Arc<ForwardCounters>) -> Self {
        Self {
            netstack,
            counters,
            in_flight: Arc::default(),
        }
    }

    /// An echo request (`packet`, ICMP at `icmp..`): answer it when the destination does.
    pub fn handle(
        &mut self,
        packet: &[u8],
        _icmp: usize,
        host: &HostGuard,
        tasks: &mut JoinSet<()>,
    ) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return; // ICMPv6 echo is not forwarded
        };
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
            return;
        };
        let Ok(Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }) = Icmpv4Repr::parse(&icmp, &Default::default())
        else {
            return;
        };
        if host.forbids(IpAddr::V4(dst)) {
            self.counters.host_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.in_flight.load(Ordering::Relaxed) >= MAX_SOCKET_ECHOES {
            self.counters.echo_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let data = data.to_vec();
        let netstack = self.netstack.clone();
        let counters = self.counters.clone();
        let in_flight = self.in_flight.clone();
        tasks.spawn(async move {
            let ok = match echo_socket(dst, &data).await {
                Some(ok) => ok,
                None => echo_ping(dst, &in_flight).await,
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if ok
                && netstack.send_raw(|buf| {
                    raw::echo_reply_v4(IpAddr::V4(dst), IpAddr::V4(src), ident, seq_no, &data, buf)
                })
            {
                counters.echo_answered.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.echo_failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Echo through an unprivileged ICMP socket: Some(answered) or None when the host allows none.
async fn echo_socket(dst: Ipv4Addr, data: &[u8]) -> Option<bool> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)).ok()?;
    socket.set_nonblocking(true).ok()?;
    let socket = tokio::net::UdpSocket::from_std(socket.into()).ok()?;
    socket.connect((dst, 0)).await.ok()?;
    // Echo request: type 8, code 0, checksum (the kernel fills it and the identifier), sequence 1.
    let mut msg = vec![8u8, 0, 0, 0, 0, 0, 0, 1];
    msg.extend_from_slice(data);
    socket.send(&msg).await.ok()?;
    let mut buf = vec![0u8; 2048];
    let answered = tokio::time::timeout(ECHO_TIMEOUT, async {
        loop {
            match socket.recv(&mut buf).await {
                Ok(n) if n >= 8 && buf[0] == 0 => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    Some(answered)
}

/// Echo with the `ping` binary (at most `MAX_PING_PROCESSES` at once).
async fn echo_ping(dst: Ipv4Addr, in_flight: &AtomicUsize) -> bool {
    if in_flight.load(Ordering::Relaxed) > MAX_PING_PROCESSES {
        return false;
    }
    let run = tokio::process::Command::new("ping")
        .args(["-c", "1", "-W", "5", "-n", "-q"])
        .arg(dst.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(ECHO_TIMEOUT + Duration::from_secs(1), run).await {
        Ok(Ok(status)) => status.success(),
        Ok(Err(e)) => {
            debug!(%dst, "ping: {e}");
            false
        }
        Err(_) => false,
    }
}
