// The in-browser phone: enrolls with a WebCrypto P-256 key kept non-extractable in IndexedDB,
// holds the device WebSocket, and answers approval requests with ES256 compact JWS decisions.
// Installed (manifest + service worker /phone/sw.js) it also gets requests by Web Push while
// closed; a notification opens /phone?approval=<id> on that request.
import { api, backoffDelay, busy, errorText, formatClock, h, showError, showMessage, clearMessage, wsUrl } from "/static/api.js";

const $ = (id) => document.getElementById(id);

const DB_NAME = "tapprove-phone";
const STORE = "device";
const RECORD = "current";
const CLOSE_UNAUTHORIZED = 4401;
// If the socket gives no answer to a decision in this long, send it over HTTP instead.
const DECISION_FALLBACK_MS = 5000;
const MAX_FINISHED_CARDS = 3;

/** The enrolled device: {deviceId, deviceToken, keyPair, name, email, server}. */
let device = null;
const link = { socket: null, attempts: 0, timer: null, ready: false, stopped: true };
/** approval id -> request card state */
const requests = new Map();

// ---------- IndexedDB (CryptoKey objects are stored as they are, never exported) ----------

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function withStore(mode, action) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const request = action(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

const loadDevice = () => withStore("readonly", (store) => store.get(RECORD));
const saveDevice = (record) => withStore("readwrite", (store) => store.put(record, RECORD));
const clearDevice = () => withStore("readwrite", (store) => store.delete(RECORD));

// ---------- Offline passcode (TOTP, RFC 6238: HMAC-SHA-1, 6 digits, 30 s) ----------
// The seed becomes a non-extractable HMAC key kept in IndexedDB with the device record, like
// the signing key: the page computes codes with it but can never read it back.

let passcodeTimer = null;
const RING = 2 * Math.PI * 18;

function base32Bytes(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  const clean = text.toUpperCase().replace(/=+$/, "");
  const bytes = [];
  let bits = 0;
  let value = 0;
  for (const char of clean) {
    const index = alphabet.indexOf(char);
    if (index < 0) throw new Error("the passcode seed is not base32");
    value = (value << 5) | index;
    bits += 5;
    if (bits >= 8) {
      bytes.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return new Uint8Array(bytes);
}

/** {key, digits, period} from the server's `passcode` object, or null if it is not one we can use. */
async function passcodeFrom(given) {
  if (!given || typeof given.secret !== "string" || given.algorithm !== "SHA1") return null;
  if (given.digits !== 6 || given.period !== 30) return null;
  const key = await crypto.subtle.importKey("raw", base32Bytes(given.secret), { name: "HMAC", hash: "SHA-1" }, false, ["sign"]);
  return { key, digits: given.digits, period: given.period };
}

async function passcodeAt(passcode, unixSeconds) {
  const counter = Math.floor(unixSeconds / passcode.period);
  const message = new DataView(new ArrayBuffer(8));
  message.setUint32(0, Math.floor(counter / 2 ** 32));
  message.setUint32(4, counter >>> 0);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", passcode.key, message.buffer));
  const offset = mac[mac.length - 1] & 0x0f;
  const number =
    ((mac[offset] & 0x7f) << 24) | (mac[offset + 1] << 16) | (mac[offset + 2] << 8) | mac[offset + 3];
  return String(number % 10 ** passcode.digits).padStart(passcode.digits, "0");
}

async function tickPasscode() {
  if (!device || !device.passcode) return;
  const now = Date.now() / 1000;
  const period = device.passcode.period;
  const left = period - (now % period);
  const code = await passcodeAt(device.passcode, now);
  $("passcode-code").textContent = `${code.slice(0, 3)} ${code.slice(3)}`;
  $("passcode-expiry").textContent = `Changes in ${Math.ceil(left)} s`;
  const ring = $("passcode-left");
  ring.setAttribute("stroke-dasharray", `${(RING * left) / period} ${RING}`);
}

function showPasscode() {
  clearInterval(passcodeTimer);
  passcodeTimer = null;
  $("passcode-card").hidden = !(device && device.passcode);
  if (!device || !device.passcode) return;
  tickPasscode();
  passcodeTimer = setInterval(tickPasscode, 1000);
}

function stopPasscode() {
  clearInterval(passcodeTimer);
  passcodeTimer = null;
  $("passcode-card").hidden = true;
}

/** A seed sent over the socket (a device enrolled before passcodes): keep it, then say so. */
async function keepPasscodeSeed(frame, socket) {
  let passcode;
  try {
    passcode = await passcodeFrom(frame.passcode);
  } catch {
    passcode = null;
  }
  if (!passcode || !device) return;
  device.passcode = passcode;
  await saveDevice(device);
  if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "passcode_seed_ack" }));
  showPasscode();
}

