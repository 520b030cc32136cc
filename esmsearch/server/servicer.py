"""gRPC servicer of ``esmsearch.v1.HomologSearch``: request validation, limits, protobuf.

The servicer only translates between protobuf and the engine/scheduler; every
request is validated here first. Every method is wrapped by one decorator that hands
failures, the log line and the metrics to :class:`esmsearch.server.rpc.RpcObserver`,
the one place where exceptions become gRPC statuses.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import grpc
import numpy as np

import esmsearch
from esmsearch.errors import IndexDirectoryError, InvalidSequenceError
from esmsearch.sequences import validate_sequence
from esmsearch.server.engine import EngineHit, SearchEngine, evalues_unavailable
from esmsearch.server.rpc import Reject, RpcObserver, RpcRecord
from esmsearch.v1 import search_pb2, search_pb2_grpc

if TYPE_CHECKING:
    from esmsearch.server.admission import AdmissionConfig
    from esmsearch.server.batcher import DynamicBatcher
    from esmsearch.server.reload import IndexReloader
    from esmsearch.store import Index

__all__ = [
    "MAX_K",
    "MAX_QUERIES_PER_REQUEST",
    "MAX_QUERY_ID_BYTES",
    "MAX_RESIDUES_PER_QUERY",
    "MAX_RESIDUES_PER_REQUEST",
    "HomologSearchServicer",
    "RequestLimits",
]

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

    def within(self, admission: AdmissionConfig) -> RequestLimits:
        """These limits tightened so that any request within them can be admitted.

        A request with more queries or residues than the admission bounds could never
        run; the tightened limits refuse it at validation (RESOURCE_EXHAUSTED, no
        retry-after) and are what ``GetIndexInfo`` reports, so clients split to fit.
        """
        return RequestLimits(
            max_k=self.max_k,
            max_queries_per_request=min(self.max_queries_per_request, admission.max_queries_in_flight),
            max_residues_per_query=min(self.max_residues_per_query, admission.max_queued_residues),
            max_residues_per_request=min(self.max_residues_per_request, admission.max_queued_residues),
        )

    def to_proto(self) -> search_pb2.RequestLimits:
        return search_pb2.RequestLimits(
            max_k=self.max_k,
            max_queries_per_request=self.max_queries_per_request,
            max_residues_per_query=self.max_residues_per_query,
            max_residues_per_request=self.max_residues_per_request,
        )


def _check_k(k: int, has_min_score: bool, min_score: float, limits: RequestLimits) -> float | None:
    """Validate ``k`` and ``min_score``; return min_score or ``None`` when unset."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if not 1 <= k <= limits.max_k:
        raise Reject(invalid, f"k must be in [1, {limits.max_k}], got {k}")
    if not has_min_score:
        return None
    if math.isnan(min_score) or not -1.0 <= min_score <= 1.0:
        raise Reject(invalid, f"min_score must be a cosine score in [-1, 1], got {min_score}")
    return min_score


def _check_max_evalue(has_max_evalue: bool, max_evalue: float, index: Index) -> float | None:
    """Validate ``max_evalue`` against the index about to answer; ``None`` when unset.

    Raises:
        Reject: INVALID_ARGUMENT for a negative or NaN bound.
        EvaluesUnavailableError: the index has no decoys (no E-values to filter on;
            FAILED_PRECONDITION), checked before any model time is spent.
    """
    if not has_max_evalue:
        return None
    if math.isnan(max_evalue) or max_evalue < 0:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"max_evalue must be an E-value >= 0, got {max_evalue}")
    if not index.has_evalues:
        raise evalues_unavailable(index)
    return max_evalue


def _check_count(n: int, limits: RequestLimits, what: str) -> None:
    if n == 0:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"request has no {what}; send at least one")
    if n > limits.max_queries_per_request:
        raise Reject(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request has {n} {what}, over the limit of {limits.max_queries_per_request} "
            "per request; split it into several requests",
        )


