//! UDP through the proxy (issue 18, items 1 and 2) against a real wireguard-go peer in a
//! namespace: SOCKS5 UDP ASSOCIATE with fast-socks5's client (an implementation independent of
//! our server) and with hand-made datagrams for what a polite client never sends; UDP forwards
//! and exposed UDP ports; dnsmasq answering a DNS query sent through the association; the
//! counters in `/metrics`.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mesh::free_port_block;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The peer's UDP who-am-I port (answers with the source address it saw).
const WHOAMI_PORT: u16 = ECHO_PORT + 1;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `GET /metrics` from the status endpoint on `port`.
fn metrics(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the first metric line that starts with `name{` and holds every `label`.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Wait until `check` holds on the metrics (they are read, not pushed).
fn wait_metrics(port: u16, what: &str, check: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let m = metrics(port);
        if check(&m) {
            return m;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{what}:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Datagram = fast_socks5::client::Socks5Datagram<TcpStream>;

/// Send `payload` to `to` through the association and wait for the answer, retrying a lost
/// datagram (UDP promises nothing; the test promises every payload comes back exactly): the
/// answer and the source its header names.
async fn socks_round_trip<A>(dgram: &Datagram, to: A, payload: &[u8]) -> (Vec<u8>, String)
where
    A: fast_socks5::util::target_addr::ToTargetAddr + Copy,
{
    let mut buf = vec![0u8; 4096];
    for _ in 0..5 {
        dgram.send_to(payload, to).await.unwrap();
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), dgram.recv_from(&mut buf)).await
        {
            let (n, from) = r.unwrap();
            return (buf[..n].to_vec(), from.to_string());
        }
    }
    panic!(
        "no answer to a {}-byte datagram after 5 tries",
        payload.len()
    );
}

/// Items 1: fast-socks5's UDP client reaches the peer's UDP echo by IP and by name (ATYP 3,
/// resolved through the tunnel by dnsmasq), every size up to the tunnel's limit comes back
/// intact with the right source in its header, and a DNS query to dnsmasq is answered.
#[test]
fn socks5_udp_associate_reaches_mesh_peers_by_ip_and_name() {
    let bed = Testbed::new(BedOptions { dns: true });
    let status = free_port_block(1);
    let config = bed.proxy_config(&format!("DNS = {PEER_IP}"));
    let proxy = Proxy::start(
        &config,
        &[
            "--socks",
            "0",
            "--no-direct",
            "--status-addr",
            &status.to_string(),
        ],
    );
    let socks = proxy.socks.unwrap();
    runtime().block_on(async {
        let control = TcpStream::connect(socks).await.unwrap();
        let dgram = fast_socks5::client::Socks5Datagram::bind(control, "127.0.0.1:0")
            .await
            .expect("UDP ASSOCIATE");
        let echo: SocketAddr = format!("{PEER_IP}:{ECHO_PORT}").parse().unwrap();
        // Sizes from 1 byte to the largest a 1420-byte tunnel carries (1420 - 28).
        for (i, len) in [1usize, 2, 100, 512, 1000, 1300, 1392]
            .into_iter()
            .enumerate()
        {
            let payload: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            let (got, from) = socks_round_trip(&dgram, echo, &payload).await;
            assert_eq!(got, payload, "{len}-byte datagram came back altered");
            assert_eq!(from, echo.to_string());
        }
        // By name: resolved as for CONNECT, through the tunnel.
        let (got, _) = socks_round_trip(&dgram, ("web.mesh.test", ECHO_PORT), b"by name").await;
        assert_eq!(got, b"by name");
        // A real DNS server through the association: dnsmasq answers web.mesh.test's A.
        let dns: SocketAddr = format!("{PEER_IP}:53").parse().unwrap();
        let (answer, _) = socks_round_trip(&dgram, dns, &dns_query(0x4242, "web.mesh.test")).await;
        assert_eq!(&answer[..2], &[0x42, 0x42], "the answer's ID");
        let peer: std::net::Ipv4Addr = PEER_IP.parse().unwrap();
        assert!(
            answer.windows(4).any(|w| w == peer.octets()),
            "dnsmasq's answer holds {PEER_IP}: {answer:?}"
        );
        // The client announced port 0: its first datagram's port is the only one taken from
        // then on. Another socket of the same IP (another local user) gets nothing through.
        let relay: SocketAddr = dgram.proxy_addr().unwrap().to_string().parse().unwrap();
        let intruder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut probe = vec![0, 0, 0, 1];
        probe.extend_from_slice(&peer.octets());
        probe.extend_from_slice(&ECHO_PORT.to_be_bytes());
        probe.extend_from_slice(b"intruder");
        intruder.send_to(&probe, relay).await.unwrap();
        let mut buf = [0u8; 64];
        let answered =
            tokio::time::timeout(Duration::from_secs(1), intruder.recv_from(&mut buf)).await;
        assert!(
            answered.is_err(),
            "another port of the client's IP was served"
        );
    });
    let m = wait_metrics(status, "the association counted", |m| {
        metric(m, "netbird_proxy_udp_datagrams_total", &["to_client"]).unwrap_or(0.0) >= 9.0
            && metric(m, "netbird_proxy_udp_dropped_total", &["foreign_source"]) == Some(1.0)
    });
    // The association ended with its control connection.
    let m2 = wait_metrics(status, "the association closed", |m| {
        metric(m, "netbird_proxy_udp_open", &["socks5"]) == Some(0.0)
    });
    assert!(
        metric(&m, "netbird_proxy_udp_datagrams_total", &["to_target"]).unwrap_or(0.0) >= 9.0,
        "{m}"
    );
    assert!(
        metric(
            &m2,
            "netbird_proxy_proxy_requests_total",
            &["result=\"0x00\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m2}"
    );
    drop(proxy);
}

/// A DNS query for `name`'s A record (RFC 1035 §4.1), with recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Item 1, the rules a polite client never tests: datagrams from another port than the one
/// announced, fragments, datagrams over the tunnel's limit and malformed headers are dropped
/// and counted by reason; --no-direct keeps off-mesh destinations out; the association ends
/// with its TCP connection, and its relay port then answers nothing.
#[test]
fn socks5_udp_drops_what_it_must_and_ends_with_its_control_connection() {
    let bed = Testbed::new(BedOptions::default());
    let status = free_port_block(1);
    let proxy = Proxy::start(
        &bed.proxy_config(""),
        &[
            "--socks",
            "0",
            "--no-direct",
            "--status-addr",
            &status.to_string(),
        ],
    );
    let socks = proxy.socks.unwrap();
    runtime().block_on(async {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mine = client.local_addr().unwrap();
        let (mut control, relay) = associate(socks, mine).await;
        assert_eq!(relay.ip(), socks.ip(), "bound where the client reached us");
        let header = |frag: u8, to: SocketAddr| {
            let mut h = vec![0, 0, frag, 1];
            match to {
                SocketAddr::V4(a) => h.extend_from_slice(&a.ip().octets()),
                SocketAddr::V6(_) => unreachable!(),
            }
            h.extend_from_slice(&to.port().to_be_bytes());
            h
        };
        let echo: SocketAddr = format!("{PEER_IP}:{ECHO_PORT}").parse().unwrap();
        let whoami: SocketAddr = format!("{PEER_IP}:{WHOAMI_PORT}").parse().unwrap();
        let mut buf = vec![0u8; 4096];
        // A good datagram first: the path works.
        let mut good = header(0, whoami);
        good.extend_from_slice(b"?");
        let mut answered = false;
        for _ in 0..5 {
            client.send_to(&good, relay).await.unwrap();
            if let Ok(r) =
                tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await
            {
                let (n, from) = r.unwrap();
                assert_eq!(from, relay);
                assert_eq!(&buf[..10], &header(0, whoami)[..]);
                let seen = String::from_utf8_lossy(&buf[10..n]).to_string();
                assert!(seen.starts_with(&format!("{PROXY_IP} ")), "{seen}");
                answered = true;
                break;
            }
        }
        assert!(answered, "the who-am-I port never answered");

        // Every bad one: no answer may come for any of them.
        let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut frag = header(1, echo);
        frag.extend_from_slice(b"fragment");
        client.send_to(&frag, relay).await.unwrap();
        let mut big = header(0, echo);
        big.extend_from_slice(&vec![7u8; 1393]);
        client.send_to(&big, relay).await.unwrap();
        client.send_to(&[0, 0, 0, 9, 1], relay).await.unwrap();
        client.send_to(&[0, 1, 0, 1], relay).await.unwrap();
        let mut outside = header(0, "198.19.7.7:53".parse().unwrap());
        outside.extend_from_slice(b"off-mesh");
        client.send_to(&outside, relay).await.unwrap();
        let mut foreign = header(0, echo);
        foreign.extend_from_slice(b"from another port");
        other.send_to(&foreign, relay).await.unwrap();
        // Another source IP altogether (loopback has the whole 127/8).
        let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        stranger.send_to(&foreign, relay).await.unwrap();
        let nothing = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::select! {
                r = client.recv_from(&mut buf) => r.map(|(n, _)| n),
                r = async {
                    let mut b2 = [0u8; 64];
                    other.recv_from(&mut b2).await.map(|(n, _)| n)
                } => r,
                r = async {
                    let mut b3 = [0u8; 64];
                    stranger.recv_from(&mut b3).await.map(|(n, _)| n)
                } => r,
            }
        })
        .await;
        assert!(nothing.is_err(), "a dropped datagram was answered");

        // The control connection closes: the association and its relay port go.
        control.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), control.read_to_end(&mut rest)).await;
        drop(control);
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.send_to(&good, relay).await.unwrap();
        let after = tokio::time::timeout(Duration::from_secs(1), client.recv_from(&mut buf)).await;
        assert!(
            !matches!(after, Ok(Ok(_))),
            "the relay answered after its association ended"
        );
    });
    let m = wait_metrics(status, "every drop counted", |m| {
        [
            "fragmented",
            "too_big",
            "malformed",
            "not_allowed",
            "foreign_source",
        ]
        .iter()
        .all(|r| {
            metric(
                m,
                "netbird_proxy_udp_dropped_total",
                &[&format!("reason=\"{r}\"")],
            )
            .is_some_and(|n| n >= 1.0)
        }) && metric(m, "netbird_proxy_udp_open", &["socks5"]) == Some(0.0)
    });
    assert_eq!(
        metric(
            &m,
            "netbird_proxy_udp_dropped_total",
            &["reason=\"malformed\""]
        ),
        Some(2.0),
        "{m}"
    );
    // One from another port, one from another IP.
    assert_eq!(
        metric(
            &m,
            "netbird_proxy_udp_dropped_total",
            &["reason=\"foreign_source\""]
        ),
        Some(2.0),
        "{m}"
    );
}

