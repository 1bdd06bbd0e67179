"""The websocket endpoint ``/ws`` and the HTTP probes, on the websockets asyncio server.

Plain HTTP requests (probes, metrics, 404s) are answered in ``process_request`` before any handshake, and so are
refusals: a foreign Origin (403), a missing or invalid token in auth mode jwt (401), a full house (503). Each
websocket connection gets a welcome, may subscribe from its query string, and then sends frames that are answered
with ack, pong or error frames; a bad frame never closes the connection unless docs/protocol.md says so. The
limits of docs/security.md are enforced here: frame rate (token bucket), frame size (websockets' max_size, 1009),
token expiry (4001), and each limit hit is counted by its own metric (metrics.LIMITS).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from .. import protocol
from ..auth import Authenticator, Grant, find_token
from ..config import Config, is_loopback, parse_listen
from ..delivery.hub import Client, Hub, close_bounded, peer
from ..exceptions import AuthError, ProtocolError
from ..ops.health import Readiness
from ..ops.metrics import Metrics
from ..protocol import Command, Ping, Subscribe

log = structlog.get_logger("notifyrelay.server")
WS_PATH = "/ws"
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
     protocol.CLOSE_SLOW_CLIENT, protocol.CLOSE_TOKEN_EXPIRED}
)
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")


def query_subscriptions(path: str, *, max_key_bytes: int) -> Iterator[Subscribe]:
    """``/ws?channel=C&key=K&key=K2`` as subscribe commands (no key: ``*``); raise ProtocolError when malformed."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    channels = query.get("channel", [])
    keys = query.get("key", [])
    if keys and not channels:
        raise ProtocolError("bad_request", "the query string has key parameters but no channel parameter")
    for channel in channels:
        if not channel:
            raise ProtocolError("bad_request", "the query string's channel parameter is empty")
        wanted = protocol.validate_keys(
            keys or [protocol.WILDCARD], op="subscribe", max_key_bytes=max_key_bytes
        )
        yield Subscribe(channel=channel, keys=wanted)


