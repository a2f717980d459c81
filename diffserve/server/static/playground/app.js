// diffserve playground: a form over this server's public API (GET /v1/models, POST /v1/images/generations,
// POST /v1/images/edits, POST /v1/videos + GET /v1/videos/{id} + /content), with the key the user types.
// The key is kept in localStorage only when "Remember" is ticked; the history keeps settings and image
// thumbnails, never videos.

const KEY_STORE = "diffserve.playground.key";
const HISTORY_STORE = "diffserve.playground.history";
const HISTORY_SIZE = 12;
const THUMB_EDGE = 96;
const POLL_MS = 250;
const RETRY_MS = 1000;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let model = null; // the card of GET /v1/models: {id, kind, pipeline, defaults}
let running = null; // the generation in flight: {controller, videoId}
let resultUrl = null; // the blob URL of the result on show (revoked when replaced)
let connectTimer = null;

// ---- API -------------------------------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(message, response.status, code);
}

// fetch `path` with the key; JSON body from `json`, multipart from `form`. The parsed JSON answer, or the
// Response itself with `raw`. Errors: the API's message as an ApiError.
async function api(path, { method = "GET", json, form, signal, raw = false } = {}) {
  const headers = authHeaders();
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`the server could not be reached (${e.message})`, 0, "network_error");
  }
  if (!response.ok) throw await errorOf(response);
  return raw ? response : response.json();
}

// ---- messages --------------------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setProgress(percent) {
  const bar = $("progress");
  if (percent === null) bar.removeAttribute("value"); // indeterminate
  else bar.value = percent;
}

// ---- the model and the form ------------------------------------------------------------------------------

async function connect() {
  clearTimeout(connectTimer);
  showError("");
  $("generate").disabled = true;
  try {
    const card = (await api("/v1/models")).data[0];
    if (!card.defaults) {
      $("model-info").textContent = `${card.id}: the model is loading…`;
      connectTimer = setTimeout(connect, RETRY_MS);
      return false;
    }
    model = card;
    configureForm(card);
    return true;
  } catch (e) {
    model = null;
    $("model-info").textContent = "Not connected.";
    showError(e.message);
    return false;
  } finally {
    $("generate").disabled = running !== null || model === null;
  }
}

function setRange(input, { min, max, step, value, placeholder = "" }) {
  input.min = min ?? "";
  input.max = max ?? "";
  if (step !== undefined) input.step = step;
  input.value = value ?? "";
  input.placeholder = placeholder;
}

function configureForm(card) {
  const d = card.defaults;
  const video = card.kind === "video";
  const what = video ? "video" : d.accepts_image ? "image editing" : "image";
  $("model-info").textContent = `${card.id}: ${what} model (${card.pipeline || "unknown pipeline"})`;

  const sizeFromImage = d.size_from_image_area !== null && d.size_from_image_area !== undefined;
  for (const [id, value] of [["width", d.width], ["height", d.height]]) {
    setRange($(id), { min: d.min_size, max: d.max_size, step: d.size_multiple,
                      value: sizeFromImage ? "" : value, placeholder: sizeFromImage ? "from image" : "" });
  }
  $("size-hint").textContent = `Width and height: multiples of ${d.size_multiple} from ${d.min_size} to ` +
    `${d.max_size}` + (sizeFromImage ? "; left empty, the output follows the input image's aspect ratio." : ".");

  const fixed = d.fixed_steps !== null && d.fixed_steps !== undefined;
  setRange($("steps"), { min: 1, value: fixed ? d.fixed_steps : d.num_inference_steps });
  $("steps").disabled = fixed;

  setRange($("guidance"), { min: 0, value: d.guidance_scale });
  $("guidance").disabled = d.guidance === "none";

  $("negative-prompt").disabled = !d.uses_negative_prompt;
  $("negative-hint").textContent = d.uses_negative_prompt ? "" : "This model does not use a negative prompt.";

  $("frames-field").hidden = !video;
  $("frames").disabled = !video;
  if (video) setRange($("frames"), { min: d.min_frames, max: d.max_frames, value: d.num_frames });

  const takesImage = Boolean(d.accepts_image);
  const needsImage = takesImage && (d.needs_image || !video); // edits always need their input image
  $("image-field").hidden = !takesImage;
  $("image").disabled = !takesImage;
  $("image").required = needsImage;
  $("image-hint").textContent = needsImage ? "Required by this model." : "Optional.";
}

