"use strict";
// The page of `omniad serve`. It uploads images to POST /predict (one request per image, a few in flight: the
// service joins concurrent requests into batches), shows each overlay with its score and decision, and has a
// threshold slider that shows the false-alarm rate a threshold gives on the model's held-out normal scores
// (GET /model) and re-decides the shown images as it moves. No build step, no libraries.

const IN_FLIGHT = 4;
const state = { model: null, normals: [], calibrated: null, threshold: null, results: [], monitor: null };
const $ = (id) => document.getElementById(id);

// Index of the first value > t in an ascending array: the count of values <= t.
function upperBound(sorted, t) {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] > t) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Held-out normal images scoring strictly above t: the numerator of Calibration.false_alarm_rate.
function flaggedNormals(t) {
  return state.normals.length - upperBound(state.normals, t);
}

// At the calibrated threshold the page shows the service's own decision (Calibration.decide); a moved slider
// asks "what if", with the same rule: anomalous when the score is strictly above the threshold.
function decisionAt(result) {
  if (result.error || state.threshold === null) return null;
  if (state.threshold === state.calibrated) return result.anomalous;
  return result.score > state.threshold;
}

const fmt = (x) => Number(x).toPrecision(5);

function say(text) {
  $("status").textContent = text;
}

async function loadModel() {
  const response = await fetch("model");
  if (!response.ok) throw new Error(`GET model answered ${response.status}`);
  const m = await response.json();
  state.model = m;
  state.normals = m.normal_scores || []; // sorted by the service
  state.calibrated = m.threshold;
  state.threshold = m.threshold;
  $("model-name").textContent = m.name;
  const facts = [m.backbone && `backbone ${m.backbone}`, `${m.image_size} px`];
  if (m.threshold === null) facts.push("no calibrated threshold: scores only");
  else facts.push(`threshold ${fmt(m.threshold)} at target false-alarm rate ${Number((100 * m.target_far).toPrecision(6))} %`,
                  `set on ${state.normals.length} normal images (${m.calibration_source})`);
  if (m.categories) facts.push(`trained on ${m.categories.join(", ")}`);
  $("model-facts").textContent = facts.filter(Boolean).join(" · ");
  if (m.threshold !== null && state.normals.length > 0) {
    $("threshold").disabled = false;
    $("reset").disabled = false;
  }
  updateRange();
  renderThreshold();
}

// The slider spans every normal score, every shown score and the calibrated threshold, a little beyond on
// both sides, so that its ends mean "flag everything" and "flag nothing".
function updateRange() {
  if (state.calibrated === null) return;
  const shown = state.results.filter((r) => !r.error).map((r) => r.score);
  const values = state.normals.concat(shown, [state.calibrated]);
  const lo = values.reduce((a, b) => Math.min(a, b));
  const hi = values.reduce((a, b) => Math.max(a, b));
  const pad = (hi - lo) * 0.02 || Math.abs(hi) * 0.01 || 1;
  const slider = $("threshold");
  slider.min = String(lo - pad);
  slider.max = String(hi + pad);
  slider.step = String((hi - lo + 2 * pad) / 1000);
  slider.value = String(state.threshold);
}

function renderThreshold() {
  const t = state.threshold;
  const far = $("far");
  if (t === null) {
    $("threshold-value").textContent = "none";
    far.textContent = "This model has no calibrated threshold: the page shows scores only.";
  } else {
    $("threshold-value").textContent = fmt(t) + (t === state.calibrated ? " (calibrated)" : "");
    const n = state.normals.length;
    const k = flaggedNormals(t);
    Object.assign(far.dataset, { threshold: String(t), flagged: String(k), normals: String(n) });
    far.textContent = `False-alarm rate ${(100 * k / n).toFixed(1)} %: ${k} of the ${n} held-out normal images ` +
                      "score above this threshold.";
  }
  for (const result of state.results) paintDecision(result);
}

// The service's alarm monitor: the alarm rate of its latest images against the calibrated false-alarm rate
// (omniad.monitor). Answers of concurrent requests may arrive out of order: the one that counted most images wins.
function renderMonitor(monitor) {
  if (!monitor || (state.monitor && state.monitor.served > monitor.served)) return;
  state.monitor = monitor;
  const line = $("monitor");
  Object.assign(line.dataset, { rate: String(monitor.rate), alarms: String(monitor.alarms),
                                images: String(monitor.images), departed: String(monitor.departed) });
  line.className = monitor.departed ? "departed" : "";
  line.textContent = monitor.departed ? monitor.message :
    `Running alarm rate ${(100 * monitor.rate).toFixed(1)} %: ${monitor.alarms} of the latest ${monitor.images} ` +
    `images flagged (the calibration expects ${(100 * monitor.expected_rate).toFixed(2)} %).`;
}

function paintDecision(result) {
  if (!result.card) return;
  const decision = decisionAt(result);
  const label = result.error ? "refused" : decision === null ? "no threshold" : decision ? "anomalous" : "normal";
  result.card.className = `card ${result.error ? "error" : decision ? "anomalous" : "normal"}`;
  const badge = result.card.querySelector(".decision");
  badge.textContent = label;
}

function addCard(result) {
  const card = document.createElement("figure");
  result.card = card;
  if (result.overlay_png) {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${result.overlay_png}`;
    img.alt = `heat map of ${result.filename}`;
    card.append(img);
  }
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = result.filename;
  const badge = document.createElement("span");
  badge.className = "decision";
  const detail = document.createElement("span");
  if (result.error) {
    detail.className = "message";
    detail.textContent = result.error;
  } else {
    detail.className = "score";
    detail.dataset.score = String(result.score);
    detail.textContent = `score ${fmt(result.score)}`;
  }
  caption.append(name, detail, badge);
  card.append(caption);
  $("results").prepend(card);
  paintDecision(result);
}

async function send(file) {
  const body = new FormData();
  body.append("files", file, file.name);
  try {
    const response = await fetch("predict?overlay=true", { method: "POST", body });
    const payload = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) return { filename: file.name, error: `${response.status}: ${payload.detail}` };
    renderMonitor(payload.monitor);
    return payload.results[0];
  } catch (err) {
    return { filename: file.name, error: `no answer from the service (${err})` };
  }
}

async function upload(fileList) {
  const files = Array.from(fileList);
  if (files.length === 0) return;
  document.body.dataset.busy = "true"; // the page test waits for "false"
  let next = 0;
  let done = 0;
  let refused = 0;
  say(`scoring ${files.length} image${files.length > 1 ? "s" : ""}…`);
  async function worker() {
    while (next < files.length) {
      const result = await send(files[next++]);
      state.results.push(result);
      addCard(result);
      done += 1;
      if (result.error) refused += 1;
      say(`${done} of ${files.length} done` + (refused ? `, ${refused} refused` : ""));
    }
  }
  try {
    await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, files.length) }, worker));
  } finally {
    updateRange();
    renderThreshold();
    document.body.dataset.busy = "false";
  }
}

function setUp() {
  const input = $("files");
  input.addEventListener("change", () => {
    upload(input.files).finally(() => { input.value = ""; });
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files);
  });
  $("threshold").addEventListener("input", (event) => {
    state.threshold = Number(event.target.value);
    renderThreshold();
  });
  $("reset").addEventListener("click", () => {
    state.threshold = state.calibrated;
    $("threshold").value = String(state.calibrated);
    renderThreshold();
  });
  loadModel().catch((err) => say(`cannot read the model: ${err.message}`));
}

setUp();
