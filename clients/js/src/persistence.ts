/**
 * Where a database keeps its entities and its replica's state. One `commit` is one
 * atomic write of entity changes together with the replica's state changes (outbox,
 * known versions, progress), so what is stored always describes the stored data: the
 * same rule as the Rust client. Implementations: in memory, and IndexedDB (one
 * IndexedDB transaction per commit).
 */

import type { Entity } from "./protocol.js";
import { type Known, type OutboxEntry, type Progress, type ReplicaState, type StateDelta, applyDelta, emptyState, keyString } from "./replica.js";

/** One atomic write. */
export interface Commit {
  /** Entities written. */
  put: Entity<unknown>[];
  /** Entities deleted, by kind and id. */
  delete: Array<{ kind: string; id: string }>;
  /** Replica state changes, applied in order. */
  deltas: StateDelta[];
  /** Installation metadata (the replica id), when it changed. */
  meta?: Record<string, unknown>;
}

/** What a store holds at start. */
export interface Loaded {
  entities: Entity<unknown>[];
  replica: ReplicaState;
  meta: Record<string, unknown>;
}

/** A database's storage. */
export interface Persistence {
  load(): Promise<Loaded>;
  /**
   * Writes one commit atomically. A commit may be called before the previous one
   * completed: commits are applied in the order of the calls.
   */
  commit(commit: Commit): Promise<void>;
  close(): Promise<void>;
}

/** Keeps everything in memory (tests, or apps that need no persistence); a failing write can be simulated with `failNext`. */
export class MemoryPersistence implements Persistence {
  readonly entities = new Map<string, Entity<unknown>>();
  replica: ReplicaState = emptyState();
  meta: Record<string, unknown> = {};
  /** Commits made. */
  commits = 0;
  /** The next n commits fail (for tests of failure handling). */
  failNext = 0;

  async load(): Promise<Loaded> {
    return {
      entities: [...this.entities.values()],
      replica: cloneState(this.replica),
      meta: { ...this.meta },
    };
  }

  async commit(c: Commit): Promise<void> {
    if (this.failNext > 0) {
      this.failNext -= 1;
      throw new Error("simulated storage failure");
    }
    for (const e of c.put) this.entities.set(keyString(e.type, e.id), e);
    for (const k of c.delete) this.entities.delete(keyString(k.kind, k.id));
    for (const d of c.deltas) applyDelta(this.replica, d);
    if (c.meta) Object.assign(this.meta, c.meta);
    this.commits += 1;
  }

  async close(): Promise<void> {}
}

function cloneState(s: ReplicaState): ReplicaState {
  return {
    nextSeq: s.nextSeq,
    watermark: s.watermark,
    receivedAbove: [...s.receivedAbove],
    known: new Map(s.known),
    outbox: new Map(s.outbox),
    epoch: s.epoch,
  };
}

const STORES = ["entities", "known", "outbox", "meta"] as const;

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

/** A storage quota was exceeded: the app should free space. */
export class QuotaError extends Error {
  constructor(cause: unknown) {
    super(`the browser's storage quota is exceeded; free space or delete data (${String(cause)})`);
    this.name = "QuotaError";
  }
}

/**
 * IndexedDB storage: object stores `entities` (key `[type, id]`), `known` and `outbox`
 * (key: kind NUL id), `meta` (the replica's progress and the installation's metadata).
 */
export class IndexedDbPersistence implements Persistence {
  private db: Promise<IDBDatabase> | undefined;
  /** The metadata as stored, once loaded: a commit then writes it without reading first. */
  private storedMeta: Record<string, unknown> | undefined;

  /** `factory` defaults to the global `indexedDB`. */
  constructor(
    readonly name: string,
    private readonly factory: IDBFactory = globalThis.indexedDB,
  ) {
    if (!factory) throw new Error("IndexedDB is not available here; pass an IDBFactory or use MemoryPersistence");
  }

  /** The connection, opened once: commits called in order get their transactions created in that order. */
  private open(): Promise<IDBDatabase> {
    this.db ??= this.connect().catch((e: unknown) => {
      this.db = undefined;
      throw e;
    });
    return this.db;
  }

