"""Building the state query (pipeline/state.py): quoted identifiers, the key comparison, the JSON wrapper."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from notifyrelay.config import ChannelStateConfig
from notifyrelay.pipeline.state import KEY_TYPES, quote_ident, quote_table, table_query, wrap_query


def state(**values: object) -> ChannelStateConfig:
    return msgspec.convert(values, ChannelStateConfig)


def test_identifiers_are_quoted_exactly_as_written() -> None:
    """Names keep their case, spaces and quotes (doubled), and a table may be schema-qualified."""
    assert quote_ident("Status") == '"Status"'
    assert quote_ident('we"ird name') == '"we""ird name"'
    assert quote_table("activities") == '"activities"'
    assert quote_table("jobs.activities") == '"jobs"."activities"'
    assert quote_table('a.b.c') == '"a"."b.c"'


@given(st.text(alphabet=st.characters(blacklist_characters="\x00"), min_size=1, max_size=63))
def test_a_quoted_identifier_cannot_end_early(name: str) -> None:
    """Whatever the name, the quoted form is one identifier: its only unpaired quotes are the outer two."""
    quoted = quote_ident(name)
    inner = quoted[1:-1]
    assert quoted[0] == quoted[-1] == '"'
    assert inner.replace('""', "") == name.replace('"', "")


def test_the_table_form_compares_keys_in_the_key_columns_type_once_known() -> None:
    """Before check() the key column is compared as text; for integer, uuid and text columns, in its own type."""
    config = state(table="activities", columns=["status", "objects_processed"])
    assert table_query(config) == (
        'SELECT "id" AS key, "status", "objects_processed" FROM "activities" WHERE "id"::text = ANY($1::text[])'
    )
    assert table_query(config, "int8").endswith('WHERE "id" = ANY($1::text[]::int8[])')
    assert table_query(config, "numeric").endswith('WHERE "id"::text = ANY($1::text[])')


@pytest.mark.parametrize(
    ("key_type", "valid", "invalid"),
    [
        ("int2", ["0", "-32768", "32767"], ["32768", "01", "-0", "+1", "1.0", " 1", "x"]),
        ("int4", ["2147483647", "-5"], ["2147483648", "1e3"]),
        ("int8", ["9223372036854775807"], ["9223372036854775808", "99999999999999999999", ""]),
        ("uuid", ["00000000-0000-0000-0000-00000000002a"],
         ["00000000-0000-0000-0000-00000000002A", "{00000000-0000-0000-0000-00000000002a}", "x"]),
        ("text", ["", "anything at all"], []),
    ],
)
def test_only_keys_in_the_columns_canonical_text_form_are_asked_for(
    key_type: str, valid: list[str], invalid: list[str]
) -> None:
    """A key that is not exactly how PostgreSQL prints that type could never match id::text: it is gone unasked."""
    check = KEY_TYPES[key_type]
    assert all(check(key) for key in valid)
    assert not any(check(key) for key in invalid)


def test_the_wrapper_renders_rows_as_json_and_survives_a_trailing_comment_and_semicolon() -> None:
    """The operator's query is wrapped with row_to_json and the size limit, whatever it ends with."""
    sql = wrap_query("SELECT id::text AS key FROM t WHERE id::text = ANY($1) -- the keys", 8192)
    assert "row_to_json(q)" in sql
    assert "octet_length(j.row) <= 8192" in sql
    assert "-- the keys\n) AS q" in sql
    assert ";" not in wrap_query("SELECT 1 AS key;\n", 10)


async def test_watch_stalls_hands_each_channels_newly_stalled_keys_over_once() -> None:
    """watch_stalls reports a key that stopped moving once, per channel, from channel_states' ChannelStates."""
    import asyncio

    from notifyrelay.config import ChannelConfig
    from notifyrelay.ops.metrics import Metrics
    from notifyrelay.pipeline.state import StatePool, channel_states, watch_stalls

    now = [0.0]
    channels = [
        msgspec.convert({"name": "jobs", "state": {"table": "t", "columns": ["s"]},
                         "progress": {"status": "s", "stall_after_s": 5}}, ChannelConfig),
        msgspec.convert({"name": "plain"}, ChannelConfig),
    ]
    metrics = Metrics()
    states = channel_states(channels, StatePool("", 1, metrics), metrics, clock=lambda: now[0])
    assert list(states) == ["jobs"]
    tracker = states["jobs"].progress
    assert tracker is not None
    tracker.observe("42", {"s": "running"}, 0.0)
    seen: list[tuple[str, list[str]]] = []
    task = asyncio.create_task(watch_stalls(lambda: states, lambda name, keys: seen.append((name, keys)),
                                            interval_s=0.001))
    try:
        now[0] = 6.0
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert seen == [("jobs", ["42"])]
    assert metrics.registry.get_sample_value("notifyrelay_stalled_keys", {"channel": "jobs"}) == 1


def test_a_reload_keeps_the_state_of_unchanged_channels() -> None:
    """channel_states with the running states keeps a channel whose settings did not change and rebuilds the others."""
    from notifyrelay.config import ChannelConfig
    from notifyrelay.ops.metrics import Metrics
    from notifyrelay.pipeline.state import StatePool, channel_states

    def channels(timeout_ms: int) -> list[ChannelConfig]:
        return [
            msgspec.convert({"name": "same", "state": {"table": "t", "columns": ["s"]}}, ChannelConfig),
            msgspec.convert({"name": "changed", "state": {"table": "t", "columns": ["s"], "timeout_ms": timeout_ms}},
                            ChannelConfig),
        ]

    metrics = Metrics()
    pool = StatePool("", 1, metrics)
    before = channel_states(channels(100), pool, metrics)
    after = channel_states(channels(200), pool, metrics, previous=before)
    assert after["same"] is before["same"]
    assert after["changed"] is not before["changed"] and after["changed"].config.timeout_ms == 200
    other_pool = StatePool("", 1, metrics)  # a new pool ([state] changed): everything is rebuilt on it
    assert channel_states(channels(100), other_pool, metrics, previous=before)["same"] is not before["same"]
