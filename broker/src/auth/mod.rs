//! MQTT authentication and authorisation of a node's clients, from mosquitto's files
//! (docs/design.md, "Security"): [`passwd`] checks logins, [`acl`] decides topics; both are pure.
//! [`Auth`] holds the current pair behind one `ArcSwap` and is the `rumqttd::Authorizer` of
//! every listener, so rumqttd asks it at CONNECT, PUBLISH, SUBSCRIBE and each delivery
//! (vendor/rumqttd/PATCHED.md). [`crate::tap`] asks it too before a publish goes to the mesh:
//! a publish the ACL refuses reaches no node. A reload swaps both files at once or neither,
//! and touches no connection: the next decision uses the new files.

pub mod acl;
pub mod passwd;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use mqlb_config::AuthSettings;
use rumqttd::protocol::Login;
use rumqttd::{Access, Authorizer};

use crate::metrics::Metrics;
use crate::watchdog;
use acl::{Acl, AclError, Check};
use passwd::{PasswdError, PasswordFile};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.password_file {path:?}: cannot read: {source}")]
    ReadPasswords {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.password_file {path:?}: {source}")]
    Passwords {
        path: PathBuf,
        #[source]
        source: PasswdError,
    },
    #[error("auth.acl_file {path:?}: cannot read: {source}")]
    ReadAcl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.acl_file {path:?}: {source}")]
    Acl {
        path: PathBuf,
        #[source]
        source: AclError,
    },
}

/// The files as last loaded.
#[derive(Debug, Default)]
struct Files {
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
}

fn load(settings: &AuthSettings) -> Result<Files, AuthError> {
    let read = |p: &Path| std::fs::read_to_string(p);
    let passwords = match &settings.password_file {
        None => None,
        Some(path) => {
            let text = read(path).map_err(|source| AuthError::ReadPasswords {
                path: path.clone(),
                source,
            })?;
            Some(
                PasswordFile::parse(&text).map_err(|source| AuthError::Passwords {
                    path: path.clone(),
                    source,
                })?,
            )
        }
    };
    let acl = match &settings.acl_file {
        None => None,
        Some(path) => {
            let text = read(path).map_err(|source| AuthError::ReadAcl {
                path: path.clone(),
                source,
            })?;
            Some(Acl::parse(&text).map_err(|source| AuthError::Acl {
                path: path.clone(),
                source,
            })?)
        }
    };
    Ok(Files { passwords, acl })
}

/// At most one log line per second for refusals (each is counted in metrics).
struct Quiet(AtomicU64);

impl Quiet {
    fn ready(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.swap(now, Ordering::Relaxed) != now
    }
}

/// A node's logins and ACL.
pub struct Auth {
    settings: AuthSettings,
    files: ArcSwap<Files>,
    metrics: Arc<Metrics>,
    quiet: Quiet,
}

impl Auth {
    /// Reads the files of `settings`; an unreadable or malformed one is an error.
    pub(crate) fn load(settings: AuthSettings, metrics: Arc<Metrics>) -> Result<Auth, AuthError> {
        let files = load(&settings)?;
        Ok(Auth {
            settings,
            files: ArcSwap::from_pointee(files),
            metrics,
            quiet: Quiet(AtomicU64::new(0)),
        })
    }

    /// Whether anything is checked at all (else rumqttd is not asked).
    pub(crate) fn is_active(&self) -> bool {
        self.settings.password_file.is_some()
            || self.settings.acl_file.is_some()
            || !self.settings.allow_anonymous
    }

    /// Reads both files again and takes them together; on an error the old ones stay.
    pub fn reload(&self) -> Result<(), AuthError> {
        match load(&self.settings) {
            Ok(files) => {
                tracing::info!(
                    users = files.passwords.as_ref().map_or(0, PasswordFile::len),
                    acl = files.acl.is_some(),
                    "reloaded auth.password_file and auth.acl_file"
                );
                self.files.store(Arc::new(files));
                self.metrics.auth_reloads.with_label_values(&["ok"]).inc();
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "auth files not reloaded; the previous ones stay");
                self.metrics
                    .auth_reloads
                    .with_label_values(&["error"])
                    .inc();
                Err(e)
            }
        }
    }

    fn refused(&self, what: &'static str, client_id: &str, user: Option<&str>, topic: &str) {
        self.metrics.auth_refused.with_label_values(&[what]).inc();
        if self.quiet.ready() {
            tracing::info!(
                what,
                client_id,
                user,
                topic,
                "refused by [auth] (further refusals this second are only counted)"
            );
        } else {
            tracing::debug!(what, client_id, user, topic, "refused by [auth]");
        }
    }

    /// The write (publish) decision, also for the mesh forward in [`crate::tap`].
    pub(crate) fn may_publish(&self, client_id: &str, user: Option<&str>, topic: &str) -> bool {
        self.authorize(client_id, user, Access::Publish, topic)
    }
}

