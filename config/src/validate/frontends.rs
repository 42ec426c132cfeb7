//! `[[frontend]]`: the addresses the load balancer listens on, their limits, and the TLS they
//! terminate.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::Checker;
use crate::defaults::*;
use crate::model::{Frontend, FrontendLimits, SourceRate};
use crate::raw::{RawFrontend, RawTls};
use crate::tls::{ClientAuth, FrontendTls, SniCert, TlsError};

/// `admin` is `lb.admin`, which no frontend may take.
pub(super) fn frontends(c: &mut Checker, raw: &[RawFrontend], admin: SocketAddr) -> Vec<Frontend> {
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    let mut frontends = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        let k = format!("frontend[{i}]");
        c.name(&format!("{k}.name"), &f.name, &mut names, "frontend");
        frontends.extend(frontend(c, &k, f, &mut binds, admin));
    }
    frontends
}

/// One frontend; one whose `bind` does not parse is left out (reported), its limits unchecked.
fn frontend(
    c: &mut Checker,
    k: &str,
    f: &RawFrontend,
    binds: &mut HashSet<SocketAddr>,
    admin: SocketAddr,
) -> Option<Frontend> {
    let backlog = c.non_zero(&format!("{k}.backlog"), f.backlog, DEFAULT_BACKLOG);
    let bind = c.addr(&format!("{k}.bind"), &f.bind)?;
    bind_is_free(c, k, bind, binds, admin);
    let limits = limits(c, k, f);
    let who = format!("frontend {:?}", f.name);
    let tls = f.tls.as_ref().and_then(|t| tls(c, k, &who, t));
    let accept_proxy = accept_proxy(c, k, &who, f.accept_proxy.as_deref());
    Some(Frontend {
        accept_proxy,
        name: f.name.clone(),
        bind,
        backlog,
        limits,
        tls,
    })
}

/// `tls`: the files are read and the server configuration built now, so a missing file, a
/// PEM without a certificate or a key that does not fit the certificate is refused at load,
/// naming the frontend and the file; so is an SNI name a certificate is not valid for.
/// `who` names the section in messages (`frontend "mqtt"`, `broker "b1"`): a broker's TLS
/// listeners take the same table.
pub(super) fn tls(c: &mut Checker, k: &str, who: &str, t: &RawTls) -> Option<FrontendTls> {
    let alpn: Vec<String> = match &t.alpn {
        Some(list) => list.clone(),
        None => DEFAULT_TLS_ALPN.iter().map(|p| p.to_string()).collect(),
    };
    let ok = alpn_ok(c, &format!("{k}.tls"), &alpn);
    let (cert, key) = (PathBuf::from(&t.cert), PathBuf::from(&t.key));
    let default = identity(c, &format!("{k}.tls"), who, &cert, &key);
    let mut sni = Vec::new();
    let mut identities = Vec::new();
    let mut seen = HashSet::new();
    for (j, s) in t.sni.iter().enumerate() {
        let ks = format!("{k}.tls.sni[{j}]");
        let (cert, key) = (PathBuf::from(&s.cert), PathBuf::from(&s.key));
        let id = identity(c, &ks, who, &cert, &key);
        if s.names.is_empty() {
            c.error(format!("{ks}.names"), "lists no name");
        }
        for n in &s.names {
            if !seen.insert(n.to_ascii_lowercase()) {
                c.error(
                    format!("{ks}.names"),
                    format!("{who}: {n:?} is named by another tls.sni certificate"),
                );
            } else if let Some(Err(e)) = id.as_ref().map(|i| i.check_name(n)) {
                c.error(format!("{ks}.names"), format!("{who}: {e}"));
            }
        }
        identities.extend(id.map(|i| (s.names.clone(), i)));
        sni.push(SniCert {
            names: s.names.clone(),
            cert,
            key,
        });
    }
    let (client_auth, client_id_is_cn) = client_auth(c, k, who, t)?;
    let default = default?;
    if !ok || identities.len() != t.sni.len() {
        return None;
    }
    match crate::tls::server(default, identities, &alpn, client_auth.as_ref()) {
        Ok(server) => Some(FrontendTls {
            cert,
            key,
            alpn,
            sni,
            client_auth,
            client_id_is_cn,
            server,
        }),
        Err(e) => {
            c.error(format!("{k}.tls"), format!("{who}: {e}"));
            None
        }
    }
}

/// `tls.client_ca`, `tls.client_auth` (`required` by default) and `tls.client_id` (`any` by
/// default; `cn`: the CONNECT's client ID must be the certificate's CN). `None` after an
/// error (recorded).
fn client_auth(
    c: &mut Checker,
    k: &str,
    who: &str,
    t: &RawTls,
) -> Option<(Option<ClientAuth>, bool)> {
    let required = match t.client_auth.as_deref() {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => {
            c.error(
                format!("{k}.tls.client_auth"),
                format!("{who}: {other:?} is not \"required\" or \"optional\""),
            );
            return None;
        }
    };
    let client_id_is_cn = match t.client_id.as_deref() {
        None | Some("any") => false,
        Some("cn") => true,
        Some(other) => {
            c.error(
                format!("{k}.tls.client_id"),
                format!("{who}: {other:?} is not \"any\" or \"cn\""),
            );
            return None;
        }
    };
    let Some(ca) = &t.client_ca else {
        for (key, set) in [
            ("client_auth", t.client_auth.is_some()),
            ("client_id", client_id_is_cn),
        ] {
            if set {
                c.error(
                    format!("{k}.tls.{key}"),
                    format!("{who}: needs tls.client_ca, the CA of the client certificates"),
                );
                return None;
            }
        }
        return Some((None, false));
    };
    let auth = ClientAuth {
        ca: PathBuf::from(ca),
        required,
    };
    Some((Some(auth), client_id_is_cn))
}

