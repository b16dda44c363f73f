// The dashboard: one page at a time, fed by the gateway's events and by bounded, paged reads.
import { Gateway } from "./gateway.js";
import { Series, sparkline } from "./charts.js";

const TOKEN_KEY = "clawgate.token";
const STATUS_EVERY_MS = 2000; // one `status` call: a handful of counters, not a list
const HISTORY = 150; // samples kept per chart: 5 minutes at one per 2 s
const PAGE_SIZE = 25;

const $ = (sel) => document.querySelector(sel);
let gw = null; // the main connection
let live = null; // a second connection subscribed to all events, open only on pages that need it
let current = null; // the page shown: {name, stop?}
const series = {
  runsPerS: new Series(HISTORY), active: new Series(HISTORY), queued: new Series(HISTORY),
  rss: new Series(HISTORY), storeBytes: new Series(HISTORY), structures: new Series(HISTORY),
};
let lastStatus = null;
let lastSample = null;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replace an element's children, leaving out the absent ones (null, undefined, false).
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

const fmtBytes = (n) => {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const fmtTime = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "–");
const statusCell = (s) => h("span", { class: `status-${s}` }, s);

function showError(err) {
  const box = $("#error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  // As the gateway states it: its code and its message.
  box.textContent = err.code ? `${err.code}: ${err.message}` : String(err.message || err);
  box.hidden = false;
}

async function call(method, params) {
  try {
    return await gw.request(method, params);
  } catch (err) {
    showError(err);
    throw err;
  }
}

function setConn(state) {
  const el = $("#conn");
  el.textContent = state;
  el.className = state === "connected" ? "conn ok" : "conn";
}

// ---------------------------------------------------------------------------------------------
// Sign-in

function showLogin(message) {
  clearInterval(statusTimer);
  if (gw) { gw.close(); gw = null; }
  closeLive();
  stopPage();
  $("#page").replaceChildren();
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  setConn("disconnected");
  showError(message ? { message } : null);
  $("#token").focus();
}

async function connect(token) {
  const client = new Gateway({
    token,
    onEvent: (name, payload) => current?.onEvent?.(name, payload),
    onState: (state, err) => {
      if (state === "unauthorized") { sessionStorage.removeItem(TOKEN_KEY); showLogin(`${err.code}: ${err.message}`); return; }
      setConn(state);
      if (state === "connected") { showError(null); current?.refresh?.(); }
    },
  });
  try {
    await client.start();
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(err.code ? `${err.code}: ${err.message}` : String(err));
    return;
  }
  gw = client;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  setConn("connected");
  showError(null);
  startStatusLoop();
  route();
}

let statusTimer = null;
function startStatusLoop() {
  clearInterval(statusTimer);
  const tick = async () => {
    if (!gw) return;
    try { sample(await gw.request("status")); } catch { /* shown by the connection state */ }
  };
  tick();
  statusTimer = setInterval(tick, STATUS_EVERY_MS);
}

function sample(status) {
  const now = performance.now();
  const completed = status.runs?.completed ?? 0;
  if (lastSample) {
    const dt = (now - lastSample.at) / 1000;
    series.runsPerS.push(dt > 0 ? Math.max(0, completed - lastSample.completed) / dt : 0);
  }
  lastSample = { at: now, completed };
  series.active.push(status.runs?.active ?? 0);
  series.queued.push(status.runs?.queued ?? 0);
  series.rss.push(status.memory?.rssBytes ?? 0);
  series.storeBytes.push(status.disk?.storeBytes ?? 0);
  series.structures.push(Object.values(status.state || {}).reduce((a, b) => a + b, 0));
  lastStatus = status;
  current?.onStatus?.(status);
}

// ---------------------------------------------------------------------------------------------
// Pages

function openLive() {
  if (live) return live;
  live = new Gateway({
    token: gw.token,
    subscribe: { all: true },
    onEvent: (name, payload) => current?.onLiveEvent?.(name, payload),
  });
  live.start().catch(showError);
  return live;
}

function closeLive() {
  if (live) { live.close(); live = null; }
}

function stopPage() {
  if (current?.stop) current.stop();
  current = null;
}

function overviewPage(root) {
  const cards = h("div", { class: "cards" });
  const charts = h("div", { class: "charts" });
  const errors = h("div");
  const sweeps = h("div");
  root.append(h("h1", {}, "Overview"), cards, charts, h("div", { class: "split" }, errors, sweeps));
  const render = (s) => {
    if (!s) return;
    const byStatus = s.runs?.byStatus || {};
    const card = (label, value) => h("div", { class: "card" }, label, h("b", {}, value));
    cards.replaceChildren(
      card("runs/s", (series.runsPerS.last ?? 0).toFixed(1)),
      card("active", s.runs?.active ?? 0),
      card("queued", s.runs?.queued ?? 0),
      card("completed", s.runs?.completed ?? 0),
      card("admission", s.admission?.open ? "open" : `closed: ${s.admission?.reason || "?"}`),
      card("connections", s.connections ?? 0),
      card("RSS", fmtBytes(s.memory?.rssBytes)),
      card("store", fmtBytes(s.disk?.storeBytes)),
    );
    const chart = (label, ser, fmt) => h("div", { class: "chart" },
      h("div", {}, label, " ", h("span", { class: "muted" }, ser.last === null ? "" : fmt(ser.last))), sparkline(ser));
    charts.replaceChildren(
      chart("runs/s", series.runsPerS, (v) => v.toFixed(1)),
      chart("active runs", series.active, String),
      chart("queued runs", series.queued, String),
      chart("RSS", series.rss, fmtBytes),
      chart("store bytes", series.storeBytes, fmtBytes),
      chart("entries in bounded structures", series.structures, String),
    );
    const errRows = Object.entries(byStatus).filter(([k]) => k !== "ok");
    errors.replaceChildren(h("h2", {}, "Errors by kind"), table(["kind", "runs"],
      errRows.length ? errRows.map(([k, v]) => [k, v]) : [["none", 0]]));
    const sweepErrors = Object.entries(s.maintenance?.sweepErrors || {});
    sweeps.replaceChildren(
      h("h2", {}, "Maintenance"),
      h("p", {}, `ticks: ${s.maintenance?.ticks ?? 0}${s.maintenance?.running ? "" : " (stopped)"}`),
      table(["sweep errors", "count"], sweepErrors.length ? sweepErrors : [["none", 0]]),
      h("h2", {}, "Bounded structures"),
      table(["structure", "entries"], Object.entries(s.state || {})),
    );
  };
  render(lastStatus);
  return { onStatus: render };
}

function table(headers, rows, onRow) {
  const body = h("tbody");
  for (const row of rows) {
    const cells = Array.isArray(row) ? row : row.cells;
    const tr = h("tr", { "data-key": row.key }, cells.map((c) => h("td", {}, c)));
    if (onRow) {
      tr.className = "clickable";
      tr.tabIndex = 0;
      tr.addEventListener("click", () => onRow(row, tr));
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onRow(row, tr); } });
    }
    body.append(tr);
  }
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))), body);
}

