// The HA server's status page (haserver/src/server.rs): /healthz (role, primary, database; open),
// /metrics (open: the counts), /api/cluster and /api/events (signed when authenticate_reads is
// on, as configured servers have it: then the members are not listed).
const haEvents = { after: 0, kept: [] };
// Set at the first 401: asked again on every refresh, the signed reads would fill
// mqlb_ha_auth_failures_total (and its alert) for as long as the page is open.
let readsSigned = false;
async function refreshHa() {
  const [health, metricsText] = await Promise.all([
    fetch("/healthz", { cache: "no-store" }).then((r) => r.json()),
    fetch("/metrics", { cache: "no-store" }).then((r) => r.text()),
  ]);
  const m = parseMetrics(metricsText);
  $("health").replaceChildren(pill(health.degraded ? "down" : health.role === "primary" ? "up" : "info"), " ",
    health.role + (health.degraded ? ", degraded" : ""));
  const card = (k, v) => el("div", { class: "card" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));
  const cards = [card("id", health.id), card("role", health.role), card("primary", health.primary || "none"),
    card("database", health.degraded ? "failing: " + health.database : "ok"),
    card("members up / down", sum(m, "mqlb_ha_members", { state: "up" }) + " / " + sum(m, "mqlb_ha_members", { state: "down" })),
    card("membership version", sum(m, "mqlb_ha_membership_version"))];
  let cluster;
  try {
    if (readsSigned) throw new Unauthorized("/api/cluster");
    cluster = await api("/api/cluster");
  } catch (e) {
    if (!(e instanceof Unauthorized)) throw e;
    readsSigned = true;
    $("signed").hidden = false;
    $("members-table").hidden = true;
    $("overview").replaceChildren(...cards);
    fill("events", [], "signed reads: not shown");
    return;
  }
  $("overview").replaceChildren(...cards);
  fill("members", cluster.members.map((m) => el("tr", { "data-member": m.id, "data-state": m.state },
    el("td", {}, el("b", {}, m.id)), el("td", {}, pill(m.state)), el("td", {}, m.mqtt), el("td", {}, m.mqtt_v5 || ""),
    el("td", {}, m.mesh || ""), el("td", {}, m.http || ""),
    el("td", { title: fmtTime(m.last_seen_ms / 1000) }, fmtAgo(m.last_seen_ms / 1000)),
    el("td", {}, fmtTime(m.registered_ms / 1000)))), "no members registered");
  const fresh = await api("/api/events?after=" + haEvents.after + "&limit=10000");
  for (const e of fresh) haEvents.after = Math.max(haEvents.after, e.seq);
  haEvents.kept = haEvents.kept.concat(fresh).slice(-50);
  fill("events", haEvents.kept.slice().reverse().map((e) => el("tr", { "data-event": e.kind },
    el("td", {}, fmtTime(e.at_ms / 1000)), el("td", {}, e.member), el("td", {}, e.kind), el("td", { class: "num" }, e.version))),
    "no events");
}
every(2000, refreshHa);
