"""gRPC server of esmsearch: ``esmsearch.v1.HomologSearch`` plus health and reflection.

Pieces, one job each:

* :class:`SearchEngine` (``engine.py``): embed queries, FAISS search, metadata lookup;
  thread-safe, no gRPC.
* :class:`HomologSearchServicer` (``servicer.py``): request validation, limits,
  protobuf conversion, per-request log line.
* :func:`create_server` / :func:`serve` (``app.py``): loading, health, reflection,
  binding, signal-driven draining.
* :class:`DynamicBatcher` (``batcher.py``): merges concurrent requests into one model
  batch and one FAISS search.
* ``security.py``: TLS / mutual TLS, bearer-token interceptor, loopback-only default bind.
* :class:`ServerMetrics` (``metrics.py``): Prometheus metrics on an HTTP port;
  ``logs.py``: JSON-lines request logs.
"""

from __future__ import annotations

from esmsearch.server.app import (
    DEFAULT_GRACE_S,
    DEFAULT_MAX_WORKERS,
    SERVICE_NAME,
    SearchServer,
    create_server,
    serve,
)
from esmsearch.server.batcher import BatchingConfig, DynamicBatcher
from esmsearch.server.engine import EngineHit, EngineResult, SearchEngine
from esmsearch.server.metrics import ServerMetrics
from esmsearch.server.security import SecurityConfig, TlsConfig, load_tokens
from esmsearch.server.servicer import (
    MAX_K,
    MAX_QUERIES_PER_REQUEST,
    MAX_RESIDUES_PER_QUERY,
    MAX_RESIDUES_PER_REQUEST,
    HomologSearchServicer,
    RequestLimits,
)

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_MAX_WORKERS",
    "MAX_K",
    "MAX_QUERIES_PER_REQUEST",
    "MAX_RESIDUES_PER_QUERY",
    "MAX_RESIDUES_PER_REQUEST",
    "SERVICE_NAME",
    "BatchingConfig",
    "DynamicBatcher",
    "EngineHit",
    "EngineResult",
    "HomologSearchServicer",
    "RequestLimits",
    "SearchEngine",
    "SearchServer",
    "SecurityConfig",
    "ServerMetrics",
    "TlsConfig",
    "create_server",
    "load_tokens",
    "serve",
]
