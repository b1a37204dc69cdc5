//! End-to-end benchmark: netbird-proxy against the kernel's TCP over WireGuard, side by side in
//! one run. `cargo bench --bench e2e` (as root; it installs what it needs with tests/deps.sh).
//!
//! Topology (all made here, all removed at the end):
//!
//! ```text
//!   root namespace                      peer namespace P                kernel namespace K
//!   netbird-proxy (release) ──UDP──▶  wireguard-go 100.64.0.2  ◀──UDP── wireguard-go 100.64.0.3
//!   clients (this binary)              bench server :5201               client (this binary)
//!        198.19.250.1/30 ─── veth ─── .2/30      .6/30 ─── veth ─── 198.19.250.5/30
//! ```
//!
//! The kernel baseline is K's client over K's wireguard-go and kernel TCP to the same server in
//! P. Every client is this binary re-executed (`e2e client ...`), so all paths are driven the
//! same way. Medians over several runs.
//!
//! Impaired rows: 10 ms delay and 0.5 % loss each way (20 ms more RTT). This kernel has no
//! `sch_netem` (CONFIG_NET_SCH_NETEM is not set), so the impairment is a UDP relay on the
//! WireGuard underlay (tests/common/impair.rs, run as `e2e impair ...`, this binary again), put in front of the peer for both
//! paths alike: the proxy's endpoint and K's endpoint point at their own relay.
//!
//! Proxy-to-proxy runs iperf3 through two netbird-proxy processes with static configs on
//! loopback (one exposes the iperf3 server, the other forwards to it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "e2e/mesh.rs"]
mod mesh;
use common::{sh, sh_quiet, wg_key_pair, write_private};

const SERVER_PORT: u16 = 5201;
const PEER_IP: &str = "100.64.0.2";
const RUNS: usize = 3;

/// Runs per measurement: `E2E_RUNS=N` (default `RUNS`), e.g. 1 for a quick look.
fn run_count() -> usize {
    std::env::var("E2E_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(RUNS)
}
const SECS: u64 = 4;
const CHUNK: usize = 128 * 1024;
const PEER_UNDERLAY: &str = "198.19.250.2:51820";
const PEER_UNDERLAY_K: &str = "198.19.250.6:51820";
const IMPAIR_DELAY_MS: &str = "10";
const IMPAIR_LOSS_PERCENT: &str = "0.5";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2]),
        Some("client") => client(&args[2..]),
        Some("impair") => impair(&args[2..]),
        Some("tcpdelay") => mesh::tcp_delay(&args[2..]),
        Some("udpecho") => udp_echo(&args[2]),
        _ => orchestrate(),
    }
}

// ---------------------------------------------------------------- server (in the peer netns)

/// One byte picks the exchange: U(pload) sink and report the count, D(ownload) for N ms,
/// E(cho) 64-byte messages, R(equest) one 64-byte request and answer then close, H(old) open.
fn serve(addr: &str) {
    raise_fd_limit();
    let listener = TcpListener::bind(addr).expect("bind bench server");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = handle(conn);
            });
    }
}

