//! UDP through the proxy (issue 18, items 1 and 2) against a real wireguard-go peer in a
//! namespace: SOCKS5 UDP ASSOCIATE with fast-socks5's client (an implementation independent of
//! our server) and with hand-made datagrams for what a polite client never sends; UDP forwards
//! and exposed UDP ports; dnsmasq answering a DNS query sent through the association; the
//! counters in `/metrics`.

mod common;

use std::net::SocketAddr;
use std::process::Command;
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
    });
    let m = wait_metrics(status, "the association counted", |m| {
        metric(m, "netbird_proxy_udp_datagrams_total", &["to_client"]).unwrap_or(0.0) >= 9.0
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
        let nothing = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::select! {
                r = client.recv_from(&mut buf) => r.map(|(n, _)| n),
                r = async {
                    let mut b2 = [0u8; 64];
                    other.recv_from(&mut b2).await.map(|(n, _)| n)
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
        // NetBird's tunnel MTU is 1280: 1252 bytes is the largest IPv4 payload it carries.
        for (i, len) in [1usize, 64, 500, 1000, 1252]
            .iter()
            .cycle()
            .take(50)
            .enumerate()
        {
            let payload: Vec<u8> = (0..*len).map(|j| (j + i * 3) as u8).collect();
            let got = loop {
                sock.send_to(&payload, forward).await.unwrap();
                match tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await {
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
