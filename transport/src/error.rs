//! One error type for the transport layer; callers branch on `is_retryable`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while loading identities or exchanging messages.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate or key file is missing, unreadable or not valid PEM of the expected kind.
    #[error("certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    /// Generating certificates or building a TLS configuration failed.
    #[error("tls: {reason}")]
    Tls { reason: String },
    /// A local I/O operation (binding a socket, writing a file) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// No connection could be established to `addr` (unreachable, handshake refused).
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The TLS handshake with `addr` failed: one side's certificate is not signed by the
    /// other's CA (or is missing). Another instance under the same CA would refuse too.
    #[error("handshake with {addr} refused: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    /// The exchange with `addr` did not complete within `after`.
    #[error("request to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    /// A message is larger than the configured limit (`size` is `limit + 1` when the message
    /// was cut off on arrival and its full size is unknown).
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The connection to `addr` was closed or lost while the exchange was in flight.
    #[error("connection to {addr} closed: {reason}")]
    Closed { addr: SocketAddr, reason: String },
    /// The peer abandoned the exchange with an application error code (see [`crate::codes`]).
    #[error("{addr} refused the request with code {code} ({})", crate::codes::describe(*.code))]
    Remote { addr: SocketAddr, code: u64 },
    /// The peer broke the framing rules.
    #[error("protocol error with {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
}

impl From<pki::CertError> for TransportError {
    fn from(e: pki::CertError) -> Self {
        match e {
            pki::CertError::Cert { path, reason } => Self::Cert { path, reason },
            pki::CertError::Tls { reason } => Self::Tls { reason },
            pki::CertError::Io { context, source } => Self::Io { context, source },
        }
    }
}

impl TransportError {
    /// True when another attempt (possibly against another instance) may succeed: the peer was
    /// unreachable, slow, or went away. Errors about the message itself are not retryable.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Timeout { .. } | Self::Closed { .. })
    }

    /// A stable label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Cert { .. } => "cert",
            Self::Tls { .. } => "tls",
            Self::Io { .. } => "io",
            Self::Connect { .. } => "connect",
            Self::Refused { .. } => "refused",
            Self::Timeout { .. } => "timeout",
            Self::TooLarge { .. } => "too_large",
            Self::Closed { .. } => "closed",
            Self::Remote { .. } => "remote",
            Self::Protocol { .. } => "protocol",
        }
    }

    pub(crate) fn tls(reason: impl std::fmt::Display) -> Self {
        Self::Tls {
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
