//! `[auth]`: MQTT authentication and ACLs of every broker node, in mosquitto's file formats
//! (the broker crate reads and decides them; this module only knows the keys).
//!
//! ```toml
//! [auth]
//! password_file = "/etc/mqlb/passwd"   # made with mosquitto_passwd ($7$ or $6$ hashes)
//! acl_file = "/etc/mqlb/acl"           # mosquitto's acl_file format
//! allow_anonymous = false              # default: true only if every bind is loopback
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::Problem;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub password_file: Option<String>,
    pub acl_file: Option<String>,
    pub allow_anonymous: Option<bool>,
}

/// MQTT authentication and authorisation, the same on every node (the file is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// `user:hash` lines as `mosquitto_passwd` writes them; `None`: logins are not checked.
    pub password_file: Option<PathBuf>,
    /// mosquitto's ACL format; `None`: every client may publish and subscribe to anything.
    pub acl_file: Option<PathBuf>,
    /// A CONNECT without a user name is accepted (also any login when there is no
    /// `password_file`: its user name is then taken as given, as mosquitto does).
    pub allow_anonymous: bool,
}

impl Default for AuthSettings {
    /// No files, anonymous clients allowed: what a broker without `[auth]` did before.
    fn default() -> Self {
        AuthSettings {
            password_file: None,
            acl_file: None,
            allow_anonymous: crate::defaults::DEFAULT_ALLOW_ANONYMOUS_WITHOUT_CONFIG,
        }
    }
}

/// `binds`: every address of the topology, keyed like the file. Returns the settings and the
/// (errors, warnings) found.
pub(crate) fn validate(
    raw: &RawAuth,
    binds: &[(String, SocketAddr)],
) -> (AuthSettings, Vec<Problem>, Vec<Problem>) {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut file = |key: &str, path: &Option<String>| {
        let path = path.as_ref()?;
        if let Err(e) = std::fs::metadata(path) {
            errors.push(Problem {
                key: key.into(),
                message: format!("cannot read {path:?}: {e}"),
                line: None,
            });
        }
        Some(PathBuf::from(path))
    };
    let password_file = file("auth.password_file", &raw.password_file);
    let acl_file = file("auth.acl_file", &raw.acl_file);
    let exposed = binds.iter().find(|(_, a)| !a.ip().is_loopback());
    let allow_anonymous = raw
        .allow_anonymous
        .unwrap_or(crate::defaults::default_allow_anonymous(exposed.is_none()));
    if let (true, Some((key, addr))) = (allow_anonymous, exposed) {
        warnings.push(Problem {
            key: "auth.allow_anonymous".into(),
            message: format!(
                "is true and {key} ({addr}) is not loopback: clients without a user name (and, without auth.password_file, any user name) can connect"
            ),
            line: None,
        });
    }
    (
        AuthSettings {
            password_file,
            acl_file,
            allow_anonymous,
        },
        errors,
        warnings,
    )
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const LOOPBACK: &str = "[[broker]]\nid = \"b1\"\nmqtt = \"127.0.0.1:1883\"\n";
    const EXPOSED: &str = "[[broker]]\nid = \"b1\"\nmqtt = \"0.0.0.0:1883\"\n";

    fn warned(c: &Config) -> bool {
        c.warnings.iter().any(|w| w.key == "auth.allow_anonymous")
    }

    #[test]
    fn allow_anonymous_defaults_to_loopback_only_and_is_warned_when_exposed() {
        let c = Config::parse(LOOPBACK, "t.toml").expect("valid");
        assert!(
            c.auth.allow_anonymous && !warned(&c),
            "the quick start stays open"
        );
        let c = Config::parse(EXPOSED, "t.toml").expect("valid");
        assert!(
            !c.auth.allow_anonymous && !warned(&c),
            "closed off loopback"
        );
        let text = format!("{EXPOSED}[auth]\nallow_anonymous = true\n");
        let c = Config::parse(&text, "t.toml").expect("valid with a warning");
        assert!(c.auth.allow_anonymous && warned(&c));
    }

    #[test]
    fn missing_files_and_unknown_keys_are_refused() {
        let text = format!("{LOOPBACK}[auth]\npassword_file = \"/nonexistent/passwd\"\n");
        let e = Config::parse(&text, "t.toml").expect_err("refused");
        assert!(e.to_string().contains("auth.password_file"), "{e}");
        let text = format!("{LOOPBACK}[auth]\npasword_file = \"x\"\n");
        assert!(Config::parse(&text, "t.toml").is_err());
    }
}
