"""Property-based fuzzing of a LIVE relay: hypothesis generates hostile frames, real websocket clients send them.

The relay runs on its own event loop in a thread, so that hypothesis drives plain (synchronous) websockets clients
against it. Properties, for every generated frame:

- a frame within ``max_message_bytes`` that is valid UTF-8 (or binary) gets exactly one answer, a well-formed
  ``ack``, ``pong`` or ``error`` frame with a documented code, and the connection stays open;
- a larger frame closes the connection with 1009, a text frame that is not UTF-8 with 1007;
- after every example a well-behaved client, connected throughout, still receives a notification;
- nothing is logged as a crash, and no connection is closed with 1011 (internal error).

The number of hostile frames sent is printed at the end (and recorded as the ``hostile_frames`` property).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from notifyrelay.app import Relay
from tests.conftest import Database, relay_config, sample

CHANNEL = "activity_progress"
MAX_MESSAGE_BYTES = 4096
EXAMPLES = 300
ERROR_CODES = {
    "bad_json", "bad_request", "unknown_op", "unknown_channel", "too_many_subscriptions", "forbidden", "rate_limited",
}
T = TypeVar("T")


class ThreadedRelay:
    """A relay on an event loop of its own, in a daemon thread, driven from the test's thread."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay-loop", daemon=True)
        self.thread.start()

        async def build() -> Relay:
            return Relay(relay_config(database.dsn, **{
                "coalesce.window_ms": 0, "server.max_message_bytes": MAX_MESSAGE_BYTES,
            }))

        self.relay = self.call(build)
        self.running = asyncio.run_coroutine_threadsafe(self.relay.run(), self.loop)

        async def ready() -> None:
            await asyncio.wait_for(self.relay.started.wait(), 10)
            async with asyncio.timeout(10):
                while not self.relay.listener.up:
                    await asyncio.sleep(0.02)

        self.call(ready)

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(timeout)

    def notify(self, payload: str) -> None:
        self.call(lambda: self.database.notify(CHANNEL, payload))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.relay.request_stop)
        self.running.result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def threaded_relay(database: Database) -> Iterator[ThreadedRelay]:
    relay = ThreadedRelay(database)
    yield relay
    relay.stop()


# What a hostile client sends. Text avoids lone surrogates only because a str holding one cannot be sent at all;
# invalid UTF-8 on the wire is generated separately, as bytes sent in a text frame.
@dataclass(frozen=True)
class Frame:
    kind: str  # "text", "binary", "invalid_utf8" or "fragments"
    data: Any

    @property
    def size(self) -> int:
        if self.kind == "fragments":
            return sum(len(part.encode()) for part in self.data)
        return len(self.data.encode()) if isinstance(self.data, str) else len(self.data)

    def send(self, ws: ClientConnection) -> None:
        if self.kind == "invalid_utf8":
            ws.send(self.data, text=True)
        elif self.kind == "fragments":
            ws.send(iter(self.data))
        else:
            ws.send(self.data)


def encode(value: Any) -> str:
    return msgspec.json.encode(value).decode()


