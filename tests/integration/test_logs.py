"""Logs: the daemon, run as a process, writes JSON lines that never carry the DSN's password or a token.

The database of these tests requires a password (scram-sha-256) from a role created for them, so that a wrong
password really fails and a right one really travels in the DSN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import jwt
import pytest
import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from notifyrelay.ops.log import configure_logging, register_secret
from tests.conftest import Database
from tests.daemon import Daemon

CHANNEL = "activity_progress"
ROLE = "relay_logged"


@dataclass
class Role:
    """A login role whose password the database checks."""

    name: str
    password: str
    database: Database

    def dsn(self, password: str | None = None) -> str:
        assert self.database.server is not None
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{self.name}:{secret}@127.0.0.1:{self.database.server.port}/postgres"


@pytest.fixture
async def role(own_database: Database) -> Role:
    """A role with a password (with characters a URL must escape), enforced by pg_hba.conf for TCP logins."""
    server = own_database.server
    assert server is not None
    password = f"Pw-{secrets.token_hex(8)}/@:x"
    hba = server.pgdata / "pg_hba.conf"
    hba.write_text(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    admin = await asyncpg.connect(own_database.dsn)
    try:
        await admin.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    found = Role(ROLE, password, own_database)

    async def refused() -> bool:
        try:
            conn = await asyncpg.connect(found.dsn("wrong-password"))
        except asyncpg.InvalidPasswordError:
            return True
        await conn.close()
        return False

    for _ in range(100):  # the reload is asynchronous
        if await refused():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("pg_hba.conf change did not take effect")
    conn = await asyncpg.connect(found.dsn())
    await conn.close()
    return found


def write_config(tmp_path: Path, role: Role, dsn: str | None, **sections: str) -> Path:
    lines = [f"dsn = {json.dumps(dsn)}"] if dsn else []
    lines += ["[server]", 'listen = "127.0.0.1:0"',
              "[listener]", "heartbeat_interval_s = 0.5", "heartbeat_timeout_s = 1.0", "reconnect_max_s = 0.3"]
    for section, body in sections.items():
        lines += [f"[{section}]", body]
    lines += ["[[channels]]", f'name = "{CHANNEL}"']
    path = tmp_path / "notifyrelay.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def assert_clean(daemon: Daemon, *secrets_: str) -> list[dict[str, Any]]:
    """Every line is a JSON object with event, level and timestamp, and no secret shows in any form."""
    events = daemon.events()
    assert events
    for entry in events:
        assert {"event", "level", "timestamp"} <= entry.keys(), entry
    text = "".join(daemon.lines)
    for secret in secrets_:
        for form in {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}:
            assert form not in text, f"a secret reached the logs: {form!r}"
    return events


async def test_daemon_logs_json_lines_without_the_password_or_tokens(
    role: Role, daemons: list[Daemon], tmp_path: Path
) -> None:
    """At debug level, through probes, a websocket client with tokens and a lost connection, no secret is logged."""
    token = f"tok-{secrets.token_hex(12)}"
    config = write_config(tmp_path, role, role.dsn(), log='level = "debug"')
    daemon = await Daemon.start("--config", str(config))
    daemons.append(daemon)
    await daemon.wait_for("listener.up")
    base = f"http://127.0.0.1:{daemon.port}"
    for path in ("/healthz", "/readyz", "/metrics", "/healthz?token=" + token, "/nope"):
        await asyncio.to_thread(http_get, base + path)
    async with connect(
        f"ws://127.0.0.1:{daemon.port}/ws?channel={CHANNEL}&token={token}",
        additional_headers={"Authorization": f"Bearer {token}"}, subprotocols=[token],  # type: ignore[list-item]
    ) as client:
        await client.recv()
        await client.send("not json")
        await client.recv()
    # Lose the LISTEN connection so that the listener logs its loss and its reconnection.
    admin = await asyncpg.connect(role.database.dsn)
    try:
        await admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROLE}'")
    finally:
        await admin.close()
    await daemon.wait_for("listener.up", count=2)
    assert await daemon.stop() == 0

    events = assert_clean(daemon, role.password, token)
    names = [entry["event"] for entry in events]
    for expected in ("relay.started", "listener.up", "listener.lost", "relay.shutting_down", "relay.stopped"):
        assert expected in names, names
    # Probe and handshake requests are not logged: websockets' per-request info lines are filtered out.
    for entry in events:
        assert not (entry.get("logger", "").startswith("websockets") and entry["level"] in ("debug", "info")), entry
    assert not any(path in "".join(daemon.lines) for path in ("/healthz", "/readyz", "/metrics", "/nope"))


async def test_wrong_password_failures_are_logged_without_the_password(
    role: Role, daemons: list[Daemon], tmp_path: Path
) -> None:
    """A rejected password is logged as connect failures with a fix, never the password tried (from the env)."""
    wrong = f"Wrong-{secrets.token_hex(8)}"
    config = write_config(tmp_path, role, None)
    daemon = await Daemon.start("--config", str(config), env={"NOTIFYRELAY_DSN": role.dsn(wrong)})
    daemons.append(daemon)
    await daemon.wait_for("relay.started")
    await daemon.wait_for("listener.connect_failed", count=2)
    assert await asyncio.to_thread(http_get, f"http://127.0.0.1:{daemon.port}/readyz") == 503
    assert await daemon.stop() == 0

    events = assert_clean(daemon, wrong, role.password)
    failure = next(entry for entry in events if entry["event"] == "listener.connect_failed")
    assert failure["level"] == "error"
    assert "password authentication failed" in failure["error"]
    assert "password" in failure["fix"]


async def test_jwt_mode_never_logs_the_secret_or_a_token(role: Role, daemons: list[Daemon], tmp_path: Path) -> None:
    """In auth mode jwt, accepted, expired and forged tokens (header, query, subprotocol) leave only reasons."""
    secret = f"jwt-secret-{secrets.token_hex(16)}"
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(secret)
    config = write_config(
        tmp_path, role, role.dsn(), auth=f'mode = "jwt"\njwt_secret_file = {json.dumps(str(secret_file))}',
        log='level = "debug"',
    )
    daemon = await Daemon.start("--config", str(config))
    daemons.append(daemon)
    await daemon.wait_for("listener.up")
    now = int(time.time())
    claims = {"sub": "ui-7", "channels": {CHANNEL: "*"}}
    valid = jwt.encode({**claims, "exp": now + 60}, secret, algorithm="HS256")
    expired = jwt.encode({**claims, "exp": now - 60}, secret, algorithm="HS256")
    forged = jwt.encode({**claims, "exp": now + 60}, "not-the-secret-" + secret, algorithm="HS256")
    url = f"ws://127.0.0.1:{daemon.port}/ws"
    async with connect(f"{url}?token={valid}") as client:
        assert json.loads(await client.recv())["type"] == "welcome"
    async with connect(url, subprotocols=[valid]) as client:  # type: ignore[list-item]
        assert json.loads(await client.recv())["type"] == "welcome"
    for attempt in (
        connect(url, additional_headers={"Authorization": f"Bearer {expired}"}),
        connect(f"{url}?token={forged}"),
        connect(url, subprotocols=[forged]),  # type: ignore[list-item]
    ):
        with pytest.raises(InvalidStatus):
            await attempt
    await daemon.wait_for("server.auth_failed", count=3)
    assert await daemon.stop() == 0

    events = assert_clean(daemon, secret, role.password, valid, expired, forged)
    reasons = [entry["reason"] for entry in events if entry["event"] == "server.auth_failed"]
    assert len(reasons) == 3, reasons


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in ("websockets", "asyncpg", "tenacity")}
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)
    structlog.reset_defaults()
    structlog.configure(**config)


def test_a_terminal_gets_console_lines_and_a_pipe_gets_json(restore_logging: None) -> None:
    """Format "auto" renders for people on a TTY and JSON elsewhere; both scrub nested values and exceptions."""
    register_secret("S3cret-for-the-format-test")
    master, replica = os.openpty()
    with os.fdopen(replica, "w") as terminal:
        configure_logging("info", "auto", stream=terminal)
        structlog.get_logger("notifyrelay.test").info("test.console", dsn="postgresql://u:S3cret@h/db")
        terminal.flush()
        shown = os.read(master, 65536).decode()
    os.close(master)
    assert "test.console" in shown and not shown.lstrip().startswith("{")
    assert "S3cret" not in shown

    pipe_read, pipe_write = os.pipe()
    with os.fdopen(pipe_write, "w") as pipe:
        configure_logging("info", "auto", stream=pipe)
        structlog.get_logger("notifyrelay.test").info("test.json", nested={"tokens": ["S3cret-for-the-format-test"]})
        try:
            raise RuntimeError("connect to postgresql://u:S3cret@h/db failed")
        except RuntimeError:
            logging.getLogger("asyncpg.test").warning("library failure", exc_info=True)
        logging.getLogger("websockets.server").info("HTTP response sent (200 OK)")
    with os.fdopen(pipe_read) as output:
        lines = [json.loads(line) for line in output]
    assert [entry["event"] for entry in lines] == ["test.json", "library failure"]
    assert lines[0]["nested"] == {"tokens": ["***"]}
    assert lines[1]["logger"] == "asyncpg.test" and "RuntimeError" in lines[1]["exception"]
    assert "S3cret" not in json.dumps(lines)
