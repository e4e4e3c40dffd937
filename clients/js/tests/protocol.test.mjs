// The wire format: every JSON example of docs/protocol.md decodes (as protocol_doc.rs
// checks in Rust), and the decoder refuses what the Rust decoder refuses.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { ProtocolError, decodeClient, decodeServer, encode, utf8Length } from "../dist/index.js";

const doc = readFileSync(fileURLToPath(new URL("../../../docs/protocol.md", import.meta.url)), "utf8");

function examples(side) {
  const re = new RegExp("```json " + side + "\\n([\\s\\S]*?)```", "g");
  return [...doc.matchAll(re)].map((m) => m[1]);
}

function refused(fn, code, pattern) {
  assert.throws(fn, (e) => {
    assert.ok(e instanceof ProtocolError, `a ProtocolError, not ${e}`);
    assert.equal(e.code, code);
    if (pattern) assert.match(e.message, pattern);
    return true;
  });
}

test("every client and server example of docs/protocol.md decodes and re-encodes", () => {
  const client = examples("client");
  const server = examples("server");
  assert.ok(client.length >= 4, `found ${client.length} client examples`);
  assert.ok(server.length >= 8, `found ${server.length} server examples`);
  for (const text of client) {
    const m = decodeClient(text);
    assert.deepEqual(decodeClient(encode(m)), m);
  }
  const types = new Set();
  for (const text of server) {
    const m = decodeServer(text);
    types.add(m.type);
    assert.deepEqual(decodeServer(encode(m)), m);
  }
  for (const t of ["welcome", "catchUp", "ack", "change", "conflict", "heartbeat", "error"]) assert.ok(types.has(t), t);
});

test("encode puts type and messageId first (so the server can name an oversized frame)", () => {
  const text = encode({ type: "heartbeat", messageId: "r-1-1", userId: "u", timestamp: 1, payload: {} });
  assert.ok(text.startsWith('{"type":"heartbeat","messageId":"r-1-1"'));
});

test("the checks, in the Rust decoder's order", () => {
  refused(() => decodeServer("x".repeat(11), 10), "oversized", /11 bytes is over the 10-byte limit/);
  refused(() => decodeServer('"é"'.repeat(3), 8), "oversized");
  refused(() => decodeServer("{nope"), "malformed_json");
  refused(() => decodeServer("[".repeat(129) + "]".repeat(129)), "malformed_json", /deeper than 128/);
  refused(() => decodeServer("[1]"), "invalid_message", /JSON object with a string "type"/);
  refused(() => decodeServer('{"type": 3}'), "invalid_message");
  const unknown = () => decodeServer('{"type":"presence","messageId":"m1"}');
  refused(unknown, "unknown_type", /presence/);
  assert.throws(unknown, (e) => e.refersTo === "m1");
  refused(() => decodeServer('{"type":"ack","messageId":"m","userId":"@server","timestamp":1}'), "missing_field", /'payload'/);
  refused(
    () => decodeServer('{"type":"ack","messageId":"m","userId":"@server","timestamp":1,"payload":{"ackOf":"x","version":1}}'),
    "missing_field",
    /'result'/,
  );
  refused(
    () => decodeServer('{"type":"ack","messageId":"m","userId":"@server","timestamp":"soon","payload":{}}'),
    "invalid_message",
    /timestamp/,
  );
  // A heartbeat's payload may be omitted.
  assert.deepEqual(decodeServer('{"type":"heartbeat","messageId":"m","userId":"@server","timestamp":1}').payload, {});
  // Unknown fields are ignored, unknown error codes accepted.
  const e = decodeServer('{"type":"error","messageId":"m","userId":"@server","timestamp":1,"extra":1,"payload":{"code":"brand_new","message":"?","more":2}}');
  assert.equal(e.payload.code, "unknown");
});

