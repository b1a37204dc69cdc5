//! TCP connections of the netstack as tokio streams.
//!
//! The netstack task owns every smoltcp socket. A connection's user side (`TcpStream`) and the
//! task share only a small state: two bounded byte rings and flags, under one mutex. The user
//! writes into `tx` and reads from `rx`; the task moves bytes between the rings and the smoltcp
//! socket. A full `tx` ring makes `poll_write` return `Pending` (backpressure up to the client
//! socket); a full `rx` ring stops the task from draining smoltcp, so the advertised TCP window
//! closes and the remote sender slows down. Nothing is ever dropped.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};

/// State shared by a `TcpStream` and the netstack task.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Bytes received from the remote, waiting for the user.
    pub rx: VecDeque<u8>,
    /// Bytes written by the user, waiting for room in the smoltcp socket.
    pub tx: VecDeque<u8>,
    /// Capacity of each ring.
    pub ring_cap: usize,
    /// The remote finished sending and every byte is in `rx`.
    pub rx_eof: bool,
    /// The connection failed (reset, timed out); reported once the rings are drained.
    pub error: Option<io::ErrorKind>,
    /// The user shut down its write half: send FIN once `tx` is empty.
    pub tx_shutdown: bool,
    /// The user dropped the stream.
    pub dropped: bool,
    /// The task has data for `rx` but no room: wake it when the user reads.
    pub task_wants_rx_room: bool,
    pub rx_waker: Option<Waker>,
    pub tx_waker: Option<Waker>,
}

impl ConnState {
    pub fn wake_reader(&mut self) {
        if let Some(w) = self.rx_waker.take() {
            w.wake();
        }
    }

    pub fn wake_writer(&mut self) {
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }

    /// Mark the connection failed and wake both halves. Bytes already in `rx` are still
    /// delivered; the error is reported after them.
    pub fn fail(&mut self, kind: io::ErrorKind) {
        self.error.get_or_insert(kind);
        self.wake_reader();
        self.wake_writer();
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<ConnState>,
    /// Wakes the netstack task.
    task: Arc<Notify>,
}

impl Shared {
    pub fn new(ring_cap: usize, task: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ConnState {
                rx: VecDeque::new(),
                tx: VecDeque::new(),
                ring_cap,
                rx_eof: false,
                error: None,
                tx_shutdown: false,
                dropped: false,
                task_wants_rx_room: false,
                rx_waker: None,
                tx_waker: None,
            }),
            task,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TCP connection through the tunnel.
#[derive(Debug)]
pub struct TcpStream {
    shared: Arc<Shared>,
    local: SocketAddr,
    peer: SocketAddr,
}

impl TcpStream {
    pub(crate) fn new(shared: Arc<Shared>, local: SocketAddr, peer: SocketAddr) -> Self {
        Self {
            shared,
            local,
            peer,
        }
    }

    /// Our address (mesh IP and port) on this connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The remote address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if !st.rx.is_empty() {
            let n = buf.remaining().min(st.rx.len());
            let (a, b) = st.rx.as_slices();
            let from_a = n.min(a.len());
            buf.put_slice(&a[..from_a]);
            buf.put_slice(&b[..n - from_a]);
            st.rx.drain(..n);
            if std::mem::take(&mut st.task_wants_rx_room) {
                self.shared.task.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if st.rx_eof {
            return Poll::Ready(Ok(()));
        }
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        st.rx_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        if st.tx_shutdown {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = st.ring_cap - st.tx.len();
        if room == 0 {
            st.tx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        let was_empty = st.tx.is_empty();
        st.tx.extend(&buf[..n]);
        drop(st);
        if was_empty {
            // A non-empty ring is already on the task's list of work.
            self.shared.task.notify_one();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if !st.tx_shutdown {
            st.tx_shutdown = true;
            drop(st);
            self.shared.task.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.dropped = true;
        st.rx.clear();
        st.rx_waker = None;
        st.tx_waker = None;
        drop(st);
        self.shared.task.notify_one();
    }
}

/// Accepts TCP connections made to a port of our mesh address(es).
#[derive(Debug)]
pub struct TcpListener {
    pub(crate) port: u16,
    pub(crate) incoming: mpsc::Receiver<TcpStream>,
}

impl TcpListener {
    /// The next established connection; `None` once the netstack has stopped.
    pub async fn accept(&mut self) -> Option<TcpStream> {
        self.incoming.recv().await
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }
}
