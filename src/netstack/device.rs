//! The smoltcp `phy::Device` between the netstack task and the WireGuard device.
//!
//! Inbound packets wait in a queue the netstack task fills from its channel; outbound packets go
//! into a bounded channel to WireGuard. A transmit token is only handed out with a reserved slot
//! in that channel, so when WireGuard falls behind smoltcp sees "no token" (and retries later)
//! instead of a packet silently dropped in the device: see smoltcp #949 in landscape.md.

use std::collections::VecDeque;
use std::sync::Arc;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tokio::sync::mpsc;

use crate::packet::PacketPool;

pub(crate) struct QueueDevice {
    /// Inbound IP packets waiting for smoltcp.
    pub rx: VecDeque<Vec<u8>>,
    tx: mpsc::Sender<Vec<u8>>,
    pool: Arc<PacketPool>,
    mtu: usize,
    /// Set when smoltcp wanted to send but the channel to WireGuard was full.
    pub tx_blocked: bool,
}

impl QueueDevice {
    pub fn new(tx: mpsc::Sender<Vec<u8>>, pool: Arc<PacketPool>, mtu: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx,
            pool,
            mtu,
            tx_blocked: false,
        }
    }

    /// The channel to WireGuard, to wait on when it is full.
    pub fn tx_channel(&self) -> &mpsc::Sender<Vec<u8>> {
        &self.tx
    }
}

pub(crate) struct RxToken<'a> {
    packet: Vec<u8>,
    pool: &'a PacketPool,
}

pub(crate) struct TxToken<'a> {
    permit: mpsc::Permit<'a, Vec<u8>>,
    pool: &'a PacketPool,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(&self.packet);
        self.pool.put(self.packet);
        result
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.pool.get();
        buf.resize(len, 0);
        let result = f(&mut buf);
        self.permit.send(buf);
        result
    }
}

impl Device for QueueDevice {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.rx.is_empty() {
            return None;
        }
        let Ok(permit) = self.tx.try_reserve() else {
            // An inbound packet may need an answer (an ACK, a RST): wait for room first.
            self.tx_blocked = true;
            return None;
        };
        let packet = self.rx.pop_front()?;
        Some((
            RxToken {
                packet,
                pool: &self.pool,
            },
            TxToken {
                permit,
                pool: &self.pool,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        match self.tx.try_reserve() {
            Ok(permit) => Some(TxToken {
                permit,
                pool: &self.pool,
            }),
            Err(_) => {
                self.tx_blocked = true;
                None
            }
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}
