//! `netbird-proxy [options]`: the peer with its listeners until SIGTERM or SIGINT; and the
//! translation of the options into a [`PeerBuilder`], which `exec` and `nc` share.

use std::process::ExitCode;
use std::time::Duration;

use netbird_proxy::{Error, Peer, PeerBuilder, WireGuardConfig};
use tokio_util::sync::CancellationToken;

use super::RunArgs;
use super::process::spawn_signal_handler;

/// The options as a builder; `Err` is the message for a bad option (exit status 2).
pub fn builder(run: &RunArgs) -> Result<PeerBuilder, String> {
    let (socks_auth, http_auth) = run.credentials()?;
    let mut b = Peer::builder();
    if let Some(path) = &run.wg_config {
        b = b.wireguard(WireGuardConfig::load(path).map_err(|e| e.to_string())?);
    } else {
        b = b
            .management_url(&run.management_url)
            .state_file(
                run.state
                    .clone()
                    .unwrap_or_else(netbird_proxy::default_state_path),
            )
            .wireguard_port(run.wg_port)
            .ice(!run.force_relay)
            .networks(&run.networks_select, &run.networks_deselect)
            .client_routes(!run.disable_client_routes)
            .server_routes(!run.disable_server_routes)
            .route_to_host(run.route_to_host)
            .lazy_connections(run.lazy_connections)
            .lazy_inactivity(run.lazy_inactivity);
        if let Some(key) = &run.setup_key {
            b = b.setup_key(key);
        }
        if let Some(name) = &run.hostname {
            b = b.hostname(name);
        }
        for peer in &run.force_relay_peer {
            b = b.force_relay_peer(peer);
        }
    }
    for l in &run.socks {
        b = b.socks(l.clone());
    }
    for l in &run.http {
        b = b.http(l.clone());
    }
    for a in &run.proxy {
        b = b.proxy(*a);
    }
    for f in &run.forward {
        b = b.forward(f.clone());
    }
    for e in &run.expose {
        b = b.expose(*e);
    }
    if let Some(c) = socks_auth {
        b = b.socks_auth(c);
    }
    if let Some(c) = http_auth {
        b = b.http_auth(c);
    }
    if let Some(addr) = run.status_addr {
        b = b.status_endpoint(addr);
    }
    let no_direct = std::env::var("NB_NO_DIRECT")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes" | "on"));
    Ok(b.unix_mode(run.unix_mode)
        .mesh_only(run.mesh_only || no_direct)
        .connect_timeout(run.connect_timeout)
        .tcp_congestion(run.tcp_congestion)
        .tcp_buffer_budget(run.tcp_buffers_mib.saturating_mul(1024 * 1024))
        .max_buffer((run.max_buffer_mib as usize).saturating_mul(1024 * 1024))
        .max_connections(run.max_connections as usize)
        .max_connections_per_listener(run.max_connections_per_listener as usize)
        .handshake_timeout(run.handshake_timeout)
        .idle_timeout(Some(run.idle_timeout).filter(|d| !d.is_zero()))
        .udp_idle_timeout(run.udp_timeout)
        .ready_peers(run.ready_peers))
}

/// Exit status 2 for what the user must change (options, files, a refused login), 1 for the
/// rest.
pub fn exit_code(e: &Error) -> ExitCode {
    match e {
        Error::Config(_) | Error::LoginRefused(_) | Error::StatusEndpoint { .. } => {
            ExitCode::from(2)
        }
        _ => ExitCode::from(1),
    }
}

/// The message for a failed start or run, naming the option at fault where there is one.
pub fn message(e: &Error) -> String {
    match e {
        Error::StatusEndpoint { addr, reason } => {
            format!("cannot listen on {addr} for --status-addr: {reason}")
        }
        e => e.to_string(),
    }
}

/// A listener beyond loopback without authentication would hand the mesh to anyone who
/// reaches it: refuse to start (exit 2) unless `--allow-unauthenticated` says so.
pub fn refuse_open_listeners(run: &RunArgs) -> Result<(), ExitCode> {
    let open = run.unauthenticated_exposure();
    if open.is_empty() {
        return Ok(());
    }
    eprintln!(
        "netbird-proxy: refusing to listen beyond this machine without authentication: {}; \
         or give --allow-unauthenticated if only trusted hosts can reach it",
        open.join("; ")
    );
    Err(ExitCode::from(2))
}

/// The default command.
pub async fn run(run: RunArgs) -> ExitCode {
    if let Err(code) = refuse_open_listeners(&run) {
        return code;
    }
    // A peer with no listener is still a peer: other peers reach it (it answers ping), and it
    // is what a routing peer or exit node starts as. Said once, so a forgotten flag is seen.
    if run.socks.is_empty()
        && run.http.is_empty()
        && run.proxy.is_empty()
        && run.forward.is_empty()
        && run.expose.is_empty()
    {
        tracing::info!(
            "no --socks, --http, --forward or --expose: this peer serves nothing locally and \
             is reachable in the mesh only"
        );
    }
    let builder = match builder(&run) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    let peer = match builder.on_ready(|ready| eprintln!("{ready}")).spawn().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("netbird-proxy: {}", message(&e));
            return exit_code(&e);
        }
    };
    let result = tokio::select! {
        _ = cancel.cancelled() => peer.stop().await,
        r = peer.wait() => r,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbird-proxy: {}", message(&e));
            exit_code(&e)
        }
    }
}

/// How long a stopped peer's tasks get before the process exits anyway.
pub const EXIT_GRACE: Duration = Duration::from_millis(200);
