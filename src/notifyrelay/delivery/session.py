"""One client as the relay sees it, whatever carries it (pure: no event loop, no sockets, clocks passed in).

A session holds what its client follows, what it may follow (its token's grant), its frame rate, and what it has
not been sent yet: while its transport cannot take more (a slow reader) or while a snapshot or replay for a channel
is on its way, live batches of that channel are folded here by key, the way the coalescing window folds them, and
bounded by ``max_pending_keys``. When the client can take frames again, ``catch_up`` turns what was folded into
frames (a hint channel) or into a refresh request for the pipeline (a state channel, whose rows must be fetched).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import protocol
from ..exceptions import ProtocolError, SubscriptionError
from ..pipeline.streams import Refresh
from ..protocol import WILDCARD, Subscribe, Unsubscribe

_ids = itertools.count(1)

Grants = Mapping[str, frozenset[str] | None]  # channel -> keys its bearer may follow; None: every key


class RateLimit:
    """A token bucket for one client's frames: ``rate_per_s`` a second, bursts of ``burst``.

    ``strikes`` counts frames refused since the bucket was last full, so a client that keeps pushing past the rate
    (even at a steady 2x) accumulates them, while one that bursts now and then is forgiven once it pauses.
    """

    __slots__ = ("burst", "rate_per_s", "strikes", "tokens", "updated")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now
        self.strikes = 0

    def take(self, now: float) -> bool:
        """Spend a token for one frame; False when there is none left."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= self.burst:
            self.strikes = 0
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.strikes += 1
        return False

    @property
    def exhausted(self) -> bool:
        """The client kept pushing well past the rate: close it (1008)."""
        return self.strikes > 3 * self.burst


@dataclass(slots=True)
class Pending:
    """What a client has not been sent on one channel yet, folded by key (last payload wins)."""

    seq: int = 0
    ts: int = 0
    keys: dict[str, Any] = field(default_factory=dict)
    with_payloads: bool = False
    lagged_since: datetime | None = None  # more than max_pending_keys: catch up with everything, not keys
    refreshing: bool = False  # a snapshot or replay for this channel is queued in the pipeline


