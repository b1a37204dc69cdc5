//! `netbird-proxy nc HOST PORT`: standard input and output joined to one TCP connection into the
//! mesh, for `ssh -o ProxyCommand='netbird-proxy nc %h %p' host`, git over ssh and scp.
//!
//! The connection goes through a running proxy's SOCKS5 listener (found through its status
//! endpoint), or, with none running, this process joins the mesh itself and dials through the
//! library's [`Peer::dial`](netbird_proxy::Peer::dial). Either way the name is resolved as for
//! any client (mesh names, NetBird DNS).
//!
//! Like OpenBSD's nc: end of input half-closes the connection and output goes on until the
//! far end closes; a failed connection is one line on stderr and exit status 1.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use netbird_proxy::config::Credentials;

use super::RunArgs;

/// How long the status endpoint of a running proxy has to answer.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// Why the connection could not be made, in words nc users know.
#[derive(Debug, thiserror::Error)]
pub enum NcError {
    #[error("cannot reach the proxy at {0}: {1}")]
    Proxy(SocketAddr, io::Error),
    #[error("the proxy at {0} did not speak SOCKS5")]
    NotSocks(SocketAddr),
    #[error("the proxy at {0} wants a user name and password (--socks-auth or NB_SOCKS_AUTH)")]
    AuthRequired(SocketAddr),
    #[error("the proxy at {0} refused the user name and password")]
    AuthRefused(SocketAddr),
    #[error("connect to {host} port {port} (tcp) failed: {reason}")]
    Connect {
        host: String,
        port: u16,
        reason: &'static str,
    },
    #[error("{0} is not a host name or address")]
    BadHost(String),
    #[error(
        "the proxy at {0} belongs to another user (uid {1}); give its address with --status-addr \
         only if you trust it"
    )]
    NotOurs(SocketAddr, u32),
}

/// The SOCKS5 listener of a proxy running on this machine, from its status endpoint at
/// `status`; None when nothing answers there or it serves no SOCKS5. With `trusted` false (the
/// default address, not one the user gave), a listener another user owns is refused: anyone on
/// a shared host could answer on the default port and collect our traffic and credentials.
pub async fn running_proxy(
    status: SocketAddr,
    trusted: bool,
) -> Result<Option<SocketAddr>, NcError> {
    let Some(socks) = find_socks(status).await else {
        return Ok(None);
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !trusted && me != 0 {
        for addr in [status, socks] {
            // Listening on that address, or on every address of its family.
            let any = SocketAddr::new(
                match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                },
                addr.port(),
            );
            let owner = listener_uid(addr).or_else(|| listener_uid(any));
            if let Some(owner) = owner.filter(|&u| u != me && u != 0) {
                return Err(NcError::NotOurs(addr, owner));
            }
        }
    }
    Ok(Some(socks))
}

/// The owner of the TCP socket listening on `addr` (from /proc/net/tcp or tcp6), if found.
fn listener_uid(addr: SocketAddr) -> Option<u32> {
    let (file, want) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let words: String = a
                .ip()
                .octets()
                .chunks(4)
                .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            ("/proc/net/tcp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let table = std::fs::read_to_string(file).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local address, state 0A (LISTEN), uid.
        (f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(7)?.parse().ok())
            .flatten()
    })
}

async fn find_socks(status: SocketAddr) -> Option<SocketAddr> {
    let (snap, _) =
        tokio::time::timeout(STATUS_WAIT, netbird_proxy::status::client::snapshot(status))
            .await
            .ok()?
            .ok()?;
    snap.listeners
        .iter()
        .filter(|l| l.kind == "socks5" || l.kind == "proxy")
        .find_map(|l| l.addr.parse::<SocketAddr>().ok())
        .map(|a| {
            // A listener on every address is reached on loopback.
            if a.ip().is_unspecified() {
                let lo = if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                SocketAddr::new(lo, a.port())
            } else {
                a
            }
        })
}