/// UDP ASSOCIATE by hand, announcing `mine`: the control connection and the relay address.
async fn associate(socks: SocketAddr, mine: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    assert_eq!(sel, [5, 0]);
    let SocketAddr::V4(m) = mine else {
        unreachable!()
    };
    let mut req = vec![5, 3, 0, 1];
    req.extend_from_slice(&m.ip().octets());
    req.extend_from_slice(&m.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        reply[..4],
        [5, 0, 0, 1],
        "UDP ASSOCIATE answered: {reply:?}"
    );
    let ip = std::net::Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]);
    let port = u16::from_be_bytes([reply[8], reply[9]]);
    (s, SocketAddr::from((ip, port)))
}

/// Item 2: a UDP forward gives each local client a flow of its own (the peer sees two source
/// ports for two clients), carries datagrams both ways intact, and ends idle flows.
#[test]
fn udp_forward_gives_each_client_its_own_flow() {
    let bed = Testbed::new(BedOptions::default());
    let status = free_port_block(1);
    let proxy = Proxy::start(
        &bed.proxy_config(""),
        &[
            "--forward",
            &format!("0:{PEER_IP}:{WHOAMI_PORT}/udp"),
            "--forward",
            &format!("0:{PEER_IP}:{ECHO_PORT}/udp"),
            "--udp-timeout",
            "2s",
            "--status-addr",
            &status.to_string(),
        ],
    );
    assert!(
        proxy.ready_line.contains("/udp"),
        "the ready line says UDP: {}",
        proxy.ready_line
    );
    let whoami = proxy.forwards[0];
    let echo = proxy.forwards[1];
    runtime().block_on(async {
        let ask = |sock: std::sync::Arc<UdpSocket>, to: SocketAddr, payload: Vec<u8>| async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..5 {
                sock.send_to(&payload, to).await.unwrap();
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
                {
                    let (n, from) = r.unwrap();
                    assert_eq!(from, to);
                    return buf[..n].to_vec();
                }
            }
            panic!("no answer through the forward {to}");
        };
        let a = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let b = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let seen_a = String::from_utf8(ask(a.clone(), whoami, b"a".to_vec()).await).unwrap();
        let seen_b = String::from_utf8(ask(b.clone(), whoami, b"b".to_vec()).await).unwrap();
        assert!(seen_a.starts_with(&format!("{PROXY_IP} ")), "{seen_a}");
        assert!(seen_b.starts_with(&format!("{PROXY_IP} ")), "{seen_b}");
        assert_ne!(seen_a, seen_b, "two clients, two flows");
        // The same client keeps its flow.
        let again = String::from_utf8(ask(a.clone(), whoami, b"a".to_vec()).await).unwrap();
        assert_eq!(again, seen_a);
        for len in [1usize, 700, 1392] {
            let payload: Vec<u8> = (0..len).map(|j| (j * 13) as u8).collect();
            assert_eq!(ask(a.clone(), echo, payload.clone()).await, payload);
        }
    });
    let m = metrics(status);
    assert!(
        metric(&m, "netbird_proxy_udp_open", &["forward-udp"]).unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    // Idle for the timeout: every flow ends.
    wait_metrics(status, "idle flows ended", |m| {
        m.lines()
            .filter(|l| l.starts_with("netbird_proxy_udp_open{"))
            .all(|l| l.ends_with(" 0"))
    });
}

