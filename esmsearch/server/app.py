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

import logging
import signal
import sys
import threading
import time
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esmsearch.server.admission import Admission
from esmsearch.server.batcher import DynamicBatcher
from esmsearch.server.config import DEFAULT_GRACE_S, DEFAULT_MAX_WORKERS, ServerConfig
from esmsearch.server.engine import SearchEngine
from esmsearch.server.health import HealthServicer
from esmsearch.server.metrics import ServerMetrics
from esmsearch.server.reload import IndexReloader
from esmsearch.server.rpc import RpcObserver
from esmsearch.server.security import TokenAuthInterceptor
from esmsearch.server.servicer import HomologSearchServicer
from esmsearch.v1 import search_pb2, search_pb2_grpc

if TYPE_CHECKING:
    from esmsearch.server.httpapi import HttpServer

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_MAX_WORKERS",
    "SERVICE_NAME",
    "SearchServer",
    "create_server",
    "serve",
]

log = logging.getLogger("esmsearch.server")

#: Fully-qualified name of the search service (also its health-check service name).
SERVICE_NAME: Final = search_pb2.DESCRIPTOR.services_by_name["HomologSearch"].full_name
#: Seconds to wait for a thread gRPC started to end after the server terminated.
_THREAD_JOIN_S: Final = 10.0


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t is not threading.current_thread()]


class SearchServer:
    """A running search server: the ``grpc.Server`` and the parts it serves, composed.

    Built by :func:`create_server`; every attribute is set here, never afterwards.

    Attributes:
        config: the configuration it was built from.
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

    def __init__(
        self,
        *,
        config: ServerConfig,
        grpc_server: grpc.Server,
        executor: futures.ThreadPoolExecutor,
        port: int,
        engine: SearchEngine,
        batcher: DynamicBatcher,
        servicer: HomologSearchServicer,
        health_servicer: health.HealthServicer,
        reloader: IndexReloader | None,
        metrics: ServerMetrics,
        metrics_port: int | None,
        http: HttpServer | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.engine = engine
        self.batcher = batcher
        self.servicer = servicer
        self.health = health_servicer
        self.reloader = reloader
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.http = http
        self.http_port = http.port if http is not None else None
        self._grpc = grpc_server
        self._executor = executor
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
        )
    metrics = ServerMetrics()
    observer = RpcObserver(metrics)
    parts: list[object] = []  # closed in reverse if anything below fails
    http: HttpServer | None = None
    try:
        reloader = (
            IndexReloader(engine, root, poll_s=config.reload_poll_s, mmap=config.mmap_index)
            if root is not None
            else None
        )
        batcher = DynamicBatcher(engine, config.batching, admission=Admission(config.admission), metrics=metrics)
        parts.append(batcher)
        executor = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="esmsearch-rpc")
        parts.append(executor)
        tokens = config.security.tokens
        interceptors: list[grpc.ServerInterceptor] = [TokenAuthInterceptor(tokens, observer=observer)] if tokens else []
        grpc_server = grpc.server(
            executor,
            options=[("grpc.max_receive_message_length", _max_message_bytes(config, engine.index.manifest.dim))],
            interceptors=interceptors,
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
        if config.http_port is not None:
            from esmsearch.server.httpapi import HttpServer, create_http_app

            app = create_http_app(
                servicer,
                tokens=tokens,
                max_body_bytes=_max_message_bytes(config, engine.index.manifest.dim),
            )
            try:
                http = HttpServer(app, host=config.host, port=config.http_port, tls=config.security.tls)
            except OSError as exc:
                raise OSError(f"cannot bind the HTTP port {config.http_port}: {exc}") from exc
    except BaseException:
        metrics.stop_http()
        for part in reversed(parts):
            if isinstance(part, DynamicBatcher):
                part.close()
            elif isinstance(part, futures.ThreadPoolExecutor):
                part.shutdown(wait=True)
        if http is not None:
            http.stop(time.monotonic())  # never started: closes its socket
        engine.close()
        raise
    server = SearchServer(
        config=config,
        grpc_server=grpc_server,
        executor=executor,
        port=port,
        engine=engine,
        batcher=batcher,
        servicer=servicer,
        health_servicer=health_servicer,
        reloader=reloader,
        metrics=metrics,
        metrics_port=metrics_port,
        http=http,
    )
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
