"""TLS for the client's connections, and the rule that a token never crosses a network in clear.

`https://` and `grpcs://` endpoints verify the server against `ClientTls.ca` (a PEM bundle;
without one, the system's roots) and, for mutual TLS, present `cert` + `key`. A token is
refused over `http://` or `grpc://` to anything but a loopback address unless the caller
says `allow_insecure_token=True` (a private network it trusts).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from teacher_server.shared.net import is_loopback

SECURE_SCHEMES = {"https": "http", "grpcs": "grpc"}
"""Each secure scheme and its clear-text twin."""


@dataclass(frozen=True)
class ClientTls:
    """PEM files: the roots that verify the server, and this client's own certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key (tls cert and key go together)")
        for path in (self.ca, self.cert, self.key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {str(path)!r} does not exist")

    def ssl_context(self) -> ssl.SSLContext:
        """For httpx: verify the server (hostname included), present our certificate."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )


def check_endpoint(
    url: str, *, token: str | None, tls: ClientTls | None, allow_insecure_token: bool
) -> None:
    """ValueError for a token in clear text off loopback, or TLS files for a clear endpoint."""
    parts = urlsplit(url)
    if parts.scheme in SECURE_SCHEMES:
        return
    if tls is not None and (tls.ca or tls.cert):
        secure = {v: k for k, v in SECURE_SCHEMES.items()}.get(parts.scheme, "https")
        raise ValueError(
            f"TLS files are set but {url!r} is clear text; use {secure}://{parts.netloc}"
        )
    if token and not allow_insecure_token and not is_loopback(parts.hostname or ""):
        raise ValueError(
            f"refusing to send the token in clear text to {parts.hostname!r}: use https:// or "
            "grpcs:// (TLS), or allow_insecure_token (teacher.allow_insecure_token in a student "
            "config) on a network you trust"
        )


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
