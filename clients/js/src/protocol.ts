/**
 * The wire protocol (`docs/protocol.md`): message types, and encode/decode with the same
 * checks, in the same order, as the Rust decoder (`crates/kalphite-sync/src/protocol.rs`):
 * size, JSON syntax and nesting, `type`, envelope fields, then the payload's shape.
 * JavaScript numbers hold integers exactly only up to 2^53−1: a version, counter or
 * timestamp above that is refused with a clear error rather than silently rounded.
 */

import type { VectorClock } from "./clock.js";

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;
/** The `userId` of messages the server originates. */
export const SERVER_USER_ID = "@server";
/** Kinds starting with this are kalphite's own bookkeeping, never data. */
export const RESERVED_KIND_PREFIX = "_kalphite_";
/** The server's default limit on a client frame (1 MiB). */
export const DEFAULT_MAX_FRAME_BYTES = 1 << 20;
/** The largest frame a server sends (64 MiB): a client accepts this much. */
export const MAX_SERVER_FRAME_BYTES = 64 << 20;
/** Frames nested deeper than this are malformed (the limit of the JSON decoders). */
export const MAX_JSON_DEPTH = 128;
/** The fields of an entity: it is closed. */
export const ENTITY_FIELDS = ["id", "type", "data", "updatedAt"] as const;

/** Milliseconds since the Unix epoch. */
export type Millis = number;
/** An application record as kalphite keeps it. */
export interface Entity<D = Record<string, unknown>> {
  /** Unique within its kind. */
  id: string;
  /** The kind. */
  type: string;
  /** Application fields (a JSON object). */
  data: D;
  /** Last-write-wins time, ms (0 or absent: unset). */
  updatedAt?: Millis;
}
/** What a change does. */
export type Operation = "upsert" | "delete";

/** The fields every message carries. */
export interface Envelope<P> {
  messageId: string;
  userId: string;
  timestamp: Millis;
  payload: P;
}
/** `hello` payload. */
export interface HelloPayload {
  protocolVersion: number;
  roomId: string;
  replicaId: string;
  lastVersion: number;
  token?: string;
  epoch?: string;
}
/** `welcome` payload. */
export interface WelcomePayload {
  protocolVersion: number;
  roomId: string;
  roomVersion: number;
  catchUpFrom: number;
  epoch?: string;
  snapshot?: boolean;
  collectedThrough?: number;
  /** The highest counter of the joining replica in any clock the room holds. */
  replicaCounter?: number;
}
/** One state of one entity. */
export interface ChangePayload {
  operation: Operation;
  entityType: string;
  entityId: string;
  entity?: Entity<unknown>;
  vector: VectorClock;
  baseVersion?: number;
  roomVersion?: number;
}
/** A page of catch-up. */
export interface CatchUpPayload {
  fromVersion: number;
  toVersion: number;
  changes: ChangePayload[];
  complete: boolean;
}
/** An acknowledgement. */
export interface AckPayload {
  ackOf: string;
  version: number;
  result: ChangePayload;
}
/** Conflict strategies of the room. */
export type StrategyName = "last-write-wins" | "field-merge" | "manual" | "custom";
/** A conflict notice. */
export interface ConflictPayload {
  refersTo: string;
  strategy: StrategyName;
  yours: ChangePayload;
  theirs: ChangePayload;
  resolved: ChangePayload;
}
/** Error codes (a client accepts codes it does not know). */
export type ErrorCode =
  | "malformed_json"
  | "invalid_message"
  | "missing_field"
  | "unknown_type"
  | "oversized"
  | "unsupported_version"
  | "unauthorized"
  | "token_expired"
  | "forbidden"
  | "not_joined"
  | "already_joined"
  | "invalid_entity"
  | "rate_limited"
  | "storage_failed"
  | "internal"
  | "replica_taken"
  | "message_id_reused"
  | "invalid_clock"
  | "too_many_connections"
  | "unknown";
/** `error` payload. */
export interface ErrorPayload {
  code: ErrorCode;
  message: string;
  refersTo?: string;
}

const KNOWN_CODES: ReadonlySet<string> = new Set([
  "malformed_json", "invalid_message", "missing_field", "unknown_type", "oversized",
  "unsupported_version", "unauthorized", "token_expired", "forbidden", "not_joined",
  "already_joined", "invalid_entity", "rate_limited", "storage_failed", "internal",
  "replica_taken", "message_id_reused", "invalid_clock", "too_many_connections",
]);

/** True when resending the same message later may succeed (unknown codes are). */
export function isRetryable(code: ErrorCode): boolean {
  return (
    code === "rate_limited" ||
    code === "storage_failed" ||
    code === "internal" ||
    code === "too_many_connections" ||
    code === "unknown"
  );
}

