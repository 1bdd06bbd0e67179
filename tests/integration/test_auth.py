"""Auth mode jwt and the Origin allowlist against a live relay: who gets in, what they may follow, and for how long."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from notifyrelay.app import Relay
from notifyrelay.ops.log import configure_logging
from tests.conftest import Client, ClientFactory, Database, RelayFactory, sample

CHANNEL = "activity_progress"
SECRET = "integration-test secret, at least thirty-two bytes long"


def token(secret: str = SECRET, **overrides: Any) -> str:
    claims: dict[str, Any] = {"sub": "ui-7", "exp": int(time.time()) + 3600, "channels": {CHANNEL: ["42", "43"]}}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256")


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "jwt-secret"
    path.write_text(SECRET + "\n")
    return str(path)


@pytest.fixture
async def relay(make_relay: RelayFactory, secret_file: str) -> Relay:
    return await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": secret_file, "coalesce.window_ms": 0})


async def refused(relay: Relay, query: str = "", **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(relay.server.url + query, **kwargs):
            pass
    return caught.value


def auth_failures(relay: Relay, reason: str) -> float:
    return sample(relay.metrics, "notifyrelay_auth_failures_total", reason=reason)


async def test_missing_token_is_refused_with_401(relay: Relay) -> None:
    """No token at all: 401 with a WWW-Authenticate challenge and a sentence, before any websocket opens."""
    exc = await refused(relay)
    assert exc.response.status_code == 401
    assert exc.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"token is required" in exc.response.body
    assert auth_failures(relay, "missing") == 1
    assert not relay.hub.transports


@pytest.mark.parametrize(
    ("bad_token", "reason"),
    [
        ("not-a-jwt", "malformed"),
        (token(secret="a different secret, at least thirty-two bytes long"), "signature"),
        (token(exp=int(time.time()) - 10), "expired"),
        (token(channels=None), "claims"),
    ],
    ids=["malformed", "wrong-signature", "expired", "no-channels-claim"],
)
async def test_invalid_tokens_are_refused_with_401(relay: Relay, bad_token: str, reason: str) -> None:
    """Malformed, wrongly signed, expired and claim-less tokens get 401, each counted under its reason."""
    exc = await refused(relay, additional_headers={"Authorization": f"Bearer {bad_token}"})
    assert exc.response.status_code == 401
    assert auth_failures(relay, reason) == 1


async def test_wrong_audience_is_refused(make_relay: RelayFactory, secret_file: str) -> None:
    """With auth.audience set, a token for another audience (or none) gets 401; the right one is admitted."""
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": secret_file, "auth.audience": "relay"})
    for aud in ("billing", None):
        exc = await refused(relay, additional_headers={"Authorization": f"Bearer {token(aud=aud)}"})
        assert exc.response.status_code == 401
    assert auth_failures(relay, "audience") == 2
    async with connect(relay.server.url, additional_headers={"Authorization": f"Bearer {token(aud='relay')}"}) as ws:
        assert b'"welcome"' in (await ws.recv()).encode()


async def test_token_in_header_subprotocol_and_query(relay: Relay, make_client: ClientFactory) -> None:
    """Each of the three token carriers admits the client; an offered token is selected back as the subprotocol."""
    good = token()
    header = await make_client(relay, additional_headers={"Authorization": f"Bearer {good}"})
    assert header.connection.subprotocol is None
    browser = await make_client(relay, subprotocols=[Subprotocol("notifyrelay.v1"), Subprotocol(good)])
    assert browser.connection.subprotocol == good
    query = await make_client(relay, f"?token={good}&channel={CHANNEL}&key=42")
    assert (await query.recv())["type"] == "ack"
    for client in (header, browser):
        assert (await client.subscribe(CHANNEL, ["42"]))["type"] == "ack"


async def test_jwks_es256_token_from_a_browser(
    make_relay: RelayFactory, make_client: ClientFactory, tmp_path: Path, database: Database
) -> None:
    """With a JWKS, an ES256 token offered as a browser subprotocol is verified by its kid and its grant enforced."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwks_file": str(tmp_path / "jwks.json"),
                                "coalesce.window_ms": 0})
    claims = {"exp": int(time.time()) + 60, "channels": {CHANNEL: ["42"]}}
    signed = jwt.encode(claims, private, algorithm="ES256", headers={"kid": "k1"})
    browser = await make_client(relay, f"?channel={CHANNEL}&key=42", subprotocols=[Subprotocol(signed)])
    assert browser.connection.subprotocol == signed
    assert (await browser.recv())["type"] == "ack"
    assert (await browser.subscribe(CHANNEL, ["43"]))["code"] == "forbidden"
    await database.notify(CHANNEL, "43", "42")
    assert (await browser.recv_type("notify"))["keys"] == ["42"]
    hs256 = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})
    assert (await refused(relay, subprotocols=[Subprotocol(hs256)])).response.status_code == 401


