"""The subscription index that routes batches to clients, and what its operations cost (issue 14 item 3)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from notifyrelay.delivery import subscriptions
from notifyrelay.delivery.subscriptions import SubscriptionIndex


def test_route_splits_wildcard_and_key_followers_in_batch_order() -> None:
    """A batch goes whole to * followers and, to the others, only the keys each follows, in batch order."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a", "c", ["42"])
    index.add("b", "c", ["*"])
    index.add("d", "c", ["43", "42"])
    index.add("e", "other", ["42"])
    wildcard, partial = index.route("c", ["41", "42", "43"])
    assert wildcard == {"b"}
    assert partial == {"a": ["42"], "d": ["42", "43"]}
    assert index.route("nobody", ["42"]) == (set(), {})


def test_wildcard_follower_is_not_sent_keys_twice() -> None:
    """A client following * and a key is routed only through the wildcard."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a", "c", ["*", "42"])
    assert index.route("c", ["42"]) == ({"a"}, {})
    assert index.wildcard("c") == {"a"}


def test_counts_and_subscribers_follow_adds_and_discards() -> None:
    """count() is the number of subscriptions held on a channel and subscribers() every client holding one."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a", "c", ["1", "2", "*"])
    index.add("b", "c", ["1"])
    index.add("b", "d", ["9"])
    assert index.count("c") == 4 and index.count("d") == 1 and index.count("none") == 0
    assert sorted(index.subscribers("c")) == ["a", "b"]
    index.discard("a", "c", ["1", "2"])
    assert index.count("c") == 2 and sorted(index.subscribers("c")) == ["a", "b"]
    index.discard("a", "c", ["*"])
    assert index.count("c") == 1 and index.subscribers("c") == ["b"]


def test_discarding_everything_leaves_no_trace() -> None:
    """Unsubscribing and disconnecting clean every map, so nothing leaks."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a", "c", ["1", "*"])
    index.add("b", "c", ["1"])
    index.discard("a", "c", ["1"])
    assert index.route("c", ["1"]) == ({"a"}, {"b": ["1"]})
    index.discard("a", "c", ["*"])
    index.discard("b", "c", ["1"])
    assert index.route("c", ["1"]) == (set(), {})
    assert index.count("c") == 0 and index.subscribers("c") == [] and index.wildcard("c") == set()
    # Nothing that grows with clients or keys is left behind (a per-channel count of 0 may stay: channels are few).
    assert (index._by_key, index._wildcard, index._members) == ({}, {}, {})


# A model of what the index must answer, checked against generated operation sequences.

operations = st.lists(
    st.tuples(
        st.booleans(),  # add (True) or discard (False)
        st.sampled_from(["a", "b", "c"]),  # client
        st.sampled_from(["x", "y"]),  # channel
        st.lists(st.sampled_from(["1", "2", "3", "*"]), min_size=1, max_size=4, unique=True),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(operations)
def test_index_agrees_with_a_model_of_held_subscriptions(steps: list[tuple[bool, str, str, list[str]]]) -> None:
    """After any subscribes and unsubscribes, counts, subscribers and routes match what each client holds."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    held: dict[tuple[str, str], set[str]] = {}
    for adding, client, channel, keys in steps:
        mine = held.setdefault((client, channel), set())
        # The index's contract (kept by Session.subscribe/unsubscribe): add only new keys, discard only held ones.
        if adding:
            new = [key for key in keys if key not in mine]
            index.add(client, channel, new)
            mine.update(new)
        else:
            gone = [key for key in keys if key in mine]
            index.discard(client, channel, gone)
            mine.difference_update(gone)
    for channel in ["x", "y"]:
        holders = {client: keys for (client, ch), keys in held.items() if ch == channel and keys}
        assert index.count(channel) == sum(len(keys) for keys in holders.values())
        assert sorted(index.subscribers(channel)) == sorted(holders)
        batch = ["3", "1", "2", "4"]
        wildcard, partial = index.route(channel, batch)
        assert wildcard == {client for client, keys in holders.items() if "*" in keys}
        assert partial == {
            client: [key for key in batch if key in keys]
            for client, keys in holders.items()
            if "*" not in keys and any(key in keys for key in batch)
        }


