"""gRPC server of esmsearch: ``esmsearch.v1.HomologSearch`` plus health and reflection.

Pieces, one job each:

* :class:`SearchEngine` (``engine.py``): embed queries, FAISS search, metadata lookup;
  thread-safe, no gRPC.
* :class:`HomologSearchServicer` (``servicer.py``): request validation, limits,
  protobuf conversion, per-request log line.
* :func:`create_server` / :func:`serve` (``app.py``): loading, health, reflection,
  binding, signal-driven draining.
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
from esmsearch.server.engine import EngineHit, EngineResult, SearchEngine
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
    "EngineHit",
    "EngineResult",
    "HomologSearchServicer",
    "RequestLimits",
    "SearchEngine",
    "SearchServer",
    "create_server",
    "serve",
]
