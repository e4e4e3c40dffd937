// The client in a real headless Chromium (Debian's), against the real server: two
// browser profiles converge through IndexedDB and WebSockets; an edit made while the
// socket is cut syncs after reconnection; a reload resends the stored outbox; two tabs
// open one WebSocket and hand over when the leader closes. Skipped loudly without
// Chromium (CHROMIUM_BIN, default /usr/lib/chromium/chromium; `apt-get install chromium`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { createServer } from "node:http";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { startServer, tempDir } from "./helpers.mjs";

const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/lib/chromium/chromium";
const skip = existsSync(CHROMIUM) ? false : `SKIPPED: no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_BIN)`;
if (skip) console.log(`# ${skip}`);

/** Serves a page that loads the bundled client as `window.kalphite`. */
async function pageServer() {
  const bundle = await build({ entryPoints: ["dist/index.js"], bundle: true, format: "esm", write: false, platform: "browser" });
  const js = bundle.outputFiles[0].text;
  const html = `<!doctype html><meta charset="utf-8"><title>kalphite test</title><body><pre id="out"></pre><script type="module">
import * as k from "/client.js"; window.kalphite = k; window.ready = true;</script></body>`;
  const server = createServer((req, res) => {
    if (req.url === "/client.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(js);
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(html);
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => new Promise((r) => server.close(r)) };
}

/** Opens the app page and a database on it. */
async function openDb(page, web, sync, extra = {}) {
  await page.goto(web.url);
  await page.waitForFunction(() => window.ready === true);
  await page.evaluate(
    async ({ sync, extra }) => {
      const k = window.kalphite;
      window.errors = [];
      window.db = new k.FrontendDatabase({ dbName: "app", flush: { debounceMs: 5 }, sync: { ...sync, minBackoff: 50, maxBackoff: 300 }, ...extra });
      window.db.on("error", (e) => window.errors.push(e));
      await window.db.init();
    },
    { sync, extra },
  );
}

const titles = (page) => page.evaluate(() => window.db.collection("todo").map((t) => t.data.title).sort());
const waitTitle = (page, title) =>
  page.waitForFunction((title) => window.db.collection("todo").some((t) => t.data.title === title), title, { timeout: 20_000 });

test("Chromium: two profiles converge; an edit made while the socket is cut syncs after reconnect; a reload resends the outbox", { skip }, async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  const web = await pageServer();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  try {
    const sync = { wsUrl: server.url, roomId: "web", userId: "alice" };
    const ctxA = await browser.newContext();
    const ctxB = await browser.newContext();
    // The test's hand on context A's WebSocket: while `cut`, sockets are closed (the
    // client sees 1006) and new ones refused.
    let cut = false;
    const open = new Set();
    await ctxA.routeWebSocket(/\/sync/, (ws) => {
      if (cut) {
        ws.close();
        return;
      }
      const upstream = ws.connectToServer();
      open.add(ws);
      ws.onClose(() => open.delete(ws));
      upstream.onClose(() => open.delete(ws));
    });
    const a = await ctxA.newPage();
    const b = await ctxB.newPage();
    await openDb(a, web, sync);
    await openDb(b, web, { ...sync, userId: "bob" });
    await a.evaluate(() => window.db.collection("todo").upsert("t1", { title: "from a" }));
    await waitTitle(b, "from a");
    await b.evaluate(() => window.db.collection("todo").upsert("t2", { title: "from b" }));
    await waitTitle(a, "from b");

    cut = true;
    for (const ws of [...open]) await ws.close();
    await a.waitForFunction(() => window.db.sync.getConnectionStatus() !== "connected");
    await a.evaluate(async () => {
      window.db.collection("todo").upsert("t3", { title: "while cut" });
      await window.db.durable("local");
    });
    assert.equal(await a.evaluate(() => window.db.sync.getOfflineQueueSize()), 1);

    // A reload while still cut: the outbox comes back from IndexedDB.
    await a.evaluate(() => window.db.collection("todo").upsert("t4", { title: "before reload" }));
    await a.evaluate(() => window.db.durable("local"));
    await a.reload();
    await openDb(a, web, sync);
    assert.equal(await a.evaluate(() => window.db.sync.getOfflineQueueSize()), 2, "the outbox survived the reload");
    assert.deepEqual(await titles(a), ["before reload", "from a", "from b", "while cut"]);

    cut = false;
    await waitTitle(b, "while cut");
    await waitTitle(b, "before reload");
    await a.waitForFunction(() => window.db.sync.getOfflineQueueSize() === 0);
    assert.deepEqual(await titles(a), await titles(b));
    assert.deepEqual(await a.evaluate(() => window.errors.filter((e) => e.code !== "transport")), []);
  } finally {
    await browser.close();
    await web.close();
    await server.stop();
    t.remove();
  }
});

test("Chromium: two tabs open one WebSocket (Web Locks, BroadcastChannel) and hand over when the leader closes", { skip }, async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  const web = await pageServer();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  try {
    const sync = { wsUrl: server.url, roomId: "tabs", userId: "alice" };
    const ctx = await browser.newContext();
    const sockets = [];
    ctx.on("page", (p) => p.on("websocket", (ws) => sockets.push({ page: p, ws })));
    const one = await ctx.newPage();
    sockets.length = 0;
    one.on("websocket", (ws) => sockets.push({ page: one, ws }));
    await openDb(one, web, sync, { multiTab: true });
    const two = await ctx.newPage();
    two.on("websocket", (ws) => sockets.push({ page: two, ws }));
    await openDb(two, web, sync, { multiTab: true });
    assert.equal(await one.evaluate(() => window.db.role), "leader");
    assert.equal(await two.evaluate(() => window.db.role), "follower");
    await two.evaluate(() => window.db.collection("todo").upsert("x", { title: "from the follower" }));
    await waitTitle(one, "from the follower");
    await two.evaluate(() => window.db.durable("server"));
    assert.equal(new Set(sockets.map((s) => s.page)).size, 1, "only the leader tab opened a WebSocket");
    assert.equal(sockets[0].page, one);

    // The tab goes away without closing its database: the browser releases its lock.
    await one.close();
    await two.waitForFunction(() => window.db.role === "leader", null, { timeout: 20_000 });
    await two.evaluate(async () => {
      window.db.collection("todo").upsert("y", { title: "after the handover" });
      await window.db.durable("server");
    });
    assert.ok(sockets.some((s) => s.page === two), "the new leader opened its own WebSocket");
    const peer = await browser.newContext().then((c) => c.newPage());
    await openDb(peer, web, { ...sync, userId: "bob" });
    await waitTitle(peer, "after the handover");
    await waitTitle(peer, "from the follower");
  } finally {
    await browser.close();
    await web.close();
    await server.stop();
    t.remove();
  }
});
