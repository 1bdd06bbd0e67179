"""The ordered per-channel streams between the coalescer and the fan-out, with a fake hub and fake state queries.

The streams are the one async stage with rules of their own (order, merging, replay before live, status up last),
so they are driven here on a real event loop but with nothing else real: the Delivery below routes and folds the
way the hub does, through real Sessions, and records every frame it is asked to write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from notifyrelay import protocol
from notifyrelay.config import ChannelConfig, HistoryConfig
from notifyrelay.delivery.session import Session
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pipeline.coalescer import Batch
from notifyrelay.pipeline.streams import Pipeline, Refresh
from notifyrelay.protocol import Subscribe

from .fakes import Rows

NOW_S = 1_800_000_000.0  # the streams' wall clock, fixed: frames they stamp themselves carry 1_800_000_000_000
NOW_MS = int(NOW_S * 1000)
GAP_START = datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC)
GAP_END = datetime(2027, 1, 15, 8, 0, 3, tzinfo=UTC)


@dataclass
class Sent:
    """One frame the streams asked the hub to write (session None: to everyone)."""

    kind: str
    session: Session | None
    frame: dict[str, Any]
    ts: int | None = None


class Delivery:
    """The hub as the streams see it: routes batches to sessions (folding for those that do not take them live)
    and records every frame written, in order."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.sent: list[Sent] = []
        self.published: list[Batch] = []
        self.max_pending_keys = 100

    def connect(self, *channel_keys: tuple[str, Sequence[str]], stateful: Sequence[str] = ()) -> Session:
        session = Session(grants=None, rate_per_s=100, burst=100, now=0.0, stateful=set(stateful))
        for channel, keys in channel_keys:
            session.subscribe(Subscribe(channel, tuple(keys)), limit=1000)
        self.sessions.append(session)
        return session

    def publish(self, batch: Batch) -> None:
        self.published.append(batch)
        for session in self.sessions:
            keys = [key for key in batch.keys if session.follows_key(batch.channel, key)]
            if not keys:
                continue
            if session.takes_live(batch.channel):
                body = self._notify(batch, keys)
                self.sent.append(Sent("notify", session, body, batch.ts))
            else:
                session.fold(batch.channel, batch.seq, batch.ts, keys, batch.payloads,
                             max_keys=self.max_pending_keys, now=GAP_END)

    @staticmethod
    def _notify(batch: Batch, keys: list[str]) -> dict[str, Any]:
        frame: dict[str, Any] = msgspec.json.decode(
            protocol.notify(batch.channel, batch.seq, batch.ts, keys, batch.payloads, state=batch.state)
        )
        return frame

    def resync(self, channel: str, reason: str, gap_start: datetime, gap_end: datetime, ts: int) -> None:
        frame = msgspec.json.decode(protocol.resync(channel, reason, gap_start, gap_end, ts))
        for session in self.subscribers(channel):
            self.sent.append(Sent("resync", session, frame, ts))

    def subscribers(self, channel: str) -> list[Session]:
        return [session for session in self.sessions if channel in session.follows]

    def is_connected(self, session: Session) -> bool:
        return session in self.sessions

    def send(
        self, session: Session, kind: str, body: bytes, ts: int | None = None, *, channel: str = "",
        progress: Mapping[str, Any] | None = None,
    ) -> None:
        self.sent.append(Sent(kind, session, msgspec.json.decode(body), ts))

    def listener_down(self) -> None:
        self.sent.append(Sent("status", None, {"listener": "down"}))

    def listener_up(self) -> None:
        self.sent.append(Sent("status", None, {"listener": "up"}))

    def to(self, session: Session) -> list[tuple[str, dict[str, Any]]]:
        """The frames one client received, in order."""
        return [(sent.kind, sent.frame) for sent in self.sent if sent.session is session]


class State:
    """A state channel's fetcher: rows named after their key and the fetch number, and a gate to hold a query."""

    def __init__(self, *, listed: Sequence[str] | None = None) -> None:
        self.listed = listed  # the keys list_query returns; None: the channel has no list_query
        self.fetches: list[list[str]] = []
        self.list_fetches = 0
        self.queries = 0  # every query, numbered in the order the stream issues them
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()  # set when a fetch begins (so a test knows the stream is now inside it)

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()

    async def fetch(self, keys: Sequence[str]) -> Rows:
        self.fetches.append(list(keys))
        self.queries += 1
        number = self.queries
        self.started.set()
        await self.gate.wait()
        return Rows(rows={key: {"key": key, "fetch": number} for key in keys if key != "gone"},
                    gone=[key for key in keys if key == "gone"])

    async def fetch_list(self) -> Rows | None:
        self.list_fetches += 1
        self.queries += 1
        number = self.queries
        await self.gate.wait()
        if self.listed is None:
            return None
        return Rows(rows={key: {"key": key, "fetch": number} for key in self.listed})


