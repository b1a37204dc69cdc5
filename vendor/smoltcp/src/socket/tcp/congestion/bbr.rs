//! A model-based congestion controller after BBR v1 (netbird-proxy patch, see PATCHES.md).
//!
//! Why: on a lossy underlay (a relay, a mobile link) random loss is not congestion, and a
//! loss-based controller (Reno, CUBIC) collapses to a few packets per round trip — ~10 Mbit/s
//! at 0.5 % loss and 20 ms RTT (Mathis), where Linux with BBR keeps ~450 Mbit/s. BBR instead
//! models the path by two numbers and sends at the rate they allow:
//! - `max_bw`: the highest delivery rate of the last `BW_ROUNDS` rounds (bytes newly
//!   acknowledged or SACKed per round, a round lasting at least one RTT and one millisecond);
//! - `min_rtt`: the lowest RTT sample of the last `MIN_RTT_WINDOW`.
//!
//! Phases, as in BBR v1: Startup (pace and window at 2.885 × the model, until the rate stops
//! growing by a quarter for three rounds), Drain (pace below the model until the queue Startup
//! built is gone), ProbeBw (an eight-round gain cycle 1.25, 0.75, 1 × 6: probe for more, drain
//! what the probe queued, cruise), and ProbeRtt (every `MIN_RTT_WINDOW` without a new minimum,
//! four segments in flight for `PROBE_RTT_TIME` so the queue empties and the RTT is re-learned).
//! The window is `CWND_GAIN` × the bandwidth-delay product plus a few send quanta (so a
//! sub-millisecond path, whose model is tiny, still keeps batches in flight).
//!
//! Random loss leaves the model alone: the SACK recovery retransmits, and samples count SACKed
//! bytes so a hole does not make the following round look faster than the path. A round that
//! retransmits more than 2 % of what it delivered (and at least eight segments) is not chance:
//! as BBR v2 bounds itself, the model restarts from that round's delivery rate (keeping at
//! least 70 % of itself) and Startup or a probe ends. Without this, a noisy sample raising the
//! maximum overdrives a shallow bottleneck (a WireGuard peer's socket buffer) for ten rounds.
//! A retransmission timeout restarts from a small window that grows by what is delivered
//! back to the model; the round it falls in gives no sample (its ACKs cover data the receiver
//! held long before).
//! Rounds in which the sender ran out of data or of receive window (application-limited) may
//! raise the bandwidth estimate but never lower it, nor end Startup.

use crate::socket::tcp::RttEstimator;
use crate::time::{Duration, Instant};

use super::Controller;

/// 2 / ln 2: the smallest gain that doubles the delivery rate each round in Startup.
const HIGH_GAIN: f64 = 2.885;
const CWND_GAIN: f64 = 2.0;
/// ProbeBw's pacing gains, one per round.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
const MIN_CWND_SEGMENTS: usize = 4;
const INITIAL_CWND_SEGMENTS: usize = 10;
/// Rounds the bandwidth maximum is kept over.
const BW_ROUNDS: usize = 10;
/// The minimum RTT is re-probed when older than this.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// A round that lost more than this share of what it sent cuts the model (random loss on a
/// bad path stays well below; overdriving a shallow bottleneck queue does not).
const LOSS_THRESH_PERCENT: u64 = 2;
/// ... and at least this many segments: one unlucky segment in a small window is not a
/// signal (BBR v2 counts eight loss events before leaving Startup).
const LOSS_MIN_SEGMENTS: usize = 8;
/// The model keeps at least this share of itself per lossy round.
const LOSS_BETA: f64 = 0.7;
/// Rounds without 25 % growth that end Startup.
const FULL_BW_ROUNDS: u8 = 3;
/// A rate sample spans at least this long (and one minimum RTT).
const MIN_SAMPLE: Duration = Duration::from_millis(1);
/// The largest send quantum (Linux's TSO autosizing cap); the window carries three.
const MAX_QUANTUM: usize = 64 * 1024;
const DEFAULT_MSS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum Mode {
    Startup,
    Drain,
    ProbeBw {
        phase: usize,
        since: Instant,
    },
    /// `done_at` is set once the flight has shrunk to the probe window.
    ProbeRtt {
        done_at: Option<Instant>,
    },
}

