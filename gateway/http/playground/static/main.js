// Wires the page: pickers from the API, the speech request, its stats, snippets and errors.

import { apiFetch, apiJson, apiKey, errorOf, setApiKey, showError } from "./api.js";
import { MODE_NOTES, audioSeconds, playResponse, playbackMode } from "./player.js";
import { curlSnippet, pythonSnippet } from "./snippets.js";
import { voicePanel } from "./voices.js";

// The Chatterbox controls: [field, label, min, max, step, engine default].
const CONTROLS = [
  ["exaggeration", "Exaggeration", 0, 2, 0.05, 0.5],
  ["cfg_weight", "CFG weight / pace", 0, 1, 0.05, 0.5],
  ["temperature", "Temperature", 0.05, 5, 0.05, 0.8],
  ["top_p", "Top p", 0.05, 1, 0.05, 1.0],
  ["min_p", "Min p", 0, 1, 0.01, 0.05],
  ["repetition_penalty", "Repetition penalty", 1, 2, 0.05, 1.2],
];

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"), ready: $("ready"), input: $("input"), model: $("model"), voice: $("voice"),
  format: $("format"), speed: $("speed"), speedValue: $("speed-value"), controls: $("control-list"),
  seed: $("seed"), reset: $("reset-controls"), speak: $("speak"), stop: $("stop"), download: $("download"),
  state: $("play-state"), ttfa: $("ttfa"), ttfb: $("ttfb"), duration: $("duration"), total: $("total"),
  rtf: $("rtf"), note: $("playback-note"), player: $("player"), error: $("speak-error"),
  snippet: $("snippet"), copy: $("copy-snippet"),
};
const touched = new Set();
let snippetKind = "curl";
let current = null; // {abort: AbortController} while a request runs

// ---- API key ---------------------------------------------------------------------------------

ui.key.value = apiKey();
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in the field: apply the key, stay on the page
  ui.key.dispatchEvent(new Event("change"));
});
ui.key.addEventListener("change", () => {
  setApiKey(ui.key.value.trim());
  renderSnippet();
  loadPickers();
});

// ---- controls ----------------------------------------------------------------------------------

for (const [name, label, min, max, step, fallback] of CONTROLS) {
  const wrapper = document.createElement("label");
  const value = document.createElement("output");
  value.textContent = `default (${fallback})`;
  const input = Object.assign(document.createElement("input"), { type: "range", min, max, step, value: fallback, name });
  input.dataset.default = fallback;
  input.addEventListener("input", () => {
    touched.add(name);
    wrapper.classList.add("touched");
    value.textContent = Number(input.value).toFixed(2);
    renderSnippet();
  });
  wrapper.append(`${label}: `, value, input);
  ui.controls.append(wrapper);
}
ui.reset.addEventListener("click", () => {
  touched.clear();
  for (const input of ui.controls.querySelectorAll("input")) {
    input.value = input.dataset.default;
    input.parentElement.classList.remove("touched");
    input.parentElement.querySelector("output").textContent = `default (${input.dataset.default})`;
  }
  ui.seed.value = "";
  renderSnippet();
});
ui.speed.addEventListener("input", () => {
  ui.speedValue.textContent = Number(ui.speed.value).toFixed(2);
  renderSnippet();
});
for (const element of [ui.input, ui.model, ui.voice, ui.seed]) element.addEventListener("input", renderSnippet);
ui.format.addEventListener("change", () => {
  ui.note.textContent = MODE_NOTES[playbackMode(ui.format.value)];
  renderSnippet();
});

/** The speech request as the page will send it (only the controls the user moved). */
function requestBody() {
  const body = {
    model: ui.model.value,
    voice: ui.voice.value,
    input: ui.input.value,
    response_format: ui.format.value,
    speed: Number(ui.speed.value),
  };
  for (const input of ui.controls.querySelectorAll("input")) {
    if (touched.has(input.name)) body[input.name] = Number(input.value);
  }
  if (ui.seed.value !== "") body.seed = Number(ui.seed.value);
  return body;
}

// ---- snippets --------------------------------------------------------------------------------

function renderSnippet() {
  const make = snippetKind === "curl" ? curlSnippet : pythonSnippet;
  ui.snippet.textContent = make(requestBody(), location.origin, Boolean(apiKey()));
}
for (const tab of document.querySelectorAll("[data-snippet]")) {
  tab.addEventListener("click", () => {
    snippetKind = tab.dataset.snippet;
    for (const other of document.querySelectorAll("[data-snippet]")) {
      other.setAttribute("aria-selected", String(other === tab));
    }
    renderSnippet();
  });
}
ui.copy.addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(ui.snippet.textContent);
    ui.copy.textContent = "Copied";
  } catch {
    // no clipboard permission (plain http on another host): select the text instead
    getSelection().selectAllChildren(ui.snippet);
    ui.copy.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { ui.copy.textContent = "Copy"; }, 1500);
});