def batch(channel: str, seq: int, *keys: str, payloads: dict[str, Any] | None = None) -> Batch:
    return Batch(channel=channel, seq=seq, keys=list(keys), payloads=payloads, ts=NOW_MS - 100_000 + seq)


class Relay:
    """A pipeline running on the test's loop, its fake hub and its fake state sources."""

    def __init__(self, *, hint: Sequence[str] = ("h",), state: dict[str, State] | None = None,
                 overlap_ms: int = 0) -> None:
        self.delivery = Delivery()
        self.task: asyncio.Task[None] | None = None
        self.states = state or {}
        channels = [ChannelConfig(name=name) for name in [*hint, *self.states]]
        self.pipeline = Pipeline(
            channels, history=HistoryConfig(max_keys=1000, overlap_ms=overlap_ms), delivery=self.delivery,
            metrics=Metrics(), states=dict(self.states), wall_clock=lambda: NOW_S,
        )

    def connect(self, *channel_keys: tuple[str, Sequence[str]]) -> Session:
        return self.delivery.connect(*channel_keys, stateful=list(self.states))

    def listening(self, *channels: str, since_ms: int = 0) -> None:
        for channel in channels:
            self.pipeline.streams[channel].history.gap(since_ms)

    async def settle(self) -> None:
        """Let every stream deliver what it holds."""
        await asyncio.sleep(0)
        await self.pipeline.idle()
        await asyncio.sleep(0)

    async def status_up(self) -> None:
        """Wait (a bounded number of loop turns, no clock) until status up has been announced."""
        for _ in range(100):
            if any(sent.frame == {"listener": "up"} for sent in self.delivery.sent):
                return
            await asyncio.sleep(0)
        raise AssertionError("status up was never announced")


@pytest.fixture
async def running() -> AsyncIterator[list[Relay]]:
    """Relays made in a test run until the test ends."""
    relays: list[Relay] = []
    yield relays
    for relay in relays:
        assert relay.task is not None
        relay.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay.task


def start(running: list[Relay], relay: Relay) -> Relay:
    """Run the relay's pipeline until the test ends."""
    relay.task = asyncio.get_running_loop().create_task(relay.pipeline.run())
    running.append(relay)
    return relay


# Order and merging.


async def test_batches_are_delivered_in_seq_order_and_remembered(running: list[Relay]) -> None:
    """A channel's batches reach the hub in the order published, each recorded in the channel's history first."""
    relay = start(running, Relay())
    session = relay.connect(("h", ["*"]))
    for seq in range(1, 6):
        relay.pipeline.publish(batch("h", seq, f"k{seq}"))
    relay.pipeline.publish(batch("nope", 1, "x"))  # a channel this pipeline does not relay is ignored
    await relay.settle()
    assert [b.seq for b in relay.delivery.published] == [1, 2, 3, 4, 5]
    assert [frame["seq"] for _, frame in relay.delivery.to(session)] == [1, 2, 3, 4, 5]
    history = relay.pipeline.streams["h"].history
    assert (history.seq, history.ts, len(history)) == (5, NOW_MS - 100_000 + 5, 5)


async def test_hint_batches_are_never_merged(running: list[Relay]) -> None:
    """On a hint channel every batch goes out as it is, even when several are queued at once."""
    relay = start(running, Relay())
    for seq in range(1, 4):
        relay.pipeline.publish(batch("h", seq, "k"))
    await relay.settle()
    assert [(b.seq, b.keys) for b in relay.delivery.published] == [(1, ["k"]), (2, ["k"]), (3, ["k"])]


