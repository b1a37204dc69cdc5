//! One ICE agent per peer, NetBird's way (ice.md §1), all driven as one sans-IO state machine:
//! fed signal messages, STUN datagrams and time; returning datagrams to send and events
//! (candidates to signal, a pair selected, a path lost).
//!
//! Rules kept here (ice.md §1.3–1.5):
//! * our ufrag/pwd are drawn once per peer and kept; a session ID names one agent instance and
//!   changes exactly when that agent is closed;
//! * a remote OFFER/ANSWER with the stored (or no) session ID leaves a running agent alone; a
//!   new one replaces it;
//! * candidates that arrive before the agent are kept (bounded) and added when it starts; our
//!   own are signalled after the OFFER/ANSWER that carries our credentials, and once more
//!   after 2 s if no pair was selected by then;
//! * no selected pair 12 s after the start, or no STUN from the remote for 6 s once selected:
//!   the agent is closed and the path lost, which the caller answers with the relay and a retry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use is::stun::{StunMessage, StunPacket};
use is::{IceAgent, IceAgentEvent};
use tracing::debug;

use super::candidate::{self, Kind, RemoteCandidate};
use super::creds::{Credentials, SessionId};
use super::srflx::{Mapping, Srflx};
use super::wire;

/// No selected pair this long after the agent started: failed (pion's 6 s disconnected plus
/// 6 s failed timeout, in Checking).
pub const FAIL_AFTER: Duration = Duration::from_secs(12);
/// No STUN from the remote this long on a selected pair: the path is gone (NetBird treats
/// pion's Disconnected, 6 s, like Failed).
pub const SILENT_AFTER: Duration = Duration::from_secs(6);
/// When our candidates are signalled a second time if nothing was selected yet.
const RESEND_AFTER: Duration = Duration::from_secs(2);
/// Remote candidates kept per peer (buffered or in the agent).
const MAX_REMOTE_CANDIDATES: usize = 32;

/// Counted reasons for dropped ICE input, and path changes (for `/metrics`).
#[derive(Debug, Default)]
pub struct IceCounters {
    pub candidates_malformed: AtomicU64,
    pub candidates_refused: AtomicU64,
    pub credentials_malformed: AtomicU64,
    pub stun_malformed: AtomicU64,
    pub stun_unmatched: AtomicU64,
    /// STUN from the WireGuard socket dropped because the ICE queue was full.
    pub stun_queue_full: AtomicU64,
    /// Agents started (one per ICE attempt with a peer).
    pub agents_started: AtomicU64,
    pub pairs_selected: AtomicU64,
    pub paths_lost: AtomicU64,
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The pair a peer's traffic takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    pub local_kind: Kind,
    pub local: SocketAddr,
    pub remote_kind: Kind,
    pub remote: SocketAddr,
}

/// What the caller acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Signal this local candidate line to the peer (a CANDIDATE message).
    Candidate { peer: String, line: String },
    /// Send the peer's WireGuard datagrams to `pair.remote` (again, if it changed).
    Selected { peer: String, pair: Selected },
    /// The peer's direct path is gone (or never came): use the relay, retry later.
    Lost { peer: String, reason: &'static str },
}

/// What an OFFER/ANSWER did to the peer's agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// A new agent runs for the peer.
    Started,
    /// The agent that runs already belongs to that session: nothing changed.
    Unchanged,
    /// The remote is relay-only (`":"`): no agent.
    RelayOnly,
    /// Unusable credentials: dropped and counted.
    Malformed,
}

struct Running {
    agent: IceAgent,
    started: Instant,
    selected: Option<Selected>,
    /// When the remote last sent STUN we accepted.
    heard: Instant,
    resend_at: Option<Instant>,
    /// Our candidates as signalled, for the resend.
    lines: Vec<String>,
    /// Gathers a TURN relay candidate (NetBird's relay is missing on one side).
    wants_turn: bool,
}

