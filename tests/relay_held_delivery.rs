//! Bulk TCP between two of our smoltcp sockets, set up as the netstack sets them up, over a
//! simulated relay path whose server holds small writes (Nagle) until the receiving peer sends
//! something back: the delivery pattern that collapsed relayed transfers to ~5 Mbit/s (issue
//! 15; benches/README.md, "The relayed path"). Simulated time, no sockets, no threads: every
//! run is the same run.
//!
//! The path: peer A → relay → peer B and back, each leg adding half of `half_rtt`, each
//! direction carrying at most `LINK_BYTES_PER_US`. A relay writing to a peer's TCP connection
//! with Nagle on sends a frame at once only when nothing it wrote before is unacknowledged by
//! that peer's kernel; otherwise the frame waits, and everything waiting leaves together when
//! the acknowledgement comes — with the next frame the peer sends on that connection, or on
//! its own after the kernel's delayed-ACK timeout (Linux: 40 ms).
//!
//! Why it collapsed: after every batch the relay released, the next frame went out alone, and
//! B's smoltcp acknowledged a lone segment only after its 10 ms delayed-ACK timer; until then
//! the relay held everything else. Every round trip took 10–12 ms instead of 0.4. BBR's window
//! — twice its bandwidth model times the *minimum* RTT (0.4 ms) plus three send quanta —
//! settled at the three quanta, about 8 KB per 12 ms round, and the pacer (on above a 1 ms
//! smoothed RTT) kept the segments sparse enough to be held one at a time: a fixed point.
//! CUBIC's window is not tied to the minimum RTT, so it grew out of it. The netstack now
//! acknowledges a lone segment after 1 ms, and the dev relay writes without Nagle.

use std::collections::BinaryHeap;

use netbird_proxy::netstack::{Congestion, tune_tcp_socket};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

#[path = "support/packet_queues.rs"]
mod packet_queues;
use packet_queues::PacketQueues;

/// NetBird's overlay MTU (what management hands out).
const MTU: usize = 1280;
/// Each direction of the path: 250 MB/s (2 Gbit/s).
const LINK_BYTES_PER_US: u64 = 250;
/// Linux's delayed ACK, when the peer sends nothing back on the relay connection.
const KERNEL_DELAYED_ACK_US: u64 = 40_000;
const SOCKET_BUFFER: usize = 4 << 20;
const A: Ipv4Address = Ipv4Address::new(100, 64, 0, 1);
const B: Ipv4Address = Ipv4Address::new(100, 64, 0, 2);
const PORT: u16 = 5201;

/// A datagram in flight, ordered by arrival time (then by sequence, to keep FIFO order).
#[derive(PartialEq, Eq)]
struct InFlight {
    at: u64,
    seq: u64,
    to_b: bool,
    packet: Vec<u8>,
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The relay server's TCP connection towards one peer.
#[derive(Default)]
struct RelayLeg {
    /// Nagle on: hold frames while earlier ones are unacknowledged.
    nagle: bool,
    /// Time the last released batch reached the peer, while unacknowledged.
    unacked_since: Option<u64>,
    held: Vec<Vec<u8>>,
    /// When the leg's wire is free again.
    busy_until: u64,
}

struct Peer {
    port: PacketQueues,
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: SocketHandle,
}

impl Peer {
    fn new(addr: Ipv4Address, congestion: Congestion, ack_delay: Option<Duration>) -> Self {
        let mut port = PacketQueues::new(MTU);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = u64::from(addr.octets()[3]);
        let mut iface = Interface::new(config, &mut port, Instant::ZERO);
        iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::Ipv4(addr), 16)).unwrap());
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        tune_tcp_socket(&mut sock, congestion);
        if let Some(delay) = ack_delay {
            sock.set_ack_delay(Some(delay));
        }
        let mut sockets = SocketSet::new(Vec::new());
        let tcp = sockets.add(sock);
        Peer {
            port,
            iface,
            sockets,
            tcp,
        }
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(self.tcp)
    }

    fn poll(&mut self, now: u64) {
        self.iface.poll(
            Instant::from_micros(now as i64),
            &mut self.port,
            &mut self.sockets,
        );
    }

    fn next_poll(&mut self, now: u64) -> Option<u64> {
        self.iface
            .poll_delay(Instant::from_micros(now as i64), &self.sockets)
            .map(|d| now + d.total_micros())
    }
}

