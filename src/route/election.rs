//! The HA election of NetBird's client (networks.md §1.3): among the routes of one HA group
//! (same NetID and target, different routing peers), the one whose peer scores best carries
//! the group's prefix; a small hysteresis keeps the current one against a barely better rival.
//! Pure functions over the peers' states, so every rule is unit-tested without a network.

use std::time::Duration;

use super::model::{MAX_METRIC, Route};

/// What the election needs to know of a routing peer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PeerState {
    /// Not in the map, or still without any path ("Connecting"): never elected.
    Unreachable,
    /// Known but idle or disconnected: scores only by metric and latency, so it wins only
    /// when no member is connected.
    Idle { latency: Option<Duration> },
    /// Connected, through the relay (`relayed`) or directly.
    Connected {
        relayed: bool,
        latency: Option<Duration>,
    },
}

/// Latency that counts as "unknown" (0, or over a second, is taken as 999 ms).
const UNKNOWN_LATENCY: Duration = Duration::from_millis(999);
/// The current route is kept unless a rival beats it by more than this (~10 ms of latency).
const HYSTERESIS: f64 = 0.01;

/// A member's score; None when its peer cannot be elected.
pub fn score(route: &Route, peer: PeerState) -> Option<f64> {
    let (connected, relayed, latency) = match peer {
        PeerState::Unreachable => return None,
        // An idle peer is not relayed (NetBird's status says so), so it gets the path point.
        PeerState::Idle { latency } => (false, false, latency),
        PeerState::Connected { relayed, latency } => (true, relayed, latency),
    };
    let mut score = if route.metric < MAX_METRIC {
        f64::from(MAX_METRIC - route.metric) * 10.0
    } else {
        0.0
    };
    let latency = latency
        .filter(|l| !l.is_zero() && *l <= Duration::from_secs(1))
        .unwrap_or(UNKNOWN_LATENCY);
    score += 1.0 - latency.as_secs_f64();
    if connected {
        score += 100_000.0;
    }
    if !relayed {
        score += 1.0;
    }
    Some(score)
}

/// The member to carry the group: its index in `members`, or None when no peer can. `current`
/// is the route ID elected last time (hysteresis); ties go to the first member.
pub fn elect(members: &[(&Route, PeerState)], current: Option<&str>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    let mut current_score = 0.0;
    for (i, (route, peer)) in members.iter().enumerate() {
        let Some(s) = score(route, *peer) else {
            continue;
        };
        if Some(route.id.as_str()) == current {
            current_score = s;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    let (best_index, best_score) = best?;
    if let Some(cur) = current
        && members[best_index].0.id != cur
        && current_score != 0.0
        && current_score + HYSTERESIS > best_score
        && let Some(i) = members.iter().position(|(r, _)| r.id == cur)
    {
        return Some(i);
    }
    Some(best_index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::model::Target;

    fn route(id: &str, metric: u16) -> Route {
        Route {
            id: id.into(),
            target: Target::Network("10.1.0.0/16".parse().unwrap()),
            peer: format!("peer-{id}"),
            metric,
            masquerade: true,
            net_id: "db".into(),
            keep_route: false,
            skip_auto_apply: false,
        }
    }

    fn direct(ms: u64) -> PeerState {
        PeerState::Connected {
            relayed: false,
            latency: Some(Duration::from_millis(ms)),
        }
    }

    fn relayed(ms: u64) -> PeerState {
        PeerState::Connected {
            relayed: true,
            latency: Some(Duration::from_millis(ms)),
        }
    }

    #[test]
    fn metric_then_connection_then_path_then_latency() {
        let (a, b) = (route("a", 100), route("b", 200));
        // Lower metric wins between connected peers, whatever the latency.
        assert_eq!(elect(&[(&a, relayed(900)), (&b, direct(1))], None), Some(0));
        // Connected beats a better metric that is only idle.
        assert_eq!(
            elect(
                &[(&a, PeerState::Idle { latency: None }), (&b, relayed(5))],
                None
            ),
            Some(1)
        );
        // Same metric: direct over relayed, then lower latency.
        let c = route("c", 100);
        assert_eq!(elect(&[(&a, relayed(5)), (&c, direct(50))], None), Some(1));
        assert_eq!(elect(&[(&a, direct(40)), (&c, direct(5))], None), Some(1));
        // Unreachable peers are never elected; idle ones are when nothing is connected.
        assert_eq!(elect(&[(&a, PeerState::Unreachable)], None), None);
        assert_eq!(
            elect(
                &[
                    (&a, PeerState::Unreachable),
                    (&b, PeerState::Idle { latency: None })
                ],
                None
            ),
            Some(1)
        );
        assert_eq!(elect(&[], None), None);
    }

    #[test]
    fn the_current_route_stays_against_a_barely_better_rival() {
        let (a, c) = (route("a", 100), route("c", 100));
        // c is 5 ms faster: within the hysteresis, a stays.
        assert_eq!(
            elect(&[(&a, direct(20)), (&c, direct(15))], Some("a")),
            Some(0)
        );
        // 30 ms faster: c takes over.
        assert_eq!(
            elect(&[(&a, direct(45)), (&c, direct(15))], Some("a")),
            Some(1)
        );
        // The current one gone: the other, whatever the hysteresis.
        assert_eq!(
            elect(&[(&a, PeerState::Unreachable), (&c, direct(15))], Some("a")),
            Some(1)
        );
        // Unknown latency (0 or over a second) counts as 999 ms.
        let slow = PeerState::Connected {
            relayed: false,
            latency: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            score(&a, slow),
            score(
                &a,
                PeerState::Connected {
                    relayed: false,
                    latency: None
                }
            )
        );
    }
}
