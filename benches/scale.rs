//! What a large NetBird account costs one proxy peer (issue 20): a dev mesh whose map lists N
//! registered peers that never connect (`dev-mesh --simulated-peers N`, as most peers of a big
//! account are), and one `netbird-proxy` joining it, for N = 100, 1 000 and 5 000.
//!
//!     cargo bench --bench scale            # SCALE_SIZES=100,1000 SCALE_RUNS=10 to change
//!
//! Per run, from the proxy's own status endpoint and /proc:
//! - **ready**: seconds from spawning the proxy to `/readyz` answering 200;
//! - **full map**: milliseconds applying the first map took (the engine's own timing);
//! - **one-peer change**: milliseconds applying the update a newly registered peer caused (the
//!   bench registers it itself with one Login call, so no peer process starts meanwhile and
//!   competes for the two cores: that is the apply's cost, not the machine's load);
//! - **RSS**, **fds**, **threads** and **tasks** (tokio's, from `/metrics`) after the proxy
//!   has been idle for a few seconds;
//! - **idle CPU**: CPU seconds the proxy used in `IDLE_WINDOW` of doing nothing;
//! - **signal messages sent** and **relay connections opened** over the whole run (start,
//!   ready, the join, the first byte, a second, the idle window: about `IDLE_WINDOW` + 3 s
//!   past ready), or, with `SCALE_MINUTE=1`, over the proxy's first minute (each run then
//!   lasts a minute);
//! - **first byte to a new idle peer**: milliseconds from a SOCKS5 CONNECT through the proxy
//!   to the joined peer's exposed echo until one byte comes back — with lazy connections the
//!   peer is idle until then, so this is its whole set-up over the relay.
//!
//! `SCALE_POLICY=1` gives every map NetBird's default All-to-All policy: a firewall rule per
//! peer and direction, which a join changes too.
//!
//! First, per N, **the mesh state alone** (in this process, no engine and nothing else on the
//! cores): a map shaped like a real account's (a peer entry, two default-policy rules and a
//! DNS record per peer) applied as sent: the full map, a one-peer change (a peer joins, then
//! leaves) and an unchanged map (a serial bump). `SCALE_IN_PROCESS_ONLY=1` stops there.
//!
//! Every row prints min / median / max over the runs; a run over twice its row's median (these
//! are costs: more is worse) is a collapse, printed, and the bench exits non-zero. Two rows
//! have a floor under which a difference is noise, not a collapse: idle CPU (the kernel counts
//! it in 10 ms ticks) and the map apply times (1 ms: a sub-millisecond apply that waits once
//! for a busy worker or a page fault doubles without costing anything that grows).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the proxy is watched doing nothing.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_netbird-proxy")
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on a status endpoint: (status code, body), or None when nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: status\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// Signal messages sent and relay connections opened, from the proxy's status.
fn control_counts(addr: SocketAddr) -> Option<(f64, f64)> {
    let (_, body) = get(addr, "/status")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((
        v["signal"]["sent"].as_f64()?,
        v["relay"]["opened"].as_f64()?,
    ))
}

/// The `map` object of the proxy's status: (serial, peers, updates, last_apply_ms).
fn map_status(addr: SocketAddr) -> Option<(u64, u64, u64, f64)> {
    let (_, body) = get(addr, "/status")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let m = v.get("map")?;
    Some((
        m["serial"].as_u64()?,
        m["peers"].as_u64()?,
        m["updates"].as_u64()?,
        m["last_apply_ms"].as_f64()?,
    ))
}

/// Fields of /proc/PID/status and /proc/PID/stat: (RSS KiB, threads, CPU seconds).
fn proc_stats(pid: u32) -> (f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field, stime
    // the 15th; clock ticks are 100 per second on Linux.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let cpu = (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0;
    (field("VmRSS:"), field("Threads:"), cpu)
}