// ---------- Views ----------

function showView(name) {
  for (const view of ["enroll", "revoked", "device"]) $(`view-${view}`).hidden = view !== name;
}

function setConn(text, state = "") {
  const el = $("conn");
  el.textContent = text;
  el.className = `conn ${state}`.trim();
}

function announce(text) {
  const el = $("announce");
  el.textContent = "";
  // A fresh text node after a tick makes screen readers repeat identical announcements.
  setTimeout(() => (el.textContent = text), 50);
}

function showEnrollForm(info = "") {
  stopLink();
  stopPasscode();
  clearRequests();
  showView("enroll");
  setConn("Not enrolled");
  if (info) showMessage($("enroll-info"), info, "info");
  else clearMessage($("enroll-info"));
  $("enroll").disabled = false;
  $("enroll-input").focus();
}

function showDevice() {
  $("device-title").textContent = device.name || "Browser phone";
  $("device-user").textContent = device.email ? `Approves sign-ins for ${device.email}` : "";
  showView("device");
  renderIdle();
  showPasscode();
  startLink();
  renderPush();
}

function showRevoked() {
  stopLink();
  stopPasscode();
  clearRequests();
  setConn("Revoked", "offline");
  showView("revoked");
  $("revoked-title").focus();
}

// ---------- Enrollment ----------

/** {code, server} from `tapprove://enroll?url=...&code=...`, an https link with ?code=, or a bare code. */
export function parseEnrollment(text) {
  const value = text.trim();
  const query = value.includes("?") ? value.slice(value.indexOf("?") + 1).split("#")[0] : "";
  if (/^tapprove:/i.test(value) || (/^https?:\/\//i.test(value) && query)) {
    const params = new URLSearchParams(query);
    const code = (params.get("code") || "").trim();
    if (!code) return null;
    let server = window.location.origin;
    const url = params.get("url");
    if (url) {
      try {
        server = new URL(url).origin;
      } catch {
        return null;
      }
    }
    return { code, server };
  }
  if (!value || /\s/.test(value)) return null;
  return { code: value, server: window.location.origin };
}

function publicJwk(jwk) {
  // Only the public point leaves the browser: never ext/key_ops, and certainly never d.
  return { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y };
}

async function enroll(event) {
  event.preventDefault();
  const form = $("enroll-form");
  if (!form.reportValidity()) return;
  const error = $("enroll-error");
  clearMessage(error);
  const parsed = parseEnrollment($("enroll-input").value);
  if (!parsed) {
    showError(error, "That doesn't look like an enrollment link or code. Copy it again from your account page.");
    $("enroll-input").focus();
    return;
  }
  if (!window.isSecureContext || !window.crypto || !window.crypto.subtle) {
    showError(error, "This page must be opened over HTTPS (or on localhost) to create a signing key.");
    return;
  }
  // Page scripts may only talk to their own origin (CSP connect-src 'self').
  if (parsed.server !== window.location.origin) {
    showMessage(
      $("enroll-info"),
      `The link names ${parsed.server}; this page enrolls with ${window.location.origin}.`,
      "info",
    );
  }
  const name = $("device-name").value.trim() || "Browser phone";
  const button = $("enroll");
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    const keyPair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
    const jwk = await crypto.subtle.exportKey("jwk", keyPair.publicKey);
    const res = await api("POST", "/api/devices", {
      code: parsed.code,
      name,
      platform: "web",
      public_key: publicJwk(jwk),
    });
    if (!res.ok) {
      showError(error, res);
      $("enroll-input").focus();
      return;
    }
    const record = {
      deviceId: res.body.device_id,
      deviceToken: res.body.device_token,
      keyPair,
      name,
      email: (res.body.user && res.body.user.email) || "",
      server: window.location.origin,
      enrolledAt: new Date().toISOString(),
      passcode: await passcodeFrom(res.body.passcode).catch(() => null),
    };
    await saveDevice(record);
    device = record;
    $("enroll-input").value = "";
    clearMessage($("enroll-info"));
    showDevice();
    showMessage(
      $("device-notice"),
      "This browser is now your phone. Turn on notifications below to get sign-in requests while this page is closed.",
      "success",
    );
    $("device-title").focus();
  } catch (err) {
    showError(error, `Couldn't create or store the device key: ${err && err.message ? err.message : err}`);
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// ---------- The device WebSocket ----------

function startLink() {
  link.stopped = false;
  link.attempts = 0;
  connect();
}

function stopLink() {
  link.stopped = true;
  link.ready = false;
  clearTimeout(link.timer);
  const socket = link.socket;
  link.socket = null;
  if (socket) {
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
  }
}

function connect() {
  if (link.stopped || !device) return;
  clearTimeout(link.timer);
  if (!navigator.onLine) {
    setConn("Offline", "offline"); // the "online" event reconnects
    return;
  }
  setConn(link.attempts ? "Reconnecting…" : "Connecting…");
  let socket;
  try {
    socket = new WebSocket(wsUrl("/ws/device"));
  } catch {
    scheduleReconnect();
    return;
  }
  link.socket = socket;
  link.ready = false;
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "auth", token: device.deviceToken }));
  };
  socket.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (frame && typeof frame === "object") onFrame(frame, socket);
  };
  socket.onclose = (event) => {
    if (link.socket !== socket) return;
    link.socket = null;
    link.ready = false;
    if (link.stopped) return;
    if (event.code === CLOSE_UNAUTHORIZED) {
      showRevoked();
      return;
    }
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  if (link.stopped) return;
  const delay = backoffDelay(link.attempts++, { base: 1000, cap: 30000 });
  setConn(`Offline, retrying in ${Math.ceil(delay / 1000)} s`, "offline");
  clearTimeout(link.timer);
  link.timer = setTimeout(connect, delay);
}

