"""Blocking Python client of the esmsearch gRPC service (``esmsearch.v1.HomologSearch``).

Imports only grpc, protobuf, Biopython (for FASTA parsing) and esmsearch's
light modules: never torch, faiss or fair-esm.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from types import TracebackType
from typing import Any, Final

import grpc
import numpy as np

from esmsearch.client.channel import ClientCredentials
from esmsearch.client.errors import map_rpc_errors
from esmsearch.client.retry import RetryPolicy, call_with_retry
from esmsearch.client.types import Embeddings, IndexInfo, QueryResult, ReloadResult, RequestLimits
from esmsearch.sequences import records_from
from esmsearch.v1 import search_pb2, search_pb2_grpc

__all__ = ["DEFAULT_ADDRESS", "PIPELINED_REQUESTS", "SearchClient"]

#: Address a client connects to when none is given.
DEFAULT_ADDRESS: Final = "127.0.0.1:50051"
#: ``Search`` RPCs :meth:`SearchClient.iter_search` keeps in flight when the queries
#: need several (400 queries at k = 2,000 are 8 RPCs under the default hit limit): the
#: server has the next request queued while this process converts the previous answer.
PIPELINED_REQUESTS: Final = 2


class _Default:
    """Sentinel type: "use the client's timeout_s"."""

    def __repr__(self) -> str:
        return "<client default>"


_DEFAULT: Final = _Default()

Queries = str | os.PathLike[str] | Mapping[str, str] | Sequence[str]


class SearchClient:
    """Client of one esmsearch server.

    Use it as a context manager (or call :meth:`close`); the channel is closed there,
    never in ``__del__``::

        with SearchClient("127.0.0.1:50051") as client:
            for result in client.search("queries.fasta", k=10):
                print(result.query_id, result.hits[0].target_id, result.hits[0].cosine_score)

    Args:
        address: gRPC target: ``host:port`` of one server, or several replicas as
            ``dns:///host:port`` (every address the name resolves to) or
            ``ipv4:a:port,b:port``; calls are spread over the healthy ones with
            ``round_robin`` and client-side health checks (``credentials.lb_policy``;
            see :mod:`esmsearch.client.channel`).
        timeout_s: default deadline of each call in seconds; ``None`` = no deadline.
            Each method can override it.
        channel: an existing channel to use instead of opening one (the client then
            still closes it in :meth:`close`).
        credentials: TLS / mutual TLS / bearer token (default: plaintext, no token).
        retry: retry policy (default :class:`RetryPolicy`: 4 attempts), applied by gRPC's
            own retry policy in the channel's service config: UNAVAILABLE with
            exponential backoff, RESOURCE_EXHAUSTED after the server's standard
            ``grpc-retry-pushback-ms`` (a busy server; never over a permanent limit),
            always within the call's deadline (:mod:`esmsearch.client.retry`). Every
            wrapped unary RPC except ``reload_index`` is read-only, hence idempotent
            and safe to retry; pass ``esmsearch.client.retry.NO_RETRY`` to disable.

    Attributes:
        address: the server address.
        timeout_s: the default per-call deadline in seconds (or ``None``).
        stub: the raw generated ``HomologSearchStub``, for calls this class does not wrap.
        channel: the underlying ``grpc.Channel``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float | None = 30.0,
        channel: grpc.Channel | None = None,
        credentials: ClientCredentials | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds or None, got {timeout_s!r}")
        self.address = address
        self.timeout_s = timeout_s
        self.credentials = credentials or ClientCredentials()
        self.retry = retry or RetryPolicy()
        self._metadata = self.credentials.metadata()
        # gRPC's retry policy goes into the service config of a channel opened here; the
        # hand-made loop does what it cannot (esmsearch.client.retry).
        self._loop_retry = self.retry.loop_policy(in_channel=channel is None)
        if channel is None:
            # Responses grow with k x queries (a hit is ~100-200 bytes): no 4 MB cap.
            channel = self.credentials.channel(address, retry=self.retry)
        self.channel: grpc.Channel = channel
        self.stub = search_pb2_grpc.HomologSearchStub(self.channel)
        self._closed = False
        self._cached_limits: RequestLimits | None = None

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; idempotent. Calls after this raise ``ValueError``."""
        if not self._closed:
            self._closed = True
            self.channel.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SearchClient({self.address!r}, timeout_s={self.timeout_s!r}) [{state}]"

    def _timeout(self, timeout_s: float | None | _Default) -> float | None:
        if self._closed:
            raise ValueError("SearchClient is closed")
        if isinstance(timeout_s, _Default):
            return self.timeout_s
        return timeout_s

    # -- RPCs ------------------------------------------------------------------------

    def _unary(self, method: Callable[..., Any], request: Any, deadline: float | None) -> Any:
        """One read-only unary RPC with the token and retries (:mod:`esmsearch.client.retry`).

        Raises:
            SearchError: (a subclass of) the last attempt's failure.
        """
        with map_rpc_errors():
            return call_with_retry(
                lambda remaining: method(request, timeout=remaining, metadata=self._metadata),
                self._loop_retry,
                deadline,
            )

    def search_stream(
        self,
        batches: Iterable[Queries],
        *,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None | _Default = _DEFAULT,
        evalue_db_size: int | None = None,
    ) -> Iterator[list[QueryResult]]:
        """Search many query batches over one ``SearchStream`` call, lazily.

        Batches are read from ``batches``, validated and sent only as gRPC's
        HTTP/2 flow control lets them go out (the server answers one at a time),
        and one list of results is yielded per batch, in order; so a generator of
        batches is never materialised whole, however many are streamed. Each batch
        must fit the server's
        request limits (it is one SearchRequest). Not retried: a stream that
        fails mid-way raises.

        Args:
            batches: iterable of query batches, each in any form :meth:`search`
                accepts (FASTA path, mapping id -> sequence, list of sequences).
            k, min_score, max_evalue, evalue_db_size: as for :meth:`search`.
            timeout_s: deadline of the whole stream in seconds; ``None`` = none.

        Yields:
            One list of :class:`QueryResult` per batch, in the batch's query order.

        Raises:
            esmsearch.errors.InvalidSequenceError: a batch has an invalid query
                (raised while iterating, before it is sent).
            InvalidArgumentError, ResourceExhaustedError, DeadlineExceededError,
                UnavailableError, SearchError: the stream failed (details of a
                server-side rejection start with ``request #<n>:``).
            FailedPreconditionError: ``max_evalue`` given but the index has no decoys.
            ValueError: the client is closed, ``min_score`` is NaN, ``max_evalue``
                is negative or NaN, or ``evalue_db_size`` is not a positive integer.
        """
        deadline = self._timeout(timeout_s)
        check_bounds(min_score, max_evalue)
        check_db_size_arg(evalue_db_size)

        failure: list[BaseException] = []  # a bad batch, raised here rather than in grpc's thread

        def requests() -> Iterator[search_pb2.SearchRequest]:
            for batch in batches:
                try:
                    records = records_from(batch)
                except (ValueError, OSError) as exc:
                    failure.append(exc)
                    return
                queries = [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
                yield search_request(queries, k, min_score, max_evalue, evalue_db_size=evalue_db_size)

        responses = self.stub.SearchStream(requests(), timeout=deadline, metadata=self._metadata)
        try:
            with map_rpc_errors():
                try:
                    for response in responses:
                        yield [QueryResult.from_proto(r, response.index_version) for r in response.results]
                except grpc.RpcError:
                    if failure:
                        raise failure[0] from None
                    raise
        finally:
            responses.cancel()
        if failure:
            raise failure[0]

    def search(
        self,
        queries: Queries,
        *,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None | _Default = _DEFAULT,
        split_requests: bool = True,
        evalue_db_size: int | None = None,
    ) -> list[QueryResult]:
        """Find the ``k`` nearest database sequences of each query.

        Queries go out in ``Search`` RPCs that respect the server's request limits
        (queries and residues per request, read once with :meth:`index_info`);
        pass ``split_requests=False`` to send exactly one RPC.

        Args:
            queries: a ``str`` that is an existing FASTA file (plain or gzip; ``-`` =
                stdin), FASTA text (starts with ``>``) or one sequence (id
                ``query_1``) -- in that order, so an existing file wins; a
                ``pathlib.Path`` (always a file); a mapping record id -> sequence; or
                a sequence of residue strings (ids ``query_1``, ``query_2``, ...).
                Validated locally first (see :func:`esmsearch.sequences.records_from`).
            k: hits per query, 1 .. the server's ``max_k`` (1000 by default).
            min_score: drop hits whose cosine score is below this, in [-1, 1];
                ``None`` = keep all.
            max_evalue: drop hits whose E-value is above this, >= 0 (like BLAST's
                ``-evalue``, applied to the ``k`` nearest hits); ``None`` = keep all.
                Needs an index with decoys (:attr:`IndexInfo.has_evalues`).
            timeout_s: deadline of each RPC in seconds; ``None`` = none; default:
                the client's ``timeout_s``.
            split_requests: split the queries into several RPCs within the server's
                limits (each result then names the index version that answered its
                own RPC).
            evalue_db_size: number of database sequences the E-values are scaled to
                (HMMER's ``-Z``, BLAST's ``-dbsize``), a positive integer, e.g. the
                size of the whole database when searching one shard, so that E-values
                of several servers compare; ``None`` = the server's default
                (``esmsearch serve --evalue-db-size``), else the index's count.

        Returns:
            One :class:`QueryResult` per query, in input order, each with at most
            ``k`` hits by descending cosine score (in [-1, 1], higher = closer),
            each with its E-value (``None`` if the index has no decoys), and the
            version of the index that answered.

        Raises:
            esmsearch.errors.InvalidSequenceError: a query is invalid, or a ``str`` is
                neither an existing file nor FASTA text nor a valid sequence (caught
                locally, before any RPC; names the record id and residue position).
            esmsearch.errors.FastaFormatError: unreadable FASTA.
            FileNotFoundError: a ``pathlib.Path`` that does not exist.
            InvalidArgumentError: the server rejected the request (e.g. ``k`` out of range).
            ResourceExhaustedError: a request exceeds a server limit (with
                ``split_requests``: one query is longer than the per-query limit).
            DeadlineExceededError: ``timeout_s`` elapsed.
            UnavailableError: the server is unreachable or draining.
            FailedPreconditionError: ``max_evalue`` given but the index has no decoys.
            SearchError: any other failed RPC.
            ValueError: the client is closed, ``min_score`` is NaN, ``max_evalue``
                is negative or NaN, or ``evalue_db_size`` is not a positive integer.
        """
        return list(
            self.iter_search(
                queries,
                k=k,
                min_score=min_score,
                max_evalue=max_evalue,
                timeout_s=timeout_s,
                split_requests=split_requests,
                evalue_db_size=evalue_db_size,
            )
        )

    def iter_search(
        self,
        queries: Queries,
        *,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None | _Default = _DEFAULT,
        split_requests: bool = True,
        evalue_db_size: int | None = None,
    ) -> Iterator[QueryResult]:
        """:meth:`search`, yielding each query's result as soon as its RPC has answered.

        The queries are validated (errors raise here, from this call) and split as
        :meth:`search` does; the RPCs start when iteration starts. Up to
        :data:`PIPELINED_REQUESTS` ``Search`` RPCs are in flight at once, so the server
        searches the next request while this process converts (and the caller
        writes) the hits of the previous one; the overlap shortens the wall time when
        client and server do not share the same busy cores. Results come in input
        order. Stopping early (``break``, an exception in the caller) cancels the
        RPCs not yet sent.

        Args and Raises: as for :meth:`search`; invalid queries and arguments raise
        from the call, a failed RPC when the iteration reaches its queries (results
        of earlier RPCs have been yielded).

        Yields:
            One :class:`QueryResult` per query, in input order.
        """
        deadline = self._timeout(timeout_s)
        check_bounds(min_score, max_evalue)
        check_db_size_arg(evalue_db_size)
        records = records_from(queries)
        queries_pb = [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
        if split_requests and queries_pb:
            chunks = _split(queries_pb, self._limits(deadline), k)
        else:
            chunks = [queries_pb]
        requests = [search_request(c, k, min_score, max_evalue, evalue_db_size=evalue_db_size) for c in chunks]
        return self._pipelined_search(requests, deadline)

    def _pipelined_search(
        self, requests: list[search_pb2.SearchRequest], deadline: float | None
    ) -> Iterator[QueryResult]:
        if len(requests) == 1:
            response = self._unary(self.stub.Search, requests[0], deadline)
            yield from (QueryResult.from_proto(r, response.index_version) for r in response.results)
            return
        # The blocking RPCs wait in worker threads (gRPC releases the GIL while waiting);
        # converting protobuf hits happens here, overlapping the next RPC.
        pool = ThreadPoolExecutor(max_workers=PIPELINED_REQUESTS, thread_name_prefix="esmsearch-search")
        try:
            later = iter(requests)
            pending: deque[Future[Any]] = deque(
                pool.submit(self._unary, self.stub.Search, r, deadline) for r in islice(later, PIPELINED_REQUESTS)
            )
            while pending:
                response = pending.popleft().result()
                if (request := next(later, None)) is not None:
                    pending.append(pool.submit(self._unary, self.stub.Search, request, deadline))
                yield from (QueryResult.from_proto(r, response.index_version) for r in response.results)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _limits(self, deadline: float | None) -> RequestLimits:
        if self._cached_limits is None:
            self._cached_limits = self.index_info(timeout_s=deadline).limits
        return self._cached_limits

    def search_by_embedding(
        self,
        vectors: np.ndarray | Mapping[str, Sequence[float]],
        *,
        query_ids: Sequence[str] | None = None,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None | _Default = _DEFAULT,
        evalue_db_size: int | None = None,
    ) -> list[QueryResult]:
        """Search with precomputed query embeddings (one ``SearchByEmbedding`` RPC).

        Args:
            vectors: float32-convertible ``[n_queries, dim]`` array (``dim`` =
                :attr:`IndexInfo.dim`), or a mapping query id -> vector. Any non-zero
                finite vectors; the server L2-normalises them.
            query_ids: ids for the rows of an array (default ``query_1``, ``query_2``, ...).
            k: hits per query, 1 .. the server's ``max_k``.
            min_score: drop hits whose cosine score is below this, in [-1, 1].
            max_evalue: drop hits whose E-value is above this, >= 0 (as in :meth:`search`).
            timeout_s: deadline of the call in seconds; ``None`` = none.
            evalue_db_size: database size the E-values are scaled to (as in :meth:`search`).

        Returns:
            One :class:`QueryResult` per vector, in input order, with
            ``query_length`` 0 (unknown for a vector); hits carry E-values as in
            :meth:`search`.

        Raises:
            InvalidArgumentError: wrong dimension, non-finite or zero vector, bad k/ids.
            ResourceExhaustedError, DeadlineExceededError, UnavailableError, SearchError:
                the RPC failed.
            FailedPreconditionError: ``max_evalue`` given but the index has no decoys.
            ValueError: ``vectors`` is not 2-D, ``query_ids`` has the wrong length,
                ``max_evalue`` is negative or NaN, ``evalue_db_size`` is not a positive
                integer, or the client is closed.
        """
        deadline = self._timeout(timeout_s)
        request = search_by_embedding_request(
            vectors, query_ids, k, min_score, max_evalue=max_evalue, evalue_db_size=evalue_db_size
        )
        response = self._unary(self.stub.SearchByEmbedding, request, deadline)
        return [QueryResult.from_proto(r, response.index_version) for r in response.results]

    def embed(self, queries: Queries, *, timeout_s: float | None | _Default = _DEFAULT) -> Embeddings:
        """Embed query sequences with the served index's model (one ``Embed`` RPC).

        Args:
            queries: as for :meth:`search`.
            timeout_s: deadline of the call in seconds; ``None`` = none.

        Returns:
            :class:`Embeddings` with float32 ``[n_queries, dim]`` L2-normalised vectors
            in input order (the same vectors :meth:`search` searches with).

        Raises:
            esmsearch.errors.InvalidSequenceError: a query is invalid (caught locally).
            InvalidArgumentError, ResourceExhaustedError, DeadlineExceededError,
                UnavailableError, SearchError: the RPC failed.
            ValueError: the client is closed.
        """
        deadline = self._timeout(timeout_s)
        records = records_from(queries)
        request = search_pb2.EmbedRequest(
            queries=[search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
        )
        response = self._unary(self.stub.Embed, request, deadline)
        return Embeddings.from_proto(response)

    def index_info(self, *, timeout_s: float | None | _Default = _DEFAULT) -> IndexInfo:
        """Describe the served index (model, layer, pooling, size, version) and the server's limits.

        Raises:
            UnavailableError, DeadlineExceededError, SearchError: the RPC failed.
            ValueError: the client is closed.
        """
        deadline = self._timeout(timeout_s)
        msg = self._unary(self.stub.GetIndexInfo, search_pb2.GetIndexInfoRequest(), deadline)
        return IndexInfo.from_proto(msg)

    def reload_index(self, *, timeout_s: float | None | _Default = _DEFAULT) -> ReloadResult:
        """Admin: make a server started on a versioned index root load ``ROOT/current`` now.

        The server opens and verifies the version ``current`` names (if it is not
        the served one), checks its model settings, and swaps it in between
        requests; requests in flight finish on the old version. Give a generous
        ``timeout_s``: verification reads every file of the new version.

        Returns:
            :class:`ReloadResult` (``reloaded`` false if ``current`` already named the
            served version).

        Raises:
            FailedPreconditionError: the new version was refused (model mismatch,
                failed verification, missing; the old version keeps serving), or the
                server serves a fixed index directory, not a root.
            UnavailableError, DeadlineExceededError, SearchError: the RPC failed.
            ValueError: the client is closed.
        """
        deadline = self._timeout(timeout_s)
        with map_rpc_errors():  # never retried: an admin action
            msg = self.stub.ReloadIndex(search_pb2.ReloadIndexRequest(), timeout=deadline, metadata=self._metadata)
        return ReloadResult.from_proto(msg)

    def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel is connected (not that the index is loaded: see health).

        Raises:
            UnavailableError: not connected within ``timeout_s`` seconds.
        """
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            from esmsearch.client.errors import UnavailableError

            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f"no connection to {self.address} within {timeout_s} s",
            ) from exc


