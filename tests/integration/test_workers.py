"""Several worker processes on one port (``[server] workers = 2``), as users run them: ``notifyrelay run`` becomes a
supervisor; and resume from one relay process to another on the same database (what replicas rely on)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from notifyrelay.config import load_config
from notifyrelay.ops.worker_reports import read_workers
from notifyrelay.ops.workers import Supervisor as WorkerSupervisor
from tests.conftest import Client, ClientFactory, Database, RelayFactory, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHANNEL = "activity_progress"


def write_config(path: Path, dsn: str, channels: list[str], workers: int = 2, admin: str = "") -> None:
    text = f'dsn = "{dsn}"\n[server]\nlisten = "127.0.0.1:0"\nworkers = {workers}\n'
    text += f'[admin]\nlisten = "{admin}"\n' if admin else ""
    text += "[listener]\nheartbeat_interval_s = 1\nheartbeat_timeout_s = 1\nreconnect_max_s = 0.5\n"
    text += "[shutdown]\ntimeout_s = 5\n"
    for name in channels:
        text += f'[[channels]]\nname = "{name}"\n'
    path.write_text(text)


class Supervisor:
    """``notifyrelay run`` with two workers, its stderr read as it comes (JSON log lines)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.clients: list[Client] = []
        self.url = ""
        self.port = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            with contextlib.suppress(msgspec.DecodeError):
                self.lines.append(msgspec.json.decode(raw))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def started(self) -> None:
        await wait_until(lambda: bool(self.events("supervisor.started")) or self.process.returncode is not None,
                         timeout=15)
        assert self.events("supervisor.started"), self.lines
        self.url = self.events("supervisor.started")[0]["url"]
        self.port = int(self.url.split(":")[2].split("/")[0])

    async def get(self, path: str, timeout: float = 2.0, port: int | None = None) -> tuple[int, bytes]:
        """One HTTP/1.1 GET on the shared port (the kernel picks the worker that answers)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port or self.port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                response = await reader.read()
            finally:
                writer.close()
        if not response:
            raise ConnectionResetError("closed without an answer")  # callers that retry treat it as no answer
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def readyz(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        status, body = await self.get("/readyz", timeout)
        return status, msgspec.json.decode(body)

    async def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Poll /readyz (retrying a worker that does not answer) until it is 200: every worker is ready."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(OSError, TimeoutError, ValueError):
                    status, report = await self.readyz()
                    if status == 200:
                        return report
                await asyncio.sleep(0.1)

    async def metrics(self) -> dict[str, list[Any]]:
        status, body = await self.get("/metrics")
        assert status == 200
        families: dict[str, list[Any]] = {}
        for family in text_string_to_metric_families(body.decode()):
            families[family.name] = list(family.samples)
        return families

    async def client(self, query: str = f"?channel={CHANNEL}") -> tuple[Client, dict[str, Any]]:
        client = Client(await connect(self.url + query, open_timeout=5))
        self.clients.append(client)
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        return client, welcome

    async def stop(self) -> None:
        for client in self.clients:  # closed before this test's event loop ends, not by the garbage collector later
            client.connection.transport.abort()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()


@pytest.fixture
async def start_supervisor(tmp_path: Path, database: Database) -> AsyncIterator[Any]:
    """Start ``notifyrelay run`` with workers = 2 on port 0 (``await start_supervisor(**env)``); killed at the end."""
    running: list[Supervisor] = []

    async def start(config: Path | None = None, **env: str) -> Supervisor:
        if config is None:
            config = tmp_path / "relay.toml"
            write_config(config, database.dsn, [CHANNEL])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "notifyrelay", "run", "--config", str(config), "--log-format", "json",
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        )
        supervisor = Supervisor(process)
        running.append(supervisor)
        await supervisor.started()
        return supervisor

    yield start
    for supervisor in running:
        pids = [line["worker_pid"] for line in supervisor.events("supervisor.worker_started")]
        await supervisor.stop()
        for pid in pids:  # a test that failed half-way leaves no worker behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def clients_on_every_worker(supervisor: Supervisor, count: int = 12) -> list[tuple[Client, dict[str, Any]]]:
    """Connect until both workers hold clients (the kernel spreads connections by a hash of their addresses)."""
    clients = [await supervisor.client() for _ in range(count)]
    while len({welcome["instance"] for _, welcome in clients}) < 2:
        clients.append(await supervisor.client())
        assert len(clients) < 64, "every connection landed on one worker"
    return clients


def by_worker(samples: list[Any]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for sample in samples:
        totals[sample.labels["worker"]] = totals.get(sample.labels["worker"], 0.0) + sample.value
    return totals


def first_reason(report: dict[str, Any]) -> str:
    """The first reason a /readyz report gives for not being ready, "" when it is ready."""
    reasons: list[str] = report.get("reasons") or [""]
    return reasons[0]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


async def test_two_workers_serve_one_port_and_one_scrape_covers_both(
    start_supervisor: Any, database: Database
) -> None:
    """Two workers share port 0's real port, both hold clients, each relays notifications from its own LISTEN,
    and one /metrics scrape and one /readyz answer cover both workers."""
    supervisor: Supervisor = await start_supervisor()
    report = await supervisor.wait_ready()
    assert [worker["worker"] for worker in report["workers"]] == [0, 1]
    assert all(worker["ready"] for worker in report["workers"]) and report["listener"] == "up"
    clients = await clients_on_every_worker(supervisor)
    await database.notify(CHANNEL, "42")
    for client, _ in clients:
        frame = await client.recv_type("notify")
        assert frame["keys"] == ["42"]

    async def scrape() -> dict[str, list[Any]]:
        async with asyncio.timeout(5):  # each worker's exposition is at most a second old
            while True:
                families = await supervisor.metrics()
                if sum(by_worker(families["notifyrelay_clients"]).values()) == len(clients):
                    return families
                await asyncio.sleep(0.2)

    families = await scrape()
    held = by_worker(families["notifyrelay_clients"])
    assert set(held) == {"0", "1"} and all(held.values()), held
    assert [sample.value for sample in families["notifyrelay_workers"]] == [2.0]
    assert set(by_worker(families["process_resident_memory_bytes"])) == {"0", "1"}  # per worker, not summed


async def test_a_killed_worker_is_restarted_and_its_clients_can_reconnect(start_supervisor: Any) -> None:
    """SIGKILL one worker: its clients are cut, /readyz is 503 until the supervisor has restarted it, and then
    reconnecting clients are served by both workers again."""
    supervisor: Supervisor = await start_supervisor()
    report = await supervisor.wait_ready()
    victim = report["workers"][1]["pid"]
    clients = await clients_on_every_worker(supervisor)
    os.kill(victim, signal.SIGKILL)

    async def statuses_until_replaced() -> list[int]:
        seen: list[int] = []
        async with asyncio.timeout(15):
            while True:
                with contextlib.suppress(OSError, TimeoutError):
                    status, report = await supervisor.readyz()
                    seen.append(status)
                    if status == 200 and report["workers"][1]["pid"] != victim:
                        return seen
                await asyncio.sleep(0.02)

    async def was_cut(client: Client) -> bool:
        try:
            await client.recv_type("never", timeout=1.0)  # skip the ack; a cut connection ends at once
        except ConnectionClosed:
            return True
        except TimeoutError:
            return False
        raise AssertionError("unreachable")

    replaced = asyncio.ensure_future(statuses_until_replaced())
    cut = await asyncio.gather(*(was_cut(client) for client, _ in clients))
    statuses = await replaced
    assert 0 < sum(cut) < len(clients)  # the victim's clients, and only those
    assert 503 in statuses  # not ready from the moment the supervisor reaped it until its successor was ready
    assert not alive(victim)
    again = await clients_on_every_worker(supervisor, count=8)
    assert len({welcome["instance"] for _, welcome in again}) == 2
    restarts = (await supervisor.metrics())["notifyrelay_worker_restarts"]
    assert [sample.value for sample in restarts if sample.name.endswith("_total")] == [1.0]


async def test_readyz_is_503_while_one_worker_is_not_turning(start_supervisor: Any) -> None:
    """A worker whose event loop stops (SIGSTOP) makes /readyz 503 on the other, naming it; back to 200 after."""
    supervisor: Supervisor = await start_supervisor()
    report = await supervisor.wait_ready()
    frozen = report["workers"][0]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        answers: list[tuple[int, dict[str, Any]]] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while not answers or not first_reason(answers[-1][1]).startswith("worker 0: silent for"):
                    with contextlib.suppress(OSError, TimeoutError):  # the stopped worker's share times out
                        answers.append(await supervisor.readyz(timeout=0.5))
                    await asyncio.sleep(0.1)
        exited = supervisor.events("supervisor.worker_exited")
        status, report = answers[-1] if answers else (0, {})
        assert status == 503 and first_reason(report).startswith("worker 0: silent for"), (answers, frozen, exited)
        assert report["workers"][1]["ready"] is True
    finally:
        os.kill(frozen, signal.SIGCONT)
    await supervisor.wait_ready()


async def test_sigterm_stops_the_whole_tree_with_1001_to_every_client(start_supervisor: Any) -> None:
    """SIGTERM to the supervisor: every client of every worker gets 1001, it exits 0, and no worker is left."""
    supervisor: Supervisor = await start_supervisor()
    report = await supervisor.wait_ready()
    pids = [worker["pid"] for worker in report["workers"]]
    clients = await clients_on_every_worker(supervisor)
    supervisor.process.send_signal(signal.SIGTERM)
    for client, _ in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv_type("never", timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert await asyncio.wait_for(supervisor.process.wait(), 15) == 0
    assert not [pid for pid in pids if alive(pid)]
    assert supervisor.events("supervisor.stopped")[0]["exit_status"] == 0


async def test_ready_is_told_to_systemd_once_every_worker_is_ready_and_by_the_supervisor_only(
    start_supervisor: Any, tmp_path: Path
) -> None:
    """READY=1 reaches NOTIFY_SOCKET only when every worker is ready, and only from the supervisor's pid."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.setblocking(False)
        supervisor: Supervisor = await start_supervisor(NOTIFY_SOCKET=path)
        messages: list[tuple[int, str]] = []
        deadline = time.monotonic() + 15
        while not any("READY=1" in text for _, text in messages):
            assert time.monotonic() < deadline, messages
            try:
                data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            pid = int.from_bytes(ancillary[0][2][:4], sys.byteorder)
            messages.append((pid, data.decode()))
        status, report = await supervisor.readyz()  # READY=1 came after every worker said ready
        assert status == 200 and all(worker["ready"] for worker in report["workers"])
        assert {pid for pid, _ in messages} == {supervisor.process.pid}


