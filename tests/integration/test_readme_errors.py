"""The configuration errors the README quotes are the ones the relay really prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
# Each quoted error, in README order, and the relay.toml that provokes it (None: no file at all).
CASES = [
    '[coalesce]\nwindow_ms = "fast"\n[[channels]]\nname = "a"\n',
    '[log]\nformat = "xml"\n[[channels]]\nname = "a"\n',
    'dsn = "mysql://x"\n[[channels]]\nname = "a"\n',
    '[[channels]]\nname = "a"\n[channels.state]\ntable = "t"\nquery = "SELECT 1"\n',
    None,
]


def quoted_errors() -> list[str]:
    block = re.search(r"<!-- readme-errors -->\n```text\n(.*?)```\n<!-- /readme-errors -->", README.read_text(), re.S)
    assert block, "README.md lost its <!-- readme-errors --> block"
    return block.group(1).strip().splitlines()


def test_every_quoted_error_has_a_case() -> None:
    """The README quotes exactly as many errors as this test provokes."""
    assert len(quoted_errors()) == len(CASES)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_the_readme_quotes_what_the_relay_prints(index: int, tmp_path: Path) -> None:
    """Running the command on the case's file prints the README's line and exits 2."""
    config = CASES[index]
    args = [sys.executable, "-m", "notifyrelay", "run"]
    if config is not None:
        (tmp_path / "relay.toml").write_text(config)
        args += ["--config", "relay.toml"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYRELAY_") and not k.startswith("PG")}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == quoted_errors()[index]
