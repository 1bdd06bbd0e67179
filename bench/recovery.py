"""Scenario: listener recovery after PostgreSQL outages of 2 s, 20 s and 60 s (SPEC v2 "Listener recovery").

The relay runs as users run it (default ``[listener]`` settings: ``probe_interval_s = 0.5``,
``reconnect_max_s = 10``), with one websocket client on ``/ws?channel=...`` that stays connected throughout. For
each outage PostgreSQL is stopped (``pg_ctl stop -m fast``), left down, and started again; meanwhile this process

- polls PostgreSQL every 10 ms with a fresh connection: the first one accepted is "PostgreSQL accepting";
- polls ``/readyz`` every 10 ms: the first 200 is "ready";
- once PostgreSQL accepts, sends a NOTIFY every 20 ms: the first ``notify`` frame the client receives is "first
  delivered" (notifications sent before the relay LISTENs again are not relayed, as documented).

Both figures are measured from "PostgreSQL accepting". Target: at most 1 s each.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import asyncpg
import benchlib as bl
import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

CHANNEL = "bench_recovery"
TARGET_S = 1.0


async def readyz_status(port: int) -> int:
    """The status code of one GET /readyz (0 when the relay does not answer)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return 0
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 1)
        return int(status_line.split()[1])
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


async def first_accepted(dsn: str) -> float:
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=0.5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(0.01)
            continue
        accepted = time.monotonic()
        await conn.close()
        return accepted


async def first_ready(port: int) -> float:
    while True:
        if await readyz_status(port) == 200:
            return time.monotonic()
        await asyncio.sleep(0.01)


async def keep_notifying(dsn: str, stop: asyncio.Event) -> int:
    """NOTIFY every 20 ms until told to stop; the number sent."""
    conn = await asyncpg.connect(dsn)
    sent = 0
    try:
        while not stop.is_set():
            sent += 1
            await conn.execute(f"NOTIFY {CHANNEL}, '{sent}'")
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return sent


class Follower:
    """The websocket client: notes when status frames and notify frames arrive."""

    def __init__(self) -> None:
        self.notify_at: list[float] = []
        self.status: list[tuple[str, float]] = []
        self.changed = asyncio.Event()
        self.closed: str | None = None

    async def read(self, ws: Any) -> None:
        try:
            async for message in ws:
                frame = msgspec.json.decode(message)
                now = time.monotonic()
                if frame["type"] == "notify":
                    self.notify_at.append(now)
                elif frame["type"] == "status":
                    self.status.append((frame["listener"], now))
                self.changed.set()
        except ConnectionClosed as exc:
            self.closed = str(exc)
        else:
            self.closed = f"closed by the relay: {ws.close_code} {ws.close_reason}"
        self.changed.set()

    async def wait_for(self, predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.closed:
                    raise RuntimeError(f"the websocket client lost its connection: {self.closed}")
                self.changed.clear()
                await self.changed.wait()


async def one_outage(stack: bl.Stack, follower: Follower, outage_s: float) -> dict[str, Any]:
    assert stack.pg is not None
    pg = stack.pg
    port = stack.port
    downs = sum(1 for state, _ in follower.status if state == "down")
    await asyncio.to_thread(pg.stop, "fast")
    stopped = time.monotonic()
    await follower.wait_for(lambda: sum(1 for s, _ in follower.status if s == "down") > downs, 10)
    assert await readyz_status(port) == 503
    await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - stopped)))
    accepted_task = asyncio.create_task(first_accepted(stack.dsn))
    ready_task = asyncio.create_task(first_ready(port))
    started = time.monotonic()
    await asyncio.to_thread(pg.start)
    pg_start_s = time.monotonic() - started
    accepted = await asyncio.wait_for(accepted_task, 30)
    notified_before = len(follower.notify_at)
    stop = asyncio.Event()
    notifier = asyncio.create_task(keep_notifying(stack.dsn, stop))
    try:
        ready = await asyncio.wait_for(ready_task, 30)
        await follower.wait_for(lambda: len(follower.notify_at) > notified_before, 30)
    finally:
        stop.set()
        await notifier
    delivered = follower.notify_at[notified_before]
    return {
        "outage_s": outage_s,
        "not_accepting_s": round(accepted - stopped, 2),
        "pg_ctl_start_s": round(pg_start_s, 3),
        "accepting_to_readyz_200_ms": round((ready - accepted) * 1000, 1),
        "accepting_to_first_delivered_ms": round((delivered - accepted) * 1000, 1),
    }


async def measure(stack: bl.Stack, outages: list[float]) -> list[dict[str, Any]]:
    follower = Follower()
    # The relay pings its clients (and the client answers); the client does not ping the relay, so that its own
    # keepalive cannot end the measurement.
    async with connect(stack.ws_url(CHANNEL), ping_interval=None) as ws:
        reader = asyncio.create_task(follower.read(ws))
        try:
            results = []
            for outage_s in outages:
                results.append(await one_outage(stack, follower, outage_s))
                print(f"recovery: {results[-1]}", flush=True, file=sys.stderr)
            return results
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    outages = [2.0, 5.0] if args.quick else [float(s) for s in args.outages.split(",")]
    outages = [outage for outage in outages for _ in range(args.repeat)]
    result["config"] = {"outages_s": outages, "listener": "defaults (probe_interval_s 0.5, reconnect_max_s 10)",
                        "readyz_poll_ms": 10, "notify_every_ms": 20}
    # One client: a small max_connections keeps the relay's file-descriptor check far from RLIMIT_NOFILE.
    with bl.Stack("recovery", [{"name": CHANNEL}], window_ms=0, server={"max_connections": 100}) as stack:
        runs = asyncio.run(measure(stack, outages))
        metrics = stack.metrics()
    result["runs"] = runs
    result["listener_connect_attempts_total"] = bl.counter(metrics, "notifyrelay_listener_connect_attempts_total")
    figures: dict[str, Any] = {}
    for outage_s in dict.fromkeys(outages):  # the worst of the repeats of each outage length
        these = [run_ for run_ in runs if run_["outage_s"] == outage_s]
        note = f"worst of {len(these)}" if len(these) > 1 else None
        for name, key in (("readyz", "accepting_to_readyz_200_ms"),
                          ("first_delivered", "accepting_to_first_delivered_ms")):
            worst = max(run_[key] for run_ in these) / 1000
            figures[f"outage_{outage_s:g}s_{name}"] = bl.figure(worst, "s", TARGET_S, note=note)
    result["figures"] = figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outages", default="2,20,60", help="outage lengths in seconds, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="run each outage this many times (figures: the worst)")
    return bl.scenario_main("recovery", 1800, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
