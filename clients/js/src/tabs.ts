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

/** The defaults of this environment, or an error saying what is missing. */
export function defaultTabs(config: TabsConfig): { locks: LockManagerLike; channel: (name: string) => ChannelLike } {
  const g = globalThis as { navigator?: { locks?: LockManagerLike }; BroadcastChannel?: new (name: string) => ChannelLike };
  const locks = config.locks ?? g.navigator?.locks;
  const Channel = g.BroadcastChannel;
  const channel = config.channel ?? (Channel ? (name: string) => new Channel(name) : undefined);
  if (!locks || !channel) throw new Error("several tabs need Web Locks and BroadcastChannel (pass TabsConfig.locks / channel)");
  return { locks, channel };
}
