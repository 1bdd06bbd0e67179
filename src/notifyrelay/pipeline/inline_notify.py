"""asyncpg's connection with notification callbacks run as asyncpg parses each notification.

asyncpg hands every notification to a synchronous callback through ``loop.call_soon``: one handle, one trip through
the event loop, about 40 % of the relay's CPU per notification taken in. ``InlineNotifyConnection`` overrides the
private ``Connection._process_notification`` with asyncpg's own code less that call_soon. Because the method is
private, ``INLINE_NOTIFY`` checks at import that the installed asyncpg still has it, with the registry it reads;
when not, the listener connects with asyncpg's own class and says so (tests/unit/test_inline_notify.py fails on an
asyncpg that changed the hook).
"""

from __future__ import annotations

import inspect
import time

import asyncpg
import structlog

log = structlog.get_logger("notifyrelay.listener")

CALLBACK_ERROR_LOG_INTERVAL_S = 10.0  # a callback that keeps raising is logged this often, not per notification


class InlineNotifyConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """asyncpg's connection, running synchronous notification callbacks at once instead of one ``loop.call_soon``
    later. A callback now runs inside asyncpg's protocol, so one that raises is logged here instead of unwinding
    into the protocol (which would abort the connection); asyncpg would have logged it through the loop's handler.
    """

    __slots__ = ()
    _failures_logged_at = -CALLBACK_ERROR_LOG_INTERVAL_S  # class-wide: slots leave no room per connection
    _failures = 0

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        callbacks = self._listeners.get(channel)
        if not callbacks:
            return
        connection = self._unwrap()  # what asyncpg hands its callbacks (the proxy of a pooled connection)
        for callback in tuple(callbacks):  # a callback may add or remove listeners
            if callback.is_async:
                self._loop.create_task(callback.cb(connection, pid, channel, payload))
                continue
            try:
                callback.cb(connection, pid, channel, payload)
            except Exception:  # the connection's boundary: never into asyncpg's protocol
                cls = InlineNotifyConnection
                cls._failures += 1
                now = time.monotonic()
                if now - cls._failures_logged_at >= CALLBACK_ERROR_LOG_INTERVAL_S:
                    cls._failures_logged_at = now
                    log.exception("listener.notification_callback_failed", channel=channel, failures=cls._failures)


def _inline_notify_supported() -> bool:
    """Whether this asyncpg's private notification hook is the one InlineNotifyConnection overrides."""
    method = getattr(asyncpg.Connection, "_process_notification", None)
    callback = getattr(getattr(asyncpg, "connection", None), "_Callback", None)
    slots = getattr(asyncpg.Connection, "__slots__", ())
    try:
        parameters = list(inspect.signature(method).parameters) if callable(method) else []
    except (TypeError, ValueError):
        return False
    return (parameters == ["self", "pid", "channel", "payload"] and "_listeners" in slots and "_loop" in slots
            and callable(getattr(asyncpg.Connection, "_unwrap", None))
            and getattr(callback, "_fields", None) == ("cb", "is_async"))


INLINE_NOTIFY = _inline_notify_supported()