async def test_backlog_batches_are_merged_on_a_state_channel(running: list[Relay]) -> None:
    """Batches queued behind a slow state query are fetched as one: every key once, the last payload, newest seq/ts."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["*"]))
    state.hold()
    relay.pipeline.publish(batch("s", 1, "a"))
    await state.started.wait()
    relay.pipeline.publish(batch("s", 2, "a", "b", payloads={"a": "a2", "b": "b2"}))
    relay.pipeline.publish(batch("s", 3, "c", "b", payloads={"c": "c3", "b": "b3"}))
    state.gate.set()
    await relay.settle()
    assert state.fetches == [["a"], ["a", "b", "c"]]
    merged = relay.delivery.published[1]
    assert (merged.seq, merged.ts, merged.keys) == (3, NOW_MS - 100_000 + 3, ["a", "b", "c"])
    assert merged.payloads == {"a": "a2", "b": "b3", "c": "c3"}
    frames = relay.delivery.to(session)
    assert [(frame["seq"], frame["keys"]) for _, frame in frames] == [(1, ["a"]), (3, ["a", "b", "c"])]
    assert frames[1][1]["rows"]["b"] == {"key": "b", "fetch": 2}


async def test_a_queued_request_stops_the_merge(running: list[Relay]) -> None:
    """Batches on either side of a queued snapshot request are not merged across it, so the order holds."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["1"]))
    state.hold()
    relay.pipeline.publish(batch("s", 1, "1"))
    await state.started.wait()
    relay.pipeline.publish(batch("s", 2, "1"))
    relay.pipeline.request(session, Refresh("s", ("1",), None, "subscribe"))
    relay.pipeline.publish(batch("s", 3, "1"))
    state.gate.set()
    await relay.settle()
    assert [b.seq for b in relay.delivery.published] == [1, 2, 3]
    assert state.fetches == [["1"], ["1"], ["1"], ["1"]]
    # Batches 1 and 2 were delivered while the snapshot was queued: folded into it; batch 3 went live after it.
    assert [(kind, frame["seq"]) for kind, frame in relay.delivery.to(session)] == [("snapshot", 2), ("notify", 3)]


# Snapshots and refresh requests.


async def test_refresh_requests_queued_together_are_served_by_one_query(running: list[Relay]) -> None:
    """Subscribes arriving together are served by one fetch of all their keys; each client gets only its rows."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    state.hold()
    relay.pipeline.publish(batch("s", 1, "0"))
    await state.started.wait()
    clients = [relay.connect(("s", [str(n), "shared"])) for n in (1, 2, 3)]
    for client in clients:
        relay.pipeline.request(client, Refresh("s", tuple(sorted(client.follows["s"])), None, "subscribe"))
    state.gate.set()
    await relay.settle()
    assert state.fetches == [["0"], ["1", "shared", "2", "3"]]
    for n, client in enumerate(clients, start=1):
        [(kind, frame)] = relay.delivery.to(client)
        assert kind == "snapshot"
        assert frame == {"type": "snapshot", "channel": "s", "seq": 1, "ts": NOW_MS,
                         "rows": {str(n): {"key": str(n), "fetch": 2}, "shared": {"key": "shared", "fetch": 2}},
                         "gone": []}
        assert client.takes_live("s")


async def test_wildcard_subscribes_are_served_by_one_list_query(running: list[Relay]) -> None:
    """A "*" subscribe on a state channel gets the rows of list_query, once for every such client."""
    state = State(listed=["1", "2"])
    relay = start(running, Relay(state={"s": state}))
    first = relay.connect(("s", ["*"]))
    second = relay.connect(("s", ["*"]))
    for client in (first, second):
        relay.pipeline.request(client, Refresh("s", ("*",), None, "subscribe"))
    await relay.settle()
    assert state.list_fetches == 1 and state.fetches == []
    for client in (first, second):
        [(kind, frame)] = relay.delivery.to(client)
        assert kind == "snapshot" and sorted(frame["rows"]) == ["1", "2"]


async def test_a_subscribe_on_a_hint_channel_without_since_sends_nothing(running: list[Relay]) -> None:
    """Without since, a hint channel has nothing to send a new subscriber, and its live frames are not held up."""
    relay = start(running, Relay())
    session = relay.connect(("h", ["1"]))
    relay.pipeline.request(session, Refresh("h", ("1",), None, "subscribe"))
    relay.pipeline.publish(batch("h", 1, "1"))
    await relay.settle()
    assert [kind for kind, _ in relay.delivery.to(session)] == ["notify"]
    assert session.pending == {}


async def test_live_batches_folded_during_a_snapshot_are_sent_with_it(running: list[Relay]) -> None:
    """A batch delivered while a client's snapshot is queued is folded into that snapshot, not sent before it."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["1", "2"]))
    relay.pipeline.publish(batch("s", 1, "2", "9"))  # published before the subscribe, delivered after it
    relay.pipeline.request(session, Refresh("s", ("1",), None, "subscribe"))
    relay.pipeline.publish(batch("s", 2, "1"))
    await relay.settle()
    frames = relay.delivery.to(session)
    assert [(kind, frame["seq"]) for kind, frame in frames] == [("snapshot", 1), ("notify", 2)]
    assert sorted(frames[0][1]["rows"]) == ["1", "2"]  # the subscribed key, and the folded live one


