//! Soak benchmark: `cargo bench --bench soak` (10 minutes; `SOAK_SECS=N` for another length).
//!
//! A dev mesh on loopback with two peers: bravo exposes an HTTP server and two echo servers
//! (this binary's threads) on its mesh ports; alpha has a SOCKS5 and an HTTP proxy listener.
//! Against alpha, all at once, for the whole run:
//!
//! * 24 SOCKS5 workers: connect, send 1 KiB–256 KiB, read it back checked, and the server
//!   closes — a new connection every round (churn);
//! * 12 HTTP workers: `GET http://bravo.mesh.test/N` through the HTTP proxy for 1 KiB–1 MiB,
//!   every byte checked, `Connection: close`;
//! * 4 dribblers: one SOCKS5 tunnel each, a byte every 500 ms, echoed, renewed every 30 s;
//! * 2 slow readers: 4 MiB downloads read at ~640 KB/s (backpressure through the proxy);
//! * 1 pest: malformed SOCKS5 greetings and HTTP heads, and clients that connect and leave.
//!
//! RSS and open file descriptors of both proxies are taken after a 2 min warm-up, with the load
//! paused and connections drained (start), after each quarter of the run, drained the same way
//! (the last is the end), and every 30 s under load for the record. Pass: end within 10 % of start for both, and not one
//! request of the well-behaved workers failed (nothing was refused below the limits).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
use common::mesh::{DevMeshProcess, TempDir, join};
use common::{Proxy, connect_v4, socks_connect};