// The request fields the form sets; empty fields are left out (the model's default).
function formParams() {
  const params = { prompt: $("prompt").value };
  const text = (id, name) => {
    if (!$(id).disabled && $(id).value.trim() !== "") params[name] = $(id).value;
  };
  const number = (id, name) => {
    if (!$(id).disabled && $(id).value !== "") params[name] = Number($(id).value);
  };
  text("negative-prompt", "negative_prompt");
  number("steps", "num_inference_steps");
  number("guidance", "guidance_scale");
  number("seed", "seed");
  number("frames", "num_frames");
  const w = $("width").value;
  const h = $("height").value;
  if (w !== "" && h !== "") params.size = `${w}x${h}`;
  else if (w !== "" || h !== "") throw new ApiError("give both width and height, or neither", 0, "invalid_size");
  return params;
}

function formData(params, fileField, file) {
  const form = new FormData();
  for (const [name, value] of Object.entries(params)) form.append(name, String(value));
  form.append(fileField, file, file.name);
  return form;
}

// ---- generation ------------------------------------------------------------------------------------------

async function generateImage(params, file, signal) {
  const body = { ...params, model: model.id, n: 1, response_format: "b64_json", output_format: "png" };
  const answer = file
    ? await api("/v1/images/edits", { method: "POST", form: formData(body, "image", file), signal })
    : await api("/v1/images/generations", { method: "POST", json: body, signal });
  const bytes = Uint8Array.from(atob(answer.data[0].b64_json), (c) => c.charCodeAt(0));
  const blob = new Blob([bytes], { type: `image/${answer.output_format}` });
  return { blob, seed: answer.seed, size: answer.size, name: `diffserve-${answer.seed}.${answer.output_format}` };
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
});

