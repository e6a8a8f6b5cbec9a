/* maskrcnn-serving's web page: drop a photo, see its masks. Plain JavaScript: no framework, no build step, nothing
 * loaded from outside the server (the page's Content-Security-Policy would refuse it anyway).
 *
 * Flow:
 *   1. GET /model: class names and colours (computed once, in Python: maskrcnn_serving.visualize.class_color), the
 *      model's test-time resize, whether instance search is available.
 *   2. The user gives a photo (file picker, drag and drop, paste). The browser decodes it; when it is larger than
 *      what the model's resize keeps (short edge PREPROC.TEST_SHORT_EDGE_SIZE, long edge at most PREPROC.MAX_SIZE),
 *      it is drawn at that size on a canvas and encoded as JPEG, so a 3 MB phone photo is sent as ~100 KB.
 *   3. POST /invocations once, with a low score threshold: the score slider and the class checkboxes then filter
 *      in the browser without asking again. Masks come as COCO RLE and are decoded here.
 *   4. Boxes and masks, in the pixels of the image sent, are scaled back and drawn on the original photo.
 *
 * The DOM contract (README, "The web page"), for scripts and tests: the upload control is input[type=file];
 * #status has data-state = idle | uploading | done | error and a readable message; each instance shown is one
 * element with data-instance (its index in the response), data-category and data-score; input#score-threshold
 * (0 to 1) hides instances scoring at or below it, as the API's score_threshold does.
 */
"use strict";

// What the page asks for: everything above a low score once, then the slider filters (no new request).
const LOW_SCORE_THRESHOLD = 0.05;
const MAX_DETECTIONS = 100;
const NEIGHBOURS = 8; // similar indexed instances per detection, when the server has an index
const JPEG_QUALITY = 0.9;
// The canvas is drawn at the photo's resolution, but at least DISPLAY_MIN_EDGE and at most DISPLAY_MAX_EDGE pixels
// on its long edge (then CSS fits it on the screen): small photos get readable labels, large ones a cheap redraw.
const DISPLAY_MIN_EDGE = 800;
const DISPLAY_MAX_EDGE = 1600;
// File types that POST /invocations decodes; other images the browser can read (GIF, AVIF...) are re-encoded.
const SERVER_IMAGE_TYPES = new Set(["image/jpeg", "image/png", "image/bmp", "image/webp"]);
const MODEL_RETRY_MS = 2000;

const byId = (id) => document.getElementById(id);
const elements = {
  summary: byId("model-summary"),
  dropZone: byId("drop-zone"),
  fileInput: byId("file-input"),
  status: byId("status"),
  stats: byId("upload-stats"),
  frame: byId("canvas-frame"),
  canvas: byId("canvas"),
  threshold: byId("score-threshold"),
  thresholdValue: byId("score-value"),
  thresholdNote: byId("score-note"),
  classFilters: byId("class-filters"),
  downloadJson: byId("download-json"),
  downloadSent: byId("download-sent"),
  instanceCount: byId("instance-count"),
  instances: byId("instances"),
  details: byId("details"),
  detailsFields: byId("details-fields"),
  neighboursSection: byId("neighbours-section"),
  neighbours: byId("neighbours"),
};

const state = {
  model: null, // the GET /model document
  modelReady: null, // a promise of it (uploads wait for it while the model loads)
  uploadSequence: 0, // only the latest upload may update the page
  waitingForModel: false, // a photo was given before GET /model answered
  result: null, // the latest successful upload: see showResult
  threshold: 0.5,
  hiddenClasses: new Set(), // class names unticked by the user (kept across uploads)
  selected: null, // the instance clicked (stays highlighted)
  hovered: null, // the instance under the pointer
};

// ------------------------------------------------------------------------------------------------ status

/** The status line: data-state (idle | uploading | done | error) and a message; data-upload is the number of the
 * photo it is about (1, 2, ... in the order they were given), so that a script can wait for its own. */
function setStatus(stateName, message) {
  elements.status.dataset.state = stateName;
  elements.status.dataset.upload = String(state.uploadSequence);
  elements.status.textContent = message;
}

function formatBytes(bytes) {
  if (bytes < 1000) return `${bytes} B`;
  if (bytes < 1000 * 1000) return `${(bytes / 1000).toFixed(1)} kB`;
  return `${(bytes / 1000 / 1000).toFixed(2)} MB`;
}

