// photo3d web page: new model (photos + options), one task (progress, error, 3D result),
// my models (gallery), account (API key, credits). Plain ES modules, no build step.

import {
  ApiError,
  apiFetch,
  apiJson,
  apiUpload,
  downloadSigned,
  getApiKey,
  handleUnauthorized,
  readEventStream,
  setApiKey,
  signedUrl,
} from "./api.js";
import {
  FORMATS,
  STATUS_TEXT,
  TERMINAL,
  explainError,
  formatBytes,
  formatDate,
  formatDuration,
  formatShortDate,
  stageText,
} from "./text.js";

const MAX_PHOTOS = 8;
const MAX_BYTES = 20 * 1024 * 1024;
const SERVER_TYPES = new Set([
  "image/jpeg",
  "image/png",
  "image/webp",
  "image/heic",
  "image/heif",
  "image/avif",
]);
const PAGE_SIZE = 12;

const $ = (selector, root = document) => root.querySelector(selector);
const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });

function prefs(name, fallback) {
  try {
    return localStorage.getItem(`photo3d.${name}`) ?? fallback;
  } catch {
    return fallback;
  }
}

function savePref(name, value) {
  try {
    localStorage.setItem(`photo3d.${name}`, value);
  } catch {
    // storage unavailable: the choice lasts for this page only
  }
}

let toastTimer;
function toast(message) {
  const box = $("#toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    box.hidden = true;
  }, 4000);
}

/** Fill an error box: title, what to do, the server's own words. */
function showAlert(box, error) {
  const { title, advice, detail, code } = explainError(error.code, error.message, error.status);
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  const p = document.createElement("p");
  p.append(strong, document.createElement("br"), advice);
  box.append(p);
  if (detail && detail !== title) {
    const small = document.createElement("p");
    small.className = "detail";
    small.textContent = `Details: ${detail}${code ? ` (${code})` : ""}`;
    box.append(small);
  }
  box.hidden = false;
}

// ---------------------------------------------------------------------------------------
// Views and routing: #/ (new model), #/task/<id>, #/models

const views = {
  create: $("#view-create"),
  task: $("#view-task"),
  models: $("#view-models"),
};
let currentView = null;
let firstRoute = true;

