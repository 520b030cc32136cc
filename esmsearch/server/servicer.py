"""gRPC servicer of ``esmsearch.v1.HomologSearch``: protobuf in, engine/scheduler, protobuf out.

The servicer only translates between protobuf and the engine/scheduler; every
request is validated first by :mod:`esmsearch.server.validation` (shared with the HTTP
API). Every method is wrapped by one decorator that hands failures, the log line and
the metrics to :class:`esmsearch.server.rpc.RpcObserver`, the one place where
exceptions become gRPC statuses.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc

import esmsearch
from esmsearch.errors import IndexDirectoryError
from esmsearch.server.engine import EngineHit, SearchEngine
from esmsearch.server.rpc import Reject, RpcObserver, RpcRecord
from esmsearch.server.validation import (
    MAX_K,
    MAX_QUERIES_PER_REQUEST,
    MAX_QUERY_ID_BYTES,
    MAX_RESIDUES_PER_QUERY,
    MAX_RESIDUES_PER_REQUEST,
    RequestLimits,
    check_embeddings,
    check_evalue_db_size,
    check_k,
    check_max_evalue,
    check_queries,
)
from esmsearch.v1 import search_pb2, search_pb2_grpc

if TYPE_CHECKING:
    from esmsearch.server.batcher import DynamicBatcher
    from esmsearch.server.reload import IndexReloader

__all__ = [
    "MAX_K",
    "MAX_QUERIES_PER_REQUEST",
    "MAX_QUERY_ID_BYTES",
    "MAX_RESIDUES_PER_QUERY",
    "MAX_RESIDUES_PER_REQUEST",
    "HomologSearchServicer",
    "RequestLimits",
    "fill_results",
]


def fill_results(
    response: search_pb2.SearchResponse,
    ids: Sequence[str],
    lengths: Sequence[int],
    hits: Sequence[Sequence[EngineHit]],
) -> None:
    """Append one ``QueryResult`` per query to ``response`` (the gRPC and HTTP answers both come from here).

    Args:
        response: the response to fill.
        ids: query ids, in request order.
        lengths: query lengths in residues (0 for SearchByEmbedding).
        hits: the engine's hits per query, by descending cosine score.
    """
    for qid, length, query_hits in zip(ids, lengths, hits, strict=True):
        add = response.results.add(query_id=qid, query_length=length).hits.add
        for h in query_hits:
            # One call per hit (the hot path of large answers); evalue=None leaves the
            # optional field unset, so HasField("evalue") is False for an index without decoys.
            add(
                target_id=h.target_id,
                target_description=h.target_description,
                cosine_score=h.cosine_score,
                rank=h.rank,
                target_length=h.target_length,
                evalue=h.evalue,
            )


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


def _min_score(request: search_pb2.SearchRequest | search_pb2.SearchByEmbeddingRequest) -> float | None:
    return request.min_score if request.HasField("min_score") else None


def _max_evalue(request: search_pb2.SearchRequest | search_pb2.SearchByEmbeddingRequest) -> float | None:
    return request.max_evalue if request.HasField("max_evalue") else None


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
        batcher: the scheduler every Search, SearchStream message and Embed goes
            through (admission, deadlines, batching), and whose admission every
            SearchByEmbedding passes too (:meth:`DynamicBatcher.search_vectors`).
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
        sequences = check_queries(request.queries, self.limits)
        min_score = check_k(request.k, _min_score(request), self.limits)
        # Checked against the index served now; the batch re-checks the version it runs on.
        max_evalue = check_max_evalue(_max_evalue(request), self.engine.index)
        evalue_db_size = check_evalue_db_size(request.evalue_db_size)
        rec.residues = sum(len(s) for s in sequences)
        result = self.batcher.search(
            sequences,
            request.k,
            min_score,
            max_evalue=max_evalue,
            is_active=context.is_active,
            timeout_s=_remaining_s(context),
            evalue_db_size=evalue_db_size,
        )
        rec.queue_s, rec.embed_s, rec.search_s = result.queue_s, result.embed_s, result.search_s
        response = search_pb2.SearchResponse(index_version=result.index_version)
        fill_results(response, [q.query_id for q in request.queries], [len(s) for s in sequences], result.hits)
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
            vectors = check_embeddings(request.embeddings, index.manifest.dim, self.limits)
            min_score = check_k(request.k, _min_score(request), self.limits)
            max_evalue = check_max_evalue(_max_evalue(request), index)
            evalue_db_size = check_evalue_db_size(request.evalue_db_size)
            t0 = time.perf_counter()
            # Admitted like Search (queries, hits = queries x k), searched in this thread.
            hits = self.batcher.search_vectors(
                vectors, request.k, min_score, max_evalue=max_evalue, index=index, evalue_db_size=evalue_db_size
            )
            rec.search_s = time.perf_counter() - t0
        response = search_pb2.SearchResponse(index_version=index.version)
        ids = [e.query_id for e in request.embeddings]
        fill_results(response, ids, [0] * len(ids), hits)
        return response

    @_unary_rpc("Embed")
    def Embed(  # noqa: N802 - gRPC method name
        self, request: search_pb2.EmbedRequest, context: grpc.ServicerContext, rec: RpcRecord
    ) -> search_pb2.EmbedResponse:
        rec.queries = len(request.queries)
        sequences = check_queries(request.queries, self.limits)
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
        return self.index_info()

    def index_info(self) -> search_pb2.IndexInfo:
        """The served index, its model and the request limits (``GetIndexInfo`` and ``GET /v1/index``)."""
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
            if not reloader.last_error:
                raise  # answered by status_for: a reason and an error id, never the text
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION, reloader.last_error) from exc  # client-safe
        return search_pb2.ReloadIndexResponse(
            reloaded=outcome.reloaded,
            index_version=outcome.index_version,
            previous_version=outcome.previous_version,
        )