function formatSeconds(milliseconds) {
  return milliseconds < 1000 ? `${Math.round(milliseconds)} ms` : `${(milliseconds / 1000).toFixed(2)} s`;
}

const sleep = (milliseconds) => new Promise((resolve) => setTimeout(resolve, milliseconds));

// ------------------------------------------------------------------------------------------------ server

/** A readable message for a non-2xx answer: what happened, the HTTP status and the server's own message. */
async function serverErrorMessage(response) {
  const titles = {
    400: "The server could not read this image",
    404: "The server has no such route",
    413: "Too large for the server",
    415: "The server does not accept this type of file",
    422: "The server cannot process an image this large",
    500: "The server failed",
    503: "The model is not ready yet",
    504: "The server ran out of time",
  };
  let code = "";
  let message = "";
  try {
    const body = await response.json();
    code = body?.error?.code ?? "";
    message = body?.error?.message ?? "";
  } catch {
    // Not our JSON (e.g. a proxy's HTML page): the status says enough.
  }
  const title = titles[response.status] ?? "The server answered with an error";
  const status = `HTTP ${response.status}${code ? `, ${code}` : ""}`;
  return `${title} (${status}).${message ? ` ${message}` : ""}`;
}

/** GET /model, retried while the model loads (503) or the server cannot be reached. */
async function loadModel() {
  for (;;) {
    let message;
    try {
      const response = await fetch("/model", { headers: { Accept: "application/json" } });
      if (response.ok) return await response.json();
      message = await serverErrorMessage(response);
    } catch (error) {
      message = `Could not reach the server (${error.message}).`;
    }
    // Loading is normal for a minute after start-up: say so, keep the page usable (drops wait for the model).
    const retry = `Trying again in ${MODEL_RETRY_MS / 1000} s`;
    if (state.waitingForModel) setStatus("uploading", `${message} ${retry}; your photo is sent once it is ready.`);
    else setStatus("idle", `${message} ${retry}; you can drop a photo already.`);
    await sleep(MODEL_RETRY_MS);
  }
}

function showModel(model) {
  state.model = model;
  const search = model.search.available ? `, search over ${model.search.indexed ?? "?"} indexed instances` : "";
  elements.summary.textContent =
    `${model.class_names.length} classes (${model.class_names.join(", ")}); ` +
    `${model.backend} backend, ${model.precision}; photos are sent at most ` +
    `${model.resize.short_edge} px on the short edge and ${model.resize.max_size} px on the long edge${search}.`;
  setThreshold(model.default_score_threshold);
}

// ------------------------------------------------------------------------------------------------ the upload

/** The size the model resizes a width x height image to: a port of modeling/preprocess.py resized_shape. */
function modelInputSize(width, height, resize) {
  const scale = resize.short_edge / Math.min(width, height);
  let newWidth;
  let newHeight;
  if (height < width) {
    [newHeight, newWidth] = [resize.short_edge, scale * width];
  } else {
    [newHeight, newWidth] = [scale * height, resize.short_edge];
  }
  if (Math.max(newHeight, newWidth) > resize.max_size) {
    const shrink = resize.max_size / Math.max(newHeight, newWidth);
    newHeight *= shrink;
    newWidth *= shrink;
  }
  return { width: Math.max(1, Math.floor(newWidth + 0.5)), height: Math.max(1, Math.floor(newHeight + 0.5)) };
}

function canvasToBlob(canvas, type, quality) {
  return new Promise((resolve, reject) =>
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the browser could not encode it"))), type,
      quality));
}

/** What to send for a decoded photo: the file itself when the model would not shrink it and the server takes it
 * (its type, its size), else the photo drawn at the model's input size (never larger than the photo) as a JPEG. */
async function prepareUpload(file, bitmap, model) {
  const target = modelInputSize(bitmap.width, bitmap.height, model.resize);
  const shrink = target.width < bitmap.width || target.height < bitmap.height;
  if (!shrink && SERVER_IMAGE_TYPES.has(file.type) && file.size <= model.max_request_bytes) {
    return { blob: file, type: file.type, width: bitmap.width, height: bitmap.height, reencoded: false };
  }
  const size = shrink ? target : { width: bitmap.width, height: bitmap.height };
  const canvas = document.createElement("canvas");
  canvas.width = size.width;
  canvas.height = size.height;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high"; // a proper low-pass filter for large reductions, not point sampling
  context.drawImage(bitmap, 0, 0, size.width, size.height);
  const blob = await canvasToBlob(canvas, "image/jpeg", JPEG_QUALITY);
  return { blob, type: "image/jpeg", width: size.width, height: size.height, reencoded: true };
}

