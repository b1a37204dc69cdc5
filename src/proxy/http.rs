//! The HTTP proxy listener (hyper 1): CONNECT tunnels and absolute-form forwarding.
//!
//! Each request on a keep-alive client connection is routed on its own (a fresh upstream per
//! request), hop-by-hop headers are removed in both directions, `Proxy-Authorization` is checked
//! and never forwarded, and every failure is answered with a status and a one-line reason.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::admission::{Limits, Ticket};
use super::dial::{DialError, Dialer, Target};
use super::relay::{self, Activity, Watched};
use super::{Credentials, serve_clients};
use crate::status::ListenerMetrics;

type Body = BoxBody<Bytes, hyper::Error>;

const REALM: &str = "netbird-proxy";

/// Serve the HTTP proxy on `listener` until `cancel` fires.
pub(crate) async fn serve<L: super::Accept>(
    listener: L,
    metrics: Arc<ListenerMetrics>,
    limits: Limits,
    dialer: Dialer,
    auth: Option<Arc<Credentials>>,
    cancel: CancellationToken,
) {
    let counters = metrics.clone();
    let handle_client = client_handler(metrics, &limits, dialer, auth, cancel.clone());
    serve_clients(listener, counters, &limits, cancel, handle_client, refuse).await
}

/// What serves one admitted HTTP proxy client (its requests counted in `metrics`); CONNECT
/// tunnels end with `cancel`.
pub(crate) fn client_handler<S: super::ClientStream>(
    metrics: Arc<ListenerMetrics>,
    limits: &Limits,
    dialer: Dialer,
    auth: Option<Arc<Credentials>>,
    cancel: CancellationToken,
) -> impl Fn(S, SocketAddr, Arc<Ticket>) -> super::socks5::BoxFuture + Send + Sync + 'static {
    let tunnels = cancel;
    let header_timeout = limits.handshake_timeout;
    let idle = limits.idle_timeout;
    move |client: S, from: SocketAddr, ticket: Arc<Ticket>| {
        let dialer = dialer.clone();
        let auth = auth.clone();
        let tunnels = tunnels.clone();
        let metrics = metrics.clone();
        let conn_metrics = metrics.clone();
        // The upstream connection this client's requests reuse (see `Upstreams`).
        let kept_upstream = Arc::new(Upstreams::default());
        // Told of each request head; the first ends the client's handshake time.
        let head_arrived = Arc::new(Notify::new());
        let heads = head_arrived.clone();
        let service = service_fn(move |req| {
            // A request head arrived: the client is past its handshake.
            ticket.established();
            heads.notify_one();
            let dialer = dialer.clone();
            let auth = auth.clone();
            let tunnels = tunnels.clone();
            let metrics = metrics.clone();
            let hold = ticket.clone();
            let upstreams = kept_upstream.clone();
            async move {
                let tunnel = Tunnel {
                    cancel: tunnels,
                    hold,
                    idle,
                    metrics: metrics.clone(),
                };
                let started = tokio::time::Instant::now();
                let asked = match req.uri().authority() {
                    Some(_) => uri_for_log(req.uri()),
                    // Origin-form (a Unix-socket client): where its Host sends it.
                    None => format!(
                        "http://{}{}",
                        req.headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("-"),
                        req.uri()
                    ),
                };
                let tunnelled = req.method() == Method::CONNECT;
                let mut resp = handle(
                    req,
                    from,
                    dialer,
                    auth.as_deref(),
                    tunnel,
                    S::UNIX,
                    &upstreams,
                )
                .await;
                metrics.count(resp.status().as_str());
                let reached = resp.extensions_mut().remove::<Reached>();
                // An open tunnel or upgrade is logged when it ends, with its bytes.
                let opened = (tunnelled && resp.status() == StatusCode::OK)
                    || resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if !opened {
                    super::access::Entry {
                        listener: &metrics,
                        client: from,
                        target: &asked,
                        resolved: reached.as_ref().and_then(|r| r.resolved),
                        path: reached.as_ref().map_or("", |r| r.path),
                        up: 0,
                        down: 0,
                        started,
                        result: resp.status().as_str(),
                    }
                    .log();
                }
                Ok::<_, Infallible>(resp)
            }
        });
        Box::pin(async move {
            // The handshake timeout bounds the wait for the first request head; the idle
            // timeout then covers the connection, a keep-alive client waiting between requests
            // included. (Hyper's own header timeout is off: it would also run while an idle
            // keep-alive client waits for its next request, closing it after the handshake
            // timeout instead of the idle timeout.)
            let activity = Arc::new(Activity::new());
            let client = Watched::new(client, activity.clone());
            let conn = http1::Builder::new()
                .preserve_header_case(true)
                .title_case_headers(true)
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(client), service)
                .with_upgrades();
            let idle_for = async {
                match idle {
                    Some(limit) => activity.idle_for(limit).await,
                    None => std::future::pending().await,
                }
            };
            let first_head = async {
                if tokio::time::timeout(header_timeout, head_arrived.notified())
                    .await
                    .is_ok()
                {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = conn => if let Err(e) = r {
                    // A request hyper could not parse was answered 400 and never reached us.
                    if e.is_parse() || e.is_parse_too_large() {
                        conn_metrics.count("rejected");
                    }
                    debug!(%from, "http connection: {e}");
                },
                _ = idle_for => {
                    conn_metrics.count_idle_close();
                    debug!(%from, "http: closed after {idle:?} idle");
                }
                _ = first_head => {
                    conn_metrics.count("timeout");
                    debug!(%from, "http: no request within {header_timeout:?}");
                }
            }
        })
    }
}

