//! The `mqlb` binary as a user runs it: check-config, probe, and `lb` with signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mqlb_tests::pki::Pki;
use mqlb_tests::{
    free_port, http, metric, mqlb_bin, wait_until, Client, KillOnDrop, Mosquitto, MosquittoTls,
    TempDir,
};

fn run(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(mqlb_bin()?).args(args).output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn check_config_accepts_every_example_and_lists_every_problem() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out) = run(&["check-config", path.to_str().unwrap_or_default()])?;
            assert_eq!(code, 0, "{}: {out}", path.display());
            assert!(out.contains(": OK ("), "{out}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "example files checked");

    let tmp = TempDir::new("cli")?;
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:99999\"\n\
         [[pool]]\nname = \"p\"\n[[pool.backend]]\nid = \"a\"\naddr = \"nowhere\"\n\
         [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\ndistribution = \"random\"\n",
    )?;
    let (code, out) = run(&["check-config", bad.to_str().unwrap_or_default()])?;
    assert_eq!(code, 1, "{out}");
    for key in [
        "frontend[0].bind",
        "pool[0].backend[0].addr",
        "rule[0].distribution",
        "bad.toml",
    ] {
        assert!(out.contains(key), "missing {key} in:\n{out}");
    }
    std::fs::write(&bad, "[lb]\nadmn = \"127.0.0.1:1\"\n")?;
    let (code, out) = run(&["check-config", bad.to_str().unwrap_or_default()])?;
    assert_eq!(code, 1);
    assert!(out.contains("admn"), "unknown key named: {out}");
    Ok(())
}

#[tokio::test]
async fn probe_reports_healthy_and_unhealthy() -> anyhow::Result<()> {
    let broker = Mosquitto::start().await?;
    let target = broker.addr().to_string();
    let (code, out) = run(&["probe", &target])?;
    assert_eq!((code, out.contains("healthy")), (0, true), "{out}");
    let (code, out) = run(&["probe", &target, "--mqtt"])?;
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&["probe", &target, "--mqtt", "--source", "127.0.0.1"])?;
    assert_eq!(code, 0, "{out}");
    // An address this machine does not have: no packet leaves, the bind fails naming it.
    let (code, out) = run(&["probe", &target, "--source", "192.0.2.1"])?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("binding the source address 192.0.2.1"),
        "{out}"
    );
    let closed = format!("127.0.0.1:{}", free_port()?);
    let (code, out) = run(&["probe", &closed])?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unhealthy"), "{out}");
    // An MQTT broker does not speak HTTP.
    let (code, out) = run(&["probe", &target, "--http", "/health", "--timeout", "500ms"])?;
    assert_eq!(code, 1, "{out}");
    Ok(())
}

/// Runs `mqlb args` and checks that it reported the target unhealthy (exit 1).
fn unhealthy(args: &[&str], why: &str) -> anyhow::Result<()> {
    let (code, out) = run(args)?;
    assert_eq!((code, out.contains("unhealthy")), (1, true), "{why}: {out}");
    Ok(())
}

