// A speech response's body as the bytes of the audio file, for either stream_format.
//
// "audio": the body is the file. "sse": server-sent events, each `data: {json}` followed by a
// blank line; speech.audio.delta carries base64 of the file's next bytes, speech.audio.done
// ends it, and an error event (the failure came after the 200) ends it with the error.

import { ApiError } from "./api.js";

export async function* audioBytes(response, streamFormat) {
  const reader = response.body.getReader();
  if (streamFormat !== "sse") {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      yield value;
    }
  }
  const text = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    buffer += text.decode(value || new Uint8Array(0), { stream: !done });
    let blank;
    while ((blank = /\r?\n\r?\n/.exec(buffer))) {
      const event = parseEvent(buffer.slice(0, blank.index));
      buffer = buffer.slice(blank.index + blank[0].length);
      if (!event) continue;
      if (event.type === "speech.audio.delta") yield base64Bytes(event.audio);
      else if (event.type === "speech.audio.done") return;
      else if (event.type === "error") {
        while (!(await reader.read()).done); // the server ends the stream after it; read to there
        const { message, param, code } = event.error || {};
        throw new ApiError(null, message || "the stream ended with an error", param, code);
      }
    }
    if (done) throw new Error("the event stream ended without speech.audio.done");
  }
}

function parseEvent(block) {
  const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart());
  return data.length ? JSON.parse(data.join("\n")) : null;
}

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
