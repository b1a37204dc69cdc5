//! The NetBird mesh end to end, as separate processes: `netbird-proxy dev-mesh` serves
//! management, signal and two relays on loopback; proxies A, B and C join it with the setup key; B
//! and C expose a local HTTP server on their overlay IPs; A reaches both through SOCKS5 and the
//! HTTP proxy, by FQDN and by overlay IP, with SHA-256-verified transfers.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mesh::*;
use common::*;

/// Acceptance 1 of the mesh issue.
#[test]
fn peers_reach_each_other_by_name_and_ip_through_socks_and_http() {
    let mesh = DevMeshProcess::start(2);
    let state_dir = std::env::temp_dir().join(format!("nbp-mesh-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let web_b = LocalServer::start("bravo");
    let web_c = LocalServer::start("charlie");
    const LEN: usize = 16 << 20;
    let sha_b = sha256_hex(&{
        let data = random_bytes(LEN);
        std::fs::write(web_b.dir.join("big.bin"), &data).unwrap();
        data
    });
    let b = join(
        &mesh,
        &state_dir,
        "bravo",
        &["--expose", &format!("80={}", web_b.port)],
    );
    let c = join(
        &mesh,
        &state_dir,
        "charlie",
        &["--expose", &format!("8080={}", web_c.port)],
    );
    std::fs::create_dir_all(&state_dir).unwrap();
    let unix_socks = state_dir.join("alpha-socks.sock");
    let unix_http = state_dir.join("alpha-http.sock");
    let a = join(
        &mesh,
        &state_dir,
        "alpha",
        &[
            "--socks",
            "0",
            "--http",
            "0",
            "--no-direct",
            // Issue 18 on the mesh path: Unix sockets and the access log.
            "--socks",
            &format!("unix:{}", unix_socks.display()),
            "--http",
            &format!("unix:{}", unix_http.display()),
            "--access-log",
        ],
    );
    let socks = a.socks.unwrap().to_string();
    let http = format!("http://{}", a.http.unwrap());
    let b_ip = b.mesh_ip.unwrap();
    let c_ip = c.mesh_ip.unwrap();

    // The first request may wait for the peers to connect through the relay (bounded).
    let (code, body, err) = fetch_until_ok(
        &[
            "--socks5-hostname",
            &socks,
            "http://bravo.mesh.test/index.html",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"hello from bravo\n"[..]),
        "{err}\n{}",
        a.log()
    );
    for (url, expect) in [
        (format!("http://{b_ip}/index.html"), "hello from bravo\n"),
        (
            "http://charlie.mesh.test:8080/index.html".to_string(),
            "hello from charlie\n",
        ),
        (
            format!("http://{c_ip}:8080/index.html"),
            "hello from charlie\n",
        ),
    ] {
        let (code, body, err) = fetch_until_ok(
            &["--socks5-hostname", &socks, &url],
            Duration::from_secs(20),
        );
        assert_eq!(
            (code, String::from_utf8_lossy(&body).as_ref()),
            (0, expect),
            "{url}: {err}"
        );
        let (code, body, err) = curl(&["-x", &http, &url]);
        assert_eq!(
            (code, String::from_utf8_lossy(&body).as_ref()),
            (0, expect),
            "{url} via HTTP: {err}"
        );
    }

    // Two relays, handed out round-robin (B: first, C: second, A: first): C and its peers
    // have different home relays, so one side of each pair met the other on a foreign relay.
    let foreign = [&a, &c]
        .iter()
        .map(|p| p.log().matches("foreign relay connected").count())
        .sum::<usize>();
    assert!(
        foreign >= 1,
        "no foreign relay was used:\n{}\n{}",
        a.log(),
        c.log()
    );

    // 16 MiB each way with SHA-256 checks, through SOCKS5 and the HTTP proxy.
    let out = state_dir.join("download.bin");
    let (code, _, err) = curl(&[
        "--socks5-hostname",
        &socks,
        "-o",
        out.to_str().unwrap(),
        "http://bravo.mesh.test/big.bin",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sha256_file(&out), sha_b);
    let up = state_dir.join("upload.bin");
    let data = random_bytes(LEN);
    std::fs::write(&up, &data).unwrap();
    let expect = format!("{} {LEN}\n", sha256_hex(&data));
    let (code, body, err) = curl(&[
        "-x",
        &http,
        "--data-binary",
        &format!("@{}", up.display()),
        &format!("http://{c_ip}:8080/upload"),
    ]);
    assert_eq!(
        (code, String::from_utf8(body).unwrap()),
        (0, expect),
        "{err}"
    );

    // Issue 18 on the mesh path: both Unix sockets reach bravo by name; the access log says
    // which path each connection took; two absolute-form requests on one client connection
    // reach the origin over one upstream connection.
    let url = "http://bravo.mesh.test/index.html";
    let socks_url = format!("socks5h://localhost{}", unix_socks.display());
    for args in [
        vec!["-x", socks_url.as_str(), url],
        vec!["--unix-socket", unix_http.to_str().unwrap(), url],
    ] {
        let (code, body, err) = curl(&args);
        assert_eq!(
            (code, body.as_slice()),
            (0, &b"hello from bravo\n"[..]),
            "{err}"
        );
    }
    // bravo's server answers /whoami with the connection's source: the same twice means one
    // upstream connection through the mesh carried both requests.
    let who = "http://bravo.mesh.test/whoami";
    let (code, body, err) = curl(&["-x", &http, who, who]);
    assert_eq!(code, 0, "{err}");
    let seen = String::from_utf8_lossy(&body).to_string();
    let lines: Vec<&str> = seen.lines().collect();
    assert!(
        lines.len() == 2 && lines[0] == lines[1],
        "two requests, not one upstream connection: {seen}"
    );
    let access: Vec<String> = a
        .log()
        .lines()
        .map(strip_colours)
        .filter(|l| l.contains("netbird_proxy::access") && l.contains("bravo.mesh.test"))
        .collect();
    for (kind, listener) in [
        ("socks5", "unix:"),
        ("http", "unix:"),
        ("socks5", "127.0.0.1:"),
        ("http", "127.0.0.1:"),
    ] {
        assert!(
            access
                .iter()
                .any(|l| l.contains(&format!("kind=\"{kind}\""))
                    && l.contains(&format!("listener={listener}"))),
            "no {kind} line from {listener}: {access:#?}"
        );
    }
    // Every connection that was made says which mesh path it took.
    let made: Vec<&String> = access
        .iter()
        .filter(|l| l.contains("result=\"0x00\"") || l.contains("result=\"200\""))
        .collect();
    assert!(made.len() >= 5, "{access:#?}");
    assert!(
        made.iter()
            .all(|l| l.contains("path=\"relayed\"") || l.contains("path=\"direct\"")),
        "{access:#?}"
    );

    // C stops: A's next requests to it fail cleanly, fast (bounded at 12 s: the 10 s default
    // connect timeout, if the offline notice has not arrived yet or — A and C being direct
    // through ICE on loopback — the direct path is only known lost after ICE's 6 s of silence,
    // plus slack; once it is, C has no path and A says so at once).
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let (_, reply) =
        socks_connect(a.socks.unwrap(), None, &connect_v4(&c_ip.to_string(), 8080)).unwrap();
    assert_eq!(reply[1], 0x04, "SOCKS reply for a stopped peer");
    let (_, out, _) = curl(&[
        "-x",
        &http,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{c_ip}:8080/"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out), "504");
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "{:?}",
        start.elapsed()
    );

    // C restarts with its state file: same overlay IP, reachable again, A untouched.
    let c_again = join(
        &mesh,
        &state_dir,
        "charlie",
        &["--expose", &format!("8080={}", web_c.port)],
    );
    assert_eq!(c_again.mesh_ip, Some(c_ip), "same identity, same address");
    let (code, body, err) = fetch_until_ok(
        &[
            "--socks5-hostname",
            &socks,
            "http://charlie.mesh.test:8080/index.html",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"hello from charlie\n"[..]),
        "{err}"
    );
    // A clean stop is quiet: the relay connection closing with it is not reported as lost
    // (issue 19: users read that warning as a fault).
    let mut a = a;
    let _ = Command::new("kill")
        .args(["-TERM", &a.pid().to_string()])
        .status();
    let exited = a.wait_exit(Duration::from_secs(5));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    let log = a.log();
    let stopping = log.find("stopping").expect("the stop is logged");
    assert!(
        !log[stopping..].contains("WARN"),
        "a clean stop logged a warning:\n{}",
        &log[stopping..]
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// The README's run command: `netbird-proxy demo` prints curl commands that work as printed,
/// and `netbird-proxy status` finds it (issue 19: the demo served no status endpoint).
#[test]
fn demo_prints_curl_commands_that_work() {
    let status = free_port_block(1).to_string();
    let mut child = Command::new(binary())
        .args([
            "demo",
            "--socks",
            "0",
            "--http",
            "0",
            "--status-addr",
            &status,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let socks_cmd = lines.next().unwrap().unwrap();
    let http_cmd = lines.next().unwrap().unwrap();
    for cmd in [socks_cmd, http_cmd] {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        assert_eq!(args[0], "curl", "{cmd}");
        let (code, body, err) = fetch_until_ok(&args[1..], Duration::from_secs(20));
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(String::from_utf8_lossy(&body).contains("Hello from the NetBird mesh"));
    }
    let out = Command::new(binary())
        .args(["status", "--status-addr", &status])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("web.netbird.test"),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "demo did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A wrong setup key: one clear line, exit 2. Unreachable management: the attempts are logged
/// with backoff, and Ctrl-C ends it at once.
#[test]
fn refused_login_exits_2_and_unreachable_management_retries_until_ctrl_c() {
    let mesh = DevMeshProcess::start(1);
    let state_dir = std::env::temp_dir().join(format!("nbp-login-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let state = state_dir.join("state");
    let out = Command::new(binary())
        .args([
            "--management-url",
            &mesh.management,
            "--setup-key",
            "WRONG-KEY",
        ])
        .args(["--state", state.to_str().unwrap(), "--socks", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("netbird-proxy:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("setup key"), "{err}");
    assert!(
        !err.contains("WRONG-KEY"),
        "the setup key must not be logged"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut child = Command::new(binary())
        .args(["--management-url", &url, "--setup-key", "K", "--socks", "0"])
        .args(["--state", state.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut attempts = 0;
    while attempts < 2 {
        let line = lines.next().unwrap().unwrap();
        if line.contains("cannot reach management") {
            attempts += 1;
        }
    }
    let start = Instant::now();
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// A log line without its terminal colour codes (ESC [ ... m).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
