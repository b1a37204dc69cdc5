//! Unix-socket listeners (`--socks unix:PATH`, `--http unix:PATH`): on a shared machine (a CI
//! runner, a build host) the socket file's permissions decide who may use the proxy, where a
//! loopback port is open to every local user.
//!
//! Binding is careful with what is already at the path: a socket nobody listens on (left by a
//! crash) is replaced; a live one means another proxy owns it (an error, never stolen); any
//! other file is refused (never deleted). The socket is made in a private (0700) directory
//! beside the path, given its mode, then renamed into place, so it is never reachable with the
//! process umask's looser mode. It is removed when the listener stops, if it is still ours.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::{Accept, UNIX_CLIENT};

/// Where a proxy listener listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket's path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<std::net::SocketAddr> {
        match self {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }
}

/// Why a Unix socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    #[error("{0} is in use by another process (something accepts connections on it)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A listening Unix socket that removes its file when dropped (if the file is still ours).
#[derive(Debug)]
pub struct UnixSocketListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of our socket file, to tell it from one put there since.
    id: (u64, u64),
}

impl UnixSocketListener {
    /// Listen at `path` with permissions `mode` (e.g. 0o600).
    pub fn bind(path: &Path, mode: u32) -> Result<Self, UnixBindError> {
        let io_err = |source| UnixBindError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(UnixBindError::NotASocket(path.to_path_buf()));
            }
            Ok(_) => {
                // Someone answering there owns it; a refused connection means a stale file.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(UnixBindError::InUse(path.to_path_buf())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| io_err(io::Error::other("not a file name")))?;
        // Bound (and listening) inside a directory only we can enter, given its mode there,
        // then moved into place: no one can connect while it has the umask's mode.
        let private = dir.join(format!(
            ".{}.{:016x}.d",
            name.to_string_lossy(),
            rand::random::<u64>()
        ));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&private)
                .map_err(io_err)?;
        }
        let temp = private.join("socket");
        let made = UnixListener::bind(&temp).and_then(|listener| {
            std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&temp, path)?;
            Ok(listener)
        });
        let _ = std::fs::remove_file(&temp);
        let _ = std::fs::remove_dir(&private);
        let listener = made.map_err(io_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocketListener {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Accept for UnixSocketListener {
    type Stream = UnixStream;
    async fn accept_client(&self) -> io::Result<(UnixStream, std::net::SocketAddr)> {
        let (client, _) = self.listener.accept().await?;
        Ok((client, UNIX_CLIENT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nbp-unix-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn binds_with_its_mode_replaces_a_stale_socket_and_removes_its_file() {
        let dir = temp_dir("bind");
        let path = dir.join("socks.sock");
        // A stale socket: bound, then its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = UnixSocketListener::bind(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live one is not taken.
        assert!(matches!(
            UnixSocketListener::bind(&path, 0o600),
            Err(UnixBindError::InUse(_))
        ));
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        drop(l);
        assert!(!path.exists(), "removed on drop");
        // A regular file is never replaced.
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            UnixSocketListener::bind(&path, 0o600),
            Err(UnixBindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_file_put_in_its_place_is_not_removed() {
        let dir = temp_dir("replaced");
        let path = dir.join("http.sock");
        let l = UnixSocketListener::bind(&path, 0o600).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(l);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