/** Codes that refuse a hello: reconnecting with the same hello cannot help. */
export function refusesHello(code: ErrorCode): boolean {
  return (
    code === "unauthorized" ||
    code === "token_expired" ||
    code === "forbidden" ||
    code === "unsupported_version" ||
    code === "replica_taken"
  );
}

/** Messages a client sends. */
export type ClientMessage =
  | ({ type: "hello" } & Envelope<HelloPayload>)
  | ({ type: "change" } & Envelope<ChangePayload>)
  | ({ type: "heartbeat" } & Envelope<Record<string, never>>);

/** Messages a server sends. */
export type ServerMessage =
  | ({ type: "welcome" } & Envelope<WelcomePayload>)
  | ({ type: "change" } & Envelope<ChangePayload>)
  | ({ type: "catchUp" } & Envelope<CatchUpPayload>)
  | ({ type: "ack" } & Envelope<AckPayload>)
  | ({ type: "conflict" } & Envelope<ConflictPayload>)
  | ({ type: "heartbeat" } & Envelope<Record<string, never>>)
  | ({ type: "error" } & Envelope<ErrorPayload>);

/** Why a frame is not a message; `code` is the wire code to answer with. */
export class ProtocolError extends Error {
  /** The wire error code. */
  readonly code: ErrorCode;
  /** The frame's `messageId`, when it could be read. */
  readonly refersTo: string | undefined;
  constructor(code: ErrorCode, message: string, refersTo?: string) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
    this.refersTo = refersTo;
  }
}

const CLIENT_TYPES = ["hello", "change", "heartbeat"] as const;
const SERVER_TYPES = ["welcome", "change", "catchUp", "ack", "conflict", "heartbeat", "error"] as const;

/** The UTF-8 length of a string, without encoding it. */
export function utf8Length(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n += 4;
        i++;
      } else n += 3;
    } else n += 3;
  }
  return n;
}

/** The deepest nesting of arrays and objects in a JSON text (strings skipped). */
function jsonDepth(text: string, limit: number): number {
  let depth = 0;
  let max = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i);
        if (d === 0x5c) i++;
        else if (d === 0x22) break;
      }
    } else if (c === 0x7b || c === 0x5b) {
      depth++;
      if (depth > max) {
        max = depth;
        if (max > limit) return max;
      }
    } else if (c === 0x7d || c === 0x5d) depth--;
  }
  return max;
}

function truncate(s: string, max: number): string {
  return s.length <= max ? s : `${s.slice(0, max)}…`;
}

function kindOf(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return "an object";
  if (typeof v === "string") return "a string";
  if (typeof v === "number") return "a number";
  return `a ${typeof v}`;
}

type Obj = Record<string, unknown>;

/** A shape check failed: `missing` names a missing field, else `reason` says what is wrong. */
class Shape extends Error {
  constructor(readonly reason: string, readonly missing?: string) {
    super(reason);
  }
}

function isObject(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function field(o: Obj, name: string, required: boolean): unknown {
  const v = o[name];
  if (v === undefined && required) throw new Shape(`missing field \`${name}\``, name);
  return v;
}

function str(o: Obj, name: string, required = true): string | undefined {
  const v = field(o, name, required);
  if (v === undefined || (v === null && !required)) return undefined;
  if (typeof v !== "string") throw new Shape(`'${name}' must be a string, not ${kindOf(v)}`);
  return v;
}

/** An unsigned integer JavaScript holds exactly (≤ 2^53−1); others are refused clearly. */
export function checkU64(v: unknown, what: string): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 0) {
    throw new Shape(`'${what}' must be an unsigned integer, not ${typeof v === "number" ? v : kindOf(v)}`);
  }
  if (v > Number.MAX_SAFE_INTEGER) {
    throw new Shape(
      `'${what}' is ${v}, above 2^53-1 (9007199254740991), the largest integer a JavaScript number holds exactly; this client cannot take it`,
    );
  }
  return v;
}

function u64(o: Obj, name: string, required = true, dflt = 0): number {
  const v = field(o, name, required);
  if (v === undefined || (v === null && !required)) return dflt;
  return checkU64(v, name);
}

function optU64(o: Obj, name: string): number | undefined {
  const v = o[name];
  if (v === undefined || v === null) return undefined;
  return checkU64(v, name);
}

function obj(o: Obj, name: string, required = true): Obj | undefined {
  const v = field(o, name, required);
  if (v === undefined || (v === null && !required)) return undefined;
  if (!isObject(v)) throw new Shape(`'${name}' must be an object, not ${kindOf(v)}`);
  return v;
}

