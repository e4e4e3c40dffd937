// IndexedDB persistence (fake-indexeddb in Node): one transaction per commit, entities,
// outbox, known versions and progress together; a database reopened from it resumes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { IDBFactory } from "fake-indexeddb";
import WebSocket from "ws";
import { FrontendDatabase, IndexedDbPersistence, Replica, keyString } from "../dist/index.js";
import { startServer, tempDir, until } from "./helpers.mjs";

const entity = (id, data) => ({ id, type: "todo", data, updatedAt: 5 });

test("a commit stores entities and the replica's state together; load gives them back in queue order", async () => {
  const factory = new IDBFactory();
  const p = new IndexedDbPersistence("t1", factory);
  const r = new Replica({ roomId: "r", userId: "u", replicaId: "me", incarnation: 1 });
  r.localChange({ operation: "upsert", entityType: "todo", entityId: "b", entity: entity("b", { n: 1 }), timestamp: 5 }, 5);
  r.localChange({ operation: "upsert", entityType: "todo", entityId: "a", entity: entity("a", { n: 1 }), timestamp: 5 }, 5);
  r.connect(6);
  r.handle({ type: "welcome", messageId: "w", userId: "@server", timestamp: 6, payload: { protocolVersion: 1, roomId: "r", roomVersion: 4, catchUpFrom: 0, epoch: "E" } }, 6);
  r.handle({ type: "change", messageId: "c", userId: "x", timestamp: 6, payload: { operation: "upsert", entityType: "todo", entityId: "z", entity: entity("z", {}), vector: { x: 1 }, roomVersion: 2 } }, 6);
  await p.commit({ put: [entity("a", { n: 1 }), entity("b", { n: 1 }), entity("z", {})], delete: [], deltas: [r.takeDelta()], meta: { replicaId: "me" } });
  r.localChange({ operation: "delete", entityType: "todo", entityId: "b", timestamp: 7 }, 7);
  await p.commit({ put: [], delete: [{ kind: "todo", id: "b" }], deltas: [r.takeDelta()] });
  await p.close();

  const again = new IndexedDbPersistence("t1", factory);
  const loaded = await again.load();
  assert.deepEqual(loaded.entities.map((e) => e.id).sort(), ["a", "z"]);
  assert.deepEqual([...loaded.replica.outbox.keys()], [keyString("todo", "b"), keyString("todo", "a")], "queue order kept");
  assert.equal(loaded.replica.outbox.get(keyString("todo", "b")).message.payload.operation, "delete");
  assert.deepEqual(loaded.replica.known.get(keyString("todo", "z")).vector, { x: 1 });
  assert.equal(loaded.replica.nextSeq, r.lastSeq());
  assert.deepEqual(loaded.replica.receivedAbove, [2]);
  assert.equal(loaded.replica.epoch, "E");
  assert.deepEqual(loaded.meta, { replicaId: "me" });
  await again.close();
});

test("commits called without waiting for each other are applied in call order; after a load, the metadata is written without a read", async () => {
  const factory = new IDBFactory();
  const p = new IndexedDbPersistence("t-order", factory);
  const r = new Replica({ roomId: "r", userId: "u", replicaId: "me", incarnation: 1 });
  assert.deepEqual((await p.load()).meta, {});
  r.localChange({ operation: "upsert", entityType: "todo", entityId: "a", entity: entity("a", { n: 1 }), timestamp: 5 }, 5);
  const d1 = r.takeDelta();
  r.localChange({ operation: "upsert", entityType: "todo", entityId: "a", entity: entity("a", { n: 2 }), timestamp: 6 }, 6);
  const d2 = r.takeDelta();
  // The second commit carries the first's delta again (as the database does while the
  // first is not known to be stored): applied twice in order, it changes nothing.
  const commits = [
    p.commit({ put: [entity("a", { n: 1 })], delete: [], deltas: [d1], meta: { replicaId: "me" } }),
    p.commit({ put: [entity("a", { n: 2 })], delete: [], deltas: [d1, d2], meta: { replicaId: "me", other: 1 } }),
    p.commit({ put: [entity("b", {})], delete: [], deltas: [] }),
  ];
  await Promise.all(commits);
  await p.close();
  const again = new IndexedDbPersistence("t-order", factory);
  const loaded = await again.load();
  assert.deepEqual(loaded.entities.map((e) => [e.id, e.data.n]).sort(), [["a", 2], ["b", undefined]]);
  assert.equal(loaded.replica.outbox.get(keyString("todo", "a")).message.payload.entity.data.n, 2);
  assert.equal(loaded.replica.nextSeq, r.lastSeq());
  assert.deepEqual(loaded.meta, { replicaId: "me", other: 1 });
  await again.commit({ put: [], delete: [], deltas: [], meta: { more: true } });
  await again.close();
  const third = new IndexedDbPersistence("t-order", factory);
  assert.deepEqual((await third.load()).meta, { replicaId: "me", other: 1, more: true }, "merged with what was stored");
  await third.close();
});

