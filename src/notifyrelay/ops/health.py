"""Liveness and readiness, as the probes report them.

``/healthz`` says the process and its event loop are alive (it is answered by that loop) and never looks at
PostgreSQL. ``/readyz`` says notifications are really flowing: the LISTEN connection is up, every channel is
LISTENed, the last heartbeat came back in time, and the relay is not shutting down.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Protocol


class HeartbeatSettings(Protocol):
    @property
    def heartbeat_interval_s(self) -> float: ...

    @property
    def heartbeat_timeout_s(self) -> float: ...


class ListenerStatus(Protocol):
    up: bool
    down_reason: str
    last_heartbeat: float | None

    @property
    def settings(self) -> HeartbeatSettings: ...

    @property
    def channels(self) -> list[str]: ...


class Readiness:
    """Answers /readyz from the listener's state and the shutdown flag."""

    def __init__(self, listener: ListenerStatus) -> None:
        self._listener = listener
        self.shutting_down = False
        self._started = time.time()

    def reasons(self) -> list[str]:
        """Why the relay is not ready; empty when it is."""
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        listener = self._listener
        if not listener.up:
            reasons.append(f"listener down: {listener.down_reason}")
        else:
            last = listener.last_heartbeat or self._started
            # A heartbeat older than interval + timeout (plus slack) means the supervisor itself is stuck. Read
            # the settings each time: a reload may change them.
            deadline = listener.settings.heartbeat_interval_s + listener.settings.heartbeat_timeout_s + 5
            if time.time() - last > deadline:
                reasons.append(f"listener heartbeat overdue: last passed {time.time() - last:.1f}s ago")
        return reasons

    def report(self) -> dict[str, Any]:
        reasons = self.reasons()
        last = self._listener.last_heartbeat
        return {
            "ready": not reasons,
            "reasons": reasons,
            "listener": "up" if self._listener.up else "down",
            "channels": self._listener.channels,
            "last_heartbeat": datetime.fromtimestamp(last, UTC).isoformat(timespec="milliseconds") if last else None,
        }
