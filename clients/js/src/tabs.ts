/**
 * What several tabs of one origin share: a lock (Web Locks) that elects the one tab
 * owning the WebSocket and the outbox, and a channel (BroadcastChannel) over which the
 * other tabs send their writes to it and receive every change. Both are injectable (Node
 * 20 has BroadcastChannel but no Web Locks).
 */

/** The part of the Web Locks API used here. */
export interface LockManagerLike {
  request(name: string, options: { ifAvailable?: boolean }, callback: (lock: unknown) => Promise<unknown>): Promise<unknown>;
}

/** The part of BroadcastChannel used here. */
export interface ChannelLike {
  postMessage(message: unknown): void;
  close(): void;
  onmessage: ((ev: { data: unknown }) => void) | null;
}

/** How tabs find each other. */
export interface TabsConfig {
  /** Default: `navigator.locks`. */
  locks?: LockManagerLike;
  /** Default: `new BroadcastChannel(name)`. */
  channel?: (name: string) => ChannelLike;
}

/** Where the defaults come from (`globalThis`; tests pass their own). */
export interface TabsEnv {
  navigator?: { locks?: LockManagerLike };
  BroadcastChannel?: new (name: string) => ChannelLike;
}

/** Locks and channel, each from `config` or else from `env`, when both are found. */
function found(config: TabsConfig, env: TabsEnv): Required<TabsConfig> | undefined {
  const locks = config.locks ?? env.navigator?.locks;
  const Channel = env.BroadcastChannel;
  const channel = config.channel ?? (Channel ? (name: string) => new Channel(name) : undefined);
  return locks && channel ? { locks, channel } : undefined;
}

/**
 * The tabs machinery a database uses for its `multiTab` option, or `undefined` when it
 * syncs on its own. Without the option, tabs share one leader wherever Web Locks and
 * BroadcastChannel exist: two tabs each with their own WebSocket on one store and
 * replica id would send the same replica's messages twice. Where they are missing (Node
 * 20), there are no tabs to share with. `false` opts out; `true` (or a `TabsConfig`)
 * insists and throws when something is missing.
 */
export function selectTabs(option: boolean | TabsConfig | undefined, env: TabsEnv = globalThis as TabsEnv): Required<TabsConfig> | undefined {
  if (option === false) return undefined;
  const tabs = found(typeof option === "object" ? option : {}, env);
  if (tabs || option === undefined) return tabs;
  throw new Error("several tabs need Web Locks and BroadcastChannel (pass TabsConfig.locks / channel, or multiTab: false)");
}
