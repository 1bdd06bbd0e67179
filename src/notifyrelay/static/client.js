// notifyrelay browser client: one ES module, no dependencies. Served by the relay at /client.js.
//
//   import { RelayClient } from "/client.js";
//   const relay = new RelayClient("wss://relay.example.com/ws", { poll: refreshFromMyApi });
//   relay.follow("activity_progress", ["42"]);
//   relay.on("change", ({ key, entry }) => draw(key, entry));
//
// It follows channels and keys, keeps rows and progress per key (from snapshot and notify frames), reconnects with
// exponential backoff and full jitter, resumes with `since` (the last `ts` it saw), asks the page to refetch where
// the relay cannot push rows, calls a polling callback while nothing can be pushed, and tells its connection
// state. docs/clients.md documents the API; client.d.ts declares it.

const STATE_FIELDS = ["rows", "gone", "progress", "state_error"];
const SSE_EVENTS = ["welcome", "ack", "notify", "snapshot", "resync", "status", "error", "pong", "close"];

const DEFAULTS = {
  transport: "websocket", // or "sse"
  token: null, // a string, or a function returning one (or a promise of one) before each connection
  refetch: null, // (channel, keys, reason) => void: fetch these keys yourself
  poll: null, // ({reason, follows}) => void | Promise: called while nothing is pushed
  pollIntervalMs: 5000,
  reconnectInitialMs: 250,
  reconnectMaxMs: 4000, // a restarted relay has its pages back within 4 s, spread over those 4 s
  connectTimeoutMs: 10000,
  pingIntervalMs: 20000, // websocket only: an application ping proves a silent link alive
  pongTimeoutMs: 10000,
  WebSocket: null,
  EventSource: null,
  random: Math.random,
};

/** Resolve a relay address (absolute or relative to the page) into its /ws and /sse URLs. */
export function relayUrls(url) {
  const base = globalThis.location ? globalThis.location.href : undefined;
  const parsed = new URL(url ?? "/ws", base);
  const secure = parsed.protocol === "https:" || parsed.protocol === "wss:";
  let path = parsed.pathname.replace(/\/+$/, "");
  path = path.replace(/\/(ws|sse|stream)$/, "");
  const host = parsed.host;
  return {
    ws: `${secure ? "wss" : "ws"}://${host}${path}/ws`,
    sse: `${secure ? "https" : "http"}://${host}${path}/sse`,
  };
}

