// The web todo app's service worker, served by `kalphite serve` at /sw.js (embedded in
// the binary like the page). It keeps the last copy of the page so that the app still
// opens while the server is unreachable: the todos and the outbox are in IndexedDB
// already, and sync resumes when the server is back. Network first, so that a reachable
// server's page (perhaps a newer version) is always the one shown, and cached.
const CACHE = "kalphite-app";
// Every URL of the app is this page (its settings are in the query string), so one copy
// under one key serves them all.
const PAGE = "/";

async function fetchAndKeep(request) {
  const response = await fetch(request);
  if (response.ok) await (await caches.open(CACHE)).put(PAGE, response.clone());
  return response;
}

self.addEventListener("install", (event) => {
  // The page that registered this worker was loaded before it existed: keep a copy now
  // rather than at the next load, which may already be offline.
  event.waitUntil(fetchAndKeep(PAGE).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin || url.pathname !== PAGE) return;
  event.respondWith(
    fetchAndKeep(event.request).catch(async (error) => {
      const kept = await caches.match(PAGE);
      if (kept) return kept;
      throw error;
    }),
  );
});