/// CONNECT to `host`:`port` through the SOCKS5 listener at `socks`.
pub async fn connect(
    socks: SocketAddr,
    auth: Option<&Credentials>,
    host: &str,
    port: u16,
) -> Result<TcpStream, NcError> {
    let proxy = |e| NcError::Proxy(socks, e);
    let mut s = TcpStream::connect(socks).await.map_err(proxy)?;
    let _ = s.set_nodelay(true);
    // With credentials, both "none" and user/password are offered: the proxy picks.
    if auth.is_some() {
        s.write_all(&[5, 2, 0, 2]).await.map_err(proxy)?;
    } else {
        s.write_all(&[5, 1, 0]).await.map_err(proxy)?;
    }
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.map_err(proxy)?;
    match choice {
        [5, 0] => {}
        [5, 2] => {
            let creds = auth.ok_or(NcError::AuthRequired(socks))?;
            s.write_all(&creds.socks5_auth_request())
                .await
                .map_err(proxy)?;
            let mut status = [0u8; 2];
            s.read_exact(&mut status).await.map_err(proxy)?;
            if status[1] != 0 {
                return Err(NcError::AuthRefused(socks));
            }
        }
        [5, 0xff] if auth.is_none() => return Err(NcError::AuthRequired(socks)),
        [5, 0xff] => return Err(NcError::AuthRefused(socks)),
        _ => return Err(NcError::NotSocks(socks)),
    }
    s.write_all(&connect_request(host, port)?)
        .await
        .map_err(proxy)?;
    // VER REP RSV ATYP, then the bound address (skipped) and port.
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.map_err(proxy)?;
    if head[0] != 5 {
        return Err(NcError::NotSocks(socks));
    }
    if head[1] != 0 {
        return Err(NcError::Connect {
            host: host.to_string(),
            port,
            reason: reply_reason(head[1]),
        });
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await.map_err(proxy)?;
            usize::from(len[0]) + 2
        }
        _ => return Err(NcError::NotSocks(socks)),
    };
    let mut bound = [0u8; 258];
    s.read_exact(&mut bound[..rest]).await.map_err(proxy)?;
    Ok(s)
}

/// A CONNECT request for `host` (an IP or a name, sent as a name for the proxy to resolve).
fn connect_request(host: &str, port: u16) -> Result<Vec<u8>, NcError> {
    let mut req = vec![5, 1, 0];
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            req.push(1);
            req.extend_from_slice(&ip.octets());
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            req.push(4);
            req.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            if host.is_empty() || host.len() > 255 {
                return Err(NcError::BadHost(host.to_string()));
            }
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    Ok(req)
}

/// What a SOCKS5 reply code means, worded as nc words the system's errors.
fn reply_reason(code: u8) -> &'static str {
    match code {
        1 => "General failure",
        2 => "Not allowed by the proxy's policy",
        3 => "Network is unreachable",
        4 => "No route to host",
        5 => "Connection refused",
        6 => "Connection timed out",
        7 => "Command not supported",
        8 => "Address type not supported",
        _ => "Unknown error",
    }
}