/// Item 2: a UDP service on this host exposed on our mesh address answers the peer, which
/// sends from its namespace with Python's socket module.
#[test]
fn exposed_udp_port_answers_mesh_peers() {
    let bed = Testbed::new(BedOptions::default());
    // The local service: a UDP echo on loopback, prefixing what it echoes.
    let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = service.recv_from(&mut buf) {
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = service.send_to(&out, from);
        }
    });
    let proxy = Proxy::start(
        &bed.proxy_config(""),
        &[
            "--expose",
            &format!("5300={service_port}/udp"),
            "--log-level",
            "info,netbird_proxy=debug",
        ],
    );
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         for i in range(20):\n\
         \x20   s.sendto(b'ping %d' % i,('{PROXY_IP}',5300))\n\
         \x20   try:\n\
         \x20       d,a=s.recvfrom(2048)\n\
         \x20   except socket.timeout:\n\
         \x20       continue\n\
         \x20   print(d.decode(), a[0], a[1]); sys.exit(0)\n\
         sys.exit(1)\n"
    );
    let out = bed.exec(&["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
    assert!(
        text.starts_with("echo:ping ") && text.contains(&format!(" {PROXY_IP} 5300")),
        "{text}"
    );
}

/// A UDP echo on loopback (the service a mesh peer exposes): its port.
fn local_udp_echo() -> u16 {
    let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = service.recv_from(&mut buf) {
            let _ = service.send_to(&buf[..n], from);
        }
    });
    port
}