function send(frame) {
  if (!link.socket || !link.ready || link.socket.readyState !== WebSocket.OPEN) return false;
  link.socket.send(JSON.stringify(frame));
  return true;
}

function onFrame(frame, socket) {
  switch (frame.type) {
    case "ready":
      link.ready = true;
      link.attempts = 0;
      setConn("Connected", "online");
      break;
    case "approval_request":
      if (frame.approval && typeof frame.approval.id === "string") {
        // Ack first, before any rendering, so the browser sees "delivered" at once.
        if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "ack", id: frame.approval.id }));
        addRequest(frame.approval);
      }
      break;
    case "approval_resolved": {
      closeNotification(frame.id);
      const entry = requests.get(frame.id);
      if (entry && entry.decided && !entry.finished) {
        // Our own answer: its decision_result or error (e.g. wrong_number) says more; wait briefly.
        setTimeout(() => resolveRequest(frame.id, frame.status, "mine"), 1500);
      } else {
        resolveRequest(frame.id, frame.status, "elsewhere", frame.reason);
      }
      break;
    }
    case "decision_result":
      resolveRequest(frame.id, frame.status, "mine");
      break;
    case "error":
      onError(frame);
      break;
    case "device_revoked":
      showRevoked();
      break;
    case "passcode_seed":
      keepPasscodeSeed(frame, socket);
      break;
    default:
      break;
  }
}

function onError(frame) {
  const entry = frame.id ? requests.get(frame.id) : null;
  if (!entry) return;
  clearTimeout(entry.fallbackTimer);
  switch (frame.error) {
    case "wrong_number":
      finishRequest(entry, "denied", "Wrong number. The sign-in was denied.");
      break;
    case "expired":
      finishRequest(entry, "expired", "This request expired before your answer arrived.");
      break;
    case "already_decided":
      finishRequest(
        entry,
        frame.status || "done",
        `This request was already answered${frame.status ? ` (${frame.status})` : ""}.`,
      );
      break;
    case "not_found":
      finishRequest(entry, "expired", "This request is no longer available.");
      break;
    default:
      entryError(entry, errorText({ body: frame, status: 400 }));
      setBusy(entry, false);
      break;
  }
}

// ---------- Request cards ----------

function clearRequests() {
  for (const entry of requests.values()) {
    clearInterval(entry.timer);
    clearTimeout(entry.fallbackTimer);
  }
  requests.clear();
  $("requests").replaceChildren();
}

function renderIdle() {
  const pending = [...requests.values()].some((entry) => !entry.finished);
  $("idle").hidden = pending;
}

