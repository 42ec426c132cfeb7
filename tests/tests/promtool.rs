//! The metrics as Prometheus takes them: every `/metrics` endpoint of a running topology (the
//! LB's admin, each broker's http, the HA server) passes `promtool check metrics` with no lint
//! left, the alert rules in `contrib/prometheus/alerts.yml` pass `promtool check rules`, and
//! every metric the rules and the Grafana dashboard name is in a real scrape.
//!
//! promtool is Debian's package `prometheus` (`.ci/run` installs it). Without it the promtool
//! tests are skipped with a message, unless `CI` is set: there they fail.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use mqlb_tests::{http, metric, wait_until, Client, QoS, TempDir, Topology};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

/// `Some(path)` of promtool; `None` (after saying so) to skip; an error in CI without it.
fn promtool() -> anyhow::Result<Option<&'static str>> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match (found, std::env::var_os("CI").is_some()) {
        (true, _) => Ok(Some("promtool")),
        (false, true) => bail!("promtool not installed, and CI is set: .ci/run installs it"),
        (false, false) => {
            eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
            Ok(None)
        }
    }
}

/// Runs promtool with `args` and `stdin`; returns (success, stdout + stderr).
fn run_promtool(bin: &str, args: &[&str], stdin: &str) -> anyhow::Result<(bool, String)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// A topology of an HA server, two brokers and the LB, with some traffic through it so that
/// the series that appear on first use exist: a connection through the LB, a subscriber, a
/// retained QoS 1 message. Returns its scrapes: (endpoint name, Prometheus text).
async fn scrapes() -> anyhow::Result<(Topology, Vec<(String, String)>)> {
    let t = Topology::start(2).await?;
    let sub = Client::connect(t.front, "promtool-sub").await?;
    sub.subscribe("promtool/#", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(t.front, "promtool-pub").await?;
    publisher
        .client
        .publish("promtool/r", QoS::AtLeastOnce, true, b"x".to_vec())
        .await?;
    wait_until(
        "the subscriber got the message",
        Duration::from_secs(10),
        || async { sub.received_count() >= 1 },
    )
    .await?;
    publisher.disconnect().await;
    let admin = t.admin;
    wait_until(
        "a connection through the LB ended",
        Duration::from_secs(10),
        || async {
            let (_, text) = http(admin, "GET", "/metrics").await.unwrap_or_default();
            metric(&text, "mqlb_connections_total", &[]) >= 1.0
        },
    )
    .await?;
    let mut endpoints = vec![("lb".to_string(), t.admin), ("ha1".to_string(), t.ha)];
    endpoints.extend(t.brokers.iter().map(|b| (b.id.clone(), b.http)));
    let mut out = Vec::new();
    for (name, addr) in endpoints {
        let (status, body) = http(addr, "GET", "/metrics").await?;
        if status != 200 {
            bail!("{name} /metrics: status {status}: {body}");
        }
        out.push((name, body));
    }
    sub.disconnect().await;
    Ok((t, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_passes_promtool_check_metrics() -> anyhow::Result<()> {
    let Some(bin) = promtool()? else {
        return Ok(());
    };
    let (_t, scrapes) = scrapes().await?;
    assert_eq!(scrapes.len(), 4, "lb, ha1, b1, b2");
    let mut problems = Vec::new();
    for (name, text) in &scrapes {
        let (ok, out) = run_promtool(bin, &["check", "metrics"], text)?;
        if !ok || !out.trim().is_empty() {
            problems.push(format!("{name}:\n{out}"));
        }
    }
    assert!(
        problems.is_empty(),
        "promtool check metrics:\n{}",
        problems.join("\n")
    );
    Ok(())
}

#[test]
fn alert_rules_pass_promtool_check_rules() -> anyhow::Result<()> {
    let Some(bin) = promtool()? else {
        return Ok(());
    };
    let rules = contrib("prometheus/alerts.yml");
    let (ok, out) = run_promtool(bin, &["check", "rules", &rules.display().to_string()], "")?;
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

/// Every PromQL expression of the dashboard, with Grafana's variables replaced as Grafana would.
fn dashboard_exprs() -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(contrib("grafana/mqlb.json"))?;
    let dash: serde_json::Value = serde_json::from_str(&text).context("dashboard JSON")?;
    let mut exprs = Vec::new();
    let mut stack = vec![&dash];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    exprs.push(
                        e.replace("$__rate_interval", "1m")
                            .replace("$lb_job", "mqlb-lb")
                            .replace("$broker_job", "mqlb-broker")
                            .replace("$ha_job", "mqlb-haserver"),
                    );
                }
                stack.extend(m.values());
            }
            serde_json::Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    Ok(exprs)
}

/// The dashboard's queries are valid PromQL: promtool checks them as recording rules.
#[test]
fn dashboard_queries_are_valid_promql() -> anyhow::Result<()> {
    let Some(bin) = promtool()? else {
        return Ok(());
    };
    let exprs = dashboard_exprs()?;
    assert!(exprs.len() >= 30, "{} queries", exprs.len());
    let dir = TempDir::new("promtool")?;
    let file = dir.path().join("dashboard-rules.yml");
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        yaml += &format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(e)?
        );
    }
    std::fs::write(&file, yaml)?;
    let (ok, out) = run_promtool(bin, &["check", "rules", &file.display().to_string()], "")?;
    assert!(ok, "{out}");
    Ok(())
}

/// The metric names in `text` (PromQL, YAML): `mqlb_*` and `process_*` identifiers.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &text[start..i];
            if word.starts_with("mqlb_") || word.starts_with("process_") {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The series names of a scrape (histograms as `_bucket`, `_sum`, `_count`).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_name_only_metrics_that_exist() -> anyhow::Result<()> {
    let alerts = std::fs::read_to_string(contrib("prometheus/alerts.yml"))?;
    // Only the expressions: the annotations name metrics in prose.
    let alert_exprs: String = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    let from_alerts = metric_names(&alert_exprs);
    let from_dashboard = metric_names(&dashboard_exprs()?.join("\n"));
    assert!(from_alerts.len() >= 8, "alerts name {from_alerts:?}");
    assert!(
        from_dashboard.len() >= 30,
        "dashboard names {from_dashboard:?}"
    );

    let (_t, scrapes) = scrapes().await?;
    let mut scraped = BTreeSet::new();
    for (_, text) in &scrapes {
        scraped.extend(scraped_names(text));
    }
    let missing: Vec<_> = from_alerts
        .iter()
        .chain(&from_dashboard)
        .filter(|n| !scraped.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "named in contrib/ but in no scrape: {missing:?}"
    );
    Ok(())
}
