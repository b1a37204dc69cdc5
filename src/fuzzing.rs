//! Entry points of the fuzz targets (`fuzz/`), one per parser that reads input from the
//! network or the user: each takes arbitrary bytes and must never panic. The same functions
//! replay the saved corpora in `tests/fuzz_corpora.rs`, so every input the fuzzers kept (and
//! every crash they found) is checked on each CI run.

use std::sync::OnceLock;

use prost::Message;

use crate::control::management::SyncResponse;
use crate::control::mesh::{MeshState, parse_local};
use crate::control::signal::{Body, EncryptedMessage};
use crate::proxy::Credentials;

/// A small runtime for the targets whose parsers are async (SOCKS5, HTTP).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// A client's bytes through fast-socks5's server protocol as our SOCKS5 listener runs it
/// (with and without authentication), up to the target the dialler would get.
pub fn socks5_request(data: &[u8]) {
    use fast_socks5::server::Socks5ServerProtocol;
    use fast_socks5::util::target_addr::TargetAddr;
    let creds = Credentials::parse("user:secret").expect("valid credentials");
    for with_auth in [false, true] {
        runtime().block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            use tokio::io::AsyncWriteExt;
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let negotiated = async {
                let proto = if with_auth {
                    Socks5ServerProtocol::accept_password_auth(server, |u, p| {
                        creds.check(u.as_bytes(), p.as_bytes())
                    })
                    .await?
                    .0
                } else {
                    Socks5ServerProtocol::accept_no_auth(server).await?
                };
                proto.read_command().await
            };
            if let Ok(Ok((_, _, target))) =
                tokio::time::timeout(std::time::Duration::from_secs(1), negotiated).await
            {
                let _ = match target {
                    TargetAddr::Ip(a) => a.to_string(),
                    TargetAddr::Domain(h, p) => crate::proxy::http::target_of(&h, p).to_string(),
                };
            }
        });
    }
}

/// A client's bytes through hyper's HTTP/1 server and our request checks (authentication,
/// loop detection, hop-by-hop stripping, CONNECT and absolute-form targets), short of dialling.
pub fn http_request(data: &[u8]) {
    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let creds = Credentials::parse("user:secret").expect("valid credentials");
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        use tokio::io::AsyncWriteExt;
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let service = service_fn(|req: http::Request<hyper::body::Incoming>| {
            let mut headers = req.headers().clone();
            let _ = crate::proxy::http::authorized(&headers, &creds);
            let _ = crate::proxy::http::is_loop(&headers);
            crate::proxy::http::strip_hop_by_hop(&mut headers);
            if let Some(a) = req.uri().authority() {
                let port = a.port_u16().unwrap_or(80);
                let _ = crate::proxy::http::target_of(a.host(), port);
            }
            let _ = req.uri().path_and_query().map(|p| p.as_str().len());
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
            }
        });
        // Configured as the proxy's listener is (header case kept, upgrades on).
        let conn = hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(true)
            .serve_connection(TokioIo::new(server), service)
            .with_upgrades();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
    });
}

/// A relay message as the relay client parses it.
pub fn relay_frame(data: &[u8]) {
    let _ = crate::relay::messages::parse(data);
}

/// A relay connection's bytes as both ends read them: the first byte picks the role and the
/// read sizes, the rest is cut into reads of those sizes and decoded as WebSocket frames
/// (each binary message then parsed as a relay frame), and the same bytes are read as the
/// opening handshake's request (the dev relay) and response (the client).
pub fn relay_websocket(data: &[u8]) {
    use crate::relay::ws::{self, Decoder, Event, Role};
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let role = if first & 1 == 0 {
        Role::Client
    } else {
        Role::Server
    };
    let step = usize::from(first >> 1) + 1;
    let mut decoder = Decoder::new(role, &[]);
    'reads: for chunk in rest.chunks(step) {
        decoder.buffer().extend_from_slice(chunk);
        loop {
            match decoder.next_event() {
                Ok(Some(Event::Binary(m))) => {
                    let _ = crate::relay::messages::parse(&m);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break 'reads,
            }
        }
    }
    if let Ok(Some(end)) = ws::head_end(rest) {
        let _ = ws::parse_request(&rest[..end]);
        let _ = ws::check_response(&rest[..end], "dGhlIHNhbXBsZSBub25jZQ==");
    }
}

