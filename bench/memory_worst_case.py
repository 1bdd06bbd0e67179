"""Worst-case memory per connection (issue 14, item 4; docs/security.md): N unauthenticated websocket clients, each
subscribing ``max_subscriptions`` distinct keys of ``max_key_bytes`` (the defaults unless told), against
``notifyrelay run`` in a subprocess; the relay's RSS growth measured with psutil. First N idle connections (the idle
cost), then N more that each fill their subscriptions (the worst case). The relay-wide cap is lifted for the run.

    .venv/bin/python bench/memory_worst_case.py --connections 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect

from notifyrelay.config import ServerConfig
from notifyrelay.pgembed import EmbeddedPostgres

CHANNEL = "activity_progress"

async def client_subscribes(url: str, keys: int, key_bytes: int, max_message_bytes: int, tag: str) -> Any:
    """A client subscribing ``keys`` distinct keys of ``key_bytes``, as many per frame as max_message_bytes takes."""
    ws = await connect(url, max_size=None, ping_interval=None)
    await ws.recv()
    per_frame = max(1, (max_message_bytes - 200) // (key_bytes + 3))
    sent = 0
    while sent < keys:
        batch = [f"{tag}-{sent + i}-".ljust(key_bytes, "x") for i in range(min(per_frame, keys - sent))]
        await ws.send(json.dumps({"op": "subscribe", "channel": CHANNEL, "keys": batch}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "ack", reply
        sent += len(batch)
    return ws

async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--max-subscriptions", type=int, default=ServerConfig().max_subscriptions)
    parser.add_argument("--max-key-bytes", type=int, default=ServerConfig().max_key_bytes)
    parser.add_argument("--extra", default="")
    args = parser.parse_args()
    settings = ServerConfig()
    with EmbeddedPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.toml"
        config.write_text(f'dsn = "{pg.dsn}"\n[server]\nlisten = "127.0.0.1:0"\n'
                          f"max_connections = {2 * args.connections + 10}\n"
                          f"max_subscriptions = {args.max_subscriptions}\nmax_key_bytes = {args.max_key_bytes}\n"
                          f"max_total_subscriptions = {10**9}\n{args.extra}rate_limit_burst = 10000\n"
                          f'[log]\nformat = "json"\n[[channels]]\nname = "{CHANNEL}"\n')
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "notifyrelay", "run", "--config", str(config),
                                                    stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
        url = None
        while url is None:
            line = await proc.stderr.readline()
            if not line:
                raise SystemExit("relay exited")
            if b"relay.started" in line:
                url = json.loads(line)["url"]
        drain = asyncio.create_task(proc.stderr.read())
        relay = psutil.Process(proc.pid)

        def rss() -> int:
            return int(relay.memory_info().rss)

        fill = (args.max_subscriptions, args.max_key_bytes, settings.max_message_bytes)
        warm = [await client_subscribes(url, *fill, "warm")]
        await asyncio.sleep(0.5)
        base = rss()
        idle = [await connect(url, ping_interval=None) for _ in range(args.connections)]
        for ws in idle:
            await ws.recv()
        await asyncio.sleep(0.5)
        after_idle = rss()
        full = []
        for i in range(args.connections):
            full.append(await client_subscribes(url, *fill, f"c{i}"))
        await asyncio.sleep(0.5)
        after_full = rss()
        n = args.connections
        print(f"connections={n} max_subscriptions={args.max_subscriptions} max_key_bytes={args.max_key_bytes}")
        idle_kib, worst_kib = (after_idle - base) / n / 1024, (after_full - after_idle) / n / 1024
        print(f"idle connection: {idle_kib:.1f} KiB; worst case per connection: {worst_kib:.1f} KiB "
              f"(of which its {args.max_subscriptions} subscriptions: {worst_kib - idle_kib:.1f} KiB) "
              f"(RSS {base / 2**20:.0f} -> {after_full / 2**20:.0f} MiB)")
        for ws in warm + idle + full:
            await ws.close()
        proc.terminate()
        await proc.wait()
        drain.cancel()

if __name__ == "__main__":
    asyncio.run(main())
