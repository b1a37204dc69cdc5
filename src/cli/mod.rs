//! Command-line interface. Every option also reads an `NB_*` environment variable, so the
//! program configures the same way in a shell, a container and a CI job, and a TOML file
//! (`--config`, see `file`) can hold the rest: flags win over the environment, which wins over
//! the file.

pub mod demo;
pub mod dev_mesh;
pub mod exec;
pub mod file;
pub mod nc;
pub mod process;
pub mod run;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub use netbird_proxy::config::{Congestion, Credentials, Expose, Forward, ListenAddr};
use netbird_proxy::devmesh::Services;

fn parse_forward(s: &str) -> Result<Forward, String> {
    s.parse()
}

fn parse_expose(s: &str) -> Result<Expose, String> {
    s.parse()
}

fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    s.parse()
}

/// `on`/`off` (and `true`/`false`, `1`/`0`), as NetBird's variables take.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("`{s}` is not on or off")),
    }
}

/// `--lazy-connections`: on, off, or `auto` (as management's account setting says).
pub fn parse_lazy(s: &str) -> Result<netbird_proxy::LazyConnections, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(netbird_proxy::LazyConnections::FollowManagement);
    }
    parse_on_off(s)
        .map(Into::into)
        .map_err(|_| format!("`{s}` is not on, off or auto"))
}

/// The words `--lazy-connections` takes, for `--print-config`.
pub fn lazy_word(mode: netbird_proxy::LazyConnections) -> &'static str {
    match mode {
        netbird_proxy::LazyConnections::Off => "off",
        netbird_proxy::LazyConnections::FollowManagement => "auto",
        _ => "on",
    }
}

/// `--unix-mode`: octal permissions of Unix-socket listeners.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not an octal mode like 600 or 660"))
}

