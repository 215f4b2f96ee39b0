// The edgepack dashboard: polls the hub's admin API (the HttpOnly login cookie authenticates)
// and redraws. No framework, no CDN: the hub may run where there is no internet.
//
// Built for fleets of thousands: the hub counts, filters and pages devices; the page only ever
// holds one page of them. Routes live in the hash: #/ (fleet), #/devices/ID, #/services/NAME.
// Every string that came from a device or a user is set as text (el() never parses HTML).
"use strict";

const POLL_MS = 2000;
const PAGE = 50;
// A feed that takes the hub long to answer (the fleet charts read thousands of samples) is asked
// for less often: at most once per this many times its answers' duration, so polling never
// keeps the hub busy more than ~1/10 of the time per open page, whatever the fleet's size.
// The duration is the shorter of its last two answers: one slow answer alone (the first after
// sign-in, asked beside every other feed of a cold page; a pause) must not stop a fast feed for
// seconds, while a feed that is slow every time is still asked for less often.
const COST_FACTOR = 10;
const MAX_BACKOFF_MS = 30000;
let lastEventId = 0;
let timer = null;
// This session's CSRF token: every request that changes something sends it (the hub refuses
// one without it: cloud_hub/api/csrf.py). It comes with the sign-in answer, or after a reload
// from /api/v1/dashboard/session; a page of another origin can read neither.
let csrfToken = null;
let countsMarked = false;

// What the device table shows: the filters and the page (offset) in it.
const filters = { q: "", tags: [], state: "", online: "", offset: 0 };
const servicePage = { state: "", offset: 0 };

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
const deviceLink = (id) => el("a", { href: `#/devices/${encodeURIComponent(id)}` }, el("code", {}, id));
const serviceLink = (name) => el("a", { href: `#/services/${encodeURIComponent(name)}` }, el("strong", {}, name));

class LoggedOut extends Error {}

async function getJSON(path) {
  const res = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (res.status === 401) throw new LoggedOut();
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    const err = new Error(body.error ? body.error.message : `${path}: HTTP ${res.status}`);
    err.refused = res.status === 400 || res.status === 422;  // the request was wrong: no retry helps
    throw err;
  }
  return res.json();
}

// A request that changes something (an action, sign out), with the CSRF token; ``body`` is
// sent as JSON.
async function send(method, path, body) {
  if (csrfToken === null) csrfToken = (await getJSON("/api/v1/dashboard/session")).csrf_token;
  const headers = { Accept: "application/json", "X-CSRF-Token": csrfToken };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, credentials: "same-origin", headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) throw new LoggedOut();
  const answer = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(answer.error ? answer.error.message : `${path}: HTTP ${res.status}`);
  return answer;
}

// The outcome of the last action, until the next one.
function notice(message, failed = false) {
  $("notice").textContent = message;
  $("notice").className = failed ? "error" : "muted";
}

// An action: the page says it is under way, then its outcome (or the hub's refusal).
async function act(method, path, done, body) {
  notice("working…");
  try {
    done(await send(method, path, body));
  } catch (err) {
    if (err instanceof LoggedOut) return showLogin();
    notice(err.message, true);
  }
  refresh();
}

// Destructive actions ask in the page first (no browser dialog: it can be styled, tested and
// read by a screen reader). Resolves true when the operator confirmed.
let confirmAnswer = null;
function confirmInPage(question, yes) {
  if (confirmAnswer) confirmAnswer(false);  // a newer question replaces the one still open
  $("confirm-text").textContent = question;
  $("confirm-yes").textContent = yes;
  $("confirm").hidden = false;
  $("confirm-no").focus();
  return new Promise((resolve) => {
    confirmAnswer = (answer) => {
      confirmAnswer = null;
      $("confirm").hidden = true;
      resolve(answer);
    };
  });
}
$("confirm-yes").addEventListener("click", () => confirmAnswer && confirmAnswer(true));
$("confirm-no").addEventListener("click", () => confirmAnswer && confirmAnswer(false));

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 9, class: "muted" }, empty))]));
}

// --- routes ----------------------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [kind, ...rest] = hash.split("/");
  const id = decodeURIComponent(rest.join("/"));
  if (kind === "devices" && id) return { view: "device", id };
  if (kind === "services" && id) return { view: "service", id };
  return { view: "home" };
}

function showView(r) {
  $("home").hidden = r.view !== "home";
  $("device-view").hidden = r.view !== "device";
  $("service-view").hidden = r.view !== "service";
}

