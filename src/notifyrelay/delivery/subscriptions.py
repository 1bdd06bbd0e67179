"""Who follows what: the subscription index (pure, no I/O).

A subscription is a (channel, key) pair, or (channel, ``*``) for every key of the channel. The index answers the
fan-out's question quickly: for a batch of keys on a channel, which clients want which of them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from ..protocol import WILDCARD

C = TypeVar("C", bound=Hashable)


class TooManySubscriptions(Exception):
    """Taking these subscriptions would pass the per-connection limit."""


class SubscriptionIndex(Generic[C]):
    """channel -> key -> clients, channel -> wildcard clients, and client -> channel -> keys."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[str, set[C]]] = {}
        self._wildcard: dict[str, set[C]] = {}
        self._of_client: dict[C, dict[str, set[str]]] = {}

    def subscribe(self, client: C, channel: str, keys: Iterable[str], *, limit: int) -> None:
        """Add subscriptions (idempotent); all or nothing when ``limit`` would be passed."""
        held = self._of_client.setdefault(client, {})
        mine = held.get(channel, set())
        new = [k for k in dict.fromkeys(keys) if k not in mine]
        if self.count(client) + len(new) > limit:
            raise TooManySubscriptions(f"this connection may hold at most {limit} subscriptions")
        if not new:
            return
        mine = held.setdefault(channel, set())
        for key in new:
            mine.add(key)
            if key == WILDCARD:
                self._wildcard.setdefault(channel, set()).add(client)
            else:
                self._by_key.setdefault(channel, {}).setdefault(key, set()).add(client)

    def unsubscribe(self, client: C, channel: str, keys: Iterable[str]) -> None:
        """Remove subscriptions; unknown ones are ignored."""
        held = self._of_client.get(client)
        mine = held.get(channel) if held else None
        if not mine:
            return
        for key in keys:
            if key not in mine:
                continue
            mine.discard(key)
            if key == WILDCARD:
                self._discard(self._wildcard, channel, client)
            else:
                by_key = self._by_key.get(channel, {})
                self._discard(by_key, key, client)
                if not by_key:
                    self._by_key.pop(channel, None)
        if not mine and held is not None:
            del held[channel]

    def remove(self, client: C) -> None:
        """Forget a client entirely (disconnect)."""
        for channel, keys in list(self._of_client.get(client, {}).items()):
            self.unsubscribe(client, channel, list(keys))
        self._of_client.pop(client, None)

    def drop_channel(self, channel: str) -> set[C]:
        """Remove every subscription on a channel (reload removed it); return the clients that had one."""
        clients = set(self.subscribers(channel))
        for client in clients:
            self.unsubscribe(client, channel, list(self._of_client[client].get(channel, ())))
        return clients

    def channels_of(self, client: C) -> list[str]:
        return list(self._of_client.get(client, {}))

    def channels(self) -> set[str]:
        """Every channel anyone subscribes to."""
        return set(self._wildcard) | set(self._by_key)

    def count(self, client: C) -> int:
        return sum(len(keys) for keys in self._of_client.get(client, {}).values())

    def channel_count(self, channel: str) -> int:
        """Subscriptions held on a channel, over all clients (for the gauge)."""
        return len(self._wildcard.get(channel, ())) + sum(len(c) for c in self._by_key.get(channel, {}).values())

    def keys_of(self, client: C, channel: str) -> set[str]:
        return self._of_client.get(client, {}).get(channel, set())

    def follows_all(self, client: C, channel: str) -> bool:
        return WILDCARD in self.keys_of(client, channel)

    def follows(self, client: C, channel: str, key: str) -> bool:
        keys = self.keys_of(client, channel)
        return WILDCARD in keys or key in keys

    def subscribers(self, channel: str) -> set[C]:
        """Every client with any subscription on the channel."""
        clients = set(self._wildcard.get(channel, ()))
        for followers in self._by_key.get(channel, {}).values():
            clients |= followers
        return clients

    def route(self, channel: str, keys: list[str]) -> tuple[set[C], dict[C, list[str]]]:
        """For a batch: the clients that take every key, and the others with the keys each follows (batch order)."""
        wildcard = self._wildcard.get(channel, set())
        by_key = self._by_key.get(channel)
        partial: dict[C, list[str]] = {}
        if by_key:
            for key in keys:
                for client in by_key.get(key, ()):
                    if client not in wildcard:
                        partial.setdefault(client, []).append(key)
        return wildcard, partial

    @staticmethod
    def _discard(mapping: dict[str, set[C]], name: str, client: C) -> None:
        clients = mapping.get(name)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del mapping[name]
