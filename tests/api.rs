//! The library's front door, used as a program embedding it would: `TestMesh` peers that
//! `listen`, `dial` by mesh name, exchange UDP datagrams, report status and stop — on the
//! relayed path (ICE off) and with ICE on, everything in this process on loopback.
//!
//! Only the public API is used here (no `internals`), so this file also proves the surface is
//! enough for the job.

use std::time::Duration;

use netbird_proxy::devmesh::TestMesh;
use netbird_proxy::{Error, Peer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A pattern a byte at a time shift of its index, so a lost or reordered chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Echo every connection on `listener` until the peer stops.
fn serve_echo(mut listener: netbird_proxy::MeshListener) -> tokio::task::JoinHandle<Error> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok(mut s) => {
                    tokio::spawn(async move {
                        let (mut r, mut w) = tokio::io::split(&mut s);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
                Err(e) => return e,
            }
        }
    })
}

/// 4 MiB through an echo a peer serves with `listen`, dialled by name from the other; then
/// the same two peers swap UDP datagrams; then `stop` ends the listener and later dials.
async fn round_trip(relay_only: bool) {
    let mut mesh = TestMesh::empty().await.expect("dev mesh");
    for name in ["server", "client"] {
        let builder = mesh.builder(name).ready_peers(0).ice(!relay_only);
        mesh.add(name, builder).await.expect("peer starts");
    }
    let server = mesh.peer("server").clone();
    let client = mesh.peer("client").clone();
    assert_eq!(server.mesh_addresses().len(), 1, "one mesh address");

    let echo = serve_echo(server.listen(7000).await.expect("listen"));
    let mut stream = tokio::time::timeout(
        Duration::from_secs(20),
        client.dial("server.netbird.test", 7000),
    )
    .await
    .expect("dial in time")
    .unwrap_or_else(|e| panic!("dial: {e}"));
    assert!(stream.is_mesh());
    assert_eq!(
        stream.peer_addr().unwrap(),
        std::net::SocketAddr::new(server.mesh_addresses()[0], 7000)
    );
    let data = pattern(4 << 20);
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let (_, back) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("echo in time");
    assert!(
        back == data,
        "{} of {} bytes came back",
        back.len(),
        data.len()
    );

    // The client saw the server connected, on the path asked for.
    let status = client.status();
    assert!(status.ready, "{:?}", status.reason);
    let seen = status
        .peers
        .iter()
        .find(|p| p.fqdn.starts_with("server."))
        .expect("server in the client's status");
    assert_eq!(seen.status, "connected");
    if relay_only {
        assert_eq!(seen.connection, "relayed");
    }
    let mut changes = client.status_changes();
    let first = changes.next().await.expect("a first snapshot");
    assert!(first.ready);

    // UDP: a service port on the server, an ephemeral port on the client.
    let udp_server = server.bind_udp(5353).await.expect("udp bind");
    let udp_client = client.bind_udp(0).await.expect("udp bind");
    let to = std::net::SocketAddr::new(server.mesh_addresses()[0], 5353);
    let answer = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            let (n, from) = udp_server.recv_from(&mut buf).await.unwrap();
            udp_server.send_to(&buf[..n], from).await.unwrap();
        }
    });
    for i in 0..10u8 {
        let msg = [i; 1000];
        udp_client.send_to(&msg, to).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(10), udp_client.recv_from(&mut buf))
                .await
                .expect("udp answer in time")
                .unwrap();
        assert_eq!((n, from), (1000, to));
        assert!(buf[..n].iter().all(|&b| b == i));
    }
    answer.await.unwrap();
    // A burst far over the send queue (64): sends wait for room, none fails.
    let burst = tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..2000 {
            udp_client.send_to(&[7u8; 1000], to).await.unwrap();
        }
    });
    burst
        .await
        .expect("a burst is sent, waiting for room when the queue is full");
    let too_big = vec![0u8; udp_client.max_payload(to) + 1];
    let err = udp_client.send_to(&too_big, to).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);

    // Stopping is final: the listener ends, dials are refused, the peer says why.
    server.stop().await.expect("clean stop");
    let ended = tokio::time::timeout(Duration::from_secs(5), echo)
        .await
        .expect("listener ends with the peer")
        .unwrap();
    assert!(matches!(ended, Error::Stopped), "{ended}");
    assert!(matches!(
        server.dial("client.netbird.test", 1).await,
        Err(Error::Stopped)
    ));
    mesh.stop().await;
    assert!(matches!(
        client.dial("server", 1).await,
        Err(Error::Stopped)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_listens_and_another_dials_it_by_name_over_the_relay() {
    round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_listens_and_another_dials_it_by_name_with_ice() {
    round_trip(false).await;
}

/// The test helper's promise: `start` returns with every peer connected to every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_mesh_of_three_is_fully_connected_when_start_returns() {
    let mesh = TestMesh::start(&["a", "b", "c"]).await.expect("mesh up");
    for name in ["a", "b", "c"] {
        let status = mesh.peer(name).status();
        let connected: Vec<_> = status
            .peers
            .iter()
            .filter(|p| p.status == "connected")
            .map(|p| p.fqdn.clone())
            .collect();
        assert_eq!(connected.len(), 2, "{name} sees {connected:?}");
    }
    mesh.stop().await;
}

/// What a user sees when the mesh cannot be joined: a refused setup key is `LoginRefused`
/// (no retry would help), an unreachable management is `NotReady` with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_to_join_say_why() {
    let mesh = TestMesh::empty().await.unwrap();
    let refused = Peer::builder()
        .management_url(mesh.management_url())
        .setup_key("00000000-0000-0000-0000-000000000000")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::LoginRefused(_)), "{refused:?}");

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let started = std::time::Instant::now();
    let unreachable = Peer::builder()
        .management_url(url)
        .setup_key(mesh.setup_key())
        .ready_timeout(Duration::from_secs(2))
        .start()
        .await
        .unwrap_err();
    match unreachable {
        Error::NotReady { reason, .. } => assert!(!reason.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // A WireGuard configuration and NetBird options do not mix: refused before anything runs.
    let wg: netbird_proxy::WireGuardConfig = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 100.64.9.1/32\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 100.64.9.2/32\n",
        base64_key([7; 32]),
        base64_key([8; 32])
    )
    .parse()
    .unwrap();
    let mixed = Peer::builder()
        .wireguard(wg)
        .setup_key("x")
        .spawn()
        .await
        .unwrap_err();
    assert!(
        matches!(&mixed, Error::Config(m) if m.contains("setup key")),
        "{mixed:?}"
    );

    // A bad wg-quick file is refused while parsing, before anything starts.
    let parsed: Result<netbird_proxy::WireGuardConfig, _> =
        "[Interface]\nPrivateKey = nope\n".parse();
    assert!(matches!(parsed, Err(Error::Config(_))));
    mesh.stop().await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The front door's own tasks (the run task, the status endpoint, listeners taken through
/// `listen`, UDP sockets) belong to the peer's cancellation: peers stopped — or only dropped —
/// at pseudo-random moments of their start leave no descriptor, port or task behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_stopped_or_dropped_at_any_moment_leave_nothing_behind() {
    let mut mesh = TestMesh::empty().await.unwrap();
    let anchor = mesh.builder("anchor").ready_peers(0);
    mesh.add("anchor", anchor).await.unwrap();
    // Warm up once so lazily created runtime resources are not counted as leaks.
    let warm = mesh.builder("warm").ready_peers(0).start().await.unwrap();
    warm.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds();
    let socks = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socks_addr = socks.local_addr().unwrap();
    drop(socks);
    for i in 0..40u64 {
        let peer = mesh
            .builder(&format!("churn{}", i % 4))
            .private_key([(i % 4) as u8 + 1; 32])
            .ready_peers(0)
            .connect_timeout(Duration::from_secs(2))
            .socks(netbird_proxy::config::ListenAddr::Tcp(socks_addr))
            .status_endpoint("127.0.0.1:0".parse().unwrap())
            .spawn()
            .await
            .unwrap();
        let wait = (i.wrapping_mul(2654435761) >> 7) % 400;
        let user = {
            let peer = peer.clone();
            tokio::spawn(async move {
                // Whatever the peer is doing, a user may be dialling or listening.
                if let Ok(mut l) = peer.listen(9000).await {
                    let _ = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
                }
                let _ = peer.bind_udp(0).await;
                let _ = peer.dial("anchor.netbird.test", 1).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if i % 3 == 0 {
            // Dropped, not stopped: the last handle going stops it too.
            drop(peer);
            tokio::time::timeout(Duration::from_secs(10), user)
                .await
                .expect("the user's calls end with the peer")
                .unwrap();
        } else {
            tokio::time::timeout(Duration::from_secs(10), peer.stop())
                .await
                .expect("stop is bounded")
                .unwrap();
            // `stop` returns once the engine is down: its ports are free at once, while this
            // handle (and the user's) still exist.
            drop(
                std::net::TcpListener::bind(socks_addr).expect("the SOCKS port is free after stop"),
            );
            tokio::time::timeout(Duration::from_secs(10), user)
                .await
                .expect("the user's calls end with the peer")
                .unwrap();
        }
    }
    // The SOCKS port is free again: nothing listens on it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(socks_addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the SOCKS port stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds();
        if now <= before + 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} descriptors before, {now} after 40 peers",
            before
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.stop().await;
}

fn base64_key(key: [u8; 32]) -> String {
    use std::fmt::Write;
    // Standard base64 of 32 bytes, without a crate.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in key.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let _ = write!(
                    out,
                    "{}",
                    ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char
                );
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `stop` frees everything the engine held, the WireGuard socket included, while the user
/// still holds the peer: a new peer on the same fixed WireGuard port starts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_frees_its_wireguard_port_for_the_next() {
    let mesh = TestMesh::empty().await.unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let first = mesh
        .builder("fixed")
        .ready_peers(0)
        .wireguard_port(port)
        .start()
        .await
        .expect("first peer");
    first.stop().await.unwrap();
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        mesh.builder("fixed-again")
            .ready_peers(0)
            .wireguard_port(port)
            .start(),
    )
    .await
    .expect("the second peer starts at once")
    .expect("the port is free");
    assert!(first.dial("fixed-again.netbird.test", 1).await.is_err());
    second.stop().await.unwrap();
    drop(first);
    mesh.stop().await;
}

