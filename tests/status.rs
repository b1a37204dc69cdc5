//! The status endpoint and the commands that read it (issue "Operations and everyday use"):
//! `/readyz` following a real wireguard-go peer and a dev mesh, `/metrics` checked with the
//! Prometheus reference parser (Python's prometheus_client), `status` on a three-peer mesh,
//! and `wait`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::mesh::*;
use common::*;

/// A port free on loopback, below the ephemeral range (so no outgoing connection takes it).
fn free_port() -> u16 {
    free_port_block(1)
}

/// `GET path` on the status endpoint with curl: (HTTP status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn wait_readyz(port: u16, want: u16, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let (code, body) = get(port, "/readyz");
        if code == want {
            return body;
        }
        assert!(
            start.elapsed() < limit,
            "/readyz stayed {code} (wanted {want}): {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Parse `/metrics` with prometheus_client; returns `name{labels} value` lines of the samples.
fn parsed_metrics(port: u16) -> Vec<String> {
    let (code, text) = get(port, "/metrics");
    assert_eq!(code, 200);
    let script = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
        \x20       print(f'{s.name}{{{labels}}} {s.value}')\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(samples: &[String], prefix: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.starts_with(prefix))
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix}: {samples:#?}"))
}

/// Acceptance 1, static configuration: /readyz is 503 while the wireguard-go peer does not
/// know us and 200 once it does and a handshake completes; /metrics parses and its byte
/// counters grow with traffic. (A static peer may be silent for minutes, so going away is
/// seen in the dev-mesh test below, where the relay reports it.)
#[test]
fn readyz_follows_a_static_peer_and_metrics_count_traffic() {
    let bed = Testbed::new(BedOptions::default());
    let wg = |args: &[&str]| {
        sh(&[
            &["ip", "netns", "exec", &bed.ns, "wg", "set", &bed.wg_if][..],
            args,
        ]
        .concat())
    };
    // The peer forgets us first, so the start is observably not ready.
    let proxy_public = String::from_utf8(
        Command::new("ip")
            .args(["netns", "exec", &bed.ns, "wg", "show", &bed.wg_if, "peers"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(!proxy_public.is_empty());
    wg(&["peer", &proxy_public, "remove"]);

    let config = bed.dir.join("status.conf");
    write_private(
        &config,
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = {PROXY_IP}/16\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {}:51820\nAllowedIPs = 100.64.0.0/16\n\
             PersistentKeepalive = 1\n",
            bed.proxy_private, bed.peer_public, bed.underlay_peer
        ),
    );
    let port = free_port();
    let proxy = Proxy::start(
        &config,
        &["--socks", "0", "--status-addr", &port.to_string()],
    );
    assert_eq!(get(port, "/healthz"), (200, "ok\n".into()));
    let (code, body) = get(port, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("0 of the 1 peer(s)"), "{body}");

    // The peer learns our key: ready.
    wg(&[
        "peer",
        &proxy_public,
        "allowed-ips",
        &format!("{PROXY_IP}/32"),
    ]);
    wait_readyz(port, 200, Duration::from_secs(20));

    let before = parsed_metrics(port);
    let peer_label = format!("public_key={}", bed.peer_public);
    let rx = |samples: &[String]| {
        sample(
            samples,
            &format!(
                "netbird_proxy_peer_receive_bytes_total{{ip=100.64.0.0/16,peer=,{peer_label}}}"
            ),
        )
    };
    let rx_before = rx(&before);
    let file_sha = bed.random_file("m.bin", 1 << 20);
    let socks = proxy.socks.unwrap().to_string();
    let out = bed.dir.join("m.out");
    let (code, _, err) = curl(&[
        "--socks5-hostname",
        &socks,
        "-o",
        out.to_str().unwrap(),
        &format!("http://{PEER_IP}:{HTTP_PORT}/m.bin"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sha256_file(&out), file_sha);
    let after = parsed_metrics(port);
    assert!(
        rx(&after) >= rx_before + f64::from(1 << 20),
        "receive bytes {} -> {}",
        rx_before,
        rx(&after)
    );
    assert_eq!(sample(&after, "netbird_proxy_ready{} "), 1.0);
    // The handshake with wireguard-go in its namespace was timed: well under a second.
    let latency = sample(
        &after,
        &format!("netbird_proxy_peer_latency_seconds{{ip=100.64.0.0/16,peer=,{peer_label}}}"),
    );
    assert!(latency > 0.0 && latency < 1.0, "latency {latency} s");
    let socks_ok =
        format!("netbird_proxy_proxy_requests_total{{kind=socks5,listener={socks},result=0x00}}");
    assert_eq!(sample(&after, &socks_ok), 1.0);
}

/// Acceptance 1 (dev mesh) and 2: a dev-mesh peer's /readyz turns 200 once another peer is
/// connected; `status` and `status --json` show every peer of a three-peer mesh correctly.
#[test]
fn status_shows_every_peer_of_a_three_peer_mesh() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("status-mesh");
    let port = free_port();
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &[
            "--socks",
            "0",
            "--status-addr",
            &port.to_string(),
            // Readiness counts connected peers only when they connect before use.
            "--lazy-connections",
            "off",
        ],
    );
    // Alone in the mesh: not ready — first for want of a network map, then of a peer.
    let start = Instant::now();
    loop {
        let (code, body) = get(port, "/readyz");
        assert_eq!(code, 503, "{body}");
        if body.contains("0 of the 1 peer(s)") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let eager = ["--socks", "0", "--lazy-connections", "off"];
    let b = join(&mesh, &state.0, "bravo", &eager);
    let c = join(&mesh, &state.0, "charlie", &eager);
    wait_readyz(port, 200, Duration::from_secs(40));

    let status = |args: &[&str]| {
        let out = Command::new(binary())
            .args(["status", "--status-addr", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Both others connected (the second may still be connecting for a moment).
    let start = Instant::now();
    let json = loop {
        let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
        let connected = json["peers"]
            .as_array()
            .unwrap()
            .iter()
            // Latency comes with the session's first packet, just after "connected".
            .filter(|p| p["status"] == "connected" && p["latency_ms"].is_f64())
            .count();
        if connected == 2 || start.elapsed() > Duration::from_secs(40) {
            break json;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(json["mode"], "netbird");
    assert_eq!(json["ready"], true);
    assert_eq!(json["local"]["fqdn"], "alpha.mesh.test");
    assert_eq!(
        json["local"]["addresses"][0]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap(),
        a.mesh_ip.unwrap().to_string()
    );
    assert_eq!(json["management"]["connected"], true);
    assert_eq!(json["signal"]["connected"], true);
    assert_eq!(json["relay"]["connected"], true);
    let peers = json["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{json:#}");
    for (peer, name) in [(&b, "bravo.mesh.test"), (&c, "charlie.mesh.test")] {
        let p = peers
            .iter()
            .find(|p| p["fqdn"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {json:#}"));
        assert_eq!(p["ip"], peer.mesh_ip.unwrap().to_string(), "{json:#}");
        assert_eq!(p["status"], "connected", "{json:#}");
        assert!(
            p["connection"] == "relayed" || p["connection"] == "direct",
            "{json:#}"
        );
        assert!(p["last_handshake_seconds"].as_f64().unwrap() < 180.0);
        // Timed on the handshake, over loopback (through the relay or not).
        let latency = p["latency_ms"].as_f64();
        assert!(
            latency.is_some_and(|ms| ms < 1000.0),
            "latency {latency:?}: {json:#}"
        );
    }

    let table = status(&[]);
    assert!(table.contains("Ready: yes"), "{table}");
    assert!(table.contains("FQDN: alpha.mesh.test"), "{table}");
    assert!(table.contains("Peers: 2/2 connected"), "{table}");
    for (peer, name) in [(&b, "bravo.mesh.test"), (&c, "charlie.mesh.test")] {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing: {table}"));
        assert!(row.contains(&peer.mesh_ip.unwrap().to_string()), "{row}");
        assert!(row.contains("connected"), "{row}");
    }
    let detail = status(&["--detail"]);
    assert!(detail.contains(" bravo.mesh.test:"), "{detail}");
    assert!(detail.contains("Connection type: "), "{detail}");
    assert!(
        detail
            .lines()
            .any(|l| l.trim().starts_with("Latency: ") && l.ends_with(" ms")),
        "{detail}"
    );

    // One peer goes away: still ready with the other; both gone: not ready, and it says so.
    drop(b);
    std::thread::sleep(Duration::from_secs(1));
    wait_readyz(port, 200, Duration::from_secs(1));
    drop(c);
    let body = wait_readyz(port, 503, Duration::from_secs(20));
    assert!(body.contains("0 of the 1 peer(s)"), "{body}");
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    assert!(
        json["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] != "connected"),
        "{json:#}"
    );
}

/// Acceptance 5: `wait` exits 0 once ready, and 1 with the reason when the timeout passes.
#[test]
fn wait_returns_when_ready_or_fails_with_the_reason() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("status-wait");
    let ready_port = free_port();
    let never_port = free_port();
    // Readiness counts connected peers only when they connect before use: eager peers.
    let _b = join(
        &mesh,
        &state.0,
        "bravo",
        &["--socks", "0", "--lazy-connections", "off"],
    );
    let _a = join(
        &mesh,
        &state.0,
        "alpha",
        &[
            "--socks",
            "0",
            "--status-addr",
            &ready_port.to_string(),
            "--lazy-connections",
            "off",
        ],
    );
    let _n = join(
        &mesh,
        &state.0,
        "nova",
        &[
            "--socks",
            "0",
            "--status-addr",
            &never_port.to_string(),
            "--ready-peers",
            "5",
            "--lazy-connections",
            "off",
        ],
    );
    let wait = |port: u16, timeout: &str| {
        Command::new(binary())
            .args([
                "wait",
                "--status-addr",
                &port.to_string(),
                "--timeout",
                timeout,
            ])
            .output()
            .unwrap()
    };
    let out = wait(ready_port, "40s");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = wait(never_port, "2s");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not ready after") && err.contains("of the 5 peer(s)"),
        "{err}"
    );
    // Nothing listening there at all: 1, saying so.
    let out = wait(free_port(), "1s");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the status endpoint"), "{err}");
}
