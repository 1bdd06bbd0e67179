"""Who follows what, for routing: channel -> key -> sessions (pure, no I/O).

A subscription is a (channel, key) pair, or (channel, ``*``) for every key of the channel. What each client holds
is kept by its own session (delivery/session.py); this index is the reverse map the fan-out needs: for a batch of
keys on a channel, which clients want which of them. Every operation costs in proportion to the keys it touches,
never to the channel's total: the counts the gauges read are kept as they change.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from ..protocol import WILDCARD

C = TypeVar("C", bound=Hashable)


class SubscriptionIndex(Generic[C]):
    """channel -> key -> clients, channel -> wildcard clients, and channel -> client -> subscriptions held."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[str, set[C]]] = {}
        self._wildcard: dict[str, set[C]] = {}
        self._members: dict[str, dict[C, int]] = {}  # how many subscriptions each client holds on the channel
        self._count: dict[str, int] = {}

    def add(self, client: C, channel: str, keys: Iterable[str]) -> None:
        """Index new subscriptions (the caller passes only keys the client did not hold)."""
        added = 0
        for key in keys:
            if key == WILDCARD:
                self._wildcard.setdefault(channel, set()).add(client)
            else:
                self._by_key.setdefault(channel, {}).setdefault(key, set()).add(client)
            added += 1
        if added:
            members = self._members.setdefault(channel, {})
            members[client] = members.get(client, 0) + added
            self._count[channel] = self._count.get(channel, 0) + added

    def discard(self, client: C, channel: str, keys: Iterable[str]) -> None:
        """Unindex subscriptions (the caller passes only keys the client held)."""
        removed = 0
        for key in keys:
            if key == WILDCARD:
                _discard(self._wildcard, channel, client)
            else:
                by_key = self._by_key.get(channel)
                if by_key is not None:
                    _discard(by_key, key, client)
                    if not by_key:
                        del self._by_key[channel]
            removed += 1
        if removed:
            members = self._members[channel]
            left = members[client] - removed
            if left > 0:
                members[client] = left
            else:
                del members[client]
                if not members:
                    del self._members[channel]
            self._count[channel] -= removed

    def count(self, channel: str) -> int:
        """Subscriptions held on a channel over all clients (the ``subscriptions`` gauge)."""
        return self._count.get(channel, 0)

    def subscribers(self, channel: str) -> list[C]:
        """Every client with any subscription on the channel."""
        return list(self._members.get(channel, ()))

    def wildcard(self, channel: str) -> set[C]:
        return self._wildcard.get(channel, set())

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


def _discard(mapping: dict[str, set[C]], name: str, client: C) -> None:
    clients = mapping.get(name)
    if clients is not None:
        clients.discard(client)
        if not clients:
            del mapping[name]
