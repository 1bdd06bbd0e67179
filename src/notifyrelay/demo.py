"""``notifyrelay demo``: an embedded PostgreSQL, the activities example, a simulated worker and the relay with /ui.

The activities channel is a state channel with progress, so clients get rows, percent, rate, ETA and stalls;
``system_stability`` (sql/examples/system_stability.sql) is relayed beside it. The worker moves a few activities
through their progress in rounds; in each round one of them fails and one stalls for a while, so that every state a
progress UI must show appears within a minute. Everything it starts is stopped and deleted on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from .config import load_config
from .ops.log import configure_logging
from .sqlfiles import read_sql

log = structlog.get_logger("notifyrelay.demo")
CHANNEL = "activity_progress"
STABILITY_CHANNEL = "system_stability"
TERMINAL = ("complete", "failed", "cancelled")
STALL_AFTER_S = 4.0  # the demo's [channels.progress] stall_after_s: short, so that a stall shows quickly

COLUMNS = ["status", "objects_processed", "objects_to_process", "message", "updated_at"]
# What a "*" follower (the /ui page, watch without --key) starts from: the activities still going, and those that
# ended in the last minute so that their outcome stays on screen for a while.
LIST_QUERY = (
    "SELECT id::text AS key, status, objects_processed, objects_to_process, message, updated_at FROM activities "
    "WHERE status NOT IN ('complete', 'failed', 'cancelled') OR updated_at > now() - interval '1 minute' "
    "ORDER BY id"
)


def demo_channels() -> list[dict[str, Any]]:
    """The demo's [[channels]]: activities as a state channel with progress, and the system stability signal."""
    return [
        {
            "name": CHANNEL,
            "state": {"table": "activities", "key_column": "id", "columns": COLUMNS, "list_query": LIST_QUERY},
            "progress": {
                "done": "objects_processed", "total": "objects_to_process", "status": "status",
                "terminal": list(TERMINAL), "failed": ["failed"], "stall_after_s": STALL_AFTER_S,
            },
        },
        {"name": STABILITY_CHANNEL, "key": "json:scope", "include_payload": True},
    ]


@dataclass
class _Activity:
    id: int
    label: str
    total: int  # objects_to_process; 0 means not known (an indeterminate bar) until it ends
    size: int  # how many objects it really has (equal to total when known)
    speed: float = 0.0  # objects per tick
    done: float = 0.0
    status: str = "queued"
    message: str = "queued"
    start_tick: int = 0
    stall_ticks: int = 0  # ticks left to sit still (a stall); the row is not touched meanwhile
    fails: bool = False
    stalls: bool = False


async def simulate_worker(
    dsn: str, *, activities: int = 5, stop: asyncio.Event | None = None, tick_s: float = 0.1,
    stall_s: float = 2 * STALL_AFTER_S, seed: int = 7,
) -> None:
    """Move ``activities`` activities through queued -> running -> complete in rounds, until ``stop``.

    In each round one activity fails part way and another stalls for ``stall_s`` (no change to its row, so the
    relay marks it stalled after ``stall_after_s``); the last activity has no known total (objects_to_process 0).
    Every status change moves the count of active activities, which is what the statement-level
    system_stability trigger reports: the worker pokes that signal at each start, end and new round.
    """
    conn = await asyncpg.connect(dsn)
    rng = random.Random(seed)
    try:
        plan: list[_Activity] = []
        for n in range(activities):
            indeterminate = n == activities - 1
            size = rng.choice([200, 500, 1000, 2000])
            label = f"reindex {n + 1}" if indeterminate else f"import batch {n + 1}"
            row_id = await conn.fetchval(
                "INSERT INTO activities (status, objects_to_process, message) VALUES ('queued', $1, $2) RETURNING id",
                0 if indeterminate else size, "queued",
            )
            plan.append(_Activity(row_id, label, 0 if indeterminate else size, size))
        stall_ticks = max(1, round(stall_s / tick_s))
        round_no = 0
        while stop is None or not stop.is_set():
            round_no += 1
            _plan_round(plan, round_no, rng, tick_s)
            await _write(conn, plan)
            tick = 0
            while any(activity.status not in TERMINAL for activity in plan):
                if stop is not None and stop.is_set():
                    return
                tick += 1
                await asyncio.sleep(tick_s)
                changed = [activity for activity in plan if _step(activity, tick, stall_ticks)]
                await _write(conn, changed)
            await asyncio.sleep(3)  # let the outcome show before the next round
    finally:
        await conn.close()