test("a resync cut short is stored as under way: the replica loaded from it asks from 0 again", async () => {
  const factory = new IDBFactory();
  const p = new IndexedDbPersistence("t3", factory);
  const r = new Replica({ roomId: "r", userId: "u", replicaId: "me", incarnation: 1 });
  const server = (type, payload) => ({ type, messageId: "s", userId: "@server", timestamp: 1, payload });
  const welcome = (extra) => server("welcome", { protocolVersion: 1, roomId: "r", roomVersion: 9, catchUpFrom: 0, epoch: "E", ...extra });
  const state = (id, roomVersion) => ({ operation: "upsert", entityType: "todo", entityId: id, entity: entity(id, {}), vector: { x: roomVersion }, roomVersion });
  const page = (fromVersion, toVersion, changes, complete) => server("catchUp", { fromVersion, toVersion, changes, complete });
  r.connect(1);
  r.handle(welcome({ roomVersion: 1 }), 1);
  r.handle(page(0, 1, [state("a", 1)], true), 1);
  r.disconnected();
  // Then older than the room's collection horizon (3, `a` deleted and collected): a
  // snapshot of the room's own epoch, whose first page moves the watermark past the
  // horizon; then the link drops.
  r.connect(2);
  r.handle(welcome({ snapshot: true, collectedThrough: 3 }), 2);
  r.handle(page(0, 5, [state("b", 5)], false), 2);
  assert.equal(r.watermark(), 5);
  await p.commit({ put: [entity("a", {}), entity("b", {})], delete: [], deltas: [r.takeDelta()] });
  await p.close();

  const loaded = await new IndexedDbPersistence("t3", factory).load();
  assert.equal(loaded.replica.resyncing, true);
  const again = new Replica({ roomId: "r", userId: "u", replicaId: "me", incarnation: 2 }, loaded.replica);
  const hello = again.connect(3);
  assert.deepEqual([hello.payload.lastVersion, hello.payload.epoch], [0, "E"], "the snapshot is asked for again");
  again.handle(welcome({ snapshot: true, collectedThrough: 3 }), 3);
  again.handle(page(0, 5, [state("b", 5)], false), 3);
  const out = again.handle(page(5, 9, [state("c", 9)], true), 3);
  assert.deepEqual(out.apply.filter((c) => c.operation === "delete").map((c) => c.entityId), ["a"]);
  assert.ok(out.events.some((e) => e.type === "resynced" && e.snapshot && e.dropped.map((k) => k.id).join() === "a"));
  assert.equal(again.watermark(), 9);
  assert.equal(again.state().resyncing, undefined);
  assert.equal(again.connect(4).payload.lastVersion, 9);
});

test("a commit that fails writes nothing: not the entities, not the outbox", async () => {
  const factory = new IDBFactory();
  const p = new IndexedDbPersistence("t2", factory);
  const r = new Replica({ roomId: "r", userId: "u", replicaId: "me", incarnation: 1 });
  r.localChange({ operation: "upsert", entityType: "todo", entityId: "a", entity: entity("a", {}), timestamp: 5 }, 5);
  // A function cannot be stored (DataCloneError): the whole transaction is abandoned.
  await assert.rejects(p.commit({ put: [entity("ok", {}), entity("bad", { f: () => 1 })], delete: [], deltas: [r.takeDelta()] }));
  const loaded = await p.load();
  assert.deepEqual(loaded.entities, []);
  assert.equal(loaded.replica.outbox.size, 0);
  assert.equal(loaded.replica.nextSeq, 0);
  await p.close();
});

