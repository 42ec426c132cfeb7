//! The operator's decisions made through the admin API (drain, enable, evacuate), kept in a
//! small JSON file so that an LB restart does not forget them: a broker drained for
//! maintenance must not take new clients again because the LB was restarted meanwhile.
//!
//! The file (`lb.state_file`, by default next to the config file) maps a backend ID to its
//! last decision. It is written whole on every decision, atomically (a temporary file in the
//! same directory, synced, then renamed over the old one), so a crash leaves the old file or
//! the new one, never half of one. It is read once at start; a decision, where there is one,
//! overrides the config's `backend.drain` for that ID in every snapshot, reloads included.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;
use mqlb_http::lock;

/// The last decision about one backend ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// No new connections (drain or evacuate); `false` is an explicit enable, which also
    /// overrides a `drain = true` of the config.
    pub drain: bool,
    /// Evacuating at this many connections a second: resumed after a restart (the restart
    /// itself moved every client, so there is little left to do, but it stays drained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuate_rate: Option<u32>,
}

/// Why the state file could not be read or written. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not an mqlb state file: {source}")]
    Format {
        file: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The file's content: `{"version": 1, "backends": {"b2": {"drain": true}}}`.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContent {
    version: u32,
    backends: BTreeMap<String, Decision>,
}

const VERSION: u32 = 1;

/// Parses the file's text (pure).
fn parse(text: &str) -> Result<BTreeMap<String, Decision>, serde_json::Error> {
    serde_json::from_str::<FileContent>(text).map(|c| c.backends)
}

/// The file's text for these decisions (pure).
fn render(decisions: &BTreeMap<String, Decision>) -> String {
    let content = FileContent {
        version: VERSION,
        backends: decisions.clone(),
    };
    // A map of plain values always serialises.
    serde_json::to_string_pretty(&content).unwrap_or_default() + "\n"
}

/// Writes `text` to `path` atomically: temp file beside it, fsync, rename.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::debug!(file = %tmp.display(), error = %e, "temporary state file not removed");
        }
    }
    result
}

/// Where a configuration keeps its admin state: `lb.state_file`, or beside the config file
/// (`lb.toml` → `lb.toml.state.json`); `None` for a config without a file and without the key.
pub fn state_path(cfg: &mqlb_config::Config) -> Option<PathBuf> {
    if let Some(p) = &cfg.lb.state_file {
        return Some(p.clone());
    }
    let source = cfg.source.as_ref()?;
    let mut name = source.file_name()?.to_os_string();
    name.push(".state.json");
    Some(source.with_file_name(name))
}

/// The decisions in force and the file they are kept in.
#[derive(Debug, Default)]
pub struct AdminState {
    path: Option<PathBuf>,
    decisions: Mutex<BTreeMap<String, Decision>>,
}

