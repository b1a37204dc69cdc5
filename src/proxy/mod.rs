//! What ordinary programs talk to: SOCKS5 and HTTP proxy listeners and port forwards, all
//! sharing one dialler (`dial`) that routes into the mesh or, when allowed, out of the host.

pub mod access;
pub mod config;
pub mod admission;
pub mod dial;
pub mod forward;
pub mod http;
pub mod mixed;
pub(crate) mod relay;
pub mod socks5;
pub mod udp;
pub mod unix;

pub use config::{Expose, Forward};
pub use unix::ListenAddr;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::status::ListenerMetrics;

/// Refusals answered at once; beyond this many in flight, a refused client is just closed.
const REFUSALS_IN_FLIGHT: usize = 64;
/// Bound on answering one refused client.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections a listener's kernel queue holds before we accept them. std's (and so
/// `TcpListener::bind`'s) 128 overflowed when 200 clients connected at once: the kernel dropped
/// SYNs and those clients waited a 1 s retransmission. The kernel caps it at `somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener for clients on `addr`, with a backlog for bursts of clients.
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What a client of a proxy listener is connected over: TCP, or a Unix socket.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// A Unix socket: its HTTP clients (`curl --unix-socket`) send origin-form requests, which
    /// go to their Host, as Docker's socket users expect.
    const UNIX: bool;
    /// The address the client reached us at (where a UDP association's relay socket is
    /// bound); None over a Unix socket, which has no UDP counterpart.
    fn local_ip_addr(&self) -> Option<SocketAddr>;
}

impl ClientStream for TcpStream {
    const UNIX: bool = false;
    fn local_ip_addr(&self) -> Option<SocketAddr> {
        self.local_addr().ok()
    }
}

impl ClientStream for UnixStream {
    const UNIX: bool = true;
    fn local_ip_addr(&self) -> Option<SocketAddr> {
        None
    }
}

/// Where a Unix-socket client is said to come from in logs and counters: it has no address,
/// and the socket file's permissions already decided who may connect.
pub const UNIX_CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A listener proxy clients arrive on.
pub(crate) trait Accept: Send + 'static {
    type Stream: ClientStream;
    /// The next client and where it comes from.
    fn accept_client(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_client(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (client, from) = self.accept().await?;
        let _ = client.set_nodelay(true);
        Ok((client, from))
    }
}

/// Accept on `listener` until `cancel` fires; each admitted client runs `handle` in a task of
/// its own that the same cancellation stops, so a shutdown ends every connection of the
/// listener. Admission follows `limits` (see `admission`): a client over the caps gets
/// `refuse` (a protocol-level "no"), one evicted during its handshake is closed. `handle`
/// calls `Ticket::established` once the client's handshake is complete. `metrics` counts open
/// connections, refusals and evictions.
pub(crate) async fn serve_clients<L, F, Fut, R, RFut>(
    listener: L,
    metrics: Arc<ListenerMetrics>,
    limits: &admission::Limits,
    cancel: CancellationToken,
    handle: F,
    refuse: R,
) where
    L: Accept,
    F: Fn(L::Stream, SocketAddr, Arc<admission::Ticket>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(L::Stream) -> RFut,
    RFut: Future<Output = ()> + Send + 'static,
{
    let gate = admission::Gate::new(limits);
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_IN_FLIGHT));
    loop {
        let (client, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept_client() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        debug!(%from, "accepted");
        // Inline on purpose: while a full listener waits for a slot (at most 250 ms), the
        // backlog waits in the kernel rather than as tasks here (admission.rs says why).
        let admitted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = gate.admit() => a,
        };
        let ticket = match admitted {
            Ok(t) => Arc::new(t),
            Err(admission::Refusal::Full) => {
                metrics.count("refused");
                debug!(%from, "connection limit reached; refusing");
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let answer = refuse(client);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await;
                    });
                }
                continue;
            }
        };
        let evicted = ticket.evicted.clone();
        let work = handle(client, from, ticket);
        let cancel = cancel.clone();
        let open = metrics.open();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _open = open;
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = evicted.cancelled() => {
                    metrics.count("evicted");
                    debug!(%from, "evicted during its handshake: the listener is full");
                }
                _ = work => {}
            }
        });
    }
}

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

    /// `user:pass` percent-encoded for a URL's user info (RFC 3986: all but unreserved
    /// characters escaped).
    pub fn url_userinfo(&self) -> String {
        let enc = |b: &[u8]| {
            b.iter()
                .map(|&c| {
                    if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                        (c as char).to_string()
                    } else {
                        format!("%{c:02X}")
                    }
                })
                .collect::<String>()
        };
        format!("{}:{}", enc(&self.user), enc(&self.pass))
    }

    /// RFC 1929's username/password request (VER 1), for a SOCKS5 client of ours.
    pub fn socks5_auth_request(&self) -> Vec<u8> {
        let mut req = Vec::with_capacity(3 + self.user.len() + self.pass.len());
        req.push(1);
        req.push(self.user.len() as u8);
        req.extend_from_slice(&self.user);
        req.push(self.pass.len() as u8);
        req.extend_from_slice(&self.pass);
        req
    }

    /// Compare in constant time (for equal lengths), so timing does not leak the password.
    pub(crate) fn check(&self, user: &[u8], pass: &[u8]) -> bool {
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

    /// 300 clients connecting at once before any is accepted all complete their handshake
    /// (with std's backlog of 128 the kernel dropped the SYNs beyond it: a 1 s retransmission,
    /// far beyond the half second each connect may take here).
    #[tokio::test]
    async fn a_burst_of_clients_fits_in_the_listen_backlog() {
        let listener = listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = tokio::task::spawn_blocking(move || {
            (0..300)
                .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let failed = clients.iter().filter(|c| c.is_err()).count();
        assert_eq!(failed, 0, "clients that could not connect");
        drop(listener);
    }

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
