"""Secrets are scrubbed from log text whatever carries them."""

from notifyrelay.ops.log import scrub


def test_jwt_shaped_strings_are_scrubbed_anywhere() -> None:
    """A JWT is removed even where no header or parameter name announces it (e.g. an offered subprotocol)."""
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1aS03In0.c2lnbmF0dXJl"
    assert token not in scrub(f"Sec-WebSocket-Protocol: {token}, json")
    assert "***" in scrub(f"subprotocol={token}")
