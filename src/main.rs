//! The binary's edge: parse options, set up logging and signals, run the chosen mode, and turn
//! failures into exit statuses (2 for bad configuration or a refused login, 1 for runtime
//! failures).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use netbird_proxy::cli::file::ConfigError;
use netbird_proxy::cli::{Cli, Command, RunArgs};
use netbird_proxy::control::identity::{Identity, default_state_path};
use netbird_proxy::control::management_client::ManagementError;
use netbird_proxy::devmesh::networks::NetworksFile;
use netbird_proxy::devmesh::{DevMesh, DevMeshConfig, random_setup_key};
use netbird_proxy::engine::netbird::{EngineError, IceOptions, MeshConfig, SetupKey};
use netbird_proxy::engine::networks::NetworkOptions;
use netbird_proxy::engine::supervisor::{OnReady, Supervisor};
use netbird_proxy::engine::{self, ProxyOptions};
use netbird_proxy::forward::ForwarderConfig;
use netbird_proxy::route::Selection;
use netbird_proxy::status::{self, Mode, StatusHub};
use netbird_proxy::wg::WgConfig;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match netbird_proxy::cli::file::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(run) = netbird_proxy::cli::file::run_args(&cli)
        && run.print_config
    {
        out(&netbird_proxy::cli::file::render(run));
        return ExitCode::SUCCESS;
    }
    let log_format = netbird_proxy::cli::file::run_args(&cli)
        .map(|r| r.log_format.clone())
        .unwrap_or_else(|| "text".into());
    let log_level = match &cli.command {
        Some(Command::DevMesh { log_level, .. }) | Some(Command::Demo { log_level, .. }) => {
            log_level.clone()
        }
        Some(
            Command::Status { .. }
            | Command::Wait { .. }
            | Command::Completions { .. }
            | Command::Man,
        ) => "warn".into(),
        Some(Command::Exec { run, .. }) => run.log_level.clone(),
        // Standard output is the connection, and ssh shows our standard error: quiet unless
        // asked.
        Some(Command::Nc { run, .. }) if run.log_level == "info" => "warn".into(),
        Some(Command::Nc { run, .. }) => run.log_level.clone(),
        None => cli.run.log_level.clone(),
    };
    let access_log = netbird_proxy::cli::file::run_args(&cli).is_some_and(|r| r.access_log);
    if let Err(e) = init_logging(&log_level, &log_format, access_log) {
        eprintln!("netbird-proxy: {e}");
        return ExitCode::from(2);
    }
    raise_fd_limit();
    fixed_mmap_threshold();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netbird-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(cli));
    // Connection tasks still draining must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

