/**
 * FrontendDatabase: typed collections in memory, a flush engine that persists local
 * changes and hands them to the replica, storage (IndexedDB by default, where it
 * exists), and optional sync with a kalphite server. Every flush is one storage commit
 * holding the entities, the outbox and the replica state together; messages go out only
 * after that commit, and server states are applied and stored the same way before the
 * replica's answers are sent. Commits are issued in order without waiting for the
 * previous one to complete (storage applies them in that order), so that a page being
 * unloaded, which gets no more completion events, still issues its last one.
 */

import { TypedCollection } from "./collection.js";
import { Emitter } from "./events.js";
import { type FlushChange, MemoryFlushEngine } from "./flush.js";
import { type Commit, IndexedDbPersistence, MemoryPersistence, type Persistence } from "./persistence.js";
import type { ClientMessage, ConflictPayload, Entity, Millis } from "./protocol.js";
import { type LocalChange, type Output, type RemoteChange, ReplicaError, type StateDelta, keyString, parseKey } from "./replica.js";
import { type ConnectionStatus, NetworkSyncEngine, type SyncConfig, type SyncError, newReplicaId } from "./network.js";
import { type ChannelLike, type TabsConfig, selectTabs } from "./tabs.js";

/** A message between tabs (see `tabs.ts`). */
type TabMessage =
  | { t: "write"; from: string; seq: number; change: LocalChange }
  | { t: "stored"; to: string; seqs: number[]; states: Array<{ kind: string; id: string; entity: Entity<unknown> | null }> }
  | { t: "changed"; from: string; change: LocalChange | RemoteChange }
  | { t: "leader"; from: string; status: ConnectionStatus; pending: number }
  | { t: "status"; status: ConnectionStatus; pending: number }
  | { t: "hello"; from: string }
  | { t: "snapshot"; to: string; entities: Entity<unknown>[] }
  | { t: "flush" }
  | { t: "resolved"; arg: ConflictResolution }
  | { t: "event"; event: Shared; arg: unknown }
  | { t: "durable"; from: string; id: number }
  | { t: "durableDone"; to: string; id: number; error?: string | undefined };

/** The part of a window or document the database listens on (neither exists in Node). */
interface Listens {
  addEventListener(event: string, listener: () => void): void;
  removeEventListener(event: string, listener: () => void): void;
}

/** The leader's events every tab emits too. */
type Shared = "conflict" | "error";

/** A conflict settled by the user (`resolveConflict`), in whichever tab. */
export interface ConflictResolution {
  /** The conflict as it was emitted. */
  conflict: ConflictPayload;
  /** The version kept: one of the two, or data the app made of them. */
  keep: "yours" | "theirs" | "merged";
}

/** What a tab shows of the connection: the leader's. */
export interface SyncStatus {
  status: ConnectionStatus;
  /** Entities waiting for the server. */
  pending: number;
}

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
  /**
   * Several tabs on one database: one leader tab (elected with Web Locks) owns the
   * WebSocket and the outbox; the others send it their writes (BroadcastChannel) and
   * get every change. Leadership passes on when the leader closes. Default: on wherever
   * Web Locks and BroadcastChannel exist (browsers), off elsewhere (Node 20). `false`
   * opts out (only for a database no other tab or worker of the origin opens); `true`
   * or a `TabsConfig` throws when they are missing.
   */
  multiTab?: boolean | TabsConfig;
}

