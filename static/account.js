// The account page: devices and enrollment, phone number and SMS fallback, trusted browsers,
// recent activity, sign out. Any 401 sends the visitor back to the sign-in page.
import {
  api,
  errorText,
  formatClock,
  formatDateTime,
  formatRelative,
  h,
  showError,
  clearMessage,
} from "/static/api.js";

const $ = (id) => document.getElementById(id);

const PLATFORMS = { android: "Android", ios: "iOS", web: "Browser" };
const CHANNEL_NAMES = {
  fcm: "push (FCM)",
  apns: "push (APNs)",
  webpush: "notification (Web Push)",
  sms: "SMS",
  websocket: "app connection",
  email: "email",
};
const EVENT_NAMES = {
  "login.failed": "Failed sign-in (wrong password)",
  "login.enrollment_required": "Signed in to add a first phone",
  "login.recovery_required": "Sign-in refused: no phone left, and the password alone cannot add one",
  "login.trusted_browser": "Signed in from a trusted browser",
  "login.completed": "Signed in",
  logout: "Signed out",
  "browser.trusted": "Browser remembered",
  "browser.untrusted": "Trusted browser removed",
  "device.enrollment_started": "Enrollment code created",
  "device.added": "Phone added",
  "device.updated": "Phone updated",
  "device.revoked": "Phone revoked",
  "account.updated": "Settings changed",
  "phone.verified": "Phone number verified",
  "approval.created": "Approval requested",
  "approval.superseded": "Request replaced by a newer one",
  "user.locked": "Sign-in locked after a fraud report",
};

let account = null;
let enrollment = null; // {expiresAt, timer, poll, deviceIds}

function signedOut(res) {
  if (res.status === 401) {
    window.location.replace("/");
    return true;
  }
  return false;
}

function setStatus(id, text, kind = "") {
  const el = $(id);
  el.textContent = text;
  el.className = `status-line ${kind}`.trim();
}

// ---------- Loading ----------

async function load() {
  const res = await api("GET", "/api/account");
  if (signedOut(res)) return false;
  if (!res.ok) {
    showError($("page-error"), res);
    return false;
  }
  clearMessage($("page-error"));
  account = res.body;
  render();
  $("main").setAttribute("aria-busy", "false");
  return true;
}

function render() {
  const email = account.email || "";
  $("who").textContent = email;
  $("account-email").textContent = email;
  const devices = Array.isArray(account.devices) ? account.devices : [];
  const restricted = account.restricted === true;
  // No phone yet: ask for one. A phone but a restricted session: a fresh sign-in unlocks the rest.
  $("restricted-banner").hidden = devices.length > 0;
  $("reauth-banner").hidden = !(restricted && devices.length > 0);
  $("locked-banner").hidden = account.locked !== true;
  for (const id of ["phone-fieldset", "trusted-fieldset"]) $(id).disabled = restricted;
  $("restricted-note").hidden = !restricted;
  renderDevices(devices);
  renderPhone();
  renderTrusted(Array.isArray(account.trusted_browsers) ? account.trusted_browsers : []);
}

// ---------- Devices ----------

function deviceName(device) {
  return device.name || "Unnamed device";
}