#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Bbr {
    mss: usize,
    cwnd: usize,
    mode: Mode,
    /// Per-round maxima in bytes per second, indexed by round number modulo `BW_ROUNDS`.
    bw: [(u64, u64); BW_ROUNDS],
    round: u64,
    /// Bytes delivered over the connection's life.
    delivered: u64,
    /// The round ends when `delivered` reaches this (what was in flight when it began).
    round_end: u64,
    round_start_delivered: u64,
    round_start: Option<Instant>,
    round_app_limited: bool,
    /// The round spans a retransmission timeout: its ACKs cover data the receiver had long
    /// held (the scoreboard is cleared on a timeout), so its rate means nothing.
    round_discarded: bool,
    /// Bytes retransmitted this round: what the sender took as lost.
    round_lost: u64,
    /// Nothing was in flight at the last delivery: the next send restarts the round clock.
    idle: bool,
    min_rtt_us: Option<u64>,
    min_rtt_at: Instant,
    /// Startup's exit test: the rate when growth was last seen, and flat rounds since.
    full_bw: u64,
    full_bw_rounds: u8,
    full_pipe: bool,
    in_flight: usize,
    /// Rotates ProbeBw's starting phase, as BBR randomises it.
    cycle_seed: usize,
    /// The latest RTT sample, for the round trace.
    latest_rtt_us: u64,
}

impl Bbr {
    pub fn new() -> Self {
        Bbr {
            mss: DEFAULT_MSS,
            cwnd: DEFAULT_MSS * INITIAL_CWND_SEGMENTS,
            mode: Mode::Startup,
            bw: [(0, 0); BW_ROUNDS],
            round: 0,
            delivered: 0,
            round_end: 0,
            round_start_delivered: 0,
            round_start: None,
            round_app_limited: false,
            round_discarded: false,
            round_lost: 0,
            idle: true,
            min_rtt_us: None,
            min_rtt_at: Instant::from_secs(0),
            full_bw: 0,
            full_bw_rounds: 0,
            full_pipe: false,
            in_flight: 0,
            cycle_seed: 0,
            latest_rtt_us: 0,
        }
    }

    fn max_bw(&self) -> u64 {
        self.bw
            .iter()
            .filter(|(round, _)| round + BW_ROUNDS as u64 > self.round)
            .map(|&(_, rate)| rate)
            .max()
            .unwrap_or(0)
    }

    /// The bandwidth-delay product in bytes, once both are known.
    fn bdp(&self) -> Option<f64> {
        let rtt = self.min_rtt_us?;
        let bw = self.max_bw();
        (bw > 0).then(|| bw as f64 * rtt as f64 / 1e6)
    }

    fn gains(&self) -> (f64, f64) {
        match self.mode {
            Mode::Startup => (HIGH_GAIN, HIGH_GAIN),
            Mode::Drain => (1.0 / HIGH_GAIN, HIGH_GAIN),
            Mode::ProbeBw { phase, .. } => (CYCLE[phase], CWND_GAIN),
            Mode::ProbeRtt { .. } => (1.0, 1.0),
        }
    }

    /// The window the model asks for, if it has both a rate and an RTT.
    fn target(&self) -> Option<usize> {
        let bdp = self.bdp()?;
        let quantum = (self.max_bw() / 1000).clamp(2 * self.mss as u64, MAX_QUANTUM as u64);
        let target = self.gains().1 * bdp + 3.0 * quantum as f64;
        Some((target as usize).max(self.mss * MIN_CWND_SEGMENTS))
    }

    fn start_round(&mut self, now: Instant, pipe: usize) {
        self.round_start = Some(now);
        self.round_start_delivered = self.delivered;
        self.round_end = self.delivered + pipe as u64;
        self.round_app_limited = false;
        self.round_discarded = false;
        self.round_lost = 0;
    }

