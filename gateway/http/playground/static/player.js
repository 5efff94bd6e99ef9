// Plays a speech response while it downloads, and keeps its bytes for the download link.
//
// Three ways, picked per format:
// - MediaSource (mp3, and aac where the browser's MediaSource takes ADTS): bytes are
//   appended to the <audio> element as they arrive; playback starts with the first frames.
// - Web Audio (pcm, wav): the samples are plain 16-bit PCM, so each piece is turned into an
//   AudioBuffer and scheduled right after the previous one. Once the response is complete the
//   <audio> element gets the file (pcm wrapped in a WAV header), so it can be played again.
// - Whole file (opus, flac, and anything MediaSource refuses): Ogg and FLAC streams cannot be
//   fed to MediaSource, so they play once the response is complete.
//
// Either way the <audio> element only ever holds the current response: clearPlayer() empties
// it before a request starts.

export const PCM_SAMPLE_RATE = 24000;

const MSE_TYPES = { mp3: "audio/mpeg", aac: "audio/aac" };

export function playbackMode(format) {
  const type = MSE_TYPES[format];
  if (type && window.MediaSource && MediaSource.isTypeSupported(type)) return "stream";
  if (format === "pcm" || format === "wav") return "webaudio";
  return "whole";
}

export const MODE_NOTES = {
  stream: "Plays as it arrives (MediaSource).",
  webaudio: "Plays as it arrives (Web Audio).",
  whole: "This format plays once the whole response has arrived (the browser cannot stream it); mp3, wav or pcm play as they arrive.",
};

/** Empty the <audio> element: no source, nothing to play, its object URL released. */
export function clearPlayer(audio) {
  audio.pause();
  const url = audio.src;
  audio.removeAttribute("src");
  audio.load();
  if (url.startsWith("blob:")) URL.revokeObjectURL(url);
}

/**
 * Play the audio ``chunks`` (an async iterable of Uint8Array) while reading them to the end.
 * ``events.firstByte()``, ``events.firstAudio()`` and ``events.ended()`` (playback reached
 * the end) are called once each; resolves to the bytes as a Blob of ``type`` once all have
 * arrived. ``signal`` aborts playback and drops the listeners, also after the download.
 */
export async function playChunks(chunks, type, format, audio, events, signal) {
  const mode = playbackMode(format);
  const sink =
    mode === "stream" ? await mediaSourceSink(audio, MSE_TYPES[format], events, signal)
    : mode === "webaudio" ? webAudioSink(format, audio, events)
    : wholeFileSink(audio, events, signal);
  signal.addEventListener("abort", () => sink.stop(), { once: true });
  const parts = [];
  for await (const value of chunks) {
    if (signal.aborted) break;
    if (parts.length === 0) events.firstByte();
    parts.push(value);
    await sink.push(value);
  }
  const blob = new Blob(parts, { type });
  if (!signal.aborted) await sink.finish(blob);
  return blob;
}

function watchElement(audio, events, signal) {
  audio.addEventListener("playing", () => events.firstAudio(), { once: true, signal });
  audio.addEventListener("ended", () => events.ended(), { once: true, signal });
}

async function mediaSourceSink(audio, type, events, signal) {
  const source = new MediaSource();
  audio.src = URL.createObjectURL(source);
  await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
  const buffer = source.addSourceBuffer(type);
  buffer.mode = "sequence"; // raw mp3/ADTS frames carry no timestamps
  watchElement(audio, events, signal);
  const appended = () => new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", () => reject(new Error("the browser could not decode the audio")), { once: true });
  });
  let started = false;
  return {
    async push(bytes) {
      const done = appended();
      buffer.appendBuffer(bytes);
      await done;
      if (!started && buffer.buffered.length) {
        started = true;
        audio.play().catch(() => {}); // refused autoplay: the controls still work
      }
    },
    async finish() {
      if (source.readyState === "open") source.endOfStream();
      if (!started) await audio.play().catch(() => {});
      if (audio.paused) events.ended(); // autoplay refused: nothing plays, the run is over
    },
    stop() {
      audio.pause();
    },
  };
}

