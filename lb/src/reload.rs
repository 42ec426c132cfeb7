//! Reload planning and the config-file watcher. The plan (which listeners to keep, open and
//! close) is a pure function of the old and new frontends, unit-tested; applying it is
//! [`crate::Lb::apply`]'s job.

use std::path::PathBuf;
use std::time::Duration;

use mqlb_config::{Config, Frontend};

/// What a reload does to listening sockets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListenerPlan {
    /// Frontends whose socket is kept as it is (same name, address and backlog).
    pub keep: Vec<String>,
    /// Frontends whose socket is kept with a new listen backlog (`listen(2)` again on the
    /// open socket): re-creating it would close the port, however briefly.
    pub resize: Vec<Frontend>,
    /// Frontends to bind (new, or moved to another address).
    pub open: Vec<Frontend>,
    /// Frontends whose socket is closed (removed, moved, or left without a rule).
    pub close: Vec<String>,
}

/// Frontends that are opened: those a rule uses (validation warns about the others).
pub fn served_frontends(config: &Config) -> Vec<Frontend> {
    config
        .frontends
        .iter()
        .filter(|f| config.rules.iter().any(|r| r.frontend == f.name))
        .cloned()
        .collect()
}

/// Plans the listener changes from the frontends open now to those `new` serves.
pub fn plan_listeners(open_now: &[Frontend], new: &Config) -> ListenerPlan {
    let wanted = served_frontends(new);
    let mut plan = ListenerPlan::default();
    for f in &wanted {
        match open_now.iter().find(|o| o.name == f.name) {
            Some(o) if o == f => plan.keep.push(f.name.clone()),
            Some(o) if o.bind == f.bind => plan.resize.push(f.clone()),
            Some(o) => {
                plan.close.push(o.name.clone());
                plan.open.push(f.clone());
            }
            None => plan.open.push(f.clone()),
        }
    }
    for o in open_now {
        if !wanted.iter().any(|f| f.name == o.name) {
            plan.close.push(o.name.clone());
        }
    }
    plan
}

/// The files a reload reads besides the config file and that the watcher follows too: the
/// frontends' TLS certificates and keys, the pools' CA files and client certificates, so a
/// certificate renewed in place (certbot, a secrets agent) is taken without a SIGHUP.
pub(crate) fn watched_files(config: &Config) -> Vec<PathBuf> {
    let frontends = config
        .frontends
        .iter()
        .filter_map(|f| f.tls.as_ref())
        .flat_map(|t| {
            let sni = t.sni.iter().flat_map(|s| [s.cert.clone(), s.key.clone()]);
            let ca = t.client_auth.iter().map(|a| a.ca.clone());
            [t.cert.clone(), t.key.clone()]
                .into_iter()
                .chain(sni)
                .chain(ca)
        });
    let pools = config
        .pools
        .iter()
        .filter_map(|p| p.tls.as_ref())
        .flat_map(|t| [Some(t.ca.clone()), t.cert.clone(), t.key.clone()])
        .flatten();
    frontends.chain(pools).collect()
}

/// A cheap fingerprint of the config file and the `also` files it names: changes when any
/// content does. Polling this is portable and needs no inotify dependency; the files are
/// small. `None` when the config file cannot be read; an unreadable `also` file is a change
/// of its own, so its reload is tried and refused with the file named.
pub(crate) fn fingerprint(path: &PathBuf, also: &[PathBuf]) -> Option<u64> {
    use crate::select::{fnv1a, mix64};
    let bytes = std::fs::read(path).ok()?;
    let mut h = fnv1a(&bytes);
    for f in also {
        let part = std::fs::read(f).map_or(u64::MAX, |b| fnv1a(&b));
        h = mix64(h.rotate_left(5) ^ part);
    }
    Some(h)
}

/// Whether the watcher should load the file whose content it now sees (`now`): readable, not
/// the content it last tried (a refused file waits for its next change), and not what is
/// loaded already (a SIGHUP may have loaded it since: it is not loaded twice).
pub(crate) fn file_changed(now: Option<u64>, tried: Option<u64>, loaded: Option<u64>) -> bool {
    now.is_some() && now != tried && now != loaded
}