async function handleFile(file) {
  if (!file) return;
  const sequence = ++state.uploadSequence;
  const started = performance.now();
  setStatus("uploading", `Reading ${file.name || "the pasted image"}…`);
  let bitmap;
  try {
    // Decodes in the browser and applies the EXIF orientation, as the server does.
    bitmap = await createImageBitmap(file);
  } catch {
    clearResult();
    setStatus("error", `This file is not an image your browser can read (${file.type || "unknown type"}, ` +
      `${formatBytes(file.size)}). Try a JPEG, PNG or WebP photo.`);
    return;
  }
  try {
    if (!state.model) {
      setStatus("uploading", "Waiting for the server's model to load…");
      state.waitingForModel = true;
      await state.modelReady;
      state.waitingForModel = false;
    }
    const upload = await prepareUpload(file, bitmap, state.model);
    const prepared = performance.now();
    if (sequence !== state.uploadSequence) {
      bitmap.close();
      return;
    }
    setStatus("uploading", `Sending ${formatBytes(upload.blob.size)} (${upload.width} × ${upload.height})…`);
    const query = new URLSearchParams({
      format: state.model.has_masks ? "coco" : "boxes",
      score_threshold: String(LOW_SCORE_THRESHOLD),
      max_detections: String(MAX_DETECTIONS),
    });
    if (state.model.search.available) query.set("neighbours", String(NEIGHBOURS));
    let response;
    try {
      response = await fetch(`/invocations?${query}`, {
        method: "POST",
        headers: { "Content-Type": upload.type, Accept: "application/json" },
        body: upload.blob,
      });
    } catch (error) {
      throw new Error(`Could not reach the server (${error.message}).`);
    }
    if (!response.ok) throw new Error(await serverErrorMessage(response));
    const text = await response.text();
    const answered = performance.now();
    let answer;
    try {
      answer = JSON.parse(text);
    } catch {
      throw new Error(`The server's answer is not JSON (HTTP ${response.status}, ${formatBytes(text.length)}).`);
    }
    if (sequence !== state.uploadSequence) {
      bitmap.close();
      return;
    }
    showResult({
      file, bitmap, upload, text, answer,
      prepareMs: prepared - started, roundTripMs: answered - prepared, totalMs: performance.now() - started,
    });
  } catch (error) {
    bitmap.close();
    if (sequence !== state.uploadSequence) return;
    clearResult();
    setStatus("error", error.message);
  }
}

// ------------------------------------------------------------------------------------------------ masks

/** Run lengths of pycocotools' compressed RLE string: alternately zeros and ones (starting with zeros), over the
 * image in column-major order. A port of rleFrString (pycocotools maskApi.c): each count is written in chunks of
 * 5 bits (+48, so printable), 0x20 marks "more chunks follow", the 0x10 bit of the last chunk is the sign, and from
 * the fourth count on each is stored as its difference from the count two places before. Arithmetic instead of
 * bit shifts: JavaScript's shifts are 32-bit. */
