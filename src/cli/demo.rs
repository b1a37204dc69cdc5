//! `netbird-proxy demo`: a dev mesh, a `web` peer exposing a page and the proxy peer, all in
//! this process, built from the library's front door as any program would.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use netbird_proxy::config::{Expose, ListenAddr};
use netbird_proxy::devmesh::{DevMesh, DevMeshConfig, random_setup_key};
use netbird_proxy::{Error, Peer, PeerBuilder};
use tokio_util::sync::CancellationToken;

use super::process::spawn_signal_handler;

/// Run the demo until SIGTERM or SIGINT.
pub async fn run(socks: SocketAddr, http: SocketAddr, status_addr: SocketAddr) -> ExitCode {
    let setup_key = random_setup_key();
    let mesh = match DevMesh::start(DevMeshConfig::local(&setup_key, "netbird.test")).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("netbird-proxy demo: cannot start the dev mesh: {e}");
            return ExitCode::from(1);
        }
    };
    let page = match serve_page().await {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("netbird-proxy demo: cannot serve the page: {e}");
            return ExitCode::from(1);
        }
    };
    let peer = |name: &str| {
        Peer::builder()
            .management_url(&mesh.management_url)
            .setup_key(&setup_key)
            .hostname(name)
    };
    let web = match peer("web").expose(Expose::tcp(80, page)).spawn().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("netbird-proxy demo: {e}");
            return ExitCode::from(1);
        }
    };
    let proxy = peer("proxy")
        .socks(ListenAddr::Tcp(socks))
        .http(ListenAddr::Tcp(http))
        .connect_timeout(Duration::from_secs(10))
        .on_ready(|ready| {
            eprintln!("{ready}");
            let addr = |kind| {
                ready
                    .listener(kind)
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            };
            println!(
                "curl --socks5-hostname {} http://web.netbird.test/",
                addr("socks5")
            );
            println!("curl -x http://{} http://web.netbird.test/", addr("http"));
        });
    let proxy = match with_status(proxy, status_addr).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("netbird-proxy demo: {e}");
            let _ = web.stop().await;
            mesh.stop().await;
            return ExitCode::from(1);
        }
    };
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    let code = tokio::select! {
        _ = cancel.cancelled() => ExitCode::SUCCESS,
        r = proxy.wait() => match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netbird-proxy demo: {e}");
                ExitCode::from(1)
            }
        },
    };
    let _ = proxy.stop().await;
    let _ = web.stop().await;
    mesh.stop().await;
    code
}

/// The proxy peer with its status endpoint, so `netbird-proxy status` and `wait` work beside
/// the demo as beside any run; a taken port only costs the endpoint.
async fn with_status(proxy: PeerBuilder, status_addr: SocketAddr) -> Result<Peer, Error> {
    match proxy.clone().status_endpoint(status_addr).spawn().await {
        Err(Error::StatusEndpoint { addr, reason }) => {
            eprintln!(
                "netbird-proxy demo: no status endpoint ({addr}: {reason}); \
                 `netbird-proxy status` will not find this demo"
            );
            proxy.spawn().await
        }
        r => r,
    }
}

/// A one-page web server on loopback, for the demo's `web` peer to expose.
async fn serve_page() -> std::io::Result<SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req).await;
                let body = "Hello from the NetBird mesh: this page lives on peer `web`.\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}
