//! mosquitto's `acl_file` format, parsed and decided. Pure: text in, decisions out.
//!
//! ```text
//! # lines before any `user` line apply to clients without a user name
//! topic read $SYS/#
//! user alice                       # the following topic lines are alice's
//! topic sensors/#                  # no access word: readwrite
//! topic write commands/+
//! topic deny sensors/secret/#      # deny wins over any grant
//! pattern readwrite devices/%c/#   # every client, %c: its client ID, %u: its user name
//! ```
//!
//! As in mosquitto: a client with a user name gets that user's `topic` lines (none if the file
//! has no section for it); a client without one gets the lines before the first `user`;
//! `pattern` lines apply to every client wherever they stand; `deny` is checked before any
//! grant; nothing granted is refused; `+` and `#` match as in subscriptions, and a wildcard at
//! the first level does not match a `$` topic (MQTT-4.7.2-1). A pattern whose `%u` or `%c`
//! would expand to a value holding `+`, `#` or `/` is skipped (a user named `a/b` must not
//! reach into user `a`'s `users/a/#`); a `deny` pattern in that case denies everything.
//!
//! Read access is decided per message at delivery ([`Check::Read`]). A SUBSCRIBE
//! ([`Check::Subscribe`]) is refused when no topic it could match is readable (no read grant
//! overlaps the filter) or a `deny` line covers all of it; mosquitto accepts every
//! subscription and only filters deliveries, which a client cannot tell from a topic that is
//! quiet. Either way a `#` subscriber receives only what it may read.

use std::collections::HashMap;

/// What a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Receiving a message on a topic.
    Read,
    /// Publishing on a topic.
    Write,
    /// Subscribing to a topic filter.
    Subscribe,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("line {line}: unknown keyword {word:?} (expected topic, pattern or user)")]
    Keyword { line: usize, word: String },
    #[error("line {line}: `{what}` without a topic")]
    MissingTopic { line: usize, what: &'static str },
    #[error("line {line}: `user` without a name")]
    MissingUser { line: usize },
    #[error("line {line}: {filter:?} is not a valid topic filter ({why})")]
    Filter {
        line: usize,
        filter: String,
        why: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    filter: String,
    read: bool,
    write: bool,
    deny: bool,
}

/// A parsed ACL file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err("# must be a whole last level");
        }
        if l.contains('+') && *l != "+" {
            return Err("+ must be a whole level");
        }
    }
    Ok(())
}

/// Whether the first levels rule out a match: a wildcard there never matches a `$` topic.
fn dollar_mismatch(a: &[&str], b: &[&str]) -> bool {
    let wild = |l: Option<&&str>| matches!(l, Some(&"+") | Some(&"#"));
    let dollar = |l: Option<&&str>| l.is_some_and(|l| l.starts_with('$'));
    (wild(a.first()) && dollar(b.first())) || (wild(b.first()) && dollar(a.first()))
}

/// Every topic `f` matches is matched by `d` (for a topic `f`: `d` matches it).
fn covers(d: &[&str], f: &[&str]) -> bool {
    fn go(d: &[&str], f: &[&str]) -> bool {
        match (d.first(), f.first()) {
            (Some(&"#"), _) => true,
            (None, None) => true,
            (Some(x), Some(y)) if *y != "#" && (*x == "+" || x == y) => go(&d[1..], &f[1..]),
            _ => false,
        }
    }
    !dollar_mismatch(d, f) && go(d, f)
}

/// Some topic matches both filters.
fn overlaps(a: &[&str], b: &[&str]) -> bool {
    fn go(a: &[&str], b: &[&str]) -> bool {
        match (a.first(), b.first()) {
            (Some(&"#"), _) | (_, Some(&"#")) => true,
            (None, None) => true,
            (Some(x), Some(y)) => (*x == "+" || *y == "+" || x == y) && go(&a[1..], &b[1..]),
            _ => false,
        }
    }
    !dollar_mismatch(a, b) && go(a, b)
}

/// `filter` matches `topic` by MQTT's wildcard rules.
pub fn matches(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    covers(&f, &t)
}

