"""`notifyrelay watch` as users run it (a subprocess): exit codes, pipe lines, NDJSON, bars on a terminal, restarts."""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import sys
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from tests.conftest import Database, RelayFactory
from tests.integration.test_client import Jobs, port_released

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_COLOR": "1"}


class Watch:
    """A running ``notifyrelay watch`` with its output read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Watch:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "notifyrelay", "watch", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV,
        )
        return cls(process)

    async def line_with(self, *words: str, timeout: float = 10) -> str:
        """The next stdout line holding every one of ``words``."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.process.stdout.readline()).decode()
                assert line, f"watch ended (status {await self.process.wait()}); it said: {await self.stderr()}"
                self.lines.append(line)
                if all(word in line for word in words):
                    return line

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()

    async def exit_status(self, timeout: float = 10) -> int:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            self.lines += (await self.process.stdout.read()).decode().splitlines(keepends=True)
            return await self.process.wait()

    def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


Watches = Callable[..., Awaitable[Watch]]


@pytest.fixture
async def watches() -> AsyncIterator[Watches]:
    started: list[Watch] = []

    async def start(*args: str) -> Watch:
        watch = await Watch.start(*args)
        started.append(watch)
        return watch

    yield start
    for watch in started:
        watch.stop()
        await watch.process.wait()


@pytest.fixture
async def jobs(database: Database) -> Jobs:
    return await Jobs(database.dsn).create()


async def test_until_done_exits_0_when_every_key_completes(
    make_relay: RelayFactory, watches: Watches, jobs: Jobs
) -> None:
    """--until-done follows two keys through their progress and exits 0 once both are complete."""
    await jobs.set(1, "running", 1, 3)
    await jobs.set(2, "queued", 0, 3)
    relay = await make_relay(channels=[jobs.channel()])
    watch = await watches(relay.server.url, "--channel", jobs.name, "--key", "1", "--key", "2", "--until-done")
    await watch.line_with(f"{jobs.name} 1 running 1/3")
    await watch.line_with(f"{jobs.name} 2 queued 0/3")
    await jobs.set(1, "complete", 3, 3)
    await watch.line_with(f"{jobs.name} 1 complete 3/3")
    assert watch.process.returncode is None  # key 2 is still going
    await jobs.set(2, "complete", 3, 3, "all copied")
    assert await watch.exit_status() == 0
    assert any('2 complete 3/3 100.0%' in line and '"all copied"' in line for line in watch.lines), watch.lines


async def test_until_done_exits_1_when_a_key_fails(make_relay: RelayFactory, watches: Watches, jobs: Jobs) -> None:
    """--until-done exits 1, naming the key, when one followed key ends in a failed status."""
    await jobs.set(1, "complete", 3, 3)
    await jobs.set(2, "running", 1, 3)
    relay = await make_relay(channels=[jobs.channel()])
    watch = await watches(relay.server.url, "--channel", jobs.name, "--key", "1", "--key", "2", "--until-done")
    await watch.line_with(f"{jobs.name} 2 running")
    await jobs.set(2, "failed", 2, 3, "disk full")
    assert await watch.exit_status() == 1
    assert f"failed or missing on {jobs.name}: 2" in await watch.stderr()


async def test_pipe_prints_one_plain_line_per_change(make_relay: RelayFactory, watches: Watches, jobs: Jobs) -> None:
    """Through a pipe, each change of a followed key is one line with status, done/total, percent and message."""
    await jobs.set(5, "running", 10, 100, "starting")
    relay = await make_relay(channels=[jobs.channel()], **{"coalesce.window_ms": 0})
    watch = await watches(relay.server.url, "--channel", jobs.name, "--key", "5")
    await watch.line_with("connected:", "listener=up")
    await watch.line_with(f"{jobs.name} 5 running 10/100 10.0%", '"starting"')
    for done in (20, 30, 40):
        await jobs.set(5, "running", done, 100, f"at {done}")
        line = await watch.line_with(f"{jobs.name} 5 ")
        assert f"running {done}/100 {done}.0%" in line and f'"at {done}"' in line
        assert "\x1b" not in line  # no terminal codes in a pipe


