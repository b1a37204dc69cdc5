//! Issue 17's acceptance in network namespaces: NetBird routes through rootless routing peers,
//! HA failover, an exit node, and access policies, with the dev mesh as management
//! (`dev-mesh --networks FILE`). Every proxy runs unprivileged (user nobody, no capabilities).
//!
//!     client 198.18.1.2 ─┐                        ┌─ lan0 198.19.1.101 ─┐
//!     router-a 198.18.2.2 ┼─ pub 198.18.0.1 (mesh) ┤                     ├─ "lan" br0 198.19.1.10
//!     router-b 198.18.3.2 ┤                        └─ lan0 198.19.1.102 ─┘   (and 198.19.2.10)
//!     outsider 198.18.4.2 ┘
//!
//! The LAN is reachable only from the routing peers' namespaces; a web server there answers
//! `/whoami` with the address it sees, so the tests tell which router (or exit node) carried a
//! request.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Proxy, binary, run};

const KEY: &str = "D3V0000-0000-4000-8000-00000000017A";
const MGMT_PORT: u16 = 33073;
const STATUS_PORT: u16 = 19900;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A web server answering `/whoami` with the client's address, and files under its root.
const WHOAMI: &str = r#"
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/whoami":
            body = self.client_address[0].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()
    def log_message(self, *a):
        pass
root = sys.argv[3]
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])),
    lambda *a, **k: H(*a, directory=root, **k)).serve_forever()
"#;

