//! The binary's edge: parse options, set up logging, run the chosen subcommand, and turn its
//! outcome into an exit status (2 for bad configuration or a refused login, 1 for runtime
//! failures). Each subcommand lives in `cli/` and reaches the mesh only through the library's
//! public API ([`netbird_proxy::Peer`]), as any other program would.

mod cli;

use std::process::ExitCode;

use cli::file::ConfigError;
use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match cli::file::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("netbird-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let run_args = cli::file::run_args(&cli);
    if let Some(run) = run_args
        && run.print_config
    {
        cli::process::out(&cli::file::render(run));
        return ExitCode::SUCCESS;
    }
    let log_format = run_args.map_or("text", |r| r.log_format.as_str());
    let access_log = run_args.is_some_and(|r| r.access_log);
    if let Err(e) = cli::process::init_logging(&log_level(&cli), log_format, access_log) {
        eprintln!("netbird-proxy: {e}");
        return ExitCode::from(2);
    }
    cli::process::raise_fd_limit();
    cli::process::fixed_mmap_threshold();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netbird-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(cli));
    // Connection tasks still draining must not hold the exit.
    runtime.shutdown_timeout(cli::run::EXIT_GRACE);
    code
}

/// The log level the subcommand asked for: commands that print for scripts stay quiet.
fn log_level(cli: &Cli) -> String {
    match &cli.command {
        Some(Command::DevMesh { log_level, .. } | Command::Demo { log_level, .. }) => {
            log_level.clone()
        }
        Some(Command::Status { .. } | Command::Wait { .. } | Command::Completions { .. })
        | Some(Command::Man) => "warn".into(),
        Some(Command::Exec { run, .. }) => run.log_level.clone(),
        // Standard output is the connection, and ssh shows our standard error: quiet unless
        // asked.
        Some(Command::Nc { run, .. }) if run.log_level == "info" => "warn".into(),
        Some(Command::Nc { run, .. }) => run.log_level.clone(),
        None => cli.run.log_level.clone(),
    }
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        None => cli::run::run(cli.run).await,
        Some(c @ Command::DevMesh { .. }) => cli::dev_mesh::run(c).await,
        Some(Command::Demo {
            socks,
            http,
            status_addr,
            ..
        }) => cli::demo::run(socks, http, status_addr).await,
        Some(Command::Status {
            client,
            json,
            detail,
        }) => cli::status::status(client.status_addr, json, detail).await,
        Some(Command::Wait {
            client,
            timeout,
            healthz,
        }) => cli::status::wait(client.status_addr, timeout, healthz).await,
        Some(Command::Completions { shell }) => cli::status::completions(shell),
        Some(Command::Man) => cli::status::man(),
        Some(Command::Exec {
            run,
            ready_timeout,
            command,
        }) => cli::exec::run(*run, ready_timeout, command).await,
        Some(Command::Nc {
            run,
            ready_timeout,
            host,
            port,
        }) => {
            // Exit at once: tokio's reader of standard input is a blocking thread that a
            // runtime shutdown would wait for, and ssh waits for us after the far end closed.
            let code = cli::nc::run(*run, ready_timeout, &host, port).await;
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
    }
}
