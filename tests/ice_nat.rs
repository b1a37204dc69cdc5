//! Issue 16's acceptance on real NATs: two peers, each behind its own nftables NAT in network
//! namespaces, the dev mesh (management, signal, relay, STUN) on the "public" side between them
//! (ice.md §7's lab, on 198.19.0.0/16):
//!
//!     hA 198.19.11.2 — nA (wan 198.19.1.2) — pub 198.19.0.1 — nB (wan 198.19.2.2) — hB 198.19.12.2
//!
//! * endpoint-independent NATs: the peers go direct (srflx ↔ srflx through the hole punch), a
//!   64 MiB download crosses intact, and the relay carries nothing for it (an nftables counter
//!   on the relay's port in `pub`);
//! * symmetric NATs (random ports): they stay on the relay, and transfers work;
//! * the direct path cut mid-transfer (UDP between the NATs dropped): the transfer completes
//!   over the relay; restored, the peers go direct again. Both switches are timed.
//!
//! The peers run unprivileged (user nobody, no capabilities), as in a locked-down container.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Proxy, binary, random_bytes, run, sha256_file, sha256_hex};

const KEY: &str = "D3V0000-0000-4000-8000-00000000001C";
const MGMT_PORT: u16 = 33073;
const RELAY_PORT: u16 = MGMT_PORT + 2;
const HTTP_PORT: u16 = 18080;
const STATUS_PORT: u16 = 19900;

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy)]
enum Nat {
    /// Port-preserving masquerade, new inbound dropped: endpoint-independent mapping.
    EndpointIndependent,
    /// Masquerade with random ports: a new mapping per destination.
    Symmetric,
}

