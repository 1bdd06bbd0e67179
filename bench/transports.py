"""Scenario: idle commit-to-client latency over websocket, SSE and NDJSON, side by side in one run.

One relay (a separate process), one channel, a few ``*`` followers on each transport, each transport's followers in
a client process of their own; lone notifications, each more than a window after the last (so the leading edge
sends each at once), from one generator connection. A notification counts as delivered to a follower by the first
frame carrying its key with a payload ``n`` at least its own (as in ``latency.py``). Target: SSE and NDJSON within
1.2x of the websocket, at p50 and at p99.

Every client stamps a frame when its bytes are read (``data_received``): websockets' sans-I/O client for /ws, and
h11 (HTTP/1.1, chunked) for /sse and /stream, so that no transport's client does more work than another's before
the stamp. By default every follower lives in one client process, connected in a shuffled order (``--seed``):
one wake-up reads the frame on every transport, so that on a small machine the scheduler's choice of which client
process runs first is not measured as a transport's latency (``--client-processes 3`` gives each transport its
own). Besides the ratios of percentiles, the JSON has a paired figure: for each notification, the median
follower's arrival on SSE (NDJSON) minus on the websocket, in which the generator's and the machine's noise cancel.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import time
from collections import defaultdict
from typing import Any
from urllib.parse import urlencode, urlsplit

import benchlib as bl
from latency import join

CHANNEL = "bench_transports"
STREAM_PATHS = {"sse": "/sse", "ndjson": "/stream"}


class _StreamClient(asyncio.Protocol):
    """One /sse or /stream response read with h11; each notify frame noted as (arrival, {key: n})."""

    def __init__(self, framing: str, target: str, host: str, index: int, clients: _StreamClients) -> None:
        import h11

        self.h11 = h11.Connection(h11.CLIENT)
        self.framing = framing
        self.target = target
        self.host = host
        self.index = index
        self.clients = clients
        self.buffer = b""
        self.separator = b"\n\n" if framing == "sse" else b"\n"
        self.transport: Any = None
        self.opening = ["welcome", "ack"]
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        import h11

        self.transport = transport
        transport.write(self.h11.send(h11.Request(method="GET", target=self.target, headers=[("Host", self.host)])))
        transport.write(self.h11.send(h11.EndOfMessage()))

    def data_received(self, data: bytes) -> None:
        import h11

        arrival = time.monotonic()
        self.h11.receive_data(data)
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Response) and event.status_code != 200 and not self.ready.done():
                self.ready.set_exception(RuntimeError(f"{self.target}: HTTP {event.status_code}"))
            elif isinstance(event, h11.Data):
                self.buffer += bytes(event.data)
                while self.separator in self.buffer:
                    block, self.buffer = self.buffer.split(self.separator, 1)
                    self._block(arrival, block)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.clients.closed[self.framing] += 1
                break

    def _block(self, arrival: float, block: bytes) -> None:
        if self.framing == "sse":
            data = next((line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")), None)
            if data is None:  # the retry: line, a keepalive comment
                return
        else:
            data = block
        frame = self.clients.decode(data)
        kind = frame.get("type")
        if self.opening:
            if kind != self.opening.pop(0) and not self.ready.done():
                self.ready.set_exception(RuntimeError(f"unexpected {kind} frame while connecting"))
            if not self.opening and not self.ready.done():
                self.ready.set_result(None)
        elif kind == "notify":
            payloads = frame.get("payloads") or {}
            self.clients.per_conn[self.index].append(
                (arrival, {k: (v.get("n") if isinstance(v, dict) else v) for k, v in payloads.items()})
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost while connecting"))


class _StreamClients:
    """The SSE or NDJSON followers of one client process."""

    def __init__(self, framing: str) -> None:
        import msgspec

        self.decode = msgspec.json.Decoder().decode
        self.framing = framing
        self.connections: list[_StreamClient] = []
        self.per_conn: dict[int, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        self.closed: defaultdict[str, int] = defaultdict(int)

    async def connect(self, urls: list[str], concurrency: int, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for url in urls:
            parts = urlsplit(url)
            index = len(self.connections)
            client = _StreamClient(self.framing, f"{parts.path}?{parts.query}", parts.netloc, index, self)
            await loop.create_connection(functools.partial(_same, client), parts.hostname or "127.0.0.1",
                                         parts.port or 80)
            async with asyncio.timeout(timeout):
                await client.ready
            self.connections.append(client)
        return {"ok": len(self.connections), "failed": 0, "errors": {}, "seconds": round(time.monotonic() - started, 3)}

    async def collect(self) -> dict[str, Any]:
        return {"per_conn": dict(self.per_conn), "closed": dict(self.closed)}

    async def close(self) -> None:
        for client in self.connections:
            if client.transport is not None:
                client.transport.abort()


def _same(client: _StreamClient) -> _StreamClient:
    """The protocol factory of an already built client."""
    return client


def stream_client_worker(conn: Any, lifetime_s: float, framing: str) -> None:
    bl.raise_nofile()
    clients = _StreamClients(framing)
    bl._serve(conn, lifetime_s, {"connect": clients.connect, "collect": clients.collect}, clients.close)


class _AllClients:
    """Followers on every transport in one process: websockets' sans-I/O client and the h11 stream clients."""

    def __init__(self) -> None:
        self.websocket = bl._Clients("payload", "sansio")
        self.streams = {name: _StreamClients(name) for name in STREAM_PATHS}

    async def connect(self, urls: dict[str, str], followers: int, timeout: float, seed: int) -> dict[str, Any]:
        """Open ``followers`` connections per transport, in a shuffled order: the relay writes a batch to its
        followers in an order of its own (a set), and a transport whose followers all came first (or last) would
        be measured early (or late) by that much."""
        started = time.monotonic()
        order = [name for name in urls for _ in range(followers)]
        random.Random(seed).shuffle(order)
        for name in order:
            if name == "websocket":
                answer = await self.websocket.connect([urls[name]], 1, timeout)
                if answer["failed"]:
                    raise RuntimeError(f"websocket: {answer['errors']}")
            else:
                await self.streams[name].connect([urls[name]], 1, timeout)
        return {"seconds": round(time.monotonic() - started, 3), "order": order}

    async def collect(self) -> dict[str, Any]:
        collected = {"websocket": await self.websocket.collect()}
        for name, clients in self.streams.items():
            collected[name] = await clients.collect()
        return collected

    async def close(self) -> None:
        await self.websocket.close()
        for clients in self.streams.values():
            await clients.close()


