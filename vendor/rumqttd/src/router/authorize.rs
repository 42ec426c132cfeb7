//! mqlb patch: authentication and authorisation hooks (MQTT-3.1.4-2/-3 refusing a CONNECT,
//! MQTT-3.3.5-2 a PUBLISH the client may not send, MQTT-3.9.3-1 per-filter SUBACK failure codes;
//! read access is checked at delivery as mosquitto does). rumqttd 0.20 has only a static
//! user/password map or an async callback, and nothing for topics. The decisions themselves
//! are the embedder's (`ConnectionSettings::authorizer`); rumqttd calls them at the points
//! where the MQTT rules put them.

use std::fmt;
use std::sync::Arc;

use crate::protocol::Login;

/// What a client wants to do with a topic (or, for `Subscribe`, a topic filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Send a PUBLISH (or set a last will) on this topic.
    Publish,
    /// SUBSCRIBE to this filter (without any `$share/group/` prefix).
    Subscribe,
    /// Receive a message published on this topic.
    Deliver,
}

/// The embedder's decisions. Called on the router thread for `authorize`, so both must be
/// quick and must not block.
pub trait Authorizer: Send + Sync + 'static {
    /// Whether a CONNECT with this client ID and login (if any) may connect.
    fn authenticate(&self, client_id: &str, login: Option<&Login>) -> bool;
    /// Whether the client may do `access` on `topic`.
    fn authorize(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
    ) -> bool;
}

/// Who a connection is, kept with it in the router so every later decision is about the
/// same client.
#[derive(Clone)]
pub struct ConnectionAcl {
    pub authorizer: Arc<dyn Authorizer>,
    pub client_id: String,
    pub username: Option<String>,
}

impl ConnectionAcl {
    pub fn allows(&self, access: Access, topic: &str) -> bool {
        self.authorizer
            .authorize(&self.client_id, self.username.as_deref(), access, topic)
    }
}

impl fmt::Debug for ConnectionAcl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionAcl")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .finish()
    }
}
