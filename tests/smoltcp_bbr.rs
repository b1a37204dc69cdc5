//! Runs the unit tests of our smoltcp patch's BBR controller (vendor/smoltcp cannot run its own
//! test suite here: its dev-dependencies are not vendored). The module is compiled in this test
//! crate against the few items it uses from smoltcp's TCP socket, restated below.

#![allow(dead_code)]
// The module's `defmt` attributes name a smoltcp feature this crate lacks, and its tests fill
// smoltcp's larger RTT estimator with `..Default::default()`.
#![allow(unexpected_cfgs, clippy::needless_update)]

use time::Instant;

/// What `crate::time` means inside the patched module.
mod time {
    pub use smoltcp::time::{Duration, Instant};
}

mod socket {
    pub mod tcp {
        /// The part of the socket's RTT estimator the controller reads.
        #[derive(Debug, Default)]
        pub struct RttEstimator {
            pub latest_us: Option<u64>,
        }

        impl RttEstimator {
            pub fn latest_sample_us(&self) -> Option<u64> {
                self.latest_us
            }
        }
    }
}

/// The controller interface of vendor/smoltcp/src/socket/tcp/congestion.rs (the module's
/// `super`).
#[allow(unused_variables)]
trait Controller {
    fn window(&self) -> usize;
    fn on_ack(
        &mut self,
        now: Instant,
        len: usize,
        in_flight: usize,
        rtt: &socket::tcp::RttEstimator,
    ) {
    }
    fn on_rto(&mut self, now: Instant, in_flight: usize) {}
    fn on_loss(&mut self, now: Instant, in_flight: usize) {}
    fn post_transmit(&mut self, now: Instant, len: usize) {}
    fn on_retransmit(&mut self, now: Instant, len: usize) {}
    fn on_delivered(&mut self, now: Instant, delivered: usize, pipe: usize, app_limited: bool) {}
    fn pacing_rate(&self, srtt_us: u64) -> f64;
    fn set_mss(&mut self, mss: usize) {}
}

/// smoltcp's trace logging macro (checked, not printed).
macro_rules! net_trace {
    ($($arg:expr),*) => {
        let _ = format_args!($($arg),*);
    };
}

/// smoltcp's debug logging macro (checked, not printed).
macro_rules! net_debug {
    ($($arg:expr),*) => {
        let _ = format_args!($($arg),*);
    };
}

#[path = "../vendor/smoltcp/src/socket/tcp/congestion/bbr.rs"]
mod bbr;
