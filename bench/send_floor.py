"""The floor under fan-out on this machine: how long N loopback ``send()`` calls take, with no relay at all.

Receiver processes hold N TCP connections on 127.0.0.1 and sleep in epoll, as websocket clients do; this process
writes one 66-byte frame to every accepted socket (TCP_NODELAY, as asyncio sets it), from 1 thread and then from
several (``socket.send`` releases the GIL). What it prints is the least time any single-process relay written in
Python (or anything else issuing one send per client) needs to hand one batch to N clients here; compare it with
fanout.py's ``relay_receipt_to_last_write_p50_ms`` and ``batch_to_last_client_p50_ms``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import selectors
import signal
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import benchlib as bl

FRAME = b"\x81\x40" + b"x" * 64  # an unmasked 64-byte text frame, as the relay writes it


def receiver(port: int, count: int, ready: Any, done: Any, report: Any) -> None:
    """Hold ``count`` connections and read whatever arrives, until told or for 60 s at most; then send the time of
    every read back over ``report`` (and its CPU time), so the parent knows when the last receiver had each round's
    frame. It sleeps in ``epoll_wait``, as every bench client does.
    """
    bl.raise_nofile()
    selector = selectors.EpollSelector()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    ready.set()
    arrivals = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not done.is_set():
        for key, _ in selector.select(0.5):
            key.fileobj.recv(65536)  # type: ignore[union-attr]
            arrivals.append(time.monotonic())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.send((arrivals, usage.ru_utime + usage.ru_stime))
    os._exit(0)


def last_arrivals(starts: list[float], arrivals: list[float]) -> list[float]:
    """Per round, the last read before the next round started, less the round's start."""
    bounds = [*starts[1:], float("inf")]
    return [max((t for t in arrivals if start <= t < end), default=start) - start
            for start, end in zip(starts, bounds, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=10000)
    parser.add_argument("--receivers", type=int, default=4, help="receiver processes")
    parser.add_argument("--threads", default="1,2", help="sender thread counts to try")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    bl.raise_nofile()
    bl.arm_deadline(90)
    context = mp.get_context("fork")
    done = context.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    port = server.getsockname()[1]
    processes, accepted, reports = [], [], []
    starts: dict[int, list[float]] = {}  # thread count -> each round's start
    result: dict[str, Any] = {"scenario": "send_floor", "machine": bl.machine(), "sockets": args.sockets,
                              "receiver_processes": args.receivers, "frame_bytes": len(FRAME), "figures": {}}
    try:
        for _ in range(args.receivers):
            ready = context.Event()
            share = args.sockets // args.receivers
            report, child = context.Pipe(duplex=False)
            process = context.Process(target=receiver, args=(port, share, ready, done, child), daemon=True)
            process.start()
            processes.append((process, ready))
            reports.append(report)
        total = args.sockets // args.receivers * args.receivers
        while len(accepted) < total:
            sock, _ = server.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            accepted.append(sock)
        for _, ready in processes:
            ready.wait(30)

        sender_cpu: dict[int, list[float]] = {}  # thread count -> each round's CPU of the sending threads

        def send_all(share: list[socket.socket]) -> float:
            cpu = time.thread_time()
            for sock in share:
                sock.send(FRAME)
            return time.thread_time() - cpu

        for threads in (int(t) for t in args.threads.split(",")):
            shares = [accepted[i::threads] for i in range(threads)]
            timings = []
            with ThreadPoolExecutor(threads) as pool:
                for _ in range(args.rounds):
                    time.sleep(0.3)  # let every receiver go back to sleep
                    started = time.monotonic()
                    starts.setdefault(threads, []).append(started)
                    sender_cpu.setdefault(threads, []).append(sum(pool.map(send_all, shares)))
                    timings.append(time.monotonic() - started)
            result["figures"][f"sends_{threads}_thread_ms"] = bl.figure(
                round(statistics.median(timings) * 1000, 1), "ms",
                note=f"median of {args.rounds}: one frame to each of {total} sockets")
            result["figures"][f"sends_{threads}_thread_cpu_us_per_send"] = bl.figure(
                round(statistics.median(sender_cpu[threads]) / total * 1e6, 1), "us",
                note="the sending threads' own CPU (user + system) per send, median round")
        time.sleep(0.5)  # the last round read
        done.set()
        answers = [report.recv() for report in reports if report.poll(10)]
        arrivals = sorted(t for times, _ in answers for t in times)
        result["receivers_cpu_us_per_read"] = round(sum(cpu for _, cpu in answers) / max(1, len(arrivals)) * 1e6, 1)
        for threads, round_starts in starts.items():
            # Pair each round with the next one's start, across thread counts, so no round takes another's reads.
            every = sorted(t for s in starts.values() for t in s)
            lasts = [last for start, last in zip(every, last_arrivals(every, arrivals), strict=True)
                     if start in round_starts]
            result["figures"][f"sends_{threads}_thread_to_last_read_ms"] = bl.figure(
                round(statistics.median(lasts) * 1000, 1), "ms",
                note=f"median of {args.rounds}: first send to the last receiver's read of its frame")
    finally:
        with bl.shielded():
            done.set()
            for process, _ in processes:
                process.join(5)
                if process.is_alive():
                    os.kill(process.pid, signal.SIGKILL)
            for sock in accepted:
                sock.close()
            server.close()
    result["pass"] = None  # a reference, not a target
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (bl.RESULTS_DIR / "send_floor.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
