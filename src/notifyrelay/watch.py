"""``notifyrelay watch``: a small websocket client that subscribes and prints each frame readably."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI


def describe(frame: dict[str, Any]) -> str:
    """One readable line for a server frame."""
    kind = frame.get("type", "?")
    if kind == "notify":
        text = f"notify  {frame.get('channel')} seq={frame.get('seq')} keys={','.join(map(str, frame.get('keys', [])))}"
        if "payloads" in frame:
            text += " payloads=" + msgspec.json.encode(frame["payloads"]).decode()
        return text
    if kind == "welcome":
        return (f"welcome protocol={frame.get('protocol')} window_ms={frame.get('window_ms')} "
                f"channels={','.join(frame.get('channels', []))} listener={frame.get('listener')}")
    if kind == "status":
        return f"status  listener={frame.get('listener')}"
    if kind == "resync":
        return (f"resync  {frame.get('channel')} reason={frame.get('reason')} "
                f"gap={frame.get('gap_start')}..{frame.get('gap_end')} (refetch what you follow)")
    if kind == "ack":
        return f"ack     {frame.get('op')} {frame.get('channel')} keys={','.join(frame.get('keys', []))}"
    if kind == "error":
        return f"error   {frame.get('code')}: {frame.get('message')}"
    return f"{kind:<7} {msgspec.json.encode(frame).decode()}"


async def watch(url: str, *, channel: str | None, keys: list[str], token: str | None) -> int:
    """Connect, subscribe, print until the server closes or Ctrl-C. Returns the exit status."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        print(f"notifyrelay watch: expected a ws:// or wss:// URL, got {url!r}", file=sys.stderr)
        return 2
    if channel and not parts.query:
        query = urlencode([("channel", channel), *(("key", k) for k in keys)])
        url = urlunsplit(parts._replace(query=query))
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with connect(url, additional_headers=headers, max_size=2**24) as connection:
            async for message in connection:
                frame = msgspec.json.decode(message)
                print(f"{datetime.now().strftime('%H:%M:%S.%f')[:-3]} {describe(frame)}", flush=True)
                if frame.get("type") == "welcome" and not channel and frame.get("channels"):
                    # No channel named: follow the first one the relay offers.
                    await connection.send(msgspec.json.encode(
                        {"op": "subscribe", "channel": frame["channels"][0], "keys": keys or ["*"]}
                    ).decode())
            print(f"closed by the server: {connection.close_code} {connection.close_reason}", file=sys.stderr)
            return 0 if connection.close_code in (1000, 1001) else 1
    except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
        print(f"notifyrelay watch: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 0
