//! The SOCKS5 listener (RFC 1928, RFC 1929): fast-socks5's protocol layer, our dialler.
//!
//! Domain names are never resolved by the protocol layer: they reach the dialler as names, so mesh
//! names and DNS through the tunnel work (socks5h semantics for every client). Failures map to the
//! specific reply codes clients can act on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::Socks5ServerProtocol;
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::admission::{Limits, Ticket};
use super::dial::{DialError, Dialer, Target};
use super::relay;
use super::udp;
use super::{Accept, ClientStream, Credentials, serve_clients};
use crate::status::ListenerMetrics;

/// SOCKS reply for a failed dial.
pub fn reply_for(err: &DialError) -> ReplyError {
    match err {
        DialError::NotAllowed(_) => ReplyError::ConnectionNotAllowed,
        DialError::NetworkUnreachable(_) => ReplyError::NetworkUnreachable,
        DialError::HostUnreachable(_) | DialError::TimedOut(..) | DialError::Resolve(_) => {
            ReplyError::HostUnreachable
        }
        DialError::Refused(_) => ReplyError::ConnectionRefused,
        DialError::Other(..) | DialError::Overloaded(..) => ReplyError::GeneralFailure,
    }
}

/// Serve SOCKS5 on `listener` until `cancel` fires.
pub(crate) async fn serve<L: Accept>(
    listener: L,
    metrics: Arc<ListenerMetrics>,
    limits: Limits,
    dialer: Dialer,
    auth: Option<Arc<Credentials>>,
    cancel: CancellationToken,
) {
    let refuse_auth = auth.is_some();
    let handler = client_handler(metrics.clone(), &limits, dialer, auth);
    serve_clients(listener, metrics, &limits, cancel, handler, move |client| {
        refuse(client, refuse_auth)
    })
    .await
}

/// What serves one admitted SOCKS5 client (its results counted in `metrics`).
pub(crate) fn client_handler<S: ClientStream>(
    metrics: Arc<ListenerMetrics>,
    limits: &Limits,
    dialer: Dialer,
    auth: Option<Arc<Credentials>>,
) -> impl Fn(S, SocketAddr, Arc<Ticket>) -> BoxFuture + Send + Sync + 'static {
    let timeout = limits.handshake_timeout;
    let idle = limits.idle_timeout;
    let udp_idle = limits.udp_idle_timeout;
    move |client, from, ticket| {
        let metrics = metrics.clone();
        let dialer = dialer.clone();
        let auth = auth.clone();
        Box::pin(async move {
            let client = Client {
                stream: client,
                from,
                ticket,
                timeout,
                idle,
                udp_idle,
            };
            let started = tokio::time::Instant::now();
            let o = handle(client, dialer, auth, &metrics).await;
            if !o.counted {
                metrics.count(&o.result);
            }
            super::access::Entry {
                listener: &metrics,
                client: from,
                target: &o.target,
                resolved: o.resolved,
                path: o.path,
                up: o.up,
                down: o.down,
                started,
                result: &o.result,
            }
            .log();
        })
    }
}

/// A client's whole life, boxed (the one-port listener picks a protocol per client).
pub(crate) type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// An admitted client.
struct Client<S> {
    stream: S,
    from: SocketAddr,
    ticket: Arc<Ticket>,
    /// For greeting, authentication and request together.
    timeout: Duration,
    /// Of the established relay.
    idle: Option<Duration>,
    /// Of a UDP association.
    udp_idle: Duration,
}

/// Say no to a client over the connection limits, in words SOCKS5 has: without
/// authentication, answer its request with 0x01 (general failure); with authentication
/// required, refuse its methods (0xFF) rather than check a password for nothing.
pub(crate) async fn refuse<S: ClientStream>(mut client: S, auth_required: bool) {
    if !auth_required {
        if let Ok(proto) = Socks5ServerProtocol::accept_no_auth(client).await
            && let Ok((proto, _, _)) = proto.read_command().await
        {
            let _ = proto.reply_error(&ReplyError::GeneralFailure).await;
        }
        return;
    }
    // The greeting (VER NMETHODS METHODS...), answered with "no acceptable method".
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 2];
    if client.read_exact(&mut head).await.is_ok() && head[0] == 5 {
        let mut methods = vec![0u8; usize::from(head[1])];
        if client.read_exact(&mut methods).await.is_ok() {
            let _ = client.write_all(&[5, 0xff]).await;
        }
    }
}

/// How a client's session went, for the counters and the access log.
#[derive(Default)]
struct Outcome {
    /// The reply code sent, or `timeout` / `rejected` for a handshake that never reached a
    /// request.
    result: String,
    /// Already counted in the listener's metrics (a success is counted when answered: the
    /// relay may last hours).
    counted: bool,
    /// As the client asked (`-` before a request).
    target: String,
    resolved: Option<SocketAddr>,
    path: &'static str,
    up: u64,
    down: u64,
}

impl Outcome {
    fn failed(result: impl Into<String>, target: impl std::fmt::Display) -> Self {
        Self {
            result: result.into(),
            target: target.to_string(),
            ..Self::default()
        }
    }
}