async def test_json_prints_the_relays_frames_as_ndjson(make_relay: RelayFactory, watches: Watches, jobs: Jobs) -> None:
    """--json prints every relay frame as one JSON object per line: welcome, ack, snapshot, then notify."""
    await jobs.set(1, "running", 1, 3)
    relay = await make_relay(channels=[jobs.channel()])
    watch = await watches(relay.server.url, "--channel", jobs.name, "--key", "1", "--json")
    await watch.line_with('"type":"snapshot"')
    await jobs.set(1, "running", 2, 3)
    await watch.line_with('"type":"notify"')
    frames = [msgspec.json.decode(line) for line in watch.lines]
    assert [frame["type"] for frame in frames][:2] == ["welcome", "ack"]
    assert frames[-1]["rows"]["1"]["done"] == 2 and frames[-1]["progress"]["1"]["done"] == 2


async def test_unknown_channel_exits_2_with_the_relays_sentence(make_relay: RelayFactory, watches: Watches) -> None:
    """A channel the relay does not relay ends watch at once with status 2 and the relay's own sentence."""
    relay = await make_relay()
    watch = await watches(relay.server.url, "--channel", "no_such_channel")
    assert await watch.exit_status() == 2
    said = await watch.stderr()
    assert said.startswith("notifyrelay watch: ") and "no_such_channel" in said


async def test_a_url_without_ws_gets_the_right_one_as_a_hint(make_relay: RelayFactory, watches: Watches) -> None:
    """An http:// URL of the relay exits 2 suggesting its ws://HOST:PORT/ws URL without connecting; another path
    is tried, and its 404 exits 2 with the same suggestion."""
    watch = await watches("http://127.0.0.1:9/")
    assert await watch.exit_status() == 2
    assert "try: ws://127.0.0.1:9/ws" in await watch.stderr()
    relay = await make_relay()
    elsewhere = relay.server.url.removesuffix("/ws") + "/live"
    watch = await watches(elsewhere)
    assert await watch.exit_status() == 2
    said = await watch.stderr()
    assert "HTTP 404" in said and f"(the relay's websocket is at {elsewhere}/ws)" in said


async def test_until_done_survives_a_relay_restart(make_relay: RelayFactory, watches: Watches, jobs: Jobs) -> None:
    """watch reconnects to the relay that replaces a stopped one on the same port, resumes, and sees the key
    complete that completed while no relay ran."""
    await jobs.set(1, "running", 1, 3)
    first = await make_relay(channels=[jobs.channel()])
    port = first.server.port
    watch = await watches(first.server.url, "--channel", jobs.name, "--key", "1", "--until-done")
    await watch.line_with(f"{jobs.name} 1 running 1/3")
    first.request_stop()
    await jobs.set(1, "complete", 3, 3)
    await port_released(port)
    await make_relay(channels=[jobs.channel()], **{"server.listen": f"127.0.0.1:{port}"})
    assert await watch.exit_status(timeout=20) == 0
    assert any("reconnected:" in line for line in watch.lines), watch.lines
    assert "reconnecting in" in await watch.stderr()


