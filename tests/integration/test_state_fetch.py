"""The state query against a real PostgreSQL: rows, gone, JSON conversion, progress, and every failure outcome."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from notifyrelay.config import ChannelConfig
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pgembed import free_port
from notifyrelay.pipeline.state import ChannelState, StatePool

from ..conftest import Database

_tables = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def channel(state: dict[str, Any], progress: dict[str, Any] | None = None, name: str = "jobs") -> ChannelConfig:
    data: dict[str, Any] = {"name": name, "state": state}
    if progress is not None:
        data["progress"] = progress
    return msgspec.convert(data, ChannelConfig)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"notifyrelay_{name}", labels)
    return value or 0.0


@pytest.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database.dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def jobs(conn: asyncpg.Connection) -> str:
    """A fresh activities-like table of this test's own; its name."""
    table = f"jobs_{next(_tables)}_{int(time.time() * 1000) % 100000}"
    await conn.execute(
        f"""CREATE TABLE {table} (
            id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'running',
            done integer NOT NULL DEFAULT 0, total integer, message text)"""
    )
    await conn.execute(f"INSERT INTO {table} (id, status, done, total, message) VALUES "
                       "(1, 'running', 10, 100, 'one'), (2, 'queued', 0, NULL, NULL), (3, 'complete', 5, 5, 'x')")
    return table


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[tuple[StatePool, Metrics]]:
    metrics = Metrics()
    state_pool = StatePool(database.dsn, 2, metrics)
    await state_pool.start()
    yield state_pool, metrics
    await state_pool.close()


async def test_table_form_returns_rows_of_asked_keys_and_gone_for_the_rest(
    pool: tuple[StatePool, Metrics], jobs: str
) -> None:
    """The table form fetches the asked keys' columns by name, and lists keys without a row as gone."""
    state_pool, metrics = pool
    state = ChannelState(channel({"table": jobs, "columns": ["status", "done", "total"]}), state_pool, metrics)
    assert await state.check() is None
    result = await state.fetch(["1", "2", "404", "1"])
    assert result.error is None
    assert result.rows == {
        "1": {"status": "running", "done": 10, "total": 100},
        "2": {"status": "queued", "done": 0, "total": None},
    }
    assert result.gone == ["404"]
    assert result.progress is None
    assert sample(metrics, "state_queries_total", channel="jobs", outcome="ok") == 1


async def test_keys_that_cannot_be_the_key_columns_text_are_gone_without_an_error(
    pool: tuple[StatePool, Metrics], jobs: str
) -> None:
    """On a bigint key column, keys such as 'abc', '042' or out of range are gone, not a failed query."""
    state_pool, metrics = pool
    state = ChannelState(channel({"table": jobs, "columns": ["status"]}), state_pool, metrics)
    assert await state.check() is None
    result = await state.fetch(["abc", "042", "1", "99999999999999999999", "-0"])
    assert result.error is None
    assert result.rows == {"1": {"status": "running"}}
    assert result.gone == ["abc", "042", "99999999999999999999", "-0"]
    nothing = await state.fetch(["abc", "x"])
    assert (nothing.rows, nothing.gone, nothing.error) == ({}, ["abc", "x"], None)
    assert sample(metrics, "state_queries_total", channel="jobs", outcome="ok") == 1  # no query for impossible keys
    # Without check() (the database was down at start), the first fetch learns the type itself.
    fresh = ChannelState(channel({"table": jobs, "columns": ["status"]}), state_pool, metrics)
    again = await fresh.fetch(["abc", "042", "1"])
    assert (again.rows, again.gone, again.error) == ({"1": {"status": "running"}}, ["abc", "042"], None)
    assert '"id" = ANY($1::text[]::int8[])' in fresh._sql