/// Serve one client until its session ends.
async fn handle<S: ClientStream>(
    client: Client<S>,
    dialer: Dialer,
    auth: Option<Arc<Credentials>>,
    metrics: &ListenerMetrics,
) -> Outcome {
    let Client {
        stream: client,
        from,
        ticket,
        timeout,
        idle,
        udp_idle,
    } = client;
    // Where the client reached us: a UDP association's relay socket is bound there.
    let local = client.local_ip_addr();
    let negotiated = tokio::time::timeout(timeout, async {
        let proto = match &auth {
            None => Socks5ServerProtocol::accept_no_auth(client).await?,
            Some(creds) => {
                Socks5ServerProtocol::accept_password_auth(client, |user, pass| {
                    creds.check(user.as_bytes(), pass.as_bytes())
                })
                .await?
                .0
            }
        };
        proto.read_command().await
    })
    .await;
    let (proto, cmd, target) = match negotiated {
        Err(_) => {
            debug!(%from, "socks: handshake timed out");
            return Outcome::failed("timeout", "-");
        }
        Ok(Err(e)) => {
            // Bad version, no acceptable method, wrong password, bad address type or unknown
            // command: fast-socks5 has already answered where the protocol allows an answer.
            info!(%from, "socks: rejected: {e}");
            return Outcome::failed("rejected", "-");
        }
        Ok(Ok(r)) => r,
    };
    ticket.established();
    if let (Socks5Command::UDPAssociate, Some(local)) = (&cmd, local) {
        return associate(proto, from, local, &target, dialer, metrics, udp_idle).await;
    }
    if !matches!(cmd, Socks5Command::TCPConnect) {
        info!(%from, ?cmd, "socks: command not supported");
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        return Outcome::failed(code(&ReplyError::CommandNotSupported), format!("{cmd:?}"));
    }
    let target = match target {
        TargetAddr::Ip(addr) => Target::Addr(addr),
        TargetAddr::Domain(host, port) => Target::Host(host, port),
    };
    let mut upstream = match dialer.dial(&target).await {
        Ok(s) => s,
        Err(e) => {
            let reply = reply_for(&e);
            info!(%from, %target, "socks: {e} (reply {:#04x})", reply.as_u8());
            let _ = proto.reply_error(&reply).await;
            return Outcome::failed(code(&reply), &target);
        }
    };
    let (resolved, path) = dialer.path_of(&upstream);
    let bound = upstream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut client = match proto.reply_success(bound).await {
        Ok(c) => c,
        Err(e) => {
            debug!(%from, "socks: reply: {e}");
            return Outcome::failed("0x00", &target);
        }
    };
    metrics.count("0x00");
    debug!(%from, %target, "socks: connected");
    let relayed = relay::client(&mut client, &mut upstream, idle, metrics, from, &target).await;
    Outcome {
        result: "0x00".into(),
        counted: true,
        target: target.to_string(),
        resolved,
        path,
        up: relayed.up,
        down: relayed.down,
    }
}

/// UDP ASSOCIATE: a relay socket on the address the client reached us at, announced in the
/// reply, then datagrams until the control connection closes (see `udp::associate`).
async fn associate<S: ClientStream>(
    proto: Socks5ServerProtocol<S, fast_socks5::server::states::CommandRead>,
    from: SocketAddr,
    local: SocketAddr,
    announced: &TargetAddr,
    dialer: Dialer,
    metrics: &ListenerMetrics,
    idle: Duration,
) -> Outcome {
    const ASKED: &str = "UDP ASSOCIATE";
    // An IPv4 client of a dual-stack listener reached us at ::ffff:a.b.c.d: the relay (and
    // the address the reply announces) is the plain IPv4 one.
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let relay = match tokio::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => s,
        Err(e) => {
            info!(%from, "socks: UDP ASSOCIATE: cannot open a relay socket: {e}");
            let _ = proto.reply_error(&ReplyError::GeneralFailure).await;
            return Outcome::failed(code(&ReplyError::GeneralFailure), ASKED);
        }
    };
    let bound = relay.local_addr().unwrap_or(local);
    // The client's announced port counts; its announced address is where it will send from,
    // which for us must be the control connection's address anyway.
    let port = match announced {
        TargetAddr::Ip(a) => a.port(),
        TargetAddr::Domain(_, p) => *p,
    };
    let expected = udp::associate::Expected {
        ip: from.ip(),
        port,
    };
    let control = match proto.reply_success(bound).await {
        Ok(c) => c,
        Err(e) => {
            debug!(%from, "socks: reply: {e}");
            return Outcome::failed("0x00", ASKED);
        }
    };
    metrics.count("0x00");
    debug!(%from, relay = %bound, "socks: UDP association open");
    let targets = udp::targets::Targets::new(dialer, metrics.udp.clone());
    let done =
        udp::associate::run(control, relay, expected, targets, metrics.udp.clone(), idle).await;
    debug!(%from, end = ?done.end, "socks: UDP association ended");
    Outcome {
        result: "0x00".into(),
        counted: true,
        target: ASKED.into(),
        resolved: Some(bound),
        path: "udp",
        up: done.up,
        down: done.down,
    }
}

fn code(reply: &ReplyError) -> String {
    format!("{:#04x}", reply.as_u8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_errors_map_to_rfc1928_codes() {
        let addr: SocketAddr = "100.64.0.2:80".parse().unwrap();
        let code = |e: DialError| reply_for(&e).as_u8();
        assert_eq!(code(DialError::NotAllowed(addr.ip())), 0x02);
        assert_eq!(code(DialError::NetworkUnreachable("x".into())), 0x03);
        assert_eq!(code(DialError::HostUnreachable("x".into())), 0x04);
        assert_eq!(
            code(DialError::TimedOut(addr, Duration::from_secs(1))),
            0x04
        );
        assert_eq!(code(DialError::Refused(addr)), 0x05);
        assert_eq!(code(DialError::Other(addr, "x".into())), 0x01);
    }
}
