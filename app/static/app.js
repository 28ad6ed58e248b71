// mtl-jobs dashboard: a jobs list, a submit form and a live job page; a studies list, a study
// submit form and a live study page. Plain ES module, no build step; charts with the vendored
// uPlot. Talks only to the service's own /v1 API. No inline styles in new markup: dynamic widths
// are set through the CSSOM (`el.style`), which a strict CSP allows.

const view = document.getElementById("view");
const keyInput = document.getElementById("api-key");
// The key lives in this tab's sessionStorage (gone when the tab closes); "remember" keeps it
// in localStorage too, for the next visit. Other origins cannot read either (the CSP allows
// no script but the app's own).
const KEY = "mtl-api-key";
const rememberBox = document.getElementById("remember-key");
const apiKey = () => sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
keyInput.value = apiKey();
rememberBox.checked = localStorage.getItem(KEY) !== null;
function storeKey() {
  const key = keyInput.value.trim();
  const changed = key !== apiKey();
  sessionStorage.setItem(KEY, key);
  if (rememberBox.checked) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
  if (changed) route();
}
keyInput.addEventListener("change", storeKey);
rememberBox.addEventListener("change", storeKey);

// ------------------------------------------------------------------------------ helpers

const h = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the strict CSP
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
};
const fmt = (x, d = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(d) : "–");
const duration = (s) => {
  if (typeof s !== "number" || !isFinite(s)) return "–";
  s = Math.round(s);
  const m = Math.floor(s / 60), r = s % 60;
  return m ? `${m}m ${String(r).padStart(2, "0")}s` : `${r}s`;
};
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function toast(message, bad = false) {
  const box = document.getElementById("toast");
  const el = h("div", { class: bad ? "msg bad" : "msg" }, message);
  box.append(el);
  setTimeout(() => el.remove(), 6000);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch { data = null; }
  if (!res.ok) throw new ApiError(res.status, data && data.detail !== undefined ? data.detail : data);
  return data;
}

// Server-sent events over fetch (EventSource cannot send an Authorization header). Reconnects
// with Last-Event-ID after a dropped connection or an `error` event (the service lost its
// Redis), so nothing is missed or repeated.
async function streamEvents(path, onEvent, signal) {
  let lastId = null, failures = 0;
  while (!signal.aborted) {
    try {
      const res = await fetch(path, {
        headers: headers(lastId ? { "Last-Event-ID": lastId } : {}), signal,
      });
      if (!res.ok) throw new ApiError(res.status, (await res.json().catch(() => ({}))).detail);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const ev = { id: null, event: "message", data: "" };
          for (const line of block.split(/\r?\n/)) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (field === "id") ev.id = val;
            else if (field === "event") ev.event = val;
            else if (field === "data") ev.data += (ev.data ? "\n" : "") + val;
          }
          if (ev.id === null && ev.event === "message" && !ev.data) continue;
          const payload = ev.data ? JSON.parse(ev.data) : {};
          // the service lost its Redis: reconnect with Last-Event-ID (after a pause)
          if (ev.event === "error") throw new ApiError(503, payload.detail);
          if (ev.id) lastId = ev.id;
          failures = 0;
          if (ev.event === "end") { onEvent({ type: "end", data: payload }); return; }
          onEvent(payload);
        }
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status < 500) { toast(`events: ${err.message}`, true); return; }
    }
    failures += 1;
    await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** failures, 5000)));
  }
}

// ------------------------------------------------------------------------------ router

let current = new AbortController();
function route() {
  current.abort();
  current = new AbortController();
  const signal = current.signal;
  const hash = location.hash || "#/";
  view.replaceChildren();
  const m = hash.match(/^#\/jobs\/([\w-]+)$/);
  if (m) return jobPage(m[1], signal);
  if (hash === "#/submit") return submitPage(signal);
  if (hash === "#/studies") return studiesPage(signal);
  if (hash === "#/studies/new") return studySubmitPage(signal);
  const st = hash.match(/^#\/studies\/([\w-]+)$/);
  if (st) return studyPage(st[1], signal);
  return jobsPage(signal);
}
window.addEventListener("hashchange", route);

// ------------------------------------------------------------------------------ jobs list

function latestSummary(job) {
  const parts = [];
  for (const [task, splits] of Object.entries(job.latest_metrics || {})) {
    const v = splits.validation, t = splits.train;
    const bits = [];
    if (t) bits.push(`loss ${fmt(t.loss)}`);
    if (v && v.macro_f1 !== undefined) bits.push(`val F1 ${fmt(v.macro_f1)}`);
    else if (t && t.accuracy !== undefined) bits.push(`acc ${fmt(t.accuracy)}`);
    parts.push(h("div", {}, h("b", {}, task), " ", bits.join(", ")));
  }
  return parts;
}

function progressCell(job) {
  const p = job.progress || {};
  const frac = p.total_steps ? Math.min(1, (p.step || 0) / p.total_steps) : 0;
  const eta = !TERMINAL.has(job.state) && p.eta ? ` · ETA ${duration(p.eta)}` : "";
  return h("td", {},
    h("div", { class: "bar" }, h("span", { style: `width:${(100 * frac).toFixed(1)}%` })),
    h("div", { class: "muted" }, `${p.step || 0}/${p.total_steps || "?"}${eta}`));
}

function jobsPage(signal) {
  const body = h("tbody");
  const total = h("span", { class: "muted" });
  view.append(
    h("div", { class: "row" }, h("h1", {}, "Jobs"), total,
      h("a", { href: "#/submit", style: "margin-left:auto" }, h("button", { class: "primary" }, "New job"))),
    h("div", { class: "card" }, h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["Job", "Name", "State", "Progress", "Latest per task"].map((t) => h("th", {}, t)))),
      body)));
  const refresh = async () => {
    try {
      const page = await api("/v1/jobs?limit=100", { signal });
      total.textContent = `${page.total} job${page.total === 1 ? "" : "s"}`;
      body.replaceChildren(...page.items.map((job) =>
        h("tr", { "data-job": job.id },
          h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
          h("td", {}, job.name || ""),
          h("td", {}, h("span", { class: `state ${job.state}` }, job.state),
            job.queue_position ? h("div", { class: "muted", title: job.queued_reason || "" }, `queue #${job.queue_position}`) : null),
          progressCell(job),
          h("td", {}, latestSummary(job)))));
      if (!page.items.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No jobs yet.")));
    } catch (err) {
      if (!signal.aborted) toast(`jobs: ${err.message}`, true);
    }
  };
  refresh();
  const timer = setInterval(refresh, 2000);
  signal.addEventListener("abort", () => clearInterval(timer));
}

