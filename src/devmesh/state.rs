//! What a dev mesh remembers across restarts (`dev-mesh --state FILE`): management's key, the
//! relay token secret, the setup key and every registered peer. With it, a dev-mesh process can
//! be killed and started again — peers keep their addresses and names — and management and relay
//! can run as separate processes that share one secret.
//!
//! The file is text, one item per line, written 0600 by an atomic rename. The first process to
//! start creates it; concurrent first starts agree, because creation links the new file into
//! place only if none exists yet.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::control::envelope::{key_string, parse_key_string};
use crate::control::identity::create_private;

/// A registered peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    pub public_key: [u8; 32],
    pub ip: Ipv4Addr,
    pub fqdn: String,
}

/// Register `count` peers that never connect (`sim-1`, `sim-2`, ...), with random keys and the
/// first free overlay addresses; names and addresses already taken are skipped.
pub fn add_simulated(state: &mut DevMeshState, count: usize, domain: &str) {
    let mut used: std::collections::HashSet<Ipv4Addr> = state.peers.iter().map(|p| p.ip).collect();
    let mut addresses = (1usize..)
        .map(|n| Ipv4Addr::new(100, 64, (n / 250) as u8, (n % 250) as u8 + 1))
        .take(250 * 256 - 1);
    // A state file already holding them (a restarted dev mesh) gets only the difference.
    let count = count.saturating_sub(
        state
            .peers
            .iter()
            .filter(|p| p.fqdn.starts_with("sim-"))
            .count(),
    );
    let mut added = 0;
    let mut n = 0;
    while added < count {
        n += 1;
        let fqdn = format!("sim-{n}.{domain}");
        if state.peers.iter().any(|p| p.fqdn == fqdn) {
            continue;
        }
        let Some(ip) = addresses.by_ref().find(|ip| !used.contains(ip)) else {
            tracing::warn!("no overlay address left after {added} simulated peers");
            return;
        };
        used.insert(ip);
        let secret = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        state.peers.push(PeerEntry {
            public_key: boringtun::x25519::PublicKey::from(&secret).to_bytes(),
            ip,
            fqdn,
        });
        added += 1;
    }
}

/// The persistent part of a dev mesh.
#[derive(Clone, PartialEq, Eq)]
pub struct DevMeshState {
    pub management_key: [u8; 32],
    pub relay_secret: [u8; 32],
    pub setup_key: String,
    pub peers: Vec<PeerEntry>,
}

impl std::fmt::Debug for DevMeshState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevMeshState")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("dev-mesh state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dev-mesh state {path}:{line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("dev-mesh state {0} is readable by group or others (it holds secrets); chmod 600 it")]
    Exposed(PathBuf),
}

impl DevMeshState {
    /// Fresh secrets, no peers.
    pub fn new(setup_key: String) -> Self {
        Self {
            management_key: rand::random(),
            relay_secret: rand::random(),
            setup_key,
            peers: Vec::new(),
        }
    }

