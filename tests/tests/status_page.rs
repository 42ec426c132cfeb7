//! The LB's status page (`GET /` on the admin server) as a person sees it: rendered by a real
//! browser (headless Chromium, Debian's package), from the page's own script and the JSON APIs
//! under the page's Content-Security-Policy. It shows the backends by name and state, and a
//! drain through the admin API shows up on the next load.
//!
//! Without Chromium the test says so and passes, except in CI (`CI` set), where it must run.
//! `MQLB_SCREENSHOT=docs/status-page.png` (from the workspace root) also writes the README's
//! screenshot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{topo, DEADLINE};
use mqlb_tests::{backend_state, http, wait_until, Client, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one Chromium run may take (it starts, loads, runs the page's script).
const CHROMIUM_LIMIT: Duration = Duration::from_secs(60);

/// The Chromium binary, or why there is none (then the test is skipped outside CI).
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

/// Loads `url` in a fresh headless Chromium and returns the DOM after its script ran
/// (`--virtual-time-budget`: the page's timers and fetches run to that much page time).
/// With `screenshot`, also writes a 1200×800 PNG there.
async fn render(bin: &Path, url: &str, screenshot: Option<&Path>) -> anyhow::Result<String> {
    let (bin, url) = (bin.to_path_buf(), url.to_string());
    let png = screenshot.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || render_blocking(&bin, &url, png.as_deref())).await?
}

fn render_blocking(bin: &Path, url: &str, screenshot: Option<&Path>) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let profile = TempDir::new("chromium")?;
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(png) => {
            cmd.arg(format!("--screenshot={}", png.display()))
                .arg("--window-size=1200,800")
                .arg("--hide-scrollbars");
        }
        None => {
            cmd.arg("--dump-dom");
        }
    }
    // Its own process group, so a run past the limit is killed with all its helpers.
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child.id();
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    // Read both pipes while it runs: a DOM larger than a pipe's buffer would block it.
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        stdout.read_to_end(&mut b).map(|_| b)
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        stderr.read_to_end(&mut b).map(|_| b)
    });
    let deadline = std::time::Instant::now() + CHROMIUM_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            // The group of the child started above (process_group(0)), nothing else.
            let killed = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .status();
            let reaped = child.wait();
            anyhow::bail!(
                "chromium {url}: no result within {CHROMIUM_LIMIT:?} (group killed: {killed:?}, {reaped:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let join = |h: std::thread::JoinHandle<std::io::Result<Vec<u8>>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("pipe reader panicked"))?
            .map_err(anyhow::Error::from)
    };
    let (out, err) = (join(out)?, join(err)?);
    anyhow::ensure!(
        status.success(),
        "chromium {url}: {status}\n{}",
        String::from_utf8_lossy(&err)
    );
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The status line and headers of `GET path`.
async fn response_head(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    Ok(get_raw(addr, path).await?.0)
}

/// `GET path` as (status line and headers, body).
async fn get_raw(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.to_string(), body.to_string()))
}

