//! The values a peer's listeners are configured with, in the syntax the command line takes:
//! a forward (`[ADDR:]LPORT:HOST:PORT[/udp]`), an exposed port (`MESHPORT=[ADDR:]PORT[/udp]`)
//! and a listen address (`[ADDR:]PORT` or `unix:PATH`). A bare port is loopback, so nothing
//! is exposed by accident.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::dial::Target;
use super::unix::ListenAddr;

/// A local port forwarded to a target through the mesh: `[ADDR:]LPORT:HOST:PORT[/udp]`
/// as `--forward` takes it (`8080:web.netbird.cloud:80`; a bare port listens on loopback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub(crate) listen: SocketAddr,
    pub(crate) target: Target,
    /// UDP rather than TCP.
    pub(crate) udp: bool,
}

/// A port on our mesh address passed to a local service: `MESHPORT=[ADDR:]PORT[/udp]` as
/// `--expose` takes it (`80=8080`; a bare port is on loopback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expose {
    pub(crate) mesh_port: u16,
    pub(crate) local: SocketAddr,
    /// UDP rather than TCP.
    pub(crate) udp: bool,
}

/// A `/udp` or `/tcp` suffix (as docker's `-p`): the rest, and whether it is UDP.
fn protocol_suffix(s: &str) -> Result<(&str, bool), String> {
    match s.rsplit_once('/') {
        None => Ok((s, false)),
        Some((rest, "udp")) => Ok((rest, true)),
        Some((rest, "tcp")) => Ok((rest, false)),
        Some((_, other)) => Err(format!("`/{other}` is not /tcp or /udp")),
    }
}

impl Forward {
    /// Forward TCP connections to `listen` to `host:port` (a mesh name, a name or an address).
    pub fn tcp(listen: SocketAddr, host: &str, port: u16) -> Self {
        Self::new(listen, host, port, false)
    }

    /// Forward UDP datagrams to `listen` to `host:port`, one flow per client address.
    pub fn udp(listen: SocketAddr, host: &str, port: u16) -> Self {
        Self::new(listen, host, port, true)
    }

    fn new(listen: SocketAddr, host: &str, port: u16, udp: bool) -> Self {
        let target = match host.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Host(host.to_string(), port),
        };
        Self {
            listen,
            target,
            udp,
        }
    }

    /// The local address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }
}

impl std::fmt::Display for Forward {
    /// As `--forward` takes it: `ADDR:LPORT:HOST:PORT[/udp]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.listen, self.target)?;
        if self.udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Forward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_forward(s)
    }
}

impl Expose {
    /// Pass TCP connections to `mesh_port` on our mesh address to `local`.
    pub fn tcp(mesh_port: u16, local: SocketAddr) -> Self {
        Self {
            mesh_port,
            local,
            udp: false,
        }
    }

    /// Pass UDP datagrams to `mesh_port` on our mesh address to `local`, a flow per sender.
    pub fn udp(mesh_port: u16, local: SocketAddr) -> Self {
        Self {
            mesh_port,
            local,
            udp: true,
        }
    }

    /// The port on our mesh address.
    pub fn mesh_port(&self) -> u16 {
        self.mesh_port
    }
}

impl std::fmt::Display for Expose {
    /// As `--expose` takes it: `MESHPORT=ADDR:PORT[/udp]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.mesh_port, self.local)?;
        if self.udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Expose {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_expose(s)
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// `[ADDR:]PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        parse_listen_addr(s)
    }
}

/// `MESHPORT=[ADDR:]PORT[/udp]`.
fn parse_expose(s: &str) -> Result<Expose, String> {
    let (s, udp) = protocol_suffix(s)?;
    let (mesh, local) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not MESHPORT=[ADDR:]PORT"))?;
    let mesh_port: u16 = mesh
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("`{mesh}` is not a port"))?;
    Ok(Expose {
        mesh_port,
        local: parse_listen(local)?,
        udp,
    })
}