/// Long enough for the first peaks of the load to size the allocator's heaps and our packet
/// pool (both keep memory for reuse, up to a bound); growth after that is what the soak is for.
const WARM_UP: Duration = Duration::from_secs(120);
/// The run is cut in this many parts; after each, the load pauses and both proxies are
/// measured drained, so a leak shows as a trend and not one reading.
const CHECKPOINTS: u32 = 4;
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench --all-targets` probing for criterion-style benches
    }
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let run = Duration::from_secs(secs);

    // bravo's local services.
    let http = serve(serve_http);
    let sized_echo = serve(serve_sized_echo);
    let echo = serve(serve_echo);

    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("soak");
    let b = join(
        &mesh,
        &state.0,
        "bravo",
        &[
            "--expose",
            &format!("80={http}"),
            "--expose",
            &format!("7000={sized_echo}"),
            "--expose",
            &format!("7001={echo}"),
            "--log-level",
            &log_level(),
        ],
    );
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &["--socks", "0", "--http", "0", "--log-level", &log_level()],
    );
    let target = Target {
        socks: a.socks.unwrap(),
        http: a.http.unwrap(),
        b_ip: b.mesh_ip.unwrap().to_string(),
    };
    wait_until_reachable(&target);

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers = start_load(&target, &stats, &stop);
    println!("warm-up {WARM_UP:?}");
    std::thread::sleep(WARM_UP);
    stop_load(&stop, workers);
    let start = [drained(&a, "alpha"), drained(&b, "bravo")];
    let before = stats.snapshot();

    println!("soak {run:?} in {CHECKPOINTS} parts, drained after each");
    println!(
        "{:>6} {:>10} {:>8} {:>12} {:>9} {:>12} {:>9}",
        "t", "requests", "failed", "alpha RSS", "alpha fd", "bravo RSS", "bravo fd"
    );
    let mut peak = start;
    let mut checkpoints = Vec::new();
    let began = Instant::now();
    for part in 1..=CHECKPOINTS {
        stop.store(false, Ordering::Relaxed);
        let workers = start_load(&target, &stats, &stop);
        let until = run * part / CHECKPOINTS;
        while began.elapsed() < until {
            std::thread::sleep(SAMPLE_EVERY.min(until.saturating_sub(began.elapsed())));
            let (s, now) = (stats.snapshot(), [usage(&a), usage(&b)]);
            for (p, n) in peak.iter_mut().zip(now) {
                p.rss_kib = p.rss_kib.max(n.rss_kib);
                p.fds = p.fds.max(n.fds);
            }
            println!(
                "{:>5}s {:>10} {:>8} {:>9} KiB {:>9} {:>9} KiB {:>9}",
                began.elapsed().as_secs(),
                s.ok - before.ok,
                s.failed,
                now[0].rss_kib,
                now[0].fds,
                now[1].rss_kib,
                now[1].fds
            );
        }
        stop_load(&stop, workers);
        checkpoints.push([drained(&a, "alpha"), drained(&b, "bravo")]);
    }
    let end = *checkpoints.last().expect("at least one part");
    let total = stats.snapshot();
    println!();
    println!("drained after warm-up and after each part (RSS KiB / fds):");
    for (i, c) in std::iter::once(&start).chain(&checkpoints).enumerate() {
        println!(
            "  {:>4} s: alpha {} / {}, bravo {} / {}",
            (run * i as u32 / CHECKPOINTS).as_secs(),
            c[0].rss_kib,
            c[0].fds,
            c[1].rss_kib,
            c[1].fds
        );
    }
    if total.failed > 0 {
        for (name, p) in [("alpha", &a), ("bravo", &b)] {
            let log = p.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("INFO")).collect();
            println!("{name}: {} log lines above INFO; the last 40:", lines.len());
            for l in lines.iter().rev().take(40).rev() {
                println!("  {l}");
            }
        }
    }
    report(&start, &peak, &end, &before, &total, run);
}

/// `SOAK_LOG` (default warn): the proxies' log level.
fn log_level() -> String {
    std::env::var("SOAK_LOG").unwrap_or_else(|_| "warn".into())
}

struct Target {
    socks: SocketAddr,
    http: SocketAddr,
    b_ip: String,
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    pest: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

#[derive(Clone, Copy, Default)]
struct Snapshot {
    ok: u64,
    bytes: u64,
    failed: u64,
    pest: u64,
}

impl Stats {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            ok: self.ok.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            pest: self.pest.load(Ordering::Relaxed),
        }
    }

    fn record(&self, what: &str, r: Result<u64, String>) {
        match r {
            Ok(bytes) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 20 {
                    errors.push(format!("{what}: {e}"));
                }
            }
        }
    }
}

#[derive(Clone, Copy, Default, Debug)]
struct Usage {
    rss_kib: u64,
    fds: u64,
}

fn usage(p: &Proxy) -> Usage {
    let pid = p.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Usage { rss_kib, fds }
}

/// Usage once the load has stopped and the fd count has settled (connections drained).
fn drained(p: &Proxy, name: &str) -> Usage {
    let start = Instant::now();
    let mut last = usage(p);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = usage(p);
        if now.fds == last.fds || start.elapsed() > Duration::from_secs(30) {
            println!("{name} drained: {now:?}");
            return now;
        }
        last = now;
    }
}

fn report(
    start: &[Usage; 2],
    peak: &[Usage; 2],
    end: &[Usage; 2],
    before: &Snapshot,
    total: &Snapshot,
    run: Duration,
) {
    let ok = total.ok - before.ok;
    let mib = (total.bytes - before.bytes) as f64 / (1 << 20) as f64;
    println!();
    println!(
        "{} s: {ok} requests ({:.0}/s), {mib:.0} MiB checked, {} failed, {} malformed clients \
         turned away",
        run.as_secs(),
        ok as f64 / run.as_secs_f64(),
        total.failed,
        total.pest - before.pest
    );
    println!("| proxy | RSS start | RSS peak | RSS end | fds start | fds peak | fds end |");
    println!("|---|---|---|---|---|---|---|");
    let mut flat = true;
    for (i, name) in ["alpha (SOCKS5 + HTTP)", "bravo (exposes)"]
        .iter()
        .enumerate()
    {
        let (s, p, e) = (start[i], peak[i], end[i]);
        println!(
            "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB ({:+.1} %) | {} | {} | {} |",
            s.rss_kib as f64 / 1024.0,
            p.rss_kib as f64 / 1024.0,
            e.rss_kib as f64 / 1024.0,
            (e.rss_kib as f64 / s.rss_kib as f64 - 1.0) * 100.0,
            s.fds,
            p.fds,
            e.fds
        );
        flat &= e.rss_kib as f64 <= s.rss_kib as f64 * 1.10;
        flat &= e.fds as f64 <= s.fds as f64 * 1.10;
    }
    for e in total_errors() {
        println!("error: {e}");
    }
    assert!(flat, "RSS or fds grew more than 10 %");
    assert_eq!(total.failed, 0, "well-behaved requests failed");
    println!("PASS: flat within 10 %, nothing refused");
}

static ERRORS: std::sync::OnceLock<Arc<Stats>> = std::sync::OnceLock::new();

fn total_errors() -> Vec<String> {
    ERRORS
        .get()
        .map(|s| s.errors.lock().unwrap().clone())
        .unwrap_or_default()
}

fn wait_until_reachable(t: &Target) {
    let start = Instant::now();
    while socks_round(t, 16).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bravo unreachable"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------- load

fn start_load(
    t: &Target,
    stats: &Arc<Stats>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let _ = ERRORS.set(stats.clone());
    let mut workers = Vec::new();
    let mut spawn = |seed: u64, f: fn(&Target, &Stats, &AtomicBool, u64)| {
        let t = Target {
            socks: t.socks,
            http: t.http,
            b_ip: t.b_ip.clone(),
        };
        let (stats, stop) = (stats.clone(), stop.clone());
        workers.push(std::thread::spawn(move || f(&t, &stats, &stop, seed)));
    };
    for i in 0..24 {
        spawn(i, |t, stats, stop, seed| {
            let mut rng = Rng(seed + 1);
            while !stop.load(Ordering::Relaxed) {
                let len = 1024 + rng.below(255 * 1024);
                stats.record("socks", socks_round(t, len));
            }
        });
    }
    for i in 0..12 {
        spawn(100 + i, |t, stats, stop, seed| {
            let mut rng = Rng(seed + 1);
            while !stop.load(Ordering::Relaxed) {
                let len = 1024 + rng.below(1023 * 1024);
                stats.record("http", http_get(t, len, None));
            }
        });
    }
    for i in 0..4 {
        spawn(200 + i, |t, stats, stop, _| {
            while !stop.load(Ordering::Relaxed) {
                stats.record("dribble", dribble(t, stop));
            }
        });
    }
    for i in 0..2 {
        spawn(300 + i, |t, stats, stop, _| {
            while !stop.load(Ordering::Relaxed) {
                let pace = Some(Duration::from_millis(100));
                stats.record("slow reader", http_get(t, 4 << 20, pace));
            }
        });
    }
    spawn(400, |t, stats, stop, seed| {
        let mut rng = Rng(seed);
        while !stop.load(Ordering::Relaxed) {
            pest(t, &mut rng);
            stats.pest.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    workers
}

fn stop_load(stop: &AtomicBool, workers: Vec<std::thread::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn pattern(len: usize, salt: usize) -> Vec<u8> {
    (0..len).map(|i| ((i + salt) % 251) as u8).collect()
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn tunnel(t: &Target, port: u16) -> Result<TcpStream, String> {
    let (s, reply) = socks_connect(t.socks, None, &connect_v4(&t.b_ip, port))
        .map_err(io_err("socks connect"))?;
    if reply[1] != 0 {
        return Err(format!("SOCKS5 reply {:#04x}", reply[1]));
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Ok(s)
}

/// One churned SOCKS5 round through the sized echo: the server closes after echoing.
fn socks_round(t: &Target, len: usize) -> Result<u64, String> {
    let mut s = tunnel(t, 7000)?;
    let data = pattern(len, len);
    s.write_all(&(len as u64).to_be_bytes())
        .map_err(io_err("write"))?;
    s.write_all(&data).map_err(io_err("write"))?;
    let mut back = Vec::with_capacity(len);
    if let Err(e) = s.read_to_end(&mut back) {
        // The two loopback sockets' counters tell which side of the proxy stalled.
        let port = s.local_addr().unwrap().port();
        let ss = std::process::Command::new("ss")
            .args(["-tnie", &format!("( sport = :{port} or dport = :{port} )")])
            .output()
            .unwrap();
        return Err(format!(
            "read {e} after {} of {len} bytes back; ss:\n{}",
            back.len(),
            String::from_utf8_lossy(&ss.stdout)
        ));
    }
    if back != data {
        return Err(format!(
            "echo of {len} bytes came back as {} others",
            back.len()
        ));
    }
    Ok(2 * len as u64)
}

/// `GET http://bravo.mesh.test/LEN` through the HTTP proxy; with `pace`, read 64 KiB per pace.
fn http_get(t: &Target, len: usize, pace: Option<Duration>) -> Result<u64, String> {
    let mut s = TcpStream::connect(t.http).map_err(io_err("connect"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET http://bravo.mesh.test/{len} HTTP/1.1\r\nHost: bravo.mesh.test\r\nConnection: close\r\n\r\n"
    )
    .map_err(io_err("write"))?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(io_err("status line"))?;
    if !status.starts_with("HTTP/1.1 200") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        let body = rest.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        return Err(format!("status {}: {body}", status.trim()));
    }
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(io_err("header"))?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut body = Vec::with_capacity(len);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut chunk).map_err(io_err("body"))?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
        if let Some(p) = pace {
            std::thread::sleep(p);
        }
    }
    if body != pattern(len, 0) {
        return Err(format!(
            "body of {} bytes, {len} expected or altered",
            body.len()
        ));
    }
    Ok(len as u64)
}