// --- summary and services ----------------------------------------------------------------------

function renderSummary(data) {
  const c = data.devices;
  $("fleet-summary").textContent = `${c.online} online, ${c.offline} offline`;
  const counts = $("counts");
  counts.setAttribute("data-total", String(c.total));
  for (const [key, n] of [["total", c.total], ["online", c.online], ["offline", c.offline]]) {
    counts.querySelector(`[data-count='${key}'] .n`).textContent = String(n);
  }
  for (const tile of counts.querySelectorAll("[data-count-state]")) {
    const n = c.by_state[tile.getAttribute("data-count-state")] || 0;
    tile.querySelector(".n").textContent = String(n);
    tile.classList.toggle("zero", n === 0);
  }
  if (!countsMarked) {
    countsMarked = true;
    performance.mark("edgepack:counts");  // the fleet test's first-render measure
  }
  renderServices(data.services);
}

function targetText(target) {
  if (target.devices) {
    const shown = target.devices.slice(0, 5).join(", ");
    return `devices: ${shown}${target.devices.length > 5 ? ` (+${target.devices.length - 5})` : ""}`;
  }
  if (target.selector) {
    const sel = typeof target.selector === "string" ? target.selector
      : Object.entries(target.selector).map(([k, v]) => `${k}=${v}`).join(",");
    return `selector: ${sel}`;
  }
  return JSON.stringify(target);
}

function stateCounts(byState) {
  return Object.entries(byState).filter(([, n]) => n > 0).map(([state, n]) =>
    el("span", { class: "count", "data-state-count": state }, badge(state), ` ${n}`));
}

function bar(pct) {
  const node = el("div", { class: "bar" });
  node.style.width = `${pct}%`;
  return node;
}

function progressBar(rollout) {
  const pct = rollout.total ? Math.round((100 * rollout.done) / rollout.total) : 0;
  return el("div", { class: "progress", title: `${rollout.done} of ${rollout.total} serving the current version` },
    bar(pct),
    el("span", { class: "label" }, `${rollout.done}/${rollout.total} (${pct}%)`));
}

// "v3" for a version that is a number, the version itself otherwise.
const v = (version) => (/^\d/.test(version) ? `v${version}` : version);

// A service whose version failed while its devices went back to an earlier one is not down:
// say which version failed and which one serves, instead of a bare red "Failed".
function serviceState(s) {
  if (s.state === "Failed" && s.serving_instead) {
    return el("span", { class: "badge Failed fallback", "data-serving-instead": s.serving_instead },
      `${v(s.version)} failed — ${v(s.serving_instead)} serving`);
  }
  return badge(s.state);
}

// A service's reason on one device, for a table: one line (cut with an ellipsis by CSS, the
// whole of it in the title) and, once it failed, its traceback and last output as text in <pre>
// under a disclosure, so that a long traceback never stretches a row. `key` names the
// disclosure: it stays open across the redraws of polling. Only text nodes: never HTML.
const openFailures = new Set();
function reasonCell(reason, failure, key) {
  const cell = el("td", { class: "reason" }, el("span", { class: "cause", title: reason || "" }, reason || "–"));
  if (failure && (failure.traceback || failure.log_tail)) {
    const details = el("details", { class: "failure", open: openFailures.has(key) },
      el("summary", {}, "traceback and output"),
      failure.traceback ? el("pre", { class: "traceback" }, failure.traceback) : null,
      failure.log_tail ? el("pre", { class: "log-tail" }, failure.log_tail) : null);
    details.addEventListener("toggle", () => {
      if (details.open) openFailures.add(key); else openFailures.delete(key);
    });
    cell.append(details);
  }
  return cell;
}

function renderServices(services) {
  fill($("services"), services.map((s) => el("tr", { "data-service": s.name, "data-state": s.state },
    el("td", {}, serviceLink(s.name)),
    el("td", {}, `${s.module}:${s.version}`),
    el("td", {}, targetText(s.target)),
    el("td", { class: "state" }, serviceState(s)),
    el("td", { "data-rollout-done": String(s.rollout.done), "data-rollout-total": String(s.rollout.total) },
      progressBar(s.rollout)),
    el("td", {}, s.devices
      ? el("ul", { class: "breakdown" }, s.devices.map((d) =>
        el("li", { "data-device": d.device_id, "data-state": d.state },
          deviceLink(d.device_id), " ", badge(d.state),
          d.reason ? el("span", { class: "muted cause", title: d.reason }, ` ${d.reason}`) : null)))
      : el("div", { class: "counts" }, stateCounts(s.rollout.by_state))),
  )), "No services deployed yet (edgepack deploy -n NAME -m MODULE:VERSION …).");
}

