"""Token verification and key loading (auth.py), without a server: every refusal has its reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.datastructures import Headers

from notifyrelay.auth import Authenticator, find_token, grants_from_claim
from notifyrelay.config import AuthConfig
from notifyrelay.exceptions import AuthError, ConfigError

SECRET = "an HS256 secret of at least thirty-two bytes"
CLAIM = {"activity_progress": ["42", "43"], "system_stability": "*"}


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "ui-7", "exp": int(time.time()) + 60, "channels": CLAIM, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def hs256(tmp_path: Path) -> Authenticator:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    return Authenticator(AuthConfig(mode="jwt", jwt_secret_file=str(secret)))


def refusal(authenticator: Authenticator, token: str | None) -> str:
    with pytest.raises(AuthError) as caught:
        authenticator.authenticate(token)
    return caught.value.reason


def test_hs256_token_becomes_grants(hs256: Authenticator) -> None:
    """A valid HS256 token yields its subject, expiry and the channels claim as grants ("*" as None)."""
    grant = hs256.authenticate(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert grant.subject == "ui-7"
    assert grant.channels == {"activity_progress": frozenset({"42", "43"}), "system_stability": None}
    assert grant.expires_at > time.time()


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (lambda now: {"exp": now - 5}, "expired"),
        (lambda now: {"nbf": now + 60}, "not_yet_valid"),
        (lambda now: {"channels": ["activity_progress"]}, "claims"),
        (lambda now: {"channels": {"activity_progress": "42"}}, "claims"),
        (lambda now: {"channels": {"activity_progress": [42]}}, "claims"),
    ],
    ids=["expired", "nbf", "channels-list", "keys-string", "keys-int"],
)
def test_hs256_refusals(hs256: Authenticator, token_claims: Callable[[int], dict[str, Any]], reason: str) -> None:
    """Expired, not yet valid and badly shaped channels claims are refused with their own reason."""
    token = jwt.encode(claims(**token_claims(int(time.time()))), SECRET, algorithm="HS256")
    assert refusal(hs256, token) == reason


def test_missing_claims_and_tokens_are_refused(hs256: Authenticator) -> None:
    """No token, garbage, a token without exp or without channels, a wrong secret and alg none are all refused."""
    assert refusal(hs256, None) == "missing"
    assert refusal(hs256, "") == "missing"
    assert refusal(hs256, "not.a.jwt") == "malformed"
    assert refusal(hs256, "garbage") == "malformed"
    no_exp = {k: v for k, v in claims().items() if k != "exp"}
    assert refusal(hs256, jwt.encode(no_exp, SECRET, algorithm="HS256")) == "claims"
    no_channels = {k: v for k, v in claims().items() if k != "channels"}
    assert refusal(hs256, jwt.encode(no_channels, SECRET, algorithm="HS256")) == "claims"
    wrong = jwt.encode(claims(), "another secret of at least thirty-two bytes!", algorithm="HS256")
    assert refusal(hs256, wrong) == "signature"
    assert refusal(hs256, jwt.encode(claims(), None, algorithm="none")) == "algorithm"
    assert refusal(hs256, jwt.encode(claims(), SECRET + SECRET + SECRET, algorithm="HS512")) == "algorithm"


def test_audience_and_issuer_are_checked_when_configured(tmp_path: Path) -> None:
    """With audience and issuer set, a token must carry both, matching; without them set, neither is checked."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    strict = Authenticator(AuthConfig(mode="jwt", jwt_secret_file=str(secret), audience="relay", issuer="idp"))
    good = jwt.encode(claims(aud="relay", iss="idp"), SECRET, algorithm="HS256")
    assert strict.authenticate(good).subject == "ui-7"
    assert refusal(strict, jwt.encode(claims(aud="other", iss="idp"), SECRET, algorithm="HS256")) == "audience"
    assert refusal(strict, jwt.encode(claims(iss="idp"), SECRET, algorithm="HS256")) == "audience"
    assert refusal(strict, jwt.encode(claims(aud="relay", iss="evil"), SECRET, algorithm="HS256")) == "issuer"
    assert refusal(strict, jwt.encode(claims(aud="relay"), SECRET, algorithm="HS256")) == "issuer"
    lax = Authenticator(AuthConfig(mode="jwt", jwt_secret_file=str(secret)))
    assert lax.authenticate(jwt.encode(claims(aud="anything"), SECRET, algorithm="HS256")).subject == "ui-7"


