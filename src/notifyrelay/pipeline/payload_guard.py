"""Keep one undecodable notification from killing the LISTEN connection.

A payload that is not valid UTF-8 can only come from a ``SQL_ASCII`` database, which stores bytes unchecked.
Sending it to a UTF8 client, the server validates it and ends the session (FATAL ``invalid byte sequence``); so on
``SQL_ASCII`` databases the listener sets its client encoding to ``SQL_ASCII`` too and gets the bytes as they are.
But asyncpg decodes every NotificationResponse as UTF-8, strictly, inside its protocol parser, and offers no hook:
a bad payload would leave its protocol in an error state and the connection would be aborted, resyncing every
client. So, on ``SQL_ASCII`` databases only, the listener puts this thin filter between the socket transport and
asyncpg's protocol: it walks the PostgreSQL message framing (a type byte and a 4-byte length), lets every
message through untouched, and cuts out the NotificationResponse (``A``) messages whose channel or payload is not
valid UTF-8, reporting each to a callback that counts and logs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

_NOTIFICATION = ord("A")
_HEADER = 5  # type byte + int32 length (the length counts itself, not the type byte)

OnUndecodable = Callable[[str, int], None]  # channel (decoded with replacement), backend pid


def install(conn: Any, on_undecodable: OnUndecodable) -> bool:
    """Put the filter in front of ``conn``'s protocol. Call right after connecting, before any LISTEN, while the
    stream is between messages. Returns False (and does nothing) when the transport cannot swap protocols."""
    transport = getattr(conn, "_transport", None)
    if transport is None or not hasattr(transport, "set_protocol"):
        return False
    inner = transport.get_protocol()
    if isinstance(inner, PayloadGuard):
        return True
    transport.set_protocol(PayloadGuard(inner, on_undecodable))
    return True


class PayloadGuard(asyncio.Protocol):
    """Forwards bytes to asyncpg's protocol, minus the notifications it could not decode."""

    def __init__(self, inner: Any, on_undecodable: OnUndecodable) -> None:
        self._inner = inner
        self._on_undecodable = on_undecodable
        self._passing = 0  # bytes of a non-notification message still to forward as they come
        self._held = b""  # an incomplete header, or an incomplete notification (checked once whole)

    def data_received(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        size = len(data)
        position = self._passing  # the next message boundary
        if position >= size:
            self._passing = position - size
            self._inner.data_received(data)
            return
        start = 0  # the first byte not yet forwarded
        while position < size:
            if size - position < _HEADER:
                break
            kind = data[position]
            end = position + 1 + int.from_bytes(data[position + 1:position + _HEADER], "big")
            if kind == _NOTIFICATION:
                if end > size:
                    break  # hold it until it is whole
                if not self._decodable(data, position + _HEADER, end):
                    if position > start:
                        self._inner.data_received(data[start:position])
                    start = end
            position = end
        else:
            self._passing = position - size
            if start < size:
                self._inner.data_received(data[start:] if start else data)
            return
        # Stopped at an incomplete header or notification: forward what precedes it, keep the rest.
        self._passing = 0
        self._held = data[position:]
        if position > start:
            self._inner.data_received(data[start:position])

    def _decodable(self, data: bytes, body: int, end: int) -> bool:
        # Body: int32 pid, channel NUL, payload NUL.
        channel_end = data.find(b"\0", body + 4, end)
        try:
            data[body + 4:end - 1].decode("utf-8")
        except UnicodeDecodeError:
            channel = data[body + 4:channel_end if channel_end >= 0 else end].decode("utf-8", "replace")
            self._on_undecodable(channel, int.from_bytes(data[body:body + 4], "big"))
            return False
        return True

    # The rest of the protocol is asyncpg's.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - installed later
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
