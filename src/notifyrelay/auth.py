"""Who may connect and what they may follow: JWT bearer tokens (auth mode ``jwt``), checked at the handshake.

A token is found in ``Authorization: Bearer``, in an offered ``Sec-WebSocket-Protocol`` value (browsers cannot set
headers; the server selects that value in its answer) or in the ``token`` query parameter, in that order. It is
verified against keys loaded once at startup: an HS256 secret (``auth.jwt_secret_file``), an RSA or EC public key
in PEM (``auth.jwt_public_key_file``) or a JWKS (``auth.jwks_file``). ``exp`` is required, ``nbf`` honoured, an
``iat`` in the future refused (no leeway, as for ``nbf``: the issuer's clock and the relay's must agree), a time
past the year 9999 refused, ``aud``/``iss`` checked when configured. The ``channels`` claim becomes the
connection's grants::

    {"sub": "ui-7", "exp": 1790000000, "channels": {"activity_progress": ["42", "43"], "system_stability": "*"}}

Nothing here logs a token; errors carry a short reason (for metrics) and a sentence (for the 401 body).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from websockets.datastructures import Headers

from .config import AuthConfig
from .exceptions import AuthError, ConfigError
from .ops.log import register_secret
from .protocol import WILDCARD

CHANNELS_CLAIM = "channels"
# A JWT in compact form: three base64url segments. Only such an offered subprotocol is taken for a token.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# Never "none", never an algorithm the configured key was not made for (no RS256/HS256 confusion).
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
_SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
# 9999-12-31T23:59:59Z. A time claim past it is no time anyone means, and would overflow a float or a datetime.
MAX_UNIX_TIME = 253_402_300_799


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows: channel -> keys (None: every key), until ``expires_at`` (Unix time)."""

    subject: str | None
    channels: dict[str, frozenset[str] | None]
    expires_at: float


@dataclass(frozen=True, slots=True)
class FoundToken:
    """A token taken from a request, where it came from, and the subprotocol to select (when it came as one)."""

    token: str
    source: str  # "header", "subprotocol" or "query"
    subprotocol: str | None = None


def find_token(headers: Headers, path: str) -> FoundToken | None:
    """The bearer token of an upgrade request, or None when it carries none; AuthError for an ambiguous request."""
    authorizations = headers.get_all("Authorization")
    if len(authorizations) > 1:
        raise AuthError("malformed", "the request carries more than one Authorization header")
    authorization = authorizations[0] if authorizations else None
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return FoundToken(value.strip(), "header")
    for line in headers.get_all("Sec-WebSocket-Protocol"):
        for candidate in (part.strip() for part in line.split(",")):
            if _JWT_SHAPE.fullmatch(candidate):
                return FoundToken(candidate, "subprotocol", subprotocol=candidate)
    tokens = parse_qs(urlsplit(path).query).get("token")
    if tokens and tokens[0]:
        return FoundToken(tokens[0], "query")
    return None


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    algorithms: frozenset[str]
    kid: str | None = None


