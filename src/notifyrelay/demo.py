"""``notifyrelay demo``: an embedded PostgreSQL, the activities example, a simulated worker and the relay.

Everything it starts is stopped and deleted on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys

import asyncpg
import structlog

from .config import load_config
from .ops.log import configure_logging
from .sqlfiles import read_sql

log = structlog.get_logger("notifyrelay.demo")
CHANNEL = "activity_progress"


async def simulate_worker(dsn: str, *, activities: int = 5, stop: asyncio.Event | None = None) -> None:
    """Move a few activities through queued -> running -> done at different speeds, forever (or until ``stop``)."""
    conn = await asyncpg.connect(dsn)
    rng = random.Random(7)
    try:
        ids = [
            await conn.fetchval(
                "INSERT INTO activities (status, objects_to_process, message) VALUES ('queued', $1, $2) RETURNING id",
                rng.choice([200, 500, 1000]), f"import batch {n + 1}",
            )
            for n in range(activities)
        ]
        speeds = {activity: rng.randint(3, 40) for activity in ids}  # objects per tick
        while stop is None or not stop.is_set():
            for activity in ids:
                # One statement per step; the trigger NOTIFYs only when a watched column really changes.
                await conn.execute(
                    """
                    UPDATE activities SET
                        objects_processed = LEAST(objects_to_process, objects_processed + $2),
                        status = CASE WHEN objects_processed + $2 >= objects_to_process THEN 'done'
                                      ELSE 'running' END,
                        message = CASE WHEN objects_processed + $2 >= objects_to_process THEN 'finished'
                                       ELSE 'processing' END,
                        updated_at = now()
                    WHERE id = $1 AND status <> 'done'
                    """,
                    activity, speeds[activity],
                )
            done = await conn.fetchval("SELECT count(*) FROM activities WHERE id = ANY($1) AND status = 'done'", ids)
            if done == len(ids):
                await asyncio.sleep(2)
                await conn.execute(
                    "UPDATE activities SET status = 'queued', objects_processed = 0, message = 'restarted' "
                    "WHERE id = ANY($1)", ids,
                )
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def _demo(dsn: str, listen: str) -> None:
    from .app import Relay, run_until_signalled

    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(read_sql("install.sql"))
        await setup.execute(read_sql("examples/activities.sql"))
    finally:
        await setup.close()
    config = load_config(
        None,
        overrides={"dsn": dsn, "server.listen": listen, "channels": [{"name": CHANNEL}]},
    )
    relay = Relay(config)
    worker = asyncio.create_task(simulate_worker(dsn))

    async def banner() -> None:
        await relay.started.wait()
        url = relay.server.url
        probes = url.replace("ws", "http", 1).removesuffix("/ws")
        command = _own_command()
        print(
            f"\nnotifyrelay demo is running.\n"
            f"  websocket: {url}   (probes: {probes}/readyz, {probes}/metrics)\n"
            f"  database:  {dsn}\n\n"
            f"In another terminal, follow activity 1, or every activity:\n"
            f"  {command} watch {url} --channel {CHANNEL} --key 1\n"
            f"  {command} watch {url} --channel {CHANNEL}\n\n"
            f"Ctrl-C stops the relay, the worker and the database.\n",
            flush=True,
        )

    shown = asyncio.create_task(banner())
    try:
        await run_until_signalled(relay)
    finally:
        for task in (worker, shown):
            task.cancel()
        await asyncio.gather(worker, shown, return_exceptions=True)


def _own_command() -> str:
    """How this very program was started, so that the printed watch line works as pasted."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "notifyrelay":
        return argv0 if os.path.dirname(argv0) and not shutil.which("notifyrelay") else "notifyrelay"
    return f"{sys.executable} -m notifyrelay"


def run_demo(listen: str) -> int:
    from .pgembed import EmbeddedPostgres, EmbeddedUnavailable

    configure_logging("info", "auto")
    try:
        database = EmbeddedPostgres()
    except EmbeddedUnavailable as exc:
        print(f"notifyrelay demo: {exc}", file=sys.stderr)
        return 1
    print("starting an embedded PostgreSQL ...", flush=True)
    with database:
        try:
            asyncio.run(_demo(database.dsn, listen))
        except OSError as exc:
            print(f"notifyrelay demo: cannot listen on {listen}: {exc.strerror}; try --listen 127.0.0.1:0",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    return 0