impl Acl {
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (word, rest) = l.split_once([' ', '\t']).unwrap_or((l, ""));
            let rest = rest.trim_start();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(AclError::MissingUser { line });
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let what = if word == "topic" { "topic" } else { "pattern" };
                    let rule = rule(line, what, rest)?;
                    match (what, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                    }
                }
                other => {
                    return Err(AclError::Keyword {
                        line,
                        word: other.to_string(),
                    })
                }
            }
        }
        Ok(acl)
    }

    /// Whether a client with this user name (if any) and client ID may do `check` on
    /// `topic_or_filter` (a filter for [`Check::Subscribe`], a topic otherwise).
    pub fn allowed(
        &self,
        user: Option<&str>,
        client_id: &str,
        topic_or_filter: &str,
        check: Check,
    ) -> bool {
        let target: Vec<&str> = topic_or_filter.split('/').collect();
        let own = match user {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or(&[]),
            None => &self.anonymous,
        };
        let mut rules: Vec<Rule> = own.to_vec();
        for p in &self.patterns {
            match substitute(&p.filter, user, client_id) {
                Ok(Some(filter)) => rules.push(Rule {
                    filter,
                    ..p.clone()
                }),
                Ok(None) => {}
                // A deny pattern that cannot be expanded safely denies everything.
                Err(()) if p.deny => return false,
                Err(()) => {}
            }
        }
        let levels = |r: &Rule| r.filter.split('/').map(str::to_owned).collect::<Vec<_>>();
        for r in rules.iter().filter(|r| r.deny) {
            let d = levels(r);
            let d: Vec<&str> = d.iter().map(String::as_str).collect();
            if covers(&d, &target) {
                return false;
            }
        }
        rules.iter().filter(|r| !r.deny).any(|r| {
            let g = levels(r);
            let g: Vec<&str> = g.iter().map(String::as_str).collect();
            match check {
                Check::Read => r.read && covers(&g, &target),
                Check::Write => r.write && covers(&g, &target),
                Check::Subscribe => r.read && overlaps(&g, &target),
            }
        })
    }
}

/// `%c` and `%u` expanded. `Ok(None)`: the pattern names a user and the client has none;
/// `Err`: a value would add levels or wildcards.
fn substitute(filter: &str, user: Option<&str>, client_id: &str) -> Result<Option<String>, ()> {
    let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
    let mut out = filter.to_string();
    if out.contains("%u") {
        let Some(u) = user else {
            return Ok(None);
        };
        if unsafe_value(u) {
            return Err(());
        }
        out = out.replace("%u", u);
    }
    if out.contains("%c") {
        if unsafe_value(client_id) {
            return Err(());
        }
        out = out.replace("%c", client_id);
    }
    Ok(Some(out))
}

fn rule(line: usize, what: &'static str, rest: &str) -> Result<Rule, AclError> {
    let (first, after) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let access = match first {
        "read" => Some((true, false, false)),
        "write" => Some((false, true, false)),
        "readwrite" => Some((true, true, false)),
        "deny" => Some((false, false, true)),
        _ => None,
    };
    let (filter, (read, write, deny)) = match access {
        Some(a) => (after.trim_start(), a),
        // No access word: the whole rest is the topic (it may hold spaces), readwrite.
        None => (rest, (true, true, false)),
    };
    if filter.is_empty() {
        return Err(AclError::MissingTopic { line, what });
    }
    check_filter(filter).map_err(|why| AclError::Filter {
        line,
        filter: filter.to_string(),
        why,
    })?;
    Ok(Rule {
        filter: filter.to_string(),
        read,
        write,
        deny,
    })
}

