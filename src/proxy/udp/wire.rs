//! The SOCKS5 UDP request header (RFC 1928 §7), read and written in place.
//!
//! ```text
//! +----+------+------+----------+----------+----------+
//! |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
//! +----+------+------+----------+----------+----------+
//! | 2  |  1   |  1   | Variable |    2     | Variable |
//! ```
//!
//! Why not fast-socks5's helpers: its parser is async and copies a name into a `String`, and
//! its writer returns a fresh `Vec`, per datagram. Here a datagram is viewed where it lies and
//! a reply's header is written into the bytes just before its payload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest header we write: an IPv6 source (4 + 16 + 2).
pub const MAX_REPLY_HEADER: usize = 22;

const ATYP_V4: u8 = 1;
const ATYP_NAME: u8 = 3;
const ATYP_V6: u8 = 4;

/// Where a client's datagram is to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest<'a> {
    Addr(SocketAddr),
    /// A host name (ATYP 3) and port, resolved as for CONNECT.
    Name(&'a str, u16),
}

/// A client's datagram, viewed in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Fragment number: 0 for a whole datagram (the only kind we relay).
    pub frag: u8,
    pub dest: Dest<'a>,
    pub payload: &'a [u8],
}

/// Why a client's datagram could not be read. Each is a counted drop: UDP has no way to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("shorter than its header")]
    Short,
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("unknown address type {0}")]
    AddressType(u8),
    #[error("the host name is empty or not text")]
    BadName,
}

impl HeaderError {
    /// A label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Short => "short",
            HeaderError::Reserved => "reserved",
            HeaderError::AddressType(_) => "address_type",
            HeaderError::BadName => "bad_name",
        }
    }
}

/// Read a client's datagram.
pub fn parse(datagram: &[u8]) -> Result<Request<'_>, HeaderError> {
    let [r0, r1, frag, atyp, rest @ ..] = datagram else {
        return Err(HeaderError::Short);
    };
    if (*r0, *r1) != (0, 0) {
        return Err(HeaderError::Reserved);
    }
    let port_at = |rest: &[u8], at: usize| -> Result<u16, HeaderError> {
        let p = rest.get(at..at + 2).ok_or(HeaderError::Short)?;
        Ok(u16::from_be_bytes([p[0], p[1]]))
    };
    let (dest, used) = match *atyp {
        ATYP_V4 => {
            let a: [u8; 4] = rest
                .get(..4)
                .and_then(|a| a.try_into().ok())
                .ok_or(HeaderError::Short)?;
            let ip = IpAddr::V4(Ipv4Addr::from(a));
            (Dest::Addr(SocketAddr::new(ip, port_at(rest, 4)?)), 6)
        }
        ATYP_V6 => {
            let a: [u8; 16] = rest
                .get(..16)
                .and_then(|a| a.try_into().ok())
                .ok_or(HeaderError::Short)?;
            let ip = IpAddr::V6(Ipv6Addr::from(a));
            (Dest::Addr(SocketAddr::new(ip, port_at(rest, 16)?)), 18)
        }
        ATYP_NAME => {
            let len = *rest.first().ok_or(HeaderError::Short)? as usize;
            let name = rest.get(1..1 + len).ok_or(HeaderError::Short)?;
            let name = std::str::from_utf8(name).map_err(|_| HeaderError::BadName)?;
            if name.is_empty() {
                return Err(HeaderError::BadName);
            }
            (Dest::Name(name, port_at(rest, 1 + len)?), 1 + len + 2)
        }
        other => return Err(HeaderError::AddressType(other)),
    };
    Ok(Request {
        frag: *frag,
        dest,
        payload: &rest[used..],
    })
}

/// The header's length for a reply from `from`.
pub fn reply_header_len(from: SocketAddr) -> usize {
    match from {
        SocketAddr::V4(_) => 10,
        SocketAddr::V6(_) => 22,
    }
}

/// Write the header of a reply from `from` into the end of `space` (which must hold
/// `reply_header_len(from)` bytes), so that it runs straight into a payload placed right after
/// `space`. Returns where in `space` the header starts.
pub fn write_reply_header(space: &mut [u8], from: SocketAddr) -> usize {
    let len = reply_header_len(from);
    let start = space.len() - len;
    let h = &mut space[start..];
    h[..3].fill(0);
    match from {
        SocketAddr::V4(a) => {
            h[3] = ATYP_V4;
            h[4..8].copy_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            h[3] = ATYP_V6;
            h[4..20].copy_from_slice(&a.ip().octets());
        }
    }
    h[len - 2..].copy_from_slice(&from.port().to_be_bytes());
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_address_types_and_leaves_the_payload_in_place() {
        let v4 = [0, 0, 0, 1, 100, 64, 0, 2, 0x1f, 0x90, b'h', b'i'];
        let r = parse(&v4).unwrap();
        assert_eq!(r.frag, 0);
        assert_eq!(r.dest, Dest::Addr("100.64.0.2:8080".parse().unwrap()));
        assert_eq!(r.payload, b"hi");

        let mut v6 = vec![0, 0, 0, 4];
        v6.extend_from_slice(&"fd64::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 53, 1, 2, 3]);
        let r = parse(&v6).unwrap();
        assert_eq!(r.dest, Dest::Addr("[fd64::2]:53".parse().unwrap()));
        assert_eq!(r.payload, &[1, 2, 3]);

        let mut name = vec![0, 0, 2, 3, 8];
        name.extend_from_slice(b"web.mesh");
        name.extend_from_slice(&[0x01, 0xbb]);
        let r = parse(&name).unwrap();
        assert_eq!(r.frag, 2);
        assert_eq!(r.dest, Dest::Name("web.mesh", 443));
        assert!(r.payload.is_empty());
    }

    #[test]
    fn malformed_headers_are_told_apart() {
        assert_eq!(parse(&[0, 0, 0]), Err(HeaderError::Short));
        assert_eq!(
            parse(&[0, 1, 0, 1, 1, 2, 3, 4, 0, 1]),
            Err(HeaderError::Reserved)
        );
        assert_eq!(parse(&[0, 0, 0, 1, 1, 2, 3, 4, 0]), Err(HeaderError::Short));
        assert_eq!(parse(&[0, 0, 0, 4, 1, 2]), Err(HeaderError::Short));
        assert_eq!(parse(&[0, 0, 0, 9, 1, 2]), Err(HeaderError::AddressType(9)));
        assert_eq!(parse(&[0, 0, 0, 3, 0, 0, 80]), Err(HeaderError::BadName));
        assert_eq!(
            parse(&[0, 0, 0, 3, 2, 0xff, 0xfe, 0, 80]),
            Err(HeaderError::BadName)
        );
        assert_eq!(parse(&[0, 0, 0, 3, 5, b'a', b'b']), Err(HeaderError::Short));
        assert_eq!(parse(&[0, 0, 0, 3, 1, b'a', 0]), Err(HeaderError::Short));
    }

    #[test]
    fn a_reply_header_written_before_the_payload_parses_back() {
        for from in ["100.64.0.9:5353", "[fd64::9]:5353"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut buf = [0xAAu8; MAX_REPLY_HEADER + 3];
            buf[MAX_REPLY_HEADER..].copy_from_slice(b"abc");
            let start = write_reply_header(&mut buf[..MAX_REPLY_HEADER], from);
            let r = parse(&buf[start..]).unwrap();
            assert_eq!(r.dest, Dest::Addr(from));
            assert_eq!(r.payload, b"abc");
            assert_eq!(MAX_REPLY_HEADER - start, reply_header_len(from));
        }
    }
}