function vectorOf(v: unknown): VectorClock {
  if (v === undefined || v === null) return {};
  if (!isObject(v)) throw new Shape(`'vector' must be an object, not ${kindOf(v)}`);
  const out: VectorClock = {};
  for (const key of Object.keys(v).sort()) {
    const n = checkU64(v[key], `vector.${truncate(key, 64)}`);
    if (n > 0) out[key] = n;
  }
  return out;
}

function entityOf(v: Obj): Entity<unknown> {
  const id = str(v, "id") as string;
  const type = str(v, "type") as string;
  const data = field(v, "data", true);
  const updatedAt = u64(v, "updatedAt", false);
  return { id, type, data, updatedAt };
}

function changeOf(v: unknown, name: string): ChangePayload {
  if (!isObject(v)) throw new Shape(`'${name}' must be an object, not ${kindOf(v)}`);
  const operation = str(v, "operation");
  if (operation !== "upsert" && operation !== "delete") {
    throw new Shape(`unknown operation '${truncate(String(operation), 64)}' (expected upsert or delete)`);
  }
  const out: ChangePayload = {
    operation,
    entityType: str(v, "entityType") as string,
    entityId: str(v, "entityId") as string,
    vector: vectorOf(v.vector),
  };
  const entity = obj(v, "entity", false);
  if (entity !== undefined) out.entity = entityOf(entity);
  const base = optU64(v, "baseVersion");
  if (base !== undefined) out.baseVersion = base;
  const room = optU64(v, "roomVersion");
  if (room !== undefined) out.roomVersion = room;
  return out;
}

/** The entity of a client change is closed: only id/type/data/updatedAt, data an object. */
function checkClientEntity(message: Obj): string | undefined {
  if (message.type !== "change") return undefined;
  const payload = message.payload;
  if (!isObject(payload)) return undefined;
  const entity = payload.entity;
  if (entity === undefined || entity === null) return undefined;
  if (!isObject(entity)) return `the entity is ${kindOf(entity)}, not an object`;
  const extra = Object.keys(entity).find((k) => !(ENTITY_FIELDS as readonly string[]).includes(k));
  if (extra !== undefined) {
    return `unknown field '${truncate(extra, 64)}' in the entity (an entity has only id, type, data and updatedAt; application fields go inside data)`;
  }
  if (entity.data !== undefined && !isObject(entity.data)) {
    return `its data must be a JSON object, not ${kindOf(entity.data)}`;
  }
  return undefined;
}

function payloadOf(type: string, p: Obj): unknown {
  switch (type) {
    case "hello": {
      const out: HelloPayload = {
        protocolVersion: u64(p, "protocolVersion"),
        roomId: str(p, "roomId") as string,
        replicaId: str(p, "replicaId") as string,
        lastVersion: u64(p, "lastVersion", false),
      };
      const token = str(p, "token", false);
      if (token !== undefined) out.token = token;
      const epoch = str(p, "epoch", false);
      if (epoch !== undefined) out.epoch = epoch;
      return out;
    }
    case "welcome": {
      const out: WelcomePayload = {
        protocolVersion: u64(p, "protocolVersion"),
        roomId: str(p, "roomId") as string,
        roomVersion: u64(p, "roomVersion"),
        catchUpFrom: u64(p, "catchUpFrom"),
      };
      const epoch = str(p, "epoch", false);
      if (epoch !== undefined) out.epoch = epoch;
      if (p.snapshot !== undefined && p.snapshot !== null) {
        if (typeof p.snapshot !== "boolean") throw new Shape(`'snapshot' must be a boolean`);
        if (p.snapshot) out.snapshot = true;
      }
      const collected = u64(p, "collectedThrough", false);
      if (collected > 0) out.collectedThrough = collected;
      const counter = u64(p, "replicaCounter", false);
      if (counter > 0) out.replicaCounter = counter;
      return out;
    }
    case "change":
      return changeOf(p, "payload");
    case "catchUp": {
      const changes = field(p, "changes", true);
      if (!Array.isArray(changes)) throw new Shape(`'changes' must be an array, not ${kindOf(changes)}`);
      const complete = field(p, "complete", true);
      if (typeof complete !== "boolean") throw new Shape(`'complete' must be a boolean`);
      return {
        fromVersion: u64(p, "fromVersion"),
        toVersion: u64(p, "toVersion"),
        changes: changes.map((c) => changeOf(c, "changes[]")),
        complete,
      } satisfies CatchUpPayload;
    }
    case "ack":
      return {
        ackOf: str(p, "ackOf") as string,
        version: u64(p, "version"),
        result: changeOf(field(p, "result", true), "result"),
      } satisfies AckPayload;
    case "conflict": {
      const strategy = str(p, "strategy") as string;
      if (!["last-write-wins", "field-merge", "manual", "custom"].includes(strategy)) {
        throw new Shape(`unknown strategy '${truncate(strategy, 64)}'`);
      }
      return {
        refersTo: str(p, "refersTo") as string,
        strategy: strategy as StrategyName,
        yours: changeOf(field(p, "yours", true), "yours"),
        theirs: changeOf(field(p, "theirs", true), "theirs"),
        resolved: changeOf(field(p, "resolved", true), "resolved"),
      } satisfies ConflictPayload;
    }
    case "heartbeat":
      return {};
    case "error": {
      const code = str(p, "code") as string;
      const out: ErrorPayload = {
        code: (KNOWN_CODES.has(code) ? code : "unknown") as ErrorCode,
        message: str(p, "message") as string,
      };
      const refersTo = str(p, "refersTo", false);
      if (refersTo !== undefined) out.refersTo = refersTo;
      return out;
    }
    default:
      throw new Shape(`unknown type ${type}`);
  }
}

