//! `mqlb plan`: which clients a membership change would move, before it is made.
//!
//! A client-ID rule sends a client to the member with the highest rendezvous score among the
//! eligible members of its pool (`mqlb_lb::select`). So a change (a member removed, added, or
//! re-weighted) moves exactly the clients whose top choice changes, and the plan computes that
//! with the LB's own selection code, never a copy: for a running LB from its admin API (the live
//! connections with their client ID, pool and backend, the members with their weight and
//! state), or without one from a config file and a list of client IDs. The decision is pure
//! (`plan`); fetching and printing are the CLI's.
//!
//! A live connection keeps its backend until it reconnects (the LB does not move live
//! connections, except those of a removed member under `close_on_backend_down`), so "would
//! move" means: lands elsewhere when it next connects.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{bail, Context};
use mqlb_lb::select::{backend_hash, rendezvous_order, Candidate, Key};
use serde_json::Value;

/// One pool member as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub weight: u32,
    /// Takes new connections now (up and not draining).
    pub eligible: bool,
}

/// A client to place: its ID, its pool, and where it is now (`None`: where the pool's current
/// members would send it).
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    pub client_id: String,
    pub pool: String,
    pub backend: Option<String>,
}

/// The membership change asked for. `remove` and `weight` apply to the ID in every pool (as the
/// admin API's drain does); `add` to `pool`, or to the only pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub remove: Vec<String>,
    pub add: Vec<(String, SocketAddr)>,
    pub weight: Vec<(String, u32)>,
    pub pool: Option<String>,
}

/// One client that would land on another backend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    pub client_id: String,
    pub pool: String,
    pub from: String,
    /// `None`: no eligible member left in its pool.
    pub to: Option<String>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Clients placed (live connections keyed by client ID, or the file's IDs).
    pub clients: usize,
    pub moves: Vec<Move>,
}

/// The member the LB would pick for `client_id` among `members`: the first of the same
/// rendezvous order the data path computes (`PoolRt::order`).
pub fn pick<'a>(members: &'a [Member], client_id: &str) -> Option<&'a str> {
    let cands: Vec<Candidate> = members
        .iter()
        .map(|m| Candidate {
            hash: backend_hash(&m.id),
            weight: m.weight,
            active: 0,
            eligible: m.eligible,
        })
        .collect();
    rendezvous_order(Key::ClientId(client_id).hash(), &cands)
        .first()
        .map(|&i| members[i].id.as_str())
}

