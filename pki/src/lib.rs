//! Cluster identity for every link between planes: a private certificate authority, node
//! certificates signed by it (`moeless certs generate`), and the TLS settings built from them.
//!
//! Membership in the CA is a node's identity: servers accept only clients whose certificate
//! the CA signed, and clients verify servers against [`SERVER_NAME`] under the same CA. The
//! data plane's QUIC links (`transport`) and, with the `grpc` feature, the control plane's
//! gRPC links (Raft peers, workers, engines) load the same files. With the `https` feature, the
//! two HTTP APIs (the admin REST API and the OpenAI endpoint) can serve HTTPS (`https`).

mod certs;
mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "https")]
pub mod https;

pub use certs::{generate, Identity, TlsFiles, SERVER_NAME};
pub use error::CertError;