/// `mqlb probe --tls` and `--mqtts` against a mosquitto serving MQTT over TLS: healthy with the
/// broker's CA, unhealthy with another CA, another name, or no client certificate where one is
/// required, and `--mqtt` in clear is no answer from a TLS port.
#[tokio::test]
async fn probe_speaks_tls_and_mqtts() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let other = Pki::new()?;
    pki.client_cert("device-1")?;
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("chain.pem"),
        pki.path("key.pem"),
    );
    let tls = |require_certificate| MosquittoTls {
        ca: &ca,
        cert: &cert,
        key: &key,
        require_certificate,
        refuse_connect: false,
    };
    let broker = Mosquitto::start_tls(&tls(false)).await?;
    let target = broker.addr().to_string();
    let ca = pki.path_str("ca.pem");
    for how in ["--tls", "--mqtts"] {
        let (code, out) = run(&["probe", &target, how, "--cafile", &ca])?;
        assert_eq!((code, out.contains("healthy")), (0, true), "{how}: {out}");
    }
    let other_ca = other.path_str("ca.pem");
    unhealthy(
        &["probe", &target, "--mqtts", "--cafile", &other_ca],
        "another CA",
    )?;
    let name = ["--server-name", "elsewhere.example"];
    unhealthy(
        &["probe", &target, "--tls", "--cafile", &ca, name[0], name[1]],
        "another name",
    )?;
    let (code, out) = run(&["probe", &target, "--mqtt", "--timeout", "500ms"])?;
    assert_eq!(code, 1, "MQTT in clear to a TLS port: {out}");
    let (code, out) = run(&["probe", &target, "--tls"])?;
    assert_eq!(code, 2, "--tls without --cafile is a usage error: {out}");

    let mtls = Mosquitto::start_tls(&tls(true)).await?;
    let target = mtls.addr().to_string();
    unhealthy(
        &["probe", &target, "--mqtts", "--cafile", &ca],
        "no client certificate",
    )?;
    let (code, out) = run(&[
        "probe",
        &target,
        "--mqtts",
        "--cafile",
        &ca,
        "--cert",
        &pki.path_str("device-1.pem"),
        "--key",
        &pki.path_str("device-1-key.pem"),
    ])?;
    assert_eq!(code, 0, "with the client certificate: {out}");
    Ok(())
}