/// The namespaces, the dev mesh and both peers; everything is removed on drop.
struct Lab {
    tag: String,
    dir: PathBuf,
    children: Vec<Child>,
    a: Option<Proxy>,
    b: Option<Proxy>,
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("nbi{}{n}", self.tag)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let ns = self.ns(ns);
        run(&[&["ip", "netns", "exec", ns.as_str()], args].concat())
    }

    fn nft(&self, ns: &str, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft in {ns}: {script}");
    }

    fn new(nat_a: Nat, nat_b: Nat) -> Self {
        assert!(
            common::is_root(),
            "the NAT lab needs root for network namespaces (CI runs as root)"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id() % 10000);
        let dir = std::env::temp_dir().join(format!("netbird-proxy-ice-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("www")).unwrap();
        let lab = Lab {
            tag,
            dir,
            children: Vec::new(),
            a: None,
            b: None,
        };
        for n in ["hA", "nA", "pub", "nB", "hB", "inet"] {
            let ns = lab.ns(n);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run(&["ip", "netns", "add", &ns]);
            lab.exec(n, &["ip", "link", "set", "lo", "up"]);
        }
        lab.exec("pub", &["ip", "addr", "add", "198.19.0.1/32", "dev", "lo"]);
        // "The internet": everything without a route goes out a dummy link and is lost, as on
        // a public host (without it, datagrams to private candidates fail with ENETUNREACH,
        // and coturn closes an allocation whose relay socket saw an error).
        let (pub_ns, inet_ns) = (lab.ns("pub"), lab.ns("inet"));
        run(&[
            "ip", "link", "add", "inet0", "netns", &pub_ns, "type", "veth", "peer", "name",
            "inet1", "netns", &inet_ns,
        ]);
        lab.exec(
            "pub",
            &["ip", "addr", "add", "198.19.99.1/24", "dev", "inet0"],
        );
        lab.exec("pub", &["ip", "link", "set", "inet0", "up"]);
        lab.exec(
            "inet",
            &["ip", "addr", "add", "198.19.99.2/24", "dev", "inet1"],
        );
        lab.exec("inet", &["ip", "link", "set", "inet1", "up"]);
        lab.exec(
            "pub",
            &["ip", "route", "add", "default", "via", "198.19.99.2"],
        );
        lab.exec("pub", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (side, i, nat) in [("A", 1, nat_a), ("B", 2, nat_b)] {
            let (h, n, to) = (format!("h{side}"), format!("n{side}"), format!("to{side}"));
            let (pub_ns, n_ns, h_ns) = (lab.ns("pub"), lab.ns(&n), lab.ns(&h));
            run(&[
                "ip", "link", "add", "wan", "netns", &n_ns, "type", "veth", "peer", "name", &to,
                "netns", &pub_ns,
            ]);
            run(&[
                "ip", "link", "add", "lan", "netns", &n_ns, "type", "veth", "peer", "name", "eth0",
                "netns", &h_ns,
            ]);
            lab.exec(
                "pub",
                &["ip", "addr", "add", &format!("198.19.{i}.1/24"), "dev", &to],
            );
            lab.exec("pub", &["ip", "link", "set", &to, "up"]);
            lab.exec(
                &n,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("198.19.{i}.2/24"),
                    "dev",
                    "wan",
                ],
            );
            lab.exec(
                &n,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("198.19.1{i}.1/24"),
                    "dev",
                    "lan",
                ],
            );
            lab.exec(&n, &["ip", "link", "set", "wan", "up"]);
            lab.exec(&n, &["ip", "link", "set", "lan", "up"]);
            lab.exec(
                &n,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("198.19.{i}.1"),
                ],
            );
            lab.exec(&n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            lab.exec(
                &h,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("198.19.1{i}.2/24"),
                    "dev",
                    "eth0",
                ],
            );
            lab.exec(&h, &["ip", "link", "set", "eth0", "up"]);
            lab.exec(
                &h,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("198.19.1{i}.1"),
                ],
            );
            // The NAT, as a home router: new inbound dropped on the WAN side, forwarded and to
            // the box itself (without the input drop Linux re-maps ports: ice.md §7's pitfall).
            let masquerade = match nat {
                Nat::EndpointIndependent => "masquerade",
                Nat::Symmetric => "masquerade random",
            };
            lab.nft(
                &n,
                &format!(
                    "table ip nat {{\n\
                       chain post {{\n\
                         type nat hook postrouting priority srcnat; policy accept;\n\
                         oifname \"wan\" {masquerade}\n\
                       }}\n\
                     }}\n\
                     table inet filter {{\n\
                       chain forward {{\n\
                         type filter hook forward priority filter; policy accept;\n\
                         ct state established,related accept\n\
                         iifname \"wan\" drop\n\
                       }}\n\
                       chain input {{\n\
                         type filter hook input priority filter; policy accept;\n\
                         ct state established,related accept\n\
                         iifname \"wan\" drop\n\
                       }}\n\
                     }}\n"
                ),
            );
        }
        // Bytes through the relay's port, and a switch to cut UDP between the NATs.
        lab.nft(
            "pub",
            &format!(
                "table inet lab {{\n\
                   counter relay {{\n\
                   }}\n\
                   chain input {{\n\
                     type filter hook input priority filter; policy accept;\n\
                     tcp dport {RELAY_PORT} counter name relay\n\
                   }}\n\
                   chain output {{\n\
                     type filter hook output priority filter; policy accept;\n\
                     tcp sport {RELAY_PORT} counter name relay\n\
                   }}\n\
                   chain forward {{\n\
                     type filter hook forward priority filter; policy accept;\n\
                   }}\n\
                 }}\n"
            ),
        );
        lab
    }

    /// Start the dev mesh in `pub` and both peers; B exposes an HTTP server on mesh port 8080.
    fn start(&mut self, extra: &[&str]) {
        self.start_with(&[], extra);
    }

    /// `start` with extra dev-mesh arguments.
    fn start_with(&mut self, mesh_args: &[&str], extra: &[&str]) {
        let mut mesh = Command::new("ip")
            .args(["netns", "exec", &self.ns("pub"), binary(), "dev-mesh"])
            .args(["--listen", &format!("198.19.0.1:{MGMT_PORT}")])
            .args(["--setup-key", KEY, "--domain", "mesh.test"])
            .args(mesh_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(mesh.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with("management "), "dev mesh: {first}");
        self.children.push(mesh);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("hB"),
                "python3",
                "-m",
                "http.server",
            ])
            .args([&HTTP_PORT.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(self.dir.join("www"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(server);
        let mgmt = format!("http://198.19.0.1:{MGMT_PORT}");
        let status = format!("127.0.0.1:{STATUS_PORT}");
        // The peers run as users run them: unprivileged (nobody, no capabilities), from a copy
        // of the binary that user can read, each with a state directory of its own.
        let bin = self.dir.join("netbird-proxy");
        std::fs::copy(binary(), &bin).unwrap();
        run(&[
            "chmod",
            "a+rx",
            self.dir.to_str().unwrap(),
            bin.to_str().unwrap(),
        ]);
        let peer = |me: &Lab, ns: &str, name: &str, own: &[&str]| {
            let home = me.dir.join(name);
            std::fs::create_dir_all(&home).unwrap();
            run(&["chown", "65534:65534", home.to_str().unwrap()]);
            let state = home.join("state");
            let base = [
                "--management-url",
                &mgmt,
                "--setup-key",
                KEY,
                "--hostname",
                name,
                "--state",
                state.to_str().unwrap(),
                "--status-addr",
                &status,
                "--log-level",
                "info",
                // ICE is set up as the peers meet, before any traffic: eager peers.
                "--lazy-connections",
                "off",
            ];
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &me.ns(ns), "setpriv", "--reuid", "65534"])
                .args(["--regid", "65534", "--clear-groups", "--inh-caps=-all"])
                .args(["--bounding-set=-all", "--no-new-privs", "--"])
                .arg(&bin)
                .args([&base[..], own, extra].concat());
            Proxy::spawn_command(cmd)
        };
        let expose = format!("8080=127.0.0.1:{HTTP_PORT}");
        self.b = Some(peer(self, "hB", "bravo", &["--expose", &expose]));
        self.a = Some(peer(self, "hA", "alpha", &["--socks", "127.0.0.1:1080"]));
        for p in [&self.a, &self.b].into_iter().flatten() {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
            let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(
                uid.split_whitespace().skip(1).all(|u| u == "65534"),
                "{uid}"
            );
        }
    }

    /// A's `/status`.
    fn status(&self) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{STATUS_PORT}/status");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("hA"),
                "curl",
                "-s",
                "--max-time",
                "2",
                &url,
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// A's view of B in `/status`.
    fn peer_status(&self) -> serde_json::Value {
        self.status()["peers"][0].clone()
    }

    fn connection(&self) -> String {
        self.peer_status()["connection"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Wait until A's connection to B is `want`; returns how long it took.
    fn wait_connection(&self, want: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        while self.connection() != want {
            assert!(
                start.elapsed() < limit,
                "not {want} within {limit:?}: {}\nA:\n{}\nB:\n{}",
                self.peer_status(),
                self.a.as_ref().unwrap().log(),
                self.b.as_ref().unwrap().log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    }

    fn relay_bytes(&self) -> u64 {
        let out = self.exec("pub", &["nft", "list", "counter", "inet", "lab", "relay"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes = text
            .split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|n| n.parse().ok());
        bytes.unwrap_or_else(|| panic!("counter: {text}"))
    }

    /// Drop (or again pass) UDP forwarded between the two NATs: the direct path only.
    fn cut_direct(&self, cut: bool) {
        if cut {
            self.nft(
                "pub",
                "add rule inet lab forward meta l4proto udp iifname { \"toA\", \"toB\" } oifname { \"toA\", \"toB\" } drop\n",
            );
        } else {
            self.nft("pub", "flush chain inet lab forward\n");
        }
    }

    /// A file in B's web root; returns its SHA-256.
    fn file(&self, name: &str, len: usize) -> String {
        let data = random_bytes(len);
        std::fs::write(self.dir.join("www").join(name), &data).unwrap();
        sha256_hex(&data)
    }

    /// curl in A through its SOCKS5 listener (started, not waited for).
    fn download(&self, name: &str, rate: Option<&str>) -> (Child, PathBuf) {
        let out = self.dir.join(format!("down-{name}"));
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns("hA"),
            "curl",
            "-sS",
            "--max-time",
            "90",
        ])
        .args(["--socks5-hostname", "127.0.0.1:1080", "-o"])
        .arg(&out);
        if let Some(r) = rate {
            cmd.args(["--limit-rate", r]);
        }
        cmd.arg(format!("http://bravo.mesh.test:8080/{name}"));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, out)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.a = None;
        self.b = None;
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["hA", "nA", "pub", "nB", "hB", "inet"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn finish(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn peers_behind_endpoint_independent_nats_go_direct_and_the_relay_carries_nothing() {
    let mut lab = Lab::new(Nat::EndpointIndependent, Nat::EndpointIndependent);
    lab.start(&[]);
    let took = lab.wait_connection("direct", Duration::from_secs(30));
    let ice = lab.peer_status()["ice"].clone();
    assert_eq!(ice["local_type"], "srflx", "{ice}");
    assert_eq!(ice["remote_type"], "srflx", "{ice}");
    assert!(
        ice["remote"].as_str().unwrap().starts_with("198.19.2.2:"),
        "B's NAT: {ice}"
    );
    let sha = lab.file("big.bin", 64 << 20);
    let before = lab.relay_bytes();
    let t = Instant::now();
    let (curl, out) = lab.download("big.bin", None);
    finish(curl, "64 MiB download");
    let fetched = t.elapsed();
    assert_eq!(sha256_file(&out), sha, "download altered");
    let relayed = lab.relay_bytes() - before;
    // The relay connections carry only their own keepalives while the peers are direct.
    assert!(
        relayed < 64 << 10,
        "{relayed} bytes crossed the relay during a direct 64 MiB transfer"
    );
    assert_eq!(lab.connection(), "direct");
    eprintln!(
        "direct {took:?} after both peers were ready: {ice}; 64 MiB intact in {:?}, {relayed} \
         bytes through the relay meanwhile",
        fetched
    );
}

#[test]
fn peers_behind_symmetric_nats_stay_on_the_relay_and_transfers_work() {
    let mut lab = Lab::new(Nat::Symmetric, Nat::Symmetric);
    lab.start(&[]);
    lab.wait_connection("relayed", Duration::from_secs(30));
    let sha = lab.file("small.bin", 4 << 20);
    let (curl, out) = lab.download("small.bin", None);
    finish(curl, "4 MiB download over the relay");
    assert_eq!(sha256_file(&out), sha);
    // Past ICE's 12 s budget: still relayed, nothing selected, agents were tried.
    std::thread::sleep(Duration::from_secs(14));
    assert_eq!(lab.connection(), "relayed");
    let ice = lab.status()["ice"].clone();
    assert!(
        ice["agents_started"].as_u64() >= Some(1),
        "ICE was tried: {ice}"
    );
    assert_eq!(ice["pairs_selected"], 0, "{ice}");
    let (curl, out) = lab.download("small.bin", None);
    finish(curl, "4 MiB download after ICE gave up");
    assert_eq!(sha256_file(&out), sha);
}

#[test]
fn a_cut_direct_path_falls_back_to_the_relay_mid_transfer_and_comes_back() {
    let mut lab = Lab::new(Nat::EndpointIndependent, Nat::EndpointIndependent);
    lab.start(&[]);
    lab.wait_connection("direct", Duration::from_secs(30));
    let sha = lab.file("big.bin", 48 << 20);
    // 4 MB/s: the download lasts ~12 s, across the cut.
    let (curl, out) = lab.download("big.bin", Some("4M"));
    std::thread::sleep(Duration::from_secs(2));
    lab.cut_direct(true);
    let fallback = lab.wait_connection("relayed", Duration::from_secs(20));
    finish(curl, "download across the cut");
    assert_eq!(sha256_file(&out), sha, "download altered across the cut");
    lab.cut_direct(false);
    let back = lab.wait_connection("direct", Duration::from_secs(90));
    eprintln!(
        "direct path cut: on the relay after {fallback:?}; restored: direct again after {back:?}"
    );
    assert!(
        fallback < Duration::from_secs(10),
        "fallback took {fallback:?} (goal: under 10 s)"
    );
}

/// Where NetBird's relay is missing, Go peers use TURN relay candidates from management's
/// `turns`: here the dev mesh serves no relay and announces coturn (in `pub`, long-term
/// credentials); both peers sit behind symmetric NATs, so only a pair through the TURN
/// allocation works.
#[test]
fn without_a_netbird_relay_peers_behind_symmetric_nats_meet_through_turn() {
    let mut lab = Lab::new(Nat::Symmetric, Nat::Symmetric);
    let pid = lab.dir.join("turn.pid");
    let turn = Command::new("ip")
        .args(["netns", "exec", &lab.ns("pub"), "turnserver", "-n"])
        .args(["--listening-ip", "198.19.0.1", "--relay-ip", "198.19.0.1"])
        .args([
            "--listening-port",
            "3478",
            "--lt-cred-mech",
            "--user",
            "nb:secret",
        ])
        .args([
            "--realm",
            "lab",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--log-file",
            "stdout",
        ])
        .arg("--pidfile")
        .arg(&pid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver (coturn; tests/deps.sh installs it)");
    lab.children.push(turn);
    lab.start_with(
        &[
            "--services",
            "management,signal",
            "--turn",
            "turn:198.19.0.1:3478",
            "--turn-credentials",
            "nb:secret",
        ],
        &[],
    );
    // "relayed" with an ICE pair: A may roam onto the TURN path (B's datagrams came through
    // it) a moment before its own agent selects the pair.
    let start = Instant::now();
    let ice = loop {
        let p = lab.peer_status();
        if p["connection"] == "relayed" && !p["ice"].is_null() {
            break p["ice"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no pair through TURN within 40 s: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = start.elapsed();
    assert!(
        ice["local_type"] == "relay" || ice["remote_type"] == "relay",
        "a pair through TURN: {ice}"
    );
    let sha = lab.file("small.bin", 4 << 20);
    let (curl, out) = lab.download("small.bin", None);
    finish(curl, "4 MiB download through TURN");
    assert_eq!(sha256_file(&out), sha);
    eprintln!("through TURN {took:?} after both peers were ready: {ice}");
}