def all_clients_worker(conn: Any, lifetime_s: float) -> None:
    bl.raise_nofile()
    clients = _AllClients()
    bl._serve(conn, lifetime_s, {"connect": clients.connect, "collect": clients.collect}, clients.close)


def first_arrivals(per_conn: dict[int, list[tuple[float, dict[str, Any]]]]) -> dict[str, float]:
    """Per key (each lone notification has its own), the median over followers of when it first arrived."""
    by_key: dict[str, list[float]] = defaultdict(list)
    for frames in per_conn.values():
        seen: set[str] = set()
        for arrival, payloads in frames:
            for key in payloads:
                if key not in seen:
                    seen.add(key)
                    by_key[key].append(arrival)
    return {key: sorted(times)[len(times) // 2] for key, times in by_key.items()}


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return round(value / base, 2)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    window_ms = 200
    count = 60 if args.quick else args.samples
    followers = args.followers
    result["config"] = {"window_ms": window_ms, "notifications": count, "followers_per_transport": followers,
                        "interval_s": "0.25-0.30", "client_impl": "sans-I/O (websocket), h11 (SSE, NDJSON)",
                        "client_processes": args.client_processes}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    channel = {"name": CHANNEL, "key": "json:k", "include_payload": True}
    lifetime = count * 0.3 + 120
    with bl.Stack("transports", [channel], window_ms=window_ms, server={"keepalive_s": 600}) as stack:
        result["relay_pid"] = stack.relay.pid if stack.relay else None
        query = urlencode({"channel": CHANNEL})
        urls = {"websocket": stack.ws_url(CHANNEL),
                **{name: f"http://127.0.0.1:{stack.ports[0]}{path}?{query}" for name, path in STREAM_PATHS.items()}}
        workers: list[bl.Worker]
        if args.client_processes == 1:
            workers = [bl.Worker(all_clients_worker, name="clients", lifetime_s=lifetime)]
        else:
            workers = [
                bl.start_clients(1, "payload", lifetime_s=lifetime, name="ws-clients", impl="sansio")[0],
                *(bl.Worker(stream_client_worker, name, name=f"{name}-clients", lifetime_s=lifetime)
                  for name in STREAM_PATHS),
            ]
        generators = bl.start_generators(1, stack.dsn, connections=1, lifetime_s=lifetime)
        with bl.workers_stopped([*workers, *generators]):
            if len(workers) == 1:
                result["connect_order"] = workers[0].call("connect", urls, followers, 30.0, args.seed,
                                                          timeout=60)["order"]
            else:
                for worker, name in zip(workers, urls, strict=True):
                    worker.call("connect", [urls[name]] * followers, 16, 30.0, timeout=60)
            answer = generators[0].call(
                "lone", {"channel": CHANNEL, "count": count, "interval": 0.25, "jitter": 0.05, "json": True,
                         "prefix": "idle", "seed": 1},
                timeout=count * 0.3 + 60,
            )
            time.sleep(0.5)
            if len(workers) == 1:
                collected = workers[0].call("collect")
            else:
                collected = {name: worker.call("collect") for worker, name in zip(workers, urls, strict=True)}
        summaries: dict[str, dict[str, Any]] = {}
        every = {key: list(range(followers)) for key, *_ in answer["records"]}
        for name, got in collected.items():
            from_commit, _, missing = join(answer["records"], got["per_conn"], every)
            summaries[name] = {"commit_to_client_ms": bl.summary_ms(from_commit), "undelivered": missing}
            figures[f"{name}_p50_ms"] = bl.figure(summaries[name]["commit_to_client_ms"].get("p50"), "ms")
            figures[f"{name}_p99_ms"] = bl.figure(summaries[name]["commit_to_client_ms"].get("p99"), "ms")
            figures[f"{name}_undelivered"] = bl.figure(missing, "deliveries", 0)
        result["transports"] = summaries
        base = summaries["websocket"]["commit_to_client_ms"]
        for name in ("sse", "ndjson"):
            mine = summaries[name]["commit_to_client_ms"]
            for p in ("p50", "p99"):
                figures[f"{name}_over_websocket_{p}"] = bl.figure(
                    ratio(mine.get(p), base.get(p)), "x", 1.2, note=f"{name} {p} / websocket {p}")
        # Paired: the same notification's arrival on this transport minus on the websocket. The commit stamp (and
        # the generator's scheduling, which makes single latencies noisy on a loaded machine) cancels out.
        ws_arrivals = first_arrivals(collected["websocket"]["per_conn"])
        for name in ("sse", "ndjson"):
            mine = first_arrivals(collected[name]["per_conn"])
            deltas = [mine[key] - ws_arrivals[key] for key in mine.keys() & ws_arrivals.keys()]
            summaries[name]["minus_websocket_same_notification_ms"] = bl.summary_ms(deltas)
            figures[f"{name}_minus_websocket_p50_ms"] = bl.figure(
                bl.summary_ms(deltas).get("p50"), "ms", note="same notification, median follower, paired")
        # For scale: per notification, the first to the last arrival over every follower of every transport. The
        # relay writes the 3 x followers frames one after the other (in an order of its own), so a transport's
        # place in that order shows in the paired figures above as a difference of this size.
        firsts: dict[str, list[float]] = defaultdict(list)
        for got in collected.values():
            for frames in got["per_conn"].values():
                seen: set[str] = set()
                for arrival, payloads in frames:
                    for key in payloads.keys() - seen:
                        seen.add(key)
                        firsts[key].append(arrival)
        result["fanout_spread_ms"] = bl.summary_ms(max(times) - min(times) for times in firsts.values())
        result["relay_metrics"] = {
            key: value for key, value in stack.metrics().items()
            if key.startswith(("notifyrelay_messages_sent_total", "notifyrelay_clients{"))
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300, help="lone notifications (each one sample per follower)")
    parser.add_argument("--followers", type=int, default=5, help="* followers on each transport")
    parser.add_argument("--seed", type=int, default=1, help="shuffles the order the followers connect in")
    parser.add_argument("--client-processes", type=int, choices=(1, 3), default=1,
                        help="1: every follower in one process (default); 3: one process per transport")
    return bl.scenario_main("transports", 600, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
