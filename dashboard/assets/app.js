// rvol's dashboard. It is a client of the JSON API the CLI uses, reached
// through relative URLs (the page is served at .../ui/), so it works
// under any path prefix. Data goes onto the page as text only.
"use strict";

const KIND = document.body.dataset.kind;
const TOKEN_KEY = "rvol-token";
const POLL_MS = 1000;
const HISTORY = 120;

// ---- talking to the API ----------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

async function call(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch("../" + path, init);
  const text = await r.text();
  if (!r.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error || text;
    } catch (_) {
      // not JSON: the text as it is
    }
    throw new ApiError(r.status, message);
  }
  return text;
}

async function getJson(path) {
  return JSON.parse(await call("GET", path));
}

// ---- building the page -----------------------------------------------

// el("td", {class: "x"}, "text", child...): strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

const $ = (id) => document.getElementById(id);

function section(id, title, ...body) {
  return el("section", { id }, el("h2", {}, title), ...body);
}

function badge(text, cls) {
  return el("span", { class: "badge " + (cls || text) }, text);
}

function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function when(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleString();
}

function table(id, headings) {
  return el("table", { id }, el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))), el("tbody"));
}

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  if (rows.length === 0) {
    const cols = $(tableId).tHead.rows[0].cells.length;
    rows = [el("tr", {}, el("td", { colspan: cols, class: "muted" }, empty))];
  }
  body.replaceChildren(...rows);
}

function notify(text, isError) {
  const n = $("notice");
  n.textContent = text;
  n.className = isError ? "error" : "";
  n.hidden = false;
  n.dataset.seq = String(Number(n.dataset.seq || 0) + 1);
}

// Runs an action and says how it went; the next poll shows its effect.
async function act(what, method, path, body) {
  try {
    await call(method, path, body);
    notify(what + ": done", false);
  } catch (e) {
    const hint =
      e.status === 401 || e.status === 403
        ? " (actions need a login with the control token)"
        : "";
    notify(what + " refused: " + e.message + hint, true);
  }
  refresh();
}

// ---- login -----------------------------------------------------------

function showAuth() {
  const in_ = !!sessionStorage.getItem(TOKEN_KEY);
  $("login").hidden = in_;
  $("logged-in").hidden = !in_;
}

function setupAuth() {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    showAuth();
    refresh();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showAuth();
    refresh();
  });
  showAuth();
}

// ---- latency from the histograms -------------------------------------

