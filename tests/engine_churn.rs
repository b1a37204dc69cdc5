//! 500 random start/stop interleavings of the NetBird engine against the dev mesh: no hang, no
//! leaked task or file descriptor. A binary of its own, so no other test's sockets are counted.
//!
//! ICE is on, and an anchor peer stays up throughout: each churned engine offers to it, gets
//! its credentials back and runs an agent (srflx requests to the dev mesh's STUN server,
//! checks, often a selected pair) that must end with the engine. Every tenth iteration lets
//! the engine live long enough for that before stopping it.
//!
//! Identities 1 and 3 use lazy connections, 0 and 2 do not; the anchor is eager.
//!
//! Networks are on too: every churned peer routes a network and a DNS route and serves an
//! ingress port (so each engine starts and stops a forwarder, a DNS forwarder and a host
//! listener), and the anchor, their client, elects a router among them as they come and go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use netbird_proxy::devmesh::{DevMesh, DevMeshConfig};
use netbird_proxy::engine::ProxyOptions;
use netbird_proxy::engine::netbird::{Engine, EngineError, IceOptions, MeshConfig, SetupKey};
use netbird_proxy::status::Mode;
use netbird_proxy::status::hub::StatusHub;
use tokio_util::sync::CancellationToken;

const SETUP_KEY: &str = "D3V0000-0000-4000-8000-00000000000B";

const NETWORKS: &str = r#"
[groups]
churners = ["churn0", "churn1", "churn2", "churn3"]

[[routes]]
net_id = "churn-lan"
network = "198.19.77.0/24"
peer_groups = ["churners"]

[[routes]]
net_id = "churn-apps"
domains = ["*.churn.test"]
peer_groups = ["churners"]

[[ingress]]
peer = "churn1"
port = "38777"
target = "anchor"
target_port = "80"
"#;

async fn mesh() -> DevMesh {
    let networks = netbird_proxy::devmesh::networks::NetworksFile::parse(NETWORKS).unwrap();
    DevMesh::start(DevMeshConfig {
        networks: Some(networks),
        ..DevMeshConfig::local(SETUP_KEY, "mesh.test")
    })
    .await
    .unwrap()
}

/// A churned engine: one of four identities, so the anchor's map stays small.
fn config(url: &str, identity: u8) -> MeshConfig {
    let socks: SocketAddr = "127.0.0.1:0".parse().unwrap();
    MeshConfig {
        management_url: url.into(),
        setup_key: Some(SetupKey(SETUP_KEY.into())),
        hostname: format!("churn{identity}"),
        private_key: [identity + 1; 32],
        wg_port: 0,
        proxy: ProxyOptions {
            socks: vec![netbird_proxy::config::ListenAddr::Tcp(socks)],
            // UDP listeners and their flows belong to the same cancellation tree.
            forwards: vec![netbird_proxy::config::Forward::udp(
                socks,
                "anchor.mesh.test",
                53,
            )],
            exposes: vec![netbird_proxy::config::Expose::udp(
                5353,
                "127.0.0.1:53".parse().unwrap(),
            )],
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        },
        ice: IceOptions::default(),
        networks: Default::default(),
        // Half the identities lazy: their peers are set up by the anchor's offer or by the
        // UDP flows' traffic (the wake-up path), and stopped mid-way like the rest.
        lazy: Some(identity % 2 == 1),
        lazy_inactivity: std::time::Duration::from_secs(900),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_start_stop_interleavings_neither_hang_nor_leak() {
    let mesh = mesh().await;
    // Warm up once so lazily created runtime resources are not counted as leaks.
    let warm = Engine::new(config(&mesh.management_url, 0), &CancellationToken::new());
    warm.start(|_| {}).await.unwrap();
    warm.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds();
    // The anchor: a peer that answers every churned engine's offer, with ICE. Counted too: it
    // is stopped before the descriptors are counted again.
    let hub = StatusHub::new(Mode::Netbird, 0);
    let mut anchor_config = config(&mesh.management_url, 100);
    anchor_config.hostname = "anchor".into();
    anchor_config.proxy.status = Some(hub.clone());
    let anchor = Engine::new(anchor_config, &CancellationToken::new());
    anchor.start(|_| {}).await.unwrap();
    for i in 0..500u64 {
        let cycle = CancellationToken::new();
        let engine = Arc::new(Engine::new(
            config(&mesh.management_url, (i % 4) as u8),
            &cycle,
        ));
        // The UDP forward's bound address, once ready.
        let udp_forward = Arc::new(std::sync::Mutex::new(None));
        let starter = {
            let engine = engine.clone();
            let seen = udp_forward.clone();
            tokio::spawn(async move {
                engine
                    .start(move |ready| {
                        *seen.lock().unwrap() = ready
                            .listeners
                            .iter()
                            .find(|(k, _, d)| *k == "forward" && d.ends_with("/udp"))
                            .map(|(_, a, _)| *a);
                    })
                    .await
            })
        };
        // A pseudo-random moment: before, during or after the start.
        let wait = if i % 10 == 9 {
            600 // long enough for the offer, the answer and the ICE checks
        } else {
            (i.wrapping_mul(2654435761) >> 7) % 40
        };
        // Some cycles open UDP flows (resolving the anchor, a socket towards it) that the
        // stop must end with everything else.
        if i % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(wait / 2)).await;
            let to = *udp_forward.lock().unwrap();
            if let Some(to) = to {
                let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let _ = client.send_to(b"churn", to);
            }
        }
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
    let snap = hub.snapshot();
    assert!(
        snap.routes.iter().any(|r| r.network == "churn-lan"),
        "the anchor never saw the churned routers' network: {:?}",
        snap.routes
    );
    let ice = snap.ice.expect("the anchor's ICE counters");
    assert!(
        ice.pairs_selected > 0,
        "no churned engine ever got an ICE pair: the interleavings did not exercise ICE ({ice:?})"
    );
    anchor.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = open_fds();
    assert!(
        after <= before + 4,
        "file descriptors: {before} before, {after} after"
    );
    mesh.stop().await;
}