/// The path users take: two peers of a NetBird mesh (dev mesh, relayed or direct through
/// ICE); bravo exposes a UDP echo, alpha reaches it by name through a UDP forward and through
/// SOCKS5 UDP ASSOCIATE, every datagram intact.
fn udp_across_the_mesh(force_relay: bool) {
    use common::mesh::*;
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new(if force_relay {
        "udp-relayed"
    } else {
        "udp-direct"
    });
    let echo = local_udp_echo();
    let relay_flag: &[&str] = if force_relay { &["--force-relay"] } else { &[] };
    let status = free_port_block(1);
    let b = join(
        &mesh,
        &state.0,
        "bravo",
        &[
            &[
                "--expose",
                &format!("5000={echo}/udp"),
                "--log-level",
                "info,netbird_proxy::proxy=debug",
            ][..],
            relay_flag,
        ]
        .concat(),
    );
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &[
            &[
                "--socks",
                "0",
                "--mesh-only",
                "--forward",
                "0:bravo.mesh.test:5000/udp",
                "--status-addr",
                &status.to_string(),
                "--log-level",
                "info,netbird_proxy::proxy=debug",
            ][..],
            relay_flag,
        ]
        .concat(),
    );
    let forward = a.forwards[0];
    let socks = a.socks.unwrap();
    runtime().block_on(async {
        // Through the forward: the first datagrams may wait for the peers to connect.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let start = Instant::now();
        let mut earlier: Vec<Vec<u8>> = Vec::new();
        // NetBird's tunnel MTU is 1280: 1252 bytes is the largest IPv4 payload it carries.
        for (i, len) in [1usize, 64, 500, 1000, 1252]
            .iter()
            .cycle()
            .take(50)
            .enumerate()
        {
            let payload: Vec<u8> = (0..*len).map(|j| (j + i * 3) as u8).collect();
            earlier.push(payload.clone());
            let got = loop {
                sock.send_to(&payload, forward).await.unwrap();
                match tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await {
                    // The echo of a datagram sent again while the peer was being set up (a
                    // lazy peer is woken by the first one) may come late: skip it.
                    Ok(r) if buf[..r.as_ref().unwrap().0] != payload[..] && i > 0 => {
                        let echoed = &buf[..r.unwrap().0];
                        assert!(
                            earlier.iter().any(|e| e[..] == *echoed),
                            "datagram {i}: an echo of nothing sent came back"
                        );
                        continue;
                    }
                    Ok(r) => break buf[..r.unwrap().0].to_vec(),
                    Err(_) => assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "no echo through the UDP forward\n{}\nbravo:\n{}\nmetrics:\n{}",
                        a.log(),
                        b.log(),
                        metrics(status)
                    ),
                }
            };
            assert_eq!(got, payload, "datagram {i} came back altered");
        }
        // Late echoes of datagrams sent twice while the path came up: drained, and each
        // one of those sent.
        while let Ok(r) =
            tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
        {
            let echoed = &buf[..r.unwrap().0];
            assert!(
                earlier.iter().any(|e| e[..] == *echoed),
                "an echo of nothing sent"
            );
        }
        // One byte more is dropped and counted, not cut.
        sock.send_to(&[9u8; 1253], forward).await.unwrap();
        let cut = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await;
        assert!(cut.is_err(), "an oversized datagram was answered");
        let m = metrics(status);
        assert_eq!(
            metric(
                &m,
                "netbird_proxy_udp_dropped_total",
                &["reason=\"too_big\""]
            ),
            Some(1.0),
            "{m}"
        );
        // Through SOCKS5 UDP ASSOCIATE, by name.
        let control = TcpStream::connect(socks).await.unwrap();
        let dgram = fast_socks5::client::Socks5Datagram::bind(control, "127.0.0.1:0")
            .await
            .expect("UDP ASSOCIATE");
        for i in 0..20u8 {
            let payload = vec![i; 300 + usize::from(i)];
            let (got, _) = socks_round_trip(&dgram, ("bravo.mesh.test", 5000), &payload).await;
            assert_eq!(got, payload);
        }
    });
}

