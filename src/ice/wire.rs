//! What arrives on the WireGuard socket, told apart; and the two STUN messages we speak outside
//! ICE's own checks: the plain Binding request that learns our server-reflexive address from a
//! STUN server, and the answer the dev mesh's STUN server gives to one.
//!
//! Zero-copy views over the datagram, no allocation, no panics on any input (fuzzed in
//! `fuzz/fuzz_targets/ice_wire.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// RFC 5389's magic cookie, at offset 4 of every STUN message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// STUN message header length.
pub const HEADER_LEN: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Smallest WireGuard message (a keepalive: 16-byte header and 16-byte tag).
const WIREGUARD_MIN: usize = 32;

/// What a datagram on the shared socket is (netbird-protocol.md §7.4, ice.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// A WireGuard message: at least 32 bytes, little-endian type 1..=4 in the first word.
    /// Tested first: a WireGuard receiver index may hold the STUN cookie at offset 4.
    WireGuard,
    /// A STUN message: 20-byte header, top two bits zero, the magic cookie at offset 4.
    Stun,
    /// Anything else, e.g. the two bytes "nb" Go peers punch with: dropped.
    Other,
}

/// Tell a datagram's kind, in NetBird's order.
pub fn classify(d: &[u8]) -> Datagram {
    if d.len() >= WIREGUARD_MIN
        && let Ok(word) = <[u8; 4]>::try_from(&d[..4])
        && (1..=4).contains(&u32::from_le_bytes(word))
    {
        return Datagram::WireGuard;
    }
    if d.len() >= HEADER_LEN && d[0] & 0xC0 == 0 && d[4..8] == MAGIC_COOKIE {
        return Datagram::Stun;
    }
    Datagram::Other
}

/// A Binding request with no attributes, as NetBird sends to STUN servers.
pub fn binding_request(transaction: [u8; 12]) -> [u8; HEADER_LEN] {
    let mut m = [0u8; HEADER_LEN];
    m[..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE);
    m[8..].copy_from_slice(&transaction);
    m
}

/// Why a STUN message was not what we wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("shorter than a STUN header")]
    Short,
    #[error("no STUN magic cookie")]
    NotStun,
    #[error("declared length {0} does not match the datagram")]
    Length(usize),
    #[error("not a Binding success response")]
    NotBindingSuccess,
    #[error("not a Binding request")]
    NotBindingRequest,
    #[error("attribute overruns the message")]
    Attribute,
    #[error("no mapped address")]
    NoAddress,
}

/// The values of every attribute of type `kind` in what looks like a STUN message, read
/// leniently (to the end of the datagram, whatever the declared length says), for guards
/// that must see at least what a more forgiving parser would.
pub fn attributes_of(d: &[u8], kind: u16) -> impl Iterator<Item = &[u8]> {
    let body = if d.len() >= HEADER_LEN && d[0] & 0xC0 == 0 && d[4..8] == MAGIC_COOKIE {
        &d[HEADER_LEN..]
    } else {
        &[][..]
    };
    attributes(body)
        .map_while(Result::ok)
        .filter(move |(k, _)| *k == kind)
        .map(|(_, v)| v)
}

/// A parsed STUN header.
struct Header<'a> {
    kind: u16,
    transaction: [u8; 12],
    attributes: &'a [u8],
}

fn header(d: &[u8]) -> Result<Header<'_>, StunError> {
    if d.len() < HEADER_LEN {
        return Err(StunError::Short);
    }
    if d[0] & 0xC0 != 0 || d[4..8] != MAGIC_COOKIE {
        return Err(StunError::NotStun);
    }
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    if len % 4 != 0 || HEADER_LEN + len != d.len() {
        return Err(StunError::Length(len));
    }
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&d[8..20]);
    Ok(Header {
        kind: u16::from_be_bytes([d[0], d[1]]),
        transaction,
        attributes: &d[HEADER_LEN..],
    })
}

/// The attributes of a message: (type, value) until the end, or an error on an overrun.
fn attributes(mut a: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), StunError>> {
    std::iter::from_fn(move || {
        if a.is_empty() {
            return None;
        }
        if a.len() < 4 {
            a = &[];
            return Some(Err(StunError::Attribute));
        }
        let kind = u16::from_be_bytes([a[0], a[1]]);
        let len = usize::from(u16::from_be_bytes([a[2], a[3]]));
        let padded = len.div_ceil(4) * 4;
        if a.len() < 4 + padded {
            a = &[];
            return Some(Err(StunError::Attribute));
        }
        let value = &a[4..4 + len];
        a = &a[4 + padded..];
        Some(Ok((kind, value)))
    })
}

/// A Binding success response's transaction ID and the address it reports (XOR-MAPPED-ADDRESS,
/// or MAPPED-ADDRESS from an RFC 3489 server).
pub fn parse_binding_success(d: &[u8]) -> Result<([u8; 12], SocketAddr), StunError> {
    let h = header(d)?;
    if h.kind != BINDING_SUCCESS {
        return Err(StunError::NotBindingSuccess);
    }
    let mut mapped = None;
    for attr in attributes(h.attributes) {
        let (kind, value) = attr?;
        match kind {
            ATTR_XOR_MAPPED_ADDRESS => {
                return Ok((h.transaction, address(value, Some(&h.transaction))?));
            }
            ATTR_MAPPED_ADDRESS => mapped = Some(address(value, None)?),
            _ => {}
        }
    }
    mapped
        .map(|a| (h.transaction, a))
        .ok_or(StunError::NoAddress)
}

