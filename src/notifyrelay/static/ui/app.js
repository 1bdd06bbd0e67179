// The relay's live page (/ui): one channel's active keys with progress bars, the connection and listener state,
// the polling fallback, and the system_stability badge. Built on the relay's own client module; no build step.
//
// URL parameters: ?channel=NAME (default: the first relayed channel), ?token=JWT (auth mode jwt; or paste it in the
// form that appears when connecting fails), ?transport=sse (EventSource instead of the websocket; needs ?channel).
import { RelayClient } from "../client.js";

const STABILITY = "system_stability";
const TOKEN_STORE = "notifyrelay.token";
const params = new URLSearchParams(location.search);
const transport = params.get("transport") === "sse" ? "sse" : "websocket";
const $ = (id) => document.getElementById(id);

let token = params.get("token") || sessionStorage.getItem(TOKEN_STORE) || null;
let channel = params.get("channel");
let client = null;
let failures = 0;
let renderQueued = false;

function start() {
  client?.close();
  failures = 0;
  client = new RelayClient(new URL("/ws", location).href, {
    transport,
    token: () => token,
    poll: pollReadiness,
    pollIntervalMs: 5000,
  });
  client.on("status", showStatus);
  client.on("change", queueRender);
  client.on("disconnect", () => {
    failures += 1;
    // Browsers hide why a handshake failed; after two failures without ever opening, offer the token form.
    if (failures >= 2 && !client.instance) $("auth").hidden = false;
  });
  client.on("error", (error) => {
    if (error.code === "forbidden" || error.code === "unknown_channel") showNote(error.message);
  });
  if (transport === "sse") {
    if (!channel) {
      showNote("transport=sse needs ?channel=NAME: an SSE stream's subscription is its URL.");
      return;
    }
    follow();
  }
}

function follow() {
  client.follow(channel, ["*"]);
  // The badge follows system_stability when the relay relays it (the websocket learns that from the welcome).
  if (transport === "websocket" && client.channels.includes(STABILITY)) client.follow(STABILITY, ["*"]);
  queueRender();
}

function showStatus(status) {
  const connection = $("connection");
  connection.dataset.state = status.connection;
  connection.textContent = status.connection === "open" ? `connected · ${status.transport}` : status.connection;
  const listener = $("listener");
  listener.dataset.state = status.listener;
  listener.textContent = { up: "listening", down: "listener down", unknown: "listener ?" }[status.listener];
  $("polling").hidden = !status.polling;
  if (status.connection === "open") {
    failures = 0;
    $("auth").hidden = true;
    $("instance").textContent = client.instance ? `relay instance ${client.instance}` : "";
    if (transport === "websocket") chooseChannel();
  }
}

/** Once the relay has said which channels it relays: fill the selector and follow the chosen channel. */
function chooseChannel() {
  const choices = client.channels.filter((name) => name !== STABILITY);
  const select = $("channel");
  $("subtitle").hidden = false;
  if (select.options.length !== choices.length) {
    select.replaceChildren(...choices.map((name) => new Option(name, name)));
  }
  $("stability").hidden = !client.channels.includes(STABILITY);
  if (!channel || !client.channels.includes(channel)) channel = choices[0] ?? null;
  select.value = channel ?? "";
  if (channel && !client.follows().some((follow) => follow.channel === channel)) follow();
}

async function pollReadiness({ reason }) {
  const text = $("polling-reason");
  const at = new Date().toLocaleTimeString();
  if (reason === "unreachable") {
    // This page came from the relay: if its HTTP answers while the websocket does not, it refuses us (a token?).
    const alive = await probe("/healthz");
    text.textContent = alive
      ? `The relay answers but refuses the live connection (auth mode jwt needs a token). Retrying; checked ${at}.`
      : `The relay cannot be reached; reconnecting with backoff. Checked ${at}.`;
    return;
  }
  // Connected, but the relay is not listening to PostgreSQL: /readyz says why (404 when probes are on [admin]).
  const why = await probe("/readyz");
  text.textContent = `The relay is not listening to PostgreSQL${why ? ` (${why})` : ""}: changes are not pushed until it is back. Checked ${at}.`;
}

/** GET a probe of the relay: its reasons (from JSON or text), "ok" when it answers without any, "" when it does not. */
async function probe(path) {
  try {
    const answer = await fetch(new URL(path, location), { cache: "no-store" });
    if (answer.status === 404) return "";
    const body = (await answer.text()).trim();
    try {
      const parsed = JSON.parse(body);
      if (Array.isArray(parsed.reasons) && parsed.reasons.length) return parsed.reasons.join("; ");
    } catch {
      // a plain-text probe answer: shown as it is
    }
    return body.length > 200 ? `${body.slice(0, 200)}…` : body || "ok";
  } catch {
    return "";
  }
}