fn handle(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut cmd = [0u8; 1];
    s.read_exact(&mut cmd)?;
    match cmd[0] {
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes())?;
        }
        b'D' => {
            let mut ms = [0u8; 4];
            s.read_exact(&mut ms)?;
            let until = Instant::now() + Duration::from_millis(u32::from_be_bytes(ms).into());
            let buf = vec![0x5au8; CHUNK];
            while Instant::now() < until {
                s.write_all(&buf)?;
            }
            s.shutdown(Shutdown::Write)?;
        }
        b'E' => {
            let mut msg = [0u8; 64];
            while s.read_exact(&mut msg).is_ok() {
                s.write_all(&msg)?;
            }
        }
        b'R' => {
            let mut msg = [0u8; 64];
            s.read_exact(&mut msg)?;
            s.write_all(&msg)?;
        }
        b'H' => {
            let mut buf = [0u8; 64];
            while s.read(&mut buf)? > 0 {}
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------- underlay impairment

/// `impair LISTEN UPSTREAM DELAY_MS LOSS_PERCENT`: relay UDP datagrams between the first
/// client that sends to LISTEN and UPSTREAM, each way delayed by DELAY_MS and dropped with
/// probability LOSS_PERCENT (tests/common/impair.rs, without reordering).
fn impair(args: &[String]) {
    let upstream: SocketAddr = args[1].parse().unwrap();
    let imp = common::impair::Impairment {
        delay: Duration::from_millis(args[2].parse().unwrap()),
        loss: args[3].parse::<f64>().unwrap() / 100.0,
        reorder: 0.0,
        reorder_lag: Duration::ZERO,
    };
    let _relay = common::impair::start(&args[0], upstream, imp);
    println!("READY");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}

// ---------------------------------------------------------------- clients

/// `client KIND TARGET VIA ARG`: VIA is `direct` or `socks:ADDR`. Prints `RESULT ...`.
fn client(args: &[String]) {
    raise_fd_limit();
    let (kind, target, via, arg) = (&args[0], &args[1], &args[2], &args[3]);
    let target: SocketAddr = target.parse().expect("target");
    let n: u64 = arg.parse().expect("number");
    let connect = || open(target, via);
    match kind.as_str() {
        "up" => {
            let mut s = connect();
            s.write_all(b"U").unwrap();
            let buf = vec![0xa5u8; CHUNK];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(n) {
                s.write_all(&buf).unwrap();
            }
            s.shutdown(Shutdown::Write).unwrap();
            let mut count = [0u8; 8];
            s.read_exact(&mut count).unwrap();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "RESULT {:.1}",
                u64::from_be_bytes(count) as f64 * 8.0 / secs / 1e6
            );
        }
        "down" => {
            let mut s = connect();
            s.write_all(b"D").unwrap();
            s.write_all(&((n * 1000) as u32).to_be_bytes()).unwrap();
            let mut buf = vec![0u8; CHUNK];
            let start = Instant::now();
            let mut total = 0u64;
            loop {
                let got = s.read(&mut buf).unwrap();
                if got == 0 {
                    break;
                }
                total += got as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            println!("RESULT {:.1}", total as f64 * 8.0 / secs / 1e6);
        }
        "rtt" => {
            let mut s = connect();
            s.write_all(b"E").unwrap();
            let mut msg = [7u8; 64];
            let mut samples = Vec::with_capacity(n as usize);
            for i in 0..(n + 200) {
                let t = Instant::now();
                s.write_all(&msg).unwrap();
                s.read_exact(&mut msg).unwrap();
                if i >= 200 {
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            samples.sort_by(f64::total_cmp);
            let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
            println!("RESULT {:.0} {:.0}", p(0.5), p(0.99));
        }
        "cps" => {
            let start = Instant::now();
            let mut done = 0u64;
            while start.elapsed() < Duration::from_secs(n) {
                let mut s = connect();
                s.write_all(b"R").unwrap();
                let mut msg = [1u8; 64];
                s.write_all(&msg).unwrap();
                s.read_exact(&mut msg).unwrap();
                done += 1;
            }
            println!("RESULT {:.0}", done as f64 / start.elapsed().as_secs_f64());
        }
        // UDP through a forward: 1200-byte sequenced datagrams, at most UDP_WINDOW waiting for
        // their echo, for N seconds; the echoed payload's rate, and the datagrams lost.
        "udp" => {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.connect(target).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut out = vec![0x5au8; UDP_DATAGRAM];
            let mut buf = vec![0u8; 2048];
            let (mut sent, mut received, mut bytes, mut outstanding) = (0u64, 0u64, 0u64, 0u64);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(n) {
                while outstanding < UDP_WINDOW {
                    out[..8].copy_from_slice(&sent.to_be_bytes());
                    sock.send(&out).unwrap();
                    sent += 1;
                    outstanding += 1;
                }
                match sock.recv(&mut buf) {
                    Ok(got) => {
                        received += 1;
                        outstanding -= 1;
                        bytes += got as u64;
                    }
                    // A second without an answer: what is in flight is given up on.
                    Err(_) => outstanding = 0,
                }
            }
            let secs = start.elapsed().as_secs_f64();
            // Late answers count as arrived (not towards the rate).
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            while sock.recv(&mut buf).is_ok() {
                received += 1;
            }
            println!(
                "RESULT {:.1} {} {sent}",
                bytes as f64 * 8.0 / secs / 1e6,
                sent.saturating_sub(received)
            );
        }
        "hold" => {
            let mut held = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let mut s = connect();
                s.write_all(b"H").unwrap();
                held.push(s);
            }
            println!("READY {}", held.len());
            std::io::stdout().flush().unwrap();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        other => panic!("unknown client kind {other}"),
    }
}

/// Datagram size and window of the UDP rows.
const UDP_DATAGRAM: usize = 1200;
const UDP_WINDOW: u64 = 64;

/// A UDP echo on `addr` (the UDP rows' server, in the peer's namespace).
fn udp_echo(addr: &str) {
    let sock = std::net::UdpSocket::bind(addr).expect("udp echo bind");
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let _ = sock.send_to(&buf[..n], from);
    }
}

/// Connect to `target` directly or through a SOCKS5 proxy (`socks:ADDR`).
fn open(target: SocketAddr, via: &str) -> TcpStream {
    let s = match via.strip_prefix("socks:") {
        None => TcpStream::connect(target).expect("connect"),
        Some(proxy) => {
            let mut s = TcpStream::connect(proxy).expect("connect to SOCKS5");
            s.write_all(&[5, 1, 0]).unwrap();
            let mut sel = [0u8; 2];
            s.read_exact(&mut sel).unwrap();
            assert_eq!(sel, [5, 0]);
            let SocketAddr::V4(v4) = target else {
                panic!("IPv4 targets only")
            };
            let mut req = vec![5, 1, 0, 1];
            req.extend(v4.ip().octets());
            req.extend(v4.port().to_be_bytes());
            s.write_all(&req).unwrap();
            let mut reply = [0u8; 10];
            s.read_exact(&mut reply).unwrap();
            assert_eq!(reply[1], 0, "SOCKS5 reply {}", reply[1]);
            s
        }
    };
    s.set_nodelay(true).unwrap();
    s
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass, which lives on our
    // stack for the duration of each call.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// ---------------------------------------------------------------- orchestration

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A key pair from the test bed's helper, with the path of the private key file.
fn key_pair(dir: &Path, name: &str) -> (String, String, PathBuf) {
    let (private, public) = wg_key_pair(dir, name);
    (private, public, dir.join(format!("{name}.key")))
}

/// This benchmark binary, to run in `ns` (None: here) as a server, client or relay.
fn self_command(ns: Option<&str>) -> Command {
    let me = std::env::current_exe().unwrap();
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&me);
            c
        }
        None => Command::new(&me),
    }
}

