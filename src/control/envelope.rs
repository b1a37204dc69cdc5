//! NetBird's message envelope: NaCl `crypto_box` (X25519 + XSalsa20-Poly1305) keyed with the
//! WireGuard keys, laid out as `[nonce 24][tag 16][ciphertext]`.
//!
//! Management and signal both carry protobuf messages sealed this way; `seal_message` and
//! `open_message` do the encoding around the box.

use base64::Engine as _;
use crypto_box::aead::{Aead, AeadCore};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use rand_core::OsRng;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Why an envelope could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("sealed message too short ({0} bytes)")]
    TooShort(usize),
    #[error("sealed message does not authenticate (wrong key or corrupted)")]
    Unauthentic,
    #[error("sealed message is not a valid protobuf message: {0}")]
    Decode(String),
    #[error("`{0}` is not a base64 WireGuard key")]
    BadKey(String),
}

/// Seal `plaintext` from `ours` (private) to `theirs` (public).
pub fn seal(plaintext: &[u8], ours: &[u8; 32], theirs: &[u8; 32]) -> Vec<u8> {
    let b = SalsaBox::new(&PublicKey::from(*theirs), &SecretKey::from(*ours));
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    let sealed = b
        .encrypt(&nonce, plaintext)
        .expect("XSalsa20-Poly1305 encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Open a body sealed by `theirs` (public) to `ours` (private).
pub fn open(body: &[u8], ours: &[u8; 32], theirs: &[u8; 32]) -> Result<Vec<u8>, EnvelopeError> {
    if body.len() < NONCE_LEN + TAG_LEN {
        return Err(EnvelopeError::TooShort(body.len()));
    }
    let b = SalsaBox::new(&PublicKey::from(*theirs), &SecretKey::from(*ours));
    let (nonce, sealed) = body.split_at(NONCE_LEN);
    b.decrypt(crypto_box::Nonce::from_slice(nonce), sealed)
        .map_err(|_| EnvelopeError::Unauthentic)
}

/// Seal a protobuf message.
pub fn seal_message<M: prost::Message>(msg: &M, ours: &[u8; 32], theirs: &[u8; 32]) -> Vec<u8> {
    seal(&msg.encode_to_vec(), ours, theirs)
}

/// Open a sealed protobuf message.
pub fn open_message<M: prost::Message + Default>(
    body: &[u8],
    ours: &[u8; 32],
    theirs: &[u8; 32],
) -> Result<M, EnvelopeError> {
    let plain = open(body, ours, theirs)?;
    M::decode(plain.as_slice()).map_err(|e| EnvelopeError::Decode(e.to_string()))
}

/// The public key of a private key, as raw bytes.
pub fn public_key_of(private: &[u8; 32]) -> [u8; 32] {
    *SecretKey::from(*private).public_key().as_bytes()
}

/// A key as NetBird writes it: padded standard base64 (44 characters).
pub fn key_string(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parse a key string.
pub fn parse_key_string(s: &str) -> Result<[u8; 32], EnvelopeError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| EnvelopeError::BadKey(s.chars().take(64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn keypair(seed: u8) -> ([u8; 32], [u8; 32]) {
        let private = [seed; 32];
        (private, public_key_of(&private))
    }

    #[test]
    fn round_trip_and_tamper() {
        let (a, a_pub) = keypair(1);
        let (b, b_pub) = keypair(2);
        let body = seal(b"hello netbird", &a, &b_pub);
        assert_eq!(body.len(), 24 + 16 + 13);
        assert_eq!(open(&body, &b, &a_pub).unwrap(), b"hello netbird");
        let mut bad = body.clone();
        bad[30] ^= 1;
        assert_eq!(open(&bad, &b, &a_pub), Err(EnvelopeError::Unauthentic));
        assert_eq!(
            open(&body[..39], &b, &a_pub),
            Err(EnvelopeError::TooShort(39))
        );
        let (c, _) = keypair(3);
        assert_eq!(open(&body, &c, &a_pub), Err(EnvelopeError::Unauthentic));
    }

    #[test]
    fn key_strings() {
        let (_, public) = keypair(7);
        let s = key_string(&public);
        assert_eq!(s.len(), 44);
        assert_eq!(parse_key_string(&s).unwrap(), public);
        assert!(parse_key_string("abc").is_err());
    }

    /// Compatibility with an independent implementation: PyNaCl (libsodium) opens what we seal
    /// and seals what we open, with the nonce-prefixed layout NetBird uses.
    #[test]
    fn interoperates_with_pynacl() {
        let (a, a_pub) = keypair(11);
        let (b, b_pub) = keypair(22);
        let ours = seal(b"from rust", &a, &b_pub);
        let hex = |v: &[u8]| v.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let script = r#"
import sys
from nacl.public import Box, PrivateKey, PublicKey
a_pub, b_priv, sealed = (bytes.fromhex(x) for x in sys.argv[1:4])
b_box = Box(PrivateKey(b_priv), PublicKey(a_pub))
assert bytes(PrivateKey(b_priv).public_key) == bytes.fromhex(sys.argv[4]), "public key derivation"
print(b_box.decrypt(sealed[24:], sealed[:24]).decode())
print(b_box.encrypt(b"from python").hex())
"#;
        let out = Command::new("python3")
            .args([
                "-c",
                script,
                &hex(&a_pub),
                &hex(&b),
                &hex(&ours),
                &hex(&b_pub),
            ])
            .output()
            .expect("python3 with PyNaCl (tests/run.sh installs it)");
        assert!(
            out.status.success(),
            "PyNaCl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("from rust"));
        let line = lines.next().expect("a sealed line");
        let theirs: Vec<u8> = (0..line.len() / 2)
            .map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(open(&theirs, &a, &b_pub).unwrap(), b"from python");
    }
}