/// Decode a (XOR-)MAPPED-ADDRESS value; `xor` holds the transaction ID for the XOR form.
fn address(v: &[u8], xor: Option<&[u8; 12]>) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::Attribute);
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    let mut key = [0u8; 16];
    if let Some(t) = xor {
        port ^= u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
        key[..4].copy_from_slice(&MAGIC_COOKIE);
        key[4..].copy_from_slice(t);
    }
    let ip = match (v[1], v.len()) {
        (1, 8) => {
            let mut o = [0u8; 4];
            for (i, b) in o.iter_mut().enumerate() {
                *b = v[4 + i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (2, 20) => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = v[4 + i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(StunError::Attribute),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Answer a Binding request from `from` (a STUN server's job): a success response carrying
/// XOR-MAPPED-ADDRESS, written to `out`. Returns its length.
pub fn binding_success(
    request: &[u8],
    from: SocketAddr,
    out: &mut [u8; 44],
) -> Result<usize, StunError> {
    let h = header(request)?;
    if h.kind != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&h.transaction);
    let mut octets = [0u8; 16];
    let (family, addr): (u8, &[u8]) = match from.ip() {
        IpAddr::V4(ip) => {
            octets[..4].copy_from_slice(&ip.octets());
            (1, &octets[..4])
        }
        IpAddr::V6(ip) => {
            octets.copy_from_slice(&ip.octets());
            (2, &octets[..])
        }
    };
    let value_len = 4 + addr.len();
    let total = HEADER_LEN + 4 + value_len;
    out[..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out[2..4].copy_from_slice(&((4 + value_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(&h.transaction);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(value_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let xport = from.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
    out[26..28].copy_from_slice(&xport.to_be_bytes());
    for (i, b) in addr.iter().enumerate() {
        out[28 + i] = b ^ key[i];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_is_told_apart_first_even_with_the_cookie_inside() {
        let mut data = [0u8; 148];
        data[0] = 1;
        data[4..8].copy_from_slice(&MAGIC_COOKIE); // a sender index that holds the cookie
        assert_eq!(classify(&data), Datagram::WireGuard);
        data[0] = 4;
        assert_eq!(classify(&data[..32]), Datagram::WireGuard);
        data[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(
            classify(&data[..31]),
            Datagram::Other,
            "shorter than any WG message"
        );
        let request = binding_request([3; 12]);
        assert_eq!(classify(&request), Datagram::Stun);
        assert_eq!(classify(b"nb"), Datagram::Other);
        assert_eq!(classify(&[]), Datagram::Other);
        let mut top_bits = binding_request([7; 12]);
        top_bits[0] = 0x80;
        assert_eq!(classify(&top_bits), Datagram::Other);
    }

    #[test]
    fn a_binding_request_is_answered_with_the_senders_address_both_families() {
        for from in [
            "198.19.1.2:51820",
            "[2001:db8::7]:40000",
            "[::ffff:10.0.0.1]:9",
        ] {
            let from: SocketAddr = from.parse().unwrap();
            let request = binding_request([9; 12]);
            assert_eq!(classify(&request), Datagram::Stun);
            let mut out = [0u8; 44];
            let n = binding_success(&request, from, &mut out).unwrap();
            let (tid, mapped) = parse_binding_success(&out[..n]).unwrap();
            assert_eq!(tid, [9; 12]);
            assert_eq!(
                mapped,
                SocketAddr::new(from.ip().to_canonical(), from.port())
            );
        }
    }

    #[test]
    fn a_response_from_a_real_server_decodes() {
        // RFC 5769 §2.2 sample IPv4 response: 192.0.2.1:32853, with SOFTWARE, MESSAGE-INTEGRITY
        // and FINGERPRINT around the XOR-MAPPED-ADDRESS.
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220\
                   002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
                   80280004c07d4c96";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let (_, mapped) = parse_binding_success(&bytes).unwrap();
        assert_eq!(mapped, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn malformed_messages_are_errors() {
        let request = binding_request([1; 12]);
        assert_eq!(
            parse_binding_success(&request).err(),
            Some(StunError::NotBindingSuccess)
        );
        assert_eq!(
            parse_binding_success(&request[..19]).err(),
            Some(StunError::Short)
        );
        let mut long = request.to_vec();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(
            parse_binding_success(&long).err(),
            Some(StunError::Length(0))
        );
        // A success whose attribute claims more bytes than there are.
        let mut bad = [0u8; 28];
        bad[..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
        bad[2..4].copy_from_slice(&8u16.to_be_bytes());
        bad[4..8].copy_from_slice(&MAGIC_COOKIE);
        bad[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
        bad[22..24].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(
            parse_binding_success(&bad).err(),
            Some(StunError::Attribute)
        );
        bad[22..24].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            parse_binding_success(&bad).err(),
            Some(StunError::Attribute)
        );
    }
}