// --- device table --------------------------------------------------------------------------------

function devicesPath() {
  const params = new URLSearchParams({ limit: String(PAGE), offset: String(filters.offset) });
  if (filters.q) params.set("q", filters.q);
  for (const t of filters.tags) params.append("tag", t);
  if (filters.state) params.set("state", filters.state);
  if (filters.online) params.set("online", filters.online);
  return `/api/v1/dashboard/devices?${params}`;
}

function renderDevices(page) {
  if (!page.devices.length && page.offset > 0 && page.total > 0) {
    // The fleet changed under the page shown (fewer devices match now): go to the last page.
    filters.offset = Math.floor((page.total - 1) / PAGE) * PAGE;
    setTimeout(refresh, 0);
    return;
  }
  $("device-total").textContent = `${page.total} matching`;
  $("fleet").setAttribute("data-total", String(page.total));
  const first = page.total ? page.offset + 1 : 0;
  const last = page.offset + page.devices.length;
  $("page-info").textContent = `${first}–${last} of ${page.total}`;
  $("page-prev").disabled = page.offset === 0;
  $("page-next").disabled = last >= page.total;
  fill($("devices"), page.devices.map((d) => el("tr",
    { "data-device": d.id, "data-online": String(d.online), "data-state": d.state },
    el("td", {}, deviceLink(d.id)),
    el("td", {}, badge(d.online ? "online" : "offline")),
    el("td", {}, badge(d.state)),
    el("td", {}, tags(d.tags)),
    el("td", {}, d.agent_version || "–"),
    el("td", {}, when(d.last_seen)),
  )), page.total || filters.q || filters.tags.length || filters.state || filters.online
    ? "No device matches these filters." : "No devices enrolled yet (edgepack device enroll ID --tag k=v).");
}

function setFilters(change) {
  Object.assign(filters, change, { offset: change.offset ?? 0 });
  $("device-search").value = filters.q;
  $("device-tag").value = filters.tags.join(" ");
  $("device-state").value = filters.state;
  $("device-online").value = filters.online;
  refresh();
}

// A count tile filters the device table, from whichever page it is clicked on.
function showFiltered(change) {
  if (route().view !== "home") {
    history.pushState(null, "", "#/");  // (no hashchange event for this)
    clearViews();
  }
  setFilters(change);
}

// --- models, modules, events, charts -------------------------------------------------------------

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

// The alerts firing now (GET /api/v1/alerts, newest first); a device's or service's name links
// to its page.
function renderAlerts(data) {
  const alerts = data.alerts;
  $("alert-total").textContent = alerts.length ? `(${alerts.length} firing)` : "";
  fill($("alerts"), alerts.map((a) => el("tr", { "data-severity": a.severity, title: a.message || "" },
    el("td", {}, when(a.fired_at)),
    el("td", {}, a.rule),
    el("td", {}, badge(a.severity)),
    el("td", {}, a.device_id ? ["device ", deviceLink(a.device_id)] : ["service ", serviceLink(a.service)]),
    el("td", {}, a.value || ""))), "No alert is firing.");
}

function eventItem(e) {
  return el("li", { "data-kind": e.kind },
    el("span", { class: "muted" }, new Date(e.at).toLocaleTimeString(), " "),
    el("span", { class: "kind" }, e.kind), e.message);
}

function renderEvents(events) {
  const list = $("events");
  for (const e of events) {
    lastEventId = Math.max(lastEventId, e.id);
    list.prepend(eventItem(e));
  }
  while (list.children.length > 200) list.lastChild.remove();
}

// --- charts (uPlot, vendored: cloud_hub/dashboard/vendor/) ----------------------------------------

// Each chart is one uPlot with a time axis and a value axis per unit. Points come one per
// bucket that had samples; where samples stopped coming, the line stops (a null, which uPlot
// leaves as a gap), never a line drawn across the missing time.
const CHARTS = [
  { name: "requests/s", series: [
    { key: "rps", label: "requests/s", unit: "req/s", scale: "rps", stroke: "#1f5fbf" },
    { key: "error_pct", label: "errors", unit: "%", scale: "pct", stroke: "#b42318" },
  ] },
  { name: "latency", series: [
    { key: "p50_ms", label: "p50", unit: "ms", scale: "ms", stroke: "#a15c00" },
    { key: "p95_ms", label: "p95", unit: "ms", scale: "ms", stroke: "#6b3fa0" },
    // the module's run() alone: the rest of p95 is the request around it (body, parsing, queue)
    { key: "run_p95_ms", label: "run p95", unit: "ms", scale: "ms", stroke: "#2e7d32" },
  ] },
];

