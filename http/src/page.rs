//! The status pages of the LB admin, the HA server and a broker node (`GET /`): one
//! self-contained HTML page each, no CDN, readable offline, refreshing itself from the
//! server's JSON APIs. Each server gives its markup and script; this module adds the shared
//! style and script and the response headers, so the three look and behave alike.
//!
//! Access (docs/design.md, "Security"): the page is a static shell with no data in it, so it
//! is served without a token, like `/healthz`; what it shows comes from the APIs, which keep
//! their rules. Off loopback the page asks for the bearer token, keeps it in the tab's
//! `sessionStorage` (gone with the tab) and sends it as `Authorization`, the way Consul's and
//! Nomad's UIs do; a link cannot carry it. Its requests are same-origin GETs, which carry no
//! `Origin`, so [`crate::access`] still refuses every cross-site request. The page
//! itself may not be framed (clickjacking) and runs only its own inline script: the CSP
//! names the script's and the style's SHA-256, computed here from what is served. Its icon
//! is inline too: a browser asking the HA server for `/favicon.ico` is an unsigned request,
//! counted as an authentication failure.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use sha2::{Digest, Sha256};

/// The style every page shares.
pub const STYLE: &str = include_str!("page/style.css");
/// Helpers every page's script starts with: authorised fetch, the token form, formatting.
pub const COMMON_SCRIPT: &str = include_str!("page/common.js");

/// A page ready to serve: its HTML and its Content-Security-Policy.
#[derive(Debug, Clone)]
pub struct Page {
    html: String,
    csp: String,
}

impl Page {
    /// `markup` is the page's `<body>` content; `title` its title; `script` its own script,
    /// run after [`COMMON_SCRIPT`].
    pub fn new(title: &str, markup: &str, script: &str) -> Page {
        let script = format!("{COMMON_SCRIPT}\n{script}");
        let html = format!(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <link rel=\"icon\" href=\"data:,\">\n<title>{title}</title>\n<style>{STYLE}</style>\n\
             </head>\n<body>\n{markup}\n\
             <script>{script}</script>\n</body>\n</html>\n"
        );
        let csp = format!(
            "default-src 'none'; connect-src 'self'; img-src 'self' data:; \
             script-src 'sha256-{}'; style-src 'sha256-{}'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            base64(&Sha256::digest(script.as_bytes())),
            base64(&Sha256::digest(STYLE.as_bytes())),
        );
        Page { html, csp }
    }

    pub fn html(&self) -> &str {
        &self.html
    }

    /// The 200 answer: the page, not cached (it changes with the binary), never framed.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(Bytes::from(self.html.clone())));
        *res.status_mut() = StatusCode::OK;
        let h = res.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(&self.csp) {
            h.insert("content-security-policy", v);
        }
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        res
    }
}

/// Standard base64 with padding (the CSP's hash source syntax).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc, "{raw:?}");
        }
    }

    #[test]
    fn the_csp_allows_exactly_the_script_and_style_served() {
        let page = Page::new("t", "<p id=x></p>", "show();");
        let res = page.response();
        let csp = res.headers()["content-security-policy"]
            .to_str()
            .expect("ascii");
        let script = format!("{COMMON_SCRIPT}\nshow();");
        let want = base64(&Sha256::digest(script.as_bytes()));
        assert!(
            csp.contains(&format!("script-src 'sha256-{want}'")),
            "{csp}"
        );
        assert!(page.html().contains(&format!("<script>{script}</script>")));
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(res.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    }
}
