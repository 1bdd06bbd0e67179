"""The sd_notify client over real AF_UNIX datagram sockets: addresses, messages, watchdog and reload rules."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from notifyrelay.ops.sdnotify import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for systemd's, and its path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield path, sock


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_and_status_arrive_as_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    """ready() sends READY=1 and its STATUS= line together in a single datagram to the path in NOTIFY_SOCKET."""
    path, sock = notify_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.ready("relaying 1 channel(s)\nlistener up")
    assert receive(sock) == ["READY=1", "STATUS=relaying 1 channel(s) listener up"]
    notifier.stopping()
    assert receive(sock) == ["STOPPING=1", "STATUS=shutting down"]
    notifier.close()


def test_abstract_socket_address() -> None:
    """A NOTIFY_SOCKET starting with '@' reaches a socket in the abstract namespace."""
    name = f"notifyrelay-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify("STATUS=hello")
        assert receive(sock) == ["STATUS=hello"]
        notifier.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    """With no NOTIFY_SOCKET nothing is sent and nothing fails, so the daemon needs no special case."""
    notifier = SystemdNotifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.notify("READY=1")
    notifier.ready("x")
    notifier.stopping()
    notifier.close()


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    """Sending to a socket that no longer exists returns False instead of crashing the relay."""
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.notify("READY=1") is False
    notifier.close()


def test_watchdog_settings_follow_the_environment() -> None:
    """The watchdog pings at half of WATCHDOG_USEC, and only when WATCHDOG_PID (if set) is this process."""
    mine = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"})
    assert mine.watchdog_interval_s == 15.0
    ours = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environ(ours).watchdog_interval_s == 15.0
    other = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier.from_environ(other).watchdog_interval_s is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


async def test_watchdog_pings_while_the_loop_turns(notify_socket: tuple[str, socket.socket]) -> None:
    """watchdog() sends WATCHDOG=1 repeatedly at half the timeout until cancelled, and returns at once if unset."""
    path, sock = notify_socket
    sock.setblocking(False)
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.watchdog())
    await asyncio.sleep(0.22)
    task.cancel()
    pings = 0
    while True:
        try:
            assert sock.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        pings += 1
    assert 3 <= pings <= 6
    await asyncio.wait_for(SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}).watchdog(), 1)
    notifier.close()


def test_reloading_carries_monotonic_time_and_only_after_ready(notify_socket: tuple[str, socket.socket]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, and neither it nor the READY=1 after a reload is sent before startup."""
    path, sock = notify_socket
    sock.setblocking(False)
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.reloading()
    notifier.reloaded("reloaded")
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # still starting: a reload must not announce readiness
    notifier.ready("up")
    sock.recv(4096)
    notifier.reloading()
    lines = receive(sock)
    assert lines[0] == "RELOADING=1"
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 2_000_000
    notifier.reloaded("reloaded")
    assert receive(sock)[0] == "READY=1"
    notifier.close()


def test_ready_is_never_sent_after_stopping() -> None:
    """Once STOPPING=1 went out, a late READY=1 (a listener first up during shutdown) is not sent."""
    from notifyrelay.ops.sdnotify import SystemdNotifier

    notifier = SystemdNotifier(None)
    sent: list[tuple[str, ...]] = []
    notifier.notify = lambda *lines: sent.append(lines)  # type: ignore[method-assign]
    notifier.stopping()
    notifier.ready("listener up")
    assert [lines[0] for lines in sent] == ["STOPPING=1"]
