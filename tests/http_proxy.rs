//! The HTTP proxy's completeness (issue 18, item 6) against a wireguard-go peer: a keep-alive
//! client's absolute-form requests to one origin reuse one upstream connection, and a
//! WebSocket sent as an absolute-form GET (as `ws` with `http-proxy-agent` does) reaches a
//! real WebSocket server (Python's `websockets`) and echoes through.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const WS_PORT: u16 = 7100;

/// Item 6: curl sends three requests on one proxy connection; the origin sees them all come
/// from one connection (its `/whoami` answers with the source address), and a fourth request
/// after the origin closed its side still succeeds on a new one.
#[test]
fn absolute_form_requests_reuse_the_upstream_connection() {
    let bed = Testbed::new(BedOptions::default());
    let proxy = Proxy::start(&bed.proxy_config(""), &["--http", "0"]);
    let http = format!("http://{}", proxy.http.unwrap());
    let who = format!("http://{PEER_IP}:{HTTP_PORT}/whoami");
    let (code, body, err) = curl(&["-x", &http, &who, &who, &who]);
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8_lossy(&body);
    let seen: Vec<&str> = text.lines().collect();
    assert_eq!(seen.len(), 3, "{text}");
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "three requests, more than one upstream connection: {seen:?}"
    );
    assert!(seen[0].starts_with(&format!("{PROXY_IP} ")), "{text}");
    // Another host on the same client connection gets its own upstream connection, and the
    // first one's requests still work after it.
    let page = format!("http://{PEER_IP}:{HTTP_PORT}/index.html");
    let (code, body, err) = curl(&["-x", &http, &who, &page, &who]);
    assert_eq!(code, 0, "{err}");
    assert!(String::from_utf8_lossy(&body).contains("hello from the peer"));
}

struct WsServer(Child);

impl Drop for WsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Python's `websockets` echo server on the peer's mesh address.
fn ws_server(bed: &Testbed) -> WsServer {
    let script = format!(
        r#"
import asyncio, websockets
async def echo(ws):
    async for message in ws:
        await ws.send(message)
async def main():
    async with websockets.serve(echo, "{PEER_IP}", {WS_PORT}):
        await asyncio.Future()
asyncio.run(main())
"#
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &bed.ns, "python3", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    bed.wait_listening(WS_PORT, "websockets server");
    WsServer(child)
}

/// A client frame (RFC 6455 §5.2): FIN, `opcode`, masked with `mask`.
fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A server frame: its opcode and payload (unmasked, short forms).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    let len = match head[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            usize::from(u16::from_be_bytes(l))
        }
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (head[0] & 0x0f, payload)
}

/// Item 6 and item 8's last failure: an absolute-form GET with `Upgrade: websocket` gets the
/// server's 101 (with its `Sec-WebSocket-Accept`), and text and binary messages echo through.
#[test]
fn a_websocket_through_an_absolute_form_get_echoes() {
    let bed = Testbed::new(BedOptions::default());
    let _ws = ws_server(&bed);
    let proxy = Proxy::start(&bed.proxy_config(""), &["--http", "0"]);
    let mut s = TcpStream::connect(proxy.http.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The key and accept value of RFC 6455 §1.3's example.
    write!(
        s,
        "GET http://{PEER_IP}:{WS_PORT}/ HTTP/1.1\r\nHost: {PEER_IP}:{WS_PORT}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for (opcode, payload) in [
        (1u8, b"hello through the proxy".to_vec()),
        (2u8, (0..300u32).map(|i| (i * 7) as u8).collect()),
    ] {
        s.write_all(&client_frame(opcode, &payload, [1, 2, 3, 4]))
            .unwrap();
        let (op, got) = read_frame(&mut s);
        assert_eq!((op, got), (opcode, payload));
    }
    // A close frame is answered with one.
    s.write_all(&client_frame(8, &[0x03, 0xe8], [9, 9, 9, 9]))
        .unwrap();
    assert_eq!(read_frame(&mut s).0, 8);
}
