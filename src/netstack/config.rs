//! The netstack's tunables: addresses, MTU, TCP buffer sizing and congestion control.

use std::time::Duration;

use ipnet::IpNet;
use smoltcp::socket::tcp;
use smoltcp::time::Duration as SmolDuration;


/// Tunables of the netstack.
#[derive(Clone, Debug)]
pub struct NetstackConfig {
    /// Our addresses with their prefixes.
    pub addresses: Vec<IpNet>,
    /// IP MTU of the tunnel.
    pub mtu: usize,
    /// smoltcp receive and send buffer per TCP socket. Large enough for the bandwidth-delay
    /// product; with it the advertised window scales.
    pub tcp_buffer: usize,
    /// Bytes buffered between each stream and its socket, per direction.
    pub ring: usize,
    /// How long a connection dropped by its user may take to deliver its last bytes and FIN.
    pub linger: Duration,
    /// Listening sockets kept per listened port (smoltcp's listener accepts one connection).
    pub backlog: usize,
    /// How each TCP connection sizes its window and pace.
    pub congestion: Congestion,
    /// Bytes of TCP socket buffers (both directions, every socket) allowed at `tcp_buffer`
    /// size; sockets made beyond it get `TCP_BUFFER_FLOOR` each way.
    pub tcp_buffer_budget: usize,
    /// Hard cap on the buffer bytes of every TCP socket together (socket buffers and rings,
    /// both ways): a connection that would go beyond it is refused (`ConnectError::BufferCap`)
    /// and a listening socket is not replaced until others close.
    pub buffer_cap: usize,
}

/// Each way, for a socket made when the budget is spent: ~100 Mbit/s at a 20 ms RTT.
pub const TCP_BUFFER_FLOOR: usize = 256 * 1024;

/// The global cap on TCP buffers. Each socket's buffers are fixed when smoltcp makes it, and
/// its pages are only touched as data flows, so a budget on what sockets may reserve is what
/// bounds the worst case: the first connections get full-size buffers (enough for a fast, long
/// path), later ones the floor, and past the hard cap none at all; closing a socket gives its
/// share back. Every socket's share counts its user-side rings too, so `cap` bounds all the
/// bytes the netstack can hold for its connections.
#[derive(Debug)]
pub(super) struct BufferBudget {
    /// Reserved bytes up to which sockets get full-size buffers.
    pub(super) full_limit: usize,
    /// Reserved bytes never exceeded.
    pub(super) cap: usize,
    /// Ring bytes per direction each socket's user side may hold.
    pub(super) ring: usize,
    pub(super) reserved: usize,
}

impl BufferBudget {
    /// The size of each of a new socket's two buffers, reserved from the budget; None when
    /// not even the floor fits under the cap.
    pub(super) fn take(&mut self, full: usize) -> Option<usize> {
        let limit = self.full_limit.min(self.cap);
        let size = if self.reserved + self.cost(full) <= limit {
            full
        } else {
            TCP_BUFFER_FLOOR.min(full)
        };
        if self.reserved + self.cost(size) > self.cap {
            return None;
        }
        self.reserved += self.cost(size);
        Some(size)
    }

    /// A socket with buffers of `size` each way is gone.
    pub(super) fn give_back(&mut self, size: usize) {
        self.reserved = self.reserved.saturating_sub(self.cost(size));
    }

    /// What a socket with buffers of `size` each way reserves.
    pub(super) fn cost(&self, size: usize) -> usize {
        2 * (size + self.ring)
    }
}

/// How every mesh TCP socket is set up: congestion control, pacing, no Nagle, keep-alives.
/// Public so that the link simulations in tests/ run exactly the sockets the netstack runs.
pub fn tune_tcp_socket(sock: &mut tcp::Socket<'_>, congestion: Congestion) {
    sock.set_congestion_control(match congestion {
        Congestion::Bbr => tcp::CongestionControl::Bbr,
        Congestion::Cubic => tcp::CongestionControl::Cubic,
    });
    // Spread each window over the round trip (our smoltcp patch) instead of bursting it
    // into the peer's socket buffer.
    sock.set_pacing(true);
    sock.set_nagle_enabled(false);
    // A lone segment is acknowledged after 1 ms, not smoltcp's 10 (every second segment is
    // acknowledged at once either way). A delayed ACK saves one packet only when a reply
    // follows within the delay; against that, a sender that is waiting for it stalls. On a
    // sub-millisecond mesh path 10 ms is 25 round trips: relayed transfers sat at 5 Mbit/s,
    // each window ending in one lone segment whose ACK took 10 ms (benches/README.md, "The
    // relayed path"; tests/relay_held_delivery.rs).
    sock.set_ack_delay(Some(SmolDuration::from_millis(ACK_DELAY_MS)));
    // Keep-alives probe an idle connection; the timeout aborts it when the remote stays
    // silent (a vanished peer), which keep-alives alone never do.
    sock.set_keep_alive(Some(SmolDuration::from_secs(KEEPALIVE_SECS)));
    sock.set_timeout(Some(SmolDuration::from_secs(KEEPALIVE_SECS * 4)));
}

/// TCP congestion control for the connections the netstack carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// Model-based (our smoltcp patch, after BBR v1): paces at the measured delivery rate and
    /// does not back off on random loss, so a lossy underlay keeps its bandwidth.
    #[default]
    Bbr,
    /// Loss-based (RFC 9438): halves on loss; fair to other loss-based flows, slow on lossy
    /// paths (about 10 Mbit/s at 0.5 % loss and a 20 ms RTT).
    Cubic,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            other => Err(format!(
                "unknown congestion control {other:?} (bbr or cubic)"
            )),
        }
    }
}

impl NetstackConfig {
    pub fn new(addresses: Vec<IpNet>, mtu: usize) -> Self {
        Self {
            addresses,
            mtu,
            tcp_buffer: 4 * 1024 * 1024,
            ring: 64 * 1024,
            linger: Duration::from_secs(30),
            backlog: 8,
            congestion: Congestion::default(),
            tcp_buffer_budget: 1024 * 1024 * 1024,
            buffer_cap: 4096 * 1024 * 1024,
        }
    }
}

/// TCP keep-alive interval; a connection silent for four intervals is aborted.
const KEEPALIVE_SECS: u64 = 30;

/// How long a lone received segment waits for its ACK (see `tune_tcp_socket`).
const ACK_DELAY_MS: u64 = 1;
