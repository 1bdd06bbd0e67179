"""A real headless Chromium (Debian's, driven by Playwright for Python; never a browser Playwright downloads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str | None:
    """NOTIFYRELAY_CHROMIUM, else Debian's /usr/bin/chromium, else a chromium on PATH."""
    candidate = os.environ.get("NOTIFYRELAY_CHROMIUM") or "/usr/bin/chromium"
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("chromium")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A fresh headless Chromium for one test; skips (saying why) only where Chromium or Playwright is absent."""
    executable = chromium_path()
    if executable is None:
        print("\nchromium is not installed (apt-get install chromium): browser tests skipped")
        pytest.skip("chromium is not installed")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        print("\nplaywright is not installed (pip install 'notifyrelay[test]'): browser tests skipped")
        pytest.skip("playwright is not installed")
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A page whose uncaught exceptions, and errors the client module logs, fail the test.

    The browser's own console errors (a refused websocket while the relay restarts) are expected and ignored."""
    context = await browser.new_context(viewport={"width": 1000, "height": 640})
    tab = await context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def on_console(message: Any) -> None:
        if message.text.startswith("notifyrelay"):
            problems.append(message.text)

    tab.on("console", on_console)
    try:
        yield tab
    finally:
        await context.close()
    assert not problems, problems
