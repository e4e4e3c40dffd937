// The client in a real headless Chromium (Debian's), against the real server: two
// browser profiles converge through IndexedDB and WebSockets; an edit made while the
// socket is cut syncs after reconnection; a reload resends the stored outbox; an edit
// made just before a reload or a close is kept; two tabs on the default configuration
// open one WebSocket and hand over when the leader closes; the web todo app adds,
// completes, shows its pending count and manual conflicts (in every tab, until one
// resolves them), and reloads from its service worker while the server is down.
// Screenshots of the app go to tests/artifacts/ (their paths are printed). Skipped
// loudly without Chromium (CHROMIUM_BIN, default /usr/lib/chromium/chromium;
// `apt-get install chromium`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createServer } from "node:http";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { cli, startServer, tempDir, until } from "./helpers.mjs";

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
  await initDb(page, sync, extra);
}

/** A database on the test page already loaded in `page`. */
async function initDb(page, sync, extra = {}) {
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

test("Chromium: two tabs on the default configuration open one WebSocket (Web Locks, BroadcastChannel) and hand over when the leader closes", { skip }, async () => {
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
    // No multiTab option: a browser has Web Locks and BroadcastChannel, so tabs share one leader.
    await openDb(one, web, sync);
    const two = await ctx.newPage();
    two.on("websocket", (ws) => sockets.push({ page: two, ws }));
    await openDb(two, web, sync);
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

test("Chromium: frames dropped, duplicated and delayed both ways still converge (after a reconnect fills the gaps)", { skip }, async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  const web = await pageServer();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  try {
    const sync = { wsUrl: server.url, roomId: "faults", userId: "alice", resendAfter: 300 };
    let seed = 42;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed / 2 ** 31);
    let faulty = true;
    const counts = { dropped: 0, duplicated: 0, delayed: 0 };
    const open = new Set();
    // Forwards a frame with faults while `faulty`: 10% lost, 10% twice, 20% 0–200 ms late.
    const forward = (send, message) => {
      if (!faulty) return send(message);
      const r = rnd();
      if (r < 0.1) counts.dropped++;
      else if (r < 0.2) {
        counts.duplicated++;
        send(message);
        send(message);
      } else if (r < 0.4) {
        counts.delayed++;
        setTimeout(() => send(message), Math.floor(rnd() * 200));
      } else send(message);
    };
    const pages = [];
    for (const user of ["alice", "bob"]) {
      const ctx = await browser.newContext();
      await ctx.routeWebSocket(/\/sync/, (ws) => {
        const upstream = ws.connectToServer();
        open.add(ws);
        ws.onMessage((m) => forward((x) => upstream.send(x), m));
        upstream.onMessage((m) => forward((x) => ws.send(x), m));
        ws.onClose(() => open.delete(ws));
      });
      const page = await ctx.newPage();
      await openDb(page, web, { ...sync, userId: user });
      pages.push(page);
    }
    for (let round = 0; round < 15; round++) {
      for (const [i, page] of pages.entries()) {
        await page.evaluate(
          ({ i, round }) => {
            const todos = window.db.collection("todo");
            todos.upsert(`shared-${round % 4}`, { title: `shared ${round % 4}`, by: i, round });
            todos.upsert(`own-${i}-${round}`, { title: `own ${i} ${round}` });
            if (round % 5 === 4) todos.delete(`own-${i}-${round - 2}`);
          },
          { i, round },
        );
      }
      await new Promise((r) => setTimeout(r, 40));
    }
    assert.ok(counts.dropped > 0 && counts.duplicated > 0 && counts.delayed > 0, JSON.stringify(counts));
    // Faults off; a reconnect catches up on whatever broadcast was lost.
    faulty = false;
    for (const ws of [...open]) await ws.close();
    for (const page of pages) {
      await page.waitForFunction(() => window.db.sync.getConnectionStatus() === "connected", null, { timeout: 20_000 });
      await page.evaluate(() => window.db.durable("server"));
    }
    for (const ws of [...open]) await ws.close();
    const snapshot = (page) => page.evaluate(() => JSON.stringify(window.db.collection("todo").orderBy((t) => t.id).map((t) => [t.id, Object.entries(t.data).sort()])));
    await pages[0].waitForFunction(() => window.db.sync.getConnectionStatus() === "connected", null, { timeout: 20_000 });
    await pages[1].waitForFunction(() => window.db.sync.getConnectionStatus() === "connected", null, { timeout: 20_000 });
    const deadline = Date.now() + 20_000;
    let a;
    let b;
    do {
      await new Promise((r) => setTimeout(r, 100));
      a = await snapshot(pages[0]);
      b = await snapshot(pages[1]);
    } while (a !== b && Date.now() < deadline);
    assert.equal(a, b, "both browsers hold the same todos");
    const ids = JSON.parse(a).map(([id]) => id);
    assert.equal(ids.filter((id) => id.startsWith("own-")).length, 2 * 15 - 2 * 3, "every own todo but the deleted ones");
    assert.equal(ids.filter((id) => id.startsWith("shared-")).length, 4);
  } finally {
    await browser.close();
    await web.close();
    await server.stop();
    t.remove();
  }
});

test("Chromium: SIGKILL of the browser, then a relaunch on the same profile, syncs the stored outbox", { skip }, async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  const web = await pageServer();
  const profile = `${t.dir}/profile`;
  const { execFileSync } = await import("node:child_process");
  try {
    const sync = { wsUrl: server.url, roomId: "kill", userId: "alice" };
    let ctx = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, args: ["--no-sandbox"] });
    // No server reachable for this run: the edit can only wait in the outbox.
    await ctx.routeWebSocket(/\/sync/, (ws) => ws.close());
    let page = await ctx.newPage();
    await openDb(page, web, sync);
    await page.evaluate(async () => {
      window.db.collection("todo").upsert("k1", { title: "written before the crash" });
      await window.db.durable("local");
    });
    // Kill the browser's main process by its id (found through the unique profile path).
    const ps = execFileSync("ps", ["-eo", "pid,args"], { encoding: "utf8" });
    const main = ps
      .split("\n")
      .filter((l) => l.includes(`--user-data-dir=${profile}`) && !l.includes("--type="))
      .map((l) => Number(l.trim().split(/\s+/)[0]));
    assert.equal(main.length, 1, "found the browser process");
    process.kill(main[0], "SIGKILL");
    await new Promise((r) => ctx.once("close", r));

    ctx = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, args: ["--no-sandbox"] });
    page = await ctx.newPage();
    await openDb(page, web, sync);
    assert.equal(await page.evaluate(() => window.db.collection("todo").findById("k1")?.data.title), "written before the crash");
    await page.evaluate(() => window.db.durable("server"));
    assert.equal(await page.evaluate(() => window.db.sync.getOfflineQueueSize()), 0);
    await ctx.close();
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
    const peer = await browser.newPage();
    await openDb(peer, web, { ...sync, userId: "bob" });
    await waitTitle(peer, "written before the crash");
    await browser.close();
  } finally {
    await web.close();
    await server.stop();
    t.remove();
  }
});

