"""One port, every endpoint: an asyncio protocol of the relay's own that speaks HTTP/1.1 with h11.

    /healthz /readyz /metrics   probes (or only on [admin] listen)
    /ws                         upgrade: handed to websockets' Sans-I/O protocol (transports/websocket.py)
    /sse /stream                streaming responses (transports/stream.py)
    /client.js /ui              static files from the package (notifyrelay/static)

h11 is sans-I/O HTTP/1.1: it parses requests and frames responses, and the relay keeps the socket, so a stream can
be written chunk by chunk with the transport's own backpressure, and an upgrade can be handed over without
internals. Every connection, whatever it becomes, must finish its request within ``handshake_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from functools import cache
from http import HTTPStatus
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import h11
import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from ..auth import Authenticator
from ..config import Config, is_loopback, parse_listen
from ..delivery.hub import Hub
from ..delivery.session import Grants, Session
from ..exceptions import ConfigError, ProtocolError, SubscriptionError
from ..ops.health import Readiness
from ..ops.metrics import Metrics
from .capacity import AcceptErrors, Handshakes, check_file_descriptors
from .gate import Gate, Refusal, StreamRequest, headers_of, parse_query
from .stream import StreamTransport
from .websocket import WebSocketTransport, handshake

log = structlog.get_logger("notifyrelay.server")
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")
STREAM_PATHS = {"/sse": ("sse", "text/event-stream; charset=utf-8"),
                "/stream": ("ndjson", "application/x-ndjson")}
UI_FILE = re.compile(r"[A-Za-z0-9._-]+")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".ts": "text/plain; charset=utf-8"}
MAX_REQUEST_HEAD = 16 * 1024


@cache
def static_file(*parts: str) -> bytes | None:
    """A file shipped in notifyrelay/static (None when absent), read once."""
    path = resources.files("notifyrelay").joinpath("static", *parts)
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class HttpConnection(asyncio.Protocol):
    """One TCP connection: HTTP requests until it becomes a websocket or a stream (then it delegates)."""

    # One per connection, for the connection's life: no __dict__ (about 0.2 KiB each at 10,000 connections).
    __slots__ = ("_deadline", "_expiry", "_head", "_partial", "_request", "admin", "h11", "peer", "server",
                 "transport", "upgraded")

    def __init__(self, server: RelayServer, *, admin: bool) -> None:
        self.server = server
        self.admin = admin
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport | None = None
        self.upgraded: WebSocketTransport | StreamTransport | None = None
        self.peer = "?"
        self._deadline: asyncio.TimerHandle | None = None
        self._partial = False  # bytes of a request have arrived and it has not been answered yet
        self._request: h11.Request | None = None
        self._head = False  # the request being answered is a HEAD: headers only
        self._expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not an asyncio subclass)
        self.transport = transport
        self.peer = peer_of(transport.get_extra_info("peername"))
        transport.set_write_buffer_limits(high=self.server.config.server.write_high_water_bytes)
        self.server.connections.add(self)
        self._arm_deadline()
        # Counted until it upgrades or closes: past server.max_handshakes the oldest (the slowest) is shed.
        shed = self.server.handshakes.arrive(self, self.server.config.server.max_handshakes)
        if shed is not None and shed.transport is not None:
            self.server.metrics.limit_hits["max_handshakes"].inc()
            shed.transport.abort()

    def _arm_deadline(self) -> None:
        """A request must arrive (and a handshake finish) within handshake_timeout_s; an idle keep-alive too."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(
            self.server.config.server.handshake_timeout_s, self._handshake_timeout
        )
        self.server.handshakes.progressed(self)

    def _handshake_done(self) -> None:
        """Upgraded: no longer bound by handshake_timeout_s, nor counted against max_handshakes."""
        if self._deadline is not None:
            self._deadline.cancel()
        self.server.handshakes.done(self)

    def _handshake_timeout(self) -> None:
        if self.upgraded is None and self.transport is not None:
            if self._partial:  # not an idle keep-alive connection: a request that never finished
                self.server.metrics.limit_hits["handshake_timeout_s"].inc()
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.upgraded is not None:
            if isinstance(self.upgraded, WebSocketTransport):
                self.upgraded.data_received(data)
            return  # a stream's client has nothing to say; what it sends is ignored
        self._partial = True
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        if isinstance(self.upgraded, WebSocketTransport):
            self.upgraded.eof_received()
            return True
        if self.upgraded is None:
            self.h11.receive_data(b"")
            self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._deadline, self._expiry):
            if timer is not None:
                timer.cancel()
        self.server.connections.discard(self)
        self.server.handshakes.done(self)
        if self.upgraded is not None:
            self.upgraded.connection_lost()

    def pause_writing(self) -> None:
        if self.upgraded is not None:
            self.upgraded.pause_writing()

    def resume_writing(self) -> None:
        if self.upgraded is not None:
            self.upgraded.resume_writing()

    # Requests.

    def _process(self) -> None:
        while self.upgraded is None and self.transport is not None and not self.transport.is_closing():
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return
            if isinstance(event, h11.Request):
                self._request = event  # answered once all of it is in (a GET's end follows at once)
            elif isinstance(event, h11.EndOfMessage) and self._request is not None:
                request, self._request = self._request, None
                self._partial = False
                try:
                    self._route(request)
                except Exception:  # a bug answering one request must not take the server down
                    log.exception("server.request_failed", remote=self.peer)
                    if self.h11.our_state is h11.SEND_RESPONSE:
                        self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "internal error")
                    else:
                        self.transport.abort()

    def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        assert self.transport is not None
        status = HTTPStatus(exc.error_status_hint)
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = msgspec.json.encode({"code": "bad_request", "message": "malformed HTTP request"}) + b"\n"
            with contextlib.suppress(h11.LocalProtocolError):
                self._respond(status, body, "application/json", close=True)
        self.transport.close()

    def _route(self, request: h11.Request) -> None:
        try:
            target = request.target.decode("ascii")
            parts = urlsplit(target)
        except (UnicodeDecodeError, ValueError):
            self._error(HTTPStatus.BAD_REQUEST, "bad_request", "the request target is not a valid URL")
            return
        path, method = parts.path, request.method
        self._head = method == b"HEAD"
        server = self.server
        probes_here = self.admin or not server.config.admin.listen
        if path in PROBE_PATHS and probes_here:
            self._probe(path)
            return
        if self.admin:
            self._error(HTTPStatus.NOT_FOUND, "not_found", "not found")
            return
        if method == b"OPTIONS" and path in STREAM_PATHS:
            self._preflight(request)
            return
        if method != b"GET" and not (self._head and path not in ("/ws", *STREAM_PATHS)):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "bad_request", "only GET is served here",
                        [("Allow", "GET")])
            return
        if path == "/ws":
            self._websocket(request, target, parts.query)
        elif path in STREAM_PATHS:
            self._stream(request, target, parts.query, *STREAM_PATHS[path])
        elif path == "/client.js" or path == "/client.d.ts":
            self._static(("client.js",) if path == "/client.js" else ("client.d.ts",), public=True)
        elif server.config.server.ui and (path in ("/ui", "/ui/") or path.startswith("/ui/")):
            name = path.removeprefix("/ui").strip("/") or "index.html"
            if UI_FILE.fullmatch(name):
                self._static(("ui", name))
            else:
                self._error(HTTPStatus.NOT_FOUND, "not_found", "not found")
        else:
            self._error(HTTPStatus.NOT_FOUND, "not_found", "not found")

    def _probe(self, path: str) -> None:
        server = self.server
        if path == "/healthz":
            self._respond(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            report = server.readiness.report()
            status = HTTPStatus.OK if report["ready"] else HTTPStatus.SERVICE_UNAVAILABLE
            self._respond(status, msgspec.json.encode(report) + b"\n", "application/json")
        else:
            self._respond(HTTPStatus.OK, server.metrics.exposition(), CONTENT_TYPE_LATEST)

    def _static(self, parts: tuple[str, ...], *, public: bool = False) -> None:
        body = static_file(*parts)
        if body is None:
            self._error(HTTPStatus.NOT_FOUND, "not_found", "not found")
            return
        suffix = parts[-1][parts[-1].rfind("."):]
        headers = [("Access-Control-Allow-Origin", "*")] if public else []
        self._respond(HTTPStatus.OK, body, CONTENT_TYPES.get(suffix, "application/octet-stream"), headers=headers,
                      cache="no-cache")

    def _preflight(self, request: h11.Request) -> None:
        headers = headers_of(request.headers)
        cors = self.server.gate.cors_headers(headers)
        if not cors:
            self._error(HTTPStatus.FORBIDDEN, "forbidden", "origin not allowed")
            return
        cors += [("Access-Control-Allow-Methods", "GET"),
                 ("Access-Control-Allow-Headers", "Authorization, Last-Event-ID"),
                 ("Access-Control-Max-Age", "600")]
        self._respond(HTTPStatus.NO_CONTENT, b"", None, headers=cors)

    def _admit(
        self, request: h11.Request, target: str, query: str, cors: list[tuple[str, str]],
    ) -> tuple[object, StreamRequest] | None:
        """The gate, then the query string: the admission and what the URL asks for, or None (answered)."""
        server = self.server
        headers = headers_of(request.headers)
        try:
            admission = server.gate.admit(headers, target, len(server.hub), self.peer)
            last_event_id = headers.get_all("Last-Event-ID")
            wanted = parse_query(query, max_key_bytes=server.config.server.max_key_bytes,
                                 last_event_id=last_event_id[-1] if last_event_id else None)
        except Refusal as refusal:
            self._error(refusal.status, refusal.code, refusal.message, refusal.headers + cors)
            return None
        except ProtocolError as exc:
            self._error(HTTPStatus.BAD_REQUEST, exc.code, exc.message, cors)
            return None
        return admission, wanted

    def _websocket(self, request: h11.Request, target: str, query: str) -> None:
        server = self.server
        headers = headers_of(request.headers)
        try:
            admission = server.gate.admit(headers, target, len(server.hub), self.peer)
        except Refusal as refusal:
            self._error(refusal.status, refusal.code, refusal.message, refusal.headers)
            return
        wanted: StreamRequest | None = None
        error: ProtocolError | None = None
        try:
            wanted = parse_query(query, max_key_bytes=server.config.server.max_key_bytes)
        except ProtocolError as exc:  # answered after the welcome: the connection stays open
            error = exc
        head = b"GET %s HTTP/1.1\r\n%s\r\n" % (
            request.target, b"".join(b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw_items())
        )
        ws, response, opened = handshake(head, server.config.server, admission.subprotocol)
        assert self.transport is not None
        self.transport.write(response)
        if not opened:
            self.transport.close()
            return
        upgraded = self.upgraded = WebSocketTransport(
            self.transport, ws, server.hub, server.config.server, server.metrics, self.peer
        )
        self._handshake_done()
        grant = admission.grant
        upgraded.start(grant.channels if grant else None, wanted, error)
        if grant is not None:
            self._expire_at(grant.expires_at, upgraded)
        trailing, _ = self.h11.trailing_data
        if trailing:
            upgraded.data_received(trailing)
        # A websocket never speaks HTTP again here (bytes go to the upgraded transport): h11's state machine and
        # buffers (about 1 KiB) would otherwise live as long as the connection.
        del self.h11

    def _stream(self, request: h11.Request, target: str, query: str, kind: str, content_type: str) -> None:
        server = self.server
        # A browser on an allowed origin may read the refusals too, not only the stream.
        cors = server.gate.cors_headers(headers_of(request.headers))
        admitted = self._admit(request, target, query, cors)
        if admitted is None:
            return
        admission, wanted = admitted
        grant = getattr(admission, "grant", None)
        channels = grant.channels if grant else None
        try:
            self._check_stream(kind, wanted, channels)
        except Refusal as refusal:
            self._error(refusal.status, refusal.code, refusal.message, refusal.headers + cors)
            return
        chunked = request.http_version == b"1.1"
        head_headers = [("Content-Type", content_type), ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no"),
                        *cors]
        head_headers.append(("Transfer-Encoding", "chunked") if chunked else ("Connection", "close"))
        head = self.h11.send(h11.Response(status_code=200, headers=head_headers, reason=b"OK")) or b""
        assert self.transport is not None
        upgraded = self.upgraded = StreamTransport(
            kind, self.transport, chunked=chunked, hub=server.hub, settings=server.config.server,
            metrics=server.metrics, peer=self.peer,
        )
        self._handshake_done()
        upgraded.start(head, channels, wanted.subscribes, until_done=wanted.until_done)
        if grant is not None:
            self._expire_at(grant.expires_at, upgraded)

    def _check_stream(self, kind: str, wanted: StreamRequest, grants: Grants | None) -> None:
        """A stream's subscriptions are its URL: refuse (Refusal, before any byte of the stream) what a websocket
        would answer with an error frame. The grant and limit rules are the session's own, tried on a scratch one."""
        hub = self.server.hub
        if not wanted.subscribes:
            raise Refusal(HTTPStatus.BAD_REQUEST, "bad_request",
                          f"name what to follow: {'/sse' if kind == 'sse' else '/stream'}?channel=NAME&key=KEY")
        for subscribe in wanted.subscribes:
            if subscribe.channel not in hub.channels:
                raise Refusal(HTTPStatus.BAD_REQUEST, "unknown_channel",
                              f"channel {subscribe.channel[:64]!r} is not relayed here; relayed channels: "
                              f"{', '.join(hub.channels)}")
        no_progress = [s.channel for s in wanted.subscribes if s.channel not in hub.progress_channels]
        if wanted.until_done and no_progress:
            raise Refusal(HTTPStatus.BAD_REQUEST, "bad_request",
                          f"until=done needs progress settings ([channels.progress], on a state channel) for "
                          f"{no_progress[0]!r}, and this relay has none for it")
        scratch = Session(grants=grants, rate_per_s=1.0, burst=1, now=0.0)
        for subscribe in wanted.subscribes:
            try:
                scratch.subscribe(subscribe, limit=self.server.config.server.max_subscriptions)
            except SubscriptionError as exc:
                status = HTTPStatus.FORBIDDEN if exc.code == "forbidden" else HTTPStatus.BAD_REQUEST
                raise Refusal(status, exc.code, exc.message) from None

    def _expire_at(self, expires_at: float, upgraded: WebSocketTransport | StreamTransport) -> None:
        """Close with 4001 when the token expires; the client reconnects with a fresh one."""

        def expire() -> None:
            self.server.metrics.token_expirations.inc()
            log.info("server.token_expired", client=upgraded.session.id if upgraded.session else None)
            upgraded.close(4001, "token expired")

        delay = max(0.0, expires_at - time.time())
        self._expiry = asyncio.get_running_loop().call_later(delay, expire)  # asyncio bounds each wait itself

    # Answers.

    def _error(self, status: HTTPStatus, code: str, message: str, headers: list[tuple[str, str]] | None = None,
               ) -> None:
        body = msgspec.json.encode({"code": code, "message": message}) + b"\n"
        self._respond(status, body, "application/json", headers=headers or [])

    def _respond(
        self, status: HTTPStatus, body: bytes, content_type: str | None, *,
        headers: list[tuple[str, str]] | None = None, cache: str = "no-store", close: bool = False,
    ) -> None:
        assert self.transport is not None
        all_headers = [("Content-Length", str(len(body))), ("Cache-Control", cache), *(headers or [])]
        if content_type is not None:
            all_headers.append(("Content-Type", content_type))
        if close or not self.server.gate.accepting:
            all_headers.append(("Connection", "close"))
        conn = self.h11
        data = conn.send(h11.Response(status_code=int(status), headers=all_headers, reason=status.phrase)) or b""
        data += conn.send(h11.Data(data=body)) or b"" if body and not self._head else b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.transport.write(data)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._arm_deadline()
        elif conn.their_state is not h11.DONE:
            # The request still has a body coming (we serve GET only): do not read it, close after this answer.
            self.transport.close()


class RelayServer:
    """The listening sockets: the main address (and ``[admin] listen`` for the probes alone)."""

    def __init__(
        self, config: Config, hub: Hub, readiness: Readiness, metrics: Metrics, *, reuse_port: bool = False,
    ) -> None:
        self._config = config
        self.hub = hub
        self.readiness = readiness
        self.metrics = metrics
        self.reuse_port = reuse_port
        # Keys are read and checked now, so that a bad [auth] setting stops the start (exit 2) naming its key.
        self.gate = Gate(config.server, Authenticator.from_config(config.auth), metrics)
        self.connections: set[HttpConnection] = set()
        self.handshakes: Handshakes[HttpConnection] = Handshakes()
        metrics.handshakes.set_function(lambda: len(self.handshakes))
        self.accept_errors = AcceptErrors(metrics.accept_errors)
        self.main: asyncio.Server | None = None
        self.admin: asyncio.Server | None = None

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload: the gate judges the next handshake by the new limits and origins (max_handshakes is read
        where it is used). Descriptors were counted at start: a limit they no longer fit is logged, not refused."""
        self._config = config
        self.gate.settings = config.server
        try:
            check_file_descriptors(config, raise_limit=False)
        except ConfigError as exc:
            log.warning("server.file_descriptors_short", error=str(exc))

    @property
    def accepting(self) -> bool:
        return self.gate.accepting

    @property
    def port(self) -> int:
        assert self.main is not None
        return int(self.main.sockets[0].getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        return int(self.admin.sockets[0].getsockname()[1]) if self.admin is not None else None

    @property
    def url(self) -> str:
        host, _ = parse_listen(self.config.server.listen)
        scheme = "wss" if self.config.server.tls_cert_file else "ws"
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}/ws"

    async def start(self) -> None:
        """Bind and start accepting (raises OSError when the address is taken, ConfigError when max_connections
        cannot fit RLIMIT_NOFILE)."""
        settings = self.config.server
        check_file_descriptors(self.config)
        host, port = parse_listen(settings.listen)
        tls = _tls_context(settings.tls_cert_file, settings.tls_key_file)
        if self.gate.authenticator is None and not is_loopback(host):
            log.warning(
                "server.unauthenticated", listen=settings.listen,
                hint="auth.mode is none: anyone who reaches this address may follow every channel (docs/security.md)",
            )
        loop = asyncio.get_running_loop()
        # The TLS handshake comes before the HTTP one (and before HttpConnection): bound it the same way.
        tls_timeout = settings.handshake_timeout_s if tls else None
        self.accept_errors.install(loop)
        try:
            self.main = await loop.create_server(
                lambda: HttpConnection(self, admin=False), host or None, port, ssl=tls,
                reuse_port=self.reuse_port or None, backlog=1024, ssl_handshake_timeout=tls_timeout,
            )
            if self.config.admin.listen:
                admin_host, admin_port = parse_listen(self.config.admin.listen, "admin.listen")
                self.admin = await loop.create_server(
                    lambda: HttpConnection(self, admin=True), admin_host or None, admin_port, ssl=tls,
                    reuse_port=self.reuse_port or None, ssl_handshake_timeout=tls_timeout,
                )
        except BaseException:
            self.accept_errors.uninstall()
            raise

    def stop_accepting(self) -> None:
        """Refuse new websockets and streams; open ones stay, and the probes keep answering (/readyz: 503).

        With [admin] listen the main socket closes. Without it the probes share that socket, so it stays open and
        /ws, /sse and /stream are answered 503 instead."""
        self.gate.accepting = False
        if self.admin is not None and self.main is not None:
            self.main.close()

    async def close(self) -> None:
        for server in (self.main, self.admin):
            if server is not None:
                server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        for server in (self.main, self.admin):
            if server is not None:
                try:
                    await asyncio.wait_for(server.wait_closed(), timeout=10)
                except TimeoutError:
                    log.warning("server.close_timeout")
        self.accept_errors.uninstall()


def _tls_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def peer_of(address: Any) -> str:
    """An address as host:port, for log lines."""
    try:
        host, port = address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"
