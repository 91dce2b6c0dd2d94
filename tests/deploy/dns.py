"""A small authoritative DNS server on loopback, standing in for a cluster's DNS in front of a
headless Service: it answers A queries for the names it holds with their current addresses
(TTL 0, so every lookup asks again), AAAA queries for them with no answer, and anything else
with NXDOMAIN. A gRPC target names it as its resolver: `dns://127.0.0.1:PORT/name:port`
(grpcio's c-ares resolver). UDP only: the answers are small enough never to be truncated."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from types import TracebackType

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
NXDOMAIN = 3
FORMERR = 1


class DnsServer:
    """`records[name]` is the list of IPv4 addresses the name resolves to; `set` replaces it
    while the server runs (the endpoints controller adding or removing a pod)."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self._lock = threading.Lock()
        self._records = {name.lower().rstrip("."): list(v) for name, v in records.items()}
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._records[name.lower().rstrip(".")] = list(addresses)

    def target(self, name: str, port: int) -> str:
        """The gRPC target that resolves `name` through this server."""
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            answer = self.answer(query)
            if answer is not None:
                self._sock.sendto(answer, peer)

    def answer(self, query: bytes) -> bytes | None:
        """The response to one query message; None for bytes too short to answer at all."""
        if len(query) < 12:
            return None
        ident, flags, questions = struct.unpack("!HHH", query[:6])
        if flags & 0x8000:  # a response, not a query
            return None
        header_flags = 0x8400 | (flags & 0x0100)  # QR, AA, and the query's RD
        parsed = _question(query) if questions == 1 else None
        if parsed is None:
            return struct.pack("!HHHHHH", ident, header_flags | FORMERR, 0, 0, 0, 0)
        name, qtype, qclass, end = parsed
        with self._lock:
            self.queries += 1
            addresses = self._records.get(name)
        question = query[12:end]
        if addresses is None or qclass != CLASS_IN:
            return struct.pack("!HHHHHH", ident, header_flags | NXDOMAIN, 1, 0, 0, 0) + question
        answers = b""
        count = 0
        if qtype == TYPE_A:
            for address in addresses:
                rdata = ipaddress.IPv4Address(address).packed
                # the name as a pointer to the question's (offset 12), type, class, TTL 0
                answers += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 0, len(rdata)) + rdata
                count += 1
        return struct.pack("!HHHHHH", ident, header_flags, 1, count, 0, 0) + question + answers


def _question(message: bytes) -> tuple[str, int, int, int] | None:
    """(name, type, class, offset after it) of the question at offset 12, or None if the
    question is malformed (a label running past the end, a compression pointer)."""
    labels = []
    at = 12
    while True:
        if at >= len(message):
            return None
        length = message[at]
        if length == 0:
            at += 1
            break
        if length & 0xC0 or at + 1 + length > len(message):
            return None
        labels.append(message[at + 1 : at + 1 + length].decode("ascii", "replace").lower())
        at += 1 + length
    if at + 4 > len(message):
        return None
    qtype, qclass = struct.unpack("!HH", message[at : at + 4])
    return ".".join(labels), qtype, qclass, at + 4
