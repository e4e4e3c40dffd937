/**
 * NetworkSyncEngine: drives a [`Replica`] over a WebSocket (injectable: browsers have a
 * global one, Node 20 needs the `ws` package). It connects, says hello, feeds server
 * frames to the replica one at a time, ticks it (resends, heartbeats), treats a silent
 * connection as dead, and reconnects with exponential backoff and jitter. A refused
 * hello stops reconnecting, except `token_expired` with a token provider: it fetches a
 * new token and reconnects.
 */

import { Emitter } from "./events.js";
import { type ClientMessage, type ConflictPayload, type ErrorCode, MAX_SERVER_FRAME_BYTES, ProtocolError, decodeServer, encode, refusesHello } from "./protocol.js";
import { type LocalChange, type Output, Replica, type RemoteChange, type ReplicaState, randomIncarnation } from "./replica.js";

/** The WebSocket surface the engine uses (the browser's, or `ws`'s). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
}

/** A WebSocket constructor. */
export type WebSocketFactory = new (url: string) => WebSocketLike;

/** The seed's sync configuration, plus what a real client needs. */
export interface SyncConfig {
  /** `ws://host:port` (`/sync` is added when no path is given) or a full URL. */
  wsUrl: string;
  roomId: string;
  userId: string;
  /** A token, or an async provider called at every connection and after `token_expired`. */
  authToken?: string | (() => Promise<string>) | undefined;
  /** Reconnections in a row before giving up (default: unlimited). */
  reconnectAttempts?: number;
  /** Heartbeat after this long without sending, ms (default 30000); silence of twice that is a dead connection. */
  heartbeatInterval?: number;
  /** This installation's id (default: `<userId>-<16 hex digits>`, random). */
  replicaId?: string;
  /** The WebSocket class (default: the global `WebSocket`). */
  WebSocket?: WebSocketFactory;
  /** How long to wait for an ack before resending, ms (default 5000). */
  resendAfter?: number;
  /** Most entities with unacknowledged changes (default 1000). */
  outboxLimit?: number;
  /** First reconnect delay, ms (default 250), doubled up to `maxBackoff` (default 30000). */
  minBackoff?: number;
  maxBackoff?: number;
  /** The clock (tests). */
  now?: () => number;
}

/** Connection status, as the seed names it. */
export type ConnectionStatus = "connected" | "connecting" | "disconnected";

/** A problem the app should know about. */
export interface SyncError {
  code: ErrorCode | "protocol" | "transport" | "outbox_full" | "storage";
  message: string;
  refersTo?: string | undefined;
}

/** The engine's events. */
export interface SyncEvents extends Record<string, unknown> {
  /** `getConnectionStatus()` changed. */
  status: ConnectionStatus;
  connected: { roomVersion: number };
  disconnected: { code: number; reason: string; willReconnect: boolean };
  caughtUp: { version: number };
  remoteChange: RemoteChange;
  ack: { messageId: string; version: number };
  conflict: ConflictPayload;
  rejected: { messageId: string; entityType: string; entityId: string; code: ErrorCode; message: string };
  error: SyncError;
}

/** Takes a replica's output before its messages go out (to persist it); the default does nothing. */
export type OutputSink = (out: Output) => Promise<ClientMessage[] | void> | ClientMessage[] | void;

/** A random replica id for a new installation. */
export function newReplicaId(userId: string): string {
  let hex = "";
  const c = globalThis.crypto;
  const bytes = new Uint8Array(8);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 8; i++) bytes[i] = Math.floor(Math.random() * 256);
  for (const b of bytes) hex += b.toString(16).padStart(2, "0");
  return `${userId}-${hex}`;
}

/** The URL of the sync endpoint. */
export function syncUrl(wsUrl: string): string {
  const u = new URL(wsUrl);
  if (u.pathname === "" || u.pathname === "/") u.pathname = "/sync";
  return u.toString();
}

/** Drives one replica over WebSockets. */
export class NetworkSyncEngine extends Emitter<SyncEvents> {
  readonly replica: Replica;
  private readonly config: SyncConfig;
  private readonly now: () => number;
  private ws: WebSocketLike | undefined;
  private status: ConnectionStatus = "disconnected";
  private wanted = false;
  private attempts = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private tickTimer: ReturnType<typeof setInterval> | undefined;
  private queue: Promise<void> = Promise.resolve();
  private sink: OutputSink;
  private stopReason: string | undefined;
  private ackWaiters: Array<() => void> = [];

