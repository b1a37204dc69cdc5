//! The gates: each inbound packet is passed to smoltcp, held for the forwarder, handed over,
//! or dropped, by the peer and route ACLs (see `routed`).

use super::*;

impl Stack {
    /// The gates (see `routed`): pass `packet` to smoltcp, hold it for the forwarder, hand it
    /// over, or drop it.
    pub(super) fn admit(&mut self, packet: Vec<u8>, now: Instant) {
        let Some(h) = raw::inspect(&packet) else {
            // smoltcp drops what it cannot parse, and answers what it must (fragments).
            self.device.rx.push_back(packet);
            return;
        };
        if self.config.addresses.iter().any(|n| n.addr() == h.dst) {
            let new_flow = match h.proto {
                Proto::Tcp => h.syn,
                // Replies to a socket of ours pass; anything else, and anything to an exposed
                // port, starts a flow.
                Proto::Udp => self
                    .udp
                    .iter()
                    .find(|u| u.port == h.dst_port)
                    .is_none_or(|u| u.gated),
                Proto::Icmp => h.echo_request,
                Proto::Other(_) => false,
            };
            if new_flow && !read(&self.rules).peer.allows(&h.flow()) {
                self.counters.denied_inbound.fetch_add(1, Ordering::Relaxed);
                trace!(src = %h.src, dst = %h.dst_addr(), proto = ?h.proto, "inbound flow denied by policy");
                self.spare.push(packet);
                return;
            }
            self.device.rx.push_back(packet);
            return;
        }
        // Routed: only with a forwarder, never towards the mesh's own network.
        let to_mesh = self
            .config
            .addresses
            .iter()
            .any(|n| n.trunc().contains(&h.dst));
        let Some(intake) = self.intake.as_mut().filter(|_| !to_mesh) else {
            self.counters.not_routed.fetch_add(1, Ordering::Relaxed);
            self.spare.push(packet);
            return;
        };
        match h.proto {
            Proto::Tcp => {
                if let Some(p) = intake.tcp(
                    &h,
                    packet,
                    &self.rules,
                    &self.counters,
                    now,
                    &mut self.spare,
                ) {
                    self.device.rx.push_back(p);
                }
            }
            Proto::Udp | Proto::Icmp => self.hand_over(h, packet),
            Proto::Other(_) => {
                self.counters.not_routed.fetch_add(1, Ordering::Relaxed);
                self.spare.push(packet);
            }
        }
    }

    /// A routed UDP datagram or ICMP echo request, to the forwarder if the route ACL allows.
    pub(super) fn hand_over(&mut self, h: Headers, packet: Vec<u8>) {
        let Some(intake) = self.intake.as_ref() else {
            self.spare.push(packet);
            return;
        };
        if h.proto == Proto::Icmp && !h.echo_request {
            self.counters.not_routed.fetch_add(1, Ordering::Relaxed);
            self.spare.push(packet);
            return;
        }
        if !read(&self.rules).route.allows(&h.flow()) {
            self.counters.denied_routed.fetch_add(1, Ordering::Relaxed);
            self.spare.push(packet);
            return;
        }
        let flow = if h.proto == Proto::Udp {
            RoutedFlow::Udp {
                src: h.src_addr(),
                dst: h.dst_addr(),
                packet,
                payload: h.l4 + 8,
            }
        } else {
            RoutedFlow::Echo { packet, icmp: h.l4 }
        };
        match intake.to_forwarder.try_send(flow) {
            Ok(()) => {
                self.counters.routed_udp.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .routed_overflow
                    .fetch_add(1, Ordering::Relaxed);
                match e.into_inner() {
                    RoutedFlow::Udp { packet, .. } | RoutedFlow::Echo { packet, .. } => {
                        self.spare.push(packet)
                    }
                    RoutedFlow::Tcp { .. } => {}
                }
            }
        }
    }

    /// The forwarder dialled a held SYN's destination: listen on it and feed the SYN.
    pub(super) fn accept_routed(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        reply: oneshot::Sender<Result<TcpStream, ConnectError>>,
    ) {
        let Some(intake) = self.intake.as_mut() else {
            let _ = reply.send(Err(ConnectError::Stopped));
            return;
        };
        let listening = intake.accepting.iter().any(|a| {
            a.dst == dst && self.sockets.get::<tcp::Socket>(a.handle).state() == tcp::State::Listen
        });
        if listening {
            intake.deferred.push_back((src, dst, reply));
            return;
        }
        let Some((syn, _)) = intake.held.remove(&(src, dst)) else {
            let _ = reply.send(Err(ConnectError::Refused));
            return;
        };
        let Some(mut sock) = self.new_tcp_socket() else {
            self.spare.push(syn);
            let _ = reply.send(Err(self.buffer_cap_error()));
            return;
        };
        let local = IpListenEndpoint {
            addr: Some(IpAddress::from(dst.ip())),
            port: dst.port(),
        };
        if sock.listen(local).is_err() {
            self.buffers.give_back(sock.recv_capacity());
            self.spare.push(syn);
            let _ = reply.send(Err(ConnectError::Refused));
            return;
        }
        let handle = self.sockets.add(sock);
        let intake = self.intake.as_mut().expect("checked above");
        intake.flows.insert((src, dst));
        intake.accepting.push(Accepting {
            handle,
            src,
            dst,
            reply,
            since: Instant::now(),
            injected_at: self.polls,
        });
        // First in line, so it meets its socket in the next poll.
        self.device.rx.push_front(syn);
    }