/// `mqlb lb -c FILE`: serves, reloads on SIGHUP and on a file change, stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_process_reloads_on_sighup_and_file_change_and_stops_on_sigterm() -> anyhow::Result<()> {
    let broker = Mosquitto::start().await?;
    let tmp = TempDir::new("cli-lb")?;
    let file = tmp.path().join("lb.toml");
    let toml = format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"3s\"\nwatch_config = true\nwatch_interval = \"200ms\"\n\
         [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"p\"\nprobe = \"own-port\"\n[[pool.backend]]\nid = \"b1\"\naddr = \"{}\"\n\
         [[probe]]\nname = \"own-port\"\nport = \"traffic\"\n\
         [[rule]]\nname = \"r\"\nfrontend = \"mqtt\"\npool = \"p\"\ndistribution = \"mqtt-client-id\"\n",
        broker.addr()
    );
    std::fs::write(&file, &toml)?;
    let mut guard = KillOnDrop(
        Command::new(mqlb_bin()?)
            .args(["lb", "-c", file.to_str().unwrap_or_default()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let child = &mut guard.0;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut admin: Option<SocketAddr> = None;
    let mut front: Option<SocketAddr> = None;
    while admin.is_none() || front.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(20))?;
        if let Some(rest) = line.split("admin on http://").nth(1) {
            admin = rest.split('/').next().and_then(|a| a.parse().ok());
        }
        if let Some(rest) = line.split("frontend mqtt on ").nth(1) {
            front = rest.trim().parse().ok();
        }
    }
    let (admin, front) = (
        admin.unwrap_or(broker.addr()),
        front.unwrap_or(broker.addr()),
    );
    let pid = child.id().to_string();
    let reloads = |result: &'static str| async move {
        let body = http(admin, "GET", "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(&body, "mqlb_config_reloads_total", &[("result", result)])
    };

    let c = Client::connect(front, "cli-client").await?;
    // SIGHUP with a changed file: reloaded.
    std::fs::write(
        &file,
        toml.replace("shutdown_grace = \"3s\"", "shutdown_grace = \"4s\""),
    )?;
    Command::new("kill").args(["-HUP", &pid]).status()?;
    wait_until("reload ok", Duration::from_secs(5), || async {
        reloads("ok").await >= 1.0
    })
    .await?;
    // A broken file (picked up by the watcher) is refused and counted.
    std::fs::write(&file, "[[rule]]\nname = \"r\"\n")?;
    wait_until("reload error", Duration::from_secs(5), || async {
        reloads("error").await >= 1.0
    })
    .await?;
    // The client never noticed.
    c.publish_qos1("cli/t", b"x").await?;
    wait_until("puback", Duration::from_secs(5), || async {
        c.pubacks() == 1
    })
    .await?;
    assert_eq!(c.connacks(), 1);
    c.disconnect().await;

    Command::new("kill").args(["-TERM", &pid]).status()?;
    let exited = wait_until(
        "mqlb to exit after SIGTERM",
        Duration::from_secs(10),
        || {
            let done = matches!(child.try_wait(), Ok(Some(_)));
            async move { done }
        },
    )
    .await;
    if exited.is_err() {
        child.kill()?;
    }
    exited?;
    let status = child.wait()?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

/// Two `mqlb broker` processes from one config file: mosquitto_pub on one node reaches
/// mosquitto_sub on the other (clients nobody here wrote); SIGTERM stops them with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_processes_form_a_cluster_for_mosquitto_clients() -> anyhow::Result<()> {
    if !mqlb_tests::mosquitto_installed() {
        anyhow::bail!("mosquitto-clients not installed (.ci/run installs them)");
    }
    let tmp = TempDir::new("cli-broker")?;
    let file = tmp.path().join("cluster.toml");
    let mut toml = format!("[cluster]\nsecret = \"{}\"\n", mqlb_tests::TEST_SECRET);
    let mut ports = Vec::new();
    for id in ["n1", "n2"] {
        let (mqtt, mesh, http) = (free_port()?, free_port()?, free_port()?);
        toml += &format!(
            "[[broker]]\nid = \"{id}\"\nmqtt = \"127.0.0.1:{mqtt}\"\nmesh = \"127.0.0.1:{mesh}\"\nhttp = \"127.0.0.1:{http}\"\n"
        );
        ports.push((mqtt, http));
    }
    std::fs::write(&file, toml)?;
    let mut nodes = Vec::new();
    for id in ["n1", "n2"] {
        nodes.push(KillOnDrop(
            Command::new(mqlb_bin()?)
                .args([
                    "broker",
                    "-c",
                    file.to_str().unwrap_or_default(),
                    "--id",
                    id,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ));
    }
    let http_addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i].1));
    wait_until("both nodes meshed", Duration::from_secs(20), || async {
        let mut ok = true;
        for i in 0..2 {
            let body = http(http_addr(i), "GET", "/metrics")
                .await
                .map(|r| r.1)
                .unwrap_or_default();
            ok &= metric(&body, "mqlb_mesh_link_up", &[]) == 1.0;
        }
        ok
    })
    .await?;
    let n1 = SocketAddr::from(([127, 0, 0, 1], ports[0].0));
    let n2 = SocketAddr::from(([127, 0, 0, 1], ports[1].0));
    let mut sub = mqlb_tests::MosquittoSub::start(n2, "cli-sub", "cli/#")?;
    sub.wait_subscribed("cli/ping", || {
        mqlb_tests::mosquitto_pub(n1, "cli-ping", "cli/ping", "p", false)
    })
    .await?;
    for n in 0..3 {
        mqlb_tests::mosquitto_pub(n1, "cli-pub", &format!("cli/{n}"), &format!("m{n}"), false)?;
    }
    let lines = sub.lines(3, "cli/ping", Duration::from_secs(10));
    assert_eq!(
        lines,
        ["cli/0 m0", "cli/1 m1", "cli/2 m2"],
        "mosquitto_sub on n2 printed"
    );
    for n in &mut nodes {
        Command::new("kill")
            .args(["-TERM", &n.0.id().to_string()])
            .status()?;
    }
    for n in &mut nodes {
        let child = &mut n.0;
        wait_until("broker exits on SIGTERM", Duration::from_secs(10), || {
            let done = matches!(child.try_wait(), Ok(Some(_)));
            async move { done }
        })
        .await?;
        assert!(child.wait()?.success());
    }
    Ok(())
}

