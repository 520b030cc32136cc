"""Search server of esmsearch: gRPC ``esmsearch.v1.HomologSearch`` plus health and reflection, and HTTP/JSON.

Pieces, one job each:

* :class:`SearchEngine` (``engine.py``): embed queries, FAISS search, metadata lookup;
  thread-safe, no gRPC.
* :class:`IndexSlot` (``slot.py``): the served index, swapped under reference-counted leases.
* ``validation.py``: request checks and :class:`RequestLimits`, shared by gRPC and HTTP.
* :class:`HomologSearchServicer` (``servicer.py``): protobuf in and out around the
  engine and the scheduler.
* ``httpapi.py``: the HTTP/JSON API (``/v1/search``, ``/v1/index``, health, OpenAPI
  docs) and the web page (``web/``), served by uvicorn in the same process when
  ``ServerConfig.http_port`` is set, over the same servicer, tokens and TLS files.
* ``rpc.py``: the one place where failures become gRPC statuses (INTERNAL answers
  carry an error id, never exception text), plus each RPC's log line and metrics.
* :class:`DynamicBatcher` (``batcher.py``): the model scheduler every model request
  goes through: admission (``admission.py``: bounded queries in flight and queued
  residues, RESOURCE_EXHAUSTED with ``retry-after-ms``), deadlines checked right
  before embedding, and (optionally) merging of concurrent requests.
* :class:`IndexReloader` (``reload.py``): follows a versioned root's ``current``.
* :class:`ServerConfig` (``config.py``): one frozen configuration;
  :func:`create_server` / :func:`serve` (``app.py``) build and compose the parts,
  serve, and stop in one sequence (signal handlers only set an event).
* ``security.py``: TLS / mutual TLS, bearer-token interceptor, loopback-only default bind.
* :class:`ServerMetrics` (``metrics.py``): Prometheus metrics on an HTTP port;
  ``logs.py``: JSON-lines request logs.
"""

from __future__ import annotations

from esmsearch.server.admission import AdmissionConfig
from esmsearch.server.app import SERVICE_NAME, SearchServer, create_server, serve
from esmsearch.server.batcher import BatchingConfig, DynamicBatcher
from esmsearch.server.config import DEFAULT_GRACE_S, DEFAULT_MAX_WORKERS, ServerConfig
from esmsearch.server.engine import EngineHit, EngineResult, SearchEngine
from esmsearch.server.metrics import ServerMetrics
from esmsearch.server.security import SecurityConfig, TlsConfig, load_tokens
from esmsearch.server.servicer import HomologSearchServicer
from esmsearch.server.validation import (
    MAX_K,
    MAX_QUERIES_PER_REQUEST,
    MAX_RESIDUES_PER_QUERY,
    MAX_RESIDUES_PER_REQUEST,
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
    "AdmissionConfig",
    "BatchingConfig",
    "DynamicBatcher",
    "EngineHit",
    "EngineResult",
    "HomologSearchServicer",
    "RequestLimits",
    "SearchEngine",
    "SearchServer",
    "SecurityConfig",
    "ServerConfig",
    "ServerMetrics",
    "TlsConfig",
    "create_server",
    "load_tokens",
    "serve",
]