// Parses the OpenMetrics text: histogram buckets and counters, keyed by
// metric name and labels (volume left out: one engine, one volume).
function parseMetrics(text) {
  const buckets = new Map(); // "name|op|replica" -> [[le, count]]
  const counters = new Map(); // "name|op" -> value
  for (const line of text.split("\n")) {
    const m = /^([a-z_]+)\{([^}]*)\} (\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of m[2].matchAll(/([a-z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    const value = Number(m[3]);
    if (m[1].endsWith("_bucket")) {
      const key = [m[1].slice(0, -7), labels.op || "", labels.replica || ""].join("|");
      if (!buckets.has(key)) buckets.set(key, []);
      buckets.get(key).push([labels.le === "+Inf" ? Infinity : Number(labels.le), value]);
    } else if (m[1].endsWith("_total")) {
      counters.set(m[1] + "|" + (labels.op || ""), value);
    }
  }
  return { buckets, counters, at: performance.now() };
}

// The q-quantile of what a histogram observed between two scrapes: the
// upper bound of the bucket it falls in (in ms), or null with no data.
function quantile(before, after, q) {
  if (!before || !after || before.length !== after.length) return null;
  const total = after[after.length - 1][1] - before[before.length - 1][1];
  if (total <= 0) return null;
  let lastFinite = 0;
  for (let i = 0; i < after.length; i++) {
    const [le, count] = after[i];
    if (le !== Infinity) lastFinite = le;
    if (count - before[i][1] >= q * total) return (le === Infinity ? lastFinite : le) * 1000;
  }
  return lastFinite * 1000;
}

const SERIES = [
  { name: "write p99", color: "#cf222e", op: "write", q: 0.99 },
  { name: "write p50", color: "#fb8f44", op: "write", q: 0.5 },
  { name: "read p99", color: "#0969da", op: "read", q: 0.99 },
  { name: "read p50", color: "#54aeff", op: "read", q: 0.5 },
  { name: "flush p99", color: "#8250df", op: "flush", q: 0.99 },
];

const io = { last: null, history: [], replicaP99: new Map() };

function observeMetrics(text) {
  const now = parseMetrics(text);
  const prev = io.last;
  io.last = now;
  if (!prev) return;
  const secs = (now.at - prev.at) / 1000;
  const key = (op) => "rvol_volume_request_duration_seconds|" + op + "|";
  const point = { rates: {} };
  for (const s of SERIES) point[s.name] = quantile(prev.buckets.get(key(s.op)), now.buckets.get(key(s.op)), s.q);
  for (const op of ["read", "write", "flush", "trim"]) {
    const d = (name) => (now.counters.get(name + "|" + op) || 0) - (prev.counters.get(name + "|" + op) || 0);
    point.rates[op] = { ops: d("rvol_volume_requests_total") / secs, bytes: d("rvol_volume_request_bytes_total") / secs };
  }
  io.history.push(point);
  if (io.history.length > HISTORY) io.history.shift();
  io.replicaP99.clear();
  for (const [k, after] of now.buckets) {
    const [name, op, replica] = k.split("|");
    if (name === "rvol_replica_request_duration_seconds" && op === "write") {
      io.replicaP99.set(replica, quantile(prev.buckets.get(k), after, 0.99));
    }
  }
}

function ms(v) {
  return v === null || v === undefined ? "–" : v < 1 ? v.toFixed(3) + " ms" : v.toFixed(1) + " ms";
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function drawChart() {
  const chart = $("chart");
  const W = 600, H = 160, L = 50;
  const values = io.history.flatMap((p) => SERIES.map((s) => p[s.name]).filter((v) => v !== null));
  const max = Math.max(1, ...values);
  const parts = [
    svg("line", { class: "axis", x1: L, y1: H - 15, x2: W, y2: H - 15 }),
    svg("line", { class: "axis", x1: L, y1: 5, x2: L, y2: H - 15 }),
  ];
  const top = svg("text", { x: 2, y: 12 });
  top.textContent = ms(max);
  const zero = svg("text", { x: 2, y: H - 15 });
  zero.textContent = "0";
  const span = svg("text", { x: L, y: H - 2 });
  span.textContent = `last ${io.history.length} s`;
  parts.push(top, zero, span);
  const x = (i) => L + ((W - L) * i) / (HISTORY - 1);
  const y = (v) => H - 15 - ((H - 20) * v) / max;
  for (const s of SERIES) {
    const pts = io.history
      .map((p, i) => (p[s.name] === null ? null : `${x(i + HISTORY - io.history.length).toFixed(1)},${y(p[s.name]).toFixed(1)}`))
      .filter((p) => p !== null);
    if (pts.length) {
      parts.push(svg("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 1.5, "data-series": s.name }));
      // A lone sample (a burst of I/O between quiet seconds) is a dot.
      for (const p of pts) {
        const [cx, cy] = p.split(",");
        parts.push(svg("circle", { cx, cy, r: 2, fill: s.color }));
      }
    }
  }
  chart.replaceChildren(...parts);
  const last = io.history[io.history.length - 1];
  if (last) {
    $("rates").replaceChildren(
      ...["read", "write", "flush", "trim"].map((op) =>
        el("span", { class: "rate" }, `${op}: ${Math.round(last.rates[op].ops)}/s ${bytes(last.rates[op].bytes)}/s `),
      ),
    );
  }
}

function chartSection(title) {
  const chart = svg("svg", { id: "chart", class: "chart", viewBox: "0 0 600 160" });
  return section(
    "io",
    title,
    el("div", { id: "rates", class: "muted" }, "waiting for two scrapes of /metrics"),
    chart,
    el("div", { class: "legend" }, SERIES.map((s) => el("span", {}, svg_legend(s.color), s.name))),
  );
}

function svg_legend(color) {
  const i = el("i");
  i.style.background = color;
  return i;
}

// ---- an engine: one volume -------------------------------------------

function setupEngine() {
  $("main").append(
    section("volume", "Volume", el("dl", { id: "summary" })),
    section(
      "replicas",
      "Replicas",
      table("replica-table", ["Address", "Mode", "Write latency", "Write p99", "Notes", ""]),
      el(
        "form",
        { class: "inline", id: "add-replica" },
        el("input", { id: "replica-address", placeholder: "HOST:PORT or unix:PATH", "aria-label": "replica address" }),
        el("button", { type: "submit" }, "Add replica"),
      ),
    ),
    chartSection("I/O latency (from the volume's histograms)"),
    section(
      "snapshots",
      "Snapshots",
      table("snapshot-table", ["Name", "Taken", "Allocated", "Labels", ""]),
      el(
        "form",
        { class: "inline", id: "take-snapshot" },
        el("input", { id: "snapshot-name", placeholder: "name (optional)", "aria-label": "snapshot name" }),
        el("button", { type: "submit", id: "snapshot-button" }, "Take snapshot"),
      ),
    ),
    section("backup", "Backup", el("div", { id: "backup-body", class: "muted" }, "none since the engine started")),
    section("events", "Events", table("event-table", ["Time", "What", "Replica", ""])),
  );
  $("add-replica").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const address = $("replica-address").value.trim();
    if (address) act("adding replica " + address, "POST", "v1/replicas", { address });
  });
  $("take-snapshot").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("snapshot-name").value.trim();
    act("snapshot", "POST", "v1/snapshots", name ? { name } : {});
  });
}

async function refreshEngine() {
  const st = await getJson("v1/volume");
  $("title").textContent = st.volume;
  $("state").replaceWith(Object.assign(badge(st.state), { id: "state" }));
  document.title = `${st.volume} (${st.state}) · rvol`;
  const facts = [
    ["Size", bytes(st.size)],
    ["Generation", st.generation],
    ["Frontend", [st.frontend, st.device, ...(st.nbd || [])].filter(Boolean).join(" ")],
    ["Encryption", st.encryption || "none"],
    ["Rebuilt since start", bytes(st.rebuilt_bytes)],
    ["Checksum errors", st.checksum_errors],
  ];
  $("summary").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));

  const rows = [];
  for (const r of st.replicas) {
    const notes = [];
    if (r.slow) notes.push(badge(r.slow.evicted ? "evicted" : "slow", "slow"), ` ${r.slow.mean_ms.toFixed(1)} ms against peers' ${r.slow.peers_ms.toFixed(1)} ms for ${r.slow.for_secs} s `);
    if (r.stale) notes.push("stale ");
    if (r.failures) notes.push(`failed ${r.failures}× since the engine started `);
    if (r.last_error) notes.push(el("span", { class: "error-text" }, r.last_error));
    rows.push(
      el(
        "tr",
        { "data-replica": r.address, "data-mode": r.mode },
        el("td", {}, r.address),
        el("td", {}, badge(r.mode)),
        el("td", {}, ms(r.latency_ms)),
        el("td", {}, ms(io.replicaP99.get(r.address))),
        el("td", {}, notes),
        el("td", {}, el("button", { type: "button", onclick: () => act("removing " + r.address, "DELETE", "v1/replicas", { address: r.address }) }, "Remove")),
      ),
    );
    const b = st.rebuild;
    if (b && b.replica === r.address) {
      const pct = b.total ? Math.floor((100 * b.scanned) / b.total) : 0;
      rows.push(
        el(
          "tr",
          { class: "rebuild" },
          el(
            "td",
            { colspan: 6 },
            "rebuilding: ",
            el("progress", { id: "rebuild-progress", max: b.total || 1, value: b.scanned }),
            ` ${pct}% compared (${bytes(b.scanned)} of ${bytes(b.total)}), ${bytes(b.copied)} copied, ${b.mib_per_s.toFixed(1)} MiB/s`,
          ),
        ),
      );
    }
  }
  fill("replica-table", rows, "no replicas");

  fill(
    "event-table",
    (st.events || [])
      .slice()
      .reverse()
      .map((e) => el("tr", {}, el("td", {}, when(e.at)), el("td", {}, e.kind.replaceAll("_", " ")), el("td", {}, e.replica || ""), el("td", {}, e.message))),
    "nothing yet",
  );

  const b = st.backup;
  if (b) {
    const p = b.progress;
    $("backup-body").replaceChildren(
      `${b.state.toLowerCase()}: snapshot ${b.snapshot} to ${b.target} `,
      b.state === "Running" ? el("progress", { max: p.to_read || 1, value: p.read }) : "",
      ` ${bytes(p.read)} of ${bytes(p.to_read)} read, ${p.chunks_uploaded} chunks (${bytes(p.bytes_uploaded)}) uploaded, ${p.mib_per_s.toFixed(1)} MiB/s`,
      b.name ? ` → ${b.name}` : "",
      b.error ? el("span", { class: "error-text" }, " " + b.error) : "",
    );
  }

  // Snapshots and metrics: shown when they can be had (a volume with no
  // RW replica has no chain to list).
  const [chain, metrics] = await Promise.allSettled([getJson("v1/snapshots"), call("GET", "metrics")]);
  if (chain.status === "fulfilled") {
    // A layer's file is volume-snap-NAME.img; users know it as NAME.
    const snapshotName = (file) => file.replace(/^volume-snap-/, "").replace(/\.img$/, "");
    fill(
      "snapshot-table",
      chain.value
        .filter((l) => l.user_created && !l.removed)
        .reverse()
        .map((l) => ({ ...l, name: snapshotName(l.name) }))
        .map((l) =>
          el(
            "tr",
            { "data-snapshot": l.name },
            el("td", {}, l.name),
            el("td", {}, when(l.created)),
            el("td", {}, bytes(l.allocated_bytes)),
            el("td", {}, Object.entries(l.labels || {}).map(([k, v]) => `${k}=${v} `)),
            el("td", {}, el("button", { type: "button", onclick: () => act("removing snapshot " + l.name, "DELETE", "v1/snapshots/" + encodeURIComponent(l.name)) }, "Remove")),
          ),
        ),
      "no snapshots",
    );
  }
  if (metrics.status === "fulfilled") {
    observeMetrics(metrics.value);
    drawChart();
  }
}