async def test_a_slow_client_on_a_state_channel_catches_up_with_fresh_rows(running: list[Relay]) -> None:
    """A stalled client's catch-up on a state channel is a notify of the folded keys with freshly fetched rows."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["1", "2", "3"]))
    session.stalled = True
    relay.pipeline.publish(batch("s", 1, "1", "2"))
    relay.pipeline.publish(batch("s", 2, "2"))
    await relay.settle()
    assert relay.delivery.to(session) == []
    session.stalled = False
    frames, refreshes = session.catch_up(GAP_END, NOW_MS)
    assert frames == [] and refreshes == [Refresh("s", ("1", "2"), None, "slow_client")]
    relay.pipeline.request(session, refreshes[0])
    await relay.settle()
    [(kind, frame)] = relay.delivery.to(session)
    assert kind == "notify" and frame["keys"] == ["1", "2"] and "replay" not in frame
    assert frame["rows"]["2"]["fetch"] == len(state.fetches)
    assert session.pending == {}


async def test_a_lagged_slow_client_on_a_state_channel_gets_a_snapshot(running: list[Relay]) -> None:
    """A client that lagged past max_pending_keys on a state channel gets a snapshot of everything it follows."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["1", "2"]))
    session.stalled = True
    session.fold("s", 7, 7, ["1", "2"], None, max_keys=1, now=GAP_END)
    session.stalled = False
    _, [refresh] = session.catch_up(GAP_END, NOW_MS)
    relay.pipeline.request(session, refresh)
    await relay.settle()
    [(kind, frame)] = relay.delivery.to(session)
    assert kind == "snapshot" and sorted(frame["rows"]) == ["1", "2"]


