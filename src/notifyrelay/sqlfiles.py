"""Finding the SQL scripts: inside the installed package (wheel), or in the source checkout's sql/."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def sql_dir() -> Traversable:
    """``sql/``: the copy a wheel ships inside the package, else the source checkout's (an editable install)."""
    packaged = resources.files("notifyrelay").joinpath("sql")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "sql"


def read_sql(name: str) -> str:
    """The text of ``sql/NAME`` (e.g. ``install.sql``, ``examples/activities.sql``)."""
    return sql_dir().joinpath(*name.split("/")).read_text(encoding="utf-8")


def example_names() -> list[str]:
    """The worked examples shipped in ``sql/examples/`` (file names without ``.sql``)."""
    return sorted(entry.name.removesuffix(".sql") for entry in sql_dir().joinpath("examples").iterdir()
                  if entry.name.endswith(".sql"))
