// Differential test: the TypeScript Replica replays the traces the Rust replica wrote
// (crates/kalphite-sync/tests/replica_traces.rs) and must produce the same messages,
// local changes, events and state at every step (content hashes aside).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Replica, ReplicaError, applyDelta, decodeServer, emptyState, encode, parseKey } from "../dist/index.js";

const traces = JSON.parse(readFileSync(fileURLToPath(new URL("./traces/replica.json", import.meta.url)), "utf8"));

/** Drops null and undefined fields, recursively (Rust writes null where TS omits). */
function norm(v) {
  if (Array.isArray(v)) return v.map(norm);
  if (v === null || typeof v !== "object") return v;
  const out = {};
  for (const k of Object.keys(v).sort()) {
    if (v[k] === null || v[k] === undefined) continue;
    out[k] = norm(v[k]);
  }
  return out;
}

const sent = (messages) => messages.map((m) => JSON.parse(encode(m)));
const change = (c) => ({ operation: c.operation, entityType: c.entityType, entityId: c.entityId, entity: c.entity, timestamp: c.timestamp });
const keys = (ks) => ks.map((k) => ({ kind: k.kind, id: k.id }));

function event(e) {
  switch (e.type) {
    case "connected":
      return { type: "connected", roomVersion: e.roomVersion };
    case "caughtUp":
      return { type: "caughtUp", version: e.version };
    case "acked":
      return { type: "acked", messageId: e.messageId, version: e.version };
    case "conflict":
      return { type: "conflict", refersTo: e.conflict.refersTo };
    case "rejected":
      return { type: "rejected", messageId: e.change.messageId, code: e.code };
    case "resynced":
      return { type: "resynced", snapshot: e.snapshot, resend: keys(e.resend), dropped: keys(e.dropped) };
    case "serverError":
      return { type: "serverError", code: e.code, refersTo: e.refersTo };
    default:
      return { type: `unknown ${e.type}` };
  }
}

function state(r) {
  const s = r.state();
  const known = [...s.known.entries()]
    .map(([k, v]) => {
      const { kind, id } = parseKey(k);
      return [kind, id, { version: v.version, vector: v.vector }];
    })
    .sort((a, b) => (a[0] === b[0] ? (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0) : a[0] < b[0] ? -1 : 1));
  const outbox = [...s.outbox.entries()].map(([k, e]) => {
    const { kind, id } = parseKey(k);
    return [kind, id, { message: e.message, firstSeq: e.firstSeq, held: e.held ? { version: e.held.version, state: e.held.state } : null }];
  });
  return {
    nextSeq: s.nextSeq,
    watermark: s.watermark,
    receivedAbove: s.receivedAbove,
    epoch: s.epoch,
    resyncing: s.resyncing === true,
    known,
    outbox,
    link: r.link(),
    ackedThrough: r.ackedThrough(),
  };
}

function replay(run) {
  let r = new Replica(traces.config);
  // What the replica persisted: every delta applied in order (what a restart reads), and
  // as it was after each step (a crash that lost the last flushes restarts from one).
  let disk = emptyState();
  const disks = [];
  run.steps.forEach((step, i) => {
    const where = `seed ${run.seed}, step ${i} (${step.input.op})`;
    const input = step.input;
    let output;
    switch (input.op) {
      case "local":
        try {
          const c = { ...input.change, entity: input.change.entity ?? undefined };
          output = { send: sent(r.localChange(c, input.now)) };
        } catch (e) {
          if (!(e instanceof ReplicaError)) throw e;
          output = { error: e.message };
        }
        break;
      case "handle": {
        const out = r.handle(decodeServer(JSON.stringify(input.message)), input.now);
        output = { send: sent(out.send), apply: out.apply.map(change), events: out.events.map(event) };
        break;
      }
      case "tick":
        output = { send: sent(r.tick(input.now)) };
        break;
      case "connect":
        output = { send: sent([r.connect(input.now)]) };
        break;
      case "disconnected":
        r.disconnected();
        output = {};
        break;
      case "resend":
        output = { send: sent(r.resend(input.entity, input.now)) };
        break;
      case "restart":
        // A crash may have lost the last flushes: the restart reads the disk of step `from`.
        if (input.from !== null && input.from !== undefined) disk = structuredClone(disks[input.from]);
        r = new Replica({ ...traces.config, incarnation: input.incarnation }, structuredClone(disk));
        output = {};
        break;
      default:
        throw new Error(`unknown op in ${where}`);
    }
    applyDelta(disk, r.takeDelta());
    disks.push(structuredClone(disk));
    assert.deepEqual(norm(output), norm(step.output), `output differs at ${where}`);
    assert.deepEqual(norm(state(r)), norm(step.state), `state differs after ${where}`);
  });
}

test("the traces cover what they should", () => {
  const ops = new Set();
  const events = new Set();
  for (const run of traces.runs) {
    for (const s of run.steps) {
      ops.add(s.input.op);
      for (const e of s.output.events ?? []) events.add(e.type);
      if (s.output.error) events.add("localError");
    }
  }
  for (const op of ["local", "handle", "tick", "connect", "disconnected", "resend", "restart"]) assert.ok(ops.has(op), op);
  for (const e of ["connected", "caughtUp", "acked", "conflict", "rejected", "resynced", "localError"]) assert.ok(events.has(e), e);
  // A resync cut short after its pages moved the watermark: the next hello asks from 0.
  const restarted = traces.runs.some((run) =>
    run.steps.some((s, i) => {
      const before = run.steps[i - 1]?.state;
      return s.input.op === "connect" && before?.resyncing && before.watermark > 0 && s.output.send[0].payload.lastVersion === 0;
    }),
  );
  assert.ok(restarted, "an interrupted resync");
  // A crash that lost flushes, then an edit of the new incarnation sent with its own
  // counter raised above what the welcome said the room holds of it.
  const rolledBack = traces.runs.some((run) => run.steps.some((s, i) => s.input.op === "restart" && s.input.from < i - 1));
  assert.ok(rolledBack, "a restart from a disk a few steps old");
  // A queued edit restamped by a welcome: its message id sent again with a higher counter.
  const raised = traces.runs.some((run) => {
    const sentWith = new Map();
    return run.steps.some((s) =>
      (s.output.send ?? []).some((m) => {
        if (m.type !== "change") return false;
        const before = sentWith.get(m.messageId);
        sentWith.set(m.messageId, m.payload.vector.ra ?? 0);
        return before !== undefined && (m.payload.vector.ra ?? 0) > before;
      }),
    );
  });
  assert.ok(raised, "a queued edit restamped above the room's counter of this replica");
});

for (const run of traces.runs) {
  test(`the TS replica matches the Rust replica's trace, seed ${run.seed} (${run.steps.length} steps)`, () => replay(run));
}