def _split(queries: list[search_pb2.Query], limits: RequestLimits, k: int = 1) -> list[list[search_pb2.Query]]:
    """Greedy, order-keeping split of queries into requests within ``limits``.

    A limit of 0 (a server that does not report it) means "no limit". A query
    longer than the per-request residue limit goes alone (the server then answers
    RESOURCE_EXHAUSTED for it). With ``k`` hits per query, a request holds at most
    ``max_hits_per_request // k`` queries (at least one: a single query over the
    hit limit gets the server's INVALID_ARGUMENT).
    """
    max_n = limits.max_queries_per_request or len(queries)
    if limits.max_hits_per_request and k > 0:
        max_n = min(max_n, max(1, limits.max_hits_per_request // k))
    max_res = limits.max_residues_per_request or None
    chunks: list[list[search_pb2.Query]] = [[]]
    residues = 0
    for q in queries:
        n = len(q.sequence)
        current = chunks[-1]
        if current and (len(current) >= max_n or (max_res is not None and residues + n > max_res)):
            chunks.append([])
            current, residues = chunks[-1], 0
        current.append(q)
        residues += n
    return chunks


def check_bounds(min_score: float | None, max_evalue: float | None) -> None:
    """Refuse bounds the server would refuse, before any RPC (shared by both clients).

    Raises:
        ValueError: ``min_score`` is NaN, or ``max_evalue`` is negative or NaN.
    """
    if min_score is not None and math.isnan(min_score):
        raise ValueError("min_score must be a number in [-1, 1], got NaN")
    if max_evalue is not None and (math.isnan(max_evalue) or max_evalue < 0):
        raise ValueError(f"max_evalue must be an E-value >= 0, got {max_evalue}")


def check_db_size_arg(evalue_db_size: int | None) -> None:
    """Refuse an ``evalue_db_size`` the server would refuse, before any RPC.

    Raises:
        ValueError: ``evalue_db_size`` is not ``None`` or a positive integer.
    """
    if evalue_db_size is None:
        return
    if not isinstance(evalue_db_size, int) or isinstance(evalue_db_size, bool) or evalue_db_size < 1:
        raise ValueError(
            f"evalue_db_size must be a positive integer (a number of database sequences), got {evalue_db_size!r}"
        )


def search_request(
    queries: Sequence[search_pb2.Query],
    k: int,
    min_score: float | None,
    max_evalue: float | None,
    *,
    evalue_db_size: int | None = None,
) -> search_pb2.SearchRequest:
    """Build a Search request (shared by the sync and asyncio clients and their streams)."""
    request = search_pb2.SearchRequest(queries=queries, k=k)
    if min_score is not None:
        request.min_score = min_score
    if max_evalue is not None:
        request.max_evalue = max_evalue
    if evalue_db_size is not None:
        request.evalue_db_size = evalue_db_size
    return request


def search_by_embedding_request(
    vectors: np.ndarray | Mapping[str, Sequence[float]],
    query_ids: Sequence[str] | None,
    k: int,
    min_score: float | None,
    *,
    max_evalue: float | None = None,
    evalue_db_size: int | None = None,
) -> search_pb2.SearchByEmbeddingRequest:
    """Build a SearchByEmbedding request (shared by the sync and asyncio clients).

    Raises:
        ValueError: ``vectors`` is not 2-D, ``query_ids`` has the wrong length,
            ``max_evalue`` is negative or NaN, or ``evalue_db_size`` is not a
            positive integer.
    """
    check_bounds(min_score, max_evalue)
    check_db_size_arg(evalue_db_size)
    if isinstance(vectors, Mapping):
        ids = [str(key) for key in vectors]
        array = np.asarray([list(v) for v in vectors.values()], dtype=np.float32)
    else:
        array = np.asarray(vectors, dtype=np.float32)
        ids = list(query_ids) if query_ids is not None else [f"query_{i + 1}" for i in range(len(array))]
    if array.ndim != 2:
        raise ValueError(f"vectors must be 2-D [n_queries, dim], got shape {array.shape}")
    if len(ids) != array.shape[0]:
        raise ValueError(f"{len(ids)} query_ids for {array.shape[0]} vectors")
    request = search_pb2.SearchByEmbeddingRequest(
        embeddings=[
            search_pb2.Embedding(query_id=qid, values=row.tolist()) for qid, row in zip(ids, array, strict=True)
        ],
        k=k,
    )
    if min_score is not None:
        request.min_score = min_score
    if max_evalue is not None:
        request.max_evalue = max_evalue
    if evalue_db_size is not None:
        request.evalue_db_size = evalue_db_size
    return request