function decode(
  text: string,
  maxBytes: number,
  types: readonly string[],
  closedEntity: boolean,
): Record<string, unknown> {
  if (text.length > maxBytes || utf8Length(text) > maxBytes) {
    const size = utf8Length(text);
    if (size > maxBytes) {
      throw new ProtocolError(
        "oversized",
        `frame of ${size} bytes is over the ${maxBytes}-byte limit; split the data or raise the limit`,
      );
    }
  }
  if (jsonDepth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) {
    throw new ProtocolError(
      "malformed_json",
      `frame is not valid JSON: nested deeper than ${MAX_JSON_DEPTH} levels`,
    );
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ProtocolError("malformed_json", `frame is not valid JSON: ${(e as Error).message}`);
  }
  const notAMessage = 'frame is not a message: expected a JSON object with a string "type"';
  if (!isObject(value)) throw new ProtocolError("invalid_message", notAMessage);
  const type = value.type;
  if (typeof type !== "string") throw new ProtocolError("invalid_message", notAMessage);
  const messageId = typeof value.messageId === "string" ? value.messageId : undefined;
  if (!types.includes(type)) {
    throw new ProtocolError(
      "unknown_type",
      `unknown message type '${truncate(type, 64)}' (expected one of: ${types.join(", ")})`,
      messageId,
    );
  }
  if (type === "heartbeat" && !("payload" in value)) value.payload = {};
  for (const name of ["messageId", "userId", "timestamp", "payload"]) {
    if (!(name in value)) {
      throw new ProtocolError(
        "missing_field",
        `'${type}' message is missing the required field '${name}'`,
        messageId,
      );
    }
  }
  if (closedEntity) {
    const reason = checkClientEntity(value);
    if (reason !== undefined) throw new ProtocolError("invalid_entity", `invalid entity: ${reason}`, messageId);
  }
  try {
    const envelopeId = str(value, "messageId") as string;
    const userId = str(value, "userId") as string;
    const timestamp = u64(value, "timestamp");
    const p = value.payload;
    if (!isObject(p)) throw new Shape(`'payload' must be an object, not ${kindOf(p)}`);
    return { type, messageId: envelopeId, userId, timestamp, payload: payloadOf(type, p) };
  } catch (e) {
    if (!(e instanceof Shape)) throw e;
    if (e.missing !== undefined) {
      throw new ProtocolError(
        "missing_field",
        `'${type}' message is missing the required field '${e.missing}'`,
        messageId,
      );
    }
    throw new ProtocolError("invalid_message", `invalid '${type}' message: ${e.reason}`, messageId);
  }
}

/** Decodes a frame from the server. Throws a [`ProtocolError`], never anything else. */
export function decodeServer(text: string, maxBytes = MAX_SERVER_FRAME_BYTES): ServerMessage {
  return decode(text, maxBytes, SERVER_TYPES, false) as unknown as ServerMessage;
}

/** Decodes a client frame (as the server does; for tests and tools). */
export function decodeClient(text: string, maxBytes = DEFAULT_MAX_FRAME_BYTES): ClientMessage {
  return decode(text, maxBytes, CLIENT_TYPES, true) as unknown as ClientMessage;
}

/** Encodes a message as one text frame, `type` and `messageId` first (so a server can name an oversized frame). */
export function encode(message: ClientMessage | ServerMessage): string {
  const { type, messageId, userId, timestamp, payload } = message;
  return JSON.stringify({ type, messageId, userId, timestamp, payload });
}
