//! `netbird-proxy exec [options] -- CMD ARGS...`: the peer in this process and CMD as its
//! child, told about the proxy through ALL_PROXY, HTTP_PROXY, HTTPS_PROXY and NO_PROXY.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netbird_proxy::Peer;
use netbird_proxy::config::{Credentials, ListenAddr};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use super::RunArgs;
use super::run::{builder, exit_code, message, refuse_open_listeners};

/// `netbird-proxy exec [options] -- CMD ARGS...`: the peer in this process, CMD as a child
/// that uses it through the usual proxy variables; CMD's exit status is ours.
pub async fn run(mut run: RunArgs, ready_timeout: Duration, command: Vec<String>) -> ExitCode {
    // One port for SOCKS5 and HTTP, fixed, so a rebuilt engine binds the same one the
    // child was told about.
    let tcp = |l: &[ListenAddr]| l.iter().any(|a| a.tcp().is_some());
    if !tcp(&run.socks) && !tcp(&run.http) && run.proxy.is_empty() {
        match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => run.proxy.push(addr),
            Err(e) => {
                eprintln!("netbird-proxy exec: no free loopback port: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if let Err(code) = refuse_open_listeners(&run) {
        return code;
    }
    let (env, builder) = match proxy_env(&run).and_then(|env| Ok((env, builder(&run)?))) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("netbird-proxy exec: {e}");
            return ExitCode::from(2);
        }
    };
    // A peer this run registers is this run's alone: it logs out when CMD is done.
    let state = run
        .state
        .clone()
        .unwrap_or_else(netbird_proxy::default_state_path);
    let ephemeral = run.wg_config.is_none()
        && run.setup_key.as_deref().is_some_and(|k| !k.is_empty())
        && !state.exists();

    let ready_line = Arc::new(Mutex::new(None::<ReadyInfo>));
    let line = ready_line.clone();
    let peer = builder.on_ready(move |ready| {
        let bound = ready.listeners().to_vec();
        *line.lock().unwrap_or_else(|e| e.into_inner()) = Some((ready.to_string(), bound));
    });
    let peer = match peer.spawn().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("netbird-proxy: {}", message(&e));
            return exit_code(&e);
        }
    };
    let code = supervise(&peer, &ready_line, ready_timeout, command, env).await;
    // One way out, whatever happened: stop the peer, then say goodbye if it was ours.
    let stopped = peer.stop().await;
    if ephemeral {
        match peer.logout().await {
            Ok(()) => info!("logged out of management (this run registered the peer)"),
            Err(e) => warn!("{e}"),
        }
    }
    match (code, stopped) {
        (Some(c), stopped) => {
            // CMD's status is ours; a peer that failed meanwhile still says why.
            if let Err(e) = stopped {
                eprintln!("netbird-proxy: {}", message(&e));
            }
            ExitCode::from(u8::try_from(c).unwrap_or(1))
        }
        // The peer ended before CMD could run: its own status says why.
        (None, Err(e)) => {
            eprintln!("netbird-proxy: {}", message(&e));
            exit_code(&e)
        }
        (None, Ok(())) => ExitCode::from(1),
    }
}

/// Wait until ready, run CMD, pass signals on; CMD's exit status, or `None` when the peer
/// ended first.
async fn supervise(
    peer: &Peer,
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
        let snap = peer.status();
        if snap.ready {
            break;
        }
        if Instant::now() >= deadline {
            let reason = snap.reason.unwrap_or_default();
            eprintln!("netbird-proxy exec: not ready after {ready_timeout:?}: {reason}");
            return Some(1);
        }
        tokio::select! {
            _ = peer.wait() => return None,
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
