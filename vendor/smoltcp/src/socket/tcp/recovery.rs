//! SACK-aware loss recovery for the TCP sender (a netbird-proxy patch, see PATCHES.md).
//!
//! Upstream smoltcp 0.14 retransmits one segment on the third duplicate ACK and otherwise waits
//! for the retransmission timeout, so a window with two or more losses (common on a lossy
//! underlay) costs an RTO each time. This keeps a small scoreboard of the receiver's SACK blocks
//! and, during one recovery episode (from the loss until everything sent before it is
//! acknowledged), retransmits every hole once, one segment per incoming ACK. Without SACK
//! information it degrades to NewReno: a partial ACK retransmits the next unacknowledged
//! segment at once (RFC 6582).

use crate::wire::TcpSeqNumber;

/// SACKed ranges remembered above the cumulative ACK.
const MAX_BLOCKS: usize = 16;

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
    pub(super) fn next_hole(
        &self,
        snd_una: TcpSeqNumber,
        mss: usize,
        partial_ack: bool,
    ) -> Option<(TcpSeqNumber, usize)> {
        let point = self.point?;
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

    /// A retransmission covered everything below `upto`.
    pub(super) fn retransmitted(&mut self, upto: TcpSeqNumber) {
        self.next = self.next.max(upto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        r.enter(seq(1000), seq(9000));
        assert_eq!(r.next_hole(seq(1000), 1400, false), Some((seq(1000), 1400)));
        r.retransmitted(seq(2400));
        assert_eq!(r.next_hole(seq(1000), 1400, false), Some((seq(2400), 600)));
        r.retransmitted(seq(3000));
        assert_eq!(r.next_hole(seq(1000), 1400, false), Some((seq(4000), 1400)));
        r.retransmitted(seq(7000));
        assert_eq!(
            r.next_hole(seq(1000), 1400, false),
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
            r.next_hole(seq(1000), 1400, false),
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
        assert_eq!(r.next_hole(seq(1400), 1400, false), None);
        assert_eq!(r.next_hole(seq(1400), 1400, true), Some((seq(1400), 1400)));
        r.retransmitted(seq(2800));
        assert_eq!(r.next_hole(seq(1400), 1400, true), None);
    }

    #[test]
    fn a_full_scoreboard_keeps_the_lowest_blocks() {
        let mut r = Recovery::default();
        for i in (0..20).rev() {
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
