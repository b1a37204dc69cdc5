//! UDP sockets of the netstack: DNS through the tunnel, SOCKS5 UDP ASSOCIATE, UDP forwards.
//!
//! Datagrams wait in bounded queues each way, in buffers from the packet pool (no allocation per
//! datagram once the pool is warm); a full send queue is reported to the caller, a full receive
//! queue drops and counts, never grows.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio::sync::Notify;

use crate::packet::PacketPool;

/// Datagrams queued per direction (and smoltcp's datagram slots per ring: at least a poll's
/// batch of received packets).
pub(crate) const UDP_QUEUE: usize = 64;

/// IPv4 and UDP headers: what a datagram's payload gives up of the tunnel's MTU.
const V4_OVERHEAD: usize = 20 + 8;
/// IPv6 and UDP headers.
const V6_OVERHEAD: usize = 40 + 8;

#[derive(Debug, Default)]
pub(crate) struct UdpState {
    pub rx: VecDeque<(SocketAddr, Vec<u8>)>,
    pub tx: VecDeque<(SocketAddr, Vec<u8>)>,
    pub rx_dropped: u64,
    /// Datagrams smoltcp refused to send (an unaddressable destination).
    pub tx_failed: u64,
    pub rx_waker: Option<Waker>,
    /// A sender waiting for room in `tx`.
    pub tx_waker: Option<Waker>,
    pub dropped: bool,
    pub closed: bool,
}

#[derive(Debug)]
pub(crate) struct UdpShared {
    state: Mutex<UdpState>,
    task: Arc<Notify>,
    pub pool: Arc<PacketPool>,
    mtu: usize,
}

impl UdpShared {
    pub fn new(task: Arc<Notify>, pool: Arc<PacketPool>, mtu: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(UdpState::default()),
            task,
            pool,
            mtu,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, UdpState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pool buffer holding a copy of `data`.
    pub fn copy(&self, data: &[u8]) -> Vec<u8> {
        let mut buf = self.pool.get();
        buf.clear();
        buf.extend_from_slice(data);
        buf
    }
}

/// A UDP socket on our mesh address.
#[derive(Debug)]
pub struct UdpSocket {
    shared: Arc<UdpShared>,
    local_port: u16,
}

impl UdpSocket {
    pub(crate) fn new(shared: Arc<UdpShared>, local_port: u16) -> Self {
        Self { shared, local_port }
    }

    /// The local port.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// The largest payload one datagram to `to` may carry: the tunnel's MTU less the IP and UDP
    /// headers (the netstack does not fragment).
    pub fn max_payload(&self, to: SocketAddr) -> usize {
        let overhead = if to.is_ipv4() {
            V4_OVERHEAD
        } else {
            V6_OVERHEAD
        };
        self.shared.mtu.saturating_sub(overhead)
    }

    /// Queue one datagram; fails with `WouldBlock` when the send queue is full and with
    /// `InvalidInput` when `data` is over `max_payload`.
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let limit = self.max_payload(to);
        if data.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a datagram of {} bytes is over the tunnel's {limit}-byte limit",
                    data.len()
                ),
            ));
        }
        let mut st = self.shared.lock();
        if st.closed {
            return Err(io::ErrorKind::NotConnected.into());
        }
        if st.tx.len() >= UDP_QUEUE {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let buf = self.shared.copy(data);
        st.tx.push_back((to, buf));
        drop(st);
        self.shared.task.notify_one();
        Ok(())
    }

    /// Wait until the send queue has room for a datagram (or the socket is closed: then
    /// `send_to` says so).
    pub async fn writable(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.tx.len() < UDP_QUEUE || st.closed {
                return Poll::Ready(());
            }
            st.tx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The next datagram and its source.
    pub async fn recv_from(&self) -> io::Result<(Vec<u8>, SocketAddr)> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if let Some((from, data)) = st.rx.pop_front() {
                return Poll::Ready(Ok((data, from)));
            }
            if st.closed {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
            st.rx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Wait until a datagram is queued (or the socket is closed: then `try_recv_into` says so).
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if !st.rx.is_empty() || st.closed {
                return Poll::Ready(Ok(()));
            }
            st.rx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The next queued datagram copied into `buf` (cut to its length, as a kernel socket does):
    /// its length and source; `WouldBlock` when none is queued. The queue's buffer goes back
    /// to the pool.
    pub fn try_recv_into(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut st = self.shared.lock();
        let was_full = st.rx.len() >= UDP_QUEUE;
        let Some((from, data)) = st.rx.pop_front() else {
            return Err(if st.closed {
                io::ErrorKind::NotConnected.into()
            } else {
                io::ErrorKind::WouldBlock.into()
            });
        };
        drop(st);
        if was_full {
            // The pump stopped draining smoltcp while the queue was full: room again, so the
            // stack moves what waits there (nothing else may wake it on a quiet link).
            self.shared.task.notify_one();
        }
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        self.shared.pool.put(data);
        Ok((n, from))
    }

    /// The next datagram copied into `buf`, waiting for one (see `try_recv_into`).
    pub async fn recv_into(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            self.readable().await?;
            match self.try_recv_into(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Datagrams dropped so far because the receive queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().rx_dropped
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.shared.task.notify_one();
    }
}
