//! The engine's and supervisor's lifecycle invariants (netbird-protocol.md §8), against the dev
//! mesh's real management and signal services on loopback.

use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netbird_proxy::devmesh::{DevMesh, DevMeshConfig};
use netbird_proxy::engine::ProxyOptions;
use netbird_proxy::engine::netbird::{Engine, EngineError, IceOptions, MeshConfig, SetupKey};
use netbird_proxy::engine::supervisor::Supervisor;
use tokio_util::sync::CancellationToken;

const SETUP_KEY: &str = "D3V0000-0000-4000-8000-00000000000A";

async fn mesh(signal_override: Option<String>) -> DevMesh {
    DevMesh::start(DevMeshConfig {
        signal_override,
        advertise: None,
        ..DevMeshConfig::local(SETUP_KEY, "mesh.test")
    })
    .await
    .unwrap()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(url: &str, socks: SocketAddr, wg_port: u16) -> MeshConfig {
    MeshConfig {
        management_url: url.into(),
        setup_key: Some(SetupKey(SETUP_KEY.into())),
        hostname: "lifecycle".into(),
        private_key: rand::random(),
        wg_port,
        proxy: ProxyOptions {
            socks: vec![netbird_proxy::config::ListenAddr::Tcp(socks)],
            allow_direct: true,
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        },
        // ICE on, as users run it: its agents live in the negotiator and must end with it.
        ice: IceOptions::default(),
        networks: Default::default(),
        lazy: Some(false),
        lazy_inactivity: std::time::Duration::from_secs(900),
    }
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A TCP server that accepts and never says a word.
fn silent_server() -> (
    String,
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok((c, _)) = listener.accept() {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (addr, handle, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_start_and_start_after_stop_leave_the_engine_alone() {
    let mesh = mesh(None).await;
    let cycle = CancellationToken::new();
    let engine = Engine::new(config(&mesh.management_url, loopback0(), 0), &cycle);
    let mut socks = None;
    engine
        .start(|ready| socks = ready.listeners.first().map(|l| l.1))
        .await
        .unwrap();
    let socks = socks.unwrap();
    assert!(matches!(
        engine.start(|_| {}).await,
        Err(EngineError::AlreadyStarted)
    ));
    // Still running after the refused second start.
    std::net::TcpStream::connect(socks).expect("listener still up");
    engine.stop().await;
    assert_eq!(engine.task_count().await, 0);
    assert!(matches!(
        engine.start(|_| {}).await,
        Err(EngineError::AlreadyStopped)
    ));
    assert!(
        std::net::TcpStream::connect(socks).is_err(),
        "listener closed by stop"
    );
    engine.stop().await; // idempotent
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_releases_a_start_waiting_on_a_silent_signal_server() {
    let (silent, hold, stop_silent) = silent_server();
    let mesh = mesh(Some(silent)).await;
    let cycle = CancellationToken::new();
    let wg_port = free_udp_port();
    let engine = Arc::new(Engine::new(
        config(&mesh.management_url, loopback0(), wg_port),
        &cycle,
    ));
    let starter = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.start(|_| {}).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !starter.is_finished(),
        "start must be parked on the signal stream"
    );
    let t = Instant::now();
    engine.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );
    let r = tokio::time::timeout(Duration::from_secs(1), starter)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(EngineError::Cancelled)), "{r:?}");
    assert_eq!(engine.task_count().await, 0);
    UdpSocket::bind(("0.0.0.0", wg_port)).expect("WireGuard port free");
    stop_silent.store(true, std::sync::atomic::Ordering::SeqCst);
    hold.join().unwrap();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_stop_interrupts_the_backoff() {
    // Management is unreachable: every start fails and the loop backs off.
    let closed = StdTcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sup = Supervisor::new();
    sup.spawn(config(&url, loopback0(), 0), Arc::new(|_| {}))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = Instant::now();
    sup.stop().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );
    // A supervisor whose loop never ran stops at once.
    let idle = Supervisor::new();
    let t = Instant::now();
    idle.stop().await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_login_ends_the_supervisor_without_retrying() {
    let mesh = mesh(None).await;
    let mut cfg = config(&mesh.management_url, loopback0(), 0);
    cfg.setup_key = None;
    let sup = Supervisor::new();
    sup.spawn(cfg, Arc::new(|_| {})).await;
    let r = tokio::time::timeout(Duration::from_secs(3), sup.wait())
        .await
        .unwrap();
    let e = r.unwrap_err();
    assert!(e.to_string().contains("setup key"), "{e}");
    mesh.stop().await;
}