function decodeCocoCounts(text) {
  const counts = [];
  let position = 0;
  while (position < text.length) {
    let value = 0;
    let chunk = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(position) - 48;
      value += (c & 0x1f) * 2 ** (5 * chunk);
      more = (c & 0x20) !== 0;
      position += 1;
      chunk += 1;
      if (!more && (c & 0x10)) value -= 2 ** (5 * chunk);
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

/** The mask of a COCO RLE as its bounding crop: {x0, y0, width, height, data (row-major 0/1), area}, in the
 * pixels of the image sent; null when it is empty. Only set pixels are visited, never the whole image. */
function decodeMask(segmentation) {
  const [imageHeight] = segmentation.size;
  const runs = decodeCocoCounts(segmentation.counts);
  let minX = Infinity;
  let maxX = -1;
  let minY = Infinity;
  let maxY = -1;
  let position = 0;
  for (let i = 0; i < runs.length; i += 1) {
    if (i % 2 === 1 && runs[i] > 0) { // a run of ones, down one column and possibly on into the next ones
      const first = position;
      const last = position + runs[i] - 1;
      const firstColumn = Math.floor(first / imageHeight);
      const lastColumn = Math.floor(last / imageHeight);
      minX = Math.min(minX, firstColumn);
      maxX = Math.max(maxX, lastColumn);
      if (firstColumn === lastColumn) {
        minY = Math.min(minY, first % imageHeight);
        maxY = Math.max(maxY, last % imageHeight);
      } else { // it reaches the bottom of one column and the top of the next
        minY = 0;
        maxY = imageHeight - 1;
      }
    }
    position += runs[i];
  }
  if (maxX < 0) return null;
  const width = maxX - minX + 1;
  const height = maxY - minY + 1;
  const data = new Uint8Array(width * height);
  let area = 0;
  position = 0;
  for (let i = 0; i < runs.length; i += 1) {
    if (i % 2 === 1) {
      for (let p = position; p < position + runs[i]; p += 1) {
        const x = Math.floor(p / imageHeight);
        const y = p - x * imageHeight;
        data[(y - minY) * width + (x - minX)] = 1;
      }
      area += runs[i];
    }
    position += runs[i];
  }
  return { x0: minX, y0: minY, width, height, data, area };
}

/** A canvas of the mask's crop: the class colour where the mask is set, transparent elsewhere. */
function maskCanvas(mask, color) {
  const canvas = document.createElement("canvas");
  canvas.width = mask.width;
  canvas.height = mask.height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(mask.width, mask.height);
  const [red, green, blue] = hexToRgb(color);
  for (let i = 0; i < mask.data.length; i += 1) {
    if (mask.data[i]) {
      pixels.data[4 * i] = red;
      pixels.data[4 * i + 1] = green;
      pixels.data[4 * i + 2] = blue;
      pixels.data[4 * i + 3] = 255;
    }
  }
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function hexToRgb(hex) {
  const value = parseInt(hex.slice(1), 16);
  return [(value >> 16) & 255, (value >> 8) & 255, value & 255];
}

// ------------------------------------------------------------------------------------------------ results

function clearResult() {
  const previous = state.result;
  if (previous) {
    previous.bitmap.close();
    URL.revokeObjectURL(previous.sentUrl);
  }
  state.result = null;
  state.selected = null;
  state.hovered = null;
  elements.frame.hidden = true;
  elements.stats.hidden = true;
  elements.downloadJson.disabled = true;
  elements.downloadSent.hidden = true;
  renderInstances();
}

/** Keep a successful answer, its instances in photo pixels, and show it. */
function showResult({ file, bitmap, upload, text, answer, prepareMs, roundTripMs, totalMs }) {
  clearResult();
  // The answer is in the pixels of the image sent: these factors take it back to the photo.
  const scaleX = bitmap.width / upload.width;
  const scaleY = bitmap.height / upload.height;
  const instances = answer.annotations.map((annotation, index) => {
    const color = state.model.class_colors[annotation.category_name] ?? "#ff00ff";
    const [x, y, width, height] = annotation.bbox;
    const mask = annotation.segmentation ? decodeMask(annotation.segmentation) : null;
    return {
      index,
      annotation,
      name: annotation.category_name,
      score: annotation.score,
      color,
      box: { x: x * scaleX, y: y * scaleY, width: width * scaleX, height: height * scaleY },
      mask,
      maskCanvas: mask ? maskCanvas(mask, color) : null,
    };
  });
  const stem = (file.name || "pasted").replace(/\.[^.]*$/, "");
  const sentUrl = URL.createObjectURL(upload.blob);
  state.result = { file, bitmap, upload, text, instances, scaleX, scaleY, stem, sentUrl };

  const longEdge = Math.max(bitmap.width, bitmap.height);
  const displayScale = Math.min(DISPLAY_MAX_EDGE / longEdge, Math.max(1, DISPLAY_MIN_EDGE / longEdge));
  elements.canvas.width = Math.max(1, Math.round(bitmap.width * displayScale));
  elements.canvas.height = Math.max(1, Math.round(bitmap.height * displayScale));
  elements.frame.hidden = false;

  const sentKind = upload.reencoded ? `${upload.width} × ${upload.height} JPEG` : "the file as it is";
  elements.stats.textContent =
    `Sent ${formatBytes(upload.blob.size)} (${sentKind}) for a ${formatBytes(file.size)} file ` +
    `(${bitmap.width} × ${bitmap.height}); the server answered in ${formatSeconds(roundTripMs)} ` +
    `(${formatSeconds(totalMs)} in all, ${formatSeconds(prepareMs)} to prepare the upload).`;
  Object.assign(elements.stats.dataset, {
    bytesSent: upload.blob.size, fileBytes: file.size, sentWidth: upload.width, sentHeight: upload.height,
    roundTripMs: Math.round(roundTripMs),
  });
  elements.stats.hidden = false;
  elements.downloadJson.disabled = false;
  elements.downloadSent.href = sentUrl;
  elements.downloadSent.download = `${stem}.sent.${upload.type.split("/")[1]}`;
  elements.downloadSent.hidden = false;
  renderInstances();
  const shown = visibleInstances().length;
  setStatus("done", `Found ${instances.length} object${instances.length === 1 ? "" : "s"} scoring above ` +
    `${LOW_SCORE_THRESHOLD}; ${shown} shown with the filters below. Answered in ${formatSeconds(roundTripMs)}.`);
}

/** The instances that pass the filters, in the response's order (descending score). Like the API's
 * score_threshold, an instance is shown when its score is strictly above the slider's value. */
function visibleInstances() {
  if (!state.result) return [];
  return state.result.instances.filter(
    (instance) => instance.score > state.threshold && !state.hiddenClasses.has(instance.name));
}

function setThreshold(value) {
  state.threshold = Number(value);
  elements.threshold.value = String(value);
  elements.thresholdValue.textContent = state.threshold.toFixed(2);
  elements.thresholdNote.textContent = state.threshold < LOW_SCORE_THRESHOLD
    ? `The page asked the server for scores above ${LOW_SCORE_THRESHOLD}; lower ones were not sent.` : "";
  renderInstances();
}

// ------------------------------------------------------------------------------------------------ rendering

function renderInstances() {
  const visible = visibleInstances();
  if (state.selected && !visible.includes(state.selected)) state.selected = null;
  if (state.hovered && !visible.includes(state.hovered)) state.hovered = null;
  renderClassFilters();
  elements.instances.replaceChildren(...visible.map(instanceItem));
  elements.instanceCount.textContent = state.result ? `(${visible.length} of ${state.result.instances.length})` : "";
  renderDetails();
  draw();
}

function swatch(color) {
  const element = document.createElement("span");
  element.className = "swatch";
  element.style.backgroundColor = color; // a CSSOM property, not an inline style attribute: allowed by the CSP
  return element;
}

function renderClassFilters() {
  const instances = state.result ? state.result.instances : [];
  const present = state.model ? state.model.class_names.filter((name) => instances.some((i) => i.name === name)) : [];
  elements.classFilters.replaceChildren(...present.map((name) => {
    const shown = instances.filter((i) => i.name === name && i.score > state.threshold).length;
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = name;
    box.checked = !state.hiddenClasses.has(name);
    box.addEventListener("change", () => {
      if (box.checked) state.hiddenClasses.delete(name);
      else state.hiddenClasses.add(name);
      renderInstances();
    });
    label.append(box, swatch(state.model.class_colors[name]), ` ${name} (${shown})`);
    return label;
  }));
}

function instanceItem(instance) {
  const item = document.createElement("li");
  item.tabIndex = 0;
  item.dataset.instance = String(instance.index);
  item.dataset.category = instance.name;
  item.dataset.score = String(instance.score);
  const { x, y, width, height } = instance.box;
  item.dataset.bbox = [x, y, width, height].map((v) => v.toFixed(1)).join(",");
  item.classList.toggle("selected", instance === state.selected);
  item.setAttribute("aria-selected", String(instance === state.selected));
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = instance.score.toFixed(3);
  item.append(swatch(instance.color), ` ${instance.name} `, score);
  item.addEventListener("mouseenter", () => setHovered(instance));
  item.addEventListener("mouseleave", () => setHovered(null));
  item.addEventListener("click", () => toggleSelected(instance));
  item.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      toggleSelected(instance);
    }
  });
  return item;
}