async def test_a_client_gone_before_its_snapshot_is_skipped(running: list[Relay]) -> None:
    """A request whose client disconnected meanwhile costs no query and sends nothing."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["1"]))
    relay.pipeline.request(session, Refresh("s", ("1",), None, "subscribe"))
    relay.delivery.sessions.remove(session)
    await relay.settle()
    assert state.fetches == [] and relay.delivery.sent == []


# Resume with since.


async def test_a_resume_covered_by_history_is_one_replay_notify(running: list[Relay]) -> None:
    """since within what the history vouches for: one notify, replay true, of the followed keys changed since."""
    relay = start(running, Relay())
    relay.listening("h")
    for seq, keys in enumerate([["1"], ["2", "9"], ["3"]], start=1):
        relay.pipeline.publish(batch("h", seq, *keys))
    await relay.settle()
    session = relay.connect(("h", ["2", "3", "4"]))
    relay.pipeline.request(session, Refresh("h", ("2", "3", "4"), NOW_MS - 100_000 + 1, "resume"))
    await relay.settle()
    assert relay.delivery.to(session) == [("notify", {
        "type": "notify", "channel": "h", "seq": 3, "ts": NOW_MS - 100_000 + 3, "keys": ["2", "3"], "replay": True})]


async def test_the_overlap_widens_a_replay(running: list[Relay]) -> None:
    """Keys changed up to overlap_ms before since are replayed too (clock skew between replicas), besides those
    changed at since itself (batches within one millisecond share a ts)."""
    relay = start(running, Relay(overlap_ms=1))
    relay.listening("h")
    for seq in (1, 2, 3):
        relay.pipeline.publish(batch("h", seq, str(seq)))
    await relay.settle()
    session = relay.connect(("h", ["*"]))
    relay.pipeline.request(session, Refresh("h", ("*",), NOW_MS - 100_000 + 3, "resume"))
    await relay.settle()
    [(_, frame)] = relay.delivery.to(session)
    assert frame["keys"] == ["2", "3"] and frame["replay"] is True


async def test_an_empty_replay_sends_nothing(running: list[Relay]) -> None:
    """A resume with nothing changed since is silent, and live frames flow at once."""
    relay = start(running, Relay())
    relay.listening("h")
    session = relay.connect(("h", ["1"]))
    relay.pipeline.request(session, Refresh("h", ("1",), NOW_MS - 5000, "resume"))
    await relay.settle()
    assert relay.delivery.to(session) == [] and session.takes_live("h")


async def test_live_batches_folded_during_a_replay_are_sent_with_it_before_any_live_frame(
    running: list[Relay],
) -> None:
    """A batch delivered while a replay is queued joins the replay; nothing live of the channel precedes it."""
    relay = start(running, Relay())
    relay.listening("h")
    session = relay.connect(("h", ["*"]))
    relay.pipeline.publish(batch("h", 1, "a"))
    relay.pipeline.request(session, Refresh("h", ("*",), NOW_MS, "resume"))  # since: after batch 1
    relay.pipeline.publish(batch("h", 2, "b"))
    await relay.settle()
    assert [(kind, frame["keys"], frame.get("replay")) for kind, frame in relay.delivery.to(session)] == [
        ("notify", ["a"], True), ("notify", ["b"], None)]


async def test_a_live_payload_folded_into_a_replay_is_not_dropped(running: list[Relay]) -> None:
    """On an include_payload channel, a live batch folded into a replay keeps its payload in the replay frame."""
    relay = start(running, Relay())
    relay.listening("h")
    session = relay.connect(("h", ["*"]))
    relay.pipeline.publish(batch("h", 1, "a", payloads={"a": "a-payload"}))
    relay.pipeline.request(session, Refresh("h", ("*",), NOW_MS, "resume"))
    await relay.settle()
    [(_, frame)] = relay.delivery.to(session)
    assert frame["keys"] == ["a"] and frame.get("payloads") == {"a": "a-payload"}

async def test_a_resume_not_covered_on_a_hint_channel_is_a_history_gap_resync(running: list[Relay]) -> None:
    """since older than what the history vouches for: a resync history_gap from since to now, on a hint channel."""
    relay = start(running, Relay())
    relay.listening("h", since_ms=NOW_MS - 1000)
    session = relay.connect(("h", ["1"]))
    since = NOW_MS - 60_000
    relay.pipeline.request(session, Refresh("h", ("1",), since, "resume"))
    await relay.settle()
    assert relay.delivery.to(session) == [("resync", {
        "type": "resync", "channel": "h", "reason": "history_gap",
        "gap_start": datetime.fromtimestamp(since / 1000, UTC).isoformat(timespec="milliseconds"),
        "gap_end": datetime.fromtimestamp(NOW_S, UTC).isoformat(timespec="milliseconds"), "ts": NOW_MS})]


async def test_a_resume_while_the_listener_is_down_is_not_replayed(running: list[Relay]) -> None:
    """While LISTEN is down no replay can be vouched for: the resume becomes a resync."""
    relay = start(running, Relay())
    relay.listening("h")
    relay.pipeline.listener_down()
    session = relay.connect(("h", ["1"]))
    relay.pipeline.request(session, Refresh("h", ("1",), NOW_MS - 1, "resume"))
    await relay.settle()
    assert [kind for kind, _ in relay.delivery.to(session)] == ["resync"]


async def test_a_resume_not_covered_on_a_state_channel_is_a_snapshot(running: list[Relay]) -> None:
    """since older than the history on a state channel: a snapshot of every key the client follows."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["2", "1"]))
    relay.pipeline.request(session, Refresh("s", ("2", "1"), 12345, "resume"))  # never listened: not covered
    await relay.settle()
    [(kind, frame)] = relay.delivery.to(session)
    assert kind == "snapshot" and frame["rows"] == {"1": {"key": "1", "fetch": 1}, "2": {"key": "2", "fetch": 1}}
    assert state.fetches == [["1", "2"]]


async def test_a_covered_resume_on_a_state_channel_replays_fresh_rows(running: list[Relay]) -> None:
    """A covered resume on a state channel is a replay notify carrying freshly fetched rows of the changed keys."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    relay.listening("s")
    relay.pipeline.publish(batch("s", 1, "1", "gone"))
    await relay.settle()
    session = relay.connect(("s", ["1", "gone", "3"]))
    relay.pipeline.request(session, Refresh("s", ("1", "gone", "3"), NOW_MS - 100_000, "resume"))
    await relay.settle()
    [(kind, frame)] = relay.delivery.to(session)
    assert kind == "notify" and frame["replay"] is True and frame["keys"] == ["1", "gone"]
    assert frame["rows"] == {"1": {"key": "1", "fetch": 2}} and frame["gone"] == ["gone"]


# Listener gaps and overflow.


async def test_a_gap_resyncs_every_channel_before_status_up(running: list[Relay]) -> None:
    """After a listener outage: status down, then each channel's resync (hint) or snapshot (state), then status
    up, and status up waits for the slowest channel's snapshot."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    hint_client = relay.connect(("h", ["1"]))
    state_client = relay.connect(("s", ["1"]))
    relay.pipeline.listener_down()
    state.hold()
    relay.pipeline.listener_up(["h", "s"], GAP_START, GAP_END, "listener_reconnected")
    await state.started.wait()
    await relay.pipeline.streams["h"].idle()
    kinds = [sent.kind for sent in relay.delivery.sent]
    assert kinds == ["status", "resync"]  # the snapshot's query is still running: no status up yet
    state.gate.set()
    await relay.settle()
    await relay.status_up()
    assert [(sent.kind, sent.session) for sent in relay.delivery.sent] == [
        ("status", None), ("resync", hint_client), ("snapshot", state_client), ("status", None)]
    assert relay.delivery.sent[0].frame == {"listener": "down"} and relay.delivery.sent[-1].frame == {"listener": "up"}
    resync = relay.delivery.sent[1].frame
    assert resync["reason"] == "listener_reconnected" and resync["gap_end"] == "2027-01-15T08:00:03.000+00:00"
    assert relay.pipeline.streams["s"].history.listening_since == int(GAP_END.timestamp() * 1000)