// ---- pickers and readiness -------------------------------------------------------------------

function fillSelect(select, items, preferred) {
  const previous = select.value;
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value)));
  const values = items.map(([value]) => value);
  select.value = [preferred, previous].find((value) => value && values.includes(value)) || values[0] || "";
}

const voices = voicePanel(
  {
    name: $("voice-name"), file: $("voice-file"), record: $("record"), recordState: $("record-state"),
    preview: $("clip-preview"), consent: $("voice-consent"), consentRef: $("voice-consent-ref"),
    create: $("create-voice"), error: $("voice-error"), list: $("voice-list"),
  },
  (selectId) => loadVoices(selectId),
);

async function loadVoices(selectId) {
  const list = (await apiJson("/v1/audio/voices")).data;
  const label = (voice) => (voice.aliases.length ? `${voice.name} (${voice.aliases.join(", ")})` : voice.name);
  fillSelect(ui.voice, list.map((voice) => [voice.id, label(voice)]), selectId);
  voices.render(list);
  renderSnippet();
}

async function loadPickers() {
  showError(ui.error, null);
  try {
    const models = (await apiJson("/v1/models")).data;
    fillSelect(ui.model, models.map((model) => [model.id, model.id]), "chatterbox");
    await loadVoices(null);
  } catch (error) {
    showError(ui.error, error);
  }
  renderSnippet();
}

async function watchReady() {
  // the voice list answers 503 while the engine loads: fill the pickers once /ready says 200
  for (;;) {
    const response = await fetch("/ready").catch(() => null);
    if (response && response.ok) {
      ui.ready.textContent = "ready";
      ui.ready.className = "badge ok";
      return;
    }
    const error = response ? await errorOf(response) : null;
    ui.ready.textContent = error ? "not ready" : "unreachable";
    ui.ready.title = error ? error.message : "the server does not answer";
    ui.ready.className = "badge bad";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// ---- speak -----------------------------------------------------------------------------------

const ms = (value) => `${Math.round(value)} ms`;

function resetStats() {
  for (const cell of [ui.ttfa, ui.ttfb, ui.duration, ui.total, ui.rtf]) cell.textContent = "–";
  ui.download.classList.add("disabled");
  ui.download.setAttribute("aria-disabled", "true");
  ui.download.removeAttribute("href");
}

ui.speak.addEventListener("click", async () => {
  current?.abort.abort();
  showError(ui.error, null);
  resetStats();
  const body = requestBody();
  const abort = new AbortController();
  current = { abort };
  ui.speak.disabled = true;
  ui.stop.disabled = false;
  ui.state.textContent = "requesting…";
  const started = performance.now();
  try {
    const response = await apiFetch("/v1/audio/speech", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: abort.signal,
    });
    const events = {
      firstByte: () => { ui.ttfb.textContent = ms(performance.now() - started); ui.state.textContent = "receiving…"; },
      firstAudio: () => { ui.ttfa.textContent = ms(performance.now() - started); ui.state.textContent = "playing"; },
    };
    const blob = await playResponse(response, body.response_format, ui.player, events, abort.signal);
    const total = performance.now() - started;
    ui.total.textContent = ms(total);
    ui.download.href = URL.createObjectURL(blob);
    ui.download.download = `speech.${body.response_format}`;
    ui.download.classList.remove("disabled");
    ui.download.removeAttribute("aria-disabled");
    const seconds = await audioSeconds(blob, body.response_format);
    ui.duration.textContent = `${seconds.toFixed(2)} s`;
    ui.rtf.textContent = (total / 1000 / seconds).toFixed(2);
    if (ui.state.textContent !== "playing") ui.state.textContent = "done";
  } catch (error) {
    if (abort.signal.aborted) {
      ui.state.textContent = "stopped";
    } else {
      ui.state.textContent = "failed";
      showError(ui.error, error);
    }
  } finally {
    ui.speak.disabled = false; // Stop stays enabled: it also silences what is still playing
  }
});

ui.stop.addEventListener("click", () => {
  current?.abort.abort();
  current = null;
  ui.player.pause();
  ui.stop.disabled = true;
  ui.state.textContent = "stopped";
});
ui.player.addEventListener("ended", () => { ui.state.textContent = "done"; });

ui.note.textContent = MODE_NOTES[playbackMode(ui.format.value)];
renderSnippet();
watchReady().then(loadPickers);