function showView(name, title) {
  for (const [key, section] of Object.entries(views)) section.hidden = key !== name;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${title} · photo3d`;
  if (!firstRoute) {
    // Move focus to the new view's heading so keyboard and screen-reader users land there.
    const heading = $("h1", views[name]);
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
    window.scrollTo(0, 0);
  }
  firstRoute = false;
  currentView = name;
}

function route() {
  const hash = location.hash || "#/";
  if (!hash.startsWith("#/")) return; // in-page anchors such as the skip link
  taskView?.close();
  taskView = null;
  gallery.stopPolling();
  const match = /^#\/task\/([0-9a-fA-F-]{8,64})$/.exec(hash);
  if (match) {
    showView("task", "Your model");
    taskView = new TaskView(match[1], pendingTasks.get(match[1]));
    pendingTasks.delete(match[1]);
    taskView.start();
  } else if (hash === "#/models") {
    showView("models", "My models");
    gallery.load(true);
  } else {
    showView("create", "New model");
  }
}

// ---------------------------------------------------------------------------------------
// New model: photos (drop, pick, paste, camera), options, submit

const photos = []; // {file, url}
const dropzone = $("#dropzone");
const fileInput = $("#file-input");
const cameraInput = $("#camera-input");
const createError = $("#create-error");
const generateButton = $("#generate-button");
const pendingTasks = new Map(); // task id -> task JSON from POST, so the view needs no GET

/** Re-encode an image the server does not read (GIF, BMP, TIFF) as PNG. */
async function toServerFormat(file) {
  if (SERVER_TYPES.has(file.type)) return file;
  try {
    const bitmap = await createImageBitmap(file);
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    if (!blob) return file;
    return new File([blob], file.name.replace(/\.[^.]*$/, "") + ".png", { type: "image/png" });
  } catch {
    return file; // the browser cannot decode it either: the server will say what is wrong
  }
}

async function addFiles(fileList) {
  createError.hidden = true;
  const files = [...fileList];
  for (const original of files) {
    if (original.type && !original.type.startsWith("image/")) {
      showAlert(createError, {
        code: "not_an_image",
        message: `“${original.name}” is ${original.type || "not an image"}.`,
      });
      continue;
    }
    if (original.size > MAX_BYTES) {
      showAlert(createError, {
        code: "image_too_large",
        message: `“${original.name}” is ${formatBytes(original.size)}.`,
      });
      continue;
    }
    if (photos.length >= MAX_PHOTOS) {
      showAlert(createError, { code: "too_many_images", message: "" });
      break;
    }
    const file = await toServerFormat(original);
    photos.push({ file, url: URL.createObjectURL(file) });
  }
  renderPhotos();
}

function removePhoto(index) {
  const [removed] = photos.splice(index, 1);
  URL.revokeObjectURL(removed.url);
  renderPhotos();
  const buttons = document.querySelectorAll(".photo-remove");
  (buttons[Math.min(index, buttons.length - 1)] || dropzone).focus();
}

function renderPhotos() {
  const list = $("#photo-list");
  const template = $("#photo-item");
  list.replaceChildren();
  photos.forEach((photo, index) => {
    const item = template.content.firstElementChild.cloneNode(true);
    const img = $("img", item);
    // A HEIC photo the browser cannot show (the server reads it): no broken-image icon.
    img.addEventListener("error", () => (img.hidden = true), { once: true });
    img.src = photo.url;
    img.alt = `Photo ${index + 1}: ${photo.file.name}`;
    $(".photo-name", item).textContent = photo.file.name;
    const remove = $(".photo-remove", item);
    remove.setAttribute("aria-label", `Remove ${photo.file.name}`);
    remove.title = "Remove";
    remove.addEventListener("click", () => removePhoto(index));
    if (index === 0 && photos.length > 1) item.classList.add("first");
    list.append(item);
  });
  list.hidden = photos.length === 0;
  const note = $("#photo-note");
  note.hidden = photos.length < 2;
  note.textContent =
    "Several photos of one object help backends that use more than one view; backends that take a single photo use the first.";
  $("#generate-hint").textContent = photos.length
    ? `${photos.length} photo${photos.length > 1 ? "s" : ""} ready.`
    : "Add a photo to start.";
  $(".dropzone-title strong").textContent = photos.length
    ? "Add another photo"
    : "Drop a photo here";
}

dropzone.addEventListener("click", () => fileInput.click());
dropzone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    fileInput.click();
  }
});
for (const input of [fileInput, cameraInput]) {
  input.addEventListener("change", async () => {
    await addFiles(input.files);
    input.value = ""; // picking the same file again still fires change
  });
}
$("#camera-button").addEventListener("click", () => cameraInput.click());

// Drops anywhere on the page land here (a dropped file would otherwise replace the page).
let dragDepth = 0;
window.addEventListener("dragenter", (event) => {
  if (!event.dataTransfer?.types.includes("Files")) return;
  dragDepth += 1;
  dropzone.classList.add("dragging");
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) dropzone.classList.remove("dragging");
});
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  dropzone.classList.remove("dragging");
  const files = event.dataTransfer?.files;
  if (!files?.length) return;
  if (currentView !== "create") location.hash = "#/";
  addFiles(files);
});

document.addEventListener("paste", (event) => {
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
  const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
  if (!files.length) return;
  event.preventDefault();
  if (currentView !== "create") location.hash = "#/";
  addFiles(files);
  toast(files.length > 1 ? `${files.length} images pasted` : "Image pasted");
});

// Options
const formatsBox = $("#opt-formats");
for (const fmt of FORMATS) {
  const label = document.createElement("label");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.name = "formats";
  box.value = fmt.id;
  box.checked = fmt.id === "glb";
  box.disabled = fmt.id === "glb"; // GLB is always made
  label.append(box, ` ${fmt.label}`);
  label.title = fmt.use;
  formatsBox.append(label);
}
$("#seed-random").addEventListener("click", () => {
  $("#opt-seed").value = Math.floor(Math.random() * 2 ** 31);
});

let backends = [];
async function loadBackends() {
  try {
    backends = await apiJson("backends");
  } catch {
    return; // the select keeps "Server default"
  }
  const select = $("#opt-backend");
  select.replaceChildren();
  for (const backend of backends) {
    const option = document.createElement("option");
    option.value = backend.name;
    option.textContent = backend.default ? `${backend.name} (default)` : backend.name;
    if (!backend.workers) option.textContent += " · no worker running";
    option.selected = backend.default;
    select.append(option);
  }
  updateBackendHint();
}
function updateBackendHint() {
  const chosen = backends.find((b) => b.name === $("#opt-backend").value);
  $("#opt-backend-hint").textContent =
    chosen && !chosen.workers
      ? "No worker for this backend is running now; tasks wait until one starts."
      : "Which generator makes the model.";
}
$("#opt-backend").addEventListener("change", updateBackendHint);

function collectOptions(form) {
  for (const input of [$("#opt-seed"), $("#opt-faces")]) {
    if (!input.checkValidity() || input.value === "") {
      $("#advanced").open = true;
      input.focus();
      const label = $(`label[for="${input.id}"]`).textContent;
      throw new ApiError(
        0,
        "invalid_option",
        `${label}: ${input.validationMessage || "enter a number"}`,
      );
    }
  }
  // Typed values go as one JSON `options` field: per-option form fields arrive as strings,
  // which the server does not coerce for choices such as texture_size.
  const options = {
    seed: Number($("#opt-seed").value),
    texture_size: Number($("#opt-texture").value),
    face_limit: Number($("#opt-faces").value),
    formats: [...formatsBox.querySelectorAll("input:checked")].map((box) => box.value),
  };
  const backend = $("#opt-backend").value;
  if (backend) options.backend = backend;
  const removeBackground = $("#opt-background").value;
  if (removeBackground) options.remove_background = removeBackground === "true";
  form.append("options", JSON.stringify(options));
}

$("#create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  createError.hidden = true;
  if (!photos.length) {
    showAlert(createError, { code: "missing_image", message: "" });
    dropzone.focus();
    return;
  }
  const form = new FormData();
  for (const photo of photos) form.append("image", photo.file, photo.file.name);
  try {
    collectOptions(form);
  } catch (error) {
    showAlert(createError, error);
    return;
  }
  generateButton.disabled = true;
  const label = generateButton.lastChild;
  const original = label.textContent;
  label.textContent = "Uploading…";
  try {
    const task = await apiUpload("generate", form, {
      onProgress: (fraction) => {
        label.textContent = fraction < 1 ? `Uploading ${Math.round(fraction * 100)}%` : "Checking…";
      },
    });
    pendingTasks.set(task.id, task);
    if ((task.credits_reserved ?? 0) > 0) refreshAccount(); // the price is now held
    for (const photo of photos.splice(0)) URL.revokeObjectURL(photo.url);
    renderPhotos();
    location.hash = `#/task/${task.id}`;
  } catch (error) {
    showAlert(createError, error);
    if (error.status === 402) addBuyLink(createError);
    createError.scrollIntoView({ block: "nearest" });
  } finally {
    generateButton.disabled = false;
    label.textContent = original;
  }
});