struct PeerIce {
    creds: Credentials,
    session: SessionId,
    remote_session: Option<SessionId>,
    /// Remote candidates that came before the agent.
    early: Vec<RemoteCandidate>,
    running: Option<Running>,
}

impl PeerIce {
    fn new() -> Self {
        Self {
            creds: Credentials::generate(),
            session: SessionId::generate(),
            remote_session: None,
            early: Vec::new(),
            running: None,
        }
    }
}

/// Where our host candidates come from, and what is never a candidate.
#[derive(Clone, Debug)]
pub struct LocalNet {
    /// The WireGuard port every candidate carries.
    pub port: u16,
    /// Addresses of the up interfaces, signalled as host candidates.
    pub host_ips: Vec<IpAddr>,
    /// The mesh's overlay network: candidates inside it would send the tunnel through itself.
    pub overlay: Option<IpNet>,
}

/// Every peer's ICE state.
pub struct Agents {
    net: LocalNet,
    peers: HashMap<String, PeerIce>,
    /// Our ufrag towards each peer, for requests (USERNAME = "ours:theirs").
    by_ufrag: HashMap<String, String>,
    srflx: Srflx,
    /// Our TURN allocation: (relayed address, the TURN socket's local address).
    turn: Option<(SocketAddr, SocketAddr)>,
    /// Datagrams to send: (the local candidate's address they leave from, if the agent said,
    /// destination, bytes).
    transmits: Vec<(Option<SocketAddr>, SocketAddr, Vec<u8>)>,
    events: std::collections::VecDeque<Event>,
    counters: Arc<IceCounters>,
}

impl Agents {
    pub fn new(net: LocalNet, counters: Arc<IceCounters>) -> Self {
        Self {
            net,
            peers: HashMap::new(),
            by_ufrag: HashMap::new(),
            srflx: Srflx::default(),
            turn: None,
            transmits: Vec::new(),
            events: Default::default(),
            counters,
        }
    }

    pub fn counters(&self) -> &Arc<IceCounters> {
        &self.counters
    }

    /// STUN servers (from management's `stuns`, resolved).
    pub fn set_stun_servers(&mut self, servers: &[SocketAddr]) {
        self.srflx.set_servers(servers);
    }