/// Register a new peer called `name` with one Login (a fresh key), as a peer that joins and
/// goes away at once would.
fn register(management: &str, key: &str, name: &str) {
    use netbird_proxy::control::management_client::{ManagementClient, system_meta};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let private_key: [u8; 32] = rand::random();
        let mut client = ManagementClient::connect(management, private_key)
            .await
            .expect("management");
        client
            .login(Some(key), system_meta(name, true))
            .await
            .expect("login");
    });
}

/// Tokio tasks alive in the proxy (`netbird_proxy_tasks` on /metrics).
fn tasks(status: SocketAddr) -> f64 {
    let (_, body) = get(status, "/metrics").expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("netbird_proxy_tasks "))
        .and_then(|v| v.trim().parse().ok())
        .expect("netbird_proxy_tasks on /metrics")
}

fn open_fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as f64)
        .unwrap_or(0.0)
}

/// A dev mesh with `n` simulated peers: (process, management URL, setup key).
/// NetBird's default policy (All to All): with `SCALE_POLICY=1` every map carries a firewall
/// rule per peer and direction, as a real account's does, and a join changes them.
const DEFAULT_POLICY: &str = r#"
[[policies]]
name = "Default"
sources = ["All"]
destinations = ["All"]
bidirectional = true
"#;

fn dev_mesh(n: usize) -> (Proc, String, String) {
    let mut cmd = Command::new(binary());
    cmd.args(["dev-mesh", "--listen", "127.0.0.1:0", "--simulated-peers"])
        .arg(n.to_string());
    if std::env::var("SCALE_POLICY").is_ok_and(|v| v == "1") {
        let file =
            std::env::temp_dir().join(format!("nbp-scale-policy-{}.toml", std::process::id()));
        std::fs::write(&file, DEFAULT_POLICY).unwrap();
        cmd.arg("--networks").arg(file);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dev-mesh");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let management = lines.next().unwrap().unwrap();
    let key = lines.next().unwrap().unwrap();
    (
        Proc(child),
        management.trim_start_matches("management ").to_string(),
        key.trim_start_matches("setup-key ").to_string(),
    )
}

fn peer(
    management: &str,
    key: &str,
    state: &PathBuf,
    name: &str,
    status: Option<u16>,
    lazy: bool,
    extra: &[&str],
) -> Proc {
    let mut cmd = Command::new(binary());
    cmd.args(["--management-url", management, "--setup-key", key])
        .arg("--state")
        .arg(state)
        .args([
            "--hostname",
            name,
            "--ready-peers",
            "0",
            "--lazy-connections",
        ])
        .arg(if lazy { "on" } else { "off" })
        .env("NB_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(port) = status {
        cmd.args(["--status-addr", &format!("127.0.0.1:{port}")]);
    }
    cmd.args(extra);
    Proc(cmd.spawn().expect("netbird-proxy"))
}

#[derive(Default)]
struct Rows {
    ready_s: Vec<f64>,
    full_map_ms: Vec<f64>,
    one_peer_ms: Vec<f64>,
    rss_mib: Vec<f64>,
    fds: Vec<f64>,
    threads: Vec<f64>,
    tasks: Vec<f64>,
    idle_cpu_s: Vec<f64>,
    signal_sent: Vec<f64>,
    relay_opened: Vec<f64>,
    first_byte_ms: Vec<f64>,
}

/// Seconds from a SOCKS5 CONNECT to `host:port` through `socks` until one byte sent comes
/// back from the echo there.
fn first_byte(socks: SocketAddr, host: &str, port: u16) -> f64 {
    let start = Instant::now();
    let mut s = TcpStream::connect(socks).expect("the probe's SOCKS5 listener");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut greeting = [0u8; 2];
    s.read_exact(&mut greeting).unwrap();
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        head[1], 0,
        "SOCKS5 reply {:#04x} for {host}:{port}",
        head[1]
    );
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        _ => panic!("unexpected SOCKS5 address type {}", head[3]),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound).unwrap();
    s.write_all(b"x").unwrap();
    let mut echo = [0u8; 1];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"x");
    start.elapsed().as_secs_f64()
}

