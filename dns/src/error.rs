//! Errors of the DNS server, with enough context to tell which address or input failed.

use std::net::SocketAddr;

/// What can go wrong starting or configuring the server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid cluster zone {zone:?}: {reason}")]
    InvalidZone { zone: String, reason: String },
    #[error("binding DNS {transport} socket on {addr}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading upstream resolvers from {path}")]
    ResolvConf {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
