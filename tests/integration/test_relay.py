"""The relay core end to end: a real PostgreSQL, the relay on port 0, real websocket clients."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import asyncpg
import pytest

from tests.conftest import ClientFactory, Database, RelayFactory, sample, wait_until

CHANNEL = "activity_progress"


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def probe(relay: object, path: str) -> tuple[int, str, str]:
    base = relay.server.url.removesuffix("/ws")  # type: ignore[attr-defined]
    return await asyncio.to_thread(http_get, base.replace("ws://", "http://") + path)


async def test_key_followers_get_their_keys_and_wildcard_followers_get_all(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """A client following 42 receives 42 and nothing for 43; a * client receives both."""
    relay = await make_relay()
    one = await make_client(relay)
    assert (await one.subscribe(CHANNEL, ["42"], "s1")) == {
        "type": "ack", "op": "subscribe", "id": "s1", "channel": CHANNEL, "keys": ["42"]
    }
    every = await make_client(relay, f"?channel={CHANNEL}")
    assert (await every.recv())["keys"] == ["*"]
    await database.notify(CHANNEL, "43", "42")
    got_one = [f for f in await one.frames_for(0.6) if f["type"] == "notify"]
    got_every = [f for f in await every.frames_for(0.1) if f["type"] == "notify"]
    assert [k for f in got_one for k in f["keys"]] == ["42"]
    assert sorted(k for f in got_every for k in f["keys"]) == ["42", "43"]
    assert got_one[0]["channel"] == CHANNEL and isinstance(got_one[0]["seq"], int)


async def test_a_flood_for_one_key_arrives_as_a_handful_of_frames(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """1,000 notifications for one key within a second reach a client as at most one frame per window."""
    relay = await make_relay()
    client = await make_client(relay, f"?channel={CHANNEL}&key=42")
    await client.recv()  # ack
    conn = await asyncpg.connect(database.dsn)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # 1,000 transactions (PostgreSQL itself folds identical notifications within one), over about a second.
    for n in range(1000):
        await conn.execute("SELECT pg_notify($1, '42')", CHANNEL)
        if n % 10 == 9:
            await asyncio.sleep(0.008)
    sending = loop.time() - started
    await conn.close()
    frames = [f for f in await client.frames_for(0.6) if f["type"] == "notify"]
    assert all(f["keys"] == ["42"] for f in frames)
    # The leading frame, then at most one per 200 ms window while sending, then the trailing one.
    assert 2 <= len(frames) <= int(sending / 0.2) + 2, (len(frames), sending)
    assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})
    received = sample(relay.metrics, "notifyrelay_notifications_received_total", channel=CHANNEL)
    assert received == 1000


async def test_a_lone_notification_does_not_wait_for_the_window(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """On an idle channel the leading edge flushes at once, long before a (5 s) window would end."""
    relay = await make_relay(**{"coalesce.window_ms": 5000})
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    await database.notify(CHANNEL, "7")
    frame = await client.recv_type("notify", timeout=2)
    assert frame["keys"] == ["7"]


async def test_window_zero_sends_every_notification(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """With window_ms = 0 every notification is its own batch, with consecutive seq numbers."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    await database.notify(CHANNEL, *["5"] * 20)
    frames = [f for f in await client.frames_for(1.0) if f["type"] == "notify"]
    assert len(frames) == 20
    assert [f["seq"] for f in frames] == list(range(frames[0]["seq"], frames[0]["seq"] + 20))