function setHovered(instance) {
  if (state.hovered === instance) return;
  state.hovered = instance;
  for (const item of elements.instances.children) {
    item.classList.toggle("hovered", instance !== null && item.dataset.instance === String(instance.index));
  }
  renderDetails();
  draw();
}

function toggleSelected(instance) {
  state.selected = state.selected === instance ? null : instance;
  for (const item of elements.instances.children) {
    const selected = state.selected !== null && item.dataset.instance === String(state.selected.index);
    item.classList.toggle("selected", selected);
    item.setAttribute("aria-selected", String(selected));
  }
  renderDetails();
  draw();
}

/** The details of the instance under the pointer, else of the one selected. */
function renderDetails() {
  const instance = state.hovered ?? state.selected;
  elements.details.hidden = !instance;
  elements.details.dataset.forInstance = instance ? String(instance.index) : "";
  if (!instance) return;
  const { scaleX, scaleY } = state.result;
  const { x, y, width, height } = instance.box;
  const fields = [
    ["Class", instance.name],
    ["Score", instance.score.toFixed(5)],
    ["Box (x, y, w, h)", [x, y, width, height].map((v) => Math.round(v)).join(", ") + " px of the photo"],
    ["Mask area", instance.mask ? `${Math.round(instance.mask.area * scaleX * scaleY)} px of the photo` : "none"],
    ["Index in the response", String(instance.index)],
  ];
  elements.detailsFields.replaceChildren(...fields.flatMap(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const description = document.createElement("dd");
    description.textContent = value;
    return [term, description];
  }));
  const neighbours = Array.isArray(instance.annotation.neighbours) ? instance.annotation.neighbours : null;
  elements.neighboursSection.hidden = neighbours === null;
  elements.neighbours.replaceChildren(...(neighbours ?? []).map(neighbourItem));
}

