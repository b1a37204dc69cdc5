//! SACK-aware loss recovery for the TCP sender (a netbird-proxy patch, see PATCHES.md).
//!
//! Upstream smoltcp 0.14 retransmits one segment on the third duplicate ACK and otherwise waits
//! for the retransmission timeout, so a window with two or more losses (common on a lossy
//! underlay) costs an RTO each time. This keeps a small scoreboard of the receiver's SACK blocks
//! and, during one recovery episode (from the loss until everything sent before it is
//! acknowledged), retransmits every hole once, one segment per incoming ACK. Without SACK
//! information it degrades to NewReno: a partial ACK retransmits the next unacknowledged
//! segment at once (RFC 6582).

use crate::time::{Duration, Instant};
use crate::wire::TcpSeqNumber;

/// SACKed ranges remembered above the cumulative ACK.
const MAX_BLOCKS: usize = 32;

#[derive(Debug, Default, Clone)]
pub(super) struct Recovery {
    /// SACKed ranges `[start, end)` above the cumulative ACK: sorted, disjoint.
    blocks: [(TcpSeqNumber, TcpSeqNumber); MAX_BLOCKS],
    len: usize,
    /// The highest sequence number sent when this recovery began; `None` outside recovery.
    point: Option<TcpSeqNumber>,
    /// Holes below this were already retransmitted in this recovery.
    next: TcpSeqNumber,
    /// After a timeout, SACK may not start a recovery until the cumulative ACK passes what was
    /// sent before it (go-back-N is resending all of that; RFC 6582's "recover").
    no_entry_below: Option<TcpSeqNumber>,
    /// The lowest retransmission still unacknowledged: where it starts, the highest sequence
    /// number sent when it left, and when. SACKs for data sent after it, or a round trip
    /// (plus a reordering allowance) without its ACK while other ACKs arrive, mean it was
    /// lost too (as Linux's lost-retransmit detection and RACK infer); it is sent again
    /// instead of waiting for the timeout, which at 0.5 % loss would come once every couple
    /// of hundred holes and stall the connection for RTT + 200 ms each time.
    lowest_retx: Option<LowestRetx>,
    /// The cumulative ACK at the last timeout that kept the scoreboard: a second timeout
    /// there means the receiver may have dropped what it SACKed, so the next one resends all.
    rto_una: Option<TcpSeqNumber>,
}

#[derive(Debug, Clone, Copy)]
struct LowestRetx {
    start: TcpSeqNumber,
    snd_max: TcpSeqNumber,
    at: Instant,
}

impl Recovery {
    /// Forget everything (after an RTO, which resends the whole window anyway, or a reset).
    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    pub(super) fn in_recovery(&self) -> bool {
        self.point.is_some()
    }

    /// After a timeout that resent everything from the cumulative ACK up to `sent_before`.
    pub(super) fn after_rto(&mut self, sent_before: TcpSeqNumber) {
        self.no_entry_below = Some(sent_before);
    }

    /// Whether SACK information may start a recovery episode at this ACK.
    pub(super) fn may_enter(&mut self, ack: TcpSeqNumber) -> bool {
        match self.no_entry_below {
            Some(limit) if ack < limit => false,
            _ => {
                self.no_entry_below = None;
                true
            }
        }
    }

    /// Record an ACK: drop what it covers and merge its SACK blocks, clipped to what was sent
    /// (`snd_max`): blocks outside `[ack, snd_max)` are a confused or hostile receiver's.
    pub(super) fn on_ack(
        &mut self,
        ack: TcpSeqNumber,
        snd_max: TcpSeqNumber,
        sacks: &[Option<(u32, u32)>; 3],
    ) {
        let mut kept = 0;
        for i in 0..self.len {
            let (start, end) = self.blocks[i];
            if end > ack {
                self.blocks[kept] = (start.max(ack), end);
                kept += 1;
            }
        }
        self.len = kept;
        if let Some(r) = self.lowest_retx
            && ack > r.start
        {
            // Where the ACK now stops was retransmitted in this episode too, in the same burst
            // or later: it inherits the watch (a later send only makes a resend come early).
            let again = self.point.is_some() && ack < self.next;
            self.lowest_retx = again.then_some(LowestRetx { start: ack, ..r });
        }
        for &(left, right) in sacks.iter().flatten() {
            let (start, end) = (TcpSeqNumber(left as i32), TcpSeqNumber(right as i32));
            let (start, end) = (start.max(ack), end.min(snd_max));
            if end > start {
                self.insert(start, end);
            }
        }
    }

