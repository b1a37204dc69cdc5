//! Reading and writing whole IP packets outside smoltcp's sockets: the headers the filter and
//! the router look at (read in place, no copy), the RST that refuses a routed connection, and
//! the UDP datagrams a routing peer sends back for the hosts it forwards to.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use crate::firewall::{Flow, Proto};

/// What the filter needs of an inbound packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
    /// Where the transport header starts.
    pub l4: usize,
    /// A TCP SYN without ACK: a new connection.
    pub syn: bool,
    /// An ICMP (v4 or v6) echo request.
    pub echo_request: bool,
}

impl Headers {
    pub fn flow(&self) -> Flow {
        Flow {
            src: self.src,
            dst: self.dst,
            proto: self.proto,
            dst_port: self.dst_port,
        }
    }

    pub fn src_addr(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.src_port)
    }

    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dst_port)
    }
}

/// Parse an IPv4 or IPv6 packet's addresses and transport ports; None for anything malformed
/// (IPv6 extension headers included: the transport is then `Other`).
pub fn inspect(packet: &[u8]) -> Option<Headers> {
    let (src, dst, next, l4) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            // Fragments carry no ports: never routed, never new flows.
            if ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                ip.next_header(),
                usize::from(ip.header_len()),
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                ip.next_header(),
                ip.header_len(),
            )
        }
        _ => return None,
    };
    let rest = packet.get(l4..)?;
    let mut h = Headers {
        src,
        dst,
        proto: Proto::Other(u8::from(next)),
        src_port: 0,
        dst_port: 0,
        l4,
        syn: false,
        echo_request: false,
    };
    match next {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(rest).ok()?;
            h.proto = Proto::Tcp;
            h.src_port = tcp.src_port();
            h.dst_port = tcp.dst_port();
            h.syn = tcp.syn() && !tcp.ack();
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(rest).ok()?;
            h.proto = Proto::Udp;
            h.src_port = udp.src_port();
            h.dst_port = udp.dst_port();
        }
        IpProtocol::Icmp => {
            h.proto = Proto::Icmp;
            h.echo_request = *rest.first()? == 8;
        }
        IpProtocol::Icmpv6 => {
            h.proto = Proto::Icmp;
            h.echo_request = *rest.first()? == 128;
        }
        _ => {}
    }
    Some(h)
}

/// A RST|ACK answering a TCP SYN (`syn` is the whole IP packet), written into `out`; false when
/// the packet is not a TCP SYN.
pub fn rst_for_syn(syn: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(h) = inspect(syn) else { return false };
    if !h.syn {
        return false;
    }
    let Ok(tcp) = TcpPacket::new_checked(&syn[h.l4..]) else {
        return false;
    };
    let seq = tcp.seq_number();
    let reply = TcpRepr {
        src_port: h.dst_port,
        dst_port: h.src_port,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(seq + 1),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (IpAddress::from(h.dst), IpAddress::from(h.src));
    let ip = IpRepr::new(src, dst, IpProtocol::Tcp, reply.buffer_len(), 64);
    out.clear();
    out.resize(ip.header_len() + reply.buffer_len(), 0);
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut out[..], &caps);
    let at = ip.header_len();
    reply.emit(
        &mut TcpPacket::new_unchecked(&mut out[at..]),
        &src,
        &dst,
        &caps,
    );
    true
}

/// A UDP datagram from `from` to `to` carrying `payload`, written into `out`; false when the
/// addresses are of different families or the datagram would not fit in `mtu`.
pub fn udp_packet(
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    mtu: usize,
    out: &mut Vec<u8>,
) -> bool {
    if from.is_ipv4() != to.is_ipv4() {
        return false;
    }
    let udp = UdpRepr {
        src_port: from.port(),
        dst_port: to.port(),
    };
    let udp_len = udp.header_len() + payload.len();
    let (src, dst) = (IpAddress::from(from.ip()), IpAddress::from(to.ip()));
    let ip = IpRepr::new(src, dst, IpProtocol::Udp, udp_len, 64);
    let total = ip.header_len() + udp_len;
    if total > mtu {
        return false;
    }
    out.clear();
    out.resize(total, 0);
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut out[..], &caps);
    let at = ip.header_len();
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut out[at..]),
        &src,
        &dst,
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &caps,
    );
    true
}

