//! UDP forwards (`--forward …/udp`) and exposed UDP ports (`--expose …/udp`): one socket
//! receives from many clients, and each client address gets a flow of its own (its own socket
//! towards the target, so the target sees one peer per client, as through a NAT), ended after
//! the idle timeout.
//!
//! The receiving task owns the table of flows and the flows' tasks (a `JoinSet`: dropping it
//! on cancellation ends them all); a flow gets its datagrams through a bounded queue (full:
//! dropped and counted) in pooled buffers.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::MAX_DATAGRAM;
use super::targets::{Targets, recv_any};
use crate::netstack::UdpSocket as MeshSocket;
use crate::packet::PacketPool;
use crate::proxy::dial::{Dialer, Target};
use crate::status::{ListenerMetrics, UdpCounters};

/// Datagrams waiting for one flow.
const FLOW_QUEUE: usize = 64;

/// The flows of one UDP listener, by client address.
struct Flows {
    /// Each client's flow: its number (a flow that ended is told from its successor) and queue.
    map: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)>,
    tasks: JoinSet<()>,
    /// Each task's client and flow number, so even a flow that panicked is forgotten.
    owners: HashMap<tokio::task::Id, (SocketAddr, u64)>,
    next_id: u64,
    max: usize,
    pool: Arc<PacketPool>,
    counters: Arc<UdpCounters>,
}

impl Flows {
    fn new(max: usize, counters: Arc<UdpCounters>) -> Self {
        Self {
            map: HashMap::new(),
            tasks: JoinSet::new(),
            owners: HashMap::new(),
            next_id: 0,
            max,
            pool: Arc::new(PacketPool::new(MAX_DATAGRAM, FLOW_QUEUE)),
            counters,
        }
    }

    /// Hand `data` from `from` to its flow, started by `start` if it has none.
    fn dispatch<F, Fut>(&mut self, from: SocketAddr, data: &[u8], start: F)
    where
        F: FnOnce(mpsc::Receiver<Vec<u8>>, Arc<PacketPool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // A flow that ended (idle) but is not reaped yet: this datagram starts its successor.
        if self.map.get(&from).is_some_and(|(_, tx)| tx.is_closed()) {
            self.map.remove(&from);
        }
        let tx = match self.map.get(&from) {
            Some((_, tx)) => tx,
            None => {
                if self.map.len() >= self.max {
                    self.counters.drop_one("flow_limit");
                    return;
                }
                let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                let id = self.next_id;
                self.next_id += 1;
                debug!(client = %from, "udp: new flow");
                let flow = start(rx, self.pool.clone());
                let task = self.tasks.spawn(flow);
                self.owners.insert(task.id(), (from, id));
                &self.map.entry(from).or_insert((id, tx)).1
            }
        };
        let mut buf = self.pool.get();
        buf.clear();
        buf.extend_from_slice(data);
        if let Err(e) = tx.try_send(buf) {
            self.counters.drop_one("queue_full");
            self.pool.put(match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            });
        }
    }

    /// Wait for a flow to end and forget it (pending while there are none).
    async fn reap(&mut self) {
        let task = match self.tasks.join_next_with_id().await {
            Some(Ok((task, ()))) => task,
            Some(Err(e)) => {
                warn!("udp flow task: {e}");
                e.id()
            }
            None => return std::future::pending().await,
        };
        let Some((from, id)) = self.owners.remove(&task) else {
            return;
        };
        debug!(client = %from, "udp: flow ended");
        if self
            .map
            .get(&from)
            .is_some_and(|(current, _)| *current == id)
        {
            self.map.remove(&from);
        }
        if self.map.is_empty() {
            give_back_freed_memory();
        }
    }
}