/// A tunnel kept for 30 s with a byte every 500 ms.
fn dribble(t: &Target, stop: &AtomicBool) -> Result<u64, String> {
    let mut s = tunnel(t, 7001)?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(30) && !stop.load(Ordering::Relaxed) {
        let b = [(n % 251) as u8];
        s.write_all(&b).map_err(io_err("write"))?;
        let mut back = [0u8];
        s.read_exact(&mut back).map_err(io_err("read"))?;
        if back != b {
            return Err("dribbled byte altered".into());
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(n)
}

/// Bad clients: garbage greetings, broken heads, connect-and-leave. Their answers do not
/// matter here (the tests check them); that they cost nothing lasting does.
fn pest(t: &Target, rng: &mut Rng) {
    let junk: [&[u8]; 5] = [
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
        b"\x05\x00",
        b"\x05\xff",
        b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"CONNECT :::: HTTP/1.1\r\n\r\n",
    ];
    let to = if rng.below(2) == 0 { t.socks } else { t.http };
    if let Ok(mut s) = TcpStream::connect(to) {
        match rng.below(3) {
            0 => {}
            _ => {
                let _ = s.write_all(junk[rng.below(junk.len())]);
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.read(&mut [0u8; 512]);
            }
        }
        let _ = s.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------- bravo's services

fn serve(handler: fn(TcpStream)) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || handler(s));
        }
    });
    port
}

/// `GET /LEN`: LEN bytes of `pattern(LEN, 0)`, then close.
fn serve_http(s: TcpStream) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let len: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.trim_start_matches('/').parse().ok())
        .unwrap_or(0);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
    }
    let mut s = r.into_inner();
    let body = pattern(len, 0);
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    let _ = s.write_all(&body);
}

/// An 8-byte big-endian length, then that many bytes, echoed; the server closes first.
fn serve_sized_echo(mut s: TcpStream) {
    let mut len = [0u8; 8];
    if s.read_exact(&mut len).is_err() {
        return;
    }
    let mut data = vec![0u8; u64::from_be_bytes(len).min(1 << 24) as usize];
    if s.read_exact(&mut data).is_ok() {
        let _ = s.write_all(&data);
    }
}

fn serve_echo(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
