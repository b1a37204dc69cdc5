//! A failing engine start frees everything it had started: no task, socket or listener is
//! left behind, counted process-wide (tokio's live task count, and the process's sockets from
//! /proc). It is its own test binary so no other test's sockets or tasks blur the counts.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::time::{Duration, Instant};

use netbird_proxy::devmesh::{DevMesh, DevMeshConfig};
use netbird_proxy::engine::ProxyOptions;
use netbird_proxy::engine::netbird::{Engine, EngineError, IceOptions, MeshConfig, SetupKey};
use tokio_util::sync::CancellationToken;

const SETUP_KEY: &str = "D3V0000-0000-4000-8000-00000000000C";

/// This process's sockets by kind.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Sockets {
    tcp_listening: usize,
    tcp_other: usize,
    udp: usize,
}

/// Socket inodes this process holds open.
fn socket_inodes() -> HashSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            let t = t.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

fn sockets() -> Sockets {
    let ours = socket_inodes();
    let mut n = Sockets {
        tcp_listening: 0,
        tcp_other: 0,
        udp: 0,
    };
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/self/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(state), Some(inode)) = (f.get(3), f.get(9).and_then(|i| i.parse().ok()))
            else {
                continue;
            };
            if !ours.contains(&inode) {
                continue;
            }
            match (table.starts_with("tcp"), *state == "0A") {
                (true, true) => n.tcp_listening += 1,
                (true, false) => n.tcp_other += 1,
                (false, _) => n.udp += 1,
            }
        }
    }
    n
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Wait (bounded) for the process to be back at `baseline`: the far ends of closed loopback
/// connections (the dev mesh's) close a moment after ours.
async fn back_to(baseline: (Sockets, usize), what: &str) {
    let start = Instant::now();
    loop {
        let now = (sockets(), alive_tasks());
        if now == baseline {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: left behind: now {now:?}, before {baseline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(url: &str, wg_port: u16, proxy: ProxyOptions) -> MeshConfig {
    MeshConfig {
        management_url: url.into(),
        setup_key: Some(SetupKey(SETUP_KEY.into())),
        hostname: "failing".into(),
        private_key: rand::random(),
        wg_port,
        proxy,
        ice: IceOptions::default(),
        networks: Default::default(),
        lazy: Some(false),
        lazy_inactivity: std::time::Duration::from_secs(900),
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_start_leaves_no_task_socket_or_listener() {
    // 1. A SOCKS port already taken: the start fails after management, signal, WireGuard, the
    //    netstack and the HTTP listener are up.
    let mesh = DevMesh::start(DevMeshConfig::local(SETUP_KEY, "mesh.test"))
        .await
        .unwrap();
    let taken = StdTcpListener::bind("127.0.0.1:0").unwrap();
    let baseline = (sockets(), alive_tasks());
    let wg_port = free_udp_port();
    let cycle = CancellationToken::new();
    let engine = Engine::new(
        config(
            &mesh.management_url,
            wg_port,
            ProxyOptions {
                http: vec![netbird_proxy::config::ListenAddr::Tcp(loopback0())],
                socks: vec![netbird_proxy::config::ListenAddr::Tcp(
                    taken.local_addr().unwrap(),
                )],
                ..Default::default()
            },
        ),
        &cycle,
    );
    let r = engine.start(|_| {}).await;
    assert!(matches!(&r, Err(EngineError::DataPath(_))), "{r:?}");
    assert!(r.unwrap_err().is_permanent());
    assert_eq!(engine.task_count().await, 0, "no engine task left");
    drop(engine);
    back_to(baseline, "listener taken").await;
    UdpSocket::bind(("0.0.0.0", wg_port)).expect("WireGuard UDP port freed");
    mesh.stop().await;

    // 2. Management refuses Sync, the last step: everything else — signal stream, WireGuard,
    //    netstack, SOCKS and HTTP listeners, relay guard — was started and must be freed.
    let mesh = DevMesh::start(DevMeshConfig {
        refuse_sync: true,
        ..DevMeshConfig::local(SETUP_KEY, "mesh.test")
    })
    .await
    .unwrap();
    let baseline = (sockets(), alive_tasks());
    let wg_port = free_udp_port();
    let engine = Engine::new(
        config(
            &mesh.management_url,
            wg_port,
            ProxyOptions {
                http: vec![netbird_proxy::config::ListenAddr::Tcp(loopback0())],
                socks: vec![netbird_proxy::config::ListenAddr::Tcp(loopback0())],
                ..Default::default()
            },
        ),
        &cycle,
    );
    let r = engine.start(|_| {}).await;
    let e = r.expect_err("sync refused");
    assert!(
        !e.is_permanent(),
        "an unavailable management is retried: {e}"
    );
    assert!(e.to_string().contains("sync refused"), "{e}");
    assert_eq!(engine.task_count().await, 0, "no engine task left");
    drop(engine);
    back_to(baseline, "sync refused").await;
    UdpSocket::bind(("0.0.0.0", wg_port)).expect("WireGuard UDP port freed");
    mesh.stop().await;
}