def test_rs256_pem_and_no_algorithm_confusion(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token verifies against a PEM public key; an HS256 token "signed" with that public key does not."""
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(rsa_key))
    authenticator = Authenticator(AuthConfig(mode="jwt", jwt_public_key_file=str(pem)))
    assert authenticator.authenticate(jwt.encode(claims(), rsa_key, algorithm="RS256")).subject == "ui-7"
    # PyJWT refuses to HMAC with a PEM, so the forgery (HS256 keyed with the public key) is built by hand.
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims()).encode())
    signature = hmac.new(pem.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    assert refusal(authenticator, f"{signing_input}.{b64(signature)}") == "algorithm"


def test_es256_pem(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """An ES256 token verifies against a P-256 public key in PEM; an RS256-labelled one is refused."""
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(ec_key))
    authenticator = Authenticator(AuthConfig(mode="jwt", jwt_public_key_file=str(pem)))
    assert authenticator.authenticate(jwt.encode(claims(), ec_key, algorithm="ES256")).subject == "ui-7"
    other = ec.generate_private_key(ec.SECP256R1())
    assert refusal(authenticator, jwt.encode(claims(), other, algorithm="ES256")) == "signature"


def test_jwks_selects_by_kid(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """A JWKS holds several keys; the token's kid picks one, and an unknown kid is refused."""
    keys = []
    for kid, private, algorithm in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(private.public_key()))
        keys.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    authenticator = Authenticator(AuthConfig(mode="jwt", jwks_file=str(path)))
    for kid, private, algorithm in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
        token = jwt.encode(claims(), private, algorithm=algorithm, headers={"kid": kid})
        assert authenticator.authenticate(token).subject == "ui-7"
    assert refusal(authenticator, jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "zz"})) == (
        "unknown_key"
    )
    # The kid of the RSA key with an EC signature: the key decides the algorithm, not the token.
    assert refusal(authenticator, jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "r1"})) == (
        "algorithm"
    )


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``jwt_secret_file = "env:NAME"`` takes the HS256 secret from an environment variable."""
    monkeypatch.setenv("RELAY_JWT_SECRET", SECRET)
    authenticator = Authenticator(AuthConfig(mode="jwt", jwt_secret_file="env:RELAY_JWT_SECRET"))
    assert authenticator.authenticate(jwt.encode(claims(), SECRET, algorithm="HS256")).subject == "ui-7"


@pytest.mark.parametrize(
    ("setting", "content", "key", "words"),
    [
        ("jwt_secret_file", None, "auth.jwt_secret_file", "cannot read"),
        ("jwt_secret_file", b"short\n", "auth.jwt_secret_file", "at least 32"),
        ("jwt_secret_file", "env:NOTIFYRELAY_TEST_UNSET_VARIABLE", "auth.jwt_secret_file", "not set"),
        ("jwt_public_key_file", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
         "auth.jwt_public_key_file", "no PEM public key"),
        ("jwt_public_key_file", None, "auth.jwt_public_key_file", "cannot read"),
        ("jwks_file", b"{not json", "auth.jwks_file", "not a usable JWKS"),
        ("jwks_file", b'{"keys": []}', "auth.jwks_file", "not a usable JWKS"),
    ],
)
def test_bad_key_settings_name_their_key(
    tmp_path: Path, setting: str, content: bytes | str | None, key: str, words: str
) -> None:
    """A missing file, a short secret, an unset variable, a bad PEM or JWKS is a ConfigError naming its key."""
    value = str(tmp_path / "absent")
    if isinstance(content, str):
        value = content
    elif content is not None:
        (tmp_path / "file").write_bytes(content)
        value = str(tmp_path / "file")
    with pytest.raises(ConfigError) as caught:
        Authenticator(AuthConfig(mode="jwt", **{setting: value}))
    assert caught.value.key == key
    assert words in str(caught.value)


def test_weak_rsa_key_is_refused_at_startup(tmp_path: Path) -> None:
    """An RSA public key under 2048 bits is a configuration error, not a warning at every handshake."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = tmp_path / "weak.pem"
    pem.write_bytes(public_pem(weak))
    with pytest.raises(ConfigError, match="2048"):
        Authenticator(AuthConfig(mode="jwt", jwt_public_key_file=str(pem)))