function runsPage(root) {
  const status = h("select", { id: "f-status" },
    ["", "active", "queued", "running", "finished", "ok", "error", "timeout", "aborted"].map((v) => h("option", { value: v }, v || "any")));
  const session = h("input", { id: "f-session", placeholder: "agent:main:main", size: 24 });
  const prefix = h("input", { id: "f-prefix", placeholder: "batch:", size: 12 });
  const label = h("input", { id: "f-label", placeholder: "batch:nightly", size: 14 });
  const list = h("div", { id: "runs-table" });
  const pager = h("div", { class: "filters" });
  const detail = h("div", { class: "panel", id: "run-detail" }, h("p", { class: "muted" }, "Select a run to follow it."));
  root.append(h("h1", {}, "Runs"),
    h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); cursors = [null]; load(); } },
      h("label", {}, "status", status), h("label", {}, "session", session), h("label", {}, "run id prefix", prefix), h("label", {}, "label", label),
      h("button", { type: "submit" }, "Filter")),
    h("div", { class: "split" }, h("div", {}, list, pager), detail));
  let cursors = [null]; // the cursor of each page visited, for "previous"
  let selected = null; // {run, events: [], text}
  let timer = null;

  async function load() {
    const params = { limit: PAGE_SIZE };
    const c = cursors[cursors.length - 1];
    if (c) params.cursor = c;
    if (status.value) params.status = status.value;
    if (session.value.trim()) params.sessionKey = session.value.trim();
    if (prefix.value.trim()) params.runIdPrefix = prefix.value.trim();
    if (label.value.trim()) params.label = label.value.trim();
    let page;
    try { page = await call("runs.list", params); } catch { return; }
    // The table is drawn again; keep the keyboard focus on the run it was on.
    const focused = list.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    list.replaceChildren(table(["run", "session", "status", "accepted", "duration"],
      page.runs.map((r) => ({ run: r, key: r.runId, cells: [r.runId, r.sessionKey, statusCell(r.status), fmtTime(r.acceptedAt), r.durationMs != null ? `${r.durationMs} ms` : "–"] })),
      (row) => select(row.run)));
    if (!page.runs.length) list.append(h("p", { class: "muted" }, "No runs on this page."));
    for (const tr of list.querySelectorAll("tr[data-key]")) {
      if (selected && tr.dataset.key === selected.run.runId) tr.setAttribute("aria-selected", "true");
      if (focused !== null && tr.dataset.key === focused) tr.focus();
    }
    if (selected) {
      const fresh = page.runs.find((r) => r.runId === selected.run.runId);
      if (fresh) { selected.run = fresh; renderDetail(); }
    }
    pager.replaceChildren(
      h("button", { type: "button", disabled: cursors.length < 2, onclick: () => { cursors.pop(); load(); } }, "Previous"),
      h("button", { type: "button", disabled: !page.cursor, onclick: () => { cursors.push(page.cursor); load(); } }, "Next"));
  }

  async function select(run) {
    selected = { run, events: [], text: "", tools: [] };
    for (const tr of list.querySelectorAll("tr[data-key]")) {
      if (tr.dataset.key === run.runId) tr.setAttribute("aria-selected", "true");
      else tr.removeAttribute("aria-selected");
    }
    // Follow the run's session: its events come to this connection from now on.
    try { await call("events.subscribe", { sessionKeys: [run.sessionKey] }); } catch { /* shown */ }
    renderDetail();
  }

  function renderDetail() {
    if (!selected) return;
    const r = selected.run;
    fill(detail, 
      h("h2", {}, r.runId),
      h("p", {}, "session ", h("code", {}, r.sessionKey), " · status ", h("b", { id: "run-status" }, statusCell(r.status))),
      h("p", { class: "muted" }, r.message || ""),
      h("h3", {}, "Assistant"),
      h("div", { class: "stream", id: "run-text" }, selected.text || (r.result ?? "")),
      selected.tools.length ? h("h3", {}, "Tool calls") : null,
      selected.tools.length ? table(["tool", "phase", "detail"], selected.tools.map((t) => [t.name, t.phase, t.detail])) : null,
      r.error ? h("p", { class: "status-error" }, r.error) : null,
      r.result !== undefined && ["ok", "error", "timeout", "aborted"].includes(r.status)
        ? h("div", {}, h("h3", {}, "Result"), h("div", { class: "stream", id: "run-result" }, r.result)) : null,
      h("h3", {}, "Events"),
      h("div", { class: "stream" }, selected.events.slice(-50).join("\n")),
    );
  }

  function onEvent(name, p) {
    if (!selected || p.runId !== selected.run.runId || name !== "agent") return;
    const d = p.data || {};
    selected.events.push(`${p.seq} ${p.stream}${d.phase ? " " + d.phase : ""}${d.delta ? " +" + d.delta.length + " chars" : ""}`);
    if (selected.events.length > 500) selected.events.shift();
    if (p.stream === "assistant") selected.text = d.text ?? selected.text + (d.delta || "");
    if (p.stream === "tool") selected.tools.push({ name: d.name, phase: d.phase, detail: JSON.stringify(d.args ?? d.result ?? "").slice(0, 200) });
    if (p.stream === "lifecycle") {
      if (d.phase === "start") selected.run.status = "running";
      if (d.phase === "end" || d.phase === "error") setTimeout(load, 100); // the final record
    }
    renderDetail();
  }

  load();
  // The first page is read again every few seconds: one bounded page, never the full list.
  timer = setInterval(() => { if (cursors.length === 1) load(); }, STATUS_EVERY_MS);
  return { onEvent, refresh: load, stop: () => clearInterval(timer) };
}

