"""Shared machinery of the bench scripts: the stack under test, load processes, statistics and reporting.

Every scenario runs the same pieces as separate processes, all on 127.0.0.1:

    EmbeddedPostgres (pg_ctl)  <--asyncpg--  generator processes (NOTIFY load, commit times)
          |
       LISTEN
          v
    relay: python -m notifyrelay run --config <tmp toml>   <--websocket--  client processes (arrival times)
          ^
    this process: orchestrates over multiprocessing pipes, samples the relay with psutil and /metrics

Times that cross processes are ``time.monotonic()``: CLOCK_MONOTONIC is one clock for the whole machine on Linux.
Everything is bounded: each scenario arms SIGALRM, each worker exits by itself after its lifetime or when this
process goes away, the relay gets SIGTERM when this process dies (PR_SET_PDEATHSIG), and ``Stack.__exit__`` kills
the relay and removes the PostgreSQL data directory whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import operator
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
_WORKER_LABEL = re.compile(r'worker="\d+",?')
RESULTS_DIR = BENCH_DIR / "results"
REPO_DIR = BENCH_DIR.parent

try:
    import psutil

    from notifyrelay.pgembed import EmbeddedPostgres
except ImportError as exc:  # pragma: no cover - depends on how the script is started
    sys.exit(f"bench: {exc}; run the bench with the project's venv: .venv/bin/python bench/run_all.py")


# ----------------------------------------------------------------------------------------------------------------
# Process hygiene: file descriptors, deadlines, signals.


class ScenarioTimeout(Exception):
    """The scenario passed its overall time bound (SIGALRM)."""


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children, the relay included, inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def arm_deadline(seconds: int) -> None:
    """SIGALRM after ``seconds`` raises ScenarioTimeout; SIGTERM behaves like Ctrl-C, so ``finally`` blocks run."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise ScenarioTimeout(f"scenario exceeded its bound of {seconds} s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(seconds)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold off Ctrl-C, SIGTERM and the deadline while cleaning up (cleanup is itself bounded)."""
    signal.alarm(0)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _die_with_parent() -> None:  # runs in the relay child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ----------------------------------------------------------------------------------------------------------------
# The stack under test.


def _toml(value: Any) -> str:
    from notifyrelay.config import toml_value  # the relay's own TOML writer: its config is written as it reads it

    return toml_value(value)


class Stack:
    """An embedded PostgreSQL and the relay (``python -m notifyrelay run --config``), each its own process.

    ``channels`` are ``[[channels]]`` tables; ``server`` adds keys to ``[server]`` (``workers = N`` runs a supervisor
    and N workers on the one port: metrics, CPU and RSS are then summed over them). Leaving the ``with`` block stops
    the relay (SIGTERM, then SIGKILL) and throws PostgreSQL away, on success, error or Ctrl-C.
    """

    def __init__(
        self,
        name: str,
        channels: Sequence[dict[str, Any]],
        *,
        window_ms: int = 200,
        server: dict[str, Any] | None = None,
        pg_max_connections: int = 60,
        env: dict[str, str] | None = None,
        setup_sql: str = "",
    ) -> None:
        self.name = name
        self.setup_sql = setup_sql  # run on the new database before the relay starts (tables a state channel reads)
        self.env = env or {}  # added to the relay's environment (which keeps no other NOTIFYRELAY_ variable)
        self.channels = list(channels)
        self.window_ms = window_ms
        self.server_extra = {"max_connections": 12000, "max_handshakes": 1000, **(server or {})}
        self.pg_max_connections = pg_max_connections
        self.pg: EmbeddedPostgres | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self.port = 0
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        self.config_path = RESULTS_DIR / f"{name}.relay.toml"
        self.log_path = RESULTS_DIR / f"{name}.relay.log"

    @property
    def dsn(self) -> str:
        assert self.pg is not None
        return self.pg.dsn

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def ws_url(self, channel: str, keys: Sequence[str] = ()) -> str:
        """The websocket URL of a relay that subscribes at connect time (no keys: ``*``)."""
        query = [("channel", channel)] + [("key", k) for k in keys]
        return f"{self.url}?{urlencode(query)}"

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        raise_nofile()
        self.pg = EmbeddedPostgres(max_connections=self.pg_max_connections)
        self.pg.start()
        from notifyrelay.pgembed import free_port

        if self.setup_sql:
            import asyncpg

            async def setup(dsn: str) -> None:
                conn = await asyncpg.connect(dsn)
                try:
                    await conn.execute(self.setup_sql)
                finally:
                    await conn.close()

            asyncio.run(setup(self.pg.dsn))

        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYRELAY_")} | self.env
        self.port = free_port()
        lines = [
            f"dsn = {_toml(self.pg.dsn)}",
            "",
            "[server]",
            f'listen = "127.0.0.1:{self.port}"',
            *(f"{k} = {_toml(v)}" for k, v in self.server_extra.items() if v is not None),
            "",
            "[coalesce]",
            f"window_ms = {self.window_ms}",
            "",
            "[log]",
            'level = "info"',
            'format = "json"',
        ]
        for channel in self.channels:
            lines += ["", "[[channels]]", *(f"{k} = {_toml(v)}" for k, v in channel.items())]
        self.config_path.write_text("\n".join(lines) + "\n")
        with open(self.log_path, "wb") as log:
            self.relay = subprocess.Popen(
                [sys.executable, "-m", "notifyrelay", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.process = psutil.Process(self.relay.pid)
        self._wait_ready(30)

    def _wait_ready(self, timeout: float) -> None:
        assert self.relay is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.relay.poll() is not None:
                raise RuntimeError(f"the relay exited with {self.relay.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the relay was not ready within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """The relay's /metrics as ``{'name{labels}': value}``, summed over its workers."""
        values: dict[str, float] = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                # A supervisor's /metrics labels each worker's series: sum them.
                name = _WORKER_LABEL.sub("", name).replace(",}", "}").replace("{}", "")
                with contextlib.suppress(ValueError):
                    values[name] = values.get(name, 0.0) + float(value)
        return values

    def _tree(self) -> list[psutil.Process]:
        """The relay and, under ``[server] workers = N``, the supervisor's worker processes."""
        if self.process is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [self.process, *self.process.children(recursive=True)]
        return [self.process]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the relay (and its workers) so far."""
        total = 0.0
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        total = 0
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def __exit__(self, *exc: object) -> None:
        with shielded():
            tree = self._tree()  # a supervisor's workers too, in case it dies before it stops them
            if self.relay is not None:
                if self.relay.poll() is None:
                    self.relay.terminate()
                try:
                    self.relay.wait(15)
                except subprocess.TimeoutExpired:
                    self.relay.kill()
                    self.relay.wait(5)
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            if self.pg is not None:
                try:
                    self.pg.cleanup()
                except Exception as error:  # a server already stopping (Ctrl-C reached it too) is fine
                    print(f"bench: PostgreSQL cleanup: {error}", file=sys.stderr)
                    shutil.rmtree(self.pg.pgdata, ignore_errors=True)
            self.relay = self.process = None
            self.pg = None


# ----------------------------------------------------------------------------------------------------------------
# Load processes, driven over a pipe: ("command", args...) -> ("ok", result) or ("error", traceback).


class Worker:
    """A load process (websocket clients or NOTIFY generator) this process drives over a pipe."""

    def __init__(self, target: Callable[..., None], *args: Any, name: str, lifetime_s: float) -> None:
        context = mp.get_context("spawn")
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, lifetime_s, *args), name=name, daemon=True)
        self.process.start()
        child.close()

    def send(self, *command: Any) -> None:
        self.conn.send(command)

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name} did not answer within {timeout:g} s")
        status, result = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name} failed:\n{result}")
        return result

    def call(self, *command: Any, timeout: float = 60) -> Any:
        self.send(*command)
        return self.recv(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError, EOFError):
            self.conn.send(("stop",))
        self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.conn.close()


def call_all(
    workers: Sequence[Worker], command: tuple[Any, ...] | Sequence[tuple[Any, ...]], timeout: float
) -> list[Any]:
    """Send a command to every worker at once (one per worker when given a list), then gather the answers."""
    commands = command if isinstance(command, list) else [command] * len(workers)
    for worker, cmd in zip(workers, commands, strict=True):
        worker.send(*cmd)
    deadline = time.monotonic() + timeout
    return [w.recv(max(0.1, deadline - time.monotonic())) for w in workers]


@contextlib.contextmanager
def workers_stopped(workers: list[Worker]) -> Iterator[list[Worker]]:
    try:
        yield workers
    finally:
        with shielded():
            for worker in workers:
                worker.stop()


def _serve(conn: Any, lifetime_s: float, handlers: dict[str, Callable[..., Any]], closing: Callable[[], Any]) -> None:
    """The worker side: answer commands until "stop", the parent going away, or the lifetime running out."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(lifetime_s, os._exit, 3)  # the last resort: a worker never outlives its bound
        while True:
            try:
                command = await asyncio.to_thread(conn.recv)
            except (EOFError, OSError):
                break
            if command[0] == "stop":
                break
            try:
                result = await handlers[command[0]](*command[1:])
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("ok", result))
        # Aborted connections leave futures nobody awaits any more: their errors are expected, keep stderr clean.
        loop.set_exception_handler(lambda loop, context: None)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await closing()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches the whole process group: the parent cleans up
        asyncio.run(main())
    os._exit(0)


