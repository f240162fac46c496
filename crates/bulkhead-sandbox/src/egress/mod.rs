//! Egress: sandboxes have no network, only a unix socket to this proxy,
//! which opens `CONNECT host:port` tunnels to the destinations
//! `SANDBOX_EGRESS_ALLOW` lists and to nothing else.
//!
//! - [`policy`]: the allowlist. A name reaches only public addresses; an
//!   internal address only when the operator names it by address or CIDR;
//!   the server's own host, metadata and multicast never.
//! - [`addresses`]: what "public" means, IPv6 forms that embed an IPv4
//!   address included.
//! - [`proxy`]: one socket (a *gate*) per sandbox, so that every refusal is
//!   known to come from that sandbox and lands in the audit of the tool
//!   call that attempted it. The proxy resolves names itself, judges every
//!   address of the answer, and connects to exactly those addresses.

pub mod addresses;
mod fetch;
mod policy;
mod proxy;

pub use fetch::FETCH_SCRIPT;
pub use policy::{EgressPolicy, Refused};
pub use proxy::{EgressGate, EgressProxy, attributed, remote_gate_name};

/// Where the proxy's socket appears inside every sandbox.
pub const SANDBOX_SOCKET: &str = "/run/bulkhead/egress.sock";
