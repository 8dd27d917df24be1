// The sign-in page: password, then wait for the phone (live stream with polling fallback).
import { api, backoffDelay, errorText, formatClock, formatDuration, h, showError, clearMessage, wsUrl } from "/static/api.js";

const $ = (id) => document.getElementById(id);

const CHANNEL_LABELS = {
  websocket: "Sent to your phone",
  fcm: "Push notification sent",
  apns: "Push notification sent",
  webpush: "Notification sent",
  sms: "SMS sent",
  email: "Email sent",
};
const POLL_MS = 2000;
const EXPIRY_GRACE_MS = 3000;

/** Everything about the approval being waited for; replaced on each sign-in attempt. */
let wait = null;

function showView(name) {
  for (const view of ["form", "wait", "end"]) $(`view-${view}`).hidden = view !== name;
}

// ---------- 1. The form ----------

async function submitLogin(event) {
  event.preventDefault();
  const form = $("login-form");
  if (!form.reportValidity()) return;
  clearMessage($("form-error"));
  const button = $("sign-in");
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.textContent = "Signing in…";
  const email = $("email").value.trim();
  const res = await api("POST", "/api/login", {
    email,
    password: $("password").value,
    remember_browser: $("remember").checked,
  });
  button.disabled = false;
  button.removeAttribute("aria-busy");
  button.textContent = "Sign in";

  if (res.status === 200) {
    // authenticated, or enrollment_required: the account page lets a new user add a phone
    window.location.assign("/account");
    return;
  }
  if (res.status === 202 && res.body.status === "approval_required") {
    startWaiting(res.body, res.clockOffset);
    return;
  }
  if (res.status === 0 || res.status === 422 || res.status === 413) {
    showError($("form-error"), res);
    return;
  }
  showEnding(endingForError(res, email));
}

function endingForError(res, email) {
  switch (res.body.error) {
    case "invalid_credentials":
      return { title: "Wrong email or password", message: "The email or password is not right. Check them and try again." };
    case "email_not_verified":
      return {
        title: "Confirm your email first",
        message: "Open the link we emailed you when you registered, then sign in again.",
        resendVerificationTo: email,
      };
    case "recovery_required":
      return {
        title: "Your account has no phone any more",
        message:
          "Every phone on this account was removed, and a password alone cannot add a new one. Ask your administrator for a link to add your new phone.",
      };
    case "locked":
      return {
        title: "Sign-in is locked",
        message:
          "A sign-in request was reported as fraud, so new requests are blocked. Contact your administrator to unlock your account.",
      };
    case "rate_limited":
      return {
        title: "Too many attempts",
        message:
          res.retryAfter == null
            ? "Please wait a moment before trying again."
            : `Please wait ${formatDuration(res.retryAfter)} before trying again.`,
        retryAfter: res.retryAfter,
      };
    default:
      return { title: "Sign-in failed", message: errorText(res) };
  }
}

// ---------- 2. Waiting for the phone ----------

function startWaiting(body, clockOffset) {
  stopWaiting();
  const expiresAt = Date.parse(body.expires_at);
  const now = Date.now() + clockOffset;
  wait = {
    id: body.approval_id,
    stream: body.stream || `/ws/login/${encodeURIComponent(body.approval_id)}`,
    expiresAt,
    total: Math.max(1000, expiresAt - now),
    clockOffset,
    done: false,
    socket: null,
    attempts: 0,
    reconnectTimer: null,
    pollTimer: null,
    tickTimer: null,
    expiredAt: null,
    channels: new Map(),
  };

  const number = String(body.number ?? "");
  const match = body.match || {};
  const numberEl = $("match-number");
  numberEl.textContent = number;
  numberEl.dataset.testid = "match-number";
  numberEl.classList.toggle("long", number.length > 3);
  $("wait-lead").textContent =
    match.mode === "choices"
      ? "Pick this number on your phone to approve the sign-in:"
      : `Enter this ${number.length > 2 ? `${number.length}-digit ` : ""}number on your phone to approve the sign-in:`;

  $("channels").replaceChildren();
  const channels = Array.isArray(body.channels) ? body.channels : [];
  channels.forEach((c) => markChannel(c, false));
  renderNoChannel();
  setStatus("Waiting for your answer on your phone…");
  $("resend").disabled = false;
  $("resend").hidden = false;
  $("use-sms").disabled = false;
  $("use-sms").hidden = body.sms_available === false;
  $("sms-form").hidden = true;
  $("sms-code").value = "";
  clearMessage($("sms-error"));
  if (channels.includes("sms")) showSmsForm();

  showView("wait");
  $("wait-title").focus();
  tick();
  wait.tickTimer = setInterval(tick, 250);
  connect();
}

