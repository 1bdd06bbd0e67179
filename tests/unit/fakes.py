"""Stand-ins the unit tests share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rows:
    """Fetched state as the state stage hands it over (protocol.Rows), every field defaulted."""

    rows: dict[str, Any] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    error: str | None = None
    error_keys: list[str] = field(default_factory=list)
