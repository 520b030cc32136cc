"""Server wiring: load model + index, register services, bind, serve, drain on signals.

Follows grpc's ``examples/python`` layout: :func:`create_server` returns
``(server, port)`` (bind port 0 in tests), health and reflection are registered
from the service descriptor, and shutdown is ``server.stop(grace)``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent import futures
from types import FrameType
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esmsearch.server.batcher import BatchingConfig, DynamicBatcher
from esmsearch.server.engine import SearchEngine
from esmsearch.server.metrics import ServerMetrics
from esmsearch.server.reload import DEFAULT_RELOAD_POLL_S, IndexReloader
from esmsearch.server.security import SecurityConfig, TokenAuthInterceptor, check_bind_host
from esmsearch.server.servicer import HomologSearchServicer, RequestLimits
from esmsearch.v1 import search_pb2, search_pb2_grpc

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
#: Seconds in-flight requests get to finish after SIGTERM/SIGINT.
DEFAULT_GRACE_S: Final = 10.0
#: gRPC worker threads (requests in flight; model forwards are serialised anyway).
DEFAULT_MAX_WORKERS: Final = 8


class SearchServer(grpc.Server):
    """A ``grpc.Server`` that also owns the search engine and health servicer.

    Behaves as the wrapped ``grpc.Server``; :meth:`stop` first sets every health
    status to NOT_SERVING (so load balancers stop routing here), then stops the
    gRPC server with the given grace, then closes the index once drained.

    Attributes:
        engine: the loaded :class:`SearchEngine`.
        servicer: the :class:`HomologSearchServicer`.
        health: the ``grpc.health.v1`` servicer.
    """

    def __init__(
        self,
        server: grpc.Server,
        engine: SearchEngine,
        servicer: HomologSearchServicer,
        health_servicer: health.HealthServicer,
    ) -> None:
        self._server = server
        self.engine = engine
        self.servicer = servicer
        self.health = health_servicer
        self._stop_lock = threading.Lock()
        self._stopped: threading.Event | None = None
        #: Follows ``ROOT/current`` when serving a versioned root; None for a fixed index.
        self.reloader: IndexReloader | None = None
        #: The dynamic batcher (None when batching is off); closed after the drain.
        self.batcher: DynamicBatcher | None = None
        #: Prometheus metrics of this server (always collected).
        self.metrics: ServerMetrics | None = None
        #: Port of the Prometheus ``/metrics`` HTTP endpoint, or None when not exposed.
        self.metrics_port: int | None = None

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        """Start serving and mark the health status SERVING."""
        self._server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within ``grace`` s.

        Returns:
            An event set once the server has stopped (and the index is closed).
            Idempotent: later calls return the same event.
        """
        with self._stop_lock:
            if self._stopped is not None:
                return self._stopped
            self.health.enter_graceful_shutdown()
            if self.reloader is not None:
                self.reloader.stop()
            done = self._server.stop(grace)
            stopped = threading.Event()
            self._stopped = stopped

        def _finish() -> None:
            done.wait()
            if self.batcher is not None:
                self.batcher.close()  # in-flight RPCs are done: nothing is queued
            if self.metrics is not None:
                self.metrics.stop_http()
            self.engine.close()
            stopped.set()

        threading.Thread(target=_finish, name="esmsearch-drain", daemon=True).start()
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def create_server(
    index_dir: str | os.PathLike[str],
    address: str = "127.0.0.1:0",
    *,
    device: str = "auto",
    model: str | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    limits: RequestLimits | None = None,
    toks_per_batch: int = 4096,
    engine: SearchEngine | None = None,
    reload_poll_s: float | None = DEFAULT_RELOAD_POLL_S,
    batching: BatchingConfig | None = None,
    security: SecurityConfig | None = None,
    metrics_port: int | None = None,
) -> tuple[SearchServer, int]:
    """Load an index and its model, and return a started server bound to ``address``.

    Args:
        index_dir: index version directory (with ``manifest.json``), or a versioned
            index root (:meth:`esmsearch.versions.IndexRoot.is_root`): then the version
            ``ROOT/current`` names is served and new versions are swapped in live
            (see :class:`esmsearch.server.reload.IndexReloader`).
        address: ``host:port`` to bind; port 0 picks a free port (returned).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the model.
        model: fair-esm pretrained name or ``.pt`` path overriding the manifest's
            model source; it must be the same checkpoint the index was built with.
        max_workers: gRPC worker threads (concurrent RPCs).
        limits: request limits (defaults: :class:`RequestLimits`).
        toks_per_batch: token budget per model forward pass.
        engine: an already loaded engine to serve instead of loading ``index_dir``
            (the server closes it on stop).
        reload_poll_s: with a root, seconds between looks at ``ROOT/current``
            (``None``: reload only on SIGHUP or the ``ReloadIndex`` RPC).
        batching: dynamic batching settings (default: on, see
            :class:`esmsearch.server.batcher.BatchingConfig`).
        security: TLS, bearer tokens, and whether a non-loopback host may be bound
            without them (default: plaintext, no tokens, loopback only). Health
            checks need no token.
        metrics_port: expose Prometheus metrics at ``http://127.0.0.1:PORT/metrics``
            (0 picks a free port, see :attr:`SearchServer.metrics_port`); ``None`` = off.

    Returns:
        ``(server, port)``: the started :class:`SearchServer` (health SERVING) and
        the bound port.

    Raises:
        IndexNotFoundError, IndexFormatError: no usable index at ``index_dir``.
        ModelLoadError: the model cannot be loaded.
        IndexMismatchError: the model does not match the index (the FAILED_PRECONDITION
            case: the server refuses to start).
        OSError: ``address`` cannot be bound.
    """
    limits = limits or RequestLimits()
    batching = batching or BatchingConfig()
    security = security or SecurityConfig()
    check_bind_host(address.rsplit(":", 1)[0], security)  # before the slow model load
    from esmsearch.versions import IndexRoot

    root = IndexRoot(index_dir) if IndexRoot.is_root(index_dir) else None
    if engine is None:
        engine = SearchEngine.load(
            root.current_path() if root is not None else index_dir,
            model=model,
            device=device,
            toks_per_batch=toks_per_batch,
        )
    reloader = None
    if root is not None:
        try:
            reloader = IndexReloader(engine, root, poll_s=reload_poll_s)
        except BaseException:
            engine.close()
            raise
    # Room for a full request: one-byte residues (Search, Embed) or float32 vectors
    # (SearchByEmbedding), plus ids (<= 1000 bytes each) and framing.
    dim = engine.index.manifest.dim
    per_query = 4 * dim + 1100
    max_message = max(
        4 << 20,
        2 * limits.max_residues_per_request + (1 << 20),
        limits.max_queries_per_request * per_query + (1 << 20),
    )
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="esmsearch-rpc"),
        options=[("grpc.max_receive_message_length", max_message)],
        interceptors=[TokenAuthInterceptor(security.tokens)] if security.tokens else None,
    )
    servicer = HomologSearchServicer(engine, limits)
    servicer.reloader = reloader
    metrics = ServerMetrics()
    servicer.metrics = metrics
    use_batcher = batching.enabled
    if use_batcher is None:  # auto: batch where a batched forward pays off (GPU)
        use_batcher = engine.embedder.device.type == "cuda"
    if use_batcher:
        servicer.batcher = DynamicBatcher(engine, batching, metrics=metrics)
    search_pb2_grpc.add_HomologSearchServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    server = SearchServer(grpc_server, engine, servicer, health_servicer)
    server.reloader = reloader
    server.batcher, server.metrics = servicer.batcher, metrics

    def _abandon() -> None:
        if servicer.batcher is not None:
            servicer.batcher.close()
        metrics.stop_http()
        engine.close()

    try:
        if security.tls is not None:
            port = server.add_secure_port(address, security.tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
        if metrics_port is not None:
            server.metrics_port = metrics.start_http(metrics_port)
    except (RuntimeError, OSError) as exc:
        _abandon()
        raise OSError(f"cannot bind {address} (or metrics port {metrics_port}): {exc}") from exc
    if port == 0:
        _abandon()
        raise OSError(f"cannot bind {address}")
    server.start()
    if reloader is not None:
        reloader.start()
        log.info(
            "following %s/current for new index versions "
            "(poll every %s s; SIGHUP or ReloadIndex reload now)",
            root.path if root is not None else "",
            reload_poll_s,
        )
    return server, port


def serve(
    index_dir: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    device: str = "auto",
    model: str | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    limits: RequestLimits | None = None,
    toks_per_batch: int = 4096,
    grace_s: float = DEFAULT_GRACE_S,
    reload_poll_s: float | None = DEFAULT_RELOAD_POLL_S,
    batching: BatchingConfig | None = None,
    security: SecurityConfig | None = None,
    metrics_port: int | None = None,
) -> int:
    """Serve an index until SIGTERM or SIGINT, then drain for up to ``grace_s`` seconds.

    Prints ``serving INDEX (N sequences, model M, version V) on HOST:PORT`` on
    stdout once ready (health SERVING). Must run in the main thread (signal handlers).

    Args:
        index_dir, device, model, max_workers, limits, toks_per_batch: see :func:`create_server`.
        host: interface to bind (``0.0.0.0`` for all).
        port: TCP port; 0 picks a free one (printed).
        grace_s: seconds in-flight requests get to finish after a stop signal.
        reload_poll_s: see :func:`create_server`; with a versioned root, SIGHUP
            also triggers a reload.
        batching, security, metrics_port: see :func:`create_server` (a non-loopback
            ``host`` without TLS or tokens raises ConfigError unless
            ``security.insecure_bind_any``).

    Returns:
        0 after a clean shutdown.

    Raises:
        IndexNotFoundError, IndexFormatError, ModelLoadError, IndexMismatchError,
        OSError: as :func:`create_server`; the server does not start.
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server, bound = create_server(
        index_dir,
        address,
        device=device,
        model=model,
        max_workers=max_workers,
        limits=limits,
        toks_per_batch=toks_per_batch,
        reload_poll_s=reload_poll_s,
        batching=batching,
        security=security,
        metrics_port=metrics_port,
    )
    if server.metrics_port is not None:
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", server.metrics_port)
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            log.info("received %s: draining for up to %.1f s", signal.Signals(signum).name, grace_s)
            server.stop(grace_s)

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    reloader = server.reloader
    if reloader is not None:

        def _on_hangup(signum: int, frame: FrameType | None) -> None:
            log.info("received SIGHUP: reloading %s/current", reloader.root.path)
            reloader.request()

        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _on_hangup)
    try:
        m = server.engine.index.manifest
        shown = f"[{host}]" if ":" in host else host
        line = (
            f"serving {index_dir} ({m.count} sequences, model {m.model_name}, "
            f"version {server.engine.index.version}) on {shown}:{bound}"
        )
        print(line, flush=True)
        log.info(line)
        # grpc's wait_for_termination wakes up often enough for signal handlers to run.
        server.wait_for_termination()
        server.stop(grace_s).wait(grace_s + 5.0)  # already stopping: returns the same event
        log.info("server stopped")
    finally:
        server.stop(0)  # no-op after a signal; otherwise (an exception here) stop at once
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stdout.flush()
    return 0