/** The database's events. */
export interface DatabaseEvents extends Record<string, unknown> {
  /** A change of any collection, local or remote. */
  change: { origin: "local" | "remote"; change: LocalChange | RemoteChange };
  /** Storage or sync trouble (changes are kept; see the message); in every tab. */
  error: SyncError | { code: "storage"; message: string };
  /** A conflict the room resolved on one of this installation's changes (manual: both versions to choose from); in every tab. */
  conflict: ConflictPayload;
  /** The connection status or the pending count changed; in every tab. */
  status: SyncStatus;
  /** A conflict was settled with `resolveConflict`, in this tab or another: drop it from view; in every tab. */
  conflictResolved: ConflictResolution;
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
  /**
   * Replica state changes not yet known to be stored, oldest first. Every commit carries
   * all of them (storing one again, in order, changes nothing), so that one a failed
   * commit lost is stored by the next.
   */
  private deltas: StateDelta[] = [];
  private meta: Record<string, unknown> | undefined;
  /** Commits issued and not yet completed. */
  private inFlight = new Set<Promise<void>>();
  private ready = false;
  /** This tab's role when several tabs share the database. */
  role: "leader" | "follower" | "single" = "single";
  private readonly tabId = Math.random().toString(36).slice(2);
  private channel: ChannelLike | undefined;
  private releaseLock: (() => void) | undefined;
  /** Stops listening for the page being hidden. */
  private unwatchHiding: (() => void) | undefined;
  private closed = false;
  private writeSeq = 0;
  /** Follower: writes sent to the leader and not yet stored by it. */
  private unconfirmed = new Map<number, LocalChange>();
  private confirmWaiters: Array<() => void> = [];
  private durableRequests = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private followerStatus: SyncStatus = { status: "disconnected", pending: 0 };
  private lastStatus: SyncStatus = { status: "disconnected", pending: 0 };
  /** Leader: follower writes waiting for their flush, by entity. */
  private waiting = new Map<string, Array<{ tab: string; seq: number }>>();

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
        this.share("error", {
          code: "storage",
          message: `flushing ${changes.length} change(s) failed (attempt ${attempt}; they stay queued): ${String(error)}`,
        }),
    });
  }

  /** Loads the stored entities and state, and connects when sync is configured. */
  async init(): Promise<void> {
    const loaded = await this.persistence.load();
    for (const e of loaded.entities) this.rawCollection(e.type).applyRemote({ operation: "upsert", entityType: e.type, entityId: e.id, entity: e, timestamp: e.updatedAt ?? 0 });
    this.watchHiding();
    const tabs = selectTabs(this.config.multiTab);
    if (tabs) return this.initTabs(loaded, tabs);
    await this.start(loaded);
  }

  /**
   * A page being hidden may never run another timer (a reload, a closed tab, a phone
   * that freezes a tab in the background): what waits for the debounce is stored at
   * once, when the page goes hidden (`visibilitychange`) and when it is unloaded
   * (`pagehide`). A follower has already sent its writes to the leader; it asks the
   * leader to store them now.
   */
  private watchHiding(): void {
    const g = globalThis as Partial<Listens> & { document?: Partial<Listens> & { visibilityState?: string } };
    const doc = g.document;
    const onVisibility = () => {
      if (doc?.visibilityState === "hidden") this.flushNow();
    };
    const onPageHide = () => this.flushNow();
    doc?.addEventListener?.("visibilitychange", onVisibility);
    g.addEventListener?.("pagehide", onPageHide);
    this.unwatchHiding = () => {
      doc?.removeEventListener?.("visibilitychange", onVisibility);
      g.removeEventListener?.("pagehide", onPageHide);
    };
  }

  /** Stores the debounced changes now (a follower asks the leader to). */
  private flushNow(): void {
    if (this.closed || !this.ready) return;
    if (this.role === "follower") this.post({ t: "flush" });
    else this.flushEngine.flushNow().catch(() => undefined);
  }

  /** Starts storing and syncing (a single tab, or the leader). */
  private async start(loaded: { replica: import("./replica.js").ReplicaState; meta: Record<string, unknown> }): Promise<void> {
    const sync = this.config.sync;
    if (sync) {
      let replicaId = sync.replicaId ?? (loaded.meta.replicaId as string | undefined);
      if (!replicaId) {
        replicaId = newReplicaId(sync.userId);
        this.meta = { replicaId };
      }
      this.sync = new NetworkSyncEngine({ ...sync, replicaId }, loaded.replica, (out) => this.absorb(out));
      // Attached to each engine this tab starts, so that listeners of the database keep
      // hearing after a handover made this tab the leader.
      this.sync.on("error", (e) => this.share("error", e));
      this.sync.on("conflict", (c) => this.share("conflict", c));
      this.sync.on("status", () => this.statusChanged());
      this.sync.on("ack", () => this.statusChanged());
      this.sync.on("rejected", () => this.statusChanged());
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
    if (this.role === "follower") {
      const seq = ++this.writeSeq;
      this.unconfirmed.set(seq, change);
      this.post({ t: "write", from: this.tabId, seq, change });
    } else {
      this.flushEngine.schedule(change as FlushChange);
      if (this.role === "leader") this.post({ t: "changed", from: this.tabId, change });
    }
    this.emit("change", { origin: "local", change });
  }

  /**
   * Settles a conflict the user was shown (the manual strategy) with the version they
   * keep: `"yours"` or `"theirs"` (a deleted version deletes), or data of the app's
   * making (a merge). The write's clock dominates both versions, so it wins everywhere.
   * Every tab of the database then emits `conflictResolved`, so that each drops the
   * conflict from view.
   */
  resolveConflict(conflict: ConflictPayload, keep: "yours" | "theirs" | Record<string, unknown>): void {
    const { entityType, entityId } = conflict.yours;
    const data = keep === "yours" ? conflict.yours.entity?.data : keep === "theirs" ? conflict.theirs.entity?.data : keep;
    const collection = this.collection(entityType);
    if (data) collection.upsert(entityId, data as Record<string, unknown>);
    else collection.delete(entityId);
    const arg: ConflictResolution = { conflict, keep: typeof keep === "string" ? keep : "merged" };
    this.emit("conflictResolved", arg);
    this.post({ t: "resolved", arg });
  }

  /** The connection status (a follower tab reports the leader's). */
  connectionStatus(): ConnectionStatus {
    if (this.role === "follower") return this.followerStatus.status;
    return this.sync?.getConnectionStatus() ?? "disconnected";
  }

  /** Entities waiting for the server (a follower tab reports the leader's count). */
  offlineQueueSize(): number {
    if (this.role === "follower") return this.followerStatus.pending;
    return this.sync?.getOfflineQueueSize() ?? 0;
  }

  private post(message: TabMessage): void {
    this.channel?.postMessage(message);
  }

  /** Emits an event of the leader's sync or storage here and in the other tabs. */
  private share<K extends Shared>(event: K, arg: DatabaseEvents[K]): void {
    this.emit(event, arg);
    if (this.role === "leader") this.post({ t: "event", event, arg });
  }

  /** Emits `status` when the status or the pending count moved; the leader tells the other tabs. */
  private statusChanged(force = false): void {
    const now = { status: this.connectionStatus(), pending: this.offlineQueueSize() };
    if (this.role === "leader" && (force || now.status !== this.lastStatus.status || now.pending !== this.lastStatus.pending)) {
      this.post({ t: "status", ...now });
    }
    if (now.status === this.lastStatus.status && now.pending === this.lastStatus.pending) return;
    this.lastStatus = now;
    this.emit("status", now);
  }

  private async initTabs(loaded: { replica: import("./replica.js").ReplicaState; meta: Record<string, unknown> }, tabs: Required<TabsConfig>): Promise<void> {
    const { locks, channel } = tabs;
    const name = `kalphite:${this.config.dbName}`;
    this.channel = channel(name);
    this.channel.onmessage = (ev) => this.onTabMessage(ev.data as TabMessage);
    this.role = "follower";
    this.ready = true;
    // A leader already there tells a new tab its status now rather than at its next change.
    this.post({ t: "hello", from: this.tabId });
    const held = new Promise<void>((resolve) => (this.releaseLock = resolve));
    const first = await new Promise<boolean>((resolve) => {
      void locks.request(name, { ifAvailable: true }, async (lock) => {
        resolve(lock !== null && lock !== undefined);
        if (lock) await held;
      });
    });
    if (first) {
      await this.lead(loaded);
      return;
    }
    void locks.request(name, {}, async () => {
      if (this.closed) return;
      await this.lead(await this.persistence.load());
      await held;
    });
  }

  /** This tab becomes the leader: it takes the stored state, syncs, and takes the other tabs' writes. */
  private async lead(loaded: { entities?: Entity<unknown>[]; replica: import("./replica.js").ReplicaState; meta: Record<string, unknown> }): Promise<void> {
    const mine = [...this.unconfirmed.values()];
    const queuedKeys = new Set(mine.map((c) => keyString(c.entityType, c.entityId)));
    for (const e of loaded.entities ?? []) {
      if (queuedKeys.has(keyString(e.type, e.id))) continue;
      this.rawCollection(e.type).applyRemote({ operation: "upsert", entityType: e.type, entityId: e.id, entity: e, timestamp: e.updatedAt ?? 0 });
    }
    this.role = "leader";
    this.unconfirmed.clear();
    for (const c of mine) this.flushEngine.schedule(c as FlushChange);
    this.wakeConfirmWaiters();
    for (const [id, r] of this.durableRequests) {
      this.durableRequests.delete(id);
      this.durable("server").then(r.resolve, r.reject);
    }
    await this.start(loaded);
    this.post({ t: "leader", from: this.tabId, status: this.connectionStatus(), pending: this.offlineQueueSize() });
  }

  private onTabMessage(m: TabMessage): void {
    if (this.closed) return;
    switch (m.t) {
      case "write": {
        if (this.role !== "leader") return;
        const key = keyString(m.change.entityType, m.change.entityId);
        this.rawCollection(m.change.entityType).applyRemote(m.change);
        const list = this.waiting.get(key) ?? [];
        list.push({ tab: m.from, seq: m.seq });
        this.waiting.set(key, list);
        this.flushEngine.schedule(m.change as FlushChange);
        this.emit("change", { origin: "local", change: m.change });
        this.post({ t: "changed", from: m.from, change: m.change });
        break;
      }
      case "changed": {
        if (this.role !== "follower" || m.from === this.tabId) return;
        if (this.isUnconfirmed(m.change.entityType, m.change.entityId)) return;
        this.rawCollection(m.change.entityType).applyRemote(m.change);
        this.emit("change", { origin: "remote", change: m.change });
        break;
      }
      case "stored": {
        if (m.to !== this.tabId) return;
        for (const seq of m.seqs) this.unconfirmed.delete(seq);
        for (const s of m.states) {
          if (this.isUnconfirmed(s.kind, s.id)) continue;
          const current = this.collections.get(s.kind)?.findById(s.id);
          if (s.entity && current !== s.entity) {
            this.rawCollection(s.kind).applyRemote({ operation: "upsert", entityType: s.kind, entityId: s.id, entity: s.entity, timestamp: 0 });
          } else if (!s.entity && current) {
            this.rawCollection(s.kind).applyRemote({ operation: "delete", entityType: s.kind, entityId: s.id, timestamp: 0 });
          }
        }
        this.wakeConfirmWaiters();
        break;
      }
      case "leader":
        if (this.role !== "follower") return;
        this.followerStatus = { status: m.status, pending: m.pending };
        this.statusChanged();
        // The new leader may not have what the old one had not stored yet: send it again.
        for (const [seq, change] of this.unconfirmed) this.post({ t: "write", from: this.tabId, seq, change });
        for (const id of this.durableRequests.keys()) this.post({ t: "durable", from: this.tabId, id });
        break;
      case "status":
        if (this.role !== "follower") return;
        this.followerStatus = { status: m.status, pending: m.pending };
        this.statusChanged();
        break;
      case "hello":
        if (this.role !== "leader") return;
        this.statusChanged(true);
        // What the new tab loaded may lack changes this tab holds but has not stored yet
        // (a tab reloaded right after its edit): it gets the entities as they are here.
        this.post({ t: "snapshot", to: m.from, entities: [...this.collections.values()].flatMap((c) => [...c] as Entity<unknown>[]) });
        break;
      case "snapshot":
        if (m.to !== this.tabId || this.role !== "follower") return;
        this.applySnapshot(m.entities);
        break;
      case "resolved":
        this.emit("conflictResolved", m.arg);
        break;
      case "flush":
        if (this.role === "leader") this.flushEngine.flushNow().catch(() => undefined);
        break;
      case "event":
        if (this.role === "follower") this.emit(m.event, m.arg as never);
        break;
      case "durable":
        if (this.role !== "leader") return;
        this.durable("server").then(
          () => this.post({ t: "durableDone", to: m.from, id: m.id }),
          (e: unknown) => this.post({ t: "durableDone", to: m.from, id: m.id, error: String(e) }),
        );
        break;
      case "durableDone": {
        if (m.to !== this.tabId) return;
        const r = this.durableRequests.get(m.id);
        this.durableRequests.delete(m.id);
        if (m.error === undefined) r?.resolve();
        else r?.reject(new Error(m.error));
        break;
      }
    }
  }

  /** Follower: takes the leader's entities (except those of its own writes not yet stored). */
  private applySnapshot(entities: Entity<unknown>[]): void {
    const seen = new Set<string>();
    for (const e of entities) {
      seen.add(keyString(e.type, e.id));
      if (this.isUnconfirmed(e.type, e.id)) continue;
      const current = this.collections.get(e.type)?.findById(e.id);
      if (current && JSON.stringify(current) === JSON.stringify(e)) continue;
      const change: RemoteChange = { operation: "upsert", entityType: e.type, entityId: e.id, entity: e, timestamp: e.updatedAt ?? 0 };
      this.rawCollection(e.type).applyRemote(change);
      this.emit("change", { origin: "remote", change });
    }
    for (const [kind, c] of this.collections) {
      for (const e of [...c]) {
        if (seen.has(keyString(kind, e.id)) || this.isUnconfirmed(kind, e.id)) continue;
        const change: RemoteChange = { operation: "delete", entityType: kind, entityId: e.id, timestamp: 0 };
        c.applyRemote(change);
        this.emit("change", { origin: "remote", change });
      }
    }
  }

  private isUnconfirmed(kind: string, id: string): boolean {
    for (const c of this.unconfirmed.values()) if (c.entityType === kind && c.entityId === id) return true;
    return false;
  }

  private wakeConfirmWaiters(): void {
    const waiters = this.confirmWaiters;
    this.confirmWaiters = [];
    for (const w of waiters) w();
  }

  /** Follower: resolves once the leader stored every write up to `seq`. */
  private async confirmed(seq: number): Promise<void> {
    while ([...this.unconfirmed.keys()].some((s) => s <= seq)) {
      await new Promise<void>((resolve) => this.confirmWaiters.push(resolve));
    }
  }

  /** Leader: tells the tabs whose writes a commit stored, with the entities as they are now. */
  private confirmStored(taken: Map<string, Array<{ tab: string; seq: number }>>): void {
    const byTab = new Map<string, { seqs: number[]; states: Array<{ kind: string; id: string; entity: Entity<unknown> | null }> }>();
    for (const [key, list] of taken) {
      const { kind, id } = parseKey(key);
      const entity = (this.collections.get(kind)?.findById(id) as Entity<unknown> | undefined) ?? null;
      for (const w of list) {
        const entry = byTab.get(w.tab) ?? { seqs: [], states: [] };
        entry.seqs.push(w.seq);
        if (!entry.states.some((s) => s.kind === kind && s.id === id)) entry.states.push({ kind, id, entity });
        byTab.set(w.tab, entry);
      }
    }
    for (const [tab, e] of byTab) this.post({ t: "stored", to: tab, seqs: e.seqs, states: e.states });
  }

  /**
   * Resolves when every change made so far is stored locally (`'local'`), or also
   * acknowledged by the server (`'server'`; waits while offline). Rejects when storage
   * fails, or when the server refused one of them.
   */
  async durable(level: "local" | "server" = "local"): Promise<void> {
    if (this.role === "follower") {
      await this.confirmed(this.writeSeq);
      if (level === "server" && this.role === "follower") {
        const id = ++this.writeSeq;
        await new Promise<void>((resolve, reject) => {
          this.durableRequests.set(id, { resolve, reject });
          this.post({ t: "durable", from: this.tabId, id });
        });
        return;
      }
      if (this.role === "follower") return;
    }
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

  /**
   * Issues one commit of `entities` with every replica state change not yet stored (and
   * the metadata, when it changed); resolves once it is complete.
   */
  private store(entities: { put: Entity<unknown>[]; delete: Array<{ kind: string; id: string }> }): Promise<void> {
    const deltas = [...this.deltas];
    const meta = this.meta;
    const commit: Commit = { ...entities, deltas };
    if (meta) commit.meta = meta;
    const done = this.persistence.commit(commit).then(() => {
      const stored = new Set(deltas);
      this.deltas = this.deltas.filter((d) => !stored.has(d));
      if (this.meta === meta) this.meta = undefined;
    });
    this.inFlight.add(done);
    const settled = () => this.inFlight.delete(done);
    done.then(settled, settled);
    return done;
  }

  /** The flush target: hands the changes to the replica, stores them with its state in one commit, then sends. */
  private async flushChanges(changes: FlushChange[]): Promise<void> {
    // Taken now, before other tabs' later writes of the same entities can join the list.
    const taken = new Map<string, Array<{ tab: string; seq: number }>>();
    for (const c of changes) {
      const key = keyString(c.entityType, c.entityId);
      const list = this.waiting.get(key);
      if (list) taken.set(key, list);
      this.waiting.delete(key);
    }
    const send: ClientMessage[] = [];
    const replica = this.sync?.replica;
    if (replica) {
      for (const c of changes) {
        try {
          send.push(...replica.localChange(c, this.now()));
        } catch (e) {
          if (!(e instanceof ReplicaError)) throw e;
          this.share("error", { code: e.kind === "outboxFull" ? "outbox_full" : "storage", message: e.message });
        }
      }
      this.deltas.push(replica.takeDelta());
    }
    const entities: { put: Entity<unknown>[]; delete: Array<{ kind: string; id: string }> } = { put: [], delete: [] };
    for (const c of changes) {
      // Store what memory holds now (a later edit may have replaced it already).
      const current = this.collections.get(c.entityType)?.findById(c.entityId);
      if (current) entities.put.push(current as Entity<unknown>);
      else entities.delete.push({ kind: c.entityType, id: c.entityId });
    }
    try {
      await this.store(entities);
    } catch (e) {
      for (const [key, list] of taken) this.waiting.set(key, [...list, ...(this.waiting.get(key) ?? [])]);
      throw e;
    }
    this.sync?.send(send);
    this.confirmStored(taken);
    this.statusChanged();
  }

  /** A replica output: apply to memory, store with the replica's state, then let its messages go. */
  private async absorb(out: Output): Promise<ClientMessage[]> {
    const replica = this.sync!.replica;
    const touched = new Map<string, { kind: string; id: string }>();
    for (const c of out.apply) {
      // A local edit of the entity not yet handed to the replica wins in memory: the
      // replica queues it next, and shows the room's answer to it after its ack.
      if (this.flushEngine.isQueued(c.entityType, c.entityId)) continue;
      this.rawCollection(c.entityType).applyRemote(c);
      touched.set(keyString(c.entityType, c.entityId), { kind: c.entityType, id: c.entityId });
      this.emit("change", { origin: "remote", change: c });
      this.post({ t: "changed", from: this.tabId, change: c });
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
    const entities: { put: Entity<unknown>[]; delete: Array<{ kind: string; id: string }> } = { put: [], delete: [] };
    for (const k of touched.values()) {
      const current = this.collections.get(k.kind)?.findById(k.id);
      if (current) entities.put.push(current as Entity<unknown>);
      else entities.delete.push(k);
    }
    await this.store(entities);
    return extra;
  }

  /** Flushes what is pending, disconnects and closes storage. */
  async close(): Promise<void> {
    try {
      if (this.role === "follower") await this.confirmed(this.writeSeq);
      else await this.flushEngine.flush();
    } finally {
      this.closed = true;
      this.unwatchHiding?.();
      this.flushEngine.destroy();
      await this.sync?.disconnect();
      await Promise.allSettled([...this.inFlight]);
      this.statusChanged();
      this.channel?.close();
      this.channel = undefined;
      // Leadership passes to the next tab waiting for the lock.
      this.releaseLock?.();
      await this.persistence.close();
    }
  }
}