def test_mode_none_has_no_authenticator() -> None:
    """Auth mode none builds no authenticator: the server admits everyone."""
    assert Authenticator.from_config(AuthConfig()) is None


def test_find_token_sources_in_order() -> None:
    """The Authorization header wins, then a JWT-shaped offered subprotocol (selected back), then ?token=."""
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    found = find_token(Headers({"Authorization": f"Bearer {token}", "Sec-WebSocket-Protocol": "x"}), "/ws?token=q")
    assert found is not None and (found.token, found.source, found.subprotocol) == (token, "header", None)
    headers = Headers()
    headers["Sec-WebSocket-Protocol"] = f"notifyrelay.v1, {token}"
    found = find_token(headers, "/ws?token=q")
    assert found is not None and (found.token, found.source, found.subprotocol) == (token, "subprotocol", token)
    found = find_token(Headers({"Authorization": "Basic dXNlcjpwdw=="}), "/ws?channel=c&token=abc")
    assert found is not None and (found.token, found.source) == ("abc", "query")
    assert find_token(Headers(), "/ws?channel=c") is None
    assert find_token(Headers({"Sec-WebSocket-Protocol": "chat"}), "/ws") is None


def test_grants_from_claim_shapes() -> None:
    """A list of keys, "*" and a list holding "*" are grants; anything else is refused."""
    assert grants_from_claim({"a": ["1"], "b": "*", "c": ["*"], "d": []}) == {
        "a": frozenset({"1"}), "b": None, "c": None, "d": frozenset()
    }
    for bad in (None, [], "*", {"a": "1"}, {"a": [1]}, {"a": {"k": 1}}):
        with pytest.raises(AuthError):
            grants_from_claim(bad)


def test_a_repeated_authorization_header_is_refused_as_malformed() -> None:
    """Two Authorization headers are ambiguous: refused (401 at the handshake), never a 500."""
    from websockets.datastructures import Headers

    from notifyrelay.auth import find_token

    headers = Headers([("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")])
    with pytest.raises(AuthError) as caught:
        find_token(headers, "/ws")
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    ("extra", "reason", "names"),
    [
        ({"exp": 10**400}, "claims", '"exp"'),
        ({"iat": 10**400}, "claims", '"iat"'),
        ({"nbf": 10**400}, "not_yet_valid", "(nbf)"),
        ({"exp": "soon"}, "malformed", "not a valid JWT"),
        ({"iat": "soon"}, "claims", '"iat"'),
    ],
    ids=["exp-huge", "iat-huge", "nbf-huge", "exp-text", "iat-text"],
)
def test_time_claims_out_of_range_are_refused_with_a_sentence(
    hs256: Authenticator, extra: dict[str, Any], reason: str, names: str
) -> None:
    """A validly signed token whose exp, iat or nbf is 10^400 or not a time is an AuthError naming it, never a crash."""
    with pytest.raises(AuthError) as caught:
        hs256.authenticate(jwt.encode(claims(**extra), SECRET, algorithm="HS256"))
    assert (caught.value.reason, names in caught.value.message) == (reason, True), caught.value.message


def test_an_iat_in_the_future_is_refused_naming_iat(hs256: Authenticator) -> None:
    """A token issued an hour from now is refused as not yet valid with a message about iat, not nbf."""
    with pytest.raises(AuthError) as caught:
        hs256.authenticate(jwt.encode(claims(iat=int(time.time()) + 3600), SECRET, algorithm="HS256"))
    assert caught.value.reason == "not_yet_valid"
    assert "iat" in caught.value.message and "nbf" not in caught.value.message
    grant = hs256.authenticate(jwt.encode(claims(iat=int(time.time()) - 5), SECRET, algorithm="HS256"))
    assert grant.subject == "ui-7"  # an iat in the past is fine


def test_an_exp_at_the_end_of_year_9999_is_accepted(hs256: Authenticator) -> None:
    """The largest accepted exp is 9999-12-31T23:59:59Z, and it becomes the grant's expiry exactly."""
    grant = hs256.authenticate(jwt.encode(claims(exp=253_402_300_799), SECRET, algorithm="HS256"))
    assert grant.expires_at == 253_402_300_799.0
