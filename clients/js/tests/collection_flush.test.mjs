// TypedCollection and the flush engine (on fake time), and the database over both.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FrontendDatabase, MemoryFlushEngine, MemoryPersistence, TypedCollection, backoff } from "../dist/index.js";

/** Timers that run only when the test advances them. */
function fakeTimers() {
  let now = 0;
  let next = 1;
  const timers = new Map();
  return {
    setTimeout(fn, ms) {
      const id = next++;
      timers.set(id, { at: now + ms, fn });
      return id;
    },
    clearTimeout(id) {
      timers.delete(id);
    },
    async advance(ms) {
      const end = now + ms;
      for (;;) {
        const due = [...timers.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
        if (!due) break;
        timers.delete(due[0]);
        now = due[1].at;
        due[1].fn();
        for (let i = 0; i < 20; i++) await Promise.resolve();
      }
      now = end;
    },
    pending: () => timers.size,
  };
}

test("TypedCollection: synchronous reads, upsert replaces in place, delete, where, orderBy, subscriptions", () => {
  const changes = [];
  const c = TypedCollection.create("todo", { localChange: (ch) => changes.push(ch), now: () => 42 });
  const seen = [];
  const unsubscribe = c.subscribe((e) => seen.push(`${e.origin}:${e.operation}:${e.id}`));
  c.upsert("a", { title: "b-title", rank: 2 });
  c.upsert("b", { title: "a-title", rank: 1 });
  assert.equal(c.length, 2);
  assert.ok(Array.isArray(c));
  const before = c[0];
  c.upsert("a", { title: "b-title", rank: 3 });
  assert.equal(c.length, 2, "replaced, not appended");
  assert.notEqual(c[0], before);
  assert.equal(c[0].data.rank, 3);
  assert.equal(c.findById("a").updatedAt, 42);
  assert.deepEqual(c.where((e) => e.data.rank > 1).map((e) => e.id), ["a"]);
  assert.deepEqual(c.orderBy((e) => e.data.title).map((e) => e.id), ["b", "a"]);
  assert.deepEqual(c.orderBy((e) => e.data.rank, "desc").map((e) => e.id), ["a", "b"]);
  assert.equal(c.delete("b"), true);
  assert.equal(c.delete("b"), false);
  assert.equal(c.findById("b"), undefined);
  c.applyRemote({ operation: "upsert", entityType: "todo", entityId: "r", entity: { id: "r", type: "todo", data: {}, updatedAt: 1 }, timestamp: 1 });
  unsubscribe();
  c.upsert("z", {});
  assert.deepEqual(seen, ["local:upsert:a", "local:upsert:b", "local:upsert:a", "local:delete:b", "remote:upsert:r"]);
  assert.deepEqual(changes.map((ch) => `${ch.operation}:${ch.entityId}`), ["upsert:a", "upsert:b", "upsert:a", "delete:b", "upsert:z"]);
  assert.ok(!(c.map((e) => e) instanceof TypedCollection), "derived arrays are plain");
  assert.throws(() => c.upsert("", {}), /non-empty/);
  assert.throws(() => c.upsert("x", [1]), /plain object/);
  // The stored data is a copy: later mutation of the caller's object does not leak in.
  const data = { n: 1 };
  c.upsert("copy", data);
  data.n = 2;
  assert.equal(c.findById("copy").data.n, 1);
});

test("flush engine: debounced (seed default 100 ms), one pending change per entity, batches of maxBatchSize", async () => {
  const t = fakeTimers();
  const batches = [];
  const engine = new MemoryFlushEngine({ flushTarget: async (ch) => void batches.push(ch.map((c) => `${c.operation}:${c.entityId}`)), maxBatchSize: 2, timers: t });
  engine.scheduleFlush("a", { id: "a", type: "todo", data: { n: 1 } });
  await t.advance(60);
  engine.scheduleFlush("a", { id: "a", type: "todo", data: { n: 2 } });
  engine.scheduleFlush("b", { id: "b", type: "todo", data: {} });
  engine.scheduleDelete("c", "todo");
  await t.advance(99);
  assert.deepEqual(batches, [], "the debounce restarts at each change");
  assert.equal(engine.getQueuedChanges().length, 3);
  await t.advance(1);
  assert.deepEqual(batches, [["upsert:a", "upsert:b"], ["delete:c"]]);
  assert.equal(engine.getQueuedChanges().length, 0);
});

test("flush engine: retries with backoff, then keeps the changes (never drops) until the next change or flush", async () => {
  const t = fakeTimers();
  let failures = 4;
  const calls = [];
  const errors = [];
  const engine = new MemoryFlushEngine({
    flushTarget: async (ch) => {
      calls.push(ch.length);
      if (failures-- > 0) throw new Error("disk full");
    },
    timers: t,
    onError: (_e, _ch, attempt) => errors.push(attempt),
  });
  engine.scheduleFlush("a", { id: "a", type: "todo", data: {} });
  await t.advance(100); // first try
  await t.advance(100); // retry after 100
  await t.advance(200); // retry after 200
  assert.deepEqual(errors, [1, 2, 3]);
  await t.advance(10_000);
  assert.equal(calls.length, 3, "stops after maxRetries (3)");
  assert.equal(engine.getQueuedChanges().length, 1, "still queued");
  assert.equal(t.pending(), 0);
  await assert.rejects(engine.flush(), /disk full/);
  assert.equal(engine.getQueuedChanges().length, 1);
  engine.scheduleFlush("b", { id: "b", type: "todo", data: {} });
  await t.advance(100);
  assert.deepEqual(calls, [1, 1, 1, 1, 2]);
  assert.equal(engine.getQueuedChanges().length, 0);
});

test("flush engine: pause, resume, and a newer change of an entity replaces a failed one", async () => {
  const t = fakeTimers();
  const flushed = [];
  let fail = true;
  const engine = new MemoryFlushEngine({
    flushTarget: async (ch) => {
      if (fail) throw new Error("no");
      flushed.push(...ch.map((c) => c.entity?.data.n ?? "deleted"));
    },
    timers: t,
    maxRetries: 1,
  });
  engine.scheduleFlush("a", { id: "a", type: "todo", data: { n: 1 } });
  await t.advance(100);
  fail = false;
  engine.pauseFlush();
  engine.scheduleFlush("a", { id: "a", type: "todo", data: { n: 2 } });
  await t.advance(1000);
  assert.deepEqual(flushed, [], "paused");
  engine.resumeFlush();
  await t.advance(1);
  assert.deepEqual(flushed, [2], "the newer change replaced the failed one");
  engine.destroy();
  assert.throws(() => engine.scheduleDelete("a", "todo"), /destroyed/);
});

test("flush engine: flushNow hands what is queued over while a batch is in progress; a failed older batch puts back only what no newer batch holds", async () => {
  const t = fakeTimers();
  const calls = [];
  const engine = new MemoryFlushEngine({
    flushTarget: (batch) => new Promise((resolve, reject) => calls.push({ batch: batch.map((c) => `${c.entityId}${c.entity.data.v}`), resolve, reject })),
    timers: t,
  });
  const ticks = async () => {
    for (let i = 0; i < 20; i++) await Promise.resolve();
  };
  engine.scheduleFlush("x", { id: "x", type: "todo", data: { v: 1 } });
  engine.scheduleFlush("y", { id: "y", type: "todo", data: { v: 1 } });
  const first = engine.flush();
  await ticks();
  assert.deepEqual(calls.map((c) => c.batch), [["x1", "y1"]]);
  // The batch never settles (a page unloading gets no completion event): flush() waits
  // for it, flushNow() does not.
  engine.scheduleFlush("x", { id: "x", type: "todo", data: { v: 2 } });
  const waiting = engine.flush();
  await ticks();
  assert.equal(calls.length, 1, "flush waits for the batch in progress");
  const now = engine.flushNow();
  await ticks();
  assert.deepEqual(calls.map((c) => c.batch), [["x1", "y1"], ["x2"]]);
  assert.equal(engine.getState().isFlushInProgress, true);
  calls[1].resolve();
  await now;
  assert.equal(engine.isQueued("todo", "x"), true, "x is still in the first batch");
  calls[0].reject(new Error("aborted"));
  await assert.rejects(first, /aborted/);
  await ticks();
  // The waiting flush takes what was put back: y1, not x1 (x2 was handed over since).
  assert.deepEqual(calls.map((c) => c.batch), [["x1", "y1"], ["x2"], ["y1"]]);
  calls[2].resolve();
  await waiting;
  await engine.whenIdle();
  assert.equal(engine.getState().isFlushInProgress, false);
  assert.equal(engine.isQueued("todo", "x"), false);
  assert.equal(await engine.flushNow(), undefined, "nothing queued: nothing to do");
  assert.equal(calls.length, 3);
});

test("reconnect backoff is exponential, capped, with jitter between half and all of it", () => {
  assert.equal(backoff(0, 250, 30_000, 1), 250);
  assert.equal(backoff(0, 250, 30_000, 0), 125);
  assert.equal(backoff(3, 250, 30_000, 1), 2000);
  assert.equal(backoff(20, 250, 30_000, 1), 30_000);
  assert.equal(backoff(1000, 250, 30_000, 0.5), 22_500);
});

test("FrontendDatabase without sync: local writes are persisted; a failed storage write is retried, never lost; durable('local')", async () => {
  const persistence = new MemoryPersistence();
  const db = new FrontendDatabase({ dbName: "x", persistence, flush: { debounceMs: 1, baseRetryDelay: 1 } });
  const errors = [];
  db.on("error", (e) => errors.push(e));
  await db.init();
  const todos = db.collection("todo");
  persistence.failNext = 1;
  todos.upsert("a", { title: "one" });
  todos.upsert("b", { title: "two" });
  todos.delete("b");
  await db.durable("local").catch(() => undefined);
  await db.durable("local");
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /stay queued/);
  assert.deepEqual([...persistence.entities.keys()].map((k) => k.split("\u0000")[1]), ["a"]);
  await db.close();
  const reopened = new FrontendDatabase({ dbName: "x", persistence });
  await reopened.init();
  assert.equal(reopened.collection("todo").findById("a").data.title, "one");
  await reopened.close();
});
