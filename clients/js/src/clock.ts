/**
 * Vector clocks, as on the wire: `{"<replicaId>": counter}`. Missing replicas count as
 * 0 and zero entries are dropped. The same operations as `crates/kalphite-sync/src/clock.rs`.
 */

/** A vector clock: per replica id, how many of its edits the state includes. */
export type VectorClock = Record<string, number>;

/** How two clocks relate. */
export type Causality = "before" | "after" | "equal" | "concurrent";

/** The counter of `replica` (0 when absent). */
export function clockGet(clock: VectorClock, replica: string): number {
  return Object.prototype.hasOwnProperty.call(clock, replica) ? clock[replica] ?? 0 : 0;
}

/** A copy without zero entries, keys in sorted order (so encodings are stable). */
export function normalized(clock: VectorClock): VectorClock {
  const out: VectorClock = {};
  for (const key of Object.keys(clock).sort()) {
    const n = clock[key] ?? 0;
    if (n > 0) out[key] = n;
  }
  return out;
}

/** A copy with `replica`'s counter one higher. */
export function incremented(clock: VectorClock, replica: string): VectorClock {
  const next = { ...clock };
  next[replica] = clockGet(clock, replica) + 1;
  return normalized(next);
}

/** A copy with `replica`'s counter raised to at least `counter`. */
export function withAtLeast(clock: VectorClock, replica: string, counter: number): VectorClock {
  if (clockGet(clock, replica) >= counter) return clock;
  return normalized({ ...clock, [replica]: counter });
}

/** A clock holding only `replica`'s counter. */
export function only(clock: VectorClock, replica: string): VectorClock {
  const n = clockGet(clock, replica);
  return n > 0 ? { [replica]: n } : {};
}

/** The pointwise maximum of two clocks. */
export function merged(a: VectorClock, b: VectorClock): VectorClock {
  const out: VectorClock = { ...a };
  for (const [replica, n] of Object.entries(b)) {
    if (n > clockGet(out, replica)) out[replica] = n;
  }
  return normalized(out);
}

/** How `a` relates to `b`: before (every counter ≤, one <), after, equal or concurrent. */
export function compare(a: VectorClock, b: VectorClock): Causality {
  let less = false;
  let greater = false;
  for (const replica of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const x = clockGet(a, replica);
    const y = clockGet(b, replica);
    if (x < y) less = true;
    else if (x > y) greater = true;
    if (less && greater) return "concurrent";
  }
  if (less) return "before";
  if (greater) return "after";
  return "equal";
}

/** True when `a` includes every edit `b` does (after or equal). */
export function dominates(a: VectorClock, b: VectorClock): boolean {
  const c = compare(a, b);
  return c === "after" || c === "equal";
}

/** True when every counter is 0. */
export function isEmpty(clock: VectorClock): boolean {
  return Object.values(clock).every((n) => n === 0);
}
