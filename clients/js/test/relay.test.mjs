// The client against a live relay on a real PostgreSQL. tests/integration/test_js_client.py starts both and passes
// NOTIFYRELAY_TEST_URL (the relay's /ws, through a gate that can cut it) and NOTIFYRELAY_TEST_CONTROL (an endpoint
// that writes rows, cuts the gate, stops the database, restarts the relay). Run alone, these tests skip.
import assert from "node:assert/strict";
import test from "node:test";

import { RelayClient } from "../client.js";

const URL = process.env.NOTIFYRELAY_TEST_URL;
const CONTROL = process.env.NOTIFYRELAY_TEST_CONTROL;
const skip = !(URL && CONTROL) && "no live relay: run through tests/integration/test_js_client.py";
const CHANNEL = "activity_progress";
const options = { timeout: 20000, skip };

async function control(action, args = {}) {
  const answer = await (await fetch(`${CONTROL}/${action}`, { method: "POST", body: JSON.stringify(args) })).json();
  if (!answer.ok) throw new Error(answer.error);
  return answer.result;
}

/** Resolve once `predicate()` holds, checking at every event of the client (and every 20 ms). */
function until(client, predicate, what, ms = 10000) {
  return new Promise((resolve, reject) => {
    const offs = [];
    const done = (error) => {
      clearInterval(timer);
      clearTimeout(timeout);
      offs.forEach((off) => off());
      if (error) reject(error);
      else resolve();
    };
    const check = () => {
      try {
        if (predicate()) done();
      } catch (error) {
        done(error);
      }
    };
    const timer = setInterval(check, 20);
    const timeout = setTimeout(() => {
      const recent = JSON.stringify((framesOf.get(client) ?? []).slice(-6));
      done(new Error(`not within ${ms} ms: ${what}; status ${JSON.stringify(client.status)}; last frames ${recent}`));
    }, ms);
    for (const type of ["change", "status", "frame"]) offs.push(client.on(type, check));
    check();
  });
}

const framesOf = new WeakMap(); // client -> the frames it received, for the failure messages

function connect(extra = {}) {
  // connectTimeoutMs: Node's WebSocket may never report a connection the gate resets during the handshake
  const client = new RelayClient(URL, { reconnectInitialMs: 50, reconnectMaxMs: 500, connectTimeoutMs: 1000, ...extra });
  const frames = [];
  framesOf.set(client, frames);
  client.on("frame", (frame) => frames.push(frame));
  return client;
}

test("subscribes to a key: its row and progress arrive, and an update is applied to the local state", options, async () => {
  const key = await control("create", { total: 200, message: "waiting" });
  const client = connect();
  try {
    client.follow(CHANNEL, [key]);
    await until(client, () => client.get(CHANNEL, key)?.row?.status === "queued", "the snapshot row");
    assert.equal(client.status.connection, "open");
    assert.equal(client.status.listener, "up");
    await control("update", { key, done: 50, status: "running", message: "importing" });
    await until(client, () => client.get(CHANNEL, key)?.progress?.done === 50, "the updated progress");
    const entry = client.get(CHANNEL, key);
    assert.equal(entry.row.message, "importing");
    assert.equal(entry.progress.total, 200);
    assert.equal(entry.progress.percent, 25);
    assert.equal(typeof entry.ts, "number");
  } finally {
    client.close();
  }
});

test("a hint channel's notify calls refetch with its keys", options, async () => {
  const asked = [];
  const client = connect({ refetch: (channel, keys, reason) => asked.push({ channel, keys, reason }) });
  try {
    const acks = [];
    client.on("frame", (frame) => frame.type === "ack" && acks.push(frame));
    client.follow("activity_hints", ["k1"]);
    await until(client, () => acks.some((ack) => ack.channel === "activity_hints"), "the subscribe's ack");
    await control("notify", { channel: "activity_hints", payload: "k1" });
    await until(client, () => asked.length === 1, "a refetch");
    assert.deepEqual(asked[0], { channel: "activity_hints", keys: ["k1"], reason: "notify" });
  } finally {
    client.close();
  }
});

test("after the relay link drops it reconnects and resumes with since: what changed meanwhile is replayed", options, async () => {
  const key = await control("create", { total: 100 });
  const client = connect();
  const replays = [];
  client.on("frame", (frame) => frame.replay && replays.push(frame));
  try {
    client.follow(CHANNEL, [key]);
    await until(client, () => client.get(CHANNEL, key)?.row, "the first row");
    await control("update", { key, done: 10, status: "running" });
    await until(client, () => client.get(CHANNEL, key)?.progress?.done === 10, "done = 10");
    const since = client.since;
    assert.equal(typeof since, "number");
    await control("gate", { shut: true });
    await until(client, () => client.status.connection === "reconnecting", "reconnecting");
    await control("update", { key, done: 70, message: "changed while away" });
    await control("gate", { shut: false });
    await until(client, () => client.get(CHANNEL, key)?.progress?.done === 70, "the change made while away");
    assert.equal(client.status.connection, "open");
    assert.ok(replays.some((frame) => frame.keys?.includes(key)), "the change came as a replay of a resume");
    assert.ok(client.since > since);
  } finally {
    client.close();
  }
});

test("poll is called while the database is down (listener down), and stops when the relay listens again", options, async () => {
  const key = await control("create", { total: 100 });
  const polls = [];
  const client = connect({ poll: ({ reason }) => polls.push(reason), pollIntervalMs: 100 });
  try {
    client.follow(CHANNEL, [key]);
    await until(client, () => client.get(CHANNEL, key)?.row && client.status.listener === "up", "live");
    assert.equal(polls.length, 0);
    await control("database", { up: false });
    await until(client, () => client.status.listener === "down" && polls.length >= 2, "two polls while down");
    assert.equal(client.status.polling, true);
    assert.ok(polls.every((reason) => reason === "listener_down"));
    await control("database", { up: true });
    await until(client, () => client.status.listener === "up", "listener up again", 15000);
    assert.equal(client.status.polling, false);
    const count = polls.length;
    await new Promise((resolve) => setTimeout(resolve, 400)); // four poll intervals: none may come
    assert.equal(polls.length, count);
    await control("update", { key, done: 5, status: "running" });
    await until(client, () => client.get(CHANNEL, key)?.progress?.done === 5, "live again after the outage");
  } finally {
    client.close();
  }
});

test("a relay restart: the client comes back to the new process and shows what changed meanwhile", options, async () => {
  const key = await control("create", { total: 100 });
  const client = connect();
  try {
    client.follow(CHANNEL, [key]);
    await until(client, () => client.get(CHANNEL, key)?.row, "the first row");
    const instance = client.instance;
    // The row changes while no relay runs: the new process must show it without being told by a NOTIFY.
    await control("restart", { update: { key, done: 42, status: "running", message: "while the relay was down" } });
    await until(client, () => client.get(CHANNEL, key)?.progress?.done === 42, "the change made during the restart");
    assert.equal(client.get(CHANNEL, key).row.message, "while the relay was down");
    assert.notEqual(client.instance, instance);
  } finally {
    client.close();
  }
});
