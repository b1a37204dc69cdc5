//! Routed UDP: one connected host socket per (mesh source, destination). Datagrams from the
//! mesh are sent at once; the socket's replies go back to the source as packets from the
//! destination. A flow without traffic either way for the idle time ends and frees its socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::ForwardCounters;
use crate::netstack::Netstack;

type Key = (SocketAddr, SocketAddr);

struct Flow {
    /// The socket's fd for sending: a plain non-blocking send, which only fails when the
    /// socket buffer is full (tokio's `try_send` also fails before its first readiness event).
    sender: std::net::UdpSocket,
    /// Milliseconds since `UdpFlows::epoch` of the last datagram out (the reader sees its own).
    last_out: Arc<AtomicU64>,
}

pub(super) struct UdpFlows {
    netstack: Netstack,
    flows: HashMap<Key, Flow>,
    max: usize,
    idle: Duration,
    counters: Arc<ForwardCounters>,
    closed_tx: mpsc::UnboundedSender<Key>,
    closed_rx: mpsc::UnboundedReceiver<Key>,
    epoch: tokio::time::Instant,
}

impl UdpFlows {
    pub fn new(
        netstack: Netstack,
        max: usize,
        idle: Duration,
        counters: Arc<ForwardCounters>,
    ) -> Self {
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        Self {
            netstack,
            flows: HashMap::new(),
            max,
            idle,
            counters,
            closed_tx,
            closed_rx,
            epoch: tokio::time::Instant::now(),
        }
    }

    /// A flow that ended (its reader saw the idle time pass).
    pub async fn closed(&mut self) -> Key {
        match self.closed_rx.recv().await {
            Some(k) => k,
            None => std::future::pending().await,
        }
    }

    pub fn remove(&mut self, key: Key) {
        if self.flows.remove(&key).is_some() {
            self.counters
                .udp_flows_active
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Send one datagram of the flow `src` → `dst`, opening the flow if it is new.
    pub fn send(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        tasks: &mut JoinSet<()>,
        cancel: &CancellationToken,
    ) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let key = (src, dst);
        if !self.flows.contains_key(&key) {
            if self.flows.len() >= self.max {
                self.counters.udp_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let Some(flow) = self.open(key, tasks, cancel) else {
                self.counters.udp_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            };
            self.flows.insert(key, flow);
        }
        let flow = &self.flows[&key];
        flow.last_out.store(now, Ordering::Relaxed);
        // A full socket buffer drops the datagram, as the network would.
        if flow.sender.send(payload).is_err() {
            self.counters.udp_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn open(&self, key: Key, tasks: &mut JoinSet<()>, cancel: &CancellationToken) -> Option<Flow> {
        let (src, dst) = key;
        let bind: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let std_socket = std::net::UdpSocket::bind(bind).ok()?;
        std_socket.set_nonblocking(true).ok()?;
        std_socket.connect(dst).ok()?;
        let sender = std_socket.try_clone().ok()?;
        let socket = Arc::new(UdpSocket::from_std(std_socket).ok()?);
        self.counters
            .udp_flows_opened
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .udp_flows_active
            .fetch_add(1, Ordering::Relaxed);
        let last_out = Arc::new(AtomicU64::new(self.epoch.elapsed().as_millis() as u64));
        let reader = Reader {
            socket: socket.clone(),
            netstack: self.netstack.clone(),
            key,
            idle: self.idle,
            last_out: last_out.clone(),
            epoch: self.epoch,
            closed: self.closed_tx.clone(),
            counters: self.counters.clone(),
        };
        let cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = reader.run() => {}
            }
        });
        debug!(%src, %dst, "routed UDP flow opened");
        Some(Flow { sender, last_out })
    }
}

struct Reader {
    socket: Arc<UdpSocket>,
    netstack: Netstack,
    key: Key,
    idle: Duration,
    last_out: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
    closed: mpsc::UnboundedSender<Key>,
    counters: Arc<ForwardCounters>,
}

impl Reader {
    async fn run(self) {
        let (src, dst) = self.key;
        let mut buf = vec![0u8; 64 * 1024];
        let mut last_in = self.epoch.elapsed();
        loop {
            let last_out = Duration::from_millis(self.last_out.load(Ordering::Relaxed));
            let quiet_since = last_in.max(last_out);
            let deadline = self.epoch + quiet_since + self.idle;
            match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    last_in = self.epoch.elapsed();
                    if !self.netstack.send_udp(dst, src, &buf[..n]) {
                        self.counters.udp_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // ICMP errors (port unreachable) surface as recv errors: keep the flow.
                Ok(Err(_)) => {}
                Err(_) => {
                    let out = Duration::from_millis(self.last_out.load(Ordering::Relaxed));
                    if out > quiet_since {
                        continue; // traffic went out meanwhile
                    }
                    break;
                }
            }
        }
        debug!(%src, %dst, "routed UDP flow idle; closed");
        let _ = self.closed.send(self.key);
    }
}
