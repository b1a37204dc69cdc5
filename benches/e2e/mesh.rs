//! Mesh rows (`E2E_ONLY=mesh`): two netbird-proxy peers of a dev mesh, each in its own network
//! namespace, meeting through the dev mesh's relay in a third (`--force-relay`), the same with
//! ICE (direct UDP once ICE selects a pair; the time from start to that is printed) — the
//! paths NetBird users take — B as a NetBird routing peer for its own address (`routed`: A's
//! connections re-originated by B's forwarder from host sockets) — beside the same two
//! namespaces joined by static WireGuard configs (direct UDP), run interleaved in one go.
//!
//! ```text
//!   ns A 198.18.10.2 ── veth ── ns H (hub, router) ── veth ── ns B 198.18.11.2
//!   clients (this binary)       dev-mesh: management,         bench server 127.0.0.1:5201
//!   proxy --forward (mesh)      signal, relay on              proxy --expose (mesh)
//!   proxy --forward (static)    198.18.10.1                   proxy --expose (static)
//! ```
//!
//! Impaired: 10 ms each way and 0.5 % loss each way between A and the rest, on both paths.
//! Static: A's endpoint is a UDP impairment relay in H (`e2e impair`, as the other impaired
//! rows). Relayed: A's TCP connection to the relay goes (by DNAT in A) through `e2e tcpdelay`
//! in H, which delays each direction by 10 ms, and nftables in H drops 0.5 % of the packets of
//! that connection each way (this kernel has no `sch_netem`).
//!
//! Every row is min / median / max over `max(E2E_RUNS, 10)` runs of 3 s; a run under half its
//! row's median is a collapse, printed, and the benchmark exits non-zero. CPU per Gbit/s is
//! the CPU time (user + system) both peers' proxies — and, for the relayed path, the dev
//! mesh's relay — spent during that path's runs, over the data those runs moved; syscalls per
//! MiB the same processes' system calls (`perf stat`, installed when missing) over the first
//! 3 s of each run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::common::{sh, sh_quiet, write_private};
use super::{Proxy, SERVER_PORT, key_pair, run_count, self_command, spawn_until_line};

const MESH_SECS: u64 = 3;
const MIN_RUNS: usize = 10;
const HUB_A: &str = "198.18.10.1";
const A_ADDR: &str = "198.18.10.2";
/// H's side of the B link (B's default route).
const HUB_B: &str = "198.18.11.1";
const B_ADDR: &str = "198.18.11.2";
const MANAGEMENT_PORT: u16 = 33073;
/// The dev mesh serves its relay two ports after management.
const RELAY_PORT: u16 = MANAGEMENT_PORT + 2;
const RELAY_DELAY_PORT: u16 = 33180;
const STATIC_A_PORT: u16 = 51901;
const STATIC_B_PORT: u16 = 51902;
const STATIC_IMPAIR_PORT: u16 = 51950;
const SETUP_KEY: &str = "E2E-MESH-KEY";
/// B's UDP echo (on its loopback, exposed by both peers), for the UDP rows.
const UDP_PORT: u16 = 5202;
/// The tunnel MTU the dev mesh gives its peers (NetBird's 1280); the static row uses it too,
/// so the rows compare paths, not packet sizes (at wg-quick's 1420 the static row carries
/// 11 % more payload per packet).
const MESH_MTU: u16 = 1280;
const DOMAIN: &str = "mesh.test";

/// `tcpdelay LISTEN UPSTREAM DELAY_MS`: forward TCP connections from LISTEN to UPSTREAM, each
/// direction's bytes held for DELAY_MS before they are written on.
pub fn tcp_delay(args: &[String]) {
    let listener = TcpListener::bind(&args[0]).expect("tcpdelay listen");
    let upstream: SocketAddr = args[1].parse().unwrap();
    let delay = Duration::from_millis(args[2].parse().unwrap());
    println!("READY");
    std::io::stdout().flush().unwrap();
    for conn in listener.incoming() {
        let Ok(down) = conn else { continue };
        let Ok(up) = TcpStream::connect(upstream) else {
            continue;
        };
        for s in [&down, &up] {
            let _ = s.set_nodelay(true);
        }
        for (from, to) in [
            (down.try_clone().unwrap(), up.try_clone().unwrap()),
            (up, down),
        ] {
            delayed_pump(from, to, delay);
        }
    }
}

