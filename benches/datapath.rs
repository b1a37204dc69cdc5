//! Micro-benchmarks of the data path's hot spots, run on demand with `cargo bench`:
//! * `wireguard/*`: cryptokey routing plus boringtun encapsulation / decapsulation of one
//!   1400-byte IP packet (the per-packet cost of the tunnel);
//! * `netstack/tcp_16MiB`: two of our netstacks wired back to back moving 16 MiB over TCP
//!   (smoltcp, the shared rings and the task loop, without WireGuard or sockets).

use std::sync::Arc;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netbird_proxy::netstack::{Netstack, NetstackConfig};
use netbird_proxy::packet::PacketPool;
use netbird_proxy::wg::router::AllowedIps;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p
}

/// Two tunnels with a completed handshake.
fn tunnel_pair() -> (Tunn, Tunn) {
    let a_key = StaticSecret::from([1u8; 32]);
    let b_key = StaticSecret::from([2u8; 32]);
    let (a_pub, b_pub) = (PublicKey::from(&a_key), PublicKey::from(&b_key));
    let mut a = Tunn::new(a_key, b_pub, None, None, 1 << 8, None);
    let mut b = Tunn::new(b_key, a_pub, None, None, 2 << 8, None);
    let mut init = [0u8; 256];
    let mut resp = [0u8; 256];
    let mut out = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut init, false) else {
        panic!("no initiation")
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut resp) else {
        panic!("no response")
    };
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, resp, &mut out) else {
        panic!("no keepalive")
    };
    let keepalive = keepalive.to_vec();
    let mut sink = [0u8; 256];
    let _ = b.decapsulate(None, &keepalive, &mut sink);
    (a, b)
}

fn wireguard(c: &mut Criterion) {
    let (mut a, mut b) = tunnel_pair();
    let mut routes = AllowedIps::new();
    for i in 0..32u8 {
        routes.insert(format!("100.64.{i}.0/24").parse().unwrap(), i as usize);
    }
    routes.insert("100.64.0.2/32".parse().unwrap(), 99);
    let packet = ipv4_packet(1400);
    let mut wire = vec![0u8; 1500];
    let mut plain = vec![0u8; 1500];
    let dst = Tunn::dst_address(&packet).unwrap();

    let mut group = c.benchmark_group("wireguard");
    group.throughput(Throughput::Bytes(packet.len() as u64));
    group.bench_function("route_encapsulate_1400B", |bench| {
        bench.iter(|| {
            let peer = routes.lookup(dst);
            assert_eq!(peer, Some(99));
            match a.encapsulate(&packet, &mut wire) {
                TunnResult::WriteToNetwork(w) => w.len(),
                _ => panic!("encapsulate"),
            }
        })
    });
    // A large account's map: 5 000 peers (a /32 each) and a few routes. The lookup runs for
    // every packet, so it must not grow with the map.
    let mut big = AllowedIps::new();
    for i in 0..5000u32 {
        let ip = std::net::Ipv4Addr::new(100, 64, (i / 250) as u8, (i % 250) as u8 + 1);
        big.insert(format!("{ip}/32").parse().unwrap(), i as usize);
    }
    for (n, route) in ["10.0.0.0/8", "192.168.0.0/16", "0.0.0.0/0"]
        .iter()
        .enumerate()
    {
        big.insert(route.parse().unwrap(), 6000 + n);
    }
    let probes: Vec<std::net::IpAddr> = (0..64u32)
        .map(|i| {
            std::net::Ipv4Addr::new(100, 64, (i * 77 % 20) as u8, (i * 31 % 250) as u8 + 1).into()
        })
        .collect();
    group.bench_function("route_lookup_5000_peers_x64", |bench| {
        bench.iter(|| {
            let mut found = 0;
            for ip in &probes {
                found += usize::from(big.lookup(*ip).is_some_and(|p| p < 5000));
            }
            assert_eq!(found, probes.len());
        })
    });
    group.bench_function("encapsulate_decapsulate_1400B", |bench| {
        bench.iter(|| {
            let n = match a.encapsulate(&packet, &mut wire) {
                TunnResult::WriteToNetwork(w) => w.len(),
                _ => panic!("encapsulate"),
            };
            match b.decapsulate(None, &wire[..n], &mut plain) {
                TunnResult::WriteToTunnelV4(p, _) => p.len(),
                _ => panic!("decapsulate"),
            }
        })
    });
    group.finish();
}

fn netstack(c: &mut Criterion) {
    const LEN: usize = 16 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let (a, b) = rt.block_on(async {
        let pool = Arc::new(PacketPool::new(1564, 1024));
        let (a_out, b_in) = mpsc::channel(1024);
        let (b_out, a_in) = mpsc::channel(1024);
        let config = |ip: &str| NetstackConfig::new(vec![ip.parse().unwrap()], 1420);
        let (a, ta) = Netstack::new(
            config("100.64.0.1/16"),
            a_in,
            a_out,
            pool.clone(),
            cancel.clone(),
        );
        let (b, tb) = Netstack::new(config("100.64.0.2/16"), b_in, b_out, pool, cancel.clone());
        tokio::spawn(ta);
        tokio::spawn(tb);
        (a, b)
    });
    let data = vec![0x5au8; 1 << 16];
    let mut group = c.benchmark_group("netstack");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.sample_size(10);
    group.bench_function("tcp_16MiB", |bench| {
        bench.iter(|| {
            rt.block_on(async {
                let mut listener = b.listen(80).await.unwrap();
                let sink = tokio::spawn(async move {
                    let mut s = listener.accept().await.unwrap();
                    let mut buf = vec![0u8; 1 << 16];
                    let mut total = 0;
                    loop {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break total;
                        }
                        total += n;
                    }
                });
                let mut c = a.connect("100.64.0.2:80".parse().unwrap()).await.unwrap();
                for _ in 0..LEN / data.len() {
                    c.write_all(&data).await.unwrap();
                }
                c.shutdown().await.unwrap();
                assert_eq!(sink.await.unwrap(), LEN);
            })
        })
    });
    group.finish();
    cancel.cancel();
}

criterion_group!(benches, wireguard, netstack);
criterion_main!(benches);
