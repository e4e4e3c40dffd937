/**
 * The client side of sync as a sans-IO state machine, a port of
 * `crates/kalphite-sync/src/replica.rs` with the same surface (`connect`, `localChange`,
 * `handle`, `tick`, `state`) and behaviour: local changes become outgoing messages
 * (vector clock, outbox of one entry per entity, resend until acknowledged), server
 * messages become changes to apply to the local store. It does no I/O and reads no
 * clock: every call takes `now`. Conflicts are resolved in the room, never here.
 */

import { type VectorClock, clockGet, incremented, only, withAtLeast } from "./clock.js";
import { ABSENT_HASH, contentHash } from "./hash.js";
import {
  type AckPayload,
  type ChangePayload,
  type ClientMessage,
  type ConflictPayload,
  type Entity,
  type ErrorCode,
  type ErrorPayload,
  type Envelope,
  type Millis,
  type Operation,
  type ServerMessage,
  PROTOCOL_VERSION,
  RESERVED_KIND_PREFIX,
  isRetryable,
} from "./protocol.js";

/** One entity's address. */
export interface EntityKey {
  kind: string;
  id: string;
}

/** The map key of an entity (kinds and ids never hold NUL: the room refuses it). */
export function keyString(kind: string, id: string): string {
  return `${kind}\u0000${id}`;
}

/** The entity key of a map key. */
export function parseKey(key: string): EntityKey {
  const at = key.indexOf("\u0000");
  return { kind: key.slice(0, at), id: key.slice(at + 1) };
}

/** Who this replica is and how it behaves. */
export interface ReplicaConfig {
  roomId: string;
  userId: string;
  /** This installation's id: stable across restarts, unique in the room. */
  replicaId: string;
  /** Random per process start: part of every message id, so ids never repeat even when the persisted counter was rolled back. */
  incarnation: number;
  /** Sent in the hello. */
  authToken?: string | undefined;
  /** How long to wait for an ack before resending (default 5000). */
  resendAfter?: Millis;
  /** Send a heartbeat after this long without sending (default 30000). */
  heartbeatInterval?: Millis;
  /** Most entities with unacknowledged changes (default 1000). */
  outboxLimit?: number;
}

/** What the server last said about an entity. */
export interface Known {
  version: number;
  vector: VectorClock;
  hash: number;
}

/** A server state held back while a local change of the entity is unacknowledged. */
export interface Held {
  version: number;
  state: Entity<unknown> | null;
}

/** The latest unacknowledged change of one entity. */
export interface OutboxEntry {
  message: Envelope<ChangePayload>;
  hash: number;
  held?: Held | undefined;
  /** Sequence number of the oldest local change folded into this entry. */
  firstSeq: number;
}

/** Everything a replica persists to resume after a restart. */
export interface ReplicaState {
  nextSeq: number;
  watermark: number;
  /** Versions received above the watermark (sorted). */
  receivedAbove: number[];
  known: Map<string, Known>;
  /** At most one entry per entity, oldest first (a Map keeps insertion order). */
  outbox: Map<string, OutboxEntry>;
  epoch?: string | undefined;
  /**
   * A resync began and its catch-up has not completed: the watermark and known versions
   * are its partial progress. The next hello asks from 0, so it is started again and finished.
   */
  resyncing?: boolean | undefined;
}

/** The scalar part of the state. */
export interface Progress {
  nextSeq: number;
  watermark: number;
  receivedAbove: number[];
  epoch?: string | undefined;
  /** Written with the watermark it qualifies; absent when false. */
  resyncing?: boolean | undefined;
}

/** What changed in the persistent state since the last `takeDelta`. */
export interface StateDelta {
  /** Outbox entries put (an entry) or removed (null), by map key. */
  outbox: Array<[string, OutboxEntry | null]>;
  known: Array<[string, Known]>;
  forgotten: string[];
  progress?: Progress | undefined;
}