    fn insert(&mut self, mut start: TcpSeqNumber, mut end: TcpSeqNumber) {
        // Merge every block that overlaps or touches [start, end), then insert in order.
        let mut merged = [(TcpSeqNumber::default(), TcpSeqNumber::default()); MAX_BLOCKS];
        let mut n = 0;
        for i in 0..self.len {
            let (s, e) = self.blocks[i];
            if e < start || s > end {
                merged[n] = (s, e);
                n += 1;
            } else {
                start = start.min(s);
                end = end.max(e);
            }
        }
        let at = merged[..n].iter().position(|b| b.0 > start).unwrap_or(n);
        if n == MAX_BLOCKS {
            // Full: keep the lowest blocks, which are the ones recovery needs first.
            if at == MAX_BLOCKS {
                self.blocks = merged;
                self.len = n;
                return;
            }
            n -= 1;
        }
        merged.copy_within(at..n, at + 1);
        merged[at] = (start, end);
        self.blocks = merged;
        self.len = n + 1;
    }

    /// Bytes the receiver holds above the cumulative ACK.
    pub(super) fn sacked_bytes(&self) -> usize {
        self.blocks[..self.len].iter().map(|(s, e)| *e - *s).sum()
    }

    /// Begin a recovery episode after a loss: everything up to `snd_max` was sent before it.
    pub(super) fn enter(&mut self, snd_una: TcpSeqNumber, snd_max: TcpSeqNumber) {
        self.point = Some(snd_max);
        self.next = snd_una;
    }

    /// End the episode once `ack` covers everything sent before it began; true if it ended.
    pub(super) fn exit_if_done(&mut self, ack: TcpSeqNumber) -> bool {
        if self.point.is_some_and(|p| ack >= p) {
            self.point = None;
            return true;
        }
        false
    }

    /// The next range to retransmit in this episode, at most `mss` long: the first hole at or
    /// after where the last retransmission ended that lies below the highest SACKed byte.
    /// Without SACK blocks, a `partial_ack` means the segment at `snd_una` was lost too.
    /// A retransmission of the segment at `snd_una` still unacknowledged `lost_after` it left
    /// is taken as lost.
    pub(super) fn next_hole(
        &mut self,
        snd_una: TcpSeqNumber,
        mss: usize,
        partial_ack: bool,
        now: Instant,
        lost_after: Duration,
    ) -> Option<(TcpSeqNumber, usize)> {
        let point = self.point?;
        if let Some(r) = self.lowest_retx {
            let sacked_max = self.blocks[..self.len].last().map(|b| b.1);
            let overtaken = sacked_max.is_some_and(|m| m >= r.snd_max + 3 * mss);
            if r.start == snd_una && (overtaken || now >= r.at + lost_after) {
                // What left with it or before it is as lost: resend every hole again, from
                // the first (a burst that took several retransmissions is not repaired one
                // segment per round trip).
                self.next = snd_una;
                self.lowest_retx = None;
                return Some((snd_una, mss));
            }
        }
        let mut from = self.next.max(snd_una);
        if self.len == 0 {
            return (partial_ack && from == snd_una && snd_una < point).then_some((snd_una, mss));
        }
        for &(start, end) in &self.blocks[..self.len] {
            if from < start {
                return Some((from, (start - from).min(mss)));
            }
            from = from.max(end);
        }
        None
    }

    /// Bytes taken as lost and not yet retransmitted in this episode: the holes between the
    /// last retransmission (or `snd_una`) and the highest SACKed byte. They have left the
    /// network, so they do not count in the sender's pipe (RFC 6675).
    pub(super) fn lost_bytes(&self, snd_una: TcpSeqNumber) -> usize {
        if self.point.is_none() {
            return 0;
        }
        let mut from = self.next.max(snd_una);
        let mut lost = 0;
        for &(start, end) in &self.blocks[..self.len] {
            if from < start {
                lost += start - from;
            }
            from = from.max(end);
        }
        lost
    }

    /// A retransmission of `[start, upto)` left while `snd_max` was the highest sequence number
    /// sent.
    pub(super) fn retransmitted(
        &mut self,
        start: TcpSeqNumber,
        upto: TcpSeqNumber,
        snd_max: TcpSeqNumber,
        at: Instant,
    ) {
        self.next = self.next.max(upto);
        if self.lowest_retx.is_none_or(|r| start <= r.start) {
            self.lowest_retx = Some(LowestRetx { start, snd_max, at });
        }
    }

