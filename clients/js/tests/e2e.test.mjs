// End to end against the real `kalphite` binary: TS clients, the Rust CLI, offline
// edits, a server restart, refusals, and token refresh.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import WebSocket from "ws";
import { FrontendDatabase, MemoryPersistence } from "../dist/index.js";
import { cli, startServer, tempDir, until } from "./helpers.mjs";

const FAST = { debounceMs: 5 };

async function client(server, room, user, extra = {}) {
  const persistence = extra.persistence ?? new MemoryPersistence();
  const db = new FrontendDatabase({
    dbName: `${user}-${room}`,
    persistence,
    flush: FAST,
    sync: { wsUrl: server.url, roomId: room, userId: user, WebSocket, minBackoff: 50, maxBackoff: 500, ...extra.sync },
  });
  const errors = [];
  db.on("error", (e) => errors.push(e));
  await db.init();
  return { db, persistence, errors };
}

test("two TS clients converge, both ways, deletes included", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const a = await client(server, "r1", "alice");
    const b = await client(server, "r1", "bob");
    const todosA = a.db.collection("todo");
    const todosB = b.db.collection("todo");
    await until(() => a.db.sync.getConnectionStatus() === "connected" && b.db.sync.getConnectionStatus() === "connected", "both connected");
    todosA.upsert("t1", { title: "milk", done: false });
    todosB.upsert("t2", { title: "bread", done: false });
    await until(() => todosB.findById("t1") && todosA.findById("t2"), "each sees the other's todo");
    assert.equal(todosB.findById("t1").data.title, "milk");
    todosB.upsert("t1", { title: "oat milk", done: true });
    await until(() => todosA.findById("t1")?.data.title === "oat milk", "the edit reaches a");
    todosA.delete("t2");
    await until(() => !todosB.findById("t2"), "the delete reaches b");
    await a.db.durable("server");
    await b.db.durable("server");
    assert.equal(a.db.sync.getOfflineQueueSize(), 0);
    assert.deepEqual(todosA.map((e) => e.id).sort(), todosB.map((e) => e.id).sort());
    assert.deepEqual(a.errors, []);
    assert.deepEqual(b.errors, []);
    await a.db.close();
    await b.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("a TS client and the Rust CLI (kalphite todo) see each other's todos", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const cliDb = join(t.dir, "cli.db");
    const base = ["todo", "--db", cliDb, "--server", server.url, "--room", "shared", "--user", "carol"];
    await cli([...base, "add", "from the CLI"]);
    const a = await client(server, "shared", "alice");
    const todos = a.db.collection("todo");
    await until(() => todos.where((e) => e.data.title === "from the CLI").length === 1, "the CLI's todo reaches TS");
    const fromCli = todos.where((e) => e.data.title === "from the CLI")[0];
    assert.equal(fromCli.data.status, "pending");
    assert.equal(fromCli.data.priority, "medium");
    // The CLI's model: title, status, priority, tags, createdAt (camelCase).
    todos.upsert("ts-1", { title: "from TypeScript", status: "pending", priority: "high", tags: [], createdAt: Date.now() });
    await a.db.durable("server");
    const list = await cli([...base, "list"]);
    assert.match(list, /from TypeScript/);
    assert.match(list, /from the CLI/);
    assert.deepEqual(a.errors, []);
    await a.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("offline edits are queued and sent after the server comes back on the same port", async () => {
  const t = tempDir();
  let server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const a = await client(server, "r2", "alice");
    const todos = a.db.collection("todo");
    todos.upsert("t1", { title: "before" });
    await a.db.durable("server");
    const disconnected = new Promise((r) => a.db.sync.on("disconnected", r));
    await server.stop();
    await disconnected;
    assert.equal(a.db.sync.getConnectionStatus() === "connected", false);
    todos.upsert("t2", { title: "offline 1" });
    todos.upsert("t1", { title: "edited offline" });
    todos.delete("t2");
    todos.upsert("t3", { title: "offline 3" });
    await a.db.durable("local");
    assert.equal(a.db.sync.getOfflineQueueSize(), 3, "t1, t2 (its delete) and t3 wait");
    const connected = [];
    const acks = [];
    a.db.sync.on("connected", (e) => connected.push(e));
    a.db.sync.on("ack", (e) => acks.push(e));
    server = await startServer({ dir: t.dir, port: server.port, args: ["--open"] });
    await a.db.durable("server");
    assert.equal(a.db.sync.getOfflineQueueSize(), 0);
    assert.equal(connected.length, 1, "one connected event for the reconnection");
    assert.ok(connected[0].roomVersion >= 1, `the room's version at the welcome: ${JSON.stringify(connected[0])}`);
    // One ack per entity that waited (t1, t2's delete, t3), each naming its message and the room version it got.
    assert.equal(acks.length, 3, JSON.stringify(acks));
    for (const ack of acks) assert.match(ack.messageId, /^alice-[0-9a-f]{16}-[0-9a-f]+-\d+$/);
    assert.deepEqual(acks.map((x) => x.version), [...new Set(acks.map((x) => x.version))].sort((x, y) => x - y), "distinct, increasing room versions");
    const b = await client(server, "r2", "bob");
    const seen = b.db.collection("todo");
    await until(() => seen.findById("t3") && seen.findById("t1")?.data.title === "edited offline", "b sees the offline edits");
    assert.equal(seen.findById("t2"), undefined);
    await a.db.close();
    await b.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("a state restored from storage resends its outbox in a new process (new incarnation)", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const persistence = new MemoryPersistence();
    // First "process": offline (no server reachable), one edit stored.
    const offline = new FrontendDatabase({
      dbName: "x",
      persistence,
      flush: FAST,
      sync: { wsUrl: "ws://127.0.0.1:9", roomId: "r3", userId: "alice", WebSocket, minBackoff: 1000, maxBackoff: 1000 },
    });
    await offline.init();
    offline.collection("todo").upsert("t1", { title: "queued while offline" });
    await offline.durable("local");
    await offline.close();
    assert.equal(persistence.replica.outbox.size, 1);
    const replicaId = persistence.meta.replicaId;
    assert.match(replicaId, /^alice-[0-9a-f]{16}$/);
    // Second "process": the same storage, a reachable server.
    const again = await client(server, "r3", "alice", { persistence, sync: { wsUrl: server.url } });
    assert.equal(again.db.collection("todo").findById("t1").data.title, "queued while offline");
    await again.db.durable("server");
    assert.equal(persistence.replica.outbox.size, 0);
    const b = await client(server, "r3", "bob");
    await until(() => b.db.collection("todo").findById("t1"), "the restored outbox reached the room");
    await again.db.close();
    await b.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("a change the server refuses (oversized) is reported once and leaves the outbox", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open"] });
  try {
    const a = await client(server, "r4", "alice");
    const rejected = [];
    a.db.sync.on("rejected", (r) => rejected.push(r));
    const todos = a.db.collection("todo");
    todos.upsert("big", { blob: "x".repeat(1_200_000) });
    todos.upsert("small", { title: "fine" });
    await until(() => rejected.length === 1 && a.db.sync.getOfflineQueueSize() === 0, "the refusal arrives");
    assert.equal(rejected[0].code, "oversized");
    assert.equal(rejected[0].entityId, "big");
    await assert.rejects(a.db.durable("server"), /refused/);
    // It is not resent: a resend would be refused (and reported) again.
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(rejected.length, 1);
    assert.equal(a.errors.filter((e) => e.code === "oversized").length, 1);
    // The local store still holds it: the app decides.
    assert.ok(todos.findById("big"));
    const b = await client(server, "r4", "bob");
    await until(() => b.db.collection("todo").findById("small"), "the other change went through");
    assert.equal(b.db.collection("todo").findById("big"), undefined);
    await a.db.close();
    await b.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("with a token provider, an expired token is refreshed and the client reconnects", async () => {
  const t = tempDir();
  const secret = "0123456789abcdef0123456789abcdef-test-secret";
  const server = await startServer({ dir: t.dir, args: ["--secret", secret] });
  try {
    let issued = 0;
    const provider = async () => {
      issued += 1;
      // The first token lives 2 s; the next ones an hour.
      const ttl = issued === 1 ? "2s" : "1h";
      return (await cli(["token", "--secret", secret, "--user", "alice", "--room", "r5", "--ttl", ttl, "-q"])).trim();
    };
    const a = await client(server, "r5", "alice", { sync: { authToken: provider } });
    await until(() => a.db.sync.getConnectionStatus() === "connected", "connected with the first token");
    await until(() => issued >= 2 && a.db.sync.getConnectionStatus() === "connected", "reconnected with a fresh token", 30_000);
    assert.ok(a.errors.some((e) => e.code === "token_expired"), "the expiry was reported");
    a.db.collection("todo").upsert("t1", { title: "after refresh" });
    await a.db.durable("server");
    // A static bad token stops reconnecting with a clear error.
    const bad = await client(server, "r5", "mallory", { sync: { authToken: "not-a-token" } });
    await until(() => bad.errors.some((e) => e.code === "unauthorized"), "unauthorized reported");
    await until(() => bad.db.sync.stoppedBecause() !== undefined, "stopped reconnecting");
    await a.db.close();
    await bad.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});

test("manual conflicts arrive as events with both versions; the pick written back converges", async () => {
  const t = tempDir();
  const server = await startServer({ dir: t.dir, args: ["--open", "--conflict", "manual"] });
  try {
    const a = await client(server, "r6", "alice");
    const b = await client(server, "r6", "bob");
    a.db.collection("todo").upsert("t1", { title: "start" });
    await a.db.durable("server");
    await until(() => b.db.collection("todo").findById("t1"), "b has t1");
    await b.db.sync.disconnect();
    a.db.collection("todo").upsert("t1", { title: "alice's" });
    await a.db.durable("server");
    b.db.collection("todo").upsert("t1", { title: "bob's" });
    await b.db.durable("local");
    const conflicts = [];
    b.db.sync.on("conflict", (c) => conflicts.push(c));
    await b.db.sync.connect();
    await b.db.durable("server");
    await until(() => conflicts.length === 1, "the conflict event");
    const c = conflicts[0];
    assert.equal(c.strategy, "manual");
    assert.equal(c.yours.entity.data.title, "bob's");
    assert.equal(c.theirs.entity.data.title, "alice's");
    // The app picks a version and writes it: everyone converges on it.
    b.db.collection("todo").upsert("t1", { title: "both: alice's and bob's" });
    await b.db.durable("server");
    await until(() => a.db.collection("todo").findById("t1").data.title === "both: alice's and bob's", "a sees the pick");
    assert.equal(conflicts.length, 1, "the pick dominates both: no new conflict");
    await a.db.close();
    await b.db.close();
  } finally {
    await server.stop();
    t.remove();
  }
});
