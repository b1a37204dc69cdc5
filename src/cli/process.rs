//! What the process does for itself around the peer: logging, resource limits, the
//! allocator's tuning, signals and standard output.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Each TCP connection owns two large socket buffers. glibc serves large allocations with
/// mmap (fresh zero pages, touched only as used, returned on free) until a free raises its
/// dynamic threshold; after that every new connection gets heap memory that calloc must clear
/// (8 MiB per connection: new connections per second fell to a quarter). A fixed threshold
/// keeps them on mmap.
pub fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread
    // exists, with a documented parameter and a valid value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Every proxied connection holds a descriptor: lift the soft limit to the hard one (as Go
/// programs do at start), so a thousand clients do not hit the usual 1024.
pub fn raise_fd_limit() {
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
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Logging to stderr at `level` (RUST_LOG instead when set and the level is the default),
/// as text or JSON lines.
pub fn init_logging(level: &str, format: &str, access_log: bool) -> Result<(), String> {
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
        netbird_proxy::ACCESS_LOG_TARGET
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

/// Cancel `cancel` on SIGTERM or SIGINT.
pub fn spawn_signal_handler(cancel: CancellationToken) {
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