// A gap is more than two sampling intervals without a point (so one late or lost sample, or
// samples drifting across a bucket boundary, is no gap). The interval is the series' usual
// spacing (the lower median between points), at least one bucket: an agent may send less often.
function spacing(xs, bucketS) {
  const steps = xs.slice(1).map((x, i) => x - xs[i]).filter((d) => d > 0).sort((a, b) => a - b);
  return Math.max(bucketS, steps.length ? steps[Math.floor((steps.length - 1) / 2)] : bucketS);
}

// uPlot's columns: times (s) and one array per series, with a null where data is missing;
// ``gaps`` counts the missing stretches between points. A series that went silent reaches to
// now without a line.
function columns(points, series, bucketS) {
  const times = points.map((p) => Date.parse(p.t) / 1000);
  const step = spacing(times, bucketS);
  const xs = [];
  const ys = series.map(() => []);
  const hole = (t) => {
    xs.push(t);
    ys.forEach((col) => col.push(null));
  };
  let gaps = 0;
  points.forEach((p, n) => {
    if (n > 0 && times[n] - times[n - 1] > 2 * step) {
      hole(times[n - 1] + step);
      gaps += 1;
    }
    xs.push(times[n]);
    series.forEach((def, i) => ys[i].push(p[def.key] ?? null));
  });
  const now = Date.now() / 1000;
  if (times.length && now - times[times.length - 1] > 2 * step) {
    hole(times[times.length - 1] + step);
    hole(now);
  }
  return { data: [xs, ...ys], gaps };
}

const CHART_HEIGHT = 170;
const fmt = (value, unit) => (value === null || value === undefined ? "–" : `${value} ${unit}`);

function caption(points, series) {
  return series.map((def) => {
    const last = [...points].reverse().find((p) => p[def.key] !== null && p[def.key] !== undefined);
    return `${def.label} ${fmt(last ? last[def.key] : null, def.unit)}`;
  }).join(", ");
}

function chartOptions(width, series) {
  const scales = [...new Set(series.map((d) => d.scale))];
  return {
    width, height: CHART_HEIGHT,
    // Value axes start at 0 (a rate or a latency read against 0), with room above the top.
    scales: { x: { time: true }, ...Object.fromEntries(scales.map((k) => [k, { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] }])) },
    series: [
      { label: "time" },
      ...series.map((d) => ({
        label: `${d.label} (${d.unit})`, scale: d.scale, stroke: d.stroke, width: 2, spanGaps: false,
        value: (u, val) => fmt(val, d.unit),
      })),
    ],
    axes: [
      { label: "time", space: 80 },  // room for a date under its first tick
      ...scales.map((k, i) => {
        const unit = series.find((d) => d.scale === k).unit;
        return { scale: k, label: unit, side: i === 0 ? 3 : 1, grid: { show: i === 0 }, size: 56 };
      }),
    ],
    legend: { live: false },
  };
}

// A chart fills its grid cell (one column on a phone, two or more on a desk; the CSS decides).
const chartWidth = (node) => Math.max(200, node.clientWidth || 320);

// Draw (or update) every service's charts in ``target``; charts of services no longer in the
// answer (a deleted service) are removed with their uPlot.
function charts(target, services, empty, bucketS = 10) {
  const entries = Object.entries(services || {});
  const wanted = new Set();
  if (!entries.length) {
    for (const node of target.querySelectorAll("[data-chart]")) node.uplot?.destroy();
    target.replaceChildren(el("p", { class: "muted" }, empty));
    return;
  }
  target.querySelector(":scope > p.muted")?.remove();
  for (const [svc, points] of entries) {
    for (const def of CHARTS) {
      const name = `${svc} ${def.name}`;
      wanted.add(name);
      const { data, gaps } = columns(points, def.series, bucketS);
      let node = [...target.querySelectorAll("[data-chart]")].find((n) => n.getAttribute("data-chart") === name);
      if (!node) {
        node = el("div", { class: "chart", "data-chart": name }, el("h3", {}, name, el("span", { class: "muted" })));
        target.append(node);
        node.uplot = new uPlot(chartOptions(chartWidth(node), def.series), data, node);
      } else {
        node.uplot.setData(data);
      }
      node.setAttribute("data-gaps", String(gaps));
      node.setAttribute("data-points", String(points.length));
      node.querySelector("h3 .muted").textContent = ` — ${caption(points, def.series)}`;
    }
  }
  for (const node of target.querySelectorAll("[data-chart]")) {
    if (!wanted.has(node.getAttribute("data-chart"))) {
      node.uplot?.destroy();
      node.remove();
    }
  }
  // After the grid settled (a chart added or removed changes the others' cells; so does the
  // window's width), every chart takes its cell's width.
  for (const node of target.querySelectorAll("[data-chart]")) {
    const width = chartWidth(node);
    if (node.uplot.width !== width) node.uplot.setSize({ width, height: CHART_HEIGHT });
  }
}

