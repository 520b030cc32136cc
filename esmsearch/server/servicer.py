"""gRPC servicer of ``esmsearch.v1.HomologSearch``: request validation, limits, logging.

The servicer only translates between protobuf and :class:`SearchEngine`; every
request is validated here first, and every failure becomes a gRPC status with a
precise message (``context.abort(code, details)``, as in grpc's Python examples).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Final

import grpc

import esmsearch
from esmsearch.errors import InvalidSequenceError
from esmsearch.sequences import validate_sequence
from esmsearch.server.engine import SearchEngine
from esmsearch.v1 import search_pb2, search_pb2_grpc

__all__ = [
    "MAX_K",
    "MAX_QUERIES_PER_REQUEST",
    "MAX_QUERY_ID_BYTES",
    "MAX_RESIDUES_PER_QUERY",
    "MAX_RESIDUES_PER_REQUEST",
    "HomologSearchServicer",
    "RequestLimits",
]

log = logging.getLogger("esmsearch.server")

#: Default largest ``k`` (hits per query). Larger values give INVALID_ARGUMENT.
MAX_K: Final = 1000
#: Default most queries in one Search request.
MAX_QUERIES_PER_REQUEST: Final = 1000
#: Default longest query in residues (titin, the longest known protein, has ~35,000).
MAX_RESIDUES_PER_QUERY: Final = 40_000
#: Default most residues in one Search request (about 3,000 average proteins).
MAX_RESIDUES_PER_REQUEST: Final = 1_000_000
#: Longest query id in bytes of UTF-8.
MAX_QUERY_ID_BYTES: Final = 1000


@dataclass(frozen=True)
class RequestLimits:
    """Limits enforced on each Search request (``RequestLimits`` in search.proto).

    Attributes:
        max_k: largest ``k``; above it -> INVALID_ARGUMENT.
        max_queries_per_request: most queries per request; above -> RESOURCE_EXHAUSTED.
        max_residues_per_query: longest query in residues; above -> RESOURCE_EXHAUSTED.
        max_residues_per_request: most residues per request; above -> RESOURCE_EXHAUSTED.

    Raises:
        ValueError: a limit is below 1.
    """

    max_k: int = MAX_K
    max_queries_per_request: int = MAX_QUERIES_PER_REQUEST
    max_residues_per_query: int = MAX_RESIDUES_PER_QUERY
    max_residues_per_request: int = MAX_RESIDUES_PER_REQUEST

    def __post_init__(self) -> None:
        for name in (
            "max_k",
            "max_queries_per_request",
            "max_residues_per_query",
            "max_residues_per_request",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits.{name} must be an integer >= 1, got {value!r}")

    def to_proto(self) -> search_pb2.RequestLimits:
        return search_pb2.RequestLimits(
            max_k=self.max_k,
            max_queries_per_request=self.max_queries_per_request,
            max_residues_per_query=self.max_residues_per_query,
            max_residues_per_request=self.max_residues_per_request,
        )


class _Reject(Exception):
    """A request is refused with this status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _validate(
    request: search_pb2.SearchRequest, limits: RequestLimits
) -> tuple[list[str], float | None]:
    """Validate a SearchRequest; return the normalised sequences and min_score.

    Raises:
        _Reject: INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a precise message.
    """
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    n = len(request.queries)
    if n == 0:
        raise _Reject(invalid, "request has no queries; send at least one Query")
    if n > limits.max_queries_per_request:
        raise _Reject(
            exhausted,
            f"request has {n} queries, over the limit of {limits.max_queries_per_request} "
            "per request; split it into several requests",
        )
    if not 1 <= request.k <= limits.max_k:
        raise _Reject(invalid, f"k must be in [1, {limits.max_k}], got {request.k}")
    min_score: float | None = None
    if request.HasField("min_score"):
        min_score = request.min_score
        if math.isnan(min_score) or not -1.0 <= min_score <= 1.0:
            raise _Reject(invalid, f"min_score must be a cosine score in [-1, 1], got {min_score}")
    seen: dict[str, int] = {}
    sequences: list[str] = []
    total = 0
    for i, query in enumerate(request.queries, start=1):
        qid = query.query_id
        if not qid:
            raise _Reject(
                invalid, f"query #{i} has an empty query_id; every query needs a unique id"
            )
        if len(qid.encode("utf-8")) > MAX_QUERY_ID_BYTES:
            raise _Reject(
                invalid, f"query #{i}: query_id is longer than {MAX_QUERY_ID_BYTES} bytes"
            )
        if qid in seen:
            raise _Reject(
                invalid,
                f"query {qid!r}: duplicate query_id (queries #{seen[qid]} and #{i}); "
                "query ids must be unique within a request",
            )
        seen[qid] = i
        if len(query.sequence) > limits.max_residues_per_query + 1:  # +1: a trailing '*'
            raise _Reject(
                exhausted,
                f"query {qid!r} has {len(query.sequence)} residues, over the limit of "
                f"{limits.max_residues_per_query} per query",
            )
        try:
            seq = validate_sequence(qid, query.sequence)
        except InvalidSequenceError as exc:
            where = f" at residue {exc.position}" if exc.position is not None else ""
            raise _Reject(invalid, f"query {qid!r}{where}: {exc.reason}") from exc
        if len(seq) > limits.max_residues_per_query:
            raise _Reject(
                exhausted,
                f"query {qid!r} has {len(seq)} residues, over the limit of "
                f"{limits.max_residues_per_query} per query",
            )
        total += len(seq)
        if total > limits.max_residues_per_request:
            raise _Reject(
                exhausted,
                f"request has more than {limits.max_residues_per_request} residues in total "
                f"(reached {total} at query {qid!r}); split it into several requests",
            )
        sequences.append(seq)
    return sequences, min_score