function stopWaiting() {
  if (!wait) return;
  delete $("match-number").dataset.testid;
  wait.done = true;
  clearInterval(wait.tickTimer);
  clearTimeout(wait.reconnectTimer);
  clearTimeout(wait.pollTimer);
  if (wait.socket) {
    const socket = wait.socket;
    wait.socket = null;
    socket.onclose = socket.onmessage = socket.onerror = null;
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
  }
}

function setStatus(text, kind = "") {
  const el = $("wait-status");
  el.textContent = text;
  el.className = `status-line ${kind}`.trim();
}

function setConn(text) {
  $("conn-text").textContent = text;
}

function markChannel(channel, delivered) {
  const label = CHANNEL_LABELS[channel] || `Sent (${channel})`;
  let item = wait.channels.get(label);
  if (!item) {
    item = h("li", { class: "channel sent", "data-channel": channel }, h("span", {}, label));
    wait.channels.set(label, item);
    $("channels").append(item);
  }
  if (delivered && !item.classList.contains("delivered")) {
    item.classList.add("delivered");
    item.append(h("span", { class: "tag" }, "· delivered"));
  }
  // The server texts a code by itself when no phone app can be reached: offer the field.
  if (channel === "sms" && $("sms-form").hidden && !$("view-wait").hidden) {
    showSmsForm();
    setStatus("We sent a code by SMS. Enter it below, or approve on your phone.");
  }
  renderNoChannel();
}

function renderNoChannel() {
  const list = $("channels");
  const placeholder = list.querySelector(".none");
  if (wait.channels.size === 0 && !placeholder) {
    list.append(h("li", { class: "channel none" }, "Your phone isn't connected right now. Open the tapprove app, or use Resend."));
  } else if (wait.channels.size > 0 && placeholder) {
    placeholder.remove();
  }
}

function tick() {
  if (!wait || wait.done) return;
  const left = wait.expiresAt - (Date.now() + wait.clockOffset);
  const fraction = Math.max(0, Math.min(1, left / wait.total));
  const fill = $("countdown-fill");
  fill.style.transform = `scaleX(${fraction})`;
  fill.classList.toggle("low", left < 15000);
  $("countdown").setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  $("countdown-text").textContent = left > 0 ? `Expires in ${formatClock(left / 1000)}` : "Expired";
  if (left <= 0 && wait.expiredAt === null) {
    // The server sends the result; ask once in case the stream is down, then give up locally.
    wait.expiredAt = Date.now();
    $("resend").disabled = true;
    $("use-sms").disabled = true;
    poll();
  } else if (wait.expiredAt !== null && Date.now() - wait.expiredAt > EXPIRY_GRACE_MS) {
    finish("expired");
  }
}

function connect() {
  if (!wait || wait.done) return;
  const current = wait;
  let socket;
  try {
    socket = new WebSocket(wsUrl(current.stream));
  } catch {
    scheduleReconnect(current);
    return;
  }
  current.socket = socket;
  setConn(current.attempts ? "Reconnecting…" : "Connecting…");
  socket.onopen = () => {
    setConn("Live");
  };
  socket.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    current.attempts = 0;
    stopPolling(current);
    handleFrame(frame);
  };
  socket.onclose = () => {
    if (current.socket === socket) current.socket = null;
    if (current.done) return;
    // Dropped before a result: keep the page alive by polling while we reconnect.
    setConn("Reconnecting…");
    startPolling(current);
    scheduleReconnect(current);
  };
}

function scheduleReconnect(current) {
  if (current.done) return;
  clearTimeout(current.reconnectTimer);
  const delay = backoffDelay(current.attempts++, { base: 500, cap: 10000 });
  current.reconnectTimer = setTimeout(connect, delay);
}

function startPolling(current) {
  if (current.pollTimer !== null || current.done) return;
  current.pollTimer = setTimeout(() => pollLoop(current), 250);
}

function stopPolling(current) {
  clearTimeout(current.pollTimer);
  current.pollTimer = null;
}

async function pollLoop(current) {
  if (current.done) return;
  await poll();
  if (current.done || current.pollTimer === null) return;
  current.pollTimer = setTimeout(() => pollLoop(current), POLL_MS);
}

