//! The wg-quick configuration format (`[Interface]` + `[Peer]` sections), parsed without I/O.
//!
//! `parse` is a pure function of the text so that every error case is unit-tested; `load` adds the
//! file name to errors. Errors always name the line, because a user fixing a config file needs to
//! know where to look, and every unknown key is an error: a misspelt `AllowedIP` silently ignored
//! would route traffic somewhere the user did not intend.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ipnet::IpNet;

/// A 32-byte WireGuard key whose `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// Decode a standard-base64 key of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| "not valid base64".to_string())?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| format!("decodes to {} bytes, a key has 32", v.len()))?;
        Ok(Key(arr))
    }

    /// Standard base64, as `wg pubkey` prints it. Only ever used for public keys.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

/// Where a peer is reached on the underlay: an address, or a name resolved at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Addr(SocketAddr),
    Host(String, u16),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// The `[Interface]` section.
#[derive(Clone, Debug)]
pub struct InterfaceConfig {
    pub private_key: Key,
    pub addresses: Vec<IpNet>,
    pub dns: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub mtu: Option<u16>,
    pub listen_port: Option<u16>,
}

/// One `[Peer]` section.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Line of the `[Peer]` header, for messages about this peer.
    pub line: usize,
}

/// A whole configuration file.
#[derive(Clone, Debug)]
pub struct WgConfig {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
    /// Keys that wg-quick knows but that mean nothing without a kernel interface
    /// (`PostUp`, `Table`, ...): accepted, and reported so the user knows they were ignored.
    pub ignored: Vec<(usize, String)>,
}

/// A parse error at a line (1-based; 0 when it concerns the file as a whole).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// A configuration error naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{path}: holds a private key and is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Keys of wg-quick that configure the kernel interface or run scripts; meaningless here.
const WG_QUICK_ONLY: &[&str] = &[
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
];

/// Default MTU of wg-quick and NetBird.
pub const DEFAULT_MTU: u16 = 1420;