/// A management Sync message: applied as sent to a mesh state twice (a first map and an
/// update on top of it: the second finds its parts by fingerprint), then decoded and applied
/// again, with our own peer config parsed as login would.
pub fn management_sync(data: &[u8]) {
    let own = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let mut mesh = MeshState::default();
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = mesh.apply_encoded(&bytes, own);
    let _ = mesh.apply_encoded(&bytes, own);
    // The firewall rules read in place agree with prost on every rule both accept, and the
    // view refuses nothing prost takes but groups (proto2's, never sent by management).
    if let Ok(parts) = crate::control::sections::split(data) {
        use crate::firewall::wire::{RuleFields, RuleView};
        for raw in &parts.firewall {
            let (decoded, view) = (
                crate::control::management::FirewallRule::decode(*raw),
                RuleView::parse(raw),
            );
            match (decoded, view) {
                (Ok(r), Ok(v)) => {
                    assert_eq!(v.peer_ip(), r.peer_ip);
                    assert_eq!(v.port(), r.port);
                    assert_eq!((v.direction(), v.action()), (r.direction, r.action));
                    assert_eq!(v.protocol(), r.protocol);
                    assert_eq!(v.port_info(), r.port_info.as_ref());
                    assert_eq!(
                        v.first_source_prefix(),
                        r.source_prefixes.first().map(Vec::as_slice)
                    );
                }
                (Ok(_), Err(e)) => assert!(e.contains("wire type"), "{e}"),
                _ => {}
            }
        }
    }
    let Ok(resp) = SyncResponse::decode(data) else {
        return;
    };
    if let Some(pc) = &resp.peer_config {
        let _ = parse_local(pc);
    }
    let _ = mesh.apply(&resp, own);
    if let Some(map) = &resp.network_map {
        let (routes, _) = crate::route::model::decode(&map.routes);
        for r in &routes {
            let _ = (r.ha_key(), r.is_exit_node());
        }
        // The whole client route state: groups, selection, election.
        let mut client = crate::route::ClientRoutes::new(
            own.to_string(),
            crate::route::Selection::from_flags(&["a".into()], &["b".into()]),
        );
        client.set_routes(routes);
        let _ = client.update(|_| crate::route::PeerState::Connected {
            relayed: true,
            latency: None,
        });
        // The rules, evaluated on a few flows.
        let (peer, _) =
            crate::firewall::PeerAcl::from_wire(&map.firewall_rules, map.firewall_rules_is_empty);
        let (route, _) = crate::firewall::RouteAcl::from_wire(&map.routes_firewall_rules, true);
        for (src, dst, proto, port) in [
            ("100.64.0.2", "100.64.0.1", crate::firewall::Proto::Tcp, 80),
            ("100.64.0.3", "10.0.0.1", crate::firewall::Proto::Udp, 53),
            ("::1", "2001:db8::1", crate::firewall::Proto::Icmp, 0),
        ] {
            let flow = crate::firewall::Flow {
                src: src.parse().expect("literal"),
                dst: dst.parse().expect("literal"),
                proto,
                dst_port: port,
            };
            let _ = (peer.allows(&flow), route.allows(&flow));
        }
        // DNS: the chain for a few names.
        let (dns, _) =
            crate::dns::DnsConfig::from_wire(&map.dns_config.clone().unwrap_or_default());
        let state = crate::dns::DnsState::default();
        state.set_config(dns);
        let plan = state.snapshot();
        for name in ["a.netbird.cloud", "x", "*.corp.example", "b.a.example.com."] {
            let _ = (plan.step(name, false), plan.zones.lookup(name));
        }
    }
}