async fn run(cli: Cli) -> ExitCode {
    if let Some(Command::DevMesh {
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
        ..
    }) = cli.command
    {
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
                Some(netbird_proxy::control::mesh::TurnServer {
                    uri,
                    user: user.into(),
                    password: password.into(),
                })
            }
            _ => None,
        };
        return run_dev_mesh(DevMeshConfig {
            listen,
            setup_key,
            domain,
            signal_override: None,
            advertise,
            relays: usize::from(relays),
            services,
            state,
            refuse_sync: false,
            turn,
            networks,
        })
        .await;
    }
    if let Some(Command::Demo {
        socks,
        http,
        status_addr,
        ..
    }) = cli.command
    {
        return run_demo(socks, http, status_addr).await;
    }
    if let Some(Command::Status {
        client,
        json,
        detail,
    }) = cli.command
    {
        return match status::client::snapshot(client.status_addr).await {
            Ok((_, body)) if json => {
                out(&body);
                ExitCode::SUCCESS
            }
            Ok((snap, _)) => {
                out(&status::client::render(&snap, detail));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("netbird-proxy status: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::Completions { shell }) = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "netbird-proxy", &mut script);
        out(&String::from_utf8_lossy(&script));
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Man) = cli.command {
        let cmd = <Cli as clap::CommandFactory>::command();
        let mut out = Vec::new();
        return match clap_mangen::Man::new(cmd).render(&mut out) {
            Ok(()) => {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&out);
                let _ = std::io::stdout().flush();
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("netbird-proxy man: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::Wait {
        client,
        timeout,
        healthz,
    }) = cli.command
    {
        let path = if healthz { "/healthz" } else { "/readyz" };
        return match status::client::wait_for(client.status_addr, path, timeout).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("netbird-proxy wait: {reason}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::Exec {
        run,
        ready_timeout,
        command,
    }) = cli.command
    {
        return exec::run(*run, ready_timeout, command).await;
    }
    if let Some(Command::Nc {
        run,
        ready_timeout,
        host,
        port,
    }) = cli.command
    {
        // Exit at once: tokio's reader of standard input is a blocking thread that a runtime
        // shutdown would wait for, and ssh waits for us after the far end closed.
        let code = nc::run(*run, ready_timeout, &host, port).await;
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }
    let run = cli.run;
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
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    let hub = match run.status_addr {
        None => None,
        Some(addr) => match serve_status(new_hub(&run), addr, &cancel).await {
            Ok(hub) => Some(hub),
            Err(code) => return code,
        },
    };
    run_peer(run, hub, cancel, Arc::new(|ready| eprintln!("{ready}"))).await
}

/// A listener beyond loopback without authentication would hand the mesh to anyone who
/// reaches it: refuse to start (exit 2) unless `--allow-unauthenticated` says so.
fn refuse_open_listeners(run: &RunArgs) -> Result<(), ExitCode> {
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

/// Bind `--status-addr` and serve the status endpoint from a new hub until `cancel` fires.
async fn serve_status(
    hub: Arc<StatusHub>,
    addr: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> Result<Arc<StatusHub>, ExitCode> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            tracing::info!(addr = %l.local_addr().unwrap_or(addr), "status endpoint listening");
            tokio::spawn(status::server::serve(l, hub.clone(), cancel.clone()));
            Ok(hub)
        }
        Err(e) => {
            eprintln!("netbird-proxy: cannot listen on {addr} for --status-addr: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn new_hub(run: &RunArgs) -> Arc<StatusHub> {
    let mode = if run.wg_config.is_some() {
        Mode::Static
    } else {
        Mode::Netbird
    };
    StatusHub::new(mode, run.ready_peers)
}

/// Run the peer (a static configuration or NetBird) until `cancel` fires or it fails for
/// good; exit status 2 for bad configuration or a refused login, 1 for runtime failures.
async fn run_peer(
    run: RunArgs,
    hub: Option<Arc<StatusHub>>,
    cancel: CancellationToken,
    on_ready: OnReady,
) -> ExitCode {
    let (socks_auth, http_auth) = match run.credentials() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let options = ProxyOptions {
        socks: run.socks,
        http: run.http,
        unix_mode: run.unix_mode,
        proxy: run.proxy,
        forwards: run.forward,
        exposes: run.expose,
        socks_auth,
        http_auth,
        allow_direct: !(run.mesh_only
            || std::env::var("NB_NO_DIRECT")
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes" | "on"))),
        connect_timeout: run.connect_timeout,
        congestion: run.tcp_congestion,
        tcp_buffer_budget: Some(run.tcp_buffers_mib.saturating_mul(1024 * 1024)),
        buffer_cap: Some((run.max_buffer_mib as usize).saturating_mul(1024 * 1024)),
        status: hub,
        limits: netbird_proxy::proxy::admission::Limits {
            idle_timeout: Some(run.idle_timeout).filter(|d| !d.is_zero()),
            udp_idle_timeout: run.udp_timeout,
            ..netbird_proxy::proxy::admission::Limits::new(
                run.max_connections_per_listener as usize,
                run.max_connections as usize,
                run.handshake_timeout,
            )
        },
    };
    if let Some(path) = run.wg_config {
        let config = match WgConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("netbird-proxy: {e}");
                return ExitCode::from(2);
            }
        };
        return match engine::run_static(config, options, cancel, |ready| on_ready(ready)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netbird-proxy: {e}");
                ExitCode::from(1)
            }
        };
    }

    let state = run.state.unwrap_or_else(default_state_path);
    let identity = match Identity::load_or_create(&state) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let config = MeshConfig {
        management_url: run.management_url,
        setup_key: run.setup_key.filter(|k| !k.is_empty()).map(SetupKey),
        hostname: run.hostname.unwrap_or_else(host_name),
        private_key: identity.private_key,
        wg_port: run.wg_port,
        proxy: options,
        ice: IceOptions {
            enabled: !run.force_relay,
            force_relay_peers: run.force_relay_peer,
        },
        networks: NetworkOptions {
            selection: Selection::from_flags(&run.networks_select, &run.networks_deselect),
            disable_client_routes: run.disable_client_routes,
            disable_server_routes: run.disable_server_routes,
            forwarder: ForwarderConfig {
                connect_timeout: run.connect_timeout,
                allow_host: run.route_to_host,
                ..ForwarderConfig::default()
            },
        },
    };
    let supervisor = Supervisor::new();
    supervisor.spawn(config, on_ready).await;
    let result = tokio::select! {
        _ = cancel.cancelled() => supervisor.stop().await,
        r = supervisor.wait() => r,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            let refused = matches!(
                e,
                EngineError::Management(
                    ManagementError::NeedsLogin
                        | ManagementError::SetupKeyRejected(_)
                        | ManagementError::BadUrl { .. }
                )
            );
            ExitCode::from(if refused { 2 } else { 1 })
        }
    }
}

async fn run_dev_mesh(config: DevMeshConfig) -> ExitCode {
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

/// Dev mesh + a `web` peer exposing a page + the proxy peer, all in this process.
async fn run_demo(
    socks: std::net::SocketAddr,
    http: std::net::SocketAddr,
    status_addr: std::net::SocketAddr,
) -> ExitCode {
    let setup_key = random_setup_key();
    let mesh = match DevMesh::start(DevMeshConfig::local(&setup_key, "netbird.test")).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("netbird-proxy demo: cannot start the dev mesh: {e}");
            return ExitCode::from(1);
        }
    };
    let page = match demo_page().await {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("netbird-proxy demo: cannot serve the page: {e}");
            return ExitCode::from(1);
        }
    };
    let peer = |name: &str, proxy: ProxyOptions| MeshConfig {
        management_url: mesh.management_url.clone(),
        setup_key: Some(SetupKey(setup_key.clone())),
        hostname: name.into(),
        private_key: rand::random(),
        wg_port: 0,
        proxy,
        ice: IceOptions::default(),
        networks: NetworkOptions::default(),
    };
    let web = Supervisor::new();
    web.spawn(
        peer(
            "web",
            ProxyOptions {
                exposes: vec![netbird_proxy::cli::Expose {
                    mesh_port: 80,
                    local: page,
                    udp: false,
                }],
                ..Default::default()
            },
        ),
        Arc::new(|_| {}),
    )
    .await;
    // The proxy peer's status endpoint, so `netbird-proxy status` and `wait` work beside the
    // demo as beside any run; a taken port only costs the endpoint.
    let cancel = CancellationToken::new();
    let hub = StatusHub::new(Mode::Netbird, 1);
    let status = match tokio::net::TcpListener::bind(status_addr).await {
        Ok(l) => {
            tokio::spawn(status::server::serve(l, hub.clone(), cancel.clone()));
            Some(hub)
        }
        Err(e) => {
            eprintln!(
                "netbird-proxy demo: no status endpoint ({status_addr}: {e}); \
                 `netbird-proxy status` will not find this demo"
            );
            None
        }
    };
    let proxy = Supervisor::new();
    proxy
        .spawn(
            peer(
                "proxy",
                ProxyOptions {
                    socks: vec![netbird_proxy::cli::ListenAddr::Tcp(socks)],
                    http: vec![netbird_proxy::cli::ListenAddr::Tcp(http)],
                    allow_direct: true,
                    connect_timeout: Duration::from_secs(10),
                    status,
                    ..Default::default()
                },
            ),
            Arc::new(|ready| {
                eprintln!("{ready}");
                let addr = |kind: &str| {
                    ready
                        .listeners
                        .iter()
                        .find(|l| l.0 == kind)
                        .map(|l| l.1.to_string())
                        .unwrap_or_default()
                };
                println!(
                    "curl --socks5-hostname {} http://web.netbird.test/",
                    addr("socks5")
                );
                println!("curl -x http://{} http://web.netbird.test/", addr("http"));
            }),
        )
        .await;
    spawn_signal_handler(cancel.clone());
    let code = tokio::select! {
        _ = cancel.cancelled() => ExitCode::SUCCESS,
        r = proxy.wait() => match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netbird-proxy demo: {e}");
                ExitCode::from(1)
            }
        },
    };
    let _ = proxy.stop().await;
    let _ = web.stop().await;
    mesh.stop().await;
    code
}