/// Serve a UDP forward: datagrams to `socket` go to `target`, each client's from a socket of
/// its own; replies from the target go back to the client.
pub async fn serve_forward(
    socket: tokio::net::UdpSocket,
    metrics: Arc<ListenerMetrics>,
    max_flows: usize,
    idle: Duration,
    dialer: Dialer,
    target: Target,
    cancel: CancellationToken,
) {
    let socket = Arc::new(socket);
    let counters = metrics.udp.clone();
    let mut flows = Flows::new(max_flows, counters.clone());
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = flows.reap() => {}
            r = socket.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors for earlier replies surface here; the socket goes on.
                        debug!("udp forward: receive: {e}");
                        continue;
                    }
                };
                if n > MAX_DATAGRAM {
                    counters.drop_one("too_big");
                    continue;
                }
                let start = |rx, pool| {
                    forward_flow(FlowCtx {
                        rx,
                        pool,
                        client,
                        socket: socket.clone(),
                        counters: counters.clone(),
                        idle,
                    }, dialer.clone(), target.clone(), metrics.clone())
                };
                flows.dispatch(client, &buf[..n], start);
            }
        }
    }
}

/// What every flow has: its queue, where replies go and how it is counted.
struct FlowCtx<S> {
    rx: mpsc::Receiver<Vec<u8>>,
    pool: Arc<PacketPool>,
    client: SocketAddr,
    /// The socket the client talks to: replies leave from it.
    socket: Arc<S>,
    counters: Arc<UdpCounters>,
    idle: Duration,
}

/// One client of a UDP forward.
async fn forward_flow(
    mut ctx: FlowCtx<tokio::net::UdpSocket>,
    dialer: Dialer,
    target: Target,
    metrics: Arc<ListenerMetrics>,
) {
    let _open = ctx.counters.open();
    let to = match &target {
        Target::Addr(a) => *a,
        Target::Host(host, port) => {
            match dialer.resolve(host).await.map(|ips| ips.first().copied()) {
                Ok(Some(ip)) => SocketAddr::new(ip, *port),
                Ok(None) | Err(_) => {
                    warn!(client = %ctx.client, %target, "udp forward: cannot resolve the target");
                    metrics.count("error");
                    ctx.counters.drop_one("unresolved");
                    return;
                }
            }
        }
    };
    metrics.count("ok");
    let started = Instant::now();
    let path = dialer.mesh_path(to.ip());
    let (mut up, mut down) = (0u64, 0u64);
    let log = |up, down| {
        crate::proxy::access::Entry {
            listener: &metrics,
            client: ctx.client,
            target: &target,
            resolved: Some(to),
            path,
            up,
            down,
            started,
            result: "ok",
        }
        .log()
    };
    let mut targets = Targets::new(dialer, ctx.counters.clone());
    let mut reply = vec![0u8; MAX_DATAGRAM + 1];
    let mut deadline = Instant::now() + ctx.idle;
    loop {
        tokio::select! {
            d = ctx.rx.recv() => {
                let Some(d) = d else { return log(up, down) };
                match targets.send(&d, to).await {
                    Ok(()) => {
                        ctx.counters.to_target(d.len());
                        up += d.len() as u64;
                    }
                    Err(reason) => ctx.counters.drop_one(reason),
                }
                ctx.pool.put(d);
                deadline = Instant::now() + ctx.idle;
            }
            r = recv_any(targets.mesh.as_ref(), targets.host4.as_ref(), targets.host6.as_ref(), &mut reply) => {
                // The netstack is gone (or a host socket failed): the flow ends.
                let Ok((n, from)) = r else { return log(up, down) };
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                if n > MAX_DATAGRAM {
                    ctx.counters.drop_one("too_big");
                    continue;
                }
                if from != to || !targets.solicited(from) {
                    continue;
                }
                match ctx.socket.send_to(&reply[..n], ctx.client).await {
                    Ok(_) => {
                        ctx.counters.to_client(n);
                        down += n as u64;
                    }
                    Err(_) => ctx.counters.drop_one("send_error"),
                }
                deadline = Instant::now() + ctx.idle;
            }
            _ = tokio::time::sleep_until(deadline) => return log(up, down),
        }
    }
}

