//! Raw file → validated [`Config`]: every problem is collected with its key, not just the first.
//!
//! One module per TOML section, each turning its raw tables into the model's types; checks
//! that join sections (a pool naming a probe, a rule naming a frontend and a pool, the binds
//! every exposure check sees) sit in small functions of their own. [`validate`] calls them
//! section by section, each section's items in file order, which is the order the problems
//! are reported in.

mod binds;
mod cluster;
mod frontends;
mod ha;
mod lb;
mod pools;
mod probes;
mod rules;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::defaults::{MAX_DURATION, MAX_NAME_LEN, MIN_SECRET_LEN};
use crate::duration::{format_duration, parse_duration};
use crate::model::{Config, Problem, Secret};
use crate::raw::RawConfig;

/// Stands in for a required address that did not parse (reported), so validation goes on.
const UNPARSED_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// Collects problems while converting; each helper records and returns a fallback value so
/// validation continues past the first error.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            line: None,
        });
    }

    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            key: key.into(),
            message: message.into(),
            line: None,
        });
    }

    /// An IP address (a `source` to connect from).
    fn ip(&mut self, key: &str, text: &str) -> Option<std::net::IpAddr> {
        match text.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.error(key, format!("{text:?} is not an IP address"));
                None
            }
        }
    }

    fn addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    key,
                    format!(
                        "invalid address {text:?}: expected IP:PORT such as \"127.0.0.1:1883\""
                    ),
                );
                None
            }
        }
    }

    /// A positive duration, or `default` when the key is absent.
    fn duration(&mut self, key: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.error(key, "must be greater than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    key,
                    format!("must be at most {} (a year)", format_duration(MAX_DURATION)),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(key, e);
                default
            }
        }
    }

    /// The bearer token in the file at `path` (relative to the working directory, like
    /// `haserver.db`), read now so a missing or unusable file is refused at load, not at the
    /// first request. Surrounding whitespace (the newline of `echo ... > file`) is dropped.
    fn token_file(&mut self, key: &str, path: Option<&str>) -> Option<Secret> {
        let path = path?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.error(key, format!("cannot read {path:?}: {e}"));
                return None;
            }
        };
        let token = text.trim();
        let problem = if token.is_empty() {
            Some("is empty".to_string())
        } else if token.len() < MIN_SECRET_LEN {
            Some(format!(
                "holds {} characters: a token needs at least {MIN_SECRET_LEN}",
                token.len()
            ))
        } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
            Some("holds spaces or non-ASCII characters: it travels in an HTTP header".into())
        } else {
            None
        };
        match problem {
            Some(p) => {
                self.error(key, format!("{path:?} {p}"));
                None
            }
            None => Some(Secret::new(token)),
        }
    }

    /// A count of at least 1, or `default` when the key is absent.
    fn non_zero(&mut self, key: &str, value: Option<u32>, default: NonZeroU32) -> NonZeroU32 {
        match value {
            None => default,
            Some(v) => NonZeroU32::new(v).unwrap_or_else(|| {
                self.error(key, "must be at least 1");
                default
            }),
        }
    }

    /// A count of at least 1 for a key that has no default (its absence means none): a zero is
    /// reported and 1 stands in for it so validation goes on.
    fn positive(&mut self, key: &str, value: u32) -> NonZeroU32 {
        self.non_zero(key, Some(value), NonZeroU32::MIN)
    }

    fn name(&mut self, key: &str, name: &str, seen: &mut HashSet<String>, what: &str) {
        if name.is_empty() {
            self.error(key, format!("{what} name must not be empty"));
        } else if name.len() > MAX_NAME_LEN
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.error(
                key,
                format!(
                    "{what} name {name:?} must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ ."
                ),
            );
        } else if !seen.insert(name.to_string()) {
            self.error(key, format!("duplicate {what} name {name:?}"));
        }
    }
}

/// The whole file, section by section. Probes come before pools (pools refer to them by name),
/// and rules after frontends and pools (they join the two).
pub fn validate(raw: RawConfig) -> Result<Config, (Vec<Problem>, Vec<Problem>)> {
    let mut c = Checker::default();
    let lb = lb::lb_section(&mut c, &raw.lb);
    let probes = probes::probes(&mut c, &raw.probes);
    let pools = pools::pools(&mut c, &raw.pools, &probes, lb.source);
    let frontends = frontends::frontends(&mut c, &raw.frontends, lb.admin);
    let (rules, used_frontends) = rules::rules(&mut c, &raw);
    frontends::warn_unopened(&mut c, &raw.frontends, &used_frontends);
    let (cluster, brokers) = cluster::validate_cluster(&mut c, &raw);
    let ha = ha::validate_ha(&mut c, &raw);
    binds::refuse_exposure(&mut c, &raw, &lb, &cluster, &brokers, &ha);
    let auth = binds::validate_auth(&mut c, &raw, &lb, &frontends, &brokers, &ha);

    if !c.problems.is_empty() {
        return Err((c.problems, c.warnings));
    }
    Ok(Config {
        source: None,
        lb,
        // A frontend without a rule is not opened (warned above).
        frontends: frontends
            .into_iter()
            .filter(|f| used_frontends.contains(&f.name))
            .collect(),
        pools,
        rules,
        cluster,
        brokers,
        ha,
        auth,
        warnings: c.warnings,
    })
}
