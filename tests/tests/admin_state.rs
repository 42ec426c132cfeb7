//! The admin API's decisions survive a restart of the `mqlb lb` process: a drained backend is
//! still drained after a SIGKILL and a new start (the state file was written before the drain
//! was answered), and an enable is remembered over the config's own `drain = true`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_tests::{
    backend_state, discard_server, free_port, get_json, http, loopback, mqlb_bin, wait_listening,
    wait_until, KillOnDrop, TempDir,
};

const DEADLINE: Duration = Duration::from_secs(15);

/// Starts `mqlb lb -c file` and waits until its admin server answers.
async fn start_lb(file: &std::path::Path, admin: SocketAddr) -> anyhow::Result<KillOnDrop> {
    let mut child = KillOnDrop(
        Command::new(mqlb_bin()?)
            .args(["lb", "-c", file.to_str().unwrap_or_default()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_listening(admin, &mut child.0, DEADLINE).await?;
    Ok(child)
}

async fn kill(mut lb: KillOnDrop) -> anyhow::Result<()> {
    lb.0.kill()?;
    lb.0.wait()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_survives_an_lb_restart_and_so_does_an_enable() -> anyhow::Result<()> {
    let (b1, b2) = (discard_server()?, discard_server()?);
    let tmp = TempDir::new("admin-state")?;
    let file = tmp.path().join("lb.toml");
    let admin = loopback(free_port()?);
    let front = loopback(free_port()?);
    std::fs::write(
        &file,
        format!(
            "[lb]\nadmin = \"{admin}\"\nwatch_config = false\n\
             [[frontend]]\nname = \"f\"\nbind = \"{front}\"\n\
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n\
             [[pool.backend]]\nid = \"b1\"\naddr = \"{b1}\"\ndrain = true\n\
             [[pool.backend]]\nid = \"b2\"\naddr = \"{b2}\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n"
        ),
    )?;
    let state_file = tmp.path().join("lb.toml.state.json");

    let lb = start_lb(&file, admin).await?;
    assert_eq!(
        backend_state(admin, "b1").await?,
        "draining",
        "the config's drain"
    );
    assert_eq!(backend_state(admin, "b2").await?, "up");
    let (code, body) = http(admin, "POST", "/api/backends/b2/drain").await?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(admin, "POST", "/api/backends/b1/enable").await?;
    assert_eq!(code, 200, "{body}");
    assert!(state_file.exists(), "no state file beside the config");
    // SIGKILL: nothing is written at exit; what survives was written with the decision.
    kill(lb).await?;

    let lb = start_lb(&file, admin).await?;
    wait_until("b2 listed", DEADLINE, || async {
        backend_state(admin, "b2").await.is_ok()
    })
    .await?;
    assert_eq!(
        backend_state(admin, "b2").await?,
        "draining",
        "drain forgotten"
    );
    assert_eq!(
        backend_state(admin, "b1").await?,
        "up",
        "the enable did not override the config's drain = true"
    );
    let (code, _) = http(admin, "POST", "/api/backends/b2/enable").await?;
    assert_eq!(code, 200);
    kill(lb).await?;

    let lb = start_lb(&file, admin).await?;
    assert_eq!(backend_state(admin, "b2").await?, "up", "enable forgotten");
    // An evacuation is remembered too: drained after the restart, and it finishes there.
    let (code, body) = http(admin, "POST", "/api/backends/b2/evacuate?rate=50").await?;
    assert_eq!(code, 200, "{body}");
    kill(lb).await?;

    let lb = start_lb(&file, admin).await?;
    assert_eq!(
        backend_state(admin, "b2").await?,
        "draining",
        "evacuation forgotten"
    );
    let b2 = || async {
        get_json(admin, "/api/backends")
            .await
            .ok()
            .and_then(|v| v.as_array()?.iter().find(|b| b["id"] == "b2").cloned())
            .unwrap_or_default()
    };
    wait_until("the resumed evacuation done", DEADLINE, || async {
        b2().await["evacuation"]["done"] == true
    })
    .await?;
    assert_eq!(b2().await["evacuation"]["rate"], 50);
    let (code, _) = http(admin, "POST", "/api/backends/b2/enable").await?;
    assert_eq!(code, 200);
    assert_eq!(
        b2().await["evacuation"],
        serde_json::Value::Null,
        "enable ends it"
    );
    kill(lb).await?;

    // A file that is not a state file: the LB still starts, with the config alone.
    std::fs::write(&state_file, "{not json")?;
    let lb = start_lb(&file, admin).await?;
    assert_eq!(
        backend_state(admin, "b1").await?,
        "draining",
        "config drain"
    );
    kill(lb).await?;
    Ok(())
}
