// One speech request at a time, from Speak to the end of playback: the request, the state
// line, the stats, Stop and the download link.
//
// States: requesting… -> receiving… -> playing -> done; or failed, or stopped. Stop is
// enabled from the request until playback ends (it also silences what is still playing),
// and a new request, a failure or Stop empties the player, so it never holds the audio of an
// earlier response.

import { apiFetch, showError } from "./api.js";
import { audioSeconds, clearPlayer, playChunks } from "./player.js";
import { audioBytes } from "./sse.js";

const ms = (value) => `${Math.round(value)} ms`;

// What the server sends for each response_format (an SSE answer is text/event-stream; the
// downloaded file is the audio it carried).
const MEDIA_TYPES = {
  mp3: "audio/mpeg", opus: "audio/ogg", aac: "audio/aac", flac: "audio/flac", wav: "audio/wav", pcm: "audio/pcm",
};

/** ``ui``: the page's elements; ``onKeyRefused(error)``: the server answered 401. */
export function speaker(ui, onKeyRefused) {
  let current = null; // the run in progress: {abort, stopped, ended}

  function resetStats() {
    for (const cell of [ui.ttfa, ui.ttfb, ui.duration, ui.total, ui.rtf]) cell.textContent = "–";
    ui.download.classList.add("disabled");
    ui.download.setAttribute("aria-disabled", "true");
    const url = ui.download.getAttribute("href");
    ui.download.removeAttribute("href");
    if (url) URL.revokeObjectURL(url);
  }

  function offerDownload(blob, format) {
    ui.download.href = URL.createObjectURL(blob);
    ui.download.download = `speech.${format}`;
    ui.download.classList.remove("disabled");
    ui.download.removeAttribute("aria-disabled");
  }

  /** End ``run`` with ``state`` (only while it is the current one). */
  function finish(run, state) {
    if (run !== current) return;
    ui.state.textContent = state;
    ui.stop.disabled = true;
    current = null;
  }

  function stop() {
    if (!current) return;
    current.stopped = true;
    current.abort.abort();
    finish(current, "stopped");
  }

  /** Send ``body`` (a speech request) and play the answer as it arrives. */
  async function speak(body) {
    if (current) {
      current.stopped = true;
      current.abort.abort();
    }
    const run = { abort: new AbortController(), stopped: false, ended: false };
    current = run;
    showError(ui.error, null);
    resetStats();
    clearPlayer(ui.player);
    ui.stop.disabled = false;
    ui.state.textContent = "requesting…";
    const started = performance.now();
    const events = {
      firstByte: () => {
        ui.ttfb.textContent = ms(performance.now() - started);
        if (run === current && ui.state.textContent === "requesting…") ui.state.textContent = "receiving…";
      },
      firstAudio: () => {
        ui.ttfa.textContent = ms(performance.now() - started);
        if (run === current) ui.state.textContent = "playing";
      },
      ended: () => {
        run.ended = true;
        finish(run, "done");
      },
    };
    try {
      const response = await apiFetch("/v1/audio/speech", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: run.abort.signal,
      });
      const type = MEDIA_TYPES[body.response_format];
      const chunks = audioBytes(response, body.stream_format);
      const blob = await playChunks(chunks, type, body.response_format, ui.player, events, run.abort.signal);
      if (run.stopped) return;
      const total = performance.now() - started;
      ui.total.textContent = ms(total);
      offerDownload(blob, body.response_format);
      const seconds = await audioSeconds(blob, body.response_format);
      ui.duration.textContent = `${seconds.toFixed(2)} s`;
      ui.rtf.textContent = (total / 1000 / seconds).toFixed(2);
    } catch (error) {
      if (run.stopped) return;
      run.abort.abort(); // silence what the failed response had started to play
      clearPlayer(ui.player);
      finish(run, "failed");
      if (error.status === 401) onKeyRefused(error);
      else showError(ui.error, error);
    }
  }

  ui.stop.addEventListener("click", stop);
  return { speak, stop };
}
