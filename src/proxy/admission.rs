//! Admission of client connections: a cap per listener and one for the whole process, and,
//! when a listener is full, eviction of its oldest connection still in its handshake.
//!
//! Why eviction: with a plain cap, clients that connect and never finish their greeting
//! (slowloris) hold every slot until their handshake timeout, and a well-behaved client is
//! refused meanwhile. A connection that has not finished its handshake has cost us nothing
//! worth keeping, so a newcomer may take its slot; a client that completes its handshake
//! promptly is out of the queue long before a flood could reach it. Established connections
//! are never evicted: when they fill the cap, newcomers are refused with an answer the client
//! understands (SOCKS5 0x01, HTTP 503).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Idle timeout unless configured: long enough for an interactive session left alone over a
/// coffee, short enough that abandoned tunnels do not pile up.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long a newcomer waits for the slot of a connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// The limits of one listener.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections (handshaking and established) on this listener.
    pub per_listener: usize,
    /// Connections on every listener together, shared by all of them.
    pub total: Arc<Semaphore>,
    /// Time a client has to complete its greeting, authentication and request.
    pub handshake_timeout: Duration,
    /// An established connection on which nothing moved either way for this long is closed
    /// (None: never).
    pub idle_timeout: Option<Duration>,
    /// A UDP association or forwarded UDP flow with no datagram either way for this long ends.
    pub udp_idle_timeout: Duration,
}

/// UDP idle timeout unless configured: a minute, as NAT mappings commonly last; a client that
/// keeps a flow open sends more often than that.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Limits {
    /// Limits whose global cap is `total`, with the default idle timeout.
    pub fn new(per_listener: usize, total: usize, handshake_timeout: Duration) -> Self {
        Self {
            per_listener,
            total: Arc::new(Semaphore::new(total)),
            handshake_timeout,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(1024, 4096, Duration::from_secs(10))
    }
}

/// The admission state of one listener.
pub(crate) struct Gate {
    slots: Arc<Semaphore>,
    total: Arc<Semaphore>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    next_id: u64,
    /// Connections still in their handshake, oldest first.
    queue: VecDeque<(u64, CancellationToken)>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The listener's or the process's cap is reached by established connections.
    Full,
}

/// A connection's place: its slots, and its entry in the handshake queue until `established`.
pub(crate) struct Ticket {
    _slot: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    id: u64,
    /// Cancelled when a newcomer evicts this connection during its handshake.
    pub evicted: CancellationToken,
}

impl Ticket {
    /// The handshake is complete: the connection can no longer be evicted.
    pub fn established(&self) {
        self.gate.forget(self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.forget(self.id);
    }
}

impl Gate {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(limits.per_listener)),
            total: limits.total.clone(),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Admit a new connection: a free slot, or the slot of the oldest connection still in its
    /// handshake (evicted for it), or a refusal.
    pub async fn admit(self: &Arc<Self>) -> Result<Ticket, Refusal> {
        if let Some(t) = self.try_take() {
            return Ok(t);
        }
        if !self.evict_oldest() {
            return Err(Refusal::Full);
        }
        let wait = async {
            let slot = self.slots.clone().acquire_owned().await.ok()?;
            let total = self.total.clone().acquire_owned().await.ok()?;
            Some((slot, total))
        };
        match tokio::time::timeout(EVICTION_WAIT, wait).await {
            Ok(Some((slot, total))) => Ok(self.ticket(slot, total)),
            _ => Err(Refusal::Full),
        }
    }

    fn try_take(self: &Arc<Self>) -> Option<Ticket> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let total = self.total.clone().try_acquire_owned().ok()?;
        Some(self.ticket(slot, total))
    }

    fn ticket(self: &Arc<Self>, slot: OwnedSemaphorePermit, total: OwnedSemaphorePermit) -> Ticket {
        let evicted = CancellationToken::new();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.next_id += 1;
        let id = p.next_id;
        p.queue.push_back((id, evicted.clone()));
        Ticket {
            _slot: slot,
            _total: total,
            gate: self.clone(),
            id,
            evicted,
        }
    }

    /// Cancel the oldest connection still in its handshake; false if there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue
            .pop_front();
        match oldest {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    fn forget(&self, id: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = p.queue.iter().position(|(x, _)| *x == id) {
            p.queue.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(per_listener: usize, total: usize) -> Arc<Gate> {
        Gate::new(&Limits::new(per_listener, total, Duration::from_secs(1)))
    }

    #[tokio::test]
    async fn a_full_listener_evicts_the_oldest_handshake_and_never_an_established_one() {
        let g = gate(2, 10);
        let first = g.admit().await.unwrap();
        let second = g.admit().await.unwrap();
        second.established();
        // Full: the newcomer evicts `first` (still handshaking), whose owner lets go.
        let evicted = first.evicted.clone();
        let owner = tokio::spawn(async move {
            evicted.cancelled().await;
            drop(first);
        });
        let third = g.admit().await.unwrap();
        owner.await.unwrap();
        assert!(!second.evicted.is_cancelled());
        third.established();
        // Both slots established: refused, nobody evicted.
        assert_eq!(g.admit().await.err(), Some(Refusal::Full));
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        drop(third);
        assert!(g.admit().await.is_ok());
    }

    #[tokio::test]
    async fn the_global_cap_binds_every_listener() {
        let limits = Limits::new(10, 1, Duration::from_secs(1));
        let a = Gate::new(&limits);
        let b = Gate::new(&limits);
        let held = a.admit().await.unwrap();
        held.established();
        assert_eq!(b.admit().await.err(), Some(Refusal::Full));
        drop(held);
        assert!(b.admit().await.is_ok());
    }
}