#[cfg(test)]
mod tests {
    use super::Check::{Read, Subscribe, Write};
    use super::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text).expect("valid ACL")
    }

    #[test]
    fn matching_follows_mqtt_wildcards() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/+", "a"));
        assert!(matches("a/#", "a"), "# matches the parent level");
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/x"), "an empty level is a level");
        assert!(!matches("#", "$SYS/x"), "MQTT-4.7.2-1");
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn access_words_default_to_readwrite() {
        let a = acl("topic r/#\ntopic read ro\ntopic write wo\ntopic readwrite rw\n");
        for (topic, read, write) in [
            ("r/x", true, true),
            ("ro", true, false),
            ("wo", false, true),
            ("rw", true, true),
            ("other", false, false),
        ] {
            assert_eq!(a.allowed(None, "c", topic, Read), read, "{topic} read");
            assert_eq!(a.allowed(None, "c", topic, Write), write, "{topic} write");
        }
    }

    #[test]
    fn lines_before_any_user_are_for_anonymous_clients_only() {
        let a = acl("topic public/#\nuser alice\ntopic alice/#\nuser bob\n");
        assert!(a.allowed(None, "c", "public/x", Read));
        assert!(!a.allowed(None, "c", "alice/x", Read));
        assert!(a.allowed(Some("alice"), "c", "alice/x", Write));
        assert!(!a.allowed(Some("alice"), "c", "public/x", Read));
        // bob has a section with no lines; carol has none: both get nothing.
        assert!(!a.allowed(Some("bob"), "c", "public/x", Read));
        assert!(!a.allowed(Some("carol"), "c", "alice/x", Read));
    }

    #[test]
    fn a_later_user_section_adds_to_an_earlier_one() {
        let a = acl("user alice\ntopic a\nuser bob\ntopic b\nuser alice\ntopic c\n");
        assert!(a.allowed(Some("alice"), "x", "a", Read));
        assert!(a.allowed(Some("alice"), "x", "c", Read));
        assert!(!a.allowed(Some("alice"), "x", "b", Read));
    }

    #[test]
    fn patterns_substitute_client_id_and_user_for_everyone() {
        let a = acl(
            "user alice\ntopic x\npattern devices/%c/#\npattern read users/%u/inbox\nuser bob\n",
        );
        assert!(a.allowed(Some("bob"), "d1", "devices/d1/t", Write));
        assert!(!a.allowed(Some("bob"), "d1", "devices/d2/t", Write));
        assert!(a.allowed(None, "d1", "devices/d1", Read), "anonymous too");
        assert!(a.allowed(Some("alice"), "d1", "users/alice/inbox", Read));
        assert!(!a.allowed(Some("alice"), "d1", "users/alice/inbox", Write));
        assert!(!a.allowed(Some("alice"), "d1", "users/bob/inbox", Read));
        assert!(
            !a.allowed(None, "d1", "users//inbox", Read),
            "%u needs a user name"
        );
    }

    #[test]
    fn pattern_values_cannot_widen_the_pattern() {
        let a = acl("pattern users/%u/#\npattern devices/%c\n");
        assert!(!a.allowed(Some("a/b"), "c", "users/a/b/x", Read));
        assert!(!a.allowed(Some("#"), "c", "users/#", Read));
        assert!(!a.allowed(Some("u"), "+", "devices/+", Write));
        let d = acl("topic #\npattern deny private/%c/#\n");
        assert!(
            !d.allowed(None, "a/b", "public", Read),
            "unsafe deny denies all"
        );
        assert!(d.allowed(None, "ab", "public", Read));
        assert!(!d.allowed(None, "ab", "private/ab/x", Read));
    }

    #[test]
    fn deny_wins_over_grants_wherever_it_stands() {
        let a = acl("topic #\ntopic deny secret/#\ntopic read secret/open\n");
        assert!(a.allowed(None, "c", "x/y", Write));
        assert!(!a.allowed(None, "c", "secret/x", Read));
        assert!(!a.allowed(None, "c", "secret/open", Read));
        assert!(!a.allowed(None, "c", "secret", Write));
    }

    #[test]
    fn a_hash_grant_allows_everything_but_dollar_topics() {
        let a = acl("topic #\n");
        assert!(a.allowed(None, "c", "a", Write));
        assert!(a.allowed(None, "c", "a/b/c", Read));
        assert!(a.allowed(None, "c", "#", Subscribe));
        assert!(!a.allowed(None, "c", "$SYS/broker/uptime", Read));
    }

    #[test]
    fn subscribe_needs_some_readable_topic_under_the_filter() {
        let a = acl("topic read public/#\ntopic write inbox/#\ntopic deny public/secret/#\n");
        assert!(a.allowed(None, "c", "public/#", Subscribe));
        assert!(a.allowed(None, "c", "public/+/x", Subscribe));
        assert!(a.allowed(None, "c", "+/x", Subscribe));
        assert!(
            a.allowed(None, "c", "#", Subscribe),
            "accepted; each delivery is still checked"
        );
        assert!(
            !a.allowed(None, "c", "inbox/#", Subscribe),
            "write-only is not read"
        );
        assert!(!a.allowed(None, "c", "other/#", Subscribe));
        assert!(
            !a.allowed(None, "c", "public/secret/#", Subscribe),
            "all denied"
        );
        assert!(!a.allowed(None, "c", "public/secret/+", Subscribe));
        assert!(!a.allowed(None, "c", "$SYS/#", Subscribe));
        // What a `#` subscriber is then delivered:
        assert!(a.allowed(None, "c", "public/a", Read));
        assert!(!a.allowed(None, "c", "public/secret/a", Read));
        assert!(!a.allowed(None, "c", "inbox/a", Read));
    }

    #[test]
    fn no_rules_allow_nothing() {
        let a = acl("# only a comment\n\n");
        assert!(!a.allowed(None, "c", "a", Read));
        assert!(!a.allowed(Some("u"), "c", "a", Write));
        assert!(!a.allowed(None, "c", "#", Subscribe));
    }

    #[test]
    fn topics_may_hold_spaces_and_lines_may_be_indented() {
        let a = acl("  topic a b/c\ntopic read x y\n\tuser  bob  \ntopic b\r\n");
        assert!(a.allowed(None, "c", "a b/c", Write));
        assert!(a.allowed(None, "c", "x y", Read));
        assert!(!a.allowed(None, "c", "x y", Write));
        assert!(a.allowed(Some("bob"), "c", "b", Read));
    }

    #[test]
    fn malformed_lines_are_refused_with_their_line() {
        let err = |t: &str| Acl::parse(t).expect_err("refused");
        assert_eq!(
            err("topic a\ntopci b"),
            AclError::Keyword {
                line: 2,
                word: "topci".into()
            }
        );
        assert_eq!(
            err("topic"),
            AclError::MissingTopic {
                line: 1,
                what: "topic"
            }
        );
        assert_eq!(
            err("pattern read"),
            AclError::MissingTopic {
                line: 1,
                what: "pattern"
            }
        );
        assert_eq!(err("user"), AclError::MissingUser { line: 1 });
        assert!(matches!(
            err("topic a/#/b"),
            AclError::Filter { line: 1, .. }
        ));
        assert!(matches!(err("topic a/b+"), AclError::Filter { .. }));
        assert!(matches!(err("topic read a#"), AclError::Filter { .. }));
    }
}
