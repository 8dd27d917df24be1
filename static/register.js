// The registration page: email + password, then "Check your inbox".
import { api, errorText, showError, clearMessage } from "/static/api.js";

const $ = (id) => document.getElementById(id);

async function submit(event) {
  event.preventDefault();
  const form = $("register-form");
  if (!form.reportValidity()) return;
  clearMessage($("form-error"));
  const button = $("create");
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  const email = $("email").value.trim();
  const res = await api("POST", "/api/register", { email, password: $("password").value });
  button.disabled = false;
  button.removeAttribute("aria-busy");
  if (res.ok) {
    $("password").value = "";
    $("sent-to").textContent = email;
    $("view-form").hidden = true;
    $("view-sent").hidden = false;
    $("sent-title").focus();
    return;
  }
  showError($("form-error"), res);
  const field = /password/i.test(res.body.message || "") ? $("password") : $("email");
  if (res.status === 422) field.focus();
}

async function resend() {
  const button = $("resend");
  button.disabled = true;
  const res = await api("POST", "/api/verify-email/resend", { email: $("sent-to").textContent });
  const status = $("sent-status");
  if (res.ok) {
    status.textContent = "Sent again. It can take a minute to arrive.";
    status.className = "status-line success";
    // One mail per minute per address is all the server sends anyway.
    setTimeout(() => (button.disabled = false), 60000);
  } else {
    status.textContent = errorText(res);
    status.className = "status-line error";
    button.disabled = false;
  }
}

$("register-form").addEventListener("submit", submit);
$("resend").addEventListener("click", resend);
