//! An HTTP/1.1 request with a `Host` header of the test's choosing (the other helpers always
//! send the address they connect to), for the DNS-rebinding checks of the LB admin API and a
//! broker's http endpoint.

use std::net::SocketAddr;

/// Sends `method path` to `addr` with `Host: host` and `headers`, no body; returns the status.
pub async fn http_host(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<u16> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(crate::http_request(addr, host, method, path, &headers, b"")
        .await?
        .0)
}