/// The path between the peers: two relay legs (towards A, towards B).
struct Path {
    half_rtt: u64,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    to_a: RelayLeg,
    to_b: RelayLeg,
}

impl Path {
    fn new(nagle: bool, half_rtt: u64) -> Self {
        Path {
            half_rtt,
            queue: BinaryHeap::new(),
            seq: 0,
            to_a: RelayLeg {
                nagle,
                ..Default::default()
            },
            to_b: RelayLeg {
                nagle,
                ..Default::default()
            },
        }
    }

    fn leg(&mut self, to_b: bool) -> &mut RelayLeg {
        if to_b { &mut self.to_b } else { &mut self.to_a }
    }

    /// Write `frames` from the relay to a peer as one batch, arriving after the second leg.
    fn release(&mut self, now: u64, to_b: bool, frames: Vec<Vec<u8>>) {
        let leg_delay = self.half_rtt / 2;
        for packet in frames {
            let leg = self.leg(to_b);
            let start = leg.busy_until.max(now);
            leg.busy_until = start + packet.len() as u64 / LINK_BYTES_PER_US + 1;
            let at = leg.busy_until + leg_delay;
            if leg.nagle && leg.unacked_since.is_none() {
                leg.unacked_since = Some(at);
            }
            self.seq += 1;
            self.queue.push(InFlight {
                at,
                seq: self.seq,
                to_b,
                packet,
            });
        }
    }

    /// A peer sent `packet` at `now` (the other way is `to_b`).
    fn send(&mut self, now: u64, to_b: bool, packet: Vec<u8>) {
        let at_relay = now + self.half_rtt / 2;
        // The frame carries the sender's kernel ACK for what the relay wrote to it before.
        let back = self.leg(!to_b);
        if back.unacked_since.is_some_and(|t| t <= now) {
            back.unacked_since = None;
            let held = std::mem::take(&mut back.held);
            if !held.is_empty() {
                self.release(at_relay, !to_b, held);
            }
        }
        let leg = self.leg(to_b);
        if leg.nagle && leg.unacked_since.is_some() {
            leg.held.push(packet);
        } else {
            self.release(at_relay, to_b, vec![packet]);
        }
    }

    /// The kernel's delayed ACKs that fall due by `now`.
    fn delayed_acks(&mut self, now: u64) {
        for to_b in [true, false] {
            let leg = self.leg(to_b);
            if let Some(t) = leg.unacked_since
                && t + KERNEL_DELAYED_ACK_US <= now
            {
                leg.unacked_since = None;
                let held = std::mem::take(&mut leg.held);
                if !held.is_empty() {
                    self.release(now, to_b, held);
                }
            }
        }
    }

    fn next_event(&self) -> Option<u64> {
        let delivery = self.queue.peek().map(|p| p.at);
        let acks = [&self.to_a, &self.to_b]
            .into_iter()
            .filter(|l| !l.held.is_empty())
            .filter_map(|l| l.unacked_since.map(|t| t + KERNEL_DELAYED_ACK_US));
        delivery.into_iter().chain(acks).min()
    }
}

/// Bytes B received from A in `duration_us` of simulated time after the handshake.
/// One bulk transfer's setting.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    congestion: Congestion,
    /// The relay holds small writes (Nagle) instead of sending each at once.
    held: bool,
    /// Peer to relay and back (so the path's minimum RTT is twice this), µs.
    half_rtt: u64,
    /// The receiver's delayed ACK instead of the netstack's.
    ack_delay: Option<Duration>,
}

