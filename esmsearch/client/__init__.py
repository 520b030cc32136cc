"""Python client of the esmsearch gRPC service.

Imports without torch, faiss or fair-esm (only grpc, protobuf and Biopython), so
pipelines can call a shared server without the model stack installed::

    from esmsearch.client import SearchClient, write_tsv

    with SearchClient("search-host:50051", timeout_s=60) as client:
        results = client.search({"q1": "MKTAYIAKQR..."}, k=5, min_score=0.8)
        write_tsv(results, sys.stdout)

Errors are :class:`SearchError` subclasses (tree in :mod:`esmsearch.client.errors`).
"""

from __future__ import annotations

from esmsearch.client.aio import AsyncSearchClient
from esmsearch.client.channel import TOKEN_ENV, ClientCredentials
from esmsearch.client.client import DEFAULT_ADDRESS, PIPELINED_REQUESTS, SearchClient
from esmsearch.client.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SearchError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from esmsearch.client.formats import TSV_COLUMNS, write_json, write_tsv
from esmsearch.client.retry import RetryPolicy
from esmsearch.client.types import (
    DecoySettings,
    Embeddings,
    Hit,
    IndexInfo,
    QueryResult,
    ReloadResult,
    RequestLimits,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "PIPELINED_REQUESTS",
    "TOKEN_ENV",
    "TSV_COLUMNS",
    "AsyncSearchClient",
    "CancelledError",
    "ClientCredentials",
    "DeadlineExceededError",
    "DecoySettings",
    "Embeddings",
    "FailedPreconditionError",
    "Hit",
    "IndexInfo",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "QueryResult",
    "ReloadResult",
    "RequestLimits",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SearchClient",
    "PermissionDeniedError",
    "SearchError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "write_json",
    "write_tsv",
]
