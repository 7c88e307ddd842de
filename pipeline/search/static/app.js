// The MusicFM catalog page. Vanilla JS, no dependencies. Every value from the store is put in the
// page with textContent / text nodes (never innerHTML): catalog metadata is untrusted.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { config: null, info: null, query: null, windowIx: null, blobUrl: null };

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function showError(message) {
  const box = $("error");
  if (!message) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = message;
  box.hidden = false;
}

function setStatus(text) { $("status").textContent = text || ""; }

// ---- requests (401 -> ask for the token, then retry once)

let tokenPromise = null;

function askToken() {
  if (tokenPromise) return tokenPromise;
  tokenPromise = new Promise((resolve) => {
    const dlg = $("token-dialog");
    const form = $("token-form");
    const onSubmit = async (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      const r = await fetch("/api/login", { method: "POST", headers: { Authorization: "Bearer " + token }, credentials: "same-origin" });
      if (r.ok) {
        form.removeEventListener("submit", onSubmit);
        $("token-error").hidden = true;
        dlg.close();
        tokenPromise = null;
        resolve();
      } else {
        $("token-error").textContent = "That token was refused.";
        $("token-error").hidden = false;
      }
    };
    form.addEventListener("submit", onSubmit);
    if (!dlg.open) dlg.showModal();
  });
  return tokenPromise;
}

async function api(path, options) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const r = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
    if (r.status === 401) { await askToken(); continue; }
    let doc = null;
    try { doc = await r.json(); } catch (e) { doc = null; }
    if (!r.ok) {
      const msg = doc && doc.error ? doc.error : `${r.status} ${r.statusText}`;
      throw new Error(msg);
    }
    return doc;
  }
  throw new Error("not authorized");
}

function guard(fn) {
  return async (...args) => {
    try { showError(null); return await fn(...args); }
    catch (e) { showError(e.message || String(e)); setStatus(""); }
  };
}

// ---- views

function showView(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === name);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + name;
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "map") loadMap();
  if (name === "duplicates") loadDuplicates();
  if (name === "runs") loadRuns();
}

function audioUrl(trackId, startS) {
  const base = "/audio/" + encodeURIComponent(trackId);
  return startS ? `${base}#t=${Number(startS).toFixed(2)}` : base;
}

function fmt(v, digits) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v === "number") return digits === undefined ? String(v) : v.toFixed(digits);
  return String(v);
}

// ---- find a track

let findTimer = null;
let findSeq = 0;

function onFindInput() {
  clearTimeout(findTimer);
  findTimer = setTimeout(guard(async () => {
    const q = $("find").value.trim();
    const list = $("find-results");
    const seq = ++findSeq;
    if (!q) { clear(list); return; }
    const doc = await api("/api/tracks?limit=15&q=" + encodeURIComponent(q));
    if (seq !== findSeq) return;
    clear(list);
    for (const t of doc.tracks) {
      const li = el("li", { "data-track-id": t.track_id },
        el("span", { class: "title", text: t.title || t.track_id }), " ",
        el("span", { class: "sub", text: [t.artist, t.track_id].filter(Boolean).join(" · ") }));
      li.addEventListener("click", () => { clear(list); $("find").value = t.title || t.track_id; selectTrack(t.track_id); });
      list.appendChild(li);
    }
    if (!doc.tracks.length) list.appendChild(el("li", { class: "muted", text: "no match" }));
  }), 120);
}

const selectTrack = guard(async (trackId) => {
  showView("search");
  const doc = await api("/api/track/" + encodeURIComponent(trackId));
  const t = doc.track;
  state.query = { kind: "track", trackId: t.track_id, windows: doc.windows };
  state.windowIx = null;
  if (state.blobUrl) { URL.revokeObjectURL(state.blobUrl); state.blobUrl = null; }
  const meta = $("query-meta");
  clear(meta);
  meta.appendChild(el("div", { class: "title", text: t.title || t.track_id }));
  meta.appendChild(el("div", { class: "sub", text: [t.artist, t.track_id, t.duration_s ? fmt(t.duration_s, 1) + " s" : null].filter(Boolean).join(" · ") }));
  $("query-audio").src = audioUrl(t.track_id);
  renderWindows();
  $("query").hidden = false;
  await runSimilar();
});

