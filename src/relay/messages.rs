//! Relay frames (netbird-protocol.md §6), parsed without copying and built into buffers.
//!
//! Every frame is `[version=1][type][...]`, one WebSocket binary message each. Peer IDs are
//! `"sha-"` followed by the SHA-256 of the peer's key *string* (36 bytes).

use sha2::{Digest, Sha256};

pub const VERSION: u8 = 1;
pub const PEER_ID_LEN: usize = 36;
/// Largest relay message.
pub const MAX_MESSAGE: usize = 8820;
/// Magic that opens an Auth frame's body.
pub const AUTH_MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Auth payload algorithm: HMAC-SHA256 (token v2).
pub const AUTH_HMAC_SHA256: u8 = 1;
/// Most peer IDs in one subscription or presence frame.
pub const MAX_IDS_PER_FRAME: usize = (MAX_MESSAGE - 2) / PEER_ID_LEN;

/// A relay peer ID.
pub type PeerId = [u8; PEER_ID_LEN];

/// The relay ID of a peer, from its key string.
pub fn peer_id(key_string: &str) -> PeerId {
    let mut id = [0u8; PEER_ID_LEN];
    id[..4].copy_from_slice(b"sha-");
    id[4..].copy_from_slice(&Sha256::digest(key_string.as_bytes()));
    id
}

mod kind {
    pub const TRANSPORT: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const HEALTH_CHECK: u8 = 5;
    pub const AUTH: u8 = 6;
    pub const AUTH_RESPONSE: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const UNSUBSCRIBE: u8 = 9;
    pub const PEERS_ONLINE: u8 = 10;
    pub const PEERS_WENT_OFFLINE: u8 = 11;
}

/// A list of peer IDs inside a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIds<'a>(&'a [u8]);

