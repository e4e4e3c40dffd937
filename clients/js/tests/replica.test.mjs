// The sans-IO Replica: outbox, clocks, watermark, acks, errors, resync, as replica.rs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Replica, ReplicaError, applyDelta, emptyState, keyString } from "../dist/index.js";

const config = (extra = {}) => ({ roomId: "room", userId: "alice", replicaId: "lap", incarnation: 0xabc, ...extra });
const up = (id, data, ts = 1000) => ({ operation: "upsert", entityType: "todo", entityId: id, entity: { id, type: "todo", data, updatedAt: ts }, timestamp: ts });
const del = (id, ts = 1000) => ({ operation: "delete", entityType: "todo", entityId: id, timestamp: ts });
const env = (type, payload, id = "s") => ({ type, messageId: id, userId: "@server", timestamp: 1, payload });
const welcome = (p) => env("welcome", { protocolVersion: 1, roomId: "room", roomVersion: 0, catchUpFrom: 0, ...p });
const state = (id, version, data, vector = { bob: 1 }) => ({
  operation: data ? "upsert" : "delete",
  entityType: "todo",
  entityId: id,
  ...(data ? { entity: { id, type: "todo", data, updatedAt: 500 } } : {}),
  vector,
  roomVersion: version,
});

function connected(r, w = {}) {
  const hello = r.connect(1);
  const out = r.handle(welcome(w), 2);
  return { hello, out };
}

test("hello carries the watermark, token and epoch; message ids are <replica>-<incarnation hex>-<seq>", () => {
  const r = new Replica(config({ authToken: "tok" }));
  const hello = r.connect(5);
  assert.equal(hello.type, "hello");
  assert.equal(hello.messageId, "lap-abc-1");
  assert.deepEqual(hello.payload, { protocolVersion: 1, roomId: "room", replicaId: "lap", lastVersion: 0, token: "tok" });
  r.handle(welcome({ epoch: "E1", roomVersion: 3, catchUpFrom: 0 }), 6);
  assert.equal(r.state().epoch, "E1", "no resync needed: the epoch is stored at the welcome");
  r.disconnected();
  assert.equal(r.connect(7).payload.epoch, "E1");
});

test("one outbox entry per entity: a newer edit replaces it, keeps its place and base, ticks the clock", () => {
  const r = new Replica(config());
  r.localChange(up("a", { n: 1 }), 10);
  r.localChange(up("b", { n: 1 }), 10);
  const sentOffline = r.localChange(up("a", { n: 2 }), 11);
  assert.deepEqual(sentOffline, [], "nothing is sent while disconnected");
  assert.equal(r.outboxLen(), 2);
  const entries = [...r.state().outbox.values()];
  assert.equal(entries[0].message.payload.entityId, "a", "a keeps its queue position");
  assert.deepEqual(entries[0].message.payload.vector, { lap: 2 });
  assert.equal(entries[0].message.payload.baseVersion, 0);
  assert.equal(entries[0].message.messageId, "lap-abc-3");
  const { out } = connected(r);
  assert.deepEqual(out.send.map((m) => m.payload.entityId), ["a", "b"], "the whole outbox goes after the welcome, oldest first");
});

test("at most one change per entity in flight; the newer edit goes when the ack comes; the ack's result is the known state", () => {
  const r = new Replica(config());
  connected(r);
  const [first] = r.localChange(up("a", { n: 1 }), 10);
  assert.equal(first.type, "change");
  assert.deepEqual(r.localChange(up("a", { n: 2 }), 11), [], "waits for the first ack");
  const ack = env("ack", { ackOf: first.messageId, version: 1, result: state("a", 1, { n: 1 }, { lap: 1 }) });
  const out = r.handle(ack, 12);
  assert.equal(out.send.length, 1, "released");
  assert.deepEqual(out.send[0].payload.entity.data, { n: 2 });
  assert.deepEqual(out.apply, [], "the user's newer edit stays visible");
  const out2 = r.handle(env("ack", { ackOf: out.send[0].messageId, version: 2, result: state("a", 2, { n: 2 }, { lap: 2 }) }), 13);
  assert.equal(r.outboxLen(), 0);
  assert.equal(r.watermark(), 2);
  assert.equal(r.ackedThrough(), r.lastSeq());
  assert.deepEqual(out2.events.map((e) => e.type), ["acked"]);
  // The next edit starts from the acknowledged state's clock and version.
  const [next] = r.localChange(up("a", { n: 3 }), 14);
  assert.deepEqual(next.payload.vector, { lap: 3 });
  assert.equal(next.payload.baseVersion, 2);
});

