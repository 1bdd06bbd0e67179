"""PostgreSQL's cost per listener: what each relay replica (or worker) LISTENing on a channel costs the database.

Every replica of the relay holds one LISTEN connection, so N replicas are N listening backends; PostgreSQL wakes each
of them at every commit that NOTIFYs, and each reads the shared notification queue and writes every notification to
its client. This scenario measures that cost with bare listening connections (no relay), side by side, in one run,
for 0 (the reference), 1, 8, 32 and 64 listeners on the notified channel, and 64 listening on another channel of the
same database (``64@other``: what every other application's NOTIFY traffic costs the relay's listeners, and the
reverse):

- round trip: a separate connection commits ``SELECT pg_notify(...)`` (one transaction each, 5 ms apart); the time
  from sending it to its arrival at the first listener and at the last one (all N), and the commit's own duration;
- commit throughput: ``pgbench`` (C, from the same PostgreSQL install) runs 4 clients of one-statement transactions
  ``SELECT pg_notify(...)`` for a few seconds; transactions per second, their average latency, PostgreSQL's CPU per
  commit (every server process, from psutil), the listening backends' CPU per notification delivered, and how long
  the listeners took to receive everything after pgbench stopped.

The listeners are a few lines of the PostgreSQL wire protocol in one separate process, reading with epoll and only
counting bytes while pgbench runs (every notification has the same size), so that the client side of 64 listeners
does not starve the database of CPU the way 64 Python drivers parsing each message would. The embedded PostgreSQL
runs with fsync and synchronous_commit off: commits are cheap, which makes the listeners' share look as large as it
can. Payloads are 5 bytes (keys, as the relay's triggers send).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import selectors
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl

CHANNEL = "bench_listeners"
OTHER_CHANNEL = "bench_elsewhere"  # listened on by the "N@other" columns, never notified
PAYLOAD_BYTES = 5  # "L0001" (round trip) and "T0000" (throughput): one size, so bytes count messages
# NotificationResponse: 'A', int32 length, int32 sender pid, channel\0, payload\0.
MESSAGE_BYTES = 1 + 4 + 4 + len(CHANNEL) + 1 + PAYLOAD_BYTES + 1
PAYLOAD_OFFSET = 1 + 4 + 4 + len(CHANNEL) + 1


# ----------------------------------------------------------------------------------------------------------------
# The listeners: bare protocol-3 connections that LISTEN and count.


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _read_until_ready(sock: socket.socket) -> tuple[int, bytes]:
    """Read messages until ReadyForQuery; the backend pid (BackendKeyData) if seen, and any leftover bytes."""
    buffer, pid = b"", 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("PostgreSQL closed the connection during setup")
        buffer += chunk
        while len(buffer) >= 5:
            kind, length = buffer[:1], struct.unpack("!i", buffer[1:5])[0]
            if len(buffer) < 1 + length:
                break
            body, buffer = buffer[5:1 + length], buffer[1 + length:]
            if kind == b"E":
                raise ConnectionError(f"PostgreSQL error: {body!r}")
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise ConnectionError("this bench needs trust authentication (the embedded PostgreSQL has it)")
            if kind == b"K":
                pid = struct.unpack("!i", body[:4])[0]
            if kind == b"Z":
                return pid, buffer


def open_listener(port: int, channel: str) -> tuple[socket.socket, int]:
    """A connection that has run LISTEN on ``channel``; the socket and its backend's pid."""
    sock = socket.create_connection(("127.0.0.1", port))
    params = b"user\0postgres\0database\0postgres\0application_name\0bench_listener\0\0"
    body = struct.pack("!i", 196608) + params
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    pid, _ = _read_until_ready(sock)
    sock.sendall(_message(b"Q", f"LISTEN {channel}\0".encode()))
    _read_until_ready(sock)
    return sock, pid


