//! A whole mesh in one process, for testing mesh-aware code: `TestMesh` starts management,
//! signal and a relay on loopback and two peers; one serves, the other connects by name.
//!
//!     cargo run --example test_mesh
//!
//! In a test of your own, the same lines go in a `#[tokio::test]`.

use netbird_proxy::devmesh::TestMesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mesh = TestMesh::start(&["server", "client"]).await?;

    let mut listener = mesh.peer("server").listen(7000).await?;
    tokio::spawn(async move {
        while let Ok(mut conn) = listener.accept().await {
            let mut name = String::new();
            let _ = conn.read_to_string(&mut name).await;
            let _ = conn.write_all(format!("hello, {name}").as_bytes()).await;
        }
    });

    let mut conn = mesh
        .peer("client")
        .dial("server.netbird.test", 7000)
        .await?;
    conn.write_all(b"client").await?;
    conn.shutdown().await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    println!("{answer}");
    let server = mesh.peer("client").status().peers;
    println!(
        "client sees {} peer(s): {}",
        server.len(),
        server
            .iter()
            .map(|p| format!("{} {} {}", p.fqdn, p.status, p.connection))
            .collect::<Vec<_>>()
            .join(", ")
    );
    mesh.stop().await;
    Ok(())
}