    /// Our TURN allocation (relayed address, local address of its socket), or none: agents
    /// that gather relay candidates add it now if it is new.
    pub fn set_turn(&mut self, now: Instant, turn: Option<(SocketAddr, SocketAddr)>) {
        if self.turn == turn {
            return;
        }
        self.turn = turn;
        let Some((relayed, local)) = turn else { return };
        let keys: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.running
                    .as_ref()
                    .is_some_and(|r| r.wants_turn && r.selected.is_none())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some(r) = self.peers.get_mut(&key).and_then(|p| p.running.as_mut()) else {
                continue;
            };
            if let Some(line) = add_relay(&mut r.agent, relayed, local) {
                r.lines.push(line.clone());
                self.events.push_back(Event::Candidate {
                    peer: key.clone(),
                    line,
                });
            }
            self.drain(now, &key);
        }
    }

    /// Our relayed address, if a TURN allocation is up.
    pub fn turn_relayed(&self) -> Option<SocketAddr> {
        self.turn.map(|(r, _)| r)
    }

    fn peer(&mut self, key: &str) -> &mut PeerIce {
        if !self.peers.contains_key(key) {
            let p = PeerIce::new();
            self.by_ufrag.insert(p.creds.ufrag.clone(), key.to_string());
            self.peers.insert(key.to_string(), p);
        }
        self.peers.get_mut(key).expect("inserted above")
    }

    /// Our OFFER/ANSWER payload and session ID for `key`.
    pub fn local_offer(&mut self, key: &str) -> (String, SessionId) {
        let p = self.peer(key);
        (p.creds.payload(), p.session)
    }

    /// The pair in use for `key`, if any.
    pub fn selected(&self, key: &str) -> Option<Selected> {
        self.peers.get(key)?.running.as_ref()?.selected
    }

    /// Round trip of the selected pair's latest check.
    pub fn rtt(&self, key: &str) -> Option<Duration> {
        self.peers
            .get(key)?
            .running
            .as_ref()?
            .agent
            .nominated_pair_rtt()
    }

    /// Whether an agent runs for `key`.
    pub fn is_running(&self, key: &str) -> bool {
        self.peers.get(key).is_some_and(|p| p.running.is_some())
    }

    /// A remote OFFER or ANSWER: start an agent unless one runs for the same session.
    /// `use_turn`: gather a TURN relay candidate (Go does when either side lacks a NetBird
    /// relay).
    pub fn on_offer(
        &mut self,
        now: Instant,
        key: &str,
        payload: &str,
        session: Option<&[u8]>,
        controlling: bool,
        use_turn: bool,
    ) -> Offered {
        let remote = match Credentials::parse_payload(payload) {
            Ok(Some(c)) => c,
            Ok(None) => {
                // The remote closed ICE (relay-only): so do we.
                self.close(key, "the peer is relay-only");
                return Offered::RelayOnly;
            }
            Err(e) => {
                debug!(peer = %key, "offer dropped: {e}");
                count(&self.counters.credentials_malformed);
                return Offered::Malformed;
            }
        };
        let session = session.and_then(SessionId::from_bytes);
        let p = self.peer(key);
        if p.running.is_some() && (session.is_none() || session == p.remote_session) {
            return Offered::Unchanged;
        }
        if p.running.is_some() {
            debug!(peer = %key, "new remote ICE session; restarting the agent");
            self.close(key, "the peer restarted ICE");
        }
        self.start(now, key, remote, session, controlling, use_turn);
        Offered::Started
    }

    fn start(
        &mut self,
        now: Instant,
        key: &str,
        remote: Credentials,
        session: Option<SessionId>,
        controlling: bool,
        use_turn: bool,
    ) {
        self.srflx.refresh(now);
        let mappings: Vec<Mapping> = self.srflx.mappings(now).collect();
        let net = self.net.clone();
        let counters = self.counters.clone();
        let turn = self.turn.filter(|_| use_turn);
        let p = self.peer(key);
        p.remote_session = session;
        let mut agent = IceAgent::new(p.creds.to_ice());
        agent.set_controlling(controlling);
        agent.set_remote_credentials(remote.to_ice());
        // Checks on the selected pair every 2 s at most, so the remote's 6 s silence timer
        // never fires while the path works (NetBird's keepalive is 4 s).
        agent.set_max_stun_rto(Duration::from_secs(2));
        agent.set_initial_stun_rto(Duration::from_millis(200));
        let mut running = Running {
            agent,
            started: now,
            selected: None,
            heard: now,
            resend_at: Some(now + RESEND_AFTER),
            lines: Vec::new(),
            wants_turn: use_turn,
        };
        let mut lines = Vec::new();
        for ip in &net.host_ips {
            if let Some(l) = add_host(&mut running.agent, SocketAddr::new(*ip, net.port)) {
                lines.push(l);
            }
        }
        for m in mappings {
            lines.extend(add_srflx(&mut running.agent, m));
        }
        if let Some((relayed, local)) = turn {
            lines.extend(add_relay(&mut running.agent, relayed, local));
        }
        for c in std::mem::take(&mut p.early) {
            add_remote(&mut running.agent, &c, &counters);
        }
        running.agent.handle_timeout(now);
        running.lines = lines.clone();
        p.running = Some(running);
        count(&self.counters.agents_started);
        debug!(peer = %key, controlling, use_turn, candidates = lines.len(), "ICE agent started");
        for line in lines {
            self.events.push_back(Event::Candidate {
                peer: key.to_string(),
                line,
            });
        }
        self.drain(now, key);
    }

    /// A CANDIDATE message.
    pub fn on_candidate(&mut self, now: Instant, key: &str, line: &str) {
        let c = match candidate::parse(line) {
            Ok(c) => c,
            Err(e) => {
                debug!(peer = %key, "candidate dropped: {e}");
                count(&self.counters.candidates_malformed);
                return;
            }
        };
        if self.net.overlay.is_some_and(|o| o.contains(&c.addr.ip())) {
            debug!(peer = %key, addr = %c.addr, "candidate dropped: inside the overlay");
            count(&self.counters.candidates_refused);
            return;
        }
        let counters = self.counters.clone();
        let p = self.peer(key);
        match &mut p.running {
            Some(r) => {
                if r.agent.remote_candidates().count() >= MAX_REMOTE_CANDIDATES {
                    count(&counters.candidates_refused);
                    return;
                }
                add_remote(&mut r.agent, &c, &counters);
                r.agent.handle_timeout(now);
                self.drain(now, key);
            }
            None if p.early.len() < MAX_REMOTE_CANDIDATES => {
                if !p.early.contains(&c) {
                    p.early.push(c);
                }
            }
            None => count(&counters.candidates_refused),
        }
    }

    /// A STUN datagram from `src` that arrived at our address `local` on the WireGuard socket.
    pub fn on_stun(&mut self, now: Instant, src: SocketAddr, local: SocketAddr, data: &[u8]) {
        if self.srflx.handle_response(now, src, local, data) {
            while let Some(m) = self.srflx.poll_mapping() {
                self.on_mapping(now, m);
            }
            return;
        }
        let Ok(message) = StunMessage::parse(data) else {
            count(&self.counters.stun_malformed);
            return;
        };
        // A request names our ufrag; a response is matched by transaction in its agent.
        let key = if message.is_binding_request() {
            message
                .split_username()
                .and_then(|(ours, _)| self.by_ufrag.get(ours).cloned())
        } else {
            self.peers
                .iter()
                .find(|(_, p)| {
                    p.running
                        .as_ref()
                        .is_some_and(|r| r.agent.accepts_message(&message))
                })
                .map(|(k, _)| k.clone())
        };
        let Some(key) = key else {
            count(&self.counters.stun_unmatched);
            return;
        };
        let Some(r) = self.peers.get_mut(&key).and_then(|p| p.running.as_mut()) else {
            count(&self.counters.stun_unmatched);
            return;
        };
        // Requests are only taken on a host candidate's address: make sure the address they
        // came to is one (loopback and late interfaces are not signalled, but they work).
        if message.is_binding_request() && !r.agent.local_candidates().any(|c| c.addr() == local) {
            let _ = add_host(&mut r.agent, local);
        }
        let packet = StunPacket {
            proto: is::Protocol::Udp,
            source: src,
            destination: local,
            message,
        };
        if r.agent.handle_packet(now, packet) {
            r.heard = now;
        } else {
            count(&self.counters.stun_unmatched);
        }
        self.drain(now, &key);
    }

    fn on_mapping(&mut self, now: Instant, m: Mapping) {
        debug!(mapped = %m.mapped, base = %m.base, server = %m.server, "server-reflexive address");
        let keys: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.running.as_ref().is_some_and(|r| r.selected.is_none()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some(r) = self.peers.get_mut(&key).and_then(|p| p.running.as_mut()) else {
                continue;
            };
            if let Some(line) = add_srflx(&mut r.agent, m) {
                r.lines.push(line.clone());
                self.events.push_back(Event::Candidate {
                    peer: key.clone(),
                    line,
                });
            }
            self.drain(now, &key);
        }
    }

    /// Close the peer's agent (a new session ID for the next one); `Lost` if it had a path.
    pub fn close(&mut self, key: &str, reason: &'static str) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        let Some(r) = p.running.take() else { return };
        p.session = SessionId::generate();
        p.remote_session = None;
        p.early.clear();
        debug!(peer = %key, reason, "ICE agent closed");
        if r.selected.is_some() {
            count(&self.counters.paths_lost);
        }
        self.events.push_back(Event::Lost {
            peer: key.to_string(),
            reason,
        });
    }

    /// The peer left the map: forget it.
    pub fn remove(&mut self, key: &str) {
        if let Some(p) = self.peers.remove(key) {
            self.by_ufrag.remove(&p.creds.ufrag);
        }
    }

    /// Advance every agent to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.srflx.handle_timeout(now);
        let mut expired = Vec::new();
        let mut resend = Vec::new();
        for (key, p) in &mut self.peers {
            let Some(r) = &mut p.running else { continue };
            r.agent.handle_timeout(now);
            match r.selected {
                None if now >= r.started + FAIL_AFTER => {
                    expired.push((key.clone(), "no pair within 12 s"))
                }
                Some(_) if now >= r.heard + SILENT_AFTER => {
                    expired.push((key.clone(), "no STUN from the peer for 6 s"))
                }
                _ => {}
            }
            if r.resend_at.is_some_and(|t| now >= t) {
                r.resend_at = None;
                if r.selected.is_none() {
                    resend.push((key.clone(), r.lines.clone()));
                }
            }
        }
        for (key, lines) in resend {
            for line in lines {
                self.events.push_back(Event::Candidate {
                    peer: key.clone(),
                    line,
                });
            }
        }
        for (key, reason) in expired {
            // A peer ICE cannot reach (symmetric NATs) fails every retry: quiet at debug; a
            // path that worked and went away is worth a line (the negotiator logs it).
            debug!(peer = %key, reason, "ICE agent gave up");
            self.close(&key, reason);
        }
        let keys: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.running.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.drain(now, &key);
        }
    }

    /// Collect the agent's datagrams and events.
    fn drain(&mut self, _now: Instant, key: &str) {
        let Some(r) = self.peers.get_mut(key).and_then(|p| p.running.as_mut()) else {
            return;
        };
        while let Some(t) = r.agent.poll_transmit() {
            self.transmits
                .push((Some(t.source), t.destination, t.contents.to_vec()));
        }
        while let Some(e) = r.agent.poll_event() {
            let IceAgentEvent::NominatedSend {
                source,
                destination,
                ..
            } = e
            else {
                continue;
            };
            let remote_kind = r
                .agent
                .remote_candidates()
                .find(|c| c.addr() == destination)
                .map_or(Kind::PeerReflexive, |c| Kind::from_ice(c.kind()));
            // The agent names the socket it sends from (a host candidate, the base of any
            // srflx one). Towards a peer reached through its NAT our datagrams leave through
            // ours too, and the remote sees our server-reflexive address: say so, as NetBird's
            // status does.
            let srflx = r
                .agent
                .local_candidates()
                .find(|c| c.kind() == is::CandidateKind::ServerReflexive && c.local() == source)
                .map(|c| c.addr());
            let relayed = r
                .agent
                .local_candidates()
                .any(|c| c.kind() == is::CandidateKind::Relayed && c.addr() == source);
            let (local_kind, local) = match srflx {
                _ if relayed => (Kind::Relay, source),
                Some(mapped) if remote_kind != Kind::Host => (Kind::ServerReflexive, mapped),
                _ => (Kind::Host, source),
            };
            let pair = Selected {
                local_kind,
                local,
                remote_kind,
                remote: destination,
            };
            if r.selected == Some(pair) {
                continue;
            }
            if r.selected.is_none() {
                count(&self.counters.pairs_selected);
            }
            r.selected = Some(pair);
            self.events.push_back(Event::Selected {
                peer: key.to_string(),
                pair,
            });
        }
    }

    /// The next datagram: (the local candidate address it leaves from — our TURN relayed
    /// address means through the TURN allocation, anything else the WireGuard socket —,
    /// destination, bytes).
    pub fn poll_transmit(&mut self) -> Option<(Option<SocketAddr>, SocketAddr, Vec<u8>)> {
        if let Some((to, d)) = self.srflx.poll_transmit() {
            return Some((None, to, d.to_vec()));
        }
        self.transmits.pop()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut next = self.srflx.poll_timeout();
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for p in self.peers.values_mut() {
            let Some(r) = &mut p.running else { continue };
            if let Some(t) = r.agent.poll_timeout() {
                earliest(t);
            }
            earliest(match r.selected {
                None => r.started + FAIL_AFTER,
                Some(_) => r.heard + SILENT_AFTER,
            });
            if let Some(t) = r.resend_at {
                earliest(t);
            }
        }
        next
    }
}