impl AdminState {
    /// Reads the file at `path`, if there is one. A missing file is an empty state; an
    /// unreadable or malformed one is an error the caller logs (the LB then starts with none,
    /// and the next decision replaces the file).
    pub fn load(path: Option<PathBuf>) -> (AdminState, Option<StateFileError>) {
        let mut err = None;
        let decisions = match &path {
            None => BTreeMap::new(),
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => parse(&text).unwrap_or_else(|source| {
                    err = Some(StateFileError::Format {
                        file: p.display().to_string(),
                        source,
                    });
                    BTreeMap::new()
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(source) => {
                    err = Some(StateFileError::Io {
                        file: p.display().to_string(),
                        source,
                    });
                    BTreeMap::new()
                }
            },
        };
        (
            AdminState {
                path,
                decisions: Mutex::new(decisions),
            },
            err,
        )
    }

    #[cfg(test)]
    pub fn get(&self, id: &str) -> Option<Decision> {
        lock(&self.decisions).get(id).copied()
    }

    pub fn all(&self) -> BTreeMap<String, Decision> {
        lock(&self.decisions).clone()
    }

    /// Records a decision and writes the file. The decision is in force either way; an error
    /// means it will not survive a restart (the caller reports it).
    pub fn record(&self, id: &str, d: Decision) -> Result<(), StateFileError> {
        let text = {
            let mut all = lock(&self.decisions);
            if all.get(id) == Some(&d) {
                return Ok(());
            }
            all.insert(id.to_string(), d);
            render(&all)
        };
        let Some(path) = &self.path else {
            return Ok(());
        };
        write_atomic(path, &text).map_err(|source| StateFileError::Io {
            file: path.display().to_string(),
            source,
        })
    }

    /// Puts the decisions into a snapshot's members (before it is published): each member
    /// whose ID has one drains or not as it says.
    pub(crate) fn apply(&self, snap: &Snapshot) {
        let all = lock(&self.decisions);
        for pool in &snap.pools {
            for m in &pool.members {
                if let Some(d) = all.get(&m.cfg.id) {
                    if m.state.is_draining() != d.drain {
                        m.state.set_draining(d.drain);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained() -> Decision {
        Decision {
            drain: true,
            evacuate_rate: None,
        }
    }

    #[test]
    fn the_file_round_trips_and_refuses_what_it_does_not_know() {
        let mut all = BTreeMap::new();
        all.insert("b2".to_string(), drained());
        all.insert(
            "b3".to_string(),
            Decision {
                drain: true,
                evacuate_rate: Some(100),
            },
        );
        all.insert(
            "b1".to_string(),
            Decision {
                drain: false,
                evacuate_rate: None,
            },
        );
        let text = render(&all);
        assert_eq!(parse(&text).expect("parses"), all);
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(parse("{\"version\":1,\"backends\":{\"b\":{\"drian\":true}}}").is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn decisions_survive_a_new_instance_and_the_write_is_atomic() {
        let dir = std::env::temp_dir().join(format!("mqlb-admin-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("lb.toml.state.json");
        let (s, err) = AdminState::load(Some(path.clone()));
        assert!(err.is_none(), "a missing file is an empty state");
        s.record("b2", drained()).expect("written");
        let (again, err) = AdminState::load(Some(path.clone()));
        assert!(err.is_none());
        assert_eq!(again.get("b2"), Some(drained()));
        // No temporary file left beside it.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["lb.toml.state.json"]);
        std::fs::write(&path, "{broken").expect("write");
        let (broken, err) = AdminState::load(Some(path.clone()));
        assert!(matches!(err, Some(StateFileError::Format { .. })));
        assert!(broken.all().is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_default_path_is_beside_the_config_file() {
        let mut cfg = mqlb_config::Config::builtin().expect("builtin");
        assert_eq!(state_path(&cfg), None);
        cfg.source = Some(PathBuf::from("/etc/mqlb/lb.toml"));
        assert_eq!(
            state_path(&cfg),
            Some(PathBuf::from("/etc/mqlb/lb.toml.state.json"))
        );
        cfg.lb.state_file = Some(PathBuf::from("/var/lib/mqlb/state.json"));
        assert_eq!(
            state_path(&cfg),
            Some(PathBuf::from("/var/lib/mqlb/state.json"))
        );
    }

    #[test]
    fn a_decision_overrides_the_config_in_a_snapshot() {
        let cfg = mqlb_config::Config::parse(
            "[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n[[pool]]\nname = \"p\"\n\
             [[pool.backend]]\nid = \"a\"\naddr = \"127.0.0.1:1001\"\ndrain = true\n\
             [[pool.backend]]\nid = \"b\"\naddr = \"127.0.0.1:1002\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n",
            "t",
        )
        .expect("valid");
        let snap = Snapshot::build(cfg, None);
        let (s, _) = AdminState::load(None);
        s.record(
            "a",
            Decision {
                drain: false,
                evacuate_rate: None,
            },
        )
        .expect("no file to write");
        s.record("b", drained()).expect("no file to write");
        s.apply(&snap);
        let p = &snap.pools[0];
        assert!(!p.member("a").expect("a").state.is_draining());
        assert!(p.member("b").expect("b").state.is_draining());
    }
}
