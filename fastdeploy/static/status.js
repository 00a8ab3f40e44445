// The live status page: polls /status.json about once a second while the tab is visible and
// derives rates and latency percentiles from the running totals it returns. No framework,
// no network beyond this server; every value from the server is shown as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const KEEP = 300; // points per chart: 5 minutes at one a second
const COLORS = ["#2454c4", "#1a7f37", "#b35c00", "#8e24aa", "#00838f", "#c62828"];
const PREDICT = ["sync", "async", "infer"]; // endpoints that submit jobs: requests/s
const TIMED = ["sync", "infer"]; // endpoints that wait for the prediction: latency

const samples = []; // {t, items: [per stage], requests, p50, p99}
let previous = null;
let timer = null;

const $ = (id) => document.getElementById(id);

function key() { return sessionStorage.getItem("fastdeploy-key") || ""; }

function takeKeyFromHash() {
  // /#key=KEY opens the page with a key: kept for this tab only, and taken out of the address bar
  const match = location.hash.match(/(?:^#|&)key=([^&]*)/);
  if (match) {
    sessionStorage.setItem("fastdeploy-key", decodeKey(match[1]));
    samples.length = 0;
    window.history.replaceState(null, "", location.pathname + location.search);
  }
}

function decodeKey(text) {
  try { return decodeURIComponent(text); } catch (err) { return text; } // a stray % is part of the key
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function duration(seconds) {
  const s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}

function sum(values) { return values.reduce((a, b) => a + b, 0); }

function answered(requests, endpoints) {
  let total = 0;
  for (const endpoint of endpoints) total += sum(Object.values((requests.answered || {})[endpoint] || {}));
  return total;
}

function cumulative(requests, endpoints) {
  const latency = requests.latency || { bounds: [], cumulative: {} };
  const counts = latency.bounds.map(() => 0);
  for (const endpoint of endpoints) {
    (latency.cumulative[endpoint] || []).forEach((c, i) => { counts[i] += c; });
  }
  return { bounds: latency.bounds, counts };
}

// The q-quantile (ms) of the requests between two readings of a cumulative histogram,
// interpolated inside the bucket it falls in; null when no request finished in between.
function quantile(before, after, q) {
  const counts = after.counts.map((c, i) => c - (before.counts[i] || 0));
  const total = counts[counts.length - 1] || 0;
  if (total <= 0) return null;
  const rank = q * total;
  const slowest = after.bounds[after.bounds.length - 2]; // the last finite bound (the last is +Inf: null)
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] >= rank) {
      if (after.bounds[i] === null) return 1000 * slowest; // slower than every bound: shown at the last one
      const low = i ? after.bounds[i - 1] : 0, below = i ? counts[i - 1] : 0;
      const within = counts[i] - below;
      const share = within > 0 ? (rank - below) / within : 1;
      return 1000 * (low + (after.bounds[i] - low) * share);
    }
  }
  return 1000 * slowest;
}

function record(doc) {
  const now = doc.service.now;
  const items = doc.stages.map((s) => s.items);
  const requests = answered(doc.requests, PREDICT);
  const latency = cumulative(doc.requests, TIMED);
  if (previous && now > previous.now) {
    const dt = now - previous.now;
    samples.push({
      t: now,
      items: items.map((n, i) => Math.max(0, n - (previous.items[i] || 0)) / dt),
      requests: Math.max(0, requests - previous.requests) / dt,
      p50: quantile(previous.latency, latency, 0.5),
      p99: quantile(previous.latency, latency, 0.99),
    });
    if (samples.length > KEEP) samples.shift();
  }
  previous = { now, items, requests, latency };
}

// A line chart of named series on a canvas; the canvas's data-points and data-max say what it drew.
// A canvas cleared for drawing at its shown size, sharp on high-density screens.
function surface(canvas, defaultWidth, defaultHeight) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || defaultWidth, height = canvas.clientHeight || defaultHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  return { g, width, height };
}