/** One similar indexed instance: its thumbnail (served by index id only), class, score, source image, distance. */
function neighbourItem(neighbour) {
  const item = document.createElement("li");
  item.dataset.neighbour = String(neighbour.id);
  item.dataset.distance = String(neighbour.distance);
  if (Number.isInteger(neighbour.id) && neighbour.id >= 0) {
    const thumbnail = document.createElement("img");
    thumbnail.src = `/index/thumbnail/${neighbour.id}`;
    thumbnail.alt = `${neighbour.category_name} from ${neighbour.image}`;
    thumbnail.loading = "lazy";
    item.append(thumbnail);
  }
  const text = document.createElement("span");
  text.textContent = `${neighbour.category_name} ${Number(neighbour.score).toFixed(2)} in ${neighbour.image}, ` +
    `distance ${Number(neighbour.distance).toFixed(3)}`;
  item.append(text);
  return item;
}

/** The photo with the visible instances: masks, then boxes and labels; the lowest score first, so that the most
 * confident instance ends on top (as maskrcnn_serving.visualize draws). A highlighted instance stands out. */
function draw() {
  const result = state.result;
  if (!result) return;
  const canvas = elements.canvas;
  const context = canvas.getContext("2d");
  const k = canvas.width / result.bitmap.width; // photo pixels -> canvas pixels
  context.globalAlpha = 1;
  context.drawImage(result.bitmap, 0, 0, canvas.width, canvas.height);
  const focus = state.hovered ?? state.selected;
  const visible = visibleInstances().reverse();
  context.imageSmoothingEnabled = true; // soft edges where a mask is scaled up to the photo
  for (const instance of visible) {
    if (!instance.mask) continue;
    context.globalAlpha = focus === null ? 0.45 : instance === focus ? 0.65 : 0.3;
    const { x0, y0, width, height } = instance.mask;
    context.drawImage(instance.maskCanvas, x0 * result.scaleX * k, y0 * result.scaleY * k,
      width * result.scaleX * k, height * result.scaleY * k);
  }
  context.globalAlpha = 1;
  const lineWidth = Math.max(1, Math.round(Math.min(canvas.width, canvas.height) / 400));
  const fontSize = Math.round(Math.min(Math.max(Math.min(canvas.width, canvas.height) / 40, 11), 28));
  context.font = `${fontSize}px system-ui, sans-serif`;
  context.textBaseline = "top";
  for (const instance of visible) {
    if (focus !== null && instance !== focus) context.globalAlpha = 0.5;
    const { x, y, width, height } = instance.box;
    context.strokeStyle = instance.color;
    context.lineWidth = instance === focus ? lineWidth * 3 : lineWidth;
    context.strokeRect(x * k, y * k, width * k, height * k);
    drawLabel(context, `${instance.name} ${instance.score.toFixed(2)}`, x * k, y * k, instance.color, fontSize);
    context.globalAlpha = 1;
  }
}