async def test_batches_queued_before_a_gap_are_delivered_before_its_resync(running: list[Relay]) -> None:
    """A gap rides the channel's order: batches received before the outage reach clients before its resync."""
    relay = start(running, Relay())
    session = relay.connect(("h", ["*"]))
    relay.pipeline.publish(batch("h", 1, "a"))
    relay.pipeline.listener_up(["h"], GAP_START, GAP_END, "listener_reconnected")
    relay.pipeline.publish(batch("h", 2, "b"))
    await relay.settle()
    assert [kind for kind, _ in relay.delivery.to(session)] == ["notify", "resync", "notify"]


async def test_status_up_follows_the_newest_recovery_only(running: list[Relay]) -> None:
    """Two recoveries in quick succession announce status up once, after the second's resyncs."""
    relay = start(running, Relay())
    relay.connect(("h", ["*"]))
    relay.pipeline.listener_up(["h"], GAP_START, GAP_END, "listener_reconnected")
    relay.pipeline.listener_up(["h"], GAP_START, GAP_END, "listener_reconnected")
    await relay.settle()
    await relay.status_up()
    for _ in range(10):
        await asyncio.sleep(0)  # room for a second, wrong, status up to show
    assert [sent.kind for sent in relay.delivery.sent] == ["resync", "resync", "status"]


async def test_overflow_resyncs_a_hint_channel_and_snapshots_a_state_channel(running: list[Relay]) -> None:
    """An ingest overflow tells a hint channel's clients to refetch and refetches for a state channel's clients."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    relay.listening("h", "s")
    hint_client = relay.connect(("h", ["1"]))
    state_client = relay.connect(("s", ["1"]))
    relay.pipeline.overflow("h", GAP_START, GAP_END)
    relay.pipeline.overflow("s", GAP_START, GAP_END)
    await relay.settle()
    [(kind, frame)] = relay.delivery.to(hint_client)
    assert kind == "resync" and frame["reason"] == "overflow"
    assert [kind for kind, _ in relay.delivery.to(state_client)] == ["snapshot"]
    # Nothing before the overflow can be vouched for any more.
    assert relay.pipeline.streams["h"].history.changed_since(int(GAP_END.timestamp() * 1000) - 1, bool) is None



# Reloads.


async def test_a_reload_starts_new_streams_and_lets_removed_ones_finish(running: list[Relay]) -> None:
    """A channel added by a reload gets a running stream; a removed one delivers what it holds, then stops."""
    relay = start(running, Relay(hint=("h",)))
    session = relay.connect(("h", ["*"]), ("new", ["*"]))
    await asyncio.sleep(0)
    old = relay.pipeline.streams["h"]
    old.put(batch("h", 1, "a"))  # queued before the reload removes the channel
    relay.pipeline.set_channels([ChannelConfig(name="new")], {})
    assert set(relay.pipeline.streams) == {"new"} and relay.pipeline.stateful() == set()
    relay.pipeline.publish(batch("new", 1, "b"))
    relay.pipeline.publish(batch("h", 2, "c"))  # no stream any more: dropped
    await relay.settle()
    await old.idle()
    assert [(frame["channel"], frame["keys"]) for _, frame in relay.delivery.to(session)] == [
        ("h", ["a"]), ("new", ["b"])]


async def test_stateful_names_the_channels_with_a_state_source() -> None:
    """stateful() is the set of channels whose catch-ups are refetches; a reload can add and drop them."""
    relay = Relay(hint=("h",), state={"s": State()})
    assert relay.pipeline.stateful() == {"s"}
    relay.pipeline.set_channels([ChannelConfig(name="h"), ChannelConfig(name="s")], {"h": State()})
    assert relay.pipeline.stateful() == {"h"}


async def test_a_gap_on_a_state_channel_without_list_query_still_tells_wildcard_followers(
    running: list[Relay],
) -> None:
    """A "*" follower of a state channel that cannot be snapshotted (no list_query) is told to refetch after a gap."""
    relay = start(running, Relay(state={"s": State(listed=None)}))
    session = relay.connect(("s", ["*"]))
    relay.pipeline.listener_up(["s"], GAP_START, GAP_END, "listener_reconnected")
    await relay.settle()
    assert [kind for kind, _ in relay.delivery.to(session)] == ["resync"]


async def test_a_wildcard_subscribe_without_list_query_loses_no_live_batch(running: list[Relay]) -> None:
    """A live batch folded while a "*" subscribe's (empty) snapshot is queued still reaches the client."""
    relay = start(running, Relay(state={"s": State(listed=None)}))
    session = relay.connect(("s", ["*"]))
    relay.pipeline.publish(batch("s", 1, "k"))  # published before the subscribe, delivered after it
    relay.pipeline.request(session, Refresh("s", ("*",), None, "subscribe"))
    await relay.settle()
    assert [(kind, frame.get("keys")) for kind, frame in relay.delivery.to(session)] == [("notify", ["k"])]


