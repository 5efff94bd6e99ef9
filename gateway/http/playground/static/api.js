// Calls to this server's /v1 API with the tab's API key, and the server's error envelope.

const KEY_STORAGE = "chatterbox-gateway.api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY_STORAGE, value);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** An error answer: the OpenAI envelope's message, param and code, with the HTTP status. */
export class ApiError extends Error {
  constructor(status, message, param, code) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }

  describe() {
    // no status: the error came as an event after the 200 (stream_format "sse")
    const details = [this.status ? `HTTP ${this.status}` : "during the stream"];
    if (this.param) details.push(`param: ${this.param}`);
    if (this.code) details.push(`code: ${this.code}`);
    return `${this.message}\n(${details.join(", ")})`;
  }
}

export async function errorOf(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not the envelope (a proxy's page, say): fall through to the status line
  }
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, error.message, error.param, error.code);
  }
  return new ApiError(response.status, `${response.status} ${response.statusText}`, null, null);
}

/** fetch() with the API key; a non-2xx answer becomes an ApiError. */
export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function apiJson(path, options = {}) {
  return (await apiFetch(path, options)).json();
}

export function showError(box, error) {
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = error instanceof ApiError ? error.describe() : String(error.message || error);
}
