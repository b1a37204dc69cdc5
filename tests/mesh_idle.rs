//! GO_IDLE (netbird-protocol.md §7.5): a lazy Go peer closes its side and says GO_IDLE. We
//! leave it idle — no offers — until there is traffic for it, then wake it with an offer and
//! the traffic flows. In-process (dev mesh and two engines under supervisors), with a signal
//! client speaking as B to send the GO_IDLE, and the engines' logs captured to follow the states.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netbird_proxy::config::Expose;
use netbird_proxy::control::envelope::{key_string, public_key_of};
use netbird_proxy::control::signal::{Body, body};
use netbird_proxy::control::signal_client::SignalClient;
use netbird_proxy::devmesh::{DevMesh, DevMeshConfig};
use netbird_proxy::engine::ProxyOptions;
use netbird_proxy::engine::netbird::{IceOptions, MeshConfig, SetupKey};
use netbird_proxy::engine::supervisor::Supervisor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const KEY: &str = "1D1E0000-0000-4000-8000-000000000001";

/// Log lines of this test binary's engines.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A peer under its supervisor with a chosen key; returns it with its SOCKS address (if
/// any) and mesh IP.
async fn peer(
    mesh: &DevMesh,
    name: &str,
    private_key: [u8; 32],
    proxy: ProxyOptions,
) -> (Supervisor, Option<SocketAddr>, std::net::IpAddr) {
    type Slot = Arc<Mutex<Option<(Option<SocketAddr>, std::net::IpAddr)>>>;
    let ready: Slot = Arc::default();
    let slot = ready.clone();
    let sup = Supervisor::new();
    sup.spawn(
        MeshConfig {
            management_url: mesh.management_url.clone(),
            setup_key: Some(SetupKey(KEY.into())),
            hostname: name.into(),
            private_key,
            wg_port: 0,
            proxy,
            ice: IceOptions::default(),
            networks: Default::default(),
            lazy: Some(false),
            lazy_inactivity: std::time::Duration::from_secs(900),
        },
        Arc::new(move |r| {
            let socks = r.listeners.iter().find(|l| l.0 == "socks5").map(|l| l.1);
            *slot.lock().unwrap() = Some((socks, r.mesh[0].addr()));
        }),
    )
    .await;
    let start = Instant::now();
    loop {
        if let Some((socks, ip)) = *ready.lock().unwrap() {
            return (sup, socks, ip);
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{name} not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SOCKS CONNECT to `ip:port` and one echo round trip; `None` if any step fails.
async fn echo_once(socks: SocketAddr, ip: std::net::IpAddr, port: u16) -> Option<()> {
    let mut s = TcpStream::connect(socks).await.ok()?;
    s.write_all(&[5, 1, 0]).await.ok()?;
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.ok()?;
    let std::net::IpAddr::V4(v4) = ip else {
        return None;
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend(v4.octets());
    req.extend(port.to_be_bytes());
    s.write_all(&req).await.ok()?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.ok()?;
    if reply[1] != 0 {
        return None;
    }
    s.write_all(b"ping through the mesh").await.ok()?;
    let mut back = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .ok()?
        .ok()?;
    (&back == b"ping through the mesh").then_some(())
}

async fn echo_until(socks: SocketAddr, ip: std::net::IpAddr, port: u16, limit: Duration) {
    let start = Instant::now();
    while echo_once(socks, ip, port).await.is_none() {
        assert!(
            start.elapsed() < limit,
            "no echo from {ip}:{port} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_peer_gets_no_offers_until_traffic_wakes_it() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("netbird_proxy=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let mesh = DevMesh::start(DevMeshConfig::local(KEY, "mesh.test"))
        .await
        .unwrap();
    let echo = echo_server().await;
    let (a_key, b_key): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
    let (b, _, b_ip) = peer(
        &mesh,
        "bravo",
        b_key,
        ProxyOptions {
            exposes: vec![Expose::tcp(7000, echo)],
            ..Default::default()
        },
    )
    .await;
    let (a, socks, _) = peer(
        &mesh,
        "alpha",
        a_key,
        ProxyOptions {
            socks: vec![netbird_proxy::config::ListenAddr::Tcp(
                "127.0.0.1:0".parse().unwrap(),
            )],
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await;
    let socks = socks.unwrap();
    echo_until(socks, b_ip, 7000, Duration::from_secs(20)).await;

    // Let the echo connection's closing segments settle (WireGuard's passive keepalive from B
    // is then ~10 s away), so B is as quiet as an idle Go peer would be.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // B (as a lazy Go peer would) tells A it goes idle.
    let cancel = CancellationToken::new();
    let as_b =
        SignalClient::new(&mesh.signal_addr.to_string(), false, b_key, cancel.clone()).unwrap();
    let a_id = key_string(&public_key_of(&a_key));
    let go_idle = Body {
        r#type: body::Type::GoIdle as i32,
        ..Default::default()
    };
    as_b.send(&a_id, go_idle).await.unwrap();
    let start = Instant::now();
    while !log.text().contains("peer went idle") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "A did not go idle:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Idle and without traffic: A sends B no offer (a peer merely set up again is re-offered
    // at once, so 2 s of silence tells them apart).
    let marker = log.text().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet = log.text()[marker..].to_string();
    assert!(
        !quiet.contains("waking it") && !quiet.contains("peer connected through the relay"),
        "A acted on an idle peer without traffic:\n{quiet}"
    );
    assert!(
        !quiet.contains("kind=\"OFFER\""),
        "offers to an idle peer:\n{quiet}"
    );

    // Traffic for B wakes it: an offer goes out, the relay path comes back, the echo works.
    let woke = Instant::now();
    echo_until(socks, b_ip, 7000, Duration::from_secs(20)).await;
    let text = log.text();
    let after = &text[marker..];
    assert!(
        after.contains("traffic for an idle peer; waking it"),
        "{after}"
    );
    assert!(after.contains("kind=\"OFFER\""), "{after}");
    eprintln!("woken and echoing after {:?}", woke.elapsed());

    cancel.cancel();
    for sup in [a, b] {
        tokio::time::timeout(Duration::from_secs(5), sup.stop())
            .await
            .unwrap()
            .unwrap();
    }
    mesh.stop().await;
}
