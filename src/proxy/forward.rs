//! Port forwards: a local TCP port whose every connection goes to one target through the dialler.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::dial::{Dialer, Target};
use super::relay;

/// Accept on `listener` and relay each connection to `target` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    dialer: Dialer,
    target: Target,
    cancel: CancellationToken,
) {
    loop {
        let (mut client, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!("forward accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = client.set_nodelay(true);
        let dialer = dialer.clone();
        let target = target.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let work = async {
                match dialer.dial(&target).await {
                    Ok(mut upstream) => relay::bidirectional(&mut client, &mut upstream).await,
                    // The client sees the connection close; the reason goes to the log.
                    Err(e) => warn!(%from, %target, "forward: {e}"),
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = work => {}
            }
        });
    }
}
