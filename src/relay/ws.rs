//! WebSocket (RFC 6455) as the relay uses it, sans-IO: the opening handshake's request and
//! response, and a frame decoder and encoder that work in place.
//!
//! Why our own and not a general WebSocket library: a relayed bulk transfer moves ~100 000
//! datagrams a second each way, one binary message each. tungstenite copied every message
//! twice, zeroed its read buffer before every read and went through a `Sink` per message; here
//! a received message is a view of the buffer it was read into (unmasked in place), and an
//! outgoing one is written straight into the connection's output buffer. The relay needs only
//! binary messages, ping/pong and close; text messages and fragmentation are understood (and
//! reassembled, bounded) because a server may send them, but never produced.

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// Largest message we accept: the relay's own limit is 8820 bytes (`messages::MAX_MESSAGE`);
/// anything far beyond it is not a relay speaking.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest handshake head (request or response) we read before giving up.
pub const MAX_HEAD: usize = 16 * 1024;
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Why a WebSocket stream or handshake is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    #[error("websocket message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(u64),
    #[error("websocket handshake: {0}")]
    Handshake(String),
}

/// Which end we are: a client masks what it sends and expects unmasked frames; a server the
/// opposite (RFC 6455 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// One complete message or control frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Binary(Bytes),
    Text(Bytes),
    Ping(Bytes),
    Pong,
    Close,
}

/// Decodes frames from a buffer the caller reads into (`buffer()`), without copying complete
/// single-frame messages: their payload is unmasked in place and handed out as a view.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    buf: BytesMut,
    /// A fragmented message being reassembled: its opcode and the bytes so far.
    partial: Option<(u8, BytesMut)>,
}

impl Decoder {
    /// A decoder whose buffer starts with `leftover` (bytes read past the handshake).
    pub fn new(role: Role, leftover: &[u8]) -> Self {
        let mut buf = BytesMut::with_capacity(READ_CHUNK.max(leftover.len()));
        buf.extend_from_slice(leftover);
        Self {
            role,
            buf,
            partial: None,
        }
    }

    /// Where to read more bytes: at least `READ_CHUNK` of room is reserved. The bytes of frames
    /// already handed out stay valid (they are views of an earlier part of the allocation);
    /// once none are left, the allocation is reused.
    pub fn buffer(&mut self) -> &mut BytesMut {
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// The next complete event, `Ok(None)` if more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, WsError> {
        loop {
            let Some(head) = parse_header(&self.buf)? else {
                return Ok(None);
            };
            let expect_masked = self.role == Role::Server;
            if head.mask.is_some() != expect_masked {
                return Err(WsError::Protocol(if expect_masked {
                    "a client sent an unmasked frame"
                } else {
                    "a server sent a masked frame"
                }));
            }
            let total = head.header_len + head.payload_len;
            if self.buf.len() < total {
                return Ok(None);
            }
            let mut frame = self.buf.split_to(total);
            frame.advance(head.header_len);
            if let Some(key) = head.mask {
                apply_mask(&mut frame, key);
            }
            match head.opcode {
                opcode::PING => return Ok(Some(Event::Ping(frame.freeze()))),
                opcode::PONG => return Ok(Some(Event::Pong)),
                opcode::CLOSE => return Ok(Some(Event::Close)),
                opcode::BINARY | opcode::TEXT => {
                    if self.partial.is_some() {
                        return Err(WsError::Protocol("a new message inside a fragmented one"));
                    }
                    if !head.fin {
                        self.partial = Some((head.opcode, frame));
                        continue;
                    }
                    return Ok(Some(message(head.opcode, frame.freeze())));
                }
                opcode::CONTINUATION => {
                    let Some((op, mut so_far)) = self.partial.take() else {
                        return Err(WsError::Protocol("a continuation frame with no message"));
                    };
                    if so_far.len() + frame.len() > MAX_MESSAGE {
                        return Err(WsError::TooLarge((so_far.len() + frame.len()) as u64));
                    }
                    so_far.extend_from_slice(&frame);
                    if head.fin {
                        return Ok(Some(message(op, so_far.freeze())));
                    }
                    self.partial = Some((op, so_far));
                }
                _ => return Err(WsError::Protocol("reserved opcode")),
            }
        }
    }
}

/// Room reserved for each read: a read then takes many frames at once.
pub const READ_CHUNK: usize = 64 * 1024;

fn message(op: u8, data: Bytes) -> Event {
    if op == opcode::TEXT {
        Event::Text(data)
    } else {
        Event::Binary(data)
    }
}

/// A frame header as read.
#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol(
            "reserved bits set (no extension was negotiated)",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    let masked = b1 & 0x80 != 0;
    let (len, len_bytes) = match b1 & 0x7F {
        126 => match rest.get(..2) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 8),
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if op >= 0x8 && (!fin || len > 125) {
        return Err(WsError::Protocol(
            "a control frame fragmented or over 125 bytes",
        ));
    }
    if len > MAX_MESSAGE as u64 {
        return Err(WsError::TooLarge(len));
    }
    let mask = if masked {
        match rest.get(len_bytes..len_bytes + 4) {
            Some(k) => Some(k.try_into().expect("4 bytes")),
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode: op,
        mask,
        header_len: 2 + len_bytes + if masked { 4 } else { 0 },
        payload_len: len as usize,
    }))
}

