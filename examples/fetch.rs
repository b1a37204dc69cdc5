//! Fetch a URL on the mesh with hyper over `Peer::dial`: the HTTP client of a program that
//! embeds a NetBird peer instead of running a proxy beside it.
//!
//!     NB_SETUP_KEY=... cargo run --example fetch -- http://web.netbird.cloud/
//!
//! `NB_MANAGEMENT_URL` points it at another management service (a self-hosted one, or
//! `netbird-proxy dev-mesh`); the peer is ephemeral (a new identity each run).

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use netbird_proxy::Peer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url: hyper::Uri = std::env::args()
        .nth(1)
        .ok_or("usage: fetch http://HOST[:PORT]/PATH")?
        .parse()?;
    let host = url.host().ok_or("the URL has no host")?.to_string();
    let port = url.port_u16().unwrap_or(80);

    let mut peer = Peer::builder()
        .setup_key(std::env::var("NB_SETUP_KEY").map_err(|_| "set NB_SETUP_KEY")?)
        .hostname("fetch-example")
        // NetBird's switch for staying on the relay (no direct connections).
        .ice(std::env::var("NB_FORCE_RELAY").map_or(true, |v| v != "true"))
        .ready_timeout(Duration::from_secs(30));
    if let Ok(url) = std::env::var("NB_MANAGEMENT_URL") {
        peer = peer.management_url(url);
    }
    let peer = peer.start().await?;

    // One connection, through the mesh; hyper speaks HTTP/1.1 over it.
    let stream = peer.dial(&host, port).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, host.as_str())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!("{status}");
    println!("{}", String::from_utf8_lossy(&body));

    peer.stop().await?;
    Ok(())
}
