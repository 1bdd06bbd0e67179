"""The container's HEALTHCHECK: GET /healthz on the relay's own probe address; exit 0 if it answers 200, else 1.

The address comes from the same configuration the daemon reads ($NOTIFYRELAY_CONFIG and NOTIFYRELAY_* variables):
admin.listen when set, else server.listen, with https when TLS is configured. NOTIFYRELAY_HEALTHCHECK_URL
overrides it. Liveness only: /healthz never depends on PostgreSQL (readiness is /readyz).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def healthz_url() -> str:
    override = os.environ.get("NOTIFYRELAY_HEALTHCHECK_URL")
    if override:
        return override
    from notifyrelay.config import load_config, parse_listen

    config = load_config(os.environ.get("NOTIFYRELAY_CONFIG") or None)
    key = "admin.listen" if config.admin.listen else "server.listen"
    host, port = parse_listen(config.admin.listen or config.server.listen, key)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    scheme = "https" if config.server.tls_cert_file else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/healthz"


def main() -> int:
    try:
        url = healthz_url()
        context = ssl._create_unverified_context() if url.startswith("https") else None  # our own cert, on loopback
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # any failure is "unhealthy", with the reason in `docker inspect`
        print(f"healthcheck failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
