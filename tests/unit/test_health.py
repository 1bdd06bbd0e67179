"""/readyz's reasons and warnings about PostgreSQL's NOTIFY queue and the listener's privileges."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from notifyrelay.config import ListenerConfig
from notifyrelay.ops.health import Readiness


@dataclass
class Status:
    """The listener as readiness sees it."""

    up: bool = True
    down_reason: str = ""
    last_heartbeat: float | None = field(default_factory=time.time)
    queue_usage: float | None = None
    queue_sampled_at: float | None = field(default_factory=time.time)
    queue_sample_error: str | None = None
    settings: ListenerConfig = field(default_factory=ListenerConfig)
    channels: list[str] = field(default_factory=lambda: ["a"])


def test_a_filling_queue_is_a_warning_while_notifications_flow() -> None:
    """A NOTIFY queue 70% full with the listener up keeps /readyz 200 and says so under warnings."""
    report = Readiness(Status(queue_usage=0.7)).report()
    assert report["ready"] and report["notify_queue_usage"] == 0.7
    assert [w for w in report["warnings"] if "NOTIFY queue is 70% full" in w]


def test_a_full_queue_is_named_among_the_reasons_when_the_listener_is_down() -> None:
    """With the listener down and the queue full, the reasons name both the listener's error and the queue."""
    status = Status(up=False, down_reason="cannot connect and LISTEN: too many notifications in the NOTIFY queue",
                    queue_usage=1.0)
    reasons = Readiness(status).reasons()
    assert reasons[0].startswith("listener down: cannot connect and LISTEN")
    assert "NOTIFY queue is 100% full" in reasons[1] and "transaction open" in reasons[1]


def test_a_quiet_queue_and_a_healthy_listener_say_nothing() -> None:
    """Below half full, the queue appears in neither reasons nor warnings."""
    report = Readiness(Status(queue_usage=0.1)).report()
    assert report["ready"] and report["reasons"] == [] and report["warnings"] == []


def test_a_refused_queue_sample_is_a_warning_with_its_fix() -> None:
    """A revoked EXECUTE on pg_notification_queue_usage() is reported with its GRANT, without failing /readyz."""
    fix = "permission denied (fix: GRANT EXECUTE ON FUNCTION pg_notification_queue_usage() TO relay)"
    report = Readiness(Status(queue_sample_error=fix)).report()
    assert report["ready"] and report["warnings"] == [f"cannot sample the NOTIFY queue: {fix}"]
