/** A minimal typed event emitter (no dependency on Node's `events`, works in browsers). */

// biome-ignore lint: event maps are plain records of listener argument types.
export type EventMap = Record<string, unknown>;

/** Listeners by event name; a throwing listener does not stop the others. */
export class Emitter<E extends EventMap> {
  private readonly listeners = new Map<keyof E, Set<(arg: never) => void>>();

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof E>(event: K, listener: (arg: E[K]) => void): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as (arg: never) => void);
    return () => this.off(event, listener);
  }

  /** Removes a listener. */
  off<K extends keyof E>(event: K, listener: (arg: E[K]) => void): void {
    this.listeners.get(event)?.delete(listener as (arg: never) => void);
  }

  /** Calls every listener of `event`. */
  emit<K extends keyof E>(event: K, arg: E[K]): void {
    for (const listener of [...(this.listeners.get(event) ?? [])]) {
      try {
        (listener as (arg: E[K]) => void)(arg);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}