/** A fresh empty state. */
export function emptyState(): ReplicaState {
  return { nextSeq: 0, watermark: 0, receivedAbove: [], known: new Map(), outbox: new Map() };
}

/** Applies a delta to a state (persisting deltas in order rebuilds the replica's state). */
export function applyDelta(state: ReplicaState, delta: StateDelta): void {
  let put = false;
  for (const [key, entry] of delta.outbox) {
    if (entry) {
      put = true;
      state.outbox.set(key, entry);
    } else state.outbox.delete(key);
  }
  if (put) {
    const sorted = [...state.outbox.entries()].sort((a, b) => a[1].firstSeq - b[1].firstSeq);
    state.outbox = new Map(sorted);
  }
  for (const key of delta.forgotten) state.known.delete(key);
  for (const [key, known] of delta.known) state.known.set(key, known);
  if (delta.progress) {
    state.nextSeq = delta.progress.nextSeq;
    state.watermark = delta.progress.watermark;
    state.receivedAbove = [...delta.progress.receivedAbove];
    state.epoch = delta.progress.epoch;
    state.resyncing = delta.progress.resyncing === true ? true : undefined;
  }
}

/** A change of the local store, made by the app. */
export interface LocalChange {
  operation: Operation;
  entityType: string;
  entityId: string;
  /** The whole entity, for upserts. */
  entity?: Entity<unknown> | undefined;
  /** When the edit was made (0: now). */
  timestamp: Millis;
}

/** A change the local store must apply, from the server. */
export interface RemoteChange {
  operation: Operation;
  entityType: string;
  entityId: string;
  entity?: Entity<unknown> | undefined;
  timestamp: Millis;
}

/** A local change the server does not have and will not get. */
export interface Undelivered {
  key: EntityKey;
  seq: number;
  code?: ErrorCode | undefined;
  reason: string;
}

/** Where the connection stands. */
export type LinkState = "disconnected" | "connecting" | "connected";

/** Something the app may want to know. */
export type ReplicaEvent =
  | { type: "connected"; roomVersion: number }
  | { type: "caughtUp"; version: number }
  | { type: "acked"; messageId: string; version: number }
  | { type: "conflict"; conflict: ConflictPayload }
  | { type: "rejected"; change: Envelope<ChangePayload>; code: ErrorCode; message: string }
  | { type: "resynced"; snapshot: boolean; resend: EntityKey[]; dropped: EntityKey[] }
  | { type: "serverError"; code: ErrorCode; message: string; refersTo?: string | undefined };

/** What handling a server message produced. */
export interface Output {
  send: ClientMessage[];
  apply: RemoteChange[];
  events: ReplicaEvent[];
}

/** A replica's refusal of a local change. */
export class ReplicaError extends Error {
  constructor(
    readonly kind: "outboxFull" | "missingEntity",
    message: string,
  ) {
    super(message);
    this.name = "ReplicaError";
  }
}

interface Dirty {
  outbox: Set<string>;
  known: Set<string>;
  forgotten: Set<string>;
  progress: boolean;
}

function newDirty(): Dirty {
  return { outbox: new Set(), known: new Set(), forgotten: new Set(), progress: false };
}

function cloneEntry(e: OutboxEntry): OutboxEntry {
  return {
    message: { ...e.message, payload: { ...e.message.payload } },
    hash: e.hash,
    held: e.held,
    firstSeq: e.firstSeq,
  };
}

