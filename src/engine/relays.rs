//! Our relay connections (netbird-protocol.md §6.4): one *home* relay, kept connected by a guard
//! task and advertised in offers, and *foreign* relays — a remote's home relay, opened on demand
//! when the remote is the controller (relays are not federated, so both ends must meet on the
//! controller's instance) and closed again when no peer uses them.
//!
//! Relay settings (URLs and token) follow the network map: a refreshed token is used for every
//! later connection (live ones survive expiry), changed URLs move the home relay, and a map
//! without relay settings closes every relay connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::control::mesh::RelaySettings;
use crate::relay::client::{RelayClient, RelayError, Relayed};

/// A foreign relay slot: the connection, or `None` while none is up. The async lock makes
/// concurrent opens of one URL share a single connection attempt.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<RelayClient>>>>;

/// The home relay and the foreign relays of one engine.
pub struct Relays {
    own_key: String,
    inbound: mpsc::Sender<Relayed>,
    settings: watch::Receiver<Option<RelaySettings>>,
    home: watch::Receiver<Option<Arc<RelayClient>>>,
    foreign: Mutex<HashMap<String, Slot>>,
    cancel: CancellationToken,
    /// Relay connections made (home and foreign), for status.
    opened: Arc<std::sync::atomic::AtomicU64>,
}