/// A TCP echo server on loopback for the joiners to expose; its port.
fn echo_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn run_once(
    n: usize,
    lazy: bool,
    echo_port: u16,
    management: &str,
    key: &str,
    dir: &std::path::Path,
    run: usize,
) -> Rows {
    let status_port = free_port();
    let status: SocketAddr = ([127, 0, 0, 1], status_port).into();
    // Each joiner is a new peer (its own name and identity), whatever the mode.
    let tag = if lazy { "lazy" } else { "eager" };
    let socks: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let started = Instant::now();
    let probe = peer(
        management,
        key,
        &dir.join("probe"),
        "probe",
        Some(status_port),
        lazy,
        &["--socks", &socks.to_string()],
    );
    let deadline = started + Duration::from_secs(120);
    while get(status, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "n={n}: not ready in 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready = started.elapsed().as_secs_f64();
    let (serial, peers, _, full) = map_status(status).expect("map status");
    assert!(peers as usize >= n, "the map lists {peers} of {n} peers");
    // One more peer registers: every map changes by one.
    register(management, key, &format!("silent-{tag}-{run}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let one = loop {
        if let Some((s, p, _, ms)) = map_status(status)
            && s > serial
            && p > peers
        {
            break ms;
        }
        assert!(
            Instant::now() < deadline,
            "n={n}: the registered peer never reached the map"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // And a peer joins (lazy, serving an echo), for the first byte.
    let joiner_status = free_port();
    let joiner = peer(
        management,
        key,
        &dir.join(format!("joiner-{tag}-{run}")),
        &format!("joiner-{tag}-{run}"),
        Some(joiner_status),
        true,
        &["--expose", &format!("7000=127.0.0.1:{echo_port}")],
    );
    // The first byte to the joiner through the probe's SOCKS5 listener: the joiner is idle
    // (lazy, never used), so this is the wake-up, the offer and the relay set-up.
    let joiner_ready: SocketAddr = ([127, 0, 0, 1], joiner_status).into();
    while get(joiner_ready, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "n={n}: the joiner was never ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The probe knows the joiner (its name resolves) before the clock starts.
    while map_status(status).is_none_or(|(_, p, _, _)| p < peers + 2) {
        assert!(
            Instant::now() < deadline,
            "n={n}: the joiner never reached the probe's map"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ttfb = first_byte(socks, &format!("joiner-{tag}-{run}.netbird.test"), 7000);
    drop(joiner);
    let pid = probe.0.id();
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, cpu_before) = proc_stats(pid);
    std::thread::sleep(IDLE_WINDOW);
    let (rss, threads, cpu_after) = proc_stats(pid);
    if minute_window() {
        std::thread::sleep(Duration::from_secs(60).saturating_sub(started.elapsed()));
    }
    let (sent, opened) = control_counts(status).expect("control counters");
    Rows {
        first_byte_ms: vec![ttfb * 1000.0],
        signal_sent: vec![sent],
        relay_opened: vec![opened],
        ready_s: vec![ready],
        full_map_ms: vec![full],
        one_peer_ms: vec![one],
        rss_mib: vec![rss / 1024.0],
        fds: vec![open_fds(pid)],
        threads: vec![threads],
        tasks: vec![tasks(status)],
        idle_cpu_s: vec![cpu_after - cpu_before],
    }
}

/// Whether the control-plane counts cover the first minute (`SCALE_MINUTE=1`).
fn minute_window() -> bool {
    std::env::var("SCALE_MINUTE").is_ok_and(|v| v == "1")
}

/// A row's min / median / max; runs over twice the median (and more than `resolution`
/// above it: CPU time comes in 10 ms clock ticks) are collapses.
fn summary(
    name: &str,
    unit: &str,
    v: &[f64],
    resolution: f64,
    collapses: &mut Vec<String>,
) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = s[s.len() / 2];
    let bad: Vec<f64> = v
        .iter()
        .copied()
        .filter(|&x| median > 0.0 && x > 2.0 * median && x - median > resolution)
        .collect();
    if !bad.is_empty() {
        collapses.push(format!("{name}: {bad:?} against a median of {median:.3}"));
    }
    format!(
        "{name:<44} {:>10.3} {:>10.3} {:>10.3}  {unit}",
        s[0],
        median,
        s[s.len() - 1]
    )
}

fn counts_label(signal: bool) -> &'static str {
    match (signal, minute_window()) {
        (true, true) => "signal messages sent, first minute",
        (true, false) => "signal messages sent",
        (false, true) => "relay connections opened, first minute",
        (false, false) => "relay connections opened",
    }
}

/// A Sync message as a real account's management sends it: `n` peers, NetBird's default
/// policy (an IN and an OUT rule per peer) and a DNS zone with a record per peer.
fn account_map(n: usize, serial: u64) -> bytes::Bytes {
    use netbird_proxy::control::envelope::key_string;
    use netbird_proxy::control::management::{
        CustomZone, DnsConfig, FirewallRule, NetworkMap, PeerConfig, RemotePeerConfig,
        SimpleRecord, SyncResponse,
    };
    use prost::Message as _;
    let ip = |i: usize| format!("100.64.{}.{}", (i + 2) / 250, (i + 2) % 250 + 1);
    let mut key = [7u8; 32];
    let mut peers = Vec::with_capacity(n);
    let mut rules = Vec::with_capacity(2 * n);
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        peers.push(RemotePeerConfig {
            wg_pub_key: key_string(&key),
            allowed_ips: vec![format!("{}/32", ip(i))],
            fqdn: format!("peer-{i}.netbird.cloud"),
            agent_version: "0.60.2".into(),
            ..Default::default()
        });
        for direction in [0, 1] {
            rules.push(FirewallRule {
                peer_ip: ip(i),
                direction,
                action: 0,
                protocol: 1,
                policy_id: b"default-policy".to_vec(),
                ..Default::default()
            });
        }
        records.push(SimpleRecord {
            name: format!("peer-{i}.netbird.cloud."),
            r#type: 1,
            class: "IN".into(),
            ttl: 300,
            r_data: ip(i),
        });
    }
    let resp = SyncResponse {
        network_map: Some(NetworkMap {
            serial,
            peer_config: Some(PeerConfig {
                address: "100.64.250.250/16".into(),
                fqdn: "probe.netbird.cloud".into(),
                ..Default::default()
            }),
            remote_peers: peers,
            dns_config: Some(DnsConfig {
                service_enable: true,
                custom_zones: vec![CustomZone {
                    domain: "netbird.cloud.".into(),
                    records,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            firewall_rules: rules,
            ..Default::default()
        }),
        ..Default::default()
    };
    bytes::Bytes::from(resp.encode_to_vec())
}

/// The mesh state alone, in this process (no engine, no other task on the cores): applying
/// a real account's map as sent. (full map, one-peer change, unchanged map) in ms.
fn in_process(n: usize, runs: usize) -> [Vec<f64>; 3] {
    use netbird_proxy::control::mesh::MeshState;
    let own = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let mut rows: [Vec<f64>; 3] = Default::default();
    for run in 0..runs {
        let serial = 10 * run as u64;
        let (a, b, a_again) = (
            account_map(n, serial + 1),
            account_map(n + 1, serial + 2),
            account_map(n, serial + 3),
        );
        let mut mesh = MeshState::default();
        let t = Instant::now();
        mesh.apply_encoded(&a, own).expect("full map");
        rows[0].push(ms(t));
        // A peer joins (its entry, its two rules, its DNS record), then leaves.
        for next in [&b, &a_again] {
            let t = Instant::now();
            let changes = mesh.apply_encoded(next, own).expect("one-peer change");
            rows[1].push(ms(t));
            assert!(!changes.is_empty());
        }
        let t = Instant::now();
        let changes = mesh.apply_encoded(&a_again, own).expect("unchanged map");
        rows[2].push(ms(t));
        assert!(changes.is_empty(), "{changes:?}");
    }
    rows
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let sizes: Vec<usize> = std::env::var("SCALE_SIZES")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("SCALE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    let dir = std::env::temp_dir().join(format!("nbp-scale-{}", std::process::id()));
    let mut collapses = Vec::new();
    let echo_port = echo_server();
    println!("netbird-proxy scale benchmark: one proxy peer, a map of N peers that never connect");
    println!("min / median / max over {runs} runs; idle window {IDLE_WINDOW:?}");
    for &n in &sizes {
        println!(
            "\nN = {n}, the mesh state alone: a map with NetBird's default policy and DNS zone"
        );
        println!("{:<44} {:>10} {:>10} {:>10}", "", "min", "median", "max");
        let [full, one, same] = in_process(n, runs.max(10));
        for (name, values) in [
            ("full map applied in", &full),
            ("one-peer change applied in", &one),
            ("unchanged map applied in", &same),
        ] {
            let row = format!("N={n} in-process {name}");
            println!("{}", summary(&row, "ms", values, 1.0, &mut collapses));
        }
        if std::env::var("SCALE_IN_PROCESS_ONLY").is_ok_and(|v| v == "1") {
            continue;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (_mesh, management, key) = dev_mesh(n);
        for lazy in [true, false] {
            let mut all = Rows::default();
            for run in 0..runs {
                // A fresh identity each run: the first map is a full one.
                let _ = std::fs::remove_file(dir.join("probe"));
                let r = run_once(n, lazy, echo_port, &management, &key, &dir, run);
                all.ready_s.extend(r.ready_s);
                all.full_map_ms.extend(r.full_map_ms);
                all.one_peer_ms.extend(r.one_peer_ms);
                all.rss_mib.extend(r.rss_mib);
                all.fds.extend(r.fds);
                all.threads.extend(r.threads);
                all.tasks.extend(r.tasks);
                all.idle_cpu_s.extend(r.idle_cpu_s);
                all.signal_sent.extend(r.signal_sent);
                all.relay_opened.extend(r.relay_opened);
                all.first_byte_ms.extend(r.first_byte_ms);
            }
            let mode = if lazy {
                "lazy connections (the default)"
            } else {
                "--lazy-connections off"
            };
            println!("\nN = {n}, {mode}");
            println!("{:<44} {:>10} {:>10} {:>10}", "", "min", "median", "max");
            let c = &mut collapses;
            let tag = if lazy { "lazy" } else { "eager" };
            let rows: [(&str, &str, &Vec<f64>); 11] = [
                ("time to ready", "s", &all.ready_s),
                ("full map applied in", "ms", &all.full_map_ms),
                ("one-peer change applied in", "ms", &all.one_peer_ms),
                ("RSS", "MiB", &all.rss_mib),
                ("open fds", "", &all.fds),
                ("threads", "", &all.threads),
                ("tokio tasks", "", &all.tasks),
                ("idle CPU", "s", &all.idle_cpu_s),
                (counts_label(true), "per run", &all.signal_sent),
                (counts_label(false), "per run", &all.relay_opened),
                ("first byte to a new idle peer", "ms", &all.first_byte_ms),
            ];
            for (name, unit, values) in rows {
                let resolution = match name {
                    "idle CPU" => 0.01,
                    "full map applied in" | "one-peer change applied in" => 1.0,
                    _ => 0.0,
                };
                let row = format!("N={n} {tag} {name}");
                println!("{}", summary(&row, unit, values, resolution, c));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !collapses.is_empty() {
        eprintln!("\nscale: collapsed runs (over twice their row's median):");
        for c in &collapses {
            eprintln!("  {c}");
        }
        std::process::exit(1);
    }
}
