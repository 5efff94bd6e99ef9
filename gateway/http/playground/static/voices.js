// The voice panel: create a voice from an uploaded or recorded clip, list and delete them.

import { apiFetch, showError } from "./api.js";

export function voicePanel(ui, onVoicesChanged) {
  let clip = null; // {blob, filename}
  let recorder = null;

  function refreshCreateButton() {
    ui.create.disabled = !(clip && ui.name.value.trim() && ui.consent.checked);
  }

  function useClip(blob, filename) {
    clip = blob ? { blob, filename } : null;
    ui.preview.hidden = !blob;
    if (blob) ui.preview.src = URL.createObjectURL(blob);
    refreshCreateButton();
  }

  ui.file.addEventListener("change", () => {
    const file = ui.file.files[0];
    useClip(file || null, file ? file.name : null);
  });
  ui.name.addEventListener("input", refreshCreateButton);
  ui.consent.addEventListener("change", refreshCreateButton);

  if (!navigator.mediaDevices || !window.MediaRecorder) {
    ui.record.disabled = true;
    ui.recordState.textContent = "Recording needs a secure page (https or localhost).";
  }
  ui.record.addEventListener("click", async () => {
    if (recorder) {
      recorder.stop();
      return;
    }
    showError(ui.error, null);
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      showError(ui.error, new Error(`Microphone unavailable: ${error.message}`));
      return;
    }
    const parts = [];
    recorder = new MediaRecorder(stream);
    const started = performance.now();
    const tick = setInterval(() => {
      ui.recordState.textContent = `recording ${((performance.now() - started) / 1000).toFixed(1)} s (3–30 s)`;
    }, 200);
    recorder.addEventListener("dataavailable", (event) => parts.push(event.data));
    recorder.addEventListener("stop", () => {
      clearInterval(tick);
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType || "audio/webm";
      const seconds = (performance.now() - started) / 1000;
      recorder = null;
      ui.record.textContent = "Record from microphone";
      ui.recordState.textContent = `recorded ${seconds.toFixed(1)} s`;
      ui.file.value = "";
      useClip(new Blob(parts, { type }), type.includes("ogg") ? "recording.ogg" : "recording.webm");
    });
    recorder.start();
    ui.record.textContent = "Stop recording";
  });

  ui.create.addEventListener("click", async () => {
    showError(ui.error, null);
    const form = new FormData();
    form.append("name", ui.name.value.trim());
    form.append("audio_sample", clip.blob, clip.filename);
    const reference = ui.consentRef.value.trim();
    form.append("consent", reference || `confirmed in the playground ${new Date().toISOString()}`);
    ui.create.disabled = true;
    try {
      const voice = await (await apiFetch("/v1/audio/voices", { method: "POST", body: form })).json();
      ui.name.value = "";
      ui.file.value = "";
      ui.consent.checked = false;
      useClip(null, null);
      await onVoicesChanged(voice.id);
    } catch (error) {
      showError(ui.error, error);
    } finally {
      refreshCreateButton();
    }
  });

  /** Show the voices created through the API (the others cannot be deleted). */
  function render(voices) {
    const created = voices.filter((voice) => voice.source === "user" && voice.id.startsWith("voice_"));
    ui.list.replaceChildren();
    if (!created.length) {
      const empty = document.createElement("li");
      empty.className = "note";
      empty.textContent = "none yet";
      ui.list.append(empty);
      return;
    }
    for (const voice of created) {
      const item = document.createElement("li");
      item.dataset.voiceId = voice.id;
      const label = document.createElement("span");
      label.append(`${voice.name} `);
      const id = document.createElement("code");
      id.textContent = voice.id;
      label.append(id);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "quiet";
      remove.textContent = "Delete";
      remove.addEventListener("click", async () => {
        // deleting cannot be undone: the clip and its conditionals are gone
        if (!confirm(`Delete the voice "${voice.name}" (${voice.id})? This cannot be undone.`)) return;
        showError(ui.error, null);
        try {
          await apiFetch(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
          await onVoicesChanged(null);
        } catch (error) {
          showError(ui.error, error);
        }
      });
      item.append(label, remove);
      ui.list.append(item);
    }
  }

  return { render };
}
