//! Certificates made per test (issue 15): a CA and a leaf it signs for 127.0.0.1 and
//! localhost, client certificates by CN, and rustls clients trusting the CA, as PEM files in
//! the test's own directory. Used by the LB's TLS tests, the brokers' and the mesh's.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::TempDir;

/// Both TLS versions rustls speaks.
pub const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A CA, a leaf it signed for 127.0.0.1 and localhost, and the leaf's key, as PEM files.
pub struct Pki {
    dir: TempDir,
    pub ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> anyhow::Result<Pki> {
        Self::expiring((4096, 1, 1))
    }

    /// A PKI whose leaf expires on `(year, month, day)`.
    pub fn expiring((year, month, day): (i32, u8, u8)) -> anyhow::Result<Pki> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = TempDir::new("tls")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mqlb test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        let pki = Pki {
            ca_der: ca.der().clone(),
            ca,
            dir,
        };
        pki.leaf(
            &["127.0.0.1", "localhost"],
            (year, month, day),
            "chain.pem",
            "key.pem",
        )?;
        Ok(pki)
    }

    /// A leaf this CA signs for `names`, expiring on `(year, month, day)`, written to the
    /// files `cert` and `key`; returns its DER.
    pub fn leaf(
        &self,
        names: &[&str],
        (year, month, day): (i32, u8, u8),
        cert: &str,
        key: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let leaf_key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut leaf = rcgen::CertificateParams::new(names)?;
        leaf.not_after = rcgen::date_time_ymd(year, month, day);
        let leaf = leaf.signed_by(&leaf_key, &self.ca)?;
        std::fs::write(self.path(cert), leaf.pem())?;
        std::fs::write(self.path(key), leaf_key.serialize_pem())?;
        Ok(leaf.der().to_vec())
    }

    /// A client certificate this CA signs whose subject CN is `cn`, with its key, written to
    /// `{cn}.pem` and `{cn}-key.pem`.
    pub fn client_cert(&self, cn: &str) -> anyhow::Result<()> {
        self.client_cert_until(cn, None)
    }

    /// [`Pki::client_cert`] valid from 2020-01-01 to `(year, month, day)`: long expired for a
    /// date in the past.
    pub fn client_cert_until(
        &self,
        cn: &str,
        not_after: Option<(i32, u8, u8)>,
    ) -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some((year, month, day)) = not_after {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        let cert = params.signed_by(&key, &self.ca)?;
        std::fs::write(self.path(&format!("{cn}.pem")), cert.pem())?;
        std::fs::write(self.path(&format!("{cn}-key.pem")), key.serialize_pem())?;
        Ok(())
    }

    /// A rustls client trusting this CA that presents the client certificate `cn` (made by
    /// [`Pki::client_cert`], of this PKI or of `issuer`'s).
    pub fn client_with_cert(
        &self,
        issuer: &Pki,
        cn: &str,
    ) -> anyhow::Result<tokio_rustls::TlsConnector> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(issuer.path(&format!("{cn}.pem")))?
            .collect::<Result<Vec<_>, _>>()?;
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(issuer.path(&format!("{cn}-key.pem")))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(BOTH)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }

    /// A node's mesh TLS (`[cluster] tls`): a leaf of this CA for `names` in `{stem}.pem` and
    /// `{stem}.key`, trusting `ca` (this CA's `ca.pem`, or another's for a node that trusts the
    /// cluster but carries a stranger's certificate).
    pub fn mesh_tls(
        &self,
        stem: &str,
        names: &[&str],
        ca: &std::path::Path,
    ) -> anyhow::Result<mqlb_config::MeshTls> {
        let (cert, key) = (format!("{stem}.pem"), format!("{stem}.key"));
        self.leaf(names, (4096, 1, 1), &cert, &key)?;
        mqlb_config::tls::mesh(&self.path(&cert), &self.path(&key), ca, None)
            .map_err(|e| anyhow::anyhow!("node {stem}'s mesh TLS: {e}"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn path_str(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A rustls client trusting this CA, offering `alpn`, speaking only `versions`.
    pub fn client(
        &self,
        alpn: &[&str],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }
}
