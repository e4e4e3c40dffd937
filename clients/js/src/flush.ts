/**
 * The flush engine (the seed's MemoryFlushEngine): local changes are collected per entity
 * (a newer change of the same entity replaces the pending one), debounced, and handed to
 * the flush target in batches. A failed batch is retried with exponential backoff; after
 * `maxRetries` failures in a row it stays queued (never dropped) and is retried on the
 * next change, the next `flush()` or `resumeFlush()`; the error is reported. Batches go
 * one at a time, except with `flushNow()` (a page going away), which hands what is
 * queued over at once even while a batch is in progress.
 */

import type { Entity, Millis } from "./protocol.js";

/** One local change to flush. */
export interface FlushChange {
  operation: "upsert" | "delete";
  entityId: string;
  entityType: string;
  entity?: Entity<unknown> | undefined;
  timestamp: Millis;
}

/** Persists (and syncs) a batch; rejects to have it retried. */
export type FlushTarget = (changes: FlushChange[]) => Promise<void>;

/** Timers, injectable for tests on fake time. */
export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** Flush engine configuration; defaults are the seed's. */
export interface FlushConfig {
  flushTarget: FlushTarget;
  /** Wait this long after the last change before flushing (default 100). */
  debounceMs?: number;
  /** Failures in a row before automatic retries stop until the next change (default 3). */
  maxRetries?: number;
  /** First retry delay, doubled each time (default 100). */
  baseRetryDelay?: number;
  /** Most changes per call of the target (default 100). */
  maxBatchSize?: number;
  /** When false, changes are only kept in memory (the target is never called). Default true. */
  enablePersistence?: boolean;
  /** Told about every failed batch. */
  onError?: (error: unknown, changes: FlushChange[], attempt: number) => void;
  timers?: Timers;
}

/** The engine's state, for debugging. */
export interface FlushState {
  pending: Map<string, FlushChange>;
  retryQueue: FlushChange[];
  isFlushInProgress: boolean;
  lastFlushTime: number;
}

const realTimers: Timers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
};

function keyOf(c: { entityType: string; entityId: string }): string {
  return `${c.entityType}\u0000${c.entityId}`;
}

/** Debounced, batched, retried flushing of local changes. */
export class MemoryFlushEngine {
  private readonly config: Required<Omit<FlushConfig, "onError" | "timers">>;
  private readonly onError: FlushConfig["onError"];
  private readonly timers: Timers;
  private readonly state: FlushState = {
    pending: new Map(),
    retryQueue: [],
    isFlushInProgress: false,
    lastFlushTime: 0,
  };
  private timer: unknown;
  private paused = false;
  private destroyed = false;
  private failures = 0;
  /** The batches the target is working on (more than one only after `flushNow`). */
  private running = new Set<Promise<void>>();
  private idleWaiters: Array<() => void> = [];
  /** The keys of the batches the target is working on, with how many batches hold each. */
  private inBatch = new Map<string, number>();
  /** Per entity, its newest change not yet handed over successfully: a failed batch puts back only these. */
  private latest = new Map<string, FlushChange>();

  constructor(config: FlushConfig) {
    this.config = {
      debounceMs: 100,
      maxRetries: 3,
      baseRetryDelay: 100,
      maxBatchSize: 100,
      enablePersistence: true,
      ...config,
    };
    this.onError = config.onError;
    this.timers = config.timers ?? realTimers;
  }

  /** Queues an upsert of `entity`. */
  scheduleFlush(entityId: string, entity: Entity<unknown>, timestamp: Millis = Date.now()): void {
    this.schedule({ operation: "upsert", entityId, entityType: entity.type, entity, timestamp });
  }

  /** Queues a delete. */
  scheduleDelete(entityId: string, entityType: string, timestamp: Millis = Date.now()): void {
    this.schedule({ operation: "delete", entityId, entityType, timestamp });
  }

  /** Queues any change (a newer change of the same entity replaces the pending one). */
  schedule(change: FlushChange): void {
    if (this.destroyed) throw new Error("the flush engine was destroyed");
    if (!this.config.enablePersistence) return;
    const key = keyOf(change);
    // Re-inserting moves the entity to the end: batches keep the order of last edits.
    this.state.pending.delete(key);
    this.state.pending.set(key, change);
    this.latest.set(key, change);
    this.failures = 0;
    this.arm(this.config.debounceMs);
  }