  private async connect(): Promise<IDBDatabase> {
    const r = this.factory.open(this.name, 1);
    r.onupgradeneeded = () => {
      const db = r.result;
      for (const store of STORES) if (!db.objectStoreNames.contains(store)) db.createObjectStore(store);
    };
    const db = await request(r);
    // Ask the browser not to evict our data under storage pressure (best effort).
    const storage = (globalThis as { navigator?: { storage?: { persist?: () => Promise<boolean> } } }).navigator?.storage;
    storage?.persist?.().catch(() => undefined);
    return db;
  }

  async load(): Promise<Loaded> {
    const db = await this.open();
    const tx = db.transaction([...STORES], "readonly");
    const [entities, knownKeys, knownValues, outboxKeys, outboxValues, progress, meta] = await Promise.all([
      request(tx.objectStore("entities").getAll()),
      request(tx.objectStore("known").getAllKeys()),
      request(tx.objectStore("known").getAll()),
      request(tx.objectStore("outbox").getAllKeys()),
      request(tx.objectStore("outbox").getAll()),
      request(tx.objectStore("meta").get("progress")),
      request(tx.objectStore("meta").get("meta")),
    ]);
    const replica = emptyState();
    knownKeys.forEach((k, i) => replica.known.set(k as string, knownValues[i] as Known));
    const outbox = outboxKeys.map((k, i) => [k as string, outboxValues[i] as OutboxEntry] as const);
    outbox.sort((a, b) => a[1].firstSeq - b[1].firstSeq);
    replica.outbox = new Map(outbox);
    const p = progress as Progress | undefined;
    if (p) {
      replica.nextSeq = p.nextSeq;
      replica.watermark = p.watermark;
      replica.receivedAbove = [...p.receivedAbove];
      replica.epoch = p.epoch;
      if (p.resyncing === true) replica.resyncing = true;
    }
    this.storedMeta = (meta as Record<string, unknown> | undefined) ?? {};
    return { entities: entities as Entity<unknown>[], replica, meta: { ...this.storedMeta } };
  }

  async commit(c: Commit): Promise<void> {
    const db = await this.open();
    const tx = db.transaction([...STORES], "readwrite");
    const done = new Promise<void>((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onabort = () => reject(isQuota(tx.error) ? new QuotaError(tx.error) : tx.error ?? new Error("IndexedDB transaction aborted"));
      tx.onerror = () => undefined;
    });
    try {
      const entities = tx.objectStore("entities");
      for (const e of c.put) entities.put(e, [e.type, e.id]);
      for (const k of c.delete) entities.delete([k.kind, k.id]);
      const known = tx.objectStore("known");
      const outbox = tx.objectStore("outbox");
      let progress: Progress | undefined;
      for (const d of c.deltas) {
        for (const [k, entry] of d.outbox) {
          if (entry) outbox.put(entry, k);
          else outbox.delete(k);
        }
        for (const k of d.forgotten) known.delete(k);
        for (const [k, v] of d.known) known.put(v, k);
        if (d.progress) progress = d.progress;
      }
      if (progress) tx.objectStore("meta").put(progress, "progress");
      if (c.meta) {
        const meta = tx.objectStore("meta");
        // Without a read when the stored metadata is known: every request of the commit is
        // then made before its first await, and it commits even if this page is unloading.
        const old = this.storedMeta ?? ((await request(meta.get("meta"))) as Record<string, unknown> | undefined);
        this.storedMeta = { ...(old ?? {}), ...c.meta };
        meta.put(this.storedMeta, "meta");
      }
      // Committed now rather than once the requests' results came back to this page: a
      // commit made while the page unloads must not wait for events it will never get.
      tx.commit?.();
    } catch (e) {
      // The transaction is abandoned: its own rejection is this error's echo.
      done.catch(() => undefined);
      try {
        tx.abort();
      } catch {
        // already finished
      }
      throw isQuota(e) ? new QuotaError(e) : e;
    }
    await done;
  }

  async close(): Promise<void> {
    const db = this.db;
    this.db = undefined;
    (await db?.catch(() => undefined))?.close();
  }
}

function isQuota(e: unknown): boolean {
  return typeof e === "object" && e !== null && (e as { name?: string }).name === "QuotaExceededError";
}
