//! Moving bytes and state between smoltcp's sockets and their users, after each poll.

use super::*;

impl Stack {
    /// Move bytes and state between smoltcp sockets and their users; retire finished sockets.
    pub(super) fn pump(&mut self, now: Instant) {
        // Listeners first: a connection accepted now may already hold data (it came with the
        // handshake's last ACK, in the same poll), and nothing else may wake the task to move
        // it if it waited for the next pump.
        self.pump_listeners();
        if self
            .intake
            .as_ref()
            .is_some_and(|i| i.to_forwarder.is_closed())
        {
            // The forwarder is gone: routing stops; its open connections end with their users.
            self.drop_intake();
        }
        self.pump_accepting(now);
        let mut i = 0;
        while i < self.conns.len() {
            let handle = self.conns[i].handle;
            let keep = pump_conn(
                &mut self.conns[i],
                self.sockets.get_mut::<tcp::Socket>(handle),
                now,
                self.config.linger,
                self.polls,
            );
            if keep {
                i += 1;
            } else {
                let conn = self.conns.swap_remove(i);
                self.remove_tcp_socket(conn.handle);
                if conn.routed {
                    if let Some(intake) = self.intake.as_mut() {
                        intake.flows.remove(&(conn.remote, conn.local));
                    }
                } else {
                    self.ports_in_use.remove(&conn.local.port());
                }
            }
        }
        self.pump_udp();
    }

    /// Remove the listeners whose `TcpListener` was dropped, with their listening sockets.
    pub(super) fn reap_closed_listeners(&mut self) {
        let (closed, open) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| l.accepted.is_closed());
        self.listeners = open;
        for l in closed {
            for h in l.sockets {
                self.remove_tcp_socket(h);
            }
        }
    }

    /// Give every listened port a free listening socket for each SYN waiting in the device
    /// (up to `MAX_BACKLOG` sockets), so a burst of connections is not answered with resets.
    /// A SYN still queued from an earlier pass is counted again, but so is the socket made for
    /// it then (still listening until the SYN is delivered): only the shortfall is made. A
    /// retransmitted SYN of a half-open connection may add one spare, dropped after accept.
    pub(super) fn listen_for_syns(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        for packet in &self.device.rx {
            let Some(port) = syn_destination_port(packet) else {
                continue;
            };
            if let Some(l) = self.listeners.iter_mut().find(|l| l.port == port) {
                l.pending_syns += 1;
            }
        }
        for li in 0..self.listeners.len() {
            let wanted = std::mem::take(&mut self.listeners[li].pending_syns);
            if wanted == 0 {
                continue;
            }
            let port = self.listeners[li].port;
            let free = self.listeners[li]
                .sockets
                .iter()
                .filter(|h| self.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Listen)
                .count();
            for _ in free..wanted {
                if self.listeners[li].sockets.len() >= MAX_BACKLOG {
                    break;
                }
                match self.new_listen_socket(port) {
                    Some(h) => self.listeners[li].sockets.push(h),
                    None => break,
                }
            }
        }
    }

    pub(super) fn pump_listeners(&mut self) {
        self.reap_closed_listeners();
        for li in 0..self.listeners.len() {
            let port = self.listeners[li].port;
            // Top up to the backlog: sockets that could not be replaced under the buffer cap.
            while self.listeners[li].sockets.len() < self.config.backlog {
                match self.new_listen_socket(port) {
                    Some(h) => self.listeners[li].sockets.push(h),
                    None => break,
                }
            }
            let mut si = 0;
            while si < self.listeners[li].sockets.len() {
                let h = self.listeners[li].sockets[si];
                let sock = self.sockets.get_mut::<tcp::Socket>(h);
                match sock.state() {
                    tcp::State::Listen | tcp::State::SynReceived => {
                        si += 1;
                        continue;
                    }
                    tcp::State::Closed => {
                        // A handshake that failed: listen again on the same socket.
                        let _ = sock.listen(port);
                        si += 1;
                        continue;
                    }
                    _ => {}
                }
                let (Some(local), Some(remote)) = (sock.local_endpoint(), sock.remote_endpoint())
                else {
                    si += 1;
                    continue;
                };
                let shared = Shared::new(self.config.ring, self.wake.clone());
                let local = from_endpoint(local);
                let remote = from_endpoint(remote);
                let stream = TcpStream::new(shared.clone(), local, remote);
                // Replaced while the port has no more than its backlog; past it (a burst's
                // extra sockets) or under the buffer cap, the slot goes (the top-up refills).
                let replacement = if self.listeners[li].sockets.len() <= self.config.backlog {
                    self.new_listen_socket(port)
                } else {
                    None
                };
                match replacement {
                    Some(replacement) => {
                        self.listeners[li].sockets[si] = replacement;
                        si += 1;
                    }
                    None => {
                        self.listeners[li].sockets.swap_remove(si);
                    }
                }
                let conn = Conn::new(h, shared, local, remote);
                if self.listeners[li].accepted.try_send(stream).is_err() {
                    // Accept queue full: the stream was dropped, so the connection closes.
                    debug!(port, %remote, "accept queue full");
                }
                self.conns.push(conn);
            }
        }
    }

    pub(super) fn pump_udp(&mut self) {
        let mut i = 0;
        while i < self.udp.len() {
            let entry = &self.udp[i];
            let sock = self.sockets.get_mut::<udp::Socket>(entry.handle);
            let mut st = entry.shared.lock();
            // A datagram smoltcp has no room for yet stays first in our queue (the poll
            // drains smoltcp's ring, and the next pump goes on): nothing is dropped here.
            while let Some((to, data)) = st.tx.pop_front() {
                match sock.send_slice(&data, to_endpoint(to)) {
                    Ok(()) => entry.shared.pool.put(data),
                    Err(udp::SendError::BufferFull) => {
                        st.tx.push_front((to, data));
                        break;
                    }
                    Err(e) => {
                        debug!(%to, "udp send: {e:?}");
                        st.tx_failed += 1;
                        entry.shared.pool.put(data);
                    }
                }
            }
            if st.tx.len() < UDP_QUEUE
                && let Some(w) = st.tx_waker.take()
            {
                w.wake();
            }
            if st.dropped {
                // As a kernel socket's: what was sent before the close still goes out; the
                // socket goes once both queues are empty.
                let flushed = st.tx.is_empty() && sock.send_queue() == 0;
                drop(st);
                if flushed {
                    let e = self.udp.swap_remove(i);
                    self.sockets.remove(e.handle);
                    self.ports_in_use.remove(&e.port);
                } else {
                    i += 1;
                }
                continue;
            }
            // With our queue full, what smoltcp holds stays there until the reader catches
            // up; only a full smoltcp ring drops (as a full kernel socket buffer does).
            let mut got = false;
            while st.rx.len() < UDP_QUEUE {
                let Ok((data, meta)) = sock.recv() else { break };
                let data = entry.shared.copy(data);
                st.rx.push_back((from_endpoint(meta.endpoint), data));
                got = true;
            }
            st.rx_dropped = sock.rx_dropped();
            if got && let Some(w) = st.rx_waker.take() {
                w.wake();
            }
            drop(st);
            i += 1;
        }
    }
}

