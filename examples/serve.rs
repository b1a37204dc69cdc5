//! An HTTP service on our mesh address with hyper over `Peer::listen`: other peers reach it
//! by this peer's name, nothing listens on the host.
//!
//!     NB_SETUP_KEY=... cargo run --example serve -- web 8080
//!
//! serves `http://web.<your domain>:8080/` until Ctrl-C. `NB_MANAGEMENT_URL` points it at
//! another management service.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use netbird_proxy::Peer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "web".into());
    let port: u16 = args.next().as_deref().unwrap_or("8080").parse()?;

    let mut peer = Peer::builder()
        .setup_key(std::env::var("NB_SETUP_KEY").map_err(|_| "set NB_SETUP_KEY")?)
        .hostname(&name)
        // Alone in its mesh is fine for a server: ready once management has sent the map.
        .ready_peers(0);
    if let Ok(url) = std::env::var("NB_MANAGEMENT_URL") {
        peer = peer.management_url(url);
    }
    let peer = peer.start().await?;
    let mut listener = peer.listen(port).await?;
    let fqdn = peer.status().local.map(|l| l.fqdn).unwrap_or(name.clone());
    println!("serving http://{fqdn}:{port}/");

    let greeting = format!("Hello from {name}, a peer inside a Rust program.\n");
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let from = conn.peer_addr()?;
        let greeting = greeting.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = format!("{greeting}You asked for {} from {from}.\n", req.uri());
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });
    }
    peer.stop().await?;
    Ok(())
}
