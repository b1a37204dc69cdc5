//! `netbird-proxy status`, `wait`, `completions` and `man`: commands that read a running
//! proxy's status endpoint or print something about the command line itself.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use netbird_proxy::status::client;

use super::Cli;
use super::process::out;

/// Print the running proxy's status (as JSON, or as text with `detail`).
pub async fn status(addr: SocketAddr, json: bool, detail: bool) -> ExitCode {
    match client::snapshot(addr).await {
        Ok((_, body)) if json => {
            out(&body);
            ExitCode::SUCCESS
        }
        Ok((snap, _)) => {
            out(&client::render(&snap, detail));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("netbird-proxy status: {e}");
            ExitCode::from(1)
        }
    }
}

/// Wait until the running proxy is ready (or only alive, with `healthz`).
pub async fn wait(addr: SocketAddr, timeout: Duration, healthz: bool) -> ExitCode {
    let path = if healthz { "/healthz" } else { "/readyz" };
    match client::wait_for(addr, path, timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("netbird-proxy wait: {reason}");
            ExitCode::from(1)
        }
    }
}

/// A completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "netbird-proxy", &mut script);
    out(&String::from_utf8_lossy(&script));
    ExitCode::SUCCESS
}

/// The manual page, in roff.
pub fn man() -> ExitCode {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut page = Vec::new();
    match clap_mangen::Man::new(cmd).render(&mut page) {
        Ok(()) => {
            out(&String::from_utf8_lossy(&page));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("netbird-proxy man: {e}");
            ExitCode::from(1)
        }
    }
}