// ---------------------------------------------------------------------------------------
// 3D viewer (model-viewer, served from /vendor, loaded on first use)

let viewerModule = null;
function loadViewer() {
  viewerModule ??= import("./vendor/model-viewer.min.js")
    .then(() => customElements.whenDefined("model-viewer"))
    .then(() => true)
    .catch(() => {
      viewerModule = null;
      return false;
    });
  return viewerModule;
}

const viewerStage = $("#viewer-stage");
function applyBackground(value) {
  viewerStage.classList.remove("bg-light", "bg-dark", "bg-checker");
  viewerStage.classList.add(`bg-${value}`);
  savePref("viewerBackground", value);
}
{
  const dark = window.matchMedia?.("(prefers-color-scheme: dark)").matches;
  const saved = prefs("viewerBackground", dark ? "dark" : "light");
  const radio = document.querySelector(`input[name="viewer-bg"][value="${saved}"]`);
  if (radio) radio.checked = true;
  applyBackground(radio ? saved : "light");
}
for (const radio of document.querySelectorAll('input[name="viewer-bg"]')) {
  radio.addEventListener("change", () => applyBackground(radio.value));
}
const rotateToggle = $("#rotate-toggle");
rotateToggle.setAttribute("aria-pressed", prefs("autoRotate", "true"));
rotateToggle.addEventListener("click", () => {
  const on = rotateToggle.getAttribute("aria-pressed") !== "true";
  rotateToggle.setAttribute("aria-pressed", String(on));
  savePref("autoRotate", String(on));
  const viewer = $("model-viewer");
  if (viewer) viewer.autoRotate = on;
});
let resetFlip = false;
$("#reset-camera").addEventListener("click", () => {
  const viewer = $("model-viewer");
  if (!viewer) return;
  // An unchanged attribute value is ignored, so alternate two spellings of the same default.
  resetFlip = !resetFlip;
  viewer.cameraOrbit = resetFlip ? "0deg 75deg 105%" : "0rad 75deg 105%";
  viewer.cameraTarget = resetFlip ? "auto auto auto" : "auto  auto auto";
  viewer.fieldOfView = resetFlip ? "auto" : "auto ";
  viewer.resetTurntableRotation?.(0);
});

// ---------------------------------------------------------------------------------------
// One task: progress from the event stream, then the result or what went wrong

let taskView = null;

class TaskView {
  constructor(id, initial) {
    this.id = id;
    this.task = initial || null;
    this.abort = new AbortController();
    this.closed = false;
    this.timeline = new Map();
    this.receivedAt = 0;
    this.resources = [];
    this.lastStatusText = "";
    this.showingResult = false;
  }

  async start() {
    for (const panel of ["#progress-panel", "#task-error", "#result-panel"]) $(panel).hidden = true;
    $("#task-title").textContent = "Your model";
    $("#task-meta").textContent = "";
    $("#timeline").replaceChildren();
    $("#progress-note").hidden = true;
    $("#viewer-host").replaceChildren();
    $("#cancel-button").disabled = false;
    $("#cancel-button").textContent = "Cancel";
    this.lastStatusText = "";
    loadViewer(); // fetch the viewer while the model is being made
    try {
      const task = this.task || (await apiJson(`task/${this.id}`, { signal: this.abort.signal }));
      this.render(task);
    } catch (error) {
      if (error.name !== "AbortError") this.showFailure(error, "We couldn’t open this model");
      return;
    }
    if (!TERMINAL.has(this.task.status)) this.follow();
    this.ticker = setInterval(() => this.tick(), 1000);
  }

  close() {
    this.closed = true;
    this.abort.abort();
    clearInterval(this.ticker);
    for (const resource of this.resources) resource.revoke();
    $("#viewer-host").replaceChildren();
  }

  /** Follow the event stream until the task ends, reconnecting after a dropped connection. */
  async follow() {
    let delay = 1000;
    while (!this.closed && !TERMINAL.has(this.task.status)) {
      try {
        await readEventStream(`task/${this.id}/stream`, {
          signal: this.abort.signal,
          onEvent: (event) => this.onEvent(event),
        });
        delay = 1000;
        if (!this.closed && !TERMINAL.has(this.task.status)) {
          this.render(await apiJson(`task/${this.id}`, { signal: this.abort.signal }));
        }
      } catch (error) {
        if (this.closed || error.name === "AbortError") return;
        if (error.status === 404 || error.status === 401 || error.status === 403) {
          this.showFailure(error, "We couldn’t follow this model");
          return;
        }
        this.note("Connection lost. Reconnecting…");
        await sleep(delay, this.abort.signal);
        delay = Math.min(delay * 2, 10_000);
      }
    }
    // Charged on success, given back on failure or cancel: show the new balance.
    if (!this.closed && (this.task.credits_reserved ?? 0) > 0) refreshAccount();
  }