/// Pump one connection; returns false when its socket is finished and can be removed.
pub(super) fn pump_conn(
    conn: &mut Conn,
    sock: &mut tcp::Socket,
    now: Instant,
    linger: Duration,
    polls: u64,
) -> bool {
    if let Some(at) = conn.aborted_at {
        // Removed once a poll has put the RST on the wire.
        return polls <= at;
    }
    if let Some(reply) = &conn.connecting {
        if reply.is_closed() {
            // The dialler gave up (timeout or its client left).
            return conn.abort(sock, polls);
        }
        match sock.state() {
            tcp::State::SynSent | tcp::State::SynReceived => return true,
            tcp::State::Closed => {
                let reply = conn.connecting.take().expect("checked above");
                let _ = reply.send(Err(ConnectError::Refused));
                return false;
            }
            _ => {
                let reply = conn.connecting.take().expect("checked above");
                let stream = TcpStream::new(conn.shared.clone(), conn.local, conn.remote);
                trace!(remote = %conn.remote, "connected");
                if reply.send(Ok(stream)).is_err() {
                    return conn.abort(sock, polls);
                }
            }
        }
    }

    let mut st = conn.shared.lock();

    // User → socket.
    let mut sent = false;
    while !st.tx.is_empty() && sock.can_send() {
        let (a, _) = st.tx.as_slices();
        match sock.send_slice(a) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                st.tx.drain(..n);
                sent = true;
            }
        }
    }
    if sent {
        st.wake_writer();
    }
    if (st.tx_shutdown || st.dropped) && st.tx.is_empty() {
        sock.close();
    }

    // Socket → user.
    if st.dropped {
        while sock.can_recv() {
            let _ = sock.recv(|d| (d.len(), ()));
        }
    } else {
        let mut received = false;
        while sock.can_recv() && st.rx.len() < st.ring_cap {
            let room = st.ring_cap - st.rx.len();
            let got = sock.recv(|d| {
                let n = d.len().min(room);
                st.rx.extend(&d[..n]);
                (n, n)
            });
            match got {
                Ok(0) | Err(_) => break,
                Ok(_) => received = true,
            }
        }
        st.task_wants_rx_room = sock.can_recv();
        if received {
            st.wake_reader();
        }
    }

    // End of stream and failures.
    let state = sock.state();
    if matches!(
        state,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    ) {
        conn.peer_fin = true;
    }
    if conn.peer_fin && !st.rx_eof && !sock.can_recv() {
        // Every byte before the remote's FIN is in the ring.
        st.rx_eof = true;
        st.wake_reader();
    }
    if state == tcp::State::Closed {
        // Closed after both FINs (LAST-ACK done) is a clean end; anything else (a RST, the
        // timeout) fails the stream, after the bytes and any EOF already received.
        let clean = conn.peer_fin && (st.tx_shutdown || st.dropped) && st.tx.is_empty();
        if !clean {
            st.fail(io::ErrorKind::ConnectionReset);
        }
    }

    // A finished socket may still hold received bytes that did not fit the user's ring: it
    // stays until they have been moved (the user's reads wake the task).
    let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
        && (st.dropped || !sock.can_recv());
    let dropped = st.dropped;
    drop(st);
    if dropped && !finished {
        let deadline = *conn
            .linger_until
            .get_or_insert(now + SmolDuration::from(linger));
        if now >= deadline {
            return conn.abort(sock, polls);
        }
    }
    // The user keeps its rings; the socket itself is done.
    !finished
}

pub(super) fn to_endpoint(addr: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(IpAddress::from(addr.ip()), addr.port())
}

pub(super) fn from_endpoint(ep: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ep.addr), ep.port)
}


/// The destination port of a TCP SYN (without ACK) in an IPv4 or IPv6 packet, read in place.
pub(super) fn syn_destination_port(packet: &[u8]) -> Option<u16> {
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
    let segment = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp).then_some(())?;
            &packet[usize::from(ip.header_len())..]
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp).then_some(())?;
            &packet[ip.header_len()..]
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(segment).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| tcp.dst_port())
}