fn add_host(agent: &mut IceAgent, addr: SocketAddr) -> Option<String> {
    let c = is::Candidate::host(addr, "udp").ok()?;
    let signal = !addr.ip().is_loopback();
    let added = agent.add_local_candidate(c)?;
    signal.then(|| candidate::to_line(added))
}

fn add_srflx(agent: &mut IceAgent, m: Mapping) -> Option<String> {
    if !agent.local_candidates().any(|c| c.addr() == m.base) {
        // The base must be a host candidate for the agent to pair it (unsignalled if loopback).
        let _ = add_host(agent, m.base);
    }
    if m.mapped == m.base {
        return None; // not behind a NAT: the host candidate says it all
    }
    let c = is::Candidate::server_reflexive(m.mapped, m.base, "udp").ok()?;
    agent.add_local_candidate(c).map(candidate::to_line)
}

fn add_relay(agent: &mut IceAgent, relayed: SocketAddr, local: SocketAddr) -> Option<String> {
    let c = is::Candidate::relayed(relayed, local, "udp").ok()?;
    agent.add_local_candidate(c).map(candidate::to_line)
}

fn add_remote(agent: &mut IceAgent, c: &RemoteCandidate, counters: &IceCounters) {
    match c.to_ice() {
        Ok(ice) => agent.add_remote_candidate(ice),
        Err(e) => {
            debug!("candidate refused by the agent: {e}");
            count(&counters.candidates_refused);
        }
    }
}