  onEvent({ event, data }) {
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      return;
    }
    if (event === "task") this.render(body);
    else if (event === "timeline") this.addTimeline(body);
    else if (event === "error" && body.error) {
      this.showFailure(
        new ApiError(0, body.error.code, body.error.message),
        "We lost track of this model",
      );
    }
  }

  note(text) {
    const note = $("#progress-note");
    note.textContent = text || "";
    note.hidden = !text;
  }

  render(task) {
    if (this.closed) return;
    this.task = task;
    this.receivedAt = performance.now();
    const short = task.id.slice(0, 8);
    $("#task-meta").textContent =
      `Started ${formatDate(task.created_at)} · backend ${task.backend} · id ${short}`;
    if (task.status === "queued" || task.status === "running") this.renderProgress(task);
    else if (task.status === "succeeded") this.renderResult(task);
    else if (task.status === "failed") {
      const error = task.error || { code: "generation_failed", message: "" };
      this.showFailure(new ApiError(0, error.code, error.message), "The model couldn’t be made");
    } else if (task.status === "canceled") this.renderCanceled();
    this.tick();
  }

  renderProgress(task) {
    $("#progress-panel").hidden = false;
    $("#task-title").textContent = "Making your model";
    const percent = Math.round((task.progress || 0) * 100);
    $("#progress-bar").value = percent;
    $("#progress-bar").setAttribute("aria-valuetext", `${percent}%`);
    $("#progress-percent").textContent = `${percent}%`;
    $("#progress-backend").textContent = task.backend;
    const ahead = task.queue_position;
    $("#queue-fact").hidden = task.status !== "queued" || ahead == null;
    // queue_position counts the queued tasks before this one (not the running ones).
    $("#progress-queue").textContent = ahead === 0 ? "Next" : String((ahead ?? 0) + 1);
    let text;
    if (task.status === "queued") {
      // A deep queue's position is an estimate (queue_position_estimated): say "about".
      const about = task.queue_position_estimated ? "about " : "";
      text = ahead
        ? `Waiting in line: ${about}number ${ahead + 1}`
        : "Next in line: waiting for a free worker";
    } else {
      text = stageText(task.stage) || "Starting";
    }
    if (task.attempt > 1) text += ` (attempt ${task.attempt} of ${task.max_attempts})`;
    // The live region only changes with the stage, not on every percent.
    if (text !== this.lastStatusText) {
      $("#progress-status").textContent = text;
      this.lastStatusText = text;
    }
    document.title = `${percent}% · ${text} · photo3d`;
    const worker = backends.find((b) => b.name === task.backend);
    if (task.status === "queued" && task.error) {
      const { title } = explainError(task.error.code, task.error.message);
      this.note(`The last attempt stopped (${title.toLowerCase()}). It will be tried again.`);
    } else if (task.status === "queued" && worker && !worker.workers) {
      this.note(
        `No worker for backend “${task.backend}” is running right now; your model starts when one is.`,
      );
    } else {
      this.note("");
    }
  }

  tick() {
    const task = this.task;
    if (!task) return;
    const base = task.timings?.total_s ?? 0;
    const running = !TERMINAL.has(task.status);
    const seconds = running ? base + (performance.now() - this.receivedAt) / 1000 : base;
    $("#progress-elapsed").textContent = formatDuration(seconds);
  }

  addTimeline(event) {
    if (this.timeline.has(event.id)) return;
    this.timeline.set(event.id, event);
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.dateTime = event.at;
    time.textContent = new Date(event.at).toLocaleTimeString();
    let text = STATUS_TEXT[event.status] || event.status;
    if (event.stage && event.status === "running") text += `: ${stageText(event.stage)}`;
    if (event.message) text += `. ${event.message}`;
    item.append(time, text);
    $("#timeline").append(item);
  }

  renderCanceled() {
    $("#progress-panel").hidden = true;
    $("#task-title").textContent = "Canceled";
    const box = $("#task-error");
    box.classList.replace("error", "warn");
    $("#task-error-title").textContent = "This model was canceled";
    $("#task-error-advice").textContent =
      "Nothing was made. Start again with the same or another photo.";
    $("#task-error-detail").textContent = "";
    box.hidden = false;
    document.title = "Canceled · photo3d";
  }

  showFailure(error, heading) {
    this.abort.abort();
    clearInterval(this.ticker);
    $("#progress-panel").hidden = true;
    $("#result-panel").hidden = true;
    $("#task-title").textContent = heading;
    const { title, advice, detail, code } = explainError(error.code, error.message, error.status);
    const box = $("#task-error");
    box.classList.replace("warn", "error");
    $("#task-error-title").textContent = title;
    $("#task-error-advice").textContent = advice;
    $("#task-error-detail").textContent = detail ? `Details: ${detail} (${code})` : "";
    box.hidden = false;
    document.title = `${heading} · photo3d`;
  }

  async renderResult(task) {
    $("#progress-panel").hidden = true;
    $("#task-title").textContent = "Your 3D model";
    document.title = "Your 3D model · photo3d";
    $("#result-panel").hidden = false;
    this.renderDownloads(task);
    const stats = task.result?.stats || {};
    const parts = [];
    if (stats.faces) parts.push(`${Number(stats.faces).toLocaleString()} faces`);
    if (stats.vertices) parts.push(`${Number(stats.vertices).toLocaleString()} vertices`);
    if (task.timings?.total_s != null)
      parts.push(`made in ${formatDuration(task.timings.total_s)}`);
    $("#result-stats").textContent = parts.join(" · ");
    if (this.showingResult) return;
    this.showingResult = true;
    await this.showModel(task);
  }

  async showModel(task) {
    const status = $("#viewer-status");
    status.textContent = "Loading the 3D viewer…";
    const ready = await loadViewer();
    if (this.closed) return;
    if (!ready) {
      const { title, advice } = explainError("viewer_missing");
      status.textContent = `${title}. ${advice}`;
      return;
    }
    const viewer = document.createElement("model-viewer");
    viewer.setAttribute("camera-controls", "");
    viewer.setAttribute("touch-action", "pan-y");
    viewer.setAttribute("shadow-intensity", "1");
    viewer.setAttribute("ar", "");
    viewer.setAttribute("ar-modes", "webxr scene-viewer quick-look");
    viewer.setAttribute("auto-rotate-delay", "1500");
    viewer.setAttribute("interaction-prompt", "none");
    viewer.setAttribute(
      "alt",
      "The 3D model made from your photo. Drag or use the arrow keys to turn it.",
    );
    viewer.autoRotate = rotateToggle.getAttribute("aria-pressed") === "true";
    const arButton = document.createElement("button");
    arButton.slot = "ar-button";
    arButton.type = "button";
    arButton.className = "button primary ar-button";
    arButton.textContent = "View in your space";
    viewer.append(arButton);
    viewer.addEventListener("progress", (event) => {
      const p = event.detail?.totalProgress ?? 0;
      if (p < 1) status.textContent = `Loading the model… ${Math.round(p * 100)}%`;
    });
    viewer.addEventListener("load", () => {
      status.textContent = "";
      viewer.dataset.loaded = "true";
    });
    viewer.addEventListener("error", () => {
      status.textContent = "The viewer couldn’t show this model. You can still download it below.";
    });
    // Signed links: the viewer, the poster and AR Quick Look (which fetches the USDZ itself)
    // load them without a key header, so all of them work when the server requires keys.
    const result = task.result || {};
    const links = result.format_urls || {};
    const glb = links.glb || (result.files || []).find((f) => f.format === "glb")?.url;
    if (!glb) {
      status.textContent = "The viewer couldn’t show this model. You can still download it below.";
      return;
    }
    if (result.preview_url) viewer.poster = signedUrl(result.preview_url);
    if (links.usdz) viewer.iosSrc = signedUrl(links.usdz);
    viewer.src = signedUrl(glb);
    status.textContent = "Loading the model…";
    $("#viewer-host").replaceChildren(viewer);
  }

  /** A fresh signed link to one format of a task (links expire; the task hands out new ones). */
  static async freshLink(id, format) {
    const task = await apiJson(`task/${id}`);
    const link = task.result?.format_urls?.[format];
    if (!link) throw new ApiError(404, "not_found", "This model has no such file.");
    return link;
  }

  renderDownloads(task) {
    const list = $("#downloads");
    list.replaceChildren();
    const made = new Map((task.result?.files || []).map((f) => [f.format, f]));
    for (const fmt of FORMATS) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "button";
      button.dataset.format = fmt.id;
      // A format asked for is converted just after the task succeeds (ready: false until
      // stored); downloading it earlier converts it then, like one not asked for.
      const file = made.get(fmt.id);
      const stored = file && file.ready !== false;
      const size = stored && file.bytes ? ` · ${formatBytes(file.bytes)}` : "";
      button.innerHTML =
        '<svg class="icon" aria-hidden="true"><use href="#i-download"/></svg><span></span>';
      const text = button.lastChild;
      const name = document.createElement("span");
      name.className = "fmt";
      name.textContent = fmt.label;
      const use = document.createElement("span");
      use.className = "use";
      use.textContent = `${fmt.use}${size}`;
      text.append(name, use);
      button.setAttribute("aria-label", `Download ${fmt.label}: ${fmt.use}${size}`);
      button.addEventListener("click", () => this.download(task, fmt, button, !stored));
      item.append(button);
      list.append(item);
    }
  }

  async download(task, fmt, button, convert) {
    const status = $("#download-status");
    button.disabled = true;
    button.classList.add("busy");
    status.textContent = convert ? `Making the ${fmt.label} file…` : `Downloading ${fmt.label}…`;
    try {
      const prefix = `photo3d-${task.id.slice(0, 8)}-`;
      const link = await TaskView.freshLink(task.id, fmt.id);
      await downloadSigned(link, null, prefix, `${prefix}model.${fmt.id}`);
      status.textContent = `${fmt.label} downloaded.`;
    } catch (error) {
      const { title, advice } = explainError(error.code, error.message, error.status);
      status.textContent = `${title}. ${advice}`;
    } finally {
      button.disabled = false;
      button.classList.remove("busy");
    }
  }
}