impl WgConfig {
    /// Read and parse a file. It holds a private key, so, as for ssh keys, a file others may
    /// read is refused rather than used.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e.line,
            message: e.message,
        })
    }

    /// Parse the text of a wg-quick file.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        Parser::default().run(text)
    }

    /// The MTU to use for the tunnel.
    pub fn mtu(&self) -> u16 {
        self.interface.mtu.unwrap_or(DEFAULT_MTU)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct PartialInterface {
    line: usize,
    private_key: Option<Key>,
    addresses: Vec<IpNet>,
    dns: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<u16>,
    listen_port: Option<u16>,
}

#[derive(Default)]
struct PartialPeer {
    line: usize,
    public_key: Option<Key>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
}

#[derive(Default)]
struct Parser {
    interface: Option<PartialInterface>,
    peers: Vec<PartialPeer>,
    ignored: Vec<(usize, String)>,
}

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

impl Parser {
    fn run(mut self, text: &str) -> Result<WgConfig, ParseError> {
        let mut section = Section::None;
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            if let Some(rest) = content.strip_prefix('[') {
                let name = rest
                    .strip_suffix(']')
                    .ok_or_else(|| err(line, format!("malformed section header `{content}`")))?
                    .trim();
                section = if name.eq_ignore_ascii_case("interface") {
                    if self.interface.is_some() {
                        return Err(err(line, "a second [Interface] section"));
                    }
                    self.interface = Some(PartialInterface {
                        line,
                        ..Default::default()
                    });
                    Section::Interface
                } else if name.eq_ignore_ascii_case("peer") {
                    self.peers.push(PartialPeer {
                        line,
                        ..Default::default()
                    });
                    Section::Peer
                } else {
                    return Err(err(line, format!("unknown section [{name}]")));
                };
                continue;
            }
            let (key, value) = content
                .split_once('=')
                .ok_or_else(|| err(line, format!("expected `Key = Value`, found `{content}`")))?;
            let key = key.trim();
            let value = value.trim();
            let lower = key.to_ascii_lowercase();
            match section {
                Section::None => {
                    return Err(err(line, format!("`{key}` outside of any section")));
                }
                Section::Interface => self.interface_key(line, key, &lower, value)?,
                Section::Peer => self.peer_key(line, key, &lower, value)?,
            }
        }
        self.finish()
    }

    fn interface_key(
        &mut self,
        line: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ParseError> {
        let iface = self.interface.as_mut().expect("section is Interface");
        match lower {
            "privatekey" => set_once(
                &mut iface.private_key,
                line,
                key,
                parse_key(line, key, value)?,
            )?,
            "address" => {
                for item in list(value) {
                    iface.addresses.push(parse_prefix(line, key, item)?);
                }
            }
            "dns" => {
                for item in list(value) {
                    match item.parse::<IpAddr>() {
                        Ok(ip) => iface.dns.push(ip),
                        Err(_) if is_domain(item) => iface.dns_search.push(item.to_string()),
                        Err(_) => {
                            return Err(err(
                                line,
                                format!("DNS: `{item}` is neither an IP address nor a domain"),
                            ));
                        }
                    }
                }
            }
            "mtu" => {
                let mtu: u16 = value
                    .parse()
                    .map_err(|_| err(line, format!("MTU: `{value}` is not a number")))?;
                if !(576..=9000).contains(&mtu) {
                    return Err(err(line, format!("MTU: {mtu} is outside 576..=9000")));
                }
                set_once(&mut iface.mtu, line, key, mtu)?;
            }
            "listenport" => {
                let port: u16 = value
                    .parse()
                    .map_err(|_| err(line, format!("ListenPort: `{value}` is not a port")))?;
                set_once(&mut iface.listen_port, line, key, port)?;
            }
            _ if WG_QUICK_ONLY.contains(&lower) => self.ignored.push((line, key.to_string())),
            _ => return Err(err(line, format!("unknown key `{key}` in [Interface]"))),
        }
        Ok(())
    }

    fn peer_key(
        &mut self,
        line: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ParseError> {
        let peer = self.peers.last_mut().expect("section is Peer");
        match lower {
            "publickey" => set_once(
                &mut peer.public_key,
                line,
                key,
                parse_key(line, key, value)?,
            )?,
            "presharedkey" => set_once(
                &mut peer.preshared_key,
                line,
                key,
                parse_key(line, key, value)?,
            )?,
            "endpoint" => set_once(&mut peer.endpoint, line, key, parse_endpoint(line, value)?)?,
            "allowedips" => {
                for item in list(value) {
                    peer.allowed_ips.push(parse_prefix(line, key, item)?);
                }
            }
            "persistentkeepalive" => {
                let secs = if value.eq_ignore_ascii_case("off") {
                    0
                } else {
                    value.parse::<u16>().map_err(|_| {
                        err(
                            line,
                            format!("PersistentKeepalive: `{value}` is not a number of seconds"),
                        )
                    })?
                };
                set_once(&mut peer.persistent_keepalive, line, key, secs)?;
            }
            _ => return Err(err(line, format!("unknown key `{key}` in [Peer]"))),
        }
        Ok(())
    }

    fn finish(self) -> Result<WgConfig, ParseError> {
        let iface = self
            .interface
            .ok_or_else(|| err(0, "no [Interface] section"))?;
        let private_key = iface
            .private_key
            .ok_or_else(|| err(iface.line, "[Interface] has no PrivateKey"))?;
        if iface.addresses.is_empty() {
            return Err(err(iface.line, "[Interface] has no Address"));
        }
        if iface.addresses.iter().any(|a| a.addr().is_ipv6()) && iface.mtu.is_some_and(|m| m < 1280)
        {
            return Err(err(iface.line, "MTU below 1280 cannot carry IPv6"));
        }
        if self.peers.is_empty() {
            return Err(err(0, "no [Peer] section"));
        }
        let mut peers: Vec<PeerConfig> = Vec::with_capacity(self.peers.len());
        for p in self.peers {
            let public_key = p
                .public_key
                .ok_or_else(|| err(p.line, "[Peer] has no PublicKey"))?;
            if let Some(other) = peers.iter().find(|o| o.public_key == public_key) {
                return Err(err(
                    p.line,
                    format!("duplicate peer (same PublicKey as line {})", other.line),
                ));
            }
            peers.push(PeerConfig {
                public_key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive.filter(|&s| s != 0),
                line: p.line,
            });
        }
        Ok(WgConfig {
            interface: InterfaceConfig {
                private_key,
                addresses: iface.addresses,
                dns: iface.dns,
                dns_search: iface.dns_search,
                mtu: iface.mtu,
                listen_port: iface.listen_port,
            },
            peers,
            ignored: self.ignored,
        })
    }
}

fn set_once<T>(slot: &mut Option<T>, line: usize, key: &str, value: T) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(err(line, format!("`{key}` given twice in this section")));
    }
    *slot = Some(value);
    Ok(())
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_key(line: usize, key: &str, value: &str) -> Result<Key, ParseError> {
    // The message never echoes the value: it may be a private key.
    Key::from_base64(value).map_err(|why| err(line, format!("{key}: {why}")))
}

/// `10.0.0.1/24`, `fd00::1/64` or a bare address (a host prefix). Host bits are allowed and kept,
/// because `Address = 100.64.0.1/16` means "this address, in this network".
fn parse_prefix(line: usize, key: &str, item: &str) -> Result<IpNet, ParseError> {
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(err(
        line,
        format!("{key}: `{item}` is not an IP address or prefix"),
    ))
}

fn parse_endpoint(line: usize, value: &str) -> Result<Endpoint, ParseError> {
    if let Ok(sa) = value.parse::<SocketAddr>() {
        return Ok(Endpoint::Addr(sa));
    }
    let bad = || {
        err(
            line,
            format!("Endpoint: `{value}` is not HOST:PORT (IPv6 as [ADDR]:PORT)"),
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 || !is_domain(host) {
        return Err(bad());
    }
    Ok(Endpoint::Host(host.to_string(), port))
}

fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PUB2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn base() -> String {
        format!(
            "[Interface]\nPrivateKey = {PRIV}\nAddress = 100.64.0.1/16, fd00::1/64\n\
             DNS = 100.64.0.2, mesh.test\nMTU = 1400\nListenPort = 51821\n\n\
             [Peer]\n# comment\nPublicKey = {PUB}\nEndpoint = 198.18.0.2:51820\n\
             AllowedIPs = 100.64.0.0/16, fd00::/64\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn parses_a_full_config() {
        let cfg = WgConfig::parse(&base()).unwrap();
        assert_eq!(cfg.interface.addresses.len(), 2);
        assert_eq!(
            cfg.interface.dns,
            vec!["100.64.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cfg.interface.dns_search, vec!["mesh.test".to_string()]);
        assert_eq!(cfg.mtu(), 1400);
        assert_eq!(cfg.interface.listen_port, Some(51821));
        let p = &cfg.peers[0];
        assert_eq!(p.public_key.to_base64(), PUB);
        assert_eq!(
            p.endpoint,
            Some(Endpoint::Addr("198.18.0.2:51820".parse().unwrap()))
        );
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.line, 8);
    }

    #[test]
    fn keys_are_case_insensitive_and_hosts_allowed() {
        let text = format!(
            "[interface]\nprivatekey={PRIV}\naddress=100.64.0.1\n[PEER]\npublickey={PUB}\n\
             endpoint=wg.example.com:51820\nallowedips=0.0.0.0/0\npersistentkeepalive=off\n\
             [Peer]\nPublicKey={PUB2}\nPresharedKey={PUB}\n"
        );
        let cfg = WgConfig::parse(&text).unwrap();
        assert_eq!(cfg.interface.addresses[0].prefix_len(), 32);
        assert_eq!(
            cfg.peers[0].endpoint,
            Some(Endpoint::Host("wg.example.com".into(), 51820))
        );
        assert_eq!(cfg.peers[0].persistent_keepalive, None);
        assert!(cfg.peers[1].preshared_key.is_some());
        assert_eq!(cfg.mtu(), DEFAULT_MTU);
    }

    fn error_of(text: &str) -> ParseError {
        WgConfig::parse(text).expect_err("must fail")
    }

    #[test]
    fn errors_name_the_line() {
        let bad_key = base().replace(PUB, "not-a-key");
        assert_eq!(error_of(&bad_key).line, 10);
        assert!(error_of(&bad_key).message.contains("PublicKey"));

        let bad_prefix = base().replace("100.64.0.0/16", "100.64.0.0/33");
        let e = error_of(&bad_prefix);
        assert_eq!(e.line, 12);
        assert!(e.message.contains("100.64.0.0/33"), "{e}");

        let unknown = base().replace("MTU = 1400", "Mtu2 = 1400");
        let e = error_of(&unknown);
        assert_eq!(e.line, 5);
        assert!(e.message.contains("unknown key `Mtu2`"), "{e}");

        let e = error_of(&base().replace("Endpoint = 198.18.0.2:51820", "Endpoint = ::1:5"));
        assert_eq!(e.line, 11);
        let e = error_of(&base().replace("MTU = 1400", "MTU = 100"));
        assert!(e.message.contains("576"), "{e}");
        let e = error_of(&format!("{}\n[Wat]\n", base()));
        assert!(e.message.contains("unknown section"), "{e}");
        let e = error_of(&base().replace("ListenPort = 51821", "ListenPort"));
        assert!(e.message.contains("Key = Value"), "{e}");
    }

    #[test]
    fn structural_errors() {
        assert!(error_of("").message.contains("no [Interface]"));
        let e = error_of(&format!(
            "[Interface]\nAddress = 10.0.0.1\n[Peer]\nPublicKey = {PUB}\n"
        ));
        assert!(e.message.contains("no PrivateKey"));
        let e = error_of(&format!(
            "[Interface]\nPrivateKey = {PRIV}\nAddress = 10.0.0.1\n"
        ));
        assert!(e.message.contains("no [Peer]"));
        let e = error_of(&format!(
            "[Interface]\nPrivateKey = {PRIV}\nAddress = 10.0.0.1\n[Peer]\nPublicKey = {PUB}\n[Peer]\nPublicKey = {PUB}\n"
        ));
        assert_eq!(e.line, 6);
        assert!(e.message.contains("duplicate"));
        let e = error_of(&base().replace("MTU = 1400", &format!("PrivateKey = {PRIV}")));
        assert!(e.message.contains("twice"));
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug() {
        let short = base().replace(PRIV, "c2VjcmV0c2VjcmV0");
        let e = error_of(&short);
        assert!(!e.to_string().contains("c2VjcmV0c2VjcmV0"));
        let cfg = WgConfig::parse(&base()).unwrap();
        assert!(!format!("{cfg:?}").contains(PRIV));
    }

    #[test]
    fn wg_quick_only_keys_are_reported_not_fatal() {
        let cfg = WgConfig::parse(&base().replace("MTU = 1400", "PostUp = iptables -A x")).unwrap();
        assert_eq!(cfg.ignored, vec![(5, "PostUp".to_string())]);
    }
}
