//! The receive side of the vendored smoltcp at the edge of its window (vendor/smoltcp/PATCHES.md,
//! item 7), driven segment by segment from a hand-written sender.
//!
//! Why: the netstack micro-benchmark lost the last 28–126 bytes of a 16 MiB stream about once
//! in three runs. A scaled window is rounded down to a multiple of 2^shift, so the right edge
//! smoltcp advertises moves back by up to 2^shift − 1 bytes whenever data arrives without being
//! read. Upstream then accepted payload only up to the newer, smaller edge — and still took the
//! FIN that followed the bytes it cut off, ending the stream early. These tests build exactly
//! that sequence of segments, with no timing involved, and check every byte.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};

#[path = "support/packet_queues.rs"]
mod packet_queues;
use packet_queues::PacketQueues;

const RECEIVER: Ipv4Address = Ipv4Address::new(100, 64, 0, 2);
const SENDER: Ipv4Address = Ipv4Address::new(100, 64, 0, 1);
const PORT: u16 = 80;
const SENDER_PORT: u16 = 40000;
/// The receiver's buffer: 1 MiB, so smoltcp scales its window (shift 5).
const CAPACITY: usize = 1 << 20;
/// Fill segments: a multiple of 2^shift, so filling alone never moves the advertised edge.
const CHUNK: usize = 1024;

/// A smoltcp receiver listening on `PORT`, and the sender's view of the connection.
struct Harness {
    link: PacketQueues,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    now: Instant,
    /// Our next sequence number.
    snd_nxt: TcpSeqNumber,
    /// The receiver's next sequence number (what we acknowledge).
    rcv_nxt: TcpSeqNumber,
    /// The receiver's window shift, from its SYN-ACK.
    shift: u8,
    /// The right edge of every window the receiver advertised, in order.
    edges: Vec<TcpSeqNumber>,
}

impl Harness {
    /// Listen, then complete a handshake from the sender's side.
    fn connected() -> Self {
        let mut link = PacketQueues::new(65535);
        let now = Instant::from_millis(0);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut link, now);
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::Ipv4(RECEIVER), 16))
                .unwrap()
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; CAPACITY]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        // Every segment gets its ACK at once, so each advertised edge is seen.
        sock.set_ack_delay(None);
        sock.listen(PORT).unwrap();
        let handle = sockets.add(sock);
        let mut h = Harness {
            link,
            iface,
            sockets,
            handle,
            now,
            snd_nxt: TcpSeqNumber(1_000_000),
            rcv_nxt: TcpSeqNumber(0),
            shift: 0,
            edges: Vec::new(),
        };

        h.send(TcpControl::Syn, &[], None);
        let syn_ack = h.poll().pop().expect("a SYN-ACK");
        assert_eq!(syn_ack.control, TcpControl::Syn);
        h.shift = syn_ack
            .window_scale
            .expect("the receiver scales its window");
        assert!(
            h.shift >= 2 && CHUNK.is_multiple_of(1 << h.shift),
            "shift {}",
            h.shift
        );
        h.rcv_nxt = syn_ack.seq_number + 1;
        h.snd_nxt += 1;
        h.send(TcpControl::None, &[], Some(h.rcv_nxt));
        h.poll();
        assert_eq!(h.socket().state(), tcp::State::Established);
        h
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }

    /// Queue one segment from the sender at `snd_nxt` and advance `snd_nxt` past it.
    fn send(&mut self, control: TcpControl, payload: &[u8], ack: Option<TcpSeqNumber>) {
        let tcp = TcpRepr {
            src_port: SENDER_PORT,
            dst_port: PORT,
            control,
            seq_number: self.snd_nxt,
            ack_number: ack,
            window_len: u16::MAX,
            window_scale: (control == TcpControl::Syn).then_some(7),
            max_seg_size: (control == TcpControl::Syn).then_some(1400),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: SENDER,
            dst_addr: RECEIVER,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let caps = ChecksumCapabilities::default();
        let mut buf = vec![0; ip.buffer_len() + tcp.buffer_len()];
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut buf[ip.buffer_len()..]),
            &IpAddress::Ipv4(SENDER),
            &IpAddress::Ipv4(RECEIVER),
            &caps,
        );
        self.link.inbound.push_back(buf);
        if control != TcpControl::Syn {
            self.snd_nxt += payload.len();
        }
    }

    /// Queue a data segment (with FIN if `fin`) acknowledging the receiver.
    fn send_data(&mut self, payload: &[u8], fin: bool) {
        let control = if fin {
            TcpControl::Fin
        } else {
            TcpControl::None
        };
        self.send(control, payload, Some(self.rcv_nxt));
    }

    /// Let the receiver process everything queued; return the segments it sent, recording
    /// each advertised right edge.
    fn poll(&mut self) -> Vec<TcpReprOwned> {
        self.now += Duration::from_millis(1);
        self.iface.poll(self.now, &mut self.link, &mut self.sockets);
        let caps = ChecksumCapabilities::default();
        let mut out = Vec::new();
        while let Some(buf) = self.link.outbound.pop_front() {
            let ip_packet = Ipv4Packet::new_checked(&buf[..]).unwrap();
            let ip = Ipv4Repr::parse(&ip_packet, &caps).unwrap();
            let tcp_packet = TcpPacket::new_checked(ip_packet.payload()).unwrap();
            let tcp = TcpRepr::parse(
                &tcp_packet,
                &IpAddress::Ipv4(ip.src_addr),
                &IpAddress::Ipv4(ip.dst_addr),
                &caps,
            )
            .unwrap();
            assert_ne!(
                tcp.control,
                TcpControl::Rst,
                "the receiver reset the connection"
            );
            if tcp.control != TcpControl::Syn
                && let Some(ack) = tcp.ack_number
            {
                self.edges
                    .push(ack + ((tcp.window_len as usize) << self.shift));
            }
            out.push(TcpReprOwned {
                control: tcp.control,
                seq_number: tcp.seq_number,
                window_scale: tcp.window_scale,
            });
        }
        out
    }

    /// Read everything the receiver has buffered, appending it to `into`.
    fn read_all(&mut self, into: &mut Vec<u8>) {
        let mut buf = vec![0; 64 * 1024];
        while self.socket().can_recv() {
            let n = self.socket().recv_slice(&mut buf).unwrap();
            into.extend_from_slice(&buf[..n]);
        }
    }

    /// Send `len` bytes of `stream` from `*sent` in aligned chunks, leaving them unread.
    fn fill(&mut self, stream: &[u8], sent: &mut usize, len: usize) {
        let end = *sent + len;
        while *sent < end {
            let n = CHUNK.min(end - *sent);
            self.send_data(&stream[*sent..*sent + n], false);
            *sent += n;
            self.poll();
        }
    }
}