impl Authorizer for Auth {
    fn authenticate(&self, client_id: &str, login: Option<&Login>) -> bool {
        if login.is_some_and(|l| {
            l.username == watchdog::SELF_CHECK_USER
                && bool::from(
                    l.password
                        .as_bytes()
                        .ct_eq(watchdog::self_check_password().as_bytes()),
                )
        }) {
            return true; // the node's own listener check; it publishes nothing
        }
        let files = self.files.load();
        let ok = match (login, &files.passwords) {
            (Some(l), Some(p)) => p.verify(&l.username, l.password.as_bytes()),
            // Without a password file a user name cannot be checked: it is taken as given
            // (mosquitto does the same) when anonymous clients are allowed.
            (Some(_), None) | (None, _) => self.settings.allow_anonymous,
        };
        if !ok {
            let user = login.map(|l| l.username.as_str());
            self.refused("connect", client_id, user, "");
        }
        ok
    }

    fn authorize(&self, client_id: &str, user: Option<&str>, access: Access, topic: &str) -> bool {
        let files = self.files.load();
        let Some(acl) = &files.acl else {
            return true;
        };
        let (check, what) = match access {
            Access::Publish => (Check::Write, "publish"),
            Access::Subscribe => (Check::Subscribe, "subscribe"),
            Access::Deliver => (Check::Read, "deliver"),
        };
        let ok = acl.allowed(user, client_id, topic, check);
        if !ok {
            self.refused(what, client_id, user, topic);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mqlb-auth-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    const BOB: &str = "bob:$6$DWUV04zXJ3TO6DWL$LRcWPI/06UX/Wwe1c77QQzxGM6E3MOfBgymR91Fj8jHT03O1lDqFoyasR6Y/hb4v0xTlk121/XkVAzHhdCedow==\n";

    fn login(user: &str, pass: &str) -> Login {
        Login {
            username: user.into(),
            password: pass.into(),
        }
    }

    #[test]
    fn a_bad_file_on_reload_keeps_the_old_ones() {
        let pw = temp("passwd", BOB);
        let acl = temp("acl", "user bob\ntopic bob/#\n");
        let settings = AuthSettings {
            password_file: Some(pw.clone()),
            acl_file: Some(acl.clone()),
            allow_anonymous: false,
        };
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let auth = Auth::load(settings, metrics).expect("loads");
        assert!(auth.authenticate("c", Some(&login("bob", "hunter2"))));
        assert!(!auth.authenticate("c", Some(&login("bob", "nope"))));
        assert!(!auth.authenticate("c", None), "anonymous refused");
        assert!(auth.authorize("c", Some("bob"), Access::Publish, "bob/x"));
        assert!(!auth.authorize("c", Some("bob"), Access::Publish, "alice/x"));

        std::fs::write(&acl, "topci bob/#\n").expect("write");
        assert!(matches!(auth.reload(), Err(AuthError::Acl { .. })));
        assert!(
            auth.authorize("c", Some("bob"), Access::Publish, "bob/x"),
            "old ACL stays"
        );

        std::fs::write(&pw, "bob:plain\n").expect("write");
        std::fs::write(&acl, "user bob\ntopic alice/#\n").expect("write");
        assert!(matches!(auth.reload(), Err(AuthError::Passwords { .. })));
        assert!(
            auth.authorize("c", Some("bob"), Access::Publish, "bob/x"),
            "neither is taken"
        );

        std::fs::write(&pw, BOB).expect("write");
        auth.reload().expect("reloads");
        assert!(auth.authorize("c", Some("bob"), Access::Publish, "alice/x"));
        assert!(!auth.authorize("c", Some("bob"), Access::Publish, "bob/x"));
    }

    #[test]
    fn without_files_only_allow_anonymous_decides() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let open = Auth::load(AuthSettings::default(), metrics.clone()).expect("loads");
        assert!(!open.is_active());
        assert!(open.authenticate("c", None));
        assert!(open.authenticate("c", Some(&login("anyone", "x"))));
        assert!(open.authorize("c", None, Access::Subscribe, "#"));
        let closed = Auth::load(
            AuthSettings {
                allow_anonymous: false,
                ..AuthSettings::default()
            },
            metrics,
        )
        .expect("loads");
        assert!(closed.is_active());
        assert!(!closed.authenticate("c", None));
    }
}