/** The client sync state machine for one room. */
export class Replica {
  private readonly config: Required<Omit<ReplicaConfig, "authToken">> & { authToken?: string | undefined };
  private readonly st: ReplicaState;
  private readonly inFlight = new Map<string, { id: string; at: Millis }>();
  private linkState: LinkState = "disconnected";
  private lastSent: Millis = 0;
  private lastHeard: Millis = 0;
  private dirty: Dirty = newDirty();
  private helloFrom = 0;
  private readonly undelivered = new Map<string, Undelivered>();
  private resync: { snapshot: boolean } | undefined;
  private welcomeEpoch: string | undefined;
  /**
   * The lowest counter of this replica an edit of this incarnation may carry: above every
   * counter of ours the room has seen (a welcome's `replicaCounter`), so an edit is never
   * taken for one the room already has after a restart from an older state. Not persisted.
   */
  private counterFloor = 0;
  private horizon = 0;

  /** A replica resuming from `state` (a fresh one without). */
  constructor(config: ReplicaConfig, state: ReplicaState = emptyState()) {
    this.config = {
      resendAfter: 5_000,
      heartbeatInterval: 30_000,
      outboxLimit: 1_000,
      ...config,
    };
    this.st = state;
    let queued = 0;
    for (const e of state.outbox.values()) queued = Math.max(queued, e.firstSeq);
    this.st.nextSeq = Math.max(this.st.nextSeq, queued);
    this.restampForeignEntries();
  }

  /** Queued changes stamped by another replica id become edits of this one. */
  private restampForeignEntries(): void {
    const prefix = `${this.config.replicaId}-`;
    for (const [key, e] of this.st.outbox) {
      if (e.message.messageId.startsWith(prefix)) continue;
      const id = this.nextMessageId();
      const vector = incremented(this.st.known.get(key)?.vector ?? {}, this.config.replicaId);
      const entry = cloneEntry(e);
      entry.message.messageId = id;
      entry.message.userId = this.config.userId;
      entry.message.payload.vector = vector;
      this.st.outbox.set(key, entry);
      this.dirty.outbox.add(key);
    }
  }

  /** Sets the token sent in the next hello (after a refresh). */
  setAuthToken(token: string | undefined): void {
    this.config.authToken = token;
  }

  /** Local changes up to sequence number `upto` the server will not get, oldest first. */
  undeliveredThrough(upto: number): Undelivered[] {
    return [...this.undelivered.values()].filter((u) => u.seq <= upto).sort((a, b) => a.seq - b.seq);
  }

  /** Takes what changed in the persistent state since the last call. */
  takeDelta(): StateDelta {
    const dirty = this.dirty;
    this.dirty = newDirty();
    const delta: StateDelta = {
      outbox: [...dirty.outbox].map((k) => [k, this.st.outbox.get(k) ?? null]),
      known: [...dirty.known].flatMap((k): Array<[string, Known]> => {
        const known = this.st.known.get(k);
        return known ? [[k, { ...known }]] : [];
      }),
      forgotten: [...dirty.forgotten].filter((k) => !this.st.known.has(k)),
    };
    if (dirty.progress) delta.progress = this.progress();
    return delta;
  }

  private progress(): Progress {
    return {
      nextSeq: this.st.nextSeq,
      watermark: this.st.watermark,
      receivedAbove: [...this.st.receivedAbove],
      epoch: this.st.epoch,
      resyncing: this.st.resyncing === true ? true : undefined,
    };
  }

  /** The state to persist. Do not modify it. */
  state(): ReplicaState {
    return this.st;
  }

  /** Where the connection stands. */
  link(): LinkState {
    return this.linkState;
  }

  /** Entities with changes not yet acknowledged. */
  outboxLen(): number {
    return this.st.outbox.size;
  }

  /** The sequence number of the latest message built. */
  lastSeq(): number {
    return this.st.nextSeq;
  }

  /** Every local change with a sequence number ≤ this is durable on the server. */
  ackedThrough(): number {
    let min = Infinity;
    for (const e of this.st.outbox.values()) min = Math.min(min, e.firstSeq);
    return min === Infinity ? this.st.nextSeq : Math.max(0, min - 1);
  }

  /** Every room version up to this one has been received. */
  watermark(): number {
    return this.st.watermark;
  }

