//! What ordinary programs talk to: SOCKS5 and HTTP proxy listeners and port forwards, all
//! sharing one dialler (`dial`) that routes into the mesh or, when allowed, out of the host.

pub mod dial;
pub mod dns;
pub mod forward;
pub mod http;
mod relay;
pub mod socks5;

use std::fmt;

use subtle::ConstantTimeEq;

/// A user name and password for a proxy listener. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: Vec<u8>,
    pass: Vec<u8>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials({:?}, <redacted>)",
            String::from_utf8_lossy(&self.user)
        )
    }
}

impl Credentials {
    /// `USER:PASS`; the password may contain colons. Both parts must be 1–255 bytes (the limits
    /// of RFC 1929, so one pair serves SOCKS and HTTP alike).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (user, pass) = s
            .split_once(':')
            .ok_or_else(|| "expected USER:PASS".to_string())?;
        for (what, v) in [("user name", user), ("password", pass)] {
            if v.is_empty() || v.len() > 255 {
                return Err(format!("the {what} must be 1 to 255 bytes"));
            }
        }
        Ok(Self {
            user: user.as_bytes().to_vec(),
            pass: pass.as_bytes().to_vec(),
        })
    }

    /// Compare in constant time (for equal lengths), so timing does not leak the password.
    pub fn check(&self, user: &[u8], pass: &[u8]) -> bool {
        let user_ok = self.user.ct_eq(user);
        let pass_ok = self.pass.ct_eq(pass);
        (user_ok & pass_ok).into()
    }
}

impl std::str::FromStr for Credentials {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_check_and_redact() {
        let c = Credentials::parse("bob:pa:ss").unwrap();
        assert!(c.check(b"bob", b"pa:ss"));
        assert!(!c.check(b"bob", b"pa:sS"));
        assert!(!c.check(b"bo", b"pa:ss"));
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert!(Credentials::parse("nopass").is_err());
        assert!(Credentials::parse(":x").is_err());
        assert!(Credentials::parse("x:").is_err());
        assert!(Credentials::parse(&format!("u:{}", "p".repeat(256))).is_err());
    }
}
