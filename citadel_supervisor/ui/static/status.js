// citadeld's status page: live from /ui/api/events (server-sent events), read-only.
//
// Everything a worker or citadeld says goes into the page with textContent, never as
// HTML: a worker may print <script> or terminal escapes, and they must show as text.
// The page's content security policy forbids inline scripts besides.
"use strict";

(() => {
  const EVENTS_KEPT = 100;
  const RETRY_MS = 5000;       // after the stream was refused (too many pages) or broke

  const workers = new Map();   // name -> {data, at}: the status, and when it came
  let logsShown = false;
  let selected = null;

  const byId = (id) => document.getElementById(id);

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function dash(value) {
    return value === null || value === undefined || value === "" ? "\u2013" : String(value);
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "\u2013";
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const two = (n) => String(n).padStart(2, "0");
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${two(m)}m`;
    if (m) return `${m}m ${two(s)}s`;
    return `${s}s`;
  }

  function gib(bytes) {
    return bytes === null || bytes === undefined ? "?" : (bytes / 2 ** 30).toFixed(1);
  }

  function clock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString();
  }

  function uptimeOf(entry) {
    const up = entry.data.uptime;
    return up === null || up === undefined ? null : up + (performance.now() - entry.at) / 1000;
  }

  // -- workers ---------------------------------------------------------------

  const COLUMNS = ["name", "service", "state", "ready", "restarts", "uptime", "pid", "port",
                   "gpus", "exit"];
  const NUMERIC = new Set(["restarts", "uptime", "pid", "port"]);

  function setWorker(data) {
    workers.set(data.name, {data, at: performance.now()});
  }

  function newRow(name) {
    const row = make("tr");
    row.dataset.worker = name;
    row.tabIndex = 0;
    for (const column of COLUMNS) {
      row.appendChild(make("td", NUMERIC.has(column) ? `${column} num` : column));
    }
    row.addEventListener("click", () => select(name));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") select(name); });
    return row;
  }

  function fillRow(row, entry) {
    const w = entry.data;
    const cell = (column) => row.querySelector(`td.${column}`);
    cell("name").textContent = w.name;
    cell("service").textContent = w.service;
    const badge = make("span", "badge", w.phase ? `${w.state} (${w.phase})` : w.state);
    badge.dataset.state = w.state;
    cell("state").replaceChildren(badge);
    cell("ready").textContent = w.ready ? "yes" : "no";
    cell("ready").dataset.ready = w.ready ? "yes" : "no";
    cell("restarts").textContent = dash(w.restarts);
    cell("uptime").textContent = duration(uptimeOf(entry));
    cell("pid").textContent = dash(w.pid);
    cell("port").textContent = dash(w.port);
    cell("gpus").textContent = w.gpus && w.gpus.length ? w.gpus.join(", ") : "\u2013";
    cell("exit").textContent = dash(w.last_exit_reason);
    cell("exit").title = w.last_error || "";
    row.dataset.state = w.state;
    row.classList.toggle("selected", w.name === selected);
  }

  function renderWorkers() {
    const tbody = document.querySelector("#workers tbody");
    const rows = new Map(Array.from(tbody.rows, (row) => [row.dataset.worker, row]));
    const names = Array.from(workers.keys()).sort();
    for (const name of names) {
      const row = rows.get(name) || newRow(name);
      rows.delete(name);
      fillRow(row, workers.get(name));
      tbody.appendChild(row);  // appending again keeps the rows in name order
    }
    for (const row of rows.values()) row.remove();
    byId("workers-empty").hidden = names.length > 0;
    const running = names.filter((n) => workers.get(n).data.state === "running").length;
    byId("summary").textContent = `${running}/${names.length} running`;
    if (selected !== null) renderDetail();
  }

  function tickUptimes() {
    for (const row of document.querySelectorAll("#workers tbody tr")) {
      const entry = workers.get(row.dataset.worker);
      if (entry) row.querySelector("td.uptime").textContent = duration(uptimeOf(entry));
    }
  }

  // -- one worker's details and output ---------------------------------------

  function select(name) {
    selected = name;
    byId("detail").hidden = false;
    renderWorkers();
    refreshLogs();
  }

  function renderDetail() {
    const entry = workers.get(selected);
    byId("detail-name").textContent = selected;
    const fields = byId("detail-fields");
    if (!entry) {
      fields.replaceChildren(make("dd", null, "no longer configured"));
      return;
    }
    const w = entry.data;
    const shown = [
      ["state", w.phase ? `${w.state} (${w.phase})` : w.state],
      ["since", w.since ? new Date(w.since * 1000).toLocaleString() : null],
      ["type", w.type],
      ["models", w.models && w.models.length ? w.models.join(", ") : null],
      ["last exit", w.last_exit_reason],
      ["last error", w.last_error],
    ];
    fields.replaceChildren();
    for (const [label, value] of shown) {
      fields.appendChild(make("dt", null, label));
      fields.appendChild(make("dd", null, dash(value)));
    }
  }

  async function getJSON(path) {
    const response = await fetch(path, {cache: "no-store"});
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) throw new Error(body && body.error ? body.error : `HTTP ${response.status}`);
    return body;
  }

  async function refreshLogs() {
    const name = selected;
    const note = byId("log-note");
    const pre = byId("log-lines");
    if (name === null) return;
    if (!logsShown) {
      note.textContent = "Worker output is not shown on this page ([exporter] ui_logs is off). " +
        `Read it with: citadelctl logs ${name}`;
      pre.textContent = "";
      pre.hidden = true;
      return;
    }
    note.textContent = "loading output";
    try {
      const body = await getJSON(`/ui/api/logs/${encodeURIComponent(name)}?n=100`);
      if (selected !== name) return;
      pre.hidden = false;
      pre.textContent = body.lines.join("\n");
      note.textContent = body.lines.length ?
        `last ${body.lines.length} lines, as of ${new Date().toLocaleTimeString()}` : "no output yet";
      pre.scrollTop = pre.scrollHeight;
    } catch (error) {
      if (selected === name) note.textContent = `cannot read the output: ${error.message}`;
    }
  }

  // -- events ----------------------------------------------------------------

  function describe(event) {
    const d = event.detail || {};
    switch (event.kind) {
      case "state": {
        let text = `${dash(event.old_state)} \u2192 ${event.state}`;
        if (d.reason) text += `: ${d.reason}`;
        if (d.error) text += `: ${d.error}`;
        if (d.delay !== undefined) text += ` (restart in ${d.delay}s)`;
        if (d.waiting) text += ` (waiting for ${d.waiting})`;
        return text;
      }
      case "ready": return event.ready ? "ready" : "not ready";
      case "exit": return `exited: ${dash(d.reason)}`;
      case "restart": return `restart in ${Number(d.delay || 0).toFixed(1)}s: ${dash(d.reason)}`;
      default: return event.kind;
    }
  }

  function eventItem(event) {
    const item = make("li");
    item.dataset.kind = event.kind;
    item.appendChild(make("time", "muted", clock(event.time)));
    item.appendChild(make("span", "event-worker", event.worker));
    item.appendChild(make("span", "event-text", describe(event)));
    return item;
  }

  function addEvents(events, replace) {
    const list = byId("events");
    if (replace) list.replaceChildren();
    for (const event of events) list.prepend(eventItem(event));  // newest first
    while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
  }

  // -- the stream --------------------------------------------------------------

  function setConnection(state, text) {
    const node = byId("connection");
    node.dataset.state = state;
    node.textContent = text;
  }

  function applySnapshot(snapshot) {
    workers.clear();
    for (const w of snapshot.workers) setWorker(w);
    logsShown = Boolean(snapshot.logs);
    byId("version").textContent = snapshot.version ? `v${snapshot.version}` : "";
    addEvents(snapshot.events || [], true);
    renderWorkers();
    if (selected !== null) refreshLogs();
  }

  function applyEvent(message) {
    const event = message.event;
    if (message.worker) setWorker(message.worker); else workers.delete(event.worker);
    renderWorkers();
    addEvents([event], false);
    if (event.worker === selected && event.kind === "exit") refreshLogs();
  }

  function connect() {
    setConnection("connecting", "connecting");
    const source = new EventSource("/ui/api/events");
    source.addEventListener("snapshot", (m) => {
      applySnapshot(JSON.parse(m.data));
      setConnection("live", "live");
    });
    source.addEventListener("worker", (m) => applyEvent(JSON.parse(m.data)));
    source.addEventListener("health", (m) => showHealth(JSON.parse(m.data)));
    source.addEventListener("gpus", (m) => showGpus(JSON.parse(m.data)));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (503: too many pages open) or not a stream: the browser gives up; retry.
        source.close();
        setConnection("down", `disconnected; retrying in ${RETRY_MS / 1000}s`);
        setTimeout(connect, RETRY_MS);
      } else {
        setConnection("connecting", "reconnecting");
      }
    });
  }

  // -- health and GPUs (sent on the stream, read once for every page) ------------

  const RANK = {fail: 0, warn: 1, pass: 2};

  function checkItem(check) {
    const item = make("li");
    item.dataset.status = check.status;
    const status = make("span", "badge", check.status);
    status.dataset.status = check.status;
    item.appendChild(status);
    item.appendChild(make("span", "check-key", check.key));
    item.appendChild(make("span", "muted check-component", check.componentId));
    if (check.output) item.appendChild(make("span", "check-output", check.output));
    return item;
  }

  function showHealth(report) {
    const note = byId("health-note");
    const badge = byId("health-badge");
    badge.dataset.status = report.status;
    badge.textContent = `health ${report.status}`;
    const checks = [];
    for (const [key, results] of Object.entries(report.checks || {})) {
      for (const result of results) checks.push({key, ...result});
    }
    checks.sort((a, b) => (RANK[a.status] ?? 3) - (RANK[b.status] ?? 3) ||
                          a.key.localeCompare(b.key));
    // The checks that warn or fail first, each on its own; the passing ones folded.
    const list = byId("health-checks");
    const passing = checks.filter((check) => check.status === "pass");
    list.replaceChildren();
    for (const check of checks.filter((c) => c.status !== "pass")) list.appendChild(checkItem(check));
    if (passing.length) {
      const folded = make("details");
      folded.appendChild(make("summary", null, `${passing.length} passing`));
      const inner = make("ul");
      for (const check of passing) inner.appendChild(checkItem(check));
      folded.appendChild(inner);
      const item = make("li", "folded");
      item.appendChild(folded);
      list.appendChild(item);
    }
    note.textContent = `${checks.length} checks, as of ${new Date().toLocaleTimeString()}`;
  }

  function showGpus(answer) {
    const note = byId("gpus-note");
    const table = byId("gpus");
    if (!answer.available) {
      table.hidden = true;
      note.textContent = `no GPUs: ${dash(answer.reason)}`;
      return;
    }
    const tbody = table.querySelector("tbody");
    tbody.replaceChildren();
    for (const gpu of answer.gpus) {
      const row = make("tr");
      row.dataset.gpu = gpu.index;
      row.appendChild(make("td", "num", gpu.index));
      row.appendChild(make("td", null, gpu.name));
      const memory = gpu.memory || {};
      const cell = make("td", "memory");
      const bar = make("span", "bar");
      const fill = make("span", "fill");
      const share = memory.total ? Math.min(1, (memory.used || 0) / memory.total) : 0;
      fill.style.width = `${(share * 100).toFixed(1)}%`;
      bar.appendChild(fill);
      cell.appendChild(bar);
      cell.appendChild(make("span", null, `${gib(memory.used)} / ${gib(memory.total)} GiB`));
      row.appendChild(cell);
      row.appendChild(make("td", "num", gpu.utilization_percent === null ?
        "\u2013" : `${gpu.utilization_percent}%`));
      row.appendChild(make("td", "num", gpu.temperature_c === null ?
        "\u2013" : `${gpu.temperature_c}\u00b0C`));
      const names = new Set([...(gpu.workers || []), ...(gpu.holders || [])]);
      let holders = names.size ? Array.from(names).sort().join(", ") : "\u2013";
      if (gpu.other_processes) holders += ` (+${gpu.other_processes} other processes)`;
      row.appendChild(make("td", null, holders));
      tbody.appendChild(row);
    }
    table.hidden = false;
    note.textContent = (answer.fake ? "FAKE GPUs (CITADEL_FAKE_NVML); " : "") +
      `driver ${dash(answer.driver_version)}, as of ${new Date().toLocaleTimeString()}`;
  }

  // -- start -------------------------------------------------------------------

  byId("detail-refresh").addEventListener("click", refreshLogs);
  byId("detail-close").addEventListener("click", () => {
    selected = null;
    byId("detail").hidden = true;
    renderWorkers();
  });
  setInterval(tickUptimes, 1000);
  connect();
})();