$("#cancel-button").addEventListener("click", async () => {
  const view = taskView;
  if (!view) return;
  const button = $("#cancel-button");
  button.disabled = true;
  button.textContent = "Canceling…";
  try {
    view.render(await apiJson(`task/${view.id}/cancel`, { method: "POST" }));
  } catch (error) {
    if (error.code === "task_finished") {
      view.render(await apiJson(`task/${view.id}`));
    } else {
      button.disabled = false;
      button.textContent = "Cancel";
      const { title, advice } = explainError(error.code, error.message, error.status);
      view.note(`${title}. ${advice}`);
    }
  }
});

// ---------------------------------------------------------------------------------------
// My models: bulk conversion batches (shown only when the account has some), then the models

const BATCH_STATUS_TEXT = {
  running: "Converting",
  completed: "Done",
  failed: "Job failed",
  stopped: "Stopped",
};

const batches = {
  running: false,

  async load() {
    const box = $("#batches");
    let page;
    try {
      page = await apiJson("batches", { params: { limit: 10 } });
    } catch {
      box.hidden = true; // the models below still load; their errors are shown there
      return;
    }
    $("#batch-list").replaceChildren(...page.batches.map((batch) => this.item(batch)));
    box.hidden = page.batches.length === 0;
    this.running = page.batches.some((batch) => batch.status === "running");
  },

  item(batch) {
    const li = document.createElement("li");
    li.className = "batch";
    li.dataset.batchId = batch.id;
    const title = document.createElement("strong");
    title.textContent = batch.id;
    const badge = document.createElement("span");
    badge.className = `badge ${batch.status === "completed" ? "succeeded" : batch.status}`;
    badge.textContent = BATCH_STATUS_TEXT[batch.status] || batch.status;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = batch.progress;
    bar.setAttribute("aria-label", `${batch.id}: ${Math.round(batch.progress * 100)}% done`);
    const counts = batch.counts;
    const parts = [`${counts.succeeded} done`];
    if (counts.queued + counts.running) parts.push(`${counts.queued + counts.running} in progress`);
    if (counts.failed + batch.rejected) parts.push(`${counts.failed + batch.rejected} failed`);
    if (batch.total != null) parts.push(`of ${batch.total}`);
    if (batch.photos_per_minute) parts.push(`${batch.photos_per_minute} photos/min`);
    if (batch.eta_seconds != null) parts.push(`about ${Math.ceil(batch.eta_seconds / 60)} min left`);
    const meta = document.createElement("span");
    meta.className = "batch-meta";
    meta.textContent = parts.join(" · ");
    li.append(title, badge, bar, meta);
    return li;
  },
};