function renderWindows() {
  const box = $("window-buttons");
  clear(box);
  const q = state.query;
  const show = q && q.kind === "track" && $("level").value === "window" && q.windows && q.windows.length;
  $("windows").hidden = !show;
  if (!show) return;
  for (const w of q.windows) {
    const b = el("button", { type: "button", class: "small" + (state.windowIx === w.window_ix ? " active" : ""), "data-window-ix": w.window_ix,
      text: `${fmt(w.start_s, 1)}–${fmt(w.end_s, 1)} s` });
    b.addEventListener("click", () => {
      state.windowIx = w.window_ix;
      $("query-audio").currentTime = w.start_s || 0;
      renderWindows();
      runSimilar();
    });
    box.appendChild(b);
  }
}

function searchParams() {
  const p = new URLSearchParams();
  p.set("k", $("k").value || "10");
  if ($("layer").value) p.set("layer", $("layer").value);
  p.set("level", $("level").value);
  return p;
}

const runSimilar = guard(async () => {
  const q = state.query;
  if (!q || q.kind !== "track") return;
  const p = searchParams();
  let doc;
  setStatus("searching…");
  delete $("results").dataset.query;
  if ($("level").value === "window" && state.windowIx !== null) {
    p.set("window_ix", String(state.windowIx));
    p.delete("level");
    doc = await api("/api/passage/" + encodeURIComponent(q.trackId) + "?" + p.toString());
  } else {
    doc = await api("/similar/" + encodeURIComponent(q.trackId) + "?" + p.toString());
  }
  if (state.query !== q) return;  // another query started meanwhile
  renderResults(doc, q.trackId + (state.windowIx !== null ? "@" + state.windowIx : ""));
});

function renderResults(doc, queryKey) {
  const list = $("results");
  clear(list);
  list.dataset.query = queryKey;
  const how = doc.exact ? "exact" : (doc.index_type || "index");
  setStatus(`${doc.hits.length} results · layer ${doc.layer} · ${doc.level || "window"} level · ${how} · ${fmt(doc.elapsed_ms, 1)} ms`);
  for (const h of doc.hits) {
    const m = h.metadata || {};
    const offset = h.start_s !== undefined && h.start_s !== null;
    const info = el("div", {},
      el("div", { class: "title", text: m.title || h.track_id }),
      el("div", { class: "sub", text: [m.artist, h.track_id, m.duration_s ? fmt(m.duration_s, 1) + " s" : null].filter(Boolean).join(" · ") }),
      offset ? el("div", { class: "sub offset", text: `matching window ${fmt(h.start_s, 1)}–${fmt(h.end_s, 1)} s` }) : null);
    const player = el("audio", { controls: "", preload: "metadata", src: audioUrl(h.track_id, offset ? h.start_s : 0) });
    const again = el("button", { type: "button", class: "small", text: "Similar to this" });
    again.addEventListener("click", () => selectTrack(h.track_id));
    const li = el("li", { class: "hit", "data-track-id": h.track_id },
      el("span", { class: "rank", text: "#" + h.rank }),
      el("span", { class: "score", text: fmt(h.score, 4), title: "cosine similarity" }),
      info,
      el("div", {}, player, again));
    list.appendChild(li);
  }
}

// ---- upload a clip

