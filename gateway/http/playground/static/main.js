// Wires the page: the API key, the pickers from the API, the text and its checks, the
// controls, the request as code, and Speak / Hear (speak.js plays the answer).

import { apiJson, apiKey, errorOf, setApiKey, showError } from "./api.js";
import { familyEntries, modelDetails } from "./models.js";
import { MODE_NOTES, playbackMode } from "./player.js";
import { curlSnippet, pythonSnippet } from "./snippets.js";
import { speaker } from "./speak.js";
import { voicePanel } from "./voices.js";

// The Chatterbox controls: [field, label, min, max, step, the original model's default].
const CONTROLS = [
  ["exaggeration", "Exaggeration", 0, 2, 0.05, 0.5],
  ["cfg_weight", "CFG weight / pace", 0, 1, 0.05, 0.5],
  ["temperature", "Temperature", 0.05, 5, 0.05, 0.8],
  ["top_p", "Top p", 0.05, 1, 0.05, 1.0],
  ["min_p", "Min p", 0, 1, 0.01, 0.05],
  ["repetition_penalty", "Repetition penalty", 1, 2, 0.05, 1.2],
];
const MAX_INPUT_CHARS = 4096; // the server's limit on `input`

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"), keyForm: $("key-form"), keyNote: $("key-note"), ready: $("ready"), input: $("input"),
  count: $("input-count"), model: $("model"), voice: $("voice"), hear: $("hear-voice"), format: $("format"),
  streamFormat: $("stream-format"), speed: $("speed"), speedValue: $("speed-value"), controls: $("control-list"),
  seed: $("seed"), reset: $("reset-controls"), speak: $("speak"), stop: $("stop"), download: $("download"),
  state: $("play-state"), ttfa: $("ttfa"), ttfb: $("ttfb"), duration: $("duration"), total: $("total"),
  rtf: $("rtf"), note: $("playback-note"), player: $("player"), error: $("speak-error"),
  snippet: $("snippet"), copy: $("copy-snippet"),
};
const touched = new Set();
let snippetKind = "curl";
let pickersLoaded = false;
const voiceNames = new Map(); // voice id -> name, for Hear

// ---- API key ---------------------------------------------------------------------------------

/** A 401: say so next to the key field, focus it, and load the pickers once a key is given. */
function askForKey(error) {
  pickersLoaded = false;
  for (const select of [ui.model, ui.voice]) select.replaceChildren(new Option("enter the API key first", ""));
  refreshButtons();
  ui.keyNote.textContent = apiKey()
    ? `The server refused this key (${error.message}). Enter a valid key and press Enter.`
    : "This server needs an API key: enter it here and press Enter.";
  ui.keyNote.hidden = false;
  ui.keyForm.classList.add("asking");
  ui.key.focus();
  ui.key.select();
}

function keyAccepted() {
  ui.keyNote.hidden = true;
  ui.keyForm.classList.remove("asking");
}

ui.key.value = apiKey();
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in the field: apply the key, stay on the page
  ui.key.dispatchEvent(new Event("change"));
});
ui.key.addEventListener("change", () => {
  setApiKey(ui.key.value.trim());
  renderSnippet();
  loadPickers();
});

// ---- the text --------------------------------------------------------------------------------

/** The reason the text cannot be sent, or null. */
function inputProblem() {
  const text = ui.input.value;
  if (!text.trim()) return "Type the text to speak first.";
  if (text.length > MAX_INPUT_CHARS) return `The text is ${text.length} characters; the limit is ${MAX_INPUT_CHARS}.`;
  return null;
}

function showCount() {
  const length = ui.input.value.length;
  ui.count.textContent = `${length} / ${MAX_INPUT_CHARS}`;
  ui.count.classList.toggle("bad", !ui.input.value.trim() || length > MAX_INPUT_CHARS);
}
ui.input.addEventListener("input", showCount);

// ---- controls ----------------------------------------------------------------------------------

