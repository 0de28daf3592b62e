// The loopline dashboard page: draws one run (or two side by side) from the JSON API with plotly.js,
// and follows /api/events (server-sent events) so a running `loopline bench` updates as jobs complete.
"use strict";

const COLORS = { prefork: "#636efa", threads: "#ef553b", gevent: "#00a884", asyncio: "#ab63fa", solo: "#ffa15a" };
const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const state = { runs: [], docs: {}, a: null, b: null, follow: true };

const $ = (sel, root = document) => root.querySelector(sel);
const color = (pool) => COLORS[pool] || "#7f7f7f";
const num = (n, digits = 1) =>
  n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });

// With `loopline bench --baseline stock`: the same pool's row on stock Celery, or undefined.
const stockRow = (doc, pool) => (doc.baseline ? doc.baseline.summary.find((r) => r.pool === pool) : undefined);
const stockValue = (doc, get) => (r) => {
  const base = stockRow(doc, r.pool);
  return base && !base.error ? get(base) : null;
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function workloadText(w) {
  let text = `${w.jobs} × ${w.task}, ${num(w.latency_ms, 0)} ms latency`;
  if (w.jitter_ms) text += ` ± ${num(w.jitter_ms, 0)}`;
  if (w.error_rate) text += `, ${num(100 * w.error_rate, 1)} % errors`;
  if (w.repeats > 1) text += `, median of ${w.repeats} repeats`;
  return text;
}

function verdictText(doc) {
  const w = doc.winner;
  if (!w) return doc.status === "running" ? "running: no pool has finished yet" : "no pool finished a job";
  let text = `<b>${w.pool}</b> won with ${num(w.throughput_per_s)} jobs/s`;
  if (w.runner_up) text += `, <b>${num(w.ratio, 2)}×</b> ${w.runner_up}, the runner-up`;
  return doc.status === "running" ? `so far: ${text}` : text;
}

// ---- run list --------------------------------------------------------------------------------------------

function renderRuns() {
  const list = $("#runs");
  list.replaceChildren();
  if (!state.runs.length) {
    list.append(el("li", { class: "empty" }, "no runs yet: run `loopline bench`"));
    return;
  }
  for (const run of state.runs) {
    const classes = [run.run_id === state.a ? "selected" : "", run.run_id === state.b ? "compared" : ""];
    const compare = el("button", {
      class: "compare", title: "show beside the selected run",
      onclick: (event) => { event.stopPropagation(); select("b", state.b === run.run_id ? null : run.run_id); },
    }, run.run_id === state.b ? "uncompare" : "compare");
    const winner = run.winner ? `${run.winner.pool} won${run.winner.ratio ? `, ${num(run.winner.ratio, 2)}×` : ""}` : "";
    list.append(el("li", { class: classes.join(" ").trim(), "data-run-id": run.run_id, onclick: () => pick(run) },
      el("div", { class: "run-li-head" }, el("span", { class: "run-id" }, run.run_id),
        el("span", { class: `badge ${run.status}` }, run.status), compare),
      el("div", { class: "run-meta" }, run.workload ? workloadText(run.workload) : ""),
      el("div", { class: "run-meta" }, (run.pools || []).join(" · ")),
      el("div", { class: "run-winner" }, winner)));
  }
}

function pick(run) {
  state.follow = run.status === "running" && state.follow;
  $("#follow").checked = state.follow;
  select("a", run.run_id);
}

async function select(which, runId) {
  state[which] = runId;
  if (which === "a" && state.b === runId) state.b = null;
  const query = new URLSearchParams();
  if (state.a) query.set("run", state.a);
  if (state.b) query.set("compare", state.b);
  history.replaceState(null, "", query.toString() ? `?${query}` : location.pathname);
  renderRuns();
  try {
    if (runId) state.docs[runId] = await getJSON(`/api/runs/${encodeURIComponent(runId)}`);
  } catch (error) {
    state.docs[runId] = { error: String(error.message || error), run_id: runId };
  }
  renderPanes();
}

function followLive() {
  if (!state.follow) return;
  const running = state.runs.find((run) => run.status === "running");
  if (running && running.run_id !== state.a) select("a", running.run_id);
}

// ---- panes -----------------------------------------------------------------------------------------------

function renderPanes() {
  const main = $("#panes");
  const ids = [state.a, state.b].filter(Boolean);
  const relayout = main.classList.contains("two") !== (ids.length === 2);
  main.classList.toggle("two", ids.length === 2);
  // Plotly sizes a chart when it is drawn; one pane or two changes every chart's width.
  if (relayout) requestAnimationFrame(() => document.querySelectorAll(".js-plotly-plot").forEach((d) => Plotly.Plots.resize(d)));
  if (!ids.length) {
    main.replaceChildren(el("div", { class: "empty-state" }, "Pick a run on the left, or start one: loopline bench"));
    return;
  }
  for (const key of ["a", "b"]) {
    let pane = $(`#pane-${key}`);
    const doc = state[key] && state.docs[state[key]];
    if (!doc) { if (pane) pane.remove(); continue; }
    if (!pane || pane.dataset.runId !== doc.run_id) {
      pane?.remove();
      pane = buildPane(key, doc.run_id);
      if (key === "a") main.prepend(pane); else main.append(pane);
    }
    fillPane(pane, key, doc);
  }
  main.querySelector(".empty-state")?.remove();
}

function buildPane(key, runId) {
  const charts = el("div", { class: "charts" },
    ...["throughput", "latency", "cpu", "memory"].map((name) => el("div", { class: "chart", "data-chart": name })),
    el("div", { class: "chart wide", "data-chart": "timeline" }));
  const close = key === "b" ? el("button", { class: "close", title: "close", onclick: () => select("b", null) }, "×") : null;
  return el("section", { class: "pane", id: `pane-${key}`, "data-run-id": runId },
    el("div", { class: "pane-head" }, el("h2", {}, runId), close),
    el("p", { class: "verdict" }), el("p", { class: "sub" }), el("div", { class: "live" }), charts,
    el("div", { class: "table-wrap" }, el("table", { class: "summary" })), el("div", { class: "exports" }));
}

function fillPane(pane, key, doc) {
  if (doc.error && !doc.summary) {
    $(".verdict", pane).replaceChildren(el("span", { class: "error" }, doc.error));
    return;
  }
  $(".verdict", pane).innerHTML = verdictText(doc);
  const m = doc.machine || {};
  $(".sub", pane).replaceChildren(
    `${workloadText(doc.workload)} · started ${doc.started_at} · ${m.cpus} CPUs, Python ${m.python}, Celery ${m.celery}, `
    + `kombu ${m.kombu}, Redis ${m.redis} · ${doc.status}`,
    doc.error ? el("div", { class: "error" }, doc.error) : "",
    el("div", {}, el("code", {}, doc.command)));
  renderLive($(".live", pane), doc);
  drawCharts(pane, doc);
  renderTable($("table.summary", pane), doc);
  const id = encodeURIComponent(doc.run_id);
  $(".exports", pane).replaceChildren("export: ", el("a", { href: `/api/runs/${id}/summary.csv` }, "summary.csv"), " · ",
    el("a", { href: `/api/runs/${id}/jobs.csv` }, "jobs.csv"), " · ", el("a", { href: `/api/runs/${id}` }, "JSON"));
}

function poolProgress(doc) {
  const total = doc.workload.jobs * doc.workload.repeats;
  return doc.workload.pools.map((pool) => {
    let done = doc.results.filter((r) => r.pool === pool).reduce((sum, r) => sum + r.jobs_ok + r.jobs_failed, 0);
    const live = doc.progress && doc.progress.pool === pool ? doc.progress : null;
    if (live) done += live.done;
    const row = doc.summary.find((r) => r.pool === pool);
    return { pool, done, total, rate: live ? live.throughput_per_s : row ? row.throughput_per_s : null, live };
  });
}

function renderLive(box, doc) {
  if (doc.status !== "running") { box.replaceChildren(); return; }
  const rows = poolProgress(doc);
  const current = doc.progress ? `running ${doc.progress.pool} (repeat ${doc.progress.repeat})` : "starting the next worker";
  box.replaceChildren(el("div", { class: "live-title" }, `● live: ${current}`),
    ...rows.map((r) => el("div", { class: "live-pool", "data-pool": r.pool },
      el("span", {}, r.pool),
      el("div", { class: "bar" }, el("div", { style: `width:${(100 * r.done / r.total).toFixed(1)}%;background:${color(r.pool)}` })),
      el("span", { class: "live-count" }, `${r.done}/${r.total} jobs${r.rate ? `, ${num(r.rate)} jobs/s` : ""}`))));
}

// ---- charts ----------------------------------------------------------------------------------------------

function layout(title, yTitle, extra = {}) {
  return { title: { text: title, font: { size: 13 } }, margin: { l: 55, r: 10, t: 34, b: 34 }, showlegend: false,
    yaxis: { title: { text: yTitle, font: { size: 11 } }, rangemode: "tozero", automargin: true },
    font: { size: 11 }, paper_bgcolor: "#fff", plot_bgcolor: "#fff", ...extra };
}

function throughputChart(doc) {
  const rows = doc.summary;
  const live = doc.progress && !rows.some((r) => r.pool === doc.progress.pool) ? doc.progress : null;
  const pools = rows.map((r) => r.pool).concat(live ? [live.pool] : []);
  const rates = rows.map((r) => r.throughput_per_s).concat(live ? [live.throughput_per_s] : []);
  const highs = rows.map((r) => r.throughput_max_per_s).concat(live ? [live.throughput_per_s] : []);
  const limits = rows.map((r) => r.little_limit_per_s);
  const hi = Math.max(1e-9, ...highs);
  const top = 1.2 * Math.max(hi, ...limits.filter((l) => l !== null && l <= 2 * hi));
  const bars = {
    type: "bar", x: pools, y: rates, name: "jobs/s", marker: { color: pools.map(color), opacity: pools.map((p, i) => (live && i === pools.length - 1 ? 0.45 : 1)) },
    text: rates.map((r, i) => `${num(r)}${rows[i] && rows[i].pct_of_limit !== null ? ` (${num(rows[i].pct_of_limit, 0)} %)` : " (running)"}`),
    textposition: "inside", insidetextanchor: "end", hovertemplate: "%{x}: %{y:,.1f} jobs/s<extra></extra>",
    error_y: { type: "data", visible: rows.some((r) => r.repeats > 1), color: "#333",
      array: highs.map((h, i) => h - rates[i]), arrayminus: rows.map((r) => r.throughput_per_s - r.throughput_min_per_s).concat(live ? [0] : []) },
  };
  const marks = {
    type: "scatter", mode: "markers+text", name: "Little's-law limit", x: rows.map((r) => r.pool),
    y: limits.map((l) => (l === null ? null : Math.min(l, top))), cliponaxis: false,
    // A limit above the axis is drawn as an arrow at the top: the bar is that far below its limit.
    marker: { symbol: limits.map((l) => (l !== null && l > top ? "arrow-up" : "line-ew-open")),
      size: limits.map((l) => (l !== null && l > top ? 14 : 54)), color: "#1d2330", line: { width: 3, color: "#1d2330" } },
    text: limits.map((l) => (l === null ? "" : `limit ${num(l, 0)}/s${l > top ? " ↑" : ""}`)), textposition: "top center",
    hovertemplate: "%{x}: Little's-law limit (concurrency ÷ latency)<extra></extra>",
  };
  const traces = [bars, marks];
  if (doc.baseline) {
    // Stock Celery's bar beside each pool's; one that failed shows what it finished before, labelled so.
    const stock = rows.map((r) => stockRow(doc, r.pool));
    traces.push({
      type: "bar", name: "stock Celery", x: rows.map((r) => r.pool), y: stock.map((b) => (b ? b.throughput_per_s : null)),
      marker: { color: rows.map((r) => color(r.pool)), opacity: 0.35, pattern: { shape: "/" } },
      text: stock.map((b) => (b ? `stock ${num(b.throughput_per_s)}${b.error ? " FAILED" : ""}` : "")),
      textposition: "inside", insidetextanchor: "end", hovertemplate: "%{x} on stock Celery: %{y:,.1f} jobs/s<extra></extra>",
    });
  }
  return [traces, layout("Throughput (median; whiskers: min–max) and the Little's-law limit", "jobs/s",
    { yaxis: { title: { text: "jobs/s" }, range: [0, top * 1.2] }, barmode: "group" })];
}

function groupedBars(rows, series, title, yTitle) {
  const traces = series.map(([label, get, opacity]) => ({
    type: "bar", name: label, x: rows.map((r) => r.pool), y: rows.map(get),
    marker: { color: rows.map((r) => color(r.pool)), opacity },
    text: rows.map((r) => (get(r) === null ? "" : num(get(r), get(r) < 10 ? 2 : 0))),
    textposition: "outside", cliponaxis: false, hovertemplate: `%{x} ${label}: %{y:,.2f}<extra></extra>`,
  }));
  const empty = rows.length ? [] : [{ text: "shown when the first pool has finished", showarrow: false, xref: "paper",
    yref: "paper", x: 0.5, y: 0.5, font: { size: 13, color: "#6b7280" } }];
  return [traces, layout(title, yTitle, { barmode: "group", annotations: empty })];
}

function timelineChart(doc) {
  const lines = doc.summary.map((r) => ({ pool: r.pool, points: r.timeline, dash: "solid" }));
  if (doc.progress && !doc.summary.some((r) => r.pool === doc.progress.pool)) {
    lines.push({ pool: `${doc.progress.pool}`, points: doc.progress.timeline, dash: "dot" });
  }
  const traces = lines.map((l) => ({
    type: "scatter", mode: "lines", name: l.pool, x: l.points.map((p) => p.t_s), y: l.points.map((p) => p.completed),
    line: { color: color(l.pool), width: 2.5, dash: l.dash }, hovertemplate: `${l.pool}: %{y} jobs at %{x:.2f} s<extra></extra>`,
  }));
  return [traces, layout("Completed jobs over time (seconds from the first job started)", "jobs completed",
    { showlegend: true, legend: { orientation: "h", y: -0.15 } })];
}

function drawCharts(pane, doc) {
  const rows = doc.summary;
  const latency = [["p50", (r) => r.latency_ms.p50, 1], ["p95", (r) => r.latency_ms.p95, 0.7],
    ["p99", (r) => r.latency_ms.p99, 0.45]];
  const cpu = [["CPU ms/job", (r) => r.worker_cpu_ms_per_job, 1]];
  if (doc.baseline) {
    latency.push(["stock p50", stockValue(doc, (b) => b.latency_ms.p50), 0.25], ["stock p95", stockValue(doc, (b) => b.latency_ms.p95), 0.15]);
    cpu.push(["stock CPU ms/job", stockValue(doc, (b) => b.worker_cpu_ms_per_job), 0.35]);
  }
  const charts = {
    throughput: throughputChart(doc),
    latency: groupedBars(rows, latency, `Job latency p50 · p95 · p99 (started → finished)${doc.baseline ? "; pale: stock Celery" : ""}`, "ms"),
    cpu: groupedBars(rows, cpu, `Worker CPU per job${doc.baseline ? "; pale: stock Celery" : ""}`, "CPU ms per job"),
    memory: groupedBars(rows, [["peak RSS MB", (r) => r.peak_rss_mb, 1]], "Worker peak memory (RSS)", "MB"),
    timeline: timelineChart(doc),
  };
  for (const [name, [traces, lay]] of Object.entries(charts)) {
    const div = $(`[data-chart="${name}"]`, pane);
    Plotly.react(div, traces, lay, PLOT_CONFIG);
    div.dataset.points = traces.reduce((n, t) => n + (t.y || []).filter((v) => v !== null).length, 0);
  }
}

function tableCells(r) {
  return [`${r.concurrency}${r.processes > 1 ? `×${r.processes}` : ""}`, r.jobs_ok, r.jobs_failed,
    num(r.throughput_per_s) + (r.repeats > 1 ? ` (${num(r.throughput_min_per_s, 0)}–${num(r.throughput_max_per_s, 0)})` : ""),
    r.pct_of_limit === null ? "–" : `${num(r.pct_of_limit, 0)} %`, num(r.latency_ms.p50, 0), num(r.latency_ms.p95, 0),
    num(r.latency_ms.p99, 0), num(r.worker_cpu_ms_per_job, 2), num(r.peak_rss_mb, 0)];
}

function renderTable(table, doc) {
  const head = ["pool", "concurrency", "ok", "failed", "jobs/s", "% of limit", "p50 ms", "p95 ms", "p99 ms", "CPU ms/job",
    "peak RSS MB", "vs best"].concat(doc.baseline ? ["vs stock", "per CPU vs stock"] : []);
  const tr = (attrs, cells) => el("tr", attrs, ...cells.map((c, j) => el("td", { "data-col": head[j] }, String(c))));
  const body = [];
  for (const r of doc.summary) {
    const ratios = r.vs_stock ? [`${num(r.vs_stock.throughput, 2)}×`, `${num(r.vs_stock.per_cpu, 2)}×`] : ["–", "–"];
    body.push(tr({ "data-pool": r.pool }, [r.pool, ...tableCells(r), r.vs_best === null ? "–" : `${num(r.vs_best, 2)}×`,
      ...(doc.baseline ? ratios : [])]));
    const base = stockRow(doc, r.pool);
    if (!base) continue;
    // The stock row carries its pool in data-stock-pool, so tr[data-pool=X] still names one row.
    body.push(tr({ class: base.error ? "stock failed" : "stock", "data-stock-pool": r.pool },
      [`└ ${doc.baseline.system}${base.error ? " FAILED" : ""}`, ...tableCells(base), "", "", ""]));
    if (base.error) {
      body.push(el("tr", { class: "stock-error", "data-stock-pool": r.pool },
        el("td", { colspan: String(head.length) }, `${r.pool} on stock Celery failed ${base.failed_repeats} of ${base.repeats}: ${base.error}`)));
    }
  }
  table.replaceChildren(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))), el("tbody", {}, ...body));
}

