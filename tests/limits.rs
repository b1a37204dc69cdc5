//! Connection limits under attack (issue "Robustness and security", acceptance 2): slowloris
//! clients on both proxy listeners and a flood of 10 000 connection attempts do not stop a
//! well-behaved client from completing its requests, and the limits show in /metrics.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::mesh::*;
use common::*;

const PAGE: &[u8] = b"page for a patient client\n";

/// Keep `n` connections to `addr` open, each sending `prefix` then one byte of `drip` every
/// 200 ms; reconnect when the proxy drops one, until `stop`.
fn slowloris(addr: SocketAddr, n: usize, prefix: &'static [u8], drip: u8, stop: Arc<AtomicBool>) {
    for _ in 0..n {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = s.set_nodelay(true);
                if s.write_all(prefix).is_err() {
                    continue;
                }
                while !stop.load(Ordering::Relaxed) && s.write_all(&[drip]).is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
    }
}

/// `count` connection attempts to `addr` from `threads` threads: connect, then close at once.
fn flood(addr: SocketAddr, count: usize, threads: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..count / threads)
                        .filter(|_| TcpStream::connect(addr).is_ok())
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

/// The proxy's /metrics page.
fn metrics(status_port: u16) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{status_port}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn slowloris_and_a_flood_do_not_lock_out_a_well_behaved_client() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("limits");
    let web = LocalServer::start("limits-web");
    std::fs::write(web.dir.join("index.html"), PAGE).unwrap();
    let _b = join(
        &mesh,
        &state.0,
        "bravo",
        &["--expose", &format!("80={}", web.port)],
    );
    let status_port = free_port_block(1);
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &[
            "--socks",
            "0",
            "--http",
            "0",
            "--max-connections-per-listener",
            "256",
            "--handshake-timeout",
            "5s",
            "--status-addr",
            &status_port.to_string(),
        ],
    );
    let socks = a.socks.unwrap();
    let http = a.http.unwrap();
    let url = "http://bravo.mesh.test/index.html";
    let socks_url = socks.to_string();
    let http_url = format!("http://{http}");
    // Reachable before the attack.
    let (code, body, err) = fetch_until_ok(
        &["--socks5-hostname", &socks_url, url],
        Duration::from_secs(20),
    );
    assert_eq!((code, body.as_slice()), (0, PAGE), "{err}");

    let stop = Arc::new(AtomicBool::new(false));
    // SOCKS5 greeting offering 255 methods, one method byte at a time; an HTTP head one
    // header byte at a time.
    slowloris(socks, 300, &[5, 255], 0, stop.clone());
    slowloris(
        http,
        300,
        b"GET http://x/ HTTP/1.1\r\nX-Slow: ",
        b'a',
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let floods = [flood(socks, 5000, 4), flood(http, 5000, 4)];

    // The well-behaved client, through both listeners, all the while.
    let start = Instant::now();
    let mut rounds = 0;
    // A failure says how long the request took (an eviction is quick, a handshake timeout
    // takes --handshake-timeout) and what the listeners counted.
    let requests = |m: &str| -> String {
        m.lines()
            .filter(|l| l.starts_with("netbird_proxy_proxy_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    while start.elapsed() < Duration::from_secs(8) {
        let asked = Instant::now();
        let (code, body, err) = curl(&["--max-time", "10", "--socks5-hostname", &socks_url, url]);
        assert_eq!(
            (code, body.as_slice()),
            (0, PAGE),
            "SOCKS5 round {rounds}, after {:.2?}: {err}\n{}",
            asked.elapsed(),
            requests(&metrics(status_port))
        );
        let asked = Instant::now();
        let (code, body, err) = curl(&["--max-time", "10", "-x", &http_url, url]);
        assert_eq!(
            (code, body.as_slice()),
            (0, PAGE),
            "HTTP round {rounds}, after {:.2?}: {err}\n{}",
            asked.elapsed(),
            requests(&metrics(status_port))
        );
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let attempts: usize = floods.into_iter().map(|f| f.join().unwrap()).sum();
    assert!(
        attempts >= 9000,
        "only {attempts} flood connections were made"
    );
    assert!(rounds >= 3, "only {rounds} rounds in 8 s");

    // The limits and what they did are in /metrics.
    let text = metrics(status_port);
    let socks_label = format!("{{kind=\"socks5\",listener=\"{socks}\"");
    let http_label = format!("{{kind=\"http\",listener=\"{http}\"");
    assert_eq!(
        metric(
            &text,
            &format!("netbird_proxy_max_connections{socks_label}}}")
        ),
        256.0,
        "{text}"
    );
    for label in [&socks_label, &http_label] {
        let evicted = metric(
            &text,
            &format!("netbird_proxy_proxy_requests_total{label},result=\"evicted\"}}"),
        );
        let timeouts = metric(
            &text,
            &format!("netbird_proxy_proxy_requests_total{label},result=\"timeout\"}}"),
        );
        assert!(
            evicted > 0.0 || timeouts > 0.0,
            "no eviction or timeout for {label}:\n{text}"
        );
    }
    // Still serving after the attack ends.
    let (code, body, err) = curl(&["--max-time", "10", "--socks5-hostname", &socks_url, url]);
    assert_eq!((code, body.as_slice()), (0, PAGE), "{err}");
    let mut probe = TcpStream::connect(http).unwrap();
    probe
        .write_all(b"GET http://bravo.mesh.test/index.html HTTP/1.1\r\nHost: bravo.mesh.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    let _ = probe.read_to_end(&mut resp);
    assert!(resp.ends_with(PAGE), "{}", String::from_utf8_lossy(&resp));
}

/// Wait for the proxy to close `s` (EOF or reset), reading nothing else; returns when.
fn closed_at(s: &mut TcpStream, limit: Duration) -> Instant {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} unexpected bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("still open after {limit:?}")
        }
        Err(_) => {} // reset
    }
    Instant::now()
}

/// Idle timeout (issue "Robustness and security", limits): with `--idle-timeout 2s` an idle
/// SOCKS5 tunnel, HTTP CONNECT tunnel, forward and HTTP keep-alive connection (and, on a peer
/// with `--idle-timeout 3s`, a connection to an exposed port) are each closed
/// about 2 s after their last byte (the keep-alive wait is not cut short by the 1 s handshake
/// timeout, which bounds only the wait for a first request: a silent client goes after 1 s), a
/// tunnel with a byte every 700 ms outlives that many times over, their slots come back, and
/// idle closes, the timeout and a malformed request are counted in /metrics.
#[test]
fn idle_connections_are_closed_and_busy_ones_are_not() {
    const IDLE: Duration = Duration::from_secs(2);
    const HANDSHAKE: Duration = Duration::from_secs(1);
    const EXPOSE_IDLE: Duration = Duration::from_secs(3);
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("idle");
    let web = LocalServer::start("idle-web");
    std::fs::write(web.dir.join("index.html"), PAGE).unwrap();
    // Bravo's exposed ports idle out after 3 s: alpha's clients (2 s) close before that.
    let b_status_port = free_port_block(1);
    let b = join(
        &mesh,
        &state.0,
        "bravo",
        &[
            "--expose",
            &format!("80={}", web.port),
            "--expose",
            &format!("7000={}", web.echo_port),
            "--idle-timeout",
            "3s",
            "--status-addr",
            &b_status_port.to_string(),
        ],
    );
    let b_ip = b.mesh_ip.unwrap().to_string();
    // Charlie never idles out itself, so its connection to bravo's exposed port is closed by
    // bravo.
    let c = join(
        &mesh,
        &state.0,
        "charlie",
        &["--socks", "0", "--idle-timeout", "0"],
    );
    let status_port = free_port_block(1);
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &[
            "--socks",
            "0",
            "--http",
            "0",
            "--forward",
            &format!("0:{b_ip}:7000"),
            "--idle-timeout",
            "2s",
            // Shorter than the idle timeout: it bounds only the wait for a first request.
            "--handshake-timeout",
            "1s",
            "--status-addr",
            &status_port.to_string(),
        ],
    );
    let socks = a.socks.unwrap();
    let http = a.http.unwrap();
    let forward = a.forwards[0];
    let (code, _, err) = fetch_until_ok(
        &[
            "--socks5-hostname",
            &socks.to_string(),
            "http://bravo.mesh.test/",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 0, "{err}");

    let echo_once = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    let socks_tunnel = || {
        let (mut s, reply) = socks_connect(socks, None, &connect_v4(&b_ip, 7000)).unwrap();
        assert_eq!(reply[1], 0);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        echo_once(&mut s, b"hello");
        s
    };
    let idle_socks = socks_tunnel();
    let socks_last = Instant::now();
    let mut busy_socks = socks_tunnel();
    let mut idle_connect = TcpStream::connect(http).unwrap();
    write!(
        idle_connect,
        "CONNECT {b_ip}:7000 HTTP/1.1\r\nHost: {b_ip}:7000\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 256];
    idle_connect
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = idle_connect.read(&mut head).unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    echo_once(&mut idle_connect, b"tunnel");
    let connect_last = Instant::now();
    let mut idle_forward = TcpStream::connect(forward).unwrap();
    idle_forward
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo_once(&mut idle_forward, b"forward");
    let forward_last = Instant::now();
    let mut keep_alive = TcpStream::connect(http).unwrap();
    keep_alive
        .write_all(
            b"GET http://bravo.mesh.test/index.html HTTP/1.1\r\nHost: bravo.mesh.test\r\n\r\n",
        )
        .unwrap();
    keep_alive
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut resp = Vec::new();
    while !resp.ends_with(PAGE) {
        let mut buf = [0u8; 1024];
        let n = keep_alive.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&resp));
        resp.extend_from_slice(&buf[..n]);
    }

    let keep_alive_last = Instant::now();
    let (mut exposed, reply) = (0..40)
        .find_map(|_| {
            let r = socks_connect(c.socks.unwrap(), None, &connect_v4(&b_ip, 7000)).unwrap();
            if r.1[1] == 0 {
                return Some(r);
            }
            // Charlie's session with bravo may still be in the making.
            std::thread::sleep(Duration::from_millis(500));
            None
        })
        .expect("charlie reaches bravo");
    assert_eq!(reply[1], 0);
    exposed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo_once(&mut exposed, b"exposed");
    let exposed_last = Instant::now();
    // A client that never sends a request is closed after the handshake timeout.
    let silent = TcpStream::connect(http).unwrap();
    let silent_since = Instant::now();
    // One hyper cannot parse is answered 400 and counted as rejected.
    let mut bad = TcpStream::connect(http).unwrap();
    bad.write_all(b"NOT AN HTTP REQUEST\r\n\r\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = bad.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The busy tunnel: a byte every 700 ms, in its own thread, for 3 x the idle timeout.
    let busy = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < 3 * IDLE {
            std::thread::sleep(Duration::from_millis(700));
            echo_once(&mut busy_socks, b".");
        }
        busy_socks
    });
    // Each idle one waits in its own thread, so each close is timed as it happens.
    let waiters: Vec<_> = [
        ("SOCKS5 tunnel", idle_socks, socks_last, IDLE),
        ("CONNECT tunnel", idle_connect, connect_last, IDLE),
        ("forward", idle_forward, forward_last, IDLE),
        ("HTTP keep-alive", keep_alive, keep_alive_last, IDLE),
        ("silent HTTP client", silent, silent_since, HANDSHAKE),
        ("exposed port", exposed, exposed_last, EXPOSE_IDLE),
    ]
    .into_iter()
    .map(|(what, mut s, last_byte, limit)| {
        std::thread::spawn(move || {
            let at = closed_at(&mut s, Duration::from_secs(10));
            (what, at, last_byte, limit)
        })
    })
    .collect();
    for w in waiters {
        let (what, at, last_byte, limit) = w.join().unwrap();
        let idle = at - last_byte;
        eprintln!("{what} closed {idle:?} after the last byte");
        assert!(
            idle > limit - Duration::from_millis(200) && idle < limit + Duration::from_secs(3),
            "{what}: closed {idle:?} after its last byte, expected {limit:?}"
        );
    }
    let mut busy_socks = busy.join().unwrap();
    echo_once(&mut busy_socks, b"still here");
    drop(busy_socks);

    // Every slot is given back.
    wait_for(
        Duration::from_secs(5),
        || {
            let text = metrics(status_port);
            let open: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("netbird_proxy_open_connections{"))
                .collect();
            // SOCKS5, HTTP and the forward.
            open.len() == 3 && open.iter().all(|l| l.ends_with(" 0"))
        },
        "open connections back to 0",
    );
    // Each idle close is counted on its listener; the busy tunnel's is not.
    let text = metrics(status_port);
    let idle_closed = |kind: &str| {
        let prefix = format!("netbird_proxy_idle_closed_total{{kind=\"{kind}\",");
        let line = text
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        line.rsplit(' ').next().unwrap().to_string()
    };
    assert_eq!(idle_closed("socks5"), "1");
    // The CONNECT tunnel and the keep-alive connection.
    assert_eq!(idle_closed("http"), "2");
    assert_eq!(idle_closed("forward"), "1");
    let requests = |result: &str| {
        let prefix = "netbird_proxy_proxy_requests_total{kind=\"http\",";
        let suffix = format!(",result=\"{result}\"}}");
        text.lines()
            .find(|l| l.starts_with(prefix) && l.split(' ').next().unwrap().ends_with(&suffix))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no http {result} in\n{text}"))
            .to_string()
    };
    assert_eq!(requests("timeout"), "1");
    assert_eq!(requests("rejected"), "1");
    // Bravo counts the one it closed on its exposed port 7000.
    let b_text = metrics(b_status_port);
    let expose =
        format!("netbird_proxy_idle_closed_total{{kind=\"expose\",listener=\"{b_ip}:7000\"}}");
    let line = b_text
        .lines()
        .find(|l| l.starts_with(&expose))
        .unwrap_or_else(|| panic!("no {expose} in\n{b_text}"));
    assert!(line.ends_with(" 1"), "{line}");
}

