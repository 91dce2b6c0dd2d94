"""TLS on both of the server's ports, from `ServerConfig.tls_cert`/`tls_key`/`tls_client_ca`.

With a certificate and key, HTTP is HTTPS and gRPC a secure port; with a client CA as well,
both ask every client for a certificate signed by it (mutual TLS) and refuse the handshake
without one.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from teacher_server.server.config import ServerConfig


def uvicorn_ssl(server: ServerConfig) -> dict[str, Any]:
    """uvicorn.Config's TLS arguments (none without a certificate)."""
    if server.tls_cert is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(server.tls_cert),
        "ssl_keyfile": str(server.tls_key),
    }
    if server.tls_client_ca is not None:
        options["ssl_ca_certs"] = str(server.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def grpc_credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials, or None for a clear-text port."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    client_ca = server.tls_client_ca
    return grpc.ssl_server_credentials(
        [(Path(server.tls_key).read_bytes(), Path(server.tls_cert).read_bytes())],
        root_certificates=None if client_ca is None else Path(client_ca).read_bytes(),
        require_client_auth=client_ca is not None,
    )