function addRequest(approval) {
  const existing = requests.get(approval.id);
  if (existing) return;
  if (approval.status && approval.status !== "pending") return;

  const id = approval.id;
  const context = approval.context || {};
  const asker = requester(approval);
  const match = approval.match || {};
  const digits = Number(match.digits) || 0;
  const offered = Array.isArray(approval.number_choices) ? approval.number_choices.map(String) : null;
  // Phone-only confirmation (docs/protocol.md §3.3): the asker shows no number, so the
  // person approves or denies, and the approval carries the one value it was given.
  const confirmNumber = match.mode === "confirm" && offered && offered.length === 1 ? offered[0] : null;
  const choices = confirmNumber === null ? offered : null;
  const numberId = `number-${id}`;
  const hintId = `number-hint-${id}`;

  const numberInput = h("input", {
    id: numberId,
    name: "number",
    type: "text",
    inputmode: "numeric",
    autocomplete: "off",
    pattern: "[0-9]*",
    maxlength: digits ? String(digits) : "10",
    "aria-describedby": hintId,
    class: "code-input",
  });
  const choiceButtons = choices
    ? choices.map((value) =>
        h(
          "button",
          {
            type: "button",
            "aria-pressed": "false",
            onclick: () => {
              numberInput.value = value;
              for (const b of choiceButtons) b.setAttribute("aria-pressed", String(b.textContent === value));
              numberInput.removeAttribute("aria-invalid");
            },
          },
          value,
        ),
      )
    : [];
  const approveButton = h("button", { type: "submit", class: "primary" }, "Approve");
  const denyButton = h("button", { type: "button", onclick: () => decide(entry, "deny") }, "Deny");
  const fraudButton = h("button", { type: "button", class: "danger fraud", onclick: () => decide(entry, "deny", "fraud") }, "Report fraud");
  const timeLeft = h("dd", { "data-testid": "time-left" }, "");
  const fill = h("div", { class: "countdown-fill" });
  const bar = h(
    "div",
    { class: "countdown", role: "progressbar", "aria-label": "Time left", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "100" },
    fill,
  );
  const message = h("p", { class: "status-line", role: "status", "aria-live": "polite", "data-testid": "decision-result" });

  const numberField =
    confirmNumber !== null
      ? h(
          "p",
          { class: "hint", id: hintId, "data-testid": "confirm-hint" },
          `${asker.shows} shows no number: approve only if you are signing in there right now.`,
        )
      : h(
          "div",
          { class: "field" },
          h("label", { for: numberId }, "Number"),
          numberInput,
          h(
            "p",
            { class: "hint", id: hintId },
            choices
              ? `Pick the number ${asker.shows} shows, then approve.`
              : `Type the ${digits ? `${digits}-digit ` : ""}number ${asker.shows} shows, then approve.`,
          ),
        );
  const form = h(
    "form",
    { onsubmit: (event) => { event.preventDefault(); decide(entry, "approve"); } },
    choices ? h("div", { class: "choices", role: "group", "aria-label": "Choices" }, choiceButtons) : null,
    numberField,
    h("div", { class: "decision-buttons" }, approveButton, denyButton, fraudButton),
  );

  const card = h(
    "article",
    { class: "card request", "data-testid": "approval-request", "data-approval-id": id, "aria-labelledby": `title-${id}` },
    h("h2", { id: `title-${id}` }, asker.rp ? `Approve a request from ${asker.name}?` : "Is this you signing in?"),
    h("dl", {}, ...(asker.rp ? rpDetails(asker, context) : loginDetails(context)), h("dt", {}, "Time left"), timeLeft),
    bar,
    form,
    message,
  );

  const expiresAt = Date.parse(approval.expires_at);
  const createdAt = Date.parse(approval.created_at);
  const life = Number.isNaN(createdAt) ? 120000 : Math.max(1000, expiresAt - createdAt);
  const entry = {
    id,
    approval,
    digits,
    card,
    form,
    numberInput,
    confirmNumber,
    buttons: [approveButton, denyButton, fraudButton, ...choiceButtons],
    message,
    timeLeft,
    fill,
    bar,
    expiresAt,
    total: Math.min(life, Math.max(1000, expiresAt - Date.now())),
    finished: false,
    decided: null,
    timer: null,
    fallbackTimer: null,
  };
  requests.set(id, entry);
  $("requests").prepend(card);
  clearMessage($("device-notice"));
  renderIdle();
  tickRequest(entry);
  entry.timer = setInterval(() => tickRequest(entry), 250);
  announce(
    asker.rp
      ? `New request from ${asker.name}.`
      : `New sign-in request from ${context.browser || "a browser"} on ${context.os || "an unknown system"}.`,
  );
  (confirmNumber !== null ? approveButton : choices ? choiceButtons[0] : numberInput).focus({ preventScroll: false });
}