function renderDevices(devices) {
  const list = $("devices");
  if (devices.length === 0) {
    list.replaceChildren(h("li", { class: "empty" }, "No phone yet."));
    return;
  }
  list.replaceChildren(
    ...devices.map((device) => {
      const lastSeen = device.last_seen_at || device.last_seen;
      const added = device.created_at;
      const meta = [
        lastSeen ? `Last seen ${formatRelative(lastSeen)}` : "Not seen yet",
        added ? `added ${formatDateTime(added)}` : "",
      ].filter(Boolean);
      return h(
        "li",
        { "data-testid": "device-row", "data-device-id": device.id },
        h(
          "div",
          { class: "item-main" },
          h(
            "div",
            { class: "item-title" },
            h("span", { class: "device-name" }, deviceName(device)),
            h("span", { class: "pill" }, PLATFORMS[device.platform] || device.platform || "Unknown"),
            device.push ? h("span", { class: "pill" }, "Push") : null,
          ),
          h("div", { class: "item-meta", title: lastSeen ? formatDateTime(lastSeen) : "" }, meta.join(" · ")),
        ),
        h(
          "button",
          {
            type: "button",
            class: "danger small",
            "aria-label": `Revoke ${deviceName(device)}`,
            // A restricted session (no phone approval yet) may not revoke; the banner says why.
            disabled: account.restricted === true,
            onclick: (event) => revokeDevice(device, event.currentTarget),
          },
          "Revoke",
        ),
      );
    }),
  );
}

async function revokeDevice(device, button) {
  button.disabled = true;
  const res = await api("DELETE", `/api/devices/${encodeURIComponent(device.id)}`);
  if (signedOut(res)) return;
  if (res.ok || res.status === 404) {
    setStatus("devices-status", `${deviceName(device)} was revoked.`, "success");
    await load();
    loadActivity();
  } else {
    button.disabled = false;
    setStatus("devices-status", errorText(res), "error");
  }
}

// Inline SVG (as segno's svg_inline gives) has no xmlns; an <img> needs it to render at all.
function standaloneSvg(svg) {
  const text = svg.trim();
  if (/^<svg\b/i.test(text) && !/^<svg\b[^>]*\sxmlns\s*=/i.test(text)) {
    return text.replace(/^<svg\b/i, '<svg xmlns="http://www.w3.org/2000/svg"');
  }
  return text;
}

