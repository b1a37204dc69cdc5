//! A peer's round-trip time, measured on WireGuard's own handshakes: no probe packets, and the
//! path measured is the one data takes (direct or through a relay).
//!
//! Each handshake is timed from the side that can see both ends of an exchange:
//! * as initiator, from our initiation to the response naming its sender index;
//! * as responder, from our response to the first transport packet of the new session (an
//!   initiator confirms a session at once, with data or a keepalive).
//!
//! Indices tie an answer to the message it answers, so a response to an initiation we have
//! since retried, or a data packet of the old session still in flight, is not mistaken for it.
//! Sessions are rekeyed every two minutes, so the figure stays current.
//!
//! Sans-IO: the caller passes the datagrams it sent and received (already authenticated) and
//! the time. The per-packet cost is one byte compare on send and one atomic load on receive;
//! the lock is taken only for handshake messages and their answers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const HANDSHAKE_INITIATION: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const TRANSPORT_DATA: u8 = 4;

/// What the pending exchange waits for (bits 32.. of `pending`; 0 means nothing pending).
const AWAIT_RESPONSE: u64 = 1 << 32;
const AWAIT_TRANSPORT: u64 = 2 << 32;

/// Longer than this is not a round trip: WireGuard retries an unanswered handshake after 5 s
/// (REKEY_TIMEOUT) under a new index, so a later answer means the prompt one was lost (say the
/// initiator's confirming keepalive) and a later packet of the session closed the exchange.
const MAX_SAMPLE: Duration = Duration::from_secs(5);

/// The round trip of a peer's latest timed handshake.
#[derive(Debug, Default)]
pub struct HandshakeRtt {
    /// The open exchange as `(pending, sent at µs)`, set and taken together.
    exchange: Mutex<(u64, u64)>,
    /// A copy of the exchange's `pending` for the per-packet check without the lock: what we
    /// wait for, and our index it must name (low 32 bits); 0: nothing.
    pending: AtomicU64,
    /// The latest measurement in microseconds plus one; 0: none yet.
    rtt_us: AtomicU64,
}

impl HandshakeRtt {
    /// The latest round trip, if a handshake has been timed.
    pub fn get(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us - 1)),
        }
    }

    /// We sent `datagram` to the peer; `now_us` reads the clock (only for handshakes).
    pub fn on_sent(&self, datagram: &[u8], now_us: impl FnOnce() -> u64) {
        let awaits = match datagram.first() {
            Some(&HANDSHAKE_INITIATION) => AWAIT_RESPONSE,
            Some(&HANDSHAKE_RESPONSE) => AWAIT_TRANSPORT,
            _ => return,
        };
        // Both messages carry our (the sender's) index at bytes 4..8.
        let Some(our_index) = index_at(datagram, 4) else {
            return;
        };
        let pending = awaits | u64::from(our_index);
        let mut exchange = self.exchange.lock().unwrap_or_else(|e| e.into_inner());
        *exchange = (pending, now_us());
        self.pending.store(pending, Ordering::Relaxed);
    }

    /// The peer's authenticated `datagram` arrived; `now_us` reads the clock (only when it
    /// answers the pending exchange).
    pub fn on_received(&self, datagram: &[u8], now_us: impl FnOnce() -> u64) {
        let pending = self.pending.load(Ordering::Relaxed);
        if pending == 0 {
            return;
        }
        // The receiver index (ours) sits at bytes 8..12 of a response, 4..8 of transport data.
        let answered = match (datagram.first(), pending & !u64::from(u32::MAX)) {
            (Some(&HANDSHAKE_RESPONSE), AWAIT_RESPONSE) => index_at(datagram, 8),
            (Some(&TRANSPORT_DATA), AWAIT_TRANSPORT) => index_at(datagram, 4),
            _ => return,
        };
        if answered.map(u64::from) != Some(pending & u64::from(u32::MAX)) {
            return;
        }
        let mut exchange = self.exchange.lock().unwrap_or_else(|e| e.into_inner());
        // Only the first answer counts, and only to the exchange still open.
        if exchange.0 != pending {
            return;
        }
        let rtt = Duration::from_micros(now_us().saturating_sub(exchange.1));
        *exchange = (0, 0);
        self.pending.store(0, Ordering::Relaxed);
        drop(exchange);
        if rtt <= MAX_SAMPLE {
            self.rtt_us
                .store(rtt.as_micros() as u64 + 1, Ordering::Relaxed);
        }
    }
}

