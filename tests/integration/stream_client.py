"""A raw HTTP/1.1 client of the relay's ``/sse`` and ``/stream`` for the tests: h11 on an asyncio connection.

It sees what is on the wire, not what a library makes of it: the status, the headers, each SSE event (``event:``,
``id:``, ``data:``, comment lines, ``retry:``) or NDJSON line as it arrives, and whether the body ended with HTTP's
chunked terminator (h11's ``EndOfMessage``) or was cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import h11
import msgspec

from notifyrelay.app import Relay


class StreamEnded(Exception):
    """The response body ended (``clean``: with the chunked terminator) and nothing is left to read."""

    def __init__(self, clean: bool) -> None:
        super().__init__("the stream ended cleanly" if clean else "the connection was cut off")
        self.clean = clean


@dataclass(slots=True)
class Item:
    """One thing a stream said: a frame (``kind`` is its type), a keepalive, or SSE's ``retry:`` line."""

    kind: str
    frame: dict[str, Any] | None = None
    event_id: str | None = None  # SSE's id: line
    retry_ms: int | None = None  # SSE's retry: line


class StreamClient:
    """One request to the relay; for a 200 on /sse or /stream, the items of the stream as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: str) -> None:
        self.reader = reader
        self.writer = writer
        self.framing = framing  # "sse" or "ndjson"
        self.h11 = h11.Connection(h11.CLIENT)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.ended: bool | None = None  # None: still open; True: chunked terminator seen; False: cut off
        self._buffer = b""
        self._items: list[Item] = []

    @classmethod
    async def open(
        cls, relay: Relay | int, target: str, headers: dict[str, str] | None = None, method: str = "GET",
    ) -> StreamClient:
        """Send the request and read the response head (and the whole body when it is not a 200)."""
        port = relay if isinstance(relay, int) else relay.server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, "sse" if target.startswith("/sse") else "ndjson")
        request = h11.Request(method=method, target=target,
                              headers=[("Host", f"127.0.0.1:{port}"), *(headers or {}).items()])
        writer.write(client.h11.send(request) or b"")
        writer.write(client.h11.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(5):
            while True:
                event = await client._next_event()
                if isinstance(event, h11.Response):
                    client.status = event.status_code
                    client.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    break
                if isinstance(event, h11.InformationalResponse):
                    continue
                raise AssertionError(f"unexpected {event!r} before the response head")
            if client.status != 200:
                await client._read_body()
        return client

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(65536)
            self.h11.receive_data(data)

    async def _read_body(self) -> None:
        while self.ended is None:
            await self._pump()

    async def _pump(self) -> None:
        """Take the next h11 event into the buffer (or note the end)."""
        try:
            event = await self._next_event()
        except (h11.RemoteProtocolError, ConnectionError):
            self.ended = False
            return
        if isinstance(event, h11.Data):
            self._buffer += bytes(event.data)
            self._parse()
        elif isinstance(event, h11.EndOfMessage):
            self.ended = True
        elif isinstance(event, h11.ConnectionClosed):
            self.ended = False

    @property
    def body(self) -> bytes:
        return self._buffer

    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = msgspec.json.decode(self._buffer)
        return decoded

    def _parse(self) -> None:
        if self.status != 200:
            return
        separator = b"\n\n" if self.framing == "sse" else b"\n"
        while separator in self._buffer:
            block, self._buffer = self._buffer.split(separator, 1)
            self._items.append(self._item(block))

    def _item(self, block: bytes) -> Item:
        if self.framing == "ndjson":
            frame: dict[str, Any] = msgspec.json.decode(block)
            return Item(frame["type"], frame)
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                return Item("keepalive")
            name, _, value = line.partition(": ")
            assert name in ("event", "id", "data", "retry"), f"unexpected SSE line {line!r}"
            assert name not in fields, f"repeated SSE field in {block!r}"
            fields[name] = value
        if "retry" in fields:
            return Item("retry", retry_ms=int(fields["retry"]))
        data = msgspec.json.decode(fields["data"])
        assert data["type"] == fields["event"], "the event name is the frame's type"
        return Item(fields["event"], data, fields.get("id"))

    async def next(self, timeout: float = 5.0) -> Item:
        """The next item; raises StreamEnded when the body is over, TimeoutError when nothing comes in time."""
        async with asyncio.timeout(timeout):
            while not self._items:
                if self.ended is not None:
                    raise StreamEnded(self.ended)
                await self._pump()
        return self._items.pop(0)

    async def next_frame(self, kind: str, timeout: float = 5.0) -> Item:
        """Skip items until one of type ``kind``."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.next(timeout)
                if item.kind == kind:
                    return item

    async def items_for(self, seconds: float) -> list[Item]:
        """Every item that arrives within ``seconds`` (fewer when the stream ends)."""
        items: list[Item] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                items.append(await self.next(left))
            except (TimeoutError, StreamEnded):
                break
        return items

    async def opening(self, subscribes: int = 1) -> list[Item]:
        """Read the opening of a stream: (SSE's retry line), the welcome, and one ack per URL subscription."""
        items = []
        if self.framing == "sse":
            items.append(await self.next())
            assert items[-1].kind == "retry", items
        items.append(await self.next())
        assert items[-1].kind == "welcome", items
        for _ in range(subscribes):
            items.append(await self.next())
            assert items[-1].kind == "ack", items
        return items

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def path_of(framing: str) -> str:
    return "/sse" if framing == "sse" else "/stream"
