//! The status endpoint (`--status-addr`): `/healthz`, `/readyz`, `/metrics`, `/status`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{StatusHub, prometheus};

/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve the endpoints on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, hub: Arc<StatusHub>, cancel: CancellationToken) {
    serve_with(listener, cancel, move |method, path| answer(method, path, &hub)).await
}

/// Serve `answer` (method, path) over HTTP/1 on `listener` until `cancel` fires: the status
/// endpoint's server, also the dev mesh's health endpoint.
pub(crate) async fn serve_with<F>(listener: TcpListener, cancel: CancellationToken, answer: F)
where
    F: Fn(&Method, &str) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!("status accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let answer = answer.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let response = answer(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(e) = r { debug!(%from, "status connection: {e}") },
            }
        });
    }
}

/// The response to `method path`.
pub fn answer(method: &Method, path: &str, hub: &StatusHub) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".into(),
        );
    }
    match path {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let snap = hub.snapshot();
            let status = if snap.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({ "ready": snap.ready, "reason": snap.reason });
            reply(status, "application/json", format!("{body}\n"))
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus::render(&hub.snapshot()),
        ),
        "/status" => {
            let body = serde_json::to_string_pretty(&hub.snapshot()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    }
}

pub(crate) fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