  /** ms since the server was last heard from. */
  silence(now: Millis): Millis {
    return Math.max(0, now - this.lastHeard);
  }

  /** A connection was opened: the hello to send first. */
  connect(now: Millis): ClientMessage {
    this.linkState = "connecting";
    this.lastHeard = now;
    // A resync cut short (a disconnect, a restart) starts again from 0: its pages moved
    // the watermark, but what the catch-up lacks is only known at its end.
    this.helloFrom = this.st.resyncing ? 0 : this.st.watermark;
    const payload: ClientMessage["payload"] & Record<string, unknown> = {
      protocolVersion: PROTOCOL_VERSION,
      roomId: this.config.roomId,
      replicaId: this.config.replicaId,
      lastVersion: this.helloFrom,
    };
    if (this.config.authToken !== undefined) payload.token = this.config.authToken;
    if (this.st.epoch !== undefined) payload.epoch = this.st.epoch;
    const messageId = this.nextMessageId();
    this.lastSent = now;
    return { type: "hello", messageId, userId: this.config.userId, timestamp: now, payload } as ClientMessage;
  }

  /** The connection is gone; every unacknowledged change is resent on the next. */
  disconnected(): void {
    this.linkState = "disconnected";
    this.inFlight.clear();
  }

  /**
   * Records a change the local store accepted; returns what to send now. Throws a
   * [`ReplicaError`] when the outbox is full (the change is not queued, and reported by
   * `undeliveredThrough`) or an upsert has no entity.
   */
  localChange(change: LocalChange, now: Millis): ClientMessage[] {
    try {
      return this.queueLocal(change, now);
    } catch (e) {
      if (!(e instanceof ReplicaError)) throw e;
      this.st.nextSeq += 1;
      this.dirty.progress = true;
      const key = keyString(change.entityType, change.entityId);
      this.undelivered.set(key, {
        key: { kind: change.entityType, id: change.entityId },
        seq: this.st.nextSeq,
        reason: e.message,
      });
      throw e;
    }
  }

  private queueLocal(change: LocalChange, now: Millis): ClientMessage[] {
    let entity: Entity<unknown> | undefined;
    if (change.operation === "upsert") {
      if (!change.entity) {
        throw new ReplicaError("missingEntity", `upsert of ${change.entityType}/${change.entityId} carries no entity`);
      }
      entity = change.entity;
    }
    const key = keyString(change.entityType, change.entityId);
    const queued = this.st.outbox.get(key);
    if (!queued && this.st.outbox.size >= this.config.outboxLimit) {
      throw new ReplicaError(
        "outboxFull",
        `the offline queue is full (${this.config.outboxLimit} entities waiting for the server); reconnect to drain it`,
      );
    }
    const me = this.config.replicaId;
    const messageId = this.nextMessageId();
    const seq = this.st.nextSeq;
    let vector: VectorClock;
    let baseVersion: number | undefined;
    let held: Held | undefined;
    let firstSeq: number;
    if (queued) {
      vector = incremented(queued.message.payload.vector, me);
      baseVersion = queued.message.payload.baseVersion;
      held = queued.held;
      firstSeq = queued.firstSeq;
    } else {
      const known = this.st.known.get(key);
      vector = incremented(known?.vector ?? {}, me);
      baseVersion = known?.version ?? 0;
      firstSeq = seq;
    }
    vector = withAtLeast(vector, me, this.counterFloor);
    const payload: ChangePayload = {
      operation: change.operation,
      entityType: change.entityType,
      entityId: change.entityId,
    } as ChangePayload;
    if (entity) payload.entity = entity;
    payload.vector = vector;
    if (baseVersion !== undefined) payload.baseVersion = baseVersion;
    const timestamp = change.timestamp === 0 ? now : change.timestamp;
    const entry: OutboxEntry = {
      message: { messageId, userId: this.config.userId, timestamp, payload },
      hash: contentHash(entity),
      held,
      firstSeq,
    };
    this.st.outbox.set(key, entry);
    this.dirty.outbox.add(key);
    this.dirty.progress = true;
    const out: ClientMessage[] = [];
    if (this.linkState === "connected" && !this.inFlight.has(key)) {
      const m = this.sendEntry(key, now);
      if (m) out.push(m);
    }
    return out;
  }

