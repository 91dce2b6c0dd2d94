"""What a teacher endpoint string names: one HTTP or gRPC server, or a gRPC target of many.

- `http://host:port`, `https://host:port`: one HTTP server (several go in a list, which the
  client rotates through with failover);
- `grpc://host:port`, `grpcs://host:port`: one gRPC server;
- a gRPC target, as grpcio writes it: `dns:///teacher:50051` (every address the name
  resolves to, re-resolved as replicas come and go), `ipv4:10.0.0.2:50051,10.0.0.3:50051`,
  `ipv6:[fd00::2]:50051,...`, `unix:/run/teacher.sock`; `grpcs+` in front for TLS
  (`grpcs+dns:///teacher:50051`). One channel spreads the requests over the target's
  addresses with grpcio's `round_robin` policy, and health-checks each one (the
  `kdserve.v1.Teacher` service of the standard gRPC health protocol), so a replica that is
  loading, draining or gone gets no new requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix")
"""The gRPC name schemes an endpoint may use."""
SECURE_TARGET = "grpcs+"
FORMS = (
    "http(s)://host:port, grpc(s)://host:port, or a gRPC target: dns:///host:port, "
    "ipv4:addr:port[,addr:port...], ipv6:[addr]:port[,...], unix:/path "
    "(grpcs+ in front for TLS)"
)


@dataclass(frozen=True)
class Endpoint:
    url: str
    """As written."""
    transport: Literal["http", "grpc"]
    secure: bool
    address: str
    """httpx's base URL, or grpcio's target (`host:port`, or the gRPC target itself)."""
    hosts: tuple[str, ...]
    """The hosts it reaches (the token's loopback rule); a unix socket's is `localhost`."""
    balanced: bool
    """A gRPC target: round robin with health checks over its addresses."""

    @property
    def secure_url(self) -> str:
        """The TLS twin of a clear-text endpoint (what an error suggests instead)."""
        if self.balanced:
            return self.url if self.secure else SECURE_TARGET + self.url
        parts = urlsplit(self.url)
        return f"{parts.scheme.removesuffix('s')}s://{parts.netloc}"


def parse_endpoint(url: str) -> Endpoint:
    """The endpoint `url` names; ValueError naming the accepted forms."""
    target = url.removeprefix(SECURE_TARGET)
    scheme = target.split(":", 1)[0]
    if scheme in TARGET_SCHEMES:
        return Endpoint(
            url,
            "grpc",
            secure=target != url,
            address=target,
            hosts=_target_hosts(url, scheme, target.split(":", 1)[1]),
            balanced=True,
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "grpc", "grpcs") or target != url:
        raise ValueError(f"teacher endpoint {url!r} is not one of {FORMS}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(
            f"teacher endpoint {url!r} needs a host and a port: {parts.scheme}://host:port"
        )
    http = parts.scheme in ("http", "https")
    return Endpoint(
        url,
        "http" if http else "grpc",
        secure=parts.scheme.endswith("s"),
        address=url.rstrip("/") if http else parts.netloc,
        hosts=(parts.hostname,),
        balanced=False,
    )


def _target_hosts(url: str, scheme: str, rest: str) -> tuple[str, ...]:
    """The hosts of a gRPC target's address part (after `scheme:`); each needs a port."""
    if scheme == "unix":
        if not rest.strip("/"):
            raise ValueError(f"gRPC target {url!r} needs a socket path: unix:/path/to/socket")
        return ("localhost",)
    if scheme == "dns":
        # dns:host:port, dns:///host:port or dns://resolver/host:port
        rest = rest.rsplit("/", 1)[-1] if rest.startswith("//") else rest
        addresses = [rest]
    else:
        addresses = rest.split(",")
    hosts = []
    for address in addresses:
        if scheme == "ipv6" and address.startswith("["):
            host, _, port = address[1:].partition("]:")
        else:
            host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"gRPC target {url!r}: {address!r} needs a host and a port ({FORMS})")
        hosts.append(host)
    return tuple(hosts)