test("a client's entity is closed, and its data an object", () => {
  const change = (entity) =>
    JSON.stringify({ type: "change", messageId: "m", userId: "u", timestamp: 1, payload: { operation: "upsert", entityType: "todo", entityId: "t1", entity, vector: { r: 1 }, baseVersion: 0 } });
  refused(() => decodeClient(change({ id: "t1", type: "todo", data: {}, title: "x" })), "invalid_entity", /unknown field 'title'/);
  refused(() => decodeClient(change({ id: "t1", type: "todo", data: [1] })), "invalid_entity", /an array/);
  refused(() => decodeClient(change("t1")), "invalid_entity", /a string/);
  assert.equal(decodeClient(change({ id: "t1", type: "todo", data: { a: 1 } })).payload.entity.data.a, 1);
});

test("versions, counters and timestamps above 2^53-1 are refused clearly, not rounded", () => {
  const ack = (version, counter) =>
    `{"type":"ack","messageId":"m","userId":"@server","timestamp":1,"payload":{"ackOf":"x","version":${version},"result":{"operation":"delete","entityType":"t","entityId":"1","vector":{"r":${counter}},"roomVersion":1}}}`;
  assert.equal(decodeServer(ack("9007199254740991", 1)).payload.version, 9007199254740991);
  refused(() => decodeServer(ack("9007199254740992", 1)), "invalid_message", /above 2\^53-1/);
  refused(() => decodeServer(ack("18446744073709551615", 1)), "invalid_message", /'version' is 18446744073709552000, above 2\^53-1/);
  refused(() => decodeServer(ack(1, "9007199254740993")), "invalid_message", /vector\.r.*above 2\^53-1/);
  refused(() => decodeServer(ack(-1, 1)), "invalid_message", /unsigned integer/);
  refused(() => decodeServer(ack(1.5, 1)), "invalid_message", /unsigned integer/);
});

test("utf8Length counts bytes as UTF-8 does", () => {
  for (const s of ["", "abc", "é", "€", "😀", "a😀é€", "\ud800"]) {
    assert.equal(utf8Length(s), Buffer.byteLength(s, "utf8"), JSON.stringify(s));
  }
});

test("hostile frames: mutations of every example never throw anything but a ProtocolError", () => {
  let seed = 12345;
  const rnd = (n) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
  const pieces = ['"', "{", "}", "[", "]", ",", ":", "null", "-1", "1e400", "9007199254740993", '"x"', "true", "\\", "\u0000", "😀"];
  const all = [...examples("server"), ...examples("client")];
  let decoded = 0;
  for (let i = 0; i < 4000; i++) {
    let text = all[rnd(all.length)];
    for (let k = 0; k <= rnd(4); k++) {
      const at = rnd(text.length + 1);
      const cut = rnd(3);
      text = text.slice(0, at) + (rnd(2) ? pieces[rnd(pieces.length)] : "") + text.slice(at + cut);
    }
    for (const decode of [decodeServer, decodeClient]) {
      try {
        decode(text);
        decoded++;
      } catch (e) {
        assert.ok(e instanceof ProtocolError, `${e} for ${JSON.stringify(text)}`);
        assert.equal(typeof e.code, "string");
      }
    }
  }
  assert.ok(decoded > 0, "some mutations still decode");
});

test("shapes the Rust decoder refuses are refused here too", () => {
  const wrap = (payload) => JSON.stringify({ type: "catchUp", messageId: "m", userId: "@server", timestamp: 1, payload });
  refused(() => decodeServer(wrap({ fromVersion: 0, toVersion: 1, complete: true, changes: {} })), "invalid_message", /'changes' must be an array/);
  refused(() => decodeServer(wrap({ fromVersion: 0, toVersion: 1, complete: "yes", changes: [] })), "invalid_message", /'complete' must be a boolean/);
  refused(
    () => decodeServer(wrap({ fromVersion: 0, toVersion: 1, complete: true, changes: [{ operation: "merge", entityType: "t", entityId: "1" }] })),
    "invalid_message",
    /unknown operation 'merge'/,
  );
  refused(
    () => decodeServer(wrap({ fromVersion: 0, toVersion: 1, complete: true, changes: [{ operation: "upsert", entityType: "t", entityId: "1", entity: { id: "1", type: "t" } }] })),
    "missing_field",
    /'data'/,
  );
  refused(() => decodeServer(wrap({ fromVersion: 0, toVersion: 1, complete: true, changes: [{ operation: "delete", entityType: 5, entityId: "1" }] })), "invalid_message", /'entityType' must be a string/);
});