test("a server state that arrives while an edit is queued is held, then shown after the ack when it differs", () => {
  const r = new Replica(config());
  connected(r);
  const [m] = r.localChange(up("a", { mine: true }), 10);
  assert.deepEqual(r.handle(env("change", state("a", 1, { theirs: true })), 11).apply, [], "held back");
  const merged = state("a", 2, { mine: true, theirs: true }, { bob: 1, lap: 1 });
  const out = r.handle(env("ack", { ackOf: m.messageId, version: 2, result: merged }), 12);
  assert.equal(out.apply.length, 1);
  assert.deepEqual(out.apply[0].entity.data, { mine: true, theirs: true });
});

test("remote changes apply once; older or duplicate versions are ignored; the watermark waits for gaps", () => {
  const r = new Replica(config());
  connected(r);
  assert.equal(r.handle(env("change", state("x", 2, { v: 2 })), 5).apply.length, 1);
  assert.equal(r.watermark(), 0, "version 1 missing");
  assert.deepEqual(r.state().receivedAbove, [2]);
  assert.equal(r.handle(env("change", state("x", 2, { v: 2 })), 5).apply.length, 0, "duplicate");
  assert.equal(r.handle(env("change", state("y", 1, null)), 5).apply.length, 0, "deleting the unknown: nothing to do");
  assert.equal(r.watermark(), 2);
  assert.deepEqual(r.state().receivedAbove, []);
  const out = r.handle(env("change", state("x", 3, null)), 6);
  assert.deepEqual(out.apply.map((c) => c.operation), ["delete"]);
  assert.equal(r.handle(env("change", { ...state("_kalphite_meta", 4, { a: 1 }), entityType: "_kalphite_x" }), 6).apply.length, 0, "reserved kinds are never data");
});

test("catch-up pages move the watermark; the last page reports caughtUp", () => {
  const r = new Replica(config());
  connected(r, { roomVersion: 9 });
  let out = r.handle(env("catchUp", { fromVersion: 0, toVersion: 5, complete: false, changes: [state("a", 3, { a: 1 })] }), 3);
  assert.equal(r.watermark(), 5);
  assert.equal(out.apply.length, 1);
  out = r.handle(env("catchUp", { fromVersion: 5, toVersion: 9, complete: true, changes: [state("b", 9, { b: 1 })] }), 4);
  assert.equal(r.watermark(), 9);
  assert.deepEqual(out.events, [{ type: "caughtUp", version: 9 }]);
});

test("a non-retryable error about a queued change removes it and reports it once; a retryable one keeps it", () => {
  const r = new Replica(config());
  connected(r);
  const [big] = r.localChange(up("big", { x: 1 }), 10);
  const [other] = r.localChange(up("o", { x: 1 }), 10);
  let out = r.handle(env("error", { code: "rate_limited", message: "slow down", refersTo: other.messageId }), 11);
  assert.equal(r.outboxLen(), 2);
  assert.deepEqual(out.events.map((e) => e.type), ["serverError"]);
  out = r.handle(env("error", { code: "oversized", message: "too big", refersTo: big.messageId }), 12);
  assert.equal(r.outboxLen(), 1);
  assert.deepEqual(out.events.map((e) => [e.type, e.code]), [["rejected", "oversized"]]);
  assert.equal(r.undeliveredThrough(r.lastSeq()).length, 1);
  out = r.handle(env("error", { code: "oversized", message: "too big", refersTo: big.messageId }), 13);
  assert.deepEqual(out.events.map((e) => e.type), ["serverError"], "not rejected twice");
});

test("tick resends what waits too long, else a heartbeat after the interval; nothing while disconnected", () => {
  const r = new Replica(config({ resendAfter: 100, heartbeatInterval: 1000 }));
  r.localChange(up("a", { n: 1 }), 0);
  assert.deepEqual(r.tick(50), []);
  connected(r);
  assert.deepEqual(r.tick(50), [], "just sent after the welcome");
  const resent = r.tick(200);
  assert.equal(resent.length, 1);
  assert.equal(resent[0].messageId, [...r.state().outbox.values()][0].message.messageId, "the same message id when resending");
  r.handle(env("ack", { ackOf: resent[0].messageId, version: 1, result: state("a", 1, { n: 1 }, { lap: 1 }) }), 201);
  assert.deepEqual(r.tick(500), []);
  assert.equal(r.tick(1300)[0].type, "heartbeat");
});