/// The pools after `change`. Errors name what the change refers to that does not exist.
pub fn changed(
    pools: &BTreeMap<String, Vec<Member>>,
    change: &Change,
) -> anyhow::Result<BTreeMap<String, Vec<Member>>> {
    let mut out = pools.clone();
    let known = |id: &str| {
        pools.values().flatten().any(|m| m.id == id) || change.add.iter().any(|(a, _)| a == id)
    };
    for id in change
        .remove
        .iter()
        .chain(change.weight.iter().map(|(id, _)| id))
    {
        if !known(id) {
            bail!("no backend {id:?} in any pool");
        }
    }
    for members in out.values_mut() {
        members.retain(|m| !change.remove.contains(&m.id));
    }
    if !change.add.is_empty() {
        let pool = match &change.pool {
            Some(p) if out.contains_key(p) => p.clone(),
            Some(p) => bail!("no pool {p:?}"),
            None if out.len() == 1 => out.keys().next().cloned().unwrap_or_default(),
            None => bail!(
                "--add needs --pool: the LB has {} pools ({})",
                out.len(),
                out.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        let members = out.entry(pool.clone()).or_default();
        for (id, _) in &change.add {
            if members.iter().any(|m| &m.id == id) {
                bail!("backend {id:?} is already in pool {pool}");
            }
            // A new member is taken to be up: the plan is what happens once it is.
            members.push(Member {
                id: id.clone(),
                weight: 1,
                eligible: true,
            });
        }
    }
    for members in out.values_mut() {
        for (id, w) in &change.weight {
            for m in members.iter_mut().filter(|m| &m.id == id) {
                m.weight = *w;
            }
        }
    }
    Ok(out)
}

/// Which clients `change` would move (pure).
pub fn plan(
    pools: &BTreeMap<String, Vec<Member>>,
    clients: &[Client],
    change: &Change,
) -> anyhow::Result<Plan> {
    let after = changed(pools, change)?;
    let empty = Vec::new();
    let mut moves = Vec::new();
    for c in clients {
        let before = pools.get(&c.pool).unwrap_or(&empty);
        let now = match &c.backend {
            Some(b) => Some(b.as_str()),
            None => pick(before, &c.client_id),
        };
        let Some(now) = now else { continue };
        let next = pick(after.get(&c.pool).unwrap_or(&empty), &c.client_id);
        if next != Some(now) {
            moves.push(Move {
                client_id: c.client_id.clone(),
                pool: c.pool.clone(),
                from: now.to_string(),
                to: next.map(str::to_string),
            });
        }
    }
    moves.sort();
    Ok(Plan {
        clients: clients.len(),
        moves,
    })
}

/// Pools from `/api/backends`: a member is eligible when its state is `up`.
pub fn pools_from_api(backends: &Value) -> anyhow::Result<BTreeMap<String, Vec<Member>>> {
    let mut pools: BTreeMap<String, Vec<Member>> = BTreeMap::new();
    for b in backends.as_array().context("/api/backends: not a list")? {
        let field = |k: &str| {
            b[k].as_str()
                .with_context(|| format!("/api/backends: an entry without {k:?}: {b}"))
        };
        let weight = b["weight"]
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .with_context(|| format!("/api/backends: an entry without a weight: {b}"))?;
        pools
            .entry(field("pool")?.to_string())
            .or_default()
            .push(Member {
                id: field("id")?.to_string(),
                weight,
                eligible: field("state")? == "up",
            });
    }
    Ok(pools)
}

/// Clients from `/api/connections`: those with a client ID (routed by it); the count of the
/// others (hashed on addresses, which the plan does not predict).
pub fn clients_from_api(conns: &Value) -> anyhow::Result<(Vec<Client>, usize)> {
    let list = conns.as_array().context("/api/connections: not a list")?;
    let mut clients = Vec::new();
    let mut unkeyed = 0;
    for c in list {
        match (
            c["client_id"].as_str(),
            c["pool"].as_str(),
            c["backend"].as_str(),
        ) {
            (Some(id), Some(pool), Some(backend)) => clients.push(Client {
                client_id: id.to_string(),
                pool: pool.to_string(),
                backend: Some(backend.to_string()),
            }),
            _ => unkeyed += 1,
        }
    }
    Ok((clients, unkeyed))
}

/// Pools from a config file: a member is eligible unless it is configured drained.
pub fn pools_from_config(cfg: &mqlb_config::Config) -> BTreeMap<String, Vec<Member>> {
    cfg.pools
        .iter()
        .map(|p| {
            let members = p
                .backends
                .iter()
                .map(|b| Member {
                    id: b.id.clone(),
                    weight: b.weight.get(),
                    eligible: !b.drain,
                })
                .collect();
            (p.name.clone(), members)
        })
        .collect()
}

/// The plan as the CLI prints it: a summary, then one line per move
/// (`move CLIENT_ID POOL FROM -> TO`), then the count per destination.
pub fn render(plan: &Plan, unkeyed: usize, what: &str) -> String {
    let mut out = format!(
        "{what}: {} client(s) placed by client ID, {} would move\n",
        plan.clients,
        plan.moves.len()
    );
    if unkeyed > 0 {
        out += &format!(
            "{unkeyed} live connection(s) without a client ID (hashed on addresses): not predicted\n"
        );
    }
    let mut to: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &plan.moves {
        let dest = m.to.as_deref().unwrap_or("(none: no backend left)");
        out += &format!("move {} {} {} -> {dest}\n", m.client_id, m.pool, m.from);
        *to.entry(dest).or_default() += 1;
    }
    for (dest, n) in to {
        out += &format!("to {dest}: {n}\n");
    }
    out
}

/// `ID=VALUE` of `--add` and `--weight`.
pub fn split_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, v)) if !id.is_empty() && !v.is_empty() => Ok((id.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected ID=VALUE")),
    }
}

/// What `mqlb plan` was asked (the command line, parsed).
pub struct Args {
    pub admin: Option<String>,
    pub token_file: Option<std::path::PathBuf>,
    pub config: Option<std::path::PathBuf>,
    pub clients: Option<std::path::PathBuf>,
    pub change: Change,
}

