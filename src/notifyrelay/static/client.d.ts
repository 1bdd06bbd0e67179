// TypeScript declarations for the notifyrelay browser client (client.js). docs/clients.md documents the behaviour.

/** Progress figures the relay computes for a key of a channel with [channels.progress]. */
export interface Progress {
  done: number | null;
  total: number | null;
  /** null when the total is unknown (0 or NULL): an indeterminate bar. */
  percent: number | null;
  rate_per_s: number | null;
  eta_s: number | null;
  status: string | null;
  terminal: boolean;
  failed: boolean;
  stalled: boolean;
}

/** What the client knows of one key. */
export interface Entry<Row = Record<string, unknown>> {
  channel: string;
  key: string;
  /** The row's columns by name (state channels), or null until a row arrived. */
  row: Row | null;
  progress: Progress | null;
  /** The last payload (channels with include_payload), or undefined. */
  payload: unknown;
  /** The `ts` of the frame that last changed this entry. */
  ts: number | null;
  /** True when the relay could not fetch the row (state_error): the page's refetch was called for it. */
  stale: boolean;
}

export type Connection = "connecting" | "open" | "reconnecting" | "closed";
export type Listener = "up" | "down" | "unknown";

export interface Status {
  connection: Connection;
  /** The relay's LISTEN connection to PostgreSQL; "unknown" while not connected to the relay. */
  listener: Listener;
  /** True while the poll callback is being called. */
  polling: boolean;
  transport: "websocket" | "sse";
}

/** Why refetch was called: a hint channel's notify, a replayed notify, a resync, a state query that failed, or a
 * reconnect without a resume position. */
export type RefetchReason = "notify" | "replay" | "resync" | "state_error" | "reconnect";

export interface PollContext {
  /** "unreachable": no connection to the relay; "listener_down": connected, but the relay is not listening. */
  reason: "unreachable" | "listener_down";
  follows: Follow[];
  client: RelayClient;
}

export interface Follow {
  channel: string;
  keys: string[];
}

/** Any frame the relay sends (see docs/protocol.md); `type` says which. */
export interface Frame {
  type: string;
  channel?: string;
  ts?: number;
  [field: string]: unknown;
}

export interface ChangeEvent<Row = Record<string, unknown>> {
  channel: string;
  key: string;
  /** The entry after the change, or null when the key is gone (its row deleted, or unfollowed). */
  entry: Entry<Row> | null;
  /** The frame that caused it; null for set() and unfollow(). */
  frame: Frame | null;
}

export interface DisconnectEvent {
  code: number | null;
  reason: string;
  retryInMs: number;
  attempt: number;
}

export interface ErrorEvent {
  code: string;
  message: string;
  id?: string;
}

export interface EventMap<Row = Record<string, unknown>> {
  change: ChangeEvent<Row>;
  status: Status;
  frame: Frame;
  resync: Frame;
  error: ErrorEvent;
  disconnect: DisconnectEvent;
}

export interface Options {
  /** "websocket" (default) or "sse" (EventSource; one stream per distinct key set, reconnected to change it). */
  transport?: "websocket" | "sse";
  /** auth mode jwt: the token, or a function giving it (called before every connection, so it may refresh). */
  token?: string | null | (() => string | null | Promise<string | null>);
  /** Fetch these keys yourself: the relay told of a change without rows, or could not say what changed. */
  refetch?: (channel: string, keys: string[], reason: RefetchReason) => void | Promise<void>;
  /** Called at once and then every pollIntervalMs while nothing is pushed; stops when the relay is live again. */
  poll?: (context: PollContext) => void | Promise<void>;
  pollIntervalMs?: number;
  /** Reconnect waits are random in [0, min(reconnectMaxMs, reconnectInitialMs * 2^attempt)) (defaults 250, 4000). */
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  connectTimeoutMs?: number;
  /** websocket only: an application ping this often proves the link alive (0 turns it off). */
  pingIntervalMs?: number;
  pongTimeoutMs?: number;
  /** Implementations to use instead of the globals (Node, tests). */
  WebSocket?: unknown;
  EventSource?: unknown;
  /** The random source of the backoff jitter, in [0, 1). */
  random?: () => number;
}

export declare class RelayClient<Row = Record<string, unknown>> {
  /** `url`: the relay's /ws URL (ws:, wss:, http:, https:, or relative to the page); default "/ws". */
  constructor(url?: string, options?: Options);
  readonly urls: { ws: string; sse: string };
  /** The newest `ts` seen on any frame. */
  readonly since: number | null;
  /** Per channel, the newest `ts` seen on it: where a reconnect resumes that channel (else from `since`). */
  readonly positions: Record<string, number>;
  /** The relay process's id (from its welcome). */
  readonly instance: string | null;
  /** The channels the relay relays (from its welcome). */
  readonly channels: string[];
  readonly status: Status;
  follow(channel: string, keys?: string | string[]): this;
  unfollow(channel: string, keys?: string | string[]): this;
  follows(): Follow[];
  entries(channel: string): Map<string, Entry<Row>>;
  get(channel: string, key: string | number): Entry<Row> | undefined;
  set(channel: string, key: string | number, values: { row?: Row | null; progress?: Progress | null; payload?: unknown }): this;
  delete(channel: string, key: string | number): this;
  on<K extends keyof EventMap<Row>>(type: K, handler: (event: EventMap<Row>[K]) => void): () => void;
  close(): void;
}

export declare function relayUrls(url?: string): { ws: string; sse: string };
export declare function backoffDelay(attempt: number, initialMs: number, maxMs: number, random?: () => number): number;
