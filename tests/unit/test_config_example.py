"""config.example.toml documents every configuration key the daemon accepts, and is itself a valid configuration."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec

from notifyrelay.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def struct_keys(info: msgspec.inspect.Type, prefix: str = "") -> list[str]:
    """Every dotted key of a msgspec Struct, descending into nested Structs and lists of Structs (as ``[0]``)."""
    if isinstance(info, msgspec.inspect.ListType):
        return struct_keys(info.item_type, f"{prefix}[0]")
    if isinstance(info, msgspec.inspect.UnionType):  # an optional table ([channels.state]): its keys
        info = next((t for t in info.types if isinstance(t, msgspec.inspect.StructType)), info)
    if not isinstance(info, msgspec.inspect.StructType):
        return [prefix]
    keys: list[str] = []
    for field in info.fields:
        path = f"{prefix}.{field.encode_name}" if prefix else field.encode_name
        nested = field.type
        is_struct = isinstance(nested, msgspec.inspect.StructType) or (
            isinstance(nested, msgspec.inspect.ListType) and isinstance(nested.item_type, msgspec.inspect.StructType)
        ) or (
            isinstance(nested, msgspec.inspect.UnionType)
            and any(isinstance(t, msgspec.inspect.StructType) for t in nested.types)
        )
        keys.extend(struct_keys(nested, path) if is_struct else [path])
    return keys


def example_keys(data: Any, prefix: str = "") -> set[str]:
    if isinstance(data, dict):
        keys: set[str] = set()
        for name, value in data.items():
            keys |= example_keys(value, f"{prefix}.{name}" if prefix else name)
        return keys
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return example_keys(data[0], f"{prefix}[0]")
    return {prefix}


def test_every_config_field_is_in_the_example() -> None:
    """Each field of every msgspec Struct in config.py appears in config.example.toml (channels via their first one)."""
    documented = example_keys(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")))
    missing = [key for key in struct_keys(msgspec.inspect.type_info(Config)) if key not in documented]
    assert not missing, f"config.example.toml lacks: {', '.join(missing)}"


def test_example_is_a_valid_configuration() -> None:
    """config.example.toml loads with the daemon's own validation, so no key in it is misspelt or out of range."""
    config = load_config(EXAMPLE, environ={})
    assert config.channels