impl Relays {
    /// Start the home-relay guard on `tasks` and return the set. `settings` carries the
    /// network map's relay settings; datagrams from every relay go to `inbound`.
    pub fn start(
        own_key: String,
        settings: watch::Receiver<Option<RelaySettings>>,
        inbound: mpsc::Sender<Relayed>,
        cancel: CancellationToken,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Arc<Self> {
        let (publish, home) = watch::channel(None);
        let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tasks.spawn(guard_home(
            settings.clone(),
            own_key.clone(),
            inbound.clone(),
            publish,
            opened.clone(),
            cancel.clone(),
        ));
        Arc::new(Self {
            own_key,
            inbound,
            settings,
            home,
            foreign: Mutex::new(HashMap::new()),
            cancel,
            opened,
        })
    }

    /// The count of relay connections made, home and foreign (a handle status reads).
    pub fn opened(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.opened.clone()
    }

    /// The home relay, if connected.
    pub fn home(&self) -> Option<Arc<RelayClient>> {
        self.home.borrow().clone().filter(|r| !r.is_closed())
    }

    /// Notified when the home relay connection is replaced or lost.
    pub fn home_changes(&self) -> watch::Receiver<Option<Arc<RelayClient>>> {
        self.home.clone()
    }

    /// A connection to the relay instance `url`: the home relay if that is it, else a foreign
    /// relay connection, opened now with the current token if none is up. `ip` is the address
    /// the remote said it is connected to, dialled when the URL does not connect.
    pub async fn open(
        &self,
        url: &str,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Arc<RelayClient>, RelayError> {
        if let Some(home) = self.home()
            && home.instance_url() == url
        {
            return Ok(home);
        }
        let slot = self
            .lock_foreign()
            .entry(url.to_string())
            .or_default()
            .clone();
        let mut conn = slot.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        // `close_unused` may have dropped the slot while we waited for it: put it back, so the
        // connection made below stays visible to the sweep.
        self.lock_foreign()
            .entry(url.to_string())
            .and_modify(|s| {
                if !Arc::ptr_eq(s, &slot) {
                    *s = slot.clone();
                }
            })
            .or_insert_with(|| slot.clone());
        let settings = self.settings.borrow().clone().ok_or(RelayError::Closed)?;
        let connect = |dial_ip| {
            RelayClient::connect(
                url,
                dial_ip,
                &self.own_key,
                &settings.token_payload,
                &settings.token_signature,
                self.inbound.clone(),
                self.cancel.child_token(),
            )
        };
        let client = match (connect(None).await, ip) {
            (Ok(c), _) => c,
            (Err(RelayError::Connect { reason, .. }), Some(ip)) => {
                warn!(relay = %url, %ip, "{reason}; trying the address the peer advertised");
                connect(Some(ip)).await?
            }
            (Err(e), _) => return Err(e),
        };
        if client.instance_url() != url {
            // The advertised instance is what the remote connected to; a relay answering with
            // another instance URL is a different instance and cannot reach that peer.
            warn!(asked = %url, answered = %client.instance_url(), "foreign relay is another instance");
        }
        info!(relay = %url, "foreign relay connected");
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *conn = Some(client.clone());
        Ok(client)
    }

    /// Close every foreign relay no peer uses (`in_use`: instance URLs of peers connected or
    /// connecting through a relay).
    pub fn close_unused(&self, in_use: &HashSet<String>) {
        let mut foreign = self.lock_foreign();
        foreign.retain(|url, slot| {
            if in_use.contains(url) {
                return true;
            }
            // A slot being opened right now is in use by definition; leave it for next time.
            let Ok(conn) = slot.try_lock() else {
                return true;
            };
            if let Some(c) = conn.as_ref() {
                info!(relay = %url, "closing unused foreign relay");
                c.close();
            }
            false
        });
    }

    /// Close a foreign connection to what is now our home instance: one peer ID should have
    /// one connection per relay, and the peers using it are set up again through the home.
    pub fn close_foreign_home(&self) {
        let Some(home) = self.home() else { return };
        if let Some(slot) = self.lock_foreign().remove(home.instance_url())
            && let Ok(conn) = slot.try_lock()
            && let Some(c) = conn.as_ref()
        {
            c.close();
        }
    }

    /// Open foreign relay connections (for status and tests).
    pub fn foreign_count(&self) -> usize {
        self.lock_foreign()
            .values()
            .filter(|s| {
                s.try_lock()
                    .map(|c| c.as_ref().is_some_and(|c| !c.is_closed()))
                    .unwrap_or(true)
            })
            .count()
    }

    fn lock_foreign(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.foreign.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Dial every URL at once; the first to accept our token becomes home (Go does the same).
async fn connect_first(
    settings: &RelaySettings,
    own_key: &str,
    inbound: &mpsc::Sender<Relayed>,
    cancel: &CancellationToken,
) -> Result<Arc<RelayClient>, RelayError> {
    let attempts = settings.urls.iter().map(|url| {
        Box::pin(RelayClient::connect(
            url,
            None,
            own_key,
            &settings.token_payload,
            &settings.token_signature,
            inbound.clone(),
            cancel.child_token(),
        ))
    });
    match futures::future::select_ok(attempts).await {
        Ok((client, _rest)) => Ok(client),
        Err(e) => Err(e),
    }
}

/// Keep a home relay connected until `cancel`, publishing each new connection (and `None`
/// while there is none). Reconnects with backoff after a loss; follows settings changes.
async fn guard_home(
    mut settings: watch::Receiver<Option<RelaySettings>>,
    own_key: String,
    inbound: mpsc::Sender<Relayed>,
    publish: watch::Sender<Option<Arc<RelayClient>>>,
    opened: Arc<std::sync::atomic::AtomicU64>,
    cancel: CancellationToken,
) {
    let mut delays = crate::engine::supervisor::backoff();
    loop {
        let current = settings.borrow_and_update().clone();
        let Some(current) = current.filter(|s| !s.urls.is_empty()) else {
            // Relay disabled: wait for settings.
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = settings.changed() => if r.is_err() { return } else { continue },
            }
        };
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect_first(&current, &own_key, &inbound, &cancel) => r,
        };
        match attempt {
            Ok(client) => {
                delays = crate::engine::supervisor::backoff();
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                publish.send_replace(Some(client.clone()));
                // Why the connection is given up, and whether that was a loss (back off).
                let (reason, lost) = loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => {
                            client.close();
                            return;
                        }
                        // On shutdown the client's own tasks end with the same cancellation and
                        // may report first: a stop is not a lost connection, and says nothing.
                        _ = client.closed() => {
                            if cancel.is_cancelled() {
                                return;
                            }
                            break ("relay connection lost; reconnecting", true)
                        }
                        r = settings.changed() => {
                            if r.is_err() {
                                client.close();
                                return;
                            }
                            let new = settings.borrow().clone();
                            match new {
                                // A refreshed token only matters for the next connection.
                                Some(s) if s.urls == current.urls => {}
                                Some(_) => break ("relay URLs changed; moving the home relay", false),
                                None => break ("relay disabled by management", false),
                            }
                        }
                    }
                };
                warn!("{reason}");
                client.close();
                publish.send_replace(None);
                if !lost {
                    continue;
                }
            }
            Err(RelayError::Cancelled) => return,
            Err(e) => warn!("home relay: {e}"),
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(15));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devmesh::relay::DevRelay;
    use crate::devmesh::relay_token;

    const SECRET: &[u8] = b"relays-test-secret";

    /// A dev relay on loopback; returns its URL.
    async fn relay(cancel: &CancellationToken) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("rel://{}", listener.local_addr().unwrap());
        tokio::spawn(DevRelay::new(SECRET.to_vec(), url.clone()).serve(listener, cancel.clone()));
        url
    }

