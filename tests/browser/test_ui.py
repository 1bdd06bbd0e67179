"""The relay's live page, /ui, in a real Chromium against a relay with ``[server] ui = true`` on a real PostgreSQL.

Screenshots are kept under pytest's temporary directory (the path is printed): look at them with any image viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.browser.harness import Activities, relay_overrides
from tests.conftest import Database, RelayFactory

SECRET = "browser-test secret, at least thirty-two bytes long"


async def work(activities: Activities, keys: list[str], step: int = 7, every_s: float = 0.15) -> None:
    """A worker that moves each activity forward every ``every_s`` until cancelled."""
    done = dict.fromkeys(keys, 0)
    while True:
        for key in keys:
            done[key] += step
            await activities.update(key, done=done[key], status="running", message=f"imported {done[key]} rows")
        await asyncio.sleep(every_s)


@pytest.fixture
async def busy(own_database: Database) -> AsyncIterator[tuple[Activities, list[str]]]:
    """Three running activities on a database of this test's own, moved forward by a worker while the test runs."""
    activities = await Activities(own_database).install()
    keys = [await activities.create(1000, status="running", message="starting") for _ in range(3)]
    worker = asyncio.create_task(work(activities, keys))
    yield activities, keys
    worker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await worker


async def bars(page: Any) -> dict[str, dict[str, str]]:
    """Each key's card as the page shows it: done, percent, bar width, status and the figures line."""
    result: dict[str, dict[str, str]] = await page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("li.key")].map((item) => [item.dataset.key, {
            done: item.querySelector(".fill").dataset.done,
            width: item.querySelector(".fill").style.width,
            status: item.dataset.status,
            figures: item.querySelector(".figures").textContent,
        }]))"""
    )
    return result


async def test_ui_shows_the_active_keys_with_bars_that_move(
    make_relay: RelayFactory, own_database: Database, busy: tuple[Activities, list[str]], page: Any, tmp_path: Path
) -> None:
    """/ui lists every active key with a bar; screenshots a second apart show every bar further on."""
    from playwright.async_api import expect

    activities, keys = busy
    relay = await make_relay(dsn=own_database.dsn, **relay_overrides(**{"server.ui": True}))
    await page.goto(f"http://127.0.0.1:{relay.server.port}/ui")
    await expect(page.locator("li.key")).to_have_count(3)
    await expect(page.locator("#connection")).to_have_text("connected · websocket")
    await expect(page.locator("#listener")).to_have_text("listening")
    await expect(page.locator("#polling")).to_be_hidden()
    await page.wait_for_function(
        "() => [...document.querySelectorAll('.fill')].every((f) => f.dataset.done > 0)", timeout=5000
    )
    before = await bars(page)
    await page.screenshot(path=tmp_path / "ui-1.png")
    await page.wait_for_timeout(1000)
    after = await bars(page)
    await page.screenshot(path=tmp_path / "ui-2.png")
    print(f"\n/ui screenshots: {tmp_path / 'ui-1.png'} {tmp_path / 'ui-2.png'}\nbefore {before}\nafter  {after}")
    assert sorted(before) == sorted(after) == sorted(keys)
    for key in keys:
        assert int(after[key]["done"]) > int(before[key]["done"]), (key, before[key], after[key])
        assert after[key]["width"] != before[key]["width"]
        assert after[key]["status"] == "running"
        assert "/ 1,000" in after[key]["figures"] and "%" in after[key]["figures"]
    # system_stability is relayed: a new activity changes the number of active ones, and the badge says so.
    await expect(page.locator("#stability")).to_be_visible()
    await activities.create(50)
    await expect(page.locator("#stability")).to_have_text("system processing · 4 active")
    await expect(page.locator("li.key")).to_have_count(4)
    await page.screenshot(path=tmp_path / "ui-3.png")


async def test_ui_shows_the_polling_fallback_while_the_database_is_down(
    make_relay: RelayFactory, own_database: Database, page: Any, tmp_path: Path
) -> None:
    """Database stopped: /ui shows the listener down and the polling banner; both clear once it is back."""
    from playwright.async_api import expect

    assert own_database.server is not None
    activities = await Activities(own_database).install()
    await activities.create(100, status="running")
    relay = await make_relay(dsn=own_database.dsn, **relay_overrides(**{"server.ui": True}))
    await page.goto(f"http://127.0.0.1:{relay.server.port}/ui")
    await expect(page.locator("li.key")).to_have_count(1)
    await asyncio.to_thread(own_database.server.stop, "fast")
    await expect(page.locator("#listener")).to_have_text("listener down")
    await expect(page.locator("#polling")).to_be_visible()
    await expect(page.locator("#polling-reason")).to_contain_text("not listening to PostgreSQL")
    await page.screenshot(path=tmp_path / "ui-listener-down.png")
    print(f"\n/ui with the listener down: {tmp_path / 'ui-listener-down.png'}")
    await asyncio.to_thread(own_database.server.start)
    await expect(page.locator("#listener")).to_have_text("listening", timeout=10000)
    await expect(page.locator("#polling")).to_be_hidden()


async def test_ui_in_auth_mode_jwt_takes_a_token_from_the_url_or_its_form(
    make_relay: RelayFactory, database: Database, page: Any, tmp_path: Path
) -> None:
    """auth mode jwt: /ui?token= connects at once (websocket and SSE); without one, the page asks for a token."""
    from playwright.async_api import expect

    activities = await Activities(database).install()
    key = await activities.create(100, status="running", message="secret work")
    secret = tmp_path / "jwt-secret"
    secret.write_text(SECRET)
    every_key = {"activity_progress": "*", "system_stability": "*", "activity_hints": "*"}
    claims = {"sub": "ui-test", "exp": int(time.time()) + 3600, "channels": every_key}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    jwt_mode = {"server.ui": True, "auth.mode": "jwt", "auth.jwt_secret_file": str(secret)}
    relay = await make_relay(**relay_overrides(**jwt_mode))
    base = f"http://127.0.0.1:{relay.server.port}/ui"

    await page.goto(f"{base}?token={token}")
    await expect(page.locator(f'li.key[data-key="{key}"] .message')).to_have_text("secret work")
    await page.goto(f"{base}?token={token}&transport=sse&channel=activity_progress")  # the token as a query parameter
    await expect(page.locator("#connection")).to_have_text("connected · sse")
    await expect(page.locator(f'li.key[data-key="{key}"] .message')).to_have_text("secret work")

    other = await page.context.new_page()
    await other.goto(base)
    await expect(other.locator("#auth")).to_be_visible(timeout=10000)
    await expect(other.locator("li.key")).to_have_count(0)
    await other.screenshot(path=tmp_path / "ui-token-form.png")
    await other.fill("#token", token)
    await other.click("#auth button")
    await expect(other.locator(f'li.key[data-key="{key}"] .message')).to_have_text("secret work")
    await expect(other.locator("#auth")).to_be_hidden()
