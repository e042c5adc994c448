//! A local certificate authority and node certificates (PEM files) for mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::CertError;

/// The name clients verify servers against: membership in the private CA is the identity,
/// so every node certificate carries this one name whatever its address.
pub const SERVER_NAME: &str = "moeless.internal";

const CA_COMMON_NAME: &str = "MoEless local CA";

/// Where one node's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate (PEM) that signs every node.
    pub ca: PathBuf,
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout [`generate`] writes: `dir/ca.pem`, `dir/{node}.pem`, `dir/{node}.key`.
    pub fn in_dir(dir: &Path, node: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
        }
    }
}

/// The CA's parameters are a pure function of nothing, so an issuer rebuilt from them and the
/// saved key names the same subject and key identifier as the certificate on disk.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "MoEless");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_file(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents).map_err(|e| CertError::io(format!("writing {}", path.display()), e))
}

/// Private keys are readable by their owner only.
fn write_key(path: &Path, contents: &str) -> Result<(), CertError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| CertError::io(format!("writing {}", path.display()), e))?;
    std::io::Write::write_all(&mut file, contents.as_bytes())
        .map_err(|e| CertError::io(format!("writing {}", path.display()), e))
}

pub(crate) fn read_text(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| CertError::Cert {
        path: path.to_path_buf(),
        reason: format!("reading: {e}"),
    })
}

/// Creates `dir/ca.pem` and `dir/ca.key` (unless both exist, in which case they are reused)
/// and, for every name, `dir/{name}.pem` and `dir/{name}.key` signed by that CA.
///
/// Every node certificate carries the SANs: the name itself, `localhost`, `127.0.0.1`, `::1`
/// and [`SERVER_NAME`], plus `extra_sans` (DNS names or IP addresses).
pub fn generate(dir: &Path, names: &[&str], extra_sans: &[String]) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|e| CertError::io(format!("creating {}", dir.display()), e))?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca_key = if ca_pem_path.exists() && ca_key_path.exists() {
        let text = read_text(&ca_key_path)?;
        KeyPair::from_pem(&text).map_err(|e| CertError::Cert {
            path: ca_key_path.clone(),
            reason: format!("not a usable key: {e}"),
        })?
    } else {
        let key = KeyPair::generate().map_err(CertError::tls)?;
        let cert = ca_params().self_signed(&key).map_err(CertError::tls)?;
        write_key(&ca_key_path, &key.serialize_pem())?;
        write_file(&ca_pem_path, &cert.pem())?;
        key
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    for name in names {
        let mut sans: Vec<String> = [*name, "localhost", "127.0.0.1", "::1", SERVER_NAME]
            .iter()
            .map(|s| s.to_string())
            .collect();
        sans.extend(extra_sans.iter().cloned());
        sans.dedup();
        let mut params =
            CertificateParams::new(sans).map_err(|e| CertError::tls(format!("certificate names for {name}: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, *name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(CertError::tls)?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| CertError::tls(format!("signing {name}: {e}")))?;
        let files = TlsFiles::in_dir(dir, name);
        write_key(&files.key, &key.serialize_pem())?;
        write_file(&files.cert, &cert.pem())?;
    }
    Ok(())
}

/// The trust roots and, for a full identity, this node's certificate chain and key.
pub struct Identity {
    roots: Arc<RootCertStore>,
    own: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("roots", &self.roots.len())
            .field("chain", &self.own.as_ref().map(|(chain, _)| chain.len()))
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            roots: self.roots.clone(),
            own: self.own.as_ref().map(|(chain, key)| (chain.clone(), key.clone_key())),
        }
    }
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let text = read_text(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Cert {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Cert {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| CertError::Cert {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

impl Identity {
    /// The CA certificates peers must be signed by.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// This node's certificate chain and key; `None` for [`Identity::roots_only`].
    pub fn own(&self) -> Option<(&[CertificateDer<'static>], &PrivateKeyDer<'static>)> {
        self.own.as_ref().map(|(chain, key)| (chain.as_slice(), key))
    }

    /// Loads the CA certificate, this node's chain and its key.
    pub fn load(files: &TlsFiles) -> Result<Identity, CertError> {
        let roots = load_roots(&files.ca)?;
        let chain = load_certs(&files.cert)?;
        let text = read_text(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| CertError::Cert {
            path: files.key.clone(),
            reason: format!("no private key: {e}"),
        })?;
        Ok(Identity {
            roots: Arc::new(roots),
            own: Some((chain, key)),
        })
    }

    /// Only the trust roots, no certificate of its own: a client built from it presents no
    /// certificate (servers refuse it; useful to check that they do). Servers need [`Identity::load`].
    pub fn roots_only(ca: &Path) -> Result<Identity, CertError> {
        Ok(Identity {
            roots: Arc::new(load_roots(ca)?),
            own: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_twice_reuses_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["a"], &[]).unwrap();
        let ca1 = std::fs::read(dir.path().join("ca.pem")).unwrap();
        generate(dir.path(), &["b"], &["10.0.0.7".into(), "node-b.example".into()]).unwrap();
        let ca2 = std::fs::read(dir.path().join("ca.pem")).unwrap();
        assert_eq!(ca1, ca2);
        Identity::load(&TlsFiles::in_dir(dir.path(), "a")).unwrap();
        Identity::load(&TlsFiles::in_dir(dir.path(), "b")).unwrap();
    }
}
