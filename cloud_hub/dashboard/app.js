// The edgepack dashboard: polls the hub's admin API (the HttpOnly login cookie authenticates)
// and redraws. No framework, no CDN: the hub may run where there is no internet.
"use strict";

const POLL_MS = 2000;
let lastEventId = 0;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

const badge = (text, cls) => el("span", { class: `badge ${cls || text}` }, text);
const tags = (obj) => Object.entries(obj || {}).map(([k, v]) => el("span", { class: "tag" }, `${k}=${v}`));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "never");

class LoggedOut extends Error {}

async function getJSON(path) {
  const res = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (res.status === 401) throw new LoggedOut();
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 9, class: "muted" }, empty))]));
}

function renderDevices(devices) {
  const online = devices.filter((d) => d.online).length;
  $("fleet-summary").textContent = `${online} online, ${devices.length - online} offline`;
  fill($("devices"), devices.map((d) => el("tr", { "data-device": d.id, "data-online": String(d.online) },
    el("td", {}, el("code", {}, d.id)),
    el("td", {}, badge(d.online ? "online" : "offline")),
    el("td", {}, tags(d.tags)),
    el("td", {}, d.agent_version || "–"),
    el("td", {}, when(d.last_seen)),
    el("td", {}, (d.services || []).join(", ") || "–"),
  )), "No devices enrolled yet (edgepack device enroll ID --tag k=v).");
}

function targetText(target) {
  if (target.devices) return `devices: ${target.devices.join(", ")}`;
  if (target.selector) {
    const sel = typeof target.selector === "string" ? target.selector
      : Object.entries(target.selector).map(([k, v]) => `${k}=${v}`).join(",");
    return `selector: ${sel}`;
  }
  return JSON.stringify(target);
}

function renderServices(deployments) {
  fill($("services"), deployments.map((s) => el("tr", { "data-service": s.name, "data-state": s.state },
    el("td", {}, el("strong", {}, s.name)),
    el("td", {}, `${s.module}:${s.version}`),
    el("td", {}, targetText(s.target)),
    el("td", {}, badge(s.state)),
    el("td", {}, el("ul", { class: "breakdown" }, (s.devices || []).map((d) =>
      el("li", { "data-device": d.device_id, "data-state": d.state || "pending" },
        el("code", {}, d.device_id), " ", badge(d.state || "pending"),
        d.reason ? el("span", { class: "muted" }, ` ${d.reason}`) : null))))
  )), "No services deployed yet (edgepack deploy -n NAME -m MODULE:VERSION …).");
}

function renderModels(models) {
  fill($("models"), models.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, m.version), el("td", {}, tags(m.tags)),
    el("td", {}, `${(m.size / 1024).toFixed(1)} KiB`))), "No models registered.");
}

function renderModules(modules) {
  fill($("modules"), modules.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, m.version),
    el("td", {}, el("code", { title: m.manifest_digest }, m.manifest_digest.slice(0, 19) + "…")))),
  "No modules pushed.");
}

function renderEvents(events) {
  const list = $("events");
  for (const e of events) {
    lastEventId = Math.max(lastEventId, e.id);
    list.prepend(el("li", { "data-kind": e.kind },
      el("span", { class: "muted" }, new Date(e.at).toLocaleTimeString(), " "),
      el("span", { class: "kind" }, e.kind), e.message));
  }
  while (list.children.length > 200) list.lastChild.remove();
}

function polyline(points, key, cls, width, height) {
  const values = points.map((p) => p[key]).filter((v) => v !== null);
  if (!values.length) return null;
  const max = Math.max(...values, 1e-9);
  const t0 = Date.parse(points[0].t);
  const span = Math.max(Date.parse(points[points.length - 1].t) - t0, 1);
  const coords = points.filter((p) => p[key] !== null).map((p) =>
    `${((Date.parse(p.t) - t0) / span) * width},${height - (p[key] / max) * (height - 6) - 3}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coords.join(" "));
  line.setAttribute("class", cls);
  return line;
}

function chart(title, points, key, cls, unit) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 300 90");
  svg.setAttribute("preserveAspectRatio", "none");
  const line = polyline(points, key, cls, 300, 90);
  if (line) svg.append(line);
  const last = [...points].reverse().find((p) => p[key] !== null);
  return el("div", { class: "chart", "data-chart": `${title}` },
    el("h3", {}, title, el("span", { class: "muted" }, last ? ` — ${last[key]} ${unit}` : " — no data")), svg);
}

function renderTelemetry(data) {
  const services = Object.entries(data.services || {});
  if (!services.length) {
    $("charts").replaceChildren(el("p", { class: "muted" }, "No telemetry yet."));
    return;
  }
  $("charts").replaceChildren(...services.flatMap(([svc, points]) => [
    chart(`${svc} requests/s`, points, "rps", "rps", "req/s"),
    chart(`${svc} p50 latency`, points, "p50_ms", "p50", "ms"),
  ]));
}

function showLogin(message) {
  clearTimeout(timer);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

// Each feed is fetched and drawn on its own: one that fails (a 500, a timeout) shows its error in
// its own card and never hides the others.
const FEEDS = [
  ["devices", () => "/api/v1/devices", (d) => renderDevices(d.devices)],
  ["services", () => "/api/v1/deployments", (d) => renderServices(d.deployments)],
  ["models", () => "/api/v1/models", renderModels],
  ["modules", () => "/api/v1/modules", renderModules],
  ["events", () => `/api/v1/dashboard/events?after=${lastEventId}`, (d) => renderEvents(d.events)],
  ["telemetry", () => "/api/v1/dashboard/telemetry?minutes=15", renderTelemetry],
];

function feedError(name, message) {
  const note = document.querySelector(`[data-feed-error='${name}']`);
  note.textContent = message ? `${name} unavailable (${message}); retrying` : "";
  note.hidden = !message;
}

async function refresh() {
  clearTimeout(timer);
  const results = await Promise.allSettled(FEEDS.map(([, path]) => getJSON(path())));
  if (results.some((r) => r.status === "rejected" && r.reason instanceof LoggedOut)) return showLogin();
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  const failed = [];
  results.forEach((result, i) => {
    const [name, , render] = FEEDS[i];
    let error = result.status === "rejected" ? result.reason.message : null;
    if (!error) {
      try {
        render(result.value);
      } catch (err) {
        error = `cannot show it: ${err.message}`;
      }
    }
    feedError(name, error);
    if (error) failed.push(name);
  });
  const now = new Date().toLocaleTimeString();
  $("status").textContent = failed.length === FEEDS.length ? `hub unreachable; retrying`
    : failed.length ? `updated ${now}; ${failed.join(", ")} unavailable` : `updated ${now}`;
  timer = setTimeout(refresh, POLL_MS);
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = new URLSearchParams({ token: $("token").value });
  const res = await fetch("/api/v1/dashboard/login", { method: "POST", body, credentials: "same-origin" });
  if (!res.ok) {
    const err = await res.json().catch(() => ({}));
    return showLogin(err.error ? err.error.message : `HTTP ${res.status}`);
  }
  $("token").value = "";
  refresh();
});

$("logout").addEventListener("click", async () => {
  await fetch("/api/v1/dashboard/logout", { method: "POST", credentials: "same-origin" });
  lastEventId = 0;
  $("events").replaceChildren();
  showLogin();
});

refresh();
