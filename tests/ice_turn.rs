//! The TURN client against a real TURN server (coturn, long-term credentials) on loopback: the
//! allocation is granted, a permission is installed on first use, a datagram reaches a peer from
//! the relayed address, and what the peer sends back arrives, sorted into WireGuard and STUN.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netbird_proxy::ice::turn::{TurnRelay, TurnSinks};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A child process killed when dropped (also when the test fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// coturn on 127.0.0.1:`port`, user `nb` / `secret`, loopback peers allowed.
fn coturn(port: u16, dir: &std::path::Path) -> Killed {
    let child = Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
        ])
        .args(["--listening-port", &port.to_string()])
        .args(["--lt-cred-mech", "--user", "nb:secret", "--realm", "lab"])
        .args([
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
        ])
        .args([
            "--min-port",
            "49152",
            "--max-port",
            "65535",
            "--log-file",
            "stdout",
        ])
        .arg("--pidfile")
        .arg(dir.join("turn.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnserver (coturn; tests/deps.sh installs it)");
    Killed(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coturn_allocation_carries_datagrams_both_ways() {
    let dir = common::mesh::TempDir::new("ice-turn");
    let port = common::mesh::free_port_block(1);
    let _server = coturn(port, &dir.0);
    let turn_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let relay = TurnRelay::new(turn_addr, "nb", "secret").await.unwrap();
    let (wg_tx, mut wg_rx) = mpsc::channel(16);
    let (stun_tx, mut stun_rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(relay.clone().run(
        TurnSinks {
            wireguard: wg_tx,
            stun: stun_tx,
        },
        cancel.clone(),
    ));
    let mut changes = relay.relayed_changes();
    let relayed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(a) = *changes.borrow_and_update() {
                return a;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("an allocation within 10 s");

    // A peer: the first send installs the permission, a later one goes through.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut wg_like = [0u8; 48];
    wg_like[0] = 4; // a WireGuard data message
    let start = Instant::now();
    while !relay.send_to(peer_addr, &wg_like) {
        assert!(start.elapsed() < Duration::from_secs(5), "no permission");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut buf = [0u8; 1500];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &wg_like);
    assert_eq!(from, relayed, "it arrives from the relayed address");

    // Back: WireGuard to the device's queue, STUN to the agents'.
    peer.send_to(&wg_like, relayed).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), wg_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.from, got.data.as_slice()), (peer_addr, &wg_like[..]));
    let stun = netbird_proxy::ice::wire::binding_request([7; 12]);
    peer.send_to(&stun, relayed).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), stun_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.from, got.to, got.data.as_slice()),
        (peer_addr, relayed, &stun[..])
    );

    cancel.cancel();
    task.await.unwrap();
}
