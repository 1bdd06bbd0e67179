"""The key-change memory that lets a client resume: per channel, when each key last changed (pure, no I/O).

A client that comes back with ``since=TS`` (the ``ts`` of the last frame it saw) is sent, in one replay frame, every
key it follows that changed after ``TS - overlap``, provided this process can vouch for that whole span: it was
listening on the channel without a gap since then, and it has forgotten no key that changed since then (it keeps
at most ``max_keys`` keys per channel, forgetting the least recently changed first). Otherwise the client gets a
snapshot (state channels) or a ``resync`` with reason ``history_gap``. Every replica LISTENs on the same channels,
so the same holds on whichever process the client lands.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable


class ChannelHistory:
    """When each key of one channel last changed (batch ``ts``, Unix ms), newest last."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._changed: OrderedDict[str, int] = OrderedDict()
        self.listening_since: int | None = None  # no gap after this moment; None: not listening yet
        self.forgotten_until = -1  # the newest change forgotten to stay within max_keys (-1: none yet)
        self.seq = 0  # the newest batch's seq and ts, for frames that fold batches (replays, snapshots)
        self.ts = 0

    def __len__(self) -> int:
        return len(self._changed)

    def record(self, keys: Iterable[str], seq: int, ts: int) -> None:
        changed = self._changed
        for key in keys:
            changed[key] = ts
            changed.move_to_end(key)
        while len(changed) > self.max_keys:
            _, forgotten = changed.popitem(last=False)
            self.forgotten_until = max(self.forgotten_until, forgotten)
        self.seq, self.ts = max(self.seq, seq), max(self.ts, ts)

    def gap(self, until: int) -> None:
        """Notifications before ``until`` (Unix ms) may have been missed (a listener gap, an overflow)."""
        self.listening_since = until if self.listening_since is None else max(self.listening_since, until)

    def changed_since(self, moment: int, wanted: Callable[[str], bool]) -> list[str] | None:
        """The wanted keys that changed after ``moment`` (oldest first), or None when this process cannot vouch
        for everything since then."""
        if self.listening_since is None or moment < self.listening_since or moment <= self.forgotten_until:
            return None
        keys: list[str] = []
        for key, ts in reversed(self._changed.items()):
            if ts < moment:  # a change at the very moment counts: ts may repeat within a millisecond
                break
            if wanted(key):
                keys.append(key)
        keys.reverse()
        return keys