const renderTelemetry = (data) => charts($("charts"), data.services, "No telemetry yet.", data.bucket_s);

// --- device page ---------------------------------------------------------------------------------

function info(target, pairs) {
  target.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]));
}

function renderDevice(data) {
  const d = data.device;
  const view = $("device-view");
  view.setAttribute("data-device", d.id);
  view.setAttribute("data-online", String(d.online));
  view.setAttribute("data-state", d.state);
  $("device-title").textContent = d.id;
  $("device-badges").replaceChildren(badge(d.online ? "online" : "offline"), " ", badge(d.state));
  info($("device-info"), [
    ["tags", el("span", {}, tags(d.tags))],
    ["agent", d.agent_version || "–"],
    ["last seen", when(d.last_seen)],
    ["services", data.services.join(", ") || "–"],
    ["generation", `${data.generation} issued, ${data.applied_generation ?? "none"} applied`],
    ["last error", data.last_error || "–"],
  ]);
  fill($("device-modules"), data.modules.map((m) => el("tr", { "data-service": m.service, "data-state": m.state },
    el("td", {}, serviceLink(m.service)),
    el("td", {}, badge(m.state)),
    reasonCell(m.reason, m.failure, `${d.id}/${m.service}`),
    el("td", {}, m.version || (m.manifest_digest ? m.manifest_digest.slice(0, 19) + "…" : "–")),
    el("td", {}, m.serving_version || "–"),
    el("td", {}, String(m.restarts)),
    el("td", {}, m.endpoint ? el("code", {}, m.endpoint) : "–"),
    el("td", {}, el("button", { type: "button", class: "log-button", "data-log": m.service,
      onclick: () => showLog(d.id, m.service) }, "Log")),
  )), "This device has not reported any module yet.");
  charts($("device-charts"), data.telemetry, "No telemetry from this device yet.", data.bucket_s);
  $("device-events").replaceChildren(...data.events.map(eventItem));
}

// --- service page --------------------------------------------------------------------------------

function servicePath(name) {
  const params = new URLSearchParams({ limit: String(PAGE), offset: String(servicePage.offset) });
  if (servicePage.state) params.set("state", servicePage.state);
  return `/api/v1/dashboard/services/${encodeURIComponent(name)}?${params}`;
}

// The service shown, as last read: what Redeploy sends back (its settings and target).
let shownService = null;
let versionsOf = null;  // the module whose versions Redeploy offers