/** Who asks (`requester`, docs/protocol.md §3.3); a server without it sends logins only. */
function requester(approval) {
  const given = approval.requester && typeof approval.requester === "object" ? approval.requester : {};
  if (given.kind !== "rp") return { rp: false, shows: "your browser" };
  const name = typeof given.name === "string" && given.name.trim() ? given.name.trim() : "an application";
  return { rp: true, name, shows: name };
}

function loginDetails(context) {
  return [
    h("dt", {}, "Browser"),
    h("dd", { "data-testid": "request-browser" }, context.browser || "Unknown"),
    h("dt", {}, "OS"),
    h("dd", { "data-testid": "request-os" }, context.os || "Unknown"),
    h("dt", {}, "IP address"),
    h("dd", { "data-testid": "request-ip", class: "mono" }, context.ip || "Unknown"),
  ];
}

/** A relying party's request: who asks, and the context it sent (no browser is involved). */
function rpDetails(asker, context) {
  // The server fills what the relying party left out from its own HTTP client ("curl 7" on
  // "Other"); a value that says nothing is left out rather than shown as a browser.
  const known = (value) => (value && value !== "Unknown" && value !== "Other" ? value : "");
  const client = [known(context.browser), known(context.os)].filter(Boolean).join(" on ");
  return [
    h("dt", {}, "Requested by"),
    h("dd", { "data-testid": "request-requester" }, asker.name),
    h("dt", {}, "IP address"),
    h("dd", { "data-testid": "request-ip", class: "mono" }, context.ip || "Unknown"),
    client ? h("dt", {}, "Client") : null,
    client ? h("dd", { "data-testid": "request-client" }, client) : null,
    ...requestDetails(context),
  ];
}

/** The labelled lines the relying party sent about its request (`context.details`, e.g. a
 * Duo client's pushinfo: "Command: sudo reboot"), as text, under the other fields. */
function requestDetails(context) {
  const lines = Array.isArray(context.details) ? context.details : [];
  return lines
    .filter((line) => line && typeof line.label === "string" && typeof line.value === "string")
    .slice(0, 12)
    .flatMap((line) => [
      h("dt", { "data-testid": "request-detail-label" }, line.label),
      h("dd", { "data-testid": "request-detail" }, line.value),
    ]);
}

function tickRequest(entry) {
  if (entry.finished) return;
  const left = entry.expiresAt - Date.now();
  const fraction = Math.max(0, Math.min(1, left / entry.total));
  entry.fill.style.transform = `scaleX(${fraction})`;
  entry.fill.classList.toggle("low", left < 15000);
  entry.bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  entry.timeLeft.textContent = left > 0 ? formatClock(left / 1000) : "0:00";
  if (left <= 0 && !entry.decided) finishRequest(entry, "expired", "This request expired.");
}

function setBusy(entry, busy) {
  for (const button of entry.buttons) button.disabled = busy;
  entry.numberInput.disabled = busy;
}

function entryError(entry, text) {
  entry.message.textContent = text;
  entry.message.className = "status-line error";
}

function resolveRequest(id, status, source, reason = null) {
  const entry = requests.get(id);
  if (!entry || entry.finished) return;
  clearTimeout(entry.fallbackTimer);
  if (source === "mine" || entry.decided) {
    const text =
      status === "approved"
        ? "Approved. You can go back to your browser."
        : entry.decided && entry.decided.reason === "fraud"
          ? "Reported as fraud. The sign-in was denied and your account is locked."
          : status === "denied"
            ? "Denied. The sign-in was blocked."
            : status === "expired"
              ? "This request expired."
              : `Finished: ${status}.`;
    finishRequest(entry, status, text);
    return;
  }
  const text =
    status === "expired"
      ? reason === "superseded"
        ? "Replaced by a newer request."
        : "This request expired."
      : status === "approved"
        ? "Approved on another device."
        : status === "denied"
          ? "Denied on another device."
          : `Finished: ${status}.`;
  finishRequest(entry, status, text);
}

