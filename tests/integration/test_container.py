"""The container recipe, read by the official Dockerfile parser, and its HEALTHCHECK script run against a real relay."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from notifyrelay.pgembed import free_port
from tests.conftest import RelayFactory

dockerfile = pytest.importorskip("dockerfile", reason="the dockerfile parser is not installed (the test extra)")

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
HEALTHCHECK = ROOT / "deploy" / "container" / "healthcheck.py"


def stages() -> list[list[Any]]:
    """The Containerfile's instructions, split into build stages at each FROM."""
    result: list[list[Any]] = []
    for command in dockerfile.parse_file(str(CONTAINERFILE)):
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def test_containerfile_is_multi_stage_slim_and_non_root() -> None:
    """The final stage starts from a slim image, copies the venv from the build stage, installs no build tools,
    runs as a numeric non-root user, has a HEALTHCHECK and runs `notifyrelay run`."""
    build, final = stages()
    assert any(c.cmd == "RUN" and "pip install" in c.value[0] for c in build)
    commands = {c.cmd: c for c in final}
    assert not any(c.cmd == "RUN" and any(word in c.value[0] for word in ("pip", "apt-get", "gcc", "build-essential"))
                   for c in final)
    assert any(c.cmd == "COPY" and "--from=build" in c.flags for c in final)
    user = commands["USER"].value[0].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert commands["ENTRYPOINT"].json and list(commands["ENTRYPOINT"].value) == ["notifyrelay", "run"]
    assert "CMD" in commands["HEALTHCHECK"].value
    assert "slim" in CONTAINERFILE.read_text().split("ARG PYTHON_IMAGE=", 1)[1].split()[0]


def test_containerfile_copies_only_what_exists() -> None:
    """Every path the Containerfile copies from the build context exists in the repository."""
    for stage in stages():
        for command in stage:
            if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
                for source in command.value[:-1]:
                    assert (ROOT / source).exists(), source


async def run_healthcheck(**env: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HEALTHCHECK), env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 20)


async def test_healthcheck_passes_against_a_live_relay_and_fails_without_one(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    """The HEALTHCHECK script exits 0 against a running relay's probe address read from its config, 1 when none."""
    admin_port = free_port()
    relay = await make_relay(**{"admin.listen": f"127.0.0.1:{admin_port}"})
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{relay.server.port}"\n[admin]\nlisten = "0.0.0.0:{admin_port}"\n'
        '[[channels]]\nname = "activity_progress"\n'
    )
    assert await run_healthcheck(NOTIFYRELAY_CONFIG=str(config)) == 0
    websocket_port = relay.server.url.replace("ws://", "http://").replace("/ws", "/healthz")
    assert await run_healthcheck(NOTIFYRELAY_HEALTHCHECK_URL=websocket_port) == 1  # 404 there: [admin] is set
    assert await run_healthcheck(NOTIFYRELAY_HEALTHCHECK_URL=f"http://127.0.0.1:{free_port()}/healthz") == 1