/// A request's target for the access log: without any `user:pass@` an absolute-form URI may
/// carry (credentials never reach a log).
fn uri_for_log(uri: &Uri) -> String {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => {
            let host = authority.as_str().rsplit('@').next().unwrap_or_default();
            let path = uri.path_and_query().map_or("", |p| p.as_str());
            format!("{scheme}://{host}{path}")
        }
        (None, Some(authority)) => authority
            .as_str()
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_string(),
        _ => uri.to_string(),
    }
}

/// Where a forwarded request went, for the access log (a response extension, taken off before
/// the response leaves).
#[derive(Clone, Copy)]
struct Reached {
    resolved: Option<SocketAddr>,
    path: &'static str,
}

/// What a CONNECT tunnel lives under: the listener's cancellation, and the client's place in
/// the connection limits (held while the tunnel runs, after hyper has let go).
struct Tunnel {
    cancel: CancellationToken,
    hold: Arc<Ticket>,
    idle: Option<Duration>,
    metrics: Arc<ListenerMetrics>,
}

/// Say no to a client over the connection limits: 503 with a reason, then close.
pub(crate) async fn refuse<S: super::ClientStream>(mut client: S) {
    use tokio::io::AsyncWriteExt;
    let body = "netbird-proxy: too many connections; try again later\n";
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(resp.as_bytes()).await;
    let _ = client.shutdown().await;
}

async fn handle(
    req: Request<Incoming>,
    from: SocketAddr,
    dialer: Dialer,
    auth: Option<&Credentials>,
    tunnel: Tunnel,
    origin_form_by_host: bool,
    upstreams: &Upstreams,
) -> Response<Body> {
    if let Some(creds) = auth
        && !authorized(req.headers(), creds)
    {
        info!(%from, "http: proxy authentication required");
        let mut resp = error_response(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy authentication required",
        );
        resp.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"netbird-proxy\""),
        );
        return resp;
    }
    if req.method() == Method::CONNECT {
        connect(req, from, dialer, tunnel).await
    } else {
        forward(req, from, dialer, origin_form_by_host, upstreams, tunnel).await
    }
}

/// CONNECT host:port → 200 and a raw tunnel (which `tunnel.cancel` stops on shutdown).
async fn connect(
    req: Request<Incoming>,
    from: SocketAddr,
    dialer: Dialer,
    tunnel: Tunnel,
) -> Response<Body> {
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.port_u16().map(|p| target_of(a.host(), p)))
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "CONNECT needs an authority-form target, HOST:PORT",
        );
    };
    let started = tokio::time::Instant::now();
    let upstream = match dialer.dial(&target).await {
        Ok(s) => s,
        Err(e) => return dial_failure(&e, from, &target),
    };
    let (resolved, path) = dialer.path_of(&upstream);
    debug!(%from, %target, "http: CONNECT established");
    let reached = Reached { resolved, path };
    let sides = async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => Some((TokioIo::new(upgraded), upstream)),
            Err(e) => {
                debug!(%from, "http: upgrade failed: {e}");
                None
            }
        }
    };
    tokio::spawn(run_tunnel(
        sides, from, target, reached, tunnel, started, "200",
    ));
    Response::new(empty())
}