#[test]
fn udp_crosses_a_relayed_mesh() {
    udp_across_the_mesh(true);
}

#[test]
fn udp_crosses_a_direct_mesh() {
    udp_across_the_mesh(false);
}

/// Item 7: with --access-log (JSON here), one line per finished connection, association and
/// request — listener, client, target as asked and as reached, path, bytes, result — and
/// none without it.
#[test]
fn the_access_log_has_a_line_per_connection_association_and_request() {
    let bed = Testbed::new(BedOptions::default());
    bed.random_file("big.bin", 300_000);
    let args = [
        "--socks",
        "0",
        "--http",
        "0",
        "--forward",
        &format!("0:{PEER_IP}:{HTTP_PORT}"),
    ];
    let proxy = Proxy::start(
        &bed.proxy_config(""),
        &[&args[..], &["--access-log", "--log-format", "json"]].concat(),
    );
    let socks = proxy.socks.unwrap().to_string();
    let http = format!("http://{}", proxy.http.unwrap());
    let big = format!("http://{PEER_IP}:{HTTP_PORT}/big.bin");
    for curl_args in [
        vec!["--socks5", socks.as_str(), big.as_str()],
        vec!["-x", http.as_str(), big.as_str()],
        vec!["-p", "-x", http.as_str(), big.as_str()],
    ] {
        let (code, body, err) = curl(&curl_args);
        assert_eq!((code, body.len()), (0, 300_000), "{err}");
    }
    let forwarded = format!("http://{}/big.bin", proxy.forwards[0]);
    assert_eq!(curl(&[&forwarded]).1.len(), 300_000);
    let refused = format!("http://{PEER_IP}:1/");
    assert_ne!(curl(&["--socks5", &socks, &refused]).0, 0);
    runtime().block_on(async {
        let control = TcpStream::connect(proxy.socks.unwrap()).await.unwrap();
        let dgram = fast_socks5::client::Socks5Datagram::bind(control, "127.0.0.1:0")
            .await
            .unwrap();
        let echo: SocketAddr = format!("{PEER_IP}:{ECHO_PORT}").parse().unwrap();
        let (got, _) = socks_round_trip(&dgram, echo, &[7u8; 500]).await;
        assert_eq!(got.len(), 500);
    });
    // The lines come when each session ends: wait for all six.
    let lines = || -> Vec<serde_json::Value> {
        proxy
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "netbird_proxy::access")
            .map(|v| v["fields"].clone())
            .collect()
    };
    let start = Instant::now();
    while lines().len() < 6 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = lines();
    let find = |kind: &str, result: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        lines
            .iter()
            .find(|f| f["kind"] == kind && f["result"] == result && pred(f))
            .unwrap_or_else(|| panic!("no {kind} {result} line in {lines:#?}"))
            .clone()
    };
    let peer_http = format!("{PEER_IP}:{HTTP_PORT}");
    let socks_ok = find("socks5", "0x00", &|f| f["target"] == peer_http.as_str());
    assert_eq!(socks_ok["resolved"], peer_http.as_str());
    assert_eq!(socks_ok["path"], "direct");
    assert!(
        socks_ok["bytes_down"].as_u64().unwrap() > 300_000,
        "{socks_ok}"
    );
    assert!(socks_ok["bytes_up"].as_u64().unwrap() > 50, "{socks_ok}");
    assert!(
        socks_ok["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(socks_ok["listener"].as_str().unwrap() == proxy.socks.unwrap().to_string());
    let refused_line = find("socks5", "0x05", &|_| true);
    assert_eq!(refused_line["path"], "-");
    let get = find("http", "200", &|f| f["target"] == big.as_str());
    assert_eq!(get["path"], "direct");
    let tunnel = find("http", "200", &|f| f["target"] == peer_http.as_str());
    assert!(tunnel["bytes_down"].as_u64().unwrap() > 300_000, "{tunnel}");
    let fwd = find("forward", "ok", &|_| true);
    assert!(fwd["bytes_down"].as_u64().unwrap() > 300_000, "{fwd}");
    let udp = find("socks5", "0x00", &|f| f["target"] == "UDP ASSOCIATE");
    assert_eq!(
        (udp["bytes_up"].as_u64(), udp["bytes_down"].as_u64()),
        (Some(500), Some(500))
    );

    // Off by default (a second proxy with the same key: the first goes first).
    drop(proxy);
    let quiet = Proxy::start(&bed.proxy_config(""), &args);
    let url = format!("http://{PEER_IP}:{HTTP_PORT}/index.html");
    assert_eq!(
        curl(&["--socks5", &quiet.socks.unwrap().to_string(), &url]).0,
        0
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !quiet.log().contains("netbird_proxy::access"),
        "{}",
        quiet.log()
    );
}

/// Acceptance, real clients: `dig` asks dnsmasq through a UDP forward, and PySocks (an
/// independent SOCKS5 UDP client) asks it through UDP ASSOCIATE, by IP, and reaches the echo
/// by name.
#[test]
fn dig_and_pysocks_ask_dnsmasq_through_the_proxy() {
    let bed = Testbed::new(BedOptions { dns: true });
    let config = bed.proxy_config(&format!("DNS = {PEER_IP}"));
    let proxy = Proxy::start(
        &config,
        &[
            "--socks",
            "0",
            "--mesh-only",
            "--forward",
            &format!("0:{PEER_IP}:53/udp"),
        ],
    );
    let port = proxy.forwards[0].port().to_string();
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port, "+short", "+tries=5", "+time=2"])
        .arg("web.mesh.test")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{PEER_IP}\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socks = proxy.socks.unwrap();
    let script = format!(
        r#"
import socket, socks, struct, sys
def ask(sock, payload, to):
    for _ in range(5):
        sock.sendto(payload, to)
        try:
            return sock.recvfrom(4096)
        except socket.timeout:
            pass
    sys.exit("no answer from %r" % (to,))
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "{ip}", {port}, rdns=True)
s.settimeout(2)
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in "web.mesh.test".split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
answer, src = ask(s, q, ("{peer}", 53))
assert answer[:2] == b"\x12\x34", answer
assert socket.inet_aton("{peer}") in answer, answer
echo, src = ask(s, b"by name through pysocks", ("web.mesh.test", {echo}))
assert echo == b"by name through pysocks", echo
print("ok", src)
"#,
        ip = socks.ip(),
        port = socks.port(),
        peer = PEER_IP,
        echo = ECHO_PORT,
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