// ---- cluster and live stream -----------------------------------------------------------------------------

async function refreshCluster() {
  const box = $("#cluster");
  try {
    const c = await getJSON("/api/cluster");
    const flower = c.flower_url ? el("a", { href: c.flower_url, target: "_blank", rel: "noopener" }, "Flower ↗") : "";
    if (c.error) {
      box.replaceChildren(el("span", { class: "bad" }, c.error.startsWith("no broker") ? "no broker" : c.error), " · ", flower);
      box.title = c.error;
      return;
    }
    const workers = c.workers.map((w) => `${w.name} (${w.pool}, -c ${w.concurrency})`).join(", ");
    const dead = c.dead_letters == null ? "" : ` · ${c.dead_letters} dead-lettered (loopline dlq list)`;
    box.replaceChildren(`broker ${c.broker} · ${c.workers.length} worker(s) online${workers ? `: ${workers}` : ""}${dead} · `, flower);
  } catch (error) {
    box.replaceChildren(el("span", { class: "bad" }, `cluster state unavailable: ${error.message}`));
  }
}

// ---- hosts (per-host limits) ---------------------------------------------------------------------------

function ruleText(rule) {
  if (!rule) return "–";
  const parts = [];
  if (rule.rate) parts.push(rule.burst ? `${rule.rate} +${rule.burst} burst` : rule.rate);
  if (rule.concurrency) parts.push(`${rule.concurrency} in flight`);
  return parts.join(", ");
}