  constructor(config: SyncConfig, state?: ReplicaState, sink?: OutputSink) {
    super();
    this.config = config;
    this.now = config.now ?? Date.now;
    this.sink = sink ?? (() => undefined);
    this.replica = new Replica(
      {
        roomId: config.roomId,
        userId: config.userId,
        replicaId: config.replicaId ?? newReplicaId(config.userId),
        incarnation: randomIncarnation(),
        authToken: typeof config.authToken === "string" ? config.authToken : undefined,
        ...(config.heartbeatInterval !== undefined ? { heartbeatInterval: config.heartbeatInterval } : {}),
        ...(config.resendAfter !== undefined ? { resendAfter: config.resendAfter } : {}),
        ...(config.outboxLimit !== undefined ? { outboxLimit: config.outboxLimit } : {}),
      },
      state,
    );
  }

  /** Replaces the output sink (the database sets it). */
  setSink(sink: OutputSink): void {
    this.sink = sink;
  }

  /** Opens the connection (and keeps reconnecting until `disconnect`); resolves once the socket is opened or failed the first time. */
  async connect(): Promise<void> {
    this.wanted = true;
    this.stopReason = undefined;
    this.attempts = 0;
    if (!this.tickTimer) {
      const period = Math.min(1000, Math.max(10, (this.config.heartbeatInterval ?? 30_000) / 2));
      this.tickTimer = setInterval(() => this.tick(), period);
      (this.tickTimer as { unref?: () => void }).unref?.();
    }
    await this.open();
  }

