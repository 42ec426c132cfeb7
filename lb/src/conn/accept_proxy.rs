//! The first step of a connection from a source its frontend trusts (`accept_proxy`, another
//! LB in front): its PROXY header, read on the connection's own task by the deadline that also
//! bounds the TLS handshake and the CONNECT, before either. The address it carries becomes the
//! connection's client for everything after (routing, limits, the connection table, logs).
//! The read and the parse are [`mqlb_config::proxy`]'s, shared with the broker nodes.
//!
//! What the client sent past the header in the same read is handed on: to the TLS handshake,
//! or to the inspection of the CONNECT (and the replay), so nothing is read twice or lost.

pub(crate) use mqlb_config::proxy::{read, HeaderFail};