function renderService(data) {
  if (!data.devices.length && data.offset > 0 && data.total > 0) {
    servicePage.offset = Math.floor((data.total - 1) / PAGE) * PAGE;
    setTimeout(refresh, 0);
    return;
  }
  const s = data.service;
  const view = $("service-view");
  view.setAttribute("data-service", s.name);
  view.setAttribute("data-state", s.state);
  view.setAttribute("data-total", String(data.total));
  $("service-title").textContent = s.name;
  $("service-badge").replaceChildren(serviceState(s));
  shownService = data;
  if (versionsOf !== s.module) {
    // The versions feed asked for the module by the service's name until now: ask for the
    // right one at once rather than at the next poll.
    versionsOf = s.module;
    getJSON(`/api/v1/modules?name=${encodeURIComponent(s.module)}`).then(renderVersions, () => {});
  }
  info($("service-info"), [
    ["module", `${s.module}:${s.version}`],
    ["digest", el("code", {}, s.manifest_digest)],
    ["target", targetText(s.target)],
    ["updated", when(data.updated_at)],
    ...(s.staged ? [["waves", s.staged]] : []),
  ]);
  const r = s.rollout;
  $("service-rollout").replaceChildren(
    progressBar(r),
    el("div", { class: "tiles" }, Object.entries(r.by_state).map(([state, n]) =>
      el("a", { class: `tile ${state}${n ? "" : " zero"}`, href: location.hash, "data-rollout-state": state,
        onclick: (ev) => { ev.preventDefault(); setServiceState(state); } },
      el("span", { class: "n" }, String(n)), ` ${state}`))));
  $("service-rollout").setAttribute("data-done", String(r.done));
  $("service-rollout").setAttribute("data-total", String(r.total));
  const first = data.total ? data.offset + 1 : 0;
  const last = data.offset + data.devices.length;
  $("service-page-info").textContent = `${first}–${last} of ${data.total}`;
  $("service-prev").disabled = data.offset === 0;
  $("service-next").disabled = last >= data.total;
  fill($("service-devices"), data.devices.map((d) => el("tr",
    { "data-device": d.device_id, "data-state": d.state, "data-online": String(d.online) },
    el("td", {}, deviceLink(d.device_id)),
    el("td", {}, badge(d.online ? "online" : "offline")),
    el("td", {}, badge(d.state)),
    reasonCell(d.reason, d.failure, `${d.device_id}/${s.name}`),
    el("td", {}, d.serving_version || "–"),
    el("td", {}, d.endpoint ? el("code", {}, d.endpoint) : "–"),
  )), "No device in this state.");
  $("service-events").replaceChildren(...data.events.map(eventItem));
}

// The versions Redeploy offers: the service's module's, newest pushed first.
function renderVersions(modules) {
  if (!shownService) return;
  const select = $("redeploy-version");
  const versions = modules.filter((m) => m.name === shownService.service.module).map((m) => m.version).reverse();
  const chosen = select.value;
  if ([...select.options].map((o) => o.value).join("\n") === versions.join("\n")) return;
  select.replaceChildren(...versions.map((version) => el("option", { value: version }, version)));
  if (versions.includes(chosen)) select.value = chosen;
}

const renderServiceTelemetry = (name) => (data) => charts($("service-charts"),
  name in data.services ? { [name]: data.services[name] } : {},
  "No telemetry for this service in the last 15 minutes.", data.bucket_s);

function setServiceState(state) {
  servicePage.state = state;
  servicePage.offset = 0;
  $("service-state").value = state;
  refresh();
}

// --- polling -------------------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(timer);
  csrfToken = null;
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

// The feeds each route polls. Each is fetched and drawn on its own, as soon as it arrives: one
// that fails (a 500, a timeout) shows its error in its own card and never hides the others,
// and a slow one (telemetry) never delays the counts.
function feeds(r) {
  const always = [["summary", () => "/api/v1/dashboard/summary", renderSummary]];
  if (r.view === "device") {
    return [...always, ["device", () => `/api/v1/dashboard/devices/${encodeURIComponent(r.id)}`, renderDevice]];
  }
  if (r.view === "service") {
    return [
      ...always,
      ["service", () => servicePath(r.id), renderService],
      ["versions", () => `/api/v1/modules?name=${encodeURIComponent(versionsOf ?? r.id)}`, renderVersions],
      ["service-telemetry", () => "/api/v1/dashboard/telemetry?minutes=15", renderServiceTelemetry(r.id)],
    ];
  }
  return [
    ...always,
    ["alerts", () => "/api/v1/alerts?limit=100", renderAlerts],
    ["devices", devicesPath, renderDevices],
    ["models", () => "/api/v1/models", renderModels],
    ["modules", () => "/api/v1/modules", renderModules],
    ["events", () => `/api/v1/dashboard/events?after=${lastEventId}`, (d) => renderEvents(d.events)],
    ["telemetry", () => "/api/v1/dashboard/telemetry?minutes=15", renderTelemetry],
  ];
}

// When each feed was last asked for, how long its last answer took, and its cost (the shorter
// of its last two answers, see COST_FACTOR).
const lastFetched = new Map();
const took = new Map();
const cost = new Map();
const failing = new Set();

const lastUrl = new Map();

// Due: never asked for, asked for something else than now (a filter or the page changed), or
// its back-off has passed.
function due([name, path]) {
  const last = lastFetched.get(name);
  if (last === undefined || lastUrl.get(name) !== path()) return true;
  return Date.now() - last >= Math.min(MAX_BACKOFF_MS, COST_FACTOR * (cost.get(name) || 0));
}