/// Where `status` and `wait` look for a running proxy unless told.
const DEFAULT_STATUS: u16 = 9099;
/// How long the peer nc joined with gets to stop after the session.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The session's exit status: 0 when the far end closed after a session, 1 when the
/// connection could not be made, 2 for bad options.
pub async fn run(run: RunArgs, ready_timeout: Duration, host: &str, port: u16) -> i32 {
    // An address the user gave is trusted; the default one is checked (see running_proxy).
    let trusted = run.status_addr.is_some();
    let status = run
        .status_addr
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_STATUS)));
    let (auth, _) = match run.credentials() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netbird-proxy nc: {e}");
            return 2;
        }
    };
    match running_proxy(status, trusted).await {
        Ok(Some(socks)) => return through_proxy(socks, auth.as_ref(), host, port).await,
        Ok(None) => {}
        Err(e) => {
            eprintln!("netbird-proxy nc: {e}");
            return 1;
        }
    }
    if run.setup_key.is_none() && run.wg_config.is_none() {
        eprintln!(
            "netbird-proxy nc: no proxy answers at {status} (--status-addr), and no \
             --setup-key or --wg-config to join the mesh with"
        );
        return 1;
    }
    // Our own peer, serving only us: no listener, the connection made in this process.
    let mut own = run;
    own.socks.clear();
    own.http.clear();
    own.proxy.clear();
    own.forward.clear();
    own.expose.clear();
    own.status_addr = None;
    let builder = match super::run::builder(&own) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("netbird-proxy nc: {e}");
            return 2;
        }
    };
    let peer = match builder.ready_timeout(ready_timeout).start().await {
        Ok(p) => p,
        Err(netbird_proxy::Error::NotReady { reason, .. }) => {
            eprintln!(
                "netbird-proxy nc: not connected to the mesh after {ready_timeout:.1?}: {reason}"
            );
            return 1;
        }
        Err(e) => {
            eprintln!("netbird-proxy nc: {e}");
            return 1;
        }
    };
    let code = match peer.dial(host, port).await {
        Ok(conn) => session(pump(conn, tokio::io::stdin(), tokio::io::stdout()).await),
        Err(e) => {
            eprintln!("netbird-proxy nc: connect to {host} port {port} (tcp) failed: {e}");
            1
        }
    };
    let _ = tokio::time::timeout(STOP_WAIT, peer.stop()).await;
    code
}

/// The session through a running proxy's SOCKS5 listener.
async fn through_proxy(
    socks: SocketAddr,
    auth: Option<&Credentials>,
    host: &str,
    port: u16,
) -> i32 {
    match connect(socks, auth, host, port).await {
        Ok(conn) => session(pump(conn, tokio::io::stdin(), tokio::io::stdout()).await),
        Err(e) => {
            eprintln!("netbird-proxy nc: {e}");
            1
        }
    }
}

/// A session's end as an exit status.
fn session(result: io::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("netbird-proxy nc: {e}");
            1
        }
    }
}

/// Copy `input` to the connection and the connection to `output` until the far end closes.
/// End of input half-closes the connection (the far end sees EOF and can still answer), as
/// scp and git over ssh need.
pub async fn pump<C, I, O>(conn: C, mut input: I, mut output: O) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let (mut from_far, mut to_far) = tokio::io::split(conn);
    let upload = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                to_far.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            to_far.write_all(&buf[..n]).await?;
        }
    };
    let download = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_far.read(&mut buf).await?;
            if n == 0 {
                output.flush().await?;
                return Ok::<_, io::Error>(());
            }
            output.write_all(&buf[..n]).await?;
            output.flush().await?;
        }
    };
    tokio::pin!(upload, download);
    // The far end closing ends the session, whether or not input has ended; an upload error
    // (the far end reset) ends it too.
    let mut uploading = true;
    loop {
        tokio::select! {
            r = &mut download => return r,
            r = &mut upload, if uploading => {
                r?;
                uploading = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_listening_socket_is_read_from_proc() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(bind) else {
                continue; // no IPv6 here
            };
            assert_eq!(listener_uid(l.local_addr().unwrap()), Some(me), "{bind}");
        }
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        assert_eq!(listener_uid(addr), None);
    }

    #[test]
    fn requests_send_names_for_the_proxy_to_resolve() {
        assert_eq!(
            connect_request("db.mesh", 22).unwrap(),
            [&[5, 1, 0, 3, 7][..], b"db.mesh", &[0, 22]].concat()
        );
        assert_eq!(
            connect_request("100.64.0.2", 22).unwrap(),
            vec![5, 1, 0, 1, 100, 64, 0, 2, 0, 22]
        );
        let v6 = connect_request("[fd64::2]", 22).unwrap();
        assert_eq!((v6[3], v6.len()), (4, 4 + 16 + 2));
        assert!(connect_request("", 22).is_err());
        assert!(connect_request(&"a".repeat(256), 22).is_err());
    }
}
