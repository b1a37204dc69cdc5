//! Client of NetBird's management service: server key, login (registering with a setup key
//! when the peer is unknown), and the Sync stream, all through the NaCl envelope.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::envelope::{self, EnvelopeError, key_string, parse_key_string, public_key_of};
use super::management::management_service_client::ManagementServiceClient;
use super::management::{
    Empty, EncryptedMessage, LoginRequest, LoginResponse, PeerKeys, PeerSystemMeta, SyncRequest,
    SyncResponse,
};

/// NetBird's default management URL.
pub const DEFAULT_MANAGEMENT_URL: &str = "https://api.netbird.io:443";
/// The NetBird version we report (login meta and signal): management parses it as semver and
/// gates features on it — port ranges in firewall rules from 0.48.0, and the account-wide DNS
/// forwarder port 22054 only when every peer is ≥ 0.59.0 (networks.md §0.2) — and Go peers
/// treat a peer lazily only from 0.45.0. So it is the NetBird release whose protocol we follow
/// (the references read v0.77.1), not our own version, which goes in `uiVersion`.
pub const NETBIRD_VERSION: &str = "0.77.1";
/// Our own version, as `uiVersion` in the login meta.
pub const OWN_VERSION: &str = concat!("netbird-proxy/", env!("CARGO_PKG_VERSION"));
/// Largest message management may send (its network maps can be large).
const MAX_MESSAGE: usize = 16 << 20;
/// HTTP/2 pings: management rejects clients that ping more often than every 15 s.
const KEEPALIVE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a management call failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("management URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach management at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "this peer is not registered with management: give a setup key (--setup-key or NB_SETUP_KEY)"
    )]
    NeedsLogin,
    #[error("management rejected the setup key: {0}")]
    SetupKeyRejected(String),
    #[error("management: {code:?}: {message}")]
    Rpc { code: Code, message: String },
    #[error("management sent a message we cannot open: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("management closed the Sync stream")]
    StreamEnded,
}

impl From<Status> for ManagementError {
    fn from(s: Status) -> Self {
        ManagementError::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl ManagementError {
    /// Errors that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ManagementError::NeedsLogin
                | ManagementError::SetupKeyRejected(_)
                | ManagementError::BadUrl { .. }
        )
    }
}

