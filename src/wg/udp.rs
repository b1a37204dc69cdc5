//! The WireGuard UDP socket with batched I/O: `recvmmsg` and GRO on receive, GSO on send
//! (quinn-udp probes both when the socket is made and falls back to one datagram per call
//! where the kernel lacks them).
//!
//! Why: with one `sendto`/`recvfrom` per 1.3 KB datagram, syscalls were 59 % of the proxy's
//! CPU (benches/README.md) and capped a peer near 2 Gbit/s on two cores. A GSO send hands the
//! kernel up to 64 datagrams for one destination in one call; a GRO receive returns up to 64
//! from one sender in one buffer, and `recvmmsg` fills several buffers per call.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

/// Receive buffers filled per `recvmmsg`.
pub const RECV_BATCH: usize = 16;
/// Largest GSO send, in bytes (a UDP payload's limit, less IP and UDP headers).
const MAX_GSO_BYTES: usize = 65_000;

/// A tokio UDP socket and quinn-udp's view of what it can batch.
#[derive(Debug)]
pub struct BatchSocket {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl BatchSocket {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        keep_path_mtu_discovery(&socket);
        debug!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "wireguard socket batching"
        );
        Ok(Self { socket, state })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Bytes each receive buffer needs to take a whole GRO batch of `datagram`-sized packets.
    pub fn recv_buffer_len(&self, datagram: usize) -> usize {
        (self.state.gro_segments().max(1) * datagram).min(u16::MAX as usize)
    }

    /// Wait for datagrams and receive as many as are queued, up to the buffers given. Each
    /// meta's `len` bytes in its buffer are `stride`-sized datagrams from `addr` back to back.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                self.state.recv((&self.socket).into(), bufs, meta)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Send `contents` to `to`: one datagram, or with `segment` several of that size back to
    /// back (the last may be shorter) in one GSO call. If the kernel refuses GSO, quinn-udp
    /// turns it off for the socket and the datagrams go one by one.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let segment = segment.filter(|&s| s < contents.len());
        match self.send_one(to, contents, segment).await {
            Err(e) if segment.is_some() => {
                debug!("GSO send failed ({e}); sending one datagram at a time");
                for datagram in contents.chunks(segment.unwrap_or(contents.len())) {
                    self.send_one(to, datagram, None).await?;
                }
                Ok(())
            }
            r => r,
        }
    }

    async fn send_one(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            self.socket.writable().await?;
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// How many datagrams of `len` bytes one send may carry.
    pub fn max_segments(&self, len: usize) -> usize {
        self.state
            .max_gso_segments()
            .min(MAX_GSO_BYTES / len.max(1))
            .max(1)
    }
}

/// quinn-udp sets IP(V6)_PMTUDISC_PROBE (don't fragment, ignore the path MTU), which suits
/// QUIC's own MTU probing. WireGuard has none: on a path whose MTU is below our datagrams, the
/// kernel's default (learn the path MTU from ICMP, then fragment locally) keeps the tunnel
/// working where PROBE would drop every full-size datagram. Put the default back.
#[cfg(target_os = "linux")]
fn keep_path_mtu_discovery(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    for (level, name, value) in [
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_WANT,
        ),
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        ),
    ] {
        // SAFETY: `fd` is the open socket `socket` owns for the whole call; `value` is a live
        // c_int and the length passed is its size, as setsockopt requires. An option the
        // socket's family lacks fails with an error code, which is ignored on purpose.
        let _ = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

#[cfg(not(target_os = "linux"))]
fn keep_path_mtu_discovery(_: &UdpSocket) {}

/// Datagrams laid back to back in one buffer, each with its destination, grouped into sends:
/// consecutive datagrams to the same address, all the size of the first but the last, which
/// may be shorter, and no more than the socket may put in one send.
pub fn gso_groups<'a, T: PartialEq>(
    entries: &'a [(usize, usize, T)],
    max_segments: impl Fn(usize) -> usize + 'a,
) -> impl Iterator<Item = std::ops::Range<usize>> + 'a {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= entries.len() {
            return None;
        }
        let (_, size, ref to) = entries[i];
        let limit = max_segments(size);
        let mut j = i + 1;
        while j < entries.len()
            && j - i < limit
            && entries[j].2 == *to
            && entries[j].1 <= size
            && entries[j - 1].1 == size
        {
            j += 1;
        }
        let group = i..j;
        i = j;
        Some(group)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(entries: &[(usize, usize, u8)], max: usize) -> Vec<std::ops::Range<usize>> {
        gso_groups(entries, |_| max).collect()
    }

    #[test]
    fn same_size_datagrams_to_one_address_go_together() {
        let e = [(0, 100, 1), (100, 100, 1), (200, 100, 1), (300, 40, 1)];
        assert_eq!(groups(&e, 64), vec![0..4]);
    }

    #[test]
    fn a_new_address_a_larger_datagram_or_one_after_a_short_one_starts_a_group() {
        let e = [
            (0, 100, 1),
            (100, 100, 2),
            (200, 100, 2),
            (300, 120, 2),
            (420, 50, 2),
            (470, 50, 2),
        ];
        assert_eq!(groups(&e, 64), vec![0..1, 1..3, 3..5, 5..6]);
    }

    #[test]
    fn groups_stop_at_the_segment_limit() {
        let e: Vec<_> = (0..10).map(|i| (i * 10, 10, 7u8)).collect();
        assert_eq!(groups(&e, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(groups(&e, 1).len(), 10);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn path_mtu_discovery_stays_the_kernels_default() {
        use std::os::fd::AsRawFd;
        let s = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the fd is open for the call; `value` and `len` are live and sized as
        // getsockopt requires.
        let r = unsafe {
            libc::getsockopt(
                s.socket().as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(value, libc::IP_PMTUDISC_WANT);
    }

    #[tokio::test]
    async fn a_gso_send_arrives_as_separate_datagrams_and_recv_takes_them_in_batches() {
        let a = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let b = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let to = b.socket().local_addr().unwrap();
        // 10 datagrams of 1200 bytes and a last one of 500, each filled with its number.
        let mut contents = Vec::new();
        for i in 0..11u8 {
            let len = if i == 10 { 500 } else { 1200 };
            contents.extend(std::iter::repeat_n(i, len));
        }
        a.send(to, &contents, Some(1200)).await.unwrap();
        let mut storage = vec![vec![0u8; b.recv_buffer_len(1500)]; RECV_BATCH];
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let mut got: Vec<Vec<u8>> = Vec::new();
        while got.len() < 11 {
            let mut it = storage.iter_mut();
            let mut bufs: [IoSliceMut; RECV_BATCH] =
                std::array::from_fn(|_| IoSliceMut::new(it.next().unwrap()));
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                b.recv(&mut bufs, &mut meta),
            )
            .await
            .expect("datagrams")
            .unwrap();
            for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                assert_eq!(m.addr, a.socket().local_addr().unwrap());
                got.extend(buf[..m.len].chunks(m.stride).map(<[u8]>::to_vec));
            }
        }
        assert_eq!(got.len(), 11);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.len(), if i == 10 { 500 } else { 1200 });
            assert!(d.iter().all(|&x| x == i as u8));
        }
    }
}