type Boxed<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What `windowed_echo` sends through: a SOCKS5 UDP association or a plain UDP socket.
trait EchoEnd: Send + Sync + 'static {
    fn send(self: Arc<Self>, payload: Vec<u8>, to: SocketAddr) -> Boxed<()>;
    fn recv(self: Arc<Self>) -> Boxed<Vec<u8>>;
}

impl EchoEnd for Datagram {
    fn send(self: Arc<Self>, payload: Vec<u8>, to: SocketAddr) -> Boxed<()> {
        Box::pin(async move {
            self.send_to(&payload, to).await.unwrap();
        })
    }
    fn recv(self: Arc<Self>) -> Boxed<Vec<u8>> {
        Box::pin(async move {
            let mut buf = vec![0u8; 2048];
            let (n, _) = self.recv_from(&mut buf).await.unwrap();
            buf.truncate(n);
            buf
        })
    }
}

impl EchoEnd for UdpSocket {
    fn send(self: Arc<Self>, payload: Vec<u8>, to: SocketAddr) -> Boxed<()> {
        Box::pin(async move {
            self.send_to(&payload, to).await.unwrap();
        })
    }
    fn recv(self: Arc<Self>) -> Boxed<Vec<u8>> {
        Box::pin(async move {
            let mut buf = vec![0u8; 2048];
            let (n, _) = self.recv_from(&mut buf).await.unwrap();
            buf.truncate(n);
            buf
        })
    }
}