async def test_a_client_that_lags_while_its_snapshot_is_queued_gets_everything_it_follows(
    running: list[Relay],
) -> None:
    """A client whose live batches lag past max_pending_keys while a subscribe's snapshot is queued gets a snapshot
    of everything it follows, not only of the keys it just subscribed."""
    state = State()
    relay = start(running, Relay(state={"s": state}))
    relay.delivery.max_pending_keys = 2
    session = relay.connect(("s", ["a", "b", "c", "d"]))
    relay.pipeline.publish(batch("s", 1, "a", "b", "c"))  # published before the subscribe, delivered after it
    relay.pipeline.request(session, Refresh("s", ("d",), None, "subscribe"))
    await relay.settle()
    [(kind, frame)] = relay.delivery.to(session)
    assert kind == "snapshot" and sorted(frame["rows"]) == ["a", "b", "c", "d"]


async def test_two_refreshes_of_one_client_served_together_never_send_an_older_row_second(
    running: list[Relay],
) -> None:
    """A "*" follower whose list snapshot and keyed catch-up are served by one merged refresh never receives a row
    older than the one it has just been sent."""
    state = State(listed=["a"])
    relay = start(running, Relay(state={"s": state}))
    session = relay.connect(("s", ["*"]))
    relay.pipeline.request(session, Refresh("s", ("*",), None, "subscribe"))
    relay.pipeline.request(session, Refresh("s", ("a",), None, "slow_client"))
    await relay.settle()
    fetched = [frame["rows"]["a"]["fetch"] for _, frame in relay.delivery.to(session)]
    assert len(fetched) == 2 and fetched == sorted(fetched)


# Never backwards, never stale: random interleavings of batches, subscribes, stalls, drains and slow queries.

Step = tuple[str, int, tuple[str, ...]]
KEYS = "abcd"

def programs(subscribable: str) -> st.SearchStrategy[list[Step]]:
    return st.lists(st.one_of(
        st.tuples(st.just("batch"), st.just(0), st.lists(st.sampled_from(KEYS), min_size=1, max_size=3,
                                                          unique=True).map(tuple)),
        st.tuples(st.sampled_from(["stall", "drain"]), st.integers(0, 2), st.just(())),
        st.tuples(st.sampled_from(["hold", "release", "turn"]), st.just(0), st.just(())),
        st.tuples(st.just("subscribe"), st.integers(0, 2), st.lists(st.sampled_from(subscribable), min_size=1,
                                                                    max_size=2, unique=True).map(tuple)),
    ), max_size=40)


def drained(relay: Relay, session: Session) -> None:
    """What the hub does when a client's transport drains: send its catch-up, ask the streams for its refetches."""
    if not session.stalled:
        return
    session.stalled = False
    frames, refreshes = session.catch_up(GAP_END, NOW_MS)
    for kind, body, ts in frames:
        relay.delivery.send(session, kind, body, ts)
    for refresh in refreshes:
        relay.pipeline.request(session, refresh)