/// XOR `data` with the repeated 4-byte `key` (masking and unmasking are the same). Eight
/// bytes at a time; the compiler turns the loop into vector instructions.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Append one complete (FIN) frame of `op` whose payload is `parts` concatenated, masked with
/// `mask` if given (a client's frames).
pub fn put_frame(buf: &mut BytesMut, op: u8, parts: &[&[u8]], mask: Option<[u8; 4]>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    buf.reserve(14 + len);
    buf.put_u8(0x80 | op);
    if len < 126 {
        buf.put_u8(mask_bit | len as u8);
    } else if len <= usize::from(u16::MAX) {
        buf.put_u8(mask_bit | 126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(mask_bit | 127);
        buf.put_u64(len as u64);
    }
    if let Some(key) = mask {
        buf.put_slice(&key);
    }
    let start = buf.len();
    for p in parts {
        buf.put_slice(p);
    }
    if let Some(key) = mask {
        apply_mask(&mut buf[start..], key);
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A fresh `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The client's opening request for `path` on `host` (`host[:port]`, as the Host header).
pub fn client_request(host: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Where a head ends (after its blank line), if it is complete; an error past `MAX_HEAD`.
pub fn head_end(buf: &[u8]) -> Result<Option<usize>, WsError> {
    match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => Ok(Some(i + 4)),
        None if buf.len() > MAX_HEAD => Err(WsError::Handshake(format!(
            "no end of the HTTP head within {MAX_HEAD} bytes"
        ))),
        None => Ok(None),
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Check the server's answer (a complete head, see `head_end`) to a request sent with `key`.
pub fn check_response(head: &[u8], key: &str) -> Result<(), WsError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(WsError::Handshake("truncated HTTP response".into()));
        }
        Err(e) => return Err(WsError::Handshake(format!("bad HTTP response: {e}"))),
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(WsError::Handshake(format!(
            "the server answered {code} {} instead of switching to WebSocket",
            resp.reason.unwrap_or("")
        )));
    }
    if !has_token(header(resp.headers, "upgrade"), "websocket")
        || !has_token(header(resp.headers, "connection"), "upgrade")
    {
        return Err(WsError::Handshake(
            "101 without Upgrade: websocket / Connection: upgrade".into(),
        ));
    }
    if header(resp.headers, "sec-websocket-accept") != Some(accept_key(key).as_str()) {
        return Err(WsError::Handshake("wrong Sec-WebSocket-Accept".into()));
    }
    if header(resp.headers, "sec-websocket-extensions").is_some_and(|v| !v.is_empty()) {
        return Err(WsError::Handshake(
            "the server chose an extension we did not offer".into(),
        ));
    }
    Ok(())
}

/// A client's upgrade request, as a server reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub path: String,
    pub key: String,
}

/// Why a request is refused: the HTTP status to answer with, and the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

/// Read a client's opening request (a complete head).
pub fn parse_request(head: &[u8]) -> Result<Upgrade, Refusal> {
    let bad = |reason| Refusal {
        status: 400,
        reason,
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("malformed HTTP request")),
    }
    if req.method != Some("GET") {
        return Err(Refusal {
            status: 405,
            reason: "a WebSocket upgrade is a GET",
        });
    }
    let path = req.path.unwrap_or_default().to_string();
    if !has_token(header(req.headers, "upgrade"), "websocket")
        || !has_token(header(req.headers, "connection"), "upgrade")
    {
        return Err(Refusal {
            status: 426,
            reason: "not a WebSocket upgrade",
        });
    }
    if header(req.headers, "sec-websocket-version") != Some("13") {
        return Err(bad("Sec-WebSocket-Version must be 13"));
    }
    let key = header(req.headers, "sec-websocket-key")
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|v| v.len() == 16)
        })
        .ok_or(bad("missing or malformed Sec-WebSocket-Key"))?;
    Ok(Upgrade {
        path,
        key: key.to_string(),
    })
}

/// The server's 101 answer to a request with `key`.
pub fn accept_response(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )
}

/// An HTTP error answer that closes the connection.
pub fn refusal_response(r: &Refusal) -> String {
    let text = match r.status {
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        _ => "Bad Request",
    };
    format!(
        "HTTP/1.1 {} {text}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{}\n",
        r.status,
        r.reason.len() + 1,
        r.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(role: Role, bytes: &[u8]) -> Result<Vec<Event>, WsError> {
        let mut d = Decoder::new(role, &[]);
        d.buffer().extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(e) = d.next_event()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn rfc_6455_examples() {
        // §5.7: a single-frame unmasked text message "Hello", and the masked one.
        assert_eq!(
            decode_all(Role::Client, &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]).unwrap(),
            vec![Event::Text(Bytes::from_static(b"Hello"))]
        );
        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode_all(Role::Server, &masked).unwrap(),
            vec![Event::Text(Bytes::from_static(b"Hello"))]
        );
        // A fragmented unmasked text message, and an unmasked ping.
        assert_eq!(
            decode_all(
                Role::Client,
                &[
                    0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f, 0x89, 0x01, 0x21
                ]
            )
            .unwrap(),
            vec![
                Event::Text(Bytes::from_static(b"Hello")),
                Event::Ping(Bytes::from_static(b"!"))
            ]
        );
        // §1.3: the handshake's accept key.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // Our own encoding of the masked example is byte for byte the RFC's.
        let mut buf = BytesMut::new();
        put_frame(
            &mut buf,
            opcode::TEXT,
            &[b"Hel", b"lo"],
            Some([0x37, 0xfa, 0x21, 0x3d]),
        );
        assert_eq!(&buf[..], &masked);
    }

    #[test]
    fn every_length_encoding_round_trips_byte_by_byte() {
        for (role, mask) in [(Role::Server, Some([1, 2, 3, 4])), (Role::Client, None)] {
            for len in [0, 1, 125, 126, 127, 1400, 65535, 65536] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut wire = BytesMut::new();
                put_frame(&mut wire, opcode::BINARY, &[&payload], mask);
                put_frame(&mut wire, opcode::PING, &[b"p"], mask);
                // Fed one byte at a time: nothing until each frame is complete.
                let mut d = Decoder::new(role, &[]);
                let mut got = Vec::new();
                for b in wire.iter() {
                    d.buffer().put_u8(*b);
                    while let Some(e) = d.next_event().unwrap() {
                        got.push(e);
                    }
                }
                assert_eq!(
                    got,
                    vec![
                        Event::Binary(payload.into()),
                        Event::Ping(Bytes::from_static(b"p"))
                    ],
                    "len {len}"
                );
            }
        }
    }

    #[test]
    fn messages_are_views_of_the_read_buffer() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, opcode::BINARY, &[&[5; 1400]], None);
        put_frame(&mut wire, opcode::BINARY, &[&[6; 1400]], None);
        let mut d = Decoder::new(Role::Client, &[]);
        d.buffer().extend_from_slice(&wire);
        let base = d.buf.as_ptr() as usize;
        let Some(Event::Binary(a)) = d.next_event().unwrap() else {
            panic!()
        };
        let Some(Event::Binary(b)) = d.next_event().unwrap() else {
            panic!()
        };
        assert_eq!(a.as_ptr() as usize, base + 4);
        assert_eq!(b.as_ptr() as usize, base + 4 + 1400 + 4);
    }

    #[test]
    fn bad_frames_are_refused() {
        let err = |role, bytes: &[u8]| decode_all(role, bytes).unwrap_err();
        assert!(matches!(
            err(Role::Client, &[0xC2, 0x00]),
            WsError::Protocol(_)
        ));
        assert!(matches!(
            err(Role::Client, &[0x83, 0x00]),
            WsError::Protocol(_)
        ));
        assert!(matches!(
            err(Role::Client, &[0x09, 0x00]),
            WsError::Protocol(_)
        ));
        assert!(matches!(
            err(Role::Client, &[0x80, 0x00]),
            WsError::Protocol(_)
        ));
        // The wrong masking for the role.
        assert!(matches!(
            err(Role::Server, &[0x82, 0x00]),
            WsError::Protocol(_)
        ));
        assert!(matches!(
            err(Role::Client, &[0x82, 0x80, 0, 0, 0, 0]),
            WsError::Protocol(_)
        ));
        // Too large, by header and by reassembly.
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(err(Role::Client, &huge), WsError::TooLarge(1 << 40));
        let mut frag = BytesMut::new();
        frag.extend_from_slice(&[0x02, 126, 0xFF, 0xFF]);
        frag.extend_from_slice(&[0; 0xFFFF]);
        frag.extend_from_slice(&[0x00, 126, 0xFF, 0xFF]);
        frag.extend_from_slice(&[0; 0xFFFF]);
        assert!(matches!(err(Role::Client, &frag), WsError::TooLarge(_)));
    }

    #[test]
    fn mask_matches_bytewise_xor_at_every_length() {
        let key = [0xA1, 0x02, 0xF3, 0x44];
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn handshake_both_ways() {
        let key = new_key();
        let req = client_request("relay.example:443", "/relay", &key);
        let end = head_end(req.as_bytes()).unwrap().unwrap();
        assert_eq!(end, req.len());
        let up = parse_request(req.as_bytes()).unwrap();
        assert_eq!(up.path, "/relay");
        let resp = accept_response(&up.key);
        check_response(resp.as_bytes(), &key).unwrap();
        // Another key's answer, an HTTP error and a missing upgrade are refused.
        assert!(check_response(resp.as_bytes(), &new_key()).is_err());
        let e = check_response(b"HTTP/1.1 404 Not Found\r\n\r\n", &key).unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        assert_eq!(
            parse_request(b"GET /relay HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap_err()
                .status,
            426
        );
        assert_eq!(
            parse_request(b"POST /relay HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .status,
            405
        );
        assert!(head_end(&[b'a'; MAX_HEAD + 1]).is_err());
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n").unwrap(), None);
    }
}
