//! HTTPS for the two HTTP APIs: the control plane's admin REST API and the OpenAI-compatible
//! endpoint. Servers wrap their TCP listener in a [`TlsListener`] and hand it to `axum::serve`
//! as they would the plain listener (graceful shutdown unchanged); clients (reqwest) take a
//! rustls [`ClientConfig`] from [`client_config`]. Everything runs on rustls with the ring
//! provider, as gRPC and QUIC do: no C/C++ crypto build.
//!
//! HTTP clients are not asked for certificates: the admin API authenticates with its bearer
//! token, the endpoint with its API key. TLS here is confidentiality for those tokens and the
//! prompts, and server authentication for the client.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
pub use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::certs::{load_certs, load_roots, read_text};
use crate::{CertError, Identity};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake finished and that `axum::serve` has not taken yet.
const READY_QUEUE: usize = 256;

/// Handshakes in progress at most: a flood of connections that never finish theirs holds this
/// many file descriptors (each for up to [`HANDSHAKE_TIMEOUT`]), not all of them.
const MAX_HANDSHAKES: usize = 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config_for(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, CertError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(CertError::tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| CertError::tls(format!("certificate and key do not form a usable identity: {e}")))?;
    // HTTP/1.1 only: the servers are axum without its http2 feature.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Server settings from PEM files: a certificate chain and its private key (vLLM's
/// `--ssl-certfile` / `--ssl-keyfile`).
pub fn server_config_from_pem(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, CertError> {
    let chain = load_certs(cert)?;
    let text = read_text(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| CertError::Cert {
        path: key.to_path_buf(),
        reason: format!("no private key: {e}"),
    })?;
    server_config_for(chain, key_der)
}

/// Server settings from a node's cluster identity (`moeless certs generate`): the certificate
/// it already uses for gRPC, so one `--tls-dir` secures both.
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, CertError> {
    let (chain, key) = identity
        .own()
        .ok_or_else(|| CertError::tls("an HTTPS server needs its own certificate, not only the CA"))?;
    server_config_for(chain.to_vec(), key.clone_key())
}

/// Client settings that trust the CA certificates in `ca` (PEM) and verify the server's name
/// against the URL's host, as any HTTPS client does (node certificates name `localhost`,
/// 127.0.0.1, ::1 and the `--san` names they were generated with).
pub fn client_config(ca: &Path) -> Result<ClientConfig, CertError> {
    let roots = load_roots(ca)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(CertError::tls)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A reqwest client builder on rustls with the ring provider. Build every reqwest client here:
/// the workspace enables reqwest's `rustls-no-provider` (its other rustls features pull in
/// aws-lc, a C build), under which `ClientBuilder::build` panics unless a process-wide rustls
/// provider is installed; this installs ring once per process (a provider someone installed
/// earlier stays).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// [`http_client_builder`] trusting only the CA certificates in `ca` (PEM): for HTTPS to a node
/// or endpoint whose certificate came from `moeless certs generate`.
pub fn http_client_builder_with_ca(ca: &Path) -> Result<reqwest::ClientBuilder, CertError> {
    Ok(http_client_builder().tls_backend_preconfigured(client_config(ca)?))
}

/// Serves `app` on `listener` until `shutdown` resolves (then gracefully): HTTPS with `tls`,
/// plain HTTP without. TCP_NODELAY on every connection either way: responses and streamed
/// tokens are small writes, and Nagle would hold each behind the client's delayed ACK.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    match tls {
        // The TLS listener sets TCP_NODELAY itself.
        Some(tls) => {
            axum::serve(TlsListener::new(listener, tls)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
                let _ = s.set_nodelay(true);
            });
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

/// A TCP listener that hands `axum::serve` connections whose TLS handshake has completed.
///
/// A background task accepts TCP connections (TCP_NODELAY on: responses and streamed tokens are
/// small writes) and runs each handshake in its own task with a timeout, so a slow or silent
/// client never holds up the others; at most [`MAX_HANDSHAKES`] run at once (the next accept
/// waits). Dropping the listener stops the task.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let tls = TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accepting an HTTPS connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local, acceptor })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task ended (only when aborted): nothing more will arrive.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// vLLM's latency buckets (seconds), used for every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

/// How often the recorder folds its buffered histogram samples into the histograms.
pub const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The process's Prometheus recorder, installed on first use and shared by every HTTP server
/// in the process (the admin API and the endpoint both render it on `/metrics`, so a process
/// running both, as `moeless up` does, shows every metric on either). `None` when a recorder
/// not installed here came first.
pub fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let handle = match builder.install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "Prometheus recorder not installed");
                    return None;
                }
            };
            // Histogram samples are buffered until `run_upkeep`; without a scrape they would
            // pile up with every request, so a thread folds them in.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples wait for a scrape");
            }
            Some(handle)
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, TlsFiles};

    #[test]
    fn configs_load_from_generated_files_and_bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["api"], &[]).unwrap();
        let files = TlsFiles::in_dir(dir.path(), "api");
        let from_pem = server_config_from_pem(&files.cert, &files.key).unwrap();
        assert_eq!(from_pem.alpn_protocols, vec![b"http/1.1".to_vec()]);
        server_config(&Identity::load(&files).unwrap()).unwrap();
        client_config(&files.ca).unwrap();

        // A key in place of the certificate, and the reverse, name the file at fault.
        let err = server_config_from_pem(&files.key, &files.key).unwrap_err();
        assert!(err.to_string().contains("api.key"), "{err}");
        let err = server_config_from_pem(&files.cert, &files.cert).unwrap_err();
        assert!(err.to_string().contains("no private key"), "{err}");
        // A certificate with another node's key.
        generate(dir.path(), &["other"], &[]).unwrap();
        let other = TlsFiles::in_dir(dir.path(), "other");
        assert!(server_config_from_pem(&files.cert, &other.key).is_err());
        assert!(server_config(&Identity::roots_only(&files.ca).unwrap()).is_err());
        assert!(client_config(&dir.path().join("missing.pem")).is_err());
    }
}