async def play(
    program: list[Step], *, wildcard: bool = False, max_pending_keys: int = 100,
) -> tuple[Relay, State, list[Session], dict[str, int]]:
    """Run a program against a state channel followed by three clients; return what each was sent."""
    state = State(listed=list(KEYS))
    relay = Relay(hint=(), state={"s": state})
    relay.delivery.max_pending_keys = max_pending_keys
    relay.task = asyncio.get_running_loop().create_task(relay.pipeline.run())
    changed: dict[str, int] = {}  # key -> the number of the last batch query that fetched it
    clients = []
    initial: list[tuple[str, ...]] = [("a", "b"), ("*",) if wildcard else ("b", "d"), ("c",)]
    for followed in initial:
        client = relay.connect(("s", followed))
        relay.pipeline.request(client, Refresh("s", followed, None, "subscribe"))
        clients.append(client)
    seq = 0
    try:
        for kind, who, keys in program:
            if kind == "batch":
                seq += 1
                relay.pipeline.publish(batch("s", seq, *keys))
            elif kind == "stall":
                clients[who].stalled = True
            elif kind == "drain":
                drained(relay, clients[who])
            elif kind == "hold":
                state.gate.clear()
            elif kind == "release":
                state.gate.set()
            elif kind == "turn":
                for _ in range(3):
                    await asyncio.sleep(0)
            else:
                clients[who].subscribe(Subscribe("s", keys), limit=100)
                relay.pipeline.request(clients[who], Refresh("s", keys, None, "subscribe"))
        state.gate.set()
        for _ in range(3):  # a drain can ask for refetches, whose frames are written while the client reads
            await relay.settle()
            for client in clients:
                drained(relay, client)
        await relay.settle()
    finally:
        relay.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay.task
    for published in relay.delivery.published:
        number = published.state.rows[published.keys[0]]["fetch"]
        for key in published.keys:
            changed[key] = number
    return relay, state, clients, changed


def check_never_backwards_and_current(relay: Relay, clients: list[Session], changed: dict[str, int]) -> None:
    for client in clients:
        newest: dict[str, int] = {}
        for kind, frame in relay.delivery.to(client):
            assert kind in ("notify", "snapshot")
            for key, row in frame.get("rows", {}).items():
                assert client.follows_key("s", key)
                assert row["fetch"] >= newest.get(key, 0), (key, row["fetch"], newest)
                newest[key] = row["fetch"]
        for key, number in changed.items():
            if client.follows_key("s", key):
                assert newest.get(key, 0) >= number, (key, newest, changed)
        assert client.pending == {} or all(not pending.keys for pending in client.pending.values())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(KEYS))
def test_rows_never_go_backwards_and_every_client_ends_up_current(program: list[Step]) -> None:
    """Whatever interleaving of batches, key subscribes, stalls, drains and slow queries, a client never receives a
    row older than one it already has, and ends up with a row at least as new as the last change of each key it
    follows."""
    relay, _, clients, changed = asyncio.run(play(program))
    check_never_backwards_and_current(relay, clients, changed)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(KEYS))
@example([("batch", 0, ("a", "b")), ("batch", 0, ("a", "d")), ("stall", 1, ()), ("subscribe", 1, ("a",))])
def test_rows_stay_current_for_clients_that_lag(program: list[Step]) -> None:
    """Rows never go backwards and every client ends current even when slow clients lag past max_pending_keys."""
    relay, _, clients, changed = asyncio.run(play(program, max_pending_keys=2))
    check_never_backwards_and_current(relay, clients, changed)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(KEYS + "*"))
@example([("subscribe", 1, ("a",))])
def test_rows_never_go_backwards_with_wildcard_followers(program: list[Step]) -> None:
    """Rows never go backwards and every client ends current with "*" followers served by list_query too."""
    relay, _, clients, changed = asyncio.run(play(program, wildcard=True))
    check_never_backwards_and_current(relay, clients, changed)


# Failures.


async def test_an_event_that_fails_is_logged_and_the_channel_goes_on(running: list[Relay]) -> None:
    """A delivery that raises on one batch costs that batch only: the error is logged and the next batch goes out."""
    relay = start(running, Relay())
    real_publish = relay.delivery.publish
    failures = iter([RuntimeError("boom")])

    def publish_once_failing(batch: Batch) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_publish(batch)

    relay.delivery.publish = publish_once_failing  # type: ignore[method-assign]
    with capture_logs() as logs:
        relay.pipeline.publish(batch("h", 1, "a"))
        relay.pipeline.publish(batch("h", 2, "b"))
        await relay.settle()
    assert [b.seq for b in relay.delivery.published] == [2]
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["streams.event_failed"]


async def test_a_channel_worker_that_dies_ends_the_pipeline() -> None:
    """A worker that ends by anything but cancellation ends Pipeline.run() with its error (the relay then exits
    non-zero and is restarted) instead of leaving its channel silent."""
    relay = Relay()

    async def broken() -> None:
        raise RuntimeError("the worker broke")

    relay.pipeline.streams["h"].run = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="the worker broke"):
        await asyncio.wait_for(relay.pipeline.run(), 5)