    /// The forwarder could not reach a held SYN's destination: answer with a RST.
    pub(super) fn reject_routed(&mut self, src: SocketAddr, dst: SocketAddr) {
        let Some((syn, _)) = self
            .intake
            .as_mut()
            .and_then(|i| i.held.remove(&(src, dst)))
        else {
            return;
        };
        let mut rst = self.pool.get();
        if raw::rst_for_syn(&syn, &mut rst) && self.device.tx_channel().try_send(rst).is_ok() {
            trace!(%src, %dst, "routed connection refused");
        }
        self.spare.push(syn);
    }

    /// Routed connections whose handshake finished become streams for the forwarder.
    pub(super) fn pump_accepting(&mut self, now: Instant) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        intake.expire(now, &mut self.spare);
        let mut i = 0;
        while i < intake.accepting.len() {
            let a = &intake.accepting[i];
            let sock = self.sockets.get_mut::<tcp::Socket>(a.handle);
            let state = sock.state();
            let waiting = matches!(state, tcp::State::Listen | tcp::State::SynReceived);
            // Still listening after a poll since its SYN was queued, and the SYN is no longer
            // queued (smoltcp takes nothing while WireGuard's queue is full): it was not taken.
            let missed = state == tcp::State::Listen
                && self.polls > a.injected_at + 1
                && !self.device.rx.iter().any(|p| {
                    raw::inspect(p)
                        .is_some_and(|h| h.syn && h.src_addr() == a.src && h.dst_addr() == a.dst)
                });
            if waiting && !missed && !a.reply.is_closed() && !intake.hold_expired(a, now) {
                i += 1;
                continue;
            }
            let a = intake.accepting.swap_remove(i);
            let established = !waiting && state != tcp::State::Closed && !a.reply.is_closed();
            let shared = Shared::new(self.config.ring, self.wake.clone());
            let mut conn = Conn::new(a.handle, shared.clone(), a.dst, a.src);
            conn.routed = true;
            if !established {
                // Given up: a RST goes out with the next poll (a half-open client learns at
                // once), then the socket, its flow and its buffers go (`pump`).
                let _ = a.reply.send(Err(ConnectError::Refused));
                conn.abort(self.sockets.get_mut::<tcp::Socket>(a.handle), self.polls);
                self.conns.push(conn);
                continue;
            }
            let stream = TcpStream::new(shared, a.dst, a.src);
            if a.reply.send(Ok(stream)).is_err() {
                conn.abort(self.sockets.get_mut::<tcp::Socket>(a.handle), self.polls);
            }
            self.conns.push(conn);
        }
        // Accepts that waited for their destination's listening socket to be taken.
        let deferred = std::mem::take(&mut intake.deferred);
        for (src, dst, reply) in deferred {
            if reply.is_closed() {
                if let Some((syn, _)) = self
                    .intake
                    .as_mut()
                    .and_then(|i| i.held.remove(&(src, dst)))
                {
                    self.spare.push(syn);
                }
                continue;
            }
            self.accept_routed(src, dst, reply);
        }
    }

    /// Stop routing: held SYNs go back to the pool, half-open routed sockets are reset and
    /// freed (a stale one would otherwise listen on its destination for ever); established
    /// routed connections end with their users.
    pub(super) fn drop_intake(&mut self) {
        let Some(intake) = self.intake.take() else {
            return;
        };
        self.spare.extend(intake.held.into_values().map(|(p, _)| p));
        for a in intake.accepting {
            let _ = a.reply.send(Err(ConnectError::Stopped));
            let mut conn = Conn::new(
                a.handle,
                Shared::new(self.config.ring, self.wake.clone()),
                a.dst,
                a.src,
            );
            conn.routed = true;
            conn.abort(self.sockets.get_mut::<tcp::Socket>(a.handle), self.polls);
            self.conns.push(conn);
        }
        for (_, _, reply) in intake.deferred {
            let _ = reply.send(Err(ConnectError::Stopped));
        }
    }
}
