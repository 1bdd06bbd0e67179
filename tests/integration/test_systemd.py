"""systemd: the real daemon's sd_notify messages over a real socket, and the unit checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Database

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "notifyrelay.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


class NotifySocket:
    """A bound AF_UNIX datagram socket playing systemd's part; collects every message the daemon sends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[list[str]] = []

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 15) -> list[str]:
        """The first message (seen or arriving) that satisfies ``predicate``, its lines split."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such sd_notify message within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        yield listener
    finally:
        listener.sock.close()


def test_daemon_speaks_sd_notify(database: Database, notify_socket: NotifySocket, tmp_path: Path) -> None:
    """`notifyrelay run` sends READY=1 once listening, WATCHDOG=1 pings, RELOADING=1/READY=1 on SIGHUP and
    STOPPING=1 on SIGTERM, then exits 0."""
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(database.dsn + "\n")
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n\n[shutdown]\ntimeout_s = 3\n\n[[channels]]\nname = "activity_progress"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFYRELAY_", "WATCHDOG_", "NOTIFY_"))}
    env.update(
        NOTIFY_SOCKET=notify_socket.path,
        WATCHDOG_USEC="400000",
        NOTIFYRELAY_DSN_FILE=str(dsn_file),  # as the unit does with LoadCredential=
        NOTIFYRELAY_LOG_FORMAT="json",
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "notifyrelay", "run", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        ready = notify_socket.wait_for(lambda m: "READY=1" in m)
        assert any(line.startswith("STATUS=") and "listener up" in line for line in ready), ready
        notify_socket.wait_for(lambda m: m == ["WATCHDOG=1"])

        daemon.send_signal(signal.SIGHUP)
        reloading = notify_socket.wait_for(lambda m: "RELOADING=1" in m)
        assert any(re.fullmatch(r"MONOTONIC_USEC=\d+", line) for line in reloading), reloading
        after = notify_socket.messages.index(reloading)
        notify_socket.wait_for(lambda m: "READY=1" in m and notify_socket.messages.index(m) > after)

        daemon.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for(lambda m: "STOPPING=1" in m)
        assert any(line.startswith("STATUS=shutting down") for line in stopping), stopping
        assert daemon.wait(timeout=10) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        output, _ = daemon.communicate(timeout=10)
    assert b"relay.stopped" in output, output.decode(errors="replace")

def _verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at this venv's console script: verify checks that the binary exists."""
    script = Path(sys.executable).with_name("notifyrelay")
    unit = tmp_path / "notifyrelay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/notifyrelay", str(script)))
    return unit


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single complaint about it."""
    unit = _verifiable_unit(tmp_path)
    assert SYSTEMD_ANALYZE
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@needs_systemd_analyze
def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit's exposure at 2.0 or lower."""
    unit = _verifiable_unit(tmp_path)
    assert SYSTEMD_ANALYZE
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
