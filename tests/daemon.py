"""``python -m notifyrelay run`` as a child process, its stderr (JSON log lines) collected, for tests that need the
real process: logs, exit statuses, resource limits."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
from typing import Any

from tests.conftest import wait_until


class Daemon:
    """One relay process; ``lines`` is its stderr so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, *args: str, env: dict[str, str] | None = None, nofile: tuple[int, int] | None = None
    ) -> Daemon:
        """Start ``notifyrelay run ARGS`` without the caller's NOTIFYRELAY_/PG variables; ``nofile`` sets its
        RLIMIT_NOFILE (soft, hard)."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFYRELAY_", "PG"))}
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "notifyrelay", "run", *args,
            env={**environ, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=limit,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.lines.append(line.decode())

    def events(self) -> list[dict[str, Any]]:
        """Every line parsed as JSON (a line that is not JSON fails the test)."""
        parsed = []
        for line in self.lines:
            entry = json.loads(line)
            assert isinstance(entry, dict), line
            parsed.append(entry)
        return parsed

    def named(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.events() if entry["event"] == event]

    def count(self, event: str) -> int:
        return len(self.named(event))

    async def wait_for(self, event: str, count: int = 1, timeout: float = 10) -> None:
        await wait_until(lambda: self.count(event) >= count, timeout=timeout)

    @property
    def port(self) -> int:
        """The websocket port the relay said it listens on (once it has said so)."""
        started = self.named("relay.started")
        assert started, self.lines
        match = re.search(r":(\d+)/ws$", started[0]["url"])
        assert match, started
        return int(match.group(1))

    async def exited(self) -> int:
        """The exit status once the process ends by itself, with all of its stderr read."""
        status = await asyncio.wait_for(self.process.wait(), 15)
        await self._reader
        return status

    async def stop(self) -> int:
        """SIGTERM, then the exit status; stdout must have stayed empty (logs go to stderr)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.stdout is not None
        stdout = await asyncio.wait_for(self.process.stdout.read(), 15)
        status = await self.exited()
        assert stdout == b""
        return status
