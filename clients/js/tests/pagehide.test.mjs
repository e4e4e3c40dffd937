// A page going away (reload, closed tab, a phone freezing a background tab) may never
// run another timer or get another completion event: the database stores what waits for
// its debounce when the page is hidden or unloaded. Node has no page: a stand-in window
// and document deliver `pagehide` and `visibilitychange` (the real thing is tested in
// Chromium, browser.test.mjs).
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { FrontendDatabase, MemoryPersistence, keyString } from "../dist/index.js";
import { startServer, tempDir, until } from "./helpers.mjs";

/** Installs a window's and a document's event targets on globalThis; `restore()` removes them. */
function standInPage() {
  const win = new EventTarget();
  const doc = Object.assign(new EventTarget(), { visibilityState: "visible" });
  globalThis.addEventListener = win.addEventListener.bind(win);
  globalThis.removeEventListener = win.removeEventListener.bind(win);
  globalThis.document = doc;
  return {
    pagehide: () => win.dispatchEvent(new Event("pagehide")),
    visibility: (state) => {
      doc.visibilityState = state;
      doc.dispatchEvent(new Event("visibilitychange"));
    },
    restore: () => {
      delete globalThis.addEventListener;
      delete globalThis.removeEventListener;
      delete globalThis.document;
    },
  };
}

/** Storage whose commits wait for the test: `release()` applies one, `fail()` refuses it. */
class HeldPersistence extends MemoryPersistence {
  held = [];
  hold = true;
  commit(c) {
    if (!this.hold) return super.commit(c);
    return new Promise((resolve, reject) => {
      this.held.push({ commit: c, release: () => super.commit(c).then(resolve, reject), fail: () => reject(new Error("aborted")) });
    });
  }
}

const ids = (commit) => [...commit.put.map((e) => e.id), ...commit.delete.map((k) => `-${k.id}`)];

test("pagehide and visibilitychange to hidden store what waits for the debounce at once, even while an earlier commit never completes", async () => {
  const page = standInPage();
  try {
    const store = new HeldPersistence();
    const db = new FrontendDatabase({ dbName: "hide", persistence: store, flush: { debounceMs: 60_000 }, multiTab: false });
    await db.init();
    const todos = db.collection("todo");
    todos.upsert("a", { title: "a" });
    const stored = db.durable("local");
    await until(() => store.held.length === 1, "a's commit is issued");
    // a's commit never completes (the page is unloading): b is stored all the same.
    todos.upsert("b", { title: "b" });
    page.pagehide();
    await until(() => store.held.length === 2, "b's commit is issued while a's is in progress");
    assert.deepEqual(ids(store.held[1].commit), ["b"]);

    todos.upsert("c", { title: "c" });
    todos.delete("a");
    page.visibility("visible");
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(store.held.length, 2, "a page shown again flushes nothing");
    page.visibility("hidden");
    await until(() => store.held.length === 3, "hidden: c and a's delete are stored");
    assert.deepEqual(ids(store.held[2].commit), ["c", "-a"]);

    for (const h of store.held) h.release();
    await stored;
    await db.durable("local");
    assert.deepEqual([...store.entities.values()].map((e) => e.id).sort(), ["b", "c"]);
    store.hold = false;
    await db.close();
    // A closed database no longer listens.
    const commits = store.commits;
    page.pagehide();
    page.visibility("hidden");
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(store.commits, commits);
  } finally {
    page.restore();
  }
});

test("a commit that fails while a later one is in progress loses nothing: the later one is stored, the failed entities are retried", async () => {
  const page = standInPage();
  try {
    const store = new HeldPersistence();
    const errors = [];
    const db = new FrontendDatabase({ dbName: "hide-fail", persistence: store, flush: { debounceMs: 60_000, baseRetryDelay: 5 }, multiTab: false });
    db.on("error", (e) => errors.push(e));
    await db.init();
    const todos = db.collection("todo");
    todos.upsert("a", { v: 1 });
    todos.upsert("b", { v: 1 });
    page.pagehide();
    await until(() => store.held.length === 1, "a and b's commit is issued");
    todos.upsert("a", { v: 2 });
    page.pagehide();
    await until(() => store.held.length === 2, "a's newer version is issued");
    store.held[1].release();
    store.held[0].fail();
    store.hold = false;
    await until(() => errors.length === 1, "the failure is reported");
    await db.durable("local");
    assert.deepEqual(
      [...store.entities.values()].map((e) => [e.id, e.data.v]).sort(),
      [
        ["a", 2],
        ["b", 1],
      ],
    );
    await db.close();
  } finally {
    page.restore();
  }
});

test("with sync: a commit issued while an earlier one is in progress carries the earlier one's replica state, so a failure of the earlier one loses no outbox entry", async () => {
  const page = standInPage();
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const store = new HeldPersistence();
    store.hold = false;
    const db = new FrontendDatabase({
      dbName: "hide-sync",
      persistence: store,
      flush: { debounceMs: 60_000, baseRetryDelay: 60_000 },
      multiTab: false,
      sync: { wsUrl: server.url, roomId: "hide", userId: "alice", WebSocket },
    });
    db.on("error", () => undefined);
    await db.init();
    await until(() => db.connectionStatus() === "connected", "connected");
    await db.durable("server");
    store.hold = true;
    const todos = db.collection("todo");
    todos.upsert("a", { v: 1 });
    page.pagehide();
    await until(() => store.held.length === 1, "a's commit is issued");
    todos.upsert("b", { v: 1 });
    page.pagehide();
    await until(() => store.held.length === 2, "b's commit is issued");
    store.held[0].fail();
    store.held[1].release();
    // What the room answers is held from now on: the store shows what the two commits left.
    await until(() => store.replica.outbox.size > 0, "b's commit is stored");
    assert.deepEqual([...store.replica.outbox.keys()].sort(), [keyString("todo", "a"), keyString("todo", "b")], "a's outbox entry came with b's commit");
    store.hold = false;
    for (const h of store.held.slice(2)) h.release();
    await db.durable("server");
    await db.close();
  } finally {
    page.restore();
    await server.stop();
    t.remove();
  }
});
