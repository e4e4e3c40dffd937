// Several tabs on one database (Node's BroadcastChannel, an in-process Web Locks
// stand-in, one shared store as IndexedDB is shared by an origin's tabs): one WebSocket,
// the other tabs write through the leader, leadership passes on when the leader closes.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { FrontendDatabase, MemoryPersistence } from "../dist/index.js";
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
