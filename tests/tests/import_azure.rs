//! `mqlb import azure` on Azure's two export shapes (tests/data/azure/): `az network lb show`
//! output and an ARM template. Each converts, warns about exactly what it cannot carry, and
//! the result passes `mqlb check-config`.

use std::path::Path;
use std::process::Command;

use mqlb_tests::{mqlb_bin, TempDir};

/// Runs `mqlb` with `args`: exit code, stdout, stderr.
fn run(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(mqlb_bin()?).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn both_azure_exports_import_and_pass_check_config() -> anyhow::Result<()> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/azure");
    // File, warnings it must print (each a substring of one line), what check-config counts.
    let cases: [(&str, &[&str], &str); 2] = [
        (
            "az-network-lb-show.json",
            &["rule ha-ports: HA ports"],
            "OK (1 frontend(s), 1 pool(s), 1 rule(s))",
        ),
        (
            "arm-template.json",
            &[
                "outbound rule(s)",
                "public IP publicIpName",
                "rule coap: UDP is not supported",
            ],
            "OK (1 frontend(s), 1 pool(s), 1 rule(s))",
        ),
    ];
    let tmp = TempDir::new("import-azure")?;
    let mut checked = 0;
    for entry in std::fs::read_dir(&data)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let Some((_, warnings, ok)) = cases.iter().find(|c| c.0 == name) else {
            anyhow::bail!("{name}: a file in tests/data/azure this test does not know");
        };
        let (code, toml, stderr) = run(&["import", "azure", path.to_str().unwrap_or_default()])?;
        assert_eq!(code, 0, "{name}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("warning:")).collect();
        assert_eq!(lines.len(), warnings.len(), "{name}: {stderr}");
        for w in *warnings {
            assert!(
                lines.iter().any(|l| l.contains(w)),
                "{name}: no {w:?} in {stderr}"
            );
        }
        let out = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&out, &toml)?;
        let (code, report, _) = run(&["check-config", out.to_str().unwrap_or_default()])?;
        assert_eq!(code, 0, "{name}: {report}\n{toml}");
        assert!(report.contains(ok), "{name}: {report}");
        assert!(!report.contains("warning"), "{name}: {report}");
        checked += 1;
    }
    assert_eq!(checked, cases.len(), "example documents imported");
    Ok(())
}

#[test]
fn the_az_export_keeps_addresses_probe_and_rule_settings() -> anyhow::Result<()> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/azure/az-network-lb-show.json");
    let (code, toml, stderr) = run(&["import", "azure", file.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "{stderr}");
    let cfg = mqlb_config::Config::parse(&toml, "imported")?;
    assert_eq!(cfg.frontends[0].bind.to_string(), "10.0.0.10:1883");
    let addrs: Vec<String> = cfg.pools[0]
        .backends
        .iter()
        .map(|b| {
            format!(
                "{}={}{}",
                b.id,
                b.addr,
                if b.drain { " drained" } else { "" }
            )
        })
        .collect();
    assert_eq!(
        addrs,
        [
            "broker-1=10.0.1.4:1883",
            "broker-2=10.0.1.5:1883",
            "broker-3=10.0.1.6:1883 drained"
        ]
    );
    let probe = &cfg.pools[0].probe;
    assert_eq!(
        probe.protocol,
        mqlb_config::ProbeProtocol::Http {
            path: "/healthz".into()
        }
    );
    assert_eq!(probe.port, mqlb_config::ProbePort::Fixed(8080));
    assert_eq!(probe.interval, std::time::Duration::from_secs(5));
    assert_eq!(probe.down_threshold.get(), 2);
    let rule = &cfg.rules[0];
    assert_eq!(rule.distribution, mqlb_config::Distribution::SourceIp);
    assert_eq!(rule.idle_timeout, std::time::Duration::from_secs(15 * 60));
    assert!(rule.reset_on_idle);

    let (code, _, stderr) = run(&["import", "azure", "/nonexistent/lb.json"])?;
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/lb.json"), "{stderr}");
    Ok(())
}
