//! Control-plane faults with traffic flowing (in-process: dev mesh and engines under their
//! supervisors): management goes down and comes back while a tunnelled connection keeps
//! echoing, and the mesh resyncs afterwards.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netbird_proxy::cli::Expose;
use netbird_proxy::devmesh::{DevMesh, DevMeshConfig};
use netbird_proxy::engine::ProxyOptions;
use netbird_proxy::engine::netbird::{MeshConfig, SetupKey};
use netbird_proxy::engine::supervisor::Supervisor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "FAULT000-0000-4000-8000-000000000001";

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

/// A ready peer's SOCKS address (if it has one) and mesh IP.
type ReadyPeer = (Option<SocketAddr>, std::net::IpAddr);

/// A peer under its supervisor; returns it with its SOCKS address (if any) and mesh IP.
async fn peer(
    mesh: &DevMesh,
    name: &str,
    proxy: ProxyOptions,
) -> (Supervisor, Option<SocketAddr>, std::net::IpAddr) {
    let ready: Arc<Mutex<Option<ReadyPeer>>> = Arc::default();
    let slot = ready.clone();
    let sup = Supervisor::new();
    sup.spawn(
        MeshConfig {
            management_url: mesh.management_url.clone(),
            setup_key: Some(SetupKey(KEY.into())),
            hostname: name.into(),
            private_key: rand::random(),
            wg_port: 0,
            proxy,
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

async fn socks_connect(socks: SocketAddr, ip: std::net::IpAddr, port: u16) -> Option<TcpStream> {
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
    (reply[1] == 0).then_some(s)
}

async fn connect_until(
    socks: SocketAddr,
    ip: std::net::IpAddr,
    port: u16,
    limit: Duration,
) -> TcpStream {
    let start = Instant::now();
    loop {
        if let Some(s) = socks_connect(socks, ip, port).await {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "no connection to {ip}:{port} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exchange echoes on `s` for `period`; every round trip must come back intact and promptly.
async fn echo_for(s: &mut TcpStream, period: Duration, round: &mut u32) {
    let start = Instant::now();
    while start.elapsed() < period {
        *round += 1;
        let msg = format!("round {round:08}").repeat(64);
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("echo stalled at round {round}"))
            .unwrap();
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_mesh() -> DevMesh {
    DevMesh::start(DevMeshConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        setup_key: KEY.into(),
        domain: "mesh.test".into(),
        signal_override: None,
    })
    .await
    .unwrap()
}

fn exposing(port: u16, local: SocketAddr) -> ProxyOptions {
    ProxyOptions {
        exposes: vec![Expose {
            mesh_port: port,
            local,
        }],
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// B exposes the echo server on mesh port 7000; A has a SOCKS listener. Returns both
/// supervisors, A's SOCKS address and B's mesh IP.
async fn alpha_and_bravo(
    mesh: &DevMesh,
    echo: SocketAddr,
) -> (Supervisor, Supervisor, SocketAddr, std::net::IpAddr) {
    let (b, _, b_ip) = peer(mesh, "bravo", exposing(7000, echo)).await;
    let (a, socks, _) = peer(
        mesh,
        "alpha",
        ProxyOptions {
            socks: vec!["127.0.0.1:0".parse().unwrap()],
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await;
    (a, b, socks.unwrap(), b_ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_restart_keeps_open_transfers_flowing_and_resyncs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("netbird_proxy=info")
        .with_test_writer()
        .try_init();
    let mut mesh = start_mesh().await;
    let echo = echo_server().await;
    let (a, b, socks, b_ip) = alpha_and_bravo(&mesh, echo).await;
    let mut conn = connect_until(socks, b_ip, 7000, Duration::from_secs(20)).await;
    let mut round = 0;
    echo_for(&mut conn, Duration::from_secs(1), &mut round).await;

    // Management down: the open connection keeps echoing.
    mesh.stop_management().await;
    echo_for(&mut conn, Duration::from_secs(3), &mut round).await;
    // Back up: still echoing, and A resyncs (it learns of a peer that joins afterwards).
    mesh.start_management().await.unwrap();
    echo_for(&mut conn, Duration::from_secs(2), &mut round).await;
    let (c, _, c_ip) = peer(&mesh, "charlie", exposing(7001, echo)).await;
    let mut to_c = connect_until(socks, c_ip, 7001, Duration::from_secs(30)).await;
    echo_for(&mut to_c, Duration::from_millis(300), &mut round).await;
    echo_for(&mut conn, Duration::from_millis(300), &mut round).await;

    for sup in [a, b, c] {
        tokio::time::timeout(Duration::from_secs(5), sup.stop())
            .await
            .unwrap()
            .unwrap();
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_recovers_traffic_within_a_bound() {
    let mut mesh = start_mesh().await;
    let echo = echo_server().await;
    let (a, b, socks, b_ip) = alpha_and_bravo(&mesh, echo).await;
    let mut round = 0;
    let mut conn = connect_until(socks, b_ip, 7000, Duration::from_secs(20)).await;
    echo_for(&mut conn, Duration::from_millis(500), &mut round).await;

    mesh.stop_relay().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mesh.start_relay().await.unwrap();
    // Both peers reconnect to the relay (backoff from 1 s) and set each other up again; the
    // test allows 30 s for traffic to flow again through the same SOCKS listener.
    let back = Instant::now();
    let mut again = connect_until(socks, b_ip, 7000, Duration::from_secs(30)).await;
    echo_for(&mut again, Duration::from_millis(300), &mut round).await;
    eprintln!(
        "traffic recovered {:?} after the relay came back",
        back.elapsed()
    );

    for sup in [a, b] {
        tokio::time::timeout(Duration::from_secs(5), sup.stop())
            .await
            .unwrap()
            .unwrap();
    }
    mesh.stop().await;
}