impl<'a> PeerIds<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a PeerId> + 'a {
        self.0
            .chunks_exact(PEER_ID_LEN)
            .map(|c| c.try_into().expect("chunks are PEER_ID_LEN long"))
    }

    pub fn len(&self) -> usize {
        self.0.len() / PEER_ID_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One parsed frame, borrowing the message it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Client→server: `peer` is the destination; server→client: the source.
    Transport {
        peer: &'a PeerId,
        payload: &'a [u8],
    },
    Close,
    HealthCheck,
    Auth {
        peer: &'a PeerId,
        signature: &'a [u8; 32],
        token_payload: &'a [u8],
    },
    AuthResponse {
        url: &'a str,
    },
    Subscribe(PeerIds<'a>),
    Unsubscribe(PeerIds<'a>),
    PeersOnline(PeerIds<'a>),
    PeersWentOffline(PeerIds<'a>),
}

/// Why a message is not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty or truncated frame")]
    Truncated,
    #[error("unsupported relay protocol version {0}")]
    Version(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("frame larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Parse one message.
pub fn parse(msg: &[u8]) -> Result<Frame<'_>, FrameError> {
    if msg.len() > MAX_MESSAGE {
        return Err(FrameError::TooLarge);
    }
    let [version, kind, body @ ..] = msg else {
        return Err(FrameError::Truncated);
    };
    if *version != VERSION {
        return Err(FrameError::Version(*version));
    }
    let ids = |name| {
        if body.len() % PEER_ID_LEN == 0 {
            Ok(PeerIds(body))
        } else {
            Err(FrameError::Malformed(name))
        }
    };
    Ok(match *kind {
        kind::TRANSPORT => {
            let (peer, payload) = split_id(body).ok_or(FrameError::Malformed("transport"))?;
            Frame::Transport { peer, payload }
        }
        kind::CLOSE => Frame::Close,
        kind::HEALTH_CHECK => Frame::HealthCheck,
        kind::AUTH => {
            let rest = body
                .strip_prefix(&AUTH_MAGIC)
                .ok_or(FrameError::Malformed("auth"))?;
            let (peer, payload) = split_id(rest).ok_or(FrameError::Malformed("auth"))?;
            let [AUTH_HMAC_SHA256, auth @ ..] = payload else {
                return Err(FrameError::Malformed("auth"));
            };
            if auth.len() < 32 {
                return Err(FrameError::Malformed("auth"));
            }
            let (signature, token_payload) = auth.split_at(32);
            Frame::Auth {
                peer,
                signature: signature.try_into().expect("32 bytes"),
                token_payload,
            }
        }
        kind::AUTH_RESPONSE => Frame::AuthResponse {
            url: std::str::from_utf8(body).map_err(|_| FrameError::Malformed("auth response"))?,
        },
        kind::SUBSCRIBE => Frame::Subscribe(ids("subscribe")?),
        kind::UNSUBSCRIBE => Frame::Unsubscribe(ids("unsubscribe")?),
        kind::PEERS_ONLINE => Frame::PeersOnline(ids("peers online")?),
        kind::PEERS_WENT_OFFLINE => Frame::PeersWentOffline(ids("peers offline")?),
        other => return Err(FrameError::UnknownType(other)),
    })
}

fn split_id(body: &[u8]) -> Option<(&PeerId, &[u8])> {
    if body.len() < PEER_ID_LEN {
        return None;
    }
    let (id, rest) = body.split_at(PEER_ID_LEN);
    Some((id.try_into().ok()?, rest))
}

/// What a Transport frame starts with, before the peer ID and the payload.
const TRANSPORT_HEADER: [u8; 2] = [VERSION, kind::TRANSPORT];

/// A Transport frame carrying `payload` to (from the relay: from) `peer`, as the parts the
/// WebSocket message is written from: the frame is never assembled on its own.
pub fn transport<'a>(peer: &'a PeerId, payload: &'a [u8]) -> [&'a [u8]; 3] {
    [&TRANSPORT_HEADER, peer, payload]
}

/// An Auth frame with an HMAC-SHA256 token.
pub fn auth(peer: &PeerId, signature: &[u8; 32], token_payload: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(2 + 4 + PEER_ID_LEN + 1 + 32 + token_payload.len());
    m.extend_from_slice(&[VERSION, kind::AUTH]);
    m.extend_from_slice(&AUTH_MAGIC);
    m.extend_from_slice(peer);
    m.push(AUTH_HMAC_SHA256);
    m.extend_from_slice(signature);
    m.extend_from_slice(token_payload.as_bytes());
    m
}

pub fn auth_response(url: &str) -> Vec<u8> {
    let mut m = vec![VERSION, kind::AUTH_RESPONSE];
    m.extend_from_slice(url.as_bytes());
    m
}

pub fn health_check() -> Vec<u8> {
    vec![VERSION, kind::HEALTH_CHECK]
}

pub fn close() -> Vec<u8> {
    vec![VERSION, kind::CLOSE]
}

fn id_frames(kind: u8, ids: &[PeerId]) -> Vec<Vec<u8>> {
    ids.chunks(MAX_IDS_PER_FRAME)
        .map(|chunk| {
            let mut m = Vec::with_capacity(2 + chunk.len() * PEER_ID_LEN);
            m.extend_from_slice(&[VERSION, kind]);
            for id in chunk {
                m.extend_from_slice(id);
            }
            m
        })
        .collect()
}

pub fn subscribe(ids: &[PeerId]) -> Vec<Vec<u8>> {
    id_frames(kind::SUBSCRIBE, ids)
}

pub fn unsubscribe(ids: &[PeerId]) -> Vec<Vec<u8>> {
    id_frames(kind::UNSUBSCRIBE, ids)
}

pub fn peers_online(ids: &[PeerId]) -> Vec<Vec<u8>> {
    id_frames(kind::PEERS_ONLINE, ids)
}

pub fn peers_went_offline(ids: &[PeerId]) -> Vec<Vec<u8>> {
    id_frames(kind::PEERS_WENT_OFFLINE, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_hash_the_key_string() {
        let id = peer_id("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=");
        assert_eq!(&id[..4], b"sha-");
        assert_eq!(id.len(), 36);
        assert_ne!(id, peer_id("TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="));
    }

    #[test]
    fn frames_round_trip() {
        let a = peer_id("a");
        let buf = transport(&a, b"wireguard").concat();
        assert_eq!(
            parse(&buf),
            Ok(Frame::Transport {
                peer: &a,
                payload: b"wireguard"
            })
        );
        let sig = [7u8; 32];
        let m = auth(&a, &sig, "1700000000");
        assert!(m.len() <= 212);
        assert_eq!(
            parse(&m),
            Ok(Frame::Auth {
                peer: &a,
                signature: &sig,
                token_payload: b"1700000000"
            })
        );
        assert_eq!(
            parse(&auth_response("rel://127.0.0.1:1")),
            Ok(Frame::AuthResponse {
                url: "rel://127.0.0.1:1"
            })
        );
        assert_eq!(parse(&health_check()), Ok(Frame::HealthCheck));
        assert_eq!(parse(&close()), Ok(Frame::Close));
        let ids: Vec<PeerId> = (0..300).map(|i| peer_id(&i.to_string())).collect();
        let frames = subscribe(&ids);
        assert_eq!(frames.len(), 2, "at most {MAX_IDS_PER_FRAME} IDs per frame");
        let mut back = Vec::new();
        for f in &frames {
            let Ok(Frame::Subscribe(list)) = parse(f) else {
                panic!("not a subscribe frame")
            };
            back.extend(list.iter().copied());
        }
        assert_eq!(back, ids);
        let online = peers_online(&ids[..1]);
        let Ok(Frame::PeersOnline(list)) = parse(&online[0]) else {
            panic!()
        };
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        assert_eq!(parse(&[]), Err(FrameError::Truncated));
        assert_eq!(parse(&[1]), Err(FrameError::Truncated));
        assert_eq!(parse(&[2, 3]), Err(FrameError::Version(2)));
        assert_eq!(
            parse(&[1, 1]),
            Err(FrameError::UnknownType(1)),
            "Hello is gone"
        );
        assert_eq!(
            parse(&[1, 3, 0, 0]),
            Err(FrameError::Malformed("transport"))
        );
        assert_eq!(parse(&[1, 8, 0]), Err(FrameError::Malformed("subscribe")));
        assert_eq!(
            parse(&[1, 6, 0x21, 0x12, 0xA4, 0x43]),
            Err(FrameError::Malformed("auth"))
        );
        assert_eq!(
            parse(&[1, 7, 0xff]),
            Err(FrameError::Malformed("auth response"))
        );
        assert_eq!(parse(&vec![1; MAX_MESSAGE + 1]), Err(FrameError::TooLarge));
        // Every short prefix of a valid auth frame fails cleanly.
        let full = auth(&peer_id("x"), &[0; 32], "1");
        for n in 0..full.len() - 1 {
            let _ = parse(&full[..n]);
        }
    }
}
