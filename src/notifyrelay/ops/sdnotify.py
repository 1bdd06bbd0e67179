"""systemd's notify protocol, spoken directly: one datagram per message to the socket in ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd waits for ``READY=1`` before it counts the service as started, shows ``STATUS=`` in
``systemctl status``, restarts the service when ``WATCHDOG=1`` stops arriving within ``WatchdogSec``, and tracks
``RELOADING=1``/``READY=1`` around a reload and ``STOPPING=1`` at shutdown. Outside systemd (no ``NOTIFY_SOCKET``)
every call does nothing, so the daemon needs no special case.

The protocol is small enough that a dependency would be more code to trust than this: see sd_notify(3).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from datetime import datetime

import structlog

from ..pipeline.listener import ListenerObserver

log = structlog.get_logger("notifyrelay.sdnotify")


class SystemdNotifier:
    """Sends sd_notify messages; a no-op when the process was not started by systemd with a notify socket."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        # "@name" is a socket in the abstract namespace: its address starts with a NUL byte instead.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval_s = watchdog_usec / 2_000_000 if watchdog_usec else None  # ping at half the timeout
        self.ready_sent = False
        self.stopping_sent = False
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (the watchdog is ours only if the PID is)."""
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
            pid = int(environ.get("WATCHDOG_PID", str(os.getpid())))
        except ValueError:
            usec, pid = 0, 0
        if usec > 0 and pid == os.getpid():
            watchdog_usec = usec
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one message; True if it was sent. Failures are logged, never raised: systemd may be
        restarting, and the relay's clients matter more than its supervisor's view of it."""
        if self.address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            log.warning("sdnotify.send_failed", error=str(exc), message=lines[0] if lines else "")
            return False
        return True

    def ready(self, status: str) -> None:
        """``READY=1``: startup (or a reload) is complete. Never after STOPPING=1 (a listener first up mid-shutdown)."""
        if self.stopping_sent:
            return
        self.ready_sent = True
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        """``RELOADING=1`` with the monotonic time systemd wants with it; only once started (else it stays starting)."""
        if self.ready_sent:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def reloaded(self, status: str) -> None:
        """``READY=1`` after a reload, whether or not the new configuration was accepted."""
        if self.ready_sent:
            self.ready(status)

    def stopping(self, status: str = "shutting down") -> None:
        self.stopping_sent = True
        self.notify("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Send ``WATCHDOG=1`` at half of ``WatchdogSec`` for as long as the event loop turns; returns at once when
        systemd asked for no watchdog. A stuck loop stops the pings, and systemd restarts the service."""
        if self.watchdog_interval_s is None or self.address is None:
            return
        log.info("sdnotify.watchdog_started", interval_s=self.watchdog_interval_s)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


class ListenerStatusReporter:
    """Passes the listener's up/down on to the hub and tells systemd: ``READY=1`` the first time it is up (the
    server already listens by then), ``STATUS=`` on every change."""

    def __init__(self, inner: ListenerObserver, notifier: SystemdNotifier) -> None:
        self._inner = inner
        self._notifier = notifier

    def listener_down(self) -> None:
        self._inner.listener_down()
        self._notifier.status("listener down: reconnecting to PostgreSQL; clients told to poll")

    def listener_up(self, channels: list[str], gap_start: datetime, gap_end: datetime, reason: str) -> None:
        self._inner.listener_up(channels, gap_start, gap_end, reason)
        status = f"relaying {len(channels)} channel(s): listener up"
        if self._notifier.ready_sent:
            self._notifier.status(status)
        else:
            self._notifier.ready(status)

