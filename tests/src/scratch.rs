//! Scratch directories for the config files, databases and logs a test writes.

use std::path::Path;

use anyhow::Context;

/// A scratch directory `mqlb-{tag}-XXXXXX` in the system's temporary directory, removed on
/// drop (the `tempfile` crate's, named for the test that made it).
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let prefix = format!("mqlb-{tag}-");
        tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .map(TempDir)
            .with_context(|| format!("creating a scratch directory {prefix}*"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}
