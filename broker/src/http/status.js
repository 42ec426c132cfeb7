// A broker node's status page (broker/src/http.rs): /api/status (the node and its mesh
// links) and /metrics (clients, sessions, messages), every 2 s.
async function refreshNode() {
  const [status, metricsText] = await Promise.all([api("/api/status"), api("/metrics")]);
  const m = parseMetrics(metricsText);
  rateStart();
  const linksUp = status.peers.filter((p) => p.up).length;
  $("health").replaceChildren(pill(linksUp === status.peers.length ? "up" : "down"), " ", status.id);
  const card = (k, v) => el("div", { class: "card" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));
  const received = sum(m, "mqlb_broker_messages_received_total");
  const sent = sum(m, "mqlb_broker_messages_sent_total");
  const sessions = m.filter((x) => x.name === "mqlb_broker_sessions")
    .map((x) => card("sessions " + (x.labels.state || ""), x.value));
  $("overview").replaceChildren(
    card("node", status.id),
    card("clients connected", sum(m, "mqlb_broker_clients_connected")),
    ...sessions,
    card("retained messages", sum(m, "mqlb_broker_retained_messages")),
    card("subscription filters", sum(m, "mqlb_broker_subscription_filters")),
    card("messages in", fmtRate(rate("in", received))),
    card("messages out", fmtRate(rate("out", sent))),
    card("mesh links up", linksUp + " / " + status.peers.length),
  );
  fill("peers", status.peers.map((p) => el("tr", { "data-peer": p.id, "data-state": p.up ? "up" : "down" },
    el("td", {}, el("b", {}, p.id)), el("td", {}, p.addr), el("td", {}, pill(p.up ? "up" : "down")),
    el("td", { class: "num" }, p.backlog),
    el("td", { class: "num" }, sum(m, "mqlb_mesh_unacked", { peer: p.id })),
    el("td", { class: "num" }, fmtRate(rate("fwd:" + p.id, sum(m, "mqlb_mesh_forwarded_total", { peer: p.id })))),
    el("td", { class: "num" }, fmtRate(rate("rcv:" + p.id, sum(m, "mqlb_mesh_received_total", { peer: p.id })))),
    el("td", { class: "num" }, sum(m, "mqlb_mesh_dropped_total", { peer: p.id })))), "a single node: no mesh links");
}
every(2000, refreshNode);