async function poll() {
  const current = wait;
  if (!current || current.done) return;
  const res = await api("GET", `/api/login/${encodeURIComponent(current.id)}`);
  if (current !== wait || current.done) return;
  if (res.status === 200) {
    if (Array.isArray(res.body.channels)) res.body.channels.forEach((c) => markChannel(c, false));
    if (Array.isArray(res.body.delivered)) res.body.delivered.forEach((c) => markChannel(c, true));
    if (["approved", "denied", "expired"].includes(res.body.status)) finish(res.body.status, res.body);
  } else if (res.status === 404 || res.status === 410) {
    finish("expired");
  } else if (res.status === 403) {
    finishWithError({ title: "This sign-in belongs to another browser", message: errorText(res) });
  }
  // Network errors and 5xx: keep waiting; the socket or the next poll will tell.
}

function handleFrame(frame) {
  if (!wait || wait.done || !frame || typeof frame !== "object") return;
  switch (frame.type) {
    case "status":
      if (Array.isArray(frame.channels)) frame.channels.forEach((c) => markChannel(c, false));
      if (Array.isArray(frame.delivered)) frame.delivered.forEach((c) => markChannel(c, true));
      if (["approved", "denied", "expired"].includes(frame.status)) finish(frame.status, frame);
      break;
    case "delivered":
      markChannel(frame.channel, true);
      if (["websocket", "fcm", "apns", "webpush"].includes(frame.channel)) {
        setStatus("Your phone received the request. Waiting for your answer…");
      }
      break;
    case "result":
      finish(frame.status, frame);
      break;
    default:
      break;
  }
}

// ---------- Resend and SMS ----------

async function resend() {
  if (!wait || wait.done) return;
  const current = wait;
  const button = $("resend");
  button.disabled = true;
  const res = await api("POST", `/api/login/${encodeURIComponent(current.id)}/resend`);
  if (current !== wait || current.done) return;
  if (res.ok) {
    if (Array.isArray(res.body.channels)) res.body.channels.forEach((c) => markChannel(c, false));
    setStatus("Sent again. Check your phone.", "success");
    // A short pause stops double clicks from burning the resend allowance.
    setTimeout(() => {
      if (current === wait && !current.done && current.expiredAt === null) button.disabled = false;
    }, 3000);
  } else if (res.status === 429) {
    // At most 3 resends per request: the button stays off for this one.
    setStatus("This request can't be resent again. Use an SMS code, or start over.", "error");
  } else {
    setStatus(errorText(res), "error");
    button.disabled = false;
    // 409/410: the request already ended; the poll turns that into the right ending.
    if (res.status === 409 || res.status === 410) poll();
  }
}

async function requestSms() {
  if (!wait || wait.done) return;
  const current = wait;
  const button = $("use-sms");
  button.disabled = true;
  const res = await api("POST", `/api/login/${encodeURIComponent(current.id)}/sms`);
  if (current !== wait || current.done) return;
  if (res.ok) {
    markChannel("sms", false);
    showSmsForm();
    setStatus("We sent a code by SMS. Enter it below.", "success");
    setTimeout(() => {
      if (current === wait && !current.done && current.expiredAt === null) button.disabled = false;
    }, 10000);
  } else {
    setStatus(errorText(res), "error");
    // 4xx other than rate limiting: SMS is not available for this account; stop offering it.
    if (res.status >= 400 && res.status < 500 && res.status !== 429) button.hidden = true;
    else button.disabled = false;
    if (res.status === 409 || res.status === 410) poll();
  }
}

function showSmsForm() {
  $("sms-form").hidden = false;
  $("sms-code").focus();
}

async function submitCode(event) {
  event.preventDefault();
  if (!wait || wait.done) return;
  const current = wait;
  const input = $("sms-code");
  const code = input.value.replace(/\s+/g, "");
  if (!code) {
    input.setAttribute("aria-invalid", "true");
    showError($("sms-error"), "Enter the code from the SMS.");
    input.focus();
    return;
  }
  clearMessage($("sms-error"));
  const button = $("verify-code");
  button.disabled = true;
  const res = await api("POST", `/api/login/${encodeURIComponent(current.id)}/code`, { code });
  button.disabled = false;
  if (current !== wait || current.done) return;
  if (res.ok) {
    input.removeAttribute("aria-invalid");
    finish("approved");
  } else {
    input.setAttribute("aria-invalid", "true");
    showError($("sms-error"), res);
    input.select();
    // After too many wrong codes the approval is denied; the stream (or a poll) reports it.
    if (res.status !== 400) poll();
  }
}