  /** Handles one message from the server. */
  handle(message: ServerMessage, now: Millis): Output {
    this.lastHeard = now;
    const out: Output = { send: [], apply: [], events: [] };
    switch (message.type) {
      case "welcome": {
        if (this.linkState !== "connecting") return out;
        const w = message.payload;
        const otherEpoch = w.epoch !== undefined && this.st.epoch !== undefined && w.epoch !== this.st.epoch;
        const behind = w.catchUpFrom < this.helloFrom;
        const snapshot = w.snapshot === true;
        this.resync = undefined;
        this.horizon = w.collectedThrough ?? 0;
        // A resync an earlier connection did not finish is done again, whatever the welcome says.
        if (otherEpoch || behind || snapshot || this.st.resyncing) {
          const forgetClocks = otherEpoch || (behind && !snapshot);
          this.beginResync(w.catchUpFrom, forgetClocks, snapshot);
          this.welcomeEpoch = w.epoch;
        } else {
          if (w.epoch !== undefined && w.epoch !== this.st.epoch) {
            this.st.epoch = w.epoch;
            this.dirty.progress = true;
          }
          this.welcomeEpoch = undefined;
        }
        this.raiseCounterFloor(w.replicaCounter ?? 0);
        this.linkState = "connected";
        out.events.push({ type: "connected", roomVersion: w.roomVersion });
        for (const key of [...this.st.outbox.keys()]) {
          const m = this.sendEntry(key, now);
          if (m) out.send.push(m);
        }
        break;
      }
      case "catchUp": {
        const page = message.payload;
        for (const change of page.changes) {
          if (change.roomVersion !== undefined && this.keepsLocal(change)) {
            this.markReceived(change.roomVersion);
            continue;
          }
          const c = this.serverState(change, now);
          if (c) out.apply.push(c);
        }
        if (page.fromVersion <= this.st.watermark) {
          this.st.watermark = Math.max(this.st.watermark, page.toVersion);
          this.absorb();
          this.dirty.progress = true;
        }
        const complete = page.complete && this.st.watermark >= page.toVersion;
        if (complete && this.resync) {
          const resync = this.resync;
          this.resync = undefined;
          this.finishResync(resync, now, out);
          this.st.resyncing = undefined;
          this.dirty.progress = true;
          if (this.welcomeEpoch !== undefined) {
            this.st.epoch = this.welcomeEpoch;
            this.welcomeEpoch = undefined;
            this.dirty.progress = true;
          }
        }
        if (complete) this.forgetCollected();
        if (page.complete) out.events.push({ type: "caughtUp", version: this.st.watermark });
        break;
      }
      case "change": {
        const c = this.serverState(message.payload, now);
        if (c) out.apply.push(c);
        break;
      }
      case "ack":
        this.onAck(message.payload, now, out);
        break;
      case "conflict":
        out.events.push({ type: "conflict", conflict: message.payload });
        break;
      case "heartbeat":
        break;
      case "error":
        this.onError(message.payload, out, now);
        break;
    }
    return out;
  }

