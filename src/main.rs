//! The binary's edge: parse options, set up logging and signals, run the engine, and turn
//! failures into exit statuses (2 for bad configuration, 1 for runtime failures).

use std::process::ExitCode;

use clap::Parser;
use netbird_proxy::cli::Cli;
use netbird_proxy::engine::{self, ProxyOptions};
use netbird_proxy::wg::WgConfig;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("netbird-proxy: {e}");
        return ExitCode::from(2);
    }
    let Some(path) = cli.wg_config.clone() else {
        eprintln!("netbird-proxy: --wg-config FILE (or NB_WG_CONFIG) is required; see --help");
        return ExitCode::from(2);
    };
    let config = match WgConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.socks.is_empty() && cli.http.is_empty() && cli.forward.is_empty() {
        eprintln!("netbird-proxy: nothing to serve: give --socks, --http or --forward");
        return ExitCode::from(2);
    }
    let options = ProxyOptions {
        socks: cli.socks,
        http: cli.http,
        forwards: cli.forward,
        socks_auth: cli.socks_auth,
        http_auth: cli.http_auth,
        allow_direct: !cli.no_direct,
        connect_timeout: cli.connect_timeout,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netbird-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone());
        engine::run_static(config, options, cancel, |ready| eprintln!("{ready}")).await
    });
    // Connection tasks still draining must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: &str) -> Result<(), String> {
    // fast-socks5 logs credentials at debug level: keep it at info whatever the user asks for.
    // smoltcp and boringtun log per packet at debug: a plain level keeps them at info too.
    let quiet = if level.contains('=') {
        ""
    } else {
        ",smoltcp=info,boringtun=info"
    };
    let filter = EnvFilter::try_new(format!("{level}{quiet},fast_socks5=info"))
        .map_err(|e| format!("--log-level `{level}`: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping");
        cancel.cancel();
    });
}
