// The status page: renders each `status` event of /proxy/events; buttons call the admin API.
// Plain DOM and fetch, no framework; every value is set as text, never as HTML.
"use strict";

const ui = document.documentElement.dataset.ui;
const base = ui.replace(/\/ui$/, "");
const TOKEN_KEY = "vllm-chill-admin-token";
const $ = (id) => document.getElementById(id);

let picture = null;      // the last status event
let receivedAt = 0;      // performance.now() when it came
let stream = null;       // AbortController of the open event stream

function token() { return sessionStorage.getItem(TOKEN_KEY); }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = token();
  if (t) h.Authorization = "Bearer " + t;
  return h;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function pill(state) {
  const node = el("span", state.replace("_", " "), "pill");
  node.dataset.state = state;
  return node;
}
function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 10) return s.toFixed(1) + " s";
  if (s < 120) return Math.round(s) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}
function age() { return (performance.now() - receivedAt) / 1000; }
function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function showConnection(state) {
  const node = $("connection");
  node.dataset.state = state;
  node.textContent = state;
}
function notice(text, isError) {
  const node = $("notice");
  node.textContent = text || "";
  node.className = isError ? "error" : "";
}
function needLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);  // a token that was refused is not kept
  $("content").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
  showConnection("offline");
}

// --- rendering ------------------------------------------------------------------------------

function doing(m) {
  const cell = el("td");
  if (m.failure) {
    cell.append(el("div", m.failure.reason, "reason"));
    const retry = el("span", "", "countdown");
    retry.dataset.seconds = m.failure.retry_in_seconds;
    const line = el("div", "retry allowed in ", "meta");
    line.append(retry);
    cell.append(line);
    return cell;
  }
  if (!m.phase || m.phase === "ready") return cell;
  let text = m.phase;
  if (m.progress && m.progress !== m.phase) text += ": " + m.progress;
  cell.append(el("span", text));
  if (m.phase_seconds !== null) {
    const since = el("span", "", "meta elapsed");
    since.dataset.seconds = m.phase_seconds;
    cell.append(" ", since);
  }
  if (m.replacing && m.replacing.length) cell.append(el("div", "after " + m.replacing.join(", "), "meta"));
  return cell;
}

function action(label, title, run) {
  const b = el("button", label);
  b.type = "button";
  b.title = title;
  b.addEventListener("click", run);
  return b;
}

// Rows are rebuilt only when what they show changes, so that a button is not replaced under
// the pointer between a press and its release.
const modelRows = new Map();
const CLOCK_FIELDS = new Set(["phase_seconds", "retry_in_seconds"]);
function shows(m) {
  return JSON.stringify(m, (key, value) => (CLOCK_FIELDS.has(key) ? undefined : value)) + picture.capacity;
}

function renderModels(models) {
  const body = $("models").tBodies[0];
  const rows = [];
  const present = new Set();
  for (const m of models) {
    present.add(m.id);
    const signature = shows(m);
    const known = modelRows.get(m.id);
    if (known && known.signature === signature) {
      refreshClocks(known.tr, m);
      rows.push(known.tr);
      continue;
    }
    const tr = el("tr");
    tr.dataset.model = m.id;
    tr.dataset.state = m.state;
    const name = el("td");
    name.append(el("strong", m.id));
    if (m.model !== m.id) name.append(el("div", m.model, "meta"));
    tr.append(name);
    const state = el("td");
    state.append(pill(m.state));
    tr.append(state);
    tr.append(doing(m));
    const units = picture.capacity === "gpus" ? m.placement.map((g) => "GPU " + g) : m.placement;
    const where = units.join(", ");
    const frac = m.gpu_fraction && m.gpu_fraction < 1 ? " · " + Math.round(m.gpu_fraction * 100) + "%" : "";
    tr.append(el("td", where + frac));
    tr.append(el("td", m.in_flight, "num"));
    tr.append(el("td", m.waiting, "num"));
    const loads = m.load_seconds.map(seconds).join(", ");
    const wakes = m.wake_seconds.length ? "wake " + m.wake_seconds.map(seconds).join(", ") : "";
    tr.append(el("td", [loads, wakes].filter(Boolean).join("; "), "num"));
    const actions = el("td", null, "actions");
    if (m.state === "loaded" || m.state === "sleeping") {
      actions.append(action("Unload", "Drain its requests, then unload it", () => unload(m.id)));
    } else if (m.state !== "loading") {
      actions.append(action("Load", "Load it now (others give way if there is no room)", () => load(m.id)));
    }
    tr.append(actions);
    modelRows.set(m.id, { signature, tr });
    rows.push(tr);
  }
  for (const id of [...modelRows.keys()]) if (!present.has(id)) modelRows.delete(id);
  const same = rows.length === body.rows.length && rows.every((tr, i) => body.rows[i] === tr);
  if (!same) body.replaceChildren(...rows);
}

