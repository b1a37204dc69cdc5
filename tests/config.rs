//! Configuration from flags, `NB_*` variables and a TOML file (issue "Operations and everyday
//! use", acceptance 4): precedence, `--print-config` without secrets, bad files, JSON logs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mesh::TempDir;
use common::*;

const FILE_SECRET: &str = "file-setup-key-0123456789";
const FILE_PASS: &str = "file-proxy-password";
const ENV_PASS: &str = "env-proxy-password";

/// `DIR/wg.conf`: a static configuration whose peer never answers (any 32 bytes make an
/// X25519 key; the endpoint is a closed loopback port), with `interface_extra` lines added to
/// its [Interface].
fn never_ready_wg_config(dir: &std::path::Path, interface_extra: &str) -> std::path::PathBuf {
    let conf = dir.join("wg.conf");
    write_private(
        &conf,
        &format!(
            "[Interface]\nPrivateKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
             Address = 100.64.0.1/16\n{interface_extra}\n\
             [Peer]\nPublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n\
             Endpoint = 127.0.0.1:9\nAllowedIPs = 100.64.0.0/16\n"
        ),
    );
    conf
}

/// `netbird-proxy ARGS` with only `env` as NB_* variables: (status, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(binary());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("NB_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flags_beat_environment_beat_file_and_print_config_hides_secrets() {
    let dir = TempDir::new("config");
    let file = dir.0.join("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "setup-key = \"{FILE_SECRET}\"\n\
             socks = [\"1081\", \"0.0.0.0:1082\"]\n\
             http = [\"3129\"]\n\
             connect_timeout = \"7s\"\n\
             tcp-buffers-mib = 64\n\
             no_direct = true\n\
             http_auth = \"alice:{FILE_PASS}\"\n\
             hostname = \"from-file\"\n"
        ),
    )
    .unwrap();
    let path = file.to_str().unwrap();

    // It holds a setup key and a password: readable by others, it is refused.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(&["--config", path, "--print-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("holds a secret") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(FILE_SECRET), "{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The file alone.
    let (code, out, err) = run(&["--config", path, "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    let t: toml::Table = out.parse().unwrap();
    assert_eq!(
        t["socks"].as_array().unwrap(),
        &vec![
            toml::Value::from("127.0.0.1:1081"),
            toml::Value::from("0.0.0.0:1082")
        ]
    );
    assert_eq!(t["http"][0].as_str(), Some("127.0.0.1:3129"));
    assert_eq!(t["connect_timeout"].as_str(), Some("7000ms"));
    assert_eq!(t["tcp_buffers_mib"].as_integer(), Some(64));
    // `no_direct` in the file is --mesh-only's old name; the effective config says the new one.
    assert_eq!(t["mesh_only"].as_bool(), Some(true));
    assert_eq!(t["force_relay"].as_bool(), Some(false));
    assert_eq!(t["hostname"].as_str(), Some("from-file"));
    // Secrets only as comments: the output loads back as a config file without them.
    assert!(out.contains("# setup_key = \"<redacted>\"\n"), "{out}");
    assert!(out.contains("# http_auth = \"<redacted>\"\n"), "{out}");
    assert!(
        !t.contains_key("setup_key") && !t.contains_key("http_auth"),
        "{out}"
    );
    assert!(
        !out.contains(FILE_SECRET) && !out.contains(FILE_PASS),
        "{out}"
    );
    // (No secrets in it: any mode will do.)
    let again = dir.0.join("again.toml");
    std::fs::write(&again, &out).unwrap();
    std::fs::set_permissions(&again, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out2, err) = run(
        &["--config", again.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out2.parse::<toml::Table>().unwrap(),
        t,
        "the printed configuration does not load back to itself"
    );

    // The environment beats the file; flags beat both; NB_CONFIG names the file.
    let (code, out, err) = run(
        &["--connect-timeout", "9s", "--print-config"],
        &[
            ("NB_CONFIG", path),
            ("NB_HTTP", "3130"),
            ("NB_CONNECT_TIMEOUT", "8s"),
            ("NB_SOCKS_AUTH", &format!("bob:{ENV_PASS}")),
            ("NB_HOSTNAME", "from-env"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let t: toml::Table = out.parse().unwrap();
    assert_eq!(t["http"].as_array().unwrap().len(), 1);
    assert_eq!(t["http"][0].as_str(), Some("127.0.0.1:3130"));
    assert_eq!(t["connect_timeout"].as_str(), Some("9000ms"));
    assert_eq!(t["hostname"].as_str(), Some("from-env"));
    assert_eq!(t["socks"].as_array().unwrap().len(), 2, "from the file");
    assert!(out.contains("# socks_auth = \"<redacted>\""), "{out}");
    for secret in [FILE_SECRET, FILE_PASS, ENV_PASS] {
        assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    }

    // exec takes the same file.
    let (code, out, err) = run(
        &["exec", "--config", path, "--print-config", "--", "true"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hostname = \"from-file\""), "{out}");

    // An option of exec alone is for exec: a plain run takes the same file without it, and
    // exec waits as long as the file says (the peer's endpoint is a closed port: never ready).
    let shared = dir.0.join("shared.toml");
    let conf = never_ready_wg_config(&dir.0, "");
    std::fs::write(
        &shared,
        format!(
            "ready_timeout = \"1s\"\nwg_config = \"{}\"\nstatus_addr = \"127.0.0.1:0\"\n",
            conf.display()
        ),
    )
    .unwrap();
    let shared = shared.to_str().unwrap();
    let (code, out, err) = run(&["--config", shared, "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("ready_timeout"), "{out}");
    let started = std::time::Instant::now();
    let (code, _, err) = run(&["exec", "--config", shared, "--", "true"], &[]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("not ready after 1s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");

    // Mistakes: exit 2 naming the file and the problem.
    let bad = dir.0.join("bad.toml");
    for (text, says) in [
        ("sockz = [\"1\"]\n", "unknown option `sockz`"),
        ("print_config = true\n", "unknown option `print_config`"),
        ("socks = [\n", "TOML parse error at line 1"),
        ("no_direct = \"yes\"\n", "`no_direct` must be true or false"),
        ("connect_timeout = \"soon\"\n", "is not a duration"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let (code, _, err) = run(&["--config", bad.to_str().unwrap(), "--print-config"], &[]);
        assert_eq!(code, 2, "{text}: {err}");
        assert!(err.contains(says), "{text}: {err}");
    }
    // A malformed password is refused without being shown.
    let (code, _, err) = run(
        &["--socks", "1", "--wg-config", "/nonexistent.conf"],
        &[("NB_SOCKS_AUTH", "no-colon-secret")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--socks-auth: expected USER:PASS"), "{err}");
    assert!(!err.contains("no-colon-secret"), "{err}");
    let (code, _, err) = run(&["--config", "/nonexistent.toml", "--print-config"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read the config file /nonexistent.toml"),
        "{err}"
    );
}

/// `--log-format json`: every log line is one JSON object with a level and a message.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = TempDir::new("config-json");
    let conf = never_ready_wg_config(&dir.0, "PostUp = true\n");
    let mut child = Command::new(binary())
        .args(["--wg-config", conf.to_str().unwrap(), "--socks", "0"])
        .args(["--log-format", "json", "--log-level", "info"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut json_lines = 0;
    // The ignored-key warning (PostUp) comes before the ready line.
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("netbird-proxy ready:") {
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        json_lines += 1;
    }
    assert!(json_lines >= 1, "no log line before ready");
    sh(&["kill", "-TERM", &child.id().to_string()]);
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start-up narrates its stages, and a long wait says what it waits for: here a "management"
/// that accepts TCP connections and never answers.
#[test]
fn a_long_wait_says_what_it_waits_for() {
    let dir = TempDir::new("config-wait");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let mut child = Command::new(binary())
        .args(["--management-url", &url, "--socks", "0", "--setup-key", "k"])
        .arg("--state")
        .arg(dir.0.join("state"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
            if seen
                .iter()
                .any(|l| l.contains("still waiting for management"))
            {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(held);
    let log = seen.join("\n");
    assert!(log.contains("connecting to management"), "{log}");
    assert!(log.contains("still waiting for management"), "{log}");
}

/// Shell completions that the shells accept, and a man page groff renders.
#[test]
fn completions_and_man_page() {
    let (code, bash, err) = run(&["completions", "bash"], &[]);
    assert_eq!(code, 0, "{err}");
    let check = Command::new("bash")
        .args(["-n", "-c", &bash])
        .status()
        .unwrap();
    assert!(check.success(), "bash rejected the completion script");
    assert!(
        bash.contains("--setup-key") && bash.contains("exec"),
        "{bash}"
    );
    let (code, zsh, _) = run(&["completions", "zsh"], &[]);
    assert_eq!(code, 0);
    assert!(zsh.starts_with("#compdef netbird-proxy"), "{zsh}");
    let (code, fish, _) = run(&["completions", "fish"], &[]);
    assert_eq!(code, 0);
    assert!(fish.contains("complete -c netbird-proxy"), "{fish}");

    let (code, roff, err) = run(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    let mut groff = Command::new("groff")
        .args(["-man", "-Tascii"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("groff");
    use std::io::Write;
    groff
        .stdin
        .take()
        .unwrap()
        .write_all(roff.as_bytes())
        .unwrap();
    let out = groff.wait_with_output().unwrap();
    assert!(out.status.success());
    // groff -Tascii overstrikes bold text; drop the backspaces and what they strike.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut plain = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    for want in ["NAME", "SYNOPSIS", "--setup-key", "--status-addr", "exec"] {
        assert!(plain.contains(want), "man page lacks {want}:\n{plain}");
    }
}

/// A listener beyond loopback without authentication refuses to start (exit 2) and says how
/// to fix it; a password, or the explicit flag, lets it through.
#[test]
fn open_listeners_need_authentication() {
    let dir = TempDir::new("config-open");
    let conf = never_ready_wg_config(&dir.0, "");
    let conf_path = conf.clone();
    let conf = conf.to_str().unwrap();
    // A wg-quick file holds a private key: readable by others, it is refused.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, err) = run(&["--wg-config", conf, "--socks", "0"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("holds a private key and is readable by group or others (mode 640)"),
        "{err}"
    );
    std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (args, says) in [
        (
            vec!["--socks", "0.0.0.0:0"],
            "--socks 0.0.0.0:0 (add --socks-auth",
        ),
        (vec!["--http", "[::]:0"], "--http [::]:0 (add --http-auth"),
        (
            vec!["--forward", "0.0.0.0:0:100.64.0.2:80"],
            "forwards have no authentication",
        ),
        (
            vec!["--socks", "0", "--status-addr", "0.0.0.0:0"],
            "--status-addr 0.0.0.0:0",
        ),
    ] {
        let (code, _, err) = run(&[&["--wg-config", conf][..], &args].concat(), &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("--allow-unauthenticated"), "{err}");
        let exec = [&["exec", "--wg-config", conf][..], &args, &["--", "true"]].concat();
        let (code, _, err) = run(&exec, &[]);
        assert_eq!(code, 2, "exec {args:?}: {err}");
        assert!(err.contains(says), "exec {args:?}: {err}");
    }
    // With a password, or when told, it starts (and is stopped here once ready).
    for extra in [vec!["--socks-auth", "u:p"], vec!["--allow-unauthenticated"]] {
        let args = [&["--wg-config", conf, "--socks", "0.0.0.0:0"][..], &extra].concat();
        let proxy = Proxy::spawn(&args);
        assert!(proxy.socks.unwrap().ip().is_unspecified());
    }
}
