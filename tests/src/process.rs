//! Child processes: the `mqlb` binary (built on first use, or `$MQLB_BIN`), and killing and
//! reaping children so that a failed test leaves no process behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;

/// Kills `child` (SIGKILL) and reaps it. Errors are printed with `what`, not returned: this
/// runs in drops.
pub(crate) fn kill_and_reap(child: &mut Child, what: &str) {
    if let Err(e) = child.kill() {
        eprintln!("killing {what}: {e}");
    }
    if let Err(e) = child.wait() {
        eprintln!("reaping {what}: {e}");
    }
}

/// A child process killed and reaped on drop unless it has exited: a failed test or an
/// interrupted benchmark leaves no process behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let what = format!("child {}", self.0.id());
            kill_and_reap(&mut self.0, &what);
        }
    }
}

/// The `mqlb` binary: `$MQLB_BIN` if set (a project using this harness points it at an
/// installed mqlb), else built from this workspace on first use (CLI tests run it as a user
/// would).
pub fn mqlb_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_mqlb(false))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// The release `mqlb` binary for benchmarks, built if needed (`$MQLB_BIN` overrides it too:
/// A/B runs of two builds).
pub fn mqlb_release_bin() -> anyhow::Result<PathBuf> {
    build_mqlb(true).map_err(|e| anyhow::anyhow!(e))
}

fn build_mqlb(release: bool) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MQLB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "--bin", "mqlb"])
        .current_dir(&root);
    // What cargo set for this test process (its package's manifest, name, version) is not the
    // build's: ring's build tracks CARGO_MANIFEST_DIR, and inheriting the test's made every
    // build from a test and every build from a shell after it compile ring, rustls and all that
    // depends on them again (12 s each time).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_PKG_")
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --bin mqlb failed: {status}"));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("mqlb"))
}