async def test_sighup_reaches_every_worker(start_supervisor: Any, tmp_path: Path, database: Database) -> None:
    """SIGHUP to the supervisor reloads every worker: a channel added to the file is offered by both."""
    config = tmp_path / "reload.toml"
    write_config(config, database.dsn, [CHANNEL])
    supervisor: Supervisor = await start_supervisor(config)
    await supervisor.wait_ready()
    write_config(config, database.dsn, [CHANNEL, "added"])
    supervisor.process.send_signal(signal.SIGHUP)
    await wait_until(lambda: len(supervisor.events("relay.reloaded")) == 2, timeout=10)
    clients = await clients_on_every_worker(supervisor)
    assert all("added" in welcome["channels"] for _, welcome in clients)


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(start_supervisor: Any) -> None:
    """SIGKILL to the supervisor (nothing forwarded): its workers notice, shut down and leave nothing running."""
    supervisor: Supervisor = await start_supervisor()
    report = await supervisor.wait_ready()
    pids = [worker["pid"] for worker in report["workers"]]
    supervisor.process.kill()
    await supervisor.process.wait()
    await wait_until(lambda: not any(alive(pid) for pid in pids), timeout=15)


async def test_a_client_resumes_on_another_relay_process(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """Two relay processes on one database (replicas): a client that saw a batch on A, missed one while away, and
    reconnects to B with since=ts gets the missed key replayed by B."""
    # overlap_ms 0: B has listened since before TS itself, which is what it must prove (the default overlap of
    # 1 s would reach back before B started, a history gap).
    first = await make_relay(**{"history.overlap_ms": 0})
    second = await make_relay(**{"history.overlap_ms": 0})
    client = await make_client(first, f"?channel={CHANNEL}&key=1&key=2")
    await database.notify(CHANNEL, "1")
    seen = await client.recv_type("notify")
    client.connection.transport.abort()  # the client drops (a lost network, a closed laptop)
    await database.notify(CHANNEL, "2")
    batches = "notifyrelay_batches_total"
    await wait_until(lambda: (second.metrics.registry.get_sample_value(batches, {"channel": CHANNEL}) or 0) >= 2)
    moved = await make_client(second, f"?channel={CHANNEL}&key=1&key=2&since={seen['ts']}")
    replay = await moved.recv_type("notify")
    assert replay.get("replay") is True
    assert "2" in replay["keys"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_workers_drop_in_verifies_and_keeps_the_unit_hardened(tmp_path: Path) -> None:
    """deploy/systemd/workers.conf on top of notifyrelay.service passes `systemd-analyze verify` and keeps the
    exposure rating at 2.0 or lower, with KillMode=mixed so that only the supervisor gets systemd's SIGTERM."""
    script = tmp_path / "notifyrelay"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    unit = tmp_path / "notifyrelay.service"
    drop_in = (ROOT / "deploy/systemd/workers.conf").read_text()
    assert "KillMode=mixed" in drop_in and "NOTIFYRELAY_SERVER__WORKERS=" in drop_in
    base = (ROOT / "deploy/systemd/notifyrelay.service").read_text().replace("/usr/local/bin/notifyrelay", str(script))
    unit.write_text(base + "\n" + drop_in)  # a drop-in is read as more lines of its unit
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and unit.name not in verify.stdout + verify.stderr, verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager",
                               str(unit)], capture_output=True, text=True, timeout=60)
    rating = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
    assert rating and float(rating.group(1)) <= 2.0, security.stdout + security.stderr