/// The `data-state` of the row of `backend` in the rendered DOM.
fn row_state<'a>(dom: &'a str, backend: &str) -> Option<&'a str> {
    let start = dom.find(&format!("<tr data-backend=\"{backend}\""))?;
    let row = &dom[start..start + dom[start..].find("</tr>")?];
    let state = row.split("data-state=\"").nth(1)?;
    state.split('"').next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_backends_and_a_drain() -> anyhow::Result<()> {
    let Some(bin) = chromium() else {
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "CI is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!("SKIPPED the_status_page_shows_the_backends_and_a_drain: no chromium on PATH (apt-get install chromium)");
        return Ok(());
    };
    if !mqlb_tests::mosquitto_installed() {
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "CI is set but mosquitto is not installed"
        );
        eprintln!("SKIPPED: mosquitto is not installed");
        return Ok(());
    }
    let mut t = topo(3, "").await?;
    for b in ["b1", "b2", "b3"] {
        wait_until("both backends up", DEADLINE, || async {
            backend_state(t.admin, b).await.is_ok_and(|s| s == "up")
        })
        .await?;
    }
    let url = format!("http://{}/", t.admin);

    // The page is served as HTML with a policy that runs only its own script.
    let head = response_head(t.admin, "/").await?.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("script-src 'sha256-"), "{head}");

    let dom = render(&bin, &url, None).await?;
    assert_eq!(row_state(&dom, "b1"), Some("up"), "b1 in the DOM:\n{dom}");
    assert_eq!(row_state(&dom, "b2"), Some("up"), "b2 in the DOM:\n{dom}");
    assert!(
        dom.contains("<b>b1</b>") && dom.contains("<b>b2</b>"),
        "names shown"
    );
    assert!(
        dom.contains("data-rule=\"mqtt\""),
        "the rule is listed:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"problem\"></div>"),
        "no refresh failed:\n{dom}"
    );
    assert!(
        dom.contains("<span id=\"updated\">updated "),
        "refreshed:\n{dom}"
    );

    // Drain b2 through the admin API: the next load shows it.
    let (code, body) = http(t.admin, "POST", "/api/backends/b2/drain").await?;
    assert_eq!(code, 200, "{body}");
    let dom = render(&bin, &url, None).await?;
    assert_eq!(
        row_state(&dom, "b2"),
        Some("draining"),
        "b2 drained:\n{dom}"
    );
    assert_eq!(row_state(&dom, "b1"), Some("up"));

    // b3's broker dies: its probe takes it down, and the page shows why and the event.
    t.brokers[2].kill();
    wait_until("b3 down", DEADLINE, || async {
        backend_state(t.admin, "b3")
            .await
            .is_ok_and(|s| s == "down")
    })
    .await?;
    let dom = render(&bin, &url, None).await?;
    assert_eq!(row_state(&dom, "b3"), Some("down"), "b3 down:\n{dom}");
    assert!(
        dom.contains("<tr data-event=\"backend_down\">"),
        "the event is listed:\n{dom}"
    );

    // The README's screenshot, with a few clients connected.
    if let Some(png) = std::env::var_os("MQLB_SCREENSHOT") {
        let mut clients = Vec::new();
        for i in 0..7 {
            clients.push(Client::connect(t.front, &format!("sensor-{i}")).await?);
        }
        // A reload, for an event to show.
        t.lb.reload().await?;
        // A relative path is from the workspace root (cargo runs tests in the crate's directory).
        let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(png);
        render(&bin, &url, Some(&png)).await?;
        let size = std::fs::metadata(&png)?.len();
        assert!(size > 10_000, "{}: {size} bytes", png.display());
        for c in clients {
            c.disconnect().await;
        }
    }
    t.lb.shutdown().await;
    Ok(())
}

/// The HA server's and a broker node's pages, in the same browser: the HA server's role and
/// counts (its membership reads are signed, so it says why it lists no member), the node's
/// clients and its mesh link to the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_server_and_broker_pages_render() -> anyhow::Result<()> {
    use mqlb_tests::{fast_ha_timing, start_haserver, Cluster};
    let Some(bin) = chromium() else {
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "CI is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!("SKIPPED the_ha_server_and_broker_pages_render: no chromium on PATH");
        return Ok(());
    };
    let dir = TempDir::new("ha-page")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let cluster = Cluster::start_with_ha(2, &[ha.addr()]).await?;
    let client = Client::connect(cluster.mqtt(0), "page-client").await?;
    wait_until("both members up", DEADLINE, || async {
        mqlb_tests::ha_get_json(ha.addr(), "/api/cluster")
            .await
            .is_ok_and(|v| {
                v["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().filter(|m| m["state"] == "up").count() == 2)
            })
    })
    .await?;

    let dom = render(&bin, &format!("http://{}/", ha.addr()), None).await?;
    assert!(
        dom.contains("<div id=\"problem\"></div>"),
        "no refresh failed:\n{dom}"
    );
    assert!(dom.contains("<div class=\"v\">ha1</div>"), "its id:\n{dom}");
    assert!(
        dom.contains("<div class=\"v\">ok</div><div class=\"k\">database</div>"),
        "its database works:\n{dom}"
    );
    assert!(
        dom.contains("<div class=\"v\">2 / 0</div>"),
        "members up / down:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"signed\" class=\"mute\">"),
        "says reads are signed:\n{dom}"
    );
    // It asked once, not on every refresh: an open page must not feed the auth-failure alert.
    let (_, text) = http(ha.addr(), "GET", "/metrics").await?;
    let refused = mqlb_tests::metric(&text, "mqlb_ha_auth_failures_total", &[]);
    assert_eq!(refused, 1.0, "signed reads refused to the page");

    let http = cluster
        .http(0)
        .ok_or_else(|| anyhow::anyhow!("node without http"))?;
    let dom = render(&bin, &format!("http://{http}/"), None).await?;
    assert!(
        dom.contains("<div id=\"problem\"></div>"),
        "no refresh failed:\n{dom}"
    );
    assert!(
        dom.contains("<tr data-peer=\"n2\" data-state=\"up\">"),
        "the mesh link to n2:\n{dom}"
    );
    assert!(
        dom.contains("<div class=\"v\">n1</div>"),
        "the node:\n{dom}"
    );
    client.disconnect().await;
    ha.stop().await;
    Ok(())
}

