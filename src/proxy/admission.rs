//! Admission of client connections: a cap per listener and one for the whole process, and,
//! when a listener is full, eviction of its oldest connection still in its handshake.
//!
//! Why eviction: with a plain cap, clients that connect and never finish their greeting
//! (slowloris) hold every slot until their handshake timeout, and a well-behaved client is
//! refused meanwhile. A connection that has not finished its handshake has cost us nothing
//! worth keeping, so a newcomer may take its slot. Established connections are never
//! evicted: when they fill the cap, newcomers are refused with an answer the client
//! understands (SOCKS5 0x01, HTTP 503).
//!
//! Why a newcomer first waits a moment for a slot to free before evicting: a flood of
//! connections that close at once (connect, close) frees its slots by itself, but only once
//! their handlers run. Without the wait, the accept loop drains a deep backlog faster than
//! those handlers are scheduled, each accepted connection evicts one, and a well-behaved
//! client still between its accept and its first read is evicted within a fraction of a
//! second (seen: 194 ms, 820 evictions). With it, evictions come at most once per
//! `EVICTION_GRACE` per listener, so a client has `per_listener × EVICTION_GRACE` to finish
//! its handshake however hard the flood. The price: while a listener is full of handshakes,
//! it accepts at that pace too (the accept loop waits; the backlog waits in the kernel), so
//! under a sustained slowloris a new client may wait its turn in the backlog. Once a flood's
//! connections end, their slots free and accepting is immediate again.

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

/// How long a newcomer to a full listener waits for a slot to free before it evicts.
const EVICTION_GRACE: Duration = Duration::from_millis(50);

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
        if self.nothing_to_evict() {
            return Err(Refusal::Full);
        }
        // A slot freed by its own connection ending costs nobody their handshake.
        if let Some(t) = self.take_within(EVICTION_GRACE).await {
            return Ok(t);
        }
        if !self.evict_oldest() {
            return Err(Refusal::Full);
        }
        self.take_within(EVICTION_WAIT).await.ok_or(Refusal::Full)
    }

    /// A slot and a place in the global cap, if both free up within `wait`.
    async fn take_within(self: &Arc<Self>, wait: Duration) -> Option<Ticket> {
        let take = async {
            let slot = self.slots.clone().acquire_owned().await.ok()?;
            let total = self.total.clone().acquire_owned().await.ok()?;
            Some((slot, total))
        };
        let (slot, total) = tokio::time::timeout(wait, take).await.ok()??;
        Some(self.ticket(slot, total))
    }

    fn nothing_to_evict(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue
            .is_empty()
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

    /// A slot that frees by itself within the grace is taken without evicting anyone, and a
    /// run of newcomers to a listener full of handshakes evicts at most one per grace.
    #[tokio::test(start_paused = true)]
    async fn a_newcomer_takes_a_slot_that_frees_by_itself_and_evictions_are_paced() {
        let g = gate(3, 100);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(g.admit().await.unwrap());
        }
        let leaving = held.pop().unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(EVICTION_GRACE / 2).await;
            drop(leaving);
        });
        held.push(g.admit().await.unwrap());
        assert!(held.iter().all(|t| !t.evicted.is_cancelled()), "nobody evicted");
        // Full of handshakes: each newcomer evicts the oldest, whose owner lets go.
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            let oldest = held.remove(0);
            let owner = tokio::spawn(async move {
                oldest.evicted.cancelled().await;
                drop(oldest);
            });
            held.push(g.admit().await.unwrap());
            owner.await.unwrap();
        }
        assert!(start.elapsed() >= EVICTION_GRACE * 3, "{:?}", start.elapsed());
        assert!(held.iter().all(|t| !t.evicted.is_cancelled()));
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
