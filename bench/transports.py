"""Scenario: idle commit-to-client latency over websocket, SSE and NDJSON, side by side in one run.

One relay (a separate process), one channel, a few ``*`` followers on each transport; lone notifications, each
more than a window after the last (so the leading edge sends each at once), from one generator connection. A
notification counts as delivered to a follower by the first frame carrying its key with a payload ``n`` at least
its own (as in ``latency.py``). Target: SSE and NDJSON within 1.2x of the websocket, at p50 and at p99.

The followers are as alike as can be: websockets' sans-I/O client for /ws, h11 (HTTP/1.1, chunked) for /sse and
/stream, all in one client process by default (``--client-processes 3``: one per transport), connected in a
shuffled order (``--seed``). Each stamps its bytes when they are read and parses them in a later callback, so that
when one wake-up finds every socket readable, no transport is stamped late for parsing the others' frames.

Besides the ratios of percentiles, the JSON has a paired figure: for each notification, the median follower's
arrival on SSE (NDJSON) minus on the websocket, in which the generator's and the machine's noise cancel; and the
fan-out spread (first to last arrival of a notification over every follower), the scale of the order in which the
relay writes to its clients.
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


class _Follower(asyncio.Protocol):
    """One ``*`` follower. ``data_received`` only stamps the bytes and queues them; they are parsed in a later
    callback. So when one wake-up of the client finds every transport's socket readable, every socket is stamped
    before any is parsed, and a transport is not measured late for the parsing of the others."""

    def __init__(self, name: str, url: str, index: int, followers: _Followers) -> None:
        self.name = name
        self.url = url
        self.index = index
        self.followers = followers
        self.transport: Any = None
        self.opening = ["welcome", "ack"]
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._loop.call_soon(self.process, time.monotonic(), data)

    def process(self, arrival: float, data: bytes) -> None:
        raise NotImplementedError

    def frame(self, arrival: float, data: bytes) -> None:
        """One frame's JSON: the opening frames make the follower ready; notify frames are noted."""
        frame = self.followers.decode(data)
        kind = frame.get("type")
        if self.opening:
            if kind != self.opening.pop(0) and not self.ready.done():
                self.ready.set_exception(RuntimeError(f"{self.name}: unexpected {kind} frame while connecting"))
            if not self.opening and not self.ready.done():
                self.ready.set_result(None)
        elif kind == "notify":
            payloads = frame.get("payloads") or {}
            self.followers.per_conn[self.name][self.index].append(
                (arrival, {k: (v.get("n") if isinstance(v, dict) else v) for k, v in payloads.items()})
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.followers.closed[self.name] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: connection lost while connecting"))


class _WebSocketFollower(_Follower):
    """/ws with websockets' sans-I/O ``ClientProtocol`` (it answers the relay's pings)."""

    def __init__(self, name: str, url: str, index: int, followers: _Followers) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        super().__init__(name, url, index, followers)
        self.protocol = ClientProtocol(parse_uri(url), max_size=2**24)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def process(self, arrival: float, data: bytes) -> None:
        from websockets.frames import Frame, Opcode

        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.frame(arrival, bytes(event.data))
        if self.protocol.handshake_exc is not None and not self.ready.done():
            self.ready.set_exception(self.protocol.handshake_exc)
        self._flush()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data and self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)


