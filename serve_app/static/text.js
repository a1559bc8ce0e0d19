// Everything the page says about the API's machine words: stages, statuses, error codes.

const STAGES = {
  loading: "Opening your photo",
  segmenting: "Finding the object in the photo",
  "removing background": "Removing the background",
  meshing: "Building the 3D shape",
  sampling: "Generating the 3D structure",
  texturing: "Painting the surface",
  "baking texture": "Baking the texture",
  "baking PBR textures": "Baking the textures",
  "saving gaussians": "Saving extra data",
  exporting: "Saving the model files",
  "rendering preview": "Drawing a preview",
  done: "Finishing",
  "fake-waiting": "Warming up (test backend)",
};

/** A stage name from the server in plain words. */
export function stageText(stage) {
  if (!stage) return "";
  if (STAGES[stage]) return STAGES[stage];
  const words = String(stage).replace(/[_-]+/g, " ").trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export const STATUS_TEXT = {
  queued: "Waiting",
  running: "Working",
  succeeded: "Ready",
  failed: "Failed",
  canceled: "Canceled",
};

export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// The output formats come from the server's registry (serve_app/formats.py).
export { FORMATS } from "./formats.js";

const TRY_OTHER = "Pick another photo and try again.";
const ADVANCED = "Check the values under “Advanced options”.";

// code -> [title, what to do next]
const ERRORS = {
  unsupported_image_type: [
    "That file isn’t a photo we can read",
    "Use a JPEG, PNG, WebP, HEIC or AVIF image.",
  ],
  not_an_image: [
    "That file isn’t a photo",
    "Choose a JPEG, PNG, WebP, HEIC or AVIF image of the object you want in 3D.",
  ],
  unsupported_media_type: ["That file type isn’t supported", "Use a JPEG, PNG, WebP, HEIC or AVIF image."],
  image_too_large: [
    "The photo is too large",
    "Use a photo under 20 MB: export it as JPEG or make it smaller, then try again.",
  ],
  request_too_large: [
    "The upload is too large",
    "Send fewer or smaller photos (each under 20 MB).",
  ],
  payload_too_large: ["The upload is too large", "Send fewer or smaller photos."],
  image_too_many_pixels: [
    "The photo has too many pixels",
    "Resize it (for example to 4000 pixels on the long side) and try again.",
  ],
  image_too_small: [
    "The photo is too small",
    "Use a larger photo where the object is clearly visible.",
  ],
  corrupt_image: [
    "The photo couldn’t be opened",
    "The file looks damaged or incomplete. Save or export it again, or pick another photo.",
  ],
  empty_image: ["The file is empty", TRY_OTHER],
  invalid_image: ["The photo couldn’t be used", TRY_OTHER],
  animated_image: ["Animated images aren’t supported", "Use a still photo (a single frame)."],
  no_object_found: [
    "We couldn’t find an object in the photo",
    "Photograph one object, centred and filling most of the frame, against a plain background " +
      "that contrasts with it. If the object already fills the photo, set “Remove background” " +
      "to “No” under Advanced options.",
  ],
  missing_image: ["No photo was sent", "Add a photo first."],
  no_images: ["No photo was sent", "Add a photo first."],
  too_many_images: ["Too many photos", "Use at most 8 photos, all of the same object."],
  multi_image_unsupported: [
    "This backend takes one photo",
    "Remove the extra photos, or choose a backend that accepts several under Advanced options.",
  ],
  unknown_backend: [
    "That backend isn’t available on this server",
    "Choose another backend under Advanced options.",
  ],
  backend_unavailable: [
    "That backend can’t run on this server right now",
    "Choose another backend under Advanced options, or ask the server’s administrator.",
  ],
  backend_not_loaded: [
    "The backend isn’t ready",
    "Wait a minute and try again, or choose another backend.",
  ],
  weights_missing: [
    "The backend’s model files aren’t installed",
    "Choose another backend, or ask the administrator to fetch the weights.",
  ],
  gpu_stack_missing: [
    "The backend needs a GPU this server doesn’t have",
    "Choose the cpu backend under Advanced options.",
  ],
  cuda_unavailable: [
    "The backend needs a GPU this server doesn’t have",
    "Choose the cpu backend under Advanced options.",
  ],
  gpu_out_of_memory: [
    "The server ran out of GPU memory",
    "Try a smaller texture size or face limit, or try again later.",
  ],
  invalid_option: ["One of the options isn’t valid", ADVANCED],
  invalid_options: ["One of the options isn’t valid", ADVANCED],
  unsupported_option: ["This backend doesn’t support one of the options", ADVANCED],
  invalid_request: ["The request wasn’t valid", ADVANCED],
  unknown_format: ["That file format isn’t available", "Download GLB, which always exists."],
  conversion_failed: [
    "We couldn’t make that file format",
    "Download GLB instead, or try again in a moment.",
  ],
  export_failed: ["We couldn’t save the model", "Try again, or try another photo."],
  generation_failed: [
    "The 3D model couldn’t be made",
    "Try another photo: one object, well lit, on a plain background.",
  ],
  backend_error: [
    "The 3D model couldn’t be made",
    "Try again. If it keeps failing, try another photo or backend.",
  ],
  worker_lost: [
    "The worker making your model stopped",
    "The server retries on its own; if it gave up, start the model again.",
  ],
  task_not_found: [
    "Model not found",
    "It may have been deleted, or it belongs to a different API key.",
  ],
  not_found: ["Not found", "It may have been deleted."],
  task_not_ready: ["The model isn’t ready yet", "Wait until it has finished."],
  task_finished: ["The task has already ended", "Nothing to cancel."],
  service_unavailable: ["The server is busy or starting up", "Wait a moment and try again."],
  artifact_store_error: ["The server couldn’t store the files", "Wait a moment and try again."],
  rate_limited: ["Too many requests", "Wait a minute, then try again."],
  unauthorized: ["An API key is needed", "Open “Account” and paste your API key."],
  missing_api_key: ["An API key is needed", "Open “Account” and paste your API key."],
  invalid_api_key: [
    "The API key wasn’t accepted",
    "Open “Account” and check your API key (it starts with p3d_). It may have been revoked.",
  ],
  forbidden: ["That isn’t allowed with this key", "Use a key of an account that may do this."],
  too_many_active_tasks: [
    "You have many models in progress",
    "Wait for one to finish (or cancel one), then try again.",
  ],
  result_expired: [
    "This model’s files have expired",
    "Results are kept for a limited time. Make the model again from the photo.",
  ],
  insufficient_credits: ["Not enough credits", "Buy credits under “Account”, then try again."],
  payment_required: ["Not enough credits", "Buy credits under “Account”, then try again."],
  network_error: [
    "The server can’t be reached",
    "Check your connection. If you run photo3d yourself, check that it is still running.",
  ],
  viewer_missing: [
    "The 3D viewer isn’t installed",
    "Run “make run” (it installs the viewer), or download the model below.",
  ],
  internal_error: [
    "Something went wrong on the server",
    "Try again. If it keeps happening, the server log has the details.",
  ],
};

/** {title, advice, detail} for an error code and the server's message. */
export function explainError(code, message, status) {
  let entry = ERRORS[code];
  if (!entry && status === 401) entry = ERRORS.unauthorized;
  if (!entry && status === 402) entry = ERRORS.payment_required;
  if (!entry && status === 403) entry = ERRORS.forbidden;
  if (!entry && status === 410) entry = ERRORS.result_expired;
  if (!entry && status === 429) entry = ERRORS.rate_limited;
  if (!entry && status >= 500) entry = ERRORS.internal_error;
  if (!entry) entry = ["Something went wrong", "Try again, or try another photo."];
  return { title: entry[0], advice: entry[1], detail: message || "", code };
}

/** 0:07, 1:05, 1:02:03 */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.floor(seconds || 0));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}

export function formatBytes(bytes) {
  if (bytes == null) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

const DATE = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

export function formatDate(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : DATE.format(date);
}

const SHORT = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "numeric",
  minute: "2-digit",
});

/** "Nov 26, 9:30 AM": the year only when it is not this year. */
export function formatShortDate(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return date.getFullYear() === new Date().getFullYear() ? SHORT.format(date) : DATE.format(date);
}
