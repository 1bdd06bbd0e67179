"""Finding the SQL scripts: inside the installed package (wheel), or in the source checkout's sql/."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def read_sql(name: str) -> str:
    """The text of ``sql/NAME`` (e.g. ``install.sql``, ``examples/activities.sql``)."""
    packaged = resources.files("notifyrelay").joinpath("sql", *name.split("/"))
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "sql" / name).read_text(encoding="utf-8")
