//! Mutual TLS for the gRPC links: control-plane peers (Raft), workers and engines.
//!
//! Servers require a client certificate signed by the cluster CA; clients present their node
//! certificate and verify the server against [`SERVER_NAME`] (or an override) under the same CA.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity as TonicIdentity, ServerTlsConfig};

use crate::{CertError, Identity, TlsFiles, SERVER_NAME};

/// A handshake that has not finished by then is dropped (a stalled peer holds no task).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One node's gRPC TLS material: the CA, its certificate and key (PEM), and the name it
/// expects servers to present.
#[derive(Clone)]
pub struct GrpcTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    server_name: String,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Cert {
        path: path.to_path_buf(),
        reason: format!("reading: {e}"),
    })
}

impl GrpcTls {
    /// Loads and checks the files (the same checks as [`Identity::load`], so a bad file is
    /// reported with its path at startup rather than as a failed handshake later).
    pub fn load(files: &TlsFiles) -> Result<GrpcTls, CertError> {
        Identity::load(files)?;
        Ok(GrpcTls {
            ca: read(&files.ca)?,
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            server_name: SERVER_NAME.to_string(),
        })
    }

    /// Verifies servers against `name` instead of [`SERVER_NAME`] (certificates made with
    /// `--san NAME`).
    pub fn with_server_name(mut self, name: impl Into<String>) -> GrpcTls {
        self.server_name = name.into();
        self
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Server side: this node's certificate; clients must present one signed by the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(TonicIdentity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Client side: presents this node's certificate and trusts only the CA.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(TonicIdentity::from_pem(&self.cert, &self.key))
            .domain_name(self.server_name.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// A channel endpoint for `addr` (HOST:PORT): `https` with mutual TLS when `tls` is given,
/// plaintext `http` otherwise.
pub fn endpoint(addr: &str, tls: Option<&GrpcTls>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| format!("invalid address {addr:?}: {e}"))?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.client_config())
            .map_err(|e| format!("TLS settings for {addr}: {e}")),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reports_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        crate::generate(dir.path(), &["cp-1"], &[]).unwrap();
        let good = TlsFiles::in_dir(dir.path(), "cp-1");
        let tls = GrpcTls::load(&good).unwrap();
        assert_eq!(tls.server_name(), SERVER_NAME);
        assert!(!format!("{tls:?}").contains("PRIVATE"), "the key stays out of logs");
        let missing = TlsFiles {
            key: dir.path().join("nobody.key"),
            ..good
        };
        assert!(matches!(GrpcTls::load(&missing), Err(CertError::Cert { path, .. }) if path == missing.key));
        assert!(endpoint("127.0.0.1:1", Some(&tls)).is_ok());
        assert!(endpoint("not an address", None).is_err());
    }
}