class _StreamFollower(_Follower):
    """/sse or /stream read with h11 (HTTP/1.1, chunked)."""

    def __init__(self, name: str, url: str, index: int, followers: _Followers) -> None:
        import h11

        super().__init__(name, url, index, followers)
        self.h11 = h11.Connection(h11.CLIENT)
        self.buffer = b""
        self.separator = b"\n\n" if name == "sse" else b"\n"

    def connection_made(self, transport: Any) -> None:
        import h11

        self.transport = transport
        parts = urlsplit(self.url)
        request = h11.Request(method="GET", target=f"{parts.path}?{parts.query}", headers=[("Host", parts.netloc)])
        transport.write(self.h11.send(request))
        transport.write(self.h11.send(h11.EndOfMessage()))

    def process(self, arrival: float, data: bytes) -> None:
        import h11

        self.h11.receive_data(data)
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Response) and event.status_code != 200 and not self.ready.done():
                self.ready.set_exception(RuntimeError(f"{self.url}: HTTP {event.status_code}"))
            elif isinstance(event, h11.Data):
                self.buffer += bytes(event.data)
                while self.separator in self.buffer:
                    block, self.buffer = self.buffer.split(self.separator, 1)
                    if self.name == "sse":  # the data: line; the retry: line and keepalive comments have none
                        block = next((line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")), b"")
                    if block:
                        self.frame(arrival, block)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break


FOLLOWERS: dict[str, type[_Follower]] = {"websocket": _WebSocketFollower, "sse": _StreamFollower,
                                         "ndjson": _StreamFollower}


class _Followers:
    """The followers of one client process, on one or more transports, and what they received."""

    def __init__(self) -> None:
        import msgspec

        self.decode = msgspec.json.Decoder().decode
        self.connections: list[_Follower] = []
        self.per_conn: dict[str, dict[int, list[tuple[float, dict[str, Any]]]]] = defaultdict(
            lambda: defaultdict(list))
        self.closed: defaultdict[str, int] = defaultdict(int)

    async def connect(self, urls: dict[str, str], followers: int, timeout: float, seed: int) -> dict[str, Any]:
        """Open ``followers`` connections per transport in a shuffled order: the relay writes a batch to its
        followers in an order of its own (a set), and a transport whose followers all came first (or last) would
        be measured early (or late) by that much."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        order = [name for name in urls for _ in range(followers)]
        random.Random(seed).shuffle(order)
        counts: defaultdict[str, int] = defaultdict(int)
        for name in order:
            url = urls[name]
            follower = FOLLOWERS[name](name, url, counts[name], self)
            counts[name] += 1
            parts = urlsplit(url)
            await loop.create_connection(functools.partial(_same, follower), parts.hostname or "127.0.0.1",
                                         parts.port or 80)
            async with asyncio.timeout(timeout):
                await follower.ready
            self.connections.append(follower)
        return {"seconds": round(time.monotonic() - started, 3), "order": order}

    async def collect(self) -> dict[str, Any]:
        return {"per_conn": {name: dict(conns) for name, conns in self.per_conn.items()}, "closed": dict(self.closed)}

    async def close(self) -> None:
        for follower in self.connections:
            if follower.transport is not None:
                follower.transport.abort()


def _same(follower: _Follower) -> _Follower:
    """The protocol factory of an already built follower."""
    return follower


def followers_worker(conn: Any, lifetime_s: float) -> None:
    bl.raise_nofile()
    followers = _Followers()
    bl._serve(conn, lifetime_s, {"connect": followers.connect, "collect": followers.collect}, followers.close)


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
                **{name: f"http://127.0.0.1:{stack.port}{path}?{query}" for name, path in STREAM_PATHS.items()}}
        # One client process for every follower (default), or one per transport.
        groups = [urls] if args.client_processes == 1 else [{name: url} for name, url in urls.items()]
        workers = [bl.Worker(followers_worker, name=f"clients-{i}", lifetime_s=lifetime) for i in range(len(groups))]
        generators = bl.start_generators(1, stack.dsn, connections=1, lifetime_s=lifetime)
        with bl.workers_stopped([*workers, *generators]):
            orders = bl.call_all(workers, [("connect", group, followers, 30.0, args.seed) for group in groups], 60)
            result["connect_order"] = [name for answer in orders for name in answer["order"]]
            answer = generators[0].call(
                "lone", {"channel": CHANNEL, "count": count, "interval": 0.25, "jitter": 0.05, "json": True,
                         "prefix": "idle", "seed": 1},
                timeout=count * 0.3 + 60,
            )
            time.sleep(0.5)
            collected: dict[str, Any] = {name: {"per_conn": {}} for name in urls}
            for got in bl.call_all(workers, ("collect",), 60):
                for name, per_conn in got["per_conn"].items():
                    collected[name] = {"per_conn": per_conn}
                if any(got["closed"].values()):
                    result.setdefault("closed_early", {}).update(got["closed"])
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
