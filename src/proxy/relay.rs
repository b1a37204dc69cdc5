//! Copying between a client and its upstream, both directions, with half-close.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::trace;

/// Bytes buffered per direction while copying.
const COPY_BUFFER: usize = 64 * 1024;

/// Copy both ways until both sides have finished; an EOF on one side is passed on as a
/// shutdown of the other's write half. Errors end the relay (both sides are closed when the
/// caller drops them).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await {
        Ok((up, down)) => trace!(up, down, "relay finished"),
        Err(e) => trace!("relay ended: {e}"),
    }
}