/// Send `count` sequenced datagrams of `len` bytes to `to` through `end`, at most `window`
/// waiting for their echo, and return how many came back (each checked). No retries: a lost
/// one stays lost.
async fn windowed_echo<E: EchoEnd>(
    count: u32,
    len: usize,
    window: u32,
    end: Arc<E>,
    to: SocketAddr,
) -> u32 {
    let payload = |seq: u32| {
        let mut p = vec![(seq % 251) as u8; len];
        p[..4].copy_from_slice(&seq.to_be_bytes());
        p
    };
    let (mut next, mut back) = (0u32, 0u32);
    let mut seen = vec![false; count as usize];
    loop {
        while next < count && next - back < window {
            end.clone().send(payload(next), to).await;
            next += 1;
        }
        if back == count {
            return back;
        }
        match tokio::time::timeout(Duration::from_secs(3), end.clone().recv()).await {
            Ok(got) => {
                let seq = u32::from_be_bytes(got[..4].try_into().unwrap());
                assert_eq!(got, payload(seq), "datagram {seq} came back altered");
                if !std::mem::replace(&mut seen[seq as usize], true) {
                    back += 1;
                }
            }
            // Whatever is still out is lost.
            Err(_) => return back,
        }
    }
}

/// Acceptance: 10 000 datagrams echoed through one SOCKS5 UDP association with none lost on a
/// clean path (a window of 32 in flight, no retries).
#[test]
fn ten_thousand_datagrams_through_an_association_none_lost() {
    let bed = Testbed::new(BedOptions::default());
    let proxy = Proxy::start(&bed.proxy_config(""), &["--socks", "0"]);
    let socks = proxy.socks.unwrap();
    let back = runtime().block_on(async {
        let control = TcpStream::connect(socks).await.unwrap();
        let dgram = Arc::new(
            fast_socks5::client::Socks5Datagram::bind(control, "127.0.0.1:0")
                .await
                .unwrap(),
        );
        let echo: SocketAddr = format!("{PEER_IP}:{ECHO_PORT}").parse().unwrap();
        // The path is up before counting starts.
        socks_round_trip(&dgram, echo, &[0u8; 8]).await;
        windowed_echo(10_000, 1000, 32, dgram, echo).await
    });
    assert_eq!(back, 10_000, "datagrams lost on a clean path");
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Acceptance: a UDP forward carries 16 MiB of sequenced datagrams with none lost on a clean
/// path; then 500 client addresses come and go, every flow ends after the idle timeout, and
/// the memory they took is given back.
#[test]
fn udp_forward_carries_16_mib_and_500_clients_churn_and_drain() {
    let bed = Testbed::new(BedOptions::default());
    let status = free_port_block(1);
    let proxy = Proxy::start(
        &bed.proxy_config(""),
        &[
            "--forward",
            &format!("0:{PEER_IP}:{ECHO_PORT}/udp"),
            "--udp-timeout",
            "3s",
            "--status-addr",
            &status.to_string(),
        ],
    );
    let forward = proxy.forwards[0];
    let start_rss = rss_kib(proxy.pid());
    const LEN: usize = 1200;
    let count = (16u32 << 20).div_ceil(LEN as u32);
    let (back, peak) = runtime().block_on(async {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        // The path is up before counting starts.
        let mut buf = vec![0u8; 2048];
        loop {
            sock.send_to(&[0u8; 8], forward).await.unwrap();
            if tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
                .await
                .is_ok()
            {
                break;
            }
        }
        let back = windowed_echo(count, LEN, 64, sock, forward).await;
        let streamed_rss = rss_kib(proxy.pid());
        eprintln!("proxy RSS: {start_rss} KiB at start, {streamed_rss} KiB after 16 MiB");

        // 500 client addresses, each answered once.
        let mut clients = Vec::new();
        for _ in 0..500 {
            clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let mut answered = 0;
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 64];
            for _ in 0..5 {
                c.send_to(format!("client {i}").as_bytes(), forward)
                    .await
                    .unwrap();
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_secs(1), c.recv_from(&mut buf)).await
                {
                    assert_eq!(&buf[..r.unwrap().0], format!("client {i}").as_bytes());
                    answered += 1;
                    break;
                }
            }
        }
        assert_eq!(answered, 500);
        (back, (streamed_rss, rss_kib(proxy.pid())))
    });
    let (streamed, peak) = peak;
    let m = metrics(status);
    assert_eq!(
        back, count,
        "datagrams lost on a clean path ({count} sent)\n{m}"
    );
    assert!(
        metric(&m, "netbird_proxy_udp_open", &["forward-udp"]).unwrap_or(0.0) >= 500.0,
        "{m}"
    );
    // Every flow ends after the idle timeout, and their memory goes back.
    wait_metrics(status, "every flow ended", |m| {
        metric(m, "netbird_proxy_udp_open", &["forward-udp"]) == Some(0.0)
    });
    std::thread::sleep(Duration::from_secs(1));
    let drained = rss_kib(proxy.pid());
    eprintln!("proxy RSS: {peak} KiB with 500 flows, {drained} KiB after they ended");
    // At least most of what the flows took is given back (allocator slack aside).
    assert!(
        drained < streamed + (peak - streamed) / 4,
        "memory not given back: {streamed} KiB before the 500 flows, {peak} KiB with them, \
         {drained} KiB after"
    );
}