function finishRequest(entry, status, text) {
  if (entry.finished) return;
  entry.finished = true;
  closeNotification(entry.id);
  clearInterval(entry.timer);
  clearTimeout(entry.fallbackTimer);
  entry.form.remove(); // only live requests keep a "Number" field and decision buttons
  entry.bar.hidden = true;
  entry.timeLeft.textContent = "—";
  entry.card.classList.add("done");
  entry.card.dataset.status = status;
  entry.message.textContent = text;
  entry.message.className = `status-line result ${status === "approved" ? "success" : status === "denied" ? "error" : ""}`.trim();
  announce(text);
  renderIdle();
  // Keep a short history of answered requests and drop older ones.
  const finished = [...requests.values()].filter((e) => e.finished);
  for (const old of finished.slice(0, Math.max(0, finished.length - MAX_FINISHED_CARDS))) {
    old.card.remove();
    requests.delete(old.id);
  }
}

// ---------- Decisions (ES256 compact JWS) ----------

function base64url(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const jsonPart = (value) => base64url(new TextEncoder().encode(JSON.stringify(value)));

/** Sign claims as a compact JWS; WebCrypto's ECDSA output is already the raw r||s that ES256 wants. */
async function signJws(claims) {
  const signingInput = `${jsonPart({ alg: "ES256", kid: device.deviceId })}.${jsonPart(claims)}`;
  const signature = await crypto.subtle.sign(
    { name: "ECDSA", hash: "SHA-256" },
    device.keyPair.privateKey,
    new TextEncoder().encode(signingInput),
  );
  return `${signingInput}.${base64url(new Uint8Array(signature))}`;
}

async function decide(entry, decision, reason = null) {
  if (entry.finished || entry.decided) return;
  const number = entry.confirmNumber !== null ? entry.confirmNumber : entry.numberInput.value.trim();
  if (decision === "approve" && entry.confirmNumber === null) {
    const wanted = entry.digits ? `${entry.digits}-digit ` : "";
    if (!/^[0-9]+$/.test(number) || (entry.digits && number.length !== entry.digits)) {
      entry.numberInput.setAttribute("aria-invalid", "true");
      entryError(entry, `Enter the ${wanted}number shown in your browser.`);
      entry.numberInput.focus();
      return;
    }
  }
  entry.numberInput.removeAttribute("aria-invalid");
  const claims = {
    aid: entry.id,
    chl: entry.approval.challenge,
    decision,
    number: number || null,
    iat: Math.floor(Date.now() / 1000),
  };
  if (reason) claims.reason = reason;
  setBusy(entry, true);
  entry.message.className = "status-line";
  entry.message.textContent = decision === "approve" ? "Approving…" : reason === "fraud" ? "Reporting…" : "Denying…";
  let jws;
  try {
    jws = await signJws(claims);
  } catch (err) {
    setBusy(entry, false);
    entryError(entry, `Couldn't sign the answer: ${err && err.message ? err.message : err}`);
    return;
  }
  entry.decided = { decision, reason };
  if (send({ type: "decision", jws })) {
    // The socket normally answers with decision_result or error; if it goes quiet, use HTTP.
    entry.fallbackTimer = setTimeout(() => postDecision(entry, jws), DECISION_FALLBACK_MS);
  } else {
    postDecision(entry, jws);
  }
}

async function postDecision(entry, jws) {
  if (entry.finished) return;
  const res = await api("POST", `/api/approvals/${encodeURIComponent(entry.id)}/decision`, { jws }, { token: device.deviceToken });
  if (entry.finished) return;
  if (res.ok) {
    resolveRequest(entry.id, res.body.status, "mine");
  } else if (res.status === 401) {
    showRevoked();
  } else if (res.status === 0) {
    entry.decided = null;
    setBusy(entry, false);
    entryError(entry, "No connection. Your answer was not sent; try again.");
  } else {
    onError({ id: entry.id, ...res.body });
  }
}

// ---------- Forget / re-enroll ----------

async function forget() {
  const button = $("forget");
  button.disabled = true;
  clearMessage($("device-error"));
  const res = await api("DELETE", "/api/devices/me", undefined, { token: device.deviceToken });
  button.disabled = false;
  // 401: the server already forgot this device; anything else but success keeps it enrolled.
  if (!res.ok && res.status !== 401) {
    showError($("device-error"), `Couldn't remove this device: ${errorText(res)}`);
    return;
  }
  await clearDevice();
  device = null;
  await unsubscribeHere();
  showEnrollForm("This device was removed from your account and its key deleted from this browser.");
}

async function reEnroll() {
  await clearDevice();
  device = null;
  showEnrollForm();
}

// ---------- Installable app, Web Push, requests opened from a notification ----------

const serviceWorker = "serviceWorker" in navigator ? navigator.serviceWorker : null;
let installPrompt = null;

async function registerServiceWorker() {
  if (!serviceWorker) return null;
  try {
    return await serviceWorker.register("/phone/sw.js", { scope: "/phone" });
  } catch (err) {
    console.warn("service worker not registered:", err);
    return null;
  }
}

function showOnline() {
  $("offline-notice").hidden = navigator.onLine;
}

function base64urlToBytes(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/");
  const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function sameKey(a, b) {
  if (!a || !b) return false;
  const x = new Uint8Array(a);
  return x.length === b.length && x.every((byte, i) => byte === b[i]);
}

const isAppleMobile = () => /iPhone|iPad|iPod/.test(navigator.userAgent) || (navigator.platform === "MacIntel" && navigator.maxTouchPoints > 1);
const isInstalled = () => window.matchMedia("(display-mode: standalone)").matches || navigator.standalone === true;

async function currentSubscription() {
  if (!serviceWorker || !("PushManager" in window)) return null;
  const registration = await serviceWorker.getRegistration("/phone");
  return registration ? registration.pushManager.getSubscription() : null;
}

/** The notifications card: what this browser can do, and whether this phone gets pushes. */
async function renderPush() {
  if (!device) return;
  const text = $("push-text");
  const on = $("push-on");
  const off = $("push-off");
  $("push-card").hidden = false;
  on.hidden = off.hidden = true;
  $("install").hidden = !installPrompt;
  if (!serviceWorker || !("PushManager" in window) || !("Notification" in window)) {
    text.textContent =
      isAppleMobile() && !isInstalled()
        ? "On iPhone and iPad, notifications need this app on your Home Screen: tap Share, then “Add to Home Screen”, and open tapprove from there."
        : "This browser can't show notifications from tapprove. Keep this page open to get sign-in requests.";
    return;
  }
  if (Notification.permission === "denied") {
    text.textContent = "Notifications are blocked for this site. Allow them in your browser's site settings, then reload this page.";
    return;
  }
  let subscription = null;
  try {
    subscription = await currentSubscription();
  } catch {
    subscription = null;
  }
  if (subscription && Notification.permission === "granted" && device.pushEndpoint === subscription.endpoint) {
    text.textContent = "Notifications are on: sign-in requests reach this phone even when this page is closed.";
    off.hidden = false;
  } else {
    text.textContent =
      "Get a notification for each sign-in request, even when this page is closed. Your browser will ask for permission; the notification only says that someone is signing in, and you answer here.";
    on.hidden = false;
  }
}

/** Subscribe this browser (on the person's click: browsers ask for permission only then). */
async function enablePush() {
  clearMessage($("push-status"));
  $("push-status").className = "status-line";
  await busy($("push-on"), async () => {
    try {
      const permission = await Notification.requestPermission();
      if (permission !== "granted") {
        setPushStatus("Notifications were not allowed, so requests arrive only while this page is open.", "error");
        return;
      }
      const registration = (await registerServiceWorker()) && (await serviceWorker.ready);
      if (!registration) throw new Error("this browser did not start the app's service worker");
      const keyAnswer = await api("GET", "/api/webpush/key");
      if (!keyAnswer.ok) throw new Error(errorText(keyAnswer));
      const key = base64urlToBytes(keyAnswer.body.public_key);
      let subscription = await registration.pushManager.getSubscription();
      if (subscription && !sameKey(subscription.options.applicationServerKey, key)) {
        await subscription.unsubscribe(); // made for another server key: no longer usable
        subscription = null;
      }
      subscription = subscription || (await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key }));
      await registerSubscription(subscription);
      setPushStatus("Notifications are on.", "success");
    } catch (err) {
      setPushStatus(`Couldn't turn on notifications: ${err && err.message ? err.message : err}`, "error");
    }
  });
  await renderPush();
}

