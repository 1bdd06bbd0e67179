"""The subscription index that routes batches to clients."""

from __future__ import annotations

import pytest

from notifyrelay.delivery.subscriptions import SubscriptionIndex, TooManySubscriptions


def test_route_splits_wildcard_and_key_followers_in_batch_order() -> None:
    """A batch goes whole to * followers and, to the others, only the keys each follows, in batch order."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.subscribe("a", "c", ["42"], limit=10)
    index.subscribe("b", "c", ["*"], limit=10)
    index.subscribe("d", "c", ["43", "42"], limit=10)
    index.subscribe("e", "other", ["42"], limit=10)
    wildcard, partial = index.route("c", ["41", "42", "43"])
    assert wildcard == {"b"}
    assert partial == {"a": ["42"], "d": ["42", "43"]}


def test_wildcard_follower_is_not_sent_keys_twice() -> None:
    """A client following * and a key is routed only through the wildcard."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.subscribe("a", "c", ["*", "42"], limit=10)
    assert index.route("c", ["42"]) == ({"a"}, {})


def test_limit_is_all_or_nothing_and_idempotent_subscribes_are_free() -> None:
    """Passing the limit refuses the whole subscribe; re-subscribing held keys costs nothing."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.subscribe("a", "c", ["1", "2"], limit=3)
    index.subscribe("a", "c", ["1", "2"], limit=3)
    with pytest.raises(TooManySubscriptions):
        index.subscribe("a", "c", ["3", "4"], limit=3)
    assert index.count("a") == 2


def test_unsubscribe_and_remove_leave_no_trace() -> None:
    """Unsubscribing and disconnecting clean every map, so nothing leaks."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.subscribe("a", "c", ["1", "*"], limit=10)
    index.subscribe("b", "c", ["1"], limit=10)
    index.unsubscribe("a", "c", ["1", "nope"])
    assert index.route("c", ["1"]) == ({"a"}, {"b": ["1"]})
    index.remove("a")
    index.remove("b")
    assert index.route("c", ["1"]) == (set(), {})
    assert index.channel_count("c") == 0 and index.channels() == set()