/// An ICMPv4 echo reply from `from` to `to` answering an echo request with this identifier,
/// sequence number and data; written into `out`.
pub fn echo_reply_v4(
    from: IpAddr,
    to: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let (IpAddr::V4(f), IpAddr::V4(t)) = (from, to) else {
        return false;
    };
    let icmp = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let ip = IpRepr::new(f.into(), t.into(), IpProtocol::Icmp, icmp.buffer_len(), 64);
    out.clear();
    out.resize(ip.header_len() + icmp.buffer_len(), 0);
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut out[..], &caps);
    let at = ip.header_len();
    icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut out[at..]), &caps);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_udp_packet_round_trips_through_inspect() {
        let mut out = Vec::new();
        assert!(udp_packet(
            sa("198.19.1.10:53"),
            sa("100.64.0.5:40000"),
            b"hello",
            1280,
            &mut out
        ));
        let h = inspect(&out).unwrap();
        assert_eq!(h.proto, Proto::Udp);
        assert_eq!(h.src_addr(), sa("198.19.1.10:53"));
        assert_eq!(h.dst_addr(), sa("100.64.0.5:40000"));
        assert_eq!(&out[h.l4 + 8..], b"hello");
        assert!(!udp_packet(
            sa("198.19.1.10:53"),
            sa("[fd00::1]:1"),
            b"x",
            1280,
            &mut out
        ));
        assert!(!udp_packet(
            sa("198.19.1.10:53"),
            sa("100.64.0.5:1"),
            &[0; 1300],
            1280,
            &mut out
        ));
        assert!(udp_packet(
            sa("[fd00::2]:53"),
            sa("[fd00::1]:1"),
            b"x",
            1280,
            &mut out
        ));
        assert_eq!(inspect(&out).unwrap().src_addr(), sa("[fd00::2]:53"));
    }

    #[test]
    fn a_syn_is_answered_by_a_rst_that_acknowledges_it() {
        // Build a SYN with smoltcp's own writer, then refuse it.
        let syn = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1000),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: Some(1240),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let (src, dst): (IpAddress, IpAddress) = (
            "100.64.0.5".parse::<std::net::Ipv4Addr>().unwrap().into(),
            "198.19.1.10".parse::<std::net::Ipv4Addr>().unwrap().into(),
        );
        let ip = IpRepr::new(src, dst, IpProtocol::Tcp, syn.buffer_len(), 64);
        let mut pkt = vec![0; ip.header_len() + syn.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut pkt[..], &caps);
        let at = ip.header_len();
        syn.emit(
            &mut TcpPacket::new_unchecked(&mut pkt[at..]),
            &src,
            &dst,
            &caps,
        );
        let h = inspect(&pkt).unwrap();
        assert!(h.syn && h.dst_port == 80);

        let mut out = Vec::new();
        assert!(rst_for_syn(&pkt, &mut out));
        let r = inspect(&out).unwrap();
        assert_eq!(
            (r.src_addr(), r.dst_addr()),
            (sa("198.19.1.10:80"), sa("100.64.0.5:40000"))
        );
        let tcp = TcpPacket::new_checked(&out[r.l4..]).unwrap();
        assert!(tcp.rst() && tcp.ack());
        assert_eq!(tcp.ack_number(), TcpSeqNumber(1001));
        assert!(tcp.verify_checksum(&IpAddress::from(r.src), &IpAddress::from(r.dst)));
        assert!(!rst_for_syn(&out, &mut Vec::new()), "a RST is not a SYN");
    }

    #[test]
    fn garbage_and_fragments_are_not_inspected() {
        assert!(inspect(&[]).is_none());
        assert!(inspect(&[0x45, 0, 0]).is_none());
        let mut out = Vec::new();
        udp_packet(
            sa("198.19.1.10:53"),
            sa("100.64.0.5:4"),
            b"abc",
            1280,
            &mut out,
        );
        out[6] = 0x20; // more fragments
        assert!(inspect(&out).is_none());
        let mut echo = Vec::new();
        assert!(echo_reply_v4(
            "198.19.1.10".parse().unwrap(),
            "100.64.0.5".parse().unwrap(),
            7,
            1,
            b"ping",
            &mut echo
        ));
        let h = inspect(&echo).unwrap();
        assert_eq!(h.proto, Proto::Icmp);
        assert!(!h.echo_request);
    }
}
