/**
 * A content hash of an entity state, stable on one client (the replica only compares
 * hashes it made itself): a 53-bit hash of a canonical encoding (object keys sorted).
 */

import type { Entity } from "./protocol.js";

/** The hash of "no entity" (deleted, or never seen). */
export const ABSENT_HASH = 0;

/** JSON with object keys sorted, so equal values encode equally. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== "object") return JSON.stringify(value) ?? "null";
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  const obj = value as Record<string, unknown>;
  const parts: string[] = [];
  for (const key of Object.keys(obj).sort()) {
    if (obj[key] === undefined) continue;
    parts.push(`${JSON.stringify(key)}:${canonicalJson(obj[key])}`);
  }
  return `{${parts.join(",")}}`;
}

/** cyrb53: a fast 53-bit string hash; never 0 for real input in practice, 1 is forced away from 0. */
function hash53(text: string): number {
  let h1 = 0xdeadbeef;
  let h2 = 0x41c6ce57;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 2654435761);
    h2 = Math.imul(h2 ^ c, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  const h = 4294967296 * (2097151 & h2) + (h1 >>> 0);
  return h === ABSENT_HASH ? 1 : h;
}

/** The hash of a state: kind, id, `updatedAt` and data, or [`ABSENT_HASH`] for none. */
export function contentHash(entity: Entity<unknown> | undefined | null): number {
  if (entity === undefined || entity === null) return ABSENT_HASH;
  return hash53(canonicalJson([entity.type, entity.id, entity.updatedAt ?? 0, entity.data]));
}