/// The global cap on buffered bytes (issue "Robustness and security", limits): with
/// `--max-buffer-mib 2` the netstack has room for three mesh connections (each reserves
/// 2 x (256 KiB socket buffer + 64 KiB ring)); a fourth is refused at once with SOCKS5 0x01 or
/// HTTP 503 naming the cap, the three keep working, and closing one makes room again.
#[test]
fn connections_beyond_the_buffer_cap_are_refused_clearly_until_room_frees() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("bufcap");
    let web = LocalServer::start("bufcap-web");
    let b = join(
        &mesh,
        &state.0,
        "bravo",
        &["--expose", &format!("7000={}", web.echo_port)],
    );
    let b_ip = b.mesh_ip.unwrap().to_string();
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &["--socks", "0", "--http", "0", "--max-buffer-mib", "2"],
    );
    let socks = a.socks.unwrap();
    let http = a.http.unwrap();
    let open = || socks_connect(socks, None, &connect_v4(&b_ip, 7000)).unwrap();
    let echo = |s: &mut TcpStream, msg: &[u8]| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    // The first connection may wait for the peer's session.
    let start = Instant::now();
    let mut held = vec![loop {
        let (s, reply) = open();
        if reply[1] == 0 {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no first tunnel");
        std::thread::sleep(Duration::from_millis(200));
    }];
    for _ in 0..2 {
        let (s, reply) = open();
        assert_eq!(reply[1], 0, "{}", a.log());
        held.push(s);
    }
    for (i, s) in held.iter_mut().enumerate() {
        echo(s, format!("tunnel {i}").as_bytes());
    }

    let refused_at = Instant::now();
    let (_, reply) = open();
    assert_eq!(reply[1], 0x01, "a fourth SOCKS5 tunnel: {reply:?}");
    let (code, body, err) = curl(&[
        "-s",
        "--max-time",
        "10",
        "-x",
        &format!("http://{http}"),
        &format!("http://{b_ip}:7000/"),
        "-w",
        "%{http_code}",
    ]);
    let body = String::from_utf8_lossy(&body);
    assert!(
        code == 0 && body.ends_with("503") && body.contains("TCP buffer cap reached"),
        "HTTP over the cap: {code} {body} {err}"
    );
    assert!(refused_at.elapsed() < Duration::from_secs(5));
    for (i, s) in held.iter_mut().enumerate() {
        echo(s, format!("still {i}").as_bytes());
    }

    // One closes: its share comes back once the netstack has retired the socket.
    drop(held.pop());
    let freed = Instant::now();
    let mut again = loop {
        let (s, reply) = open();
        if reply[1] == 0 {
            break s;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(20),
            "no room after a close: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    echo(&mut again, b"room again");
    eprintln!("room again {:?} after a close", freed.elapsed());
}