/// A packet from WireGuard as the netstack's gates read it, and the RST that refuses it.
pub fn network_packet(data: &[u8]) {
    if let Some(h) = crate::netstack::raw::inspect(data) {
        let _ = (h.flow(), h.src_addr(), h.dst_addr());
    }
    let mut out = Vec::new();
    let _ = crate::netstack::raw::rst_for_syn(data, &mut out);
}

/// A query to the routing peer's DNS forwarder, parsed, matched and answered.
pub fn dns_forwarder_query(data: &[u8]) {
    let patterns = vec!["*.corp.example".to_string(), "db.example".to_string()];
    if let Ok(q) = crate::forward::dns::Query::parse(data, &patterns) {
        let _ = q.reply(&Ok(vec!["198.19.1.10".parse().expect("literal")]));
        let _ = q.reply(&Err(hickory_proto::op::ResponseCode::ServFail));
    }
}

/// A client's first bytes on a one-port listener (`--proxy`): told apart by the first byte
/// (peeked, as `mixed` does), then through the protocol it announces.
pub fn proxy_first_bytes(data: &[u8]) {
    use crate::proxy::mixed::{Protocol, sniff};
    match data.first().and_then(|b| sniff(*b)) {
        Some(Protocol::Socks5) => socks5_request(data),
        Some(Protocol::Http) => http_request(data),
        Some(Protocol::Socks4) | None => {}
    }
}

/// A client's datagram to a SOCKS5 UDP association: its header read in place; for an address
/// destination, a reply header written before the payload must read back the same.
pub fn socks5_udp_header(data: &[u8]) {
    use crate::proxy::udp::wire;
    let Ok(r) = wire::parse(data) else { return };
    assert!(r.payload.len() <= data.len());
    if let wire::Dest::Addr(a) = r.dest {
        let mut buf = vec![0u8; wire::MAX_REPLY_HEADER + r.payload.len()];
        buf[wire::MAX_REPLY_HEADER..].copy_from_slice(r.payload);
        let start = wire::write_reply_header(&mut buf[..wire::MAX_REPLY_HEADER], a);
        let back = wire::parse(&buf[start..]).expect("a header we wrote reads back");
        assert_eq!((back.frag, back.dest, back.payload), (0, r.dest, r.payload));
    }
}

/// A signal message: the envelope decoded and opened, the body decoded, and the fields the
/// negotiator reads (relay URL, relay server IP) interpreted.
pub fn signal_message(data: &[u8]) {
    if let Ok(env) = EncryptedMessage::decode(data) {
        let ours = [1u8; 32];
        let theirs = crate::control::envelope::public_key_of(&[2u8; 32]);
        let _ = crate::control::envelope::parse_key_string(&env.key);
        let _ = crate::control::envelope::open(&env.body, &ours, &theirs);
    }
    if let Ok(body) = Body::decode(data) {
        if let Some(url) = body.relay_server_address.as_deref() {
            let _ = crate::relay::client::websocket_url(url);
        }
        if let Some(ip) = body.relay_server_ip.as_deref() {
            let _ = crate::engine::negotiation::ip_from_bytes(ip);
        }
    }
}

/// A wg-quick configuration file.
pub fn wg_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::wg::WgConfig::parse(text);
    }
}

/// A DNS answer from the tunnel (the first two bytes double as the query ID we expect).
pub fn dns_answer(data: &[u8]) {
    let id = data
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let _ = crate::dns::parse_answer(data, id);
}

/// A CANDIDATE message's payload and an OFFER/ANSWER's credentials, as the negotiator reads
/// them from signal: parsed, and a parsed candidate handed to the ICE agent's own parser.
pub fn ice_candidate(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = crate::ice::candidate::parse(&text) {
        let _ = c.to_ice();
    }
    let _ = crate::ice::creds::Credentials::parse_payload(&text);
    let _ = crate::ice::srflx::server_target(&text);
    let _ = crate::ice::creds::SessionId::from_bytes(data);
}