/// `METHOD http://host[:port]/path` → the same request in origin-form to the host. With
/// `origin_form_by_host` (a Unix-socket listener), `METHOD /path` goes to its `Host`.
async fn forward(
    req: Request<Incoming>,
    from: SocketAddr,
    dialer: Dialer,
    origin_form_by_host: bool,
    upstreams: &Upstreams,
    tunnel: Tunnel,
) -> Response<Body> {
    let mut req = req;
    if origin_form_by_host && req.uri().scheme().is_none() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        match format!("http://{host}{path}").parse::<Uri>() {
            Ok(uri) if !host.is_empty() => *req.uri_mut() = uri,
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "an origin-form request needs a Host header naming where it goes",
                );
            }
        }
    }
    let uri = req.uri().clone();
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("scheme `{other}` is not forwarded; use CONNECT for TLS"),
            );
        }
        None => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "this is a proxy: send an absolute-form URI (http://host/path) or CONNECT",
            );
        }
    }
    let Some(authority) = uri.authority().cloned() else {
        return error_response(StatusCode::BAD_REQUEST, "the URI has no host");
    };
    if is_loop(req.headers()) {
        return error_response(
            StatusCode::LOOP_DETECTED,
            "request loop: this request already passed through this proxy",
        );
    }
    let target = target_of(authority.host(), authority.port_u16().unwrap_or(80));

    // An upgrade (a WebSocket through an absolute-form GET) passes through: its `Upgrade`
    // and `Connection: upgrade` go to the origin, and after the origin's 101 the two sides
    // are joined (RFC 9110 §7.8).
    let upgrade = upgrade_asked(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = &upgrade {
        parts.headers.insert(header::UPGRADE, protocol.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Host from the URI, without any `user:pass@` part.
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_string(),
    };
    match HeaderValue::from_str(&host) {
        Ok(host) => parts.headers.insert(header::HOST, host),
        Err(_) => return error_response(StatusCode::BAD_REQUEST, "invalid host"),
    };
    parts.headers.append(header::VIA, via().clone());
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = match Uri::builder().path_and_query(path).build() {
        Ok(u) => u,
        Err(_) => return error_response(StatusCode::BAD_REQUEST, "invalid request path"),
    };
    parts.version = http::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    // The client's previous request to the same origin left a connection: use it again
    // (an upgraded connection is never kept).
    let kept = match upgrade {
        None => upstreams.take(&target).await,
        Some(_) => None,
    };
    let reused = kept.is_some();
    let (mut sender, reached) = match kept {
        Some(k) => k,
        None => match open_upstream(&dialer, &target).await {
            Ok(k) => k,
            Err(resp) => {
                if let Some(DialFailure(e)) = resp.extensions().get::<DialFailure>() {
                    info!(%from, %target, "http: {e}");
                }
                return resp;
            }
        },
    };
    let sent = match sender.try_send_request(upstream_req).await {
        Ok(resp) => Ok(resp),
        // The kept connection was closed by the origin before our request went out: the
        // request is intact, so it goes on a new connection.
        Err(mut e) if reused && e.message().is_some() => {
            let retry = e.take_message().expect("checked");
            debug!(%from, %target, "http: kept upstream connection closed; reconnecting");
            match open_upstream(&dialer, &target).await {
                Ok((fresh, _)) => {
                    sender = fresh;
                    sender.send_request(retry).await
                }
                Err(resp) => return resp,
            }
        }
        Err(e) => Err(e.into_error()),
    };
    match sent {
        Ok(mut resp) => {
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            match (switching, client_upgrade) {
                (true, Some(client_side)) => {
                    let origin_side = hyper::upgrade::on(&mut resp);
                    let sides = async move {
                        match tokio::try_join!(client_side, origin_side) {
                            Ok((client, origin)) => {
                                Some((TokioIo::new(client), TokioIo::new(origin)))
                            }
                            Err(e) => {
                                debug!(%from, "http: upgrade failed: {e}");
                                None
                            }
                        }
                    };
                    let started = tokio::time::Instant::now();
                    tokio::spawn(run_tunnel(
                        sides,
                        from,
                        target.clone(),
                        reached,
                        tunnel,
                        started,
                        "101",
                    ));
                }
                (false, None) => upstreams.keep(target.clone(), sender, reached),
                _ => {}
            }
            let (mut parts, body) = resp.into_parts();
            let protocol = parts.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut parts.headers);
            if switching && let Some(protocol) = protocol {
                parts.headers.insert(header::UPGRADE, protocol);
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            parts.headers.append(header::VIA, via().clone());
            // We speak HTTP/1.1 to our clients whatever the origin speaks (RFC 9110 §2.5): an
            // HTTP/1.0 status line passed on would make clients drop the proxy connection.
            parts.version = http::Version::HTTP_11;
            debug!(%from, %target, status = %parts.status, reused, "http: forwarded");
            parts.extensions.insert(reached);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            info!(%from, %target, "http: upstream failed: {e}");
            let mut resp = error_response(
                StatusCode::BAD_GATEWAY,
                &format!("upstream {target} failed: {e}"),
            );
            resp.extensions_mut().insert(reached);
            resp
        }
    }
}

/// The protocol an upgrade request asks for: its `Upgrade` header, when `Connection` names
/// `upgrade`.
fn upgrade_asked(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// A tunnel (after CONNECT's 200, or an upgrade's 101) once both `sides` are there: relayed
/// like any client connection (it holds its connection slot, ends with the listener, has the
/// idle timeout) and logged once, with its bytes, when it ends.
async fn run_tunnel<A, B>(
    sides: impl std::future::Future<Output = Option<(A, B)>>,
    from: SocketAddr,
    target: Target,
    reached: Reached,
    tunnel: Tunnel,
    started: tokio::time::Instant,
    result: &'static str,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _hold = tunnel.hold;
    let mut relayed = None;
    let relay = async {
        if let Some((mut client, mut upstream)) = sides.await {
            relayed = Some(
                relay::client(
                    &mut client,
                    &mut upstream,
                    tunnel.idle,
                    &tunnel.metrics,
                    from,
                    &target,
                )
                .await,
            );
        }
    };
    tokio::select! {
        _ = tunnel.cancel.cancelled() => {}
        _ = relay => {}
    }
    super::access::Entry {
        listener: &tunnel.metrics,
        client: from,
        target: &target,
        resolved: reached.resolved,
        path: reached.path,
        up: relayed.map_or(0, |r| r.up),
        down: relayed.map_or(0, |r| r.down),
        started,
        result,
    }
    .log();
}

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

/// A dial failure, carried in its error response for the log line.
#[derive(Clone)]
struct DialFailure(String);

/// A new connection to `target`, ready for a request; on failure the response to send.
async fn open_upstream(
    dialer: &Dialer,
    target: &Target,
) -> Result<(Sender, Reached), Response<Body>> {
    let upstream = match dialer.dial(target).await {
        Ok(s) => s,
        Err(e) => {
            let mut resp = error_response(status_for(&e), &e.to_string());
            resp.extensions_mut().insert(DialFailure(e.to_string()));
            return Err(resp);
        }
    };
    let (resolved, path) = dialer.path_of(&upstream);
    let reached = Reached { resolved, path };
    match hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .handshake(TokioIo::new(upstream))
        .await
    {
        Ok((sender, conn)) => {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!("http: upstream connection: {e}");
                }
            });
            Ok((sender, reached))
        }
        Err(e) => {
            let mut resp =
                error_response(StatusCode::BAD_GATEWAY, &format!("upstream {target}: {e}"));
            resp.extensions_mut().insert(reached);
            Err(resp)
        }
    }
}

