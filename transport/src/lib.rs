//! Request/response messages over QUIC with mutual TLS.
//!
//! The transport carries opaque bytes: one request and one response per bidirectional stream,
//! each framed by the stream's end (FIN) and handed over as a [`Message`] (the chunks it arrived
//! in, not copied into one buffer). It knows nothing about models or experts.
//! Membership in a private certificate authority is a node's identity: servers accept only
//! clients whose certificate that CA signed, and clients verify servers against
//! [`SERVER_NAME`] under the same CA.

pub mod bench;
mod error;
mod message;
mod quic;

use std::time::Duration;

pub use bytes::Bytes;
// Certificates live in `pki`, shared with the control plane's gRPC links.
pub use error::TransportError;
pub use message::Message;
pub use pki::{generate, CertError, Identity, TlsFiles, SERVER_NAME};
pub use quic::{Client, Handler, Server, SHUTDOWN_GRACE};

/// Application error codes sent when a stream or connection is abandoned.
pub mod codes {
    /// The message exceeded the receiver's `max_message_bytes`.
    pub const TOO_LARGE: u32 = 1;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 2;
    /// The request was abandoned (the client timed out or gave up).
    pub const CANCELLED: u32 = 3;

    /// A human-readable name for an error code.
    pub fn describe(code: u64) -> &'static str {
        match code {
            1 => "message too large",
            2 => "shutting down",
            3 => "cancelled",
            _ => "unknown",
        }
    }
}

/// Limits and timeouts shared by servers and clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest request (server side) or response (client side) accepted, in bytes.
    pub max_message_bytes: usize,
    /// How many requests one connection may have in flight at once.
    pub max_concurrent_streams: u32,
    /// A connection with no traffic for this long is closed (clients send keep-alives).
    pub idle_timeout: Duration,
    /// Client side: connections kept per server address, used in turn by successive requests
    /// (each quinn connection is driven by one task, so one connection does its packet work and
    /// crypto on one core at a time). At least 1.
    pub connections_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 256 << 20,
            max_concurrent_streams: 256,
            idle_timeout: Duration::from_secs(10),
            connections_per_peer: 1,
        }
    }
}
