"""The ten-line page of docs/clients.md, in a real Chromium, against a real relay on a real PostgreSQL.

The page is served from another origin (another port of 127.0.0.1, a server of the test's own) and imports the
relay's own ``/client.js``, as a user's page would. Its ``poll`` callback calls that server's API, which counts.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from notifyrelay.app import Relay
from tests.browser.harness import Activities, TinyHTTP, relay_overrides, restart_relay
from tests.conftest import Database, RelayFactory

ROOT = Path(__file__).resolve().parents[2]


def documented_page(relay: Relay, key: str, *, transport: str = "websocket") -> str:
    """The first HTML example of docs/clients.md's Browser section, pointed at this relay and key."""
    docs = (ROOT / "docs" / "clients.md").read_text()
    browser_section = docs[docs.index("## Browser"):docs.index("## Python")]
    match = re.search(r"```html\n(.*?)```", browser_section, re.S)
    assert match, "docs/clients.md has no html example in its Browser section"
    html = match.group(1)
    port = relay.server.port
    html = html.replace("http://127.0.0.1:8765", f"http://127.0.0.1:{port}")
    html = html.replace("ws://127.0.0.1:8765", f"ws://127.0.0.1:{port}")
    html = html.replace('"42"', f'"{key}"').replace("activities/42", f"activities/{key}")
    if transport != "websocket":
        html = html.replace('/ws", {', f'/ws", {{ transport: "{transport}",', 1)
        assert f'transport: "{transport}"' in html
    return html


class PageHost:
    """The user's web server, on another port of 127.0.0.1 (so another origin than the relay's): it serves the page
    at ``/`` and the page's own API at ``/api/activities/KEY``, counting the API's calls."""

    def __init__(self, html: str) -> None:
        self.html = html
        self.api_calls = 0
        self.http = TinyHTTP(self._answer)

    async def _answer(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        if path.startswith("/api/"):
            self.api_calls += 1
            return 200, "application/json", json.dumps({"status": "polled", "message": "from the page's API"}).encode()
        if path == "/":
            return 200, "text/html; charset=utf-8", self.html.encode()
        return 404, "text/plain", b"not found"


@pytest.fixture
async def page_host() -> AsyncIterator[Callable[[str], Awaitable[PageHost]]]:
    """Serve a page: ``await page_host(html)``; the server stops at the end of the test."""
    hosts: list[PageHost] = []

    async def serve(html: str) -> PageHost:
        host = PageHost(html)
        await host.http.start()
        hosts.append(host)
        return host

    yield serve
    for host in hosts:
        await host.http.close()


async def open_page(page: Any, page_host: Any, relay: Relay, key: str, transport: str = "websocket") -> PageHost:
    host: PageHost = await page_host(documented_page(relay, key, transport=transport))
    await page.goto(f"{host.http.url}/")
    return host


async def expect_progress(page: Any, value: float, timeout_s: float = 5) -> None:
    await page.wait_for_function(
        "value => document.querySelector('progress').value === value", arg=value, timeout=timeout_s * 1000
    )


async def expect_text(page: Any, selector: str, text: str | re.Pattern[str], timeout_s: float = 5) -> None:
    from playwright.async_api import expect

    await expect(page.locator(selector)).to_have_text(text, timeout=timeout_s * 1000)


@pytest.fixture
async def activities(database: Database) -> Activities:
    return await Activities(database).install()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_page_follows_a_key_through_an_update(
    make_relay: RelayFactory, activities: Activities, page: Any, page_host: Any, transport: str
) -> None:
    """The documented page shows the key's row at once, then its update: bar and text, over the websocket or SSE."""
    relay = await make_relay(**relay_overrides())
    key = await activities.create(200, message="waiting")
    await open_page(page, page_host, relay, key, transport)
    await expect_text(page, "#row", "queued: waiting")
    await expect_text(page, "#relay", "open, listener up")
    await activities.update(key, done=50, status="running", message="importing")
    await expect_progress(page, 25)
    await expect_text(page, "#row", "running: importing")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_page_comes_back_after_a_relay_restart_and_shows_what_changed_meanwhile(
    make_relay: RelayFactory, activities: Activities, page: Any, page_host: Any, transport: str
) -> None:
    """Relay stopped, row changed, relay started on the same port: the page shows the change within 5 s."""
    relay = await make_relay(**relay_overrides())
    key = await activities.create(200, message="waiting")
    await open_page(page, page_host, relay, key, transport)
    await expect_text(page, "#row", "queued: waiting")

    async def change_while_down() -> None:
        await expect_text(page, "#relay", re.compile(r"^reconnecting"))
        await activities.update(key, done=120, status="running", message="changed while the relay was down")

    await restart_relay(make_relay, relay, between=change_while_down, **relay_overrides())
    started = time.monotonic()
    await expect_progress(page, 60, timeout_s=5)
    await expect_text(page, "#row", "running: changed while the relay was down", timeout_s=1)
    print(f"\n{transport}: the page showed the change {time.monotonic() - started:.2f} s after the new relay started")


async def test_page_polls_while_the_database_is_down_and_stops_when_it_is_back(
    make_relay: RelayFactory, own_database: Database, page: Any, page_host: Any
) -> None:
    """A database outage: the page's poll callback runs (listener down), then stops once the relay listens again."""
    assert own_database.server is not None
    activities = await Activities(own_database).install()
    relay = await make_relay(dsn=own_database.dsn, **relay_overrides())
    key = await activities.create(100, message="waiting")
    host = await open_page(page, page_host, relay, key)
    await expect_text(page, "#relay", "open, listener up")
    assert host.api_calls == 0
    await asyncio.to_thread(own_database.server.stop, "fast")
    await expect_text(page, "#relay", "open, listener down, polling")
    await expect_text(page, "#row", "polled: from the page's API")  # what poll put into the state with set()
    assert host.api_calls >= 1
    await asyncio.to_thread(own_database.server.start)
    await expect_text(page, "#relay", "open, listener up", timeout_s=10)
    calls = host.api_calls
    await activities.update(key, done=30, status="running", message="live again")
    await expect_text(page, "#row", "running: live again")
    await page.wait_for_timeout(1000)
    assert host.api_calls == calls, "poll went on after the relay was live again"


async def test_client_module_is_served_to_any_origin_and_is_the_repository_copy(make_relay: RelayFactory) -> None:
    """GET /client.js: text/javascript, Access-Control-Allow-Origin *, and byte for byte clients/js/client.js."""
    relay = await make_relay()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(b"GET /client.js HTTP/1.1\r\nHost: relay\r\nOrigin: http://127.0.0.1:9\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    headers = head.decode().lower()
    assert headers.startswith("http/1.1 200")
    assert "content-type: text/javascript" in headers
    assert "access-control-allow-origin: *" in headers
    if "transfer-encoding: chunked" not in headers:
        assert body == (ROOT / "clients" / "js" / "client.js").read_bytes()
    assert (ROOT / "clients" / "js" / "client.js").resolve() == ROOT / "src" / "notifyrelay" / "static" / "client.js"
