// The LB's status page (lb/src/admin.rs): /healthz, /api/rules, /api/backends, /api/events
// and /metrics, every 2 s; rates are the difference of two samples of the counters.
async function refreshLb() {
  const [health, rules, backends, events, metricsText] = await Promise.all([
    fetch("/healthz", { cache: "no-store" }).then(async (r) => ({ ok: r.ok, text: (await r.text()).trim() })),
    api("/api/rules"),
    api("/api/backends"),
    api("/api/events"),
    api("/metrics"),
  ]);
  const m = parseMetrics(metricsText);
  rateStart();
  $("health").replaceChildren(pill(health.ok ? "ok" : "down"), " ", health.text);

  const up = backends.filter((b) => b.state === "up").length;
  const active = backends.reduce((s, b) => s + b.active_connections, 0);
  const opened = sum(m, "mqlb_connections_opened_total");
  const bytes = sum(m, "mqlb_bytes_total");
  const card = (k, v) => el("div", { class: "card" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));
  $("overview").replaceChildren(
    card("backends taking connections", up + " / " + backends.length),
    card("active connections", active),
    card("new connections", fmtRate(rate("opened", opened))),
    card("traffic", fmtRate(rate("bytes", bytes), "B")),
    card("reloads ok / refused", sum(m, "mqlb_config_reloads_total", { result: "ok" }) + " / " +
      sum(m, "mqlb_config_reloads_total", { result: "error" })),
  );

  fill("rules", rules.map((r) => {
    const dp = m.find((x) => x.name === "mqlb_data_path_up" && x.labels.rule === r.rule);
    const dpState = dp === undefined ? "unknown" : dp.value === 1 ? "up" : "down";
    const ruleIn = sum(m, "mqlb_bytes_total", { rule: r.rule, direction: "in" });
    const ruleOut = sum(m, "mqlb_bytes_total", { rule: r.rule, direction: "out" });
    return el("tr", { "data-rule": r.rule },
      el("td", {}, r.rule), el("td", {}, r.frontend), el("td", {}, r.bind),
      el("td", {}, pill(r.listening ? "up" : "down")), el("td", {}, pill(dpState)),
      el("td", {}, r.pool), el("td", {}, r.distribution),
      el("td", { class: "num" }, sum(m, "mqlb_connections_active", { rule: r.rule })),
      el("td", { class: "num" }, fmtRate(rate("opened:" + r.rule, sum(m, "mqlb_connections_opened_total", { rule: r.rule })))),
      el("td", { class: "num" }, fmtRate(rate("in:" + r.rule, ruleIn), "B")),
      el("td", { class: "num" }, fmtRate(rate("out:" + r.rule, ruleOut), "B")));
  }), "no rules");

  fill("backends", backends.map((b) => {
    const p = b.last_probe;
    const probe = p ? [pill(p.ok ? "ok" : "error"), " ", p.detail, " ", el("span", { class: "mute" },
      fmtAgo(p.time) + ", " + p.duration_ms.toFixed(1) + " ms")] : el("span", { class: "mute" }, "none yet");
    const bIn = sum(m, "mqlb_bytes_total", { backend: b.id, direction: "in" });
    const bOut = sum(m, "mqlb_bytes_total", { backend: b.id, direction: "out" });
    return el("tr", { "data-backend": b.id, "data-pool": b.pool, "data-state": b.state },
      el("td", {}, b.pool), el("td", {}, el("b", {}, b.id)), el("td", {}, b.addr),
      el("td", { class: "num" }, b.weight), el("td", { class: "state" }, pill(b.state)),
      el("td", {}, b.why || ""),
      el("td", { title: fmtTime(b.down_since) }, b.down_since ? fmtAgo(b.down_since) : ""),
      el("td", { class: "wrap" }, probe),
      el("td", { class: "num" }, b.active_connections),
      el("td", { class: "num" }, b.pending_connects + " / " + b.queued_connects),
      el("td", { class: "num" }, fmtRate(rate("bin:" + b.pool + "/" + b.id, bIn), "B")),
      el("td", { class: "num" }, fmtRate(rate("bout:" + b.pool + "/" + b.id, bOut), "B")));
  }), "no backends");

  fill("events", events.slice(-50).reverse().map((e) => el("tr", { "data-event": e.kind },
    el("td", { title: fmtAgo(e.time) }, fmtTime(e.time)), el("td", {}, pill(e.level)),
    el("td", {}, e.kind.replaceAll("_", " ")), el("td", {}, e.pool || ""), el("td", {}, e.backend || ""),
    el("td", { class: "wrap" }, e.reason || ""))), "no events since the LB started");
}
every(2000, refreshLb);
