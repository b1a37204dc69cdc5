//! Names, the NetBird way, in process (networks.md §3): the map's DNS part decoded (`config`),
//! custom zones answered here (`zone`), the handler chain deciding who answers each name
//! (`plan`), and the resolver that does the asking — through the tunnel for nameservers in the
//! mesh or inside a route, from the host otherwise (`resolver`). The dialler resolves every
//! host name of SOCKS5, HTTP CONNECT and absolute-form requests through it.

pub mod config;
pub mod plan;
pub mod resolver;
pub mod zone;

pub use config::DnsConfig;
pub use plan::{DnsRoute, DnsState, Learned, Plan, Step};
pub use resolver::{MeshNames, ResolveError, Resolver, build_query, parse_answer};