test("FrontendDatabase on IndexedDB: an offline edit survives a restart and syncs when the server is reachable", async () => {
  const factory = new IDBFactory();
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const offline = new FrontendDatabase({
      dbName: "app",
      persistence: new IndexedDbPersistence("app", factory),
      flush: { debounceMs: 1 },
      sync: { wsUrl: "ws://127.0.0.1:9", roomId: "idb", userId: "alice", WebSocket, minBackoff: 5000, maxBackoff: 5000 },
    });
    await offline.init();
    offline.collection("todo").upsert("t1", { title: "written offline" });
    await offline.durable("local");
    await offline.close();

    const online = new FrontendDatabase({
      dbName: "app",
      persistence: new IndexedDbPersistence("app", factory),
      flush: { debounceMs: 1 },
      sync: { wsUrl: server.url, roomId: "idb", userId: "alice", WebSocket },
    });
    await online.init();
    assert.equal(online.collection("todo").findById("t1").data.title, "written offline");
    assert.equal(online.sync.getOfflineQueueSize(), 1);
    await online.durable("server");
    assert.equal(online.sync.getOfflineQueueSize(), 0);
    await until(async () => (await new IndexedDbPersistence("app", factory).load()).replica.outbox.size === 0, "the ack is stored");
    const peer = new FrontendDatabase({ dbName: "peer", persistence: new IndexedDbPersistence("peer", factory), flush: { debounceMs: 1 }, sync: { wsUrl: server.url, roomId: "idb", userId: "bob", WebSocket } });
    await peer.init();
    await until(() => peer.collection("todo").findById("t1"), "the peer gets it");
    await online.close();
    await peer.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("a full storage quota is reported to the app as a QuotaError, and the change stays queued", async () => {
  const { IDBObjectStore } = await import("fake-indexeddb");
  const factory = new IDBFactory();
  const db = new FrontendDatabase({ dbName: "q", persistence: new IndexedDbPersistence("q", factory), flush: { debounceMs: 1, baseRetryDelay: 1, maxRetries: 1 } });
  const errors = [];
  db.on("error", (e) => errors.push(e));
  await db.init();
  const put = IDBObjectStore.prototype.put;
  IDBObjectStore.prototype.put = function (value, key) {
    if (value?.data?.huge) throw new DOMException("the quota has been exceeded", "QuotaExceededError");
    return put.call(this, value, key);
  };
  try {
    db.collection("todo").upsert("big", { huge: true });
    await assert.rejects(db.durable("local"), (e) => e.name === "QuotaError" && /quota is exceeded/.test(e.message));
    assert.ok(errors.some((e) => e.code === "storage" && /quota is exceeded/.test(e.message)), JSON.stringify(errors));
    assert.equal(db.pendingFlushCount(), 1, "kept, to be retried once there is room");
  } finally {
    IDBObjectStore.prototype.put = put;
  }
  await db.durable("local");
  assert.equal(db.pendingFlushCount(), 0);
  const loaded = await new IndexedDbPersistence("q", factory).load();
  assert.deepEqual(loaded.entities.map((e) => e.id), ["big"]);
  await db.close();
});

test("opening the store asks the browser to keep it (navigator.storage.persist), once", async () => {
  let asked = 0;
  // Node 20 has no navigator: this one stands for a browser's.
  Object.defineProperty(globalThis, "navigator", {
    value: { storage: { persist: async () => (asked += 1) > 0 } },
    configurable: true,
  });
  try {
    const p = new IndexedDbPersistence("persist", new IDBFactory());
    assert.equal(asked, 0, "not before the store is opened");
    await p.load();
    await p.commit({ put: [entity("a", {})], delete: [], deltas: [] });
    assert.equal(asked, 1);
    await p.close();
  } finally {
    delete globalThis.navigator;
  }
});