/// Copy `from` to `to`, each read written `delay` after it arrived.
fn delayed_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
                || n == 0
            {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, data) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if data.is_empty() || to.write_all(&data).is_err() {
                let _ = to.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    });
}

/// The three namespaces and everything running in them; dropping it removes it all.
struct MeshBed {
    tag: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl MeshBed {
    fn ns(&self, which: &str) -> String {
        format!("nbm{which}{}", self.tag)
    }

    fn new() -> Self {
        let tag = (std::process::id() % 100000).to_string();
        let dir = std::env::temp_dir().join(format!("netbird-proxy-e2e-mesh-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bed = MeshBed {
            tag,
            dir,
            children: Vec::new(),
        };
        let (a, h, b) = (bed.ns("a"), bed.ns("h"), bed.ns("b"));
        for ns in [&a, &h, &b] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        for (peer, hub_addr, peer_addr, link) in
            [(&a, HUB_A, A_ADDR, "a"), (&b, HUB_B, B_ADDR, "b")]
        {
            let (hv, pv) = (
                format!("nbmh{link}{}", bed.tag),
                format!("nbmp{link}{}", bed.tag),
            );
            sh(&[
                "ip", "-n", &h, "link", "add", &hv, "type", "veth", "peer", "name", &pv,
            ]);
            sh(&["ip", "-n", &h, "link", "set", &pv, "netns", peer]);
            sh(&[
                "ip",
                "-n",
                &h,
                "addr",
                "add",
                &format!("{hub_addr}/30"),
                "dev",
                &hv,
            ]);
            sh(&["ip", "-n", &h, "link", "set", &hv, "up"]);
            sh(&[
                "ip",
                "-n",
                peer,
                "addr",
                "add",
                &format!("{peer_addr}/30"),
                "dev",
                &pv,
            ]);
            sh(&["ip", "-n", peer, "link", "set", &pv, "up"]);
            sh(&["ip", "-n", peer, "route", "add", "default", "via", hub_addr]);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &h,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        bed
    }

    fn spawn(&mut self, cmd: &mut Command) {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Sum of user + system CPU seconds of `pids`.
    fn cpu_seconds(pids: &[u32]) -> f64 {
        let ticks = 100.0; // USER_HZ
        pids.iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                // Fields after the parenthesised command name: utime is the 12th, stime the 13th.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                (utime + stime) / ticks
            })
            .sum()
    }
}

impl Drop for MeshBed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for which in ["a", "b", "h"] {
            let ns = self.ns(which);
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    sh_quiet(&["kill", "-9", pid]);
                }
            }
            sh_quiet(&["ip", "netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One way of reaching B's bench server from A: the forward listener in A, the processes
/// whose CPU counts for it.
struct MeshPath {
    name: &'static str,
    forward: SocketAddr,
    /// A's UDP forward to B's exposed UDP echo (the UDP rows), where the path has one.
    udp_forward: Option<SocketAddr>,
    pids: Vec<u32>,
    _proxies: Vec<Proxy>,
}

/// One client run in A; Mbit/s, or None if it failed.
fn try_run(bed: &MeshBed, path: &MeshPath, kind: &str, secs: u64) -> Option<f64> {
    let target = if kind == "udp" {
        path.udp_forward?
    } else {
        path.forward
    };
    let out = self_command(Some(&bed.ns("a")))
        .args([
            "client",
            kind,
            &target.to_string(),
            "direct",
            &secs.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
}

/// One UDP client run in A through the path's UDP forward: echoed Mbit/s, datagrams lost,
/// datagrams sent.
fn try_run_udp(bed: &MeshBed, path: &MeshPath, secs: u64) -> Option<(f64, u64, u64)> {
    let out = self_command(Some(&bed.ns("a")))
        .args([
            "client",
            "udp",
            &path.udp_forward?.to_string(),
            "direct",
            &secs.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let mut v = line.split_whitespace();
    Some((
        v.next()?.parse().ok()?,
        v.next()?.parse().ok()?,
        v.next()?.parse().ok()?,
    ))
}

/// Wait until `path` carries a short transfer (peers found each other, handshakes done).
fn warm_up(bed: &MeshBed, path: &MeshPath) {
    let start = Instant::now();
    while try_run(bed, path, "up", 1).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never came up",
            path.name
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The dev mesh's two peers in A and B. With `impaired`, A reaches the relay through the
/// delaying forwarder (DNAT in A) whose packets H drops at random.
fn relayed_path(bed: &mut MeshBed, mesh_pid: u32, impaired: bool) -> MeshPath {
    let (a, b, h) = (bed.ns("a"), bed.ns("b"), bed.ns("h"));
    let management = format!("http://{HUB_A}:{MANAGEMENT_PORT}");
    let tag = if impaired { "imp" } else { "clean" };
    let state = |name: &str| bed.dir.join(format!("{name}-{tag}.state"));
    let peer_b = Proxy::start_in(
        Some(&b),
        &[
            "--management-url",
            &management,
            "--setup-key",
            SETUP_KEY,
            "--hostname",
            &format!("b{tag}"),
            "--state",
            state("b").to_str().unwrap(),
            "--expose",
            &format!("{SERVER_PORT}=127.0.0.1:{SERVER_PORT}"),
            "--expose",
            &format!("{UDP_PORT}=127.0.0.1:{UDP_PORT}/udp"),
            // The relay row measures the relay: no ICE (the direct row has it).
            "--force-relay",
        ],
    );
    if impaired {
        let (child, line) = spawn_until_line(self_command(Some(&h)).args([
            "tcpdelay",
            &format!("{HUB_A}:{RELAY_DELAY_PORT}"),
            &format!("{HUB_A}:{RELAY_PORT}"),
            "10",
        ]));
        assert_eq!(line.trim(), "READY", "tcpdelay");
        bed.children.push(child);
        let rules = format!(
            "table ip nbmesh {{\n\
               chain out {{ type nat hook output priority -100; ip daddr {HUB_A} tcp dport {RELAY_PORT} dnat to {HUB_A}:{RELAY_DELAY_PORT}; }}\n\
             }}\n"
        );
        nft(&a, &rules);
        let loss = format!(
            "table ip nbloss {{\n\
               chain in {{ type filter hook input priority 0; ip saddr {A_ADDR} tcp dport {RELAY_DELAY_PORT} numgen random mod 1000 < 5 drop; }}\n\
               chain out {{ type filter hook output priority 0; ip daddr {A_ADDR} tcp sport {RELAY_DELAY_PORT} numgen random mod 1000 < 5 drop; }}\n\
             }}\n"
        );
        nft(&h, &loss);
    }
    let peer_a = Proxy::start_in(
        Some(&a),
        &[
            "--management-url",
            &management,
            "--setup-key",
            SETUP_KEY,
            "--hostname",
            &format!("a{tag}"),
            "--state",
            state("a").to_str().unwrap(),
            "--forward",
            &format!("127.0.0.1:0:b{tag}.{DOMAIN}:{SERVER_PORT}"),
            "--forward",
            &format!("127.0.0.1:0:b{tag}.{DOMAIN}:{UDP_PORT}/udp"),
            "--force-relay",
        ],
    );
    // The impairment (tcpdelay, like the static path's impair relay) is not counted.
    MeshPath {
        name: "relayed",
        forward: peer_a.forwards[0],
        udp_forward: peer_a.forwards.get(1).copied(),
        pids: vec![peer_a.pid(), peer_b.pid(), mesh_pid],
        _proxies: vec![peer_a, peer_b],
    }
}

/// A's status port, for the direct row's time to a direct path.
const DIRECT_STATUS_PORT: u16 = 33190;

/// The dev mesh's two peers in A and B with ICE (the default): host candidates across H, so
/// the path is direct UDP as soon as ICE selects it. Prints the time from A's start to that,
/// which with lazy connections includes the first connection waking B.
fn direct_path(bed: &mut MeshBed) -> MeshPath {
    let (a, b) = (bed.ns("a"), bed.ns("b"));
    let management = format!("http://{HUB_A}:{MANAGEMENT_PORT}");
    let state = |name: &str| bed.dir.join(format!("{name}-direct.state"));
    let peer_b = Proxy::start_in(
        Some(&b),
        &[
            "--management-url",
            &management,
            "--setup-key",
            SETUP_KEY,
            "--hostname",
            "bdirect",
            "--state",
            state("b").to_str().unwrap(),
            "--expose",
            &format!("{SERVER_PORT}=127.0.0.1:{SERVER_PORT}"),
            "--expose",
            &format!("{UDP_PORT}=127.0.0.1:{UDP_PORT}/udp"),
        ],
    );
    let started = Instant::now();
    let status = format!("127.0.0.1:{DIRECT_STATUS_PORT}");
    let peer_a = Proxy::start_in(
        Some(&a),
        &[
            "--management-url",
            &management,
            "--setup-key",
            SETUP_KEY,
            "--hostname",
            "adirect",
            "--state",
            state("a").to_str().unwrap(),
            "--forward",
            &format!("127.0.0.1:0:bdirect.{DOMAIN}:{SERVER_PORT}"),
            "--forward",
            &format!("127.0.0.1:0:bdirect.{DOMAIN}:{UDP_PORT}/udp"),
            "--status-addr",
            &status,
        ],
    );
    let url = format!("http://{status}/status");
    // Lazy connections (the default) set B up on first traffic: a connection through the
    // forward, once a second until the path is direct.
    let poke = format!("echo > /dev/tcp/127.0.0.1/{}", peer_a.forwards[0].port());
    let mut poked = None::<std::time::Instant>;
    loop {
        if poked.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            let _ = Command::new("ip")
                .args(["netns", "exec", &a, "timeout", "1", "bash", "-c", &poke])
                .output();
            poked = Some(std::time::Instant::now());
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &a, "curl", "-s", "--max-time", "2", &url])
            .output()
            .expect("curl");
        if String::from_utf8_lossy(&out.stdout).contains("\"connection\": \"direct\"") {
            eprintln!(
                "mesh direct: A direct to B {:.2} s after A started",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the mesh peers never went direct"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    MeshPath {
        name: "direct",
        forward: peer_a.forwards[0],
        udp_forward: peer_a.forwards.get(1).copied(),
        pids: vec![peer_a.pid(), peer_b.pid()],
        _proxies: vec![peer_a, peer_b],
    }
}

/// B as a routing peer (NetBird route `bench-lan` = B's underlay address, direct with ICE): A
/// forwards to that address, B's forwarder re-originates each connection from a host socket to
/// the bench server there. The cost of routing next to `direct`, which reaches the same server
/// through an exposed port.
fn routed_path(bed: &mut MeshBed) -> MeshPath {
    let (a, b) = (bed.ns("a"), bed.ns("b"));
    let management = format!("http://{HUB_A}:{MANAGEMENT_PORT}");
    let state = |name: &str| bed.dir.join(format!("{name}-routed.state"));
    let peer_b = Proxy::start_in(
        Some(&b),
        &[
            "--management-url",
            &management,
            "--setup-key",
            SETUP_KEY,
            "--hostname",
            "brouted",
            "--state",
            state("b").to_str().unwrap(),
            // The route's target is B's own address: allowed here on purpose.
            "--route-to-host",
        ],
    );
    let peer_a = Proxy::start_in(
        Some(&a),
        &[
            "--management-url",
            &management,
            "--setup-key",
            SETUP_KEY,
            "--hostname",
            "arouted",
            "--state",
            state("a").to_str().unwrap(),
            "--forward",
            &format!("127.0.0.1:0:{B_ADDR}:{SERVER_PORT}"),
            "--mesh-only",
        ],
    );
    MeshPath {
        name: "routed",
        forward: peer_a.forwards[0],
        udp_forward: None,
        pids: vec![peer_a.pid(), peer_b.pid()],
        _proxies: vec![peer_a, peer_b],
    }
}

/// The dev mesh's account for the routed row.
const NETWORKS: &str = r#"
[[routes]]
net_id = "bench-lan"
network = "198.18.11.2/32"
peers = ["brouted"]
"#;

/// The same two namespaces with static configs: A's WireGuard endpoint is B across H (or,
/// impaired, H's impairment relay in front of B).
fn static_path(bed: &mut MeshBed, impaired: bool) -> MeshPath {
    let (a, b, h) = (bed.ns("a"), bed.ns("b"), bed.ns("h"));
    let tag = if impaired { "imp" } else { "clean" };
    let (a_priv, a_pub, _) = key_pair(&bed.dir, &format!("static-a-{tag}"));
    let (b_priv, b_pub, _) = key_pair(&bed.dir, &format!("static-b-{tag}"));
    let (a_port, b_port) = if impaired {
        (STATIC_A_PORT + 10, STATIC_B_PORT + 10)
    } else {
        (STATIC_A_PORT, STATIC_B_PORT)
    };
    let endpoint = if impaired {
        let listen = format!("{HUB_A}:{STATIC_IMPAIR_PORT}");
        let (child, line) = spawn_until_line(self_command(Some(&h)).args([
            "impair",
            &listen,
            &format!("{B_ADDR}:{b_port}"),
            "10",
            "0.5",
        ]));
        assert_eq!(line.trim(), "READY", "impairment relay");
        bed.children.push(child);
        listen
    } else {
        format!("{B_ADDR}:{b_port}")
    };
    let conf = |name: &str, text: String| {
        let path = bed.dir.join(format!("{name}-{tag}.conf"));
        write_private(&path, &text);
        path
    };
    // B learns A's endpoint from A's handshakes (through the impairment relay, if any).
    let ca = conf(
        "static-a",
        format!(
            "[Interface]\nPrivateKey = {a_priv}\nAddress = 100.64.3.1/24\nListenPort = {a_port}\n\
             MTU = {MESH_MTU}\n\n\
             [Peer]\nPublicKey = {b_pub}\nEndpoint = {endpoint}\nAllowedIPs = 100.64.3.2/32\n\
             PersistentKeepalive = 25\n"
        ),
    );
    let cb = conf(
        "static-b",
        format!(
            "[Interface]\nPrivateKey = {b_priv}\nAddress = 100.64.3.2/24\nListenPort = {b_port}\n\
             MTU = {MESH_MTU}\n\n\
             [Peer]\nPublicKey = {a_pub}\nAllowedIPs = 100.64.3.1/32\n"
        ),
    );
    let peer_b = Proxy::start_in(
        Some(&b),
        &[
            "--wg-config",
            cb.to_str().unwrap(),
            "--expose",
            &format!("{SERVER_PORT}=127.0.0.1:{SERVER_PORT}"),
            "--expose",
            &format!("{UDP_PORT}=127.0.0.1:{UDP_PORT}/udp"),
        ],
    );
    let peer_a = Proxy::start_in(
        Some(&a),
        &[
            "--wg-config",
            ca.to_str().unwrap(),
            "--forward",
            &format!("127.0.0.1:0:100.64.3.2:{SERVER_PORT}"),
            "--forward",
            &format!("127.0.0.1:0:100.64.3.2:{UDP_PORT}/udp"),
        ],
    );
    MeshPath {
        name: "static",
        forward: peer_a.forwards[0],
        udp_forward: peer_a.forwards.get(1).copied(),
        pids: vec![peer_a.pid(), peer_b.pid()],
        _proxies: vec![peer_a, peer_b],
    }
}

/// `perf stat` counting the system calls of some processes for a while (Linux's
/// `raw_syscalls:sys_enter` tracepoint); None where perf is missing or not allowed.
struct SyscallCount {
    child: Child,
    out: PathBuf,
}

impl SyscallCount {
    fn start(pids: &[u32], secs: u64) -> Option<Self> {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let out = std::env::temp_dir().join(format!("nb-e2e-perf-{}", std::process::id()));
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pids.join(","))
            .arg("-o")
            .arg(&out)
            .args(["--", "sleep", &secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Self { child, out })
    }

    fn finish(mut self) -> Option<f64> {
        self.child.wait().ok()?.success().then_some(())?;
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        text.lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    }
}

fn nft(ns: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft rules in {ns}");
}

/// min / median / max, and the runs under half the median.
struct Stats {
    min: f64,
    median: f64,
    max: f64,
    collapsed: Vec<f64>,
}

fn stats(runs: &[f64]) -> Stats {
    let mut v = runs.to_vec();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    Stats {
        min: v[0],
        median,
        max: v[v.len() - 1],
        collapsed: v.iter().copied().filter(|&r| r < median / 2.0).collect(),
    }
}

/// Measure both paths under one condition, interleaved; print the rows. False if any row
/// collapsed.
fn condition(bed: &mut MeshBed, mesh_pid: u32, impaired: bool, report: &mut Vec<String>) -> bool {
    let cond = if impaired {
        "10 ms + 0.5 % loss each way"
    } else {
        "clean"
    };
    // The direct row runs clean only: impairing it would need a UDP impairment between the
    // peers' ICE addresses, which this kernel (no sch_netem) lacks.
    let mut paths = vec![relayed_path(bed, mesh_pid, impaired)];
    if !impaired {
        paths.push(direct_path(bed));
        paths.push(routed_path(bed));
    }
    paths.push(static_path(bed, impaired));
    let static_index = paths.len() - 1;
    for p in &paths {
        warm_up(bed, p);
    }
    let runs = run_count().max(MIN_RUNS);
    let mut ok = true;
    // UDP runs clean only: its window waits a second for a lost datagram, so loss would
    // measure the timeout, not the path.
    let kinds: &[&str] = if impaired {
        &["up", "down"]
    } else {
        &["up", "down", "udp"]
    };
    for &kind in kinds {
        let mut results = vec![Vec::new(); paths.len()];
        let mut lost = vec![(0u64, 0u64); paths.len()];
        let mut cpu = vec![0.0; paths.len()];
        let mut gbits = vec![0.0; paths.len()];
        let mut syscalls = vec![0.0; paths.len()];
        let mut counted_mib = vec![0.0; paths.len()];
        for _ in 0..runs {
            for (i, p) in paths.iter().enumerate() {
                if kind == "udp" && p.udp_forward.is_none() {
                    continue;
                }
                let before = MeshBed::cpu_seconds(&p.pids);
                let counting = SyscallCount::start(&p.pids, MESH_SECS);
                let mbit = match kind {
                    "udp" => {
                        let (mbit, gone, sent) =
                            try_run_udp(bed, p, MESH_SECS).unwrap_or((0.0, 0, 0));
                        lost[i].0 += gone;
                        lost[i].1 += sent;
                        mbit
                    }
                    _ => try_run(bed, p, kind, MESH_SECS).unwrap_or(0.0),
                };
                cpu[i] += MeshBed::cpu_seconds(&p.pids) - before;
                gbits[i] += mbit * MESH_SECS as f64 / 1000.0;
                if let Some(calls) = counting.and_then(SyscallCount::finish) {
                    syscalls[i] += calls;
                    counted_mib[i] += mbit * MESH_SECS as f64 / 8.0 / 1.048_576;
                }
                results[i].push(mbit);
            }
        }
        let dir = match kind {
            "up" => "upload".to_string(),
            "down" => "download".to_string(),
            _ => "UDP echo, 1200 B datagrams".to_string(),
        };
        let static_median = stats(&results[static_index]).median;
        for (i, p) in paths.iter().enumerate() {
            if results[i].is_empty() {
                continue;
            }
            let s = stats(&results[i]);
            let dir = if kind == "udp" {
                format!("{dir} ({} of {} lost)", lost[i].0, lost[i].1)
            } else {
                dir.clone()
            };
            eprintln!("mesh {} {dir} ({cond}): runs {:?}", p.name, results[i]);
            if !s.collapsed.is_empty() {
                ok = false;
                eprintln!(
                    "COLLAPSE: mesh {} {dir} ({cond}): {} of {runs} runs under half the median \
                     {:.0} Mbit/s: {:?}",
                    p.name,
                    s.collapsed.len(),
                    s.median,
                    s.collapsed
                );
            }
            report.push(format!(
                "| {} | {dir} | {cond} | {:.0} / {:.0} / {:.0} | {:.2}× | {} | {:.2} | {} |",
                p.name,
                s.min,
                s.median,
                s.max,
                s.median / static_median,
                s.collapsed.len(),
                cpu[i] / gbits[i].max(1e-9),
                if counted_mib[i] > 0.0 {
                    format!("{:.0}", syscalls[i] / counted_mib[i])
                } else {
                    "n/a".into()
                },
            ));
        }
    }
    ok
}

/// Build the mesh bed, measure clean and impaired, print the table; false on a collapse.
pub fn run() -> bool {
    if Command::new("perf").arg("--version").output().is_err() {
        sh_quiet(&["apt-get", "install", "-y", "-q", "linux-perf"]);
    }
    let mut bed = MeshBed::new();
    let h = bed.ns("h");
    // The bench server in B, on B's loopback (both peers expose it), and on B's address for
    // the routed row.
    let server = format!("127.0.0.1:{SERVER_PORT}");
    bed.spawn(self_command(Some(&bed.ns("b"))).args(["serve", &server]));
    bed.spawn(self_command(Some(&bed.ns("b"))).args(["udpecho", &format!("127.0.0.1:{UDP_PORT}")]));
    let routed_server = format!("{B_ADDR}:{SERVER_PORT}");
    bed.spawn(self_command(Some(&bed.ns("b"))).args(["serve", &routed_server]));
    let networks = bed.dir.join("networks.toml");
    std::fs::write(&networks, NETWORKS).unwrap();
    let mesh = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h,
            env!("CARGO_BIN_EXE_netbird-proxy"),
            "dev-mesh",
        ])
        .args(["--listen", &format!("{HUB_A}:{MANAGEMENT_PORT}")])
        .args(["--setup-key", SETUP_KEY, "--domain", DOMAIN, "--networks"])
        .arg(&networks)
        .env("NB_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dev-mesh");
    let mesh_pid = mesh.id();
    bed.children.push(mesh);
    std::thread::sleep(Duration::from_millis(500));
    let mut report = Vec::new();
    let mut ok = condition(&mut bed, mesh_pid, false, &mut report);
    ok &= condition(&mut bed, mesh_pid, true, &mut report);
    println!();
    println!(
        "Mesh paths (A and B in their own namespaces; {} runs of {MESH_SECS} s each, interleaved):",
        run_count().max(MIN_RUNS)
    );
    println!();
    println!(
        "| path | direction | condition | Mbit/s min / median / max | median vs static | collapses | CPU s per Gbit | syscalls per MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in &report {
        println!("{line}");
    }
    ok
}