// ------------------------------------------------------------------------------ submit

// Pretty-print JSON and remember the line of every path, so errors show beside their field.
function layout(value) {
  const lines = [], where = new Map();
  const walk = (v, path, indent, prefix, comma) => {
    const pad = "  ".repeat(indent);
    where.set(path.join("."), lines.length);
    if (v && typeof v === "object") {
      const isArr = Array.isArray(v);
      const entries = isArr ? v.map((x, i) => [i, x]) : Object.entries(v);
      if (!entries.length) { lines.push(`${pad}${prefix}${isArr ? "[]" : "{}"}${comma}`); return; }
      lines.push(`${pad}${prefix}${isArr ? "[" : "{"}`);
      entries.forEach(([k, x], i) => {
        const p = isArr ? "" : `${JSON.stringify(k)}: `;
        walk(x, [...path, String(k)], indent + 1, p, i < entries.length - 1 ? "," : "");
      });
      lines.push(`${pad}${isArr ? "]" : "}"}${comma}`);
    } else {
      lines.push(`${pad}${prefix}${JSON.stringify(v)}${comma}`);
    }
  };
  walk(value, [], 0, "", "");
  return { lines, where };
}

// The line of the deepest existing prefix of a validation error's `loc`.
function lineOf(loc, value, where) {
  const path = [];
  let node = value, best = where.get("");
  for (const part of loc) {
    if (part === "body") continue;
    if (node && typeof node === "object" && Object.prototype.hasOwnProperty.call(node, part)) {
      path.push(String(part));
      node = node[part];
      if (where.has(path.join("."))) best = where.get(path.join("."));
    }
  }
  return best;
}

function showErrors(target, value, detail) {
  target.replaceChildren();
  if (!Array.isArray(detail)) {
    target.append(h("ul", { class: "errors" }, h("li", {}, String(detail))));
    return;
  }
  const { lines, where } = layout(value);
  const notes = new Map();
  const list = h("ul", { class: "errors" });
  for (const err of detail) {
    const loc = (err.loc || []).filter((p) => p !== "body");
    const line = lineOf(loc, value, where);
    if (!notes.has(line)) notes.set(line, []);
    notes.get(line).push(`${loc.join(".")}: ${err.msg}`);
    list.append(h("li", { "data-loc": loc.join(".") }, h("b", {}, loc.join(".") || "(body)"), ` ${err.msg}`));
  }
  const pre = h("div", { class: "annotated", id: "annotated" });
  lines.forEach((text, i) => {
    const msgs = notes.get(i);
    pre.append(h("div", { class: msgs ? "err-line" : "" }, text,
      msgs ? h("span", { class: "err-msg" }, "← " + msgs.join("; ")) : null));
  });
  target.append(list, pre);
}

