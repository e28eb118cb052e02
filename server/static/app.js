// vpt-serve playground: plain JS over the REST API (docs/api.md), no build step.
// The page itself needs no key; every API call carries the key the user typed (kept in localStorage).
// Server strings (labels, task names) are only ever set with textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "vpt.apiKey";
const TASK_STORAGE = "vpt.task";

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  task: localStorage.getItem(TASK_STORAGE) || null,
  lastImage: null, // the File last classified, re-run when top-k changes
  version: null, // the server's version, once connected
};

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------------------------------- API
class ApiError extends Error {
  constructor(status, type, message) {
    super(`${status} ${type}: ${message}`);
    this.status = status;
    this.type = type;
    this.detail = message; // the server's sentence alone
  }
}

async function api(method, path, { body, contentType } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (contentType) headers["Content-Type"] = contentType;
  const started = performance.now();
  let resp;
  try {
    resp = await fetch(path, { method, body, headers });
  } catch (e) {
    throw new ApiError(0, "connection_failed", `cannot reach the server (${e.message})`);
  }
  const text = await resp.text();
  const ms = performance.now() - started;
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const err = data && data.error ? data.error : { type: "http_error", message: text.slice(0, 200) };
    throw new ApiError(resp.status, err.type, err.message);
  }
  return { data, ms, status: resp.status };
}

const taskPath = (id) => `/v1/tasks/${encodeURIComponent(id)}`;

// ---------------------------------------------------------------------------------------- messages
let messageTimer = null;

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
  clearTimeout(messageTimer);
  messageTimer = setTimeout(() => (box.hidden = true), kind === "error" ? 8000 : 4000);
}

function setStatus(text, kind) {
  const pill = $("status");
  pill.textContent = text;
  pill.className = `pill ${kind || ""}`;
}

// ---------------------------------------------------------------------------------------- info
function renderInfo(info) {
  const b = info.backbone;
  const rows = [
    ["backbone", b.backbone_id],
    ["spec", b.spec],
    ["fingerprint", b.fingerprint.length > 28 ? `${b.fingerprint.slice(0, 28)}…` : b.fingerprint],
    ["model", `D=${b.embed_dim} · ${b.depth} layers · ${b.num_heads} heads · patch ${b.patch_size}`],
    ["input", `${b.image_size}×${b.image_size} (resize ${b.resize_size})`],
    ["device", `${b.device} · ${b.dtype}`],
    ["bank", `${info.bank.resident ?? 0} / ${info.bank.capacity ?? 0} tasks resident`],
    ["limits", `top-k ≤ ${info.limits.max_top_k} · ${info.limits.max_images_per_request} images/request`],
  ];
  const dl = $("info");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    dl.append(el("dt", "", k), el("dd", "", v));
  }
  const topK = $("top-k");
  for (const opt of topK.options) opt.disabled = Number(opt.value) > info.limits.max_top_k;
}

// ---------------------------------------------------------------------------------------- tasks
function renderTasks(tasks) {
  const list = $("tasks");
  list.replaceChildren();
  $("tasks-empty").hidden = tasks.length > 0;
  for (const t of tasks) {
    const item = el("li");
    const button = el("button", "task");
    button.type = "button";
    button.dataset.task = t.task_id;
    const title = el("span", "task-title", t.task_id);
    if (t.name && t.name !== t.task_id) title.append(el("span", "muted", ` · ${t.name}`));
    const meta = el(
      "span",
      "task-meta",
      `VPT-${t.mode} · P=${t.prompt_length} · ${t.num_classes} classes · v${t.version}`,
    );
    button.append(title, meta);
    button.addEventListener("click", () => selectTask(t));
    item.append(button);
    list.append(item);
  }
  const current = tasks.find((t) => t.task_id === state.task) || tasks[0];
  if (current) selectTask(current);
  else selectTask(null);
}

function selectTask(task) {
  state.task = task ? task.task_id : null;
  if (task) localStorage.setItem(TASK_STORAGE, task.task_id);
  for (const b of document.querySelectorAll("#tasks .task")) {
    b.classList.toggle("selected", b.dataset.task === state.task);
    b.setAttribute("aria-pressed", String(b.dataset.task === state.task));
  }
  $("selected").textContent = task ? `— ${task.task_id}` : "— pick a task";
  $("selected").className = task ? "" : "muted";
}

async function loadTasks() {
  const { data } = await api("GET", "/v1/tasks?limit=1000");
  renderTasks(data.tasks);
  if (state.version) {
    setStatus(`connected · vpt-serve ${state.version} · ${data.tasks.length} task(s)`, "ok");
  }
  return data.tasks;
}

// ---------------------------------------------------------------------------------------- connect
async function connect() {
  // Without a key, try anyway: a server in open mode (VPT_OPEN_MODE, development) needs none.
  setStatus("connecting…");
  try {
    const { data: info } = await api("GET", "/v1/info");
    renderInfo(info);
    state.version = info.version;
    await loadTasks();
    $("message").hidden = true; // an earlier "invalid key" no longer applies
  } catch (e) {
    state.version = null;
    if (e.status === 401 && !state.key) {
      setStatus("enter an API key", "warn");
      return;
    }
    setStatus(e.status === 401 ? "invalid key" : "error", "error");
    say(e.message, "error");
  }
}