    fn settings(urls: &[&str], expiry: u64) -> RelaySettings {
        let (token_payload, token_signature) = relay_token::issue(SECRET, expiry);
        RelaySettings {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            token_payload,
            token_signature,
        }
    }

    /// Relays for key-a, with their tasks and the receiver of relayed datagrams (kept open).
    fn start(
        settings: watch::Receiver<Option<RelaySettings>>,
        cancel: &CancellationToken,
    ) -> (
        Arc<Relays>,
        tokio::task::JoinSet<()>,
        mpsc::Receiver<Relayed>,
    ) {
        let (inbound, received) = mpsc::channel(8);
        let mut tasks = tokio::task::JoinSet::new();
        let relays = Relays::start(
            "key-a".into(),
            settings,
            inbound,
            cancel.clone(),
            &mut tasks,
        );
        (relays, tasks, received)
    }

    async fn next_home(
        rx: &mut watch::Receiver<Option<Arc<RelayClient>>>,
    ) -> Option<Arc<RelayClient>> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("home relay change")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn home_relay_follows_the_settings() {
        let cancel = CancellationToken::new();
        let (r1, r2) = (relay(&cancel).await, relay(&cancel).await);
        let far = u64::MAX / 4;
        let (settings_tx, settings_rx) = watch::channel(Some(settings(&[&r1], far)));
        let (relays, mut tasks, _received) = start(settings_rx, &cancel);
        let mut home = relays.home_changes();
        let first = next_home(&mut home).await.expect("connected");
        assert_eq!(first.instance_url(), r1);

        // A refreshed token keeps the live connection.
        settings_tx.send_replace(Some(settings(&[&r1], far - 1)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!first.is_closed());
        assert!(Arc::ptr_eq(&relays.home().unwrap(), &first));

        // Relay disabled: the connection closes and there is no home.
        settings_tx.send_replace(None);
        assert!(next_home(&mut home).await.is_none());
        assert!(first.is_closed());

        // New URLs: home moves there.
        settings_tx.send_replace(Some(settings(&[&r2], far)));
        let moved = next_home(&mut home).await.expect("reconnected");
        assert_eq!(moved.instance_url(), r2);
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn foreign_relays_open_once_and_close_when_unused() {
        let cancel = CancellationToken::new();
        let (r1, r2) = (relay(&cancel).await, relay(&cancel).await);
        let (_settings_tx, settings_rx) = watch::channel(Some(settings(&[&r1], u64::MAX / 4)));
        let (relays, mut tasks, _received) = start(settings_rx, &cancel);
        let home = next_home(&mut relays.home_changes()).await.unwrap();

        // Our home instance is not opened again; another one is, once, however many ask.
        assert!(Arc::ptr_eq(&relays.open(&r1, None).await.unwrap(), &home));
        let (a, b) = tokio::join!(relays.open(&r2, None), relays.open(&r2, None));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.instance_url(), r2);
        assert_eq!(relays.foreign_count(), 1);

        // In use: kept. Unused: closed and forgotten.
        relays.close_unused(&HashSet::from([r2.clone()]));
        assert!(!a.is_closed());
        relays.close_unused(&HashSet::new());
        assert!(a.is_closed());
        assert_eq!(relays.foreign_count(), 0);
        assert!(
            !home.is_closed(),
            "the home relay is never closed as unused"
        );

        // An unreachable relay is an error, not a hang.
        assert!(relays.open("rel://127.0.0.1:1", None).await.is_err());

        // A URL that does not connect from here is reached through the IP the peer advertised
        // (a relay on 127.0.0.2; the URL names 127.0.0.3, where nothing listens).
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let r3 = format!("rel://127.0.0.2:{port}");
        tokio::spawn(DevRelay::new(SECRET.to_vec(), r3.clone()).serve(listener, cancel.clone()));
        let elsewhere = format!("rel://127.0.0.3:{port}");
        assert!(relays.open(&elsewhere, None).await.is_err());
        let via_ip = relays
            .open(&elsewhere, Some([127, 0, 0, 2].into()))
            .await
            .unwrap();
        assert_eq!(
            via_ip.instance_url(),
            r3,
            "the relay behind that IP answered"
        );
        assert_eq!(via_ip.server_ip(), std::net::IpAddr::from([127, 0, 0, 2]));
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
    }
}