/// Serve an exposed UDP port: datagrams from mesh peers to `socket` (on our mesh address) go
/// to the local service `local`, each peer address from a host socket of its own; the
/// service's replies go back to that peer.
pub async fn serve_exposed(
    socket: MeshSocket,
    metrics: Arc<ListenerMetrics>,
    local: SocketAddr,
    max_flows: usize,
    idle: Duration,
    cancel: CancellationToken,
) {
    let socket = Arc::new(socket);
    let counters = metrics.udp.clone();
    let mut flows = Flows::new(max_flows, counters.clone());
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut drops_seen = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = flows.reap() => {}
            r = socket.recv_into(&mut buf) => {
                let Ok((n, peer)) = r else { return };
                let dropped = socket.dropped();
                counters.drop_many("receive_queue_full", dropped - drops_seen);
                drops_seen = dropped;
                let start = |rx, pool| {
                    exposed_flow(FlowCtx {
                        rx,
                        pool,
                        client: peer,
                        socket: socket.clone(),
                        counters: counters.clone(),
                        idle,
                    }, local, metrics.clone())
                };
                flows.dispatch(peer, &buf[..n], start);
            }
        }
    }
}

/// One mesh peer address of an exposed UDP port.
async fn exposed_flow(
    mut ctx: FlowCtx<MeshSocket>,
    local: SocketAddr,
    metrics: Arc<ListenerMetrics>,
) {
    let _open = ctx.counters.open();
    let any: SocketAddr = if local.is_ipv4() {
        ([0u8; 4], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let service = match tokio::net::UdpSocket::bind(any).await {
        Ok(s) if s.connect(local).await.is_ok() => s,
        _ => {
            warn!(peer = %ctx.client, %local, "expose: cannot open a socket towards the service");
            metrics.count("error");
            return;
        }
    };
    metrics.count("ok");
    let started = Instant::now();
    let (mut up, mut down) = (0u64, 0u64);
    let log = |up, down| {
        crate::proxy::access::Entry {
            listener: &metrics,
            client: ctx.client,
            target: &local,
            resolved: Some(local),
            path: "host",
            up,
            down,
            started,
            result: "ok",
        }
        .log()
    };
    let mut reply = vec![0u8; MAX_DATAGRAM + 1];
    let mut deadline = Instant::now() + ctx.idle;
    loop {
        tokio::select! {
            d = ctx.rx.recv() => {
                let Some(d) = d else { return log(up, down) };
                match service.send(&d).await {
                    Ok(_) => {
                        ctx.counters.to_target(d.len());
                        up += d.len() as u64;
                    }
                    // Nothing listens there (ICMP port unreachable from an earlier datagram).
                    Err(_) => ctx.counters.drop_one("send_error"),
                }
                ctx.pool.put(d);
                deadline = Instant::now() + ctx.idle;
            }
            r = service.recv(&mut reply) => {
                let Ok(n) = r else { continue };
                if n > MAX_DATAGRAM {
                    ctx.counters.drop_one("too_big");
                    continue;
                }
                match ctx.socket.send_to(&reply[..n], ctx.client) {
                    Ok(()) => {
                        ctx.counters.to_client(n);
                        down += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => ctx.counters.drop_one("too_big"),
                    Err(_) => ctx.counters.drop_one("queue_full"),
                }
                deadline = Instant::now() + ctx.idle;
            }
            _ = tokio::time::sleep_until(deadline) => return log(up, down),
        }
    }
}

/// Return the memory of ended flows to the system. Hundreds of flows leave their sockets'
/// buffers spread over the heap, and the allocator keeps freed pages that are not at its top:
/// after a burst of clients the process would stay at its peak. glibc's `malloc_trim` hands
/// back every free page. Called when a listener's last flow ends.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists and advises the kernel
    // about free pages; it takes no pointers and is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}
