//! `[[frontend]] tls`: the certificate and key a frontend terminates TLS with, read and turned
//! into a rustls server configuration at load, so a missing file, a PEM without a certificate
//! or a key that does not fit is refused with the frontend and the file, never found by the
//! first client. The LB shares the built configuration through its snapshot: one per load (and
//! reload), none per connection.
//!
//! rustls with the `ring` provider: no OpenSSL, and `ring` builds with a C compiler alone
//! (aws-lc-rs needs a longer C build of its own on every clean machine, for no feature used here).

use std::collections::HashMap;
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
    /// More certificates, each served to clients that ask for one of its names (SNI); the one
    /// above serves the others (no SNI, as for an IP address, or a name none of these has).
    pub sni: Vec<SniCert>,
    /// Client certificates (mTLS): the CA they must chain to, and whether a client may
    /// connect without one. `None`: no client certificate is asked for.
    pub client_auth: Option<ClientAuth>,
    /// The client ID must be the verified client certificate's subject CN (`client_id =
    /// "cn"`): a CONNECT with another one, or without a certificate, is refused.
    pub client_id_is_cn: bool,
    /// The server side built from the files when they were read.
    pub server: TlsServer,
}

/// Client certificates a frontend asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// The PEM file of the CA certificates a client certificate must chain to.
    pub ca: PathBuf,
    /// A client without a certificate is refused at the handshake (`required`), or accepted
    /// (`optional`; one from another CA is refused either way).
    pub required: bool,
}

/// A certificate served to clients whose SNI is one of `names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    /// DNS names, exact (no wildcards), each one the certificate is valid for.
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A rustls server configuration built from a certificate chain and key. Two are equal when
/// they were built from the same certificates, key and ALPN list, so a reload that reads a
/// rotated certificate is a change, and one that reads the same files is none (the LB then
/// keeps the running one, with its session ticket keys).
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    /// SHA-256 over the DER of the chains and keys, the SNI names and the ALPN list.
    digest: [u8; 32],
    /// When the first of its leaf certificates expires (`notAfter`), in seconds since the Unix
    /// epoch.
    not_after: Option<i64>,
}

impl TlsServer {
    /// The configuration every TLS connection of the frontend is accepted with.
    pub fn config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }

    /// When the first of the leaf certificates it serves expires, in seconds since the Unix
    /// epoch; `None` when no validity could be read (rustls does not need it to serve them).
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
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
    /// rustls refused the configuration itself (the versions of its provider, the ticket
    /// keys): not the files' fault.
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
    #[error("{cert:?} is not valid for the name {name:?}: {message}")]
    Name {
        cert: PathBuf,
        name: String,
        message: String,
    },
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

/// A certificate chain and its key, read and checked against each other.
#[derive(Clone)]
pub struct Identity {
    cert: PathBuf,
    certified: rustls::sign::CertifiedKey,
    /// SHA-256 over the chain and the key.
    digest: [u8; 32],
    not_after: Option<i64>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads `cert` (the PEM chain, leaf first) and `key`: the key must be one `ring` can sign
/// with and belong to the leaf.
pub fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let chain = certificates(cert, &read(cert)?)?;
    let private = private_key(key, &read(key)?)?;
    let mut digest = Sha256::new();
    for c in &chain {
        digest.update((c.len() as u64).to_be_bytes());
        digest.update(c);
    }
    digest.update(private.secret_der());
    let not_after = not_after(&chain[0]);
    let rejected = |e: rustls::Error| TlsError::Rejected {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message: e.to_string(),
    };
    // Checked here, not left to the builder: whether it compares the key with the leaf has
    // varied between rustls releases.
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, private, &provider()).map_err(rejected)?;
    certified.keys_match().map_err(rejected)?;
    Ok(Identity {
        cert: cert.to_path_buf(),
        certified,
        digest: digest.finalize().into(),
        not_after,
    })
}

impl Identity {
    /// Whether the leaf is valid for `name`, an exact DNS name (what rustls's own SNI resolver
    /// checks when a certificate is added to it).
    pub fn check_name(&self, name: &str) -> Result<(), TlsError> {
        let mut probe = rustls::server::ResolvesServerCertUsingSni::new();
        probe
            .add(name, self.certified.clone())
            .map_err(|e| TlsError::Name {
                cert: self.cert.clone(),
                name: name.to_string(),
                message: e.to_string(),
            })
    }
}

/// Chooses the certificate by the client's SNI, the default one when it sent none or a name no
/// other certificate has.
#[derive(Debug)]
struct BySni {
    names: HashMap<String, Arc<rustls::sign::CertifiedKey>>,
    default: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for BySni {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let named = hello
            .server_name()
            .and_then(|n| self.names.get(&n.to_ascii_lowercase()));
        Some(named.unwrap_or(&self.default).clone())
    }
}

