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

import ipaddress
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
    """The HTTP base URL, or grpcio's target (`host:port`, or the gRPC target itself)."""
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
    """The hosts of a gRPC target's address part (after `scheme:`), a DNS resolver's
    included; ValueError for what grpcio would refuse only at the first call."""
    if scheme == "unix":
        if not rest.strip("/"):
            raise ValueError(f"gRPC target {url!r} needs a socket path: unix:/path/to/socket")
        return ("localhost",)
    resolvers: list[str] = []
    if scheme == "dns":
        # dns:host:port, dns:///host:port or dns://resolver[:port]/host:port
        if rest.startswith("//"):
            resolver, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"gRPC target {url!r} needs dns:///host:port (three slashes)")
            if resolver:
                resolvers.append(_split(url, resolver, need_port=False)[0])
        addresses = [rest]
    else:
        addresses = rest.split(",")
    hosts = []
    for address in addresses:
        host = _split(url, address, need_port=True)[0]
        if scheme in ("ipv4", "ipv6"):
            try:
                literal = ipaddress.ip_address(host)
            except ValueError:
                literal = None
            if (
                literal is None
                or literal.version != int(scheme[-1])
                or (scheme == "ipv6" and not address.startswith("["))
            ):
                form = "[address]:port" if scheme == "ipv6" else "address:port"
                raise ValueError(
                    f"gRPC target {url!r}: {address!r} is not an {scheme} {form} (a name "
                    "goes in dns:///name:port)"
                )
        hosts.append(host)
    return (*hosts, *resolvers)


def _split(url: str, address: str, *, need_port: bool) -> tuple[str, int | None]:
    """`host:port` or `[v6]:port` (the port optional unless `need_port`), brackets dropped."""
    if address.startswith("["):
        host, _, port = address[1:].partition("]")
        port = port.removeprefix(":")
    elif address.count(":") == 1 or need_port:
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    else:
        host, port = address, ""
    if not host or host != host.strip() or (port and not port.isdigit()):
        raise ValueError(f"gRPC target {url!r}: {address!r} needs a host and a port ({FORMS})")
    if not port:
        if need_port:
            raise ValueError(f"gRPC target {url!r}: {address!r} needs a host and a port ({FORMS})")
        return host, None
    if not 0 < int(port) < 65536:
        raise ValueError(f"gRPC target {url!r}: port {port} is not in 1-65535")
    return host, int(port)