/// How many peers `p` has a live session with.
fn connected(p: &Peer) -> usize {
    p.status()
        .peers
        .iter()
        .filter(|s| s.status == "connected")
        .count()
}

/// Wait until `a` and `b` each have `want` connected peers, at most `secs`.
async fn wait_connected(a: &Peer, b: &Peer, want: usize, what: &str, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while connected(a) != want || connected(b) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: after {secs} s a has {} and b {} connected peers, not {want}",
            connected(a),
            connected(b)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lazy connections (issue 20), on the relayed path: two lazy peers send no offer and open
/// no relay connection but their home one until one dials the other; the dial wakes the
/// peer and goes through; after the inactivity timeout without data both sides are idle
/// again (GO_IDLE told the other), and the next dial wakes them once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_peers_connect_on_first_use_and_go_idle_when_unused() {
    let mut mesh = TestMesh::empty().await.unwrap();
    for name in ["a", "b"] {
        let builder = mesh
            .builder(name)
            .lazy_connections(true)
            .lazy_inactivity(Duration::from_secs(2))
            .ice(false);
        mesh.add(name, builder)
            .await
            .expect("a lazy peer is ready on its map");
    }
    let (a, b) = (mesh.peer("a").clone(), mesh.peer("b").clone());
    let echo = serve_echo(b.listen(7000).await.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = |p: &Peer| p.status().signal.and_then(|s| s.sent).unwrap_or(0);
    let opened = |p: &Peer| p.status().relay.and_then(|r| r.opened).unwrap_or(0);
    assert_eq!(
        (connected(&a), connected(&b)),
        (0, 0),
        "nothing set up before use"
    );
    assert_eq!((sent(&a), sent(&b)), (0, 0), "no offer before use");
    assert_eq!((opened(&a), opened(&b)), (1, 1), "only the home relay");

    let round_trip = |peer: Peer| async move {
        let mut s =
            tokio::time::timeout(Duration::from_secs(15), peer.dial("b.netbird.test", 7000))
                .await
                .expect("a dial waits for the woken peer, within its timeout")
                .unwrap_or_else(|e| panic!("dial: {e}"));
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    };
    round_trip(a.clone()).await;
    assert_eq!(connected(&a), 1, "the dial woke b");
    assert!(sent(&a) >= 1, "a offered to b");

    // Idle: no data for 2 s; the check runs every 5 s.
    wait_connected(&a, &b, 0, "idle without data", 20).await;
    round_trip(a.clone()).await;
    assert_eq!(connected(&a), 1, "woken again");
    b.stop().await.unwrap();
    let _ = echo.await;
    mesh.stop().await;
}

/// `LazyConnections::FollowManagement` (`--lazy-connections auto`): peers do what the
/// account says, and follow it when it changes — off: set up without any traffic; on: idled
/// after the inactivity timeout; off again: set up again, still without traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_following_management_switch_lazy_connections_with_the_account() {
    let mut mesh = TestMesh::empty().await.unwrap();
    for name in ["a", "b"] {
        let builder = mesh
            .builder(name)
            .lazy_connections(netbird_proxy::LazyConnections::FollowManagement)
            .lazy_inactivity(Duration::from_secs(2))
            .ice(false);
        mesh.add(name, builder).await.expect("peer starts");
    }
    let (a, b) = (mesh.peer("a").clone(), mesh.peer("b").clone());
    let wait_for = |want, what| wait_connected(&a, &b, want, what, 30);
    wait_for(1, "account not lazy: set up at once").await;
    mesh.dev_mesh().set_lazy_connections(true);
    wait_for(0, "account lazy: idled without data").await;
    mesh.dev_mesh().set_lazy_connections(false);
    wait_for(1, "account not lazy again: set up without traffic").await;
    mesh.stop().await;
}
