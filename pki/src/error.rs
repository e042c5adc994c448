//! One error type for loading and generating certificates.

use std::path::PathBuf;

/// Everything that can go wrong while generating or loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A certificate or key file is missing, unreadable or not valid PEM of the expected kind.
    #[error("certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    /// Generating certificates or building a TLS configuration failed.
    #[error("tls: {reason}")]
    Tls { reason: String },
    /// Writing files or creating the directory failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CertError {
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