# Issue 14 item 3: every operation costs in proportion to the keys it touches, never to the channel's total.
#
# The cost is counted, not timed: a tracer counts every Python line, call and return executed in the index's own
# module (loops, generator expressions and helpers included), so a recount over the channel's keys or clients shows
# up as thousands of steps, whatever the machine's speed.


def steps_of(action: Callable[[], object], *module_files: str) -> int:
    """How many Python-level steps ``action`` executes in code from ``module_files``."""
    count = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename not in module_files:
            return None  # not the index: do not trace inside this frame
        count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(previous)
    return count


class Index:
    """What the hub asks of the index around a subscribe, an unsubscribe and a disconnect (an adapter point, so that
    the same measurement can be run against another index implementation)."""

    def __init__(self, make: Callable[[], Any] = SubscriptionIndex, *module_files: str) -> None:
        self.index = make()
        self.module_files = module_files or (subscriptions.__file__,)

    def add(self, client: object, channel: str, keys: Iterable[str]) -> None:
        self.index.add(client, channel, keys)

    def discard(self, client: object, channel: str, keys: Iterable[str]) -> None:
        self.index.discard(client, channel, keys)

    def count(self, channel: str) -> int:
        return int(self.index.count(channel))


def subscribe_round_trip_steps(index: Index, *, clients: int, keys_each: int, touched: int) -> dict[str, int]:
    """Index ``clients`` x ``keys_each`` keys on one channel, then count the steps of one more client's subscribe,
    unsubscribe and disconnect, each followed by the gauge's count(), as the hub does."""
    for client in range(clients):
        index.add(client, "c", [f"{client}:{key}" for key in range(keys_each)])
    newcomer = "newcomer"
    keys = [f"new:{key}" for key in range(touched)]
    half = keys[: touched // 2]
    rest = keys[touched // 2 :]

    def subscribe() -> None:
        index.add(newcomer, "c", keys)
        index.count("c")

    def unsubscribe() -> None:
        index.discard(newcomer, "c", half)
        index.count("c")

    def disconnect() -> None:
        index.discard(newcomer, "c", rest)
        index.count("c")

    return {name: steps_of(action, *index.module_files) for name, action in
            [("subscribe", subscribe), ("unsubscribe", unsubscribe), ("disconnect", disconnect)]}


STEPS_PER_KEY = 12  # generous: the loop body of add/discard for one key is a handful of lines
STEPS_FIXED = 60  # calls, returns and bookkeeping that do not depend on the number of keys


def test_subscribe_unsubscribe_and_disconnect_cost_the_keys_they_touch_not_the_channel_total() -> None:
    """With 300 clients x 1,000 keys indexed, one more client's subscribe, unsubscribe and disconnect (with the
    gauge's count) take a number of steps bounded by the keys they touch, and the same number as beside 3 x 10 keys."""
    crowded = subscribe_round_trip_steps(Index(), clients=300, keys_each=1000, touched=10)
    small = subscribe_round_trip_steps(Index(), clients=3, keys_each=10, touched=10)
    for operation, steps in crowded.items():
        touched = 10 if operation == "subscribe" else 5
        assert steps <= STEPS_FIXED + STEPS_PER_KEY * touched, (operation, steps)
    assert crowded == small


def test_subscribers_and_count_do_not_walk_the_channels_keys() -> None:
    """subscribers() costs the clients of the channel, not their keys, and count() costs nothing that grows at all."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for client in range(300):
        index.add(client, "c", [f"{client}:{key}" for key in range(1000)])
    module = subscriptions.__file__
    assert steps_of(lambda: index.count("c"), module) <= 10
    assert steps_of(lambda: index.subscribers("c"), module) <= 10
    assert len(index.subscribers("c")) == 300 and index.count("c") == 300_000


class RecountingIndex(SubscriptionIndex[Any]):
    """The index as it was before issue 14: the gauge's count walked every key of the channel."""

    def count(self, channel: str) -> int:
        return len(self._wildcard.get(channel, ())) + sum(len(c) for c in self._by_key.get(channel, {}).values())


def test_the_step_count_catches_an_index_that_recounts_the_channel() -> None:
    """The measurement above is not vacuous: an index whose count() walks the channel's keys blows its bound."""
    steps = subscribe_round_trip_steps(
        Index(RecountingIndex, subscriptions.__file__, __file__), clients=30, keys_each=100, touched=10
    )
    assert steps["subscribe"] > STEPS_FIXED + STEPS_PER_KEY * 10