class HomologSearchServicer(search_pb2_grpc.HomologSearchServicer):
    """Implements ``esmsearch.v1.HomologSearch`` on top of a :class:`SearchEngine`.

    Args:
        engine: the loaded model + index.
        limits: request limits to enforce.

    Every request logs one line on the ``esmsearch.server`` logger with its status
    code, number of queries and residues, and queue/embed/search/total times in ms.
    """

    def __init__(self, engine: SearchEngine, limits: RequestLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or RequestLimits()

    def Search(  # noqa: N802 - gRPC method name
        self, request: search_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> search_pb2.SearchResponse:
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        n_residues = 0
        queue_s = embed_s = search_s = 0.0
        try:
            sequences, min_score = _validate(request, self.limits)
            n_residues = sum(len(s) for s in sequences)
            result = self.engine.search(sequences, request.k, min_score)
            queue_s, embed_s, search_s = result.queue_s, result.embed_s, result.search_s
            response = search_pb2.SearchResponse(index_version=result.index_version)
            for query, seq, hits in zip(request.queries, sequences, result.hits, strict=True):
                qr = response.results.add(query_id=query.query_id, query_length=len(seq))
                for h in hits:
                    qr.hits.add(
                        target_id=h.target_id,
                        target_description=h.target_description,
                        cosine_score=h.cosine_score,
                        rank=h.rank,
                        target_length=h.target_length,
                    )
            return response
        except _Reject as rej:
            code = rej.code
            context.abort(rej.code, rej.details)
            raise  # unreachable: abort raises
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("Search failed")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            raise
        finally:
            total_ms = (time.perf_counter() - t0) * 1e3
            log.info(
                "rpc=Search code=%s peer=%s queries=%d residues=%d k=%d "
                "queue_ms=%.1f embed_ms=%.1f search_ms=%.1f total_ms=%.1f",
                code.name,
                context.peer(),
                len(request.queries),
                n_residues,
                request.k,
                queue_s * 1e3,
                embed_s * 1e3,
                search_s * 1e3,
                total_ms,
            )

    def GetIndexInfo(  # noqa: N802 - gRPC method name
        self, request: search_pb2.GetIndexInfoRequest, context: grpc.ServicerContext
    ) -> search_pb2.IndexInfo:
        t0 = time.perf_counter()
        index = self.engine.index
        m = index.manifest
        info = search_pb2.IndexInfo(
            model_name=m.model_name,
            checkpoint_sha256=m.checkpoint_sha256,
            layer=m.layer,
            pooling=m.pooling,
            normalisation=m.normalisation,
            metric=m.metric,
            dim=m.dim,
            count=m.count,
            index_version=index.version,
            index_factory=m.index_factory,
            built_at=m.built_at,
            tool_version=m.tool_version,
            source_fasta_sha256=m.source_fasta_sha256,
            server_version=esmsearch.__version__,
            limits=self.limits.to_proto(),
        )
        log.info(
            "rpc=GetIndexInfo code=OK peer=%s total_ms=%.1f",
            context.peer(),
            (time.perf_counter() - t0) * 1e3,
        )
        return info