async def test_an_unexpected_error_inside_fetch_is_a_query_failed_not_a_crash(
    pool: tuple[StatePool, Metrics], jobs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a bug in turning records into rows returns query_failed instead of raising into the channel's worker."""
    state_pool, metrics = pool
    state = ChannelState(channel({"table": jobs, "columns": ["status"], "list_query": f"SELECT id AS key FROM {jobs}"}),
                         state_pool, metrics)

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(state, "_rows", broken)
    assert (await state.fetch(["1"])).error == "query_failed"
    listed = await state.fetch_list()
    assert listed is not None and listed.error == "query_failed"


async def test_postgresql_types_convert_to_the_documented_json(
    pool: tuple[StatePool, Metrics], conn: asyncpg.Connection
) -> None:
    """numeric, timestamptz, uuid, jsonb, arrays, bytea, interval, ranges, NaN, infinity: docs/state.md's JSON forms."""
    state_pool, metrics = pool
    await conn.execute("DROP TYPE IF EXISTS mood CASCADE; CREATE TYPE mood AS ENUM ('calm', 'busy')")
    query = """
        SELECT k AS key,
               12345.678::numeric AS amount, 'NaN'::numeric AS not_a_number, 'Infinity'::float8 AS inf,
               1.5::float8 AS ratio, 9007199254740993::bigint AS big,
               '2026-11-30 12:00:00.25+02'::timestamptz AS at, 'infinity'::timestamptz AS never,
               '2026-11-30'::date AS day, '00000000-0000-0000-0000-00000000002a'::uuid AS id,
               '{"a": [1, {"b": null}]}'::jsonb AS doc, '{"x": 1}'::json AS doc2,
               ARRAY[1, 2, NULL] AS ints, ARRAY['a', 'b"c'] AS texts, '{{1,2},{3,4}}'::int[] AS grid,
               '\\x00ff'::bytea AS blob, '1 day 2 hours 3.5 seconds'::interval AS took,
               '[1,5)'::int4range AS span, 'busy'::mood AS feeling, true AS flag, NULL::text AS nothing,
               ROW(1, 'x') AS pair
          FROM unnest($1::text[]) AS k"""
    state = ChannelState(channel({"query": query}), state_pool, metrics)
    assert await state.check() is None
    result = await state.fetch(["7"])
    assert result.error is None
    assert result.rows["7"] == {
        "amount": 12345.678,
        "not_a_number": "NaN",
        "inf": "Infinity",
        "ratio": 1.5,
        "big": 9007199254740993,
        "at": "2026-11-30T10:00:00.25+00:00",
        "never": "infinity",
        "day": "2026-11-30",
        "id": "00000000-0000-0000-0000-00000000002a",
        "doc": {"a": [1, {"b": None}]},
        "doc2": {"x": 1},
        "ints": [1, 2, None],
        "texts": ["a", 'b"c'],
        "grid": [[1, 2], [3, 4]],
        "blob": "\\x00ff",
        "took": "P1DT2H3.5S",
        "span": "[1,5)",
        "feeling": "busy",
        "flag": True,
        "nothing": None,
        "pair": {"f1": 1, "f2": "x"},
    }


async def test_numbers_beyond_a_double_keep_their_digits(pool: tuple[StatePool, Metrics]) -> None:
    """A numeric too large for a double comes back exactly (an integer) or as its digits (a fraction): no failure."""
    state_pool, metrics = pool
    query = ("SELECT k AS key, (10::numeric ^ 400) AS huge, (10::numeric ^ 400 + 0.5) AS fraction, "
             "'{\"x\": 1e999}'::jsonb AS doc FROM unnest($1::text[]) AS k")
    state = ChannelState(channel({"query": query, "max_row_bytes": 100_000},
                                 {"done": "huge", "total": "fraction"}), state_pool, metrics)
    result = await state.fetch(["a"])
    assert result.error is None
    row = result.rows["a"]
    assert row["huge"] == 10**400
    assert row["fraction"] == "1" + "0" * 400 + ".5"
    assert row["doc"]["x"] == 10**999
    assert result.progress is not None and result.progress["a"]["percent"] is None
    msgspec.json.encode(result.rows)


async def test_list_query_returns_its_rows(pool: tuple[StatePool, Metrics], jobs: str) -> None:
    """list_query's rows come back by key, and a channel without one answers None."""
    state_pool, metrics = pool
    listed = ChannelState(
        channel({"table": jobs, "columns": ["status"],
                 "list_query": f"SELECT id AS key, status FROM {jobs} WHERE status <> 'complete' ORDER BY id;"}),
        state_pool, metrics,
    )
    assert await listed.check() is None
    result = await listed.fetch_list()
    assert result is not None and result.error is None
    assert result.rows == {"1": {"status": "running"}, "2": {"status": "queued"}}
    plain = ChannelState(channel({"table": jobs, "columns": ["status"]}), state_pool, metrics)
    assert await plain.fetch_list() is None


async def test_a_failing_query_gives_query_failed_and_is_counted(pool: tuple[StatePool, Metrics]) -> None:
    """A query that errors at run time returns query_failed with no rows and no gone keys, and the pool keeps going."""
    state_pool, metrics = pool
    query = "SELECT k AS key, 1 / (length(k) - 1) AS n FROM unnest($1::text[]) AS k"
    state = ChannelState(channel({"query": query}), state_pool, metrics)
    failed = await state.fetch(["x"])
    assert (failed.error, failed.rows, failed.gone) == ("query_failed", {}, [])
    assert sample(metrics, "state_queries_total", channel="jobs", outcome="query_failed") == 1
    assert (await state.fetch(["xy"])).rows == {"xy": {"n": 1}}


async def test_a_slow_query_times_out_within_timeout_ms_and_the_pool_recovers(pool: tuple[StatePool, Metrics]) -> None:
    """A query slower than timeout_ms returns timeout promptly (the query is cancelled) and the next one works."""
    state_pool, metrics = pool
    query = "SELECT k AS key, pg_sleep(CASE WHEN k = 'slow' THEN 30 ELSE 0 END)::text slept FROM unnest($1::text[]) k"
    state = ChannelState(channel({"query": query, "timeout_ms": 300}), state_pool, metrics)
    started = time.monotonic()
    result = await state.fetch(["slow"])
    assert result.error == "timeout"
    assert time.monotonic() - started < 3.0  # bounded by timeout_ms, far below the 30 s the query asks for
    assert sample(metrics, "state_queries_total", channel="jobs", outcome="timeout") == 1
    for _ in range(3):  # more queries than the pool has connections: each cancelled one came back usable
        assert (await state.fetch(["fast"])).rows == {"fast": {"slept": ""}}


async def test_duplicate_keys_keep_the_first_row_and_are_counted(pool: tuple[StatePool, Metrics]) -> None:
    """When the query returns a key twice, the first row wins and the extra one is counted."""
    state_pool, metrics = pool
    query = "SELECT k AS key, n FROM unnest($1::text[]) AS k, generate_series(1, 2) AS n ORDER BY n DESC"
    state = ChannelState(channel({"query": query}), state_pool, metrics)
    result = await state.fetch(["a"])
    assert result.rows == {"a": {"n": 2}}
    assert sample(metrics, "state_rows_dropped_total", channel="jobs", reason="duplicate_key") == 1


async def test_a_key_that_was_not_asked_for_is_dropped_and_counted(pool: tuple[StatePool, Metrics]) -> None:
    """Rows of keys outside the batch (or with a NULL key) never come back, so no client can receive them."""
    state_pool, metrics = pool
    query = "SELECT k AS key FROM unnest($1::text[] || ARRAY['secret', NULL]) AS k"
    state = ChannelState(channel({"query": query}), state_pool, metrics)
    result = await state.fetch(["mine"])
    assert result.rows == {"mine": {}}
    assert "secret" not in result.rows and result.gone == []
    assert sample(metrics, "state_rows_dropped_total", channel="jobs", reason="unasked_key") == 2


async def test_a_row_over_max_row_bytes_is_left_out_as_too_large(pool: tuple[StatePool, Metrics]) -> None:
    """A row whose JSON is over max_row_bytes is left out with too_large, and the other rows still come back."""
    state_pool, metrics = pool
    query = "SELECT k AS key, repeat('x', CASE WHEN k = 'big' THEN 5000 ELSE 10 END) AS text FROM unnest($1::text[]) k"
    state = ChannelState(channel({"query": query, "max_row_bytes": 1024}), state_pool, metrics)
    result = await state.fetch(["big", "small"])
    assert result.error == "too_large"
    assert result.error_keys == ["big"]
    assert result.rows == {"small": {"text": "x" * 10}}
    assert result.gone == []
    assert sample(metrics, "state_queries_total", channel="jobs", outcome="too_large") == 1
    assert sample(metrics, "state_rows_dropped_total", channel="jobs", reason="too_large") == 1


async def test_a_row_nested_too_deep_to_decode_is_left_out_like_a_large_one(pool: tuple[StatePool, Metrics]) -> None:
    """A jsonb nested thousands deep cannot crash or fail the batch: its key is too_large, the others come back."""
    state_pool, metrics = pool
    query = ("SELECT k AS key, CASE WHEN k = 'deep' THEN (repeat('[', 5000) || repeat(']', 5000))::jsonb END AS doc "
             "FROM unnest($1::text[]) AS k")
    state = ChannelState(channel({"query": query, "max_row_bytes": 100_000}), state_pool, metrics)
    result = await state.fetch(["deep", "flat"])
    assert (result.error, result.error_keys, result.rows) == ("too_large", ["deep"], {"flat": {"doc": None}})


async def test_state_queries_cannot_write(pool: tuple[StatePool, Metrics], jobs: str) -> None:
    """The pool's sessions are read-only: a query that tries to change data fails instead."""
    state_pool, metrics = pool
    query = f"WITH gone AS (DELETE FROM {jobs} RETURNING id) SELECT id::text AS key FROM gone WHERE id::text = ANY($1)"
    state = ChannelState(channel({"query": query}), state_pool, metrics)
    assert (await state.fetch(["1"])).error == "query_failed"
    after = await ChannelState(channel({"table": jobs, "columns": ["status"]}), state_pool, metrics).fetch(["1"])
    assert after.rows == {"1": {"status": "running"}}


@pytest.mark.parametrize(
    ("state", "progress", "expected"),
    [
        ({"table": "no_such_table", "columns": ["a"]}, None, 'relation "no_such_table" does not exist'),
        ({"table": "JOBS", "columns": ["status"]}, None, 'relation "JOBS" does not exist'),
        ({"table": "{jobs}", "columns": ["nope"]}, None, 'column "nope" does not exist'),
        ({"table": "{jobs}", "key_column": "ident", "columns": ["status"]}, None, 'column "ident" does not exist'),
        ({"query": "SELECT id AS ident FROM {jobs} WHERE id::text = ANY($1)"}, None, "named key"),
        ({"query": "SELECT id AS key FROM {jobs} WHERE id::text = ANY($1)",
          "list_query": "SELECT 1 AS key FROM nowhere"}, None, "state list_query cannot work"),
        ({"query": "SELECT id AS key, status FROM {jobs} WHERE id::text = ANY($1)"}, {"done": "done"},
         "no column 'done'"),
    ],
)
async def test_check_names_the_channel_and_postgresqls_reason(
    pool: tuple[StatePool, Metrics], jobs: str, state: dict[str, Any], progress: dict[str, Any] | None, expected: str
) -> None:
    """A query that cannot work is reported at check() with the channel's name and PostgreSQL's message."""
    state_pool, metrics = pool
    resolved = {name: value.format(jobs=jobs) if isinstance(value, str) else value for name, value in state.items()}
    problem = await ChannelState(channel(resolved, progress), state_pool, metrics).check()
    assert problem is not None
    assert "'jobs'" in problem and expected in problem, problem


async def test_the_database_down_gives_query_failed_quickly_and_check_stays_silent() -> None:
    """With nothing listening on the DSN's port, start() succeeds, check() is None and fetches are query_failed."""
    metrics = Metrics()
    state_pool = StatePool(f"postgresql://nobody@127.0.0.1:{free_port()}/none", 1, metrics)
    await state_pool.start()
    try:
        state = ChannelState(channel({"table": "t", "columns": ["a"], "timeout_ms": 500}), state_pool, metrics)
        assert await state.check() is None
        result = await state.fetch(["1"])
        assert (result.error, result.rows, result.gone) == ("query_failed", {}, [])
    finally:
        await state_pool.close()
        await state_pool.close()  # idempotent


async def test_the_pool_recovers_when_its_backends_are_terminated(
    database: Database, conn: asyncpg.Connection, jobs: str
) -> None:
    """After pg_terminate_backend of every state connection, the next fetch reconnects by itself and succeeds."""
    metrics = Metrics()
    state_pool = StatePool(database.dsn, 2, metrics, application_name="notifyrelay-state-kill")
    await state_pool.start()
    try:
        state = ChannelState(channel({"table": jobs, "columns": ["status"]}), state_pool, metrics)
        assert (await asyncio.gather(state.fetch(["1"]), state.fetch(["2"])))[1].rows == {"2": {"status": "queued"}}
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            "notifyrelay-state-kill",
        )
        assert killed >= 1
        for key, status in (("1", "running"), ("2", "queued"), ("1", "running")):
            result = await state.fetch([key])
            assert (result.error, result.rows) == (None, {key: {"status": status}})
    finally:
        await state_pool.close()


