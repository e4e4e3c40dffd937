/**
 * FrontendDatabase: typed collections in memory, a flush engine that persists local
 * changes and hands them to the replica, storage (IndexedDB by default, where it
 * exists), and optional sync with a kalphite server. Every flush is one storage commit
 * holding the entities, the outbox and the replica state together; messages go out only
 * after that commit, and server states are applied and stored the same way before the
 * replica's answers are sent.
 */

import { TypedCollection } from "./collection.js";
import { Emitter } from "./events.js";
import { type FlushChange, MemoryFlushEngine } from "./flush.js";
import { type Commit, IndexedDbPersistence, MemoryPersistence, type Persistence } from "./persistence.js";
import type { ClientMessage, Entity, Millis } from "./protocol.js";
import { type LocalChange, type Output, type RemoteChange, ReplicaError, type StateDelta, keyString } from "./replica.js";
import { NetworkSyncEngine, type SyncConfig, type SyncError, newReplicaId } from "./network.js";

/** Database configuration. */
export interface DatabaseConfig {
  /** The IndexedDB database name. */
  dbName: string;
  /** Storage: default IndexedDB when the global `indexedDB` exists, else memory. */
  persistence?: Persistence;
  /** Sync with a server (omit to work locally only). */
  sync?: SyncConfig;
  /** Flush engine timings (the seed's defaults: debounce 100 ms, 3 retries from 100 ms, batches of 100). */
  flush?: { debounceMs?: number; maxRetries?: number; baseRetryDelay?: number; maxBatchSize?: number };
  /** The clock (tests). */
  now?: () => Millis;
}

/** The database's events. */
export interface DatabaseEvents extends Record<string, unknown> {
  /** A change of any collection, local or remote. */
  change: { origin: "local" | "remote"; change: LocalChange | RemoteChange };
  /** Storage or sync trouble (changes are kept; see the message). */
  error: SyncError | { code: "storage"; message: string };
}

/** The browser/Node local-first database. */
export class FrontendDatabase extends Emitter<DatabaseEvents> {
  private readonly config: DatabaseConfig;
  private readonly persistence: Persistence;
  private readonly collections = new Map<string, TypedCollection<unknown>>();
  private readonly flushEngine: MemoryFlushEngine;
  private readonly now: () => Millis;
  /** The sync engine, when configured (after `init`). */
  sync: NetworkSyncEngine | undefined;
  private deltas: StateDelta[] = [];
  private meta: Record<string, unknown> | undefined;
  private storageQueue: Promise<void> = Promise.resolve();
  private ready = false;

  constructor(config: DatabaseConfig) {
    super();
    this.config = config;
    this.now = config.now ?? Date.now;
    this.persistence =
      config.persistence ??
      ((globalThis as { indexedDB?: IDBFactory }).indexedDB ? new IndexedDbPersistence(config.dbName) : new MemoryPersistence());
    this.flushEngine = new MemoryFlushEngine({
      flushTarget: (changes) => this.flushChanges(changes),
      ...(config.flush ?? {}),
      onError: (error, changes, attempt) =>
        this.emit("error", {
          code: "storage",
          message: `flushing ${changes.length} change(s) failed (attempt ${attempt}; they stay queued): ${String(error)}`,
        }),
    });
  }

  /** Loads the stored entities and state, and connects when sync is configured. */
  async init(): Promise<void> {
    const loaded = await this.persistence.load();
    for (const e of loaded.entities) this.rawCollection(e.type).applyRemote({ operation: "upsert", entityType: e.type, entityId: e.id, entity: e, timestamp: e.updatedAt ?? 0 });
    const sync = this.config.sync;
    if (sync) {
      let replicaId = sync.replicaId ?? (loaded.meta.replicaId as string | undefined);
      if (!replicaId) {
        replicaId = newReplicaId(sync.userId);
        this.meta = { replicaId };
      }
      this.sync = new NetworkSyncEngine({ ...sync, replicaId }, loaded.replica, (out) => this.absorb(out));
      this.sync.on("error", (e) => this.emit("error", e));
      this.ready = true;
      await this.sync.connect();
    } else {
      this.ready = true;
    }
  }

  /** The collection of `kind` (created empty on first use). */
  collection<D = Record<string, unknown>>(kind: string): TypedCollection<D> {
    return this.rawCollection(kind) as unknown as TypedCollection<D>;
  }