/// The parts of a received segment the tests look at.
struct TcpReprOwned {
    control: TcpControl,
    seq_number: TcpSeqNumber,
    window_scale: Option<u8>,
}

fn stream(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The sender fills a window the receiver has since shrunk by rounding, and ends with a FIN:
/// every byte arrives, and the FIN after them.
#[test]
fn a_window_shrunk_by_rounding_still_takes_the_bytes_it_once_offered() {
    let mut h = Harness::connected();
    let data = stream(CAPACITY);
    let base = h.snd_nxt;
    let mut sent = 0;

    // Aligned data up to one chunk short of the buffer: the edge stays at base + CAPACITY.
    h.fill(&data, &mut sent, CAPACITY - CHUNK);
    let widest = h
        .edges
        .iter()
        .copied()
        .reduce(|a, b| if b > a { b } else { a })
        .unwrap();
    assert_eq!(widest, base + CAPACITY);

    // One byte more: the room left (CHUNK - 1) is rounded down, so the edge moves back.
    h.fill(&data, &mut sent, 1);
    let last = *h.edges.last().unwrap();
    assert!(
        last < widest,
        "setup: the advertised edge should have moved back (last {last}, widest {widest})"
    );

    // The rest, up to the widest edge the receiver ever offered, with the FIN.
    h.send_data(&data[sent..], true);
    sent = data.len();
    h.poll();

    let mut got = Vec::new();
    h.read_all(&mut got);
    assert_eq!(
        got.len(),
        sent,
        "bytes delivered before the end of the stream"
    );
    assert!(got == data, "the delivered bytes differ from those sent");
    assert!(!h.socket().may_recv(), "the FIN was not taken");
    assert_eq!(h.socket().state(), tcp::State::CloseWait);
}

/// A segment that overflows the receive buffer and carries the FIN: the bytes that fit are
/// kept, the FIN is not taken (bytes before it were dropped), and the retransmitted tail
/// completes the stream.
#[test]
fn a_fin_after_bytes_that_did_not_fit_is_not_taken() {
    let mut h = Harness::connected();
    let data = stream(CAPACITY + 100);
    let mut sent = 0;
    h.fill(&data, &mut sent, CAPACITY - 100);

    // 200 bytes and the FIN, where only 100 fit.
    h.send_data(&data[sent..], true);
    h.poll();
    assert!(
        h.socket().may_recv(),
        "a FIN after dropped bytes ended the stream"
    );
    assert_eq!(h.socket().state(), tcp::State::Established);

    // The application reads; the sender retransmits what was not acknowledged.
    let mut got = Vec::new();
    h.read_all(&mut got);
    assert_eq!(got.len(), CAPACITY);
    let delivered = got.len();
    h.snd_nxt = h.snd_nxt - (data.len() - delivered);
    h.send_data(&data[delivered..], true);
    h.poll();
    h.read_all(&mut got);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the delivered bytes differ from those sent");
    assert_eq!(h.socket().state(), tcp::State::CloseWait);
}
