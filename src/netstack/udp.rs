//! UDP sockets of the netstack (used for DNS through the tunnel).
//!
//! Datagrams are small and rare on this path, so each is its own `Vec`; the queues are bounded
//! and a full queue is reported to the caller (send) or counted (receive), never grown.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio::sync::Notify;

/// Datagrams queued per direction.
pub(crate) const UDP_QUEUE: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct UdpState {
    pub rx: VecDeque<(SocketAddr, Vec<u8>)>,
    pub tx: VecDeque<(SocketAddr, Vec<u8>)>,
    pub rx_dropped: u64,
    pub rx_waker: Option<Waker>,
    pub dropped: bool,
    pub closed: bool,
}

#[derive(Debug)]
pub(crate) struct UdpShared {
    state: Mutex<UdpState>,
    task: Arc<Notify>,
}

impl UdpShared {
    pub fn new(task: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(UdpState::default()),
            task,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, UdpState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Queue one datagram; fails with `WouldBlock` when the send queue is full.
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(io::ErrorKind::NotConnected.into());
        }
        if st.tx.len() >= UDP_QUEUE {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        st.tx.push_back((to, data.to_vec()));
        drop(st);
        self.shared.task.notify_one();
        Ok(())
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
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.shared.task.notify_one();
    }
}
