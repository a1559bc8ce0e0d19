// The v1 API as the page uses it: fetch with the stored API key, errors as ApiError,
// server-sent events read with fetch() (EventSource cannot send an Authorization header).

const KEY_STORAGE = "photo3d.apiKey";
const BASE = new URL("api/v1/", document.baseURI);

/** An error answer of the API ({"error": {"code", "message"}}), or a network failure. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  static async from(response) {
    let code = `http_${response.status}`;
    let message = response.statusText || `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error) ({ code, message } = body.error);
    } catch {
      // Not JSON (a proxy's error page): keep the HTTP status as the code.
    }
    return new ApiError(response.status, code, message);
  }
}

export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // Private mode without storage: the key lives until the page closes.
  }
}

/** Absolute URL of an API path such as "task/<id>/result/glb". */
export function apiUrl(path, params) {
  const url = new URL(path.replace(/^\/?(api\/v1\/)?/, ""), BASE);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url.href;
}

let onUnauthorized = () => {};

/** Called with the ApiError whenever any request answers 401. */
export function handleUnauthorized(callback) {
  onUnauthorized = callback;
}

/** fetch() with the Bearer key; throws ApiError on a network failure or a non-2xx answer. */
export async function apiFetch(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = getApiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(apiUrl(path, init.params), { ...init, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", "The server could not be reached.");
  }
  if (!response.ok) {
    const error = await ApiError.from(response);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return response;
}

export async function apiJson(path, init) {
  const response = await apiFetch(path, init);
  return response.status === 204 ? null : response.json();
}

/**
 * A URL the browser itself can load for an API resource (<img>, <model-viewer>).
 * Without a key that is the resource's own URL; with one the bytes are fetched with the
 * header and handed over as an object URL (the caller revokes it with URL.revokeObjectURL).
 */
export async function resourceUrl(path, { signal } = {}) {
  if (!getApiKey()) return { url: apiUrl(path), revoke() {} };
  const blob = await (await apiFetch(path, { signal })).blob();
  const url = URL.createObjectURL(blob);
  return { url, revoke: () => URL.revokeObjectURL(url) };
}

/**
 * A signed download link from the API (result, preview, turntable) as an absolute URL. The
 * signature is the authorization: the browser, <model-viewer> and AR Quick Look load it
 * without a key header, so it works when the server requires keys.
 */
export function signedUrl(link) {
  if (/^https?:/i.test(link)) return link;
  return new URL(link.replace(/^\/?(api\/v1\/)?/, ""), BASE).href;
}

/** The file name from a Content-Disposition header, if any. */
function dispositionName(header) {
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(header || "");
  return match ? decodeURIComponent(match[1]) : null;
}

/**
 * Download an API file (fetched first, so errors can be shown in words), named `filename`
 * or the server's file name with `prefix` in front.
 */
export async function downloadFile(path, filename, prefix = "") {
  const response = await apiFetch(path);
  await saveResponse(response, filename, prefix);
}

/** Download a signed link (no key header: the link carries its own signature). */
export async function downloadSigned(link, filename, prefix = "", fallback = "") {
  let response;
  try {
    response = await fetch(signedUrl(link));
  } catch (error) {
    throw new ApiError(0, "network_error", "The server could not be reached.");
  }
  if (!response.ok) throw await ApiError.from(response);
  await saveResponse(response, filename, prefix, fallback);
}

async function saveResponse(response, filename, prefix, fallback = "") {
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  const served = dispositionName(response.headers.get("Content-Disposition"));
  // A redirect to a bucket on another origin may hide the header: fall back to our own name.
  link.download = filename || (served ? prefix + served : fallback);
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/**
 * Read a server-sent event stream. Calls onEvent({event, data, id}) per event and returns
 * when the server ends the stream. Follows the parsing rules of the HTML standard.
 */
export async function readEventStream(path, { signal, onEvent }) {
  const response = await apiFetch(path, {
    headers: { Accept: "text/event-stream" },
    cache: "no-store",
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let event = { event: "message", data: [], id: null };
  const dispatch = () => {
    if (event.data.length) {
      onEvent({ event: event.event, data: event.data.join("\n"), id: event.id });
    }
    event = { event: "message", data: [], id: null };
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    const lines = pending.split(/\r\n|\r|\n/);
    pending = lines.pop(); // an incomplete last line waits for more bytes
    for (const line of lines) {
      if (line === "") {
        dispatch();
        continue;
      }
      if (line.startsWith(":")) continue; // comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "event") event.event = val;
      else if (field === "data") event.data.push(val);
      else if (field === "id") event.id = val;
    }
  }
}

/**
 * POST a multipart form with upload progress (fetch cannot report it): onProgress(0..1).
 * Resolves with the JSON answer; rejects with ApiError like apiFetch.
 */
export function apiUpload(path, form, { onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", apiUrl(path));
    const key = getApiKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.responseType = "text";
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    };
    xhr.onerror = () =>
      reject(new ApiError(0, "network_error", "The server could not be reached."));
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // handled below
      }
      if (xhr.status >= 200 && xhr.status < 300 && body) {
        resolve(body);
        return;
      }
      const error =
        body && body.error
          ? new ApiError(xhr.status, body.error.code, body.error.message)
          : new ApiError(xhr.status, `http_${xhr.status}`, xhr.statusText || `HTTP ${xhr.status}`);
      if (xhr.status === 401) onUnauthorized(error);
      reject(error);
    };
    xhr.send(form);
  });
}
