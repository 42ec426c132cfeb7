//! `mqlb up` as a child process: started with a config file, its summary read for the pids it
//! prints, stopped with Ctrl-C (SIGINT). Killed on drop, with its children (their process
//! groups are their own, so each is killed by the pid `up` printed).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::{lock, mqlb_bin, wait_until, KillOnDrop};

/// A running `mqlb up`.
pub struct Up {
    child: KillOnDrop,
    /// Every line it printed so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// The pids of its summary, by name: `lb`, `b1`, ...
    pids: HashMap<String, u32>,
}

/// `pid N` at the end of a summary line.
fn trailing_pid(line: &str) -> Option<u32> {
    line.rsplit_once("pid ")?.1.trim().parse().ok()
}

impl Up {
    /// Starts `mqlb up -c file` (plus `args`) and waits for its "mqlb is up" summary.
    pub async fn start(file: &Path, args: &[&str]) -> anyhow::Result<Up> {
        let mut child = KillOnDrop(
            Command::new(mqlb_bin()?)
                .arg("up")
                .arg("-c")
                .arg(file)
                .args(args)
                .env("RUST_LOG", "error,rumqttd=off")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting mqlb up")?,
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<()>();
        for out in [
            child
                .0
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .0
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (lines, tx) = (lines.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lock(&lines).push(line);
                    // The receiver may be gone (summary read); later lines are still kept.
                    tx.send(()).ok();
                }
            });
        }
        let mut up = Up {
            child,
            lines,
            pids: HashMap::new(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            if up.output().contains("Ctrl-C stops everything") {
                break;
            }
            if let Ok(Some(status)) = up.child.0.try_wait() {
                anyhow::bail!("mqlb up exited ({status}):\n{}", up.output());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            anyhow::ensure!(!left.is_zero(), "no summary after 40 s:\n{}", up.output());
            // A line arrived, or a tenth of a second passed: look again.
            rx.recv_timeout(left.min(Duration::from_millis(100))).ok();
        }
        for line in lock(&up.lines).iter() {
            let name = if line.contains("LB admin") {
                Some("lb".to_string())
            } else {
                line.trim_start()
                    .strip_prefix("broker ")
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_string)
            };
            if let (Some(name), Some(pid)) = (name, trailing_pid(line)) {
                up.pids.insert(name, pid);
            }
        }
        Ok(up)
    }

    /// Everything printed so far, stdout and stderr.
    pub fn output(&self) -> String {
        lock(&self.lines).join("\n")
    }

    /// The pid the summary gave for `name` (`lb`, `b1`, ...).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.pids.get(name).copied()
    }

    /// True while `mqlb up` itself runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Ctrl-C, and waits for `up` to exit; true if it exited successfully.
    pub async fn stop(mut self) -> anyhow::Result<bool> {
        let pid = self.child.0.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status()?;
        let child = &mut self.child.0;
        wait_until(
            "mqlb up exits after Ctrl-C",
            Duration::from_secs(30),
            || {
                let done = matches!(child.try_wait(), Ok(Some(_)));
                async move { done }
            },
        )
        .await?;
        Ok(self.child.0.wait()?.success())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.is_running() {
            for pid in self.pids.values() {
                // Best effort: the process may be gone already.
                Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status()
                    .ok();
            }
        }
    }
}

/// True while a process with this pid runs (exists and is not a zombie waiting to be reaped).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_pid_at_the_end_of_a_summary_line() {
        assert_eq!(
            super::trailing_pid("  broker b1   MQTT 127.0.0.1:1, MQTT 5 127.0.0.1:2  pid 4981"),
            Some(4981)
        );
        assert_eq!(super::trailing_pid("  HA server ha1  http://x"), None);
    }
}
