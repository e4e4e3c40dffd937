// The sync engine and the database over a scripted WebSocket: what goes out, in what
// order, reconnection, dead connections, refused hellos and undecodable frames.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FrontendDatabase, MemoryPersistence, NetworkSyncEngine, decodeClient, encode } from "../dist/index.js";
import { until } from "./helpers.mjs";

/** A WebSocket the test plays the server of. */
function fakeSockets({ refuseOpen = false } = {}) {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.onopen = this.onclose = this.onerror = this.onmessage = null;
      sockets.push(this);
      setTimeout(() => {
        if (refuseOpen) {
          this.readyState = 3;
          this.onerror?.({});
          this.onclose?.({ code: 1006, reason: "" });
        } else {
          this.readyState = 1;
          this.onopen?.({});
        }
      }, 1);
    }
    send(text) {
      this.sent.push(decodeClient(text, 64 << 20));
    }
    close(code = 1000, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason }), 1);
    }
    // The server's side.
    serve(type, payload, userId = "@server") {
      this.onmessage?.({ data: encode({ type, messageId: `s${Math.random()}`, userId, timestamp: 1, payload }) });
    }
    serveRaw(text) {
      this.onmessage?.({ data: text });
    }
  }
  return { FakeSocket, sockets };
}

const welcome = { protocolVersion: 1, roomId: "r", roomVersion: 0, catchUpFrom: 0, epoch: "E" };

test("a remote state does not overwrite a local edit still waiting for its flush; the edit goes out based on it", async () => {
  const { FakeSocket, sockets } = fakeSockets();
  const db = new FrontendDatabase({
    dbName: "x",
    persistence: new MemoryPersistence(),
    flush: { debounceMs: 60_000 },
    sync: { wsUrl: "ws://fake", roomId: "r", userId: "alice", WebSocket: FakeSocket },
  });
  await db.init();
  const ws = sockets[0];
  assert.equal(ws.url, "ws://fake/sync");
  assert.equal(ws.sent[0].type, "hello");
  ws.serve("welcome", welcome);
  ws.serve("catchUp", { fromVersion: 0, toVersion: 0, complete: true, changes: [] });
  await until(() => db.sync.getConnectionStatus() === "connected", "connected");
  const todos = db.collection("todo");
  todos.upsert("t1", { v: "local" });
  let handled = false;
  db.sync.on("remoteChange", () => (handled = true));
  ws.serve("change", { operation: "upsert", entityType: "todo", entityId: "t1", entity: { id: "t1", type: "todo", data: { v: "remote" }, updatedAt: 5 }, vector: { bob: 1 }, roomVersion: 1 }, "bob");
  await until(() => handled, "the remote change was handled and stored");
  assert.equal(todos.findById("t1").data.v, "local", "the user's edit stays visible");
  await db.durable("local");
  const change = ws.sent.find((m) => m.type === "change");
  assert.equal(change.payload.entity.data.v, "local");
  assert.equal(change.payload.baseVersion, 1);
  assert.deepEqual(change.payload.vector, { bob: 1, [ws.sent[0].payload.replicaId]: 1 }, "on top of the remote clock");
  // The room's answer is shown after the ack.
  ws.serve("ack", { ackOf: change.messageId, version: 2, result: { ...change.payload, entity: { ...change.payload.entity, data: { v: "merged" } }, baseVersion: undefined, roomVersion: 2 } });
  await until(() => todos.findById("t1").data.v === "merged", "the ack's result is applied");
  await db.close();
});

test("a connection silent for two heartbeats is dropped and reopened; the outbox is resent", async () => {
  const { FakeSocket, sockets } = fakeSockets();
  const engine = new NetworkSyncEngine({ wsUrl: "ws://fake/custom", roomId: "r", userId: "u", WebSocket: FakeSocket, heartbeatInterval: 40, minBackoff: 5, maxBackoff: 10 });
  const events = [];
  engine.on("disconnected", (e) => events.push(e));
  await engine.connect();
  assert.equal(sockets[0].url, "ws://fake/custom");
  sockets[0].serve("welcome", welcome);
  await until(() => engine.getConnectionStatus() === "connected", "connected");
  engine.sendChange({ operation: "delete", entityType: "todo", entityId: "x", timestamp: 1 });
  assert.equal(engine.getOfflineQueueSize(), 1);
  await until(() => sockets.length === 2, "reconnected after the silence", 5_000);
  assert.equal(events[0].reason, "no answer from the server");
  assert.equal(events[0].willReconnect, true);
  sockets[1].serve("welcome", welcome);
  await until(() => sockets[1].sent.some((m) => m.type === "change"), "the outbox is resent after the welcome");
  assert.ok(sockets[0].sent.some((m) => m.type === "heartbeat"), "heartbeats were sent while idle");
  await engine.disconnect();
});

test("reconnectAttempts bounds the attempts; the app is told", async () => {
  const { FakeSocket, sockets } = fakeSockets({ refuseOpen: true });
  const engine = new NetworkSyncEngine({ wsUrl: "ws://fake", roomId: "r", userId: "u", WebSocket: FakeSocket, reconnectAttempts: 3, minBackoff: 1, maxBackoff: 2 });
  const errors = [];
  engine.on("error", (e) => errors.push(e));
  await engine.connect();
  await until(() => engine.stoppedBecause() !== undefined, "gave up");
  assert.equal(sockets.length, 4, "the first try and 3 reconnections");
  assert.match(errors.at(-1).message, /gave up after 3/);
  await engine.disconnect();
});

test("a refused hello stops reconnecting; an undecodable frame is reported and skipped", async () => {
  const { FakeSocket, sockets } = fakeSockets();
  const engine = new NetworkSyncEngine({ wsUrl: "ws://fake", roomId: "r", userId: "u", authToken: "bad", WebSocket: FakeSocket, minBackoff: 1, maxBackoff: 2 });
  const errors = [];
  engine.on("error", (e) => errors.push(e));
  await engine.connect();
  const ws = sockets[0];
  assert.equal(ws.sent[0].payload.token, "bad");
  ws.serveRaw('{"type":"ack","messageId":"m","userId":"@server","timestamp":1,"payload":{"ackOf":"x","version":18446744073709551615,"result":{}}}');
  ws.serveRaw("\u0000not json");
  ws.serve("error", { code: "unauthorized", message: "bad token", refersTo: ws.sent[0].messageId });
  ws.close(1008, "unauthorized");
  await until(() => errors.some((e) => e.code === "unauthorized"), "unauthorized reported");
  await until(() => engine.getConnectionStatus() === "disconnected", "closed");
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(sockets.length, 1, "no reconnection with a refused token");
  assert.match(engine.stoppedBecause(), /unauthorized/);
  const protocol = errors.filter((e) => e.code === "protocol");
  assert.equal(protocol.length, 2);
  assert.match(protocol[0].message, /above 2\^53-1/);
  await engine.disconnect();
});
