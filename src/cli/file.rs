//! The configuration file (`--config FILE`, `NB_CONFIG`): TOML whose keys are the run options'
//! long flag names (`setup-key` or `setup_key`), with strings, numbers, booleans, and arrays
//! for repeatable options. Its values fill in only what neither a flag nor an `NB_*` variable
//! set, so the precedence is flags > environment > file > built-in default.
//!
//! It works on the command line itself: after a first parse says which options came from
//! where, the file's remaining values are added as flags and the line is parsed again. Every
//! value therefore goes through the same parsers and checks as a flag.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use super::{Cli, Command, RunArgs};

/// Why the command line and file do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Parse `argv`, taking the values a `--config` file gives for options set no other way.
pub fn parse(argv: Vec<OsString>) -> Result<Cli, ConfigError> {
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    // Where the run options are: at the top, or under `exec` or `nc`.
    let (run_matches, run_cmd, insert_at) = match matches.subcommand() {
        None => (&matches, cmd.clone(), 1),
        Some((name @ ("exec" | "nc"), sub)) => {
            let at = argv.iter().position(|a| a == name).map_or(1, |i| i + 1);
            (
                sub,
                cmd.find_subcommand(name).cloned().unwrap_or(cmd.clone()),
                at,
            )
        }
        Some(_) => return Ok(Cli::from_arg_matches(&matches)?),
    };
    let Some(path) = run_matches.get_one::<std::path::PathBuf>("config").cloned() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let extra = file_args(&path, run_matches, &run_cmd)?;
    let mut argv = argv;
    let at = insert_at.min(argv.len());
    argv.splice(at..at, extra);
    Ok(Cli::try_parse_from_args(argv)?)
}

impl Cli {
    fn try_parse_from_args(argv: Vec<OsString>) -> Result<Self, clap::Error> {
        let matches = Cli::command().try_get_matches_from(argv)?;
        Cli::from_arg_matches(&matches)
    }
}

/// The file's values as flags, for the options `matches` did not get from a flag or variable.
fn file_args(
    path: &Path,
    matches: &ArgMatches,
    cmd: &clap::Command,
) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let invalid = |reason: String| ConfigError::Invalid {
        path: shown.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
    // A file with a secret in it must be ours alone, as the state file is.
    if let Some(key) = table.keys().find(|k| {
        matches!(
            k.replace('-', "_").as_str(),
            "setup_key" | "socks_auth" | "http_auth"
        )
    }) {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(invalid(format!(
                "holds a secret (`{key}`) and is readable by group or others (mode {mode:o}); run `chmod 600 {shown}`"
            )));
        }
    }
    let mut args = Vec::new();
    for (key, value) in &table {
        // The key names an option by its long name or an alias (NetBird's names).
        let dashed = key.replace('_', "-");
        let named = |a: &&clap::Arg| {
            a.get_long_and_visible_aliases()
                .is_some_and(|names| names.contains(&dashed.as_str()))
        };
        let Some(arg) = cmd
            .get_arguments()
            .find(named)
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "print_config"))
        else {
            // One file serves both a plain run and `exec`: exec's own options (e.g.
            // `ready-timeout`) are for exec alone.
            let exec_only = !cmd.get_arguments().any(|a| named(&a))
                && Cli::command()
                    .find_subcommand("exec")
                    .is_some_and(|exec| exec.get_arguments().any(|a| named(&a)));
            if exec_only {
                continue;
            }
            return Err(invalid(format!("unknown option `{key}`")));
        };
        let id = arg.get_id().as_str().to_string();
        let long = arg.get_long().unwrap_or_default();
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let is_flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => Err(invalid(format!(
                "`{key}` must be a string or a number, not {}",
                other.type_str()
            ))),
        };
        match value {
            toml::Value::Boolean(b) if is_flag => {
                if *b {
                    args.push(format!("--{long}").into());
                }
            }
            _ if is_flag => {
                return Err(invalid(format!("`{key}` must be true or false")));
            }
            toml::Value::Array(items) => {
                for item in items {
                    args.push(format!("--{long}={}", scalar(item)?).into());
                }
            }
            v => args.push(format!("--{long}={}", scalar(v)?).into()),
        }
    }
    Ok(args)
}

