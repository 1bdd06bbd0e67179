"""sql/ applied to a real PostgreSQL: install, the row and statement-level example triggers, uninstall, the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from notifyrelay.cli import main
from notifyrelay.sqlcmd import apply, install_script

from ..conftest import ClientFactory, Database, RelayFactory


def _with_database(dsn: str, name: str) -> str:
    """``dsn`` pointed at database ``name`` (URL or key=value form)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path=f"/{name}"))
    return f"{dsn} dbname={name}"


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def scratch_dsn(database: Database) -> Iterator[str]:
    """A fresh database of this test's own on the shared server, so that examples' tables never meet other tests."""
    name = f"notifyrelay_sql_{secrets.token_hex(4)}"
    asyncio.run(_admin(database.dsn, f"CREATE DATABASE {name}"))
    try:
        yield _with_database(database.dsn, name)
    finally:
        asyncio.run(_admin(database.dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


class Notifications:
    """A real LISTEN connection that records what arrives on some channels."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.received: list[tuple[str, str]] = []

    def _on(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.received.append((channel, payload))

    async def listen(self, *channels: str) -> None:
        for channel in channels:
            await self.conn.add_listener(channel, self._on)

    async def settle(self) -> list[tuple[str, str]]:
        """Everything received so far, after a round trip that lets committed notifications arrive."""
        await self.conn.execute("SELECT pg_notify('notifyrelay_test_fence', '')")
        await self.conn.add_listener("notifyrelay_test_fence", self._on)
        await self.conn.execute("SELECT pg_notify('notifyrelay_test_fence', '')")
        for _ in range(100):
            if ("notifyrelay_test_fence", "") in self.received:
                break
            await asyncio.sleep(0.01)
        await self.conn.remove_listener("notifyrelay_test_fence", self._on)
        got = [item for item in self.received if item[0] != "notifyrelay_test_fence"]
        self.received.clear()
        return got


@pytest.fixture
async def examples_db(scratch_dsn: str) -> AsyncIterator[tuple[Any, Notifications]]:
    """The scratch database with install.sql and both examples applied, a writer connection and a listener."""
    await apply(scratch_dsn, install_script(["activities", "system_stability"]))
    writer = await asyncpg.connect(scratch_dsn)
    listener = Notifications(await asyncpg.connect(scratch_dsn))
    await listener.listen("activity_progress", "system_stability")
    try:
        yield writer, listener
    finally:
        await writer.close()
        await listener.conn.close()


def test_install_twice_is_harmless_and_versioned(scratch_dsn: str) -> None:
    """Running ``notifyrelay sql install`` twice succeeds both times and leaves SQL version 1 installed."""
    for _ in range(2):
        assert main(["sql", "install", "--dsn", scratch_dsn, "--example", "activities"]) == 0

    async def check() -> None:
        conn = await asyncpg.connect(scratch_dsn)
        try:
            assert await conn.fetchval("SELECT notifyrelay.version()") == 1
            triggers = await conn.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'activities'::regclass AND NOT tgisinternal"
            )
            assert triggers == 2  # replaced, not duplicated
        finally:
            await conn.close()

    asyncio.run(check())


def test_install_refuses_to_downgrade(scratch_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """install.sql refuses to replace a newer installed SQL version, and the command says so and exits 1."""
    assert main(["sql", "install", "--dsn", scratch_dsn]) == 0
    asyncio.run(_admin(scratch_dsn, "CREATE OR REPLACE FUNCTION notifyrelay.version() RETURNS integer "
                                    "LANGUAGE sql IMMUTABLE AS $$ SELECT 2 $$"))
    capsys.readouterr()
    assert main(["sql", "install", "--dsn", scratch_dsn]) == 1
    assert "version 2 is installed" in capsys.readouterr().err


def test_uninstall_removes_everything_and_twice_is_harmless(scratch_dsn: str) -> None:
    """``sql uninstall`` drops the schema and the triggers using notify_key(), and a second run still succeeds."""
    assert main(["sql", "install", "--dsn", scratch_dsn, "--example", "activities"]) == 0
    for _ in range(2):
        assert main(["sql", "uninstall", "--dsn", scratch_dsn]) == 0

    async def check() -> None:
        conn = await asyncpg.connect(scratch_dsn)
        try:
            assert await conn.fetchval("SELECT to_regnamespace('notifyrelay')") is None
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'activities'::regclass AND NOT tgisinternal"
            ) == 0
            await conn.execute("INSERT INTO activities DEFAULT VALUES")  # the table itself still works
        finally:
            await conn.close()

    asyncio.run(check())


def test_install_reads_the_dsn_file_like_the_daemon(
    scratch_dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --dsn, ``sql install`` connects with the DSN in NOTIFYRELAY_DSN_FILE, as the daemon would."""
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(scratch_dsn + "\n")
    monkeypatch.delenv("NOTIFYRELAY_DSN", raising=False)
    monkeypatch.setenv("NOTIFYRELAY_DSN_FILE", str(dsn_file))
    assert main(["sql", "install"]) == 0

    async def installed() -> int:
        conn = await asyncpg.connect(scratch_dsn)
        try:
            version: int = await conn.fetchval("SELECT notifyrelay.version()")
            return version
        finally:
            await conn.close()

    assert asyncio.run(installed()) == 1


def test_print_writes_what_install_applies(capsys: pytest.CaptureFixture[str]) -> None:
    """``sql print`` writes install.sql then each example, ready for psql, and rejects an unknown example."""
    assert main(["sql", "print", "--example", "system_stability"]) == 0
    out = capsys.readouterr().out
    assert out.index("-- sql/install.sql") < out.index("-- sql/examples/system_stability.sql")
    assert "CREATE OR REPLACE FUNCTION notifyrelay.notify_key()" in out
    assert main(["sql", "print", "--example", "nope"]) == 2
    assert "activities, system_stability" in capsys.readouterr().err


def test_sql_command_reports_connection_failure_without_password() -> None:
    """A DSN that cannot connect makes ``sql install`` exit 1 with a message that never shows the password."""
    err = io.StringIO()
    from notifyrelay.cli import _parser
    from notifyrelay.sqlcmd import run_sql_command

    args = _parser().parse_args(["sql", "install", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/db"])
    assert run_sql_command(args, out=io.StringIO(), err=err) == 1
    assert "hunter2" not in err.getvalue() and "***" in err.getvalue()


async def test_row_trigger_fires_for_real_changes_only(examples_db: tuple[Any, Notifications]) -> None:
    """notify_key() sends the id for an insert and a watched change, and nothing for an UPDATE that changes none."""
    writer, listener = examples_db
    activity = await writer.fetchval("INSERT INTO activities (status) VALUES ('done') RETURNING id")
    assert await listener.settle() == [("activity_progress", str(activity))]

    await writer.execute("UPDATE activities SET updated_at = now() + interval '1 s' WHERE id = $1", activity)
    await writer.execute("UPDATE activities SET status = status, objects_processed = objects_processed")
    assert await listener.settle() == []

    await writer.execute("UPDATE activities SET objects_processed = 7 WHERE id = $1", activity)
    assert await listener.settle() == [("activity_progress", str(activity))]


async def test_statement_trigger_sends_one_notification_per_statement(
    examples_db: tuple[Any, Notifications],
) -> None:
    """The system_stability triggers send one notification per statement, and none when no activity's state moved."""
    writer, listener = examples_db
    await writer.execute("INSERT INTO activities (status) SELECT 'queued' FROM generate_series(1, 50)")
    stability = [json.loads(p) for c, p in await listener.settle() if c == "system_stability"]
    assert stability == [{"scope": "system", "state": "processing", "active": 50}]

    await writer.execute("UPDATE activities SET objects_processed = objects_processed + 1, status = 'running'")
    assert [c for c, _ in await listener.settle() if c == "system_stability"] == []  # still 50 active

    await writer.execute("UPDATE activities SET status = 'done'")
    stability = [json.loads(p) for c, p in await listener.settle() if c == "system_stability"]
    assert stability == [{"scope": "system", "state": "stable", "active": 0}]


async def test_key_guard_keeps_payloads_small(examples_db: tuple[Any, Notifications]) -> None:
    """notify_key() refuses a key over 1024 bytes with an error naming the column, far from the 8000-byte limit."""
    writer, _ = examples_db
    await writer.execute("""
        CREATE TABLE documents (slug text PRIMARY KEY);
        CREATE TRIGGER documents_notify AFTER INSERT ON documents FOR EACH ROW
            EXECUTE FUNCTION notifyrelay.notify_key('documents', 'slug');
    """)
    with pytest.raises(asyncpg.RaiseError, match="key column slug holds 2000 bytes"):
        await writer.execute("INSERT INTO documents VALUES ($1)", "x" * 2000)


async def test_stability_reaches_websocket_clients(
    scratch_dsn: str, make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """A relay configured as system_stability.sql suggests delivers the newest state to a client following it."""
    await apply(scratch_dsn, install_script(["activities", "system_stability"]))
    relay = await make_relay(
        dsn=scratch_dsn,
        channels=[{"name": "system_stability", "key": "json:scope", "include_payload": True}],
    )
    client = await make_client(relay)
    assert (await client.subscribe("system_stability", ["system"]))["type"] == "ack"
    conn = await asyncpg.connect(scratch_dsn)
    try:
        await conn.execute("INSERT INTO activities (status) VALUES ('running')")
    finally:
        await conn.close()
    frame = await client.recv_type("notify")
    assert frame["keys"] == ["system"]
    assert frame["payloads"]["system"] == {"scope": "system", "state": "processing", "active": 1}


async def test_key_is_the_column_as_text_and_before_triggers_are_refused(
    examples_db: tuple[Any, Notifications],
) -> None:
    """notify_key() sends the key as ::text renders it (timestamps, floats, quoted names; on DELETE too), and refuses
    to run as a BEFORE trigger, where its NULL result would silently cancel the write."""
    writer, listener = examples_db
    await listener.listen("stamps")
    await writer.execute("""
        CREATE TABLE stamps ("At" timestamptz, f float8);
        CREATE TRIGGER stamps_notify AFTER INSERT OR DELETE ON stamps FOR EACH ROW
            EXECUTE FUNCTION notifyrelay.notify_key('stamps', 'At');
    """)
    await writer.execute("INSERT INTO stamps VALUES ('2026-01-02 03:04:05+00', 1e20)")
    await writer.execute("DELETE FROM stamps")
    expected = await writer.fetchval("""SELECT '2026-01-02 03:04:05+00'::timestamptz::text""")
    assert await listener.settle() == [("stamps", expected), ("stamps", expected)]
    await writer.execute("""
        CREATE TRIGGER stamps_before BEFORE INSERT ON stamps FOR EACH ROW
            EXECUTE FUNCTION notifyrelay.notify_key('stamps', 'f');
    """)
    with pytest.raises(asyncpg.RaiseError, match="must be an AFTER trigger"):
        await writer.execute("INSERT INTO stamps VALUES (now(), 1)")


def test_sql_command_never_quotes_a_password_from_a_malformed_dsn() -> None:
    """A password with an unencoded '/' or '?' is neither echoed by the DSN check nor by the failure message."""
    from notifyrelay.cli import _parser
    from notifyrelay.sqlcmd import run_sql_command

    for dsn in ("postgresql://relay:s3cr/etPW@127.0.0.1:1/app", "postgresql://relay:Pw_pa?ssword9@127.0.0.1:1/app"):
        err = io.StringIO()
        args = _parser().parse_args(["sql", "install", "--dsn", dsn])
        assert run_sql_command(args, out=io.StringIO(), err=err) == 2
        assert "s3cr" not in err.getvalue() and "Pw_pa" not in err.getvalue() and "ssword9" not in err.getvalue()
