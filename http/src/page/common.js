"use strict";
// Shared by mqlb's status pages (haserver/src/status_page.rs): authorised reads of the
// server's own JSON APIs, the token form, and formatting. Everything shown is set with
// textContent, never parsed as HTML.
const TOKEN_KEY = "mqlb.token";
const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    e.append(c instanceof Node ? c : document.createTextNode(c === undefined || c === null ? "" : String(c)));
  }
  return e;
}

/** A table body's rows replaced at once. */
function fill(tbodyId, rows, empty) {
  const body = $(tbodyId);
  body.replaceChildren(...rows);
  if (rows.length === 0 && empty) {
    const cols = body.closest("table").querySelectorAll("th").length || 1;
    body.append(el("tr", {}, el("td", { colspan: cols, class: "mute" }, empty)));
  }
}

/** The token form, shown when an API answers 401. */
function tokenForm() {
  let bar = $("auth");
  if (!bar) {
    const input = el("input", { id: "token", type: "password", size: 40, autocomplete: "off", placeholder: "admin token" });
    const save = el("button", { type: "button" }, "Use token");
    save.addEventListener("click", () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      bar.hidden = true;
      refreshNow();
    });
    bar = el("div", { id: "auth" }, "This server needs its bearer token to show its state:", input, save,
      el("span", { class: "mute" }, "(kept in this tab only)"));
    document.body.insertBefore(bar, document.querySelector("main"));
  }
  bar.hidden = false;
}

class Unauthorized extends Error {}

/** GETs `path` (JSON or text) with the tab's token, if any. */
async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(path, { headers, cache: "no-store", credentials: "omit", redirect: "error" });
  if (r.status === 401) throw new Unauthorized(path);
  if (!r.ok) throw new Error(path + ": HTTP " + r.status + " " + (await r.text()).trim());
  return (r.headers.get("content-type") || "").includes("json") ? r.json() : r.text();
}

/** Prometheus text → [{name, labels, value}] (samples only, no comments). */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the samples of `name` whose labels match `want`. */
function sum(samples, name, want) {
  let s = 0;
  for (const x of samples) {
    if (x.name !== name) continue;
    if (Object.entries(want || {}).every(([k, v]) => x.labels[k] === v)) s += x.value;
  }
  return s;
}

/** Per-second rates of named counters between two refreshes. */
const rates = { prev: new Map(), now: new Map(), dt: 0, at: 0 };
function rateStart() {
  const t = performance.now() / 1000;
  rates.dt = rates.at ? t - rates.at : 0;
  rates.at = t;
  rates.prev = rates.now;
  rates.now = new Map();
}
/** Records counter `key` = `value`; returns its rate per second, or null on the first sample. */
function rate(key, value) {
  rates.now.set(key, value);
  const before = rates.prev.get(key);
  if (before === undefined || rates.dt <= 0 || value < before) return null;
  return (value - before) / rates.dt;
}

function fmtRate(r, unit) {
  if (r === null) return "…";
  if (unit === "B") return fmtBytes(r) + "/s";
  return (r < 10 ? r.toFixed(1) : Math.round(r).toString()) + "/s";
}
function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? Math.round(n) : n.toFixed(1)) + " " + u[i];
}
function fmtAgo(unixSeconds) {
  if (!unixSeconds) return "";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(1) + " d ago";
}
function fmtTime(unixSeconds) {
  if (!unixSeconds) return "";
  const d = new Date(unixSeconds * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
    p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
}
function pill(state) {
  return el("span", { class: "pill " + state }, state);
}

/** Runs `refresh` now and every `ms`; shows when it last worked, or what failed. */
let refreshNow = () => {};
function every(ms, refresh) {
  let timer = null;
  const run = async () => {
    clearTimeout(timer);
    try {
      await refresh();
      $("problem").textContent = "";
      $("updated").textContent = "updated " + fmtTime(Date.now() / 1000);
    } catch (e) {
      if (e instanceof Unauthorized) {
        // Wait for a token: asking again every few seconds would only fill the server's
        // refusal counter (mqlb_admin_requests_refused_total). "Use token" runs it again.
        tokenForm();
        $("updated").textContent = "waiting for a token";
        return;
      }
      $("problem").textContent = "Refresh failed: " + e.message;
    }
    timer = setTimeout(run, ms);
  };
  refreshNow = run;
  run();
}
