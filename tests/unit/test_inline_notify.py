"""The asyncpg internals InlineNotifyConnection relies on are still there, as it expects them."""

from __future__ import annotations

import inspect

import asyncpg
import asyncpg.connection

from notifyrelay.pipeline.inline_notify import INLINE_NOTIFY, InlineNotifyConnection


def test_asyncpg_still_has_the_private_hook_the_listener_overrides() -> None:
    """Fails when an asyncpg upgrade changes _process_notification or its listener registry: re-check the override
    (and the pinned range in pyproject.toml) before widening it."""
    parameters = list(inspect.signature(asyncpg.Connection._process_notification).parameters)
    assert parameters == ["self", "pid", "channel", "payload"]
    assert asyncpg.connection._Callback._fields == ("cb", "is_async")
    assert {"_listeners", "_loop"} <= set(asyncpg.Connection.__slots__)
    assert INLINE_NOTIFY


def test_the_override_keeps_asyncpg_s_signature() -> None:
    """The override is called by asyncpg's protocol with asyncpg's arguments."""
    ours = inspect.signature(InlineNotifyConnection._process_notification)
    assert list(ours.parameters) == list(inspect.signature(asyncpg.Connection._process_notification).parameters)
