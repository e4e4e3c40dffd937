/**
 * `@kalphite/client`: a local-first database for web apps and Node that syncs with a
 * kalphite server. See README.md.
 */

export * from "./clock.js";
export * from "./collection.js";
export * from "./database.js";
export * from "./events.js";
export * from "./flush.js";
export * from "./hash.js";
export * from "./network.js";
export * from "./persistence.js";
export * from "./protocol.js";
export * from "./replica.js";
export * from "./tabs.js";