// Base64 of the UTF-8 bytes, for a data: URL (btoa alone only takes Latin-1).
function base64Utf8(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function addPhone() {
  const button = $("add-phone");
  button.disabled = true;
  setStatus("devices-status", "");
  const res = await api("POST", "/api/devices/enrollments");
  button.disabled = false;
  if (signedOut(res)) return;
  if (!res.ok) {
    setStatus("devices-status", errorText(res), "error");
    return;
  }
  showEnrollment(res.body);
}

function showEnrollment(body) {
  closeEnrollment();
  const uri = String(body.uri || "");
  const code = String(body.code || "");
  // For a phone's camera: the /phone app with the code filled in (an older server: the link).
  const qrSvg = typeof body.phone_qr_svg === "string" && body.phone_qr_svg ? body.phone_qr_svg : body.qr_svg;
  const qr =
    typeof qrSvg === "string" && qrSvg
      ? // An <img> never runs scripts inside the SVG, and nothing is parsed into this page's DOM.
        h("img", {
          class: "qr",
          id: "enroll-qr",
          "data-testid": "enroll-qr",
          alt: "QR code that opens the tapprove phone app on your phone, with this code filled in",
          width: "200",
          height: "200",
          src: `data:image/svg+xml;base64,${base64Utf8(standaloneSvg(qrSvg))}`,
        })
      : null;
  const close = h("button", { type: "button", class: "link", onclick: onCloseEnrollment }, "Close");
  $("enroll").replaceChildren(
    ...[qr].filter(Boolean),
    h(
      "div",
      { class: "enroll-details" },
      h("h3", {}, "Enroll a phone"),
      h(
        "ol",
        { "data-testid": "enroll-steps" },
        h(
          "li",
          {},
          "Scan the QR code with your phone's camera: it opens ",
          h("a", { href: "/phone", target: "_blank", rel: "noopener", "data-testid": "phone-page-link" }, `${window.location.origin}/phone`),
          " with this code. Tap Enroll.",
        ),
        h(
          "li",
          { "data-testid": "install-step" },
          "Add it to your Home Screen (Chrome: menu, “Install app”; Safari: Share, “Add to Home Screen”), open it from there and turn on notifications. ",
          "iPhone and iPad show them only in the Home Screen app.",
        ),
        h(
          "li",
          {},
          "Or the reference client (apps use the link below): ",
          h("code", { class: "code-box", "data-testid": "stub-command" }, `python -m mobile_stub enroll '${uri || code}' --state phone.json`),
        ),
      ),
      h("p", { class: "hint" }, "Enrollment link"),
      h("a", { class: "code-box", id: "enroll-uri", "data-testid": "enroll-uri", href: uri.startsWith("tapprove:") ? uri : null }, uri),
      h("p", { class: "hint" }, "Or type this code"),
      h("code", { class: "code-box", id: "enroll-code", "data-testid": "enroll-code" }, code),
      h("p", { class: "hint", id: "enroll-expiry", "data-testid": "enroll-expiry", role: "timer", "aria-live": "off" }),
      h(
        "div",
        { class: "actions" },
        h(
          "a",
          { class: "button", href: `/phone#enroll=${encodeURIComponent(uri || code)}`, target: "_blank", rel: "noopener" },
          "Use this browser as a phone",
        ),
        close,
      ),
    ),
  );
  $("enroll").hidden = false;
  $("add-phone").textContent = "New code";

  enrollment = {
    expiresAt: Date.parse(body.expires_at),
    deviceIds: new Set(((account && account.devices) || []).map((d) => d.id)),
    timer: setInterval(tickEnrollment, 1000),
    poll: setInterval(checkForNewDevice, 3000),
  };
  tickEnrollment();
  setStatus("devices-status", "Enroll your phone with the link or code. This page updates when it's added.");
  $("enroll").scrollIntoView({ block: "nearest", behavior: "smooth" });
}

function onCloseEnrollment() {
  closeEnrollment();
  setStatus("devices-status", "");
  $("add-phone").focus();
}

function tickEnrollment() {
  if (!enrollment) return;
  const left = (enrollment.expiresAt - Date.now()) / 1000;
  if (Number.isNaN(left)) {
    $("enroll-expiry").textContent = "";
    return;
  }
  if (left > 0) {
    $("enroll-expiry").textContent = `Expires in ${formatClock(left)}`;
  } else {
    $("enroll-expiry").textContent = "This code has expired. Choose “New code” to make another.";
    clearInterval(enrollment.timer);
    clearInterval(enrollment.poll);
    const qr = $("enroll-qr");
    if (qr) qr.hidden = true;
  }
}

async function checkForNewDevice() {
  if (!enrollment || document.visibilityState === "hidden") return;
  const res = await api("GET", "/api/account");
  if (signedOut(res) || !res.ok || !enrollment) return;
  const added = (res.body.devices || []).filter((d) => !enrollment.deviceIds.has(d.id));
  if (added.length === 0) return;
  account = res.body;
  closeEnrollment();
  render();
  setStatus("devices-status", `${deviceName(added[0])} was added.`, "success");
  loadActivity();
}

function closeEnrollment() {
  if (enrollment) {
    clearInterval(enrollment.timer);
    clearInterval(enrollment.poll);
  }
  enrollment = null;
  $("enroll").hidden = true;
  $("enroll").replaceChildren();
  $("add-phone").textContent = "Add a phone";
}

// ---------- Phone number and SMS fallback ----------

function renderPhone() {
  const current = $("phone-current");
  if (account.phone) {
    current.replaceChildren(
      "Your number: ",
      h("strong", {}, account.phone),
      account.phone_verified ? h("span", { class: "pill ok" }, "Verified") : h("span", { class: "pill warn" }, "Not verified"),
    );
    $("phone-send").textContent = account.phone_verified ? "Change number" : "Send code";
  } else {
    current.textContent = "No phone number yet.";
    $("phone-send").textContent = "Send code";
  }
  // Without a verified number no code can be sent, whatever the setting says: show it off.
  const usable = account.phone_verified === true && Boolean(account.phone);
  const toggle = $("sms-fallback");
  toggle.checked = usable && account.sms_fallback === true;
  toggle.disabled = !usable;
  $("sms-fallback-hint").textContent = usable
    ? "Sign in with a code sent by SMS when your phone is unreachable."
    : "Available once you add and verify a phone number above.";
}

async function sendPhoneCode(event) {
  event.preventDefault();
  const form = $("phone-form");
  const input = $("phone");
  input.value = input.value.replace(/[\s().-]/g, "");
  if (!form.reportValidity()) return;
  const button = $("phone-send");
  button.disabled = true;
  const res = await api("POST", "/api/account/phone", { phone: input.value });
  button.disabled = false;
  if (signedOut(res)) return;
  if (!res.ok) {
    setStatus("phone-status", errorText(res), "error");
    return;
  }
  $("phone-verify-form").hidden = false;
  $("phone-code").value = "";
  setStatus("phone-status", `We sent a code to ${input.value}. Enter it to verify the number.`, "success");
  $("phone-code").focus();
}

async function verifyPhone(event) {
  event.preventDefault();
  const input = $("phone-code");
  const code = input.value.replace(/\s+/g, "");
  if (!code) {
    input.focus();
    return;
  }
  const button = $("phone-verify");
  button.disabled = true;
  const res = await api("POST", "/api/account/phone/verify", { code });
  button.disabled = false;
  if (signedOut(res)) return;
  if (!res.ok) {
    input.setAttribute("aria-invalid", "true");
    setStatus("phone-status", errorText(res), "error");
    input.select();
    return;
  }
  input.removeAttribute("aria-invalid");
  $("phone-verify-form").hidden = true;
  $("phone").value = "";
  await load();
  setStatus("phone-status", "Your phone number is verified.", "success");
  loadActivity();
}

async function toggleSmsFallback() {
  const toggle = $("sms-fallback");
  const wanted = toggle.checked;
  toggle.disabled = true;
  const res = await api("PATCH", "/api/account", { sms_fallback: wanted });
  toggle.disabled = false;
  if (signedOut(res)) return;
  if (!res.ok) {
    toggle.checked = !wanted;
    setStatus("phone-status", errorText(res), "error");
    return;
  }
  account.sms_fallback = typeof res.body.sms_fallback === "boolean" ? res.body.sms_fallback : wanted;
  renderPhone();
  setStatus("phone-status", account.sms_fallback ? "SMS codes are allowed." : "SMS codes are turned off.", "success");
}

// ---------- Trusted browsers ----------

function browserName(browser) {
  const name = browser.browser || "Browser";
  return browser.os ? `${name} on ${browser.os}` : name;
}

function renderTrusted(browsers) {
  const list = $("trusted");
  if (browsers.length === 0) {
    list.replaceChildren(h("li", { class: "empty" }, "No trusted browsers. Tick “Remember this browser” when you sign in to add one."));
    return;
  }
  list.replaceChildren(
    ...browsers.map((browser) => {
      const lastUsed = browser.last_used_at || browser.last_used || browser.created_at;
      const meta = [
        browser.ip ? `IP ${browser.ip}` : "",
        lastUsed ? `last used ${formatRelative(lastUsed)}` : "",
        browser.expires_at ? `until ${formatDateTime(browser.expires_at)}` : "",
      ].filter(Boolean);
      return h(
        "li",
        { "data-testid": "trusted-browser-row", "data-browser-id": browser.id },
        h(
          "div",
          { class: "item-main" },
          h("div", { class: "item-title" }, browserName(browser), browser.current ? h("span", { class: "pill ok" }, "This browser") : null),
          h("div", { class: "item-meta" }, meta.join(" · ")),
        ),
        h(
          "button",
          {
            type: "button",
            class: "danger small",
            "aria-label": `Revoke ${browserName(browser)}`,
            onclick: (event) => revokeBrowser(browser, event.currentTarget),
          },
          "Revoke",
        ),
      );
    }),
  );
}

async function revokeBrowser(browser, button) {
  button.disabled = true;
  const res = await api("DELETE", `/api/account/trusted-browsers/${encodeURIComponent(browser.id)}`);
  if (signedOut(res)) return;
  if (res.ok || res.status === 404) {
    setStatus("trusted-status", `${browserName(browser)} is no longer trusted.`, "success");
    await load();
  } else {
    button.disabled = false;
    setStatus("trusted-status", errorText(res), "error");
  }
}

// ---------- Activity ----------

function describeEvent(event) {
  const detail = event.detail && typeof event.detail === "object" ? event.detail : {};
  switch (event.kind) {
    case "approval.decided":
      if (detail.reason === "fraud") return "Reported as fraud";
      if (detail.reason === "wrong_number") return "Denied: wrong number entered";
      if (detail.via === "sms_code" || detail.reason === "sms_code") return "Approved with an SMS code";
      return detail.status === "approved" ? "Approved" : detail.status === "denied" ? "Denied" : "Answered";
    case "approval.created":
      return detail.browser ? `Approval requested (${detail.browser})` : "Approval requested";
    case "delivery.attempt": {
      const channel = CHANNEL_NAMES[detail.channel] || detail.channel || "push";
      return detail.outcome === "accepted" ? `Sent by ${channel}` : `Sending by ${channel} failed (${detail.outcome || "error"})`;
    }
    case "device.added":
      return detail.name ? `Phone added: ${detail.name}` : "Phone added";
    default:
      break;
  }
  if (EVENT_NAMES[event.kind]) return EVENT_NAMES[event.kind];
  const text = String(event.kind || "event").replace(/[._]+/g, " ").trim();
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function deviceLabel(deviceId, detail) {
  if (!deviceId) return "";
  const device = ((account && account.devices) || []).find((d) => d.id === deviceId);
  if (device) return deviceName(device);
  if (detail && typeof detail.name === "string" && detail.name) return detail.name;
  return `Removed device (${String(deviceId).slice(0, 6)})`;
}

async function loadActivity() {
  const res = await api("GET", "/api/account/activity");
  if (signedOut(res)) return;
  const rows = $("activity-rows");
  if (!res.ok) {
    rows.replaceChildren();
    $("activity").hidden = true;
    $("activity-empty").hidden = false;
    $("activity-empty").textContent = res.status === 403 ? "Activity appears after you sign in with your phone." : errorText(res);
    return;
  }
  const events = Array.isArray(res.body.events) ? res.body.events : [];
  $("activity-empty").textContent = "No activity yet.";
  $("activity-empty").hidden = events.length > 0;
  $("activity").hidden = events.length === 0;
  rows.replaceChildren(
    ...events.slice(0, 50).map((event) => {
      return h(
        "tr",
        { "data-kind": event.kind },
        h("td", { class: "when", title: formatDateTime(event.at) }, formatRelative(event.at)),
        h("td", {}, describeEvent(event)),
        h("td", { class: "col-ip mono" }, event.ip || ""),
        h("td", {}, deviceLabel(event.device_id, event.detail)),
      );
    }),
  );
}

// ---------- Sign out ----------

async function signOut() {
  const button = $("sign-out");
  button.disabled = true;
  await api("POST", "/api/logout");
  window.location.assign("/");
}

// ---------- Wiring ----------

$("sign-out").addEventListener("click", signOut);
$("add-phone").addEventListener("click", addPhone);
$("phone-form").addEventListener("submit", sendPhoneCode);
$("phone-verify-form").addEventListener("submit", verifyPhone);
$("sms-fallback").addEventListener("change", toggleSmsFallback);
$("phone-code").addEventListener("input", (e) => e.target.removeAttribute("aria-invalid"));

if (await load()) loadActivity();