// ---- the controller: the cluster -------------------------------------

let selected = null; // the volume whose details are shown

function setupCluster() {
  $("main").append(
    section("volumes", "Volumes", table("volume-table", ["Name", "State", "Size", "Replicas", "Attached", ""])),
    section("detail", "Volume", el("div", { id: "detail-body", class: "muted" }, "select a volume")),
    section("nodes", "Nodes", table("node-table", ["Name", "Zone", "Address", "State", "Disks"])),
  );
}

function replicaChip(r) {
  const mode = r.mode || (r.process ? r.process.state : "unknown");
  return el("span", { class: "chip" }, `${r.node} `, badge(mode, mode === "running" ? "RW" : mode), " ");
}

async function refreshCluster() {
  const [volumes, nodes, leader] = await Promise.all([getJson("v1/volumes"), getJson("v1/nodes"), getJson("v1/leader")]);
  $("title").textContent = `cluster · leader ${leader.leader || "none"}`;
  const bad = volumes.filter((v) => v.state === "faulted" || v.state === "degraded").length;
  $("state").replaceWith(Object.assign(badge(bad ? `${bad} volume(s) need attention` : "all volumes fine", bad ? "degraded" : "healthy"), { id: "state" }));

  fill(
    "volume-table",
    volumes.map((v) =>
      el(
        "tr",
        { "data-volume": v.name },
        el("td", {}, el("a", { href: "#" + encodeURIComponent(v.name), onclick: () => { selected = v.name; refresh(); } }, v.name)),
        el("td", {}, badge(v.state)),
        el("td", {}, bytes(v.size)),
        el("td", {}, v.replicas.map(replicaChip)),
        el("td", {}, v.attached_node ? `${v.attached_node}${v.readonly ? " (read-only)" : ""}` : ""),
        el("td", {}, v.nbd || v.device || ""),
      ),
    ),
    "no volumes",
  );

  fill(
    "node-table",
    nodes.map((n) =>
      el(
        "tr",
        { "data-node": n.name },
        el("td", {}, n.name),
        el("td", {}, n.zone || ""),
        el("td", {}, n.address || ""),
        el("td", {}, n.alive === false ? badge("down", "failed") : n.draining ? badge("draining", "degraded") : n.cordoned ? badge("cordoned", "degraded") : badge("up", "healthy")),
        el(
          "td",
          {},
          (n.disks || []).map((d) =>
            el("div", {}, `${d.path} `, el("meter", { min: 0, max: d.capacity_bytes || 1, value: d.capacity_bytes - d.free_bytes }), ` ${bytes(d.free_bytes)} free of ${bytes(d.capacity_bytes)}`),
          ),
        ),
      ),
    ),
    "no nodes",
  );

  if (!selected && location.hash) selected = decodeURIComponent(location.hash.slice(1));
  const v = volumes.find((x) => x.name === selected);
  if (v) await showVolume(v, nodes);
}