/// The change as the command line wrote it: `--add ID=ADDR`, `--weight ID=N`.
pub fn parse_change(
    remove: Vec<String>,
    add: &[String],
    weight: &[String],
    pool: Option<String>,
) -> anyhow::Result<Change> {
    let mut change = Change {
        remove,
        pool,
        ..Change::default()
    };
    for a in add {
        let (id, addr) = split_assignment(a).map_err(anyhow::Error::msg)?;
        let addr = addr
            .parse()
            .with_context(|| format!("--add {a}: {addr:?} is not an IP:PORT"))?;
        change.add.push((id, addr));
    }
    for w in weight {
        let (id, n) = split_assignment(w).map_err(anyhow::Error::msg)?;
        let n: u32 = n
            .parse()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .with_context(|| format!("--weight {w}: a weight is 1 to 10000"))?;
        change.weight.push((id, n));
    }
    if change.remove.is_empty() && change.add.is_empty() && change.weight.is_empty() {
        bail!("nothing to plan: give --remove ID, --add ID=ADDR or --weight ID=N");
    }
    Ok(change)
}

/// The change in words, for the summary line.
fn describe(c: &Change) -> String {
    let mut parts: Vec<String> = c.remove.iter().map(|id| format!("remove {id}")).collect();
    parts.extend(c.add.iter().map(|(id, a)| format!("add {id}={a}")));
    parts.extend(c.weight.iter().map(|(id, w)| format!("weight {id}={w}")));
    format!("plan ({})", parts.join(", "))
}

/// Runs the plan, against the running LB or, with `--clients`, against the config file.
pub async fn run(args: Args) -> anyhow::Result<String> {
    let cfg = match &args.config {
        Some(path) => Some(mqlb_config::Config::load(path)?),
        None => None,
    };
    let what = describe(&args.change);
    if let Some(file) = &args.clients {
        let cfg = cfg.context("--clients needs --config: the pools come from the file")?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        let pool = client_id_pool(&cfg, args.change.pool.as_deref())?;
        let clients: Vec<Client> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|id| Client {
                client_id: id.to_string(),
                pool: pool.clone(),
                backend: None,
            })
            .collect();
        let p = plan(&pools_from_config(&cfg), &clients, &args.change)?;
        return Ok(render(&p, 0, &what));
    }
    let admin_text = match (&args.admin, &cfg) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.lb.admin.to_string(),
        (None, None) => mqlb_config::DEFAULT_ADMIN.to_string(),
    };
    let admin: SocketAddr = admin_text
        .parse()
        .with_context(|| format!("--admin {admin_text:?}: not an IP:PORT"))?;
    let token = match &args.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("{}: cannot read the token", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let backends = admin_get(admin, "/api/backends", token.as_deref()).await?;
    let conns = admin_get(admin, "/api/connections", token.as_deref()).await?;
    let (clients, unkeyed) = clients_from_api(&conns)?;
    let p = plan(&pools_from_api(&backends)?, &clients, &args.change)?;
    Ok(render(&p, unkeyed, &what))
}

/// The pool the file's client IDs belong to: that of the config's client-ID rule, or `--pool`.
fn client_id_pool(cfg: &mqlb_config::Config, asked: Option<&str>) -> anyhow::Result<String> {
    if let Some(p) = asked {
        return match cfg.pool(p) {
            Some(_) => Ok(p.to_string()),
            None => bail!("no [[pool]] {p:?} in the config"),
        };
    }
    let mut pools: Vec<&str> = cfg
        .rules
        .iter()
        .filter(|r| r.distribution == mqlb_config::Distribution::MqttClientId)
        .map(|r| r.pool.as_str())
        .collect();
    pools.dedup();
    match pools.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!("the config has no mqtt-client-id rule: name the pool with --pool"),
        _ => bail!(
            "several pools have client-ID rules ({}): name one with --pool",
            pools.join(", ")
        ),
    }
}

