//! Relay tokens as NetBird's management issues them: an ASCII decimal expiry and its
//! HMAC-SHA256 under a secret shared with the relay.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `(payload, signature)`: payload is the Unix expiry, signature base64(HMAC-SHA256(payload)).
pub fn issue(secret: &[u8], expires_unix: u64) -> (String, String) {
    let payload = expires_unix.to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (payload, signature)
}

/// Check a raw signature over `payload` and that the expiry is not past `now_unix`.
pub fn verify(secret: &[u8], payload: &[u8], signature: &[u8], now_unix: u64) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload);
    if mac.verify_slice(signature).is_err() {
        return false;
    }
    std::str::from_utf8(payload)
        .ok()
        .and_then(|p| p.parse::<u64>().ok())
        .is_some_and(|expiry| now_unix <= expiry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_until_expiry() {
        let (payload, sig) = issue(b"secret", 1000);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&sig)
            .unwrap();
        assert!(verify(b"secret", payload.as_bytes(), &raw, 999));
        assert!(verify(b"secret", payload.as_bytes(), &raw, 1000));
        assert!(
            !verify(b"secret", payload.as_bytes(), &raw, 1001),
            "expired"
        );
        assert!(
            !verify(b"other", payload.as_bytes(), &raw, 999),
            "wrong secret"
        );
        assert!(!verify(b"secret", b"2000", &raw, 999), "payload changed");
    }
}