function feedError(name, message, refused = false) {
  const note = document.querySelector(`[data-feed-error='${name}']`);
  if (!note) return;
  note.textContent = !message ? "" : refused ? message : `${name} unavailable (${message}); retrying`;
  note.hidden = !message;
}

let generation = 0;

async function refresh() {
  clearTimeout(timer);
  const mine = ++generation;  // a newer refresh (a filter changed) makes this one's answers stale
  const r = route();
  showView(r);
  const list = feeds(r).filter(due);
  let loggedOut = false;
  const results = await Promise.all(list.map(async ([name, path, render]) => {
    const url = path();
    const started = Date.now();
    lastFetched.set(name, started);
    lastUrl.set(name, url);
    try {
      const data = await getJSON(url);
      const ms = Date.now() - started;
      cost.set(name, Math.min(ms, took.get(name) ?? 0));
      took.set(name, ms);
      if (mine !== generation) {
        lastFetched.delete(name);  // answered for filters no longer shown: ask again next time
        return null;
      }
      $("login").hidden = true;
      $("main").hidden = false;
      $("logout").hidden = false;
      render(data);
      feedError(name, null);
      return null;
    } catch (err) {
      if (err instanceof LoggedOut) {
        loggedOut = true;
        return name;
      }
      if (mine === generation) feedError(name, err.message, err.refused === true);
      return name;
    }
  }));
  if (mine !== generation) return;
  if (loggedOut) return showLogin();
  list.forEach(([name], i) => (results[i] === null ? failing.delete(name) : failing.add(name)));
  // A feed not asked for this time (not due yet) keeps the verdict of its last answer.
  const names = feeds(r).map(([name]) => name);
  const failed = names.filter((n) => failing.has(n));
  const now = new Date().toLocaleTimeString();
  $("status").textContent = failed.length === names.length ? `hub unreachable; retrying`
    : failed.length ? `updated ${now}; ${failed.join(", ")} unavailable` : `updated ${now}`;
  timer = setTimeout(refresh, POLL_MS);
}

// --- controls ------------------------------------------------------------------------------------

let searchTimer = null;
$("device-search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => setFilters({ q: $("device-search").value.trim() }), 250);
});
$("device-tag").addEventListener("change", () => {
  setFilters({ tags: $("device-tag").value.split(/[\s,]+/).filter(Boolean) });
});
$("device-state").addEventListener("change", () => setFilters({ state: $("device-state").value }));
$("device-online").addEventListener("change", () => setFilters({ online: $("device-online").value }));
$("device-filters").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setFilters({
    q: $("device-search").value.trim(),
    tags: $("device-tag").value.split(/[\s,]+/).filter(Boolean),
  });
});
$("device-clear").addEventListener("click", () => setFilters({ q: "", tags: [], state: "", online: "" }));
$("page-prev").addEventListener("click", () => {
  filters.offset = Math.max(0, filters.offset - PAGE);
  refresh();
});
$("page-next").addEventListener("click", () => {
  filters.offset += PAGE;
  refresh();
});
for (const tile of document.querySelectorAll("#counts [data-count]")) {
  tile.addEventListener("click", (ev) => {
    ev.preventDefault();
    showFiltered({ online: tile.getAttribute("data-filter-online"), state: "" });
  });
}
for (const tile of document.querySelectorAll("#counts [data-count-state]")) {
  tile.addEventListener("click", (ev) => {
    ev.preventDefault();
    showFiltered({ state: tile.getAttribute("data-count-state"), online: "" });
  });
}
$("service-state").addEventListener("change", () => setServiceState($("service-state").value));
$("service-prev").addEventListener("click", () => {
  servicePage.offset = Math.max(0, servicePage.offset - PAGE);
  refresh();
});
$("service-next").addEventListener("click", () => {
  servicePage.offset += PAGE;
  refresh();
});

// What a device or service page drew belongs to that page: leaving it clears it, so the next
// page never shows another's rows while it loads, and the fleet's charts are the only ones
// named "SERVICE requests/s" in the document.
function clearViews() {
  for (const id of ["device-charts", "service-charts"]) {
    for (const node of $(id).querySelectorAll("[data-chart]")) node.uplot?.destroy();
  }
  for (const id of ["device-info", "device-modules", "device-charts", "device-events", "log-lines",
    "service-info", "service-rollout", "service-devices", "service-events", "service-charts",
    "redeploy-version"]) $(id).replaceChildren();
  $("log-view").hidden = true;
  shownService = null;
  versionsOf = null;
  if (confirmAnswer) confirmAnswer(false);
  for (const id of ["device-view", "service-view"]) {
    for (const attr of ["data-device", "data-service", "data-state", "data-online", "data-total"]) {
      $(id).removeAttribute(attr);
    }
  }
}

