//! ICE credentials and session IDs as NetBird exchanges them in OFFER/ANSWER (ice.md §1.3):
//! `payload = "ufrag:pwd"` (`":"` for a relay-only peer), ufrag and pwd 16 and 32 letters, and
//! a 5-byte session ID in `Body.sessionId` that names one agent instance.

use rand::Rng;

/// Our or the remote's ufrag and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub ufrag: String,
    pub pwd: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password authenticates connectivity checks: never logged.
        write!(f, "Credentials({}:<redacted>)", self.ufrag)
    }
}

/// Why an OFFER/ANSWER payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("payload is not \"ufrag:pwd\"")]
    Shape,
    #[error("ufrag or pwd has a bad length or characters")]
    Value,
}

fn letters(n: usize) -> String {
    const SET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from(SET[rng.gen_range(0..SET.len())]))
        .collect()
}

impl Credentials {
    /// Fresh credentials, NetBird's shape: 16 and 32 letters.
    pub fn generate() -> Self {
        Self {
            ufrag: letters(16),
            pwd: letters(32),
        }
    }

    /// Parse an OFFER/ANSWER payload: `Ok(None)` for `":"` (the sender is relay-only).
    /// RFC 8445 bounds: ufrag 4–256 and pwd 22–256 ICE characters (pion checks the same).
    pub fn parse_payload(payload: &str) -> Result<Option<Self>, CredentialsError> {
        let (ufrag, pwd) = payload.split_once(':').ok_or(CredentialsError::Shape)?;
        if pwd.contains(':') {
            return Err(CredentialsError::Shape);
        }
        if ufrag.is_empty() && pwd.is_empty() {
            return Ok(None);
        }
        let ice_chars = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        };
        if !(4..=256).contains(&ufrag.len())
            || !(22..=256).contains(&pwd.len())
            || !ice_chars(ufrag)
            || !ice_chars(pwd)
        {
            return Err(CredentialsError::Value);
        }
        Ok(Some(Self {
            ufrag: ufrag.to_string(),
            pwd: pwd.to_string(),
        }))
    }

    /// The OFFER/ANSWER payload.
    pub fn payload(&self) -> String {
        format!("{}:{}", self.ufrag, self.pwd)
    }

    pub fn to_ice(&self) -> is::IceCreds {
        is::IceCreds {
            ufrag: self.ufrag.clone(),
            pass: self.pwd.clone(),
        }
    }
}

/// One agent instance's name on signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionId(pub [u8; 5]);

impl SessionId {
    pub fn generate() -> Self {
        Self(rand::thread_rng().r#gen())
    }

    /// From `Body.sessionId`; anything but 5 bytes is kept as absent (old clients send none).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        <[u8; 5]>::try_from(b).ok().map(Self)
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_relay_only_is_none() {
        let c = Credentials::generate();
        assert_eq!(c.ufrag.len(), 16);
        assert_eq!(c.pwd.len(), 32);
        assert!(
            c.ufrag
                .bytes()
                .chain(c.pwd.bytes())
                .all(|b| b.is_ascii_alphabetic())
        );
        assert_eq!(
            Credentials::parse_payload(&c.payload()),
            Ok(Some(c.clone()))
        );
        assert_eq!(Credentials::parse_payload(":"), Ok(None));
        assert!(
            !format!("{c:?}").contains(&c.pwd),
            "the password is never printed"
        );
    }

    #[test]
    fn bad_payloads_are_refused() {
        use CredentialsError::*;
        assert_eq!(Credentials::parse_payload(""), Err(Shape));
        assert_eq!(Credentials::parse_payload("abcd"), Err(Shape));
        assert_eq!(Credentials::parse_payload("a:b:c"), Err(Shape));
        assert_eq!(
            Credentials::parse_payload("abc:abcdefghijklmnopqrstuvwxyz"),
            Err(Value)
        );
        assert_eq!(Credentials::parse_payload("abcd:short"), Err(Value));
        assert_eq!(
            Credentials::parse_payload("ab d:abcdefghijklmnopqrstuvwxyz"),
            Err(Value)
        );
        assert_eq!(
            Credentials::parse_payload(":abcdefghijklmnopqrstuvwxyz"),
            Err(Value)
        );
        assert!(
            Credentials::parse_payload("abcd:abcdefghijklmnopqrstuv")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn session_ids_are_five_bytes() {
        assert_eq!(
            SessionId::from_bytes(&[1, 2, 3, 4, 5]).unwrap().to_string(),
            "0102030405"
        );
        assert!(SessionId::from_bytes(&[1, 2, 3]).is_none());
        assert!(SessionId::from_bytes(&[]).is_none());
    }
}