/// A datagram on the WireGuard socket: classified as WireGuard does it, and a STUN one read
/// as the srflx client, the dev mesh's STUN server and a running ICE agent read it.
pub fn ice_demux(data: &[u8]) {
    use crate::ice::wire::{self, Datagram};
    use std::net::SocketAddr;
    if wire::classify(data) != Datagram::Stun {
        return;
    }
    let _ = wire::parse_binding_success(data);
    let from: SocketAddr = "198.19.2.2:51820".parse().expect("an address");
    let _ = wire::binding_success(data, from, &mut [0u8; 44]);
    thread_local! {
        static AGENTS: std::cell::RefCell<crate::ice::Agents> = std::cell::RefCell::new({
            let mut a = crate::ice::Agents::new(
                crate::ice::LocalNet {
                    port: 51820,
                    host_ips: vec!["198.19.1.2".parse().expect("an address")],
                    overlay: None,
                },
                Default::default(),
            );
            let now = std::time::Instant::now();
            a.set_stun_servers(&["198.19.0.1:3478".parse().expect("an address")]);
            a.on_offer(now, "peer", "abcdEFGHijklMNOP:abcdefghijklmnopqrstuvwxyzABCDEF", Some(&[1, 2, 3, 4, 5]), true, false);
            a.on_candidate(now, "peer", "1 1 udp 2130706431 198.19.2.2 51820 typ host");
            a
        });
    }
    AGENTS.with(|a| {
        let mut a = a.borrow_mut();
        let now = std::time::Instant::now();
        a.on_stun(
            now,
            from,
            "198.19.1.2:51820".parse().expect("an address"),
            data,
        );
        while a.poll_transmit().is_some() {}
        while a.poll_event().is_some() {}
    });
}

/// A datagram from a TURN server, read by the TURN client (turn-client-proto) as our
/// allocation's task reads it: before and after an allocation request went out.
pub fn turn_message(data: &[u8]) {
    use turn_client_proto::api::{TurnClientApi, TurnConfig};
    use turn_client_proto::stun::agent::Transmit;
    use turn_client_proto::types::{TransportType, TurnCredentials};
    use turn_client_proto::udp::TurnClientUdp;
    let server: std::net::SocketAddr = "198.19.0.1:3478".parse().expect("an address");
    let local: std::net::SocketAddr = "198.19.11.2:40000".parse().expect("an address");
    let mut client = TurnClientUdp::allocate(
        local,
        server,
        TurnConfig::new(TurnCredentials::new("nb", "secret")),
    );
    // What the allocation's task hands the client (it drops what the guard refuses).
    if !crate::ice::turn::safe_for_client(data) {
        return;
    }
    let now = turn_client_proto::stun::Instant::from_nanos(1);
    let _ = client.recv(Transmit::new(data, TransportType::Udp, server, local), now);
    let _ = client.poll(now);
    while client.poll_transmit(now).is_some() {}
    let _ = client.recv(Transmit::new(data, TransportType::Udp, server, local), now);
    while client.poll_recv(now).is_some() {}
    while client.poll_event().is_some() {}
}

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("socks5_request", socks5_request),
    ("http_request", http_request),
    ("relay_frame", relay_frame),
    ("relay_websocket", relay_websocket),
    ("management_sync", management_sync),
    ("signal_message", signal_message),
    ("wg_config", wg_config),
    ("dns_answer", dns_answer),
    ("ice_candidate", ice_candidate),
    ("ice_demux", ice_demux),
    ("turn_message", turn_message),
    ("network_packet", network_packet),
    ("dns_forwarder_query", dns_forwarder_query),
    ("socks5_udp_header", socks5_udp_header),
    ("proxy_first_bytes", proxy_first_bytes),
];
