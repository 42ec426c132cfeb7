//! The first step of a connection on a client-ID rule: read the client's first bytes until
//! the CONNECT's client ID is known, they prove not to be MQTT, or a limit (bytes, time) is
//! hit. I/O only; what to make of it is [`super::route`]'s.

use mqlb_config::{Distribution, Rule};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::mqtt::{self, parse_connect, ConnectError, ProtocolLevel, Refusal};

/// What the first bytes were.
#[derive(Debug)]
pub(crate) enum Inspection {
    /// The rule does not read the CONNECT (a tuple distribution).
    NotRead,
    /// A CONNECT; its client ID may be empty.
    Connect {
        level: ProtocolLevel,
        client_id: String,
    },
    /// A TLS ClientHello (an `sni` rule), with the server name it asks for, if any.
    Hello { sni: Option<String> },
    /// Bytes that are not MQTT.
    NotMqtt(ConnectError),
    /// MQTT the LB cannot use: it is refused whatever the rule says.
    Unusable(InspectFail),
}

impl Inspection {
    /// The client's MQTT version, once known.
    pub(crate) fn level(&self) -> Option<ProtocolLevel> {
        match self {
            Inspection::Connect { level, .. } => Some(*level),
            _ => None,
        }
    }
}

/// Why the inspection gave up; the `reason` label of `mqlb_mqtt_connect_errors_total`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InspectFail {
    /// A CONNECT the LB must refuse (the level, once it was read).
    #[error("{0}")]
    Parse(ConnectError, Option<ProtocolLevel>),
    /// The client ID had not ended within the limit (the level, once it was read).
    #[error("no client ID within the inspect byte limit")]
    Oversized(Option<ProtocolLevel>),
    #[error("no CONNECT within the inspect timeout")]
    Timeout,
    #[error("client closed before its CONNECT was complete")]
    Eof,
    #[error("reading the CONNECT: {0}")]
    Io(std::io::Error),
    /// An `sni` rule's first bytes are not a TLS ClientHello.
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
}

impl InspectFail {
    /// What the client is told before the close, if its version has a word for it.
    pub(crate) fn refusal(&self) -> Option<&'static [u8]> {
        let (level, why) = match self {
            InspectFail::Parse(ConnectError::UnsupportedLevel(_), _) => {
                (ProtocolLevel::V311, Refusal::UnsupportedVersion)
            }
            InspectFail::Parse(ConnectError::Malformed(_), level) => {
                ((*level)?, Refusal::Malformed)
            }
            InspectFail::Parse(ConnectError::Protocol(_), level) => {
                ((*level)?, Refusal::ProtocolError)
            }
            InspectFail::Oversized(level) => ((*level)?, Refusal::PacketTooLarge),
            _ => return None,
        };
        mqtt::connack(level, why)
    }

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            InspectFail::Parse(e, _) => e.reason(),
            InspectFail::Oversized(_) => "oversized",
            InspectFail::Timeout => "timeout",
            InspectFail::Eof => "eof",
            InspectFail::Io(_) => "io_error",
            InspectFail::NotTls(_) => "not_tls",
        }
    }
}

/// Reads what `rule` needs to route: nothing for a tuple distribution, the CONNECT (by
/// `deadline`, the connection's start plus `inspect_timeout`, and within `inspect_max_bytes`)
/// for a client-ID one. Returns the bytes read, which are replayed to the backend. `client` is
/// the plain stream or the decrypted one of a TLS frontend; `early` the client's bytes read
/// already (past a PROXY header), which come first.
pub(crate) async fn inspect(
    rule: &Rule,
    client: &mut (impl AsyncRead + Unpin),
    deadline: Instant,
    early: Vec<u8>,
) -> (Vec<u8>, Inspection) {
    let max = rule.inspect_max_bytes as usize;
    match rule.distribution {
        Distribution::MqttClientId => {}
        Distribution::Sni => {
            let read = tokio::time::timeout_at(deadline, read_client_hello(client, max, early))
                .await
                .unwrap_or(Err(InspectFail::Timeout));
            return match read {
                Ok((buf, sni)) => (buf, Inspection::Hello { sni }),
                Err(fail) => (Vec::new(), Inspection::Unusable(fail)),
            };
        }
        _ => return (early, Inspection::NotRead),
    }
    let read = tokio::time::timeout_at(deadline, read_connect(client, max, early))
        .await
        .unwrap_or(Err(InspectFail::Timeout));
    match read {
        Ok((buf, Ok(c))) => (
            buf,
            Inspection::Connect {
                level: c.level,
                client_id: c.client_id,
            },
        ),
        Ok((buf, Err(e))) => (buf, Inspection::NotMqtt(e)),
        Err(fail) => (Vec::new(), Inspection::Unusable(fail)),
    }
}