  private beginResync(from: number, forgetClocks: boolean, snapshot: boolean): void {
    this.st.watermark = from;
    this.st.receivedAbove = [];
    // Without a stored epoch, the versions taken in from here on must not pass for those of
    // whatever room the next connection finds: the empty epoch matches none.
    if (this.st.epoch === undefined) this.st.epoch = "";
    const me = this.config.replicaId;
    for (const [key, known] of this.st.known) {
      this.st.known.set(key, {
        version: 0,
        vector: forgetClocks ? only(known.vector, me) : known.vector,
        hash: known.hash,
      });
      this.dirty.known.add(key);
    }
    for (const [key, e] of this.st.outbox) {
      const entry = cloneEntry(e);
      entry.held = undefined;
      if (forgetClocks) {
        entry.message.payload.vector = only(entry.message.payload.vector, me);
        entry.message.payload.baseVersion = 0;
      }
      this.st.outbox.set(key, entry);
      this.dirty.outbox.add(key);
    }
    this.st.resyncing = true;
    this.dirty.progress = true;
    this.resync = { snapshot };
  }

  private finishResync(resync: { snapshot: boolean }, now: Millis, out: Output): void {
    const missing = [...this.st.known.entries()]
      .filter(([key, k]) => k.version === 0 && k.hash !== ABSENT_HASH && !this.st.outbox.has(key))
      .map(([key]) => key)
      .sort(compareKeys);
    const keys = missing.map(parseKey);
    if (resync.snapshot) {
      for (const key of missing) {
        this.knownMut(key).hash = ABSENT_HASH;
        out.apply.push(toChange(key, null, now));
      }
      out.events.push({ type: "resynced", snapshot: true, resend: [], dropped: keys });
    } else {
      out.events.push({ type: "resynced", snapshot: false, resend: keys, dropped: [] });
    }
  }

  private forgetCollected(): void {
    for (const [key, k] of [...this.st.known]) {
      if (k.hash === ABSENT_HASH && k.version <= this.horizon && !this.st.outbox.has(key)) {
        this.st.known.delete(key);
        this.dirty.known.delete(key);
        this.dirty.forgotten.add(key);
      }
    }
  }

  /**
   * Sends a local entity back to the room after a resync (a `resynced` event's
   * `resend`): queued like a local upsert with its own `updatedAt` as the edit's time.
   * Not bounded by the outbox limit.
   */
  resend(entity: Entity<unknown>, now: Millis): ClientMessage[] {
    const at = entity.updatedAt ? entity.updatedAt : now;
    const limit = this.config.outboxLimit;
    this.config.outboxLimit = Number.MAX_SAFE_INTEGER;
    try {
      return this.localChange(
        { operation: "upsert", entityType: entity.type, entityId: entity.id, entity, timestamp: at },
        now,
      );
    } finally {
      this.config.outboxLimit = limit;
    }
  }

  /** Resends changes unacknowledged for `resendAfter`, and a heartbeat after `heartbeatInterval` of silence. */
  tick(now: Millis): ClientMessage[] {
    const out: ClientMessage[] = [];
    if (this.linkState !== "connected") return out;
    const due = [...this.st.outbox.keys()].filter((key) => {
      const f = this.inFlight.get(key);
      return f === undefined || now - f.at >= this.config.resendAfter;
    });
    for (const key of due) {
      const m = this.sendEntry(key, now);
      if (m) out.push(m);
    }
    if (out.length === 0 && now - this.lastSent >= this.config.heartbeatInterval) {
      const messageId = this.nextMessageId();
      out.push({ type: "heartbeat", messageId, userId: this.config.userId, timestamp: now, payload: {} });
    }
    if (out.length > 0) this.lastSent = now;
    return out;
  }

  private onAck(ack: AckPayload, now: Millis, out: Output): void {
    const key = keyString(ack.result.entityType, ack.result.entityId);
    this.markReceived(ack.version);
    const resultVersion = ack.result.roomVersion ?? 0;
    const resultState = ack.result.entity ?? null;
    const c = this.serverState(ack.result, now);
    if (c) out.apply.push(c);
    const entry = this.st.outbox.get(key);
    if (entry && entry.message.messageId === ack.ackOf) {
      this.st.outbox.delete(key);
      this.dirty.outbox.add(key);
      this.undelivered.delete(key);
      const s = this.settle(key, entry, { version: resultVersion, state: resultState }, now);
      if (s) out.apply.push(s);
    } else {
      const m = this.releaseWaiting(key, ack.ackOf, now);
      if (m) out.send.push(m);
    }
    out.events.push({ type: "acked", messageId: ack.ackOf, version: ack.version });
  }