/// The server configuration of a frontend: TLS 1.2 and 1.3, ALPN `alpn`, client certificates
/// as `client` asks, `default` for clients without a known SNI and each of `sni` for its
/// names (checked with [`Identity::check_name`] before).
pub fn server(
    default: Identity,
    sni: Vec<(Vec<String>, Identity)>,
    alpn: &[String],
    client: Option<&ClientAuth>,
) -> Result<TlsServer, TlsError> {
    let mut digest = Sha256::new();
    digest.update(default.digest);
    let mut not_after = default.not_after;
    let mut names = HashMap::new();
    for (list, id) in sni {
        digest.update(id.digest);
        not_after = match (not_after, id.not_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let certified = Arc::new(id.certified);
        for n in list {
            digest.update([1]);
            digest.update(n.as_bytes());
            names.insert(n.to_ascii_lowercase(), certified.clone());
        }
    }
    for p in alpn {
        digest.update([0]);
        digest.update(p.as_bytes());
    }
    let resolver = BySni {
        names,
        default: Arc::new(default.certified),
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Setup)?;
    let builder = match client {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let (roots, ca_digest) = roots(&auth.ca)?;
            digest.update([2]);
            digest.update(ca_digest);
            digest.update([u8::from(auth.required)]);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            );
            let verifier = if auth.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError::Pem {
                file: auth.ca.clone(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Stateless resumption: a device that reconnects resumes with a ticket (keys rotated every
    // 6 hours), whatever the size of the fleet; the default session cache (256 sessions) would
    // keep only the last few.
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Setup)?;
    Ok(TlsServer {
        config: Arc::new(config),
        digest: digest.finalize().into(),
        not_after,
    })
}

/// The CA certificates of the PEM file `ca`, as trust roots, and a digest of them.
fn roots(ca: &Path) -> Result<(rustls::RootCertStore, [u8; 32]), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut digest = Sha256::new();
    for cert in certificates(ca, &read(ca)?)? {
        digest.update((cert.len() as u64).to_be_bytes());
        digest.update(&cert);
        roots.add(cert).map_err(|e| TlsError::Pem {
            file: ca.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok((roots, digest.finalize().into()))
}

/// A rustls client configuration: what mqlb verifies a server it connects to with (a broker
/// behind the LB, a probe's target, a mesh peer). Equal when built from the same CA
/// certificates, client identity and ALPN list, like [`TlsServer`].
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    digest: [u8; 32],
}

impl TlsClient {
    pub fn config(&self) -> &Arc<rustls::ClientConfig> {
        &self.config
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for TlsClient {}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short: String = self.digest[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(f, "TlsClient(sha256 {short}…)")
    }
}

/// A client configuration that trusts the CA certificates of `ca` only (never the system's:
/// brokers and peers carry a private CA's certificates), TLS 1.2 and 1.3, presents `identity`
/// when the server asks for a certificate, and offers `alpn`.
pub fn client(
    ca: &Path,
    identity: Option<Identity>,
    alpn: &[String],
) -> Result<TlsClient, TlsError> {
    let (roots, ca_digest) = roots(ca)?;
    let mut digest = Sha256::new();
    digest.update(ca_digest);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            digest.update([1]);
            digest.update(id.digest);
            builder.with_client_cert_resolver(Arc::new(OneClientCert(Arc::new(id.certified))))
        }
    };
    for p in alpn {
        digest.update([0]);
        digest.update(p.as_bytes());
    }
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(TlsClient {
        config: Arc::new(config),
        digest: digest.finalize().into(),
    })
}

/// The ALPN protocol of a mesh link: a TLS endpoint that is not an mqlb node (an MQTT
/// listener, a web server) fails the handshake instead of reading frames.
pub const MESH_ALPN: &str = "mqlb-mesh";

/// `[cluster] tls`: mutual TLS on every mesh link, both ends of it. Both configurations carry
/// the node's own certificate and trust `ca` alone: the accepting side requires the dialer's
/// certificate to chain to it, the dialing side verifies the accepting peer's certificate for
/// [`MeshTls::server_name`] or, without one, for the IP address it dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// One DNS name every node's certificate carries; `None`: each node's certificate carries
    /// its mesh IP address (an IP SAN), the address its peers dial.
    pub server_name: Option<String>,
    /// What an accepted link is served with (client certificates required, from `ca`).
    pub server: TlsServer,
    /// What a link to a peer is dialed with (this node's certificate presented).
    pub client: TlsClient,
}

/// The mesh TLS of a node: its certificate `cert` and `key` on both sides of every link, and
/// `ca`, the cluster's CA, the only one trusted.
pub fn mesh(
    cert: &Path,
    key: &Path,
    ca: &Path,
    server_name: Option<&str>,
) -> Result<MeshTls, TlsError> {
    let own = identity(cert, key)?;
    let alpn = [MESH_ALPN.to_string()];
    let auth = ClientAuth {
        ca: ca.to_path_buf(),
        required: true,
    };
    let server = server(own.clone(), Vec::new(), &alpn, Some(&auth))?;
    let client = client(ca, Some(own), &alpn)?;
    Ok(MeshTls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        ca: ca.to_path_buf(),
        server_name: server_name.map(str::to_string),
        server,
        client,
    })
}

/// The client certificate of a [`TlsClient`], whatever the server asks for: it has one.
#[derive(Debug)]
struct OneClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OneClientCert {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The DER tag of a SEQUENCE.
const SEQUENCE: u8 = 0x30;

/// An X.509 certificate's to-be-signed fields from its `skip + 1`-th on (the optional
/// `[0]` version is not counted): the walk [`not_after`] and [`subject_cn`] share.
fn tbs_field(cert: &[u8], skip: usize) -> Option<&[u8]> {
    let (SEQUENCE, certificate, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    for _ in 0..skip {
        rest = element(rest)?.2;
    }
    Some(rest)
}

/// One DER element at the start of `der`: its tag, its content, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        // Long form: the next `n` bytes are the length (at most 4: a certificate is small).
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, b| (l << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `notAfter` of an X.509 certificate, in seconds since the Unix epoch: the five fields
/// of the DER before it are walked, no more (x509-parser would bring a parser framework and a
/// date library for this one date).
fn not_after(cert: &[u8]) -> Option<i64> {
    // serialNumber, signature, issuer, then validity.
    let (SEQUENCE, validity, _) = element(tbs_field(cert, 3)?)? else {
        return None;
    };
    let (_, _, after_not_before) = element(validity)?;
    let (tag, time, _) = element(after_not_before)?;
    let text = std::str::from_utf8(time).ok()?;
    match tag {
        // UTCTime YYMMDDHHMMSSZ: 50-99 are 19xx (RFC 5280).
        0x17 if text.len() == 13 => {
            let yy: i64 = text[..2].parse().ok()?;
            let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
            unix_time(year, &text[2..12])
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 if text.len() == 15 => unix_time(text[..4].parse().ok()?, &text[4..14]),
        _ => None,
    }
}

/// The subject's common name (CN, OID 2.5.4.3) of an X.509 certificate in DER, the first if
/// it has several: what a client certificate names its device by. The walk of [`not_after`],
/// one field further.
pub fn subject_cn(cert: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    // serialNumber, signature, issuer, validity, then subject.
    let (SEQUENCE, mut rdns, _) = element(tbs_field(cert, 4)?)? else {
        return None;
    };
    // Bounded: each step consumes one element of the subject.
    while !rdns.is_empty() {
        let (SET, mut set, next) = element(rdns)? else {
            return None;
        };
        rdns = next;
        while !set.is_empty() {
            let (SEQUENCE, pair, more) = element(set)? else {
                return None;
            };
            set = more;
            let (0x06, oid, value) = element(pair)? else {
                return None;
            };
            if oid == CN {
                // UTF8String, PrintableString, IA5String or T61String: the bytes as text.
                let (tag, text, _) = element(value)?;
                return matches!(tag, 0x0c | 0x13 | 0x16 | 0x14)
                    .then(|| String::from_utf8(text.to_vec()).ok())
                    .flatten();
            }
        }
    }
    None
}

/// `year` and `MMDDHHMMSS` (UTC) as seconds since the Unix epoch.
fn unix_time(year: i64, mmddhhmmss: &str) -> Option<i64> {
    if !mmddhhmmss.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| mmddhhmmss[i..i + 2].parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, sec) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`server`] with one certificate: reads `cert` and `key`.
    fn load(cert: &Path, key: &Path, alpn: &[String]) -> Result<TlsServer, TlsError> {
        server(super::identity(cert, key)?, Vec::new(), alpn, None)
    }

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
        assert!(a.config().ticketer.enabled(), "stateless resumption");
        assert_eq!(a, load(&c, &k, &mqtt).expect("loads again"));
        assert_ne!(a, load(&c, &k, &[]).expect("no alpn"));
        let (cert2, key2, _) = identity();
        std::fs::write(&c, cert2).expect("rotate");
        std::fs::write(&k, key2).expect("rotate");
        assert_ne!(a, load(&c, &k, &mqtt).expect("rotated"));
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn the_leafs_expiry_is_read_in_both_time_forms() {
        for (year, month, day, unix) in [
            (2031, 5, 17, 1_936_742_400), // UTCTime
            (2060, 1, 2, 2_840_227_200),  // GeneralizedTime (2050 and later)
            (4096, 1, 1, 67_090_118_400), // rcgen's default
        ] {
            let mut params =
                rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            params.not_after = rcgen::date_time_ymd(year, month, day);
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("cert");
            assert_eq!(not_after(cert.der()), Some(unix), "{year}");
        }
        assert_eq!(unix_time(1970, "0101000000"), Some(0));
        assert_eq!(unix_time(2000, "0229120000"), Some(951_825_600));
        assert_eq!(unix_time(2000, "1301000000"), None);
        assert_eq!(not_after(b"\x30\x03\x30\x01"), None);
        assert_eq!(not_after(b""), None);
    }

    /// The subject CN is read whatever comes beside it in the subject, and a certificate
    /// without one, or bytes that are not a certificate, give none.
    #[test]
    fn the_subject_cn_is_read_from_the_der() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "fleet");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dev-0042");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(subject_cn(cert.der()).as_deref(), Some("dev-0042"));
        let mut none = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        none.distinguished_name = rcgen::DistinguishedName::new();
        let cert = none.self_signed(&key).expect("cert");
        assert_eq!(subject_cn(cert.der()), None);
        assert_eq!(subject_cn(b"\x30\x03\x30\x01\x00"), None);
        assert_eq!(subject_cn(b""), None);
    }

    /// Client certificates: the CA file is read into the configuration (a missing one is
    /// refused naming it), and required and optional are different configurations.
    #[test]
    fn client_certificates_are_asked_for_against_the_ca() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key, _) = identity();
        let (c, k) = (
            write(dir.path(), "c.pem", &cert),
            write(dir.path(), "k.pem", &key),
        );
        let ca = write(dir.path(), "ca.pem", &cert);
        let with = |file: &Path, required| {
            let auth = ClientAuth {
                ca: file.to_path_buf(),
                required,
            };
            server(
                super::identity(&c, &k).expect("id"),
                Vec::new(),
                &[],
                Some(&auth),
            )
        };
        let required = with(&ca, true).expect("required");
        let optional = with(&ca, false).expect("optional");
        assert_ne!(required, optional);
        assert_ne!(required, load(&c, &k, &[]).expect("none"));
        let missing = dir.path().join("none.pem");
        match with(&missing, true) {
            Err(TlsError::Read { file, .. }) => assert_eq!(file, missing),
            other => panic!("expected a read error, got {other:?}"),
        }
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

    /// Runs a handshake between `client` and `server` in memory, for `name`: what each side
    /// ended with.
    fn handshake(client: &TlsClient, server: &TlsServer, name: &str) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut c = rustls::ClientConnection::new(client.config().clone(), name)?;
        let mut s = rustls::ServerConnection::new(server.config().clone())?;
        // Bounded: a TLS 1.3 handshake takes two flights each way.
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("to memory");
            }
            s.read_tls(&mut wire.as_slice()).expect("from memory");
            s.process_new_packets()?;
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).expect("to memory");
            }
            c.read_tls(&mut wire.as_slice()).expect("from memory");
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not end");
    }

    #[test]
    fn a_client_trusts_its_ca_only_and_shows_its_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key, _) = identity();
        let (c, k) = (
            write(dir.path(), "c.pem", &cert),
            write(dir.path(), "k.pem", &key),
        );
        let (other, other_key, _) = identity();
        let (o, ok) = (
            write(dir.path(), "o.pem", &other),
            write(dir.path(), "ok.pem", &other_key),
        );
        let plain = load(&c, &k, &[]).expect("server");
        let trusting = client(&c, None, &[]).expect("client");
        handshake(&trusting, &plain, "localhost").expect("a certificate of its CA");
        assert!(
            handshake(&trusting, &plain, "elsewhere.example").is_err(),
            "another name"
        );
        let stranger = client(&o, None, &[]).expect("client");
        assert!(
            handshake(&stranger, &plain, "localhost").is_err(),
            "another CA"
        );
        // mTLS: the server asks for a certificate of the CA `c` (self-signed here).
        let auth = ClientAuth {
            ca: c.clone(),
            required: true,
        };
        let asking = server(
            super::identity(&c, &k).expect("id"),
            Vec::new(),
            &[],
            Some(&auth),
        )
        .expect("server");
        assert!(
            handshake(&trusting, &asking, "localhost").is_err(),
            "no certificate"
        );
        let shown = client(&c, Some(super::identity(&c, &k).expect("id")), &[]).expect("client");
        handshake(&shown, &asking, "localhost").expect("its certificate");
        let wrong = client(&c, Some(super::identity(&o, &ok).expect("id")), &[]).expect("client");
        assert!(
            handshake(&wrong, &asking, "localhost").is_err(),
            "another CA's certificate"
        );
        assert_ne!(shown, trusting);
        assert_eq!(trusting, client(&c, None, &[]).expect("again"));
        match client(&dir.path().join("none.pem"), None, &[]) {
            Err(TlsError::Read { .. }) => {}
            other => panic!("expected a read error, got {other:?}"),
        }
    }
}
