// The "Confirm my email" page: the button POSTs the token from the link; opening the page
// alone changes nothing, so mail scanners that prefetch links cannot confirm for anyone.
const $ = (id) => document.getElementById(id);

const INVALID = "This link is invalid, has expired or was already used. Sign in to ask for a new one.";
const OFFLINE = "Can't reach the server. Check your connection and try again.";

async function confirmEmail(event) {
  event.preventDefault();
  const button = $("confirm");
  const error = $("confirm-error");
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  error.hidden = true;
  let status = 0;
  let body = {};
  try {
    const response = await fetch("/api/verify-email", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ token: $("token").value }),
      credentials: "same-origin",
      cache: "no-store",
    });
    status = response.status;
    body = await response.json().catch(() => ({}));
  } catch {
    status = 0;
  }
  button.disabled = false;
  button.removeAttribute("aria-busy");
  if (status === 200) {
    $("view-confirm").hidden = true;
    $("view-done").hidden = false;
    $("done-title").focus();
    return;
  }
  error.textContent = status === 400 ? INVALID : status === 0 ? OFFLINE : body.message || OFFLINE;
  error.hidden = false;
  // A used or expired token never becomes valid again; pressing again would only repeat this.
  if (status === 400) button.hidden = true;
}

const form = $("confirm-form");
if (form) form.addEventListener("submit", confirmEmail);
