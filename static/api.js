// Shared helpers for every tapprove page: JSON calls, error text, safe DOM building, times.
// Nothing here uses innerHTML: server strings only ever become text nodes or attributes.

const NETWORK_ERROR = {
  error: "network",
  message: "Can't reach the server. Check your connection and try again.",
};

/**
 * Call the JSON API and return {status, ok, body, headers, retryAfter, clockOffset}.
 *
 * Never throws for HTTP errors or network failures (status 0); errors keep the server's
 * `{"error","message"}` shape so callers can show `errorText(res)`.
 */
export async function api(method, path, body, { token, signal } = {}) {
  const headers = { Accept: "application/json" };
  let payload;
  if (body !== undefined || method === "POST" || method === "PATCH" || method === "PUT") {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body === undefined ? {} : body);
  }
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: payload,
      credentials: "same-origin",
      cache: "no-store",
      signal,
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    return { status: 0, ok: false, body: { ...NETWORK_ERROR }, headers: new Headers(), retryAfter: null, clockOffset: 0 };
  }
  let data = {};
  let text = "";
  try {
    text = await response.text();
  } catch {
    text = "";
  }
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: "bad_response", message: `Unexpected answer from the server (HTTP ${response.status}).` };
    }
  }
  if (data === null || typeof data !== "object") data = { value: data };
  if (!response.ok && typeof data.error !== "string") {
    data = { error: `http_${response.status}`, message: `The server answered HTTP ${response.status}.`, ...data };
  }
  return {
    status: response.status,
    ok: response.ok,
    body: data,
    headers: response.headers,
    retryAfter: parseRetryAfter(response.headers.get("Retry-After")),
    clockOffset: clockOffsetFrom(response.headers.get("Date")),
  };
}

/** Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  if (/^\s*\d+\s*$/.test(value)) return Number.parseInt(value, 10);
  const at = Date.parse(value);
  if (Number.isNaN(at)) return null;
  return Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

// Server time minus local time in ms; ignored under 2 s since the Date header has 1 s resolution.
function clockOffsetFrom(dateHeader) {
  if (!dateHeader) return 0;
  const server = Date.parse(dateHeader);
  if (Number.isNaN(server)) return 0;
  const offset = server - Date.now();
  return Math.abs(offset) < 2000 ? 0 : offset;
}

const FRIENDLY = {
  invalid_credentials: "The email or password is not right.",
  email_not_verified: "Please confirm your email address first. Check your inbox for our link.",
  locked:
    "Sign-in is locked because a request was reported as fraud. Contact your administrator to unlock your account.",
  invalid_code: "That code is not right. Check it and try again.",
  invalid_or_expired_code: "That enrollment code is invalid or has expired. Create a new one on your account page.",
  wrong_number: "The number did not match, so the request was denied.",
  already_decided: "This request was already answered.",
  expired: "This request has expired.",
  bad_signature: "The signature was not accepted. Try re-enrolling this device.",
  csrf: "The request was refused because it came from another site. Reload the page and try again.",
};

/** A human sentence for a failed call (uses Retry-After for rate limits). */
export function errorText(res) {
  const body = (res && res.body) || {};
  if (body.error === "rate_limited") {
    const wait = res.retryAfter;
    return wait == null
      ? "Too many attempts. Please wait a moment and try again."
      : `Too many attempts. Try again in ${formatDuration(wait)}.`;
  }
  if (FRIENDLY[body.error]) return FRIENDLY[body.error];
  if (typeof body.message === "string" && body.message) return sentence(body.message);
  if (res && res.status === 0) return NETWORK_ERROR.message;
  return `Something went wrong (HTTP ${res ? res.status : "?"}). Please try again.`;
}

// Server messages are lower-case fragments ("sign in first"); show them as sentences.
function sentence(text) {
  const trimmed = text.trim();
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

/** Show a message in a notice element (kind: error | success | info | warning). */
export function showMessage(el, text, kind = "error") {
  if (!el) return;
  el.textContent = text;
  el.classList.remove("error", "success", "info", "warning");
  el.classList.add(kind);
  el.hidden = !text;
}

/** Show the error of a failed call in a notice element. */
export function showError(el, res) {
  showMessage(el, typeof res === "string" ? res : errorText(res), "error");
}

/** Hide and empty a notice element. */
export function clearMessage(el) {
  if (!el) return;
  el.textContent = "";
  el.hidden = true;
}

/**
 * Build an element: h("button", {class: "primary", onclick: fn, "aria-label": "x"}, "Text").
 * Children are nodes or strings (always inserted as text).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== "string" && key !== "list") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Disable a button while an async action runs; returns the action's result. */
export async function busy(button, action) {
  if (!button) return action();
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await action();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** "1:05" for 65 seconds. */
export function formatClock(seconds) {
  const s = Math.max(0, Math.ceil(seconds));
  const m = Math.floor(s / 60);
  return `${m}:${String(s % 60).padStart(2, "0")}`;
}

/** "45 seconds", "3 minutes", "1 hour". */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.ceil(seconds));
  if (s < 60) return s === 1 ? "1 second" : `${s} seconds`;
  const m = Math.ceil(s / 60);
  if (m < 60) return m === 1 ? "1 minute" : `${m} minutes`;
  const hours = Math.ceil(m / 60);
  return hours === 1 ? "1 hour" : `${hours} hours`;
}

/** Local date and time for an RFC 3339 string ("" for missing or bad input). */
export function formatDateTime(value) {
  const t = Date.parse(value);
  if (!value || Number.isNaN(t)) return "";
  return new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" }).format(new Date(t));
}

/** "just now", "5 minutes ago", "in 3 days" for an RFC 3339 string. */
export function formatRelative(value) {
  const t = Date.parse(value);
  if (!value || Number.isNaN(t)) return "";
  const diff = (t - Date.now()) / 1000;
  const abs = Math.abs(diff);
  if (abs < 45) return "just now";
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const units = [
    ["year", 31536000],
    ["month", 2592000],
    ["week", 604800],
    ["day", 86400],
    ["hour", 3600],
    ["minute", 60],
  ];
  for (const [unit, size] of units) {
    if (abs >= size) return rtf.format(Math.round(diff / size), unit);
  }
  return "just now";
}

/** The ws:// or wss:// URL for a same-origin path. */
export function wsUrl(path) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

/** Capped exponential backoff in ms, jittered (half fixed, half random) so clients spread out. */
export function backoffDelay(attempt, { base = 500, cap = 15000 } = {}) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 16));
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
