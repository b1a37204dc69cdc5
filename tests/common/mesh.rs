//! Dev-mesh helpers for the mesh tests: `netbird-proxy dev-mesh` as a child process (whole, or
//! one service per process sharing a state file, so a test can kill one service for real),
//! the fixture HTTP/echo server, and proxies joining the mesh.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Proxy, binary, curl, wait_for};

/// A `netbird-proxy dev-mesh` process.
pub struct DevMeshProcess {
    child: Option<Child>,
    args: Vec<String>,
    pub management: String,
    pub setup_key: String,
}

impl DevMeshProcess {
    /// Management, signal and `relays` relays in one process on ephemeral ports.
    pub fn start(relays: u8) -> Self {
        Self::start_with(&["--listen", "127.0.0.1:0", "--relays", &relays.to_string()])
    }

    /// `dev-mesh --domain mesh.test ARGS...`, once it prints its URLs.
    pub fn start_with(args: &[&str]) -> Self {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--domain".into(), "mesh.test".into()]);
        let mut mesh = Self {
            child: None,
            args,
            management: String::new(),
            setup_key: String::new(),
        };
        mesh.spawn();
        mesh
    }

    fn spawn(&mut self) {
        let mut child = Command::new(binary())
            .arg("dev-mesh")
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dev-mesh");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let management = lines.next().expect("dev-mesh exited").unwrap();
        let setup_key = lines.next().unwrap().unwrap();
        self.management = management.strip_prefix("management ").unwrap().into();
        self.setup_key = setup_key.strip_prefix("setup-key ").unwrap().into();
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye to anyone, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again with the same arguments (and so the same state file and ports).
    pub fn restart(&mut self) {
        self.kill();
        // The ports were just freed; a moment's retry covers TIME_WAIT-free rebinding races.
        let start = Instant::now();
        loop {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn()));
            if ok.is_ok() || start.elapsed() > Duration::from_secs(5) {
                ok.expect("dev-mesh restart");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DevMeshProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A base port with the `count` ports from it free on loopback (for services split over
/// processes, which find each other by port).
pub fn free_port_block(count: u16) -> u16 {
    for _ in 0..200 {
        // Below Linux's ephemeral range (32768-60999), so no outgoing connection takes one
        // between this check and the bind.
        let base = 20000 + (rand_u16() % 12000);
        let held: Vec<_> = (0..count)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == usize::from(count) {
            return base;
        }
    }
    panic!("no block of {count} free ports");
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() ^ std::process::id().wrapping_mul(2654435761)) as u16
}

/// The fixture server on loopback: HTTP (GET files, POST digests) and a TCP echo.
pub struct LocalServer {
    child: Child,
    pub port: u16,
    pub echo_port: u16,
    pub dir: PathBuf,
}

impl LocalServer {
    pub fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nbp-mesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), format!("hello from {name}\n")).unwrap();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (port, echo_port) = (free(), free());
        let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer_server.py");
        let child = Command::new("python3")
            .arg(server)
            .args(["--bind", "127.0.0.1", "--http-port", &port.to_string()])
            .args(["--echo-port", &echo_port.to_string(), "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", echo_port)).is_ok()
            },
            "local fixture server",
        );
        Self {
            child,
            port,
            echo_port,
            dir,
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start a proxy joining `mesh` as `name` with its state under `state_dir`.
pub fn join(mesh: &DevMeshProcess, state_dir: &Path, name: &str, extra: &[&str]) -> Proxy {
    let state = state_dir.join(name);
    let args = [
        &[
            "--management-url",
            &mesh.management,
            "--setup-key",
            &mesh.setup_key,
            "--hostname",
            name,
            "--state",
            state.to_str().unwrap(),
        ][..],
        extra,
    ]
    .concat();
    Proxy::spawn(&args)
}

/// curl through a proxy until the peer answers (the relay handshake takes a moment).
pub fn fetch_until_ok(args: &[&str], limit: Duration) -> (i32, Vec<u8>, String) {
    let start = Instant::now();
    loop {
        let r = curl(&[&["--max-time", "10"], args].concat());
        if r.0 == 0 || start.elapsed() > limit {
            return r;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nbp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
