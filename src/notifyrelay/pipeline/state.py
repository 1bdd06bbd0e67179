"""Live state: the current rows of a batch's keys, fetched with one query per batch on a small pool of its own.

``StatePool`` is the relay's asyncpg pool for state queries (never the LISTEN connection). ``ChannelState`` runs one
channel's query: it builds the query (the ``table`` form with quoted identifiers, or the operator's ``query``),
wraps it so that PostgreSQL itself turns each row into JSON (``row_to_json``: one documented conversion for every
type, see docs/state.md), bounds it by ``timeout_ms``, keeps only the keys asked for, leaves out rows over
``max_row_bytes``, and keeps the progress figures (pipeline/progress.py). Nothing here raises to its caller: a
failing, slow or wrong query becomes a ``StateResult`` with ``error`` set, a metric and a rate-limited log line.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import structlog

from ..config import ChannelConfig, ChannelStateConfig
from ..ops.metrics import Metrics
from .progress import ProgressTracker

log = structlog.get_logger("notifyrelay.state")

_json_decode = msgspec.json.Decoder(dict[str, Any]).decode


def _float_or_text(literal: str) -> float | str:
    number = float(literal)
    return number if math.isfinite(number) else literal


# For the rare row with a number beyond a double's range (a huge numeric): that number stays its digits, as a string.
_json_decode_wide = msgspec.json.Decoder(dict[str, Any], float_hook=_float_or_text).decode


def _decode_row(text: str) -> dict[str, Any]:
    try:
        return _json_decode(text)
    except msgspec.ValidationError:  # "Number out of range"
        return _json_decode_wide(text)
LOG_EVERY_S = 10.0  # at most one log line per channel and outcome this often; the others are counted in it
RELEASE_TIMEOUT_S = 5.0
STALL_CHECK_S = 1.0  # how often watch_stalls looks for keys that became stalled
# Session settings of the state pool: timestamps render in UTC, intervals as ISO 8601 durations, and no query the
# operator writes can change data.
SERVER_SETTINGS = {"TimeZone": "UTC", "IntervalStyle": "iso_8601", "default_transaction_read_only": "on"}
# Errors after which a connection is dead but the database may be fine: the query is tried again on another one.
# (asyncpg answers InternalClientError "cannot switch to state ..." on a connection whose backend was terminated
# while it sat idle in the pool.)
_CONNECTION_ERRORS = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    ConnectionError,
)


@dataclass(slots=True)
class StateResult:
    """The outcome of one state query, ready for a frame's ``rows``/``gone``/``progress``/``state_error`` fields."""

    rows: dict[str, dict[str, Any]]  # key -> {column: JSON-ready value}; only keys that were asked for
    gone: list[str]  # asked-for keys whose row the query did not return
    progress: dict[str, dict[str, Any]] | None  # key -> SPEC progress object, when [channels.progress] is set
    error: str | None = None  # "timeout" | "query_failed" | "too_large" | None
    error_keys: list[str] = field(default_factory=list)  # keys left out as too_large


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (exactly as written: case and dots are kept)."""
    return '"' + name.replace('"', '""') + '"'


def quote_table(name: str) -> str:
    """A ``table`` or ``schema.table`` setting as a quoted, schema-qualified name."""
    return ".".join(quote_ident(part) for part in name.split(".", 1))


_INT_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,18}")


def _int_key(bound: int) -> Callable[[str], bool]:
    def valid(key: str) -> bool:
        return _CANONICAL_INT.fullmatch(key) is not None and -bound <= int(key) < bound

    return valid


def _uuid_key(key: str) -> bool:
    try:
        return str(uuid.UUID(key)) == key
    except ValueError:
        return False


# Key column types compared in their own type, so that an index on the column serves the query. A key that is not
# that type's canonical text form could never equal the column's text (``id::text``), so it is gone without asking.
KEY_TYPES: dict[str, Callable[[str], bool]] = {
    **{name: _int_key(bound) for name, bound in _INT_RANGES.items()},
    "uuid": _uuid_key,
    "text": lambda key: True,
    "varchar": lambda key: True,
}


def table_query(config: ChannelStateConfig, key_type: str | None = None) -> str:
    """The ``table`` form's query: ``$1`` is the keys as ``text[]``; ``key`` is the key column, then the columns."""
    key = quote_ident(config.key_column)
    columns = "".join(f", {quote_ident(column)}" for column in config.columns)
    # Any other type is compared as text, which no index serves (write a query to use one).
    where = f"{key} = ANY($1::text[]::{key_type}[])" if key_type in KEY_TYPES else f"{key}::text = ANY($1::text[])"
    return f"SELECT {key} AS key{columns} FROM {quote_table(config.table)} WHERE {where}"