function sessionsPage(root) {
  const prefix = h("input", { id: "s-prefix", placeholder: "agent:main:", size: 24 });
  const list = h("div", { id: "sessions-table" });
  const detail = h("div", { class: "panel", id: "transcript" }, h("p", { class: "muted" }, "Select a session to read its transcript."));
  root.append(h("h1", {}, "Sessions"),
    h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); load(); } },
      h("label", {}, "key prefix", prefix), h("button", { type: "submit" }, "Filter")),
    h("div", { class: "split" }, list, detail));
  const admin = gw.hasScope("operator.admin");

  async function load() {
    const params = { limit: 100 };
    if (prefix.value.trim()) params.prefix = prefix.value.trim();
    let res;
    try { res = await call("sessions.list", params); } catch { return; }
    list.replaceChildren(table(["session", "kind", "updated"],
      res.sessions.map((s) => ({ s, cells: [s.key, s.kind, fmtTime(s.updatedAt)] })), (row) => show(row.s.key)));
    if (!res.sessions.length) list.append(h("p", { class: "muted" }, "No sessions."));
  }

  async function show(key) {
    let res;
    try { res = await call("chat.history", { sessionKey: key, limit: 100 }); } catch { return; }
    const actions = admin ? h("p", {},
      h("button", { type: "button", id: "session-reset", onclick: () => act("sessions.reset", key) }, "Reset"), " ",
      h("button", { type: "button", id: "session-delete", class: "danger", onclick: (e) => confirmDelete(e.target, key) }, "Delete")) : null;
    fill(detail, h("h2", {}, key), actions,
      res.truncated ? h("p", { class: "muted" }, `${res.droppedMessages} older messages were dropped by retention`) : null,
      ...res.messages.map((m) => h("div", { class: "msg" }, h("span", { class: "role" }, m.role), h("span", { class: "muted" }, fmtTime(m.ts)), h("div", {}, m.content))),
      res.messages.length ? null : h("p", { class: "muted" }, "No messages."));
  }

  function confirmDelete(button, key) {
    // A second press confirms: no modal dialog, so it works from the keyboard and in tests alike.
    if (button.dataset.armed) { act("sessions.delete", key); return; }
    button.dataset.armed = "1";
    button.textContent = "Confirm delete";
  }

  async function act(method, key) {
    try { await call(method, { key }); } catch { return; }
    showError(null);
    if (method === "sessions.delete") fill(detail, h("p", { class: "muted" }, `Deleted ${key}.`));
    else show(key);
    load();
  }

  load();
  return { refresh: load };
}

