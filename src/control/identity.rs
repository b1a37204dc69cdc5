//! The peer's identity: its WireGuard private key, kept in a state file so that a restart is the
//! same peer (same overlay IP, same name) to the management server.
//!
//! The file is created with mode 0600 inside a 0700 directory, written atomically (temporary
//! file + rename), and refused when group or others can read it: it holds a private key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use boringtun::x25519::StaticSecret;
use rand_core::OsRng;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// What the state file holds.
#[derive(Clone)]
pub struct Identity {
    pub private_key: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(<private key redacted>)")
    }
}

/// `$XDG_STATE_HOME/netbird-proxy/state`, else `~/.local/state/netbird-proxy/state`.
pub fn default_state_path() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("netbird-proxy").join("state")
}

impl Identity {
    /// Load the state file, or create it with a fresh key if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(IdentityError::Permissions {
                        path: path.to_owned(),
                        mode,
                    });
                }
                let text = fs::read_to_string(path).map_err(io)?;
                Self::parse(&text).map_err(|(line, message)| IdentityError::Parse {
                    path: path.to_owned(),
                    line,
                    message,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Identity {
                    private_key: StaticSecret::random_from_rng(OsRng).to_bytes(),
                };
                identity.write(path).map_err(io)?;
                Ok(identity)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut private_key = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| (i + 1, "expected `key = value`".to_string()))?;
            match key.trim() {
                "private_key" => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value.trim())
                        .ok()
                        .and_then(|v| <[u8; 32]>::try_from(v).ok())
                        .ok_or_else(|| (i + 1, "private_key is not a base64 key".to_string()))?;
                    private_key = Some(bytes);
                }
                other => return Err((i + 1, format!("unknown key `{other}`"))),
            }
        }
        let private_key = private_key.ok_or_else(|| (0, "no private_key".to_string()))?;
        Ok(Identity { private_key })
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
            // Only tighten a directory we may have just created; leave others' alone. One we
            // do not own (a container image's sticky, world-writable state directory, made
            // so that any uid a platform assigns can keep its state) stays as its owner set
            // it: the key file itself is 0600.
            if fs::metadata(dir)?.permissions().mode() & 0o077 != 0
                && dir.ends_with("netbird-proxy")
            {
                match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                    other => other?,
                }
            }
        }
        let tmp = path.with_extension("tmp");
        let mut f = create_private(&tmp)?;
        let key = base64::engine::general_purpose::STANDARD.encode(self.private_key);
        writeln!(
            f,
            "# netbird-proxy state: this peer's WireGuard private key. Keep it secret."
        )?;
        writeln!(f, "private_key = {key}")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    }
}

/// Create (or truncate) `path` readable and writable by its owner only.
pub(crate) fn create_private(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nbp-identity-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_private_and_reused() {
        let dir = temp_dir("create");
        let path = dir.join("netbird-proxy").join("state");
        let a = Identity::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode & 0o077, 0);
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.private_key, b.private_key, "same key after restart");
        assert!(!format!("{a:?}").contains(&key_text(&a)));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn key_text(i: &Identity) -> String {
        base64::engine::general_purpose::STANDARD.encode(i.private_key)
    }

    #[test]
    fn readable_by_others_is_refused_and_garbage_named() {
        let dir = temp_dir("perm");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        Identity::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load_or_create(&path).unwrap_err();
        assert!(matches!(e, IdentityError::Permissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "private_key = nope\n").unwrap();
        let e = Identity::load_or_create(&path).unwrap_err();
        assert!(e.to_string().contains(":1: private_key"), "{e}");
        assert!(!e.to_string().contains("nope"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
