"""TLS on the listener: a wss:// handshake (and https probes) with a certificate made in the test."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from tests.conftest import Database, RelayFactory

CHANNEL = "activity_progress"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "notifyrelay test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def client_context(cert_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cert_file)
    return context


async def test_wss_handshake_with_a_test_certificate(
    make_relay: RelayFactory, certificate: tuple[Path, Path], database: Database
) -> None:
    """With tls_cert_file/tls_key_file set the relay speaks wss://, verifiably, and relays notifications over it."""
    cert_file, key_file = certificate
    relay = await make_relay(**{
        "server.tls_cert_file": str(cert_file), "server.tls_key_file": str(key_file), "coalesce.window_ms": 0,
    })
    assert relay.server.url.startswith("wss://127.0.0.1:")
    async with connect(relay.server.url + f"?channel={CHANNEL}", ssl=client_context(cert_file)) as ws:
        assert '"welcome"' in str(await ws.recv())
        assert '"ack"' in str(await ws.recv())
        assert ws.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        await database.notify(CHANNEL, "42")
        assert '"keys":["42"]' in str(await asyncio.wait_for(ws.recv(), 5))
    # The probes are served over TLS too.
    url = relay.server.url.replace("wss://", "https://").removesuffix("/ws") + "/healthz"
    status = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=5, context=client_context(cert_file)).status
    )
    assert status == 200


async def test_plain_and_unverified_clients_are_refused(
    make_relay: RelayFactory, certificate: tuple[Path, Path]
) -> None:
    """A plain ws:// client cannot talk to the TLS listener, and a client that does not trust the certificate fails."""
    cert_file, key_file = certificate
    relay = await make_relay(**{"server.tls_cert_file": str(cert_file), "server.tls_key_file": str(key_file)})
    with pytest.raises((InvalidMessage, ConnectionError, EOFError)):
        async with connect(relay.server.url.replace("wss://", "ws://"), open_timeout=3):
            pass
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(relay.server.url, ssl=ssl.create_default_context(), open_timeout=3):
            pass


async def test_admin_listener_serves_probes_over_tls(
    make_relay: RelayFactory, certificate: tuple[Path, Path]
) -> None:
    """With [admin] listen set, the probes move there and are served over TLS with the same certificate."""
    cert_file, key_file = certificate
    relay = await make_relay(**{
        "server.tls_cert_file": str(cert_file), "server.tls_key_file": str(key_file), "admin.listen": "127.0.0.1:0",
    })
    url = f"https://127.0.0.1:{relay.server.admin_port}/healthz"
    status = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=5, context=client_context(cert_file)).status
    )
    assert status == 200