const uploadClip = guard(async (file) => {
  if (!file) return;
  const limit = state.config ? state.config.max_upload_bytes : null;
  if (limit && file.size > limit) throw new Error(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB, over the limit of ${(limit / 2 ** 20).toFixed(1)} MiB`);
  showView("search");
  state.query = { kind: "upload", name: file.name };
  state.windowIx = null;
  if (state.blobUrl) URL.revokeObjectURL(state.blobUrl);
  state.blobUrl = URL.createObjectURL(file);
  const meta = $("query-meta");
  clear(meta);
  meta.appendChild(el("div", { class: "title", text: file.name }));
  meta.appendChild(el("div", { class: "sub", text: `uploaded clip · ${(file.size / 1024).toFixed(0)} KiB` }));
  $("query-audio").src = state.blobUrl;
  $("windows").hidden = true;
  $("query").hidden = false;
  setStatus("embedding the clip…");
  clear($("results"));
  delete $("results").dataset.query;
  const p = searchParams();
  p.set("filename", file.name);
  const doc = await api("/api/upload?" + p.toString(), {
    method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
  });
  renderResults(doc, "upload:" + file.name);
});

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) uploadClip(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) uploadClip($("file").files[0]); });
}

// ---- map

const PALETTE = ["#2a62c9", "#d2553b", "#2e9a57", "#9a4fc4", "#d39b1f", "#1f9aa8", "#c4467f", "#6b7a1f", "#7d5a3c", "#5c6b7d"];

const loadMap = guard(async () => {
  const color = $("map-color").value;
  const doc = await api("/api/map" + (color ? "?color_by=" + encodeURIComponent(color) : ""));
  const box = $("map");
  clear(box);
  clear($("map-legend"));
  $("map-hint").hidden = doc.available;
  if (!doc.available) { $("map-hint").textContent = doc.hint; return; }
  const sel = $("map-color");
  if (!sel.options.length) for (const c of doc.colorable) sel.appendChild(el("option", { value: c, text: c }));
  if (doc.color_by) sel.value = doc.color_by;
  const W = 760, H = 480, pad = 20;
  const xs = doc.points.map((p) => p.map_x), ys = doc.points.map((p) => p.map_y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (W - 2 * pad) * (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5);
  const sy = (y) => H - pad - (H - 2 * pad) * (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5);
  const cats = new Map();
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  for (const p of doc.points) {
    const key = doc.color_by ? String(p[doc.color_by] ?? "") : "";
    if (!cats.has(key)) cats.set(key, PALETTE[cats.size % PALETTE.length]);
    const c = svg("circle", { cx: sx(p.map_x).toFixed(1), cy: sy(p.map_y).toFixed(1), r: 5, fill: cats.get(key), "fill-opacity": 0.8, "data-track-id": p.track_id });
    c.appendChild(svg("title", {}, [p.title || p.track_id, p.artist, key].filter(Boolean).join(" · ")));
    c.addEventListener("click", () => selectTrack(p.track_id));
    root.appendChild(c);
  }
  box.appendChild(root);
  for (const [k, c] of cats) {
    const sw = el("span", { class: "swatch" });
    sw.style.background = c;
    $("map-legend").appendChild(el("span", {}, sw, k || "(none)"));
  }
});

// ---- duplicates

const loadDuplicates = guard(async () => {
  const doc = await api("/api/duplicates");
  $("dup-hint").hidden = doc.available;
  $("dup-table").hidden = !doc.available;
  if (!doc.available) { $("dup-hint").textContent = doc.hint; return; }
  const body = $("dup-table").tBodies[0];
  clear(body);
  for (const g of doc.groups) {
    for (const p of g.pairs) {
      const tr = el("tr", { class: "clickable" },
        el("td", { text: fmt(g.group_id) }), el("td", { text: p.track_id }), el("td", { text: p.title || "" }),
        el("td", { text: p.match_track_id }), el("td", { text: p.match_title || "" }), el("td", { class: "num", text: fmt(p.score, 4) }));
      tr.addEventListener("click", () => selectTrack(p.track_id));
      body.appendChild(tr);
    }
  }
});

// ---- runs and errors

function statusCell(s) { return el("td", { class: "status-" + s, text: s }); }

function kv(obj, digits) {
  if (!obj) return "";
  return Object.entries(obj).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(digits) : v}`).join(", ");
}

function runsChart(runs) {
  const box = $("runs-chart");
  clear(box);
  const shown = runs.slice(0, 30).reverse();
  if (!shown.length) { box.appendChild(el("p", { class: "muted", text: "no runs recorded" })); return; }
  const W = 760, H = 160, pad = 28, bw = Math.max(6, Math.min(40, (W - 2 * pad) / shown.length - 4));
  const max = Math.max(1, ...shown.map((r) => r.x_realtime || 0));
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "× realtime per run" });
  root.appendChild(svg("text", { x: pad, y: 14, "font-size": 12 }, `× realtime per run (max ${max.toFixed(1)})`));
  shown.forEach((r, i) => {
    const h = ((r.x_realtime || 0) / max) * (H - 2 * pad);
    const x = pad + i * (bw + 4);
    const bar = svg("rect", { x, y: H - pad - h, width: bw, height: Math.max(1, h), fill: r.status === "ok" ? "#2e9a57" : "#b3261e", "data-run-id": r.run_id });
    bar.appendChild(svg("title", {}, `${r.run_id} · ${r.kind} · ${r.status} · ${fmt(r.x_realtime, 1)}× realtime`));
    root.appendChild(bar);
  });
  root.appendChild(svg("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, stroke: "#999" }));
  box.appendChild(root);
}

const loadRuns = guard(async () => {
  const doc = await api("/api/runs");
  runsChart(doc.runs);
  const body = $("runs-table").tBodies[0];
  clear(body);
  for (const r of doc.runs) {
    const tr = el("tr", { class: "clickable", "data-run-id": r.run_id },
      el("td", { text: r.run_id }), el("td", { text: r.kind }), statusCell(r.status),
      el("td", { text: (r.started_at || "").replace("T", " ").slice(0, 19) }),
      el("td", { class: "num", text: fmt(r.tracks_ok) }), el("td", { class: "num", text: fmt(r.tracks_failed) }),
      el("td", { class: "num", text: fmt(r.windows) }), el("td", { class: "num", text: fmt(r.audio_hours, 3) }),
      el("td", { class: "num", text: fmt(r.x_realtime, 1) }), el("td", { class: "num", text: fmt(r.wall_s, 1) }),
      el("td", { text: kv(r.errors_by_type) }), el("td", { text: kv(r.stage_times, 1) }));
    tr.addEventListener("click", () => showErrors(r.run_id));
    body.appendChild(tr);
  }
});

let errorsRun = null;
let errorsTimer = null;

function showErrors(runId) {
  errorsRun = runId;
  $("errors-run").textContent = runId;
  $("run-errors").hidden = false;
  loadErrors(true);
}

const loadErrors = guard(async (resetStages) => {
  const p = new URLSearchParams({ run_id: errorsRun || "" });
  if ($("errors-filter").value) p.set("q", $("errors-filter").value);
  if ($("errors-stage").value && !resetStages) p.set("stage", $("errors-stage").value);
  const doc = await api("/api/errors?" + p.toString());
  if (resetStages) {
    const sel = $("errors-stage");
    while (sel.options.length > 1) sel.remove(1);
    for (const s of doc.stages) sel.appendChild(el("option", { value: s, text: s }));
  }
  $("errors-count").textContent = `${doc.total} errors`;
  const body = $("errors-table").tBodies[0];
  clear(body);
  for (const e of doc.errors) {
    body.appendChild(el("tr", {}, el("td", { text: e.track_id || "" }), el("td", { text: e.stage }), el("td", { text: e.error_type }),
      el("td", { text: e.message }), el("td", { text: e.uri || "" })));
  }
});

// ---- start

const init = guard(async () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showView(b.dataset.view));
  $("find").addEventListener("input", onFindInput);
  $("level").addEventListener("change", () => { state.windowIx = null; renderWindows(); runSimilar(); });
  $("layer").addEventListener("change", () => runSimilar());
  $("map-color").addEventListener("change", () => loadMap());
  $("errors-filter").addEventListener("input", () => { clearTimeout(errorsTimer); errorsTimer = setTimeout(() => loadErrors(false), 150); });
  $("errors-stage").addEventListener("change", () => loadErrors(false));
  setupDrop();
  state.config = await api("/api/config");
  state.info = await api("/info");
  const sel = $("layer");
  for (const ix of state.info.layers) sel.appendChild(el("option", { value: ix, text: String(ix) }));
  if (state.info.layers.length) sel.value = String(Math.max(...state.info.layers));
  $("store-info").textContent = `${state.info.num_tracks} tracks · model ${state.info.model_id || "mixed"}`;
  $("upload-limit").textContent = `up to ${(state.config.max_upload_bytes / 2 ** 20).toFixed(0)} MiB`;
  const view = (location.hash || "#search").slice(1);
  showView(["search", "map", "duplicates", "runs"].includes(view) ? view : "search");
  document.body.dataset.ready = "1";
});

document.addEventListener("DOMContentLoaded", init);