async def test_a_taken_port_stops_the_supervisor_with_status_1(tmp_path: Path, database: Database) -> None:
    """A port held by a server without SO_REUSEPORT cannot be shared: the supervisor says so and exits 1."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        config = tmp_path / "taken.toml"
        write_config(config, database.dsn, [CHANNEL])
        config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{taken.getsockname()[1]}"))
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "notifyrelay", "run", "--config", str(config), "--log-format",
                             "json"], capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
    assert result.returncode == 1, result.stderr
    assert "supervisor.cannot_start" in result.stderr and "Address already in use" in result.stderr


async def test_the_admin_port_is_shared_too(start_supervisor: Any, tmp_path: Path, database: Database) -> None:
    """With [admin] listen on port 0, the supervisor reserves one real admin port for every worker: the probes there
    answer for both workers, and the websocket port no longer serves them."""
    config = tmp_path / "admin.toml"
    write_config(config, database.dsn, [CHANNEL], admin="127.0.0.1:0")
    supervisor: Supervisor = await start_supervisor(config)
    admin = int(supervisor.events("supervisor.started")[0]["admin_listen"].rsplit(":", 1)[1])
    async with asyncio.timeout(15):
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                status, body = await supervisor.get("/readyz", port=admin)
                if status == 200:
                    break
            await asyncio.sleep(0.1)
    assert [worker["ready"] for worker in msgspec.json.decode(body)["workers"]] == [True, True]
    for _ in range(6):  # whichever worker answers
        assert (await supervisor.get("/readyz"))[0] == 404
        status, body = await supervisor.get("/metrics", port=admin)
        assert status == 200 and b'notifyrelay_listener_up{worker="1"}' in body


async def test_a_hung_worker_is_killed_and_restarted(tmp_path: Path, database: Database) -> None:
    """A worker whose event loop stops turning (SIGSTOP) for longer than the hang timeout is killed by the
    supervisor and restarted; the supervisor then stops cleanly."""
    path = tmp_path / "hang.toml"
    write_config(path, database.dsn, [CHANNEL])
    args = argparse.Namespace(config=str(path), dsn=None, listen=None, log_level=None, log_format="json")
    supervisor = WorkerSupervisor(load_config(path, environ={}), args, hang_timeout_s=4)
    running = asyncio.create_task(supervisor.run())
    try:
        await wait_until(lambda: supervisor.directory is not None and len(supervisor.processes) == 2
                         and all(state.ready for state in read_workers(supervisor.directory, 2)), timeout=15)
        victim = supervisor.processes[1].pid
        os.kill(victim, signal.SIGSTOP)
        await wait_until(lambda: 1 in supervisor.processes and supervisor.processes[1].pid != victim, timeout=20)
        assert not alive(victim)
    finally:
        supervisor.request_stop()
        assert await asyncio.wait_for(running, 30) == 0