/// The upstream connection one client's last absolute-form request used, kept for its next
/// request to the same origin (HTTP/1.1 keep-alive both sides: pip, apt and browsers send
/// many requests to one host). One per client connection, dropped with it.
#[derive(Default)]
pub(crate) struct Upstreams(tokio::sync::Mutex<Option<(Target, Sender, Reached)>>);

impl Upstreams {
    /// The kept connection to `target`, once it is ready for another request.
    async fn take(&self, target: &Target) -> Option<(Sender, Reached)> {
        let (kept, mut sender, reached) = self.0.lock().await.take()?;
        if &kept != target || sender.is_closed() {
            return None;
        }
        // Ready once the previous response's body has been read to its end.
        match tokio::time::timeout(Duration::from_secs(1), sender.ready()).await {
            Ok(Ok(())) => Some((sender, reached)),
            _ => None,
        }
    }

    fn keep(&self, target: Target, sender: Sender, reached: Reached) {
        if let Ok(mut slot) = self.0.try_lock() {
            *slot = Some((target, sender, reached));
        }
    }
}

/// Our `Via` entry: a pseudonym unique to this process, so a request that comes back to us
/// (a proxy pointed at itself, or a loop through other proxies) is recognised.
fn via() -> &'static HeaderValue {
    static VIA: OnceLock<HeaderValue> = OnceLock::new();
    VIA.get_or_init(|| {
        let token = format!("1.1 netbird-proxy-{:08x}", rand::random::<u32>());
        HeaderValue::from_str(&token).expect("ASCII token")
    })
}

