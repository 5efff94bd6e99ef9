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
  const lines = [`curl ${origin}/v1/audio/speech`];
  if (withKey) lines.push(`  -H "Authorization: Bearer $CHATTERBOX_API_KEY"`);
  lines.push(`  -H "Content-Type: application/json"`);
  lines.push(`  -d ${shellQuote(JSON.stringify(body))}`);
  lines.push(`  --output speech.${body.response_format}`);
  return lines.join(" \\\n");
}

const SDK_FIELDS = ["model", "voice", "input", "response_format", "speed"];

export function pythonSnippet(body, origin, withKey) {
  const key = withKey ? `os.environ["CHATTERBOX_API_KEY"]` : `"unused"`;
  const extra = Object.fromEntries(Object.entries(body).filter(([name]) => !SDK_FIELDS.includes(name)));
  const args = SDK_FIELDS.filter((name) => name in body).map((name) => `    ${name}=${pyLiteral(body[name])},`);
  if (Object.keys(extra).length) {
    const items = Object.entries(extra).map(([name, value]) => `${pyLiteral(name)}: ${pyLiteral(value)}`);
    args.push(`    extra_body={${items.join(", ")}},`);
  }
  return [
    ...(withKey ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${pyLiteral(origin + "/v1")}, api_key=${key})`,
    "with client.audio.speech.with_streaming_response.create(",
    ...args,
    ") as response:",
    `    response.stream_to_file(${pyLiteral("speech." + body.response_format)})`,
  ].join("\n");
}