const gallery = {
  cursor: null,
  cards: new Map(), // id -> {item, task, thumb}
  loading: false,
  pollTimer: null,

  async load(reset) {
    if (this.loading) return;
    this.loading = true;
    const grid = $("#model-grid");
    const more = $("#load-more");
    $("#models-error").hidden = true;
    if (reset) {
      for (const card of this.cards.values()) card.thumb?.revoke();
      this.cards.clear();
      grid.replaceChildren();
      this.cursor = null;
      $("#models-empty").hidden = true;
      batches.load();
    }
    more.disabled = true;
    try {
      const page = await apiJson("tasks", { params: { limit: PAGE_SIZE, cursor: this.cursor } });
      for (const task of page.tasks) grid.append(this.card(task));
      this.cursor = page.next_cursor;
      more.hidden = !page.next_cursor;
      $("#models-empty").hidden = this.cards.size > 0;
      $("#models-status").textContent =
        `${this.cards.size} models shown${page.next_cursor ? "; more available" : ""}.`;
      this.startPolling();
    } catch (error) {
      showAlert($("#models-error"), error);
    } finally {
      this.loading = false;
      more.disabled = false;
    }
  },

  card(task) {
    const item = $("#model-card").content.firstElementChild.cloneNode(true);
    item.dataset.taskId = task.id;
    const href = `#/task/${task.id}`;
    $(".card-thumb", item).href = href;
    const title = $(".card-title", item);
    title.href = href;
    title.textContent = formatShortDate(task.created_at) || task.id.slice(0, 8);
    const download = $(".card-download", item);
    download.setAttribute("aria-label", `Download GLB of the model from ${title.textContent}`);
    download.addEventListener("click", async () => {
      download.disabled = true;
      try {
        const prefix = `photo3d-${task.id.slice(0, 8)}-`;
        const link = await TaskView.freshLink(task.id, "glb");
        await downloadSigned(link, null, prefix, `${prefix}model.glb`);
      } catch (error) {
        showAlert($("#models-error"), error);
      } finally {
        download.disabled = false;
      }
    });
    const remove = $(".card-delete", item);
    remove.setAttribute("aria-label", `Delete the model from ${title.textContent}`);
    remove.addEventListener("click", () => this.remove(task.id, title.textContent));
    this.cards.set(task.id, { item, task: null, thumb: null });
    this.update(task);
    return item;
  },

  update(task) {
    const card = this.cards.get(task.id);
    if (!card) return;
    const previous = card.task;
    card.task = task;
    const { item } = card;
    const badge = $(".badge", item);
    badge.className = `badge ${task.status}`;
    badge.textContent = STATUS_TEXT[task.status] || task.status;
    let meta = task.backend;
    if (task.status === "running")
      meta += ` · ${stageText(task.stage) || "working"} ${Math.round(task.progress * 100)}%`;
    if (task.status === "queued" && task.queue_position != null) {
      const about = task.queue_position_estimated ? "about " : "";
      meta += ` · ${about}number ${task.queue_position + 1} in line`;
    }
    if (task.status === "failed" && task.error) meta += ` · ${explainError(task.error.code).title}`;
    $(".card-meta", item).textContent = meta;
    $(".card-download", item).hidden = task.status !== "succeeded";
    if (task.status === "succeeded" && previous?.status !== "succeeded") this.thumbnail(card);
  },

  async thumbnail(card) {
    const preview = card.task.result?.preview_url;
    if (!preview) return; // the placeholder stays
    const img = document.createElement("img");
    img.alt = "";
    img.loading = "lazy";
    img.decoding = "async";
    img.src = signedUrl(preview); // signed: no key header needed
    img.addEventListener("error", () => img.remove());
    $(".card-thumb", card.item).replaceChildren(img);
  },

  async remove(id, label) {
    if (
      !window.confirm(
        `Delete the model from ${label}? Its files are removed too; this can’t be undone.`,
      )
    )
      return;
    const card = this.cards.get(id);
    try {
      await apiFetch(`task/${id}`, { method: "DELETE" });
    } catch (error) {
      if (error.status !== 404) {
        showAlert($("#models-error"), error);
        return;
      }
    }
    const next = card.item.nextElementSibling || card.item.previousElementSibling;
    card.thumb?.revoke();
    card.item.remove();
    this.cards.delete(id);
    $("#models-empty").hidden = this.cards.size > 0 || !$("#load-more").hidden;
    toast("Model deleted");
    ($(".card-title", next || document) || $("#models-title")).focus();
  },

  startPolling() {
    this.stopPolling();
    // Cards of unfinished models refresh every few seconds while the gallery is shown.
    this.pollTimer = setInterval(async () => {
      if (currentView !== "models" || document.hidden) return;
      if (batches.running) batches.load();
      for (const card of this.cards.values()) {
        if (TERMINAL.has(card.task.status)) continue;
        try {
          this.update(await apiJson(`task/${card.task.id}`));
        } catch {
          // next round
        }
      }
    }, 3000);
  },

  stopPolling() {
    clearInterval(this.pollTimer);
    this.pollTimer = null;
  },
};

