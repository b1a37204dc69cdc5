//! Test bed: a real WireGuard peer (Debian's wireguard-go) in a network namespace made by the
//! test, plus the netbird-proxy binary under test. Everything is torn down on drop.
//!
//! Underlay: a veth pair in 198.18.0.0/15 (a /30 per test bed); overlay: 100.64.0.0/16 with the
//! peer at 100.64.0.2 and the proxy at 100.64.0.1. Needs root (CI runs as root).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub mod impair;
pub mod mesh;

pub const PEER_IP: &str = "100.64.0.2";
pub const PROXY_IP: &str = "100.64.0.1";
pub const PEER_IP6: &str = "fd64::2";
pub const PROXY_IP6: &str = "fd64::1";
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 7000;
/// A second, unreachable peer owns this prefix (its endpoint never answers).
pub const DEAD_PEER_NET: &str = "100.99.0.0/16";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn sh(args: &[&str]) {
    run(args);
}

/// Run a command that must succeed; its output.
pub fn run(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    run_command(&mut cmd)
}

/// Run `cmd`, which must succeed; its output (the failure message has its standard error).
pub fn run_command(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A WireGuard key pair; the private key is also written to DIR/NAME.key (0600).
pub fn wg_key_pair(dir: &Path, name: &str) -> (String, String) {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey");
    let private = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    write_private(&dir.join(format!("{name}.key")), &private);
    (private, public)
}

pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

/// Options of a test bed.
#[derive(Default, Clone)]
pub struct BedOptions {
    /// Run dnsmasq on the peer, answering `web.mesh.test` with the peer's IP.
    pub dns: bool,
}

/// A namespace with wireguard-go and the fixture services.
pub struct Testbed {
    pub ns: String,
    veth: String,
    pub wg_if: String,
    pub underlay_peer: String,
    pub dir: PathBuf,
    pub proxy_private: String,
    pub peer_public: String,
    pub dead_peer_public: String,
    proxy_public: String,
    children: Vec<Child>,
}

impl Testbed {
    pub fn new(opts: BedOptions) -> Self {
        assert!(
            is_root(),
            "integration tests need root for network namespaces (CI runs as root)"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10000;
        let tag = format!("{pid}x{n}");
        let ns = format!("nbp{tag}");
        let veth = format!("nbv{tag}");
        let wg_if = format!("nbw{tag}");
        // 198.18.0.0/15 holds 32768 /30s; spread test beds over it by pid and counter.
        let slot = (pid * 16 + n) % 32768;
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + slot * 4;
        let host_ip = std::net::Ipv4Addr::from(base + 1).to_string();
        let peer_ip = std::net::Ipv4Addr::from(base + 2).to_string();

        let dir = std::env::temp_dir().join(format!("netbird-proxy-test-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("www")).unwrap();

        // Stale leftovers of an earlier crashed run with the same names.
        sh_quiet(&["ip", "netns", "del", &ns]);
        sh_quiet(&["ip", "link", "del", &veth]);

        let mut bed = Testbed {
            ns: ns.clone(),
            veth: veth.clone(),
            wg_if: wg_if.clone(),
            underlay_peer: peer_ip.clone(),
            dir: dir.clone(),
            proxy_private: String::new(),
            peer_public: String::new(),
            dead_peer_public: String::new(),
            proxy_public: String::new(),
            children: Vec::new(),
        };
        let peer_veth = format!("{veth}p");
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer_veth,
        ]);
        sh(&["ip", "link", "set", &peer_veth, "netns", &ns]);
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        sh(&["ip", "link", "set", &veth, "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer_veth,
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &peer_veth, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);

        let (proxy_private, proxy_public) = wg_key_pair(&dir, "proxy");
        let (_, peer_public) = wg_key_pair(&dir, "peer");
        let (_, dead_peer_public) = wg_key_pair(&dir, "dead");
        bed.proxy_private = proxy_private;
        bed.peer_public = peer_public;
        bed.dead_peer_public = dead_peer_public;

        bed.proxy_public = proxy_public;
        bed.start_wireguard();

        std::fs::write(dir.join("www/index.html"), b"hello from the peer\n").unwrap();
        let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer_server.py");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(&server)
            .args(["--bind", PEER_IP, "--bind6", PEER_IP6])
            .args(["--http-port", &HTTP_PORT.to_string()])
            .args(["--echo-port", &ECHO_PORT.to_string(), "--udp"])
            .arg("--dir")
            .arg(dir.join("www"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .expect("python3");
        bed.children.push(child);
        if opts.dns {
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--no-resolv",
                ])
                .args(["--no-hosts", "--conf-file=/dev/null", "--bind-interfaces"])
                .arg(format!("--listen-address={PEER_IP}"))
                .arg(format!("--address=/web.mesh.test/{PEER_IP}"))
                .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("dnsmasq.log")).unwrap())
                .spawn()
                .expect("dnsmasq");
            bed.children.push(child);
        }
        // The services are up when the peer's HTTP port answers inside the namespace.
        let server_log = dir.join("server.log");
        wait_for_or(
            Duration::from_secs(10),
            || {
                Command::new("ip")
                    .args(["netns", "exec", &ns, "bash", "-c"])
                    .arg(format!("exec 3<>/dev/tcp/{PEER_IP}/{HTTP_PORT} && exec 4<>/dev/tcp/{PEER_IP}/{ECHO_PORT}"))
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            },
            || {
                let addrs = Command::new("ip").args(["-n", &ns, "addr"]).output();
                format!(
                    "fixture services; server log:\n{}\naddresses:\n{}",
                    std::fs::read_to_string(&server_log).unwrap_or_default(),
                    addrs
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                )
            },
        );
        bed
    }

    /// Start the peer's wireguard-go and configure it: keys, listen port, our peer, addresses.
    fn start_wireguard(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("wireguard-go.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "wireguard-go", "-f", &self.wg_if])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("wireguard-go");
        self.children.push(child);
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.wg_if));
        wait_for(
            Duration::from_secs(10),
            || sock.exists(),
            "wireguard-go UAPI socket",
        );
        let peer_key = self.dir.join("peer.key");
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "wg",
            "set",
            &self.wg_if,
            "listen-port",
            "51820",
            "private-key",
            peer_key.to_str().unwrap(),
            "peer",
            &self.proxy_public,
            "allowed-ips",
            &format!("{PROXY_IP}/32,{PROXY_IP6}/128"),
        ]);
        // Up first: wireguard-go may still be configuring the tun device, and an IPv6 address
        // added before that can be flushed again.
        sh(&[
            "ip",
            "-n",
            &self.ns,
            "link",
            "set",
            &self.wg_if,
            "mtu",
            "1420",
            "up",
        ]);
        let v4 = format!("{PEER_IP}/16");
        let v6 = format!("{PEER_IP6}/64");
        sh(&["ip", "-n", &self.ns, "addr", "add", &v4, "dev", &self.wg_if]);
        sh(&[
            "ip",
            "-n",
            &self.ns,
            "addr",
            "add",
            &v6,
            "dev",
            &self.wg_if,
            "nodad",
        ]);
    }

    /// Kill the peer's wireguard-go (its tun device and addresses go with it) and start a new
    /// one with the same keys and addresses: a restarted peer, with no session. Only this
    /// namespace's: `ip netns exec` shares the PID namespace, so a plain pkill would reach
    /// every test bed's wireguard-go.
    pub fn restart_wireguard(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .unwrap();
        let mut killed = 0;
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "wireguard-go" {
                sh(&["kill", "-KILL", pid]);
                killed += 1;
            }
        }
        assert_eq!(killed, 1, "wireguard-go processes in {}", self.ns);
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.wg_if));
        wait_for(
            Duration::from_secs(10),
            || {
                !self
                    .exec(&["ip", "link", "show", &self.wg_if])
                    .status
                    .success()
            },
            "the killed wireguard-go's device to disappear",
        );
        let _ = std::fs::remove_file(&sock);
        self.start_wireguard();
    }

    /// The peer's endpoint moves to a new address, as when its NAT rebinds or it changes
    /// networks: from now on its datagrams leave from a fresh address in a new /30 (source NAT
    /// in its namespace; the host gets the other address of that /30), and datagrams to its
    /// old address are dropped. Returns the new address.
    ///
    /// Why NAT and not moving the address itself: Debian's wireguard-go (0.0.20220316) keeps
    /// sending from the address it last used ("sticky source"); once that address is deleted
    /// its sends fail with ENETUNREACH, which it does not take as a reason to drop it (only
    /// EINVAL), so it says nothing for 15 s — a stall of that peer, not of ours.
    pub fn roam_peer(&mut self) -> String {
        let old = self.underlay_peer.clone();
        let old_ip: std::net::Ipv4Addr = old.parse().unwrap();
        // The slot opposite ours in 198.18.0.0/15.
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0));
        let slot = ((u32::from(old_ip) - 2 - base) / 4) ^ 16384;
        let host_new = std::net::Ipv4Addr::from(base + slot * 4 + 1).to_string();
        let new = std::net::Ipv4Addr::from(base + slot * 4 + 2).to_string();
        let peer_veth = format!("{}p", self.veth);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_new}/30"),
            "dev",
            &self.veth,
        ]);
        sh(&[
            "ip",
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{new}/30"),
            "dev",
            &peer_veth,
        ]);
        let rules = format!(
            "table ip roam {{\n\
             chain raw {{ type filter hook prerouting priority raw; ip daddr {old} udp dport 51820 drop; }}\n\
             chain post {{ type nat hook postrouting priority srcnat; ip saddr {old} udp sport 51820 snat to {new}; }}\n\
             }}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft rules for the move");
        self.underlay_peer = new.clone();
        new
    }

    /// A wg-quick config for the proxy; `extra_interface` lines go into [Interface].
    pub fn proxy_config(&self, extra_interface: &str) -> PathBuf {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = {PROXY_IP}/16, {PROXY_IP6}/64\n{extra_interface}\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {}:51820\nAllowedIPs = 100.64.0.0/16, fd64::/64\n\n\
             # A peer that never answers: nothing listens at its endpoint.\n\
             [Peer]\nPublicKey = {}\nEndpoint = {}:51999\nAllowedIPs = {DEAD_PEER_NET}\n",
            self.proxy_private,
            self.peer_public,
            self.underlay_peer,
            self.dead_peer_public,
            self.underlay_peer,
        );
        let path = self.dir.join("proxy.conf");
        write_private(&path, &text);
        path
    }

    /// Write a file of `len` random bytes into the peer's web root; returns its SHA-256.
    pub fn random_file(&self, name: &str, len: usize) -> String {
        let path = self.dir.join("www").join(name);
        let data = random_bytes(len);
        std::fs::write(&path, &data).unwrap();
        sha256_hex(&data)
    }

    /// Random bytes to send to the peer's `/upload` (outside its web root): the file, and the
    /// `"<sha256> <len>\n"` the upload handler answers when it receives them intact.
    pub fn upload_file(&self, name: &str, len: usize) -> (PathBuf, String) {
        let path = self.dir.join(name);
        let data = random_bytes(len);
        std::fs::write(&path, &data).unwrap();
        (path, format!("{} {len}\n", sha256_hex(&data)))
    }

    /// Wait until something accepts TCP connections on the peer's `PEER_IP:port` (a server
    /// the test started in the namespace).
    pub fn wait_listening(&self, port: u16, what: &str) {
        wait_for(
            Duration::from_secs(10),
            || {
                Command::new("ip")
                    .args(["netns", "exec", &self.ns, "bash", "-c"])
                    .arg(format!("exec 3<>/dev/tcp/{PEER_IP}/{port}"))
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
            what,
        );
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `ip netns exec` forks: make sure nothing of ours survives in the namespace.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    sh_quiet(&["kill", "-9", pid]);
                }
            });
        sh_quiet(&["ip", "netns", "del", &self.ns]);
        sh_quiet(&["ip", "link", "del", &self.veth]);
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.wg_if));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn wait_for(limit: Duration, ok: impl FnMut() -> bool, what: &str) {
    wait_for_or(limit, ok, || what.to_string());
}

