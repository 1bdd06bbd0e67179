// The client's logic against a scripted stand-in for the relay's socket: no relay, no network, no sleeps on speed.
// The same behaviours against a live relay are in relay.test.mjs.
import assert from "node:assert/strict";
import test from "node:test";

import { backoffDelay, RelayClient, relayUrls } from "../client.js";

class FakeSocket {
  static made = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 1;
    this.sent = [];
    FakeSocket.made.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  frame(frame) {
    this.onmessage({ data: JSON.stringify(frame) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose({ code, reason: "" });
  }
}

const until = async (predicate, ms = 2000) => {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`not reached within ${ms} ms: ${predicate}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
};

const welcome = (listener = "up") => ({ type: "welcome", protocol: 2, instance: "i1", window_ms: 200, channels: ["jobs"], listener });

function client(options = {}) {
  FakeSocket.made = [];
  return new RelayClient("http://relay.test:8765/ws", {
    WebSocket: FakeSocket, random: () => 0, pingIntervalMs: 0, ...options,
  });
}

test("backoff is full jitter under a cap that doubles up to the maximum", () => {
  assert.equal(backoffDelay(0, 250, 10000, () => 0.999), 249);
  assert.equal(backoffDelay(3, 250, 10000, () => 0.5), 1000);
  assert.equal(backoffDelay(20, 250, 10000, () => 0.999), 9990);
  assert.equal(backoffDelay(5, 250, 10000, () => 0), 0);
});

test("relay URLs: one address gives the /ws and /sse endpoints, secure stays secure, a path prefix is kept", () => {
  assert.deepEqual(relayUrls("http://h:1/ws"), { ws: "ws://h:1/ws", sse: "http://h:1/sse" });
  assert.deepEqual(relayUrls("wss://h/relay/ws?x=1"), { ws: "wss://h/relay/ws", sse: "https://h/relay/sse" });
  assert.deepEqual(relayUrls("https://h/relay/"), { ws: "wss://h/relay/ws", sse: "https://h/relay/sse" });
});

test("a token is offered as the websocket subprotocol, and follows are subscribed after the welcome", async () => {
  const relay = client({ token: () => "abc.def.ghi" });
  relay.follow("jobs", ["1", "2"]);
  await until(() => FakeSocket.made.length === 1);
  const socket = FakeSocket.made[0];
  assert.deepEqual(socket.protocols, ["abc.def.ghi"]);
  socket.frame(welcome());
  assert.deepEqual(socket.sent, [{ op: "subscribe", channel: "jobs", keys: ["1", "2"], id: "follow:jobs" }]);
  assert.equal(relay.status.connection, "open");
  relay.close();
});

test("rows, progress and gone keys from notify and snapshot frames make the local state", async () => {
  const relay = client();
  const changes = [];
  relay.on("change", (event) => changes.push([event.key, event.entry?.row?.status ?? null]));
  relay.follow("jobs", ["*"]);
  await until(() => FakeSocket.made.length === 1);
  const socket = FakeSocket.made[0];
  socket.frame(welcome());
  socket.frame({ type: "snapshot", channel: "jobs", seq: 1, ts: 100, rows: { 1: { status: "running" }, 2: { status: "queued" } }, gone: [], progress: { 1: { done: 1, total: 4, percent: 25 } } });
  assert.equal(relay.get("jobs", 1).progress.percent, 25);
  socket.frame({ type: "notify", channel: "jobs", seq: 2, ts: 150, keys: ["1", "2"], rows: { 1: { status: "complete" } }, gone: ["2"] });
  assert.deepEqual([...relay.entries("jobs").keys()], ["1"]);
  assert.equal(relay.get("jobs", "1").row.status, "complete");
  assert.equal(relay.since, 150);
  // A "*" snapshot is the relay's whole listing: a key it no longer lists leaves the state.
  socket.frame({ type: "snapshot", channel: "jobs", seq: 3, ts: 160, rows: { 3: { status: "queued" } }, gone: [] });
  assert.deepEqual([...relay.entries("jobs").keys()], ["3"]);
  assert.deepEqual(changes, [["1", "running"], ["2", "queued"], ["2", null], ["1", "complete"], ["3", "queued"], ["1", null]]);
  relay.close();
});

test("a hint channel's notify and resync ask the page to refetch; a failed state query too", async () => {
  const asked = [];
  const relay = client({ refetch: (channel, keys, reason) => asked.push([channel, keys, reason]) });
  relay.follow("jobs", ["1", "2"]);
  await until(() => FakeSocket.made.length === 1);
  const socket = FakeSocket.made[0];
  socket.frame(welcome());
  socket.frame({ type: "notify", channel: "jobs", seq: 1, ts: 10, keys: ["1"], payloads: { 1: { x: 1 } } });
  socket.frame({ type: "resync", channel: "jobs", ts: 20, reason: "overflow" });
  socket.frame({ type: "notify", channel: "jobs", seq: 2, ts: 30, keys: ["2"], rows: {}, state_error: "timeout" });
  await until(() => asked.length === 3);
  assert.deepEqual(asked, [["jobs", ["1"], "notify"], ["jobs", ["1", "2"], "resync"], ["jobs", ["2"], "state_error"]]);
  assert.deepEqual(relay.get("jobs", "1").payload, { x: 1 });
  assert.equal(relay.get("jobs", "2").stale, true);
  relay.close();
});

test("after a drop it reconnects and resubscribes with since = the last ts it saw", async () => {
  const relay = client();
  const disconnects = [];
  relay.on("disconnect", (event) => disconnects.push(event));
  relay.follow("jobs", ["7"]);
  await until(() => FakeSocket.made.length === 1);
  FakeSocket.made[0].frame(welcome());
  FakeSocket.made[0].frame({ type: "notify", channel: "jobs", seq: 4, ts: 1234, keys: ["7"], rows: { 7: {} } });
  FakeSocket.made[0].drop();
  assert.equal(relay.status.connection, "reconnecting");
  await until(() => FakeSocket.made.length === 2);
  FakeSocket.made[1].frame(welcome());
  assert.deepEqual(FakeSocket.made[1].sent, [{ op: "subscribe", channel: "jobs", keys: ["7"], id: "follow:jobs", since: 1234 }]);
  assert.equal(disconnects[0].code, 1006);
  relay.close();
});

test("poll runs while the listener is down or the relay unreachable, and stops when live again", async () => {
  const polls = [];
  const relay = client({ poll: ({ reason }) => polls.push(reason), pollIntervalMs: 10000, reconnectInitialMs: 50 });
  relay.follow("jobs");
  await until(() => FakeSocket.made.length === 1);
  FakeSocket.made[0].frame(welcome("down"));
  assert.deepEqual(relay.status, { connection: "open", listener: "down", polling: true, transport: "websocket" });
  FakeSocket.made[0].frame({ type: "status", listener: "up" });
  assert.equal(relay.status.polling, false);
  FakeSocket.made[0].drop();
  assert.equal(relay.status.polling, true);
  await until(() => FakeSocket.made.length === 2);
  FakeSocket.made[1].frame(welcome());
  assert.equal(relay.status.polling, false);
  assert.deepEqual(polls, ["listener_down", "unreachable"]);
  relay.close();
  assert.equal(relay.status.connection, "closed");
});

test("a silent link (no pong) is given up and replaced", async () => {
  const relay = client({ pingIntervalMs: 20, pongTimeoutMs: 20 });
  relay.follow("jobs");
  await until(() => FakeSocket.made.length === 1);
  FakeSocket.made[0].frame(welcome());
  await until(() => FakeSocket.made.length === 2);
  assert.ok(FakeSocket.made[0].sent.some((frame) => frame.op === "ping"));
  relay.close();
});

test("a handler that throws breaks neither the client nor the other handlers", async () => {
  const relay = client();
  const seen = [];
  const original = console.error;
  console.error = () => {};
  try {
    relay.on("status", () => { throw new Error("page bug"); });
    relay.on("status", (status) => seen.push(status.connection));
    relay.follow("jobs");
    await until(() => FakeSocket.made.length === 1);
    FakeSocket.made[0].frame(welcome());
    assert.deepEqual(seen, ["open"]);
    relay.close();
  } finally {
    console.error = original;
  }
});

class FakeEventSource {
  static made = [];
  constructor(url) {
    this.url = new URL(url);
    this.listeners = {};
    this.closed = false;
    FakeEventSource.made.push(this);
  }
  addEventListener(type, listener) {
    (this.listeners[type] ??= []).push(listener);
  }
  close() {
    this.closed = true;
  }
  event(type, frame) {
    const event = { data: JSON.stringify(frame) };
    (this.listeners[type] ?? []).forEach((listener) => listener(event));
  }
  fail() {
    this.onerror({});
  }
}

test("SSE: one EventSource per key set, the token and since in its URL; a failure reconnects and resumes", async () => {
  FakeEventSource.made = [];
  const relay = new RelayClient("https://relay.test/ws", {
    transport: "sse", EventSource: FakeEventSource, token: "t0k", random: () => 0,
  });
  relay.follow("jobs", ["1", "2"]).follow("imports", ["1", "2"]).follow("system_stability");
  await until(() => FakeEventSource.made.length === 2);
  const [pair, stability] = FakeEventSource.made;
  assert.equal(pair.url.origin + pair.url.pathname, "https://relay.test/sse");
  assert.deepEqual(pair.url.searchParams.getAll("channel"), ["jobs", "imports"]);
  assert.deepEqual(pair.url.searchParams.getAll("key"), ["1", "2"]);
  assert.equal(pair.url.searchParams.get("token"), "t0k");
  assert.deepEqual(stability.url.searchParams.getAll("key"), []); // no key: every key
  pair.event("welcome", welcome());
  assert.equal(relay.status.connection, "connecting"); // open once every stream has said welcome
  stability.event("welcome", welcome());
  assert.equal(relay.status.connection, "open");
  pair.event("notify", { type: "notify", channel: "jobs", seq: 1, ts: 500, keys: ["1"], rows: { 1: { n: 1 } } });
  pair.event("notify", { type: "notify", channel: "imports", seq: 1, ts: 400, keys: ["2"], rows: { 2: { n: 2 } } });
  pair.fail();
  assert.equal(relay.status.connection, "reconnecting");
  assert.ok(pair.closed && stability.closed, "the client reconnects itself, not EventSource");
  await until(() => FakeEventSource.made.length === 4);
  // one since for a stream of several channels: the oldest of their positions, so that neither misses a change
  assert.equal(FakeEventSource.made[2].url.searchParams.get("since"), "400");
  relay.close();
});