def _plan_round(plan: list[_Activity], round_no: int, rng: random.Random, tick_s: float) -> None:
    failing = (round_no - 1) % len(plan)
    stalling = (round_no + 1) % len(plan)
    for index, activity in enumerate(plan):
        seconds = rng.uniform(6, 18)  # how long it runs when nothing goes wrong
        activity.speed = activity.size / (seconds / tick_s)
        activity.done = 0
        activity.status = "queued"
        activity.message = f"queued (round {round_no})"
        activity.start_tick = index * 8  # staggered starts
        activity.fails = index == failing and len(plan) > 1
        activity.stalls = index == stalling and not activity.fails
        activity.stall_ticks = 0


def _step(activity: _Activity, tick: int, stall_ticks: int) -> bool:
    """Advance one activity by one tick; True when its row changed."""
    if activity.status in TERMINAL or tick < activity.start_tick:
        return False
    if activity.stall_ticks > 0:
        activity.stall_ticks -= 1
        return False
    if activity.status == "queued":
        activity.status, activity.message = "running", f"{activity.label}: running"
        return True
    activity.done = min(activity.size, activity.done + activity.speed)
    share = activity.done / activity.size
    if activity.stalls and share >= 0.4:
        activity.stalls = False
        activity.stall_ticks = stall_ticks
        activity.message = f"{activity.label}: waiting for a lock"
    elif activity.fails and share >= 0.6:
        activity.status, activity.message = "failed", f"{activity.label}: the source went away (simulated failure)"
    elif activity.done >= activity.size:
        activity.status, activity.message = "complete", f"{activity.label}: finished"
    else:
        activity.message = f"{activity.label}: processing"
    return True


async def _write(conn: Any, changed: list[_Activity]) -> None:
    """One statement for every changed activity: one notification per activity, one stability check."""
    if not changed:
        return
    await conn.execute(
        """
        UPDATE activities AS a SET status = u.status, objects_processed = u.done, objects_to_process = u.total,
                                   message = u.message, updated_at = now()
        FROM unnest($1::bigint[], $2::text[], $3::int[], $4::int[], $5::text[]) AS u(id, status, done, total, message)
        WHERE a.id = u.id
        """,
        [a.id for a in changed], [a.status for a in changed], [int(a.done) for a in changed],
        [a.total for a in changed], [a.message for a in changed],
    )


async def _demo(dsn: str, listen: str) -> None:
    from .app import Relay, run_until_signalled

    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(read_sql("install.sql"))
        await setup.execute(read_sql("examples/activities.sql"))
        await setup.execute(read_sql("examples/system_stability.sql"))
    finally:
        await setup.close()
    config = load_config(
        None,
        overrides={"dsn": dsn, "server.listen": listen, "server.ui": True, "channels": demo_channels(),
                   # A demo needs few clients, and so starts on hosts with a low file-descriptor limit too.
                   "server.max_connections": 1000},
    )
    relay = Relay(config)
    worker = asyncio.create_task(simulate_worker(dsn))

    async def banner() -> None:
        await relay.started.wait()
        url = relay.server.url
        http = url.replace("ws", "http", 1).removesuffix("/ws")
        command = _own_command()
        print(
            f"\nnotifyrelay demo is running.\n"
            f"  page:      {http}/ui\n"
            f"  websocket: {url}   (probes: {http}/readyz, {http}/metrics)\n"
            f"  database:  {dsn}\n\n"
            f"Open the page in a browser, or in another terminal follow every activity (add --key 1 for one):\n"
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