/** A label on a box of the class colour just above (x, y), or just below it at the top edge; black or white ink
 * by the colour's luminance, as visualize.py does. */
function drawLabel(context, text, x, y, color, fontSize) {
  const padding = 2;
  const width = context.measureText(text).width + 2 * padding;
  const height = fontSize + 2 * padding;
  const left = Math.min(Math.max(x, 0), Math.max(context.canvas.width - width, 0));
  const top = y - height >= 0 ? y - height : Math.min(y, context.canvas.height - height);
  context.fillStyle = color;
  context.fillRect(left, top, width, height);
  const [red, green, blue] = hexToRgb(color);
  context.fillStyle = 0.299 * red + 0.587 * green + 0.114 * blue > 150 ? "#000" : "#fff";
  context.fillText(text, left + padding, top + padding);
}

/** The visible instance under a canvas point: the smallest mask that holds it, else the smallest box. */
function instanceAt(event) {
  const result = state.result;
  const canvas = elements.canvas;
  const rect = canvas.getBoundingClientRect();
  const photoX = ((event.clientX - rect.left) / rect.width) * result.bitmap.width;
  const photoY = ((event.clientY - rect.top) / rect.height) * result.bitmap.height;
  const sentX = Math.floor(photoX / result.scaleX);
  const sentY = Math.floor(photoY / result.scaleY);
  const smallest = (best, instance, size) => (best === null || size < best.size ? { instance, size } : best);
  let byMask = null;
  let byBox = null;
  for (const instance of visibleInstances()) {
    const mask = instance.mask;
    if (mask) {
      const column = sentX - mask.x0;
      const row = sentY - mask.y0;
      if (column >= 0 && row >= 0 && column < mask.width && row < mask.height && mask.data[row * mask.width + column]) {
        byMask = smallest(byMask, instance, mask.area);
      }
    }
    const box = instance.box;
    if (photoX >= box.x && photoY >= box.y && photoX < box.x + box.width && photoY < box.y + box.height) {
      byBox = smallest(byBox, instance, box.width * box.height);
    }
  }
  return (byMask ?? byBox)?.instance ?? null;
}

// ------------------------------------------------------------------------------------------------ downloads

function downloadJson() {
  const result = state.result;
  if (!result) return;
  // The server's answer exactly as received; its coordinates are those of the image sent (see the link beside).
  const url = URL.createObjectURL(new Blob([result.text], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `${result.stem}.detections.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ------------------------------------------------------------------------------------------------ wiring

function firstImageFile(files) {
  return Array.from(files ?? []).find((file) => file.type.startsWith("image/")) ?? (files?.[0] ?? null);
}

function wireEvents() {
  elements.fileInput.addEventListener("change", () => {
    handleFile(elements.fileInput.files[0]);
    elements.fileInput.value = ""; // choosing the same file again still fires "change"
  });
  // Drag and drop anywhere on the page; the drop zone lights up while a file is over the page.
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    elements.dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) elements.dropZone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    elements.dropZone.classList.remove("dragging");
    handleFile(firstImageFile(event.dataTransfer?.files));
  });
  document.addEventListener("paste", (event) => {
    const file = firstImageFile(event.clipboardData?.files);
    if (file) {
      event.preventDefault();
      handleFile(file);
    }
  });
  elements.threshold.addEventListener("input", () => setThreshold(elements.threshold.value));
  elements.canvas.addEventListener("mousemove", (event) => setHovered(instanceAt(event)));
  elements.canvas.addEventListener("mouseleave", () => setHovered(null));
  elements.canvas.addEventListener("click", (event) => {
    const instance = instanceAt(event);
    if (instance !== null || state.selected !== null) toggleSelected(instance ?? state.selected);
  });
  elements.downloadJson.addEventListener("click", downloadJson);
}

function start() {
  wireEvents();
  setStatus("idle", "Asking the server about its model…");
  state.modelReady = loadModel().then((model) => {
    showModel(model);
    if (elements.status.dataset.state === "idle") {
      setStatus("idle", "Ready: drop a photo, paste one, or choose a file.");
    }
    return model;
  });
}

start();