function lineChart(canvas, legend, series) {
  const { g, width, height } = surface(canvas, 640, 200);
  const pad = { l: 48, r: 8, t: 8, b: 18 };
  let max = 0, points = 0;
  for (const s of series) for (const v of s.values) if (v !== null) { max = Math.max(max, v); points++; }
  const top = max > 0 ? niceCeiling(max) : 1;
  g.strokeStyle = "#e3e6ee"; g.fillStyle = "#6b7385"; g.font = "11px system-ui, sans-serif"; g.lineWidth = 1;
  const ticks = String(top).replace(/[0.]/g, "") === "2" ? 4 : 5; // steps of 0.5, 1 or 2 × a power of ten
  for (let i = 0; i <= ticks; i++) {
    const y = pad.t + (height - pad.t - pad.b) * (1 - i / ticks);
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(width - pad.r, y); g.stroke();
    g.fillText(fmt(top * i / ticks, top < 5 ? 1 : 0), 4, y + 4);
  }
  g.fillText("-5 min", pad.l, height - 4);
  g.fillText("now", width - pad.r - 22, height - 4);
  const x = (i) => pad.l + (width - pad.l - pad.r) * (i + KEEP - samples.length) / (KEEP - 1);
  const y = (v) => pad.t + (height - pad.t - pad.b) * (1 - v / top);
  series.forEach((s, n) => {
    const color = s.color || COLORS[n % COLORS.length];
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.6; g.beginPath();
    let drawing = false;
    s.values.forEach((v, i) => {
      if (v === null) { drawing = false; return; }
      if (drawing) g.lineTo(x(i), y(v)); else g.moveTo(x(i), y(v));
      drawing = true;
    });
    g.stroke();
    s.values.forEach((v, i) => { // a dot where a point stands alone (no line through it)
      const alone = v !== null && (i === 0 || s.values[i - 1] === null) && (i === s.values.length - 1 || s.values[i + 1] === null);
      if (alone) { g.beginPath(); g.arc(x(i), y(v), 2.5, 0, 2 * Math.PI); g.fill(); }
    });
  });
  canvas.dataset.points = String(points);
  canvas.dataset.max = String(max);
  legend.replaceChildren(...series.map((s, n) => {
    const item = el("span"), swatch = el("i");
    swatch.style.background = s.color || COLORS[n % COLORS.length];
    const last = s.values.length ? s.values[s.values.length - 1] : null;
    item.append(swatch, s.name + ": " + fmt(last, last !== null && last < 10 ? 1 : 0));
    return item;
  }));
}

