//! A model-based congestion controller in the spirit of BBR (netbird-proxy patch, see
//! PATCHES.md): the window follows the path's measured bandwidth-delay product instead of
//! shrinking on every loss.
//!
//! Why: on a lossy underlay (a relay, a mobile link) random loss is not congestion, and a
//! loss-based controller (Reno, CUBIC) collapses to a few packets per round trip — 5 Mbit/s at
//! 0.5 % loss and 20 ms RTT, where Linux with BBR keeps ~450 Mbit/s. The model:
//! - `max_bw`: the highest delivery rate (bytes acknowledged per interval of at least one
//!   minimum RTT) seen over the last `BW_WINDOW` intervals;
//! - `min_rtt`: the lowest RTT sample of the last `MIN_RTT_WINDOW`;
//! - window = `CWND_GAIN` × `max_bw` × `min_rtt` (at least `MIN_CWND_SEGMENTS` segments), so the
//!   pipe stays full; while the delivery rate still grows by a quarter per interval (start-up)
//!   the window also grows by every acknowledged byte, as slow start does.
//! Losses leave the model alone (retransmissions are the recovery's business); a timeout
//! restarts from a small window that the model restores within one round trip.
//!
//! Not BBR: no pacing (the sender is ACK-clocked), no bandwidth probing cycle, no drain phase.

use crate::socket::tcp::RttEstimator;
use crate::time::{Duration, Instant};

use super::Controller;

const CWND_GAIN: f64 = 2.0;
const MIN_CWND_SEGMENTS: usize = 4;
const INITIAL_CWND_SEGMENTS: usize = 10;
/// Delivery-rate intervals the bandwidth maximum is kept over.
const BW_WINDOW: usize = 10;
/// The minimum RTT is re-learned when older than this.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Intervals without 25 % bandwidth growth that end start-up.
const STARTUP_ROUNDS: u8 = 3;
const DEFAULT_MSS: usize = 1024;

#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Bbr {
    mss: usize,
    cwnd: usize,
    /// Delivery rates in bytes per second, one per interval, newest at `bw_next - 1`.
    bw: [u64; BW_WINDOW],
    bw_next: usize,
    /// Bytes acknowledged since `interval_start`.
    interval_bytes: usize,
    interval_start: Option<Instant>,
    min_rtt_us: Option<u64>,
    min_rtt_at: Instant,
    /// Start-up: the best rate when growth was last seen, and intervals since.
    startup: bool,
    growth_base: u64,
    flat_rounds: u8,
}

impl Bbr {
    pub fn new() -> Self {
        Bbr {
            mss: DEFAULT_MSS,
            cwnd: DEFAULT_MSS * INITIAL_CWND_SEGMENTS,
            bw: [0; BW_WINDOW],
            bw_next: 0,
            interval_bytes: 0,
            interval_start: None,
            min_rtt_us: None,
            min_rtt_at: Instant::from_secs(0),
            startup: true,
            growth_base: 0,
            flat_rounds: 0,
        }
    }

    fn max_bw(&self) -> u64 {
        self.bw.iter().copied().max().unwrap_or(0)
    }

    /// The window the model asks for, if it has both a rate and an RTT.
    fn target(&self) -> Option<usize> {
        let rtt = self.min_rtt_us?;
        let bw = self.max_bw();
        if bw == 0 {
            return None;
        }
        let bdp = bw as f64 * rtt as f64 / 1e6;
        Some(((CWND_GAIN * bdp) as usize).max(self.mss * MIN_CWND_SEGMENTS))
    }

    fn on_rate_sample(&mut self, rate: u64) {
        self.bw[self.bw_next] = rate;
        self.bw_next = (self.bw_next + 1) % BW_WINDOW;
        if self.startup {
            let best = self.max_bw();
            if best >= self.growth_base + self.growth_base / 4 {
                self.growth_base = best;
                self.flat_rounds = 0;
            } else {
                self.flat_rounds += 1;
                if self.flat_rounds >= STARTUP_ROUNDS {
                    self.startup = false;
                }
            }
        }
    }
}

impl Default for Bbr {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller for Bbr {
    fn window(&self) -> usize {
        self.cwnd
    }

    fn on_ack(&mut self, now: Instant, len: usize, _in_flight: usize, rtt: &RttEstimator) {
        if let Some(sample) = rtt.latest_sample_us() {
            let expired = now >= self.min_rtt_at + MIN_RTT_WINDOW;
            if self.min_rtt_us.is_none_or(|m| sample <= m) || expired {
                self.min_rtt_us = Some(sample.max(1));
                self.min_rtt_at = now;
            }
        }
        if len == 0 {
            return;
        }
        // Delivery rate over intervals of at least one minimum RTT (1 ms at least, so a
        // burst of ACKs is not taken for the link's rate).
        let start = *self.interval_start.get_or_insert(now);
        self.interval_bytes += len;
        let span = Duration::from_micros(self.min_rtt_us.unwrap_or(1000).max(1000));
        if now >= start + span {
            let micros = (now - start).total_micros().max(1);
            let rate = self.interval_bytes as u64 * 1_000_000 / micros;
            self.on_rate_sample(rate);
            self.interval_bytes = 0;
            self.interval_start = Some(now);
        }
        let grown = self.cwnd.saturating_add(len);
        self.cwnd = match self.target() {
            Some(target) if self.startup => grown.max(target),
            Some(target) => target,
            None => grown,
        };
    }

    fn on_rto(&mut self, _now: Instant, _in_flight: usize) {
        self.cwnd = self.mss * MIN_CWND_SEGMENTS;
        self.interval_start = None;
        self.interval_bytes = 0;
    }

    fn set_mss(&mut self, mss: usize) {
        let segments = self.cwnd / self.mss.max(1);
        self.mss = mss;
        self.cwnd = segments.max(MIN_CWND_SEGMENTS) * mss;
    }
}