/// The effective run options as TOML, loadable again with `--config`; the setup key and the
/// proxy credentials, when set, appear only as comments saying so (`# setup_key =
/// "<redacted>"`), so the file loads without them and they come from elsewhere.
pub fn render(run: &RunArgs) -> String {
    use toml::Value;
    let mut t = toml::Table::new();
    let text = |s: String| Value::String(s);
    let list = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            t.insert(k.to_string(), v);
        }
    };
    put("management_url", Some(text(run.management_url.clone())));
    put("hostname", run.hostname.clone().map(text));
    put(
        "state",
        run.state.as_ref().map(|p| text(p.display().to_string())),
    );
    put("wg_port", Some(Value::Integer(i64::from(run.wg_port))));
    put(
        "wg_config",
        run.wg_config
            .as_ref()
            .map(|p| text(p.display().to_string())),
    );
    put(
        "socks",
        Some(list(run.socks.iter().map(|a| a.to_string()).collect())),
    );
    put(
        "http",
        Some(list(run.http.iter().map(|a| a.to_string()).collect())),
    );
    put(
        "forward",
        Some(list(run.forward.iter().map(|f| f.to_string()).collect())),
    );
    put(
        "expose",
        Some(list(run.expose.iter().map(|e| e.to_string()).collect())),
    );
    put("mesh_only", Some(Value::Boolean(run.mesh_only)));
    put("force_relay", Some(Value::Boolean(run.force_relay)));
    put(
        "lazy_connections",
        Some(text(super::lazy_word(run.lazy_connections).into())),
    );
    put(
        "lazy_inactivity",
        Some(text(format!("{}ms", run.lazy_inactivity.as_millis()))),
    );
    put("force_relay_peer", Some(list(run.force_relay_peer.clone())));
    put(
        "allow_unauthenticated",
        Some(Value::Boolean(run.allow_unauthenticated)),
    );
    put(
        "connect_timeout",
        Some(text(format!("{}ms", run.connect_timeout.as_millis()))),
    );
    put(
        "tcp_congestion",
        Some(text(
            format!("{:?}", run.tcp_congestion).to_ascii_lowercase(),
        )),
    );
    put(
        "tcp_buffers_mib",
        Some(Value::Integer(
            i64::try_from(run.tcp_buffers_mib).unwrap_or(i64::MAX),
        )),
    );
    put(
        "max_connections",
        Some(Value::Integer(i64::from(run.max_connections))),
    );
    put(
        "max_connections_per_listener",
        Some(Value::Integer(i64::from(run.max_connections_per_listener))),
    );
    put(
        "handshake_timeout",
        Some(text(format!("{}ms", run.handshake_timeout.as_millis()))),
    );
    put(
        "max_buffer_mib",
        Some(Value::Integer(i64::from(run.max_buffer_mib))),
    );
    put(
        "idle_timeout",
        Some(text(format!("{}ms", run.idle_timeout.as_millis()))),
    );
    put(
        "udp_timeout",
        Some(text(format!("{}ms", run.udp_timeout.as_millis()))),
    );
    put("status_addr", run.status_addr.map(|a| text(a.to_string())));
    put(
        "ready_peers",
        Some(Value::Integer(
            i64::try_from(run.ready_peers).unwrap_or(i64::MAX),
        )),
    );
    put("log_level", Some(text(run.log_level.clone())));
    put("log_format", Some(text(run.log_format.clone())));
    let mut out = String::new();
    for (key, set) in [
        (
            "setup_key",
            run.setup_key.as_deref().is_some_and(|k| !k.is_empty()),
        ),
        ("socks_auth", run.socks_auth.is_some()),
        ("http_auth", run.http_auth.is_some()),
    ] {
        if set {
            out.push_str(&format!("# {key} = \"<redacted>\"\n"));
        }
    }
    out + &toml::to_string(&t).unwrap_or_default()
}

/// The run options of a parsed command line, if it has them.
pub fn run_args(cli: &Cli) -> Option<&RunArgs> {
    match &cli.command {
        None => Some(&cli.run),
        Some(Command::Exec { run, .. } | Command::Nc { run, .. }) => Some(run),
        Some(_) => None,
    }
}