// ---------- 3. Endings ----------

function finish(status, info = {}) {
  if (!wait || wait.done) return;
  const current = wait;
  stopWaiting();
  if (status === "approved") {
    complete(current);
    return;
  }
  if (status === "denied") {
    const reason = info.reason || info.error;
    if (reason === "wrong_number") {
      showEnding({ title: "Wrong number", message: "The number entered on your phone didn't match, so the sign-in was denied." });
    } else if (reason === "fraud") {
      showEnding({
        title: "Reported as fraud",
        message: "This sign-in was reported as fraud on your phone. New sign-ins are blocked until an administrator unlocks your account.",
      });
    } else {
      showEnding({ title: "Sign-in denied", message: "The request was denied on your phone." });
    }
    return;
  }
  if (info.reason === "superseded") {
    showEnding({
      title: "Replaced by a newer sign-in",
      message: "A newer sign-in to this account (in another tab or browser) replaced this request. Start again here to send a new one.",
    });
    return;
  }
  showEnding({ title: "Request expired", message: "The request wasn't answered in time. Start again to send a new one." });
}

function finishWithError(ending) {
  stopWaiting();
  showEnding(ending);
}

async function complete(current) {
  setStatus("Approved. Signing you in…", "success");
  setConn("");
  $("resend").disabled = true;
  $("use-sms").disabled = true;
  const res = await api("POST", `/api/login/${encodeURIComponent(current.id)}/complete`);
  if (res.ok || res.body.error === "already_completed") {
    window.location.assign("/account");
    return;
  }
  showEnding({ title: "Couldn't finish signing in", message: errorText(res) });
}

let retryTimer = null;

function showEnding({ title, message, retryAfter = null, resendVerificationTo = null, ok = false }) {
  const icon = $("end-icon");
  icon.textContent = ok ? "✓" : "!";
  icon.className = ok ? "end-icon ok" : "end-icon";
  $("end-title").textContent = title;
  $("end-message").textContent = message;
  $("end-status").textContent = "";
  const resendButton = $("resend-verification");
  resendButton.hidden = !resendVerificationTo;
  resendButton.disabled = false;
  resendButton.dataset.email = resendVerificationTo || "";

  const tryAgain = $("try-again");
  clearInterval(retryTimer);
  tryAgain.disabled = false;
  tryAgain.textContent = "Try again";
  if (retryAfter && retryAfter > 0) {
    // Keep the button (and its name) but say how long is left next to it.
    const until = Date.now() + retryAfter * 1000;
    const update = () => {
      const left = (until - Date.now()) / 1000;
      $("end-status").textContent = left > 0 ? `You can try again in ${formatClock(left)}.` : "You can try again now.";
      if (left <= 0) clearInterval(retryTimer);
    };
    update();
    retryTimer = setInterval(update, 1000);
  }
  showView("end");
  $("end-title").focus();
}

async function resendVerification() {
  const button = $("resend-verification");
  const email = button.dataset.email;
  if (!email) return;
  button.disabled = true;
  const res = await api("POST", "/api/verify-email/resend", { email });
  $("end-status").textContent = res.ok
    ? "If that address is registered, a new confirmation link is on its way."
    : errorText(res);
  if (!res.ok) button.disabled = false;
}

function startOver() {
  stopWaiting();
  wait = null;
  clearInterval(retryTimer);
  $("password").value = "";
  clearMessage($("form-error"));
  showView("form");
  ($("email").value ? $("password") : $("email")).focus();
}

// ---------- Wiring ----------

$("login-form").addEventListener("submit", submitLogin);
$("resend").addEventListener("click", resend);
$("use-sms").addEventListener("click", requestSms);
$("sms-form").addEventListener("submit", submitCode);
$("cancel").addEventListener("click", startOver);
$("try-again").addEventListener("click", startOver);
$("resend-verification").addEventListener("click", resendVerification);
$("sms-code").addEventListener("input", (e) => e.target.removeAttribute("aria-invalid"));

// Coming back to a backgrounded tab: reconnect at once instead of waiting out the backoff.
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible" || !wait || wait.done || wait.socket) return;
  clearTimeout(wait.reconnectTimer);
  connect();
  poll();
});
window.addEventListener("online", () => {
  if (!wait || wait.done || wait.socket) return;
  clearTimeout(wait.reconnectTimer);
  connect();
});