/// `[ADDR:]PORT`; a bare port binds loopback, so nothing is exposed by accident.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    match s.parse::<ListenAddr>()? {
        ListenAddr::Tcp(a) => Ok(a),
        ListenAddr::Unix(_) => Err(format!("`{s}` is not PORT or ADDR:PORT")),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "netbird-proxy",
    version,
    about = "Join a NetBird (or any WireGuard) mesh in user space and serve it through SOCKS5, HTTP proxy and port forwards",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// How to join the mesh and what to serve: the options of a plain run and of `exec`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// TOML file with any of these options (keys as the long flags, `-` or `_`); flags and
    /// NB_* variables win over it.
    #[arg(long, env = "NB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (secrets redacted) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Join NetBird with this setup key (needed the first time; the state file remembers the
    /// peer afterwards).
    #[arg(long, env = "NB_SETUP_KEY", value_name = "KEY", hide_env_values = true)]
    pub setup_key: Option<String>,

    /// NetBird management service.
    #[arg(long, env = "NB_MANAGEMENT_URL", value_name = "URL", default_value = netbird_proxy::DEFAULT_MANAGEMENT_URL)]
    pub management_url: String,

    /// Name of this peer in the mesh (default: the host name).
    #[arg(long, env = "NB_HOSTNAME", value_name = "NAME")]
    pub hostname: Option<String>,

    /// State file holding this peer's key (default: $XDG_STATE_HOME/netbird-proxy/state).
    #[arg(long, env = "NB_STATE", value_name = "PATH")]
    pub state: Option<PathBuf>,

    /// UDP port for WireGuard (0: any free port).
    #[arg(
        long,
        visible_alias = "wireguard-port",
        env = "NB_WIREGUARD_PORT",
        value_name = "PORT",
        default_value_t = 0
    )]
    pub wg_port: u16,

    /// Static WireGuard configuration in wg-quick format, instead of joining NetBird.
    #[arg(long, env = "NB_WG_CONFIG", value_name = "FILE")]
    pub wg_config: Option<PathBuf>,

    /// SOCKS5 listener; a bare PORT binds 127.0.0.1, `unix:PATH` listens on a Unix socket
    /// (mode --unix-mode). Repeatable (env: comma-separated).
    #[arg(long, env = "NB_SOCKS", value_name = "[ADDR:]PORT|unix:PATH", value_delimiter = ',', value_parser = parse_listen_addr)]
    pub socks: Vec<ListenAddr>,

    /// HTTP proxy listener (CONNECT and absolute-form); a bare PORT binds 127.0.0.1,
    /// `unix:PATH` listens on a Unix socket. Repeatable.
    #[arg(long, env = "NB_HTTP", value_name = "[ADDR:]PORT|unix:PATH", value_delimiter = ',', value_parser = parse_listen_addr)]
    pub http: Vec<ListenAddr>,

    /// Permissions of Unix-socket listeners (octal): who on this machine may use them.
    #[arg(long, env = "NB_UNIX_MODE", value_name = "MODE", default_value = "600", value_parser = parse_mode)]
    pub unix_mode: u32,

    /// SOCKS5 and the HTTP proxy on one port, told apart by each client's first byte (with
    /// --socks-auth and --http-auth for each); a bare PORT binds 127.0.0.1. Repeatable.
    #[arg(long, env = "NB_PROXY", value_name = "[ADDR:]PORT", value_delimiter = ',', value_parser = parse_listen)]
    pub proxy: Vec<SocketAddr>,

    /// Forward a local TCP port to HOST:PORT through the mesh; a `/udp` suffix forwards a UDP
    /// port instead (one flow per local client). Repeatable.
    #[arg(long, env = "NB_FORWARD", value_name = "[ADDR:]LPORT:HOST:PORT[/udp]", value_delimiter = ',', value_parser = parse_forward)]
    pub forward: Vec<Forward>,

    /// Expose a local TCP service on our mesh address: connections to MESHPORT on the overlay
    /// IP are forwarded to ADDR:PORT (a bare PORT means 127.0.0.1); a `/udp` suffix exposes a
    /// UDP service instead. Repeatable.
    #[arg(long, env = "NB_EXPOSE", value_name = "MESHPORT=[ADDR:]PORT[/udp]", value_delimiter = ',', value_parser = parse_expose)]
    pub expose: Vec<Expose>,

    /// Require this user name and password on the SOCKS5 listeners (RFC 1929).
    #[arg(
        long,
        env = "NB_SOCKS_AUTH",
        value_name = "USER:PASS",
        hide_env_values = true
    )]
    pub socks_auth: Option<String>,

    /// Require this user name and password on the HTTP proxy listeners (Basic).
    #[arg(
        long,
        env = "NB_HTTP_AUTH",
        value_name = "USER:PASS",
        hide_env_values = true
    )]
    pub http_auth: Option<String>,

    /// Client connections on all listeners together; beyond it clients are refused (SOCKS5
    /// 0x01, HTTP 503).
    #[arg(long, env = "NB_MAX_CONNECTIONS", value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Client connections per listener; when full, the oldest client still in its handshake
    /// makes room for a new one, and established clients are never cut.
    #[arg(long, env = "NB_MAX_CONNECTIONS_PER_LISTENER", value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_listener: u32,

    /// Time a SOCKS5 or HTTP client has for its greeting, authentication and request (one
    /// that sends nothing or dribbles is dropped).
    #[arg(long, env = "NB_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Close a SOCKS5 tunnel, HTTP connection, forward or exposed-port connection on which no
    /// byte has moved either way for this long; 0 never closes one.
    #[arg(long, env = "NB_IDLE_TIMEOUT", value_name = "DURATION", default_value = "15m", value_parser = parse_duration_or_zero)]
    pub idle_timeout: Duration,

    /// End a SOCKS5 UDP association, or a UDP forward's or exposed port's client flow, after
    /// this long without a datagram either way.
    #[arg(long, env = "NB_UDP_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub udp_timeout: Duration,

    /// Let SOCKS5, HTTP proxy, forward and status listeners on non-loopback addresses run
    /// without authentication (only on a network you trust: anyone who reaches them uses
    /// the mesh).
    #[arg(long, env = "NB_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Refuse destinations outside the mesh instead of dialling them from the host
    /// (`--no-direct` and `NB_NO_DIRECT` are the old names).
    #[arg(long, env = "NB_MESH_ONLY", visible_alias = "no-direct")]
    pub mesh_only: bool,

    /// Keep every mesh peer on the relay: no ICE, no direct paths (NetBird's
    /// `NB_FORCE_RELAY=true`).
    #[arg(long, env = "NB_FORCE_RELAY")]
    pub force_relay: bool,

    /// Lazy connections (on by default): a mesh peer is set up on first traffic to it (or
    /// its offer) and idled after --lazy-inactivity without data, so a job on an account of
    /// thousands of peers opens only what it uses; `off` sets every peer up at start and
    /// keeps it; `auto` does what the account's setting in management says (NetBird's
    /// client without `NB_LAZY_CONN`), and follows it when it changes. Unless `off`,
    /// readiness is the network map alone (`--ready-peers` is not waited for). NetBird's
    /// `NB_LAZY_CONN`.
    #[arg(long, env = "NB_LAZY_CONN", value_name = "on|off|auto", default_value = "on", value_parser = parse_lazy)]
    pub lazy_connections: netbird_proxy::LazyConnections,

    /// How long a lazily connected peer may go without data before it is idled (NetBird's
    /// `NB_LAZY_CONN_INACTIVITY_THRESHOLD`).
    #[arg(long, env = "NB_LAZY_CONN_INACTIVITY_THRESHOLD", value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub lazy_inactivity: Duration,

    /// Keep this peer on the relay (its name, mesh IP or public key); repeatable, or
    /// comma-separated in the variable.
    #[arg(
        long,
        env = "NB_FORCE_RELAY_PEERS",
        value_name = "PEER",
        value_delimiter = ','
    )]
    pub force_relay_peer: Vec<String>,

    /// Route only these networks (NetBird's `netbird networks select`): network names
    /// (NetIDs), repeatable or comma-separated; an exit node named here is the one used;
    /// `all` turns every network on.
    #[arg(
        long,
        env = "NB_NETWORKS_SELECT",
        value_name = "NETWORK",
        value_delimiter = ','
    )]
    pub networks_select: Vec<String>,

    /// Do not route these networks (`netbird networks deselect`); `all` routes nothing, exit
    /// nodes included.
    #[arg(
        long,
        env = "NB_NETWORKS_DESELECT",
        value_name = "NETWORK",
        value_delimiter = ','
    )]
    pub networks_deselect: Vec<String>,

    /// Ignore the routes other peers offer (NetBird's `--disable-client-routes`).
    #[arg(long, env = "NB_DISABLE_CLIENT_ROUTES")]
    pub disable_client_routes: bool,

    /// Never act as a routing peer or exit node, even when management names this peer one
    /// (NetBird's `--disable-server-routes`).
    #[arg(long, env = "NB_DISABLE_SERVER_ROUTES")]
    pub disable_server_routes: bool,

    /// As a routing peer, also forward to this host's own addresses and loopback (by default
    /// a mesh peer routed through us cannot reach this host's private services or the proxy's
    /// own listeners).
    #[arg(long, env = "NB_ROUTE_TO_HOST")]
    pub route_to_host: bool,

    /// How long a connection attempt may take (e.g. 10s, 500ms).
    #[arg(long, env = "NB_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// TCP congestion control for connections into the mesh: bbr (paces at the measured rate,
    /// keeps its speed on lossy paths) or cubic (loss-based).
    #[arg(
        long,
        env = "NB_TCP_CONGESTION",
        value_name = "bbr|cubic",
        default_value = "bbr"
    )]
    pub tcp_congestion: Congestion,

    /// MiB of TCP socket buffers handed out at full size (4 MiB each way per connection);
    /// connections beyond it get 256 KiB each way. Pages are touched only as data flows.
    #[arg(
        long,
        env = "NB_TCP_BUFFERS_MIB",
        value_name = "MIB",
        default_value_t = 1024
    )]
    pub tcp_buffers_mib: usize,

    /// Hard cap, in MiB, on the TCP buffers of all mesh connections together (socket buffers
    /// and per-connection rings, both ways). A connection that would exceed it is refused
    /// (SOCKS5 0x01, HTTP 503) until others close; the default never binds below the
    /// connection limits.
    #[arg(long, env = "NB_MAX_BUFFER_MIB", value_name = "MIB", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_buffer_mib: u32,

    /// Serve /healthz, /readyz, /metrics and /status here; a bare PORT binds 127.0.0.1.
    #[arg(long, env = "NB_STATUS_ADDR", value_name = "[ADDR:]PORT", value_parser = parse_listen)]
    pub status_addr: Option<SocketAddr>,

    /// /readyz answers 200 once this many peers have a live WireGuard session.
    #[arg(long, env = "NB_READY_PEERS", value_name = "N", default_value_t = 1)]
    pub ready_peers: usize,

    /// Log level or tracing filter (error, warn, info, debug, trace, or e.g. netbird_proxy=debug).
    #[arg(
        long,
        env = "NB_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: String,

    /// One log line per finished client connection, UDP association or flow and HTTP request
    /// (target `netbird_proxy::access`: listener, client, target as asked and as reached,
    /// path, bytes each way, duration, result), in the --log-format of the other logs.
    #[arg(long, env = "NB_ACCESS_LOG")]
    pub access_log: bool,

    /// Log format: text (for people) or json (one object per line, for log collectors).
    #[arg(long, env = "NB_LOG_FORMAT", value_name = "text|json", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl RunArgs {
    /// Listeners that anyone beyond this machine could use without a password. Each entry
    /// says which option and what to do; empty when `--allow-unauthenticated` is given.
    pub fn unauthenticated_exposure(&self) -> Vec<String> {
        if self.allow_unauthenticated {
            return Vec::new();
        }
        let open = |a: &SocketAddr| !a.ip().is_loopback();
        let mut found = Vec::new();
        if self.socks_auth.is_none() {
            for a in self.socks.iter().filter_map(ListenAddr::tcp).filter(open) {
                found.push(format!("--socks {a} (add --socks-auth USER:PASS)"));
            }
        }
        if self.http_auth.is_none() {
            for a in self.http.iter().filter_map(ListenAddr::tcp).filter(open) {
                found.push(format!("--http {a} (add --http-auth USER:PASS)"));
            }
        }
        if self.socks_auth.is_none() || self.http_auth.is_none() {
            for a in self.proxy.iter().filter(|a| open(a)) {
                found.push(format!(
                    "--proxy {a} (add --socks-auth USER:PASS and --http-auth USER:PASS)"
                ));
            }
        }
        for f in self.forward.iter().filter(|f| open(&f.listen_addr())) {
            found.push(format!(
                "--forward {f} (forwards have no authentication; bind loopback)"
            ));
        }
        if let Some(a) = self.status_addr.filter(open) {
            found.push(format!("--status-addr {a} (bind loopback)"));
        }
        found
    }

    /// `--socks-auth` and `--http-auth` as credentials. They are parsed here rather than by
    /// clap, whose errors quote the rejected value — a password.
    pub fn credentials(&self) -> Result<(Option<Credentials>, Option<Credentials>), String> {
        let parse = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| {
                    Credentials::parse(s).map_err(|e| {
                        format!("{flag}: {e} (the value is not shown: it is a secret)")
                    })
                })
                .transpose()
        };
        Ok((
            parse("--socks-auth", &self.socks_auth)?,
            parse("--http-auth", &self.http_auth)?,
        ))
    }
}

