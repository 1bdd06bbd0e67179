"""The relay's event loop: uvloop when installed (the ``fast`` extra), unless NOTIFYRELAY_EVENT_LOOP says asyncio."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from notifyrelay.cli import event_loop_factory
from notifyrelay.config import load_config
from notifyrelay.exceptions import ConfigError

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_asyncio_turns_uvloop_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFYRELAY_EVENT_LOOP=asyncio gives asyncio's own loop whether or not uvloop is installed."""
    monkeypatch.setenv("NOTIFYRELAY_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None


def test_auto_takes_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the relay runs on uvloop exactly when it can be imported."""
    monkeypatch.delenv("NOTIFYRELAY_EVENT_LOOP", raising=False)
    factory = event_loop_factory()
    if HAVE_UVLOOP:
        import uvloop

        assert factory is uvloop.new_event_loop
    else:
        assert factory is None


def test_unknown_choice_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value other than auto, asyncio or uvloop is refused naming the variable."""
    monkeypatch.setenv("NOTIFYRELAY_EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match="NOTIFYRELAY_EVENT_LOOP"):
        event_loop_factory()


def test_the_variable_is_not_read_as_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """NOTIFYRELAY_EVENT_LOOP is the command's, not a configuration key: loading the configuration ignores it."""
    config = tmp_path / "relay.toml"
    config.write_text('dsn = "postgresql://localhost/x"\n[[channels]]\nname = "c"\n')
    monkeypatch.setenv("NOTIFYRELAY_EVENT_LOOP", "asyncio")
    assert load_config(str(config)).channels[0].name == "c"
