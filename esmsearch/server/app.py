"""Server wiring: build every part from one :class:`ServerConfig`, serve, stop cleanly.

Follows grpc's ``examples/python`` layout: :func:`create_server` returns
``(server, port)`` (port 0 in tests binds a free one), health and reflection are
registered from the service descriptor, and shutdown is a graceful ``stop(grace)``.
The ``grpc.Server`` is composed, not subclassed: :class:`SearchServer` holds it next
to the engine, the model scheduler, the reloader and the metrics, all passed in.

With ``ServerConfig.http_port`` the same process also serves the HTTP/JSON API and the
web page (:mod:`esmsearch.server.httpapi`): uvicorn in a thread of its own, over the
same servicer (engine, scheduler, limits, observer), tokens and TLS files.

Shutdown (:meth:`SearchServer.stop`) is one sequence run by the caller's thread --
for :func:`serve`, the main thread; signal handlers only set an event:

1. health NOT_SERVING and HTTP ``/readyz`` 503 (load balancers stop routing here),
   new HTTP API requests answer 503, and the reloader stops;
2. gRPC stops taking new RPCs; in-flight RPCs and HTTP requests get ``grace_s`` to
   finish; then uvicorn shuts down and its thread is joined;
3. the model scheduler, the metrics endpoint and the index are closed;
4. the RPC thread pool and every thread gRPC started are joined.

Step 4 is what keeps the process from aborting at exit: gRPC's serving thread lives
on for a moment after the server reports termination, and a process that exits
while such a thread is still inside gRPC's C++ core dies with ``terminate called
without an active exception`` (SIGABRT) even though every request was answered.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esmsearch.protocol import SERVICE_NAME as _SERVICE_NAME
from esmsearch.server.admission import Admission
from esmsearch.server.batcher import DynamicBatcher
from esmsearch.server.config import DEFAULT_GRACE_S, DEFAULT_MAX_WORKERS, ServerConfig
from esmsearch.server.decoding import RequestDecodingInterceptor
from esmsearch.server.engine import SearchEngine
from esmsearch.server.health import HealthServicer
from esmsearch.server.metrics import ServerMetrics
from esmsearch.server.reload import IndexReloader
from esmsearch.server.rpc import RpcObserver
from esmsearch.server.security import auth_interceptors
from esmsearch.server.servicer import HomologSearchServicer
from esmsearch.v1 import search_pb2, search_pb2_grpc

if TYPE_CHECKING:
    from esmsearch.server.httpapi import HttpServer

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_MAX_WORKERS",
    "SERVICE_NAME",
    "SearchServer",
    "ServerParts",
    "create_server",
    "serve",
]

log = logging.getLogger("esmsearch.server")

#: Fully-qualified name of the search service (also its health-check service name);
#: :mod:`esmsearch.protocol` holds it for the client too.
SERVICE_NAME: Final = search_pb2.DESCRIPTOR.services_by_name["HomologSearch"].full_name
if SERVICE_NAME != _SERVICE_NAME:  # pragma: no cover - the proto and the constant drifted apart
    raise ImportError(f"esmsearch.protocol.SERVICE_NAME is {_SERVICE_NAME!r}, search.proto says {SERVICE_NAME!r}")
#: Seconds to wait for a thread gRPC started to end after the server terminated.
_THREAD_JOIN_S: Final = 10.0


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t is not threading.current_thread()]


@dataclass(frozen=True)
class ServerParts:
    """The parts a :class:`SearchServer` is composed of, built by :func:`create_server`.

    Attributes:
        grpc_server: the ``grpc.Server`` (ports added, not started).
        executor: its RPC thread pool.
        port: the bound gRPC port, 1..65535.
        engine: the loaded model + served index.
        batcher: the model scheduler (admission, deadlines, batching).
        servicer: the ``HomologSearch`` servicer.
        health: the ``grpc.health.v1`` servicer.
        reloader: follows ``ROOT/current`` of a versioned root; ``None`` for a fixed index.
        metrics: the Prometheus metrics (always collected).
        metrics_port: port of the ``/metrics`` HTTP endpoint, or ``None`` when not exposed.
        http: the HTTP/JSON API and web page server, or ``None``.

    Raises:
        ValueError: ``port`` is not a bound port, or the servicer does not use ``engine``
            and ``batcher``.
    """

    grpc_server: grpc.Server
    executor: futures.ThreadPoolExecutor
    port: int
    engine: SearchEngine
    batcher: DynamicBatcher
    servicer: HomologSearchServicer
    health: HealthServicer
    reloader: IndexReloader | None
    metrics: ServerMetrics
    metrics_port: int | None = None
    http: HttpServer | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ValueError(f"port must be a bound port in 1..65535, got {self.port!r}")
        if self.servicer.engine is not self.engine or self.servicer.batcher is not self.batcher:
            raise ValueError("the servicer must serve the server's own engine and batcher")


class SearchServer:
    """A running search server: the ``grpc.Server`` and the parts it serves, composed.

    Built by :func:`create_server` from one frozen :class:`ServerConfig` and the
    :class:`ServerParts` built from it; every attribute is set here, never afterwards.

    Args:
        config: the configuration it was built from.
        parts: the composed parts.

    Attributes:
        config: the configuration it was built from.
        parts: the composed parts (also reachable one by one below).
        port: the bound gRPC port.
        engine: the loaded model + served index.
        batcher: the model scheduler (admission, deadlines, batching).
        servicer: the ``HomologSearch`` servicer.
        health: the ``grpc.health.v1`` servicer.
        reloader: follows ``ROOT/current`` of a versioned root; ``None`` for a fixed index.
        metrics: the Prometheus metrics (always collected).
        metrics_port: port of the ``/metrics`` HTTP endpoint, or ``None`` when not exposed.
        http: the HTTP/JSON API and web page server, or ``None`` without ``config.http_port``.
        http_port: its bound port, or ``None``.
    """

    def __init__(self, config: ServerConfig, parts: ServerParts) -> None:
        self.config = config
        self.parts = parts
        self.port = parts.port
        self.engine = parts.engine
        self.batcher = parts.batcher
        self.servicer = parts.servicer
        self.health = parts.health
        self.reloader = parts.reloader
        self.metrics = parts.metrics
        self.metrics_port = parts.metrics_port
        self.http = parts.http
        self.http_port = parts.http.port if parts.http is not None else None
        self._grpc = parts.grpc_server
        self._executor = parts.executor
        self._grpc_threads: list[threading.Thread] = []
        self._stop_lock = threading.Lock()
        self._grpc_done: threading.Event | None = None
        self._drain_deadline = 0.0
        self._closing = False
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start serving (gRPC, then HTTP), mark health SERVING, and start following the root (if any).

        Raises:
            OSError: the HTTP server did not start.
        """
        before = set(threading.enumerate())
        self._grpc.start()
        self._grpc_threads += _new_threads(before)
        if self.http is not None:
            self.http.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.reloader is not None:
            self.reloader.start()

    def begin_stop(self, grace_s: float | None = None) -> None:
        """Start draining without waiting: health NOT_SERVING, no new RPCs, a grace period.

        In-flight RPCs and HTTP requests get ``grace_s`` seconds (default:
        ``config.grace_s``) to finish; :meth:`stop` waits for them and closes
        everything. Idempotent.
        """
        grace = self.config.grace_s if grace_s is None else grace_s
        with self._stop_lock:
            if self._grpc_done is not None:
                return
            self._drain_deadline = time.monotonic() + grace
            self.health.enter_graceful_shutdown()
            if self.http is not None:
                self.http.begin_drain()
            if self.reloader is not None:
                self.reloader.stop()
            before = set(threading.enumerate())
            self._grpc_done = self._grpc.stop(grace)
            self._grpc_threads += _new_threads(before)  # gRPC's cancel-after-grace thread

    def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop; returns once everything is closed and every server thread joined.

        :meth:`begin_stop` (if not begun yet), then wait for the in-flight RPCs and
        HTTP requests, stop the HTTP server, close the scheduler, metrics endpoint and
        index, and join the RPC thread pool and gRPC's threads (see the module docstring).
        Safe to call from any thread and more than once: later calls wait for the first
        one to finish.
        """
        self.begin_stop(grace_s)
        with self._stop_lock:
            first = not self._closing
            self._closing = True
        if not first:
            self._stopped.wait()
            return
        try:
            assert self._grpc_done is not None
            self._grpc_done.wait()
            if self.http is not None:
                self.http.stop(self._drain_deadline)
            self.batcher.close()  # in-flight RPCs and HTTP requests are done: nothing is queued
            self.metrics.stop_http()
            self.engine.close()
            self._executor.shutdown(wait=True)
            for thread in self._grpc_threads:
                thread.join(_THREAD_JOIN_S)
                if thread.is_alive():
                    log.warning("gRPC thread %s still running %.0f s after stop", thread.name, _THREAD_JOIN_S)
        finally:
            self._stopped.set()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` has finished."""
        return self._stopped.is_set()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until the gRPC server has terminated or ``timeout_s`` passed.

        Returns:
            True if it has terminated (grpc's own method returns the opposite: "timed out").
        """
        timed_out = self._grpc.wait_for_termination(timeout_s)
        return not timed_out


def _max_message_bytes(config: ServerConfig, dim: int) -> int:
    # Room for a full request: one-byte residues (Search, Embed) or float32 vectors
    # (SearchByEmbedding), plus ids (<= 1000 bytes each) and framing.
    limits = config.effective_limits
    per_query = 4 * dim + 1100
    return max(
        4 << 20,
        2 * limits.max_residues_per_request + (1 << 20),
        limits.max_queries_per_request * per_query + (1 << 20),
    )


def create_server(config: ServerConfig, *, engine: SearchEngine | None = None) -> tuple[SearchServer, int]:
    """Load the index and its model, and return a started server.

    Args:
        config: what to serve and how (see :class:`ServerConfig`).
        engine: an already loaded engine to serve instead of loading ``config.index``
            (the server closes it on stop).

    Returns:
        ``(server, port)``: the started :class:`SearchServer` (health SERVING) and the
        bound port.

    Raises:
        IndexNotFoundError, IndexFormatError: no usable index at ``config.index``.
        ModelLoadError: the model cannot be loaded.
        IndexMismatchError: the model does not match the index, or the index's precision
            cannot run on ``config.device`` (the server refuses to start; the message
            names both).
        OSError: the address, the metrics port or the HTTP port cannot be bound.
        ssl.SSLError: the TLS files cannot be used by the HTTP server.
    """
    from esmsearch.versions import IndexRoot

    root = IndexRoot(config.index) if IndexRoot.is_root(config.index) else None
    if engine is None:
        engine = SearchEngine.load(
            root.current_path() if root is not None else config.index,
            model=config.model,
            device=config.device,
            toks_per_batch=config.toks_per_batch,
            mmap=config.mmap_index,
            evalue_db_size=config.evalue_db_size,
        )
    with contextlib.ExitStack() as rollback:  # closes what was built, in reverse, if anything fails
        rollback.callback(engine.close)
        metrics = ServerMetrics()
        rollback.callback(metrics.stop_http)
        observer = RpcObserver(metrics)
        reloader = (
            IndexReloader(engine, root, poll_s=config.reload_poll_s, mmap=config.mmap_index)
            if root is not None
            else None
        )
        batcher = DynamicBatcher(engine, config.batching, admission=Admission(config.admission), metrics=metrics)
        rollback.callback(batcher.close)
        executor = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="esmsearch-rpc")
        rollback.callback(executor.shutdown, wait=True)
        tokens = config.security.read_call_tokens  # HTTP /v1: read and admin tokens
        # First: undecodable messages -> INVALID_ARGUMENT (grpcio leaks every call it fails to decode).
        interceptors = [RequestDecodingInterceptor(observer), *auth_interceptors(config.security, observer)]
        max_message_bytes = _max_message_bytes(config, engine.index.manifest.dim)
        grpc_server = grpc.server(
            executor,
            options=[("grpc.max_receive_message_length", max_message_bytes)],
            interceptors=interceptors,
            # Beyond it gRPC answers RESOURCE_EXHAUSTED before reading the request (see
            # ServerConfig.max_concurrent_requests for the formula).
            maximum_concurrent_rpcs=config.max_concurrent_requests,
        )
        servicer = HomologSearchServicer(
            engine, batcher, limits=config.effective_limits, reloader=reloader, observer=observer
        )
        search_pb2_grpc.add_HomologSearchServicer_to_server(servicer, grpc_server)
        health_servicer = HealthServicer()  # the library's, without its Watch deadlock
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server)
        try:
            if config.security.tls is not None:
                port = grpc_server.add_secure_port(config.address, config.security.tls.server_credentials())
            else:
                port = grpc_server.add_insecure_port(config.address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind {config.address}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot bind {config.address}")
        metrics_port = None
        if config.metrics_port is not None:
            try:
                metrics_port = metrics.start_http(config.metrics_port)
            except OSError as exc:
                raise OSError(f"cannot bind the metrics port {config.metrics_port}: {exc}") from exc
        http: HttpServer | None = None
        if config.http_port is not None:
            from esmsearch.server.httpapi import HttpServer, create_http_app

            app = create_http_app(
                servicer,
                tokens=tokens,
                max_body_bytes=max_message_bytes,
                max_requests=config.max_concurrent_requests,
            )
            try:
                http = HttpServer(
                    app,
                    host=config.host,
                    port=config.http_port,
                    tls=config.security.tls,
                    limit_concurrency=config.http_limit_concurrency,
                )
            except OSError as exc:
                raise OSError(f"cannot bind the HTTP port {config.http_port}: {exc}") from exc
            rollback.callback(http.stop, 0.0)  # never started: closes its socket
        server = SearchServer(
            config,
            ServerParts(
                grpc_server=grpc_server,
                executor=executor,
                port=port,
                engine=engine,
                batcher=batcher,
                servicer=servicer,
                health=health_servicer,
                reloader=reloader,
                metrics=metrics,
                metrics_port=metrics_port,
                http=http,
            ),
        )
        rollback.pop_all()  # built: from here on the server owns and stops every part
    try:
        server.start()
    except BaseException:
        server.stop(0)
        raise
    if reloader is not None and root is not None:
        log.info(
            "following %s/current for new index versions (poll every %s s; SIGHUP or ReloadIndex reload now)",
            root.path,
            config.reload_poll_s,
        )
    return server, port


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain for up to ``config.grace_s`` seconds.

    Prints ``serving INDEX (N sequences, model M, version V) on HOST:PORT``
    on stdout once ready (health SERVING). Must run in the main thread: the signal
    handlers only set an event, and the main thread runs the whole stop sequence
    (:meth:`SearchServer.stop`). With a versioned root, SIGHUP asks for a reload.

    Returns:
        0 after a clean shutdown.

    Raises:
        IndexNotFoundError, IndexFormatError, ModelLoadError, IndexMismatchError,
        ConfigError, OSError: as :func:`create_server`; the server does not start.
    """
    stop_requested = threading.Event()
    received: list[int] = []

    def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_requested.set()

    # Installed before the slow model load, so a stop signal during it is not lost.
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if stop_requested.is_set():
            return 0
        server, bound = create_server(config)
        # What is alive once the server has started (torch, the model, the index) stays alive:
        # move it out of the cyclic collector's sight (gc.freeze), so that its full passes stop
        # walking it with the GIL held (120-145 ms stalls of every thread, /readyz included, in
        # benchmarks/readyz_under_load.py).
        gc.collect()
        gc.freeze()
        try:
            reloader = server.reloader
            if reloader is not None:
                previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: reloader.request())
            if server.metrics_port is not None:
                log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", server.metrics_port)
            m = server.engine.index.manifest
            shown = f"[{config.host}]" if ":" in config.host else config.host
            line = (
                f"serving {config.index} ({m.count} sequences, model {m.model_name}, "
                f"version {server.engine.index.version}) on {shown}:{bound}"
            )
            print(line, flush=True)
            log.info(line)
            if server.http is not None:
                http_line = f"HTTP API and web page on {server.http.scheme}://{shown}:{server.http_port}/"
                print(http_line, flush=True)
                log.info(http_line)
            # Lock waits are interrupted by signals on POSIX: the handler sets the event.
            while not stop_requested.wait(1.0):
                if server.wait_for_termination(0):
                    break
            if received:
                log.info("received %s: draining for up to %.1f s", signal.Signals(received[0]).name, config.grace_s)
        finally:
            server.stop()
        log.info("server stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stdout.flush()
    return 0