async function registerSubscription(subscription) {
  const res = await api(
    "PATCH",
    "/api/devices/me",
    { push: { provider: "webpush", subscription: subscription.toJSON() } },
    { token: device.deviceToken },
  );
  if (res.status === 401) {
    showRevoked();
    throw new Error("this device was revoked");
  }
  if (!res.ok) throw new Error(errorText(res));
  device.pushEndpoint = subscription.endpoint;
  await saveDevice(device);
}

async function disablePush() {
  await busy($("push-off"), async () => {
    const res = await api("PATCH", "/api/devices/me", { push: null }, { token: device.deviceToken });
    if (!res.ok && res.status !== 401) {
      setPushStatus(`Couldn't turn off notifications: ${errorText(res)}`, "error");
      return;
    }
    await unsubscribeHere();
    delete device.pushEndpoint;
    await saveDevice(device);
    setPushStatus("Notifications are off. Requests arrive while this page is open.", "success");
  });
  await renderPush();
}

async function unsubscribeHere() {
  try {
    const subscription = await currentSubscription();
    if (subscription) await subscription.unsubscribe();
  } catch {
    // Nothing to undo: the server forgets the subscription with the device anyway.
  }
}

/** A subscription the browser renewed by itself since the server last heard of it. */
async function refreshSubscription() {
  try {
    if (!("Notification" in window) || Notification.permission !== "granted" || !device.pushEndpoint) return;
    const subscription = await currentSubscription();
    if (subscription && subscription.endpoint !== device.pushEndpoint) await registerSubscription(subscription);
  } catch {
    // Tried again the next time the page opens.
  }
}

