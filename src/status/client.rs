//! Read a running proxy's status endpoint, as `netbird-proxy status` and `wait` do.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::{PeerStatus, Snapshot};

/// Why the status endpoint could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nothing answered at the address.
    #[error(
        "cannot reach the status endpoint at {addr} (is the proxy running with --status-addr {addr}?): {source}"
    )]
    Connect {
        /// The status endpoint's address.
        addr: SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
    #[error("status endpoint at {addr}: {reason}")]
    /// Something answered, but not as a status endpoint does.
    Http {
        /// The status endpoint's address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    #[error("status endpoint at {addr} sent JSON this version does not understand: {source}")]
    /// The answer was not a status snapshot.
    Json {
        /// The status endpoint's address.
        addr: SocketAddr,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// A status answer is a few KiB; more is not a status endpoint.
const MAX_BODY: usize = 4 << 20;
/// Bound on one request, so a stalled endpoint cannot hold `wait` past its timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on the status endpoint: the HTTP status and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), ClientError> {
    get_within(addr, path, REQUEST_TIMEOUT).await
}

/// `get`, bounded by `limit`.
async fn get_within(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> Result<(u16, String), ClientError> {
    tokio::time::timeout(limit, get_unbounded(addr, path))
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Http {
                addr,
                reason: format!("no answer within {limit:?}"),
            })
        })
}

