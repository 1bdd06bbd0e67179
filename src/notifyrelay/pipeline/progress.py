"""Progress figures over a state channel's rows: percent, a measured rate, an ETA, terminal and failed, stalled.

``ProgressTracker`` is pure (no event loop; every call is given ``now``, a monotonic time in seconds). It keeps, per
active key, a short window of (time, done) samples for the rate and the moment its row last changed for stall
detection. A key is forgotten once it is reported terminal, and when its row is gone, so memory is bounded by the
number of active keys (and, as a backstop, by ``max_keys``: the least recently changed key is forgotten first).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..config import ProgressConfig

RATE_WINDOW_S = 30.0  # the rate is measured over about this long of a key's recent rows ...
RATE_SAMPLES = 16  # ... and at most this many of them
MAX_KEYS = 100_000


@dataclass(slots=True)
class _Track:
    """What the tracker remembers of one active key."""

    fingerprint: bytes | str  # the row as JSON: a change of any column is a change
    changed_at: float
    samples: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=RATE_SAMPLES))
    stalled: bool = False


def _number(value: Any) -> float | None:
    """A finite number, or None for anything else (NULL, text, booleans, NaN, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double's range (a huge numeric)
        return None
    return number if math.isfinite(number) else None


class ProgressTracker:
    """Turns successive rows of a channel's keys into SPEC progress objects and finds keys that stall."""

    def __init__(
        self,
        config: ProgressConfig,
        *,
        rate_window_s: float = RATE_WINDOW_S,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.config = config
        self.rate_window_s = rate_window_s
        self.max_keys = max_keys
        self._terminal = frozenset(config.terminal)
        self._failed = frozenset(config.failed)
        # Every active key, least recently changed first.
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        # The active keys not stalled yet, least recently changed first: newly_stalled() pops them off the front.
        self._watched: OrderedDict[str, float] = OrderedDict()
        self._stalled = 0

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def stalled_count(self) -> int:
        """Active keys that are stalled now (for the stalled_keys gauge)."""
        return self._stalled

    def observe(
        self, key: str, row: Mapping[str, Any], now: float, *, fingerprint: bytes | str | None = None
    ) -> dict[str, Any]:
        """The progress object of ``key`` given its current ``row``; records the row for the rate and stalls.

        ``fingerprint`` is the row as JSON when the caller has it already (else it is encoded here).
        """
        config = self.config
        raw_done = row.get(config.done) if config.done else None
        raw_total = row.get(config.total) if config.total else None
        raw_status = row.get(config.status) if config.status else None
        done, total = _number(raw_done), _number(raw_total)
        status = None if raw_status is None else str(raw_status)
        terminal = status in self._terminal
        fingerprint = msgspec.json.encode(row) if fingerprint is None else fingerprint

        track = self._tracks.get(key)
        if track is None:
            track = _Track(fingerprint, now)
            self._tracks[key] = track
            self._watched[key] = now
            while len(self._tracks) > self.max_keys:
                self.forget(next(iter(self._tracks)))
        elif track.fingerprint != fingerprint:  # it moved (again)
            track.fingerprint = fingerprint
            track.changed_at = now
            if track.stalled:
                track.stalled = False
                self._stalled -= 1
            self._tracks.move_to_end(key)
            self._watched[key] = now
            self._watched.move_to_end(key)
        rate = self._sample(track, done, now)

        percent = eta = None
        if total is not None and total > 0 and done is not None:
            percent = round(min(max(done / total * 100.0, 0.0), 100.0), 2)
            if not terminal and rate is not None and rate > 0:
                eta = round(max(total - done, 0.0) / rate, 1)
        progress = {
            "done": raw_done,
            "total": raw_total,
            "percent": percent,
            "rate_per_s": rate,
            "eta_s": eta,
            "status": status,
            "terminal": terminal,
            "failed": terminal and status in self._failed,
            "stalled": track.stalled and not terminal,
        }
        if terminal:
            # Reported once, then forgotten: a finished key costs nothing, and if it is ever asked for again it is
            # simply reported terminal again.
            self.forget(key)
        return progress

    def _sample(self, track: _Track, done: float | None, now: float) -> float | None:
        """Add a (now, done) sample and return the rate over the window, in units per second (None if unknown)."""
        samples = track.samples
        if done is None:
            samples.clear()
            return None
        if samples and done < samples[-1][1]:
            samples.clear()  # done went backwards: the job restarted; the old samples say nothing about it now
        if samples and samples[-1][0] == now:
            samples.pop()
        samples.append((now, done))
        # Keep one sample at or before the window's start as the anchor, so that a slow key still has a rate.
        while len(samples) > 2 and samples[1][0] <= now - self.rate_window_s:
            samples.popleft()
        first_time, first_done = samples[0]
        if now <= first_time:
            return None
        return round((done - first_done) / (now - first_time), 3)

    def forget(self, key: str) -> None:
        """Drop what is known of ``key`` (its row is gone, or it ended)."""
        track = self._tracks.pop(key, None)
        self._watched.pop(key, None)
        if track is not None and track.stalled:
            self._stalled -= 1

    def newly_stalled(self, now: float) -> list[str]:
        """Keys whose row has not changed for ``stall_after_s`` and were not stalled yet; marks them stalled."""
        limit = now - self.config.stall_after_s
        stalled: list[str] = []
        # Least recently changed first: stop at the first key that changed within the limit.
        while self._watched:
            key, changed_at = next(iter(self._watched.items()))
            if changed_at > limit:
                break
            del self._watched[key]
            self._tracks[key].stalled = True
            self._stalled += 1
            stalled.append(key)
        return stalled