/// `mqlb haserver` as a process: serves the API, keeps its state in the SQLite file across a
/// restart, exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haserver_process_keeps_state_across_restarts() -> anyhow::Result<()> {
    let tmp = TempDir::new("cli-ha")?;
    let file = tmp.path().join("ha.toml");
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::write(
        &file,
        format!(
            "[cluster]\nsecret = \"{}\"\n[[haserver]]\nid = \"ha1\"\nlisten = \"{addr}\"\ndb = \"{}\"\n",
            mqlb_tests::TEST_SECRET,
            tmp.path().join("state.sqlite").display()
        ),
    )?;
    let start = || -> anyhow::Result<KillOnDrop> {
        Ok(KillOnDrop(
            Command::new(mqlb_bin()?)
                .args([
                    "haserver",
                    "-c",
                    file.to_str().unwrap_or_default(),
                    "--id",
                    "ha1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    };
    let mut p = start()?;
    wait_until("haserver up", Duration::from_secs(20), || async {
        http(addr, "GET", "/healthz")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await?;
    let reg = br#"{"id":"b9","mqtt":"127.0.0.1:1883"}"#;
    let (status, body) = mqlb_tests::ha_request(addr, "POST", "/api/members", reg).await?;
    assert_eq!(status, 200, "{body}");
    Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()?;
    assert!(p.0.wait()?.success());
    let _p = start()?;
    wait_until("haserver up again", Duration::from_secs(20), || async {
        http(addr, "GET", "/healthz")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await?;
    let (_, body) = mqlb_tests::ha_request(addr, "GET", "/api/cluster", b"").await?;
    assert!(
        body.contains("\"b9\""),
        "state survived the restart: {body}"
    );
    Ok(())
}

/// `mqlb up -c FILE`: every process of the file starts, the summary names the endpoints and
/// pids, MQTT works through the LB, and Ctrl-C (SIGINT) stops them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_the_topology_and_ctrl_c_stops_it() -> anyhow::Result<()> {
    let file = mqlb_tests::TopologyFile::write(2)?;
    let up = mqlb_tests::Up::start(&file.path, &["--no-restart"]).await?;
    let text = up.output();
    assert!(text.contains("mqlb is up"), "{text}");
    assert!(text.contains(&format!("mqtt://{}", file.front)), "{text}");
    let pids: Vec<u32> = ["lb", "b1", "b2"]
        .iter()
        .filter_map(|n| up.pid(n))
        .collect();
    assert_eq!(pids.len(), 3, "{text}");

    let c = mqlb_tests::Client::connect(file.front, "up-client").await?;
    c.disconnect().await;

    assert!(up.stop().await?, "mqlb up exits cleanly on Ctrl-C");
    for pid in pids {
        assert!(
            !mqlb_tests::up::alive(pid),
            "pid {pid} still running after mqlb up stopped"
        );
    }
    Ok(())
}

/// `mqlb up --tls ADDR` (what it does on 127.0.0.1:8883 with the built-in config): at first
/// start it makes a dev CA and a certificate for 127.0.0.1 in `--tls-dir`, serves MQTT over TLS
/// at ADDR through the LB, and prints the mosquitto commands that work, which do: a message
/// published over TLS reaches a subscriber over TLS, both trusting only the dev CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_mqtt_over_tls_with_its_dev_ca() -> anyhow::Result<()> {
    use mqlb_tests::{mosquitto_pub_with, MosquittoSub};
    if !mqlb_tests::mosquitto_installed() {
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "mosquitto-clients missing in CI"
        );
        eprintln!("skipped: mosquitto-clients not installed");
        return Ok(());
    }
    let file = mqlb_tests::TopologyFile::write(2)?;
    let dir = TempDir::new("up-tls")?;
    let tls_dir = dir.path().join("dev-tls");
    let tls = mqlb_tests::loopback(mqlb_tests::free_port()?);
    let args = [
        "--no-restart",
        "--tls",
        &tls.to_string(),
        "--tls-dir",
        &tls_dir.display().to_string(),
    ];
    let up = mqlb_tests::Up::start(&file.path, &args).await?;
    let text = up.output();
    assert!(text.contains(&format!("mqtts://{tls}")), "{text}");
    let ca = std::fs::canonicalize(tls_dir.join("ca.pem"))?;
    let ca = ca.display().to_string();
    let printed = format!("mosquitto_pub -h 127.0.0.1 -p {} --cafile {ca}", tls.port());
    assert!(text.contains(&printed), "{text}");
    let over_tls = ["--cafile", ca.as_str()];
    let mut sub = MosquittoSub::start_with(tls, "up-tls-sub", "hello/#", &over_tls)?;
    sub.wait_subscribed("hello/ping", || {
        mosquitto_pub_with(tls, "up-tls-ping", "hello/ping", "ping", &over_tls)
    })
    .await?;
    mosquitto_pub_with(tls, "up-tls-pub", "hello/mqlb", "hi", &over_tls)?;
    let got = sub.lines(1, "hello/ping", Duration::from_secs(10));
    assert_eq!(got, ["hello/mqlb hi"]);
    assert!(up.stop().await?, "mqlb up exits cleanly on Ctrl-C");
    Ok(())
}

/// A semantic error and a warning of `check-config` name the line of their key, as a compiler
/// does (`FILE:LINE: key: message`); a key the file leaves out names its table's line.
#[test]
fn check_config_names_the_line_of_each_problem() -> anyhow::Result<()> {
    let tmp = TempDir::new("cli-lines")?;
    let file = tmp.path().join("lines.toml");
    std::fs::write(
        &file,
        "[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:1883\"\n\
         \n[[pool]]\nname = \"p\"\n[[pool.backend]]\nid = \"a\"\naddr = \"127.0.0.1:1884\"\n\
         [[pool.backend]]\nid = \"b\"\naddr = \"nowhere\"\n\
         \n[[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n\
         idle_timeout = \"30s\"\ntcp_keepalive_count = 0\n",
    )?;
    let path = file.display().to_string();
    let (code, out) = run(&["check-config", &path])?;
    assert_eq!(code, 1, "{out}");
    for want in [
        format!("{path}:12: pool[0].backend[1].addr: "),
        format!("{path}:19: rule[0].tcp_keepalive_count: "),
        format!("warning: {path}:18: rule[0].idle_timeout: "),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    Ok(())
}

/// A pipe whose reader is gone, for a child's stdout: every write to it fails with EPIPE.
fn closed_pipe() -> anyhow::Result<std::io::PipeWriter> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    Ok(writer)
}

/// Runs `mqlb args` with stdout a closed pipe; returns (exit code, stderr).
fn run_into_closed_pipe(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(mqlb_bin()?)
        .args(args)
        .stdout(closed_pipe()?)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    Ok((out.status.code().unwrap_or(-1), stderr))
}

/// `mqlb ... | head -0`: a reader that left is no panic. check-config and probe exit with
/// their own code, and a broker whose stdout is gone keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_is_not_a_panic() -> anyhow::Result<()> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/mqlb.toml");
    let (code, err) =
        run_into_closed_pipe(&["check-config", example.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let closed = format!("127.0.0.1:{}", free_port()?);
    let (code, err) = run_into_closed_pipe(&["probe", &closed])?;
    assert_eq!(code, 1, "unhealthy, not a panic (101): {err}");
    assert!(!err.contains("panicked"), "{err}");

    let tmp = TempDir::new("cli-pipe")?;
    let file = tmp.path().join("one.toml");
    let (mqtt, http_port) = (free_port()?, free_port()?);
    std::fs::write(
        &file,
        format!("[[broker]]\nid = \"n1\"\nmqtt = \"127.0.0.1:{mqtt}\"\nhttp = \"127.0.0.1:{http_port}\"\n"),
    )?;
    let mut node = KillOnDrop(
        Command::new(mqlb_bin()?)
            .args([
                "broker",
                "-c",
                file.to_str().unwrap_or_default(),
                "--id",
                "n1",
            ])
            .stdout(closed_pipe()?)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse()?;
    wait_until(
        "the broker's http answers",
        Duration::from_secs(20),
        || async {
            http(http_addr, "GET", "/healthz")
                .await
                .is_ok_and(|(s, _)| s == 200)
        },
    )
    .await?;
    // It printed its addresses by now (before serving); it must still be there.
    let c = Client::connect(format!("127.0.0.1:{mqtt}").parse()?, "after-pipe").await?;
    assert_eq!(node.0.try_wait()?, None, "the broker exited");
    c.disconnect().await;
    Ok(())
}