  private onError(e: ErrorPayload, out: Output, now: Millis): void {
    let refused: string | undefined;
    if (e.refersTo !== undefined) {
      for (const [key, entry] of this.st.outbox) {
        if (entry.message.messageId === e.refersTo) {
          refused = key;
          break;
        }
      }
    }
    if (refused !== undefined && !isRetryable(e.code)) {
      const entry = this.st.outbox.get(refused);
      if (entry) {
        this.st.outbox.delete(refused);
        this.dirty.outbox.add(refused);
        this.undelivered.set(refused, { key: parseKey(refused), seq: entry.firstSeq, code: e.code, reason: e.message });
        const s = this.settle(refused, entry, undefined, now);
        if (s) out.apply.push(s);
        out.events.push({ type: "rejected", change: entry.message, code: e.code, message: e.message });
      }
      return;
    }
    if (e.refersTo !== undefined) {
      for (const [key, f] of this.inFlight) {
        if (f.id === e.refersTo) {
          const m = this.releaseWaiting(key, e.refersTo, now);
          if (m) out.send.push(m);
          break;
        }
      }
    }
    out.events.push({ type: "serverError", code: e.code, message: e.message, refersTo: e.refersTo });
  }

  private sendEntry(key: string, now: Millis): ClientMessage | undefined {
    const entry = this.st.outbox.get(key);
    if (!entry) return undefined;
    this.inFlight.set(key, { id: entry.message.messageId, at: now });
    this.lastSent = now;
    return { type: "change", ...entry.message };
  }

  private releaseWaiting(key: string, messageId: string, now: Millis): ClientMessage | undefined {
    const f = this.inFlight.get(key);
    if (f === undefined || f.id !== messageId) return undefined;
    this.inFlight.delete(key);
    if (this.linkState !== "connected") return undefined;
    return this.sendEntry(key, now);
  }

  private serverState(change: ChangePayload, now: Millis): RemoteChange | undefined {
    const version = change.roomVersion;
    if (version === undefined) return undefined;
    this.markReceived(version);
    if (change.operation === "upsert" && !change.entity) return undefined;
    if (change.entityType.startsWith(RESERVED_KIND_PREFIX)) return undefined;
    const key = keyString(change.entityType, change.entityId);
    const hash = contentHash(change.entity);
    const known = this.knownMut(key);
    if (version <= known.version) return undefined;
    const previous = known.hash;
    known.version = version;
    known.vector = change.vector;
    known.hash = hash;
    const entry = this.st.outbox.get(key);
    if (entry) {
      const next = cloneEntry(entry);
      next.held = { version, state: change.entity ?? null };
      this.st.outbox.set(key, next);
      this.dirty.outbox.add(key);
      return undefined;
    }
    return previous !== hash ? toChange(key, change.entity ?? null, now) : undefined;
  }

  private keepsLocal(change: ChangePayload): boolean {
    if (!this.resync || this.resync.snapshot || (change.operation === "upsert" && !change.entity)) {
      return false;
    }
    const key = keyString(change.entityType, change.entityId);
    const hash = contentHash(change.entity);
    const k = this.st.known.get(key);
    return !this.st.outbox.has(key) && k !== undefined && k.version === 0 && k.hash !== ABSENT_HASH && k.hash !== hash;
  }

  private knownMut(key: string): Known {
    if (!this.dirty.known.has(key)) {
      this.dirty.known.add(key);
      this.dirty.forgotten.delete(key);
    }
    let k = this.st.known.get(key);
    if (!k) {
      k = { version: 0, vector: {}, hash: ABSENT_HASH };
      this.st.known.set(key, k);
    } else {
      // Known records may be shared with a delta handed out earlier: copy on write.
      k = { ...k };
      this.st.known.set(key, k);
    }
    return k;
  }

