"""The browser client module under Node's own test runner (``node --test clients/js/test``), against a live relay.

The relay runs here, on a PostgreSQL of the test's own, behind a gate that can make it unreachable; the Node tests
reach it at NOTIFYRELAY_TEST_URL and ask for faults (drop the link, stop the database, restart the relay, write
rows) through the control endpoint at NOTIFYRELAY_TEST_CONTROL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from notifyrelay.app import Relay
from tests.browser.harness import Activities, Gate, control, relay_overrides, restart_relay
from tests.conftest import Database, RelayFactory

ROOT = Path(__file__).resolve().parents[2]


async def test_node_client_tests_pass_against_a_live_relay(make_relay: RelayFactory, own_database: Database) -> None:
    """Every test in clients/js/test passes under ``node --test`` against a real relay on a real PostgreSQL."""
    node = shutil.which("node")
    if node is None:
        print("\nnode is not installed: the JavaScript client's Node tests cannot run here (Chromium tests still do)")
        pytest.skip("node is not installed")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        print(f"\nnode {version} has no WebSocket: the JavaScript client's Node tests need Node 20 or later")
        pytest.skip(f"node {version} is older than 20")
    assert own_database.server is not None
    activities = await Activities(own_database).install()
    overrides = relay_overrides()
    relay: Relay = await make_relay(dsn=own_database.dsn, **overrides)
    gate = Gate(relay.server.port)
    await gate.start()
    # A relay replays a resume only from overlap_ms (1 s) after it began listening: give the resume test that much.
    await asyncio.sleep(1.2)

    async def restart(args: dict[str, Any]) -> None:
        nonlocal relay

        async def between() -> None:
            if "update" in args:
                await update(args["update"])

        relay = await restart_relay(make_relay, relay, between=between, dsn=own_database.dsn, **overrides)

    async def update(args: dict[str, Any]) -> None:
        await activities.update(args.pop("key"), **args)

    async def set_gate(args: dict[str, Any]) -> None:
        if args["shut"]:
            gate.shut()
        else:
            gate.open()

    async def database(args: dict[str, Any]) -> None:
        assert own_database.server is not None
        if args["up"]:
            await asyncio.to_thread(own_database.server.start)
        else:
            await asyncio.to_thread(own_database.server.stop, "fast")

    async def create(args: dict[str, Any]) -> str:
        return await activities.create(**args)

    async def notify(args: dict[str, Any]) -> None:
        await own_database.notify(args["channel"], args["payload"])

    endpoint = await control(
        {"create": create, "update": update, "notify": notify, "gate": set_gate, "database": database,
         "restart": restart}
    ).start()
    env = {
        **os.environ,
        "NOTIFYRELAY_TEST_URL": f"ws://127.0.0.1:{gate.port}/ws",
        "NOTIFYRELAY_TEST_CONTROL": endpoint.url,
    }
    try:
        process = await asyncio.create_subprocess_exec(
            node, "--experimental-websocket", "--test", "--test-concurrency=1", "--test-reporter=tap",
            str(ROOT / "clients" / "js" / "test"),
            cwd=ROOT / "clients" / "js", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 120)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
            pytest.fail(f"node --test did not finish within 120 s:\n{output.decode()}")
        text = output.decode()
        print(text)
        assert process.returncode == 0, text
        assert "# fail 0" in text and "# skipped 0" in text, text
    finally:
        await endpoint.close()
        await gate.close()