/**
 * Makes `edit` (a function body run in the page, with `todos`, the collection) and, in
 * the same task, reloads the page (`how` "reload") or closes it ("close"): no time for a
 * debounce to run out.
 */
async function editAndLeave(page, edit, how) {
  if (how === "reload") {
    const loaded = page.waitForEvent("load");
    await page.evaluate((edit) => {
      new Function("todos", edit)(window.db.collection("todo"));
      location.reload();
    }, edit);
    await loaded;
  } else {
    await page.evaluate((edit) => new Function("todos", edit)(window.db.collection("todo")), edit);
    await page.close({ runBeforeUnload: true });
  }
}

test("Chromium: an edit made just before a reload or a close is kept (flushed when the page hides) and reaches the server", { skip }, async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  const web = await pageServer();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  try {
    const sync = { wsUrl: server.url, roomId: "hide", userId: "alice" };
    const peer = await (await browser.newContext()).newPage();
    await openDb(peer, web, { ...sync, userId: "bob" });

    // One tab, the default debounce (100 ms): the edit, then a reload in the same task.
    const ctx = await browser.newContext();
    const one = await ctx.newPage();
    const defaults = { flush: {} };
    await openDb(one, web, sync, defaults);
    await editAndLeave(one, `todos.upsert("r1", { title: "edited just before a reload" })`, "reload");
    await initDb(one, sync, defaults);
    assert.equal(await one.evaluate(() => window.db.collection("todo").findById("r1")?.data.title), "edited just before a reload");
    await waitTitle(peer, "edited just before a reload");

    // Two tabs with a debounce far longer than a reload: only a flush when the page
    // hides can store the edit in time. A follower's edit, then its reload: the reloaded
    // tab shows it.
    const slow = { flush: { debounceMs: 60_000 } };
    await one.close();
    const leader = await ctx.newPage();
    await openDb(leader, web, sync, slow);
    const two = await ctx.newPage();
    await openDb(two, web, sync, slow);
    assert.equal(await leader.evaluate(() => window.db.role), "leader");
    assert.equal(await two.evaluate(() => window.db.role), "follower");
    await editAndLeave(two, `todos.upsert("r2", { title: "edited in a follower just before its reload" })`, "reload");
    await initDb(two, sync, slow);
    assert.equal(await two.evaluate(() => window.db.role), "follower");
    await waitTitle(two, "edited in a follower just before its reload");
    await waitTitle(peer, "edited in a follower just before its reload");

    // The leader's edit, then it closes: the follower takes over with the edit stored.
    await editAndLeave(leader, `todos.upsert("r3", { title: "edited in the leader just before it closed" })`, "close");
    await two.waitForFunction(() => window.db.role === "leader", null, { timeout: 20_000 });
    await waitTitle(two, "edited in the leader just before it closed");
    await waitTitle(peer, "edited in the leader just before it closed");
    await two.evaluate(() => window.db.durable("server"));
    assert.deepEqual(await titles(two), await titles(peer));
  } finally {
    await browser.close();
    await web.close();
    await server.stop();
    t.remove();
  }
});

