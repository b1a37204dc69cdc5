//! A UDP impairment relay for the WireGuard underlay: what `tc qdisc ... netem delay D loss L
//! reorder R` does, in user space, because this machine's kernel has no `sch_netem`
//! (CONFIG_NET_SCH_NETEM is not set). Used by the fault tests and the e2e benchmark.
//!
//! The relay sits between a WireGuard endpoint and its peer: datagrams from the first address that
//! sends to `listen` go to `upstream`, and the replies back to that address. Each direction on its
//! own: a datagram is dropped with probability `loss`; of the rest, a fraction `reorder` is held
//! back `reorder_lag` longer than `delay`, so the ones sent after it overtake it. The random
//! draws are seeded, so a run is repeatable.
//!
//! Reordering differs from netem's on purpose: `netem delay 50ms reorder 10%` sends 10 % of the
//! packets *without* the delay. A data segment and its ACK both skipping it make a round trip of
//! the bare link (0.3 ms here), and a sender that models the path by its minimum RTT (BBR) then
//! believes the pipe is tiny: the peer's kernel BBR sender measured 1.7 Mbit/s that way, a
//! property of netem's model and the peer's sender, not of the path under test. Holding 10 %
//! back reorders as many packets and keeps the path's minimum RTT true.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// What happens to each datagram, each way.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    pub delay: Duration,
    /// Fraction dropped (0.05 = 5 %).
    pub loss: f64,
    /// Fraction of the kept datagrams held back longer, behind later ones.
    pub reorder: f64,
    /// How much longer the reordered ones wait.
    pub reorder_lag: Duration,
}

/// A running relay; stops (both directions) when dropped.
pub struct ImpairRelay {
    pub listen: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Start a relay on `listen` (port 0 picks one) towards `upstream`.
pub fn start(listen: &str, upstream: SocketAddr, imp: Impairment) -> ImpairRelay {
    let front = Arc::new(UdpSocket::bind(listen).expect("impairment relay bind"));
    let back = Arc::new(UdpSocket::bind("0.0.0.0:0").unwrap());
    back.connect(upstream).unwrap();
    for s in [&front, &back] {
        let s = socket2::SockRef::from(&**s);
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(8 << 20);
        // Lets the receive threads notice `stop`.
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let mut threads = Vec::new();

    let (f, c) = (front.clone(), client.clone());
    let b = back.clone();
    threads.extend(direction(
        imp,
        stop.clone(),
        0x9e37_79b9_7f4a_7c15,
        move |buf| {
            let (n, from) = f.recv_from(buf).ok()?;
            *c.lock().unwrap() = Some(from);
            Some(n)
        },
        move |pkt| {
            let _ = b.send(pkt);
        },
    ));
    let (f, c) = (front.clone(), client);
    let b = back;
    threads.extend(direction(
        imp,
        stop.clone(),
        0x2545_f491_4f6c_dd1d,
        move |buf| b.recv(buf).ok(),
        move |pkt| {
            if let Some(to) = *c.lock().unwrap() {
                let _ = f.send_to(pkt, to);
            }
        },
    ));
    ImpairRelay {
        listen: front.local_addr().unwrap(),
        stop,
        threads,
    }
}

/// One direction: a receive thread that drops datagrams or stamps them with their due time and
/// queues them; a sender thread per queue sends each when due. Each queue has one constant delay,
/// so it stays in order: the reordered datagrams are the ones in the longer queue.
fn direction(
    imp: Impairment,
    stop: Arc<AtomicBool>,
    seed: u64,
    recv: impl Fn(&mut [u8]) -> Option<usize> + Send + 'static,
    send: impl Fn(&[u8]) + Send + Sync + 'static,
) -> [std::thread::JoinHandle<()>; 3] {
    let send = Arc::new(send);
    let (in_order, in_order_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let (held, held_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let receiver = std::thread::spawn(move || {
        let mut rng = seed;
        let mut draw = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 1_000_000) as f64 / 1e6
        };
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Some(n) = recv(&mut buf) else { continue };
            if draw() < imp.loss {
                continue;
            }
            let (queue, due) = if draw() < imp.reorder {
                (&held, imp.delay + imp.reorder_lag)
            } else {
                (&in_order, imp.delay)
            };
            if queue
                .send((Instant::now() + due, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    let sender = |rx: mpsc::Receiver<(Instant, Vec<u8>)>| {
        let send = send.clone();
        std::thread::spawn(move || {
            for (due, pkt) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                send(&pkt);
            }
        })
    };
    [receiver, sender(in_order_rx), sender(held_rx)]
}

impl Drop for ImpairRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