async def test_progress_follows_the_rows_and_stalls(
    pool: tuple[StatePool, Metrics], conn: asyncpg.Connection, jobs: str
) -> None:
    """fetch attaches progress (percent, rate, eta), newly_stalled finds an unchanged key once, a move clears it."""
    state_pool, metrics = pool
    clock = FakeClock()
    progress = {"done": "done", "total": "total", "status": "status", "stall_after_s": 10}
    state = ChannelState(channel({"table": jobs, "columns": ["status", "done", "total"]}, progress), state_pool,
                         metrics, clock=clock)
    first = await state.fetch(["1", "2", "3"])
    assert first.progress is not None
    assert first.progress["1"] == {"done": 10, "total": 100, "percent": 10.0, "rate_per_s": None, "eta_s": None,
                                   "status": "running", "terminal": False, "failed": False, "stalled": False}
    assert first.progress["2"]["percent"] is None  # total NULL: indeterminate
    assert first.progress["3"]["terminal"] is True
    clock.now += 2
    await conn.execute(f"UPDATE {jobs} SET done = 30 WHERE id = 1")
    second = await state.fetch(["1"])
    assert second.progress is not None
    assert second.progress["1"]["rate_per_s"] == 10.0 and second.progress["1"]["eta_s"] == 7.0
    clock.now += 11
    assert sorted(state.newly_stalled(clock.now)) == ["1", "2"]
    assert state.newly_stalled(clock.now) == []
    assert sample(metrics, "stalled_keys", channel="jobs") == 2
    again = await state.fetch(["1"])
    assert again.progress is not None and again.progress["1"]["stalled"] is True
    await conn.execute(f"UPDATE {jobs} SET done = 31 WHERE id = 1")
    moved = await state.fetch(["1"])
    assert moved.progress is not None and moved.progress["1"]["stalled"] is False
    assert sample(metrics, "stalled_keys", channel="jobs") == 1
    await conn.execute(f"DELETE FROM {jobs} WHERE id = 2")
    assert (await state.fetch(["2"])).gone == ["2"]
    assert sample(metrics, "stalled_keys", channel="jobs") == 0