window.addEventListener("hashchange", () => {
  clearViews();
  const r = route();
  if (r.view === "service") {
    servicePage.state = "";
    servicePage.offset = 0;
    $("service-state").value = "";
  }
  window.scrollTo(0, 0);
  refresh();
});

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = new URLSearchParams({ token: $("token").value });
  const res = await fetch("/api/v1/dashboard/login", { method: "POST", body, credentials: "same-origin" });
  if (!res.ok) {
    const err = await res.json().catch(() => ({}));
    return showLogin(err.error ? err.error.message : `HTTP ${res.status}`);
  }
  csrfToken = (await res.json()).csrf_token;
  $("token").value = "";
  refresh();
});

$("device-revoke").addEventListener("click", async () => {
  const r = route();
  if (r.view !== "device") return;
  const question = `Revoke ${r.id}? Its credentials stop working and its services are withdrawn.`;
  if (!(await confirmInPage(question, `Revoke ${r.id}`))) return;
  act("POST", `/api/v1/devices/${encodeURIComponent(r.id)}/revoke`, () => {
    notice(`${r.id} revoked`);
    location.hash = "#/";
  });
});

// A module's log, fetched from the device through the hub. The lines are a module's output:
// they are set as text (textContent), so markup in them shows as the characters it is.
async function showLog(deviceId, service) {
  $("log-view").hidden = false;
  $("log-title").textContent = `${service} on ${deviceId}`;
  $("log-note").textContent = "fetching…";
  $("log-note").className = "muted";
  $("log-lines").textContent = "";
  const params = new URLSearchParams({ device: deviceId, tail: "200" });
  try {
    const answer = await getJSON(`/api/v1/deployments/${encodeURIComponent(service)}/logs?${params}`);
    $("log-lines").textContent = answer.lines.join("\n");
    $("log-note").textContent = `${answer.lines.length} lines${answer.truncated ? "; older lines left out" : ""}`;
  } catch (err) {
    if (err instanceof LoggedOut) return showLogin();
    $("log-note").textContent = err.message;
    $("log-note").className = "error";
  }
}
$("log-close").addEventListener("click", () => { $("log-view").hidden = true; });

$("service-rollback").addEventListener("click", () => {
  const r = route();
  if (r.view !== "service") return;
  act("POST", `/api/v1/deployments/${encodeURIComponent(r.id)}/rollback`,
    (answer) => notice(`${r.id} rolled back to ${v(answer.version)}`));
});

$("service-redeploy").addEventListener("click", () => {
  const r = route();
  if (r.view !== "service" || !shownService || shownService.service.name !== r.id) return;
  const version = $("redeploy-version").value;
  if (!version) return notice("no version of this module to deploy", true);
  const body = {
    module: shownService.service.module, version,
    settings: shownService.settings, target: shownService.service.target,
  };
  act("PUT", `/api/v1/deployments/${encodeURIComponent(r.id)}`, (answer) => {
    const n = Object.keys(answer.issued).length;
    notice(n ? `${r.id} redeployed with ${v(version)} (${n} device${n === 1 ? "" : "s"} updated)`
      : `${r.id} already runs ${v(version)} with these settings: nothing to send`);
  }, body);
});

$("service-delete").addEventListener("click", async () => {
  const r = route();
  if (r.view !== "service") return;
  const question = `Delete service ${r.id}? Its devices stop running it.`;
  if (!(await confirmInPage(question, `Delete ${r.id}`))) return;
  act("DELETE", `/api/v1/deployments/${encodeURIComponent(r.id)}`, () => {
    notice(`service ${r.id} deleted`);
    location.hash = "#/";
  });
});

$("collect-garbage").addEventListener("click", () => {
  act("POST", "/api/v1/registry/gc", (body) => notice(`${body.freed_blobs.length} unused blobs deleted`));
});

$("logout").addEventListener("click", async () => {
  try {
    await send("POST", "/api/v1/dashboard/logout");
  } catch (err) {
    // An ended session is signed out already; anything else leaves it open: say so.
    if (!(err instanceof LoggedOut)) return notice(err.message, true);
  }
  notice("");
  lastEventId = 0;
  lastFetched.clear();
  lastUrl.clear();
  cost.clear();
  took.clear();
  failing.clear();
  $("events").replaceChildren();
  showLogin();
});

refresh();