/// Where the `status` and `wait` commands find a running proxy.
#[derive(Debug, clap::Args)]
pub struct StatusClientArgs {
    /// The proxy's --status-addr.
    #[arg(long, env = "NB_STATUS_ADDR", value_name = "[ADDR:]PORT", default_value = "9099", value_parser = parse_listen)]
    pub status_addr: SocketAddr,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a running proxy's state (from its --status-addr): our peer, the control plane,
    /// every peer and the listeners.
    Status {
        #[command(flatten)]
        client: StatusClientArgs,
        /// Print the endpoint's JSON as it is.
        #[arg(long)]
        json: bool,
        /// One block per peer instead of the table.
        #[arg(long, short = 'd')]
        detail: bool,
    },
    /// Join the mesh, wait until ready, and run CMD with ALL_PROXY, HTTP_PROXY, HTTPS_PROXY
    /// (and lower-case forms) pointing at our listeners and NO_PROXY=localhost,127.0.0.1,::1;
    /// signals go to CMD, and we exit with its status once the peer has shut down. Without
    /// --socks/--http/--proxy, SOCKS5 and HTTP share one free loopback port.
    Exec {
        #[command(flatten)]
        run: Box<RunArgs>,
        /// How long to wait for readiness; CMD does not run if it does not come.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        ready_timeout: Duration,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Standard input and output joined to TCP HOST PORT in the mesh, for ssh's ProxyCommand
    /// (`ssh -o ProxyCommand='netbird-proxy nc %h %p' HOST`), git over ssh and scp: through the
    /// SOCKS5 listener of a proxy running here (found at its --status-addr, default
    /// 127.0.0.1:9099; --socks-auth for its credentials), or, with none running, by joining the
    /// mesh itself with the usual options. Exit status 1 when the connection fails.
    Nc {
        #[command(flatten)]
        run: Box<RunArgs>,
        /// How long joining the mesh may take when no proxy is running.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        ready_timeout: Duration,
        /// A mesh name, an IP, or any name the proxy resolves.
        host: String,
        /// The TCP port.
        port: u16,
    },
    /// Print a shell completion script (e.g. `netbird-proxy completions bash >
    /// /etc/bash_completion.d/netbird-proxy`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; e.g. `netbird-proxy man | man -l -`).
    Man,
    /// Wait until a running proxy is ready (its /readyz answers 200): exit 0, or 1 with the
    /// reason when the timeout passes first.
    Wait {
        #[command(flatten)]
        client: StatusClientArgs,
        /// Wait for /healthz (the process answers) instead of /readyz; a container
        /// HEALTHCHECK.
        #[arg(long)]
        healthz: bool,
        /// How long to wait (e.g. 30s, 2m).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Everything on this machine, no account needed: a dev mesh, a peer `web` serving a small
    /// page on its mesh address, and this proxy joined to the mesh; prints the curl command
    /// that fetches the page through the proxy.
    Demo {
        /// SOCKS5 listener of the proxy peer.
        #[arg(long, value_name = "[ADDR:]PORT", default_value = "1080", value_parser = parse_listen)]
        socks: SocketAddr,
        /// HTTP proxy listener of the proxy peer.
        #[arg(long, value_name = "[ADDR:]PORT", default_value = "3128", value_parser = parse_listen)]
        http: SocketAddr,
        /// The proxy peer's status endpoint, where `status` and `wait` look by default (when
        /// the port is taken, the demo runs without one and says so).
        #[arg(long, value_name = "[ADDR:]PORT", default_value = "9099", value_parser = parse_listen)]
        status_addr: SocketAddr,
        /// Log level or tracing filter.
        #[arg(
            long,
            env = "NB_LOG_LEVEL",
            value_name = "LEVEL",
            default_value = "warn"
        )]
        log_level: String,
    },
    /// Serve a local NetBird control plane (management and signal) on loopback, for tests and
    /// demos; prints the management URL and the setup key.
    DevMesh {
        /// Management address; signal listens on the next port, relays on the ones after.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:33073", value_parser = parse_listen)]
        listen: SocketAddr,
        /// Answer /healthz and /readyz here (200 while serving), for a container's HEALTHCHECK
        /// or an orchestrator's probe; a bare PORT binds 127.0.0.1.
        #[arg(long, env = "NB_STATUS_ADDR", value_name = "[ADDR:]PORT", value_parser = parse_listen)]
        status_addr: Option<SocketAddr>,
        /// The setup key peers register with (default: a random one).
        #[arg(long, value_name = "KEY")]
        setup_key: Option<String>,
        /// DNS domain of the peers' names.
        #[arg(long, value_name = "DOMAIN", default_value = "netbird.test")]
        domain: String,
        /// The host name or address peers reach signal and the relays at (default: the
        /// --listen address), e.g. the service name in a compose file.
        #[arg(long, value_name = "HOST")]
        advertise: Option<String>,
        /// How many relays to serve (ports after signal's); peers get one each, round-robin,
        /// and meet on each other's relays.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
        relays: u8,
        /// Serve only these services (comma-separated: management, signal, relay); run the
        /// rest in other processes with the same --listen and --state.
        #[arg(long, value_name = "LIST", default_value = "management,signal,relay", value_parser = parse_services)]
        services: Services,
        /// Keep keys, the relay secret and registrations in this file (0600), so a restarted
        /// dev mesh knows its peers.
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
        /// Announce this TURN server to the peers (`turn:host:port`), for ICE relay candidates
        /// where NetBird's relay is missing.
        #[arg(long, value_name = "URI", requires = "turn_credentials")]
        turn: Option<String>,
        /// Groups, access policies and routes (HA groups, exit nodes, DNS routes) from this
        /// TOML file, sent to the peers as NetBird's management would (README: "Networks").
        #[arg(long, value_name = "FILE")]
        networks: Option<PathBuf>,
        /// Also register N peers that never connect (`sim-1`, `sim-2`, ...), as most peers
        /// of a large account are: every map lists them, to measure what a big map costs.
        #[arg(long, value_name = "N", default_value_t = 0)]
        simulated_peers: usize,
        /// The account's lazy-connection setting, as NetBird's dashboard sets it: sent in
        /// every peer's map (`PeerConfig.LazyConnectionEnabled`) and followed by peers run
        /// with `--lazy-connections auto`.
        #[arg(long)]
        account_lazy_connections: bool,
        /// The TURN server's long-term credentials, `USER:PASSWORD`.
        #[arg(long, value_name = "USER:PASSWORD", requires = "turn")]
        turn_credentials: Option<String>,
        /// Log level or tracing filter.
        #[arg(
            long,
            env = "NB_LOG_LEVEL",
            value_name = "LEVEL",
            default_value = "info"
        )]
        log_level: String,
    },
}

