//! HTTP/1.1 to the admin servers (the LB's API and metrics, a broker's http endpoint): the
//! harness's one HTTP client, and the LB API's answers read into plain values.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plain HTTP/1.1 request to the admin server; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_body(addr, method, path, b"").await
}

/// An HTTP/1.1 request with a body; returns (status, body).
pub async fn http_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    http_with_headers(addr, method, path, &[], body).await
}

/// An HTTP/1.1 request with extra headers and a body; returns (status, body).
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    http_request(addr, &addr.to_string(), method, path, headers, body).await
}

/// The one HTTP/1.1 client of the harness: `Host: host` (the address connected to, except in
/// the DNS-rebinding tests), extra headers, a body; returns (status, body).
pub async fn http_request(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    // The server may refuse an oversized body before reading it all.
    if let Err(e) = s.write_all(body).await {
        eprintln!("request body cut short: {e}");
    }
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .context("admin server did not answer in 5 s")??;
    let text = String::from_utf8(raw).context("admin reply not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status code")?;
    Ok((status, body.to_string()))
}

/// A `GET` reply read as JSON: an error unless the status is 200 and the body parses.
pub(crate) fn json_reply(
    path: &str,
    (status, body): (u16, String),
) -> anyhow::Result<serde_json::Value> {
    if status != 200 {
        bail!("GET {path}: status {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
}

/// `GET` a JSON document from the admin server.
pub async fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    json_reply(path, http(admin, "GET", path).await?)
}

/// Live connections through the LB by client ID, from `/api/connections`:
/// (client_id, backend, connection id).
pub async fn connections(admin: SocketAddr) -> anyhow::Result<Vec<(String, String, u64)>> {
    let v = get_json(admin, "/api/connections").await?;
    let arr = v.as_array().context("connections: not an array")?;
    Ok(arr
        .iter()
        .filter_map(|c| {
            Some((
                c["client_id"].as_str()?.to_string(),
                c["backend"].as_str()?.to_string(),
                c["id"].as_u64()?,
            ))
        })
        .filter(|(id, _, _)| !id.starts_with("mqlb-datapath-"))
        .collect())
}

/// Every backend's (id, state) from `/api/backends`; a state is `up`, `down` or `draining`.
pub async fn backend_states(admin: SocketAddr) -> anyhow::Result<Vec<(String, String)>> {
    let v = get_json(admin, "/api/backends").await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            Some((
                b["id"].as_str()?.to_string(),
                b["state"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// A backend's state (`up`, `down`, `draining`) from `/api/backends`.
pub async fn backend_state(admin: SocketAddr, id: &str) -> anyhow::Result<String> {
    backend_states(admin)
        .await?
        .into_iter()
        .find(|(b, _)| b == id)
        .map(|(_, state)| state)
        .with_context(|| format!("backend {id} not in /api/backends"))
}