async def test_a_database_restart_costs_the_queries_during_the_outage_only(own_database: Database) -> None:
    """While PostgreSQL is stopped fetches are query_failed (promptly); once it is back the next fetch succeeds."""
    assert own_database.server is not None
    query = "SELECT k AS key, 1 AS n FROM unnest($1::text[]) AS k"
    metrics = Metrics()
    state_pool = StatePool(own_database.dsn, 2, metrics)
    await state_pool.start()
    try:
        state = ChannelState(channel({"query": query, "timeout_ms": 2000}), state_pool, metrics)
        assert (await state.fetch(["a"])).rows == {"a": {"n": 1}}
        await asyncio.to_thread(own_database.server.stop)
        down = await state.fetch(["a"])
        assert (down.error, down.rows) == ("query_failed", {})
        await asyncio.to_thread(own_database.server.start)
        back = await state.fetch(["a"])
        assert (back.error, back.rows) == (None, {"a": {"n": 1}})
    finally:
        await state_pool.close()


async def test_a_reader_role_granted_only_the_named_columns_is_enough(
    database: Database, conn: asyncpg.Connection, jobs: str
) -> None:
    """docs/state.md's grant (SELECT on the named columns only) runs the table form; a column outside it is reported."""
    role = f"reader_{jobs}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f"GRANT SELECT (id, status, done) ON {jobs} TO {role}")
    parts = urlsplit(database.dsn)
    dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
    metrics = Metrics()
    state_pool = StatePool(dsn, 1, metrics)
    await state_pool.start()
    try:
        granted = ChannelState(channel({"table": jobs, "columns": ["status", "done"]}), state_pool, metrics)
        assert await granted.check() is None
        assert (await granted.fetch(["1"])).rows == {"1": {"status": "running", "done": 10}}
        beyond = ChannelState(channel({"table": jobs, "columns": ["status", "message"]}), state_pool, metrics)
        problem = await beyond.check()
        assert problem is not None and "InsufficientPrivilegeError" in problem and jobs in problem
        assert (await beyond.fetch(["1"])).error == "query_failed"
    finally:
        await state_pool.close()