text = st.text(st.characters(codec="utf-8"), max_size=40)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5), max_leaves=15
)
keys = (
    st.lists(st.sampled_from(["*", "", "42", "43", " ", "\x00", "é" * 600]) | text | json_values, max_size=12)
    | json_values
    | st.integers(0, 1500).map(lambda n: [f"k{i}" for i in range(n)])  # huge arrays, some past the frame limit
    | st.integers(900, 5000).map(lambda n: ["k" * n])  # enormous keys
)
shaped = st.fixed_dictionaries(
    {"op": st.sampled_from(["subscribe", "unsubscribe", "ping"]) | text | json_values},
    optional={
        "channel": st.sampled_from([CHANNEL, "nope", "", CHANNEL.upper()]) | text | json_values,
        "keys": keys,
        "id": st.sampled_from(["c1", "", "i" * 128, "i" * 129]) | text | json_values,
    },
).map(encode)
# Frames that are nearly right, so that the checks past the parser (channels, keys, limits) are reached too.
near_valid = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["subscribe", "unsubscribe", "ping"]),
        "channel": st.sampled_from([CHANNEL, CHANNEL, "nope"]),
        "keys": st.lists(st.sampled_from(["*", "42", "43", ""]) | text, min_size=1, max_size=8),
    },
    optional={"id": st.sampled_from(["c1", "i" * 128]) | text},
).map(encode)
nested = st.tuples(st.sampled_from(["[", "{\"a\":", "[{\"x\":"]), st.integers(1, 3000), st.booleans()).map(
    lambda t: t[0] * t[1] + ("" if t[2] else "]" * t[1])
)
mutated = st.tuples(shaped, st.integers(0, 200), st.sampled_from(["", "}", "\"", "\\", ",", "\u2028"])).map(
    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
)
text_frames = near_valid | shaped | json_values.map(encode) | text | nested | mutated
invalid_utf8 = st.binary(min_size=1, max_size=60).filter(lambda b: not _is_utf8(b))
frames = st.one_of(
    text_frames.map(lambda data: Frame("text", data)),
    st.binary(max_size=300).map(lambda data: Frame("binary", data)),
    invalid_utf8.map(lambda data: Frame("invalid_utf8", data)),
    st.lists(text, min_size=1, max_size=5).map(lambda parts: Frame("fragments", parts)),
    st.integers(MAX_MESSAGE_BYTES - 2, MAX_MESSAGE_BYTES + 2).map(lambda n: Frame("text", '"' + "x" * n + '"')),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def check_answer(raw: str | bytes) -> dict[str, Any]:
    """An answer must be one JSON text frame of a documented shape."""
    assert isinstance(raw, str), raw
    frame = msgspec.json.decode(raw)
    assert isinstance(frame, dict), frame
    kind = frame.get("type")
    if kind == "error":
        assert frame["code"] in ERROR_CODES, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
        assert set(frame) <= {"type", "code", "message", "id"}, frame
    elif kind == "pong":
        assert set(frame) <= {"type", "id"}, frame
    elif kind == "ack":
        assert frame["op"] in ("subscribe", "unsubscribe") and frame["channel"] == CHANNEL, frame
        assert frame["keys"] and all(isinstance(key, str) and key for key in frame["keys"]), frame
    else:
        raise AssertionError(f"unexpected answer {frame!r}")
    if "id" in frame:
        assert isinstance(frame["id"], str) and len(frame["id"]) <= 128, frame
    return frame


def test_live_relay_survives_generated_hostile_frames(
    threaded_relay: ThreadedRelay, record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Hypothesis-generated hostile frames each get a well-formed answer or a documented close (1007, 1009), none
    crashes anything, and a well-behaved client beside them receives its notification after every example."""
    url = threaded_relay.relay.server.url
    stack = contextlib.ExitStack()
    sent = 0
    probes = 0
    outcomes: collections.Counter[str] = collections.Counter()
    good = stack.enter_context(connect(f"{url}?channel={CHANNEL}&key=*", open_timeout=5, close_timeout=1))
    assert msgspec.json.decode(good.recv(5))["type"] == "welcome"
    assert msgspec.json.decode(good.recv(5))["type"] == "ack"

    def still_served() -> None:
        nonlocal probes
        probes += 1
        key = f"probe-{probes}"
        threaded_relay.notify(key)
        while True:
            frame = msgspec.json.decode(good.recv(5))
            if frame["type"] == "notify" and key in frame["keys"]:
                return

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(frames, min_size=1, max_size=12))
    def throw(batch: list[Frame]) -> None:
        nonlocal sent
        with contextlib.ExitStack() as connections:

            def hostile() -> ClientConnection:
                ws = connections.enter_context(connect(url, open_timeout=5, close_timeout=1, max_size=2**20))
                assert msgspec.json.decode(ws.recv(5))["type"] == "welcome"
                return ws

            ws = hostile()
            for frame in batch:
                if ws.close_code is not None:  # the last frame closed it, as documented: carry on with a new one
                    ws = hostile()
                sent += 1
                expected_close = (
                    1009 if frame.size > MAX_MESSAGE_BYTES else 1007 if frame.kind == "invalid_utf8" else None
                )
                try:
                    frame.send(ws)
                    answer = ws.recv(5)
                except ConnectionClosed:
                    assert ws.close_code == expected_close, (frame, ws.close_code)
                    outcomes[f"close {ws.close_code}"] += 1
                    continue
                assert expected_close is None, (frame, answer)
                reply = check_answer(answer)
                outcomes[reply["type"] + (f" {reply['code']}" if reply["type"] == "error" else "")] += 1
        still_served()

    with capture_logs() as events, stack:
        throw()
    crashes = [e for e in events if e["log_level"] in ("error", "critical", "exception")]
    assert not crashes, crashes[:3]
    assert sample(threaded_relay.relay.metrics, "notifyrelay_connections_closed_total", code="1011") == 0
    record_property("hostile_frames", sent)
    with capsys.disabled():
        print(f"\nhostile frames sent to the live relay: {sent} in {probes} examples, each followed by a delivered "
              f"probe notification; answers: {dict(outcomes.most_common())}")
    assert sent >= EXAMPLES