async function refreshHosts() {
  const status = $("#hosts-status");
  const table = $("#hosts-table");
  try {
    const h = await getJSON("/api/hosts");
    if (h.error) {
      status.replaceChildren(el("span", { class: "bad" }, h.error));
      table.replaceChildren();
      return;
    }
    status.textContent = h.hosts.length ? "" : "no host has a rule or was limited in the last hour";
    const head = ["host", "rule", "rate now /s", "in flight", "waiting", "paused until", "429s"];
    const rows = h.hosts.map((x) => [x.host, ruleText(x.rule), x.rate_now, x.in_flight, x.waiting,
      x.paused_until ? new Date(x.paused_until * 1000).toLocaleTimeString() : "–", x.answers_429]);
    table.replaceChildren(el("thead", {}, el("tr", {}, ...head.map((c) => el("th", {}, c)))),
      el("tbody", {}, ...rows.map((cells, i) => el("tr", { "data-host": h.hosts[i].host },
        ...cells.map((c, j) => el("td", { "data-col": head[j] }, String(c)))))));
  } catch (error) {
    status.replaceChildren(el("span", { class: "bad" }, `host limits unavailable: ${error.message}`));
  }
}

function listen() {
  const stream = new EventSource("/api/events");
  stream.addEventListener("open", () => { $("#stream").textContent = "live updates on"; });
  stream.addEventListener("error", () => { $("#stream").textContent = "live updates lost; reconnecting…"; });
  stream.addEventListener("runs", (event) => {
    state.runs = JSON.parse(event.data);
    if (!state.a && state.runs.length) select("a", state.runs[0].run_id);
    renderRuns();
    followLive();
  });
  stream.addEventListener("run", (event) => {
    const doc = JSON.parse(event.data);
    state.docs[doc.run_id] = doc;
    if (doc.run_id === state.a || doc.run_id === state.b) renderPanes();
  });
}

function start() {
  const query = new URLSearchParams(location.search);
  state.a = query.get("run");
  state.b = query.get("compare");
  state.follow = !state.a;
  $("#follow").checked = state.follow;
  $("#follow").addEventListener("change", (event) => { state.follow = event.target.checked; followLive(); });
  if (state.a) select("a", state.a);
  if (state.b) select("b", state.b);
  listen();
  refreshCluster();
  setInterval(refreshCluster, 10000);
  refreshHosts();
  setInterval(refreshHosts, 2000);
}

start();
