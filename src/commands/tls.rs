//! How a node secures its gRPC links: mutual TLS from the files of `moeless certs generate`, or
//! plaintext only where nothing leaves the machine (loopback) unless the operator says
//! `--insecure`.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context};
use pki::grpc::GrpcTls;

/// True for a loopback IP or `localhost`, given as HOST:PORT, `[V6]:PORT` or a bare host.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().is_loopback();
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses plaintext on `addrs` unless every one is loopback or `insecure` is set.
pub fn check_plaintext<'a>(what: &str, addrs: impl IntoIterator<Item = &'a str>, insecure: bool) -> anyhow::Result<()> {
    if insecure {
        return Ok(());
    }
    if let Some(addr) = addrs.into_iter().find(|a| !is_loopback(a)) {
        bail!(
            "refusing plaintext {what} on {addr}, which is not a loopback address: give --tls-dir DIR \
             (certificates from `moeless certs generate`) for mutual TLS, or --insecure to accept plaintext"
        );
    }
    Ok(())
}

/// Refuses an admin API without a bearer token on an address other than loopback, unless
/// `insecure` is set.
pub fn check_admin_open(addr: std::net::SocketAddr, insecure: bool) -> anyhow::Result<()> {
    if !insecure && !addr.ip().is_loopback() {
        bail!(
            "refusing an admin API without --admin-token on {addr}, which is not a loopback address; \
             give --admin-token (or MOELESS_ADMIN_TOKEN), or --insecure"
        );
    }
    Ok(())
}

/// The gRPC TLS settings of node `name` from `dir` (DIR/ca.pem, DIR/NAME.pem, DIR/NAME.key).
pub fn load(dir: &Path, name: &str) -> anyhow::Result<GrpcTls> {
    GrpcTls::load(&pki::TlsFiles::in_dir(dir, name))
        .with_context(|| format!("loading the TLS files of {name:?} from {}", dir.display()))
}

/// The HTTPS settings of node `name` from `dir`: the certificate its gRPC links use.
pub fn load_https(dir: &Path, name: &str) -> anyhow::Result<std::sync::Arc<pki::https::ServerConfig>> {
    let identity = pki::Identity::load(&pki::TlsFiles::in_dir(dir, name))
        .with_context(|| format!("loading the TLS files of {name:?} from {}", dir.display()))?;
    pki::https::server_config(&identity).with_context(|| format!("HTTPS settings of {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        for a in [
            "127.0.0.1:7100",
            "[::1]:7100",
            "localhost:7100",
            "LOCALHOST",
            "127.0.0.2:1",
            "::1",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0:7100",
            "10.0.0.7:7100",
            "[::]:7100",
            "cp-1.example:7100",
            "example.com",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
        assert!(check_plaintext("gRPC", ["127.0.0.1:1", "localhost:2"], false).is_ok());
        let err = check_plaintext("gRPC", ["127.0.0.1:1", "0.0.0.0:2"], false).unwrap_err();
        assert!(err.to_string().contains("0.0.0.0:2"), "{err}");
        assert!(check_plaintext("gRPC", ["0.0.0.0:2"], true).is_ok());
    }
}