function setPushStatus(text, kind) {
  $("push-status").textContent = text;
  $("push-status").className = `status-line ${kind}`.trim();
}

function closeNotification(id) {
  if (!serviceWorker) return;
  serviceWorker
    .getRegistration("/phone")
    .then((registration) => (registration ? registration.getNotifications({ tag: id }) : []))
    .then((shown) => shown.forEach((notification) => notification.close()))
    .catch(() => {});
}

/** /phone?approval=<id> (a notification's target): show that request, focused, or say how it ended. */
async function openRequestFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const id = params.get("approval");
  if (!id) return;
  history.replaceState(null, "", window.location.pathname + window.location.hash);
  if (!device) return;
  const res = await api("GET", `/api/approvals/${encodeURIComponent(id)}`, undefined, { token: device.deviceToken });
  if (!device) return;
  if (res.ok && res.body && res.body.status === "pending") {
    addRequest(res.body);
    const entry = requests.get(id);
    if (entry && !entry.finished) {
      entry.card.scrollIntoView({ block: "start" });
      (entry.form.querySelector(".choices button") || (entry.confirmNumber !== null ? entry.buttons[0] : entry.numberInput)).focus();
    }
    return;
  }
  closeNotification(id);
  const status = res.ok && res.body ? res.body.status : "";
  showMessage(
    $("device-notice"),
    status === "approved" || status === "denied"
      ? `That request was already answered (${status}).`
      : "That request is no longer waiting for an answer.",
    "info",
  );
}

window.addEventListener("beforeinstallprompt", (event) => {
  event.preventDefault(); // offered on our own button, next to the explanation
  installPrompt = event;
  if (device) $("install").hidden = false;
});
$("install").addEventListener("click", async () => {
  if (!installPrompt) return;
  const prompt = installPrompt;
  installPrompt = null;
  $("install").hidden = true;
  await prompt.prompt();
});
$("push-on").addEventListener("click", enablePush);
$("push-off").addEventListener("click", disablePush);
window.addEventListener("online", showOnline);
window.addEventListener("offline", showOnline);

// ---------- Start ----------

function prefillFromHash() {
  const hash = window.location.hash.slice(1);
  if (!hash) return;
  const params = new URLSearchParams(hash);
  const value = params.get("enroll") || params.get("code");
  if (value) $("enroll-input").value = value;
  // The code is a secret: don't leave it in the address bar or history.
  history.replaceState(null, "", window.location.pathname + window.location.search);
}

$("enroll-form").addEventListener("submit", enroll);
window.addEventListener("hashchange", prefillFromHash);
$("forget").addEventListener("click", forget);
$("re-enroll").addEventListener("click", reEnroll);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && device && !link.stopped && !link.socket) connect();
});
window.addEventListener("online", () => {
  if (device && !link.stopped && !link.socket) connect();
});
// The network is gone (a plane, a basement): drop the socket now rather than when its pings
// time out; the passcode card keeps counting, and `online` reconnects.
window.addEventListener("offline", () => {
  if (link.socket) link.socket.close();
});

prefillFromHash();
try {
  device = (await loadDevice()) || null;
} catch {
  device = null;
}
showOnline();
registerServiceWorker();
if (device && device.deviceToken && device.keyPair && device.keyPair.privateKey) {
  showDevice();
  refreshSubscription();
  openRequestFromUrl();
} else {
  device = null;
  showEnrollForm();
}