/// Whether a datagram from the WireGuard socket is STUN for ICE.
pub fn is_stun(d: &[u8]) -> bool {
    wire::classify(d) == wire::Datagram::Stun
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sides' agents over a simulated network that delivers what `deliver` lets through,
    /// their signal messages passed by hand.
    struct Side {
        key: &'static str,
        agents: Agents,
        addr: SocketAddr,
        selected: Option<Selected>,
        lost: Vec<&'static str>,
    }

    fn side(key: &'static str, addr: &str) -> Side {
        let addr: SocketAddr = addr.parse().unwrap();
        Side {
            key,
            agents: Agents::new(
                LocalNet {
                    port: addr.port(),
                    host_ips: vec![addr.ip()],
                    overlay: Some("100.64.0.0/10".parse().unwrap()),
                },
                Arc::default(),
            ),
            addr,
            selected: None,
            lost: Vec::new(),
        }
    }

    /// Run both sides until `until` (simulated time), exchanging datagrams and candidates.
    fn run(
        a: &mut Side,
        b: &mut Side,
        t: &mut Instant,
        until: Instant,
        deliver: &dyn Fn(SocketAddr, SocketAddr) -> bool,
    ) {
        while *t < until {
            for _ in 0..8 {
                let moved = exchange(a, b, *t, deliver) | exchange(b, a, *t, deliver);
                if !moved {
                    break;
                }
            }
            let next = [a.agents.poll_timeout(), b.agents.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(until)
                .clamp(*t + Duration::from_millis(1), until);
            *t = next;
            a.agents.handle_timeout(*t);
            b.agents.handle_timeout(*t);
        }
    }

    /// Deliver what `from` has for `to`; true if anything moved.
    fn exchange(
        from: &mut Side,
        to: &mut Side,
        t: Instant,
        deliver: &dyn Fn(SocketAddr, SocketAddr) -> bool,
    ) -> bool {
        let mut moved = false;
        while let Some((_, dst, data)) = from.agents.poll_transmit() {
            moved = true;
            if dst == to.addr && deliver(from.addr, to.addr) {
                to.agents.on_stun(t, from.addr, to.addr, &data);
            }
        }
        while let Some(e) = from.agents.poll_event() {
            moved = true;
            match e {
                Event::Candidate { line, .. } => to.agents.on_candidate(t, from.key, &line),
                Event::Selected { pair, .. } => from.selected = Some(pair),
                Event::Lost { reason, .. } => {
                    from.selected = None;
                    from.lost.push(reason);
                }
            }
        }
        moved
    }

    fn offer_both(a: &mut Side, b: &mut Side, t: Instant) {
        let (pa, sa) = a.agents.local_offer(b.key);
        let (pb, sb) = b.agents.local_offer(a.key);
        assert_eq!(
            b.agents.on_offer(t, a.key, &pa, Some(&sa.0), false, false),
            Offered::Started
        );
        assert_eq!(
            a.agents.on_offer(t, b.key, &pb, Some(&sb.0), true, false),
            Offered::Started
        );
    }

    /// Offer both ways at `t` and run 2 s of a perfect network.
    fn connect(a: &mut Side, b: &mut Side, t: &mut Instant) {
        offer_both(a, b, *t);
        let start = *t;
        run(a, b, t, start + Duration::from_secs(2), &|_, _| true);
    }

    #[test]
    fn two_agents_select_a_pair_and_keep_it() {
        let mut a = side("A", "198.19.1.2:51820");
        let mut b = side("B", "198.19.2.2:51821");
        let mut t = Instant::now();
        offer_both(&mut a, &mut b, t);
        run(
            &mut a,
            &mut b,
            &mut t.clone(),
            t + Duration::from_secs(3),
            &|_, _| true,
        );
        let pair = a.selected.expect("A selected a pair");
        assert_eq!(pair.remote, b.addr);
        assert_eq!(
            (pair.local_kind, pair.remote_kind),
            (Kind::Host, Kind::Host)
        );
        assert_eq!(b.selected.expect("B selected a pair").remote, a.addr);
        // The same offer again changes nothing; a minute later the path still holds.
        let (pa, sa) = a.agents.local_offer("B");
        assert_eq!(
            b.agents.on_offer(t, "A", &pa, Some(&sa.0), false, false),
            Offered::Unchanged
        );
        let start = t;
        t += Duration::from_secs(3);
        run(
            &mut a,
            &mut b,
            &mut t,
            start + Duration::from_secs(60),
            &|_, _| true,
        );
        assert!(
            a.lost.is_empty() && b.lost.is_empty(),
            "{:?} {:?}",
            a.lost,
            b.lost
        );
        assert!(a.agents.rtt("B").is_some());
        assert_eq!(
            a.agents.counters().pairs_selected.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_remote_that_moves_and_restarts_ice_moves_the_path() {
        let mut a = side("A", "198.19.1.2:51820");
        let mut b = side("B", "198.19.2.2:51820");
        let mut t = Instant::now();
        connect(&mut a, &mut b, &mut t);
        assert_eq!(a.selected.unwrap().remote, b.addr);
        // B roams to a new address and, as a Go peer does on a network change, restarts its
        // agent: a new session, new candidates.
        let mut b2 = side("B", "198.19.3.7:51820");
        let (pb, sb) = b2.agents.local_offer("A");
        assert_eq!(
            a.agents.on_offer(t, "B", &pb, Some(&sb.0), true, false),
            Offered::Started
        );
        let (pa, sa) = a.agents.local_offer("B");
        assert_eq!(
            b2.agents.on_offer(t, "A", &pa, Some(&sa.0), false, false),
            Offered::Started
        );
        let moved = t;
        run(
            &mut a,
            &mut b2,
            &mut t,
            moved + Duration::from_secs(3),
            &|_, _| true,
        );
        assert_eq!(a.selected.expect("a new pair").remote, b2.addr);
        assert_eq!(
            a.lost,
            ["the peer restarted ICE"],
            "the old agent was closed first"
        );
    }

    #[test]
    fn a_cut_path_is_lost_after_6_s_and_an_unreachable_one_after_12_s() {
        let mut a = side("A", "198.19.1.2:51820");
        let mut b = side("B", "198.19.2.2:51820");
        let mut t = Instant::now();
        connect(&mut a, &mut b, &mut t);
        assert!(a.selected.is_some() && b.selected.is_some());
        let cut = t;
        run(
            &mut a,
            &mut b,
            &mut t,
            cut + Duration::from_secs(10),
            &|_, _| false,
        );
        assert_eq!(a.lost, ["no STUN from the peer for 6 s"]);
        assert_eq!(b.lost, ["no STUN from the peer for 6 s"]);
        assert!(!a.agents.is_running("B"));
        // The next offers carry new sessions, so both sides start again: never connecting.
        let (_, old) = (0, a.agents.local_offer("B").1);
        offer_both(&mut a, &mut b, t);
        assert_ne!(a.agents.local_offer("B").1, SessionId([0; 5]));
        let _ = old;
        let again = t;
        run(
            &mut a,
            &mut b,
            &mut t,
            again + Duration::from_secs(13),
            &|_, _| false,
        );
        assert_eq!(a.lost.last(), Some(&"no pair within 12 s"));
        assert_eq!(a.agents.counters().paths_lost.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn early_candidates_wait_for_the_agent_and_bad_input_is_counted() {
        let mut a = side("A", "198.19.1.2:51820");
        let mut b = side("B", "198.19.2.2:51820");
        let t = Instant::now();
        // B's candidate reaches A before B's credentials do.
        a.agents
            .on_candidate(t, "B", "1 1 udp 2130706431 198.19.2.2 51820 typ host");
        a.agents.on_candidate(t, "B", "garbage");
        a.agents
            .on_candidate(t, "B", "1 1 udp 2130706431 100.64.0.9 51820 typ host");
        a.agents.on_stun(t, b.addr, a.addr, &[0u8; 20]);
        let c = a.agents.counters().clone();
        assert_eq!(c.candidates_malformed.load(Ordering::Relaxed), 1);
        assert_eq!(
            c.candidates_refused.load(Ordering::Relaxed),
            1,
            "overlay address"
        );
        assert_eq!(c.stun_malformed.load(Ordering::Relaxed), 1);
        assert_eq!(
            a.agents.on_offer(t, "B", "x", None, true, false),
            Offered::Malformed
        );
        assert_eq!(c.credentials_malformed.load(Ordering::Relaxed), 1);
        assert_eq!(
            a.agents.on_offer(t, "B", ":", None, true, false),
            Offered::RelayOnly
        );
        // B answers (A's agent starts with the early candidate), but B never learns A's
        // candidates: A's checks alone find the path (B learns A as peer-reflexive).
        let (pb, sb) = b.agents.local_offer("A");
        assert_eq!(
            a.agents.on_offer(t, "B", &pb, Some(&sb.0), true, false),
            Offered::Started
        );
        let (pa, sa) = a.agents.local_offer("B");
        assert_eq!(
            b.agents.on_offer(t, "A", &pa, Some(&sa.0), false, false),
            Offered::Started
        );
        while a.agents.poll_event().is_some() {}
        let mut b_events = Vec::new();
        while let Some(e) = b.agents.poll_event() {
            b_events.push(e);
        }
        let mut t2 = t;
        run(
            &mut a,
            &mut b,
            &mut t2,
            t + Duration::from_secs(3),
            &|_, _| true,
        );
        assert!(
            a.selected.is_some(),
            "A found the path from its early candidate"
        );
        assert_eq!(b.selected.map(|p| p.remote_kind), Some(Kind::PeerReflexive));
    }
}
