// WebAuthn's JSON form both ways: the server sends options with base64url members and wants
// the credential back the same way (as PublicKeyCredential.toJSON() would give it).

function fromB64url(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(text.length / 4) * 4, "=");
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes.buffer;
}

function toB64url(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const descriptors = (list) => (list || []).map((entry) => ({ ...entry, id: fromB64url(entry.id) }));

/** Whether this browser can use passkeys at all (a secure context with WebAuthn). */
export function passkeysSupported() {
  return window.isSecureContext && typeof window.PublicKeyCredential === "function" && Boolean(navigator.credentials);
}

/** Options for navigator.credentials.create() from the server's JSON. */
export function creationOptions(json) {
  return {
    ...json,
    challenge: fromB64url(json.challenge),
    user: { ...json.user, id: fromB64url(json.user.id) },
    excludeCredentials: descriptors(json.excludeCredentials),
  };
}

/** Options for navigator.credentials.get() from the server's JSON. */
export function requestOptions(json) {
  return { ...json, challenge: fromB64url(json.challenge), allowCredentials: descriptors(json.allowCredentials) };
}

/** A credential from create() or get() as the server reads it. */
export function credentialJson(credential) {
  const response = credential.response;
  const out = { clientDataJSON: toB64url(response.clientDataJSON) };
  if (response.attestationObject) out.attestationObject = toB64url(response.attestationObject);
  if (response.authenticatorData) out.authenticatorData = toB64url(response.authenticatorData);
  if (response.signature) out.signature = toB64url(response.signature);
  if (response.userHandle) out.userHandle = toB64url(response.userHandle);
  return { id: credential.id, rawId: toB64url(credential.rawId), type: credential.type, response: out };
}

/** Whether a WebAuthn call failed because the person dismissed it (or another took over). */
export function dismissed(err) {
  return Boolean(err) && (err.name === "NotAllowedError" || err.name === "AbortError");
}
