// The current request as curl and as Python with the OpenAI SDK.

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function pyLiteral(value) {
  // JSON strings and numbers are valid Python literals
  return JSON.stringify(value);
}

/** ``body``: the speech request as sent; ``origin``: this server; ``withKey``: keys in use. */
export function curlSnippet(body, origin, withKey) {
  const sse = body.stream_format === "sse";
  // SSE: the events as they come (-N: unbuffered); else the audio file
  const lines = [`curl${sse ? " -N" : ""} ${origin}/v1/audio/speech`];
  if (withKey) lines.push(`  -H "Authorization: Bearer $CHATTERBOX_API_KEY"`);
  lines.push(`  -H "Content-Type: application/json"`);
  lines.push(`  -d ${shellQuote(JSON.stringify(body))}`);
  if (!sse) lines.push(`  --output speech.${body.response_format}`);
  return lines.join(" \\\n");
}

// Parameters of client.audio.speech.create(); the rest travels in extra_body.
const SDK_FIELDS = ["model", "voice", "input", "response_format", "speed", "stream_format"];

export function pythonSnippet(body, origin, withKey) {
  const sse = body.stream_format === "sse";
  const key = withKey ? `os.environ["CHATTERBOX_API_KEY"]` : `"unused"`;
  const extra = Object.fromEntries(Object.entries(body).filter(([name]) => !SDK_FIELDS.includes(name)));
  const args = SDK_FIELDS.filter((name) => name in body).map((name) => `    ${name}=${pyLiteral(body[name])},`);
  if (Object.keys(extra).length) {
    const items = Object.entries(extra).map(([name, value]) => `${pyLiteral(name)}: ${pyLiteral(value)}`);
    args.push(`    extra_body={${items.join(", ")}},`);
  }
  const file = pyLiteral(`speech.${body.response_format}`);
  const imports = [...(sse ? ["import base64", "import json"] : []), ...(withKey ? ["import os"] : [])];
  const consume = sse
    ? [
        // each event: data: {"type": "speech.audio.delta", "audio": "<base64>"}, then speech.audio.done
        `) as response, open(${file}, "wb") as out:`,
        "    for line in response.iter_lines():",
        '        if line.startswith("data: "):',
        "            event = json.loads(line[6:])",
        '            if event["type"] == "speech.audio.delta":',
        '                out.write(base64.b64decode(event["audio"]))',
        '            elif event["type"] == "error":',
        '                raise RuntimeError(event["error"]["message"])',
      ]
    : [") as response:", `    response.stream_to_file(${file})`];
  return [
    ...(imports.length ? [...imports, ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${pyLiteral(origin + "/v1")}, api_key=${key})`,
    "with client.audio.speech.with_streaming_response.create(",
    ...args,
    ...consume,
  ].join("\n");
}