/// `[ADDR:]PORT` or `unix:PATH`.
fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    match s.strip_prefix("unix:") {
        Some("") => Err("`unix:` needs a path".into()),
        Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
        None => parse_listen(s).map(ListenAddr::Tcp),
    }
}

/// `[ADDR:]PORT`; a bare port binds loopback, so nothing is exposed by accident.
pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("`{s}` is not PORT or ADDR:PORT (IPv6 as [ADDR]:PORT)"))
}

/// `[ADDR:]LPORT:HOST:PORT[/udp]`, HOST an IP (IPv6 in brackets) or a name.
fn parse_forward(s: &str) -> Result<Forward, String> {
    let bad = || format!("`{s}` is not [ADDR:]LPORT:HOST:PORT[/udp]");
    let (s, udp) = protocol_suffix(s)?;
    let (rest, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let (listen, host) = if let Some(open) = rest.strip_suffix(']') {
        let (listen, host) = open.rsplit_once('[').ok_or_else(bad)?;
        (listen.strip_suffix(':').ok_or_else(bad)?, host)
    } else {
        rest.rsplit_once(':').ok_or_else(bad)?
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    let listen = parse_listen(listen)?;
    let target = match host.parse::<IpAddr>() {
        Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
        Err(_) => Target::Host(host.to_string(), port),
    };
    Ok(Forward {
        listen,
        target,
        udp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("1080").unwrap(),
            "127.0.0.1:1080".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:1").unwrap(),
            "0.0.0.0:1".parse().unwrap()
        );
        assert_eq!(parse_listen("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(parse_listen("localhost:1080").is_err());
        assert!(parse_listen("70000").is_err());
    }

    #[test]
    fn forwards() {
        let f = parse_forward("8080:100.64.0.2:80").unwrap();
        assert_eq!(f.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(f.target, Target::Addr("100.64.0.2:80".parse().unwrap()));
        let f = parse_forward("0.0.0.0:8080:web.mesh:443").unwrap();
        assert_eq!(f.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(f.target, Target::Host("web.mesh".into(), 443));
        let f = parse_forward("[::1]:8080:[fd00::2]:80").unwrap();
        assert_eq!(f.listen, "[::1]:8080".parse().unwrap());
        assert_eq!(f.target, Target::Addr("[fd00::2]:80".parse().unwrap()));
        assert!(!f.udp);
        let f = parse_forward("5353:dns.mesh:53/udp").unwrap();
        assert_eq!(f.target, Target::Host("dns.mesh".into(), 53));
        assert!(f.udp);
        assert!(!parse_forward("5353:dns.mesh:53/tcp").unwrap().udp);
        for bad in [
            "8080:host:53/sctp",
            "8080:host:53/",
            "8080",
            "8080:host",
            "x:host:80",
            "8080::80",
            "8080:host:0",
            "8080:[fd00::2:80",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exposes() {
        assert_eq!(
            parse_expose("80=8080").unwrap(),
            Expose {
                mesh_port: 80,
                local: "127.0.0.1:8080".parse().unwrap(),
                udp: false,
            }
        );
        let e = parse_expose("554=8554/udp").unwrap();
        assert_eq!((e.mesh_port, e.local.port(), e.udp), (554, 8554, true));
        assert_eq!(
            parse_expose("22=10.1.2.3:2222").unwrap().local,
            "10.1.2.3:2222".parse().unwrap()
        );
        for bad in ["80", "0=1", "x=1", "80=host:1", "80=1/quic"] {
            assert!(parse_expose(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwards_and_exposes_print_as_they_parse() {
        for text in [
            "127.0.0.1:8080:web.mesh:443",
            "127.0.0.1:5353:dns.mesh:53/udp",
            "[::1]:8080:[fd00::2]:80",
        ] {
            let f: Forward = text.parse().unwrap();
            assert_eq!(f.to_string(), text);
        }
        for text in ["80=127.0.0.1:8080", "554=10.1.2.3:8554/udp"] {
            let e: Expose = text.parse().unwrap();
            assert_eq!(e.to_string(), text);
        }
    }
}