def wrap_query(inner: str, max_row_bytes: int) -> str:
    """``inner`` wrapped so that each row comes back as (key text, row JSON or NULL when too large, JSON size).

    PostgreSQL renders the row (``row_to_json``), so every type has its JSON form; a row over ``max_row_bytes``
    never crosses the wire. The newline keeps a trailing ``--`` comment in ``inner`` from eating the rest.
    ``OFFSET 0`` keeps the planner from inlining the lateral row, which would render it once per use (2.5 times
    slower for 500 rows).
    """
    inner = inner.strip().rstrip(";").rstrip()
    return (
        f"SELECT q.key::text AS key, CASE WHEN octet_length(j.row) <= {int(max_row_bytes)} THEN j.row END AS row,"
        f" octet_length(j.row) AS size FROM ({inner}\n) AS q"
        f" CROSS JOIN LATERAL (SELECT row_to_json(q)::text AS row OFFSET 0) AS j"
    )


class StatePool:
    """The relay's small asyncpg pool for state queries, separate from the LISTEN connection.

    It connects lazily (``start`` never fails because the database is down) and replaces dead connections by itself:
    asyncpg notices a closed connection and its pool opens a new one on the next acquire.
    """

    def __init__(self, dsn: str, size: int, metrics: Metrics, *, application_name: str = "notifyrelay-state") -> None:
        self.dsn = dsn
        self.size = size
        self.metrics = metrics
        self.application_name = application_name
        self._pool: asyncpg.Pool | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Create the pool without connecting (``min_size=0``): the first query opens a connection."""
        if self._pool is not None or self._closed:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn or None, min_size=0, max_size=self.size,
                server_settings={**SERVER_SETTINGS, "application_name": self.application_name},
            )
        except Exception as exc:  # a DSN asyncpg cannot even parse: every query will report query_failed
            log.error("state.pool_failed", error=str(exc) or type(exc).__name__)

    async def fetch(self, sql: str, args: Sequence[Any], deadline: float) -> list[asyncpg.Record]:
        """Run ``sql`` on a pooled connection, all of it (acquire included) before ``deadline`` (loop time).

        Raises TimeoutError past the deadline and asyncpg's or the OS's errors otherwise. A query that failed because
        its connection had died is tried again (it only reads) while time remains, at most once per pooled
        connection and once more, so that a pool whose backends were all terminated recovers within one call.
        """
        if self._pool is None:
            await self.start()
        if self._pool is None or self._closed:
            raise asyncpg.InterfaceError("the state pool is closed")
        loop = asyncio.get_running_loop()
        attempts = self.size + 1
        for attempt in range(1, attempts + 1):
            async with asyncio.timeout_at(deadline):
                connection = await self._pool.acquire()
                try:
                    records: list[asyncpg.Record] = await connection.fetch(
                        sql, *args, timeout=max(deadline - loop.time(), 0.001)
                    )
                    return records
                except _CONNECTION_ERRORS as exc:
                    if attempt == attempts or deadline - loop.time() <= 0:
                        raise
                    log.info("state.connection_lost", error=str(exc) or type(exc).__name__, attempt=attempt)
                finally:
                    self._release_soon(connection)
        raise AssertionError("unreachable")  # pragma: no cover

    async def prepare_attributes(self, sql: str, deadline: float) -> list[tuple[str, str]]:
        """Prepare ``sql`` (PostgreSQL checks tables, columns and grants) and return its columns (name, type)."""
        if self._pool is None:
            await self.start()
        if self._pool is None or self._closed:
            raise asyncpg.InterfaceError("the state pool is closed")
        async with asyncio.timeout_at(deadline):
            connection = await self._pool.acquire()
            try:
                statement = await connection.prepare(sql)
                return [(attribute.name, attribute.type.name) for attribute in statement.get_attributes()]
            finally:
                self._release_soon(connection)

    def _release_soon(self, connection: Any) -> None:
        # Releasing waits for a cancelled query to end; that wait must not count against the caller's timeout.
        assert self._pool is not None
        task = asyncio.get_running_loop().create_task(self._release(self._pool, connection))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @staticmethod
    async def _release(pool: asyncpg.Pool, connection: Any) -> None:
        try:
            await pool.release(connection, timeout=RELEASE_TIMEOUT_S)
        except Exception as exc:  # the pool terminates such a connection; nothing else to do
            log.debug("state.release_failed", error=str(exc) or type(exc).__name__)

    async def close(self) -> None:
        """Close every connection (idempotent); connections still busy past a few seconds are terminated."""
        self._closed = True
        pool, self._pool = self._pool, None
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=RELEASE_TIMEOUT_S)
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), RELEASE_TIMEOUT_S)
        except (TimeoutError, Exception):
            pool.terminate()


class ChannelState:
    """One state channel's query, its conversion of rows, and its progress tracking."""

    def __init__(
        self, channel: ChannelConfig, pool: StatePool, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if channel.state is None:
            raise ValueError(f"channel {channel.name!r} has no [channels.state]")
        self.channel = channel.name
        self.config = channel.state
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.progress = ProgressTracker(channel.progress) if channel.progress else None
        self.progress_config = channel.progress
        self._key_type: str | None = None  # the key column's type, once known (table form)
        self._typed = False  # whether it was looked up
        self._sql = self._build()
        self._list_sql = wrap_query(self.config.list_query, self.config.max_row_bytes) if self.config.list_query else ""
        self._logged: dict[str, tuple[float, int]] = {}  # outcome -> (last logged at, suppressed since)
        for outcome in ("ok", "timeout", "query_failed", "too_large"):
            metrics.state_queries.labels(channel.name, outcome)
        for reason in ("duplicate_key", "unasked_key", "too_large"):
            metrics.state_rows_dropped.labels(channel.name, reason)
        metrics.state_query_seconds.labels(channel.name)
        metrics.snapshots.labels(channel.name)
        metrics.stalled_keys.labels(channel.name).set(0)

    def _build(self) -> str:
        inner = table_query(self.config, self._key_type) if self.config.table else self.config.query
        return wrap_query(inner, self.config.max_row_bytes)

    @property
    def _timeout_s(self) -> float:
        return self.config.timeout_ms / 1000

    async def check(self) -> str | None:
        """None when the query can work, else a sentence naming the channel and PostgreSQL's reason.

        PostgreSQL prepares the query (tables, columns, a ``key`` column), then runs it on no keys (``list_query``
        with ``LIMIT 0``), which checks the role's grants too. A database that cannot be reached says nothing about
        the query: that is None too (fetches report query_failed meanwhile).
        """
        deadline = asyncio.get_running_loop().time() + max(self._timeout_s, 5.0)
        statements: list[tuple[str, str, str, list[Any]]] = [
            ("query", self.config.query or table_query(self.config, None), "", [[]])
        ]
        if self.config.list_query:
            statements.append(("list_query", self.config.list_query, " LIMIT 0", []))
        for name, inner, limit, args in statements:
            try:
                # The inner query shows the key column's type; running the wrapped one proves there is a column
                # "key" and that the role may read every column (grants are checked when a query runs).
                columns = await self.pool.prepare_attributes(inner, deadline)
                await self.pool.fetch(wrap_query(inner, self.config.max_row_bytes) + limit, args, deadline)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _CONNECTION_ERRORS):
                    return None
                problem = f"{exc.__class__.__name__}: {exc}"
                if not self.config.table and isinstance(exc, asyncpg.UndefinedColumnError) and "key" in str(exc):
                    problem += " (the query must return the key as a text column named key)"
                return f"channel {self.channel!r}: the state {name} cannot work: {problem}"
            except Exception as exc:
                log.info("state.check_deferred", channel=self.channel, error=str(exc) or type(exc).__name__)
                return None
            names = [column for column, _ in columns]
            if name == "query" and self.config.table:
                self._set_key_type(columns[0][1] if columns else None)
            missing = [column for column in self._progress_columns() if column not in names]
            if missing:
                return (
                    f"channel {self.channel!r}: the state {name} returns no column {missing[0]!r}, "
                    f"which [channels.progress] names"
                )
        return None

    def _set_key_type(self, key_type: str | None) -> None:
        self._typed = True
        if key_type != self._key_type:
            self._key_type = key_type
            self._sql = self._build()

    def _progress_columns(self) -> list[str]:
        config = self.progress_config
        return [column for column in (config.done, config.total, config.status) if column] if config else []

    async def fetch(self, keys: Sequence[str]) -> StateResult:
        """The current rows of ``keys`` (one query), and their progress. Never raises; bounded by ``timeout_ms``."""
        try:
            return await self._fetch(list(dict.fromkeys(keys)))
        except Exception as exc:  # a bug here costs one frame its rows, never the channel's worker
            return self._broken(exc)

    async def _fetch(self, keys: list[str]) -> StateResult:
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        if self.config.table and not self._typed:
            await self._learn_key_type(deadline)
        valid = KEY_TYPES.get(self._key_type or "")
        asked = [key for key in keys if valid(key)] if valid else keys
        if not asked:
            return self._result({}, keys, [], None, queried=False)  # no key could have a row: nothing to ask
        records, error = await self._query(self._sql, [asked], deadline)
        if records is None:
            return StateResult({}, [], {} if self.progress else None, error)
        rows, texts, too_large = self._rows(records, set(asked))
        gone = [key for key in keys if key not in rows and key not in too_large]
        return self._result(rows, gone, too_large, error, texts)

    async def fetch_list(self) -> StateResult | None:
        """The rows of ``list_query`` (what a ``"*"`` follower gets on subscribe), or None without one."""
        if not self._list_sql:
            return None
        try:
            deadline = asyncio.get_running_loop().time() + self._timeout_s
            records, error = await self._query(self._list_sql, [], deadline)
            if records is None:
                return StateResult({}, [], {} if self.progress else None, error)
            rows, texts, too_large = self._rows(records, None)
            return self._result(rows, [], too_large, error, texts)
        except Exception as exc:
            return self._broken(exc)

    def _broken(self, exc: Exception) -> StateResult:
        log.exception("state.fetch_failed", channel=self.channel, error=str(exc) or type(exc).__name__)
        self.metrics.state_queries.labels(self.channel, "query_failed").inc()
        return StateResult({}, [], {} if self.progress else None, "query_failed")

    async def _learn_key_type(self, deadline: float) -> None:
        """Learn the key column's type (check() does it at start; this is for a database that was down then)."""
        try:
            columns = await self.pool.prepare_attributes(table_query(self.config, None), deadline)
        except (TimeoutError, OSError, *_CONNECTION_ERRORS):
            return  # the database is away: next time
        except Exception:
            self._typed = True  # the query is wrong: its own fetch reports it
            return
        self._set_key_type(columns[0][1] if columns else None)

    def newly_stalled(self, now: float | None = None) -> list[str]:
        """Keys that became stalled since the last call; call it about once a second, refetch them and send a notify.
        ``now`` is from this channel's clock (its own reading when None)."""
        if self.progress is None:
            return []
        stalled = self.progress.newly_stalled(self.clock() if now is None else now)
        self.metrics.stalled_keys.labels(self.channel).set(self.progress.stalled_count)
        return stalled

    async def _query(
        self, sql: str, args: list[Any], deadline: float
    ) -> tuple[list[asyncpg.Record] | None, str | None]:
        """Run one query; (records, None), or (None, "timeout" | "query_failed") after logging and counting."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            records = await self.pool.fetch(sql, args, deadline)
        except TimeoutError:
            self._failed("timeout", f"no answer within {self.config.timeout_ms} ms", started)
            return None, "timeout"
        except Exception as exc:  # the database down, the query wrong, a lost connection: keys-only, never a crash
            self._failed("query_failed", f"{exc.__class__.__name__}: {exc}", started)
            return None, "query_failed"
        self.metrics.state_query_seconds.labels(self.channel).observe(loop.time() - started)
        return records, None

    def _failed(self, outcome: str, error: str, started: float) -> None:
        self.metrics.state_query_seconds.labels(self.channel).observe(asyncio.get_running_loop().time() - started)
        self.metrics.state_queries.labels(self.channel, outcome).inc()
        self._log(outcome, error)

    def _log(self, outcome: str, error: str) -> None:
        now = self.clock()
        last, suppressed = self._logged.get(outcome, (float("-inf"), 0))
        if now - last < LOG_EVERY_S:
            self._logged[outcome] = (last, suppressed + 1)
            return
        self._logged[outcome] = (now, 0)
        log.warning(f"state.{outcome}", channel=self.channel, error=error, suppressed=suppressed)

    def _rows(
        self, records: list[asyncpg.Record], asked: set[str] | None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
        """Rows by key from (key, row JSON, size) records, with each row's JSON text and the keys left out as too
        large: only asked-for keys, and the first row of a key wins."""
        rows: dict[str, dict[str, Any]] = {}
        texts: dict[str, str] = {}
        too_large: list[str] = []
        unasked = duplicates = 0
        seen: set[str] = set()
        for key, text, size in records:
            if key is None or (asked is not None and key not in asked):
                unasked += 1  # never reaches a client: it was not asked for, so no grant was checked for it
                continue
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            if text is None:
                too_large.append(key)
                log.debug("state.row_too_large", channel=self.channel, size=size, limit=self.config.max_row_bytes)
                continue
            try:
                row = _decode_row(text)
            except (RecursionError, msgspec.DecodeError, msgspec.ValidationError):
                # Nested deeper than the relay decodes (and could encode again): sent like a row too large.
                too_large.append(key)
                continue
            row.pop("key", None)
            rows[key] = row
            texts[key] = text
        dropped = self.metrics.state_rows_dropped
        if unasked:
            dropped.labels(self.channel, "unasked_key").inc(unasked)
            self._log("unasked_key", f"the query returned {unasked} row(s) of keys that were not asked for")
        if duplicates:
            dropped.labels(self.channel, "duplicate_key").inc(duplicates)
            self._log("duplicate_key", f"the query returned {duplicates} more row(s) of a key (the first is kept)")
        if too_large:
            dropped.labels(self.channel, "too_large").inc(len(too_large))
            self._log("too_large", f"{len(too_large)} row(s) over max_row_bytes={self.config.max_row_bytes} "
                      "(or nested too deep to decode)")
        return rows, texts, too_large

    def _result(
        self,
        rows: dict[str, dict[str, Any]],
        gone: list[str],
        too_large: list[str],
        error: str | None,
        texts: dict[str, str] | None = None,
        *,
        queried: bool = True,
    ) -> StateResult:
        outcome = "too_large" if too_large else "ok"
        if error is None and queried:
            self.metrics.state_queries.labels(self.channel, outcome).inc()
        progress: dict[str, dict[str, Any]] | None = None
        if self.progress is not None:
            now = self.clock()
            progress = {}
            for key, row in rows.items():
                text = texts.get(key) if texts else None
                progress[key] = self.progress.observe(key, row, now, fingerprint=text)
            for key in gone:
                self.progress.forget(key)
            self.metrics.stalled_keys.labels(self.channel).set(self.progress.stalled_count)
        return StateResult(rows, gone, progress, "too_large" if too_large else error, too_large)


def channel_states(
    channels: Iterable[ChannelConfig],
    pool: StatePool,
    metrics: Metrics,
    *,
    clock: Callable[[], float] = time.monotonic,
    previous: Mapping[str, ChannelState] | None = None,
) -> dict[str, ChannelState]:
    """A ChannelState for each channel with ``[channels.state]``, by channel name.

    On a reload, pass the running ones as ``previous``: a channel whose state and progress settings did not change
    keeps its ChannelState (its rates, stalls and learnt key type), so a reload costs clients nothing.
    """
    states: dict[str, ChannelState] = {}
    for channel in channels:
        if channel.state is None:
            continue
        kept = (previous or {}).get(channel.name)
        if kept is not None and kept.pool is pool and (kept.config, kept.progress_config) == (
            channel.state, channel.progress
        ):
            states[channel.name] = kept
        else:
            states[channel.name] = ChannelState(channel, pool, metrics, clock=clock)
    return states


async def watch_stalls(
    states: Callable[[], Mapping[str, ChannelState]],
    on_stalled: Callable[[str, list[str]], None],
    *,
    interval_s: float = STALL_CHECK_S,
) -> None:
    """Run until cancelled: every ``interval_s``, hand each channel's newly stalled keys to ``on_stalled``.

    ``on_stalled(channel, keys)`` must not block: it queues the keys in the channel's ordered stream, which fetches
    them again (so the frame's progress says ``stalled``) and sends a notify. ``states`` is called each time, so a
    reload's new channels are seen.
    """
    while True:
        await asyncio.sleep(interval_s)
        for name, state in list(states().items()):
            if stalled := state.newly_stalled():
                on_stalled(name, stalled)
