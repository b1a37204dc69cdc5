//! Interoperability with an independent ICE implementation (issue 16): aioice (Python, its own
//! STUN and ICE code) as the controlling agent in a network namespace, our agent controlled on
//! our WireGuard socket in the root namespace, joined by a veth pair on 198.19.78.0/30. aioice
//! must complete its connectivity checks against our agent with our credentials, nominate a pair
//! ending at our WireGuard port, and we must select the same pair.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use netbird_proxy::ice::{Agents, Event, LocalNet, Offered};
use netbird_proxy::packet::PacketPool;
use netbird_proxy::wg::WgDevice;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const OURS: &str = "198.19.78.1";
const THEIRS: &str = "198.19.78.2";

struct Veth {
    ns: String,
    link: String,
}

impl Veth {
    fn new() -> Self {
        let tag = std::process::id() % 10000;
        let (ns, link) = (format!("nbaio{tag}"), format!("nbaio{tag}"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        common::sh(&["ip", "netns", "add", &ns]);
        common::sh(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        common::sh(&["ip", "addr", "add", &format!("{OURS}/30"), "dev", &link]);
        common::sh(&["ip", "link", "set", &link, "up"]);
        common::sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{THEIRS}/30"),
            "dev",
            "eth0",
        ]);
        common::sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        common::sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        Veth { ns, link }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioice_completes_checks_against_our_agent_on_the_wireguard_port() {
    assert!(
        common::is_root(),
        "needs root for the namespace (CI runs as root)"
    );
    let veth = Veth::new();

    // Our side: a WireGuard device (its socket is the one ICE shares) and the agents.
    let pool = Arc::new(PacketPool::new(1500, 16));
    let wg = Arc::new(WgDevice::new(rand::random(), 0, Vec::new(), pool).unwrap());
    let port = wg.local_addr().unwrap().port();
    let (stun_tx, mut stun_rx) = mpsc::channel(256);
    wg.report_stun(stun_tx);
    let cancel = CancellationToken::new();
    let (to_stack, _stack_rx) = mpsc::channel(64);
    let (_stack_tx, from_stack) = mpsc::channel(64);
    let (_relay_tx, relayed) = mpsc::channel(64);
    let device = tokio::spawn(
        wg.clone()
            .run(to_stack, from_stack, relayed, cancel.clone()),
    );
    let mut agents = Agents::new(
        LocalNet {
            port,
            host_ips: vec![OURS.parse().unwrap()],
            overlay: Some("100.64.0.0/10".parse().unwrap()),
        },
        Arc::default(),
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/aioice_peer.py");
    let mut foreign = Command::new("ip")
        .args(["netns", "exec", &veth.ns, "python3", script, "198.19.78."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with aioice (tests/deps.sh installs it)");
    let mut lines = BufReader::new(foreign.stdout.take().unwrap()).lines();
    let hello: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let payload = format!(
        "{}:{}",
        hello["ufrag"].as_str().unwrap(),
        hello["pwd"].as_str().unwrap()
    );

    // Their credentials as an OFFER would bring them; we are controlled.
    let now = Instant::now().into_std();
    assert_eq!(
        agents.on_offer(
            now,
            "aioice",
            &payload,
            Some(&[1, 2, 3, 4, 5]),
            false,
            false
        ),
        Offered::Started
    );
    for c in hello["candidates"].as_array().unwrap() {
        agents.on_candidate(now, "aioice", c.as_str().unwrap());
    }
    let mut ours = Vec::new();
    let mut events = Vec::new();
    while let Some(e) = agents.poll_event() {
        match e {
            Event::Candidate { line, .. } => ours.push(line),
            other => events.push(other),
        }
    }
    let (our_payload, _) = agents.local_offer("aioice");
    let (ufrag, pwd) = our_payload.split_once(':').unwrap();
    let mut stdin = foreign.stdin.take().unwrap();
    writeln!(
        stdin,
        "{}",
        serde_json::json!({ "ufrag": ufrag, "pwd": pwd, "candidates": ours })
    )
    .unwrap();
    drop(stdin);

    // Drive our agent (as the negotiator does) until aioice reports and we selected a pair.
    let outcome = tokio::task::spawn_blocking(move || lines.next().map(|l| l.unwrap()));
    tokio::pin!(outcome);
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut selected = None;
    let report = loop {
        while let Some((_, to, data)) = agents.poll_transmit() {
            wg.send_stun(to, &data);
        }
        while let Some(e) = agents.poll_event() {
            if let Event::Selected { pair, .. } = &e {
                selected = Some(*pair);
            }
            events.push(e);
        }
        let due = agents
            .poll_timeout()
            .map_or(deadline, |t| Instant::from_std(t).min(deadline));
        tokio::select! {
            Some(m) = stun_rx.recv() => agents.on_stun(Instant::now().into_std(), m.from, m.to, &m.data),
            _ = tokio::time::sleep_until(due) => agents.handle_timeout(Instant::now().into_std()),
            r = &mut outcome => break r.unwrap(),
        }
        assert!(
            Instant::now() < deadline,
            "no outcome from aioice; our events: {events:?}"
        );
    };
    // Answer what is left in flight, then stop.
    let _ = foreign.wait();
    cancel.cancel();
    let _ = device.await;

    let report: serde_json::Value =
        serde_json::from_str(&report.expect("aioice's outcome")).unwrap();
    assert_eq!(
        report["connected"], true,
        "aioice: {report}; our events: {events:?}"
    );
    assert_eq!(
        report["remote"],
        format!("{OURS}:{port}"),
        "aioice's pair ends at our WireGuard port"
    );
    let pair = selected.unwrap_or_else(|| panic!("we selected no pair; events: {events:?}"));
    assert_eq!(pair.remote.to_string(), report["local"].as_str().unwrap());
    eprintln!(
        "aioice nominated {} -> {}; we selected {:?}",
        report["local"], report["remote"], pair
    );
}