    fn set_mode(&mut self, mode: Mode) {
        net_debug!(
            "bbr: {:?} -> {:?}: max_bw {} B/s, min_rtt {:?} us, cwnd {}, in flight {}",
            self.mode,
            mode,
            self.max_bw(),
            self.min_rtt_us,
            self.cwnd,
            self.in_flight
        );
        self.mode = mode;
    }

    fn record_sample(&mut self, rate: u64, app_limited: bool) {
        if app_limited && rate < self.max_bw() {
            return;
        }
        let slot = &mut self.bw[(self.round % BW_ROUNDS as u64) as usize];
        if slot.0 != self.round {
            *slot = (self.round, 0);
        }
        slot.1 = slot.1.max(rate);
    }

    /// A round ended: check Startup's exit.
    fn on_round(&mut self, app_limited: bool) {
        if self.full_pipe || app_limited {
            return;
        }
        let bw = self.max_bw();
        if bw >= self.full_bw + self.full_bw / 4 {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return;
        }
        self.full_bw_rounds += 1;
        if self.full_bw_rounds >= FULL_BW_ROUNDS {
            self.full_pipe = true;
            if self.mode == Mode::Startup {
                self.set_mode(Mode::Drain);
            }
        }
    }

    /// More was lost this round than chance explains: the model overstates the path (a
    /// noisy sample raised the maximum, or the path got slower), and the excess is being
    /// dropped at the bottleneck. As BBR v2 does with its short-term bound: start again from
    /// what this round delivered, but keep at least `LOSS_BETA` of the estimate; end
    /// Startup, and any probe for more.
    fn on_lossy_round(&mut self, now: Instant, rate: u64) {
        let bw = rate.max((self.max_bw() as f64 * LOSS_BETA) as u64);
        self.bw = [(0, 0); BW_ROUNDS];
        self.bw[(self.round % BW_ROUNDS as u64) as usize] = (self.round, bw);
        match self.mode {
            Mode::Startup => {
                self.full_pipe = true;
                self.set_mode(Mode::Drain);
            }
            Mode::ProbeBw { phase, .. } if CYCLE[phase] > 1.0 => {
                self.mode = Mode::ProbeBw {
                    phase: phase + 1,
                    since: now,
                };
            }
            _ => {}
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        // Never start in the draining phase (1), as BBR does.
        self.cycle_seed = self.cycle_seed.wrapping_add(3);
        let phase = match self.cycle_seed % CYCLE.len() {
            1 => 2,
            p => p,
        };
        self.set_mode(Mode::ProbeBw { phase, since: now });
    }

    fn update_mode(&mut self, now: Instant) {
        let bdp = self.bdp().unwrap_or(0.0);
        let min_rtt = Duration::from_micros(self.min_rtt_us.unwrap_or(0));
        match self.mode {
            Mode::Drain if (self.in_flight as f64) <= bdp => self.enter_probe_bw(now),
            Mode::ProbeBw { phase, since } => {
                let inflight = self.in_flight as f64;
                let elapsed = now - since >= min_rtt;
                let advance = match CYCLE[phase] {
                    // Probe until the extra quarter is actually in flight (or for a few
                    // round trips, when the window or the application holds it back).
                    g if g > 1.0 => elapsed && (inflight >= g * bdp || now - since >= min_rtt * 4),
                    // Drain ends early once the probe's queue is gone.
                    g if g < 1.0 => elapsed || inflight <= bdp,
                    _ => elapsed,
                };
                if advance {
                    self.mode = Mode::ProbeBw {
                        phase: (phase + 1) % CYCLE.len(),
                        since: now,
                    };
                }
            }
            Mode::ProbeRtt { done_at: None } if self.in_flight <= self.probe_rtt_cwnd() => {
                self.set_mode(Mode::ProbeRtt {
                    done_at: Some(now + PROBE_RTT_TIME),
                });
            }
            Mode::ProbeRtt {
                done_at: Some(done_at),
            } if now >= done_at => {
                self.min_rtt_at = now;
                if self.full_pipe {
                    self.enter_probe_bw(now);
                } else {
                    self.set_mode(Mode::Startup);
                }
            }
            _ => {}
        }
    }

    fn probe_rtt_cwnd(&self) -> usize {
        self.mss * MIN_CWND_SEGMENTS
    }

    fn update_cwnd(&mut self, delivered: usize) {
        if let Mode::ProbeRtt { .. } = self.mode {
            self.cwnd = self.probe_rtt_cwnd();
            return;
        }
        let grown = self.cwnd.saturating_add(delivered);
        self.cwnd = match self.target() {
            Some(target) if self.full_pipe => grown.min(target),
            Some(target) if self.cwnd >= target => self.cwnd,
            _ => grown,
        }
        .max(self.mss * MIN_CWND_SEGMENTS);
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

    fn on_ack(&mut self, now: Instant, _len: usize, _in_flight: usize, rtt: &RttEstimator) {
        let Some(sample) = rtt.latest_sample_us() else {
            return;
        };
        self.latest_rtt_us = sample;
        let expired = now >= self.min_rtt_at + MIN_RTT_WINDOW;
        if self.min_rtt_us.is_none_or(|m| sample <= m) || expired {
            self.min_rtt_us = Some(sample.max(1));
            self.min_rtt_at = now;
        }
        if expired && !matches!(self.mode, Mode::ProbeRtt { .. }) && self.full_pipe {
            self.set_mode(Mode::ProbeRtt { done_at: None });
        }
    }

    fn on_delivered(&mut self, now: Instant, delivered: usize, pipe: usize, app_limited: bool) {
        self.in_flight = pipe;
        self.delivered += delivered as u64;
        self.round_app_limited |= app_limited;
        let start = *self.round_start.get_or_insert(now);
        // A sample spans at least one minimum RTT: a shorter one can be an ACK burst (a
        // repaired hole, a receiver's stretch ACK) and overstate the path.
        let span = MIN_SAMPLE.max(Duration::from_micros(self.min_rtt_us.unwrap_or(0)));
        if self.delivered >= self.round_end && now >= start + span {
            let micros = (now - start).total_micros().max(1);
            let bytes = self.delivered - self.round_start_delivered;
            let round_app_limited = self.round_app_limited;
            let rate = bytes * 1_000_000 / micros;
            net_trace!(
                "bbr round {}: {} B in {} us ({} B/s), {} B retransmitted{}{}; {:?}, max_bw {}, cwnd {}, pipe {}, rtt {} us (min {:?})",
                self.round,
                bytes,
                micros,
                rate,
                self.round_lost,
                if round_app_limited {
                    ", app-limited"
                } else {
                    ""
                },
                if self.round_discarded {
                    ", discarded"
                } else {
                    ""
                },
                self.mode,
                self.max_bw(),
                self.cwnd,
                pipe,
                self.latest_rtt_us,
                self.min_rtt_us
            );
            if !self.round_discarded {
                self.record_sample(rate, round_app_limited);
                let lost = self.round_lost;
                if lost * 100 > (bytes + lost) * LOSS_THRESH_PERCENT
                    && lost >= (LOSS_MIN_SEGMENTS * self.mss) as u64
                {
                    self.on_lossy_round(now, rate);
                }
            }
            self.round += 1;
            self.on_round(round_app_limited || self.round_discarded);
            self.start_round(now, pipe);
        }
        self.update_mode(now);
        self.update_cwnd(delivered);
        self.idle = pipe == 0;
    }

    fn on_retransmit(&mut self, _now: Instant, len: usize) {
        self.round_lost += len as u64;
    }

    fn on_rto(&mut self, now: Instant, in_flight: usize) {
        self.cwnd = self.mss * MIN_CWND_SEGMENTS;
        self.in_flight = 0;
        // No sample until everything in flight at the timeout is accounted for.
        self.start_round(now, in_flight);
        self.round_discarded = true;
    }

    fn post_transmit(&mut self, now: Instant, _len: usize) {
        if self.idle {
            // Restarting after idle: the silence is not part of any rate sample.
            self.idle = false;
            let discarded = self.round_discarded;
            self.start_round(now, 0);
            self.round_discarded = discarded;
        }
    }

    fn pacing_rate(&self, srtt_us: u64) -> f64 {
        let gain = self.gains().0;
        let model = gain * self.max_bw() as f64 / 1e6;
        let window = gain * self.cwnd as f64 / srtt_us.max(1) as f64;
        // Until the pipe is known full, the window paces too (as Linux only ever raises the
        // pacing rate in Startup): the first samples of a new connection can be a few bytes
        // of handshake over a round trip, and pacing at that would send one segment in
        // seconds.
        if self.full_pipe && self.max_bw() > 0 {
            model
        } else {
            model.max(window)
        }
    }

    fn set_mss(&mut self, mss: usize) {
        let segments = self.cwnd / self.mss.max(1);
        self.mss = mss;
        self.cwnd = segments.max(MIN_CWND_SEGMENTS) * mss;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1400;

    /// Feed a path delivering `rate` bytes/s with an RTT of `rtt_us`, one ACK per segment,
    /// for `ms` milliseconds.
    fn drive(bbr: &mut Bbr, start: Instant, ms: u64, rate: u64, rtt_us: u64) -> Instant {
        drive_lossy(bbr, start, ms, rate, rtt_us, 0)
    }

    /// `drive`, with one segment in `loss_every` (0: none) retransmitted.
    fn drive_lossy(
        bbr: &mut Bbr,
        start: Instant,
        ms: u64,
        rate: u64,
        rtt_us: u64,
        loss_every: usize,
    ) -> Instant {
        let per_segment = Duration::from_micros(MSS as u64 * 1_000_000 / rate);
        let mut now = start;
        let end = start + Duration::from_millis(ms);
        let rtte = RttEstimator {
            latest_us: Some(rtt_us),
            ..Default::default()
        };
        let mut n = 0;
        while now < end {
            n += 1;
            if loss_every > 0 && n % loss_every == 0 {
                bbr.on_retransmit(now, MSS);
            }
            bbr.on_ack(now, MSS, 0, &rtte);
            // In flight: what the window allows, or what the pacer puts out in one RTT.
            let paced = bbr.pacing_rate(rtt_us) * rtt_us as f64;
            let pipe = bbr.window().min(paced as usize);
            bbr.on_delivered(now, MSS, pipe, false);
            now += per_segment;
        }
        now
    }

    #[test]
    fn startup_finds_the_rate_and_probe_bw_holds_two_bdp() {
        let mut bbr = Bbr::new();
        bbr.set_mss(MSS);
        // 50 MB/s, 20 ms: BDP 1 MB.
        let now = drive(&mut bbr, Instant::from_secs(1), 2000, 50_000_000, 20_000);
        assert!(bbr.full_pipe, "Startup ended");
        assert!(matches!(bbr.mode, Mode::ProbeBw { .. }), "{:?}", bbr.mode);
        let bw = bbr.max_bw();
        assert!((45_000_000..=66_000_000).contains(&bw), "max_bw {bw}");
        let cwnd = bbr.window();
        assert!((1_900_000..=3_000_000).contains(&cwnd), "cwnd {cwnd}");
        let pacing = bbr.pacing_rate(20_000) * 1e6;
        assert!(
            pacing > 0.7 * 50e6 && pacing < 1.3 * 66e6,
            "pacing {pacing}"
        );
        // Losses are not congestion: nothing in the model moves on a loss.
        bbr.on_loss(now, cwnd);
        assert_eq!(bbr.window(), cwnd);
    }

    #[test]
    fn heavy_loss_cuts_the_model_and_chance_loss_does_not() {
        let mut bbr = Bbr::new();
        bbr.set_mss(MSS);
        // Random loss of 1 % (one retransmission per 100 segments) through Startup and on.
        let now = drive_lossy(
            &mut bbr,
            Instant::from_secs(1),
            2000,
            50_000_000,
            20_000,
            100,
        );
        assert!(matches!(bbr.mode, Mode::ProbeBw { .. }), "{:?}", bbr.mode);
        let bw = bbr.max_bw();
        assert!(bw >= 45_000_000, "max_bw {bw}");
        // The path halves and drops 5 % of what is sent: within a round or two the model
        // falls to at most 70 % of what it was, and not below what the path delivers.
        let _ = drive_lossy(&mut bbr, now, 60, 25_000_000, 20_000, 20);
        let cut = bbr.max_bw();
        assert!(cut <= bw * 7 / 10 && cut >= 20_000_000, "{cut} after {bw}");
    }

    #[test]
    fn a_lost_segment_in_a_small_window_does_not_end_startup() {
        // A fifth of everything lost, for three rounds: at 1 MB/s (14 segments a round) that
        // is under eight segments a round, chance; at 50 MB/s it ends Startup.
        let mut small = Bbr::new();
        small.set_mss(MSS);
        let _ = drive_lossy(&mut small, Instant::from_secs(1), 60, 1_000_000, 20_000, 5);
        assert_eq!(small.mode, Mode::Startup);
        let mut large = Bbr::new();
        large.set_mss(MSS);
        let _ = drive_lossy(&mut large, Instant::from_secs(1), 60, 50_000_000, 20_000, 5);
        assert!(large.full_pipe, "{:?}", large.mode);
    }

    #[test]
    fn a_trickle_before_the_bulk_does_not_slow_startup_pacing() {
        // A connection's first rounds carry a few bytes of application handshake.
        let mut bbr = Bbr::new();
        bbr.set_mss(MSS);
        let mut now = Instant::from_secs(1);
        for _ in 0..5 {
            bbr.on_delivered(now, 5, 0, true);
            now += Duration::from_millis(21);
        }
        assert!(bbr.max_bw() < 1000, "{}", bbr.max_bw());
        let initial = HIGH_GAIN * (INITIAL_CWND_SEGMENTS * MSS) as f64 / 20_000.0;
        assert!(
            bbr.pacing_rate(20_000) >= initial,
            "{}",
            bbr.pacing_rate(20_000)
        );
    }

    #[test]
    fn app_limited_rounds_do_not_lower_the_estimate() {
        let mut bbr = Bbr::new();
        bbr.set_mss(MSS);
        let mut now = drive(&mut bbr, Instant::from_secs(1), 2000, 50_000_000, 20_000);
        let bw = bbr.max_bw();
        // Twenty rounds of a trickle the sender could not fill.
        for _ in 0..2000 {
            bbr.on_delivered(now, 100, 100, true);
            now += Duration::from_micros(500);
        }
        assert!(bbr.max_bw() >= bw, "{} < {bw}", bbr.max_bw());
    }

    #[test]
    fn probe_rtt_after_ten_seconds_without_a_new_minimum() {
        let mut bbr = Bbr::new();
        bbr.set_mss(MSS);
        let now = drive(&mut bbr, Instant::from_secs(1), 2000, 50_000_000, 20_000);
        // The RTT never returns to its minimum: ProbeRtt comes once the minimum is 10 s old,
        // holds four segments for 200 ms, and hands back to ProbeBw with the new minimum.
        let (mut now, mut probed_at) = (now, None);
        for _ in 0..1100 {
            now = drive(&mut bbr, now, 10, 50_000_000, 25_000);
            if matches!(bbr.mode, Mode::ProbeRtt { .. }) {
                assert_eq!(bbr.window(), MIN_CWND_SEGMENTS * MSS);
                probed_at.get_or_insert(now);
            }
        }
        let probed_at = probed_at.expect("ProbeRtt");
        assert!(probed_at > Instant::from_secs(12), "{probed_at}");
        assert!(matches!(bbr.mode, Mode::ProbeBw { .. }), "{:?}", bbr.mode);
        assert_eq!(bbr.min_rtt_us, Some(25_000));
    }
}
