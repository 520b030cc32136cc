"""One frozen, self-validating configuration of a search server.

``esmsearch serve`` turns its flags into a :class:`ServerConfig`;
:func:`esmsearch.server.create_server` and :func:`esmsearch.server.serve` take one.
Every part of the server (engine, scheduler, admission, reloader, auth, metrics) is
built from it once, in :mod:`esmsearch.server.app`, and never reconfigured afterwards.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from esmsearch.errors import ConfigError
from esmsearch.server.admission import AdmissionConfig
from esmsearch.server.batcher import BatchingConfig
from esmsearch.server.reload import DEFAULT_RELOAD_POLL_S
from esmsearch.server.security import SecurityConfig, check_bind_host
from esmsearch.server.validation import RequestLimits

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_MAX_WORKERS", "DEFAULT_PORT", "ServerConfig"]

#: Seconds in-flight requests get to finish after SIGTERM/SIGINT.
DEFAULT_GRACE_S: Final = 10.0
#: gRPC worker threads, i.e. RPCs handled at once. Each waits on the model scheduler
#: (whose admission bounds bound the model work); RPCs beyond this wait in gRPC's queue,
#: up to :attr:`ServerConfig.max_concurrent_requests` RPCs in all.
DEFAULT_MAX_WORKERS: Final = 64
#: Default TCP port of ``esmsearch serve``.
DEFAULT_PORT: Final = 50051


@dataclass(frozen=True)
class ServerConfig:
    """Everything a search server is started with.

    Attributes:
        index: an index version directory (with ``manifest.json``) or a versioned index
            root (``ROOT/versions/*``, ``ROOT/current``), which is then followed live.
        host: interface to bind (loopback by default; ``0.0.0.0`` or ``::`` for all).
        port: TCP port, 0..65535 (0 picks a free one: see ``SearchServer.port``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the model.
        model: fair-esm pretrained name or ``.pt`` path overriding the manifest's model
            source; it must be the same checkpoint the index was built with.
        max_workers: gRPC worker threads (RPCs handled at once), >= 1.
        limits: per-request limits; what clients see (``GetIndexInfo``) and what
            validation enforces is these limits tightened to fit ``admission``.
        toks_per_batch: token budget of one model forward pass.
        reload_poll_s: with a root, seconds between looks at ``ROOT/current``
            (``None``: only SIGHUP or the ``ReloadIndex`` RPC reload).
        batching: dynamic batching of concurrent requests.
        admission: bounds on queries in flight and queued residues (RESOURCE_EXHAUSTED
            with ``grpc-retry-pushback-ms`` and ``retry-after-ms`` beyond them), and on
            the hits of one request (queries x k; INVALID_ARGUMENT beyond it). The
            transport caps are derived from them: :attr:`max_concurrent_requests`.
        security: TLS, bearer tokens, and whether a non-loopback host may be bound
            without them (refused otherwise, when the config is built).
        metrics_port: serve Prometheus metrics at ``http://127.0.0.1:PORT/metrics``
            (0 picks a free port); ``None`` = off.
        http_port: also serve the HTTP/JSON API and the web page on ``host:PORT``
            (0 picks a free one: see ``SearchServer.http_port``), in this process, with
            the same engine, scheduler, limits, tokens and TLS as gRPC; ``None`` = off.
        grace_s: seconds in-flight requests get to finish on a graceful stop, >= 0.
        mmap_index: memory-map FAISS index files (served and reloaded versions) where
            FAISS allows it, so that a reload does not hold two private copies of the
            index; ``False`` reads them into the process's memory.
        evalue_db_size: number of database sequences E-values are scaled to when a
            request gives none (``--evalue-db-size``; HMMER's ``-Z``, BLAST's
            ``-dbsize``), >= 1; ``None`` = the served version's count.

    Raises:
        ConfigError: a value is out of range, or a non-loopback ``host`` without both TLS
            and caller authentication (tokens or a client CA) and without
            ``security.insecure_bind_any``.
    """

    index: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: str = "auto"
    model: str | None = None
    max_workers: int = DEFAULT_MAX_WORKERS
    limits: RequestLimits = field(default_factory=RequestLimits)
    toks_per_batch: int = 4096
    reload_poll_s: float | None = DEFAULT_RELOAD_POLL_S
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics_port: int | None = None
    http_port: int | None = None
    grace_s: float = DEFAULT_GRACE_S
    mmap_index: bool = True
    evalue_db_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.index, Path):
            if not isinstance(self.index, (str, os.PathLike)):
                raise ConfigError(f"index must be a path, got {self.index!r}")
            object.__setattr__(self, "index", Path(self.index))
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is None and name != "port":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be an integer in 0..65535, got {value!r}")
        named = [(n, getattr(self, n)) for n in ("port", "metrics_port", "http_port")]
        for i, (name, value) in enumerate(named):
            for other, value2 in named[i + 1 :]:
                if value and value == value2:
                    raise ConfigError(f"{name} and {other} must differ, both are {value}")
        if not isinstance(self.max_workers, int) or self.max_workers < 1:
            raise ConfigError(f"max_workers must be an integer >= 1, got {self.max_workers!r}")
        if not isinstance(self.toks_per_batch, int) or self.toks_per_batch < 1:
            raise ConfigError(f"toks_per_batch must be an integer >= 1, got {self.toks_per_batch!r}")
        if self.reload_poll_s is not None and not (self.reload_poll_s > 0 and math.isfinite(self.reload_poll_s)):
            raise ConfigError(f"reload_poll_s must be > 0 seconds or None, got {self.reload_poll_s!r}")
        if not (self.grace_s >= 0 and math.isfinite(self.grace_s)):
            raise ConfigError(f"grace_s must be a finite number of seconds >= 0, got {self.grace_s!r}")
        if not self.host:
            raise ConfigError("host must not be empty")
        if self.evalue_db_size is not None and (
            not isinstance(self.evalue_db_size, int) or isinstance(self.evalue_db_size, bool) or self.evalue_db_size < 1
        ):
            raise ConfigError(f"evalue_db_size must be a positive integer or None, got {self.evalue_db_size!r}")
        check_bind_host(self.host, self.security)

    @property
    def address(self) -> str:
        """``host:port`` as gRPC binds it (IPv6 hosts in brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def max_concurrent_requests(self) -> int:
        """Most requests in the server at once, per interface (gRPC, HTTP): the transport cap.

        ``max_workers + admission.max_queries_in_flight``. Every admitted request holds
        at least one query, so at most ``max_queries_in_flight`` requests can be
        admitted at once; ``max_workers`` more leaves room for requests being validated
        or refused and for the cheap ones that need no admission (GetIndexInfo, health,
        ``GET /v1/index``). A request beyond the cap could only wait for room, so it is
        refused at once, before its message or body is read: gRPC answers
        RESOURCE_EXHAUSTED itself (``grpc.server(maximum_concurrent_rpcs=...)``; clients
        with a retry policy back off and retry), HTTP answers 503 with ``Retry-After``.

        Memory this bounds, worst case: gRPC reads at most ``max_workers`` request
        messages at once (an RPC waiting for a worker thread has not read its message),
        each at most the server's ``grpc.max_receive_message_length``; HTTP reads at most
        this many bodies, each at most the same size.
        """
        return self.max_workers + self.admission.max_queries_in_flight

    @property
    def http_limit_concurrency(self) -> int:
        """uvicorn's ``limit_concurrency``: ``2 * max_concurrent_requests``.

        A backstop behind the HTTP request cap (:attr:`max_concurrent_requests`, answered
        503 with ``Retry-After`` by the application): uvicorn counts open connections,
        idle keep-alive ones included, and tasks, and answers a plain 503 beyond it.
        """
        return 2 * self.max_concurrent_requests

    @property
    def effective_limits(self) -> RequestLimits:
        """:attr:`limits` tightened to :attr:`admission` (enforced and reported)."""
        return self.limits.within(self.admission)
