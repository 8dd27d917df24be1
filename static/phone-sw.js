// The /phone app's service worker (served at /phone/sw.js, scope /phone):
// - an offline shell: the page and its assets are cached, so the installed app opens without
//   a network and says it is offline;
// - Web Push: a push carries only an approval id; the worker fetches the approval with the
//   device's credential (the page keeps it in IndexedDB) and shows one notification per
//   request (tag = approval id) with a "Review" action that opens /phone on that request.
// Classic script, no imports: every browser that does Web Push runs it.

const SHELL_CACHE = "tapprove-phone-shell-v1";
const SHELL = [
  "/phone",
  "/static/phone.js",
  "/static/api.js",
  "/static/app.css",
  "/static/icon.svg",
  "/static/icons/icon-192.png",
  "/phone/manifest.webmanifest",
];
const DB_NAME = "tapprove-phone";
const STORE = "device";
const RECORD = "current";

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(SHELL_CACHE)
      .then((cache) => cache.addAll(SHELL.map((path) => new Request(path, { cache: "no-store" }))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((names) => Promise.all(names.filter((n) => n !== SHELL_CACHE).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

// Network first (a deployment's new page wins), the cached shell when the network fails.
self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return;
  const shellPath = request.mode === "navigate" && url.pathname === "/phone" ? "/phone" : url.pathname;
  if (!SHELL.includes(shellPath)) return; // API calls and sockets are never cached
  event.respondWith(
    fetch(request).then(
      (response) => {
        if (response.ok) {
          const copy = response.clone();
          event.waitUntil(caches.open(SHELL_CACHE).then((cache) => cache.put(shellPath, copy)));
        }
        return response;
      },
      () => caches.match(shellPath, { ignoreSearch: true }).then((cached) => cached || Response.error()),
    ),
  );
});

// ---------- Web Push ----------

function loadDevice() {
  return new Promise((resolve) => {
    const open = indexedDB.open(DB_NAME, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(STORE);
    open.onerror = () => resolve(null);
    open.onsuccess = () => {
      const db = open.result;
      try {
        const get = db.transaction(STORE, "readonly").objectStore(STORE).get(RECORD);
        get.onsuccess = () => resolve(get.result || null);
        get.onerror = () => resolve(null);
      } catch {
        resolve(null);
      } finally {
        db.close();
      }
    };
  });
}

/** The approval as the device sees it, or null when it cannot be fetched (offline, revoked). */
async function fetchApproval(id) {
  const device = await loadDevice();
  if (!device || !device.deviceToken) return { approval: null, enrolled: false };
  try {
    const response = await fetch(`/api/approvals/${encodeURIComponent(id)}`, {
      headers: { Accept: "application/json", Authorization: `Bearer ${device.deviceToken}` },
      cache: "no-store",
    });
    if (response.status === 404) return { approval: { id, status: "gone" }, enrolled: true };
    if (!response.ok) return { approval: null, enrolled: true };
    return { approval: await response.json(), enrolled: true };
  } catch {
    return { approval: null, enrolled: true };
  }
}

function timeOf(value) {
  const t = Date.parse(value);
  return Number.isNaN(t) ? "" : new Intl.DateTimeFormat(undefined, { timeStyle: "short" }).format(new Date(t));
}

/** Title and body: who asks and from where (site, browser, OS, IP, time); never the number. */
function describe(approval, fallbackTitle) {
  const context = (approval && approval.context) || {};
  const requester = (approval && approval.requester) || {};
  const site = self.location.host;
  if (requester.kind === "rp") {
    const name = typeof requester.name === "string" && requester.name ? requester.name : "an application";
    return {
      title: `Request from ${name}`,
      body: [`${site}`, context.ip ? `IP ${context.ip}` : "", timeOf(approval.created_at)].filter(Boolean).join(" · "),
    };
  }
  const browser = [context.browser, context.os].filter(Boolean).join(" on ");
  return {
    title: fallbackTitle || "Sign-in request",
    body: [
      `Sign-in to ${site}`,
      browser,
      [context.ip ? `IP ${context.ip}` : "", timeOf(approval && approval.created_at)].filter(Boolean).join(" · "),
    ]
      .filter(Boolean)
      .join("\n"),
  };
}

async function closeNotifications(id) {
  const shown = await self.registration.getNotifications({ tag: id });
  for (const notification of shown) notification.close();
}

async function onPush(data) {
  if (!data || data.type !== "approval_request" || typeof data.approval_id !== "string") return;
  const id = data.approval_id;
  const { approval, enrolled } = await fetchApproval(id);
  if (!enrolled) return; // this browser is no longer a phone: nothing to review
  if (approval && approval.status && approval.status !== "pending") {
    await closeNotifications(id); // answered elsewhere, expired or replaced
    return;
  }
  const text = approval
    ? describe(approval, data.title)
    : { title: data.title || "Sign-in request", body: `Open tapprove to review it (${self.location.host}).` };
  await self.registration.showNotification(text.title, {
    body: text.body,
    tag: id, // one request shows once, however many pushes announce it
    renotify: false,
    requireInteraction: true,
    icon: "/static/icons/icon-192.png",
    badge: "/static/icons/icon-192.png",
    timestamp: Date.parse((approval && approval.created_at) || "") || Date.now(),
    actions: [{ action: "review", title: "Review" }],
    data: { approvalId: id, url: `/phone?approval=${encodeURIComponent(id)}`, expiresAt: data.expires_at || null },
  });
}

self.addEventListener("push", (event) => {
  let data = null;
  try {
    data = event.data ? event.data.json() : null;
  } catch {
    data = null;
  }
  event.waitUntil(onPush(data));
});

async function openRequest(url) {
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  const phone = windows.find((client) => new URL(client.url).pathname === "/phone");
  if (phone) {
    await phone.focus();
    return phone.navigate(url);
  }
  return self.clients.openWindow(url);
}

self.addEventListener("notificationclick", (event) => {
  const notification = event.notification;
  notification.close();
  const url = (notification.data && notification.data.url) || "/phone";
  event.waitUntil(openRequest(url));
});

// The browser replaced the subscription (expiry, key rotation by the push service): register
// the new one with the device credential, as the page would.
self.addEventListener("pushsubscriptionchange", (event) => {
  event.waitUntil(
    (async () => {
      const device = await loadDevice();
      if (!device || !device.deviceToken) return;
      let subscription = event.newSubscription;
      if (!subscription && event.oldSubscription) {
        subscription = await self.registration.pushManager.subscribe(event.oldSubscription.options);
      }
      await fetch("/api/devices/me", {
        method: "PATCH",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${device.deviceToken}` },
        body: JSON.stringify({
          push: subscription ? { provider: "webpush", subscription: subscription.toJSON() } : null,
        }),
      });
    })(),
  );
});