/// Bytes B received from A in `duration_us` of simulated time after A started its bulk
/// transfer. Like iperf3's data connection, A first sends a 37-byte cookie and waits 45 ms.
fn bulk_transfer(sc: Scenario, duration_us: u64) -> u64 {
    // SIM_LOG=smoltcp::socket::tcp::congestion::bbr=trace shows the sender's rounds.
    if let Ok(filter) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut a = Peer::new(A, sc.congestion, sc.ack_delay);
    let mut b = Peer::new(B, sc.congestion, sc.ack_delay);
    let mut path = Path::new(sc.held, sc.half_rtt);
    b.socket().listen(PORT).unwrap();
    let remote = IpEndpoint::new(IpAddress::Ipv4(B), PORT);
    let cx = a.iface.context();
    a.sockets
        .get_mut::<tcp::Socket>(a.tcp)
        .connect(cx, remote, 40000)
        .unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut sink = vec![0_u8; 64 * 1024];
    let (mut now, mut received, mut started, mut cookie_at) =
        (0_u64, 0_u64, None::<u64>, None::<u64>);
    let mut steps = 0_u64;
    loop {
        steps += 1;
        assert!(steps < 50_000_000, "the simulation does not advance");
        // Deliver what has arrived.
        while path.queue.peek().is_some_and(|p| p.at <= now) {
            let p = path.queue.pop().unwrap();
            let peer = if p.to_b { &mut b } else { &mut a };
            peer.port.inbound.push_back(p.packet);
        }
        path.delayed_acks(now);
        a.poll(now);
        b.poll(now);
        // A always has data to send; B reads everything at once.
        let sock = a.socket();
        if sock.may_send() && cookie_at.is_none() {
            cookie_at = Some(now);
            sock.send_slice(&chunk[..37]).unwrap();
        }
        if sock.may_send() && cookie_at.is_some_and(|t| now >= t + 45_000) {
            started.get_or_insert(now);
            while sock.can_send() && sock.send_slice(&chunk).unwrap_or(0) > 0 {}
        }
        let sock = b.socket();
        while sock.can_recv() {
            received += sock.recv_slice(&mut sink).unwrap() as u64;
        }
        a.poll(now);
        b.poll(now);
        for packet in std::mem::take(&mut a.port.outbound) {
            path.send(now, true, packet);
        }
        for packet in std::mem::take(&mut b.port.outbound) {
            path.send(now, false, packet);
        }
        if started.is_some_and(|s| now >= s + duration_us) {
            return received;
        }
        let app = cookie_at.filter(|_| started.is_none()).map(|t| t + 45_000);
        let next = [a.next_poll(now), b.next_poll(now), path.next_event(), app]
            .into_iter()
            .flatten()
            .min()
            .expect("something is always pending while A sends");
        now = next.max(now + 1);
    }
}

fn mbit_per_s(bytes: u64, duration_us: u64) -> f64 {
    bytes as f64 * 8.0 / duration_us as f64
}

const SECOND: u64 = 1_000_000;

/// Held and direct throughput of the same setting, Mbit/s.
fn held_and_direct(sc: Scenario) -> (f64, f64) {
    let duration = SECOND * 3 / 10;
    let held = bulk_transfer(Scenario { held: true, ..sc }, duration);
    let direct = bulk_transfer(Scenario { held: false, ..sc }, duration);
    (mbit_per_s(held, duration), mbit_per_s(direct, duration))
}

/// The minimum RTTs swept: 0.2 ms (the dev mesh on loopback) to 2 ms.
const HALF_RTTS: [u64; 4] = [100, 200, 400, 1000];

#[test]
fn transfers_through_a_relay_that_holds_small_writes_do_not_collapse() {
    for congestion in [Congestion::Bbr, Congestion::Cubic] {
        for half_rtt in HALF_RTTS {
            let sc = Scenario {
                congestion,
                held: true,
                half_rtt,
                ack_delay: None,
            };
            let (held, direct) = held_and_direct(sc);
            eprintln!("{sc:?}: {held:.1} Mbit/s held, {direct:.1} direct");
            assert!(direct > 500.0, "{sc:?}: direct {direct:.1} Mbit/s");
            // The benchmark's definition of a collapse: under half the usual speed.
            assert!(
                held > 0.5 * direct,
                "{sc:?}: {held:.1} Mbit/s held, {direct:.1} direct"
            );
        }
    }
}

/// The harness reproduces the fault: with smoltcp's default 10 ms delayed ACK, BBR on the
/// dev mesh's 0.2–0.4 ms path sits at a few Mbit/s — what users saw.
#[test]
fn with_a_10_ms_delayed_ack_bbr_collapses_on_the_same_path() {
    for half_rtt in [100, 200] {
        let sc = Scenario {
            congestion: Congestion::Bbr,
            held: true,
            half_rtt,
            ack_delay: Some(Duration::from_millis(10)),
        };
        let (held, direct) = held_and_direct(sc);
        eprintln!("{sc:?}: {held:.1} Mbit/s held, {direct:.1} direct");
        assert!(
            held < 0.05 * direct,
            "{sc:?}: {held:.1} Mbit/s held, {direct:.1} direct"
        );
    }
}