/// Spawn `cmd` with a piped stdout and return it once it printed its first line.
fn spawn_until_line(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// Everything the benchmark made; dropping it removes it all.
struct Bed {
    tag: String,
    dir: PathBuf,
    children: Vec<Child>,
    proxy_private: String,
    peer_public: String,
}

impl Bed {
    fn ns(&self, which: &str) -> String {
        format!("nbe{which}{}", self.tag)
    }

    fn new() -> Self {
        let tag = (std::process::id() % 100000).to_string();
        let dir = std::env::temp_dir().join(format!("netbird-proxy-e2e-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut bed = Bed {
            tag,
            dir,
            children: Vec::new(),
            proxy_private: String::new(),
            peer_public: String::new(),
        };
        let (p, k) = (bed.ns("p"), bed.ns("k"));
        for ns in [&p, &k] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // root <-> P
        let (vr, vrp) = (format!("nbeR{}", bed.tag), format!("nbeRp{}", bed.tag));
        sh(&[
            "ip", "link", "add", &vr, "type", "veth", "peer", "name", &vrp,
        ]);
        sh(&["ip", "link", "set", &vrp, "netns", &p]);
        sh(&["ip", "addr", "add", "198.19.250.1/30", "dev", &vr]);
        sh(&["ip", "link", "set", &vr, "up"]);
        sh(&[
            "ip",
            "-n",
            &p,
            "addr",
            "add",
            "198.19.250.2/30",
            "dev",
            &vrp,
        ]);
        sh(&["ip", "-n", &p, "link", "set", &vrp, "up"]);
        // K <-> P
        let (vk, vkp) = (format!("nbeK{}", bed.tag), format!("nbeKp{}", bed.tag));
        sh(&[
            "ip", "-n", &k, "link", "add", &vk, "type", "veth", "peer", "name", &vkp,
        ]);
        sh(&["ip", "-n", &k, "link", "set", &vkp, "netns", &p]);
        sh(&["ip", "-n", &k, "addr", "add", "198.19.250.5/30", "dev", &vk]);
        sh(&["ip", "-n", &k, "link", "set", &vk, "up"]);
        sh(&[
            "ip",
            "-n",
            &p,
            "addr",
            "add",
            "198.19.250.6/30",
            "dev",
            &vkp,
        ]);
        sh(&["ip", "-n", &p, "link", "set", &vkp, "up"]);

        let (_, peer_pub, peer_key) = key_pair(&bed.dir, "peer");
        let (_, kern_pub, kern_key) = key_pair(&bed.dir, "kernel");
        let (proxy_priv, proxy_pub, _) = key_pair(&bed.dir, "proxy");
        bed.proxy_private = proxy_priv;
        bed.peer_public = peer_pub.clone();
        let (wp, wk) = (format!("nbewp{}", bed.tag), format!("nbewk{}", bed.tag));
        bed.wireguard(&p, &wp);
        bed.wireguard(&k, &wk);
        let pk = peer_key.to_str().unwrap();
        sh(&[
            "ip",
            "netns",
            "exec",
            &p,
            "wg",
            "set",
            &wp,
            "listen-port",
            "51820",
            "private-key",
            pk,
            "peer",
            &proxy_pub,
            "allowed-ips",
            "100.64.0.1/32",
            "peer",
            &kern_pub,
            "allowed-ips",
            "100.64.0.3/32",
        ]);
        let kk = kern_key.to_str().unwrap();
        sh(&[
            "ip",
            "netns",
            "exec",
            &k,
            "wg",
            "set",
            &wk,
            "private-key",
            kk,
            "peer",
            &peer_pub,
            "endpoint",
            "198.19.250.6:51820",
            "allowed-ips",
            "100.64.0.2/32",
            "persistent-keepalive",
            "25",
        ]);
        for (ns, ifname, addr) in [(&p, &wp, "100.64.0.2/16"), (&k, &wk, "100.64.0.3/16")] {
            sh(&["ip", "-n", ns, "link", "set", ifname, "mtu", "1420", "up"]);
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", ifname]);
        }
        let server = self_command(Some(&p))
            .args(["serve", &format!("{PEER_IP}:{SERVER_PORT}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        bed.children.push(server);
        std::thread::sleep(Duration::from_millis(300));
        bed
    }

    fn wireguard(&mut self, ns: &str, ifname: &str) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go");
        self.children.push(child);
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "wireguard-go {ifname}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start an impairment relay (`e2e impair`) in `ns` (None: here) listening on `listen`.
    fn impairment(&mut self, ns: Option<&str>, listen: &str, upstream: &str) {
        let (child, line) = spawn_until_line(
            self_command(ns)
                .args(["impair", listen, upstream])
                .args(impairment_params()),
        );
        assert_eq!(line.trim(), "READY", "impairment relay");
        self.children.push(child);
    }

    /// Point K's WireGuard at the peer directly or through its impairment relay.
    fn kernel_endpoint(&self, endpoint: &str) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns("k"),
            "wg",
            "set",
            &format!("nbewk{}", self.tag),
            "peer",
            &self.peer_public,
            "endpoint",
            endpoint,
        ]);
    }

    /// The proxy's config, with its peer at `endpoint`.
    fn proxy_config(&self, name: &str, endpoint: &str) -> PathBuf {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.1/16\n\n[Peer]\nPublicKey = {}\n\
             Endpoint = {endpoint}\nAllowedIPs = 100.64.0.2/32\n",
            self.proxy_private, self.peer_public
        );
        let path = self.dir.join(format!("{name}.conf"));
        write_private(&path, &text);
        path
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for which in ["p", "k"] {
            let ns = self.ns(which);
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    sh_quiet(&["kill", "-9", pid]);
                }
            }
            sh_quiet(&["ip", "netns", "del", &ns]);
        }
        sh_quiet(&["ip", "link", "del", &format!("nbeR{}", self.tag)]);
        for w in ["p", "k"] {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/nbew{w}{}.sock", self.tag));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running netbird-proxy and what its ready line says.
struct Proxy {
    child: Child,
    socks: Option<SocketAddr>,
    forwards: Vec<SocketAddr>,
}

impl Proxy {
    fn start(args: &[&str]) -> Self {
        Self::start_in(None, args)
    }

    /// A proxy in network namespace `ns` (None: here).
    fn start_in(ns: Option<&str>, args: &[&str]) -> Self {
        // E2E_PROXY_LOG=FILTER: the proxies log at that level to /tmp/netbird-proxy-e2e-*.log.
        let log_filter = std::env::var("E2E_PROXY_LOG").ok();
        let bin = env!("CARGO_BIN_EXE_netbird-proxy");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        // E2E_CONGESTION=cubic|bbr: the proxies' --tcp-congestion (default: theirs, bbr).
        if let Ok(cc) = std::env::var("E2E_CONGESTION") {
            cmd.env("NB_TCP_CONGESTION", cc);
        }
        let mut child = cmd
            .args(args)
            .env("NB_LOG_LEVEL", log_filter.as_deref().unwrap_or("warn"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("netbird-proxy");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = loop {
            let line = lines.next().expect("proxy exited").unwrap();
            if let Some(r) = line.strip_prefix("netbird-proxy ready: ") {
                break r.to_string();
            }
        };
        let pid = child.id();
        std::thread::spawn(move || {
            let mut file = log_filter.map(|_| {
                std::fs::File::create(format!("/tmp/netbird-proxy-e2e-{pid}.log")).unwrap()
            });
            for line in lines.map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let mut p = Proxy {
            child,
            socks: None,
            forwards: Vec::new(),
        };
        for part in ready.split("; ") {
            let mut w = part.split_whitespace();
            match (w.next(), w.next().and_then(|a| a.split("->").next())) {
                (Some("socks5"), Some(a)) => p.socks = a.parse().ok(),
                (Some("forward"), Some(a)) => p.forwards.extend(a.parse::<SocketAddr>().ok()),
                _ => {}
            }
        }
        p
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a client reaches the server.
#[derive(Clone)]
enum Path3 {
    Kernel(String),
    Forward(SocketAddr),
    Socks(SocketAddr),
}

impl Path3 {
    fn name(&self) -> &'static str {
        match self {
            Path3::Kernel(_) => "kernel",
            Path3::Forward(_) => "--forward",
            Path3::Socks(_) => "SOCKS5",
        }
    }
}

/// Run one client measurement; returns the numbers after RESULT.
fn run_client(path: &Path3, kind: &str, arg: u64) -> Vec<f64> {
    let server = format!("{PEER_IP}:{SERVER_PORT}");
    let mut cmd = match path {
        Path3::Kernel(ns) => self_command(Some(ns)),
        _ => self_command(None),
    };
    let (target, via) = match path {
        Path3::Kernel(_) => (server, "direct".to_string()),
        Path3::Forward(a) => (a.to_string(), "direct".to_string()),
        Path3::Socks(a) => (server, format!("socks:{a}")),
    };
    let out = cmd
        .args(["client", kind, &target, &via, &arg.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!(
            "{} {kind} failed: {}",
            path.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    line.split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn orchestrate() {
    assert!(
        output(&["id", "-u"]) == "0",
        "the e2e benchmark makes network namespaces: run it as root"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    sh(&["bash", root.join("tests/deps.sh").to_str().unwrap()]);
    raise_fd_limit();
    let mut bed = Bed::new();
    let config = bed.proxy_config("proxy", PEER_UNDERLAY);
    let kernel_ns = bed.ns("k");
    let start_proxy = |config: &Path| {
        let proxy = Proxy::start(&[
            "--wg-config",
            config.to_str().unwrap(),
            "--socks",
            "127.0.0.1:0",
            "--forward",
            &format!("127.0.0.1:0:{PEER_IP}:{SERVER_PORT}"),
        ]);
        let paths = [
            Path3::Kernel(kernel_ns.clone()),
            Path3::Forward(proxy.forwards[0]),
            Path3::Socks(proxy.socks.unwrap()),
        ];
        // Warm up every path (handshakes) before measuring.
        for p in &paths {
            run_client(p, "rtt", 10);
        }
        (proxy, paths)
    };
    let (proxy, paths) = start_proxy(&config);
    let mut table = Vec::new();
    if wanted("clean") {
        table.extend(throughput_rows(&paths, &bed.ns("p"), "clean"));
    }
    if wanted("rtt") {
        rtt_rows(&paths, &mut table);
    }
    let (rss_after, hwm_after) = proxy.memory();
    drop(proxy);
    if wanted("impaired") {
        impaired_rows(&mut bed, &start_proxy, &kernel_ns, &mut table);
    }
    // Connections per second last: the server closes first, so each connection leaves a
    // TIME-WAIT entry there for 60 s, and a later stream that draws one of those ports can
    // wait a SYN timeout (1 s) — a quarter of a 4 s run.
    if wanted("cps") {
        let (proxy, paths) = start_proxy(&config);
        let runs = interleaved_runs(&paths, |_, p| run_client(p, "cps", 3)[0]);
        eprintln!("connections/s: runs {runs:?}");
        let cps: Vec<f64> = runs.into_iter().map(median).collect();
        table.push(row(
            "new connections/s (connect, 64 B, close)",
            &cps,
            |v, b| format!("{v:.0} ({:.2}×)", v / b),
        ));
        drop(proxy);
    }
    let memory = wanted("memory").then(|| memory_rows(&config));
    let p2p = wanted("p2p").then(|| proxy_to_proxy(&bed));
    print_report(&table, memory, (rss_after, hwm_after), p2p);
    drop(bed);
    if wanted("mesh") && !mesh::run() {
        eprintln!("e2e: a mesh row collapsed (a run under half its row's median)");
        std::process::exit(1);
    }
}

/// `E2E_ONLY=clean,rtt,cps,impaired,memory,p2p,mesh` runs a subset (default: all).
fn wanted(part: &str) -> bool {
    std::env::var("E2E_ONLY").map_or(true, |v| v.split(',').any(|p| p.trim() == part))
}

fn rtt_rows(paths: &[Path3], table: &mut Vec<String>) {
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for p in paths {
        let r = run_client(p, "rtt", 5000);
        p50.push(r[0]);
        p99.push(r[1]);
    }
    table.push(row("64 B round trip p50, µs", &p50, |v, b| {
        format!("{v:.0} ({:.2}×)", v / b)
    }));
    table.push(row("64 B round trip p99, µs", &p99, |v, b| {
        format!("{v:.0} ({:.2}×)", v / b)
    }));
}

/// Impaired underlay: both paths through their own relay (10 ms, 0.5 % loss each way).
fn impaired_rows(
    bed: &mut Bed,
    start_proxy: &dyn Fn(&Path) -> (Proxy, [Path3; 3]),
    kernel_ns: &str,
    table: &mut Vec<String>,
) {
    bed.impairment(None, "127.0.0.1:51900", PEER_UNDERLAY);
    bed.impairment(Some(kernel_ns), "127.0.0.1:51901", PEER_UNDERLAY_K);
    bed.kernel_endpoint("127.0.0.1:51901");
    let impaired = bed.proxy_config("impaired", "127.0.0.1:51900");
    let (proxy, paths) = start_proxy(&impaired);
    let peer_ns = bed.ns("p");
    let [ms, loss] = impairment_params();
    let cond = format!("{ms} ms + {loss} % loss each way");
    table.extend(throughput_rows(&paths, &peer_ns, &cond));
    drop(proxy);
    bed.kernel_endpoint(PEER_UNDERLAY_K);
}

/// RSS of a fresh proxy: idle, then with 1000 idle SOCKS5 connections held open.
fn memory_rows(config: &Path) -> Memory {
    let fresh = Proxy::start(&[
        "--wg-config",
        config.to_str().unwrap(),
        "--socks",
        "127.0.0.1:0",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let idle = fresh.memory();
    let (mut holder, line) = spawn_until_line(
        self_command(None)
            .args(["client", "hold", &format!("{PEER_IP}:{SERVER_PORT}")])
            .arg(format!("socks:{}", fresh.socks.unwrap()))
            .arg("1000")
            .stdin(Stdio::piped()),
    );
    assert!(line.starts_with("READY 1000"), "hold: {line}");
    std::thread::sleep(Duration::from_secs(2));
    let held = fresh.memory();
    drop(holder.stdin.take());
    let _ = holder.wait();
    drop(fresh);
    (idle, held)
}

type Memory = ((f64, f64), (f64, f64));

fn print_report(
    table: &[String],
    memory: Option<Memory>,
    after: (f64, f64),
    p2p: Option<(f64, f64)>,
) {
    println!();
    println!(
        "netbird-proxy end-to-end benchmark — medians of {} runs of {SECS} s, single stream",
        run_count()
    );
    println!();
    println!(
        "| measurement | kernel WG (wireguard-go + kernel TCP) | netbird-proxy --forward | netbird-proxy SOCKS5 |"
    );
    println!("|---|---|---|---|");
    for r in table {
        println!("{r}");
    }
    println!();
    println!("| memory (netbird-proxy) | MiB |");
    println!("|---|---|");
    if let Some((idle, held)) = memory {
        println!("| idle: RSS / peak | {:.1} / {:.1} |", idle.0, idle.1);
        println!(
            "| 1000 idle SOCKS5 connections: RSS / peak | {:.1} / {:.1} |",
            held.0, held.1
        );
    }
    println!(
        "| after the clean and round-trip runs: RSS / peak | {:.1} / {:.1} |",
        after.0, after.1
    );
    if let Some((up, down)) = p2p {
        println!();
        println!(
            "proxy-to-proxy (iperf3 through two netbird-proxy processes on loopback): \
             upload {up:.0} Mbit/s, download {down:.0} Mbit/s"
        );
    }
}

/// Delay (ms, each way) and loss (%, each way) of the impaired rows; `E2E_IMPAIR="MS LOSS"`
/// overrides them.
fn impairment_params() -> [String; 2] {
    let custom = std::env::var("E2E_IMPAIR").ok();
    let mut it = custom.as_deref().unwrap_or("").split_whitespace();
    match (it.next(), it.next()) {
        (Some(ms), Some(loss)) => [ms.into(), loss.into()],
        _ => [IMPAIR_DELAY_MS.into(), IMPAIR_LOSS_PERCENT.into()],
    }
}

/// UDP datagrams the peer namespace dropped for a full receive buffer (wireguard-go's socket).
fn peer_udp_drops(peer_ns: &str) -> u64 {
    peer_counter(peer_ns, "/proc/net/snmp", "Udp: ", "RcvbufErrors")
}

/// Out-of-order data the peer's TCP receiver threw away for lack of memory (a receiver that
/// prunes its out-of-order queue reneges on what it SACKed).
fn peer_ofo_pruned(peer_ns: &str) -> u64 {
    peer_counter(peer_ns, "/proc/net/netstat", "TcpExt: ", "OfoPruned")
}

/// A counter from a `/proc/net` table (name line, value line) in the peer namespace.
fn peer_counter(peer_ns: &str, file: &str, prefix: &str, name: &str) -> u64 {
    let table = output(&["ip", "netns", "exec", peer_ns, "cat", file]);
    let mut lines = table.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `run_count()` rounds of `measure` over every path in turn (so drift hits all paths alike);
/// the results per path.
fn interleaved_runs(
    paths: &[Path3],
    mut measure: impl FnMut(usize, &Path3) -> f64,
) -> Vec<Vec<f64>> {
    let mut runs = vec![Vec::new(); paths.len()];
    for _ in 0..run_count() {
        for (i, p) in paths.iter().enumerate() {
            runs[i].push(measure(i, p));
        }
    }
    runs
}

/// Upload and download rows: medians of interleaved runs over every path.
fn throughput_rows(paths: &[Path3], peer_ns: &str, cond: &str) -> Vec<String> {
    let mut rows = Vec::new();
    for kind in ["up", "down"] {
        let mut drops = vec![0u64; paths.len()];
        let mut pruned = vec![0u64; paths.len()];
        let runs = interleaved_runs(paths, |i, p| {
            let (udp, ofo) = (peer_udp_drops(peer_ns), peer_ofo_pruned(peer_ns));
            let result = run_client(p, kind, SECS)[0];
            drops[i] += peer_udp_drops(peer_ns) - udp;
            pruned[i] += peer_ofo_pruned(peer_ns) - ofo;
            result
        });
        eprintln!(
            "{kind} ({cond}): runs {runs:?}; peer UDP receive-buffer drops per path {drops:?}; \
             peer TCP out-of-order segments pruned per path {pruned:?}"
        );
        let meds: Vec<f64> = runs.into_iter().map(median).collect();
        let dir = if kind == "up" { "upload" } else { "download" };
        rows.push(row(
            &format!("TCP {dir}, Mbit/s ({cond})"),
            &meds,
            |v, base| format!("{v:.0} ({:.2}×)", v / base),
        ));
    }
    rows
}

/// A table row: kernel value, then each proxy path with its ratio to the kernel.
fn row(name: &str, v: &[f64], fmt: impl Fn(f64, f64) -> String) -> String {
    format!(
        "| {name} | {:.0} | {} | {} |",
        v[0],
        fmt(v[1], v[0]),
        fmt(v[2], v[0])
    )
}

/// Two netbird-proxy processes peered on loopback: B exposes a local iperf3 server on its mesh
/// address, A forwards a local port to it. Returns median (upload, download) in Mbit/s.
fn proxy_to_proxy(bed: &Bed) -> (f64, f64) {
    let (a_priv, a_pub, _) = key_pair(&bed.dir, "p2p-a");
    let (b_priv, b_pub, _) = key_pair(&bed.dir, "p2p-b");
    let free = || {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (pa, pb) = (free(), free());
    let iperf_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = |name: &str,
                private: &str,
                addr: &str,
                port: u16,
                peer: &str,
                peer_port: u16,
                peer_ip: &str| {
        let path = bed.dir.join(format!("{name}.conf"));
        write_private(
            &path,
            &format!(
                "[Interface]\nPrivateKey = {private}\nAddress = {addr}/24\nListenPort = {port}\n\n\
                 [Peer]\nPublicKey = {peer}\nEndpoint = 127.0.0.1:{peer_port}\nAllowedIPs = {peer_ip}/32\n"
            ),
        );
        path
    };
    let ca = conf("p2p-a", &a_priv, "100.64.1.1", pa, &b_pub, pb, "100.64.1.2");
    let cb = conf("p2p-b", &b_priv, "100.64.1.2", pb, &a_pub, pa, "100.64.1.1");
    let mut iperf = Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    let _b = Proxy::start(&[
        "--wg-config",
        cb.to_str().unwrap(),
        "--expose",
        &format!("5201=127.0.0.1:{iperf_port}"),
    ]);
    let a = Proxy::start(&[
        "--wg-config",
        ca.to_str().unwrap(),
        "--forward",
        "127.0.0.1:0:100.64.1.2:5201",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let fwd = a.forwards[0];
    let measure = |reverse: bool| {
        let mut args = vec![
            "-c".to_string(),
            fwd.ip().to_string(),
            "-p".into(),
            fwd.port().to_string(),
            "-t".into(),
            SECS.to_string(),
            "-J".into(),
        ];
        if reverse {
            args.push("-R".into());
        }
        let out = Command::new("iperf3").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // end.sum_received.bits_per_second, without a JSON dependency.
        let at = text.find("\"sum_received\"").expect("iperf3 JSON");
        let bps = text[at..]
            .split("\"bits_per_second\":")
            .nth(1)
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .expect("bits_per_second");
        bps / 1e6
    };
    let up = median((0..run_count()).map(|_| measure(false)).collect());
    let down = median((0..run_count()).map(|_| measure(true)).collect());
    let _ = iperf.kill();
    let _ = iperf.wait();
    (up, down)
}