/// GET `path` of the LB's admin API as JSON: a minimal HTTP/1.1 client (the API answers a
/// small body with a Content-Length and closes after it on `Connection: close`).
async fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n{auth}\r\n")
                .as_bytes(),
        )
        .await?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).await?;
        Ok::<_, std::io::Error>(all)
    };
    let all = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("admin API {admin}{path}: no answer within 10 s"))?
        .with_context(|| format!("admin API {admin}{path}"))?;
    let text = String::from_utf8_lossy(&all);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("admin API {admin}{path}: not an HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        bail!("admin API {admin}{path}: {status} {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("admin API {admin}{path}: not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ids: &[&str]) -> BTreeMap<String, Vec<Member>> {
        let members = ids
            .iter()
            .map(|id| Member {
                id: id.to_string(),
                weight: 1,
                eligible: true,
            })
            .collect();
        BTreeMap::from([("p".to_string(), members)])
    }

    fn clients(n: usize) -> Vec<Client> {
        (0..n)
            .map(|i| Client {
                client_id: format!("dev-{i}"),
                pool: "p".into(),
                backend: None,
            })
            .collect()
    }

    #[test]
    fn removing_a_member_moves_its_clients_only() {
        let pools = pool(&["b1", "b2", "b3"]);
        let change = Change {
            remove: vec!["b2".into()],
            ..Change::default()
        };
        let p = plan(&pools, &clients(3000), &change).expect("plan");
        assert!(p.moves.iter().all(|m| m.from == "b2"), "{:?}", p.moves);
        assert!(p.moves.iter().all(|m| m.to.as_deref() != Some("b2")));
        let on_b2 = clients(3000)
            .iter()
            .filter(|c| pick(&pools["p"], &c.client_id) == Some("b2"))
            .count();
        assert_eq!(p.moves.len(), on_b2);
        assert!((800..1200).contains(&on_b2), "{on_b2}");
    }

    #[test]
    fn adding_a_member_moves_clients_onto_it_only() {
        let pools = pool(&["b1", "b2", "b3"]);
        let change = Change {
            add: vec![("b4".into(), "127.0.0.1:1".parse().expect("addr"))],
            ..Change::default()
        };
        let p = plan(&pools, &clients(4000), &change).expect("plan");
        assert!(p.moves.iter().all(|m| m.to.as_deref() == Some("b4")));
        assert!((800..1200).contains(&p.moves.len()), "{}", p.moves.len());
    }

    #[test]
    fn a_heavier_member_takes_clients_from_the_others() {
        let pools = pool(&["b1", "b2"]);
        let change = Change {
            weight: vec![("b1".into(), 3)],
            ..Change::default()
        };
        let p = plan(&pools, &clients(4000), &change).expect("plan");
        assert!(p
            .moves
            .iter()
            .all(|m| m.from == "b2" && m.to.as_deref() == Some("b1")));
        // b1 goes from 1/2 to 3/4 of the keys.
        assert!((800..1200).contains(&p.moves.len()), "{}", p.moves.len());
    }

    #[test]
    fn a_live_connection_off_its_first_choice_counts_from_where_it_is() {
        let pools = pool(&["b1", "b2"]);
        let first = pick(&pools["p"], "x").expect("a choice").to_string();
        let other = if first == "b1" { "b2" } else { "b1" };
        let live = [Client {
            client_id: "x".into(),
            pool: "p".into(),
            backend: Some(other.into()),
        }];
        // No change at all: it still moves back to its first choice when it reconnects.
        let p = plan(&pools, &live, &Change::default()).expect("plan");
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].to.as_deref(), Some(first.as_str()));
    }

    #[test]
    fn a_drained_member_takes_nothing_before_or_after() {
        let mut pools = pool(&["b1", "b2", "b3"]);
        pools.get_mut("p").expect("p")[0].eligible = false;
        let change = Change {
            weight: vec![("b1".into(), 5)],
            ..Change::default()
        };
        let p = plan(&pools, &clients(500), &change).expect("plan");
        assert!(p.moves.is_empty(), "{:?}", p.moves);
    }

    #[test]
    fn unknown_names_are_errors() {
        let pools = pool(&["b1"]);
        let rm = Change {
            remove: vec!["b9".into()],
            ..Change::default()
        };
        assert!(plan(&pools, &[], &rm).is_err());
        let mut two = pool(&["b1"]);
        two.insert("q".into(), Vec::new());
        let add = Change {
            add: vec![("b4".into(), "127.0.0.1:1".parse().expect("addr"))],
            ..Change::default()
        };
        assert!(changed(&two, &add).is_err(), "which pool?");
        assert!(split_assignment("b1").is_err());
        assert_eq!(
            split_assignment("b1=2"),
            Ok(("b1".to_string(), "2".to_string()))
        );
    }

    #[test]
    fn the_api_answers_are_read() {
        let backends = serde_json::json!([
            {"pool": "p", "id": "b1", "weight": 2, "state": "up"},
            {"pool": "p", "id": "b2", "weight": 1, "state": "draining"}
        ]);
        let pools = pools_from_api(&backends).expect("pools");
        assert_eq!(pools["p"][0].weight, 2);
        assert!(pools["p"][0].eligible && !pools["p"][1].eligible);
        let conns = serde_json::json!([
            {"client_id": "a", "pool": "p", "backend": "b1"},
            {"client_id": null, "pool": "p", "backend": "b1"}
        ]);
        let (clients, unkeyed) = clients_from_api(&conns).expect("clients");
        assert_eq!((clients.len(), unkeyed), (1, 1));
    }
}
