//! Unix-socket listeners (issue 18, item 4), run as an unprivileged user on a shared machine:
//! the socket files' mode keeps other users out, curl reaches the peer through
//! `socks5h://localhost/PATH` and `--unix-socket`, a stale socket left by a killed proxy is
//! replaced, a live one is not taken, and a clean stop removes the files.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const BODY: &[u8] = b"hello from the peer\n";

/// curl as `uid` (root is 0): (exit code, body, stderr).
fn curl_as(uid: u32, args: &[&str]) -> (i32, Vec<u8>, String) {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()])
        .args(["--clear-groups", "--", "curl", "-sS", "--max-time", "20"])
        .args(args);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The proxy as uid/gid 65534 with no capabilities.
fn start_as_nobody(config: &Path, args: &[&str]) -> Proxy {
    let mut cmd = as_nobody(binary());
    cmd.arg("--wg-config").arg(config).args(args);
    Proxy::spawn_command(cmd)
}

#[test]
fn unix_socket_listeners_serve_their_owner_only_and_clean_up() {
    let bed = Testbed::new(BedOptions::default());
    let config = bed.proxy_config("");
    chown_nobody(&config);
    let run = bed.dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    chown_nobody(&run);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socks = run.join("socks.sock");
    let http = run.join("http.sock");
    let (socks_arg, http_arg) = (
        format!("unix:{}", socks.display()),
        format!("unix:{}", http.display()),
    );
    let args = ["--socks", &socks_arg, "--http", &http_arg];
    let mut proxy = start_as_nobody(&config, &args);
    assert!(
        proxy.ready_line.contains(&format!("socks5 {socks_arg}"))
            && proxy.ready_line.contains(&format!("http {http_arg}")),
        "{}",
        proxy.ready_line
    );
    for path in [&socks, &http] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }
    let page = format!("http://{PEER_IP}:{HTTP_PORT}/index.html");
    let socks_url = format!("socks5h://localhost{}", socks.display());
    // The owner (and root) through both sockets.
    for uid in [65534, 0] {
        let (code, body, err) = curl_as(uid, &["-x", &socks_url, &page]);
        assert_eq!((code, body.as_slice()), (0, BODY), "uid {uid}: {err}");
        let (code, body, err) = curl_as(uid, &["--unix-socket", http.to_str().unwrap(), &page]);
        assert_eq!((code, body.as_slice()), (0, BODY), "uid {uid}: {err}");
    }
    // Another user may not connect at all.
    let (code, _, err) = curl_as(65533, &["-x", &socks_url, &page]);
    assert_ne!(code, 0, "another user got through the SOCKS socket");
    let (code, _, err2) = curl_as(65533, &["--unix-socket", http.to_str().unwrap(), &page]);
    assert_ne!(code, 0, "another user got through the HTTP socket");
    assert!(
        err.contains("ermission denied") || err.contains("Couldn't connect"),
        "{err}"
    );
    assert!(
        err2.contains("ermission denied") || err2.contains("Couldn't connect"),
        "{err2}"
    );

    // A second proxy does not take sockets that are in use.
    let second = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(binary())
        .arg("--wg-config")
        .arg(&config)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert!(
        socks.exists() && http.exists(),
        "the live sockets were removed"
    );

    // Killed outright: the files stay behind, and the next start replaces them.
    let _ = Command::new("kill")
        .args(["-9", &proxy.pid().to_string()])
        .status();
    proxy.wait_exit(Duration::from_secs(5));
    assert!(socks.exists(), "a killed proxy cannot remove its socket");
    let mut proxy = start_as_nobody(&config, &args);
    let (code, body, err) = curl_as(65534, &["-x", &socks_url, &page]);
    assert_eq!(
        (code, body.as_slice()),
        (0, BODY),
        "after a stale socket: {err}"
    );

    // A clean stop removes both files.
    let _ = Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status();
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{:?}", status);
    assert!(
        !socks.exists() && !http.exists(),
        "socket files left after SIGTERM"
    );
}
