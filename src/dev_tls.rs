//! The dev CA of `mqlb up`: at first start it makes a CA and a server certificate for
//! 127.0.0.1 and localhost in a local directory, so the topology also serves MQTT over TLS and
//! a client trusts it with `--cafile DIR/ca.pem`. Kept across runs (a client keeps trusting
//! the same CA); the CA's key lies beside it, so it is for development only.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, Issuer, KeyPair};

/// The names the server certificate is for: what a client on this machine connects to.
const NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// The files of a dev CA directory.
pub struct DevTls {
    /// The CA certificate clients trust (`--cafile`).
    pub ca: PathBuf,
    /// The server's certificate chain and key, for the TLS frontend.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevTls {
    fn at(dir: &Path) -> DevTls {
        DevTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }
}

/// The CA's parameters: the same on every run, so a CA made by an earlier run (its key read
/// back) signs certificates its `ca.pem` verifies.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "mqlb up dev CA (not for production)");
    Ok(p)
}

/// The dev CA in `dir`: made (with the directory) if missing, the server certificate made if
/// missing; what is there is used as it is.
pub fn ensure(dir: &Path) -> anyhow::Result<DevTls> {
    let files = DevTls::at(dir);
    if files.ca.exists() && files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key_file = dir.join("ca-key.pem");
    let params = ca_params()?;
    let ca_key = if files.ca.exists() && ca_key_file.exists() {
        let pem = std::fs::read_to_string(&ca_key_file)
            .with_context(|| format!("reading {}", ca_key_file.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("{}", ca_key_file.display()))?
    } else {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params.clone(), key)?;
        write(&files.ca, &ca.pem(), false)?;
        write(&ca_key_file, &key_pem, true)?;
        KeyPair::from_pem(&key_pem)?
    };
    let issuer = Issuer::from_params(&params, ca_key);
    let key = KeyPair::generate()?;
    let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "mqlb up (127.0.0.1)");
    let cert = leaf.signed_by(&key, &issuer)?;
    write(&files.cert, &cert.pem(), false)?;
    write(&files.key, &key.serialize_pem(), true)?;
    Ok(files)
}

/// Writes `text` to `path`; a key only its owner may read.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    }
    let _ = secret;
    let mut f = open
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second run keeps the CA and the certificate; a certificate removed is made again by
    /// the same CA (its key read back). That clients verify it against ca.pem is
    /// tests/tests/cli.rs's `up_serves_mqtt_over_tls_with_its_dev_ca`.
    #[test]
    fn the_dev_ca_is_made_once_and_signs_again() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first = ensure(dir.path())?;
        let ca = std::fs::read(&first.ca)?;
        let cert = std::fs::read(&first.cert)?;
        let again = ensure(dir.path())?;
        assert_eq!(std::fs::read(&again.ca)?, ca, "the CA is kept");
        assert_eq!(std::fs::read(&again.cert)?, cert, "the certificate is kept");
        std::fs::remove_file(&first.cert)?;
        let renewed = ensure(dir.path())?;
        assert_eq!(std::fs::read(&renewed.ca)?, ca, "the same CA");
        assert_ne!(std::fs::read(&renewed.cert)?, cert, "a new certificate");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&renewed.key)?.permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is its owner's alone");
        }
        Ok(())
    }
}