const ARTIFACTS = fileURLToPath(new URL("./artifacts/", import.meta.url));

/**
 * Runs a test of the web todo app: a `kalphite serve` with `args`, a Chromium, and
 * `shot(page, step)` saving tests/artifacts/<name>-<step>.png and printing its path. When
 * the body fails, every open page is shot too (`<name>-failure-<n>.png`), before anything
 * is closed.
 */
async function appTest(name, args, body) {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  mkdirSync(ARTIFACTS, { recursive: true });
  const shot = async (page, step) => {
    const path = join(ARTIFACTS, `${name}-${step}.png`);
    await page.screenshot({ path });
    console.log(`screenshot: ${path}`);
  };
  let failed = true;
  try {
    await body({ t, server, browser, shot, http: server.url.replace("ws:", "http:") });
    failed = false;
  } finally {
    if (failed) {
      const pages = browser.contexts().flatMap((c) => c.pages());
      for (const [i, page] of pages.entries()) await shot(page, `failure-${i}`).catch((e) => console.log(`no failure screenshot: ${e}`));
    }
    await browser.close();
    await server.stop();
    t.remove();
  }
}

/** A context whose /sync WebSockets the test can cut (closed, new ones refused) and restore. */
async function cuttableContext(browser) {
  const ctx = await browser.newContext({ viewport: { width: 800, height: 600 } });
  const link = { cut: false, open: new Set() };
  await ctx.routeWebSocket(/\/sync/, (ws) => {
    if (link.cut) {
      ws.close();
      return;
    }
    ws.connectToServer();
    link.open.add(ws);
    ws.onClose(() => link.open.delete(ws));
  });
  link.setCut = async (cut) => {
    link.cut = cut;
    if (cut) for (const ws of [...link.open]) await ws.close();
  };
  return { ctx, link };
}

const stateText = (page) => page.textContent("#state");