/// One read of the client's next bytes onto `buf` (through `chunk`), no further than
/// `max_bytes` in all; the client closing is [`InspectFail::Eof`].
async fn read_more(
    client: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    max_bytes: usize,
) -> Result<(), InspectFail> {
    let room = max_bytes.saturating_sub(buf.len()).min(chunk.len());
    let n = client
        .read(&mut chunk[..room])
        .await
        .map_err(InspectFail::Io)?;
    if n == 0 {
        return Err(InspectFail::Eof);
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads a TLS ClientHello (rustls's `Acceptor` parses it; the handshake is not answered) and
/// returns the bytes read, to be passed through, and its server name: until the ClientHello
/// is whole, the bytes prove not to be one, or `max_bytes` are read.
async fn read_client_hello(
    client: &mut (impl AsyncRead + Unpin),
    max_bytes: usize,
    early: Vec<u8>,
) -> Result<(Vec<u8>, Option<String>), InspectFail> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = early;
    let mut fed = 0;
    let mut chunk = vec![0u8; 1024];
    let mut read_first = buf.is_empty();
    loop {
        if read_first {
            read_more(client, &mut buf, &mut chunk, max_bytes).await?;
        }
        read_first = true;
        let mut new = &buf[fed..];
        // Bounded: each call takes bytes, or stops at 0.
        while !new.is_empty() {
            match acceptor.read_tls(&mut new) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(InspectFail::NotTls(e.to_string())),
            }
        }
        fed = buf.len() - new.len();
        match acceptor.accept() {
            Ok(Some(hello)) => {
                let sni = hello.client_hello().server_name().map(str::to_owned);
                return Ok((buf, sni));
            }
            Ok(None) if buf.len() >= max_bytes => return Err(InspectFail::Oversized(None)),
            Ok(None) => {}
            Err((e, _)) => return Err(InspectFail::NotTls(e.to_string())),
        }
    }
}

/// Reads until the client ID is known, the bytes prove not to be a CONNECT, or a limit is hit.
async fn read_connect(
    client: &mut (impl AsyncRead + Unpin),
    max_bytes: usize,
    early: Vec<u8>,
) -> Result<(Vec<u8>, Result<mqtt::Connect, ConnectError>), InspectFail> {
    let mut buf = early;
    buf.reserve(256.min(max_bytes.saturating_sub(buf.len())));
    // On the heap, not in the task: the task lives as long as the connection.
    let mut chunk = vec![0u8; 1024];
    // Early bytes are looked at before any read: they may hold the whole CONNECT.
    let mut read_first = buf.is_empty();
    loop {
        if read_first {
            read_more(client, &mut buf, &mut chunk, max_bytes).await?;
        }
        read_first = true;
        match parse_connect(&buf) {
            Ok(Some(c)) => return Ok((buf, Ok(c))),
            Ok(None) if buf.len() >= max_bytes => {
                return Err(InspectFail::Oversized(mqtt::level_of(&buf)))
            }
            Ok(None) => {}
            Err(e @ ConnectError::NotMqtt(_)) => return Ok((buf, Err(e))),
            Err(e) => return Err(InspectFail::Parse(e, mqtt::level_of(&buf))),
        }
    }
}