/// Acceptance: an exposed UDP port carries 16 MiB of sequenced datagrams from the peer (a
/// Python sender in its namespace, 64 in flight) to a local echo and back, none lost.
#[test]
fn exposed_udp_port_carries_16_mib_from_the_peer() {
    let bed = Testbed::new(BedOptions::default());
    let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = service.recv_from(&mut buf) {
            let _ = service.send_to(&buf[..n], from);
        }
    });
    let _proxy = Proxy::start(
        &bed.proxy_config(""),
        &["--expose", &format!("5301={service_port}/udp")],
    );
    let script = format!(
        r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
to = ("{proxy}", 5301)
for _ in range(20):
    s.sendto(b"\xff" * 8, to)
    try:
        s.recvfrom(2048); break
    except socket.timeout:
        pass
else:
    sys.exit("the exposed port never answered")
LEN = 1200
count = ((16 << 20) + LEN - 1) // LEN
def payload(seq):
    return struct.pack(">I", seq) + bytes([seq % 251]) * (LEN - 4)
s.settimeout(3)
sent = back = 0
seen = bytearray(count)
while back < count:
    while sent < count and sent - back < 64:
        s.sendto(payload(sent), to); sent += 1
    try:
        d, _ = s.recvfrom(2048)
    except socket.timeout:
        break
    seq = struct.unpack(">I", d[:4])[0]
    if d != payload(seq):
        sys.exit("datagram %d altered" % seq)
    if not seen[seq]:
        seen[seq] = 1; back += 1
print(count, back)
"#,
        proxy = PROXY_IP
    );
    let out = bed.exec(&["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nums: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        nums[0],
        nums[1],
        "lost {} of {} datagrams",
        nums[0] - nums[1],
        nums[0]
    );
    assert!(nums[0] >= (16 << 20) / 1200);
}
