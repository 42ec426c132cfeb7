//! `[[frontend]] tls`: the certificate and key a frontend terminates TLS with, read and turned
//! into a rustls server configuration at load, so a missing file, a PEM without a certificate
//! or a key that does not fit is refused with the frontend and the file, never found by the
//! first client. The LB shares the built configuration through its snapshot: one per load (and
//! reload), none per connection.
//!
//! rustls with the `ring` provider: no OpenSSL, and `ring` builds with a C compiler alone
//! (aws-lc-rs needs a longer C build of its own on every clean machine, for no feature used here).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// TLS termination on a frontend, as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendTls {
    /// The PEM certificate chain, leaf first (as given: relative to the working directory).
    pub cert: PathBuf,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// ALPN protocols offered, in order of preference; a client that offers none is accepted.
    pub alpn: Vec<String>,
    /// The server side built from the files when they were read.
    pub server: TlsServer,
}

/// A rustls server configuration built from a certificate chain and key. Two are equal when
/// they were built from the same certificates, key and ALPN list, so a reload that reads a
/// rotated certificate is a change, and one that reads the same files is none.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    /// SHA-256 over the DER of the chain, the key and the ALPN list.
    digest: [u8; 32],
    /// The leaf certificate's DER, for what the LB reports about it (its expiry).
    leaf: Arc<[u8]>,
}

impl TlsServer {
    /// The configuration every TLS connection of the frontend is accepted with.
    pub fn config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }

    /// The DER of the leaf certificate.
    pub fn leaf_der(&self) -> &[u8] {
        &self.leaf
    }
}

impl PartialEq for TlsServer {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for TlsServer {}

impl std::fmt::Debug for TlsServer {
    /// The key never prints: only a short digest that tells two identities apart.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short: String = self.digest[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(f, "TlsServer(sha256 {short}…)")
    }
}

/// Why a frontend's certificate or key cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {file:?}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file:?} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")")]
    NoCertificate { file: PathBuf },
    #[error("{file:?} is not valid PEM: {message}")]
    Pem { file: PathBuf, message: String },
    #[error("{file:?} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { file: PathBuf },
    #[error("{key:?} does not fit {cert:?}: {message}")]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// The chain in `cert`, leaf first.
fn certificates(cert: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            file: cert.to_path_buf(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            file: cert.to_path_buf(),
        });
    }
    Ok(chain)
}

fn private_key(key: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::Error;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        Error::NoItemsFound => TlsError::NoKey {
            file: key.to_path_buf(),
        },
        e => TlsError::Pem {
            file: key.to_path_buf(),
            message: e.to_string(),
        },
    })
}

/// Reads `cert` and `key` and builds the server configuration: TLS 1.2 and 1.3, ALPN `alpn`,
/// no client certificates. The key must be one `ring` can sign with and belong to the leaf.
pub fn load(cert: &Path, key: &Path, alpn: &[String]) -> Result<TlsServer, TlsError> {
    let chain = certificates(cert, &read(cert)?)?;
    let private = private_key(key, &read(key)?)?;
    let mut digest = Sha256::new();
    for c in &chain {
        digest.update((c.len() as u64).to_be_bytes());
        digest.update(c);
    }
    digest.update(private.secret_der());
    for p in alpn {
        digest.update([0]);
        digest.update(p.as_bytes());
    }
    let leaf: Arc<[u8]> = Arc::from(chain[0].as_ref());
    let rejected = |e: rustls::Error| TlsError::Rejected {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message: e.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Checked here, not left to the builder: whether it compares the key with the leaf has
    // varied between rustls releases.
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(rejected)?;
    certified.keys_match().map_err(rejected)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rejected)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(TlsServer {
        config: Arc::new(config),
        digest: digest.finalize().into(),
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM; `other_key` is a second, unrelated key.
    fn identity() -> (String, String, String) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        let other = rcgen::KeyPair::generate().expect("key");
        (
            cert.pem(),
            signing_key.serialize_pem(),
            other.serialize_pem(),
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn loads_a_chain_and_key_and_tells_identities_apart() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key, _) = identity();
        let (c, k) = (
            write(dir.path(), "c.pem", &cert),
            write(dir.path(), "k.pem", &key),
        );
        let mqtt = vec!["mqtt".to_string()];
        let a = load(&c, &k, &mqtt).expect("loads");
        assert_eq!(a.config().alpn_protocols, vec![b"mqtt".to_vec()]);
        assert_eq!(a, load(&c, &k, &mqtt).expect("loads again"));
        assert_ne!(a, load(&c, &k, &[]).expect("no alpn"));
        let (cert2, key2, _) = identity();
        std::fs::write(&c, cert2).expect("rotate");
        std::fs::write(&k, key2).expect("rotate");
        assert_ne!(a, load(&c, &k, &mqtt).expect("rotated"));
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn unusable_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key, other) = identity();
        let c = write(dir.path(), "chain.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let wrong = write(dir.path(), "other.pem", &other);
        let junk = write(dir.path(), "junk.pem", "not a pem file\n");
        let missing = dir.path().join("missing.pem");
        let cases: [(&Path, &Path, &str); 5] = [
            (&missing, &k, "missing.pem"),
            (&junk, &k, "junk.pem"),
            (&k, &k, "key.pem"),
            (&c, &junk, "junk.pem"),
            (&c, &wrong, "other.pem"),
        ];
        for (cert, key, named) in cases {
            let e = load(cert, key, &[]).expect_err("refused").to_string();
            assert!(e.contains(named), "{e}");
        }
        assert!(matches!(
            load(&c, &wrong, &[]),
            Err(TlsError::Rejected { .. })
        ));
        assert!(matches!(load(&c, &junk, &[]), Err(TlsError::NoKey { .. })));
    }
}
