//! The PEM files of an upstream's `tls` policy (`ca`, `cert`, `key`), read and parsed as the
//! policy loads them; `upstream::tls` parses them the same way when they rotate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use super::files;

/// Largest TLS file read: a CA bundle is a few hundred KiB at most.
pub(crate) const MAX_FILE: u64 = 4 << 20;

/// A `tls.ca` file: the CA certificates an upstream's server certificate must chain to.
pub struct CaBundle {
    pub path: PathBuf,
    pub(crate) pem: Vec<u8>,
    pub(crate) roots: Arc<RootCertStore>,
}

impl CaBundle {
    /// Reads and parses the file; the error says what is wrong with it (not which file).
    pub fn load(path: &Path) -> Result<CaBundle, String> {
        let pem = read_file(path)?;
        let roots = parse_ca(&pem)?;
        Ok(CaBundle {
            path: path.to_path_buf(),
            pem,
            roots,
        })
    }
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaBundle({})", self.path.display())
    }
}

/// `tls.cert` and `tls.key`: the certificate (chain) and private key presented to an upstream.
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub(crate) cert_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
    pub(crate) certified: Arc<CertifiedKey>,
}

/// Which of the two files of a [`ClientIdentity`] is at fault, and how.
#[derive(Debug)]
pub enum IdentityError {
    Cert(String),
    Key(String),
}

impl ClientIdentity {
    pub fn load(cert: &Path, key: &Path) -> Result<ClientIdentity, IdentityError> {
        let cert_pem = read_file(cert).map_err(IdentityError::Cert)?;
        let key_pem = read_file(key).map_err(IdentityError::Key)?;
        let certified = parse_identity(&cert_pem, &key_pem)?;
        Ok(ClientIdentity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            cert_pem,
            key_pem,
            certified,
        })
    }
}

/// Paths only: the key's bytes never reach a log.
impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientIdentity(cert: {}, key: {})",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// A TLS file as a policy loads it (see `files::read_or_remembered`).
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    files::read_or_remembered(path, MAX_FILE).map_err(|e| e.to_string())
}

pub(crate) fn parse_ca(pem: &[u8]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("holds a certificate that cannot be a trust anchor: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".into());
    }
    Ok(Arc::new(roots))
}

pub(crate) fn parse_identity(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, IdentityError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Cert(format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(IdentityError::Cert(
            "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".into(),
        ));
    }
    // The PEM parser's own message may quote the file; a key file's content stays unsaid.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        IdentityError::Key("holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into())
    })?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(e) => {
                IdentityError::Cert(format!("not a usable certificate: {e}"))
            }
            rustls::Error::InconsistentKeys(_) => {
                IdentityError::Key("does not belong to the certificate in `tls.cert`".into())
            }
            _ => IdentityError::Key("not a usable private key (RSA, ECDSA or Ed25519)".into()),
        })
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