  private settle(
    key: string,
    entry: OutboxEntry,
    fallback: { version: number; state: Entity<unknown> | null } | undefined,
    now: Millis,
  ): RemoteChange | undefined {
    this.inFlight.delete(key);
    const known = this.knownMut(key);
    let newest: { state: Entity<unknown> | null } | undefined;
    if (entry.held) newest = { state: entry.held.state };
    else if (fallback && fallback.version >= known.version) newest = { state: fallback.state };
    if (!newest) {
      known.hash = entry.hash;
      return undefined;
    }
    known.hash = contentHash(newest.state);
    return known.hash !== entry.hash ? toChange(key, newest.state, now) : undefined;
  }

  private markReceived(version: number): void {
    if (version > this.st.watermark) {
      if (!this.st.receivedAbove.includes(version)) {
        this.st.receivedAbove.push(version);
        this.st.receivedAbove.sort((a, b) => a - b);
      }
      this.absorb();
      this.dirty.progress = true;
    }
  }

  private absorb(): void {
    const w = this.st.watermark;
    let above = this.st.receivedAbove.filter((v) => v > w);
    let i = 0;
    while (i < above.length && above[i] === this.st.watermark + 1) {
      this.st.watermark += 1;
      i++;
    }
    above = above.slice(i);
    this.st.receivedAbove = above;
  }

  /**
   * Takes in a welcome's `replicaCounter`: queued edits of this incarnation at or below it
   * were stamped from what the disk knew, older than what an earlier run sent; they are
   * restamped above it, keeping their message ids. Earlier incarnations' entries keep
   * their clocks (a newer edit of theirs the room has is the later one).
   */
  private raiseCounterFloor(roomCounter: number): void {
    const floor = roomCounter + 1;
    if (floor <= this.counterFloor) return;
    this.counterFloor = floor;
    const me = this.config.replicaId;
    const ours = `${me}-${this.config.incarnation.toString(16)}-`;
    for (const [key, entry] of this.st.outbox) {
      const vector = entry.message.payload.vector;
      if (!entry.message.messageId.startsWith(ours) || clockGet(vector, me) >= floor) continue;
      this.st.outbox.set(key, {
        ...entry,
        message: { ...entry.message, payload: { ...entry.message.payload, vector: withAtLeast(vector, me, floor) } },
      });
      this.dirty.outbox.add(key);
    }
  }

  private nextMessageId(): string {
    this.st.nextSeq += 1;
    this.dirty.progress = true;
    return `${this.config.replicaId}-${this.config.incarnation.toString(16)}-${this.st.nextSeq}`;
  }
}

function compareKeys(a: string, b: string): number {
  const x = parseKey(a);
  const y = parseKey(b);
  if (x.kind !== y.kind) return x.kind < y.kind ? -1 : 1;
  if (x.id !== y.id) return x.id < y.id ? -1 : 1;
  return 0;
}

function toChange(key: string, state: Entity<unknown> | null, now: Millis): RemoteChange {
  const { kind, id } = parseKey(key);
  if (state) {
    return {
      operation: "upsert",
      entityType: kind,
      entityId: id,
      entity: state,
      timestamp: state.updatedAt ? state.updatedAt : now,
    };
  }
  return { operation: "delete", entityType: kind, entityId: id, timestamp: now };
}

/** A random incarnation (53 bits) for this process. */
export function randomIncarnation(): number {
  const c = globalThis.crypto;
  if (c?.getRandomValues) {
    const a = new Uint32Array(2);
    c.getRandomValues(a);
    return (a[0]! & 0x1fffff) * 4294967296 + a[1]!;
  }
  return Math.floor(Math.random() * Number.MAX_SAFE_INTEGER);
}