function wholeFileSink(audio, events, signal) {
  return {
    async push() {},
    async finish(blob) {
      audio.src = URL.createObjectURL(blob);
      watchElement(audio, events, signal);
      await audio.play().catch(() => {});
      if (audio.paused) events.ended();
    },
    stop() {
      audio.pause();
    },
  };
}

function webAudioSink(format, audio, events) {
  const context = new AudioContext();
  context.resume().catch(() => {});
  let header = format === "wav" ? new Uint8Array(0) : null; // wav: bytes until the data chunk
  let rate = PCM_SAMPLE_RATE;
  let channels = 1;
  let carry = new Uint8Array(0); // an odd trailing byte waits for its partner
  let nextTime = 0;
  let last = null; // the piece scheduled last: its end is the end of playback
  let closed = false;

  function schedule(bytes) {
    const joined = concat(carry, bytes);
    const frameBytes = 2 * channels;
    const usable = joined.length - (joined.length % frameBytes);
    carry = joined.slice(usable);
    if (!usable) return;
    const samples = new Int16Array(joined.buffer.slice(joined.byteOffset, joined.byteOffset + usable));
    const frames = samples.length / channels;
    const buffer = context.createBuffer(channels, frames, rate);
    for (let c = 0; c < channels; c++) {
      const out = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) out[i] = samples[i * channels + c] / 32768;
    }
    const node = context.createBufferSource();
    node.buffer = buffer;
    node.connect(context.destination);
    const first = last === null;
    nextTime = Math.max(nextTime, context.currentTime + 0.05);
    node.start(nextTime);
    nextTime += buffer.duration;
    last = node;
    if (first) {
      const wait = Math.max(0, (nextTime - buffer.duration - context.currentTime) * 1000);
      setTimeout(() => { if (!closed) events.firstAudio(); }, wait);
    }
  }

  function close() {
    if (closed) return;
    closed = true;
    context.close(); // silences every scheduled piece
  }

  return {
    async push(bytes) {
      if (header === null) return schedule(bytes);
      header = concat(header, bytes);
      const parsed = parseWavHeader(header);
      if (!parsed) return;
      ({ rate, channels } = parsed);
      const rest = header.slice(parsed.dataOffset);
      header = null;
      schedule(rest);
    },
    async finish(blob) {
      // the element gets the file to play again; Web Audio plays this first time
      const file = format === "pcm" ? wavFile(blob, PCM_SAMPLE_RATE) : blob;
      audio.src = URL.createObjectURL(file);
      const ended = () => { if (!closed) { close(); events.ended(); } };
      if (last) last.addEventListener("ended", ended, { once: true });
      else ended();
    },
    stop: close,
  };
}

/** The fmt fields and where the samples start, once the header is complete; else null. */
export function parseWavHeader(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = (at) => String.fromCharCode(...bytes.slice(at, at + 4));
  if (bytes.length < 12) return null;
  if (tag(0) !== "RIFF" || tag(8) !== "WAVE") throw new Error("not a WAV stream");
  let at = 12;
  let format = null;
  while (at + 8 <= bytes.length) {
    const size = view.getUint32(at + 4, true);
    if (tag(at) === "data") {
      if (!format) throw new Error("WAV data before its fmt chunk");
      return { ...format, dataOffset: at + 8 };
    }
    if (at + 8 + size > bytes.length) return null;
    if (tag(at) === "fmt ") {
      format = { channels: view.getUint16(at + 10, true), rate: view.getUint32(at + 12, true) };
    }
    at += 8 + size + (size % 2);
  }
  return null;
}

/** 16-bit mono PCM as a WAV file (the 44-byte canonical header, then the samples). */
function wavFile(pcm, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, value) => [...value].forEach((char, i) => header.setUint8(at + i, char.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + pcm.size, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, pcm.size, true);
  return new Blob([header, pcm], { type: "audio/wav" });
}

function concat(a, b) {
  if (!a.length) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/** Seconds of audio in a complete response (decoded by the browser; pcm by its length). */
export async function audioSeconds(blob, format) {
  if (format === "pcm") return blob.size / 2 / PCM_SAMPLE_RATE;
  const context = new OfflineAudioContext(1, 1, PCM_SAMPLE_RATE);
  const decoded = await context.decodeAudioData(await blob.arrayBuffer());
  return decoded.duration;
}