$("#load-more").addEventListener("click", () => gallery.load(false));
$("#models-refresh").addEventListener("click", () => gallery.load(true));

// ---------------------------------------------------------------------------------------
// Account: API key and, when the server bills, credits

const accountDialog = $("#account-dialog");
const keyInput = $("#api-key");

function openAccount(message) {
  const box = $("#account-message");
  box.textContent = message || "";
  box.hidden = !message;
  if (!accountDialog.open) {
    keyInput.value = getApiKey();
    accountDialog.showModal();
  }
  keyInput.focus();
}

$("#account-button").addEventListener("click", () => openAccount());
for (const close of accountDialog.querySelectorAll("[data-close]")) {
  close.addEventListener("click", () => accountDialog.close());
}
$("#api-key-show").addEventListener("change", (event) => {
  keyInput.type = event.target.checked ? "text" : "password";
});
$("#api-key-forget").addEventListener("click", () => {
  keyInput.value = "";
  setApiKey("");
  toast("API key forgotten");
});
$("#account-form").addEventListener("submit", (event) => {
  if (event.submitter?.value !== "save") return;
  setApiKey(keyInput.value.trim());
  toast(keyInput.value.trim() ? "API key saved" : "No API key set");
  refreshAccount();
  loadBackends();
  route(); // reload what is on screen with the new key
});

handleUnauthorized((error) => {
  const message = getApiKey()
    ? "The server didn’t accept your API key. Check it, then save it again."
    : "This server needs an API key. Paste yours below and press Save.";
  openAccount(
    error.message && error.code !== "http_401" ? `${message} (${error.message})` : message,
  );
});

/**
 * Credits appear only where GET /api/v1/account exists and says billing is on. Expected shape:
 * {"billing": {"enabled": true, "balance": 120, "buy_url": "https://…"}}; 404 hides it all.
 */