function niceCeiling(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

// Bars of the batch sizes a stage's loops used (calls per bucket of sizes).
function histogram(canvas, bounds, counts) {
  const { g, width, height } = surface(canvas, 480, 120);
  const shown = Math.max(1, counts.reduce((last, c, i) => (c > 0 ? i + 1 : last), 0));
  const max = Math.max(0, ...counts);
  const slot = (width - 8) / shown;
  g.font = "11px system-ui, sans-serif";
  for (let i = 0; i < shown; i++) {
    const h = max ? (height - 30) * counts[i] / max : 0;
    g.fillStyle = "#2454c4";
    g.fillRect(4 + i * slot + 2, height - 16 - h, slot - 4, h);
    g.fillStyle = "#6b7385";
    const low = i ? bounds[i - 1] + 1 : 1;
    g.fillText(low === bounds[i] ? String(low) : low + "–" + bounds[i], 4 + i * slot + 2, height - 4);
    if (counts[i]) g.fillText(fmt(counts[i]), 4 + i * slot + 2, height - 20 - h);
  }
  canvas.dataset.max = String(max);
  canvas.dataset.calls = String(sum(counts));
}

function stageSection(stage) {
  let box = $("stage-" + stage.stage);
  if (!box) {
    box = el("div", undefined, "stage");
    box.id = "stage-" + stage.stage;
    const facts = el("div");
    facts.append(el("h2", "Stage " + stage.stage), el("dl"));
    const right = el("div");
    const caption = el("figcaption", "Batch sizes used (predictor calls)");
    const canvas = el("canvas"); canvas.id = "batch-hist-" + stage.stage;
    const table = el("table");
    table.innerHTML = "<thead><tr><th>worker</th><th>host</th><th>pid</th><th>device</th><th>batch size</th>" +
      "<th>items</th><th>ready</th><th>last heartbeat</th></tr></thead><tbody></tbody>";
    table.id = "workers-" + stage.stage;
    right.append(caption, canvas, table);
    box.append(facts, right);
    $("stages").append(box);
  }
  // totals of the loops alive now (a loop that restarts starts again from zero)
  const facts = [["Queue depth", stage.queue_depth, "queue"], ["Items predicted by live loops", stage.items, "items"],
    ["Predictor calls", stage.batches, "batches"], ["Mean batch", stage.batches ? stage.items / stage.batches : null, "mean"],
    ["Failed jobs", stage.failed_jobs, "failed"], ["Loops", stage.workers.length, "loops"]];
  box.querySelector("dl").replaceChildren(...facts.flatMap(([name, value, cls]) => {
    const dd = el("dd", fmt(value, cls === "mean" ? 1 : 0), cls);
    return [el("dt", name), dd];
  }));
  histogram(box.querySelector("canvas"), stage.batch_sizes.bounds, stage.batch_sizes.counts);
  box.querySelector("tbody").replaceChildren(...stage.workers.map((w) => {
    const row = el("tr");
    row.append(el("td", w.worker_id), el("td", w.host), el("td", w.pid), el("td", w.device || "–"),
      el("td", w.batch_size), el("td", fmt(w.items)), el("td", w.ready ? "yes" : "no"), el("td", fmt(w.heartbeat_age_s, 1) + " s ago"));
    return row;
  }));
}

function render(doc) {
  const s = doc.service;
  $("name").textContent = s.name;
  $("version").textContent = "fastDeploy " + s.version;
  document.title = s.name + " · fastDeploy status";
  const state = $("state");
  state.textContent = s.ready ? "ready" : "not ready: " + (s.reason || "");
  if (doc.store_error) state.textContent += " (store: " + doc.store_error + ")";
  state.className = "state " + (s.ready && !doc.store_error ? "ready" : "not-ready");
  const warnings = doc.warnings || [];
  $("warnings").replaceChildren(...warnings.map((text) => el("li", text)));
  $("warnings").hidden = warnings.length === 0;
  $("input-type").textContent = s.input_type;
  $("uptime").textContent = duration(s.uptime_s);
  $("requests-total").textContent = fmt(answered(doc.requests, PREDICT));
  const last = samples[samples.length - 1];
  $("requests-rate").textContent = fmt(last ? last.requests : 0, 1);
  const hooks = doc.webhooks;
  $("webhooks").textContent = hooks ? fmt(hooks.pending) + " · " + fmt(hooks.delivered) + " · " + fmt(hooks.failed) : "–";
  doc.stages.forEach(stageSection);
  lineChart($("throughput-chart"), $("throughput-legend"), [
    ...doc.stages.map((st, i) => ({ name: "stage " + st.stage + " items/s", values: samples.map((h) => h.items[i] || 0) })),
    { name: "requests/s", values: samples.map((h) => h.requests), color: "#6b7385" },
  ]);
  lineChart($("latency-chart"), $("latency-legend"), [
    { name: "p50 ms", values: samples.map((h) => h.p50), color: "#1a7f37" },
    { name: "p99 ms", values: samples.map((h) => h.p99), color: "#c62828" },
  ]);
  const rows = [];
  for (const [endpoint, byStatus] of Object.entries(doc.requests.answered || {}).sort()) {
    for (const [status, count] of Object.entries(byStatus).sort()) {
      const row = el("tr");
      row.dataset.endpoint = endpoint; row.dataset.status = status;
      row.append(el("td", "/" + endpoint), el("td", status), el("td", fmt(count)));
      rows.push(row);
    }
  }
  $("requests-table").querySelector("tbody").replaceChildren(...rows);
  $("failures").querySelector("tbody").replaceChildren(...doc.failures.map((f) => {
    const row = el("tr");
    row.append(el("td", new Date(f.at * 1000).toLocaleTimeString()), el("td", f.unique_id), el("td", f.reason, "reason"));
    return row;
  }));
  $("updated").textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  timer = null;
  if (document.hidden) return; // a hidden tab costs the server nothing; polling resumes when shown
  try {
    const headers = key() ? { Authorization: "Bearer " + key() } : {};
    const reply = await fetch("/status.json", { headers, cache: "no-store" });
    if (reply.status === 401) {
      $("key-form").hidden = false;
      $("board").hidden = true;
      $("state").textContent = "an API key is needed";
      const refusal = await reply.json().catch(() => ({}));
      $("key-error").textContent = key() ? refusal.reason || "that key was refused" : "";
      return; // polling resumes when a key is given
    }
    const doc = await reply.json();
    if (!reply.ok) throw new Error(doc.reason || "HTTP " + reply.status);
    $("key-form").hidden = true;
    $("board").hidden = false;
    record(doc);
    render(doc);
  } catch (err) {
    $("state").textContent = "cannot reach the service: " + err.message;
    $("state").className = "state not-ready";
  }
  schedule();
}

function schedule() { if (timer === null) timer = setTimeout(poll, POLL_MS); }

document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(); });
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("fastdeploy-key", $("key").value.trim());
  previous = null; samples.length = 0;
  if (timer !== null) clearTimeout(timer);
  poll();
});
takeKeyFromHash();
poll();