def listener_process(port: int, count: int, channel: str, conn: Any) -> None:
    """Hold ``count`` listening connections; answer the orchestrator's commands over ``conn``.

    Commands: ``("parse",)`` record each message's arrival per payload (round trip phase), ``("count",)`` only count
    bytes from now (throughput phase), ``("stats",)`` what was seen, ``("stop",)``."""
    sockets = [open_listener(port, channel) for _ in range(count)]
    conn.send(("ready", [pid for _, pid in sockets]))
    selector = selectors.EpollSelector()
    for sock, _ in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, [b""])  # data: the carry of a partial message
    selector.register(conn.fileno(), selectors.EVENT_READ, None)
    parse, received_bytes = True, 0
    arrivals: dict[str, list[float]] = {}  # payload -> [first, last, count]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            if key.data is None:
                command = conn.recv()
                if command[0] == "stop":
                    return
                if command[0] == "parse":
                    parse = True
                elif command[0] == "count":
                    parse, received_bytes = False, 0
                elif command[0] == "stats":
                    conn.send(("stats", received_bytes // MESSAGE_BYTES, arrivals))
                    arrivals = {}
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("a listening connection was closed")
            received_bytes += len(data)
            if parse:
                now = time.monotonic()
                carry = key.data[0] + data
                whole = len(carry) - len(carry) % MESSAGE_BYTES
                for start in range(0, whole, MESSAGE_BYTES):
                    payload = carry[start + PAYLOAD_OFFSET:start + PAYLOAD_OFFSET + PAYLOAD_BYTES].decode()
                    seen = arrivals.setdefault(payload, [now, now, 0])
                    seen[1] = now
                    seen[2] += 1
                key.data[0] = carry[whole:]


# ----------------------------------------------------------------------------------------------------------------
# The phases.


async def round_trips(dsn: str, samples: int) -> dict[str, tuple[float, float]]:
    """Send ``samples`` notifications, one transaction each, 5 ms apart: payload -> (sent, committed)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    sent: dict[str, tuple[float, float]] = {}
    try:
        for index in range(samples):
            payload = f"L{index:04d}"
            started = time.monotonic()
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', '{payload}')")
            sent[payload] = (started, time.monotonic())
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return sent


def postgres_cpu(pgdata: Path) -> tuple[float, dict[int, float]]:
    """CPU seconds (user + system) so far of the PostgreSQL server: in all, and by live process. The total counts
    backends that have exited too (pgbench's), through the postmaster's reaped children's times."""
    import psutil

    postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
    reaped = postmaster.cpu_times()
    times: dict[int, float] = {}
    for process in [postmaster, *postmaster.children()]:
        try:
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
        except psutil.NoSuchProcess:
            continue
    return sum(times.values()) + reaped.children_user + reaped.children_system, times


def run_pgbench(bin_dir: Path, port: int, clients: int, seconds: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(f"SELECT pg_notify('{CHANNEL}', 'T0000');\n")
    command = [str(bin_dir / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
               "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-f", script.name, "postgres"]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        Path(script.name).unlink(missing_ok=True)

    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if match is None:
            raise RuntimeError(f"pgbench output without {pattern!r}:\n{output}")
        return float(match.group(1))

    return {"transactions": number(r"actually processed: (\d+)"), "tps": number(r"tps = ([\d.]+)"),
            "latency_avg_ms": number(r"latency average = ([\d.]+) ms")}


def measure(spec: str, server: Any, bin_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One column of the table: round trips and commit throughput with ``spec`` listening connections ("8": on the
    notified channel; "8@other": on another one)."""
    import psutil

    count, _, where = spec.partition("@")
    listeners = int(count)
    elsewhere = bool(where)

    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=listener_process, daemon=True,
                              args=(server.port, listeners, OTHER_CHANNEL if elsewhere else CHANNEL, theirs))
    process.start()
    try:
        if not ours.poll(60):
            raise RuntimeError("the listener process did not start")
        _, pids = ours.recv()
        column: dict[str, Any] = {"listeners": spec}
        receiving = 0 if elsewhere else listeners
        # Round trips (with no listener, only the commit is measured).
        sent = asyncio.run(round_trips(server.dsn, args.samples))
        wait_until = time.monotonic() + (10 if receiving else 0)
        arrivals: dict[str, list[float]] = {}
        while True:
            ours.send(("stats",))
            _, _, batch = ours.recv()
            for payload, seen in batch.items():
                known = arrivals.setdefault(payload, [seen[0], seen[1], 0])
                known[0], known[1] = min(known[0], seen[0]), max(known[1], seen[1])
                known[2] += seen[2]
            complete = all(arrivals.get(p, [0, 0, 0])[2] >= receiving for p in sent)
            if complete or time.monotonic() > wait_until:
                break
            time.sleep(0.05)
        column["commit_ms"] = bl.summary_ms(done - start for start, done in sent.values())
        if receiving:
            column["to_first_listener_ms"] = bl.summary_ms(arrivals[p][0] - s for p, (s, _) in sent.items()
                                                           if p in arrivals)
            column["to_last_listener_ms"] = bl.summary_ms(arrivals[p][1] - s for p, (s, _) in sent.items()
                                                          if arrivals.get(p, [0, 0, 0])[2] >= listeners)
        # Commit throughput.
        ours.send(("count",))
        client = psutil.Process(process.pid)
        client_before = sum(client.cpu_times()[:2])
        cpu_before = postgres_cpu(server.pgdata)
        bench = run_pgbench(bin_dir, server.port, args.clients, args.seconds)
        stopped = time.monotonic()
        expected = int(bench["transactions"]) * receiving
        received = 0
        while receiving:
            ours.send(("stats",))
            _, received, _ = ours.recv()
            if received >= expected or time.monotonic() - stopped > 60:
                break
            time.sleep(0.02)
        drained_s = time.monotonic() - stopped
        # pgbench's backends exit after it does: let the postmaster reap them (their CPU then counts in its
        # children's times; a zombie's would be lost), and the listeners' CPU includes what they drained.
        time.sleep(0.3)
        cpu_after = postgres_cpu(server.pgdata)
        client_cpu = sum(client.cpu_times()[:2]) - client_before
        listener_cpu = sum(cpu_after[1].get(pid, 0.0) - cpu_before[1].get(pid, 0.0) for pid in pids)
        pg_cpu = cpu_after[0] - cpu_before[0]
        commits = bench["transactions"]
        column.update({
            "pgbench_tps": round(bench["tps"]),
            "pgbench_latency_avg_ms": bench["latency_avg_ms"],
            "postgres_cpu_s": round(pg_cpu, 2),
            "postgres_cpu_us_per_commit": round(pg_cpu / commits * 1e6, 1),
            "listener_backends_cpu_s": round(listener_cpu, 2),
            "listener_backend_cpu_us_per_delivery": round(listener_cpu / expected * 1e6, 2) if expected else None,
            # Per notification committed, what each listening backend spent (also when it delivers nothing).
            "listener_backend_cpu_us_per_commit_each": (
                round(listener_cpu / commits / listeners * 1e6, 2) if listeners else None),
            "deliveries_per_s": round(expected / args.seconds) if receiving else 0,
            "delivered": received if receiving else None,
            "expected": expected,
            "drained_after_pgbench_s": round(drained_s, 2) if receiving else None,
            "listener_client_cpu_s": round(client_cpu, 2),
        })
        return column
    finally:
        if process.is_alive():
            ours.send(("stop",))
            process.join(5)
        if process.is_alive():
            process.kill()


def body(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from notifyrelay.pgembed import EmbeddedPostgres, _bin_dir

    counts = args.listeners.split(",")
    if args.quick:
        args.seconds, args.samples = min(args.seconds, 2), min(args.samples, 50)
    result["settings"] = {"listeners": counts, "pgbench_clients": args.clients, "pgbench_seconds": args.seconds,
                          "round_trip_samples": args.samples, "payload_bytes": PAYLOAD_BYTES,
                          "postgres": "embedded, fsync=off, synchronous_commit=off"}
    most = max(int(spec.partition("@")[0]) for spec in counts)
    with EmbeddedPostgres(max_connections=most + args.clients + 20) as server:
        columns = [measure(n, server, _bin_dir(), args) for n in counts]
    result["columns"] = columns
    base = columns[0]["pgbench_tps"]
    result["figures"] = {
        f"tps_with_{c['listeners']}_listeners": bl.figure(
            c["pgbench_tps"], "commits/s", note=f"{c['pgbench_tps'] / base:.2f}x of {columns[0]['listeners']}")
        for c in columns
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listeners", default="0,1,8,32,64,64@other",
                        help="listening connections per column; N@other: listening on a channel nobody notifies")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients")
    parser.add_argument("--seconds", type=int, default=5, help="pgbench duration per column")
    parser.add_argument("--samples", type=int, default=200, help="round trips per column")
    return bl.scenario_main("pg_listeners", 600, body, parser)


if __name__ == "__main__":
    raise SystemExit(main())
