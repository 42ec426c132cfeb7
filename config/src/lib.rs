//! mqlb's one configuration schema, shared by every component.
//!
//! The model mirrors Azure Load Balancer's so its users recognise it: **frontends** (listening
//! addresses), **pools** of backends, **probes** that decide health, and **rules** that join a
//! frontend to a pool with a distribution mode and timeouts. A file is parsed into [`raw`]
//! structs (unknown keys refused), then [`validate`]d into [`Config`], whose fields are real
//! types (`SocketAddr`, `Duration`, `NonZeroU32`), so no component re-checks or panics later.

mod auth;
pub mod defaults;
mod duration;
pub mod handshake;
mod model;
pub mod proxy;
mod raw;
mod spans;
pub mod tls;
pub mod tls_stream;
mod validate;

use std::path::{Path, PathBuf};

pub use auth::AuthSettings;
pub use defaults::{
    DEFAULT_ADMIN, DEFAULT_CONFIG_TOML, DEFAULT_IDLE_TIMEOUT, DEFAULT_PROBE_INTERVAL,
    DEFAULT_PROBE_PORT, EXAMPLE_SECRET,
};
pub use duration::{format_duration, parse_duration};
pub use model::*;
pub use tls::{
    subject_cn, ClientAuth, FrontendTls, MeshTls, SniCert, TlsClient, TlsError, TlsServer,
};

/// Why a configuration could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {} problem(s):\n{}", problems.len(), list(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
        warnings: Vec<Problem>,
    },
}

fn list(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {}", p.located(file)))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        let mut cfg = Self::parse(&text, &file)?;
        cfg.source = Some(PathBuf::from(path));
        Ok(cfg)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let locate = |problems: &mut Vec<Problem>| {
            for p in problems {
                p.line = spans::line_of(text, &p.key);
            }
        };
        match validate::validate(raw) {
            Ok(mut cfg) => {
                locate(&mut cfg.warnings);
                Ok(cfg)
            }
            Err((mut problems, mut warnings)) => {
                locate(&mut problems);
                locate(&mut warnings);
                Err(ConfigError::Invalid {
                    file: origin.to_string(),
                    problems,
                    warnings,
                })
            }
        }
    }

    /// The built-in default configuration.
    pub fn builtin() -> Result<Config, ConfigError> {
        Self::parse(DEFAULT_CONFIG_TOML, "<built-in default>")
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub fn frontend(&self, name: &str) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.name == name)
    }
}

#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