/// The interval a watcher polls at; at least 100 ms so a typo cannot make it spin.
pub(crate) fn poll_interval(config: &Config) -> Duration {
    config.lb.watch_interval.max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(frontends: &[(&str, &str)], ruled: &[&str]) -> Config {
        let mut t = String::new();
        for (name, bind) in frontends {
            t += &format!("[[frontend]]\nname = \"{name}\"\nbind = \"{bind}\"\n");
        }
        t += "[[pool]]\nname = \"p\"\n[[pool.backend]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\n";
        for f in ruled {
            t += &format!("[[rule]]\nname = \"r-{f}\"\nfrontend = \"{f}\"\npool = \"p\"\n");
        }
        Config::parse(&t, "test").expect("valid")
    }

    #[test]
    fn unchanged_frontends_are_kept() {
        let a = cfg(
            &[("x", "127.0.0.1:1000"), ("y", "127.0.0.1:1001")],
            &["x", "y"],
        );
        let plan = plan_listeners(&served_frontends(&a), &a);
        assert_eq!(plan.keep, vec!["x", "y"]);
        assert!(plan.open.is_empty() && plan.close.is_empty());
    }

    #[test]
    fn added_moved_and_removed_frontends() {
        let old = cfg(
            &[("x", "127.0.0.1:1000"), ("y", "127.0.0.1:1001")],
            &["x", "y"],
        );
        let new = cfg(
            &[("x", "127.0.0.1:2000"), ("z", "127.0.0.1:1002")],
            &["x", "z"],
        );
        let plan = plan_listeners(&served_frontends(&old), &new);
        assert!(plan.keep.is_empty());
        let opened: Vec<_> = plan.open.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(opened, vec!["x", "z"]);
        assert_eq!(plan.close, vec!["x", "y"]);
    }

    #[test]
    fn a_frontend_that_loses_its_rule_is_closed() {
        let old = cfg(
            &[("x", "127.0.0.1:1000"), ("y", "127.0.0.1:1001")],
            &["x", "y"],
        );
        let new = cfg(&[("x", "127.0.0.1:1000"), ("y", "127.0.0.1:1001")], &["x"]);
        let plan = plan_listeners(&served_frontends(&old), &new);
        assert_eq!(plan.keep, vec!["x"]);
        assert_eq!(plan.close, vec!["y"]);
        assert!(plan.open.is_empty());
    }

    #[test]
    fn the_watcher_loads_each_new_content_once() {
        let (a, b, c) = (Some(1), Some(2), Some(3));
        assert!(file_changed(b, a, a), "a change is loaded");
        assert!(
            !file_changed(b, a, b),
            "not when a SIGHUP loaded it already"
        );
        assert!(
            !file_changed(b, b, a),
            "a refused content waits for its next change"
        );
        assert!(file_changed(c, b, a), "which is loaded");
        assert!(
            !file_changed(None, a, a),
            "an unreadable file is not loaded"
        );
    }

    #[test]
    fn the_fingerprint_follows_the_files_the_config_names() {
        let dir = tempfile::tempdir().expect("dir");
        let (config, cert) = (dir.path().join("c.toml"), dir.path().join("chain.pem"));
        std::fs::write(&config, "x").expect("write");
        std::fs::write(&cert, "one").expect("write");
        let also = [cert.clone()];
        let a = fingerprint(&config, &also);
        assert!(a.is_some());
        assert_eq!(a, fingerprint(&config, &also), "same content, same print");
        assert_ne!(a, fingerprint(&config, &[]));
        std::fs::write(&cert, "two").expect("write");
        let b = fingerprint(&config, &also);
        assert_ne!(a, b, "a rotated certificate is a change");
        std::fs::remove_file(&cert).expect("remove");
        let gone = fingerprint(&config, &also);
        assert!(gone.is_some() && gone != b, "so is a removed one");
        std::fs::remove_file(&config).expect("remove");
        assert_eq!(fingerprint(&config, &also), None);
    }

    /// The watcher follows the files a pool's `tls` names too: a rotated client certificate or
    /// CA is taken without a SIGHUP.
    #[test]
    fn the_watched_files_include_the_pools_tls_files() {
        let dir = tempfile::tempdir().expect("dir");
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, signing_key.serialize_pem()).expect("write");
        let text = format!(
            "[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:1000\"\n\
             [[pool]]\nname = \"p\"\ntls = {{ ca = {c:?}, cert = {c:?}, key = {k:?} }}\n\
             [[pool.backend]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n"
        );
        let config = Config::parse(&text, "test").expect("valid");
        assert_eq!(watched_files(&config), [c.clone(), c, k]);
    }

    #[test]
    fn a_new_backlog_on_the_same_address_keeps_the_socket() {
        let old = cfg(&[("x", "127.0.0.1:1000")], &["x"]);
        let mut new = old.clone();
        new.frontends[0].backlog = std::num::NonZeroU32::new(4096).expect("non-zero");
        let plan = plan_listeners(&served_frontends(&old), &new);
        assert_eq!(plan.resize, new.frontends);
        assert!(plan.open.is_empty() && plan.close.is_empty() && plan.keep.is_empty());
    }
}