/// `10s`, `500ms`, `2m`, or plain seconds; not zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_any_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "`{}` is not a duration like 10s, 500ms or 2m",
            s.trim()
        ));
    }
    Ok(d)
}

/// A duration as `parse_duration`, or 0 (in any unit) for "never".
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    parse_any_duration(s).map_err(|e| format!("{e}, or 0"))
}

fn parse_any_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a duration like 10s, 500ms or 2m");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(bad()),
    };
    Ok(d)
}

fn parse_services(s: &str) -> Result<Services, String> {
    let mut services = Services {
        management: false,
        signal: false,
        relay: false,
    };
    for name in s.split(',').map(str::trim) {
        match name {
            "management" => services.management = true,
            "signal" => services.signal = true,
            "relay" => services.relay = true,
            other => {
                return Err(format!(
                    "unknown service `{other}` (expected management, signal, relay)"
                ));
            }
        }
    }
    Ok(services)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mesh_subcommand() {
        let cli = Cli::try_parse_from(["netbird-proxy", "dev-mesh", "--listen", "40000"]).unwrap();
        match cli.command {
            Some(Command::DevMesh { listen, .. }) => {
                assert_eq!(listen, "127.0.0.1:40000".parse().unwrap())
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["netbird-proxy", "--socks", "1", "dev-mesh"]).is_err());
    }

    #[test]
    fn unix_modes() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("1777").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn env_and_flags_parse() {
        let cli = Cli::try_parse_from([
            "netbird-proxy",
            "--wg-config",
            "x.conf",
            "--socks",
            "1080",
            "--socks",
            "0.0.0.0:1081",
            "--forward",
            "9000:100.64.0.2:80",
            "--no-direct",
        ])
        .unwrap();
        assert_eq!(cli.run.socks.len(), 2);
        assert!(cli.command.is_none());
        assert!(cli.run.mesh_only, "--no-direct is --mesh-only's old name");
        assert_eq!(cli.run.connect_timeout, Duration::from_secs(10));
        assert_eq!(cli.run.tcp_congestion, Congestion::Bbr);
        assert_eq!(cli.run.tcp_buffers_mib, 1024);
    }

    #[test]
    fn direct_connection_options() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["netbird-proxy", "--setup-key", "k"], args].concat())
        };
        let cli = parse(&[]).unwrap();
        assert!(!cli.run.force_relay && cli.run.force_relay_peer.is_empty());
        assert!(!cli.run.mesh_only);
        let cli = parse(&[
            "--force-relay",
            "--force-relay-peer",
            "db",
            "--force-relay-peer",
            "100.64.0.9",
            "--mesh-only",
        ])
        .unwrap();
        assert!(cli.run.force_relay && cli.run.mesh_only);
        assert_eq!(cli.run.force_relay_peer, ["db", "100.64.0.9"]);
        assert!(parse(&["--no-direct"]).unwrap().run.mesh_only);
    }

    #[test]
    fn tcp_options() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["netbird-proxy", "--wg-config", "x.conf"], args].concat())
        };
        let cli = parse(&["--tcp-congestion", "CUBIC", "--tcp-buffers-mib", "64"]).unwrap();
        assert_eq!(cli.run.tcp_congestion, Congestion::Cubic);
        assert_eq!(cli.run.tcp_buffers_mib, 64);
        let err = parse(&["--tcp-congestion", "reno"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bbr or cubic"), "{err}");
    }
}