pub(crate) fn is_loop(headers: &HeaderMap) -> bool {
    let ours = via().as_bytes();
    headers.get_all(header::VIA).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|entry| entry.trim_ascii() == ours)
    })
}

pub(crate) fn target_of(host: &str, port: u16) -> Target {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
        Err(_) => Target::Host(bare.to_string(), port),
    }
}

/// HTTP status for a failed dial.
pub fn status_for(err: &DialError) -> StatusCode {
    match err {
        DialError::NotAllowed(_) => StatusCode::FORBIDDEN,
        // The peer did not answer, or is not connected: the gateway cannot reach it.
        DialError::TimedOut(..) | DialError::HostUnreachable(_) => StatusCode::GATEWAY_TIMEOUT,
        DialError::Overloaded(..) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

fn dial_failure(err: &DialError, from: SocketAddr, target: &Target) -> Response<Body> {
    let status = status_for(err);
    info!(%from, %target, "http: {err} ({})", status.as_u16());
    error_response(status, &err.to_string())
}

/// Remove the headers that describe one hop (RFC 9110 §7.6.1), including every header named
/// in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .chain(headers.get_all("proxy-connection").iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Whether `Proxy-Authorization: Basic ...` carries the configured credentials.
pub(crate) fn authorized(headers: &HeaderMap, creds: &Credentials) -> bool {
    let Some(value) = headers
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    creds.check(&decoded[..colon], &decoded[colon + 1..])
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let body = format!("{REALM}: {reason}\n");
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_targets_carry_no_credentials() {
        let uri: Uri = "http://bob:secret@web.mesh:8080/a?b=1".parse().unwrap();
        assert_eq!(uri_for_log(&uri), "http://web.mesh:8080/a?b=1");
        let connect: Uri = "web.mesh:443".parse().unwrap();
        assert_eq!(uri_for_log(&connect), "web.mesh:443");
        let origin: Uri = "/path".parse().unwrap();
        assert_eq!(uri_for_log(&origin), "/path");
    }
    use std::time::Duration;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "content-length"]);
    }

    #[test]
    fn basic_auth_is_checked() {
        let creds = Credentials::parse("alice:s3:cret").unwrap();
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, &creds));
        let good = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {good}")).unwrap(),
        );
        assert!(authorized(&h, &creds));
        let bad = base64::engine::general_purpose::STANDARD.encode("alice:wrong");
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_str(&format!("basic {bad}")).unwrap(),
        );
        assert!(!authorized(&h, &creds));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Bearer x"),
        );
        assert!(!authorized(&h, &creds));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic !!!"),
        );
        assert!(!authorized(&h, &creds));
    }

    #[test]
    fn own_via_entry_is_a_loop() {
        let mut h = HeaderMap::new();
        assert!(!is_loop(&h));
        h.insert(
            header::VIA,
            HeaderValue::from_static("1.1 squid, 1.0 other"),
        );
        assert!(!is_loop(&h));
        let chained = format!("1.1 squid, {}", via().to_str().unwrap());
        h.insert(header::VIA, HeaderValue::from_str(&chained).unwrap());
        assert!(is_loop(&h));
    }

    #[test]
    fn targets_and_statuses() {
        assert_eq!(
            target_of("[fd00::2]", 80),
            Target::Addr("[fd00::2]:80".parse().unwrap())
        );
        assert_eq!(
            target_of("web.mesh", 8080),
            Target::Host("web.mesh".into(), 8080)
        );
        let addr: SocketAddr = "100.64.0.2:1".parse().unwrap();
        assert_eq!(
            status_for(&DialError::NotAllowed(addr.ip())),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status_for(&DialError::TimedOut(addr, Duration::from_secs(1))),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status_for(&DialError::Refused(addr)),
            StatusCode::BAD_GATEWAY
        );
    }
}