test("Chromium: the web todo app, served by kalphite serve, adds, completes, shows a CLI-made todo and the CLI sees its todos", { skip }, async () => {
  const secret = "a-web-app-test-secret-of-32-bytes-or-more";
  await appTest("todo-app", ["--secret", secret], async ({ t, server, browser, shot, http }) => {
    const page = await browser.newPage({ viewport: { width: 800, height: 600 } });
    // `kalphite serve` serves the app at / and syncs it over /sync, same origin.
    const served = await (await fetch(`${http}/`)).text();
    assert.equal(served, readFileSync("app/todo.html", "utf8"), "the server serves the committed app");
    // `kalphite token --url` prints the link that opens the app for a user and room.
    const link = (await cli(["token", "--secret", secret, "--user", "alice", "--room", "web", "--url", server.url, "-q"])).trim();
    assert.match(link, /^http:\/\/127\.0\.0\.1:\d+\/\?room=web&user=alice&token=[\w.-]+$/);
    await page.goto(link);
    await page.waitForSelector("#state.connected", { timeout: 20_000 });
    await page.fill("#title", "buy oat milk");
    await page.selectOption("#priority", "high");
    await page.click("#add button");
    await page.waitForSelector("li .title:text('buy oat milk')");
    await shot(page, "added");
    const cliToken = (await cli(["token", "--secret", secret, "--user", "carol", "--room", "web", "-q"])).trim();
    const base = ["todo", "--db", join(t.dir, "cli.db"), "--server", server.url, "--room", "web", "--token", cliToken];
    await until(async () => /buy oat milk/.test(await cli([...base, "list"])), "the CLI lists the browser's todo");
    await cli([...base, "add", "call the plumber"]);
    await page.waitForSelector("li .title:text('call the plumber')", { timeout: 20_000 });
    await page.locator("li", { hasText: "buy oat milk" }).locator("input[type=checkbox]").check();
    await page.waitForSelector("li .title.done:text('buy oat milk')");
    await until(async () => /\[x\].*buy oat milk/.test(await cli([...base, "list"])), "the CLI sees it completed");
    assert.match(await stateText(page), /^connected/);
    await shot(page, "completed");
  });
});

test("Chromium: the web todo app shows the pending count while its socket is cut, and none once it is back", { skip }, async () => {
  await appTest("pending", ["--open"], async ({ t, server, browser, shot, http }) => {
    const { ctx, link } = await cuttableContext(browser);
    const page = await ctx.newPage();
    await page.goto(`${http}/?room=pending&user=alice`);
    await page.waitForSelector("#state.connected", { timeout: 20_000 });
    assert.equal(await stateText(page), "connected");
    await link.setCut(true);
    await page.waitForSelector("#state.disconnected", { timeout: 20_000 });
    await page.fill("#title", "written while cut");
    await page.click("#add button");
    await page.waitForSelector("li .title:text('written while cut')");
    await page.waitForFunction(() => document.getElementById("state").textContent === "disconnected, 1 pending", null, { timeout: 20_000 });
    await shot(page, "1-pending");
    await link.setCut(false);
    await page.waitForFunction(() => document.getElementById("state").textContent === "connected", null, { timeout: 30_000 });
    await shot(page, "0-pending");
    const list = await cli(["todo", "--db", join(t.dir, "cli.db"), "--server", server.url, "--room", "pending", "--user", "carol", "list"]);
    assert.match(list, /written while cut/);
  });
});