async function generateVideo(params, file, signal) {
  const body = { ...params, model: model.id };
  // Not aborted midway: a job created meanwhile would run unseen. Cancelled before its id came, it is deleted here.
  let job = file
    ? await api("/v1/videos", { method: "POST", form: formData(body, "input_reference", file) })
    : await api("/v1/videos", { method: "POST", json: body });
  running.videoId = job.id;
  if (signal.aborted) {
    await api(`/v1/videos/${job.id}`, { method: "DELETE" }).catch(() => {});
    throw signal.reason;
  }
  while (job.status === "queued" || job.status === "in_progress") {
    setProgress(job.progress);
    setStatus(job.status === "queued" ? "Queued…" : `Generating… ${job.progress}%`);
    await sleep(POLL_MS, signal);
    job = await api(`/v1/videos/${job.id}`, { signal });
  }
  if (job.status !== "completed") {
    const error = job.error || {};
    throw new ApiError(error.message || `the video job ended as ${job.status}`, 0, error.code);
  }
  setProgress(job.progress);
  setStatus("Downloading the video…");
  const blob = await (await api(`/v1/videos/${job.id}/content`, { raw: true, signal })).blob();
  return { blob, seed: job.seed, size: job.size, name: `${job.id}.mp4`, frames: job.num_frames, fps: job.fps };
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  if (!model && !(await connect())) return;
  let params;
  try {
    params = formParams();
  } catch (e) {
    showError(e.message);
    return;
  }
  const file = $("image").disabled ? null : $("image").files[0] || null;
  const video = model.kind === "video";
  running = { controller: new AbortController(), videoId: null, cancelled: false };
  $("generate").disabled = true;
  $("cancel").disabled = false;
  setProgress(video ? 0 : null);
  setStatus(video ? "Submitting…" : "Generating…");
  const started = performance.now();
  try {
    const out = video
      ? await generateVideo(params, file, running.controller.signal)
      : await generateImage(params, file, running.controller.signal);
    setProgress(100);
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
    const entry = { kind: model.kind, model: model.id, created: Date.now(),
                    params: { ...params, seed: out.seed, size: out.size, num_frames: out.frames } };
    await showResult(out, entry);
    await remember(entry, video ? null : $("result-image"));
  } catch (e) {
    setProgress(0);
    if (e.name === "AbortError" || running.cancelled) {
      setStatus("Cancelled.");
    } else {
      setStatus("");
      showError(e.message);
    }
  } finally {
    running = null;
    $("generate").disabled = model === null;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (!running || running.cancelled) return;
  running.cancelled = true; // what fails from now on (the job's polls: 404) is the cancellation
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  const { controller, videoId } = running;
  if (videoId) {
    // A job that was queued or running stops on the server too; one already finished is just forgotten.
    try { await api(`/v1/videos/${videoId}`, { method: "DELETE" }); } catch { /* gone already */ }
  }
  controller.abort(new DOMException("cancelled", "AbortError"));
}

// ---- result and history ----------------------------------------------------------------------------------

function describe(entry) {
  const p = entry.params;
  const parts = [p.size, p.num_frames ? `${p.num_frames} frames` : null,
                 p.num_inference_steps !== undefined ? `${p.num_inference_steps} steps` : null,
                 p.guidance_scale !== undefined ? `guidance ${p.guidance_scale}` : null, `seed ${p.seed}`];
  return parts.filter(Boolean).join(", ");
}

function loaded(element, event) {
  return new Promise((resolve) => {
    element.addEventListener(event, resolve, { once: true });
    element.addEventListener("error", resolve, { once: true });
  });
}

async function showResult(out, entry) {
  if (resultUrl) URL.revokeObjectURL(resultUrl);
  resultUrl = URL.createObjectURL(out.blob);
  const image = $("result-image");
  const video = $("result-video");
  const isVideo = entry.kind === "video";
  image.hidden = isVideo;
  video.hidden = !isVideo;
  $("result-caption").textContent = `${entry.params.prompt} (${describe(entry)})`;
  $("download").href = resultUrl;
  $("download").download = out.name;
  $("result").hidden = false;
  if (isVideo) {
    image.removeAttribute("src");
    video.setAttribute("aria-label", `generated video: ${entry.params.prompt}`);
    const ready = loaded(video, "loadeddata");
    video.src = resultUrl;
    video.play().catch(() => {}); // autoplay may be refused; the controls remain
    await ready;
  } else {
    video.removeAttribute("src");
    video.load();
    const ready = loaded(image, "load");
    image.alt = `generated image: ${entry.params.prompt}`;
    image.src = resultUrl;
    await ready;
    // Small outputs are enlarged without smoothing.
    image.classList.toggle("pixelated", image.naturalWidth > 0 && image.naturalWidth < 256);
  }
}

function thumbnail(image) {
  if (!image || !image.naturalWidth) return null;
  const scale = Math.min(1, THUMB_EDGE / Math.max(image.naturalWidth, image.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/webp", 0.8);
}

function readHistory() {
  try {
    const entries = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

function writeHistory(entries) {
  // A full storage drops the oldest entries until the rest fits.
  for (let kept = entries.slice(0, HISTORY_SIZE); ; kept = kept.slice(0, -1)) {
    try {
      localStorage.setItem(HISTORY_STORE, JSON.stringify(kept));
      return;
    } catch {
      if (kept.length === 0) return;
    }
  }
}

async function remember(entry, image) {
  entry.thumb = thumbnail(image);
  writeHistory([entry, ...readHistory()]);
  renderHistory();
}

function reuse(entry) {
  const p = entry.params;
  $("prompt").value = p.prompt || "";
  $("negative-prompt").value = p.negative_prompt || "";
  const [w, h] = (p.size || "x").split("x");
  $("width").value = w;
  $("height").value = h;
  for (const [id, name] of [["steps", "num_inference_steps"], ["guidance", "guidance_scale"], ["seed", "seed"],
                            ["frames", "num_frames"]]) {
    if (p[name] !== undefined && p[name] !== null && !$(id).disabled) $(id).value = p[name];
  }
  $("prompt").focus();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const entry of readHistory()) {
    const item = document.createElement("li");
    if (entry.thumb) {
      const img = document.createElement("img");
      img.src = entry.thumb;
      img.alt = `thumbnail: ${entry.params.prompt}`;
      item.append(img);
    } else {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = entry.kind;
      item.append(badge);
    }
    const text = document.createElement("div");
    const prompt = document.createElement("strong");
    prompt.textContent = entry.params.prompt;
    const details = document.createElement("small");
    details.textContent = `${entry.model}: ${describe(entry)}`;
    text.append(prompt, document.createElement("br"), details);
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Reuse";
    button.setAttribute("aria-label", `Reuse the settings of: ${entry.params.prompt}`);
    button.addEventListener("click", () => reuse(entry));
    item.append(text, button);
    list.append(item);
  }
}

// ---- the key ---------------------------------------------------------------------------------------------

function storeKey() {
  if ($("remember").checked) localStorage.setItem(KEY_STORE, $("api-key").value);
  else localStorage.removeItem(KEY_STORE);
}

function start() {
  const saved = localStorage.getItem(KEY_STORE);
  if (saved !== null) {
    $("api-key").value = saved;
    $("remember").checked = true;
  }
  $("remember").addEventListener("change", storeKey);
  $("api-key").addEventListener("input", storeKey);
  $("api-key").addEventListener("change", connect);
  $("connect").addEventListener("click", connect);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("clear-history").addEventListener("click", () => {
    localStorage.removeItem(HISTORY_STORE);
    renderHistory();
  });
  renderHistory();
  connect();
}

start();
