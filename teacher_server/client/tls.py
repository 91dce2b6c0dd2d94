"""TLS for the client's connections, and the rule that a token never crosses a network in clear.

`https://`, `grpcs://` and `grpcs+` (gRPC target) endpoints verify the server against
`ClientTls.ca` (a PEM bundle; without one, the system's roots) and, for mutual TLS, present
`cert` + `key`. A token is refused over `http://`, `grpc://` or a clear gRPC target to
anything but loopback addresses unless the caller says `allow_insecure_token=True` (a
private network it trusts).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from teacher_server.shared.endpoints import Endpoint, parse_endpoint
from teacher_server.shared.net import is_loopback


@dataclass(frozen=True)
class ClientTls:
    """PEM files: the roots that verify the server, and this client's own certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    """gRPC: the name the teachers' certificate must carry where the endpoint does not say
    it (a target of several addresses); by default the endpoint's host."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key (tls cert and key go together)")
        for path in (self.ca, self.cert, self.key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {str(path)!r} does not exist")

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: verify the server (hostname included), present our certificate."""
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
) -> Endpoint:
    """The endpoint `url` names (`endpoints.parse_endpoint`); ValueError for a malformed one,
    a token in clear text off loopback, or TLS files for a clear-text endpoint."""
    endpoint = parse_endpoint(url)
    if endpoint.secure:
        server_name = tls.server_name if tls is not None else None
        if server_name and endpoint.transport == "http":
            raise ValueError(
                f"a TLS server name is for gRPC endpoints; {url!r} is verified as its host"
            )
        if len(endpoint.hosts) > 1 and not server_name:
            raise ValueError(
                f"{url!r} has several addresses: give the name their TLS certificate carries "
                "(ClientTls(server_name=...), teacher.tls_server_name), or use a dns:/// name"
            )
        return endpoint
    if tls is not None and (tls.ca or tls.cert or tls.server_name):
        raise ValueError(
            f"TLS settings are given but {url!r} is clear text; use {endpoint.secure_url}"
        )
    remote = [host for host in endpoint.hosts if not is_loopback(host)]
    if token and not allow_insecure_token and remote:
        raise ValueError(
            f"refusing to send the token in clear text to {remote[0]!r}: use https://, "
            "grpcs:// or grpcs+ (TLS), or allow_insecure_token (teacher.allow_insecure_token in "
            "a student config) on a network you trust"
        )
    return endpoint


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
