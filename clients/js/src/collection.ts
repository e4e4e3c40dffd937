/**
 * TypedCollection: one kind's entities in memory, read synchronously. Writes update
 * memory at once, notify subscribers and hand the change to the owner (the database's
 * flush engine), which persists and syncs it later.
 */

import type { Entity, Millis } from "./protocol.js";
import type { LocalChange, RemoteChange } from "./replica.js";

/** What a subscriber is told. */
export interface CollectionEvent<D> {
  /** Who made the change. */
  origin: "local" | "remote";
  operation: "upsert" | "delete";
  id: string;
  /** The entity after the change (absent for deletes). */
  entity?: Entity<D> | undefined;
}

/** Where a collection sends its local changes. */
export interface CollectionOwner {
  /** Records a local change (schedules its flush). */
  localChange(change: LocalChange): void;
  /** The clock for `updatedAt`. */
  now(): Millis;
}

/**
 * The entities of one kind, as an array kept in place (its elements are the current
 * entities, in insertion order) plus an index by id.
 */
export class TypedCollection<D = Record<string, unknown>> extends Array<Entity<D>> {
  // Array methods that build new arrays (map, filter, …) build plain arrays.
  static override get [Symbol.species](): ArrayConstructor {
    return Array;
  }

  #kind = "";
  #owner: CollectionOwner | undefined;
  #byId = new Map<string, Entity<D>>();
  #subscribers = new Set<(event: CollectionEvent<D>) => void>();

  /** Use `FrontendDatabase.collection(kind)`; a collection without an owner only lives in memory. */
  static create<D>(kind: string, owner?: CollectionOwner, entities: Iterable<Entity<D>> = []): TypedCollection<D> {
    const c = new TypedCollection<D>();
    c.#kind = kind;
    c.#owner = owner;
    for (const e of entities) {
      c.#byId.set(e.id, e);
      c.push(e);
    }
    return c;
  }

  /** The kind of every entity here. */
  get kind(): string {
    return this.#kind;
  }

  /** Writes the entity `id` with `data`; returns it as stored. */
  upsert(id: string, data: D): Entity<D> {
    if (typeof id !== "string" || id.length === 0) throw new TypeError("an entity id is a non-empty string");
    if (typeof data !== "object" || data === null || Array.isArray(data)) {
      throw new TypeError(`the data of ${this.#kind}/${id} must be a plain object`);
    }
    const now = this.#owner?.now() ?? Date.now();
    const entity: Entity<D> = { id, type: this.#kind, data: structuredClone(data), updatedAt: now };
    this.#put(entity);
    this.#emit({ origin: "local", operation: "upsert", id, entity });
    this.#owner?.localChange({ operation: "upsert", entityType: this.#kind, entityId: id, entity, timestamp: now });
    return entity;
  }

  /** Deletes the entity `id`; false when there was none. */
  delete(id: string): boolean {
    if (!this.#remove(id)) return false;
    const now = this.#owner?.now() ?? Date.now();
    this.#emit({ origin: "local", operation: "delete", id });
    this.#owner?.localChange({ operation: "delete", entityType: this.#kind, entityId: id, timestamp: now });
    return true;
  }

  /** The entity `id`, if present. */
  findById(id: string): Entity<D> | undefined {
    return this.#byId.get(id);
  }

  /** The entities matching `predicate`, as a plain array. */
  where(predicate: (entity: Entity<D>) => boolean): Entity<D>[] {
    return [...this.#byId.values()].filter(predicate);
  }

  /** The entities sorted by `key` (ascending; `desc` for descending), as a plain array. */
  orderBy(key: (entity: Entity<D>) => unknown, direction: "asc" | "desc" = "asc"): Entity<D>[] {
    const sign = direction === "desc" ? -1 : 1;
    return [...this.#byId.values()].sort((a, b) => {
      const x = key(a) as never;
      const y = key(b) as never;
      return x < y ? -sign : x > y ? sign : 0;
    });
  }

  /** Calls `listener` after every change; returns the unsubscribe function. */
  subscribe(listener: (event: CollectionEvent<D>) => void): () => void {
    this.#subscribers.add(listener);
    return () => this.#subscribers.delete(listener);
  }

  /** Applies a change from the server (no flush of its own: the database persists it). */
  applyRemote(change: RemoteChange): void {
    if (change.operation === "upsert" && change.entity) {
      const entity = change.entity as Entity<D>;
      this.#put(entity);
      this.#emit({ origin: "remote", operation: "upsert", id: entity.id, entity });
    } else if (this.#remove(change.entityId)) {
      this.#emit({ origin: "remote", operation: "delete", id: change.entityId });
    }
  }

  #put(entity: Entity<D>): void {
    const old = this.#byId.get(entity.id);
    this.#byId.set(entity.id, entity);
    if (old) {
      const at = this.indexOf(old);
      if (at >= 0) this[at] = entity;
      else this.push(entity);
    } else this.push(entity);
  }

  #remove(id: string): boolean {
    const old = this.#byId.get(id);
    if (!old) return false;
    this.#byId.delete(id);
    const at = this.indexOf(old);
    if (at >= 0) this.splice(at, 1);
    return true;
  }

  #emit(event: CollectionEvent<D>): void {
    for (const s of [...this.#subscribers]) {
      try {
        s(event);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}