fn index_at(datagram: &[u8], at: usize) -> Option<u32> {
    let bytes = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, fields: &[u32]) -> Vec<u8> {
        let mut m = vec![kind, 0, 0, 0];
        for f in fields {
            m.extend_from_slice(&f.to_le_bytes());
        }
        m.resize(32, 0);
        m
    }

    #[test]
    fn initiator_times_initiation_to_its_response() {
        let rtt = HandshakeRtt::default();
        assert_eq!(rtt.get(), None);
        rtt.on_sent(&message(HANDSHAKE_INITIATION, &[7]), || 1_000);
        // Another peer session's response, and data, do not answer it.
        rtt.on_received(&message(HANDSHAKE_RESPONSE, &[99, 8]), || 1_500);
        rtt.on_received(&message(TRANSPORT_DATA, &[7]), || 1_600);
        assert_eq!(rtt.get(), None);
        rtt.on_received(&message(HANDSHAKE_RESPONSE, &[99, 7]), || 43_000);
        assert_eq!(rtt.get(), Some(Duration::from_micros(42_000)));
        // A duplicate answer changes nothing.
        rtt.on_received(&message(HANDSHAKE_RESPONSE, &[99, 7]), || 90_000);
        assert_eq!(rtt.get(), Some(Duration::from_micros(42_000)));
    }

    #[test]
    fn a_retried_initiation_restarts_the_clock() {
        let rtt = HandshakeRtt::default();
        rtt.on_sent(&message(HANDSHAKE_INITIATION, &[1]), || 0);
        rtt.on_sent(&message(HANDSHAKE_INITIATION, &[2]), || 5_000_000);
        // The answer to the first (boringtun would refuse it anyway) is not timed.
        rtt.on_received(&message(HANDSHAKE_RESPONSE, &[9, 1]), || 5_000_100);
        assert_eq!(rtt.get(), None);
        rtt.on_received(&message(HANDSHAKE_RESPONSE, &[9, 2]), || 5_000_300);
        assert_eq!(rtt.get(), Some(Duration::from_micros(300)));
    }

    #[test]
    fn responder_times_response_to_first_data_of_the_new_session() {
        let rtt = HandshakeRtt::default();
        rtt.on_sent(&message(HANDSHAKE_RESPONSE, &[5, 77]), || 10);
        // Data still flowing in the old session (index 4) is not the answer.
        rtt.on_received(&message(TRANSPORT_DATA, &[4]), || 20);
        assert_eq!(rtt.get(), None);
        rtt.on_received(&message(TRANSPORT_DATA, &[5]), || 2_010);
        assert_eq!(rtt.get(), Some(Duration::from_micros(2_000)));
        // Data keeps coming; the figure stays until the next handshake.
        rtt.on_received(&message(TRANSPORT_DATA, &[5]), || 9_999);
        assert_eq!(rtt.get(), Some(Duration::from_micros(2_000)));
    }

    #[test]
    fn a_late_answer_is_not_a_round_trip() {
        let rtt = HandshakeRtt::default();
        rtt.on_sent(&message(HANDSHAKE_RESPONSE, &[6, 1]), || 0);
        rtt.on_received(&message(TRANSPORT_DATA, &[6]), || 25_000_000);
        assert_eq!(rtt.get(), None, "the confirming keepalive was lost");
        rtt.on_sent(&message(HANDSHAKE_RESPONSE, &[7, 1]), || 30_000_000);
        rtt.on_received(&message(TRANSPORT_DATA, &[7]), || 30_000_800);
        assert_eq!(rtt.get(), Some(Duration::from_micros(800)));
    }

    #[test]
    fn short_or_foreign_datagrams_are_ignored() {
        let rtt = HandshakeRtt::default();
        rtt.on_sent(&[HANDSHAKE_INITIATION, 0, 0], || 0);
        rtt.on_sent(&[], || 0);
        rtt.on_sent(&message(TRANSPORT_DATA, &[1]), || 0);
        rtt.on_received(&[HANDSHAKE_RESPONSE], || 5);
        rtt.on_received(&[], || 5);
        assert_eq!(rtt.get(), None);
        rtt.on_sent(&message(HANDSHAKE_INITIATION, &[3]), || 0);
        rtt.on_received(&[HANDSHAKE_RESPONSE, 0, 0, 0, 9, 0, 0, 0, 3], || 5);
        assert_eq!(rtt.get(), None, "truncated response");
    }
}
