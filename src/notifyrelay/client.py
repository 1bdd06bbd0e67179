"""``notifyrelay.client``: follow keys on a relay from Python, with their live state, through restarts and outages.

    from notifyrelay.client import RelayClient

    async with RelayClient("ws://127.0.0.1:8765/ws", follow={"activity_progress": ["42"]}) as client:
        async for event in client:
            if event.type in ("notify", "snapshot"):
                for key in event.keys:
                    print(key, client.state["activity_progress"][key].progress)
            elif event.refetch:
                ...  # a hint channel lost notifications, or a state query failed: fetch what you follow yourself

What it does so that its caller does not have to:

- connects with the ``websockets`` asyncio client, subscribes to what it follows (``follow=`` or :meth:`follow`),
  and after any loss reconnects with exponential backoff and full jitter, forever, until :meth:`close`;
- remembers each channel's resume position (the last ``ts``) and subscribes again with ``since``, so that the relay
  replays what changed meanwhile (or sends a snapshot, or a ``resync``);
- applies ``snapshot`` and ``notify`` frames (``rows``, ``gone``, ``progress``) to :attr:`RelayClient.state`,
  a mapping channel -> key -> :class:`KeyState`;
- marks the events after which the caller must fetch for itself (``resync`` of a hint channel, a ``state_error``)
  with ``refetch=True``, and, with ``poll_interval_s``, yields ``poll`` events while the relay is unreachable or its
  listener is down, so that a caller can fall back to polling and stop as soon as :attr:`RelayClient.live` again;
- raises :class:`RelayRefused` when the relay refuses what was asked in a way no retry can fix: a subscribe refused
  with ``unknown_channel``, ``forbidden``, ``bad_request`` or ``too_many_subscriptions``, or a handshake answered
  with 400, 401, 403 or 404. ``error`` frames of any other kind are yielded as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .exceptions import NotifyRelayError

__all__ = ["ConnectionState", "Event", "KeyState", "Progress", "RelayClient", "RelayRefused", "url_hint"]

ConnectionState = Literal["connecting", "open", "backoff", "closed"]

# Subscribe errors that retrying cannot fix: the caller asked for something this relay will never give.
FATAL_SUBSCRIBE_CODES = frozenset({"unknown_channel", "forbidden", "bad_request", "too_many_subscriptions"})
# Handshake answers that retrying cannot fix; any other (503 over capacity, a proxy's 502) is retried.
_FATAL_HTTP = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found"}


class RelayRefused(NotifyRelayError):
    """The relay refused a subscribe or the handshake for good. ``message`` is the relay's own sentence."""

    def __init__(self, code: str, message: str, *, channel: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.channel = channel


@dataclass(frozen=True, slots=True)
class Progress:
    """A key's progress as the relay computed it from its row (``[channels.progress]``); None where not known."""

    done: float | None = None
    total: float | None = None
    percent: float | None = None
    rate_per_s: float | None = None
    eta_s: float | None = None
    status: str | None = None
    terminal: bool = False
    failed: bool = False
    stalled: bool = False

    @classmethod
    def from_frame(cls, value: Mapping[str, Any]) -> Progress:
        """Read one entry of a frame's ``progress`` member, ignoring members this client does not know."""

        def number(name: str) -> float | None:
            item = value.get(name)
            return item if isinstance(item, int | float) and not isinstance(item, bool) else None

        status = value.get("status")
        return cls(
            done=number("done"), total=number("total"), percent=number("percent"),
            rate_per_s=number("rate_per_s"), eta_s=number("eta_s"),
            status=None if status is None else str(status),
            terminal=value.get("terminal") is True, failed=value.get("failed") is True,
            stalled=value.get("stalled") is True,
        )


@dataclass(slots=True)
class KeyState:
    """What this client knows of one key: its last row and progress (state channels), and when it last changed."""

    row: dict[str, Any] | None = None
    progress: Progress | None = None
    changes: int = 0
    changed_at: float = 0.0  # time.time() of the last frame that named this key
    state_error: str | None = None  # the relay could not attach this key's row to the last frame ("too_large", ...)
    payload: Any = None  # the last payload (channels with include_payload)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, in order.

    ``type`` is a relay frame type (``welcome``, ``ack``, ``notify``, ``snapshot``, ``resync``, ``status``,
    ``error``, ``pong``, or any newer one) with the frame in ``frame``, or one of the client's own: ``disconnected``
    (``detail`` says why, ``retry_in_s`` when it tries again) and ``poll`` (fetch for yourself now: not live).
    ``keys`` are the keys whose state changed (for ``resync``: every key followed on the channel), ``gone`` the
    keys whose row no longer exists. ``refetch`` is True when the caller must fetch ``keys`` itself.
    """

    type: str
    channel: str | None = None
    keys: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()
    refetch: bool = False
    frame: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""
    retry_in_s: float | None = None


# The relay's other paths: a URL ending in one of them is surely not its websocket.
_RELAY_PATHS = ("/ui", "/sse", "/stream", "/healthz", "/readyz", "/metrics", "/client.js")


def url_hint(url: str, *, certain: bool = True) -> str | None:
    """The websocket URL the user meant, when ``url`` is surely not one (``http://h:8765`` -> ``ws://h:8765/ws``).

    Surely not: an http(s) URL, no path, or another path of the relay's. Any other path may be a reverse proxy's
    own name for ``/ws``; with ``certain=False`` the guess (the path + ``/ws``) is returned for it too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        return None
    path = parts.path.rstrip("/")
    surely = scheme != parts.scheme or not path
    if not path.endswith("/ws"):
        for suffix in _RELAY_PATHS:  # keep a prefix a reverse proxy may add
            if path.endswith(suffix):
                path, surely = path.removesuffix(suffix), True
        path += "/ws"
    suggestion = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    if suggestion == url or (certain and not surely and parts.path.rstrip("/") != path):
        return None
    return suggestion


class RelayClient:
    """A reconnecting client of one relay: iterate it for :class:`Event` values; read :attr:`state` any time.

    ``follow`` maps a channel to the keys to follow (``["*"]`` for every key). ``token`` is sent as
    ``Authorization: Bearer``. ``since`` gives resume positions (channel -> ``ts``) from an earlier run.
    """

    def __init__(
        self,
        url: str,
        *,
        follow: Mapping[str, Iterable[str]] | None = None,
        token: str | None = None,
        since: Mapping[str, int] | None = None,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 10.0,
        poll_interval_s: float | None = None,
        open_timeout_s: float = 10.0,
        max_frame_bytes: int = 2**24,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.state: dict[str, dict[str, KeyState]] = {}
        #: channel -> the ``ts`` of the last frame that carried one: where a reconnect resumes.
        self.positions: dict[str, int] = dict(since or {})
        self.connection: ConnectionState = "connecting"
        #: the relay's LISTEN connection as it last said ("up" / "down"); None before the first welcome.
        self.listener: str | None = None
        self.instance: str | None = None
        self.protocol: int | None = None
        self.channels: tuple[str, ...] = ()
        self.reconnects = 0
        self._follow: dict[str, list[str]] = {}
        for channel, keys in (follow or {}).items():
            self._add_follow(channel, keys)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._poll_interval_s = poll_interval_s
        self._open_timeout_s = open_timeout_s
        self._max_frame_bytes = max_frame_bytes
        self._rng = rng or random.Random()
        self._attempt = 0
        self._ws: ClientConnection | None = None
        self._pending: dict[str, str] = {}  # subscribe id -> channel, until acked
        self._subscribed: set[str] = set()  # channels subscribed on some connection: a re-subscribe resumes
        self._stateful: set[str] = set()  # channels seen carrying rows: their subscribe brings a snapshot
        self._request_ids = 0
        self._closed = asyncio.Event()
        self._next_poll: float | None = None
        self._events: AsyncGenerator[Event, None] = self._run()
        self._step: asyncio.Future[Event | None] | None = None

    # -- what callers read ------------------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """True while connected and the relay's listener is up: notifications arrive as they happen."""
        return self.connection == "open" and self.listener == "up"

    @property
    def following(self) -> dict[str, list[str]]:
        """Channel -> the keys this client follows (a copy)."""
        return {channel: list(keys) for channel, keys in self._follow.items()}

    # -- what callers do --------------------------------------------------------------------------------------

    async def follow(self, channel: str, keys: Iterable[str] = ("*",)) -> None:
        """Follow more keys of a channel, now if connected and after every reconnect."""
        added = self._add_follow(channel, keys)
        if added and self._ws is not None and self.connection == "open":
            await self._subscribe(self._ws, channel, added)

    async def unfollow(self, channel: str, keys: Iterable[str] | None = None) -> None:
        """Stop following some keys of a channel (all of them when ``keys`` is None) and forget their state."""
        followed = self._follow.get(channel, [])
        dropped = list(followed) if keys is None else [key for key in keys if key in followed]
        if not dropped:
            return
        self._follow[channel] = [key for key in followed if key not in dropped]
        if not self._follow[channel]:
            del self._follow[channel]
        table = self.state.get(channel, {})
        for key in dropped:
            table.pop(key, None)
        if self._ws is not None and self.connection == "open":
            await self._send(self._ws, {"op": "unsubscribe", "channel": channel, "keys": dropped})

    async def close(self) -> None:
        """Stop: close the connection and end the iteration. Idempotent."""
        self._closed.set()
        self.connection = "closed"
        if self._ws is not None:
            await self._ws.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        # The step runs as its own task, shielded: a caller that cancels its wait (asyncio.timeout around a
        # loop) leaves the connection and its frames intact, and the next call picks up the same step.
        if self._step is None:
            self._step = asyncio.ensure_future(self._next_event())
        try:
            event = await asyncio.shield(self._step)
        finally:
            if self._step.done():
                self._step = None
        if event is None:
            raise StopAsyncIteration
        return event

    async def _next_event(self) -> Event | None:
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return None

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        step, self._step = self._step, None
        if step is not None and not step.done():
            # close() ends the step at once (the connection is closed, the backoff wait wakes up).
            await asyncio.wait([step], timeout=self._open_timeout_s)
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await self._events.aclose()

    # -- the connection loop ----------------------------------------------------------------------------------

    async def _run(self) -> AsyncGenerator[Event, None]:
        while not self._closed.is_set():
            self.connection = "connecting"
            detail = ""
            try:
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
                    open_timeout=self._open_timeout_s,
                    max_size=self._max_frame_bytes,
                    compression=None,
                ) as ws:
                    self._ws = ws
                    async for event in self._session(ws):
                        yield event
                    detail = _closed_detail(ws)
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
                message = _http_message(status, body, self.url)
                if status in _FATAL_HTTP:
                    raise RelayRefused(_http_code(body) or _FATAL_HTTP[status], message) from None
                detail = message
            except InvalidURI as exc:
                raise RelayRefused("bad_url", str(exc)) from None
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                detail = str(exc) or type(exc).__name__
            finally:
                self._ws = None
                self._pending.clear()
            if self._closed.is_set():
                break
            self.connection = "backoff"
            self._became_not_live()
            # Full jitter under an exponential cap; the exponent stops growing long before a float would overflow.
            ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(self._attempt, 32))
            delay = self._rng.uniform(0, ceiling)
            self._attempt += 1
            self.reconnects += 1
            yield Event("disconnected", detail=detail, retry_in_s=delay)
            async for event in self._wait(delay):
                yield event
        self.connection = "closed"

    async def _wait(self, delay: float) -> AsyncGenerator[Event, None]:
        """Sleep ``delay`` seconds (less if closed), yielding ``poll`` events when due."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not self._closed.is_set() and (left := deadline - loop.time()) > 0:
            poll_in = self._poll_due_in()
            try:
                await asyncio.wait_for(self._closed.wait(), left if poll_in is None else min(left, poll_in))
            except TimeoutError:
                if self._poll_due_in() == 0:
                    yield self._poll()

    async def _session(self, ws: ClientConnection) -> AsyncGenerator[Event, None]:
        """One connection's frames, as events, until it closes."""
        while True:
            poll_in = self._poll_due_in()
            try:
                message = await asyncio.wait_for(ws.recv(), poll_in)  # cancelling recv() loses no message
            except TimeoutError:
                yield self._poll()
                continue
            except ConnectionClosed:
                return
            try:
                frame = msgspec.json.decode(message)
            except msgspec.DecodeError:
                continue  # not a frame of this protocol: nothing a caller could do with it
            if not isinstance(frame, dict):
                continue
            async for event in self._apply(ws, frame):
                yield event

    async def _apply(self, ws: ClientConnection, frame: dict[str, Any]) -> AsyncGenerator[Event, None]:
        kind = str(frame.get("type", ""))
        channel = frame.get("channel") if isinstance(frame.get("channel"), str) else None
        if isinstance(frame.get("ts"), int) and channel is not None:
            self.positions[channel] = frame["ts"]
        if kind == "welcome":
            self.protocol = frame.get("protocol") if isinstance(frame.get("protocol"), int) else None
            self.instance = frame.get("instance") if isinstance(frame.get("instance"), str) else None
            self.channels = tuple(str(name) for name in frame.get("channels", ()))
            self.connection = "open"
            self._attempt = 0
            self._set_listener(frame.get("listener"))
            blind = [followed for followed, keys in list(self._follow.items())
                     if not await self._subscribe(ws, followed, keys)]
            yield Event("welcome", frame=frame)
            for followed in blind:
                # Followed before, but nothing says from when to resume: whatever changed meanwhile is unknown.
                yield Event("resync", channel=followed, keys=self._followed_keys(followed), refetch=True,
                            detail="reconnected with no resume position: refetch what you follow")
        elif kind in ("notify", "snapshot") and channel is not None:
            yield self._apply_rows(kind, channel, frame)
        elif kind == "resync" and channel is not None:
            yield Event("resync", channel=channel, keys=self._followed_keys(channel), refetch=True, frame=frame)
        elif kind == "status":
            self._set_listener(frame.get("listener"))
            yield Event("status", frame=frame)
        elif kind == "ack":
            self._pending.pop(str(frame.get("id")), None)
            yield Event("ack", channel=channel, keys=tuple(frame.get("keys", ())), frame=frame)
        elif kind == "error":
            refused = self._pending.pop(str(frame.get("id")), None) if frame.get("id") is not None else None
            code, message = str(frame.get("code", "")), str(frame.get("message", ""))
            if refused is not None and code in FATAL_SUBSCRIBE_CODES:
                raise RelayRefused(code, message, channel=refused)
            yield Event("error", channel=refused, detail=message, frame=frame)
        else:
            yield Event(kind, channel=channel, frame=frame)

    def _apply_rows(self, kind: str, channel: str, frame: Mapping[str, Any]) -> Event:
        rows: Mapping[str, Any] = frame.get("rows") or {}
        progress: Mapping[str, Any] = frame.get("progress") or {}
        payloads: Mapping[str, Any] = frame.get("payloads") or {}
        gone = tuple(str(key) for key in frame.get("gone") or ())
        errored = {str(key) for key in frame.get("state_error_keys") or ()}
        if kind == "snapshot":
            keys = tuple(dict.fromkeys([*rows, *progress]))
        else:
            keys = tuple(str(key) for key in frame.get("keys") or ())
        if "rows" in frame:
            self._stateful.add(channel)
        table = self.state.setdefault(channel, {})
        if kind == "snapshot" and "*" in self._follow.get(channel, ()):
            # A "*" snapshot is the relay's whole list of active keys: what it leaves out is no longer active.
            dropped = tuple(key for key in table if key not in keys and key not in gone)
            for key in dropped:
                del table[key]
            gone += dropped
        now = time.time()
        error = frame.get("state_error")
        for key in keys:
            if key in gone:
                continue
            entry = table.get(key)
            if entry is None:
                entry = table[key] = KeyState()
            entry.changes += 1
            entry.changed_at = now
            if key in rows and isinstance(rows[key], dict):
                entry.row = rows[key]
            if key in progress and isinstance(progress[key], Mapping):
                entry.progress = Progress.from_frame(progress[key])
            if key in payloads:
                entry.payload = payloads[key]
            entry.state_error = str(error) if error and (key in errored or key not in rows) else None
        for key in gone:
            table.pop(key, None)
        # Without rows for its keys (a timeout, a failed query), a state frame is only a hint again.
        refetch = bool(error)
        return Event(kind, channel=channel, keys=keys, gone=gone, refetch=refetch, frame=frame)

    # -- helpers ----------------------------------------------------------------------------------------------

    def _add_follow(self, channel: str, keys: Iterable[str]) -> list[str]:
        followed = self._follow.setdefault(channel, [])
        added = [str(key) for key in dict.fromkeys(keys) if str(key) not in followed]
        followed.extend(added)
        if not followed:
            del self._follow[channel]
        return added

    def _followed_keys(self, channel: str) -> tuple[str, ...]:
        keys = self._follow.get(channel, [])
        if "*" in keys:
            return tuple(dict.fromkeys([*self.state.get(channel, {}), *(key for key in keys if key != "*")]))
        return tuple(keys)

    async def _subscribe(self, ws: ClientConnection, channel: str, keys: list[str]) -> bool:
        """Send a subscribe, resuming where this client left off. False when it was followed on an earlier
        connection but no resume position is known, and the relay will not send rows by itself: the caller
        must refetch."""
        self._request_ids += 1
        request_id = f"s{self._request_ids}"
        frame: dict[str, Any] = {"op": "subscribe", "channel": channel, "keys": keys, "id": request_id}
        since = self.positions.get(channel)
        if since is None and channel in self._subscribed and self.positions:
            # No frame with a ts came on this channel; one on another channel proves the relay's clock had
            # passed it, and nothing reached us here before then. The oldest such position is the safe one.
            since = min(self.positions.values())
        if since is not None and (self.protocol or 1) >= 2:
            frame["since"] = since  # resume: the relay replays, snapshots or resyncs
        resumable = since is not None or channel not in self._subscribed or channel in self._stateful
        self._subscribed.add(channel)
        self._pending[request_id] = channel
        await self._send(ws, frame)
        return resumable

    @staticmethod
    async def _send(ws: ClientConnection, frame: dict[str, Any]) -> None:
        # On a closed connection the session loop sees the close and reconnects, and subscribes again then.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(msgspec.json.encode(frame).decode())

    def _set_listener(self, value: object) -> None:
        self.listener = value if isinstance(value, str) else None
        if self.listener == "up":
            self._next_poll = None
        else:
            self._became_not_live()

    def _became_not_live(self) -> None:
        if self._poll_interval_s is not None and self._next_poll is None:
            self._next_poll = time.monotonic()  # poll at once, then every poll_interval_s

    def _poll_due_in(self) -> float | None:
        if self._next_poll is None or self.live:
            self._next_poll = None
            return None
        return max(0.0, self._next_poll - time.monotonic())

    def _poll(self) -> Event:
        assert self._poll_interval_s is not None
        self._next_poll = time.monotonic() + self._poll_interval_s
        return Event("poll", detail="the relay is unreachable" if self.connection != "open" else "listener down")


def _closed_detail(ws: ClientConnection) -> str:
    if ws.close_code is None:
        return "the connection was lost"
    return f"closed by the relay: {ws.close_code} {ws.close_reason}".rstrip()


def _http_code(body: str) -> str | None:
    """The ``code`` of a JSON error body, if the relay sent one."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    return str(decoded["code"]) if isinstance(decoded, dict) and "code" in decoded else None


def _http_message(status: int, body: str, url: str) -> str:
    """The relay's sentence for a refused handshake, with a hint when the URL is not the websocket path."""
    try:
        decoded = msgspec.json.decode(body)
        if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
            body = decoded["message"]
    except msgspec.DecodeError:
        pass
    message = f"HTTP {status}" + (f": {body}" if body else "")
    hint = url_hint(url, certain=False)
    if status == 404 and hint:
        message += f" (the relay's websocket is at {hint})"
    return message