class Authenticator:
    """Verifies bearer tokens against the keys of ``[auth]``, loaded (and checked) when it is built."""

    def __init__(self, settings: AuthConfig) -> None:
        self.settings = settings
        self._keys = _load_keys(settings)
        # Short keys raise instead of warning: _load_keys has already refused them, this covers JWKS members too.
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})

    @classmethod
    def from_config(cls, settings: AuthConfig) -> Authenticator | None:
        """An Authenticator for mode ``jwt``, None for mode ``none``; ConfigError names the key of a bad setting."""
        return cls(settings) if settings.mode == "jwt" else None

    def authenticate(self, token: str | None) -> Grant:
        """Verify a token and return its grant, or raise AuthError."""
        if not token:
            raise AuthError("missing", "a bearer token is required (Authorization header, subprotocol or ?token=)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "the token is not a well-formed JWT") from None
        key = self._key_for(header)
        settings = self.settings
        try:
            claims = self._jwt.decode(
                token,
                key.key,
                algorithms=sorted(key.algorithms),
                audience=settings.audience or None,
                issuer=settings.issuer or None,
                # iat is checked below, so that a future one is refused with its own name (PyJWT says nbf).
                options={"require": ["exp"], "verify_aud": bool(settings.audience), "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("audience", "the token is meant for another audience (aud)") from None
        except jwt.MissingRequiredClaimError as exc:
            reason = {"aud": "audience", "iss": "issuer"}.get(exc.claim, "claims")
            raise AuthError(reason, f'the token lacks the required "{exc.claim}" claim') from None
        except jwt.InvalidIssuerError:
            raise AuthError("issuer", "the token was issued by an issuer this relay does not trust") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm", "the token is signed with an algorithm this relay does not accept") from None
        except jwt.InvalidSignatureError:
            raise AuthError("signature", "the token's signature does not verify") from None
        except jwt.PyJWTError:
            raise AuthError("malformed", "the token is not a valid JWT") from None
        expires_at = claimed_time(claims, "exp")
        if "iat" in claims and claimed_time(claims, "iat") > time.time():
            raise AuthError("not_yet_valid", "the token's iat (issued at) is in the future: its issuer's clock is "
                            "ahead of this relay's")
        return Grant(
            subject=claims.get("sub") if isinstance(claims.get("sub"), str) else None,
            channels=grants_from_claim(claims.get(CHANNELS_CLAIM)),
            expires_at=float(expires_at),
        )

    def _key_for(self, header: Mapping[str, Any]) -> _Key:
        algorithm = header.get("alg")
        kid = header.get("kid")
        if kid is None:
            candidates = self._keys
        else:  # a JWKS member by its kid; a PEM key or secret (no kid) serves any kid
            candidates = [k for k in self._keys if k.kid == kid] or [k for k in self._keys if k.kid is None]
        if not candidates:
            raise AuthError("unknown_key", "the token names a key (kid) this relay does not know")
        for key in candidates:
            if algorithm in key.algorithms:
                return key
        raise AuthError("algorithm", "the token is signed with an algorithm this relay does not accept")


def claimed_time(claims: Mapping[str, Any], name: str) -> int:
    """A time claim as PyJWT reads it (a number, or digits in a string), or AuthError when it is not one or lies
    past the year 9999 (``exp: 1e400`` as an integer: a float cannot hold it)."""
    try:
        value = int(claims[name])
    except (TypeError, ValueError, OverflowError):
        raise AuthError("claims", f'the token\'s "{name}" claim is not a Unix time') from None
    if value > MAX_UNIX_TIME:
        raise AuthError("claims", f'the token\'s "{name}" claim lies past the year 9999, which is not a time this '
                        "relay accepts")
    return value


def grants_from_claim(claim: Any) -> dict[str, frozenset[str] | None]:
    """The ``channels`` claim as grants: channel -> allowed keys, None for ``"*"``; raise AuthError if malformed."""
    if not isinstance(claim, dict):
        raise AuthError("claims", f'the token needs a "{CHANNELS_CLAIM}" claim: an object of channel -> keys or "*"')
    grants: dict[str, frozenset[str] | None] = {}
    for channel, keys in claim.items():
        if keys == WILDCARD or (isinstance(keys, list) and WILDCARD in keys):
            grants[channel] = None
        elif isinstance(keys, list) and all(isinstance(key, str) for key in keys):
            grants[channel] = frozenset(keys)
        else:
            raise AuthError("claims", f'the "{CHANNELS_CLAIM}" claim must map each channel to a list of keys or "*"')
    return grants


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path!r}: {exc.strerror}", key=key) from None


def _load_keys(settings: AuthConfig) -> list[_Key]:
    keys: list[_Key] = []
    if settings.jwt_secret_file:
        keys.append(_load_secret(settings.jwt_secret_file))
    if settings.jwt_public_key_file:
        keys.append(_load_public_key(settings.jwt_public_key_file))
    if settings.jwks_file:
        keys.extend(_load_jwks(settings.jwks_file))
    if settings.mode == "jwt" and not keys:  # config._check says so too; kept for a Config built by hand
        raise ConfigError("needs jwt_secret_file, jwt_public_key_file or jwks_file", key="auth.mode")
    return keys


def _load_secret(source: str) -> _Key:
    """An HS256 secret from a file (trailing newline ignored) or, with ``env:NAME``, from an environment variable."""
    name = "auth.jwt_secret_file"
    if source.startswith("env:"):
        variable = source[4:]
        value = os.environ.get(variable)
        if not value:
            raise ConfigError(f"environment variable {variable!r} is not set or empty", key=name)
        secret = value.encode()
    else:
        secret = _read(source, name).rstrip(b"\r\n")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the HS256 secret is {len(secret)} bytes; use at least {MIN_SECRET_BYTES}", key=name)
    register_secret(secret.decode(errors="replace"))
    return _Key(secret, frozenset({"HS256"}))


def _load_public_key(path: str) -> _Key:
    """An RSA or EC public key (or a certificate holding one) in PEM; its type decides the algorithm."""
    name = "auth.jwt_public_key_file"
    data = _read(path, name)
    try:
        public_key: Any = (
            load_pem_x509_certificate(data).public_key()
            if b"BEGIN CERTIFICATE" in data
            else load_pem_public_key(data)
        )
    except ValueError as exc:
        raise ConfigError(f"{path!r} holds no PEM public key or certificate ({exc})", key=name) from None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise ConfigError(f"the RSA key is {public_key.key_size} bits; use at least 2048", key=name)
        return _Key(public_key, frozenset({"RS256"}))
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in _EC_ALGORITHMS:
        return _Key(public_key, frozenset({_EC_ALGORITHMS[public_key.curve.name]}))
    raise ConfigError(f"{path!r}: expected an RSA or EC (P-256/384/521) public key", key=name)


def _load_jwks(path: str) -> list[_Key]:
    """Every usable key of a JWKS, each bound to its own algorithm (``alg``, else what its type implies)."""
    name = "auth.jwks_file"
    data = _read(path, name)
    try:
        jwks = jwt.PyJWKSet.from_json(data.decode())
    except (ValueError, jwt.PyJWTError) as exc:
        raise ConfigError(f"{path!r} is not a usable JWKS ({exc})", key=name) from None
    keys: list[_Key] = []
    for jwk in jwks.keys:
        algorithm = jwk.algorithm_name
        if algorithm not in _ASYMMETRIC | _SYMMETRIC:
            raise ConfigError(f"key {jwk.key_id!r} has algorithm {algorithm!r}, which is not accepted", key=name)
        problem = jwk.Algorithm.check_key_length(jwk.key)
        if problem:
            raise ConfigError(f"key {jwk.key_id!r}: {problem}", key=name)
        keys.append(_Key(jwk.key, frozenset({algorithm}), kid=jwk.key_id))
    return keys
