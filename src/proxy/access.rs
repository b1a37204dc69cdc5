//! The access log (`--access-log`): one line when a client connection, a UDP association or
//! flow, or an HTTP request ends, with what an operator asks afterwards: which listener, which
//! client, the target as asked and as reached, over which path (a mesh peer `direct` or
//! `relayed`, or `host` for a destination outside the mesh), bytes each way, how long, and
//! the result (SOCKS5 reply code, HTTP status, `ok`/`error`).
//!
//! The lines are log events of target `netbird_proxy::access`, so they share the other logs'
//! output and format (`--log-format json` gives JSON lines); logging turns the target off
//! unless `--access-log` is given.

use std::fmt::Display;
use std::net::SocketAddr;

use tokio::time::Instant;

use crate::status::ListenerMetrics;

/// The log target of access lines.
pub const TARGET: &str = "netbird_proxy::access";

/// One finished connection, association, flow or request.
pub struct Entry<'a> {
    pub listener: &'a ListenerMetrics,
    pub client: SocketAddr,
    /// As the client named it (a name stays a name).
    pub target: &'a (dyn Display + Sync),
    /// The address actually reached, once connected.
    pub resolved: Option<SocketAddr>,
    /// `direct`, `relayed` (a mesh peer's path), `host` (outside the mesh); empty when no
    /// connection was made.
    pub path: &'static str,
    pub up: u64,
    pub down: u64,
    pub started: Instant,
    pub result: &'a str,
}

impl Entry<'_> {
    /// Write the line (nothing when the access log is off).
    pub fn log(&self) {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let resolved = self
            .resolved
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        let path = if self.path.is_empty() { "-" } else { self.path };
        tracing::info!(
            target: TARGET,
            kind = self.listener.kind,
            listener = %self.listener.address(),
            client = %self.client,
            target = %self.target,
            resolved = %resolved,
            path,
            bytes_up = self.up,
            bytes_down = self.down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            result = self.result,
            "access"
        );
    }
}
