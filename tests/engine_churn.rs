//! 500 random start/stop interleavings of the NetBird engine against the dev mesh: no hang, no
//! leaked task or file descriptor. A binary of its own, so no other test's sockets are counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use netbird_proxy::devmesh::{DevMesh, DevMeshConfig};
use netbird_proxy::engine::ProxyOptions;
use netbird_proxy::engine::netbird::{Engine, EngineError, IceOptions, MeshConfig, SetupKey};
use tokio_util::sync::CancellationToken;

const SETUP_KEY: &str = "D3V0000-0000-4000-8000-00000000000B";

async fn mesh() -> DevMesh {
    DevMesh::start(DevMeshConfig::local(SETUP_KEY, "mesh.test"))
        .await
        .unwrap()
}

fn config(url: &str) -> MeshConfig {
    let socks: SocketAddr = "127.0.0.1:0".parse().unwrap();
    MeshConfig {
        management_url: url.into(),
        setup_key: Some(SetupKey(SETUP_KEY.into())),
        hostname: "churn".into(),
        private_key: rand::random(),
        wg_port: 0,
        proxy: ProxyOptions {
            socks: vec![socks],
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        },
        ice: IceOptions::default(),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_start_stop_interleavings_neither_hang_nor_leak() {
    let mesh = mesh().await;
    // Warm up once so lazily created runtime resources are not counted as leaks.
    let warm = Engine::new(config(&mesh.management_url), &CancellationToken::new());
    warm.start(|_| {}).await.unwrap();
    warm.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds();
    for i in 0..500u64 {
        let cycle = CancellationToken::new();
        let engine = Arc::new(Engine::new(config(&mesh.management_url), &cycle));
        let starter = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.start(|_| {}).await })
        };
        // A pseudo-random moment: before, during or after the start.
        let wait = (i.wrapping_mul(2654435761) >> 7) % 40;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if i % 3 == 0 {
            cycle.cancel(); // a cycle cancel (as a reset) instead of a stop
        }
        tokio::time::timeout(Duration::from_secs(5), engine.stop())
            .await
            .unwrap_or_else(|_| panic!("stop hung at iteration {i}"));
        let r = tokio::time::timeout(Duration::from_secs(5), starter)
            .await
            .unwrap_or_else(|_| panic!("start hung at iteration {i}"))
            .unwrap();
        // A stop that wins the race before `start` runs makes it AlreadyStopped (as it must).
        assert!(
            matches!(
                r,
                Ok(()) | Err(EngineError::Cancelled) | Err(EngineError::AlreadyStopped)
            ),
            "iteration {i}: {r:?}"
        );
        assert_eq!(engine.task_count().await, 0, "iteration {i}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = open_fds();
    assert!(
        after <= before + 4,
        "file descriptors: {before} before, {after} after"
    );
    mesh.stop().await;
}
