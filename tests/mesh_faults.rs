//! Control-plane faults with traffic flowing, as separate processes: the dev mesh runs its
//! management (with or without signal), signal and relays in `dev-mesh` processes sharing a state
//! file, so a test can SIGKILL one of them mid-transfer and start it again, as a crash and a
//! restart would.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::mesh::*;
use common::*;

/// Management (with signal, unless signal has its own process) in one process, the relays in
/// another, on consecutive fixed ports.
struct SplitMesh {
    control: DevMeshProcess,
    signal: Option<DevMeshProcess>,
    relays: DevMeshProcess,
    _state: TempDir,
}

fn split_mesh(name: &str, relays: u8) -> SplitMesh {
    split_mesh_with(name, relays, false)
}

fn split_mesh_with(name: &str, relays: u8, own_signal: bool) -> SplitMesh {
    let state = TempDir::new(&format!("faults-{name}"));
    let base = free_port_block(2 + u16::from(relays));
    let listen = format!("127.0.0.1:{base}");
    let file = state.0.join("mesh.state");
    let args = |services: &'static str| {
        [
            "--listen",
            &listen,
            "--relays",
            &relays.to_string(),
            "--services",
            services,
            "--state",
            file.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let start =
        |services| DevMeshProcess::start_with(&args(services).each_ref().map(|s| s.as_str()));
    let (control, signal) = if own_signal {
        (start("management"), Some(start("signal")))
    } else {
        (start("management,signal"), None)
    };
    let relays = start("relay");
    SplitMesh {
        control,
        signal,
        relays,
        _state: state,
    }
}

/// A SOCKS CONNECT through `socks` to `ip:port`, retried until it succeeds or `limit` passes.
fn connect_until(socks: SocketAddr, ip: IpAddr, port: u16, limit: Duration) -> TcpStream {
    let start = Instant::now();
    loop {
        if let Ok((s, reply)) = socks_connect(socks, None, &connect_v4(&ip.to_string(), port))
            && reply[1] == 0
        {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "no connection to {ip}:{port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Send 16 KiB rounds through the echo server for `period`; each must come back intact within
/// `stall` (3 s unless a test allows more).
fn echo_for(s: &mut TcpStream, period: Duration, stall: Duration, round: &mut u32) {
    s.set_read_timeout(Some(stall)).unwrap();
    let start = Instant::now();
    while start.elapsed() < period {
        *round += 1;
        let msg = format!("round {round:010}").repeat(1024);
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("echo stalled at round {round}: {e}"));
        assert!(back == msg.as_bytes(), "round {round} came back altered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const STALL: Duration = Duration::from_secs(3);

/// B exposes the fixture echo server on mesh port 7000; A has a SOCKS listener. Returns the
/// peers' state dir, the fixture server, A and B.
/// `extra` goes to both (e.g. `--force-relay` to test the relayed path).
fn alpha_and_bravo(
    mesh: &SplitMesh,
    name: &str,
    extra: &[&str],
) -> (TempDir, LocalServer, Proxy, Proxy) {
    let dir = TempDir::new(&format!("faults-{name}-peers"));
    let echo = LocalServer::start(&format!("faults-{name}"));
    let expose = format!("7000={}", echo.echo_port);
    let b = join(
        &mesh.control,
        &dir.0,
        "bravo",
        &[&["--expose", expose.as_str()], extra].concat(),
    );
    let a = join(
        &mesh.control,
        &dir.0,
        "alpha",
        &[&["--socks", "0"], extra].concat(),
    );
    (dir, echo, a, b)
}

/// Acceptance 3: management (with signal) killed and restarted mid-run: the open connection
/// keeps flowing throughout; afterwards A resyncs (it learns of a peer that joins later).
#[test]
fn management_killed_and_restarted_keeps_open_transfers_flowing_and_resyncs() {
    let mut mesh = split_mesh("mgmt", 1);
    let (dir, echo, a, b) = alpha_and_bravo(&mesh, "mgmt", &[]);
    let socks = a.socks.unwrap();
    let b_ip = b.mesh_ip.unwrap();
    let mut conn = connect_until(socks, b_ip, 7000, Duration::from_secs(20));
    let mut round = 0;
    echo_for(&mut conn, Duration::from_secs(1), STALL, &mut round);

    mesh.control.kill();
    echo_for(&mut conn, Duration::from_secs(3), STALL, &mut round);
    mesh.control.restart();
    echo_for(&mut conn, Duration::from_secs(2), STALL, &mut round);

    // C joins the restarted management: A hears of it only through a new network map.
    let c = join(
        &mesh.control,
        &dir.0,
        "charlie",
        &["--expose", &format!("7001={}", echo.echo_port)],
    );
    let c_ip = c.mesh_ip.unwrap();
    assert!(
        c_ip != b_ip && Some(c_ip) != a.mesh_ip,
        "registrations survived the restart"
    );
    let mut to_c = connect_until(socks, c_ip, 7001, Duration::from_secs(30));
    echo_for(&mut to_c, Duration::from_millis(300), STALL, &mut round);
    echo_for(&mut conn, Duration::from_millis(300), STALL, &mut round);
    assert!(
        a.log().contains("management sync stream reopened"),
        "{}",
        a.log()
    );
    eprintln!("{round} echo rounds of 16 KiB, none stalled over {STALL:?}");
}

/// Acceptance 4: the relay process killed and restarted. A and B have different home relays
/// (two relays, round-robin), so one of them reaches the other through a foreign relay; both
/// reconnect by themselves and traffic recovers within the bound below, on new connections and
/// on the one left open.
#[test]
fn relay_killed_and_restarted_recovers_traffic_within_a_bound() {
    let mut mesh = split_mesh("relay", 2);
    // Relay only: with ICE the peers would meet directly on loopback and never miss the relay.
    let (_dir, _echo, a, b) = alpha_and_bravo(&mesh, "relay", &["--force-relay"]);
    let socks = a.socks.unwrap();
    let b_ip = b.mesh_ip.unwrap();
    let mut conn = connect_until(socks, b_ip, 7000, Duration::from_secs(20));
    let mut round = 0;
    echo_for(&mut conn, Duration::from_millis(500), STALL, &mut round);

    mesh.relays.kill();
    std::thread::sleep(Duration::from_secs(1));
    mesh.relays.restart();
    let back = Instant::now();
    const BOUND: Duration = Duration::from_secs(30);
    let mut again = connect_until(socks, b_ip, 7000, BOUND);
    echo_for(&mut again, Duration::from_millis(300), STALL, &mut round);
    let recovered = back.elapsed();
    // The connection open across the outage resumes too (TCP retransmits into the new path).
    echo_for(&mut conn, Duration::from_millis(300), BOUND, &mut round);
    eprintln!("traffic recovered {recovered:?} after the relays came back (bound {BOUND:?})");
    assert!(recovered < BOUND);
}

/// Acceptance 3: signal killed and restarted mid-run. The open connection keeps flowing (its
/// packets go through the relay, not signal); the peers reconnect to the restarted signal by
/// themselves, and a peer that joins afterwards is reached, which takes an offer and an answer
/// exchanged over the new signal connection.
#[test]
fn signal_killed_and_restarted_keeps_open_transfers_flowing_and_peers_reconnect() {
    let mut mesh = split_mesh_with("signal", 1, true);
    let (dir, echo, a, b) = alpha_and_bravo(&mesh, "signal", &[]);
    let socks = a.socks.unwrap();
    let b_ip = b.mesh_ip.unwrap();
    let mut conn = connect_until(socks, b_ip, 7000, Duration::from_secs(20));
    let mut round = 0;
    echo_for(&mut conn, Duration::from_secs(1), STALL, &mut round);
    let connected = |p: &Proxy| p.log().matches("signal connected").count();
    assert_eq!(connected(&a), 1, "{}", a.log());

    let signal = mesh.signal.as_mut().unwrap();
    signal.kill();
    echo_for(&mut conn, Duration::from_secs(3), STALL, &mut round);
    signal.restart();
    let back = Instant::now();
    echo_for(&mut conn, Duration::from_secs(1), STALL, &mut round);
    const BOUND: Duration = Duration::from_secs(30);
    wait_for_or(
        BOUND,
        || connected(&a) >= 2 && connected(&b) >= 2,
        || format!("no signal reconnect:\nA:\n{}\nB:\n{}", a.log(), b.log()),
    );
    let reconnected = back.elapsed();

    let c = join(
        &mesh.control,
        &dir.0,
        "charlie",
        &["--expose", &format!("7001={}", echo.echo_port)],
    );
    let mut to_c = connect_until(socks, c.mesh_ip.unwrap(), 7001, BOUND);
    echo_for(&mut to_c, Duration::from_millis(300), STALL, &mut round);
    echo_for(&mut conn, Duration::from_millis(300), STALL, &mut round);
    let reached = back.elapsed();
    eprintln!(
        "{round} echo rounds of 16 KiB, none stalled over {STALL:?}; both peers back on signal \
         {reconnected:?} after its restart, a new peer reached {reached:?} after it"
    );
}