test("the outbox limit refuses new entities (never drops), not new edits of queued ones", () => {
  const r = new Replica(config({ outboxLimit: 2 }));
  r.localChange(up("a", {}), 1);
  r.localChange(up("b", {}), 1);
  assert.throws(() => r.localChange(up("c", {}), 1), (e) => e instanceof ReplicaError && e.kind === "outboxFull" && /offline queue is full \(2/.test(e.message));
  r.localChange(up("a", { again: 1 }), 1);
  assert.equal(r.outboxLen(), 2);
  assert.deepEqual(r.undeliveredThrough(r.lastSeq()).map((u) => u.key.id), ["c"]);
  assert.throws(() => r.localChange({ operation: "upsert", entityType: "todo", entityId: "z", timestamp: 1 }, 1), /carries no entity/);
});

test("another epoch: resync from 0, clocks keep only our counters, the room's lacks are reported for resend", () => {
  const r = new Replica(config());
  r.connect(1);
  r.handle(welcome({ epoch: "E1", roomVersion: 2 }), 1);
  r.handle(env("catchUp", { fromVersion: 0, toVersion: 2, complete: true, changes: [state("a", 1, { a: 1 }, { bob: 1 }), state("b", 2, { b: 1 }, { bob: 2, lap: 1 })] }), 1);
  r.localChange(up("q", { queued: 1 }), 2);
  r.disconnected();
  r.connect(3);
  const out = r.handle(welcome({ epoch: "E2", roomVersion: 1, catchUpFrom: 0 }), 3);
  assert.equal(out.send.length, 1);
  assert.deepEqual(out.send[0].payload.vector, { lap: 1 });
  assert.equal(out.send[0].payload.baseVersion, 0);
  assert.equal(r.state().epoch, "E1", "not stored before the catch-up completes");
  const done = r.handle(env("catchUp", { fromVersion: 0, toVersion: 1, complete: true, changes: [state("a", 1, { a: 1 }, { carol: 1 })] }), 4);
  const resynced = done.events.find((e) => e.type === "resynced");
  assert.deepEqual(resynced, { type: "resynced", snapshot: false, resend: [{ kind: "todo", id: "b" }], dropped: [] });
  assert.equal(r.state().epoch, "E2");
  assert.deepEqual(r.state().known.get(keyString("todo", "b")).vector, { lap: 1 });
  const [again] = r.resend({ id: "b", type: "todo", data: { b: 1 }, updatedAt: 77 }, 5);
  assert.equal(again.timestamp, 77);
  assert.deepEqual(again.payload.vector, { lap: 2 });
});

test("a snapshot drops what it lacks, except queued entities", () => {
  const r = new Replica(config());
  r.connect(1);
  r.handle(welcome({ epoch: "E1", roomVersion: 2 }), 1);
  r.handle(env("catchUp", { fromVersion: 0, toVersion: 2, complete: true, changes: [state("a", 1, { a: 1 }), state("b", 2, { b: 1 })] }), 1);
  r.localChange(up("a", { mine: 1 }), 2);
  r.disconnected();
  r.connect(3);
  r.handle(welcome({ epoch: "E1", roomVersion: 5, catchUpFrom: 0, snapshot: true }), 3);
  const out = r.handle(env("catchUp", { fromVersion: 0, toVersion: 5, complete: true, changes: [] }), 4);
  assert.deepEqual(out.apply.map((c) => [c.operation, c.entityId]), [["delete", "b"]]);
  assert.deepEqual(out.events.find((e) => e.type === "resynced").dropped, [{ kind: "todo", id: "b" }]);
  assert.equal(r.outboxLen(), 1);
});

test("deltas rebuild the state; a restored state continues its sequence and restamps foreign entries", () => {
  const r = new Replica(config());
  const persisted = emptyState();
  connected(r);
  const [m] = r.localChange(up("a", { n: 1 }), 1);
  r.localChange(up("b", { n: 1 }), 1);
  r.handle(env("ack", { ackOf: m.messageId, version: 1, result: state("a", 1, { n: 1 }, { lap: 1 }) }), 2);
  r.handle(env("change", state("c", 3, { c: 1 })), 3);
  applyDelta(persisted, r.takeDelta());
  assert.deepEqual(persisted.known, r.state().known);
  assert.deepEqual([...persisted.outbox.keys()], [...r.state().outbox.keys()]);
  assert.equal(persisted.nextSeq, r.lastSeq());
  assert.deepEqual(persisted.receivedAbove, [3]);
  const again = new Replica(config({ incarnation: 0xdef }), persisted);
  const hello = again.connect(4);
  assert.equal(hello.messageId, `lap-def-${r.lastSeq() + 1}`, "ids never repeat: the counter continues and the incarnation differs");
  const other = new Replica(config({ replicaId: "newid" }), persisted);
  const entry = [...other.state().outbox.values()][0];
  assert.match(entry.message.messageId, /^newid-abc-/);
  assert.deepEqual(entry.message.payload.vector, { newid: 1 });
});