  /** Closes the connection and stops reconnecting; queued changes stay in the outbox. */
  async disconnect(): Promise<void> {
    this.wanted = false;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    if (this.tickTimer) clearInterval(this.tickTimer);
    this.tickTimer = undefined;
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.onerror = null;
      try {
        ws.close(1000, "goodbye");
      } catch {
        // already closed
      }
    }
    this.replica.disconnected();
    this.setStatus("disconnected");
    await this.queue;
  }

  /** The seed's connection status. */
  getConnectionStatus(): ConnectionStatus {
    return this.status;
  }

  /** Entities with changes the server has not acknowledged. */
  getOfflineQueueSize(): number {
    return this.replica.outboxLen();
  }

  /** Why reconnecting stopped (a refused hello), if it did. */
  stoppedBecause(): string | undefined {
    return this.stopReason;
  }

  /** Queues a local change and sends it when connected (throws `ReplicaError` when the outbox is full). */
  sendChange(change: LocalChange): void {
    this.send(this.replica.localChange(change, this.now()));
  }

  /** Sends messages the replica built, if the socket is open (otherwise they wait in the outbox). */
  send(messages: ClientMessage[]): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return;
    for (const m of messages) {
      try {
        ws.send(encode(m));
      } catch (e) {
        this.emit("error", { code: "transport", message: `could not send: ${String(e)}` });
      }
    }
  }

  /** Resolves once every change queued so far is acknowledged or refused. */
  waitForAcks(): Promise<void> {
    const target = this.replica.lastSeq();
    return new Promise((resolve) => {
      const check = () => {
        if (this.replica.ackedThrough() >= target) {
          resolve();
          return true;
        }
        return false;
      };
      if (check()) return;
      const waiter = () => {
        if (!check()) this.ackWaiters.push(waiter);
      };
      this.ackWaiters.push(waiter);
    });
  }

  private setStatus(status: ConnectionStatus): void {
    if (status === this.status) return;
    this.status = status;
    this.emit("status", status);
  }

  private async open(): Promise<void> {
    if (!this.wanted || this.ws) return;
    const Ctor = this.config.WebSocket ?? (globalThis as { WebSocket?: WebSocketFactory }).WebSocket;
    if (!Ctor) throw new Error("no WebSocket: pass SyncConfig.WebSocket (in Node 20, the `ws` package)");
    let token: string | undefined;
    if (typeof this.config.authToken === "function") {
      try {
        token = await this.config.authToken();
      } catch (e) {
        this.emit("error", { code: "unauthorized", message: `the token provider failed: ${String(e)}` });
        this.scheduleReconnect();
        return;
      }
      this.replica.setAuthToken(token);
    }
    if (!this.wanted || this.ws) return;
    this.setStatus("connecting");
    let ws: WebSocketLike;
    try {
      ws = new Ctor(syncUrl(this.config.wsUrl));
    } catch (e) {
      this.emit("error", { code: "transport", message: `could not open ${this.config.wsUrl}: ${String(e)}` });
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    await new Promise<void>((resolve) => {
      ws.onopen = () => {
        resolve();
        const hello = this.replica.connect(this.now());
        ws.send(encode(hello));
      };
      ws.onmessage = (ev) => {
        const data = ev.data;
        const text = typeof data === "string" ? data : String(data);
        this.enqueue(text);
      };
      ws.onerror = () => {
        resolve();
      };
      ws.onclose = (ev) => {
        resolve();
        if (this.ws === ws) this.closed(ev.code, ev.reason);
      };
    });
  }

  private closed(code: number, reason: string): void {
    this.ws = undefined;
    this.replica.disconnected();
    this.setStatus("disconnected");
    const willReconnect = this.wanted && this.stopReason === undefined;
    this.emit("disconnected", { code, reason, willReconnect });
    if (willReconnect) this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (!this.wanted || this.reconnectTimer || this.stopReason !== undefined) return;
    const limit = this.config.reconnectAttempts ?? Infinity;
    if (this.attempts >= limit) {
      this.stopReason = `gave up after ${limit} reconnection attempts`;
      this.emit("error", { code: "transport", message: this.stopReason });
      return;
    }
    const min = this.config.minBackoff ?? 250;
    const max = this.config.maxBackoff ?? 30_000;
    const delay = backoff(this.attempts, min, max, Math.random());
    this.attempts += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      this.open().catch((e) => this.emit("error", { code: "transport", message: String(e) }));
    }, delay);
  }

  private enqueue(text: string): void {
    this.queue = this.queue.then(() => this.process(text)).catch((e) => {
      this.emit("error", { code: "storage", message: `handling a server message failed: ${String(e)}` });
    });
  }

  private async process(text: string): Promise<void> {
    let message;
    try {
      message = decodeServer(text, MAX_SERVER_FRAME_BYTES);
    } catch (e) {
      if (e instanceof ProtocolError) {
        this.emit("error", { code: "protocol", message: `a server frame was refused: ${e.message}` });
        return;
      }
      throw e;
    }
    const out = this.replica.handle(message, this.now());
    const extra = await this.sink(out);
    if (message.type === "welcome") {
      this.attempts = 0;
      this.setStatus("connected");
    }
    this.send([...out.send, ...(extra ?? [])]);
    if (message.type === "error" && refusesHello(message.payload.code) && this.replica.link() !== "connected") {
      await this.refused(message.payload.code, message.payload.message);
    } else if (message.type === "error" && message.payload.code === "token_expired") {
      await this.refused("token_expired", message.payload.message);
    }
    for (const event of out.events) {
      switch (event.type) {
        case "connected":
          this.emit("connected", { roomVersion: event.roomVersion });
          break;
        case "caughtUp":
          this.emit("caughtUp", { version: event.version });
          break;
        case "acked":
          this.emit("ack", { messageId: event.messageId, version: event.version });
          break;
        case "conflict":
          this.emit("conflict", event.conflict);
          break;
        case "rejected":
          this.emit("rejected", {
            messageId: event.change.messageId,
            entityType: event.change.payload.entityType,
            entityId: event.change.payload.entityId,
            code: event.code,
            message: event.message,
          });
          this.emit("error", { code: event.code, message: event.message, refersTo: event.change.messageId });
          break;
        case "serverError":
          this.emit("error", { code: event.code, message: event.message, refersTo: event.refersTo });
          break;
        case "resynced":
          break;
      }
    }
    for (const c of out.apply) this.emit("remoteChange", c);
    const waiters = this.ackWaiters;
    this.ackWaiters = [];
    for (const w of waiters) w();
  }

  /** A refused hello or an expired token: refresh the token when we can, else stop. */
  private async refused(code: ErrorCode, message: string): Promise<void> {
    if (code === "token_expired" && typeof this.config.authToken === "function") {
      // The server closes with 1008; the next connection asks the provider again.
      return;
    }
    this.stopReason = `${code}: ${message}`;
  }

  private tick(): void {
    const ws = this.ws;
    if (!ws || this.replica.link() !== "connected") return;
    const now = this.now();
    const interval = this.config.heartbeatInterval ?? 30_000;
    if (this.replica.silence(now) > 2 * interval + Math.min(5_000, interval)) {
      // A dead connection: nothing heard for two heartbeats.
      try {
        ws.close(4000, "no answer from the server");
      } catch {
        // already closing
      }
      this.ws = undefined;
      this.closed(1006, "no answer from the server");
      return;
    }
    this.send(this.replica.tick(now));
  }
}

/** The delay before reconnection attempt `attempt` (0-based): exponential, capped, with jitter in [50%, 100%]. */
export function backoff(attempt: number, min: number, max: number, random: number): number {
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + (ceiling / 2) * random);
}
