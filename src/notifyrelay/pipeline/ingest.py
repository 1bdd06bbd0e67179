"""The bounded hand-off between the LISTEN connection's callback and the coalescer.

The asyncpg notification callback is synchronous and only appends here; the coalescer drains everything at once.
When the queue is full a notification is dropped and its channel marked, so that its subscribers are told to
resync (or, on a state channel, sent a snapshot) instead of missing it silently.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import UTC, datetime

Notification = tuple[str, str, float]  # channel, payload, monotonic receive time


class IngestQueue:
    """A bounded FIFO between the asyncpg callback and the coalescer; never blocks the producer."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Notification] = deque()
        self._overflow: dict[str, datetime] = {}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, channel: str, payload: str) -> bool:
        """Enqueue a notification; when full, drop it and mark its channel for an ``overflow`` resync."""
        if len(self._items) >= self.maxsize:
            self._overflow.setdefault(channel, datetime.now(UTC))
            self._ready.set()
            return False
        self._items.append((channel, payload, time.monotonic()))
        self._ready.set()
        return True

    async def get_all(self, timeout: float | None) -> deque[Notification]:
        """Wait up to ``timeout`` seconds (None: forever) for something to arrive, then take everything queued."""
        if not self._items and not self._overflow and (timeout is None or timeout > 0):
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                pass
        self._ready.clear()
        return self.take_nowait()

    def take_nowait(self) -> deque[Notification]:
        items, self._items = self._items, deque()
        return items

    def take_overflow(self) -> dict[str, datetime]:
        """Channels that lost notifications since the last call, with the time of their first loss."""
        overflow, self._overflow = self._overflow, {}
        return overflow