/// Whether each of `k.alpn` is a protocol name ALPN can carry (1-255 bytes); reported if not.
pub(super) fn alpn_ok(c: &mut Checker, k: &str, alpn: &[String]) -> bool {
    let mut ok = true;
    for (j, p) in alpn.iter().enumerate() {
        if p.is_empty() || p.len() > MAX_ALPN_LEN {
            c.error(
                format!("{k}.alpn[{j}]"),
                format!("an ALPN protocol name is 1-{MAX_ALPN_LEN} bytes"),
            );
            ok = false;
        }
    }
    ok
}

/// One certificate and key of a `tls` table (at key `k`: a frontend's, a broker's, or a pool's
/// client certificate), read and checked; a problem is reported at `k.cert` or `k.key`,
/// whichever file it is in, after `who`.
pub(super) fn identity(
    c: &mut Checker,
    k: &str,
    who: &str,
    cert: &Path,
    key: &Path,
) -> Option<crate::tls::Identity> {
    match crate::tls::identity(cert, key) {
        Ok(id) => Some(id),
        Err(e) => {
            let which = match &e {
                TlsError::Read { file, .. }
                | TlsError::NoCertificate { file }
                | TlsError::Pem { file, .. }
                | TlsError::NoKey { file }
                    if file == key && key != cert =>
                {
                    "key"
                }
                TlsError::Rejected { .. } => "key",
                _ => "cert",
            };
            c.error(format!("{k}.{which}"), format!("{who}: {e}"));
            None
        }
    }
}

/// Cross-section: no two frontends, nor a frontend and `lb.admin`, on one address (port 0, an
/// ephemeral port, never clashes).
fn bind_is_free(
    c: &mut Checker,
    k: &str,
    bind: SocketAddr,
    binds: &mut HashSet<SocketAddr>,
    admin: SocketAddr,
) {
    if bind.port() != 0 && !binds.insert(bind) {
        c.error(
            format!("{k}.bind"),
            format!("address {bind} is used by another frontend"),
        );
    }
    if bind == admin && bind.port() != 0 {
        c.error(
            format!("{k}.bind"),
            format!("address {bind} is also lb.admin"),
        );
    }
}

/// `accept_proxy = ["10.0.0.0/8", "192.0.2.7"]`: CIDRs, or addresses (one host each), of a
/// frontend or a broker (`who`).
pub(super) fn accept_proxy(
    c: &mut Checker,
    k: &str,
    who: &str,
    list: Option<&[String]>,
) -> Vec<ipnet::IpNet> {
    let Some(list) = list else {
        return DEFAULT_ACCEPT_PROXY;
    };
    let mut nets = Vec::new();
    for (j, text) in list.iter().enumerate() {
        let parsed = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(n) if n.prefix_len() == 0 => {
                c.warn(
                    format!("{k}.accept_proxy[{j}]"),
                    format!(
                        "{who} trusts a PROXY header from every address: any client can claim any source"
                    ),
                );
                nets.push(n);
            }
            Ok(n) => nets.push(n),
            Err(_) => c.error(
                format!("{k}.accept_proxy[{j}]"),
                format!("{text:?} is not a CIDR (10.0.0.0/8, fd00::/8) or an IP address"),
            ),
        }
    }
    nets
}

fn limits(c: &mut Checker, k: &str, f: &RawFrontend) -> FrontendLimits {
    if f.source_burst.is_some() && f.source_rate.is_none() {
        c.error(format!("{k}.source_burst"), "needs source_rate");
    }
    let mut positive = |key: &str, v: Option<u32>| v.map(|n| c.positive(&format!("{k}.{key}"), n));
    FrontendLimits {
        max_connections: positive("max_connections", f.max_connections),
        max_connections_per_source: positive(
            "max_connections_per_source",
            f.max_connections_per_source,
        ),
        source_rate: positive("source_rate", f.source_rate).map(|per_second| SourceRate {
            per_second,
            burst: positive("source_burst", f.source_burst)
                .unwrap_or(default_source_burst(per_second)),
        }),
    }
}

/// Cross-section: a frontend no rule uses is not opened; `used` holds the names rules use.
pub(super) fn warn_unopened(c: &mut Checker, raw: &[RawFrontend], used: &HashSet<String>) {
    for f in raw {
        if !used.contains(&f.name) && !f.name.is_empty() {
            c.warn(
                "frontend",
                format!("frontend {:?} has no rule and is not opened", f.name),
            );
        }
    }
}