  /**
   * Flushes everything queued now; resolves once it is all handed to the target
   * successfully, rejects with the target's error (the changes stay queued).
   */
  async flush(): Promise<void> {
    this.disarm();
    while (this.running.size > 0) await Promise.allSettled([...this.running]);
    if (this.state.pending.size === 0) return;
    await this.start();
    // More may have been queued while the batch ran, or the batch was split.
    if (this.state.pending.size > 0 && !this.paused) return this.flush();
  }

  /**
   * Hands everything queued to the target now, in batches called one after the other
   * without waiting, even while a batch is in progress: for a page being hidden or
   * unloaded, whose pending promises may never settle. The target gets overlapping calls
   * and must apply them in the order it is called. Resolves or rejects like `flush`.
   */
  async flushNow(): Promise<void> {
    this.disarm();
    const runs: Promise<void>[] = [];
    while (this.state.pending.size > 0) runs.push(this.start());
    await Promise.all(runs);
  }

  private disarm(): void {
    if (this.timer === undefined) return;
    this.timers.clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Takes a batch off the queue and hands it to the target. */
  private start(): Promise<void> {
    const run = this.runOnce();
    this.running.add(run);
    this.state.isFlushInProgress = true;
    const settled = () => {
      this.running.delete(run);
      this.state.isFlushInProgress = this.running.size > 0;
      this.wakeIdle();
    };
    run.then(settled, settled);
    return run;
  }

  private async runOnce(): Promise<void> {
    const batch: FlushChange[] = [];
    for (const [key, change] of this.state.pending) {
      if (batch.length >= this.config.maxBatchSize) break;
      batch.push(change);
      this.state.pending.delete(key);
      this.inBatch.set(key, (this.inBatch.get(key) ?? 0) + 1);
    }
    try {
      await this.config.flushTarget(batch);
      this.failures = 0;
      this.state.retryQueue = [];
      this.state.lastFlushTime = Date.now();
      for (const c of batch) if (this.latest.get(keyOf(c)) === c) this.latest.delete(keyOf(c));
    } catch (error) {
      this.failures += 1;
      // Put the batch back in front, unless a newer change of the same entity came
      // meanwhile (queued, or in a batch handed over after this one).
      const back = new Map<string, FlushChange>();
      for (const c of batch) if (this.latest.get(keyOf(c)) === c) back.set(keyOf(c), c);
      for (const [k, c] of this.state.pending) back.set(k, c);
      this.state.pending = back;
      this.state.retryQueue = batch;
      this.onError?.(error, batch, this.failures);
      if (this.failures < this.config.maxRetries) {
        this.arm(this.config.baseRetryDelay * 2 ** (this.failures - 1));
      }
      throw error;
    } finally {
      for (const c of batch) {
        const key = keyOf(c);
        const n = (this.inBatch.get(key) ?? 1) - 1;
        if (n > 0) this.inBatch.set(key, n);
        else this.inBatch.delete(key);
      }
    }
  }

  /** True while a change of this entity is queued or being flushed. */
  isQueued(entityType: string, entityId: string): boolean {
    const key = keyOf({ entityType, entityId });
    return this.state.pending.has(key) || this.inBatch.has(key);
  }

  private arm(ms: number): void {
    if (this.paused || this.destroyed) return;
    if (this.timer !== undefined) this.timers.clearTimeout(this.timer);
    this.timer = this.timers.setTimeout(() => {
      this.timer = undefined;
      this.flush().catch(() => undefined);
    }, ms);
  }

  /** Resolves when nothing is queued or running (or after a failure left changes queued). */
  whenIdle(): Promise<void> {
    if (this.state.pending.size === 0 && this.running.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private wakeIdle(): void {
    if (this.running.size > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  /** Every change not yet handed to the target successfully (pending, and the failed batch). */
  getQueuedChanges(): FlushChange[] {
    return [...this.state.pending.values()];
  }

  /** The engine's state (read only). */
  getState(): Readonly<FlushState> {
    return this.state;
  }

  /** Stops automatic flushing (changes keep queueing). */
  pauseFlush(): void {
    this.paused = true;
    this.disarm();
  }

  /** Restarts automatic flushing. */
  resumeFlush(): void {
    this.paused = false;
    if (this.state.pending.size > 0) this.arm(0);
  }

  /** Stops the timers; queued changes are kept (read them with `getQueuedChanges`). */
  destroy(): void {
    this.pauseFlush();
    this.destroyed = true;
  }
}