async def test_json_keys_and_payloads(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """json:FIELD takes string or integer keys; payloads are parsed JSON, last one wins; bad payloads are dropped."""
    relay = await make_relay(
        channels=[{"name": "jobs", "key": "json:id", "include_payload": True},
                  {"name": "plain", "include_payload": True}]
    )
    client = await make_client(relay, "?channel=jobs")
    await client.recv()
    plain = await make_client(relay, "?channel=plain")
    await plain.recv()
    await database.notify(
        "jobs", '{"id": 1, "n": 1}', "not json", '{"other": 1}', '{"id": [1]}', '{"id": "a", "n": 2}',
        '{"id": 1, "n": 3}',
    )
    await database.notify("plain", "hello")
    frames = [f for f in await client.frames_for(0.8) if f["type"] == "notify"]
    keys = [k for f in frames for k in f["keys"]]
    assert sorted(set(keys)) == ["1", "a"]
    last = {k: f["payloads"][k] for f in frames for k in f["keys"]}
    assert last == {"1": {"id": 1, "n": 3}, "a": {"id": "a", "n": 2}}
    assert (await plain.recv_type("notify"))["payloads"] == {"hello": "hello"}
    assert sample(relay.metrics, "notifyrelay_bad_payloads_total", channel="jobs") == 3


@pytest.mark.parametrize("name", ["Weird.Chan nel", "CamelCase", "quote\"d", "ünïcode-chän"])
async def test_awkward_channel_names_are_listened_on_correctly(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, name: str
) -> None:
    """Channel names with dots, capitals, spaces, quotes and non-ASCII are quoted and relayed exactly."""
    relay = await make_relay(channels=[{"name": name}])
    client = await make_client(relay)
    assert (await client.subscribe(name, ["*"]))["type"] == "ack"
    await database.notify(name, "k")
    assert (await client.recv_type("notify"))["channel"] == name


async def test_every_client_error_gets_its_code_and_the_connection_stays_open(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """Malformed, unknown and over-limit frames get error frames with SPEC codes; ping still answers after."""
    relay = await make_relay(**{"server.max_subscriptions": 2})
    client = await make_client(relay)
    cases = [
        ("{nope", "bad_json"),
        ('{"op":"subscribe","channel":"activity_progress","keys":[]}', "bad_request"),
        ('{"op":"fly","id":"f"}', "unknown_op"),
        ('{"op":"subscribe","channel":"elsewhere","keys":["1"],"id":"u"}', "unknown_channel"),
        ('{"op":"subscribe","channel":"activity_progress","keys":["1","2","3"]}', "too_many_subscriptions"),
    ]
    for text, code in cases:
        await client.send(text)
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] == code, frame
        assert frame["message"]
    await client.connection.send(b"\x00binary")
    assert (await client.recv())["code"] == "bad_request"
    await client.send({"op": "ping", "id": "p1"})
    assert await client.recv() == {"type": "pong", "id": "p1"}
    assert sample(relay.metrics, "notifyrelay_client_errors_total", code="bad_json") == 1


async def test_unsubscribe_stops_delivery(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """After unsubscribing a key, its notifications no longer reach the client, other keys still do."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    client = await make_client(relay, f"?channel={CHANNEL}&key=1&key=2")
    assert (await client.recv())["keys"] == ["1", "2"]
    await client.send({"op": "unsubscribe", "channel": CHANNEL, "keys": ["1"], "id": "x"})
    assert await client.recv() == {"type": "ack", "op": "unsubscribe", "id": "x", "channel": CHANNEL, "keys": ["1"]}
    await database.notify(CHANNEL, "1", "2")
    frames = [f for f in await client.frames_for(0.5) if f["type"] == "notify"]
    assert [k for f in frames for k in f["keys"]] == ["2"]


async def test_query_string_errors_arrive_after_the_welcome(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """A bad query-string subscription is answered with an error frame; the connection stays usable."""
    relay = await make_relay()
    client = await make_client(relay, "?channel=nope&key=1")
    assert (await client.recv())["code"] == "unknown_channel"
    client = await make_client(relay, "?key=1")
    assert (await client.recv())["code"] == "bad_request"
    await client.send({"op": "ping"})
    assert await client.recv() == {"type": "pong"}


async def test_probes_and_metrics_on_the_websocket_port(make_relay: RelayFactory) -> None:
    """/healthz and /readyz answer 200 when listening, /metrics is Prometheus text, other paths 404."""
    relay = await make_relay()
    assert (await probe(relay, "/healthz"))[0] == 200
    status, content_type, body = await probe(relay, "/readyz")
    assert status == 200 and content_type == "application/json" and '"ready":true' in body
    status, content_type, body = await probe(relay, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "notifyrelay_listener_up 1.0" in body
    assert (await probe(relay, "/nope"))[0] == 404


async def test_readyz_is_503_with_a_reason_until_the_listener_is_up(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """With no database to reach, the relay still serves: healthz 200, readyz 503 naming the listener."""
    relay = await make_relay(dsn="postgresql://postgres@127.0.0.1:1/postgres", wait_ready=False)
    assert (await probe(relay, "/healthz"))[0] == 200
    status, _, body = await probe(relay, "/readyz")
    assert status == 503 and "listener down" in body
    client = await make_client(relay)  # the welcome says the listener is down
    assert relay.hub.listener_is_up is False
    await client.send({"op": "ping"})
    assert (await client.recv())["type"] == "pong"


async def test_seq_counts_batches_per_channel(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """seq grows by one per batch on each channel independently."""
    relay = await make_relay(channels=[{"name": "a"}, {"name": "b"}], **{"coalesce.window_ms": 0})
    client = await make_client(relay, "?channel=a&channel=b")
    await client.recv()
    await client.recv()
    await database.notify("a", "1", "2")
    await database.notify("b", "1")
    frames = [f for f in await client.frames_for(0.6) if f["type"] == "notify"]
    by_channel = {c: [f["seq"] for f in frames if f["channel"] == c] for c in ("a", "b")}
    assert by_channel == {"a": [1, 2], "b": [1]}
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_batches_total", channel="a") == 2)


async def test_every_frame_type_is_counted(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """messages_sent_total counts welcome, ack, pong and error frames as well as notify/status/resync."""
    relay = await make_relay()
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    await client.send({"op": "ping"})
    await client.recv()
    await client.send("{")
    await client.recv()
    sample = relay.metrics.registry.get_sample_value
    counts = [sample("notifyrelay_messages_sent_total", {"type": kind, "transport": "websocket"})
              for kind in ("welcome", "ack", "pong", "error")]
    assert counts == [1, 1, 1, 1]


async def test_reload_keeps_restart_only_settings_and_survives_an_unreadable_dsn_file(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, tmp_path: object
) -> None:
    """A reload that changes window_ms leaves the running value in force (welcome says so); a reload whose
    dsn_file cannot be read is refused and the relay carries on."""
    from pathlib import Path

    folder = Path(str(tmp_path))
    dsn_file = folder / "dsn"
    dsn_file.write_text(database.dsn)
    config = folder / "relay.toml"
    config.write_text(f'dsn_file = "{dsn_file}"\n[coalesce]\nwindow_ms = 1000\n[server]\nmax_subscriptions = 7\n'
                      f'write_high_water_bytes = 2048\n[[channels]]\nname = "{CHANNEL}"\n')
    relay = await make_relay(dsn="", **{"dsn_file": str(dsn_file)})
    relay.config_path = str(config)
    relay.overrides = {"server.listen": "127.0.0.1:0"}
    assert await relay.reload() is True
    client = await make_client(relay)
    assert relay.config.coalesce.window_ms == 200 and relay.server.config.coalesce.window_ms == 200
    assert relay.config.server.write_high_water_bytes == 65536  # a serve() option: restart only
    assert relay.hub.settings.max_subscriptions == 7  # a live limit: taken
    dsn_file.unlink()
    assert await relay.reload() is False
    await client.send({"op": "ping"})
    assert (await client.recv())["type"] == "pong"


async def test_close_codes_a_client_invents_do_not_become_label_values(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """connections_closed_total labels known close codes only; anything else counts as 'other'."""
    relay = await make_relay()
    client = await make_client(relay)
    await client.connection.close(4999, "mine")
    await wait_until(lambda: not relay.hub.transports)
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_connections_closed_total", code="other") == 1)
    assert 'code="4999"' not in relay.metrics.exposition().decode()