async function submitPage(signal) {
  const select = h("select", { id: "example" });
  const editor = h("textarea", { id: "config", spellcheck: "false" });
  const name = h("input", { type: "text", id: "job-name", placeholder: "optional name" });
  const errors = h("div", { id: "errors" });
  const parse = () => {
    try { return JSON.parse(editor.value); } catch (e) {
      errors.replaceChildren(h("ul", { class: "errors" }, h("li", {}, `not valid JSON: ${e.message}`)));
      return null;
    }
  };
  const validate = async () => {
    const value = parse();
    if (!value) return;
    try {
      await api("/v1/configs/validate", { method: "POST", body: value, signal });
      errors.replaceChildren(h("p", { class: "muted", id: "valid" }, "✓ valid"));
    } catch (err) {
      if (err.status === 422) showErrors(errors, value, err.detail); else toast(err.message, true);
    }
  };
  const submit = async () => {
    const value = parse();
    if (!value) return;
    if (name.value.trim()) value.name = name.value.trim();
    try {
      const job = await api("/v1/jobs", { method: "POST", body: value, signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (err.status === 422) showErrors(errors, value, err.detail);
      else errors.replaceChildren(h("ul", { class: "errors" }, h("li", {}, err.message)));
    }
  };
  view.append(h("h1", {}, "New job"), h("div", { class: "card" },
    h("div", { class: "row" }, h("label", {}, "Example ", select), h("label", { style: "flex:1" }, name)),
    h("p", { class: "muted" }, "The training config (the schema `mtl train` reads). Data: `kind: dummy`, or files uploaded with POST /v1/datasets, named as `dataset:<id>`."),
    h("div", { class: "editor" }, editor),
    h("div", { class: "row", style: "margin-top:.6rem" },
      h("button", { onclick: validate, id: "validate" }, "Validate"),
      h("button", { class: "primary", onclick: submit, id: "submit" }, "Submit")),
    errors));
  try {
    const examples = await api("/v1/configs/examples", { signal });
    for (const ex of examples) select.append(h("option", { value: ex.name }, ex.summary));
    const pick = () => {
      const ex = examples.find((e) => e.name === select.value);
      editor.value = JSON.stringify(ex.config, null, 2);
      errors.replaceChildren();
    };
    select.addEventListener("change", pick);
    if (examples.length) pick();
  } catch (err) {
    if (!signal.aborted) toast(`examples: ${err.message}`, true);
  }
}

// ------------------------------------------------------------------------------ job page

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

// A uPlot line chart as wide as its element: `chartResizer` calls `fit` whenever the element's
// width changes (window resize, layout), so charts always use the page's width.
// Options: `xLabel` (the x series' name), `xIncrs` (allowed x tick steps, e.g. whole numbers),
// `xPad` (room either side of the first and last x), `series` (per-series uPlot options merged
// over the defaults, by index).
class LineChart {
  constructor(title, seriesNames, height = 170, { xLabel = "step", xIncrs, xPad, series = [] } = {}) {
    this.names = seriesNames;
    this.height = height;
    this.width = 600; // until the first layout tells the real width
    this.points = new Map(); // x -> array of y per series
    this.el = h("div", { class: "chart", "data-chart": title }, h("div", { class: "title" }, title));
    this.plot = new uPlot({
      width: this.width, height, legend: { show: true },
      scales: { x: { time: false, ...(xPad ? { range: (u, min, max) => [min - xPad, max + xPad] } : {}) } },
      axes: [{ size: 30, ...(xIncrs ? { incrs: xIncrs } : {}) }, { size: 50 }],
      series: [{ label: xLabel }, ...seriesNames.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { show: false }, ...(series[i] || {}) }))],
    }, [[], ...seriesNames.map(() => [])], this.el);
  }
  clear() { this.points.clear(); }
  fit(width) {
    const w = Math.floor(width);
    if (w > 0 && w !== this.width) {
      this.width = w;
      this.plot.setSize({ width: w, height: this.height });
    }
  }
  set(x, name, y) {
    const i = this.names.indexOf(name);
    if (i < 0 || typeof y !== "number") return;
    if (!this.points.has(x)) this.points.set(x, this.names.map(() => null));
    this.points.get(x)[i] = y;
  }
  get count() { return this.points.size; }
  draw() {
    const xs = [...this.points.keys()].sort((a, b) => a - b);
    this.el.dataset.points = String(xs.length);
    this.plot.setData([xs, ...this.names.map((_, i) => xs.map((x) => this.points.get(x)[i]))]);
  }
}

// One ResizeObserver for a page's charts, disconnected when the page goes away (`signal`).
function chartResizer(signal) {
  const byEl = new Map();
  const observer = new ResizeObserver((entries) => {
    for (const entry of entries) byEl.get(entry.target)?.fit(entry.contentRect.width);
  });
  signal.addEventListener("abort", () => observer.disconnect());
  return (chart) => { byEl.set(chart.el, chart); observer.observe(chart.el); return chart; };
}

const SPLITS = ["validation", "test"];
const SCORES = [["accuracy", "accuracy"], ["macro_f1", "macro-F1"], ["weighted_f1", "weighted-F1"]];

// The exported model's scores (`final_metrics`): a row per task and their mean, a column group
// per split (validation, and test when the data has a test split).
function finalScoresTable(final, taskNames) {
  const splits = SPLITS.filter((s) => final && final[s] && final[s].tasks);
  if (!splits.length) return null;
  const names = [...taskNames];
  for (const s of splits) for (const t of Object.keys(final[s].tasks)) if (!names.includes(t)) names.push(t);
  const cell = (split, task, scores, [key]) => h("td", { class: "num", "data-split": split, "data-task": task, "data-metric": key }, fmt(scores && scores[key]));
  const row = (task, label, pick, cls) => h("tr", { class: cls, "data-row": task }, h("th", { scope: "row" }, label),
    splits.flatMap((s) => SCORES.map((m) => cell(s, task, pick(final[s]), m))));
  return h("table", { class: "scores", id: "final-scores-table" },
    h("thead", {},
      h("tr", {}, h("th", {}), splits.map((s) => h("th", { colspan: SCORES.length, class: "split" }, s))),
      h("tr", {}, h("th", {}, "task"), splits.flatMap(() => SCORES.map(([, label]) => h("th", { class: "num" }, label))))),
    h("tbody", {},
      names.map((t) => row(t, t, (r) => r.tasks[t], "")),
      row("mean", "mean", (r) => r.mean, "mean")));
}

function confusionTable(labels, matrix) {
  const max = Math.max(1, ...matrix.flat());
  return h("table", { class: "cm" },
    h("tr", {}, h("th", {}, "true ↓ / pred →"), labels.map((l) => h("th", { class: "rot" }, l))),
    matrix.map((row, i) => h("tr", {}, h("th", { class: "rot" }, labels[i]),
      row.map((n) => h("td", { style: `background: rgba(37,99,235,${(0.85 * n / max).toFixed(3)}); color:${n / max > 0.55 ? "#fff" : "inherit"}` }, n)))));
}