  private rawCollection(kind: string): TypedCollection<unknown> {
    let c = this.collections.get(kind);
    if (!c) {
      c = TypedCollection.create<unknown>(kind, {
        localChange: (change) => this.local(change),
        now: this.now,
      });
      this.collections.set(kind, c);
    }
    return c;
  }

  private local(change: LocalChange): void {
    if (!this.ready) throw new Error("call init() before writing");
    this.flushEngine.schedule(change as FlushChange);
    this.emit("change", { origin: "local", change });
  }

  /**
   * Resolves when every change made so far is stored locally (`'local'`), or also
   * acknowledged by the server (`'server'`; waits while offline). Rejects when storage
   * fails, or when the server refused one of them.
   */
  async durable(level: "local" | "server" = "local"): Promise<void> {
    await this.flushEngine.flush();
    if (level === "server" && this.sync) {
      const target = this.sync.replica.lastSeq();
      await this.sync.waitForAcks();
      const refused = this.sync.replica.undeliveredThrough(target);
      if (refused.length > 0) {
        throw new Error(`the server refused ${refused.length} change(s): ${refused.map((u) => `${u.key.kind}/${u.key.id}: ${u.reason}`).join("; ")}`);
      }
    }
  }

  /** Changes not yet stored locally. */
  pendingFlushCount(): number {
    return this.flushEngine.getQueuedChanges().length;
  }

  /** Storage writes in order, one at a time. */
  private serial<T>(job: () => Promise<T>): Promise<T> {
    const run = this.storageQueue.then(job);
    this.storageQueue = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** The flush target: hands the changes to the replica, stores them with its state in one commit, then sends. */
  private flushChanges(changes: FlushChange[]): Promise<void> {
    return this.serial(async () => {
      const send: ClientMessage[] = [];
      const replica = this.sync?.replica;
      if (replica) {
        for (const c of changes) {
          try {
            send.push(...replica.localChange(c, this.now()));
          } catch (e) {
            if (!(e instanceof ReplicaError)) throw e;
            this.emit("error", { code: e.kind === "outboxFull" ? "outbox_full" : "storage", message: e.message });
          }
        }
        this.deltas.push(replica.takeDelta());
      }
      const commit: Commit = { put: [], delete: [], deltas: this.deltas };
      for (const c of changes) {
        // Store what memory holds now (a later edit may have replaced it already).
        const current = this.collections.get(c.entityType)?.findById(c.entityId);
        if (current) commit.put.push(current as Entity<unknown>);
        else commit.delete.push({ kind: c.entityType, id: c.entityId });
      }
      if (this.meta) commit.meta = this.meta;
      await this.persistence.commit(commit);
      this.deltas = [];
      this.meta = undefined;
      this.sync?.send(send);
    });
  }

  /** A replica output: apply to memory, store with the replica's state, then let its messages go. */
  private absorb(out: Output): Promise<ClientMessage[]> {
    return this.serial(async () => {
      const replica = this.sync!.replica;
      const touched = new Map<string, { kind: string; id: string }>();
      for (const c of out.apply) {
        // A local edit of the entity not yet handed to the replica wins in memory: the
        // replica queues it next, and shows the room's answer to it after its ack.
        if (this.flushEngine.isQueued(c.entityType, c.entityId)) continue;
        this.rawCollection(c.entityType).applyRemote(c);
        touched.set(keyString(c.entityType, c.entityId), { kind: c.entityType, id: c.entityId });
        this.emit("change", { origin: "remote", change: c });
      }
      const extra: ClientMessage[] = [];
      for (const event of out.events) {
        if (event.type !== "resynced") continue;
        for (const key of event.resend) {
          const entity = this.collections.get(key.kind)?.findById(key.id);
          if (entity) extra.push(...replica.resend(entity as Entity<unknown>, this.now()));
        }
      }
      this.deltas.push(replica.takeDelta());
      const commit: Commit = { put: [], delete: [], deltas: this.deltas };
      for (const k of touched.values()) {
        const current = this.collections.get(k.kind)?.findById(k.id);
        if (current) commit.put.push(current as Entity<unknown>);
        else commit.delete.push(k);
      }
      if (this.meta) commit.meta = this.meta;
      await this.persistence.commit(commit);
      this.deltas = [];
      this.meta = undefined;
      return extra;
    });
  }

  /** Flushes what is pending, disconnects and closes storage. */
  async close(): Promise<void> {
    try {
      await this.flushEngine.flush();
    } finally {
      this.flushEngine.destroy();
      await this.sync?.disconnect();
      await this.storageQueue;
      await this.persistence.close();
    }
  }
}