async fn get_unbounded(addr: SocketAddr, path: &str) -> Result<(u16, String), ClientError> {
    let http = |reason: String| ClientError::Http { addr, reason };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The full snapshot from `/status`.
pub async fn snapshot(addr: SocketAddr) -> Result<(Snapshot, String), ClientError> {
    let (code, body) = get(addr, "/status").await?;
    if code != 200 {
        return Err(ClientError::Http {
            addr,
            reason: format!("/status answered {code}"),
        });
    }
    let snap = serde_json::from_str(&body).map_err(|source| ClientError::Json { addr, source })?;
    Ok((snap, body))
}

/// Poll `path` (`/readyz`, `/healthz`) until it answers 200 or `timeout` passes; the error
/// is the last reason.
pub async fn wait_for(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let reason = match get_within(
            addr,
            path,
            left.clamp(Duration::from_millis(100), REQUEST_TIMEOUT),
        )
        .await
        {
            Ok((200, _)) => return Ok(()),
            Ok((_, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_string))
                .unwrap_or(body),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("not ready after {timeout:?}: {reason}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A readable report, like `netbird status`; `detail` adds a block per peer.
pub fn render(snap: &Snapshot, detail: bool) -> String {
    let mut out = String::new();
    let yes_no = |c: bool| if c { "Connected" } else { "Disconnected" };
    let _ = writeln!(
        out,
        "Mode: {}",
        match snap.mode {
            super::Mode::Static => "static WireGuard configuration",
            super::Mode::Netbird => "NetBird",
        }
    );
    match &snap.reason {
        None => {
            let _ = writeln!(out, "Ready: yes");
        }
        Some(r) => {
            let _ = writeln!(out, "Ready: no ({r})");
        }
    }
    if let Some(m) = &snap.management {
        let _ = writeln!(out, "Management: {} to {}", yes_no(m.connected), m.url);
    }
    if let Some(s) = &snap.signal {
        let _ = writeln!(out, "Signal: {}", yes_no(s.connected));
    }
    if let Some(r) = &snap.relay {
        let at = if r.url.is_empty() {
            String::new()
        } else {
            format!(" to {}", r.url)
        };
        let _ = writeln!(out, "Relay: {}{at}", yes_no(r.connected));
    }
    if let Some(l) = &snap.local {
        if !l.fqdn.is_empty() {
            let _ = writeln!(out, "FQDN: {}", l.fqdn);
        }
        let _ = writeln!(out, "Mesh IP: {}", l.addresses.join(", "));
        let _ = writeln!(out, "Public key: {}", l.public_key);
        let _ = writeln!(
            out,
            "Interface: userspace, WireGuard UDP port {}",
            l.wireguard_port
        );
    }
    let connected = snap
        .peers
        .iter()
        .filter(|p| p.status == "connected")
        .count();
    let _ = writeln!(out, "Peers: {connected}/{} connected", snap.peers.len());
    let _ = writeln!(out, "Engine restarts: {}", snap.engine_restarts);
    for l in &snap.listeners {
        let total: u64 = l.requests.values().sum();
        let _ = writeln!(
            out,
            "Listener {} {}: {} open, {total} requests",
            l.kind, l.addr, l.open_connections
        );
    }
    for r in &snap.routes {
        let via = match (&r.routing_peer, r.selected) {
            (_, false) => "not selected".to_string(),
            (Some(p), true) => format!("via {p}"),
            (None, true) => "no routing peer reachable".to_string(),
        };
        let kind = if r.exit_node { " (exit node)" } else { "" };
        let _ = writeln!(out, "Network {} {}{kind}: {via}", r.network, r.target);
    }
    if let Some(routing) = snap.routing.as_ref().filter(|r| !r.serving.is_empty()) {
        let _ = writeln!(out, "Routing for the mesh: {}", routing.serving.join("; "));
    }
    if snap.peers.is_empty() {
        return out;
    }
    out.push('\n');
    if detail {
        for p in &snap.peers {
            peer_detail(&mut out, p);
        }
        return out;
    }
    let rows: Vec<[String; 8]> = snap
        .peers
        .iter()
        .map(|p| {
            [
                if p.fqdn.is_empty() {
                    "-".into()
                } else {
                    p.fqdn.clone()
                },
                p.ip.clone(),
                p.status.clone(),
                p.connection.clone(),
                p.last_handshake_seconds.map_or("-".into(), ago),
                p.latency_ms.map_or("-".into(), |ms| format!("{ms:.1} ms")),
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
            ]
        })
        .collect();
    let head = [
        "PEER",
        "IP",
        "STATUS",
        "CONNECTION",
        "HANDSHAKE",
        "LATENCY",
        "RECEIVED",
        "SENT",
    ];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&head);
    for r in &rows {
        line(&r.each_ref().map(String::as_str));
    }
    out
}

fn peer_detail(out: &mut String, p: &PeerStatus) {
    let name = if p.fqdn.is_empty() {
        &p.public_key
    } else {
        &p.fqdn
    };
    let _ = writeln!(out, " {name}:");
    let _ = writeln!(out, "  Mesh IP: {}", p.ip);
    let _ = writeln!(out, "  Public key: {}", p.public_key);
    let _ = writeln!(out, "  Status: {}", p.status);
    let via = p
        .endpoint
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    let _ = writeln!(out, "  Connection type: {}{via}", p.connection);
    if let Some(i) = &p.ice {
        let _ = writeln!(
            out,
            "  ICE candidate (Local/Remote): {}/{}",
            i.local_type, i.remote_type
        );
        let _ = writeln!(
            out,
            "  ICE candidate endpoints (Local/Remote): {}/{}",
            i.local, i.remote
        );
        if let Some(l) = i.latency_ms {
            let _ = writeln!(out, "  ICE latency: {l:.1} ms");
        }
    }
    let _ = writeln!(
        out,
        "  Last WireGuard handshake: {}",
        p.last_handshake_seconds.map_or("never".into(), ago)
    );
    let _ = writeln!(
        out,
        "  Transfer (received/sent): {}/{}",
        bytes(p.rx_bytes),
        bytes(p.tx_bytes)
    );
    let latency = p
        .latency_ms
        .map_or("unknown".into(), |l| format!("{l:.1} ms"));
    let _ = writeln!(out, "  Latency: {latency}");
    out.push('\n');
}

fn ago(seconds: f64) -> String {
    format!("{}s ago", seconds.round() as u64)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