async function showVolume(v, nodes) {
  const snaps = await getJson(`v1/volumes/${encodeURIComponent(v.name)}/snapshots`).catch(() => []);
  const path = `v1/volumes/${encodeURIComponent(v.name)}`;
  const body = $("detail-body");
  // Keep the forms (and what is typed in them) across refreshes.
  let forms = body.querySelector("#volume-actions");
  if (!forms || forms.dataset.volume !== v.name) {
    const nodeSelect = el("select", { id: "attach-node", "aria-label": "node" }, nodes.map((n) => el("option", { value: n.name }, n.name)));
    forms = el(
      "div",
      { id: "volume-actions", "data-volume": v.name },
      el(
        "form",
        { class: "inline", id: "attach-form", onsubmit: (ev) => { ev.preventDefault(); act(`attaching ${v.name}`, "POST", path + "/attach", { node: nodeSelect.value }); } },
        nodeSelect,
        el("button", { type: "submit" }, "Attach"),
        el("button", { type: "button", id: "detach-button", onclick: () => act(`detaching ${v.name}`, "POST", path + "/detach", {}) }, "Detach"),
      ),
      el(
        "form",
        { class: "inline", id: "snapshot-form", onsubmit: (ev) => { ev.preventDefault(); const name = ev.target.querySelector("input").value.trim(); if (name) act(`snapshot ${name}`, "POST", path + "/snapshots", { name }); } },
        el("input", { id: "snapshot-name", placeholder: "snapshot name", "aria-label": "snapshot name" }),
        el("button", { type: "submit", id: "snapshot-button" }, "Take snapshot"),
      ),
    );
    body.replaceChildren(el("h3", { id: "detail-name" }), el("div", { id: "detail-data" }), forms);
    body.className = "";
  }
  $("detail-name").textContent = `${v.name}: ${v.state}, ${bytes(v.size)}, ${v.spec.replicas} replica(s)`;
  const rebuild = v.rebuild;
  const replicaRows = v.replicas.flatMap((r) => {
    const row = el(
      "tr",
      { "data-replica": r.id, "data-mode": r.mode || "" },
      el("td", {}, r.id),
      el("td", {}, r.node),
      el("td", {}, r.address),
      el("td", {}, r.process ? r.process.state + (r.process.error ? ": " + r.process.error : "") : "not reported"),
      el("td", {}, r.mode ? badge(r.mode) : ""),
      el("td", {}, r.in_sync ? "yes" : "no"),
    );
    if (!rebuild || rebuild.replica !== r.id) return [row];
    return [row, el("tr", { class: "rebuild" }, el("td", { colspan: 6 }, "rebuilding: ", el("progress", { id: "rebuild-progress", max: rebuild.total || 1, value: rebuild.scanned }), ` ${bytes(rebuild.scanned)} of ${bytes(rebuild.total)} compared`))];
  });
  const b = v.backup;
  const p = v.backup_progress;
  const backup = b
    ? el(
        "p",
        { id: "detail-backup" },
        `backup of snapshot ${b.snapshot} to ${b.target}: ${b.state.is}`,
        b.state.name ? ` (${b.state.name})` : "",
        b.state.error ? el("span", { class: "error-text" }, ` ${b.state.error}`) : "",
        p ? [" ", el("progress", { max: p.to_read || 1, value: p.read }), ` ${bytes(p.read)} of ${bytes(p.to_read)} read, ${bytes(p.uploaded)} uploaded`] : "",
      )
    : "";
  const data = el(
    "div",
    { id: "detail-data" },
    backup,
    table("detail-replicas", ["Replica", "Node", "Address", "Process", "Mode", "In sync"]),
    el("h3", {}, "Snapshots"),
    table("snapshot-table", ["Name", "State", ""]),
    el("h3", {}, "Events"),
    table("event-table", ["Time", ""]),
  );
  $("detail-data").replaceWith(data);
  fill("detail-replicas", replicaRows, "no replicas");
  fill(
    "snapshot-table",
    snaps.map((s) =>
      el(
        "tr",
        { "data-snapshot": s.name },
        el("td", {}, s.name),
        el("td", {}, s.state.is + (s.state.at ? " " + when(s.state.at) : "")),
        el("td", {}, el("button", { type: "button", onclick: () => act(`removing snapshot ${s.name}`, "DELETE", `${path}/snapshots/${encodeURIComponent(s.name)}`) }, "Remove")),
      ),
    ),
    "no snapshots",
  );
  fill("event-table", v.events.slice().reverse().map((e) => el("tr", {}, el("td", {}, when(e.at)), el("td", {}, e.message))), "nothing yet");
}

// ---- the loop ----------------------------------------------------------

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    await (KIND === "cluster" ? refreshCluster() : refreshEngine());
    $("updated").textContent = new Date().toLocaleTimeString();
    const n = $("notice");
    if (n.dataset.readError) {
      n.hidden = true;
      delete n.dataset.readError;
    }
  } catch (e) {
    const needLogin = e.status === 401;
    notify(needLogin ? "This API needs a token to read: log in." : "Cannot reach the API: " + e.message, true);
    $("notice").dataset.readError = "1";
  } finally {
    busy = false;
  }
}

setupAuth();
if (KIND === "cluster") setupCluster();
else setupEngine();
refresh();
setInterval(refresh, POLL_MS);