/// System metadata sent with Login and Sync. `lazy`: lazy connections are on by local choice
/// (NetBird's clients report their local flags).
pub fn system_meta(hostname: &str, lazy: bool) -> PeerSystemMeta {
    PeerSystemMeta {
        hostname: hostname.to_string(),
        go_os: std::env::consts::OS.to_string(),
        kernel: "netbird-proxy".to_string(),
        platform: std::env::consts::ARCH.to_string(),
        os: std::env::consts::OS.to_string(),
        netbird_version: NETBIRD_VERSION.to_string(),
        ui_version: OWN_VERSION.to_string(),
        // SourcePrefixes; no IPv6 overlay yet.
        capabilities: vec![1],
        sync_message_version: 0,
        flags: Some(super::management::Flags {
            lazy_connection_enabled: lazy,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A connection to management.
pub struct ManagementClient {
    rpc: ManagementServiceClient<Channel>,
    private_key: [u8; 32],
    key: String,
    url: String,
}

impl ManagementClient {
    /// Connect to `url` (`https://` uses TLS with the webpki roots, `http://` plain).
    pub async fn connect(url: &str, private_key: [u8; 32]) -> Result<Self, ManagementError> {
        let bad = |reason: String| ManagementError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        match endpoint.uri().scheme_str() {
            Some("https") => {
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().with_webpki_roots())
                    .map_err(|e| bad(e.to_string()))?;
            }
            Some("http") => {}
            _ => return Err(bad("the scheme must be http or https".into())),
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ManagementError::Unreachable {
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
        Ok(Self {
            rpc: ManagementServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
            private_key,
            key: key_string(&public_key_of(&private_key)),
            url: url.to_string(),
        })
    }

    /// The management URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Our key string.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The server's public key (fetched before every sealed call, as NetBird's client does).
    pub async fn server_key(&mut self) -> Result<[u8; 32], ManagementError> {
        let resp = self.rpc.get_server_key(Empty {}).await?.into_inner();
        Ok(parse_key_string(&resp.key)?)
    }

    /// Log in; an unknown peer registers with `setup_key` if there is one.
    pub async fn login(
        &mut self,
        setup_key: Option<&str>,
        meta: PeerSystemMeta,
    ) -> Result<LoginResponse, ManagementError> {
        let server = self.server_key().await?;
        match self.login_once(&server, "", meta.clone()).await {
            Err(ManagementError::Rpc {
                code: Code::PermissionDenied,
                ..
            }) => {}
            other => return other,
        }
        let Some(setup_key) = setup_key.filter(|k| !k.is_empty()) else {
            return Err(ManagementError::NeedsLogin);
        };
        match self.login_once(&server, setup_key, meta).await {
            Err(ManagementError::Rpc {
                code:
                    Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::Unauthenticated,
                message,
            }) => Err(ManagementError::SetupKeyRejected(message)),
            other => other,
        }
    }

    async fn login_once(
        &mut self,
        server: &[u8; 32],
        setup_key: &str,
        meta: PeerSystemMeta,
    ) -> Result<LoginResponse, ManagementError> {
        let req = LoginRequest {
            setup_key: setup_key.to_string(),
            meta: Some(meta),
            peer_keys: Some(PeerKeys {
                wg_pub_key: self.key.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sealed = self.seal(&req, server);
        let resp = self.rpc.login(sealed).await?.into_inner();
        Ok(envelope::open_message(
            &resp.body,
            &self.private_key,
            server,
        )?)
    }

    /// Open the Sync stream.
    pub async fn sync(&mut self, meta: PeerSystemMeta) -> Result<SyncStream, ManagementError> {
        let server = self.server_key().await?;
        let sealed = self.seal(&SyncRequest { meta: Some(meta) }, &server);
        let inner = self.rpc.sync(sealed).await?.into_inner();
        Ok(SyncStream {
            inner,
            private_key: self.private_key,
            server,
        })
    }

    /// Deregister this peer (NetBird's `Logout`): the others drop it from their maps, and the
    /// key needs a setup key again to rejoin.
    pub async fn logout(&mut self) -> Result<(), ManagementError> {
        let server = self.server_key().await?;
        let sealed = self.seal(&Empty {}, &server);
        self.rpc.logout(sealed).await?;
        Ok(())
    }

    fn seal<M: prost::Message>(&self, msg: &M, server: &[u8; 32]) -> EncryptedMessage {
        EncryptedMessage {
            wg_pub_key: self.key.clone(),
            body: envelope::seal_message(msg, &self.private_key, server),
            version: 0,
        }
    }
}

/// The decrypted Sync stream.
pub struct SyncStream {
    inner: tonic::Streaming<EncryptedMessage>,
    private_key: [u8; 32],
    server: [u8; 32],
}

impl SyncStream {
    /// The next update, decoded; `Err(StreamEnded)` when management closes the stream.
    pub async fn next(&mut self) -> Result<SyncResponse, ManagementError> {
        let plain = self.next_encoded().await?;
        <SyncResponse as prost::Message>::decode(plain.as_slice())
            .map_err(|e| envelope::EnvelopeError::Decode(e.to_string()).into())
    }

    /// The next update as sent, decrypted but not decoded (`MeshState::apply_encoded` decodes
    /// only what changed); `Err(StreamEnded)` when management closes the stream.
    pub async fn next_encoded(&mut self) -> Result<Vec<u8>, ManagementError> {
        match self.inner.message().await? {
            Some(msg) => Ok(envelope::open(&msg.body, &self.private_key, &self.server)?),
            None => Err(ManagementError::StreamEnded),
        }
    }
}

/// An error with its sources, since tonic's top-level transport error says little.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Management compares the reported version as semver against 0.48.0 and 0.59.0; anything
    /// older (or unparsable) costs the whole account features (networks.md §0.2).
    #[test]
    fn the_reported_version_is_a_current_netbird_release() {
        let meta = system_meta("host", false);
        let parts: Vec<u64> = meta
            .netbird_version
            .split('.')
            .map(|p| p.parse().expect("semver"))
            .collect();
        assert_eq!(parts.len(), 3, "{}", meta.netbird_version);
        assert!(parts[..2] >= [0, 60][..], "{}", meta.netbird_version);
        assert!(meta.ui_version.starts_with("netbird-proxy/"));
    }

    /// NetBird's clients report their local flags; a local lazy choice is one of them.
    #[test]
    fn a_local_lazy_choice_is_reported_in_the_flags() {
        let flags = |lazy| system_meta("host", lazy).flags.expect("flags");
        assert!(flags(true).lazy_connection_enabled);
        assert!(!flags(false).lazy_connection_enabled);
    }
}