async def test_bars_on_a_terminal(make_relay: RelayFactory, jobs: Jobs) -> None:
    """Under a pseudo-terminal, watch draws a progress bar per key with done/total, percent and a stalled marker
    off, and an indeterminate bar where the total is unknown."""
    await jobs.set(1, "running", 50, 100, "halfway")
    await jobs.set(2, "running", 7, None, "counting")
    relay = await make_relay(channels=[jobs.channel()])
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {key: value for key, value in ENV.items() if key != "NO_COLOR"} | {"TERM": "xterm-256color"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "notifyrelay", "watch", relay.server.url, "--channel", jobs.name,
        stdin=follower, stdout=follower, stderr=follower, env=env,
    )
    os.close(follower)
    seen = ""
    try:
        async with asyncio.timeout(15):
            while not ("50/100" in seen and "50.0%" in seen and "7/?" in seen and "━" in seen and "halfway" in seen):
                chunk = await asyncio.to_thread(os.read, leader, 65536)
                assert chunk, seen
                seen += chunk.decode(errors="replace")
        assert "\x1b[" in seen  # drawn with terminal control sequences, not plain lines
        assert "connected (relay" in seen and "listener up" in seen
    finally:
        drained = asyncio.create_task(asyncio.to_thread(drain, leader))  # a full pty would block its writes
        process.terminate()
        try:
            status = await asyncio.wait_for(process.wait(), 10)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await drained  # the pty reads EIO once the process has gone
            os.close(leader)
    assert status == 0  # SIGTERM ends watch cleanly, like Ctrl-C


def drain(fd: int) -> None:
    """Read a pty until its other side is closed."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


async def test_until_done_on_a_channel_without_progress_exits_2(
    make_relay: RelayFactory, watches: Watches, database: Database
) -> None:
    """--until-done on a hint channel (no rows, no progress) exits 2 saying what the channel lacks."""
    relay = await make_relay()
    watch = await watches(relay.server.url, "--channel", "activity_progress", "--until-done")
    await watch.line_with("following activity_progress")
    await database.notify("activity_progress", "42")
    assert await watch.exit_status() == 2
    assert "[channels.progress]" in await watch.stderr()


def test_a_line_says_status_counts_percent_rate_eta_stall_and_message() -> None:
    """describe_key puts every progress figure a person needs on one line, with unknowns shown as such."""
    from notifyrelay.client import KeyState, Progress
    from notifyrelay.watch import describe_key

    running = KeyState(row={"message": "copying"}, progress=Progress(
        done=120, total=500, percent=24.0, rate_per_s=35.2, eta_s=130.4, status="running", stalled=True))
    assert describe_key(running) == 'running 120/500 24.0% 35.2/s eta 2m10s STALLED "copying"'
    unknown = KeyState(row={}, progress=Progress(done=7, status="running"))
    assert describe_key(unknown) == "running 7/? - eta -"
    assert describe_key(KeyState(), payload={"state": "stable"}) == 'changed payload={"state":"stable"}'


async def test_forbidden_key_exits_2_with_the_relays_sentence(
    make_relay: RelayFactory, watches: Watches, tmp_path: Path
) -> None:
    """In auth mode jwt, a key outside the token's claim ends watch with status 2 and the relay's sentence."""
    import time

    import jwt

    secret = "watch-test secret, at least thirty-two bytes long"
    (tmp_path / "secret").write_text(secret)
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": str(tmp_path / "secret")})
    token = jwt.encode({"sub": "w", "exp": int(time.time()) + 600, "channels": {"activity_progress": ["42"]}},
                       secret, "HS256")
    watch = await watches(relay.server.url, "--channel", "activity_progress", "--key", "43", "--token", token)
    assert await watch.exit_status() == 2
    said = await watch.stderr()
    assert said.startswith("notifyrelay watch: ") and "activity_progress" in said


async def test_until_done_with_every_key_waits_for_all_of_them(
    make_relay: RelayFactory, watches: Watches, jobs: Jobs
) -> None:
    """Without --key, --until-done follows every key the relay lists and exits 0 once all of them are complete."""
    await jobs.set(1, "running", 1, 2)
    await jobs.set(2, "running", 1, 2)
    relay = await make_relay(channels=[jobs.channel()])
    watch = await watches(relay.server.url, "--channel", jobs.name, "--until-done")
    await watch.line_with(f"{jobs.name} 2 running 1/2")
    await jobs.set(1, "complete", 2, 2)
    await watch.line_with(f"{jobs.name} 1 complete")
    assert watch.process.returncode is None
    await jobs.set(2, "complete", 2, 2)
    assert await watch.exit_status() == 0