async function jobPage(id, signal) {
  let job;
  try { job = await api(`/v1/jobs/${id}`, { signal }); } catch (err) {
    view.append(h("h1", {}, `Job ${id}`), h("p", { class: "error-reason" }, err.status === 404 ? "No such job (for this API key)." : err.message));
    return;
  }
  const tasks = Object.keys(job.latest_metrics || {});
  const config = await api(`/v1/jobs/${id}/config`, { signal }).catch(() => null);
  const taskNames = config && config.tasks ? config.tasks.map((t) => t.name) : tasks;

  const header = h("div", { class: "card", id: "job-header" });
  const finalBox = h("div", { class: "card", id: "final-scores", hidden: true });
  const fit = chartResizer(signal);
  const charts = {};
  const tasksBox = h("div", { class: "tasks" });
  for (const task of taskNames) {
    charts[task] = {
      loss: fit(new LineChart(`${task}: loss`, ["train", "validation"])),
      accuracy: fit(new LineChart(`${task}: accuracy`, ["train", "validation"])),
      macro_f1: fit(new LineChart(`${task}: macro-F1`, ["train", "validation"])),
      cm: h("div", { class: "cm-box", "data-cm": task }, h("p", { class: "muted" }, "confusion matrix: after the first evaluation")),
    };
    const c = charts[task];
    tasksBox.append(h("div", { class: "card task", "data-task": task }, h("h3", {}, task), c.loss.el, c.accuracy.el, c.macro_f1.el, c.cm));
  }
  const weights = fit(new LineChart("task weights", taskNames));
  const pairs = [];
  for (let i = 0; i < taskNames.length; i++) for (let j = i + 1; j < taskNames.length; j++) pairs.push(`${taskNames[i]}|${taskNames[j]}`);
  const cosine = fit(new LineChart("gradient cosine (conflict when < 0)", pairs.length ? pairs : ["(one task)"]));
  const predictIn = h("textarea", { id: "predict-texts", rows: 3, placeholder: "one text per line" });
  const predictOut = h("div", { id: "predict-out" });
  const doPredict = async () => {
    const texts = predictIn.value.split("\n").map((t) => t.trim()).filter(Boolean);
    if (!texts.length) return;
    try {
      const out = await api(`/v1/jobs/${id}/predict`, { method: "POST", body: { texts }, signal });
      const names = Object.keys(out.predictions[0] || {});
      predictOut.replaceChildren(h("table", {},
        h("tr", {}, h("th", {}, "text"), names.map((n) => h("th", {}, n))),
        out.predictions.map((p, i) => h("tr", {}, h("td", {}, texts[i]),
          names.map((n) => h("td", {}, `${p[n].label} (${fmt(p[n].probabilities[p[n].label], 2)})`))))));
    } catch (err) { predictOut.replaceChildren(h("p", { class: "error-reason" }, err.message)); }
  };
  view.append(header, finalBox, tasksBox,
    h("div", { class: "grid" }, h("div", { class: "card" }, weights.el), h("div", { class: "card" }, cosine.el)),
    h("div", { class: "card" }, h("h2", {}, "Predict"), predictIn,
      h("div", { class: "row", style: "margin-top:.5rem" }, h("button", { onclick: doPredict, id: "predict" }, "Predict")), predictOut));

  let finalShown = "";
  const renderFinal = () => {
    const key = JSON.stringify(job.final_metrics || null);
    if (key === finalShown) return;
    finalShown = key;
    const table = finalScoresTable(job.final_metrics, taskNames);
    finalBox.hidden = !table;
    finalBox.replaceChildren(...(table ? [
      h("h2", {}, "Final scores of the exported model"),
      table,
    ] : []));
  };

  const renderHeader = () => {
    const p = job.progress || {};
    const frac = p.total_steps ? Math.min(1, (p.step || 0) / p.total_steps) : 0;
    const cancel = h("button", { class: "danger", id: "cancel", disabled: TERMINAL.has(job.state) || job.state === "cancelling" ? true : undefined, onclick: async () => {
      try { const r = await api(`/v1/jobs/${id}/cancel`, { method: "POST", signal }); job.state = r.state; renderHeader(); }
      catch (err) { toast(err.message, true); }
    } }, "Cancel");
    const download = h("button", { id: "download", disabled: job.state !== "succeeded" ? true : undefined, onclick: async () => {
      const res = await fetch(`/v1/jobs/${id}/model`, { headers: headers() });
      if (!res.ok) { toast(`download: HTTP ${res.status}`, true); return; }
      const url = URL.createObjectURL(await res.blob());
      h("a", { href: url, download: `${id}-model.tar.gz` }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } }, "Download model");
    header.replaceChildren(
      h("div", { class: "row" }, h("h1", {}, job.name ? `${job.name} · ${id}` : id),
        h("span", { class: `state ${job.state}`, id: "job-state" }, job.state), h("span", { style: "margin-left:auto" }, cancel, " ", download)),
      h("div", { class: "bar" }, h("span", { style: `width:${(100 * frac).toFixed(1)}%` })),
      h("div", { class: "kv", style: "margin-top:.6rem" },
        h("div", {}, "step"), h("div", { id: "job-step" }, `${p.step || 0} / ${p.total_steps || "?"}`),
        h("div", {}, TERMINAL.has(job.state) ? "epochs done" : "epoch"),
        h("div", {}, p.epoch === null || p.epoch === undefined ? "–" : String(TERMINAL.has(job.state) ? p.epoch : p.epoch + 1)),
        h("div", {}, "elapsed"), h("div", {}, duration(p.elapsed)),
        h("div", {}, "ETA"), h("div", {}, TERMINAL.has(job.state) ? "–" : duration(p.eta)),
        h("div", {}, "attempt"), h("div", {}, `${job.attempt} of ${job.max_attempts}`),
        job.study_id ? h("div", {}, "study") : null,
        job.study_id ? h("div", {}, h("a", { href: `#/studies/${job.study_id}`, id: "job-study" }, job.study_id), job.trial !== null && job.trial !== undefined ? ` · trial ${job.trial}` : "") : null,
        job.error ? h("div", {}, "reason") : null, job.error ? h("div", { class: "error-reason" }, job.error) : null));
    renderFinal();
  };
  renderHeader();

  let dirty = false;
  const draw = () => {
    dirty = false;
    for (const c of Object.values(charts)) { c.loss.draw(); c.accuracy.draw(); c.macro_f1.draw(); }
    weights.draw(); cosine.draw();
  };
  const touch = () => { if (!dirty) { dirty = true; requestAnimationFrame(draw); } };
  const take = (ev) => {
    const d = ev.data || {};
    if (ev.type === "log") {
      for (const [task, m] of Object.entries(d.tasks || {})) {
        if (!charts[task]) continue;
        charts[task].loss.set(ev.step, "train", m.loss);
        charts[task].accuracy.set(ev.step, "train", m.accuracy);
        charts[task].macro_f1.set(ev.step, "train", m.macro_f1);
      }
      for (const [task, w] of Object.entries(d.weights || {})) weights.set(ev.step, task, w);
      for (const [pair, c] of Object.entries(d.grad_cosine || {})) cosine.set(ev.step, pair, c);
      touch();
    } else if (ev.type === "evaluate" && (d.split || "validation") === "validation") {
      for (const [task, m] of Object.entries(d.tasks || {})) {
        if (!charts[task]) continue;
        charts[task].loss.set(ev.step, "validation", m.loss);
        charts[task].accuracy.set(ev.step, "validation", m.accuracy);
        charts[task].macro_f1.set(ev.step, "validation", m.macro_f1);
        if (m.confusion_matrix) charts[task].cm.replaceChildren(h("div", { class: "title muted" }, `confusion matrix, validation at step ${ev.step}`), confusionTable(m.labels, m.confusion_matrix));
      }
      touch();
    } else if (ev.type === "state" && d.state) {
      job.state = d.state; renderHeader();
    } else if (ev.type === "end") {
      api(`/v1/jobs/${id}`, { signal }).then((j) => { job = j; renderHeader(); }).catch(() => {});
    }
  };
  try {
    const history = await api(`/v1/jobs/${id}/metrics`, { signal });
    for (const item of history.items) take(item);
  } catch (err) { if (!signal.aborted) toast(`metrics: ${err.message}`, true); }
  streamEvents(`/v1/jobs/${id}/events`, take, signal);
  const timer = setInterval(async () => {
    try { job = await api(`/v1/jobs/${id}`, { signal }); renderHeader(); } catch { /* next tick */ }
  }, 1500);
  signal.addEventListener("abort", () => clearInterval(timer));
}

// ------------------------------------------------------------------------------ studies

const STUDY_OVER = new Set(["succeeded", "failed", "cancelled"]);

// A study on the dummy data: a small search of the learning rate and the loss weighting; the
// best configuration is then trained on each task alone and with plain `sum` (the verdict).
const EXAMPLE_STUDY = {
  name: "dummy: learning rate and weighting",
  base: {
    encoder: {
      random_init: { hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, vocab_size: 30522, max_position_embeddings: 128 },
      max_length: 32,
    },
    tasks: [{ name: "task_a", num_classes: 5 }, { name: "task_b", num_classes: 3 }],
    data: { kind: "dummy", num_samples: 512, eval_samples: 128, seq_len: 32, learnable: true },
    optimizer: { name: "adam", lr: 0.002 },
    epochs: 2,
    batch_size: 32,
    eval_every: 8,
    log_every: 4,
  },
  search_space: [
    { path: "optimizer.lr", float: { low: 0.0005, high: 0.005, log: true } },
    { path: "weighting.name", choice: ["sum", "famo", "dwa"] },
  ],
  objective: { metric: "macro_f1" },
  budget: { trials: 6, parallel: 2 },
  sampler: "tpe",
  pruner: "median",
  baselines: { single_task: true, sum: true },
};

const signed = (x, d = 3, unit = "") => (typeof x === "number" && isFinite(x) ? `${x > 0 ? "+" : x < 0 ? "−" : "±"}${Math.abs(x).toFixed(d)}${unit}` : "–");
const signClass = (x) => (typeof x === "number" && x > 0 ? "pos" : typeof x === "number" && x < 0 ? "neg" : "");
const fmtParam = (v) => {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
  if (typeof v === "string") return v;
  return JSON.stringify(v);
};
const paramsText = (params) => Object.entries(params || {}).map(([k, v]) => `${k}=${fmtParam(v)}`).join(", ");

// A progress bar whose width is set through the CSSOM (no style attribute).
function progressBar(frac) {
  const fill = h("span");
  fill.style.width = `${(100 * Math.max(0, Math.min(1, frac))).toFixed(1)}%`;
  return h("div", { class: "bar" }, fill);
}

function studiesPage(signal) {
  const body = h("tbody");
  const total = h("span", { class: "muted" });
  view.append(
    h("div", { class: "row" }, h("h1", {}, "Studies"), total,
      h("a", { href: "#/studies/new", class: "push-right" }, h("button", { class: "primary", id: "new-study" }, "New study"))),
    h("div", { class: "card" }, h("table", { id: "studies" },
      h("thead", {}, h("tr", {}, ["Study", "Name", "State", "Trials", "Best", "Δ_MTL", "Created"].map((t) => h("th", {}, t)))),
      body)));
  const refresh = async () => {
    try {
      const page = await api("/v1/studies?limit=100", { signal });
      total.textContent = `${page.total} stud${page.total === 1 ? "y" : "ies"}`;
      body.replaceChildren(...page.items.map((s) => {
        const delta = s.verdict ? s.verdict.delta_mtl : null;
        return h("tr", { "data-study": s.id },
          h("td", {}, h("a", { href: `#/studies/${s.id}` }, s.id)),
          h("td", {}, s.name || ""),
          h("td", {}, h("span", { class: `state ${s.state}` }, s.state)),
          h("td", {}, progressBar(s.trials_planned ? s.trials_done / s.trials_planned : 0),
            h("div", { class: "muted" }, `${s.trials_done}/${s.trials_planned}${s.failures ? ` · ${s.failures} failed` : ""}`)),
          h("td", {}, s.best_value === null || s.best_value === undefined ? "–" : h("span", {}, h("b", {}, fmt(s.best_value)), h("span", { class: "muted" }, ` trial ${s.best_trial}`)),
            h("div", { class: "muted small" }, paramsText(s.best_params))),
          h("td", { class: `num ${signClass(delta)}` }, signed(delta, 2, " %")),
          h("td", { class: "muted" }, new Date(s.created_at * 1000).toLocaleString()));
      }));
      if (!page.items.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No studies yet.")));
    } catch (err) {
      if (!signal.aborted) toast(`studies: ${err.message}`, true);
    }
  };
  refresh();
  const timer = setInterval(refresh, 2000);
  signal.addEventListener("abort", () => clearInterval(timer));
}

function studySubmitPage(signal) {
  const editor = h("textarea", { id: "study-body", spellcheck: "false" });
  editor.value = JSON.stringify(EXAMPLE_STUDY, null, 2);
  const errors = h("div", { id: "study-errors" });
  const submit = async () => {
    let value;
    try { value = JSON.parse(editor.value); } catch (e) {
      errors.replaceChildren(h("ul", { class: "errors" }, h("li", {}, `not valid JSON: ${e.message}`)));
      return;
    }
    try {
      const study = await api("/v1/studies", { method: "POST", body: value, signal });
      location.hash = `#/studies/${study.id}`;
    } catch (err) {
      if (err.status === 422) showErrors(errors, value, err.detail);
      else errors.replaceChildren(h("ul", { class: "errors" }, h("li", {}, err.message)));
    }
  };
  view.append(h("h1", {}, "New study"), h("div", { class: "card" },
    h("p", { class: "muted" },
      "A study searches a space of training configs: `base` is a job's config, `search_space` lists config paths ",
      "(`optimizer.lr`, `weighting.name`, `tasks.<name>.<field>`) with a `float` or `int` range or a `choice`; ",
      "`objective` is scored on validation. Afterwards the best config is trained on each task alone and with plain `sum` ",
      "weighting: the multi-task verdict."),
    h("div", { class: "editor" }, editor),
    h("div", { class: "row spaced" },
      h("button", { class: "primary", onclick: submit, id: "study-submit" }, "Start study"),
      h("button", { id: "study-reset", onclick: () => { editor.value = JSON.stringify(EXAMPLE_STUDY, null, 2); errors.replaceChildren(); } }, "Reset to the example")),
    errors));
}

// The leaderboard's sort keys: trial number, objective value, state, or a parameter.
function sortValue(trial, key) {
  if (key === "number") return trial.number;
  if (key === "value") return trial.value;
  if (key === "state") return trial.state;
  if (key.startsWith("param:")) return (trial.params || {})[key.slice(6)];
  return null;
}

function compareValues(a, b, dir) {
  const na = a === null || a === undefined, nb = b === null || b === undefined;
  if (na || nb) return na && nb ? 0 : na ? 1 : -1; // missing values last, in either direction
  if (typeof a === "number" && typeof b === "number") return dir * (a - b);
  const sa = typeof a === "string" ? a : JSON.stringify(a), sb = typeof b === "string" ? b : JSON.stringify(b);
  return dir * sa.localeCompare(sb, undefined, { numeric: true });
}

async function studyPage(id, signal) {
  let study;
  try { study = await api(`/v1/studies/${id}`, { signal }); } catch (err) {
    view.append(h("h1", {}, `Study ${id}`), h("p", { class: "error-reason" }, err.status === 404 ? "No such study (for this API key)." : err.message));
    return;
  }
  const header = h("div", { class: "card", id: "study-header" });
  const fit = chartResizer(signal);
  const chart = fit(new LineChart("objective by trial", ["objective", "best so far"], 220, {
    xLabel: "trial",
    xIncrs: [1, 2, 5, 10, 20, 50, 100, 200, 500],
    xPad: 0.5,
    series: [
      { paths: () => null, points: { show: true, size: 8, fill: COLORS[0] } },
      { paths: uPlot.paths.stepped({ align: 1 }), stroke: COLORS[2], width: 2 },
    ],
  }));
  const importancesBox = h("div", { id: "importances" });
  const verdictBox = h("div", { class: "card", id: "verdict", hidden: true });
  const boardBox = h("div", { id: "leaderboard-box" });
  const baselinesBox = h("div", { class: "card", id: "baselines-box", hidden: true });
  const feed = h("ul", { class: "feed", id: "activity" });
  view.append(header, verdictBox,
    h("div", { class: "grid" },
      h("div", { class: "card" }, chart.el),
      h("div", { class: "card" }, h("h2", {}, "Parameter importances"), importancesBox)),
    h("div", { class: "card" }, h("h2", {}, "Leaderboard"),
      h("p", { class: "muted small" }, "Click a column to sort; again to reverse."), boardBox),
    baselinesBox,
    h("div", { class: "card" }, h("h2", {}, "Activity"), feed));

  const renderHeader = () => {
    const over = STUDY_OVER.has(study.state);
    const cancel = h("button", { class: "danger", id: "study-cancel", disabled: over || study.state === "cancelling" ? true : undefined, onclick: async () => {
      try { const r = await api(`/v1/studies/${id}/cancel`, { method: "POST", signal }); study.state = r.state; renderHeader(); }
      catch (err) { toast(err.message, true); }
    } }, "Cancel");
    const kv = [
      ["trials", h("span", { id: "study-trials" }, `${study.trials_done} / ${study.trials_planned} done`,
        study.trials_started > study.trials_done ? ` · ${study.trials_started - study.trials_done} running` : "",
        study.failures ? ` · ${study.failures} failed` : "")],
      ["best", study.best_trial === null || study.best_trial === undefined ? "–"
        : h("span", { id: "study-best" }, h("b", {}, fmt(study.best_value)), ` (trial ${study.best_trial})`)],
      ["best parameters", h("span", { id: "study-best-params" }, paramsText(study.best_params) || "–")],
      ["model", study.model_job ? h("a", { href: `#/jobs/${study.model_job}` }, study.model_job) : "–"],
      ["elapsed", duration(study.started_at ? (study.finished_at || Date.now() / 1000) - study.started_at : null)],
    ];
    if (study.error) kv.push(["reason", h("span", { class: "error-reason" }, study.error)]);
    header.replaceChildren(
      h("div", { class: "row" }, h("h1", {}, study.name ? `${study.name} · ${id}` : id),
        h("span", { class: `state ${study.state}`, id: "study-state" }, study.state),
        h("span", { class: "push-right" }, cancel)),
      progressBar(study.trials_planned ? study.trials_done / study.trials_planned : 0),
      h("div", { class: "kv spaced" }, kv.flatMap(([k, v]) => [h("div", {}, k), h("div", {}, v)])));
  };

  // objective per trial number, and the best so far in trial order (the direction: the study's
  // best value is the highest of the completed values when it maximises)
  const renderChart = () => {
    const done = study.trials.filter((t) => t.kind === "search" && t.state === "complete" && typeof t.value === "number")
      .sort((a, b) => a.number - b.number);
    const maximize = study.best_value === null || study.best_value === undefined || done.every((t) => t.value <= study.best_value);
    chart.clear();
    let best = null;
    for (const t of done) {
      best = best === null ? t.value : maximize ? Math.max(best, t.value) : Math.min(best, t.value);
      chart.set(t.number, "objective", t.value);
      chart.set(t.number, "best so far", best);
    }
    chart.draw();
  };

  const renderImportances = () => {
    const entries = Object.entries(study.importances || {}).sort((a, b) => b[1] - a[1]);
    if (!entries.length) {
      importancesBox.replaceChildren(h("p", { class: "muted" }, STUDY_OVER.has(study.state) || study.state === "baselines"
        ? "None: too few completed trials, or nothing varied." : "After the search (at least two completed trials that differ)."));
      return;
    }
    const top = Math.max(...entries.map(([, v]) => v)) || 1;
    importancesBox.replaceChildren(h("div", { class: "bars" }, entries.map(([name, v]) => {
      const fill = h("span");
      fill.style.width = `${(100 * v / top).toFixed(1)}%`;
      return h("div", { class: "imp", "data-param": name },
        h("div", { class: "imp-name" }, name), h("div", { class: "imp-bar" }, fill), h("div", { class: "imp-value num" }, fmt(v)));
    })));
  };

  const renderVerdict = () => {
    const v = study.verdict;
    verdictBox.hidden = !v;
    if (!v) { verdictBox.replaceChildren(); return; }
    const cell = (task, key, value, text, cls = "") => h("td", { class: `num ${cls}`, "data-task": task, "data-col": key }, text === undefined ? fmt(value) : text);
    verdictBox.replaceChildren(
      h("h2", {}, "Multi-task verdict"),
      h("p", { class: "muted small" }, `${v.metric} on ${v.split}: the best trial (multi-task) against the same settings on each task alone (single-task) and with plain sum weighting.`),
      h("table", { class: "scores", id: "verdict-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "task"), ["multi-task", "single-task", "difference", "sum"].map((c) => h("th", { class: "num" }, c)))),
        h("tbody", {}, Object.entries(v.tasks).map(([task, t]) => h("tr", { "data-task": task },
          h("th", { scope: "row" }, task),
          cell(task, "multi_task", t.multi_task),
          cell(task, "single_task", t.single_task),
          cell(task, "difference", t.difference, signed(t.difference), signClass(t.difference)),
          cell(task, "sum", t.sum))))),
      h("p", { class: "delta" }, "Δ", h("sub", {}, "MTL"), " ",
        h("b", { id: "delta-mtl", class: signClass(v.delta_mtl) }, signed(v.delta_mtl, 2, " %")),
        h("span", { class: "muted" }, "  mean relative gain of the multi-task model over the single-task models",
          typeof v.delta_mtl === "number" ? (v.delta_mtl > 0 ? ": sharing helps" : v.delta_mtl < 0 ? ": sharing hurts" : "") : "")),
      v.objective_sum === null || v.objective_sum === undefined ? null
        : h("p", { class: "muted small", id: "objective-vs-sum" }, `objective (validation): best ${fmt(v.objective_best)}, plain sum ${fmt(v.objective_sum)}`));
  };

  // the leaderboard: the API's order (completed best first) until a header is clicked
  const sort = { key: null, dir: 1 };
  const jobLinks = (t) => t.jobs.flatMap((j, i) => [i ? " " : "", h("a", { href: `#/jobs/${j}`, class: "trial-job" }, j)]);
  const renderBoard = () => {
    const search = study.trials.filter((t) => t.kind === "search");
    const names = [];
    for (const t of search) for (const k of Object.keys(t.params || {})) if (!names.includes(k)) names.push(k);
    const spread = search.some((t) => typeof t.spread === "number");
    const rows = [...search];
    if (sort.key) rows.sort((a, b) => compareValues(sortValue(a, sort.key), sortValue(b, sort.key), sort.dir) || a.number - b.number);
    const th = (key, label, num = false) => {
      const active = sort.key === key;
      return h("th", {
        class: `sortable${num ? " num" : ""}${active ? " sorted" : ""}`, "data-sort": key, tabindex: 0,
        "aria-sort": active ? (sort.dir > 0 ? "ascending" : "descending") : "none",
        onclick: () => { sort.dir = sort.key === key ? -sort.dir : 1; sort.key = key; renderBoard(); },
        onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); e.target.click(); } },
      }, label, h("span", { class: "arrow" }, active ? (sort.dir > 0 ? " ▲" : " ▼") : ""));
    };
    boardBox.replaceChildren(h("table", { id: "leaderboard" },
      h("thead", {}, h("tr", {}, th("number", "#", true), th("state", "state"), th("value", "value", true),
        spread ? h("th", { class: "num" }, "± spread") : null,
        names.map((n) => th(`param:${n}`, n)), h("th", {}, "time"), h("th", {}, "jobs"))),
      h("tbody", {}, rows.length ? rows.map((t) => h("tr", { "data-trial": t.number, class: t.number === study.best_trial ? "best" : "" },
        h("td", { class: "num", "data-col": "number" }, String(t.number), t.number === study.best_trial ? h("span", { class: "star", title: "best" }, " ★") : null),
        h("td", { "data-col": "state" }, h("span", { class: `state ${t.state}` }, t.state)),
        h("td", { class: "num", "data-col": "value" }, fmt(t.value),
          t.value === null && typeof t.intermediate === "number" ? h("span", { class: "muted small" }, ` (${fmt(t.intermediate)} @ ${t.last_step})`) : null),
        spread ? h("td", { class: "num muted", "data-col": "spread" }, fmt(t.spread)) : null,
        names.map((n) => h("td", { "data-col": `param:${n}` }, n in (t.params || {}) ? fmtParam(t.params[n]) : "–")),
        h("td", { class: "muted" }, duration((t.finished_at || Date.now() / 1000) - t.started_at)),
        h("td", {}, jobLinks(t), t.error ? h("div", { class: "error-reason small" }, t.error) : null)))
        : h("tr", {}, h("td", { colspan: 5 + names.length, class: "muted" }, "No trial yet.")))));
  };

  const renderBaselines = () => {
    const rows = study.trials.filter((t) => t.kind === "baseline");
    baselinesBox.hidden = !rows.length;
    baselinesBox.replaceChildren(...(rows.length ? [
      h("h2", {}, "Baselines"),
      h("p", { class: "muted small" }, "The best parameters on each task alone (single:<task>) and with plain sum weighting (sum); the value is the objective on the tasks each one trains."),
      h("table", { id: "baselines" },
        h("thead", {}, h("tr", {}, ["baseline", "state", "value", "jobs"].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows.map((t) => h("tr", { "data-baseline": t.baseline },
          h("td", {}, t.baseline), h("td", {}, h("span", { class: `state ${t.state}` }, t.state)),
          h("td", { class: "num", "data-col": "value" }, fmt(t.value)), h("td", {}, jobLinks(t)))))),
    ] : []));
  };

  const render = () => { renderHeader(); renderChart(); renderImportances(); renderVerdict(); renderBoard(); renderBaselines(); };
  render();

  // live: every event of the study's stream (the same authenticated stream as a job's) refreshes
  // the study, at most a few times a second; the terminal state can reach the stream a moment
  // before the record is saved, so after `end` it reloads until the record says it is over
  let pending = null;
  const refresh = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      try { study = await api(`/v1/studies/${id}`, { signal }); render(); } catch { /* next event */ }
      pending = null;
    }, 250);
  };
  signal.addEventListener("abort", () => clearTimeout(pending));
  const note = (ev, text, cls = "") => {
    const when = typeof ev.time === "number" ? new Date(ev.time * 1000).toLocaleTimeString() : "";
    feed.prepend(h("li", { class: cls }, h("span", { class: "muted" }, when), " ", text));
    while (feed.children.length > 15) feed.lastChild.remove();
  };
  const who = (d) => (d.baseline ? `baseline ${d.baseline}` : `trial ${d.trial}`);
  const take = (ev) => {
    const d = ev.data || {};
    if (ev.type === "state") note(ev, `study ${d.state}${d.error ? `: ${d.error}` : ""}`);
    else if (ev.type === "best") note(ev, `new best: trial ${d.trial} = ${fmt(d.value)} (${paramsText(d.params)})`, "good");
    else if (ev.type === "trial" && d.event === "queued") note(ev, `${who(d)} started${d.params && !d.baseline ? ` (${paramsText(d.params)})` : ""}`);
    else if (ev.type === "trial" && d.event !== "reported") note(ev, `${who(d)} ${d.event}${typeof d.value === "number" ? `: ${fmt(d.value)}` : ""}${d.error ? ` (${d.error})` : ""}`, d.event === "failed" ? "bad" : "");
    if (ev.type === "end") settle(); else refresh();
  };
  const settle = async () => {
    for (let i = 0; i < 60 && !signal.aborted; i++) {
      try { study = await api(`/v1/studies/${id}`, { signal }); render(); } catch { /* retry */ }
      if (STUDY_OVER.has(study.state)) return;
      await new Promise((r) => setTimeout(r, 500));
    }
  };
  streamEvents(`/v1/studies/${id}/events`, take, signal);
  // the elapsed time and running trials' durations move on between events
  const timer = setInterval(() => { if (!STUDY_OVER.has(study.state)) refresh(); }, 3000);
  signal.addEventListener("abort", () => clearInterval(timer));
}

route();