function showNote(message) {
  $("empty").hidden = false;
  $("empty").textContent = message;
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function render() {
  renderStability();
  if (!channel) return;
  const entries = [...client.entries(channel).values()].sort(byActivity);
  const list = $("keys");
  const existing = new Map([...list.children].map((item) => [item.dataset.key, item]));
  const items = entries.map((entry) => {
    const item = existing.get(entry.key) ?? createItem(entry.key);
    existing.delete(entry.key);
    fillItem(item, entry);
    return item;
  });
  existing.forEach((item) => item.remove());
  items.forEach((item, index) => {
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] ?? null);
  });
  const active = entries.filter((entry) => !entry.progress?.terminal).length;
  $("empty").hidden = entries.length > 0;
  if (!entries.length && client.status.connection === "open") {
    $("empty").textContent = `No active keys on ${channel}. New ones appear here as they start.`;
  }
  $("summary").textContent = `${active} active · ${entries.length - active} finished · updated ${new Date().toLocaleTimeString()}`;
  document.title = `${active ? `(${active}) ` : ""}notifyrelay · ${channel}`;
}

function byActivity(a, b) {
  const terminal = Number(Boolean(a.progress?.terminal)) - Number(Boolean(b.progress?.terminal));
  if (terminal) return terminal;
  return a.key.localeCompare(b.key, undefined, { numeric: true });
}

function createItem(key) {
  const item = document.createElement("li");
  item.className = "key";
  item.dataset.key = key;
  item.innerHTML = `
    <div class="line">
      <span class="name"></span><span class="status"></span><span class="stalled" hidden>stalled</span>
      <span class="message"></span>
    </div>
    <div class="bar"><div class="fill"></div></div>
    <div class="figures"><span class="count"></span><span class="percent"></span><span class="rate"></span><span class="eta"></span></div>`;
  item.querySelector(".name").textContent = `#${key}`;
  return item;
}

function fillItem(item, entry) {
  const progress = entry.progress;
  const row = entry.row ?? {};
  const status = progress?.status ?? row.status ?? (entry.stale ? "unknown" : "");
  item.dataset.status = status;
  item.dataset.terminal = String(Boolean(progress?.terminal));
  item.dataset.failed = String(Boolean(progress?.failed));
  item.dataset.stale = String(entry.stale);
  item.dataset.stalled = String(Boolean(progress?.stalled));
  item.querySelector(".status").textContent = status;
  item.querySelector(".stalled").hidden = !progress?.stalled;
  item.querySelector(".message").textContent = row.message ?? describePayload(entry.payload);
  const bar = item.querySelector(".bar");
  const fill = item.querySelector(".fill");
  const percent = progress?.percent;
  bar.hidden = !progress;
  bar.dataset.indeterminate = String(progress != null && percent == null && !progress.terminal);
  fill.style.width = `${percent ?? (progress?.terminal ? 100 : 0)}%`;
  fill.dataset.percent = percent == null ? "" : String(percent);
  fill.dataset.done = progress?.done == null ? "" : String(progress.done);
  item.querySelector(".count").textContent =
    progress?.done == null ? "" : progress.total ? `${fmt(progress.done)} / ${fmt(progress.total)}` : `${fmt(progress.done)} done`;
  item.querySelector(".percent").textContent = percent == null ? "" : `${percent.toFixed(1)}%`;
  item.querySelector(".rate").textContent =
    progress?.rate_per_s == null || progress.terminal ? "" : `${progress.rate_per_s.toFixed(1)}/s`;
  item.querySelector(".eta").textContent =
    progress?.eta_s == null || progress.terminal ? "" : `ETA ${duration(progress.eta_s)}`;
}

function renderStability() {
  const badge = $("stability");
  if (badge.hidden) return;
  const state = client.get(STABILITY, "system")?.payload;
  if (!state || typeof state !== "object") {
    badge.dataset.state = "unknown";
    badge.textContent = "system ?";
    badge.title = "system_stability: no change seen yet";
    return;
  }
  badge.dataset.state = state.state;
  badge.textContent = state.state === "stable" ? "system stable" : `system ${state.state} · ${state.active} active`;
  badge.title = `system_stability: ${JSON.stringify(state)}`;
}

function describePayload(payload) {
  if (payload === undefined || payload === null) return "";
  return typeof payload === "string" ? payload : JSON.stringify(payload);
}

function fmt(number) {
  return Number(number).toLocaleString();
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

$("channel").addEventListener("change", (event) => {
  if (channel) client.unfollow(channel);
  channel = event.target.value;
  const url = new URL(location);
  url.searchParams.set("channel", channel);
  history.replaceState(null, "", url);
  follow();
});

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim() || null;
  if (token) sessionStorage.setItem(TOKEN_STORE, token);
  else sessionStorage.removeItem(TOKEN_STORE);
  $("auth").hidden = true;
  start();
});

start();