/// Namespaces, the dev mesh, servers and peers; all removed on drop.
struct Lab {
    tag: String,
    dir: PathBuf,
    peers: Vec<String>,
    children: Vec<Child>,
    proxies: Vec<(String, Proxy)>,
    /// Logs of peers stopped (killed) during the test, for failure messages.
    stopped: Vec<(String, String)>,
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("nbn{}{n}", self.tag)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let ns = self.ns(ns);
        run(&[&["ip", "netns", "exec", ns.as_str()], args].concat())
    }

    /// A command in `ns`: (exit code, stdout).
    fn exec_status(&self, ns: &str, args: &[&str]) -> (i32, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `peers`: host names; the ones starting with "router" get a leg on the LAN.
    fn new(peers: &[&str], networks: &str) -> Self {
        assert!(
            common::is_root(),
            "the networks lab needs root for network namespaces (CI runs as root)"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id() % 10000);
        let dir = std::env::temp_dir().join(format!("netbird-proxy-net-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("whoami.py"), WHOAMI).unwrap();
        std::fs::write(dir.join("networks.toml"), networks).unwrap();
        let mut lab = Lab {
            tag,
            dir,
            peers: peers.iter().map(|s| s.to_string()).collect(),
            children: Vec::new(),
            proxies: Vec::new(),
            stopped: Vec::new(),
        };
        let mut spaces = vec!["pub".to_string(), "lan".to_string()];
        spaces.extend(lab.peers.iter().cloned());
        for n in &spaces {
            let ns = lab.ns(n);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run(&["ip", "netns", "add", &ns]);
            lab.exec(n, &["ip", "link", "set", "lo", "up"]);
        }
        lab.exec("pub", &["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"]);
        lab.exec("pub", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lab.exec("lan", &["ip", "link", "add", "br0", "type", "bridge"]);
        lab.exec("lan", &["ip", "link", "set", "br0", "up"]);
        for a in ["198.19.1.10/24", "198.19.2.10/24", "198.19.3.10/24"] {
            lab.exec("lan", &["ip", "addr", "add", a, "dev", "br0"]);
        }
        let mut routers = 0;
        for (i, name) in lab.peers.clone().iter().enumerate() {
            let i = i + 1;
            let (pub_ns, peer_ns) = (lab.ns("pub"), lab.ns(name));
            let leg = format!("p{i}");
            run(&[
                "ip", "link", "add", "up0", "netns", &peer_ns, "type", "veth", "peer", "name",
                &leg, "netns", &pub_ns,
            ]);
            lab.exec(
                "pub",
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("198.18.{i}.1/24"),
                    "dev",
                    &leg,
                ],
            );
            lab.exec("pub", &["ip", "link", "set", &leg, "up"]);
            lab.exec(
                name,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("198.18.{i}.2/24"),
                    "dev",
                    "up0",
                ],
            );
            lab.exec(name, &["ip", "link", "set", "up0", "up"]);
            lab.exec(
                name,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("198.18.{i}.1"),
                ],
            );
            if name.starts_with("router") {
                routers += 1;
                let lan_ns = lab.ns("lan");
                let port = format!("l{i}");
                run(&[
                    "ip", "link", "add", "lan0", "netns", &peer_ns, "type", "veth", "peer", "name",
                    &port, "netns", &lan_ns,
                ]);
                lab.exec("lan", &["ip", "link", "set", &port, "master", "br0"]);
                lab.exec("lan", &["ip", "link", "set", &port, "up"]);
                for net in [1, 2, 3] {
                    let a = format!("198.19.{net}.{}/24", 100 + routers);
                    lab.exec(name, &["ip", "addr", "add", &a, "dev", "lan0"]);
                }
                lab.exec(name, &["ip", "link", "set", "lan0", "up"]);
            }
        }
        // Servers: the LAN's web server on 80 and 8022, and one on the "internet" (pub).
        lab.server("lan", "198.19.1.10", 80);
        lab.server("lan", "198.19.1.10", 8022);
        lab.server("lan", "198.19.2.10", 80);
        lab.server("lan", "198.19.3.10", 80);
        lab.server("pub", "198.18.0.1", 8088);
        // The dev mesh.
        let mut mesh = Command::new("ip")
            .args(["netns", "exec", &lab.ns("pub"), binary(), "dev-mesh"])
            .args(["--listen", &format!("198.18.0.1:{MGMT_PORT}")])
            .args(["--setup-key", KEY, "--domain", "mesh.test", "--networks"])
            .arg(lab.dir.join("networks.toml"))
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
        lab.children.push(mesh);
        // A copy of the binary the unprivileged user can run.
        let bin = lab.dir.join("netbird-proxy");
        std::fs::copy(binary(), &bin).unwrap();
        run(&[
            "chmod",
            "a+rx",
            lab.dir.to_str().unwrap(),
            bin.to_str().unwrap(),
        ]);
        lab
    }

    /// dnsmasq in `ns` on `ip`:53 with these host records (`name,address`), authoritative for
    /// `domains` (unknown names there are NXDOMAIN).
    fn dnsmasq(&mut self, ns: &str, ip: &str, records: &[&str], domains: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns(ns),
            "dnsmasq",
            "--keep-in-foreground",
        ])
        .args([
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
        ])
        .args(["--pid-file", "--port=53", &format!("--listen-address={ip}")]);
        for r in records {
            cmd.arg(format!("--host-record={r}"));
        }
        for d in domains {
            cmd.arg(format!("--local=/{d}/"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// The resolv.conf processes in `ns` see (`ip netns exec` mounts /etc/netns/NS/).
    fn resolv_conf(&mut self, ns: &str, server: &str) {
        let dir = PathBuf::from("/etc/netns").join(self.ns(ns));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {server}\n")).unwrap();
        run(&["chmod", "-R", "a+rX", dir.to_str().unwrap()]);
    }

    fn server(&mut self, ns: &str, ip: &str, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "python3"])
            .arg(self.dir.join("whoami.py"))
            .args([ip, &port.to_string()])
            .arg(self.dir.join("www"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Start peer `name` (unprivileged) with `args`; every peer serves status on loopback.
    fn start(&mut self, name: &str, args: &[&str]) {
        let home = self.dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        run(&["chown", "65534:65534", home.to_str().unwrap()]);
        let state = home.join("state");
        let mgmt = format!("http://198.18.0.1:{MGMT_PORT}");
        let status = format!("127.0.0.1:{STATUS_PORT}");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns(name),
            "setpriv",
            "--reuid",
            "65534",
        ])
        .args(["--regid", "65534", "--clear-groups", "--inh-caps=-all"])
        .args(["--bounding-set=-all", "--no-new-privs", "--"])
        .arg(self.dir.join("netbird-proxy"))
        .args([
            "--management-url",
            &mgmt,
            "--setup-key",
            KEY,
            "--hostname",
            name,
        ])
        .args(["--state", state.to_str().unwrap(), "--status-addr", &status])
        .args(["--log-level", "info"])
        .args(args);
        let proxy = Proxy::spawn_command(cmd);
        self.proxies.retain(|(n, _)| n != name);
        self.proxies.push((name.to_string(), proxy));
    }

    /// Kill `name` (SIGKILL: a crash, not a goodbye), keeping its log for `logs`.
    fn stop(&mut self, name: &str) {
        if let Some(i) = self.proxies.iter().position(|(n, _)| n == name) {
            let (n, p) = self.proxies.remove(i);
            let log = p.log();
            drop(p);
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let killed = format!(
                "killed at {}.{:03} s (unix)",
                at.as_secs(),
                at.subsec_millis()
            );
            self.stopped.push((n, format!("{log}{killed}\n")));
        }
    }

    fn logs(&self) -> String {
        let stopped = self
            .stopped
            .iter()
            .map(|(n, log)| format!("--- {n} (stopped):\n{log}"));
        let running = self
            .proxies
            .iter()
            .map(|(n, p)| format!("--- {n}:\n{}", p.log()));
        stopped.chain(running).collect()
    }

    /// curl in `from`'s namespace through its SOCKS5 listener (1080), or its HTTP proxy (3128)
    /// with `http`; (exit code, body).
    fn curl(&self, from: &str, url: &str, http: bool, max_time: u32) -> (i32, String) {
        let proxy = if http {
            ["--proxy", "http://127.0.0.1:3128"]
        } else {
            ["--socks5-hostname", "127.0.0.1:1080"]
        };
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(from), "curl", "-sS"])
            .args(["--max-time", &max_time.to_string()])
            .args(proxy)
            .arg(url)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Retry `curl` until it answers, up to `limit`; the body and how long it took.
    fn fetch(&self, from: &str, url: &str, http: bool, limit: Duration) -> (String, Duration) {
        let start = Instant::now();
        loop {
            let (code, body) = self.curl(from, url, http, 3);
            if code == 0 {
                return (body, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "{from}: {url} not answered within {limit:?} (curl {code})\n{}\n{}",
                serde_json::to_string_pretty(&self.status(from)).unwrap_or_default(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn status(&self, of: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{STATUS_PORT}/status");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(of),
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
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.proxies.clear();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut spaces = vec!["pub".to_string(), "lan".to_string()];
        spaces.extend(self.peers.iter().cloned());
        for n in spaces {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(&n)])
                .output();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(self.ns(&n)));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const CLIENT: &[&str] = &["--socks", "127.0.0.1:1080", "--http", "127.0.0.1:3128"];

/// A routing peer without root carries a LAN to a client, through SOCKS5 and the HTTP proxy,
/// masquerading as itself; its route rules limit ports and prefixes; its peer ACL limits what
/// reaches its own exposed ports; a peer outside every policy reaches nothing.
#[test]
fn a_rootless_routing_peer_carries_a_lan_within_its_policies() {
    let mut lab = Lab::new(
        &["client", "router-a", "outsider"],
        r#"
[groups]
clients = ["client"]
routers = ["router-a"]
outsiders = ["outsider"]
dbs = []

[[policies]]
name = "web"
sources = ["clients"]
destinations = ["routers"]
protocol = "tcp"
ports = ["80"]

[[policies]]
name = "dns"
sources = ["clients"]
destinations = ["routers"]
protocol = "udp"
ports = ["53"]

[[routes]]
net_id = "corp-lan"
network = "198.19.1.0/24"
peers = ["router-a"]
groups = ["clients", "outsiders"]
access_control_groups = ["routers"]

[[routes]]
net_id = "corp-apps"
domains = ["*.apps.internal"]
peers = ["router-a"]
groups = ["clients"]
access_control_groups = ["routers"]

[[nameservers]]
name = "corp"
servers = ["198.19.1.10"]
domains = ["corp.internal"]
search_domains = true
groups = ["clients"]

[[routes]]
net_id = "corp-db"
network = "198.19.2.0/24"
peers = ["router-a"]
groups = ["clients"]
access_control_groups = ["dbs"]
"#,
    );
    // The LAN's DNS server, for the nameserver group and for the router's own resolver (which
    // answers the DNS route's names).
    lab.dnsmasq(
        "lan",
        "198.19.1.10",
        &[
            "app.corp.internal,198.19.1.10",
            "web.apps.internal,198.19.3.10",
        ],
        &["corp.internal", "apps.internal"],
    );
    lab.resolv_conf("router-a", "198.19.1.10");
    // The router serves a web page of its own on mesh ports 80 and 22 (same server).
    lab.server("router-a", "127.0.0.1", 8000);
    lab.start(
        "router-a",
        &[
            "--expose",
            "80=127.0.0.1:8000",
            "--expose",
            "22=127.0.0.1:8000",
        ],
    );
    lab.start("client", CLIENT);
    lab.start("outsider", CLIENT);

    let (body, took) = lab.fetch(
        "client",
        "http://198.19.1.10/whoami",
        false,
        Duration::from_secs(30),
    );
    assert_eq!(
        body, "198.19.1.101",
        "the LAN sees the router's address (masquerade)"
    );
    eprintln!("LAN reached through the routing peer {took:?} after start");
    let (body, _) = lab.fetch(
        "client",
        "http://198.19.1.10/whoami",
        true,
        Duration::from_secs(5),
    );
    assert_eq!(body, "198.19.1.101", "through the HTTP proxy too");

    // Names: a nameserver group's match domain, asked through the tunnel (the server is in the
    // LAN route), by SOCKS5 and the HTTP proxy; a single label through its search domain.
    let (body, _) = lab.fetch(
        "client",
        "http://app.corp.internal/whoami",
        false,
        Duration::from_secs(10),
    );
    assert_eq!(body, "198.19.1.101");
    let (body, _) = lab.fetch(
        "client",
        "http://app.corp.internal/whoami",
        true,
        Duration::from_secs(5),
    );
    assert_eq!(body, "198.19.1.101");
    let (body, _) = lab.fetch("client", "http://app/whoami", false, Duration::from_secs(5));
    assert_eq!(body, "198.19.1.101", "search domain");
    assert_ne!(
        lab.curl("client", "http://nope.corp.internal/whoami", false, 6)
            .0,
        0
    );
    // A DNS route: its names resolve at the router, and their address (outside every network
    // route) is routed to it and allowed by its rules once resolved, not before.
    assert_ne!(
        lab.curl("client", "http://198.19.3.10/whoami", false, 4).0,
        0,
        "not routed before the name is resolved"
    );
    let (body, _) = lab.fetch(
        "client",
        "http://web.apps.internal/whoami",
        false,
        Duration::from_secs(10),
    );
    assert_eq!(body, "198.19.3.101");
    let (body, _) = lab.fetch(
        "client",
        "http://web.apps.internal/whoami",
        true,
        Duration::from_secs(5),
    );
    assert_eq!(body, "198.19.3.101");
    let (body, _) = lab.fetch(
        "client",
        "http://198.19.3.10/whoami",
        false,
        Duration::from_secs(5),
    );
    assert_eq!(body, "198.19.3.101", "the resolved address is routed now");

    // The route rules: TCP 80 only, and nothing of the second network (no policy for it).
    assert_ne!(
        lab.curl("client", "http://198.19.1.10:8022/whoami", false, 4)
            .0,
        0
    );
    assert_ne!(
        lab.curl("client", "http://198.19.2.10/whoami", false, 4).0,
        0
    );
    // The peer ACL: port 80 of the router itself, not 22.
    let (body, _) = lab.fetch(
        "client",
        "http://router-a.mesh.test/whoami",
        false,
        Duration::from_secs(5),
    );
    assert_eq!(body, "127.0.0.1");
    assert_ne!(
        lab.curl("client", "http://router-a.mesh.test:22/whoami", false, 4)
            .0,
        0
    );
    // Status: the client's network and its routing peer; the router's counters.
    let st = lab.status("client");
    let lan = st["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["network"] == "corp-lan")
        .cloned()
        .unwrap();
    assert_eq!(lan["routing_peer"], "router-a.mesh.test", "{st}");
    let rt = lab.status("router-a");
    let counters = &rt["routing"]["counters"];
    assert!(counters["denied_routed"].as_u64().unwrap() >= 2, "{rt}");
    assert!(counters["denied_inbound"].as_u64().unwrap() >= 1, "{rt}");
    assert!(counters["tcp_opened"].as_u64().unwrap() >= 2, "{rt}");

    // The outsider: no route, no peer.
    assert_eq!(
        lab.status("outsider")["routes"].as_array().map(Vec::len),
        Some(0)
    );
    assert_ne!(
        lab.curl("outsider", "http://198.19.1.10/whoami", false, 4)
            .0,
        0
    );
    assert_ne!(
        lab.curl("outsider", "http://router-a.mesh.test/whoami", false, 4)
            .0,
        0
    );
}

/// Two routing peers for one network: the better metric carries it; killed, the other takes
/// over for new connections; back, the election returns to the better metric.
#[test]
fn ha_routing_peers_fail_over_and_back() {
    let mut lab = Lab::new(
        &["client", "router-a", "router-b"],
        r#"
[[routes]]
net_id = "corp-lan"
network = "198.19.1.0/24"
peers = ["router-a"]
metric = 100

[[routes]]
net_id = "corp-lan"
network = "198.19.1.0/24"
peers = ["router-b"]
metric = 200
"#,
    );
    lab.start("router-a", &[]);
    lab.start("router-b", &[]);
    lab.start("client", CLIENT);
    let url = "http://198.19.1.10/whoami";
    lab.fetch("client", url, false, Duration::from_secs(30));
    // Whichever router connected first carries it at first; once both are, the lower metric.
    let start = Instant::now();
    while lab.curl("client", url, false, 2).1 != "198.19.1.101" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the lower metric never won\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    lab.stop("router-a");
    let killed = Instant::now();
    let mut took = None;
    while killed.elapsed() < Duration::from_secs(30) {
        let (code, body) = lab.curl("client", url, false, 2);
        if code == 0 && body == "198.19.1.102" {
            took = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = took.unwrap_or_else(|| panic!("no failover within 30 s\n{}", lab.logs()));
    eprintln!("failover: new connections through router-b {took:?} after router-a was killed");

    lab.start("router-a", &[]);
    let back = Instant::now();
    loop {
        let (code, body) = lab.curl("client", url, false, 2);
        if code == 0 && body == "198.19.1.101" {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "the better metric did not win back\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "failback to router-a {:?} after its restart",
        back.elapsed()
    );
}

/// An exit node: destinations outside the mesh leave from the exit node; deselected, from the
/// client's own host.
#[test]
fn an_exit_node_carries_everything_outside_the_mesh_until_deselected() {
    let mut lab = Lab::new(
        &["client", "exit"],
        r#"
[[routes]]
net_id = "exit-node"
network = "0.0.0.0/0"
peers = ["exit"]
"#,
    );
    // The client host's resolver is a DNS server on the "internet"; an nftables counter sees
    // every DNS query the client's host sends itself (not inside the tunnel).
    lab.dnsmasq(
        "pub",
        "198.18.0.1",
        &["site.example,198.18.0.1"],
        &["example"],
    );
    lab.resolv_conf("client", "198.18.0.1");
    lab.exec(
        "client",
        &["nft", "add table inet t; add counter inet t dns; add chain inet t out { type filter hook output priority 0; }; add rule inet t out udp dport 53 counter name dns"],
    );
    let host_dns_queries = |lab: &Lab| -> u64 {
        let out = lab.exec("client", &["nft", "list", "counter", "inet", "t", "dns"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("counter: {text}"))
    };
    lab.start("exit", &[]);
    lab.start("client", CLIENT);
    let url = "http://198.18.0.1:8088/whoami";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = lab.curl("client", url, false, 3);
        if code == 0 && body == "198.18.2.2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not through the exit node: {body}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (body, _) = lab.fetch("client", url, true, Duration::from_secs(5));
    assert_eq!(
        body, "198.18.2.2",
        "the HTTP proxy's egress is the exit node too"
    );
    let st = lab.status("client");
    assert_eq!(st["routes"][0]["exit_node"], true, "{st}");
    // A name nothing in the mesh answers: the host's nameserver is asked through the exit node,
    // never by the host itself.
    let (body, _) = lab.fetch(
        "client",
        "http://site.example:8088/whoami",
        false,
        Duration::from_secs(10),
    );
    assert_eq!(body, "198.18.2.2");
    assert_eq!(
        host_dns_queries(&lab),
        0,
        "no DNS query left the client's host"
    );

    lab.stop("client");
    lab.start(
        "client",
        &[CLIENT, &["--networks-deselect", "exit-node"]].concat(),
    );
    let start = Instant::now();
    while lab.status("client")["routes"][0]["selected"] != false {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            lab.status("client")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (body, _) = lab.fetch("client", url, false, Duration::from_secs(10));
    assert_eq!(
        body, "198.18.1.2",
        "deselected: straight from the client's host"
    );
    let (body, _) = lab.fetch(
        "client",
        "http://site.example:8088/whoami",
        false,
        Duration::from_secs(10),
    );
    assert_eq!(body, "198.18.1.2");
    assert!(
        host_dns_queries(&lab) > 0,
        "the host resolver answers without an exit node"
    );
}

/// 200 TCP flows at once from the client (SOCKS5) to an echo server behind the router, each
/// carrying its share of 64 MiB each way.
const LOAD: &str = r#"
import hashlib, random, socket, struct, sys, threading
n, total, host, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
size = total // n
ready = threading.Barrier(n)
results = [None] * n
def recvn(s, k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c:
            raise EOFError("socks reply cut")
        b += c
    return b
def flow(i):
    try:
        data = random.Random(i).randbytes(size)
        s = socket.create_connection(("127.0.0.1", 1080), timeout=60)
        s.sendall(b"\x05\x01\x00")
        assert recvn(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
        rep = recvn(s, 10)
        assert rep[1] == 0, rep
        ready.wait(timeout=60)
        def send():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        h, got = hashlib.sha256(), 0
        while True:
            b = s.recv(65536)
            if not b:
                break
            h.update(b)
            got += len(b)
        t.join()
        results[i] = got == size and h.digest() == hashlib.sha256(data).digest()
    except Exception as e:
        results[i] = repr(e)
threads = [threading.Thread(target=flow, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
bad = [(i, r) for i, r in enumerate(results) if r is not True]
print(f"{n - len(bad)} of {n} flows intact, {size} bytes each way each")
sys.exit(1 if bad else 0) if not bad else print(bad[:5]) or sys.exit(1)
"#;

const ECHO: &str = r#"
import asyncio, sys
async def echo(r, w):
    while True:
        b = await r.read(65536)
        if not b:
            break
        w.write(b)
        await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=512)
    await s.serve_forever()
asyncio.run(main())
"#;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The routing peer under load: 200 concurrent TCP flows, 64 MiB each way in all, every byte
/// SHA-256-checked; then UDP flows (DNS queries from fresh ports) that time out and are freed;
/// the router's sockets and memory drain afterwards.
#[test]
fn the_routing_peer_holds_200_concurrent_flows_and_drains() {
    let mut lab = Lab::new(
        &["client", "router-a"],
        r#"
[[routes]]
net_id = "corp-lan"
network = "198.19.1.0/24"
peers = ["router-a"]

[[nameservers]]
name = "corp"
servers = ["198.19.1.10"]
domains = ["corp.internal"]
"#,
    );
    lab.dnsmasq(
        "lan",
        "198.19.1.10",
        &["app.corp.internal,198.19.1.10"],
        &["corp.internal"],
    );
    std::fs::write(lab.dir.join("echo.py"), ECHO).unwrap();
    std::fs::write(lab.dir.join("load.py"), LOAD).unwrap();
    let echo = Command::new("ip")
        .args(["netns", "exec", &lab.ns("lan"), "python3"])
        .arg(lab.dir.join("echo.py"))
        .args(["198.19.1.10", "9000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lab.children.push(echo);
    lab.start("router-a", &[]);
    lab.start("client", CLIENT);
    lab.fetch(
        "client",
        "http://198.19.1.10/whoami",
        false,
        Duration::from_secs(30),
    );
    let router = lab
        .proxies
        .iter()
        .find(|(n, _)| n == "router-a")
        .unwrap()
        .1
        .pid();
    let (fds_before, rss_before) = (fds(router), rss_kib(router));

    let start = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("client"), "python3"])
        .arg(lab.dir.join("load.py"))
        .args(["200", &(64 << 20).to_string(), "198.19.1.10", "9000"])
        .output()
        .unwrap();
    let took = start.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss_peak = rss_kib(router);
    eprintln!(
        "load: {} in {took:?}; router RSS {rss_before} KiB before, {rss_peak} KiB after the flows",
        said.trim()
    );

    // UDP: 40 names, each resolved from a fresh netstack port: 40 flows through the router.
    for i in 0..40 {
        let (code, _) = lab.curl("client", &format!("http://n{i}.corp.internal/"), false, 5);
        assert_ne!(code, 0, "unknown names fail");
    }
    let counters = |lab: &Lab| lab.status("router-a")["routing"]["counters"].clone();
    let c = counters(&lab);
    assert!(c["udp_flows_opened"].as_u64().unwrap() >= 40, "{c}");
    assert!(c["tcp_opened"].as_u64().unwrap() >= 200, "{c}");
    // Idle UDP flows end after 30 s; every TCP flow has ended.
    let start = Instant::now();
    loop {
        let c = counters(&lab);
        if c["udp_flows_active"] == 0 && c["tcp_active"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "flows not freed: {c}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let (fds_after, rss_after) = (fds(router), rss_kib(router));
    eprintln!(
        "drained after {:?}: router fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB",
        start.elapsed()
    );
    assert!(
        fds_after <= fds_before + 4,
        "fds {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after <= rss_before + 96 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
}

/// Ingress ports (`forwardingRules`): a host port of a gateway peer carries outside clients to
/// a mesh peer's port — what NetBird's own netstack mode cannot do.
#[test]
fn ingress_ports_carry_outside_clients_to_a_mesh_peer() {
    let mut lab = Lab::new(
        &["gateway", "web"],
        r#"
[[ingress]]
peer = "gateway"
port = "18080-18081"
target = "web"
target_port = "80-81"
"#,
    );
    lab.server("web", "127.0.0.1", 8000);
    lab.start("web", &["--expose", "80=127.0.0.1:8000"]);
    lab.start("gateway", &[]);
    // From outside the mesh (the "internet" namespace) to the gateway's host port.
    let start = Instant::now();
    loop {
        let out = lab.exec_status(
            "pub",
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "http://198.18.1.2:18080/whoami",
            ],
        );
        if out.0 == 0 {
            assert_eq!(out.1, "127.0.0.1", "the web peer's exposed port answered");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ingress port not served: {}\n{}",
            out.1,
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("ingress port answered {:?} after start", start.elapsed());
    // The range's second port maps to the target's second port, where nothing listens.
    let out = lab.exec_status(
        "pub",
        &["curl", "-sS", "--max-time", "5", "http://198.18.1.2:18081/"],
    );
    assert_ne!(out.0, 0);
}