# Websocket clients ------------------------------------------------------------------------------------------------


class _SansIOClient(asyncio.Protocol):
    """A websocket client on websockets' sans-I/O ``ClientProtocol``: frames are parsed in ``data_received``, with
    no future or task per message, and stamped when their bytes are read. Lighter than the asyncio client, so on a
    small machine the client processes add less of their own time to fan-out figures (``--client-impl sansio``).
    """

    def __init__(self, url: str, index: int, clients: _Clients) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.protocol = ClientProtocol(parse_uri(url), max_size=2**24)
        self.index = index
        self.clients = clients
        self.transport: Any = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.expected = ["welcome"] + ["ack"] * url.count("channel=")  # one ack per channel subscribed
        self.close_code: int | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Response

        arrival = time.monotonic()
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                if event.opcode is not Opcode.TEXT:
                    continue
                if self.expected:
                    kind = self.clients.decode(event.data).get("type")
                    if kind != self.expected.pop(0) and not self.ready.done():
                        self.ready.set_exception(RuntimeError(f"unexpected {kind} frame while connecting"))
                    if not self.expected and not self.ready.done():
                        self.ready.set_result(None)
                else:
                    self.clients.on_message(self.index, arrival, event.data)
            elif isinstance(event, Response) and self.protocol.handshake_exc is not None and not self.ready.done():
                self.ready.set_exception(self.protocol.handshake_exc)
        self._flush()

    async def send(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._flush()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data and self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        close = self.protocol.close_rcvd
        self.clients.closed[str(close.code if close else 1006)] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost while connecting"))


class _Clients:
    """Websocket connections of one client process and what they received.

    Modes: "seq" aggregates notify frames per (channel, seq): count, first and last arrival, first key; "payload"
    keeps every frame per connection as (arrival, {key: payload["n"]}) for latency joins.
    """

    def __init__(self, mode: str, impl: str = "asyncio") -> None:
        import msgspec

        self.decode = msgspec.json.Decoder().decode
        self.mode = mode
        self.impl = impl
        self.connections: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.acks = 0
        self.acked = asyncio.Event()
        self.closed: Counter[str] = Counter()
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.keys = 0
        self.other: Counter[str] = Counter()
        self.by_seq: dict[tuple[str, int], list[Any]] = {}
        self.per_conn: dict[int, list[tuple[float, dict[str, Any]]]] = defaultdict(list)

    def on_message(self, index: int, arrival: float, message: str | bytes) -> None:
        frame = self.decode(message)
        kind = frame.get("type")
        if kind == "notify":
            self.frames += 1
            keys = frame["keys"]
            self.keys += len(keys)
            if self.mode == "seq":
                slot = (frame["channel"], frame["seq"])
                entry = self.by_seq.get(slot)
                if entry is None:
                    self.by_seq[slot] = [1, arrival, arrival, keys[0] if keys else None, len(keys)]
                else:
                    entry[0] += 1
                    entry[2] = arrival
            else:
                payloads = frame.get("payloads") or {}
                self.per_conn[index].append(
                    (arrival, {k: (v.get("n") if isinstance(v, dict) else v) for k, v in payloads.items()})
                )
        elif kind == "ack":
            self.acks += 1
            self.acked.set()
        else:
            self.other[str(kind)] += 1

    async def _read(self, index: int, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in ws:
                self.on_message(index, time.monotonic(), message)
        except ConnectionClosed:
            pass
        finally:
            self.closed[str(ws.close_code)] += 1

    async def connect(self, urls: Sequence[str], concurrency: int, timeout: float) -> dict[str, Any]:
        """Open one connection per URL; each counts once its welcome (and ack, when it subscribes) arrived."""
        from websockets.asyncio.client import connect

        gate = asyncio.Semaphore(concurrency)
        errors: Counter[str] = Counter()
        started = time.monotonic()
        base = len(self.connections)
        slots: list[Any] = [None] * len(urls)

        async def open_sansio(i: int, url: str) -> Any:
            parts = urlsplit(url)
            _, client = await asyncio.get_running_loop().create_connection(
                lambda: _SansIOClient(url, base + i, self), parts.hostname, parts.port)
            try:
                await client.ready
            except BaseException:
                client.transport.abort()
                raise
            return client

        async def open_one(i: int, url: str) -> None:
            async with gate:
                try:
                    async with asyncio.timeout(timeout):
                        if self.impl == "sansio":
                            slots[i] = await open_sansio(i, url)
                            return
                        ws = await connect(url, ping_interval=None, compression=None, max_size=2**24,
                                           open_timeout=timeout, close_timeout=1)
                        welcome = self.decode(await ws.recv())
                        if welcome.get("type") != "welcome":
                            raise RuntimeError(f"expected welcome, got {welcome}")
                        if "channel=" in url:
                            ack = self.decode(await ws.recv())
                            if ack.get("type") != "ack":
                                raise RuntimeError(f"expected ack, got {ack}")
                    slots[i] = ws
                except Exception as exc:
                    errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1

        await asyncio.gather(*(open_one(i, u) for i, u in enumerate(urls)))
        for i, ws in enumerate(slots):
            self.connections.append(ws)
            if ws is not None and self.impl != "sansio":
                self.tasks.append(asyncio.create_task(self._read(base + i, ws)))
        return {"ok": sum(ws is not None for ws in slots), "failed": sum(errors.values()),
                "errors": dict(errors.most_common(5)), "seconds": round(time.monotonic() - started, 3)}

    async def send_all(self, indexes: Iterable[int], frame: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a frame on the given connections and wait for as many acks."""
        before = self.acks
        sent = 0
        for i in indexes:
            ws = self.connections[i]
            if ws is not None:
                await ws.send(json.dumps(frame))
                sent += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.acks - before < sent:
                    self.acked.clear()
                    await self.acked.wait()
        return {"sent": sent, "acked": self.acks - before}

    async def collect(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "keys": self.keys, "other": dict(self.other), "closed": dict(self.closed),
            "by_seq": self.by_seq if self.mode == "seq" else {},
            "per_conn": dict(self.per_conn) if self.mode == "payload" else {},
        }

    async def do_reset(self) -> None:
        self.reset()

    async def close(self) -> None:
        for ws in self.connections:
            if ws is not None:
                ws.transport.abort()


def client_worker(conn: Any, lifetime_s: float, mode: str, impl: str = "asyncio") -> None:
    raise_nofile()
    clients = _Clients(mode, impl)
    handlers = {"connect": clients.connect, "send_all": clients.send_all, "collect": clients.collect,
                "reset": clients.do_reset}
    _serve(conn, lifetime_s, handlers, clients.close)


# NOTIFY generators -----------------------------------------------------------------------------------------------


class _Generator:
    """asyncpg connections that send NOTIFYs on a schedule and note when each COMMIT returned."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conns: list[Any] = []

    async def open(self, count: int) -> int:
        import asyncpg

        self.conns = [await asyncpg.connect(self.dsn) for _ in range(count)]
        return count

    async def queue_usage(self) -> float:
        return float(await self.conns[0].fetchval("SELECT pg_notification_queue_usage()"))

    async def paced(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Send at ``rate`` notifications/s for ``duration`` s from ``start_at`` (monotonic), on every connection.

        ``batch`` = 1: one ``pg_notify`` per statement (its own transaction); the key is picked at random from the
        connection's share of ``keys`` (keys are split between connections, so each key's notifications commit in
        the order of their ``n``); the payload is ``{"k": key, "n": n}`` when ``json``, else the key; with
        ``record``, each notification is noted as (key, n, sent_at, committed_at).
        ``batch`` > 1: one statement NOTIFYs ``batch`` distinct keys ``prefix || ((offset + g) % n_keys)``.
        """
        rate, duration, batch = spec["rate"], spec["duration"], spec.get("batch", 1)
        channel, conns = spec["channel"], self.conns
        statements_total = max(1, int(rate * duration / batch))
        interval = batch * len(conns) / rate
        records: list[tuple[str, int, float, float]] = []
        sent = [0] * len(conns)
        late = [0.0] * len(conns)
        start_at = spec.get("start_at") or time.monotonic()
        rng = random.Random(spec.get("seed"))

        async def run(j: int, conn: Any) -> None:
            count = statements_total // len(conns) + (1 if j < statements_total % len(conns) else 0)
            keys = spec.get("keys") or []
            own = keys[j :: len(conns)] or keys
            offset = rng.randrange(1 << 20)
            if batch > 1:
                statement = await conn.prepare(
                    "SELECT pg_notify($1, $2 || ((($3::int) + g) % $4)::text) FROM generate_series(1, $5) g"
                )
            else:
                statement = await conn.prepare(spec.get("sql", "SELECT pg_notify($1, $2)"))
            t0 = start_at + j * interval / len(conns)
            for i in range(count):
                due = t0 + i * interval
                now = time.monotonic()
                if now < due:
                    await asyncio.sleep(due - now)
                else:
                    late[j] = max(late[j], now - due)
                if batch > 1:
                    offset += batch
                    await statement.fetch(channel, spec.get("prefix", "k"), offset % spec["n_keys"], spec["n_keys"],
                                          batch)
                else:
                    key = own[rng.randrange(len(own))]
                    n = i * len(conns) + j
                    payload = json.dumps({"k": key, "n": n}) if spec.get("json") else key
                    sent_at = time.monotonic()
                    await statement.fetch(channel, payload)
                    if spec.get("record"):
                        records.append((key, n, sent_at, time.monotonic()))
                sent[j] += batch

        if (delay := start_at - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        began = time.monotonic()
        async with asyncio.timeout(duration * 3 + 30):
            await asyncio.gather(*(run(j, c) for j, c in enumerate(conns)))
        return {"sent": sum(sent), "began": began, "ended": time.monotonic(), "max_late_s": max(late),
                "records": records}

    async def lone(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``count`` lone notifications ``interval`` s (+ up to ``jitter`` s) apart; each noted as in ``paced``."""
        conn = self.conns[0]
        statement = await conn.prepare(spec.get("sql", "SELECT pg_notify($1, $2)"))
        rng = random.Random(spec.get("seed"))
        records = []
        async with asyncio.timeout(spec["count"] * (spec["interval"] + spec.get("jitter", 0)) + 30):
            for n in range(spec["count"]):
                await asyncio.sleep(spec["interval"] + rng.random() * spec.get("jitter", 0))
                key = f"{spec.get('prefix', 'lone')}-{n}"
                payload = json.dumps({"k": key, "n": n}) if spec.get("json") else key
                sent_at = time.monotonic()
                await statement.fetch(spec["channel"], payload)
                records.append((key, n, sent_at, time.monotonic()))
        return {"sent": len(records), "records": records}

    async def close(self) -> None:
        for conn in self.conns:
            conn.terminate()


def generator_worker(conn: Any, lifetime_s: float, dsn: str) -> None:
    generator = _Generator(dsn)
    handlers = {"open": generator.open, "paced": generator.paced, "lone": generator.lone,
                "queue_usage": generator.queue_usage}
    _serve(conn, lifetime_s, handlers, generator.close)


def fastclient_binary() -> Path:
    """bench/fastclient.c, compiled into bench/results/ when the source is newer than the binary (needs gcc)."""
    source, binary = BENCH_DIR / "fastclient.c", RESULTS_DIR / "fastclient"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


class CClients:
    """One ``fastclient`` process (``--client-impl c``), driven like a ``Worker`` of ``client_worker``: the same
    commands ("connect", "reset", "collect") and answers, in "seq" mode."""

    def __init__(self, name: str, lifetime_s: float, poll_ms: int = 0) -> None:
        self.name = name
        self.lifetime_s = lifetime_s
        self.poll_ms = poll_ms
        self.process: Any = None  # started by the first "connect": the relay's port comes with its URLs
        self.pending: tuple[Any, ...] = ()

    def send(self, *command: Any) -> None:
        self.pending = command
        if command[0] != "connect":
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write(f"{command[0]}\n".encode())
            self.process.stdin.flush()
            return
        urls, concurrency = command[1], command[2]
        if self.process is None:
            parts = urlsplit(urls[0])
            self.process = subprocess.Popen(
                [str(fastclient_binary()), parts.hostname or "127.0.0.1", str(parts.port), str(int(self.lifetime_s)),
                 str(self.poll_ms)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_die_with_parent)
        targets = [f"{urlsplit(u).path}?{urlsplit(u).query}" for u in urls]
        lines = f"connect {concurrency} {len(targets)}\n".encode() + "".join(f"{t}\n" for t in targets).encode()
        stdin = self.process.stdin
        assert stdin is not None

        def write() -> None:  # more than a pipe holds: from a thread, so that every process connects at once
            stdin.write(lines)
            stdin.flush()

        threading.Thread(target=write, daemon=True).start()

    def recv(self, timeout: float) -> Any:
        import select

        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{self.name} did not answer within {timeout:g} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited with {self.process.wait()}")
        answer = json.loads(line)
        if self.pending[0] == "collect":  # as _Clients.collect answers in "seq" mode
            by_seq: dict[tuple[str, int], list[Any]] = {}
            for c, seq, count, first, last, key, keys in answer["by_seq"]:
                entry = by_seq.get((c, seq))
                if entry is None:
                    by_seq[c, seq] = [count, first, last, key, keys]
                else:  # a batch the client's look-back had lost sight of: one entry again
                    entry[0] += count
                    entry[1], entry[2] = min(entry[1], first), max(entry[2], last)
            answer["by_seq"] = by_seq
            answer["other"] = {"other": answer["other"]}
            answer["per_conn"] = {}
        elif self.pending[0] == "reset":
            answer = None
        return answer

    def call(self, *command: Any, timeout: float = 60) -> Any:
        self.send(*command)
        return self.recv(timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.write(b"stop\n")
            self.process.stdin.close()
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(3)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_clients(
    count: int, mode: str, lifetime_s: float, name: str = "clients", impl: str = "asyncio", poll_s: float = 0
) -> list[Any]:
    """Client processes; ``impl`` is "asyncio" (websockets' asyncio client), "sansio" (``_SansIOClient``) or "c"
    (``CClients``, "seq" mode only; ``poll_s`` 0: each waits in epoll_wait, else it sweeps every ``poll_s``)."""
    if impl == "c":
        if mode != "seq":
            raise ValueError("the C clients keep notify frames per (channel, seq) only: mode 'seq'")
        fastclient_binary()
        return [CClients(f"{name}-{i}", lifetime_s, round(poll_s * 1000)) for i in range(count)]
    return [Worker(client_worker, mode, impl, name=f"{name}-{i}", lifetime_s=lifetime_s) for i in range(count)]


def start_generators(count: int, dsn: str, connections: int, lifetime_s: float) -> list[Worker]:
    workers = [Worker(generator_worker, dsn, name=f"generator-{i}", lifetime_s=lifetime_s) for i in range(count)]
    call_all(workers, ("open", connections), timeout=30)
    return workers


def connect_clients(workers: Sequence[Worker], urls: Sequence[str], concurrency: int = 32,
                    timeout: float = 120) -> dict[str, Any]:
    """Spread the URLs over the client processes (round robin) and open them all; raise unless every one opened."""
    shares: list[list[str]] = [urls[i :: len(workers)] for i in range(len(workers))]
    answers = call_all(workers, [("connect", share, concurrency, 30.0) for share in shares], timeout)
    total = {"ok": sum(a["ok"] for a in answers), "failed": sum(a["failed"] for a in answers),
             "seconds": max(a["seconds"] for a in answers)}
    errors: Counter[str] = Counter()
    for answer in answers:
        errors.update(answer["errors"])
    if total["failed"]:
        raise RuntimeError(f"{total['failed']} of {len(urls)} connections failed: {dict(errors)}")
    return total


# ----------------------------------------------------------------------------------------------------------------
# Statistics and reporting.


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(seconds: Iterable[float]) -> dict[str, Any]:
    values = sorted(seconds)
    if not values:
        return {"count": 0}
    ms = [v * 1000 for v in values]
    return {"count": len(ms), "min": round(ms[0], 3), "p50": round(percentile(ms, 50), 3),
            "p90": round(percentile(ms, 90), 3), "p99": round(percentile(ms, 99), 3), "max": round(ms[-1], 3)}


def figure(value: float | None, unit: str, target: float | None = None, op: str = "<=",
           note: str | None = None) -> dict[str, Any]:
    """One reported figure; with a target, also the target and whether it was met."""
    entry: dict[str, Any] = {"value": value, "unit": unit}
    if target is not None:
        entry["target"] = f"{op} {target:g} {unit}"
        met = value is not None and not (isinstance(value, float) and math.isnan(value))
        compare = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}[op]
        entry["pass"] = bool(met and compare(value, target))
    if note:
        entry["note"] = note
    return entry


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "relay_commit": git("rev-parse", "--short", "HEAD"),
            "relay_src_dirty": bool(git("status", "--porcelain", "--", "src"))}


def notify_frames(metrics: dict[str, float]) -> float:
    """Notify frames written, over every transport label (and every worker: ``Stack.metrics`` sums them)."""
    return sum(value for name, value in metrics.items()
               if name.startswith("notifyrelay_messages_sent_total{") and 'type="notify"' in name)


def counter(metrics: dict[str, float], name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return metrics.get(f"{name}{{{label_text}}}" if labels else name, 0.0)


def emit(name: str, result: dict[str, Any]) -> None:
    """Print the scenario's one JSON object and keep it in bench/results/ (timestamped, and as the latest)."""
    result.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    figures = [f for f in result.get("figures", {}).values() if "pass" in f]
    result["pass"] = bool(figures) and all(f["pass"] for f in figures) and "error" not in result
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"{name}-{stamp}.json").write_text(text + "\n")
    (RESULTS_DIR / f"{name}.json").write_text(text + "\n")
    print(text, flush=True)


def scenario_main(name: str, bound_s: int, body: Callable[[argparse.Namespace, dict[str, Any]], None],
                  parser: argparse.ArgumentParser) -> int:
    """Run a scenario: parse flags, arm the deadline, run ``body`` (which fills the result), emit it, exit status."""
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter phases (the quick suite)")
    parser.add_argument("--profile", action="store_true", help="record the relay with py-spy during the main phase")
    args = parser.parse_args()
    raise_nofile()
    result: dict[str, Any] = {"scenario": name, "machine": machine(), "quick": args.quick}
    started = time.monotonic()
    arm_deadline(bound_s)
    status = 0
    try:
        body(args, result)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        status = 130
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
        status = 1
    finally:
        signal.alarm(0)
    result["seconds"] = round(time.monotonic() - started, 1)
    emit(name, result)
    return status


# ----------------------------------------------------------------------------------------------------------------
# Profiling the relay with py-spy.


class Profiler:
    """``py-spy record`` on the relay for ``seconds``; ``finish()`` summarises the hot spots (or says why not)."""

    def __init__(self, enabled: bool, pid: int, name: str, seconds: float, rate: int = 200) -> None:
        self.enabled = enabled
        self.path = RESULTS_DIR / f"{name}.pyspy.txt"
        self.process: subprocess.Popen[bytes] | None = None
        self.problem = ""
        if not enabled:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            self.problem = "py-spy not installed (pip install py-spy)"
            return
        self.process = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(max(1, round(seconds))),
             "--format", "raw", "--output", str(self.path), "--nonblocking"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def finish(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        if self.process is None:
            return {"error": self.problem}
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"error": "py-spy did not finish"}
        if not self.path.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return summarise_profile(self.path)


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: share of samples per function, as the leaf (self) and anywhere (total)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function(f) for f in stack.split(";") if "(" in f]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counts: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counts.most_common(top)] if total else []

    return {"samples": total, "file": str(path.relative_to(REPO_DIR)), "self_percent": shares(own),
            "total_percent": shares(inclusive)}


def _function(frame: str) -> str:
    """``send_data (websockets/asyncio/connection.py:123)`` -> ``send_data (websockets/asyncio/connection.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0] if where[-1:].isdigit() else where
    for marker in ("site-packages/", "/src/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{name} ({file})"