    /// Load `path`, or create it from `fresh` (the one the first process to get there wrote
    /// wins; the others load it).
    pub fn load_or_create(path: &Path, fresh: DevMeshState) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        match fs::metadata(path) {
            Ok(_) => return Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let tmp = fresh.write_temp(path).map_err(io)?;
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(fresh),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(io(e)),
        }
    }

    /// Replace the file with this state.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = self.write_temp(path).map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    }

    fn load(path: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        if fs::metadata(path).map_err(io)?.permissions().mode() & 0o077 != 0 {
            return Err(StateError::Exposed(path.to_path_buf()));
        }
        let text = fs::read_to_string(path).map_err(io)?;
        Self::parse(&text).map_err(|(line, reason)| StateError::Parse {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, (usize, String)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key32 = |v: &str, n: usize| -> Result<[u8; 32], (usize, String)> {
            b64.decode(v)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or((n, "not a base64 32-byte key".into()))
        };
        let (mut management_key, mut relay_secret, mut setup_key) = (None, None, None);
        let mut peers = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (item, rest) = line.split_once(' ').unwrap_or((line, ""));
            match item {
                "management-key" => management_key = Some(key32(rest, n)?),
                "relay-secret" => relay_secret = Some(key32(rest, n)?),
                "setup-key" => setup_key = Some(rest.to_string()),
                "peer" => {
                    let mut f = rest.split(' ');
                    let (Some(key), Some(ip), Some(fqdn), None) =
                        (f.next(), f.next(), f.next(), f.next())
                    else {
                        return Err((n, "expected `peer KEY IP FQDN`".into()));
                    };
                    peers.push(PeerEntry {
                        public_key: parse_key_string(key).map_err(|e| (n, e.to_string()))?,
                        ip: ip
                            .parse()
                            .map_err(|_| (n, format!("bad IPv4 address `{ip}`")))?,
                        fqdn: fqdn.to_string(),
                    });
                }
                other => return Err((n, format!("unknown item `{other}`"))),
            }
        }
        Ok(Self {
            management_key: management_key.ok_or((0, "no management-key".to_string()))?,
            relay_secret: relay_secret.ok_or((0, "no relay-secret".to_string()))?,
            setup_key: setup_key.ok_or((0, "no setup-key".to_string()))?,
            peers,
        })
    }

    /// Write a private temporary file next to `path`; returns its name.
    fn write_temp(&self, path: &Path) -> std::io::Result<PathBuf> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = create_private(&tmp)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        writeln!(
            f,
            "# netbird-proxy dev-mesh state. Holds secrets: keep it 0600."
        )?;
        writeln!(f, "management-key {}", b64.encode(self.management_key))?;
        writeln!(f, "relay-secret {}", b64.encode(self.relay_secret))?;
        writeln!(f, "setup-key {}", self.setup_key)?;
        for p in &self.peers {
            writeln!(f, "peer {} {} {}", key_string(&p.public_key), p.ip, p.fqdn)?;
        }
        f.sync_all()?;
        Ok(tmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nbp-devstate-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir.join("mesh.state")
    }

    #[test]
    fn created_once_then_loaded_with_peers() {
        let path = temp("roundtrip");
        let first = DevMeshState::load_or_create(&path, DevMeshState::new("KEY-1".into())).unwrap();
        // A second start with other fresh secrets loads the first's.
        let again = DevMeshState::load_or_create(&path, DevMeshState::new("KEY-2".into())).unwrap();
        assert!(again == first);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut with_peer = first.clone();
        with_peer.peers.push(PeerEntry {
            public_key: [7; 32],
            ip: Ipv4Addr::new(100, 64, 0, 2),
            fqdn: "alpha.mesh.test".into(),
        });
        with_peer.save(&path).unwrap();
        assert!(
            DevMeshState::load_or_create(&path, DevMeshState::new("x".into())).unwrap()
                == with_peer
        );
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn exposed_or_garbled_files_are_refused_with_the_line() {
        let path = temp("bad");
        DevMeshState::load_or_create(&path, DevMeshState::new("K".into())).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            DevMeshState::load_or_create(&path, DevMeshState::new("K".into())),
            Err(StateError::Exposed(_))
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("peer nonsense\n");
        fs::write(&path, text).unwrap();
        let e = DevMeshState::load_or_create(&path, DevMeshState::new("K".into())).unwrap_err();
        assert!(
            e.to_string().contains(":5: expected `peer KEY IP FQDN`"),
            "{e}"
        );
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn simulated_peers_get_distinct_names_addresses_and_keys_once() {
        let mut state = DevMeshState::new("KEY".into());
        state.peers.push(PeerEntry {
            public_key: [1; 32],
            ip: Ipv4Addr::new(100, 64, 0, 2),
            fqdn: "real.mesh.test".into(),
        });
        add_simulated(&mut state, 600, "mesh.test");
        assert_eq!(state.peers.len(), 601);
        let ips: std::collections::HashSet<_> = state.peers.iter().map(|p| p.ip).collect();
        let names: std::collections::HashSet<_> = state.peers.iter().map(|p| &p.fqdn).collect();
        let keys: std::collections::HashSet<_> = state.peers.iter().map(|p| p.public_key).collect();
        assert_eq!((ips.len(), names.len(), keys.len()), (601, 601, 601));
        assert!(state.peers[1..].iter().all(|p| p.fqdn.starts_with("sim-")));
        // A restarted dev mesh with the same state adds none again.
        add_simulated(&mut state, 600, "mesh.test");
        assert_eq!(state.peers.len(), 601);
    }
}
