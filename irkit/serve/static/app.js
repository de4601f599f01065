// irkit web page: choose or drop a query image, optionally drag a crop box, search, show the
// ranked grid, toggle re-ranking, click a result to see the match explanation. Vanilla JS, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, box: null, drag: null, rerankAvailable: false, lastQuery: null };

function message(text, isError = false) {
  const el = $("message");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function errorText(resp) {
  try { const body = await resp.json(); return body.error || JSON.stringify(body); }
  catch (_) { return `${resp.status} ${resp.statusText}`; }
}

async function loadStats() {
  try {
    const resp = await fetch("/stats");
    if (!resp.ok) throw new Error(await errorText(resp));
    const s = await resp.json();
    $("stats").textContent = `${s.images} images · ${s.model} · dim ${s.dim}`;
    state.rerankAvailable = !!s.rerank_available;
    const rr = $("rerank");
    rr.disabled = !state.rerankAvailable;
    rr.parentElement.title = state.rerankAvailable ? "re-rank the shortlist with CVNet" : (s.rerank_reason || "");
    $("k").max = String(s.limits.max_k);
  } catch (err) { $("stats").textContent = `stats unavailable: ${err.message}`; }
}

// ---------------------------------------------------------------------------------- query image
function setFile(file) {
  if (!file) return;
  state.file = file;
  state.box = null;
  const img = $("preview");
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = URL.createObjectURL(file);
  img.onload = () => { $("stage").hidden = false; $("drop-hint").hidden = true; sizeOverlay(); search(); };
  img.onerror = () => message("the browser cannot display this file; the server will still check it", true);
  img.src = img.dataset.url;
  $("search").disabled = false;
  showBox();
}

function sizeOverlay() {
  const img = $("preview"), cv = $("overlay");
  cv.width = img.clientWidth; cv.height = img.clientHeight;
  cv.style.width = img.clientWidth + "px"; cv.style.height = img.clientHeight + "px";
  drawBox();
}

function toImage(x, y) {   // overlay (CSS px) -> natural image pixels
  const img = $("preview");
  const sx = img.naturalWidth / img.clientWidth, sy = img.naturalHeight / img.clientHeight;
  return [Math.max(0, Math.min(img.naturalWidth, x * sx)), Math.max(0, Math.min(img.naturalHeight, y * sy))];
}

function drawBox() {
  const img = $("preview"), cv = $("overlay"), ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  const b = state.drag ? state.drag : state.box;
  if (!b) return;
  const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
  const [x1, y1, x2, y2] = state.drag ? b : [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy];
  ctx.fillStyle = "rgba(0,0,0,.35)";
  ctx.fillRect(0, 0, cv.width, cv.height);
  ctx.clearRect(Math.min(x1, x2), Math.min(y1, y2), Math.abs(x2 - x1), Math.abs(y2 - y1));
  ctx.strokeStyle = "#ffd400"; ctx.lineWidth = 2;
  ctx.strokeRect(Math.min(x1, x2), Math.min(y1, y2), Math.abs(x2 - x1), Math.abs(y2 - y1));
}

function showBox() {
  $("box-info").textContent = state.box ? `crop box: ${state.box.map((v) => Math.round(v)).join(", ")}` : "";
}

function installBoxDrawing() {
  const cv = $("overlay");
  const pos = (ev) => { const r = cv.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; };
  cv.addEventListener("pointerdown", (ev) => { const [x, y] = pos(ev); state.drag = [x, y, x, y]; cv.setPointerCapture(ev.pointerId); });
  cv.addEventListener("pointermove", (ev) => { if (!state.drag) return; const [x, y] = pos(ev); state.drag[2] = x; state.drag[3] = y; drawBox(); });
  cv.addEventListener("pointerup", () => {
    if (!state.drag) return;
    const [x1, y1, x2, y2] = state.drag;
    state.drag = null;
    if (Math.abs(x2 - x1) < 4 || Math.abs(y2 - y1) < 4) { drawBox(); return; }
    const a = toImage(Math.min(x1, x2), Math.min(y1, y2)), b = toImage(Math.max(x1, x2), Math.max(y1, y2));
    state.box = [a[0], a[1], b[0], b[1]];
    drawBox(); showBox(); search();
  });
}

// ---------------------------------------------------------------------------------- search
function queryForm() {
  const form = new FormData();
  form.append("image", state.file, state.file.name || "query");
  if (state.box) form.append("box", state.box.map((v) => v.toFixed(1)).join(","));
  return form;
}

async function search() {
  if (!state.file) return;
  const form = queryForm();
  form.append("k", $("k").value || "12");
  form.append("rerank", $("rerank").checked ? "true" : "false");
  form.append("qe", $("qe").checked ? "true" : "false");
  message("searching…");
  $("search").disabled = true;
  try {
    const resp = await fetch("/search", { method: "POST", body: form });
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    render(body);
    message("");
  } catch (err) {
    message(err.message, true);
  } finally {
    $("search").disabled = false;
  }
}

function render(body) {
  const list = $("results");
  list.replaceChildren();
  const t = body.timings_ms || {};
  $("summary").textContent = `${body.results.length} results` + (body.reranked ? " · re-ranked" : "") +
    (body.qe ? " · query expansion" : "") + (t.total !== undefined ? ` · ${Math.round(t.total)} ms` : "");
  $("summary").dataset.reranked = body.reranked ? "true" : "false";
  for (const hit of body.results) {
    const li = document.createElement("li");
    li.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.thumbnail; img.alt = hit.id; img.loading = "lazy";
    const meta = document.createElement("div");
    const rank = document.createElement("span"); rank.className = "rank"; rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span"); score.className = "score"; score.textContent = hit.score.toFixed(4);
    const id = document.createElement("div"); id.className = "id"; id.textContent = hit.id;
    meta.append(rank, score, id);
    li.append(img, meta);
    li.title = body.reranked ? `global ${hit.global_score.toFixed(4)}` : "";
    li.addEventListener("click", () => explain(hit));
    list.append(li);
  }
}

// ---------------------------------------------------------------------------------- explanation
async function explain(hit) {
  const content = $("modal-content");
  content.replaceChildren();
  $("modal-title").textContent = `why ${hit.id} matches`;
  $("modal").hidden = false;
  const wait = document.createElement("p"); wait.textContent = "computing…"; content.append(wait);
  try {
    const resp = await fetch(hit.explain, { method: "POST", body: queryForm() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const url = URL.createObjectURL(await resp.blob());
    const img = document.createElement("img");
    img.id = "explain-image"; img.alt = `match explanation for ${hit.id}`; img.src = url;
    content.replaceChildren(img);
  } catch (err) {
    const p = document.createElement("p"); p.id = "explain-error"; p.textContent = err.message;
    content.replaceChildren(p);
  }
}

// ---------------------------------------------------------------------------------- wiring
function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => setFile(ev.target.files[0]));
  drop.addEventListener("click", (ev) => { if (!state.file && ev.target.id !== "file") $("file").click(); });
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file").click(); });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files.length) setFile(ev.dataTransfer.files[0]);
  });
  $("search").addEventListener("click", search);
  $("rerank").addEventListener("change", search);
  $("qe").addEventListener("change", search);
  $("clear-box").addEventListener("click", () => { state.box = null; drawBox(); showBox(); search(); });
  $("modal-close").addEventListener("click", () => { $("modal").hidden = true; });
  $("modal").addEventListener("click", (ev) => { if (ev.target.id === "modal") $("modal").hidden = true; });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") $("modal").hidden = true; });
  window.addEventListener("resize", () => { if (state.file) sizeOverlay(); });
  installBoxDrawing();
  loadStats();
}

document.addEventListener("DOMContentLoaded", init);