async def test_claim_too_narrow_is_forbidden(relay: Relay, make_client: ClientFactory, database: Database) -> None:
    """Keys, channels and "*" beyond the claim get forbidden; granted keys are acked and delivered, nothing else."""
    client = await make_client(relay, additional_headers={"Authorization": f"Bearer {token()}"})
    assert (await client.subscribe(CHANNEL, ["42"], "a"))["type"] == "ack"
    for keys in (["44"], ["42", "44"], ["*"]):
        answer = await client.subscribe(CHANNEL, keys, "b")
        assert (answer["type"], answer["code"], answer["id"]) == ("error", "forbidden", "b")
    await database.notify(CHANNEL, "44", "42")
    frames = [f for f in await client.frames_for(0.5) if f["type"] == "notify"]
    assert [key for frame in frames for key in frame["keys"]] == ["42"]
    # The same in the query string: the connection stays open and says why.
    narrow = await make_client(relay, f"?channel={CHANNEL}", additional_headers={"Authorization": f"Bearer {token()}"})
    assert (await narrow.recv())["code"] == "forbidden"
    assert (await narrow.send({"op": "ping", "id": "p"})) is None and (await narrow.recv())["type"] == "pong"


async def test_claim_wildcard_follows_everything(relay: Relay, make_client: ClientFactory, database: Database) -> None:
    """A channels claim of "*" may subscribe to every key, and receives them."""
    everything = {"Authorization": f"Bearer {token(channels={CHANNEL: '*'})}"}
    client = await make_client(relay, f"?channel={CHANNEL}", additional_headers=everything)
    assert (await client.recv())["type"] == "ack"
    assert (await client.subscribe(CHANNEL, ["1", "2"]))["type"] == "ack"
    await database.notify(CHANNEL, "99")
    assert (await client.recv_type("notify"))["keys"] == ["99"]


async def test_connection_is_closed_with_4001_when_its_token_expires(relay: Relay, make_client: ClientFactory) -> None:
    """A token that expires during the connection closes it with 4001, and a new token is needed to come back."""
    short = token(exp=time.time() + 1.0)
    client = await make_client(relay, additional_headers={"Authorization": f"Bearer {short}"})
    assert (await client.subscribe(CHANNEL, ["42"]))["type"] == "ack"
    with pytest.raises(ConnectionClosed):
        await client.recv(timeout=3)
    assert client.connection.close_code == 4001
    assert sample(relay.metrics, "notifyrelay_token_expirations_total") == 1
    exc = await refused(relay, additional_headers={"Authorization": f"Bearer {short}"})
    assert exc.response.status_code == 401


async def test_tokens_never_reach_the_logs(relay: Relay, make_client: ClientFactory) -> None:
    """At log level debug, through the daemon's own logging pipeline, no token in any carrier reaches a log line."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in ("websockets", "asyncpg")}
    saved_structlog = structlog.get_config()
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        good, expired = token(), token(exp=int(time.time()) - 10)
        client = await make_client(relay, f"?token={good}")
        await client.connection.close()
        browser = await make_client(relay, subprotocols=[Subprotocol(good)])
        await browser.connection.close()
        for bad in (expired, "x" + good):
            await refused(relay, f"?token={bad}")
            await refused(relay, additional_headers={"Authorization": f"Bearer {bad}"})
            await refused(relay, subprotocols=[Subprotocol(bad)])
    finally:
        root.handlers[:], level, libraries = saved
        root.setLevel(level)
        for name, library_level in libraries.items():
            logging.getLogger(name).setLevel(library_level)
        structlog.configure(**saved_structlog)
    text = stream.getvalue()
    assert '"server.auth_failed"' in text
    for secret in (good, expired, "x" + good, SECRET):
        assert secret not in text


async def test_unauthenticated_public_listener_warns(make_relay: RelayFactory) -> None:
    """Auth mode none on a non-loopback address logs server.unauthenticated; on loopback it does not."""
    with capture_logs() as events:
        await make_relay(**{"server.listen": "0.0.0.0:0"})
        await make_relay()
    warnings = [e for e in events if e["event"] == "server.unauthenticated"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["listen"] == "0.0.0.0:0"


async def test_origin_allowlist(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """A browser Origin outside server.allowed_origins gets 403; a listed one and a non-browser client get in."""
    relay = await make_relay(**{"server.allowed_origins": ["https://app.example"]})
    exc = await refused(relay, origin="https://evil.example")
    assert exc.response.status_code == 403
    assert sample(relay.metrics, "notifyrelay_handshake_rejections_total", reason="origin") == 1
    assert isinstance(await make_client(relay, origin="https://app.example"), Client)
    assert isinstance(await make_client(relay), Client)


def test_bad_key_file_exits_2_naming_the_key(tmp_path: Path, database: Database) -> None:
    """``notifyrelay run`` with auth mode jwt and an unreadable secret file exits 2 and names auth.jwt_secret_file."""
    config = tmp_path / "relay.toml"
    config.write_text(
        f'dsn = "{database.dsn}"\n[server]\nlisten = "127.0.0.1:0"\n'
        f'[auth]\nmode = "jwt"\njwt_secret_file = "{tmp_path / "missing"}"\n'
        f'[[channels]]\nname = "{CHANNEL}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "notifyrelay", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "auth.jwt_secret_file" in result.stderr