/// A one-page web server on loopback, for the demo's `web` peer to expose.
async fn demo_page() -> std::io::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req).await;
                let body = "Hello from the NetBird mesh: this page lives on peer `web`.\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Each TCP connection owns two large socket buffers. glibc serves large allocations with
/// mmap (fresh zero pages, touched only as used, returned on free) until a free raises its
/// dynamic threshold; after that every new connection gets heap memory that calloc must clear
/// (8 MiB per connection: new connections per second fell to a quarter). A fixed threshold
/// keeps them on mmap.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread
    // exists, with a documented parameter and a valid value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Every proxied connection holds a descriptor: lift the soft limit to the hard one (as Go
/// programs do at start), so a thousand clients do not hit the usual 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read/write the rlimit struct we pass by pointer,
    // which lives on this stack frame for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Write to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "netbird-proxy".into())
}

/// Logging to stderr at `level` (RUST_LOG instead when set and the level is the default),
/// as text or JSON lines.
fn init_logging(level: &str, format: &str, access_log: bool) -> Result<(), String> {
    let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let level = match rust_log {
        Some(filter) if level == "info" => filter,
        _ => level.to_string(),
    };
    let level = level.as_str();
    // fast-socks5 logs credentials at debug level, and the ICE agent (`is`) the ICE passwords:
    // keep both at info whatever the user asks for; the TURN client logs every poll at info.
    // smoltcp and boringtun log per packet at debug: a plain level keeps them at info too.
    let quiet = if level.contains('=') {
        ""
    } else {
        ",smoltcp=info,boringtun=info,h2=info,tower=info,hyper_util=info"
    };
    // The access log is its own switch, whatever the level.
    let access = if access_log { "info" } else { "off" };
    let filter = EnvFilter::try_new(format!(
        "{level}{quiet},fast_socks5=info,is=info,turn_client_proto=warn,stun_proto=warn,{}={access}",
        netbird_proxy::proxy::access::TARGET
    ))
    .map_err(|e| format!("--log-level `{level}`: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
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

/// `netbird-proxy exec [options] -- CMD ARGS...`: the peer in this process, CMD as a child that
/// uses it through the usual proxy variables.
mod nc {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use netbird_proxy::cli::RunArgs;
    use netbird_proxy::cli::nc;
    use netbird_proxy::proxy::Credentials;
    use tokio_util::sync::CancellationToken;

    /// Where `status` and `wait` look for a running proxy unless told.
    const DEFAULT_STATUS: u16 = 9099;

    /// The session's exit status: 0 when the far end closed after a session, 1 when the
    /// connection could not be made, 2 for bad options.
    pub async fn run(mut run: RunArgs, ready_timeout: Duration, host: &str, port: u16) -> i32 {
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
        match nc::running_proxy(status, trusted).await {
            Ok(Some(socks)) => return session(socks, auth.as_ref(), host, port).await,
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
        // Our own peer, serving only us: a SOCKS5 port on loopback with credentials nobody
        // else knows.
        let secret = Credentials::parse(&format!("nc:{:032x}", rand::random::<u128>()))
            .expect("valid credentials");
        run.socks = vec![netbird_proxy::cli::ListenAddr::Tcp(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        )))];
        run.http.clear();
        run.proxy.clear();
        run.forward.clear();
        run.expose.clear();
        run.status_addr = None;
        run.socks_auth = None;
        let hub = super::new_hub(&run);
        let cancel = CancellationToken::new();
        let bound = Arc::new(Mutex::new(None::<SocketAddr>));
        let on_ready: super::OnReady = {
            let bound = bound.clone();
            Arc::new(move |ready| {
                let socks = ready.listeners.iter().find(|(k, _, _)| *k == "socks5");
                *bound.lock().unwrap_or_else(|e| e.into_inner()) = socks.map(|(_, a, _)| *a);
            })
        };
        let mut peer = {
            let mut options = run;
            // The credentials go in as the engine reads them: through RunArgs.
            options.socks_auth = Some(secret_text(&secret));
            tokio::spawn(super::run_peer(
                options,
                Some(hub.clone()),
                cancel.clone(),
                on_ready,
            ))
        };
        let deadline = Instant::now() + ready_timeout;
        let socks = loop {
            let ready = hub.snapshot().ready;
            let addr = *bound.lock().unwrap_or_else(|e| e.into_inner());
            if let (true, Some(a)) = (ready, addr) {
                break a;
            }
            if Instant::now() >= deadline {
                let reason = hub.snapshot().reason.unwrap_or_default();
                eprintln!(
                    "netbird-proxy nc: not connected to the mesh after {ready_timeout:.1?}: {reason}"
                );
                cancel.cancel();
                let _ = peer.await;
                return 1;
            }
            tokio::select! {
                _ = &mut peer => return 1,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let code = session(socks, Some(&secret), host, port).await;
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), peer).await;
        code
    }

    fn secret_text(c: &Credentials) -> String {
        // Credentials keep their parts private; the URL form is USER:PASS percent-encoded,
        // and ours needs no encoding.
        c.url_userinfo()
    }

    async fn session(socks: SocketAddr, auth: Option<&Credentials>, host: &str, port: u16) -> i32 {
        let conn = match nc::connect(socks, auth, host, port).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("netbird-proxy nc: {e}");
                return 1;
            }
        };
        match nc::pump(conn, tokio::io::stdin(), tokio::io::stdout()).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("netbird-proxy nc: {e}");
                1
            }
        }
    }
}