async function refreshAccount() {
  let account = null;
  try {
    account = await apiJson("account");
  } catch {
    account = null;
  }
  const who = $("#account-who");
  who.hidden = !account?.id;
  if (account?.id) {
    const name =
      account.name && account.name !== account.id ? `${account.name} (${account.id})` : account.id;
    who.textContent =
      account.auth_required === false && !getApiKey()
        ? "This server doesn’t need a key: you are its local user."
        : `Signed in as ${name}${account.is_admin ? " (admin)" : ""}.`;
  }
  const billing = account?.billing ?? {};
  const enabled = Boolean(billing.enabled ?? account?.billing_enabled);
  const balance = billing.balance ?? account?.balance ?? account?.credits;
  $("#billing").hidden = !enabled;
  $("#credits").hidden = !enabled || balance == null;
  if (!enabled) return;
  $("#billing-balance").textContent = balance == null ? "unknown" : `${balance} credits`;
  $("#credits").textContent = `${balance} credits`;
  const buy = $("#billing-buy");
  const url = billing.buy_url ?? account?.buy_url;
  buy.hidden = !url;
  if (url) buy.href = url;
  $("#billing-plan").textContent = billing.plan
    ? `Plan: ${billing.plan}${billing.period_end ? `, renews ${formatDay(billing.period_end)}` : ""}`
    : "";
  $("#billing-portal").hidden = !billing.plan && !billing.customer;
  renderLedger(billing.recent_ledger ?? []);
  loadPricing();
}

function formatDay(value) {
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleDateString();
}

function formatMoney(amount, currency) {
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(amount / 100);
  } catch {
    return `${(amount / 100).toFixed(2)} ${String(currency).toUpperCase()}`;
  }
}

/** A "Buy credits" button under a 402 message: it opens the pricing panel. */
function addBuyLink(box) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "button primary buy-link";
  button.textContent = "Buy credits";
  button.addEventListener("click", () => openAccount());
  box.append(button);
}

const LEDGER_TEXT = {
  grant: "Granted",
  purchase: "Bought",
  allowance: "Plan allowance",
  reserve: "Held for a model",
  capture: "Charged for a model",
  release: "Returned (model not made)",
  refund: "Refunded payment",
  expiry: "Expired allowance",
  adjustment: "Adjustment",
};

function renderLedger(entries) {
  const list = $("#billing-ledger");
  list.replaceChildren();
  for (const entry of entries) {
    const item = document.createElement("li");
    const amount = document.createElement("span");
    amount.className = "amount";
    amount.textContent = entry.kind === "capture" ? "" : `${entry.amount > 0 ? "+" : ""}${entry.amount} `;
    item.append(amount, `${LEDGER_TEXT[entry.kind] ?? entry.kind} · ${formatDay(entry.created_at)}`);
    list.append(item);
  }
  if (!entries.length) list.textContent = "No entries yet.";
}

let pricingLoaded = false;

async function loadPricing() {
  if (pricingLoaded) return;
  let pricing;
  try {
    pricing = await apiJson("pricing");
  } catch {
    return;
  }
  pricingLoaded = true;
  const packs = $("#pricing-packs");
  const plans = $("#pricing-plans");
  packs.replaceChildren();
  plans.replaceChildren();
  for (const pack of pricing.packs ?? []) {
    packs.append(
      pricingItem(
        `${pack.credits} credits · ${formatMoney(pack.amount, pack.currency)}`,
        "Buy",
        { pack: pack.name },
      ),
    );
  }
  for (const plan of pricing.plans ?? []) {
    const what = plan.metered
      ? `${plan.name}: pay per model, ${formatMoney(plan.unit_amount, plan.currency)} each`
      : `${plan.name}: ${plan.allowance} credits a ${plan.interval}, ${formatMoney(plan.amount, plan.currency)}`;
    plans.append(pricingItem(what, "Subscribe", { plan: plan.name }));
  }
  const backends = Object.entries(pricing.prices?.backends ?? {})
    .map(([name, credits]) => `${name} ${credits}`)
    .join(", ");
  $("#pricing-prices").textContent = backends ? `Credits per model: ${backends}.` : "";
  $("#pricing").hidden = !(pricing.packs?.length || pricing.plans?.length);
}

function pricingItem(text, action, body) {
  const item = document.createElement("li");
  const label = document.createElement("span");
  label.textContent = text;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "button small";
  button.textContent = action;
  button.addEventListener("click", () => startCheckout(body, button));
  item.append(label, button);
  return item;
}

/** Off to Stripe Checkout; Stripe sends the person back to this page with ?checkout=… */
async function startCheckout(body, button) {
  const box = $("#billing-error");
  box.hidden = true;
  button.disabled = true;
  try {
    const session = await apiJson("billing/checkout", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    location.assign(session.url);
  } catch (error) {
    showAlert(box, error);
    button.disabled = false;
  }
}

$("#billing-portal").addEventListener("click", async () => {
  const box = $("#billing-error");
  box.hidden = true;
  try {
    const session = await apiJson("billing/portal", { method: "POST" });
    location.assign(session.url);
  } catch (error) {
    showAlert(box, error);
  }
});

/** Back from Checkout: say what happened, then drop the query from the address bar. */
function checkoutResult() {
  const params = new URLSearchParams(location.search);
  const result = params.get("checkout");
  if (!result) return;
  toast(
    result === "success"
      ? "Payment received. Your credits appear as soon as Stripe confirms it."
      : "Checkout canceled: nothing was charged.",
  );
  history.replaceState(null, "", location.pathname + location.hash);
  if (result === "success") {
    // The webhook may land a moment after the redirect: look again shortly.
    setTimeout(refreshAccount, 2000);
    setTimeout(refreshAccount, 6000);
  }
}

// ---------------------------------------------------------------------------------------

$(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  $("#main").focus();
});
window.addEventListener("hashchange", route);
route();
loadBackends();
refreshAccount();
checkoutResult();