/// Off loopback the APIs need the admin token; the page then shows the token form and no
/// data, and asks each API once, not every refresh (each refusal is counted by the server).
/// The LB here is on loopback, where reads are open, so its page is served by a stand-in that
/// refuses every API with 401 like an LB off loopback without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_the_page_shows_nothing_and_asks_once() -> anyhow::Result<()> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let Some(bin) = chromium() else {
        anyhow::ensure!(
            std::env::var_os("CI").is_none(),
            "CI is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!(
            "SKIPPED without_the_token_the_page_shows_nothing_and_asks_once: no chromium on PATH"
        );
        return Ok(());
    };
    // The LB's page, as its admin server serves it (the CSP names its script's hash).
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cfg = mqlb_config::Config::parse(
        "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n[[frontend]]\nname = \"f\"\n\
         bind = \"127.0.0.1:0\"\n[[pool]]\nname = \"p\"\n[[pool.backend]]\nid = \"b1\"\n\
         addr = \"127.0.0.1:9\"\n[[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n",
        "test",
    )?;
    let lb = mqlb_lb::Lb::start(
        cfg,
        mqlb_lb::Listeners {
            admin: Some(admin),
            ..Default::default()
        },
    )
    .await?;
    let (head, page) = get_raw(lb.admin_addr(), "/").await?;
    lb.shutdown().await;
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .ok_or_else(|| anyhow::anyhow!("no CSP: {head}"))?
        .to_string();

    let stand_in = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = stand_in.local_addr()?;
    let asked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counts = asked.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = stand_in.accept().await else {
                return;
            };
            let (page, csp, counts) = (page.clone(), csp.clone(), counts.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65_536 {
                    match tokio::time::timeout(DEADLINE, s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&buf);
                let path = text.split(' ').nth(1).unwrap_or("").to_string();
                *counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(path.clone())
                    .or_default() += 1;
                let (status, ctype, extra, body) = match path.as_str() {
                    "/" => (
                        "200 OK",
                        "text/html; charset=utf-8",
                        format!("content-security-policy: {csp}\r\n"),
                        page,
                    ),
                    "/healthz" => ("200 OK", "text/plain", String::new(), "ok\n".to_string()),
                    _ => (
                        "401 Unauthorized",
                        "text/plain",
                        "www-authenticate: Bearer realm=\"mqlb\"\r\n".to_string(),
                        "refused: no bearer token\n".to_string(),
                    ),
                };
                let res = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = s.write_all(res.as_bytes()).await {
                    eprintln!("stand-in: {e}");
                }
            });
        }
    });
    let dom = render(&bin, &format!("http://{addr}/"), None).await;
    server.abort();
    let dom = dom?;
    assert!(
        dom.contains("<div id=\"auth\">"),
        "the token form is shown:\n{dom}"
    );
    assert!(
        !dom.contains("<tr data-backend="),
        "no backend shown:\n{dom}"
    );
    assert!(dom.contains("waiting for a token"), "{dom}");
    let asked = asked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        asked.get("/api/backends"),
        Some(&1),
        "asked once: {asked:?}"
    );
    assert_eq!(asked.get("/favicon.ico"), None, "{asked:?}");
    Ok(())
}