class Session:
    """A client's subscriptions, grant, rate limit and folded pending keys; events in, frames out."""

    __slots__ = ("__weakref__", "done", "follows", "grants", "id", "pending", "rate", "stalled", "stateful",
                 "transport")

    def __init__(
        self, *, grants: Grants | None, rate_per_s: float, burst: int, now: float, stateful: Collection[str] = (),
        transport: str = "websocket",
    ) -> None:
        self.id = next(_ids)
        self.transport = transport  # the metric label: websocket, sse or ndjson
        self.grants = grants  # None: may follow anything
        self.stateful = stateful  # channels whose catch-up is a refetch (shared with the hub, which keeps it current)
        self.follows: dict[str, set[str]] = {}
        self.pending: dict[str, Pending] = {}
        self.rate = RateLimit(rate_per_s, burst, now)
        self.stalled = False  # the transport's write buffer is above its high-water mark
        self.done: dict[str, dict[str, bool]] | None = None  # until=done: per channel, key -> reached a terminal status

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.transport}>"

    # Subscriptions.

    def subscribe(
        self, command: Subscribe, *, limit: int, relay_held: int = 0, relay_limit: int | None = None,
    ) -> list[str]:
        """Take a subscribe's keys; return those not held before. All or nothing; raises SubscriptionError past
        ``limit`` (this connection's) or past ``relay_limit`` with ``relay_held`` held over all connections."""
        if self.grants is not None:
            allowed = self.grants.get(command.channel, frozenset())
            if allowed is not None and not all(key in allowed for key in command.keys):
                raise SubscriptionError(
                    "forbidden", f"your token does not allow following these keys on {command.channel!r}",
                    request_id=command.id,
                )
        held = self.follows.get(command.channel, set())
        new = [key for key in command.keys if key not in held]
        if self.count() + len(new) > limit:
            raise SubscriptionError(
                "too_many_subscriptions", f"this connection may hold at most {limit} subscriptions",
                request_id=command.id, limit="max_subscriptions",
            )
        if relay_limit is not None and relay_held + len(new) > relay_limit:
            raise SubscriptionError(
                "too_many_subscriptions", f"the relay holds its relay-wide limit of {relay_limit} subscriptions over "
                "all connections; try again later", request_id=command.id, limit="max_total_subscriptions",
            )
        if new:
            self.follows.setdefault(command.channel, set()).update(new)
        return new

    def unsubscribe(self, command: Unsubscribe) -> list[str]:
        """Drop a unsubscribe's keys; return those that were held."""
        held = self.follows.get(command.channel)
        if not held:
            return []
        gone = [key for key in command.keys if key in held]
        held.difference_update(gone)
        if not held:
            del self.follows[command.channel]
            self.pending.pop(command.channel, None)
        return gone

    def forget_channel(self, channel: str) -> list[str]:
        """Drop every subscription on a channel (a reload removed it); return what was held."""
        self.pending.pop(channel, None)
        return list(self.follows.pop(channel, ()))

    def count(self) -> int:
        return sum(len(keys) for keys in self.follows.values())

    def follows_key(self, channel: str, key: str) -> bool:
        keys = self.follows.get(channel)
        return keys is not None and (WILDCARD in keys or key in keys)

    def followed(self, channel: str) -> frozenset[str]:
        return frozenset(self.follows.get(channel, ()))

    def note_progress(self, channel: str, progress: Mapping[str, Any]) -> bool:
        """``until=done``: remember which keys reached a terminal status; True once every key it follows has
        (for ``*``: every key it has been told about, and at least one)."""
        if self.done is None:
            return False
        marks = self.done.setdefault(channel, {})
        for key, figures in progress.items():
            marks[key] = bool(figures.get("terminal")) if isinstance(figures, Mapping) else False
        for followed_channel, keys in self.follows.items():
            seen = self.done.get(followed_channel, {})
            if WILDCARD in keys:
                if not seen or not all(seen.values()):
                    return False
            elif not all(seen.get(key) for key in keys):
                return False
        return True

    # Incoming frames.

    def admit(self, now: float) -> bool:
        """Count one incoming frame (control frames too) against the rate limit; False: refuse it."""
        return self.rate.take(now)

    def refusal(self) -> ProtocolError:
        rate = self.rate
        return ProtocolError(
            "rate_limited", f"too many frames: at most {rate.rate_per_s:g} a second (bursts of {rate.burst}); "
            "this one was dropped, and persisting closes the connection", limit="rate_limit",
        )

    # Live batches.

    def takes_live(self, channel: str) -> bool:
        """May a live frame of ``channel`` be written to this client now (else it is folded)?"""
        if self.stalled:
            return False
        pending = self.pending.get(channel)
        return pending is None or not pending.refreshing

    def fold(
        self, channel: str, seq: int, ts: int, keys: list[str], payloads: Mapping[str, Any] | None, *,
        max_keys: int, now: datetime,
    ) -> None:
        """Keep a batch's keys for later instead of writing them."""
        pending = self.pending.get(channel)
        if pending is None:
            pending = self.pending[channel] = Pending()
        pending.with_payloads = pending.with_payloads or payloads is not None
        pending.seq, pending.ts = seq, ts
        if pending.lagged_since is not None:
            return
        for key in keys:
            pending.keys[key] = payloads.get(key) if payloads is not None else None
        if len(pending.keys) > max_keys:
            # A "*" follower of a busy channel: keep no keys; it catches up with everything it follows.
            pending.keys.clear()
            pending.lagged_since = now

    def begin_refresh(self, channel: str) -> None:
        """A snapshot or replay of ``channel`` is on its way: fold its live batches until it is sent."""
        pending = self.pending.get(channel)
        if pending is None:
            pending = self.pending[channel] = Pending()
        pending.refreshing = True

    def claim_pending(self, channel: str) -> tuple[list[str], bool, dict[str, Any] | None]:
        """The keys folded on ``channel`` (to be sent with its snapshot or replay), whether it lagged past them,
        and their last payloads (None on a channel without payloads)."""
        pending = self.pending.get(channel)
        if pending is None:
            return [], False, None
        keys = [key for key in pending.keys if self.follows_key(channel, key)]
        lagged = pending.lagged_since is not None
        payloads = dict(pending.keys) if pending.with_payloads else None
        pending.keys, pending.lagged_since = {}, None
        return keys, lagged, payloads

    def end_refresh(self, channel: str) -> None:
        pending = self.pending.get(channel)
        if pending is not None and not pending.keys and pending.lagged_since is None:
            del self.pending[channel]
        elif pending is not None:
            pending.refreshing = False

    def catch_up(self, gap_end: datetime, ts: int) -> tuple[list[tuple[str, bytes, int]], list[Refresh]]:
        """The client can take frames again: what it missed, as frames (hint channels) and refresh requests
        (state channels, and any channel whose snapshot or replay is still on its way stays folded)."""
        frames: list[tuple[str, bytes, int]] = []
        refreshes: list[Refresh] = []
        for channel, pending in list(self.pending.items()):
            if pending.refreshing:
                continue
            if channel in self.stateful:
                keys = None if pending.lagged_since is not None else tuple(pending.keys)
                pending.refreshing = True  # its folded keys are claimed when the refresh is served
                refreshes.append(Refresh(channel, keys, None, "slow_client"))
                continue
            del self.pending[channel]
            if pending.lagged_since is not None:
                body = protocol.resync(channel, "slow_client", pending.lagged_since, gap_end, ts)
                frames.append(("resync", body, ts))
                continue
            still = [key for key in pending.keys if self.follows_key(channel, key)]
            if still:
                payloads = pending.keys if pending.with_payloads else None
                body = protocol.notify(channel, pending.seq, pending.ts, still, payloads)
                frames.append(("notify", body, pending.ts))
        return frames, refreshes