    /// A retransmission timeout: with SACK information, resend only the holes (a new episode
    /// over everything sent, nothing yet retransmitted) and return true; without it, or at a
    /// second timeout at the same cumulative ACK, forget it all and return false (go-back-N).
    pub(super) fn on_rto(&mut self, snd_una: TcpSeqNumber, snd_max: TcpSeqNumber) -> bool {
        if self.len == 0 || self.rto_una == Some(snd_una) {
            self.clear();
            self.after_rto(snd_max);
            return false;
        }
        self.point = Some(snd_max);
        self.next = snd_una;
        self.lowest_retx = None;
        self.rto_una = Some(snd_una);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant::from_millis_const(0);
    const WAIT: Duration = Duration::from_secs(1);

    fn seq(n: i32) -> TcpSeqNumber {
        TcpSeqNumber(n)
    }

    #[test]
    fn holes_between_sack_blocks_are_found_once_each() {
        let mut r = Recovery::default();
        r.on_ack(
            seq(1000),
            seq(9000),
            &[Some((3000, 4000)), Some((6000, 7000)), None],
        );
        assert_eq!(r.sacked_bytes(), 2000);
        assert_eq!(r.lost_bytes(seq(1000)), 0, "outside recovery");
        r.enter(seq(1000), seq(9000));
        assert_eq!(r.lost_bytes(seq(1000)), 4000);
        assert_eq!(
            r.next_hole(seq(1000), 1400, false, T0, WAIT),
            Some((seq(1000), 1400))
        );
        r.retransmitted(seq(1000), seq(2400), seq(9000), T0);
        assert_eq!(
            r.next_hole(seq(1000), 1400, false, T0, WAIT),
            Some((seq(2400), 600))
        );
        r.retransmitted(seq(2400), seq(3000), seq(9000), T0);
        assert_eq!(
            r.next_hole(seq(1000), 1400, false, T0, WAIT),
            Some((seq(4000), 1400))
        );
        assert_eq!(r.lost_bytes(seq(1000)), 2000, "[4000, 6000)");
        r.retransmitted(seq(4000), seq(7000), seq(9000), T0);
        assert_eq!(r.lost_bytes(seq(1000)), 0);
        assert_eq!(
            r.next_hole(seq(1000), 1400, false, T0, WAIT),
            None,
            "nothing known above"
        );
        r.on_ack(seq(7000), seq(9000), &[None, None, None]);
        assert_eq!(r.sacked_bytes(), 0);
        assert!(!r.exit_if_done(seq(8999)));
        assert!(r.exit_if_done(seq(9000)));
        assert!(!r.in_recovery());
    }

    #[test]
    fn blocks_merge_and_wrap() {
        let mut r = Recovery::default();
        let base = i32::MAX - 500;
        let snd_max = seq(base.wrapping_add(5000));
        r.on_ack(
            seq(base),
            snd_max,
            &[Some(((base + 100) as u32, (base + 200) as u32)), None, None],
        );
        let wrapped = base.wrapping_add(1000);
        r.on_ack(
            seq(base),
            snd_max,
            &[Some(((base + 200) as u32, wrapped as u32)), None, None],
        );
        assert_eq!(r.len, 1);
        assert_eq!(r.sacked_bytes(), 900);
    }

    #[test]
    fn sack_blocks_beyond_what_was_sent_are_clipped() {
        let mut r = Recovery::default();
        r.on_ack(
            seq(1000),
            seq(5000),
            &[Some((1000, 1_000_000)), Some((6000, 7000)), None],
        );
        assert_eq!(r.sacked_bytes(), 4000, "only [1000, 5000) can be SACKed");
        r.enter(seq(1000), seq(5000));
        assert_eq!(
            r.next_hole(seq(1000), 1400, false, T0, WAIT),
            None,
            "no hole beyond snd_max"
        );
    }

    #[test]
    fn after_a_timeout_sack_waits_for_the_resent_data() {
        let mut r = Recovery::default();
        r.after_rto(seq(9000));
        assert!(!r.may_enter(seq(4000)));
        assert!(r.may_enter(seq(9000)));
        assert!(r.may_enter(seq(9500)));
    }

    #[test]
    fn without_sack_a_partial_ack_retransmits_the_next_segment() {
        let mut r = Recovery::default();
        r.enter(seq(0), seq(10_000));
        assert_eq!(r.next_hole(seq(1400), 1400, false, T0, WAIT), None);
        assert_eq!(
            r.next_hole(seq(1400), 1400, true, T0, WAIT),
            Some((seq(1400), 1400))
        );
        r.retransmitted(seq(1400), seq(2800), seq(10_000), T0);
        assert_eq!(r.next_hole(seq(1400), 1400, true, T0, WAIT), None);
    }

    #[test]
    fn a_lost_retransmission_is_sent_again_once_later_data_arrives() {
        let mut r = Recovery::default();
        r.on_ack(seq(1000), seq(9000), &[Some((2000, 9000)), None, None]);
        r.enter(seq(1000), seq(9000));
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0, WAIT),
            Some((seq(1000), 1000))
        );
        r.retransmitted(seq(1000), seq(2000), seq(9000), T0);
        assert_eq!(r.next_hole(seq(1000), 1000, false, T0, WAIT), None);
        // New data sent after the retransmission is SACKed, but not three segments of it yet.
        r.on_ack(seq(1000), seq(14_000), &[Some((2000, 11_000)), None, None]);
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0, WAIT),
            None,
            "may be reordering"
        );
        r.on_ack(seq(1000), seq(14_000), &[Some((2000, 12_000)), None, None]);
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0, WAIT),
            Some((seq(1000), 1000))
        );
        r.retransmitted(seq(1000), seq(2000), seq(14_000), T0);
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0, WAIT),
            None,
            "once per loss"
        );
        // A retransmitted run: the ACK stops inside it, so its next segment is watched.
        r.on_ack(seq(1500), seq(14_000), &[Some((2000, 12_000)), None, None]);
        assert_eq!(r.next_hole(seq(1500), 1000, false, T0, WAIT), None);
        assert_eq!(
            r.next_hole(seq(1500), 1000, false, T0 + WAIT, WAIT),
            Some((seq(1500), 1000))
        );
        // The hole is filled: nothing more to resend.
        r.on_ack(seq(12_000), seq(14_000), &[None, None, None]);
        assert_eq!(r.next_hole(seq(12_000), 1000, false, T0, WAIT), None);
        assert!(r.lowest_retx.is_none());
    }

    #[test]
    fn a_retransmission_unanswered_for_a_round_trip_is_sent_again() {
        // Nothing new can follow the retransmission (the send buffer is full of SACKed data),
        // so only time tells it was lost.
        let mut r = Recovery::default();
        r.on_ack(seq(1000), seq(9000), &[Some((2000, 9000)), None, None]);
        r.enter(seq(1000), seq(9000));
        r.retransmitted(seq(1000), seq(2000), seq(9000), T0);
        let rtt = Duration::from_millis(25);
        let just_before = T0 + rtt - Duration::from_millis(1);
        assert_eq!(r.next_hole(seq(1000), 1000, false, just_before, rtt), None);
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0 + rtt, rtt),
            Some((seq(1000), 1000))
        );
    }

    #[test]
    fn a_timeout_keeps_the_scoreboard_once_per_cumulative_ack() {
        let mut r = Recovery::default();
        r.on_ack(
            seq(1000),
            seq(9000),
            &[Some((2000, 4000)), Some((5000, 9000)), None],
        );
        r.enter(seq(1000), seq(9000));
        r.retransmitted(seq(1000), seq(5000), seq(9000), T0);
        assert_eq!(r.next_hole(seq(1000), 1000, false, T0, WAIT), None);
        // The timeout resends the holes only, from the first one again.
        assert!(r.on_rto(seq(1000), seq(9000)));
        assert!(r.in_recovery());
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0, WAIT),
            Some((seq(1000), 1000))
        );
        r.retransmitted(seq(1000), seq(2000), seq(9000), T0);
        assert_eq!(
            r.next_hole(seq(1000), 1000, false, T0, WAIT),
            Some((seq(4000), 1000))
        );
        // No progress by the next timeout: the receiver may have dropped what it SACKed.
        assert!(!r.on_rto(seq(1000), seq(9000)));
        assert_eq!(r.sacked_bytes(), 0);
        assert!(!r.may_enter(seq(1000)));
        // Without SACK information a timeout is go-back-N too.
        let mut r = Recovery::default();
        assert!(!r.on_rto(seq(1000), seq(9000)));
    }

    #[test]
    fn a_full_scoreboard_keeps_the_lowest_blocks() {
        let mut r = Recovery::default();
        for i in (0..MAX_BLOCKS as i32 + 4).rev() {
            let s = 10_000 + i * 1000;
            r.on_ack(
                seq(0),
                seq(1 << 20),
                &[Some((s as u32, (s + 500) as u32)), None, None],
            );
        }
        assert_eq!(r.len, MAX_BLOCKS);
        assert_eq!(r.blocks[0], (seq(10_000), seq(10_500)));
        let starts: Vec<i32> = r.blocks[..r.len].iter().map(|b| b.0.0).collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
    }
}
