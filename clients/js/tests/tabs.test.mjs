// Several tabs on one database (Node's BroadcastChannel, an in-process Web Locks
// stand-in, one shared store as IndexedDB is shared by an origin's tabs): one WebSocket,
// the other tabs write through the leader, leadership passes on when the leader closes;
// the leader's conflicts, errors, status and pending count reach every tab. And when
// tabs are used without being asked for.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { FrontendDatabase, MemoryPersistence, selectTabs } from "../dist/index.js";
import { startServer, tempDir, until } from "./helpers.mjs";

/** Web Locks' exclusive request / ifAvailable, within one process. */
class Locks {
  held = new Map();
  queues = new Map();
  async request(name, options, callback) {
    if (this.held.get(name)) {
      if (options.ifAvailable) return callback(null);
      await new Promise((resolve) => {
        const q = this.queues.get(name) ?? [];
        q.push(resolve);
        this.queues.set(name, q);
      });
    }
    this.held.set(name, true);
    try {
      return await callback({ name });
    } finally {
      const next = this.queues.get(name)?.shift();
      if (next) next();
      else this.held.set(name, false);
    }
  }
}

test("tabs: one leader with the only WebSocket; writes of the others go through it; it hands over on close", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  const shared = new MemoryPersistence();
  const locks = new Locks();
  const tab = async () => {
    const db = new FrontendDatabase({
      dbName: "app",
      persistence: shared,
      flush: { debounceMs: 5 },
      multiTab: { locks },
      sync: { wsUrl: server.url, roomId: "tabs", userId: "alice", WebSocket, minBackoff: 20, maxBackoff: 100 },
    });
    await db.init();
    return db;
  };
  try {
    const a = await tab();
    const b = await tab();
    assert.equal(a.role, "leader");
    assert.equal(b.role, "follower");
    assert.ok(a.sync, "the leader syncs");
    assert.equal(b.sync, undefined, "a follower opens no WebSocket");
    await until(() => b.connectionStatus() === "connected", "the follower knows the leader's connection");

    b.collection("todo").upsert("from-b", { title: "written in tab b" });
    await until(() => a.collection("todo").findById("from-b"), "the leader has b's write");
    await b.durable("local");
    assert.ok(shared.entities.size >= 1, "stored by the leader");
    await b.durable("server");

    const peer = new FrontendDatabase({ dbName: "peer", persistence: new MemoryPersistence(), flush: { debounceMs: 5 }, sync: { wsUrl: server.url, roomId: "tabs", userId: "bob", WebSocket } });
    await peer.init();
    await until(() => peer.collection("todo").findById("from-b"), "the room has b's write");
    peer.collection("todo").upsert("from-peer", { title: "remote" });
    await until(() => b.collection("todo").findById("from-peer") && a.collection("todo").findById("from-peer"), "a remote change reaches both tabs");

    a.collection("todo").upsert("from-a", { title: "written in tab a" });
    await until(() => b.collection("todo").findById("from-a"), "the leader's own writes reach the follower");

    // A write in flight while the leader closes is not lost.
    b.collection("todo").upsert("during-handover", { title: "racing the close" });
    await a.close();
    await until(() => b.role === "leader", "b takes over");
    await b.durable("server");
    await until(() => peer.collection("todo").findById("during-handover"), "the racing write reached the room");
    assert.ok(b.sync, "the new leader syncs");
    b.collection("todo").upsert("after-handover", { title: "b leads" });
    await b.durable("server");
    await until(() => peer.collection("todo").findById("after-handover"), "the new leader's writes reach the room");
    assert.equal(shared.replica.outbox.size, 0);
    await b.close();
    await peer.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

/** A BroadcastChannel-shaped object that only records its name. */
class NamedChannel {
  constructor(name) {
    this.name = name;
    this.onmessage = null;
  }
  postMessage() {}
  close() {}
}

test("tabs are the default wherever Web Locks and BroadcastChannel exist; false opts out; true insists", () => {
  const locks = new Locks();
  const browser = { navigator: { locks }, BroadcastChannel: NamedChannel };
  const chosen = selectTabs(undefined, browser);
  assert.equal(chosen.locks, locks);
  assert.equal(chosen.channel("kalphite:app").name, "kalphite:app");
  assert.equal(selectTabs(false, browser), undefined, "the explicit opt-out");
  assert.equal(selectTabs(undefined, { BroadcastChannel: NamedChannel }), undefined, "Node 20: BroadcastChannel without Web Locks");
  assert.equal(selectTabs(undefined, { navigator: { locks } }), undefined, "Web Locks without BroadcastChannel");
  assert.equal(selectTabs(undefined, {}), undefined);
  assert.throws(() => selectTabs(true, { BroadcastChannel: NamedChannel }), /Web Locks and BroadcastChannel/);
  assert.equal(selectTabs({ locks }, { BroadcastChannel: NamedChannel }).locks, locks, "injected locks, the environment's channel");
  // The real environment of this test: Node 20 has no navigator.locks.
  assert.equal(selectTabs(undefined), undefined);
});

test("a database with no multiTab option leads its tabs where the environment has Web Locks, and syncs alone where not", async () => {
  const open = async (extra = {}) => {
    const db = new FrontendDatabase({ dbName: "default-tabs", persistence: new MemoryPersistence(), ...extra });
    await db.init();
    return db;
  };
  const alone = await open();
  assert.equal(alone.role, "single", "Node 20 as it is");
  await alone.close();
  // What a browser has: navigator.locks (Node's own BroadcastChannel is there already).
  Object.defineProperty(globalThis, "navigator", { value: { locks: new Locks() }, configurable: true });
  try {
    const first = await open();
    const second = await open();
    assert.equal(first.role, "leader");
    assert.equal(second.role, "follower");
    const optedOut = await open({ multiTab: false });
    assert.equal(optedOut.role, "single");
    await optedOut.close();
    await second.close();
    await first.close();
  } finally {
    delete globalThis.navigator;
  }
});

/**
 * Closes databases, newest first (followers before their leader), even after a failed
 * assertion left them waiting: a close that hangs is cut short and its channels and
 * reconnection loop stopped, so that a failure ends the test file instead of hanging it.
 */
async function teardown(dbs, channels) {
  for (const db of [...dbs].reverse()) {
    await Promise.race([db.close().catch(() => undefined), new Promise((r) => setTimeout(r, 2000))]);
    await db.sync?.disconnect();
  }
  for (const c of channels) c.close();
}

test("tabs: the leader's conflicts and status reach the followers; a tab that takes over keeps its listeners", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open", "--conflict", "manual"] });
  const shared = new MemoryPersistence();
  const locks = new Locks();
  const heard = new Map();
  const opened = [];
  const channels = [];
  const channel = (name) => {
    const c = new BroadcastChannel(name);
    channels.push(c);
    return c;
  };
  const tab = async (name) => {
    const db = new FrontendDatabase({
      dbName: "app",
      persistence: shared,
      flush: { debounceMs: 5 },
      multiTab: { locks, channel },
      sync: { wsUrl: server.url, roomId: "conflicts", userId: "alice", WebSocket, minBackoff: 20, maxBackoff: 100 },
    });
    opened.push(db);
    const events = { conflicts: [], statuses: [], resolved: [] };
    heard.set(name, events);
    db.on("conflict", (c) => events.conflicts.push(c));
    db.on("conflictResolved", (r) => events.resolved.push(r));
    db.on("status", (s) => events.statuses.push(s));
    await db.init();
    return db;
  };
  try {
    const a = await tab("a");
    const b = await tab("b");
    assert.equal(a.role, "leader");
    assert.equal(b.role, "follower");
    const peer = new FrontendDatabase({ dbName: "peer", persistence: new MemoryPersistence(), flush: { debounceMs: 5 }, sync: { wsUrl: server.url, roomId: "conflicts", userId: "bob", WebSocket } });
    opened.unshift(peer);
    await peer.init();
    await until(() => b.connectionStatus() === "connected", "the follower hears the leader is connected");
    b.collection("todo").upsert("t1", { title: "start" });
    await b.durable("server");
    await until(() => peer.collection("todo").findById("t1"), "bob has t1");

    // Bob and the follower tab edit t1 while the leader is offline: the follower's edit
    // is the one the room sees second, so alice's installation gets the conflict.
    await a.sync.disconnect();
    await until(() => b.connectionStatus() === "disconnected", "the follower hears the leader went offline");
    peer.collection("todo").upsert("t1", { title: "bob's" });
    await peer.durable("server");
    b.collection("todo").upsert("t1", { title: "alice's, from tab b" });
    await b.durable("local");
    await until(() => b.offlineQueueSize() === 1, "the follower hears of its pending change");
    await a.sync.connect();
    await b.durable("server");
    await until(() => heard.get("b").conflicts.length === 1, "the conflict reaches the follower tab");
    const c = heard.get("b").conflicts[0];
    assert.equal(c.strategy, "manual");
    assert.equal(c.yours.entity.data.title, "alice's, from tab b");
    assert.equal(c.theirs.entity.data.title, "bob's");
    assert.equal(heard.get("a").conflicts.length, 1, "and the leader tab");
    // The follower keeps its version: both tabs hear it is settled, and the pick wins.
    b.resolveConflict(c, "yours");
    assert.deepEqual(heard.get("b").resolved.map((r) => [r.keep, r.conflict.yours.entityId]), [["yours", "t1"]], "the resolving tab hears it");
    await until(() => heard.get("a").resolved.length === 1, "the leader tab hears the follower resolved it");
    assert.equal(heard.get("a").resolved[0].conflict.refersTo, c.refersTo);
    await b.durable("server");
    await until(() => peer.collection("todo").findById("t1").data.title === "alice's, from tab b", "the pick reaches bob");
    await until(() => b.offlineQueueSize() === 0 && b.connectionStatus() === "connected", "the follower hears of the ack");
    const seen = heard.get("b").statuses;
    for (const s of [{ status: "disconnected", pending: 0 }, { status: "disconnected", pending: 1 }, { status: "connected", pending: 0 }]) {
      assert.ok(seen.some((x) => x.status === s.status && x.pending === s.pending), `status event ${JSON.stringify(s)} in ${JSON.stringify(seen)}`);
    }

    // The leader closes; b takes over with a new sync engine, and a new tab c follows it.
    opened.splice(opened.indexOf(a), 1);
    await a.close();
    await until(() => b.role === "leader", "b takes over");
    const c3 = await tab("c");
    assert.equal(c3.role, "follower");
    await until(() => c3.connectionStatus() === "connected", "the new follower hears the new leader's status");
    await b.sync.disconnect();
    peer.collection("todo").upsert("t1", { title: "bob's again" });
    await peer.durable("server");
    c3.collection("todo").upsert("t1", { title: "alice's, from tab c" });
    await c3.durable("local");
    await b.sync.connect();
    await c3.durable("server");
    await until(() => heard.get("b").conflicts.length === 2, "the listener b attached before the handover hears the new leader's conflict");
    await until(() => heard.get("c").conflicts.length === 1, "the new follower hears it");
    assert.equal(heard.get("c").conflicts[0].yours.entity.data.title, "alice's, from tab c");
    assert.equal(heard.get("c").conflicts[0].theirs.entity.data.title, "bob's again");
    // Settled in the leader tab with a merge of the app's: the follower hears it.
    b.resolveConflict(heard.get("c").conflicts[0], { title: "both, merged" });
    await until(() => heard.get("c").resolved.length === 1, "the follower hears the leader resolved it");
    assert.equal(heard.get("c").resolved[0].keep, "merged");
    await until(() => c3.collection("todo").findById("t1")?.data.title === "both, merged", "the follower has the merge");
    await b.durable("server");
    await until(() => peer.collection("todo").findById("t1").data.title === "both, merged", "the merge reaches bob");
  } finally {
    await teardown(opened, channels);
    await server.stop();
    t.remove();
  }
});

test("tabs: a new tab gets the entities the leader holds but has not stored yet; a follower's page going hidden has the leader store its writes at once", async () => {
  const shared = new MemoryPersistence();
  const locks = new Locks();
  const opened = [];
  const channels = [];
  const tab = async () => {
    const db = new FrontendDatabase({
      dbName: "unstored",
      persistence: shared,
      flush: { debounceMs: 60_000 },
      multiTab: {
        locks,
        channel: (name) => {
          const c = new BroadcastChannel(name);
          channels.push(c);
          return c;
        },
      },
    });
    opened.push(db);
    await db.init();
    return db;
  };
  try {
    const a = await tab();
    assert.equal(a.role, "leader");
    a.collection("todo").upsert("held", { title: "not stored yet" });
    a.collection("todo").upsert("gone", { title: "deleted before being stored" });
    a.collection("todo").delete("gone");
    assert.equal(shared.entities.size, 0, "the leader's debounce holds them");
    // A tab opened now (a tab reloaded right after its edit) loads nothing from storage.
    const b = await tab();
    assert.equal(b.role, "follower");
    await until(() => b.collection("todo").findById("held"), "the new tab gets the leader's unstored entity");
    assert.equal(b.collection("todo").findById("gone"), undefined);

    // Only the follower's page is seen going away (the leader was opened without a page).
    const win = new EventTarget();
    globalThis.addEventListener = win.addEventListener.bind(win);
    globalThis.removeEventListener = win.removeEventListener.bind(win);
    let c;
    try {
      c = await tab();
    } finally {
      delete globalThis.addEventListener;
      delete globalThis.removeEventListener;
    }
    assert.equal(c.role, "follower");
    c.collection("todo").upsert("from-c", { title: "written just before c's page went away" });
    await until(() => a.collection("todo").findById("from-c"), "the leader has c's write");
    assert.equal(shared.entities.size, 0);
    win.dispatchEvent(new Event("pagehide"));
    await until(() => shared.entities.size === 2, "the leader stored everything at c's request");
    assert.deepEqual([...shared.entities.values()].map((e) => e.id).sort(), ["from-c", "held"]);
  } finally {
    await teardown(opened, channels);
  }
});
