"""Liveness and readiness, as the probes report them.

``/healthz`` says the process and its event loop are alive (it is answered by that loop) and never looks at
PostgreSQL. ``/readyz`` says notifications are really flowing: the LISTEN connection is up, every channel is
LISTENed, the last heartbeat came back in time, and the relay is not shutting down. When it is not, the reasons say
why in words an operator can act on, including a fix where the listener knows one (a privilege to GRANT) and the
NOTIFY queue's usage when that queue is filling up (a full queue makes every NOTIFY fail, heartbeats included).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Protocol

QUEUE_NEARLY_FULL = 0.5  # pg_notification_queue_usage() from which /readyz mentions the queue


class HeartbeatSettings(Protocol):
    @property
    def heartbeat_interval_s(self) -> float: ...

    @property
    def heartbeat_timeout_s(self) -> float: ...


class ListenerStatus(Protocol):
    up: bool
    down_reason: str
    last_heartbeat: float | None
    queue_usage: float | None  # pg_notification_queue_usage() as last sampled, None when unknown
    queue_sampled_at: float | None
    queue_sample_error: str | None  # why the queue cannot be sampled (a revoked privilege), with the fix

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
        if reasons and (queue := self._queue_note()):
            reasons.append(queue)
        return reasons

    def warnings(self) -> list[str]:
        """What an operator should know although the relay is ready (it does not make /readyz fail)."""
        notes = []
        if self._listener.queue_sample_error:
            notes.append(f"cannot sample the NOTIFY queue: {self._listener.queue_sample_error}")
        if not self.reasons() and (queue := self._queue_note()):
            notes.append(queue)
        return notes

    def _queue_note(self) -> str | None:
        """A line about PostgreSQL's NOTIFY queue when it is filling up (when it is full, every NOTIFY fails)."""
        usage, sampled_at = self._listener.queue_usage, self._listener.queue_sampled_at
        if usage is None or sampled_at is None or usage < QUEUE_NEARLY_FULL:
            return None
        return (
            f"PostgreSQL's NOTIFY queue is {usage:.0%} full (sampled {time.time() - sampled_at:.0f}s ago; at 100% "
            "every NOTIFY fails): a session that LISTENs while holding a transaction open keeps it from draining"
        )

    def report(self) -> dict[str, Any]:
        reasons = self.reasons()
        last = self._listener.last_heartbeat
        return {
            "ready": not reasons,
            "reasons": reasons,
            "warnings": self.warnings(),
            "listener": "up" if self._listener.up else "down",
            "channels": self._listener.channels,
            "last_heartbeat": datetime.fromtimestamp(last, UTC).isoformat(timespec="milliseconds") if last else None,
            "notify_queue_usage": self._listener.queue_usage,
        }