function subagentsPage(root) {
  const tree = h("div", { class: "tree", id: "subagent-tree" });
  root.append(h("h1", {}, "Subagents"), tree);
  const phases = new Map(); // runId -> the phases seen in events, in order
  let runs = [];
  let pending = null;

  async function load() {
    let res;
    try { res = await call("subagents.list", { limit: 500 }); } catch { return; }
    runs = res.runs;
    render();
  }

  function render() {
    const byRequester = new Map();
    for (const r of runs) {
      if (!byRequester.has(r.requesterSessionKey)) byRequester.set(r.requesterSessionKey, []);
      byRequester.get(r.requesterSessionKey).push(r);
    }
    const children = new Set(runs.map((r) => r.childSessionKey));
    const node = (key, seen) => {
      const kids = seen.has(key) ? [] : byRequester.get(key) || [];
      seen.add(key);
      return h("ul", {}, kids.map((r) => h("li", { "data-run": r.runId },
        h("code", {}, r.childSessionKey), r.label ? ` ${r.label}` : "",
        h("span", { class: "phase" }, (phases.get(r.runId) || [r.status]).join(" → ")),
        node(r.childSessionKey, seen))));
    };
    const roots = [...byRequester.keys()].filter((k) => !children.has(k));
    tree.replaceChildren(...roots.map((k) => h("div", {}, h("strong", {}, k), node(k, new Set()))));
    if (!roots.length) tree.append(h("p", { class: "muted" }, "No subagents."));
  }

  function onLiveEvent(name, p) {
    if (name !== "subagent") return;
    const seen = phases.get(p.runId) || [];
    seen.push(p.phase + (p.outcome ? ` (${p.outcome})` : ""));
    phases.set(p.runId, seen.slice(-6));
    if (phases.size > 1000) phases.delete(phases.keys().next().value); // bounded, oldest first
    // A spawn or an end changes the tree: read it again, at most once a second.
    if (!pending) pending = setTimeout(() => { pending = null; load(); }, 300);
    render();
  }

  openLive();
  load();
  return { onLiveEvent, refresh: load, stop: () => { clearTimeout(pending); closeLive(); } };
}