/// Like `wait_for`, describing the failure (e.g. with a log) only when it happens.
pub fn wait_for_or(limit: Duration, mut ok: impl FnMut() -> bool, what: impl Fn() -> String) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The proxy binary under test, with its listeners parsed from the ready line.
pub struct Proxy {
    child: Child,
    pub socks: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub forwards: Vec<SocketAddr>,
    pub mesh_ip: Option<std::net::IpAddr>,
    pub ready_line: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_netbird-proxy")
}

impl Proxy {
    /// Start `netbird-proxy --wg-config CONFIG ARGS...` and wait for its ready line.
    pub fn start(config: &Path, args: &[&str]) -> Self {
        let config = config.to_str().unwrap();
        Self::spawn(&[&["--wg-config", config], args].concat())
    }

    /// Start `netbird-proxy ARGS...` and wait for its ready line.
    pub fn spawn(args: &[&str]) -> Self {
        let mut cmd = Command::new(binary());
        cmd.args(args);
        Self::spawn_command(cmd)
    }

    /// Start `netbird-proxy ARGS...` in network namespace `ns`.
    pub fn spawn_in(ns: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, binary()]).args(args);
        Self::spawn_command(cmd)
    }

    /// Start a prepared command that runs the proxy, and wait for its ready line.
    pub fn spawn_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("netbird-proxy");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("netbird-proxy ready:") {
                    let _ = tx.send(line.clone());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let ready_line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("proxy did not get ready; log:\n{}", log.lock().unwrap());
            }
        };
        let mut proxy = Proxy {
            child,
            socks: None,
            http: None,
            forwards: Vec::new(),
            mesh_ip: None,
            ready_line: ready_line.clone(),
            log,
        };
        let body = ready_line
            .trim_start_matches("netbird-proxy ready: ")
            .to_string();
        for part in body.split("; ") {
            let mut words = part.split_whitespace();
            let (Some(kind), Some(addr)) = (words.next(), words.next()) else {
                continue;
            };
            let addr = addr.split("->").next().unwrap();
            match kind {
                // The first TCP listener of each kind (a `unix:PATH` one does not parse).
                "socks5" => proxy.socks = proxy.socks.or(addr.parse().ok()),
                "http" => proxy.http = proxy.http.or(addr.parse().ok()),
                "forward" => proxy.forwards.push(addr.parse().unwrap()),
                "mesh" => proxy.mesh_ip = addr.split('/').next().and_then(|a| a.parse().ok()),
                _ => {}
            }
        }
        proxy
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait for exit up to `limit`; returns the exit status if it exited.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run curl with a timeout; returns (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A raw SOCKS5 exchange: greeting with `methods`, optional RFC 1929 login, then CONNECT-like
/// request bytes; returns the reply bytes read (up to the first 10 bytes of the reply).
pub fn socks_connect(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    request: &[u8],
) -> std::io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    match auth {
        None => s.write_all(&[5, 1, 0])?,
        Some(_) => s.write_all(&[5, 1, 2])?,
    }
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel)?;
    if let Some((u, p)) = auth {
        assert_eq!(sel, [5, 2]);
        let mut m = vec![1, u.len() as u8];
        m.extend(u.as_bytes());
        m.push(p.len() as u8);
        m.extend(p.as_bytes());
        s.write_all(&m)?;
        let mut st = [0u8; 2];
        s.read_exact(&mut st)?;
        if st[1] != 0 {
            return Ok((s, vec![0xff, st[1]]));
        }
    } else {
        assert_eq!(sel, [5, 0]);
    }
    s.write_all(request)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            l[0] as usize + 2
        }
        _ => 0,
    };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail)?;
    let mut reply = head.to_vec();
    reply.extend(tail);
    Ok((s, reply))
}

/// A SOCKS5 CONNECT request to an IPv4 address.
pub fn connect_v4(ip: &str, port: u16) -> Vec<u8> {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let mut r = vec![5, 1, 0, 1];
    r.extend(ip.octets());
    r.extend(port.to_be_bytes());
    r
}

/// `program` run as uid/gid 65534 with no capabilities, as an ordinary user runs it.
pub fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args([
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(program)
        .env("HOME", "/nonexistent");
    cmd
}

/// Give `path` to uid/gid 65534 (for files an unprivileged process must own).
pub fn chown_nobody(path: &Path) {
    let ok = Command::new("chown")
        .arg("65534:65534")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {}", path.display());
}

/// The compose file's services, in file order (PyYAML resolves the anchors and merge keys).
pub fn compose_services(path: &Path) -> Vec<(String, serde_json::Value)> {
    let script = "import json, sys, yaml\n\
                  doc = yaml.safe_load(open(sys.argv[1]))\n\
                  print(json.dumps(list(doc['services'].items())))\n";
    let out = run_command(Command::new("python3").args(["-c", script]).arg(path));
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}