def _check_ids(ids: list[str]) -> None:
    """Non-empty, bounded, unique query ids."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    seen: dict[str, int] = {}
    for i, qid in enumerate(ids, start=1):
        if not qid:
            raise Reject(invalid, f"query #{i} has an empty query_id; every query needs a unique id")
        if len(qid.encode("utf-8")) > MAX_QUERY_ID_BYTES:
            raise Reject(invalid, f"query #{i}: query_id is longer than {MAX_QUERY_ID_BYTES} bytes")
        if qid in seen:
            raise Reject(
                invalid,
                f"query {qid!r}: duplicate query_id (queries #{seen[qid]} and #{i}); "
                "query ids must be unique within a request",
            )
        seen[qid] = i


def _check_queries(queries: Sequence[search_pb2.Query], limits: RequestLimits) -> list[str]:
    """Validate query ids, sequences and residue limits; return normalised sequences.

    Raises:
        Reject: INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a precise message.
    """
    _check_count(len(queries), limits, "queries")
    _check_ids([q.query_id for q in queries])
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    sequences: list[str] = []
    total = 0
    for query in queries:
        qid = query.query_id
        if len(query.sequence) > limits.max_residues_per_query + 1:  # +1: a trailing '*'
            raise Reject(
                exhausted,
                f"query {qid!r} has {len(query.sequence)} residues, over the limit of "
                f"{limits.max_residues_per_query} per query",
            )
        try:
            seq = validate_sequence(qid, query.sequence)
        except InvalidSequenceError as exc:
            where = f" at residue {exc.position}" if exc.position is not None else ""
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"query {qid!r}{where}: {exc.reason}") from exc
        if len(seq) > limits.max_residues_per_query:
            raise Reject(
                exhausted,
                f"query {qid!r} has {len(seq)} residues, over the limit of {limits.max_residues_per_query} per query",
            )
        total += len(seq)
        if total > limits.max_residues_per_request:
            raise Reject(
                exhausted,
                f"request has more than {limits.max_residues_per_request} residues in total "
                f"(reached {total} at query {qid!r}); split it into several requests",
            )
        sequences.append(seq)
    return sequences


def _check_embeddings(embeddings: Sequence[search_pb2.Embedding], dim: int, limits: RequestLimits) -> np.ndarray:
    """Validate query vectors; return them L2-normalised as float32 ``[n, dim]``."""
    _check_count(len(embeddings), limits, "embeddings")
    _check_ids([e.query_id for e in embeddings])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    vectors = np.zeros((len(embeddings), dim), dtype=np.float32)
    for i, emb in enumerate(embeddings):
        if len(emb.values) != dim:
            raise Reject(
                invalid,
                f"query {emb.query_id!r}: embedding has {len(emb.values)} values, the index dimension is {dim}",
            )
        vectors[i] = emb.values
    finite = np.asarray(np.isfinite(vectors).all(axis=1))
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    for bad in np.flatnonzero(~finite | (norms == 0)).tolist():
        what = "non-finite values" if not bool(finite[bad]) else "a zero vector"
        raise Reject(invalid, f"query {embeddings[bad].query_id!r}: embedding has {what}")
    normalised: np.ndarray = (vectors / norms[:, None]).astype(np.float32)
    return normalised


def _fill_results(
    response: search_pb2.SearchResponse,
    ids: Sequence[str],
    lengths: Sequence[int],
    hits: Sequence[Sequence[EngineHit]],
) -> None:
    for qid, length, query_hits in zip(ids, lengths, hits, strict=True):
        qr = response.results.add(query_id=qid, query_length=length)
        for h in query_hits:
            hit = qr.hits.add(
                target_id=h.target_id,
                target_description=h.target_description,
                cosine_score=h.cosine_score,
                rank=h.rank,
                target_length=h.target_length,
            )
            if h.evalue is not None:
                hit.evalue = h.evalue


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Context = grpc.ServicerContext
_Impl = Callable[["HomologSearchServicer", _Req, _Context, RpcRecord], _Resp]
_Rpc = Callable[["HomologSearchServicer", _Req, _Context], _Resp]


def _unary_rpc(name: str) -> Callable[[_Impl[_Req, _Resp]], _Rpc[_Req, _Resp]]:
    """Wrap a unary method: one :class:`RpcRecord`, failures answered and logged in one place."""

    def wrap(method: _Impl[_Req, _Resp]) -> _Rpc[_Req, _Resp]:
        @functools.wraps(method)
        def wrapper(self: HomologSearchServicer, request: _Req, context: _Context) -> _Resp:
            rec = self.observer.start(name, context)
            try:
                return method(self, request, context, rec)
            except Exception as exc:
                self.observer.fail(context, rec, exc)
            finally:
                self.observer.finish(rec)

        return wrapper

    return wrap


def _remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline; ``None`` without one."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:  # grpc reports "no deadline" as a huge number
        return None
    return max(0.0, float(remaining))


class HomologSearchServicer(search_pb2_grpc.HomologSearchServicer):
    """Implements ``esmsearch.v1.HomologSearch`` on top of a :class:`SearchEngine`.

    Args:
        engine: the loaded model + index.
        batcher: the model scheduler every Search, SearchStream message and Embed
            goes through (admission, deadlines, batching).
        limits: request limits to enforce (and report in ``GetIndexInfo``).
        reloader: follows a versioned root's ``current``; ``None`` = fixed index.
        observer: logs, metrics and status mapping of every RPC.

    Every request (every message of a stream) logs one line on the
    ``esmsearch.server`` logger with its status code, number of queries and
    residues, ``k``, and queue/embed/search/total times in ms.
    """

    def __init__(
        self,
        engine: SearchEngine,
        batcher: DynamicBatcher,
        *,
        limits: RequestLimits | None = None,
        reloader: IndexReloader | None = None,
        observer: RpcObserver | None = None,
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.limits = limits or RequestLimits()
        self.reloader = reloader
        self.observer = observer or RpcObserver()

    def _search(
        self, request: search_pb2.SearchRequest, rec: RpcRecord, context: grpc.ServicerContext
    ) -> search_pb2.SearchResponse:
        rec.queries, rec.k = len(request.queries), request.k
        sequences = _check_queries(request.queries, self.limits)
        min_score = _check_k(request.k, request.HasField("min_score"), request.min_score, self.limits)
        # Checked against the index served now; the batch re-checks the version it runs on.
        max_evalue = _check_max_evalue(request.HasField("max_evalue"), request.max_evalue, self.engine.index)
        rec.residues = sum(len(s) for s in sequences)
        result = self.batcher.search(
            sequences,
            request.k,
            min_score,
            max_evalue=max_evalue,
            is_active=context.is_active,
            timeout_s=_remaining_s(context),
        )
        rec.queue_s, rec.embed_s, rec.search_s = result.queue_s, result.embed_s, result.search_s
        response = search_pb2.SearchResponse(index_version=result.index_version)
        _fill_results(response, [q.query_id for q in request.queries], [len(s) for s in sequences], result.hits)
        return response

    @_unary_rpc("Search")
    def Search(  # noqa: N802 - gRPC method name
        self, request: search_pb2.SearchRequest, context: grpc.ServicerContext, rec: RpcRecord
    ) -> search_pb2.SearchResponse:
        return self._search(request, rec, context)

    def SearchStream(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[search_pb2.SearchRequest], context: grpc.ServicerContext
    ) -> Iterator[search_pb2.SearchResponse]:
        for n, request in enumerate(request_iterator, start=1):
            rec = self.observer.start("SearchStream", context)
            try:
                response = self._search(request, rec, context)
            except Exception as exc:
                try:
                    self.observer.fail(context, rec, exc, prefix=f"request #{n}: ")
                finally:
                    self.observer.finish(rec)
            self.observer.finish(rec)
            yield response

    @_unary_rpc("SearchByEmbedding")
    def SearchByEmbedding(  # noqa: N802 - gRPC method name
        self, request: search_pb2.SearchByEmbeddingRequest, context: grpc.ServicerContext, rec: RpcRecord
    ) -> search_pb2.SearchResponse:
        rec.queries, rec.k = len(request.embeddings), request.k
        with self.engine.lease_index() as index:  # one version for the whole request
            vectors = _check_embeddings(request.embeddings, index.manifest.dim, self.limits)
            min_score = _check_k(request.k, request.HasField("min_score"), request.min_score, self.limits)
            max_evalue = _check_max_evalue(request.HasField("max_evalue"), request.max_evalue, index)
            t0 = time.perf_counter()
            hits = self.engine.search_vectors(vectors, request.k, min_score, max_evalue=max_evalue, index=index)
            rec.search_s = time.perf_counter() - t0
        response = search_pb2.SearchResponse(index_version=index.version)
        ids = [e.query_id for e in request.embeddings]
        _fill_results(response, ids, [0] * len(ids), hits)
        return response

    @_unary_rpc("Embed")
    def Embed(  # noqa: N802 - gRPC method name
        self, request: search_pb2.EmbedRequest, context: grpc.ServicerContext, rec: RpcRecord
    ) -> search_pb2.EmbedResponse:
        rec.queries = len(request.queries)
        sequences = _check_queries(request.queries, self.limits)
        rec.residues = sum(len(s) for s in sequences)
        m = self.engine.index.manifest  # model settings: the same across swaps
        vectors, version, rec.queue_s, rec.embed_s = self.batcher.embed(
            sequences, is_active=context.is_active, timeout_s=_remaining_s(context)
        )
        response = search_pb2.EmbedResponse(
            model_name=m.model_name,
            checkpoint_sha256=m.checkpoint_sha256,
            layer=m.layer,
            dim=m.dim,
            index_version=version,
        )
        for query, vector in zip(request.queries, vectors, strict=True):
            response.embeddings.add(query_id=query.query_id, values=vector.tolist())
        return response

    @_unary_rpc("GetIndexInfo")
    def GetIndexInfo(  # noqa: N802 - gRPC method name
        self, request: search_pb2.GetIndexInfoRequest, context: grpc.ServicerContext, rec: RpcRecord
    ) -> search_pb2.IndexInfo:
        index = self.engine.index
        m = index.manifest
        decoys = None
        if m.decoys is not None:
            decoys = search_pb2.DecoySettings(
                count=m.decoys.count,
                seed=m.decoys.seed,
                method=m.decoys.method,
                block_size=m.decoys.block_size,
                shape=m.decoys.shape,
            )
        return search_pb2.IndexInfo(
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
            reload_error=self.reloader.last_error if self.reloader is not None else "",
            decoys=decoys,
        )

    @_unary_rpc("ReloadIndex")
    def ReloadIndex(  # noqa: N802 - gRPC method name
        self, request: search_pb2.ReloadIndexRequest, context: grpc.ServicerContext, rec: RpcRecord
    ) -> search_pb2.ReloadIndexResponse:
        reloader = self.reloader
        if reloader is None:
            raise Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server serves a fixed index directory, not a versioned index root; "
                "start it on ROOT (esmsearch serve ROOT) to reload new versions",
            )
        try:
            outcome = reloader.reload(force=True)
        except IndexDirectoryError as exc:
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION, reloader.last_error or str(exc)) from exc
        return search_pb2.ReloadIndexResponse(
            reloaded=outcome.reloaded,
            index_version=outcome.index_version,
            previous_version=outcome.previous_version,
        )