// ---------------------------------------------------------------------------------------- classify
function renderPredictions(result, roundTripMs) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of result.predictions[0]) {
    const row = el("li", "prediction");
    const label = el("span", "label", p.label);
    label.title = p.label; // long labels are cut with an ellipsis
    const bar = el("span", "bar");
    const fill = el("span", "fill");
    fill.style.width = `${Math.max(0.5, p.score * 100).toFixed(1)}%`;
    bar.append(fill);
    const score = el("span", "score", `${(p.score * 100).toFixed(1)}%`);
    row.append(label, bar, score);
    list.append(row);
  }
  const t = result.timings;
  $("latency").textContent =
    `${roundTripMs.toFixed(0)} ms round trip · server ${t.total_ms.toFixed(1)} ms ` +
    `(decode ${t.decode_ms.toFixed(1)}, queue ${t.queue_ms.toFixed(1)}, compute ${t.compute_ms.toFixed(1)}) · ` +
    `${result.task_id} v${result.version} · batch of ${t.batch_size}`;
  $("result").hidden = false;
}

// A browser user is told this rather than the API's "415 unsupported_media_type: Content-Type ...".
const NOT_AN_IMAGE = "That file is not an image (JPEG, PNG, WebP, GIF or BMP)";

// No preview, name or predictions left from a file that was no image.
function clearImage() {
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  $("image-name").hidden = true;
  $("drop").classList.remove("has-image");
  $("result").hidden = true;
  state.lastImage = null;
}

function notAnImage(file, reason) {
  clearImage();
  say(reason ? `Could not use ${file.name}: ${reason}` : `${NOT_AN_IMAGE}: ${file.name}`, "error");
}

async function classify(file) {
  if (!file) return;
  // A type the browser knows and that is no image: the server would refuse it (415). An unknown type
  // ("") goes as application/octet-stream; the server reads what it can.
  if (file.type && !file.type.startsWith("image/")) {
    notAnImage(file);
    return;
  }
  state.lastImage = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("image-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(1)} KB`;
  $("image-name").hidden = false;
  $("drop").classList.add("has-image");
  if (!state.task) {
    say("Pick a task first.", "error");
    return;
  }
  const topK = $("top-k").value;
  $("drop").classList.add("busy");
  try {
    const { data, ms } = await api("POST", `${taskPath(state.task)}/classify?top_k=${topK}`, {
      body: file,
      contentType: file.type || "application/octet-stream",
    });
    renderPredictions(data, ms);
  } catch (e) {
    if (e.type === "unsupported_media_type" || e.type === "invalid_image") {
      // invalid_image: "image 0: unrecognised image format (...)", "image 0: ... over the limit ..."
      notAnImage(file, e.type === "invalid_image" ? e.detail.replace(/^image \d+: /, "") : null);
      return;
    }
    $("result").hidden = true;
    say(e.message, "error");
  } finally {
    $("drop").classList.remove("busy");
  }
}

// ---------------------------------------------------------------------------------------- upload
async function upload(event) {
  event.preventDefault();
  const id = $("upload-task").value.trim();
  const file = $("upload-file").files[0];
  if (!id || !file) return;
  const out = $("upload-result");
  $("upload").disabled = true;
  try {
    const { data, status } = await api("PUT", taskPath(id), {
      body: file,
      contentType: "application/octet-stream",
    });
    out.textContent =
      `${status === 201 ? "Created" : "New version of"} ${data.tenant}/${data.task_id}: v${data.version}, ` +
      `VPT-${data.mode}, ${data.num_classes} classes.`;
    out.className = "hint ok";
    out.hidden = false;
    state.task = data.task_id;
    await loadTasks();
  } catch (e) {
    out.textContent = e.message;
    out.className = "hint error";
    out.hidden = false;
  } finally {
    $("upload").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------- wiring
function init() {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, state.key);
    connect();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    state.key = "";
    $("api-key").value = "";
    state.version = null;
    setStatus("enter an API key", "warn");
    say("Key removed from this browser.");
  });
  $("refresh").addEventListener("click", () => loadTasks().catch((e) => say(e.message, "error")));
  $("upload-form").addEventListener("submit", upload);
  $("image-file").addEventListener("change", (e) => {
    classify(e.target.files[0]);
    e.target.value = ""; // choosing the same file again (after fixing it) fires "change" again
  });
  // The server may read what the browser cannot show (e.g. TIFF): hide the broken preview, keep the rest.
  $("preview").addEventListener("error", () => ($("preview").hidden = true));
  $("top-k").addEventListener("change", () => classify(state.lastImage));

  const drop = $("drop");
  drop.addEventListener("click", (e) => {
    if (e.target.tagName !== "INPUT" && e.target.tagName !== "LABEL") $("image-file").click();
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("image-file").click();
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) classify(file);
  });

  connect();
}

document.addEventListener("DOMContentLoaded", init);