for (const [name, label, min, max, step, fallback] of CONTROLS) {
  const wrapper = document.createElement("label");
  const value = document.createElement("output");
  value.textContent = "default";
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
    input.parentElement.querySelector("output").textContent = "default";
  }
  ui.seed.value = "";
  renderSnippet();
});
ui.speed.addEventListener("input", () => {
  ui.speedValue.textContent = Number(ui.speed.value).toFixed(2);
  renderSnippet();
});
for (const element of [ui.input, ui.voice, ui.seed]) element.addEventListener("input", renderSnippet);
for (const element of [ui.streamFormat, $("language")]) element.addEventListener("change", renderSnippet);
ui.format.addEventListener("change", () => {
  ui.note.textContent = MODE_NOTES[playbackMode(ui.format.value)];
  renderSnippet();
});

const model = modelDetails(
  {
    languageField: $("language-field"), language: $("language"), tagPicker: $("tag-picker"), tagList: $("tag-list"),
    note: $("model-note"), input: ui.input, controls: ui.controls,
  },
  () => { showCount(); renderSnippet(); },
);
ui.model.addEventListener("change", () => {
  model.show(ui.model.value);
  renderSnippet();
});

/** The speech request as the page will send it (only what the user set). */
function requestBody() {
  const body = {
    model: ui.model.value,
    voice: ui.voice.value,
    input: ui.input.value,
    response_format: ui.format.value,
    speed: Number(ui.speed.value),
  };
  if (ui.streamFormat.value === "sse") body.stream_format = "sse";
  const language = model.language(ui.model.value);
  if (language) body.language = language;
  for (const input of ui.controls.querySelectorAll("input")) {
    if (touched.has(input.name) && !input.disabled) body[input.name] = Number(input.value);
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

function refreshButtons() {
  ui.speak.disabled = !pickersLoaded;
  ui.hear.disabled = !pickersLoaded || !ui.voice.value;
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
  voiceNames.clear();
  for (const voice of list) voiceNames.set(voice.id, voice.name);
  fillSelect(ui.voice, list.map((voice) => [voice.id, label(voice)]), selectId);
  voices.render(list);
  refreshButtons();
  renderSnippet();
}

// /ready answers without a key; resolves once the engine has loaded
const ready = (async () => {
  for (;;) {
    const response = await fetch("/ready").catch(() => null);
    if (response && response.ok) {
      ui.ready.textContent = "ready";
      ui.ready.className = "badge ok";
      ui.ready.title = "GET /ready";
      return;
    }
    const error = response ? await errorOf(response) : null;
    ui.ready.textContent = error ? "not ready" : "unreachable"; // the reason (loading, failed) in its title
    ui.ready.title = error ? error.message : "the server does not answer";
    ui.ready.className = "badge bad";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
})();

/** The models at once (a 401 asks for the key right away), the voices once the engine is up. */
async function loadPickers() {
  showError(ui.error, null);
  try {
    const entries = familyEntries((await apiJson("/v1/models")).data);
    keyAccepted();
    fillSelect(ui.model, entries.map((entry) => [entry.id, entry.label]), "chatterbox");
    model.load(entries, ui.model.value);
    await ready; // the voice list answers 503 while the engine loads
    await loadVoices(null);
    pickersLoaded = true;
  } catch (error) {
    if (error.status === 401) askForKey(error);
    else showError(ui.error, error);
  }
  refreshButtons();
  renderSnippet();
}

// ---- speak -----------------------------------------------------------------------------------

const speech = speaker(ui, askForKey);

ui.speak.addEventListener("click", () => {
  const problem = inputProblem();
  if (problem) {
    showError(ui.error, new Error(problem));
    ui.input.focus();
    return;
  }
  speech.speak(requestBody());
});

ui.hear.addEventListener("click", () => {
  // a short sentence in the picked voice, with the picked model and format
  const name = voiceNames.get(ui.voice.value) || ui.voice.value;
  speech.speak({ ...requestBody(), input: `Hello, this is the voice ${name}.`, language: undefined });
});

ui.note.textContent = MODE_NOTES[playbackMode(ui.format.value)];
showCount();
refreshButtons();
renderSnippet();
loadPickers();
