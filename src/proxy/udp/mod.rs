//! UDP through the proxy: SOCKS5 UDP ASSOCIATE (`associate`), over the same routing as TCP
//! (mesh peers through the tunnel, the rest from the host when allowed; see `targets`).
//! `wire` reads and writes the SOCKS5 UDP header without copying.

pub(crate) mod associate;
pub(crate) mod flows;
pub(crate) mod targets;
pub mod wire;

/// The largest datagram payload relayed (more than any tunnel MTU, and than DNS's 4096-byte
/// EDNS answers). Bigger ones are dropped and counted (`too_big`), never cut: buffers stay a
/// few KiB per association or flow however many there are.
pub const MAX_DATAGRAM: usize = 9 * 1024;