class RateLimit:
    """A token bucket for one connection's frames: ``rate_per_s`` a second, bursts of ``burst``.

    ``strikes`` counts frames refused since the bucket was last full, so a client that keeps pushing past the rate
    (even at a steady 2x) accumulates them, while one that bursts now and then is forgiven once it pauses.
    """

    __slots__ = ("burst", "rate_per_s", "strikes", "tokens", "updated")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.strikes = 0

    def take(self) -> bool:
        """Spend a token for one frame; False when there is none left."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= self.burst:
            self.strikes = 0
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.strikes += 1
        return False


class RelayConnection(ServerConnection):
    """A server connection that keeps what the handshake learnt (the token's grant and subprotocol), counts
    handshake timeouts, stops reading a peer whose answers are backed up, and closes a peer that stays backed up
    longer than ``stall_timeout_s``."""

    relay: ClassVar[RelayServer | None] = None  # set on the per-server subclass made in start()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grant: Grant | None = None
        self.token_subprotocol: str | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    def start_keepalive(self) -> None:
        """websockets' keepalive, started after a random part of an interval (its first ping, which websockets
        sends one interval after it starts, so falls at a random point of the second interval).

        Connections opened together (a deploy, a reconnect storm, a load balancer failing over) would otherwise
        ping together every interval for as long as they live, and those bursts land in the fan-out's way
        (bench/README.md: 12 % of the relay's samples, and the worst batch twice as late)."""
        if self.ping_interval is not None:
            self.keepalive_task = self.loop.create_task(self._jittered_keepalive(self.ping_interval))

    async def _jittered_keepalive(self, interval: float) -> None:
        await asyncio.sleep(random.uniform(0, interval))
        await self.keepalive()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Reading stops while the incoming queue is full (websockets' own rule) or while our writes to the peer are
        # backed up: a peer that floods pings or frames and reads none of the answers then fills its own buffers,
        # not ours (websockets answers pings as it reads, whether or not the peer reads the pongs).
        self._queue_full = self._writes_blocked = False
        self.recv_messages.pause = lambda: self._reading(queue_full=True)
        self.recv_messages.resume = lambda: self._reading(queue_full=False)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._reading(writes_blocked=True)
        # One watchdog for every way a peer can stop draining: notify frames (the hub folds them meanwhile), the
        # answers to its own frames, pongs to its pings. Websockets' keepalive cannot catch it: its pings wait
        # behind the same buffer.
        if self.relay is not None:
            timeout = self.relay.config.server.stall_timeout_s
            self._stall_timer = self.loop.call_later(timeout, self.relay.close_stalled, self)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._reading(writes_blocked=False)
        self._cancel_stall_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall_timer()
        super().connection_lost(exc)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _reading(self, *, queue_full: bool | None = None, writes_blocked: bool | None = None) -> None:
        was_paused = self._queue_full or self._writes_blocked
        if queue_full is not None:
            self._queue_full = queue_full
        if writes_blocked is not None:
            self._writes_blocked = writes_blocked
        paused = self._queue_full or self._writes_blocked
        if paused != was_paused and not self.transport.is_closing():
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        except asyncio.CancelledError:
            # serve() enforces open_timeout by cancelling the handshake: the peer did not finish it in time.
            if self.relay is not None:
                self.relay.metrics.limit_hits["handshake_timeout_s"].inc()
            raise


class RelayServer:
    """Serves /ws (and the probes, unless ``[admin] listen`` moves them to their own address)."""

    def __init__(self, config: Config, hub: Hub, readiness: Readiness, metrics: Metrics) -> None:
        self.config = config
        self.hub = hub
        self.readiness = readiness
        self.metrics = metrics
        # Keys are read and checked now, so that a bad [auth] setting stops the start (exit 2) naming its key.
        self.authenticator = Authenticator.from_config(config.auth)
        self._servers: list[Server] = []
        self.ws_server: Server | None = None
        self.accepting = True
        self.admin_server: Server | None = None
        self._closing: set[asyncio.Task[None]] = set()  # closes started by the stall watchdog
        # websockets logs every refused request (probes included) at info: keep it to warnings and up.
        self._ws_logger = logging.getLogger("websockets.server")

    # Addresses, once started.

    @property
    def port(self) -> int:
        assert self.ws_server is not None
        return int(next(iter(self.ws_server.sockets)).getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        if self.admin_server is None:
            return None
        return int(next(iter(self.admin_server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        host, _ = parse_listen(self.config.server.listen)
        scheme = "wss" if self.config.server.tls_cert_file else "ws"
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    async def start(self) -> None:
        """Bind and start accepting (raises OSError when the address is taken)."""
        settings = self.config.server
        host, port = parse_listen(settings.listen)
        tls = _tls_context(settings.tls_cert_file, settings.tls_key_file)
        admin = self.config.admin.listen
        if self.authenticator is None and not is_loopback(host):
            log.warning(
                "server.unauthenticated", listen=settings.listen,
                hint="auth.mode is none: anyone who reaches this address may follow every channel (docs/security.md)",
            )
        connection_class = type("RelayConnection", (RelayConnection,), {"relay": self})
        self.ws_server = await serve(
            self._handle,
            host or None,
            port,
            process_request=self._route,
            select_subprotocol=self._select_subprotocol,
            create_connection=connection_class,
            compression="deflate" if settings.compression else None,
            max_size=settings.max_message_bytes,
            max_queue=4,
            write_limit=settings.write_high_water_bytes,
            open_timeout=settings.handshake_timeout_s,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=5,
            ssl=tls,
            logger=self._ws_logger,
            server_header=None,
        )
        self._servers.append(self.ws_server)
        if admin:
            admin_host, admin_port = parse_listen(admin, "admin.listen")
            self.admin_server = await serve(
                self._refuse_websocket, admin_host or None, admin_port, process_request=self._route_admin,
                ssl=tls, logger=self._ws_logger, server_header=None,
            )
            self._servers.append(self.admin_server)

    def stop_accepting(self) -> None:
        """Refuse new websocket connections; open ones stay, and the probes keep answering (/readyz: 503).

        With [admin] listen the websocket socket closes. Without it the probes share that socket, so it stays
        open and /ws is answered 503 instead."""
        self.accepting = False
        if self.admin_server is not None and self.ws_server is not None:
            self.ws_server.close(close_connections=False)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=10)
            except TimeoutError:
                log.warning("server.close_timeout")
        self._servers.clear()

    def close_stalled(self, connection: ServerConnection) -> None:
        """The stall watchdog fired: the peer has not drained its write buffer for stall_timeout_s."""
        timeout = self.config.server.stall_timeout_s
        self.metrics.slow_client_disconnects.inc()
        log.warning("server.client_too_slow", remote=peer(connection), stall_timeout_s=timeout)
        task = asyncio.get_running_loop().create_task(
            close_bounded(connection, protocol.CLOSE_SLOW_CLIENT, f"too slow: stalled over {timeout:g}s")
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # HTTP routing.

    def _probe(self, connection: ServerConnection, path: str) -> Response:
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            report = self.readiness.report()
            status = HTTPStatus.OK if report["ready"] else HTTPStatus.SERVICE_UNAVAILABLE
            return _response(connection, status, msgspec.json.encode(report) + b"\n", "application/json")
        return _response(connection, HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in PROBE_PATHS and not self.config.admin.listen:
            return self._probe(connection, path)
        if path != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if not self.accepting:
            self.metrics.handshake_rejections.labels("shutting_down").inc()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        settings = self.config.server
        origins = request.headers.get_all("Origin")  # get() would raise on a repeated header: a 500
        if settings.allowed_origins and origins and (len(origins) > 1 or origins[0] not in settings.allowed_origins):
            self.metrics.handshake_rejections.labels("origin").inc()
            return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if self.authenticator is not None:
            refusal = self._authenticate(connection, request)
            if refusal is not None:
                return refusal
        if len(self.hub.clients) >= settings.max_connections:
            return self._over_capacity(connection)
        return None

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        """Verify the request's token and keep its grant on the connection; a 401 response when refused."""
        assert self.authenticator is not None
        found = None
        try:
            found = find_token(request.headers, request.path)
            grant = self.authenticator.authenticate(found.token if found else None)
        except AuthError as exc:
            self.metrics.handshake_rejections.labels("unauthorized").inc()
            self.metrics.auth_failures.labels(exc.reason).inc()
            # Never the token itself: the reason and where it came from are enough to debug a client.
            log.info("server.auth_failed", reason=exc.reason, source=found.source if found else None,
                     remote=peer(connection))
            response = connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="notifyrelay", error="invalid_token"'
            return response
        if isinstance(connection, RelayConnection):
            connection.grant = grant
            connection.token_subprotocol = found.subprotocol if found else None
        return None

    def _select_subprotocol(self, connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        """Echo the offered token when it is what authenticated the client (browsers require the echo)."""
        chosen = connection.token_subprotocol if isinstance(connection, RelayConnection) else None
        return Subprotocol(chosen) if chosen is not None and chosen in offered else None

    def _over_capacity(self, connection: ServerConnection) -> Response:
        self.metrics.handshake_rejections.labels("capacity").inc()
        self.metrics.limit_hits["max_connections"].inc()
        response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, try later\n")
        response.headers["Retry-After"] = "5"
        return response

    def _route_admin(self, connection: ServerConnection, request: Request) -> Response:
        path = urlsplit(request.path).path
        if path in PROBE_PATHS:
            return self._probe(connection, path)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def _refuse_websocket(self, connection: ServerConnection) -> None:  # pragma: no cover - never reached
        await connection.close()

    # Websocket connections.

    async def _handle(self, connection: ServerConnection) -> None:
        settings = self.config.server
        grant = connection.grant if isinstance(connection, RelayConnection) else None
        if len(self.hub.clients) >= settings.max_connections:
            # Handshakes that passed _route together can overshoot the limit: the latecomers are closed with 1013.
            self.metrics.limit_hits["max_connections"].inc()
            self.metrics.handshake_rejections.labels("capacity").inc()
            await connection.close(CloseCode.TRY_AGAIN_LATER, "too many connections, try later")
            return
        client = Client(connection, grants=grant.channels if grant else None)
        self.hub.add(client)
        self.metrics.connections_opened.inc()
        expiry = asyncio.get_running_loop().create_task(self._expire(client, grant)) if grant else None
        rate = RateLimit(settings.rate_limit_per_s, settings.rate_limit_burst)
        closing: asyncio.Task[None] | None = None
        try:
            self.hub.send(client, "welcome", protocol.welcome(
                window_ms=self.config.coalesce.window_ms,
                channels=self.hub.channels,
                listener_up=self.hub.listener_is_up,
            ))
            try:
                for subscribe in query_subscriptions(
                    connection.request.path if connection.request else "", max_key_bytes=settings.max_key_bytes
                ):
                    self._execute(client, subscribe)
            except ProtocolError as exc:
                self._reply_error(client, exc)
            async for message in connection:
                if closing is not None:
                    # Keep reading (and dropping) until the peer's close frame arrives, or the close waits it out.
                    continue
                if not rate.take():
                    closing = self._rate_limited(client, rate)
                else:
                    try:
                        command = protocol.parse_frame(message, max_key_bytes=settings.max_key_bytes)
                    except ProtocolError as exc:
                        self._reply_error(client, exc)
                    else:
                        self._execute(client, command)
                if connection.paused:
                    # The client sends but does not read our answers: handle nothing more from it until it drains
                    # (the connection's stall watchdog closes it if it never does).
                    await connection.drain()
        except (ConnectionClosed, OSError):
            pass  # the peer went away; nothing to report
        except Exception:
            log.exception("server.connection_failed", client=client.id)
            await close_bounded(connection, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if expiry is not None:
                expiry.cancel()
            if closing is not None:
                await asyncio.shield(closing)
            self.hub.remove(client)
            self._count_close(connection)

    def _rate_limited(self, client: Client, rate: RateLimit) -> asyncio.Task[None] | None:
        """Refuse a frame over the rate; when it persists, start closing with 1008 and return that task."""
        self.metrics.limit_hits["rate_limit"].inc()
        if rate.strikes > 3 * rate.burst:
            log.info("server.rate_limit_close", client=client.id, remote=peer(client.connection),
                     rate_limit_per_s=rate.rate_per_s)
            # Not awaited here: the handler must go on reading for the peer's close frame to get through.
            return asyncio.get_running_loop().create_task(
                close_bounded(client.connection, CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            )
        self._reply_error(client, ProtocolError(
            "rate_limited", f"too many frames: at most {rate.rate_per_s:g} a second (bursts of {rate.burst}); "
            "this one was dropped, and persisting closes the connection",
        ))
        return None

    async def _expire(self, client: Client, grant: Grant) -> None:
        """Close the connection with 4001 when its token expires; the client reconnects with a fresh one."""
        await asyncio.sleep(max(0.0, grant.expires_at - time.time()))
        self.metrics.token_expirations.inc()
        log.info("server.token_expired", client=client.id, subject=grant.subject)
        await close_bounded(client.connection, protocol.CLOSE_TOKEN_EXPIRED, "token expired")

    def _count_close(self, connection: ServerConnection) -> None:
        # The peer chooses its close code: label only the codes that mean something here, so it cannot mint series.
        code = connection.close_code or 1006
        self.metrics.connections_closed.labels(str(code) if code in KNOWN_CLOSE_CODES else "other").inc()
        sent = connection.protocol.close_sent
        if sent is None:
            return
        if sent.code == CloseCode.MESSAGE_TOO_BIG:
            self.metrics.limit_hits["max_message_bytes"].inc()
        elif sent.code == CloseCode.INTERNAL_ERROR and "keepalive" in sent.reason:
            self.metrics.limit_hits["ping_timeout_s"].inc()

    def _execute(self, client: Client, command: Command) -> None:
        if isinstance(command, Ping):
            self.hub.send(client, "pong", protocol.pong(command.id))
            return
        try:
            if isinstance(command, Subscribe):
                self.hub.subscribe(client, command)
            else:
                self.hub.unsubscribe(client, command)
        except ProtocolError as exc:
            self._reply_error(client, exc)
        else:
            self.hub.send(client, "ack", protocol.ack(command))

    def _reply_error(self, client: Client, exc: ProtocolError) -> None:
        self.metrics.client_errors.labels(exc.code).inc()
        if exc.limit is not None:
            self.metrics.limit_hits[exc.limit].inc()
        self.hub.send(client, "error", protocol.error(exc.code, exc.message, exc.request_id))


def _response(connection: ServerConnection, status: HTTPStatus, body: bytes, content_type: str) -> Response:
    response = connection.respond(status, "")
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-store"
    return Response(response.status_code, response.reason_phrase, response.headers, body)



def _tls_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
