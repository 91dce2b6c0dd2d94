"""One process, one asyncio loop: HTTP (uvicorn) and gRPC (grpcio aio) over one lifecycle.

Both listeners open first (so `/healthz` answers and `/readyz` says 503 while loading); the
models load in a worker thread; a load failure stops the server with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvicorn

from teacher_server.server import remote
from teacher_server.server.config import TeacherConfig
from teacher_server.server.grpc_api import create_grpc_server, set_serving
from teacher_server.server.http_api import create_http_app
from teacher_server.server.http_protocol import guarded_protocol
from teacher_server.server.lifecycle import Lifecycle
from teacher_server.server.memory import HeapTrimmer, start_heap_trimmer
from teacher_server.server.oip_grpc import oip_methods
from teacher_server.server.oip_http import create_oip_router
from teacher_server.server.registry import Registry
from teacher_server.server.tls import grpc_credentials, uvicorn_ssl
from teacher_server.shared.net import is_loopback

log = logging.getLogger(__name__)
CLOSE_ANSWER_S = 2.0
"""After the models close, how long the transports get to send the last 503s."""
KEEP_ALIVE_S = 5
"""uvicorn closes an HTTP connection idle this long after an answer (its default)."""


async def in_own_thread(work: Callable[[], None], name: str) -> None:
    """Run `work` on a thread of its own that then ends.

    Not on asyncio's executor: a thread that stays alive after running torch's parallel
    kernels (building, loading and warming up models does) keeps its OpenMP team, and any
    other thread's passes then run on a single core (measured: resnet18 at batch 32 took
    22 ms on the pass thread instead of 13.5 ms with both cores).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(_settle, done, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without signal handling of its own: the teacher server owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class Endpoints:
    """Where a started server listens."""

    host: str
    http_port: int
    grpc_port: int
    tls: bool = False

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{_url_host(self.host)}:{self.grpc_port}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class TeacherServer:
    """Start, serve and stop both transports of one teacher."""

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.registry = Registry(config, connect=remote.connect)
        self.lifecycle = Lifecycle(config, self.registry)
        self.load_error: BaseException | None = None
        self._stopped = asyncio.Event()
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: Any = None
        self._load_task: asyncio.Task[None] | None = None
        self._trimmer: HeapTrimmer | None = None
        self.endpoints: Endpoints | None = None

    async def start(self) -> Endpoints:
        server = self.config.server
        sock = _listening_socket(server.host, server.http_port)
        if server.heap_trim_mib and self._trimmer is None:
            self._trimmer = start_heap_trimmer(slack_bytes=server.heap_trim_mib * 2**20)
        http_app = create_http_app(self.lifecycle, [self._trimmer] if self._trimmer else [])
        http_app.include_router(create_oip_router(self.lifecycle))
        uv_config = uvicorn.Config(
            http_app,
            http=guarded_protocol(
                header_timeout_s=server.header_timeout_s, max_connections=server.max_connections
            ),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=math.ceil(CLOSE_ANSWER_S),
            **uvicorn_ssl(server),
        )
        self._http = _EmbeddedUvicorn(uv_config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        self._grpc, self._health = create_grpc_server(self.lifecycle)
        self._grpc.add_generic_rpc_handlers((oip_methods(self.lifecycle),))
        try:
            address = f"{_grpc_host(server.host)}:{server.grpc_port}"
            credentials = grpc_credentials(server)
            if credentials is None:
                grpc_port = self._grpc.add_insecure_port(address)
            else:
                grpc_port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError as exc:
            self._http.should_exit = True
            await self._http_task
            if self._trimmer is not None:
                self._trimmer.stop()
            raise OSError(f"cannot bind gRPC to {server.host}:{server.grpc_port}: {exc}") from exc
        await set_serving(self._health, False)
        await self._grpc.start()
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise OSError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self.endpoints = Endpoints(server.host, sock.getsockname()[1], grpc_port, server.tls)
        if server.auth_token is not None and not server.tls and not is_loopback(server.host):
            log.warning(
                "the token travels in clear text: %s is not a loopback address and the server "
                "has no TLS (tls_cert, tls_key); keep it on a network you trust",
                server.host,
            )
        log.info(
            "HTTP on %s, gRPC on %s; loading models",
            self.endpoints.http_url,
            self.endpoints.grpc_url,
        )
        self._load_task = asyncio.create_task(self._load())
        return self.endpoints

    async def _load(self) -> None:
        try:
            await in_own_thread(self.registry.load, "kdserve-load")
        except Exception as exc:
            log.error("model loading failed: %s", exc)
            self.load_error = exc
            self._stopped.set()
            return
        await set_serving(self._health, True)
        log.info("ready: %s", ", ".join(m.name for m in self.registry.describe()))

    async def wait_ready(self) -> None:
        """Return once every model is loaded; raise the load error if loading failed."""
        while not self.registry.ready:
            if self.load_error is not None:
                raise self.load_error
            await asyncio.sleep(0.02)

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        self._stopped.set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, then close: the one shutdown behaviour (SIGTERM, SIGINT, `ServerThread.stop`).

        1. At once /readyz and gRPC health say not serving, and every new request on either
           transport gets a JSON 503 / UNAVAILABLE `not_ready`; the ports stay open.
        2. Requests already taken are computed, for up to `grace_s` (shutdown_grace_s).
        3. What is still queued or computing then gets 503 / UNAVAILABLE `not_ready`, saying
           how much of it had started; nothing is left without an answer.
        4. The ports close (later connections are refused) and the models are freed.
        """
        grace_s = self.config.server.shutdown_grace_s if grace_s is None else grace_s
        self._stopped.set()
        self.registry.drain()
        if self._health is not None:
            await set_serving(self._health, False)
        if not await self.lifecycle.wait_idle(grace_s):
            log.warning(
                "%d requests still running after the %.1fs grace period; answering them 503",
                self.lifecycle.in_flight,
                grace_s,
            )
        if self._load_task is not None:
            await self._load_task
        await asyncio.to_thread(self.registry.close)
        await self.lifecycle.wait_idle(CLOSE_ANSWER_S)
        await asyncio.gather(self._stop_grpc(CLOSE_ANSWER_S), self._stop_http())
        if self._trimmer is not None:
            self._trimmer.stop()

    async def _stop_grpc(self, grace_s: float) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace_s)

    async def _stop_http(self) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket. Its protocol must be IPPROTO_TCP (not 0): asyncio only sets
    TCP_NODELAY on connections accepted from such a socket, and without it every answer
    waits ~40 ms for a delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(config: TeacherConfig, port_file: Path | None = None) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 when models failed to load."""
    server = TeacherServer(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.request_stop)
    endpoints = await server.start()
    if port_file is not None:
        write_port_file(port_file, endpoints)
    await server.serve_until_stopped()
    log.info("stopping")
    await server.stop()
    return 1 if server.load_error is not None else 0


def write_port_file(path: Path, endpoints: Endpoints) -> None:
    """Write the bound ports as JSON, atomically (ports given as 0 are chosen by the OS)."""
    data: dict[str, Any] = {
        "host": endpoints.host,
        "http_port": endpoints.http_port,
        "grpc_port": endpoints.grpc_port,
        "http_url": endpoints.http_url,
        "grpc_url": endpoints.grpc_url,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


class ServerThread:
    """A teacher server on its own loop in a background thread (tests, demos, notebooks).

    with ServerThread(config) as server: TeacherClient.connect(server.endpoints.grpc_url)
    """

    def __init__(self, config: TeacherConfig, *, wait_ready: bool = True) -> None:
        self.config = config
        self._wait_ready = wait_ready
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kdserve-teacher", daemon=True
        )
        self.server: TeacherServer | None = None

    @property
    def endpoints(self) -> Endpoints:
        assert self.server is not None and self.server.endpoints is not None
        return self.server.endpoints

    def start(self) -> ServerThread:
        self._thread.start()

        async def start() -> None:
            self.server = TeacherServer(self.config)
            await self.server.start()
            if self._wait_ready:
                await self.server.wait_ready()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.wait_ready(), self._loop).result(timeout_s)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
