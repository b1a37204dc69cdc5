//! `netbird-proxy dev-mesh`: management, signal and relays in this process, for tests and
//! demos; prints the management URL and setup key on standard output for scripts.

use std::process::ExitCode;

use netbird_proxy::devmesh::{DevMesh, DevMeshConfig, NetworksFile, TurnServer};
use tokio_util::sync::CancellationToken;

use super::Command;
use super::process::{out, spawn_signal_handler};

/// Run the dev mesh until SIGTERM or SIGINT; `command` is `Command::DevMesh`.
pub async fn run(command: Command) -> ExitCode {
    let Command::DevMesh {
        listen,
        setup_key,
        domain,
        relays,
        services,
        state,
        advertise,
        turn,
        turn_credentials,
        networks,
        simulated_peers,
        account_lazy_connections,
        status_addr,
        ..
    } = command
    else {
        return ExitCode::from(2);
    };
    let networks = match networks.as_deref().map(NetworksFile::load).transpose() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("netbird-proxy dev-mesh: {e}");
            return ExitCode::from(2);
        }
    };
    let turn = match (turn, turn_credentials) {
        (Some(uri), Some(creds)) => {
            let Some((user, password)) = creds.split_once(':') else {
                eprintln!("netbird-proxy dev-mesh: --turn-credentials must be USER:PASSWORD");
                return ExitCode::from(2);
            };
            Some(TurnServer {
                uri,
                user: user.into(),
                password: password.into(),
            })
        }
        _ => None,
    };
    let config = DevMeshConfig {
        listen,
        setup_key,
        domain,
        advertise,
        relays: usize::from(relays),
        services,
        state,
        turn,
        networks,
        simulated_peers,
        lazy_connections: account_lazy_connections,
        status_addr,
        ..DevMeshConfig::local("", "")
    };
    let mesh = match DevMesh::start(config).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("netbird-proxy dev-mesh: {e}");
            return ExitCode::from(1);
        }
    };
    // Printed on stdout, one per line, for scripts to read.
    out(&format!("management {}\n", mesh.management_url));
    out(&format!("setup-key {}\n", mesh.setup_key));
    eprintln!(
        "netbird-proxy dev-mesh ready: management {}; signal {}; relays {}",
        mesh.management_url,
        mesh.signal_addr,
        mesh.relay_urls.join(" ")
    );
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    cancel.cancelled().await;
    mesh.stop().await;
    ExitCode::SUCCESS
}