/** The wait before reconnect attempt `attempt` (0-based): full jitter over an exponentially growing cap. */
export function backoffDelay(attempt, initialMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

export class RelayClient {
  /**
   * Connect to a relay (`url` is its /ws URL, absolute or relative to the page; default "/ws") and keep connected
   * until close(). Connecting starts on the next microtask, so handlers attached right after construction see
   * every event.
   */
  constructor(url, options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.urls = relayUrls(url);
    this.since = null; // the newest `ts` seen on any frame
    this.positions = {}; // channel -> the newest `ts` seen on that channel: where a reconnect resumes it
    this.instance = null; // the relay process's id, from its welcome
    this.channels = []; // the channels the relay relays, from its welcome
    this._follows = new Map(); // channel -> Set of keys ("*" for every key)
    this._state = new Map(); // channel -> Map key -> entry
    this._stateChannels = new Set(); // channels seen carrying rows: the relay refetches for us there
    this._handlers = new Map(); // event type -> Set of functions
    this._status = { connection: "connecting", listener: "unknown", polling: false, transport: this.options.transport };
    this._attempt = 0;
    this._everOpened = false;
    this._closed = false;
    this._link = null; // the current connection: {kind, socket | sources, welcomed, ...}
    this._timers = { reconnect: null, connect: null, ping: null, poll: null };
    this._pollRunning = false;
    this._pollAgain = false;
    this._connecting = false;
    queueMicrotask(() => this._connect());
  }

  // ---- the API ----

  /** The connection state: {connection: connecting|open|reconnecting|closed, listener: up|down|unknown, polling}. */
  get status() {
    return { ...this._status };
  }

  /** Follow `keys` of `channel` (default every key). Adds to what is already followed. */
  follow(channel, keys = ["*"]) {
    const wanted = normaliseKeys(keys);
    const followed = this._follows.get(channel) ?? new Set();
    const added = wanted.filter((key) => !followed.has(key));
    this._follows.set(channel, followed);
    added.forEach((key) => followed.add(key));
    if (added.length === 0) return this;
    if (this._link?.kind === "websocket" && this._link.welcomed) {
      this._send({ op: "subscribe", channel, keys: added, id: `follow:${channel}` });
    } else if (this._link?.kind === "sse") {
      this._restartLink(); // an SSE subscription is its URL: reconnect (resuming) with the new one
    } else if (!this._link && this._status.connection !== "closed" && this.options.transport === "sse") {
      this._connectSoon();
    }
    return this;
  }

  /** Stop following `keys` of `channel` (default all of it); their entries leave the local state. */
  unfollow(channel, keys) {
    const followed = this._follows.get(channel);
    if (!followed) return this;
    const removed = keys === undefined ? [...followed] : normaliseKeys(keys).filter((key) => followed.has(key));
    removed.forEach((key) => followed.delete(key));
    if (followed.size === 0) this._follows.delete(channel);
    const entries = this._state.get(channel);
    if (entries) {
      for (const key of [...entries.keys()]) {
        if (!this._follows.get(channel)?.has("*") && !this._follows.get(channel)?.has(key)) this._remove(channel, key, null);
      }
    }
    if (removed.length && this._link?.kind === "websocket" && this._link.welcomed) {
      this._send({ op: "unsubscribe", channel, keys: removed, id: `unfollow:${channel}` });
    } else if (removed.length && this._link?.kind === "sse") {
      this._restartLink();
    }
    return this;
  }

  /** What is followed: [{channel, keys}]. */
  follows() {
    return [...this._follows].map(([channel, keys]) => ({ channel, keys: [...keys] }));
  }

  /** The local state of a channel: a new Map of key -> entry ({row, progress, payload, ts, stale}). */
  entries(channel) {
    return new Map(this._state.get(channel) ?? []);
  }

  /** One key's entry, or undefined. */
  get(channel, key) {
    return this._state.get(channel)?.get(String(key));
  }

  /** Put what the page fetched itself (in refetch or poll) into the local state; emits "change". */
  set(channel, key, { row = undefined, progress = undefined, payload = undefined } = {}) {
    const entry = this._entry(channel, String(key));
    if (row !== undefined) entry.row = row;
    if (progress !== undefined) entry.progress = progress;
    if (payload !== undefined) entry.payload = payload;
    entry.stale = false;
    this._emit("change", { channel, key: String(key), entry: { ...entry }, frame: null });
    return this;
  }

  /** Remove a key from the local state (a row the page found deleted); emits "change" with entry null. */
  delete(channel, key) {
    this._remove(channel, String(key), null);
    return this;
  }

  /** Listen: "change", "status", "frame", "resync", "error", "disconnect". Returns a function that stops it. */
  on(type, handler) {
    const handlers = this._handlers.get(type) ?? new Set();
    handlers.add(handler);
    this._handlers.set(type, handlers);
    return () => handlers.delete(handler);
  }

  /** Disconnect for good: no reconnect, no polling. Idempotent. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._teardownLink(1000, "client closed");
    Object.keys(this._timers).forEach((name) => this._clearTimer(name));
    this._setStatus({ connection: "closed", listener: "unknown" });
  }

  // ---- connecting ----

  _connectSoon() {
    if (this._timers.reconnect === null) this._timers.reconnect = setTimeout(() => this._reconnectFired(), 0);
  }

  _reconnectFired() {
    this._timers.reconnect = null;
    this._connect();
  }

  async _connect() {
    if (this._closed || this._link || this._connecting) return;
    this._connecting = true; // the token may take a while: one connection attempt at a time
    let token;
    try {
      token = await this._token();
    } finally {
      this._connecting = false;
    }
    if (this._closed || this._link) return;
    if (this.options.transport === "sse") this._openSse(token);
    else this._openWebSocket(token);
  }

  async _token() {
    const { token } = this.options;
    try {
      return typeof token === "function" ? await token() : token;
    } catch (error) {
      this._emit("error", { code: "token_failed", message: `the token function failed: ${error}` });
      return null;
    }
  }

  _openWebSocket(token) {
    const Impl = this.options.WebSocket ?? globalThis.WebSocket;
    let socket;
    try {
      socket = token ? new Impl(this.urls.ws, [token]) : new Impl(this.urls.ws);
    } catch (error) {
      this._emit("error", { code: "connect_failed", message: String(error) });
      this._lost(null, String(error));
      return;
    }
    const link = { kind: "websocket", socket, welcomed: false, awaitingPongSince: null };
    this._link = link;
    socket.onmessage = (event) => link === this._link && this._onMessage(event.data);
    socket.onclose = (event) => link === this._link && this._lost(event.code, event.reason);
    socket.onerror = () => {}; // a close event follows with the code
    this._armConnectTimeout();
  }

  _openSse(token) {
    const Impl = this.options.EventSource ?? globalThis.EventSource;
    const groups = new Map(); // the same keys -> one EventSource for all those channels
    for (const [channel, keys] of this._follows) {
      const signature = [...keys].sort().join("\u0000");
      groups.set(signature, [...(groups.get(signature) ?? []), channel]);
    }
    if (groups.size === 0) return; // an SSE subscription is its URL: nothing followed, nothing to open
    const link = { kind: "sse", sources: [], welcomed: false, welcomes: 0 };
    this._link = link;
    for (const [signature, channels] of groups) {
      const query = new URLSearchParams();
      channels.forEach((channel) => query.append("channel", channel));
      const keys = signature.split("\u0000");
      if (!keys.includes("*")) keys.forEach((key) => query.append("key", key));
      const since = resumeFrom(channels.map((channel) => this._position(channel)));
      if (since !== null) query.set("since", String(since));
      if (token) query.set("token", token);
      const source = new Impl(`${this.urls.sse}?${query}`);
      link.sources.push(source);
      for (const type of SSE_EVENTS) {
        source.addEventListener(type, (event) => {
          if (link !== this._link) return;
          if (event.data === undefined) return; // "error" with no data: the connection failed (below)
          this._onMessage(event.data);
        });
      }
      // EventSource would reconnect by itself with its own timing; this client reconnects with backoff instead,
      // resuming with `since` (the same position EventSource's Last-Event-ID would give).
      source.onerror = (event) => link === this._link && event.data === undefined && this._lost(null, "stream failed");
    }
    this._armConnectTimeout();
  }

  _armConnectTimeout() {
    this._clearTimer("connect");
    this._timers.connect = setTimeout(() => {
      this._timers.connect = null;
      if (this._link && !this._link.welcomed) this._lost(null, "no welcome within connectTimeoutMs");
    }, this.options.connectTimeoutMs);
  }

  /** The connection is gone (or given up on): reconnect after a jittered, growing wait. */
  _lost(code, reason) {
    if (this._closed) return;
    this._teardownLink(1000, "reconnecting");
    const wait = backoffDelay(this._attempt, this.options.reconnectInitialMs, this.options.reconnectMaxMs, this.options.random);
    this._attempt += 1;
    this._setStatus({ connection: "reconnecting", listener: "unknown" });
    this._emit("disconnect", { code, reason, retryInMs: wait, attempt: this._attempt });
    this._clearTimer("reconnect");
    this._timers.reconnect = setTimeout(() => this._reconnectFired(), wait);
  }

  /** Reconnect at once, resuming (an SSE link whose subscription changed). */
  _restartLink() {
    this._teardownLink(1000, "subscription changed");
    this._connectSoon();
  }

  _teardownLink(code, reason) {
    const link = this._link;
    this._link = null;
    this._clearTimer("connect");
    this._clearTimer("ping");
    if (!link) return;
    try {
      if (link.kind === "websocket") {
        link.socket.onmessage = link.socket.onclose = link.socket.onerror = null;
        if (link.socket.readyState <= 1) link.socket.close(code, reason);
      } else {
        link.sources.forEach((source) => source.close());
      }
    } catch {
      // closing a half-open socket may throw in some runtimes; it is gone either way
    }
  }

  _send(frame) {
    const link = this._link;
    if (link?.kind === "websocket" && link.socket.readyState === 1) link.socket.send(JSON.stringify(frame));
  }

  // ---- frames ----

  _onMessage(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit("error", { code: "bad_frame", message: "the relay sent a frame that is not JSON" });
      return;
    }
    if (typeof frame.ts === "number") {
      if (this.since === null || frame.ts > this.since) this.since = frame.ts;
      if (frame.channel && !(frame.ts <= this.positions[frame.channel])) this.positions[frame.channel] = frame.ts;
    }
    this._emit("frame", frame);
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "notify":
        return this._onNotify(frame);
      case "snapshot":
        return this._onSnapshot(frame);
      case "resync":
        return this._onResync(frame);
      case "status":
        return this._setStatus({ listener: frame.listener === "up" ? "up" : "down" });
      case "pong":
        if (this._link) this._link.awaitingPongSince = null;
        return undefined;
      case "error":
        return this._emit("error", frame);
      case "close":
        return this._lost(frame.code ?? 1001, frame.reason ?? "the relay closed the stream");
      default:
        return undefined; // ack, keepalive and frame types of later protocol versions
    }
  }

  _onWelcome(frame) {
    const link = this._link;
    if (!link) return;
    if (link.kind === "sse") {
      link.welcomes += 1;
      if (link.welcomes < link.sources.length) return; // open once every stream has said welcome
    }
    link.welcomed = true;
    this._clearTimer("connect");
    const reconnected = this._everOpened;
    this._everOpened = true;
    this._attempt = 0;
    this.instance = frame.instance ?? null;
    this.channels = frame.channels ?? [];
    if (link.kind === "websocket") {
      for (const [channel, keys] of this._follows) {
        const subscribe = { op: "subscribe", channel, keys: [...keys], id: `follow:${channel}` };
        const since = this._position(channel);
        if (since !== null) subscribe.since = since;
        this._send(subscribe);
      }
      this._startPing();
    }
    // Without a resume position the relay cannot tell what changed while we were away: a hint channel's page
    // refetches (a state channel gets a snapshot with the subscribe).
    if (reconnected) {
      for (const [channel, keys] of this._follows) {
        if (this._position(channel) === null && !this._stateChannels.has(channel)) {
          this._refetch(channel, [...keys], "reconnect");
        }
      }
    }
    this._setStatus({ connection: "open", listener: frame.listener === "down" ? "down" : "up" });
  }

  _onNotify(frame) {
    const { channel } = frame;
    if (STATE_FIELDS.some((field) => field in frame)) {
      this._applyState(frame, false);
      return;
    }
    // A hint channel: the keys changed; the page fetches them (payloads, when relayed, are kept).
    const keys = frame.keys ?? [];
    for (const key of keys) {
      const entry = this._entry(channel, key);
      if (frame.payloads && key in frame.payloads) entry.payload = frame.payloads[key];
      entry.ts = frame.ts ?? entry.ts;
      this._emit("change", { channel, key, entry: { ...entry }, frame });
    }
    if (keys.length) this._refetch(channel, keys, frame.replay ? "replay" : "notify");
  }

  _onSnapshot(frame) {
    this._applyState(frame, true);
  }

  _onResync(frame) {
    const keys = [...(this._follows.get(frame.channel) ?? [])];
    this._emit("resync", frame);
    if (keys.length) this._refetch(frame.channel, keys, "resync");
  }

  /** Rows, gone keys and progress of a notify or snapshot into the local state, in the relay's order. */
  _applyState(frame, isSnapshot) {
    const { channel } = frame;
    this._stateChannels.add(channel);
    const rows = frame.rows ?? {};
    const progress = frame.progress ?? {};
    const payloads = frame.payloads ?? {};
    const gone = new Set(frame.gone ?? []);
    const seen = new Set([...Object.keys(rows), ...Object.keys(progress), ...(frame.keys ?? [])]);
    for (const key of gone) this._remove(channel, key, frame);
    const unfetched = [];
    for (const key of seen) {
      if (gone.has(key)) continue;
      const entry = this._entry(channel, key);
      if (key in rows) entry.row = rows[key];
      if (key in progress) entry.progress = progress[key];
      if (key in payloads) entry.payload = payloads[key];
      entry.ts = frame.ts ?? entry.ts;
      entry.stale = !(key in rows) && Boolean(frame.state_error);
      if (entry.stale) unfetched.push(key);
      this._emit("change", { channel, key, entry: { ...entry }, frame });
    }
    // A snapshot for a "*" follower is the relay's whole listing (list_query): keys it no longer lists are dropped,
    // unless followed by name.
    const followed = this._follows.get(channel);
    if (isSnapshot && followed?.has("*")) {
      for (const key of [...(this._state.get(channel)?.keys() ?? [])]) {
        if (!seen.has(key) && !followed.has(key)) this._remove(channel, key, frame);
      }
    }
    if (frame.state_error && frame.state_error !== "too_large" && unfetched.length) {
      this._refetch(channel, unfetched, "state_error");
    } else if (frame.state_error_keys?.length) {
      this._refetch(channel, frame.state_error_keys, "state_error");
    }
  }

  _entry(channel, key) {
    const entries = this._state.get(channel) ?? new Map();
    this._state.set(channel, entries);
    let entry = entries.get(key);
    if (!entry) {
      entry = { channel, key, row: null, progress: null, payload: undefined, ts: null, stale: false };
      entries.set(key, entry);
    }
    return entry;
  }

  _remove(channel, key, frame) {
    const entries = this._state.get(channel);
    if (!entries?.delete(key)) return;
    if (entries.size === 0) this._state.delete(channel);
    this._emit("change", { channel, key, entry: null, frame });
  }

  _refetch(channel, keys, reason) {
    const { refetch } = this.options;
    if (refetch) this._call(refetch, channel, keys, reason);
  }

  // ---- keepalive (websocket) ----

  _startPing() {
    this._clearTimer("ping");
    const { pingIntervalMs, pongTimeoutMs } = this.options;
    if (!pingIntervalMs) return;
    this._timers.ping = setInterval(() => {
      const link = this._link;
      if (!link) return;
      const now = Date.now();
      if (link.awaitingPongSince !== null && now - link.awaitingPongSince > pongTimeoutMs) {
        this._lost(null, "no pong within pongTimeoutMs"); // a silent link: the browser would wait for minutes
        return;
      }
      if (link.awaitingPongSince === null) link.awaitingPongSince = now;
      this._send({ op: "ping", id: "keepalive" });
    }, Math.min(pingIntervalMs, pongTimeoutMs));
  }

  // ---- status and polling ----

  /** Where a channel resumes: its own newest `ts`, else the newest of any channel (it was live until then too). */
  _position(channel) {
    return this.positions[channel] ?? this.since;
  }

  _setStatus(change) {
    const next = { ...this._status, ...change };
    next.polling = Boolean(this.options.poll) && this._shouldPoll(next);
    const changed = Object.keys(next).some((name) => next[name] !== this._status[name]);
    const startPolling = next.polling && !this._status.polling;
    const stopPolling = !next.polling && this._status.polling;
    this._status = next;
    if (stopPolling) this._clearTimer("poll");
    if (changed) this._emit("status", { ...next });
    if (startPolling) {
      this._pollOnce();
      this._timers.poll = setInterval(() => this._pollOnce(), this.options.pollIntervalMs);
    }
  }

  /** Poll while nothing is pushed: the relay unreachable, or reachable but not listening to PostgreSQL. */
  _shouldPoll(status) {
    if (status.connection === "closed") return false;
    if (status.connection === "reconnecting") return true;
    return status.connection === "open" && status.listener === "down";
  }

  async _pollOnce() {
    if (this._pollRunning) {
      this._pollAgain = true; // never two polls at once: run again when this one ends
      return;
    }
    this._pollRunning = true;
    try {
      do {
        this._pollAgain = false;
        if (!this._status.polling) break;
        const reason = this._status.connection === "open" ? "listener_down" : "unreachable";
        await this._call(this.options.poll, { reason, follows: this.follows(), client: this });
      } while (this._pollAgain);
    } finally {
      this._pollRunning = false;
    }
  }

  // ---- plumbing ----

  _emit(type, detail) {
    for (const handler of [...(this._handlers.get(type) ?? [])]) this._call(handler, detail);
  }

  /** Call a page's function; what it throws (or rejects with) is logged, never breaks the client. */
  async _call(fn, ...args) {
    try {
      await fn(...args);
    } catch (error) {
      console.error("notifyrelay client: a callback failed", error);
    }
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) {
      clearTimeout(this._timers[name]);
      clearInterval(this._timers[name]);
      this._timers[name] = null;
    }
  }
}

/** One `since` for an SSE stream of several channels: the oldest of their positions, so none misses a change. */
function resumeFrom(positions) {
  const known = positions.filter((position) => position !== null);
  return known.length ? Math.min(...known) : null;
}

function normaliseKeys(keys) {
  const list = Array.isArray(keys) ? keys : [keys];
  if (list.length === 0) throw new TypeError("keys must name at least one key, or \"*\" for every key");
  return list.map(String);
}