function batchesPage(root) {
  const body = h("div", { id: "batches" });
  root.append(h("h1", {}, "Batches"),
    h("p", { class: "muted" }, "Runs started by clawgate batch (run ids batch:<task>, label batch:<tasks file>), the latest 200."), body);
  let timer = null;
  async function load() {
    let res;
    try { res = await call("runs.list", { runIdPrefix: "batch:", limit: 200 }); } catch { return; }
    const groups = new Map();
    for (const r of res.runs) {
      const key = r.label || "(no label)";
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(r);
    }
    const sections = [...groups.entries()].map(([name, runs]) => {
      const counts = {};
      for (const r of runs) counts[r.status] = (counts[r.status] || 0) + 1;
      const done = runs.length - (counts.queued || 0) - (counts.running || 0);
      const failed = runs.filter((r) => ["error", "timeout", "aborted"].includes(r.status));
      return h("section", { class: "panel" },
        h("h2", {}, name),
        h("p", {}, `${done} of ${runs.length} finished · `, Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ")),
        h("progress", { value: done, max: runs.length || 1, "aria-label": `${name}: finished runs` }),
        failed.length ? table(["failed run", "status", "error"], failed.map((r) => [r.runId, statusCell(r.status), r.error || ""])) : h("p", { class: "muted" }, "No failures."));
    });
    fill(body, res.cursor ? h("p", { class: "muted" }, "More batch runs exist beyond these 200.") : null,
      sections.length ? sections : h("p", { class: "muted" }, "No batch runs."));
  }
  load();
  timer = setInterval(load, 5000);
  return { refresh: load, stop: () => clearInterval(timer) };
}

function cronPage(root) {
  const body = h("div", { id: "cron" });
  root.append(h("h1", {}, "Cron"), body);
  async function load() {
    let res;
    try { res = await call("cron.list", { includeDisabled: true }); } catch { return; }
    const sched = (s) => s.kind === "every" ? `every ${s.everyMs / 1000} s` : s.kind === "cron" ? s.expr : `at ${s.at}`;
    body.replaceChildren(res.jobs.length ? table(["job", "schedule", "enabled", "next run", "last run", "last status"],
      res.jobs.map((j) => [j.name, sched(j.schedule), j.enabled ? "yes" : "no", fmtTime(j.state?.nextRunAtMs), fmtTime(j.state?.lastRunAtMs),
        j.state?.lastStatus ? statusCell(j.state.lastStatus) : "–"])) : h("p", { class: "muted" }, "No cron jobs."));
  }
  load();
  return { refresh: load };
}

const PAGES = { overview: overviewPage, runs: runsPage, sessions: sessionsPage, subagents: subagentsPage, batches: batchesPage, cron: cronPage };

function route() {
  if (!gw) return;
  const name = PAGES[location.hash.slice(1)] ? location.hash.slice(1) : "overview";
  stopPage();
  showError(null);
  const root = $("#page");
  root.replaceChildren();
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.getAttribute("href") === `#${name}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  current = { name, ...PAGES[name](root) };
}

window.addEventListener("hashchange", route);
$("#login").addEventListener("submit", (e) => {
  e.preventDefault();
  connect($("#token").value);
});
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showLogin(); });

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved !== null) connect(saved);
else showLogin();
