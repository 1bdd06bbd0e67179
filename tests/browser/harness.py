"""What the browser tests and the Node client tests share: the activities schema, a relay that carries its rows, a
gate in front of the relay that can make it unreachable, a relay restart on the same port, and a small HTTP control
endpoint through which the Node tests ask for those things."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from notifyrelay.app import Relay
from notifyrelay.sqlcmd import apply, install_script
from tests.conftest import Database, RelayFactory
from tests.proxy import Proxy

CHANNEL = "activity_progress"
HINT_CHANNEL = "activity_hints"
COLUMNS = ["status", "objects_processed", "objects_to_process", "message"]
ACTIVE = "status IN ('queued', 'running')"
LIST_QUERY = f"SELECT id::text AS key, {', '.join(COLUMNS)} FROM activities WHERE {ACTIVE} ORDER BY id"


def channels() -> list[dict[str, Any]]:
    """The demo's channels: activities with rows and progress, the system_stability badge, and a hint channel."""
    return [
        {
            "name": CHANNEL,
            "state": {
                "table": "activities",
                "key_column": "id",
                "columns": COLUMNS,
                "list_query": LIST_QUERY,
            },
            "progress": {
                "done": "objects_processed",
                "total": "objects_to_process",
                "status": "status",
                "terminal": ["done", "complete", "failed", "cancelled"],
                "failed": ["failed"],
            },
        },
        {"name": "system_stability", "key": "json:scope", "include_payload": True},
        {"name": HINT_CHANNEL},
    ]


def relay_overrides(**extra: Any) -> dict[str, Any]:
    """make_relay overrides for these tests: the channels above, 50 ms windows so that tests see changes quickly."""
    return {"channels": channels(), "coalesce.window_ms": 50, **extra}


class Activities:
    """The activities table of a test database, written the way a worker would."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def install(self) -> Activities:
        await apply(self.database.dsn, install_script(["activities", "system_stability"]))
        return self

    async def _run(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.database.dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def create(self, total: int = 100, *, status: str = "queued", message: str = "waiting") -> str:
        """A new activity; returns its key (the id as text)."""
        key = await self._run(
            "INSERT INTO activities (status, objects_to_process, message) VALUES ($1, $2, $3) RETURNING id::text",
            status, total, message,
        )
        return str(key)

    async def update(self, key: str, **columns: Any) -> None:
        """Set columns of one activity (``done`` is objects_processed, ``total`` objects_to_process)."""
        names = {"done": "objects_processed", "total": "objects_to_process", "status": "status", "message": "message"}
        assignments = ", ".join(f"{names[name]} = ${n}" for n, name in enumerate(columns, start=2))
        await self._run(f"UPDATE activities SET {assignments}, updated_at = now() WHERE id::text = $1",
                        key, *columns.values())


class Gate(Proxy):
    """A TCP proxy in front of the relay: ``shut()`` cuts every client link and refuses new ones until ``open()``."""

    refusing = False

    def shut(self) -> None:
        self.refusing = True
        self.cut()

    def open(self) -> None:
        self.refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        await super()._accept(reader, writer)


async def restart_relay(make_relay: RelayFactory, relay: Relay, *, between: Callable[[], Awaitable[None]] | None = None,
                        **overrides: Any) -> Relay:
    """Stop ``relay``, run ``between`` while no relay listens, and start a new relay on the same port."""
    port = relay.server.port
    relay.request_stop()
    # The old process has stopped accepting once its port refuses connections.
    async with asyncio.timeout(15):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                break
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            await asyncio.sleep(0.05)
    if between is not None:
        await between()
    return await make_relay(**{**overrides, "server.listen": f"127.0.0.1:{port}"})


Handler = Callable[[str, bytes], Awaitable[tuple[int, str, bytes]]]


class TinyHTTP:
    """An HTTP/1.1 server on 127.0.0.1 for tests: one ``handler(path, body) -> (status, content type, body)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> TinyHTTP:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode().strip()):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            path = request_line.split()[1] if request_line.count(" ") >= 2 else "/"
            status, content_type, payload = await self.handler(path, body)
            writer.write(
                f"HTTP/1.1 {status} -\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
                f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + payload
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the browser gave up on this connection; nothing to answer
        finally:
            writer.close()


def control(actions: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]) -> TinyHTTP:
    """The Node tests' control endpoint: ``POST /NAME`` with a JSON object runs action NAME, answers JSON."""

    async def run(path: str, body: bytes) -> tuple[int, str, bytes]:
        name = path.strip("/")
        try:
            answer = {"ok": True, "result": await actions[name](json.loads(body or b"{}"))}
            status = 200
        except Exception as exc:  # a failed action is the Node test's failure to report, not a crash here
            answer, status = {"ok": False, "error": f"{name}: {exc!r}"}, 500
        return status, "application/json", json.dumps(answer).encode()

    return TinyHTTP(run)