// A kept row's timers restart from the new picture's values.
function refreshClocks(tr, m) {
  const elapsed = tr.querySelector(".elapsed");
  if (elapsed && m.phase_seconds !== null) elapsed.dataset.seconds = m.phase_seconds;
  const countdown = tr.querySelector(".countdown");
  if (countdown && m.failure) countdown.dataset.seconds = m.failure.retry_in_seconds;
}

function renderSwitches(switches) {
  const rows = switches.map((s) => {
    const tr = el("tr");
    tr.dataset.to = s.to;
    tr.dataset.result = s.result;
    tr.append(el("td", clock(s.started_at)));
    tr.append(el("td", s.from || "–"));
    tr.append(el("td", s.to));
    tr.append(el("td", s.kind === "wake" ? "warm (wake)" : "cold"));
    const duration = el("td", seconds(s.duration_seconds), "num duration");
    if (s.result === "in_progress") duration.dataset.seconds = s.duration_seconds;
    tr.append(duration);
    const result = el("td");
    result.append(pill(s.result));
    if (s.error) result.append(el("div", s.error, "reason"));
    tr.append(result);
    return tr;
  });
  $("switches").tBodies[0].replaceChildren(...rows);
  $("no-switches").hidden = rows.length > 0;
}

function renderEvictions(evictions) {
  const rows = evictions.map((e) => {
    const tr = el("tr");
    const when = el("td", seconds(e.seconds_ago) + " ago", "ago");
    when.dataset.seconds = e.seconds_ago;
    tr.append(when);
    tr.append(el("td", e.model));
    tr.append(el("td", e.for || "–"));
    tr.append(el("td", e.why));
    return tr;
  });
  $("evictions").tBodies[0].replaceChildren(...rows);
  $("no-evictions").hidden = rows.length > 0;
}

function render(p) {
  picture = p;
  receivedAt = performance.now();
  renderModels(p.models);
  renderSwitches(p.switches);
  renderEvictions(p.evictions);
  $("queue").textContent = p.queue.length ? p.queue.join(", ") : "empty";
  const free = Object.entries(p.free_capacity).map(([unit, share]) =>
    (p.capacity === "gpus" ? "GPU " + unit + " " + Math.round(share * 100) + "%" : unit + (share > 0 ? " free" : " busy")));
  $("free").textContent = free.join(", ");
  $("free-line").hidden = free.length === 0;
  tick();
}

// Elapsed times move on between events.
function tick() {
  for (const node of document.querySelectorAll("[data-seconds]")) {
    if (node.classList.contains("countdown")) {
      node.textContent = seconds(Math.max(0, Number(node.dataset.seconds) - age()));
      continue;
    }
    const s = Number(node.dataset.seconds) + age();
    if (node.classList.contains("elapsed")) node.textContent = "(" + seconds(s) + ")";
    else if (node.classList.contains("ago")) node.textContent = seconds(s) + " ago";
    else node.textContent = seconds(s);
  }
}
setInterval(tick, 250);

// --- the event stream -----------------------------------------------------------------------

function handle(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  const value = JSON.parse(data.join("\n"));
  if (kind === "status") render(value);
  else if (kind === "switch") document.dispatchEvent(new CustomEvent("vllm-chill:switch", { detail: value }));
}

async function connect() {
  let delay = 500;
  for (;;) {
    stream = new AbortController();
    try {
      const response = await fetch(base + "/events", { headers: headers(), cache: "no-store", signal: stream.signal });
      if (response.status === 401) { needLogin(token() ? "That token was not accepted." : ""); return; }
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      $("login").hidden = true;
      $("content").hidden = false;
      $("logout").hidden = !token();
      showConnection("live");
      delay = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handle(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (err) {
      if (stream.signal.aborted) return;
      showConnection("offline");
      delay = Math.min(delay * 2, 5000);
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    showConnection("connecting");
  }
}

// --- actions --------------------------------------------------------------------------------

async function post(path, body) {
  try {
    const response = await fetch(base + path, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: body === undefined ? "" : JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status === 401) { needLogin("That token was not accepted."); return; }
    if (!response.ok) { notice((answer.error && answer.error.message) || "HTTP " + response.status, true); return; }
    notice("");
  } catch (err) {
    notice("The proxy did not answer: " + err.message, true);
  }
}
function load(model) { notice("Loading " + model + "…"); post("/models/switch", { model }); }
function unload(model) { notice("Unloading " + model + "…"); post("/unload", { model }); }

$("unload-all").addEventListener("click", () => { notice("Unloading every model…"); post("/unload"); });
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  if (stream) stream.abort();
  needLogin("");
});
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  connect();
});

connect();