mod exec {
    use std::net::SocketAddr;
    use std::process::ExitCode;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use netbird_proxy::cli::RunArgs;
    use netbird_proxy::control::identity::{Identity, default_state_path};
    use netbird_proxy::control::management_client::ManagementClient;
    use netbird_proxy::proxy::Credentials;
    use tokio::signal::unix::{SignalKind, signal};
    use tokio_util::sync::CancellationToken;
    use tracing::{info, warn};

    /// Bound on the goodbye to management after CMD has finished.
    const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

    pub async fn run(mut run: RunArgs, ready_timeout: Duration, command: Vec<String>) -> ExitCode {
        // One port for SOCKS5 and HTTP, fixed, so a rebuilt engine binds the same one the
        // child was told about.
        let tcp = |l: &[netbird_proxy::cli::ListenAddr]| l.iter().any(|a| a.tcp().is_some());
        if !tcp(&run.socks) && !tcp(&run.http) && run.proxy.is_empty() {
            match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(addr) => run.proxy.push(addr),
                Err(e) => {
                    eprintln!("netbird-proxy exec: no free loopback port: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        if let Err(code) = super::refuse_open_listeners(&run) {
            return code;
        }
        let env = match proxy_env(&run) {
            Ok(env) => env,
            Err(e) => {
                eprintln!("netbird-proxy exec: {e}");
                return ExitCode::from(2);
            }
        };
        // A peer this run registers is this run's alone: it logs out when CMD is done.
        let state = run.state.clone().unwrap_or_else(default_state_path);
        let ephemeral = run.wg_config.is_none()
            && run.setup_key.as_deref().is_some_and(|k| !k.is_empty())
            && !state.exists();
        let management_url = run.management_url.clone();

        let hub = super::new_hub(&run);
        let cancel = CancellationToken::new();
        if let Some(addr) = run.status_addr
            && let Err(code) = super::serve_status(hub.clone(), addr, &cancel).await
        {
            return code;
        }
        let ready_line = Arc::new(Mutex::new(None::<ReadyInfo>));
        let on_ready: super::OnReady = {
            let line = ready_line.clone();
            Arc::new(move |ready| {
                let bound = ready.listeners.iter().map(|(k, a, _)| (*k, *a)).collect();
                *line.lock().unwrap_or_else(|e| e.into_inner()) = Some((ready.to_string(), bound));
            })
        };
        let mut peer = tokio::spawn(super::run_peer(
            run,
            Some(hub.clone()),
            cancel.clone(),
            on_ready,
        ));
        let code = supervise(&hub, &mut peer, &ready_line, ready_timeout, command, env).await;
        // One way out, whatever happened: stop the peer, then say goodbye if it was ours.
        cancel.cancel();
        let peer_code = (&mut peer).await.ok();
        if ephemeral {
            logout(&management_url, &state).await;
        }
        ExitCode::from(match code {
            Some(c) => u8::try_from(c).unwrap_or(1),
            // The peer ended before CMD could run: its own status says why.
            None => return peer_code.unwrap_or(ExitCode::from(1)),
        })
    }

    /// Wait until ready, run CMD, pass signals on; CMD's exit status, or `None` when the peer
    /// ended first.
    async fn supervise(
        hub: &netbird_proxy::status::StatusHub,
        peer: &mut tokio::task::JoinHandle<ExitCode>,
        ready_line: &Mutex<Option<ReadyInfo>>,
        ready_timeout: Duration,
        command: Vec<String>,
        env: ProxyEnv,
    ) -> Option<i32> {
        let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::quit()),
        ) else {
            eprintln!("netbird-proxy exec: cannot install signal handlers");
            return Some(1);
        };

        let deadline = Instant::now() + ready_timeout;
        loop {
            let snap = hub.snapshot();
            if snap.ready {
                break;
            }
            if Instant::now() >= deadline {
                let reason = snap.reason.unwrap_or_default();
                eprintln!("netbird-proxy exec: not ready after {ready_timeout:?}: {reason}");
                return Some(1);
            }
            tokio::select! {
                _ = &mut *peer => return None,
                _ = term.recv() => return Some(128 + libc::SIGTERM),
                _ = int.recv() => return Some(128 + libc::SIGINT),
                _ = hup.recv() => return Some(128 + libc::SIGHUP),
                _ = quit.recv() => return Some(128 + libc::SIGQUIT),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let ready = ready_line.lock().unwrap_or_else(|e| e.into_inner()).take();
        let bound = match ready {
            Some((line, bound)) => {
                eprintln!("{line}");
                bound
            }
            None => Vec::new(),
        };
        // The listeners' bound addresses: a port 0 asked for is the port the system gave.
        let env = env.vars(&bound);

        let mut child = match tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .envs(env)
            .env_remove("NB_SETUP_KEY")
            .env_remove("NB_SOCKS_AUTH")
            .env_remove("NB_HTTP_AUTH")
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("netbird-proxy exec: cannot run `{}`: {e}", command[0]);
                // As shells do: 127 not found, 126 found but not runnable.
                return Some(if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                });
            }
        };
        let pid = child.id().map(|p| p as libc::pid_t);
        let forward = |sig: libc::c_int| {
            if let Some(pid) = pid {
                // SAFETY: kill only sends a signal to the child we spawned (still our child:
                // it is reaped below, after this loop), with a valid signal number.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        };
        // Ctrl-C and Ctrl-\ from a terminal reach every process of its foreground group, the
        // command included; passing them on too would deliver them twice.
        let from_terminal = || {
            // SAFETY: tcgetpgrp and getpgrp only read process state; fd 0 may be anything,
            // tcgetpgrp then fails with -1, which never equals a process group.
            unsafe { libc::tcgetpgrp(0) == libc::getpgrp() }
        };
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = term.recv() => forward(libc::SIGTERM),
                _ = hup.recv() => forward(libc::SIGHUP),
                _ = int.recv() => if !from_terminal() { forward(libc::SIGINT) },
                _ = quit.recv() => if !from_terminal() { forward(libc::SIGQUIT) },
            }
        };
        Some(match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code()
                    .or_else(|| s.signal().map(|sig| 128 + sig))
                    .unwrap_or(1)
            }
            Err(e) => {
                eprintln!("netbird-proxy exec: waiting for `{}`: {e}", command[0]);
                1
            }
        })
    }

    /// Deregister the peer this run created (bounded; a failure is only logged).
    async fn logout(url: &str, state: &std::path::Path) {
        let Ok(identity) = Identity::load_or_create(state) else {
            return;
        };
        let attempt = async {
            let mut client = ManagementClient::connect(url, identity.private_key).await?;
            client.logout().await
        };
        match tokio::time::timeout(LOGOUT_TIMEOUT, attempt).await {
            Ok(Ok(())) => {
                // The key is no longer registered: a later run starts afresh with its setup key.
                let _ = std::fs::remove_file(state);
                info!("logged out of management (this run registered the peer)")
            }
            Ok(Err(e)) => warn!("logout: {e}"),
            Err(_) => warn!("logout: no answer within {LOGOUT_TIMEOUT:?}"),
        }
    }

    /// The ready line and the listeners' bound addresses (kind, address).
    type ReadyInfo = (String, Vec<(&'static str, SocketAddr)>);

    /// What the command's proxy variables are made of: the listeners asked for and their
    /// credentials (checked before the peer starts).
    struct ProxyEnv {
        socks: Option<SocketAddr>,
        http: Option<SocketAddr>,
        socks_auth: Option<Credentials>,
        http_auth: Option<Credentials>,
    }

    fn proxy_env(run: &RunArgs) -> Result<ProxyEnv, String> {
        let (socks_auth, http_auth) = run.credentials()?;
        Ok(ProxyEnv {
            // The variables name TCP listeners: few programs reach a proxy on a Unix socket.
            socks: run
                .socks
                .iter()
                .find_map(|l| l.tcp())
                .or(run.proxy.first().copied()),
            http: run
                .http
                .iter()
                .find_map(|l| l.tcp())
                .or(run.proxy.first().copied()),
            socks_auth,
            http_auth,
        })
    }

    impl ProxyEnv {
        /// ALL_PROXY, HTTP_PROXY, HTTPS_PROXY, NO_PROXY and their lower-case forms, with the
        /// listeners' bound addresses where known.
        fn vars(&self, bound: &[(&'static str, SocketAddr)]) -> Vec<(String, String)> {
            let first = |kind: &str| bound.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a);
            proxy_vars(
                first("socks5").or(first("proxy")).or(self.socks),
                first("http").or(first("proxy")).or(self.http),
                self.socks_auth.as_ref(),
                self.http_auth.as_ref(),
            )
        }
    }

    /// ALL_PROXY, HTTP_PROXY, HTTPS_PROXY, NO_PROXY and their lower-case forms.
    fn proxy_vars(
        socks: Option<SocketAddr>,
        http: Option<SocketAddr>,
        socks_auth: Option<&Credentials>,
        http_auth: Option<&Credentials>,
    ) -> Vec<(String, String)> {
        let url = |scheme: &str, addr: SocketAddr, auth: Option<&Credentials>| {
            let ip = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else if addr.is_ipv6() {
                format!("[{}]", addr.ip())
            } else {
                addr.ip().to_string()
            };
            let user = auth
                .map(|c| format!("{}@", c.url_userinfo()))
                .unwrap_or_default();
            format!("{scheme}://{user}{ip}:{}", addr.port())
        };
        let socks = socks.map(|a| url("socks5h", a, socks_auth));
        let http = http.map(|a| url("http", a, http_auth));
        let mut env = Vec::new();
        let mut set = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                env.push((name.to_string(), v.clone()));
                env.push((name.to_ascii_lowercase(), v.clone()));
            }
        };
        set("ALL_PROXY", &socks.clone().or_else(|| http.clone()));
        set("HTTP_PROXY", &http.clone().or_else(|| socks.clone()));
        set("HTTPS_PROXY", &http.or(socks));
        set("NO_PROXY", &Some("localhost,127.0.0.1,::1".into()));
        env
    }
}