test("Chromium: the web todo app shows a manual conflict with both versions in every tab; keep mine in one tab wins everywhere and clears it from the others", { skip }, async () => {
  await appTest("conflict", ["--open", "--conflict", "manual"], async ({ t, server, browser, shot, http }) => {
    const base = ["todo", "--db", join(t.dir, "cli.db"), "--server", server.url, "--room", "conflict", "--user", "carol"];
    await cli([...base, "add", "water the plants"]);
    const { ctx, link } = await cuttableContext(browser);
    const page = await ctx.newPage();
    await page.goto(`${http}/?room=conflict&user=alice`);
    await page.waitForSelector("li .title:text('water the plants')", { timeout: 20_000 });
    await page.waitForSelector("#state.connected", { timeout: 20_000 });
    // A second tab of the same app: it follows the first one's connection.
    const other = await ctx.newPage();
    await other.goto(`${http}/?room=conflict&user=alice`);
    await other.waitForSelector("li .title:text('water the plants')", { timeout: 20_000 });
    await other.waitForSelector("#state.connected", { timeout: 20_000 });
    assert.equal(await other.evaluate(() => window.kalphiteApp.db.role), "follower");
    // Alice completes it while cut off; meanwhile carol sets it in progress: concurrent
    // edits, and alice's reaches the room second, so her app is told.
    await link.setCut(true);
    await page.waitForSelector("#state.disconnected", { timeout: 20_000 });
    await page.locator("li", { hasText: "water the plants" }).locator("input[type=checkbox]").check();
    await page.waitForFunction(() => document.getElementById("state").textContent === "disconnected, 1 pending", null, { timeout: 20_000 });
    await cli([...base, "status", "1", "in-progress"]);
    assert.equal(await page.isHidden("#conflicts"), true, "no conflict before the edits meet");
    await link.setCut(false);
    const box = page.locator("#conflicts");
    await box.waitFor({ state: "visible", timeout: 30_000 });
    assert.match(await box.textContent(), /yours "water the plants" \(completed\), theirs "water the plants" \(in-progress\)/);
    assert.equal(await box.locator("button", { hasText: "keep mine" }).count(), 1);
    assert.equal(await box.locator("button", { hasText: "keep theirs" }).count(), 1);
    // Last-write-wins kept carol's later edit for now: the todo shows as not done.
    await page.waitForSelector("li .title:not(.done):text('water the plants')");
    await shot(page, "shown");
    const otherBox = other.locator("#conflicts");
    await otherBox.waitFor({ state: "visible", timeout: 20_000 });
    assert.match(await otherBox.textContent(), /yours "water the plants" \(completed\), theirs "water the plants" \(in-progress\)/);
    await shot(other, "shown-in-the-other-tab");
    // Resolved in the other tab: the first one drops it too.
    await otherBox.locator("button", { hasText: "keep mine" }).click();
    await otherBox.waitFor({ state: "hidden" });
    await box.waitFor({ state: "hidden", timeout: 10_000 });
    await page.waitForSelector("li .title.done:text('water the plants')");
    await until(async () => /\[x\].*water the plants/.test(await cli([...base, "list"])), "the CLI sees alice's pick");
    await page.waitForFunction(() => document.getElementById("state").textContent === "connected", null, { timeout: 20_000 });
    assert.equal(await page.isHidden("#conflicts"), true, "the pick dominates both versions: no new conflict");
    assert.equal(await other.isHidden("#conflicts"), true);
    await other.waitForSelector("li .title.done:text('water the plants')");
    await shot(page, "resolved");
  });
});

test("Chromium: the web todo app reloads from its service worker while the server is down; what is added then reaches the CLI once it is back", { skip }, async () => {
  await appTest("offline-reload", ["--open"], async ({ t, server, browser, shot, http }) => {
    const page = await browser.newPage({ viewport: { width: 800, height: 600 } });
    await page.goto(`${http}/?room=offline&user=alice`);
    await page.waitForSelector("#state.connected", { timeout: 20_000 });
    // The worker is in charge of the page and holds its copy before the server goes.
    await until(
      () => page.evaluate(async () => (await navigator.serviceWorker.ready).active !== null && (await caches.match("/")) !== undefined),
      "the service worker is active with the page cached",
    );
    await page.fill("#title", "added while the server was up");
    await page.click("#add button");
    await page.waitForSelector("li .title:text('added while the server was up')");
    // Stored and acknowledged: "connected" alone may show before the flush (100 ms) ran.
    await page.evaluate(() => window.kalphiteApp.db.durable("server"));

    await server.kill();
    await page.waitForSelector("#state.disconnected", { timeout: 20_000 });
    // Without the worker this reload fails: nothing listens on the port.
    await page.reload();
    await page.waitForSelector("li .title:text('added while the server was up')", { timeout: 20_000 });
    assert.equal(await page.evaluate(() => navigator.serviceWorker.controller !== null), true, "the page came from the worker");
    await page.fill("#title", "added while the server was down");
    await page.click("#add button");
    await page.waitForFunction(() => /, 1 pending$/.test(document.getElementById("state").textContent), null, { timeout: 20_000 });
    await shot(page, "reloaded-while-down");

    const again = await startServer({ dir: t.dir, port: server.port, args: ["--open"] });
    try {
      await page.waitForFunction(() => document.getElementById("state").textContent === "connected", null, { timeout: 60_000 });
      const list = await cli(["todo", "--db", join(t.dir, "cli.db"), "--server", again.url, "--room", "offline", "--user", "carol", "list"]);
      assert.match(list, /added while the server was up/);
      assert.match(list, /added while the server was down/);
      await shot(page, "back");
    } finally {
      await again.stop();
    }
  });
});
