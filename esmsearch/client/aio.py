"""asyncio client of the esmsearch gRPC service (``grpc.aio``), beside the blocking one.

Same methods, arguments, results and errors as :class:`esmsearch.client.SearchClient`,
as coroutines (``search_stream`` is an async generator)::

    async with AsyncSearchClient("127.0.0.1:50051") as client:
        results = await client.search({"q1": "MKTAYIAKQR"}, k=5)

Like the blocking client it imports no torch, faiss or fair-esm.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from esmsearch.client.channel import ClientCredentials
from esmsearch.client.client import (
    DEFAULT_ADDRESS,
    Queries,
    _split,
    check_bounds,
    check_db_size_arg,
    search_by_embedding_request,
    search_request,
)
from esmsearch.client.errors import UnavailableError, map_rpc_errors
from esmsearch.client.retry import RetryPolicy, call_with_retry_async
from esmsearch.client.types import Embeddings, IndexInfo, QueryResult, RequestLimits
from esmsearch.sequences import records_from
from esmsearch.v1 import search_pb2, search_pb2_grpc

__all__ = ["AsyncSearchClient"]

_DEFAULT: Any = object()


class _Status(grpc.RpcError):
    """A finished stream's non-OK status, in the shape :func:`error_from_rpc` reads."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


async def _raise_status(call: Any) -> None:
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise _Status(code, await call.details() or "")


class AsyncSearchClient:
    """asyncio client of one esmsearch server (see :class:`esmsearch.client.SearchClient`).

    Create it inside a running event loop (``grpc.aio`` channels belong to one loop)
    and close it with ``await client.close()`` or ``async with``.

    Args:
        address: gRPC target: ``host:port`` of one server, or several replicas as
            ``dns:///host:port`` (every address the name resolves to) or
            ``ipv4:a:port,b:port``; calls are spread over the healthy ones with
            ``round_robin`` and client-side health checks (``credentials.lb_policy``;
            see :mod:`esmsearch.client.channel`).
        timeout_s: default deadline of each call in seconds; ``None`` = none.
        credentials: TLS / mutual TLS / bearer token (default: plaintext, no token).
        retry: retry policy (read-only calls only; default :class:`RetryPolicy`), as
            for :class:`esmsearch.client.SearchClient`.
        channel: an existing ``grpc.aio.Channel`` to use (closed in :meth:`close`).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float | None = 30.0,
        credentials: ClientCredentials | None = None,
        retry: RetryPolicy | None = None,
        channel: grpc.aio.Channel | None = None,
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
        self.channel: grpc.aio.Channel = channel or self.credentials.aio_channel(address, retry=self.retry)
        self.stub = search_pb2_grpc.HomologSearchStub(self.channel)
        self._closed = False
        self._cached_limits: RequestLimits | None = None

    async def close(self) -> None:
        """Close the channel; idempotent. Calls after this raise ``ValueError``."""
        if not self._closed:
            self._closed = True
            await self.channel.close()

    async def __aenter__(self) -> AsyncSearchClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"AsyncSearchClient({self.address!r}, timeout_s={self.timeout_s!r}) [{state}]"

    def _timeout(self, timeout_s: Any) -> float | None:
        if self._closed:
            raise ValueError("AsyncSearchClient is closed")
        return self.timeout_s if timeout_s is _DEFAULT else timeout_s

    async def _unary(self, method: Callable[..., Awaitable[Any]], request: Any, deadline: float | None) -> Any:
        with map_rpc_errors():
            return await call_with_retry_async(
                lambda remaining: method(request, timeout=remaining, metadata=self._metadata),
                self._loop_retry,
                deadline,
            )

    async def search(
        self,
        queries: Queries,
        *,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None = _DEFAULT,
        split_requests: bool = True,
        evalue_db_size: int | None = None,
    ) -> list[QueryResult]:
        """See :meth:`esmsearch.client.SearchClient.search` (same arguments, result, errors;
        ``evalue_db_size``: the number of database sequences E-values are scaled to)."""
        deadline = self._timeout(timeout_s)
        check_bounds(min_score, max_evalue)
        check_db_size_arg(evalue_db_size)
        records = records_from(queries)
        queries_pb = [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
        if split_requests and queries_pb:
            if self._cached_limits is None:
                self._cached_limits = (await self.index_info(timeout_s=deadline)).limits
            chunks = _split(queries_pb, self._cached_limits, k)
        else:
            chunks = [queries_pb]
        results: list[QueryResult] = []
        for chunk in chunks:
            request = search_request(chunk, k, min_score, max_evalue, evalue_db_size=evalue_db_size)
            response = await self._unary(self.stub.Search, request, deadline)
            results.extend(QueryResult.from_proto(r, response.index_version) for r in response.results)
        return results

    async def search_by_embedding(
        self,
        vectors: np.ndarray | Mapping[str, Sequence[float]],
        *,
        query_ids: Sequence[str] | None = None,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None = _DEFAULT,
        evalue_db_size: int | None = None,
    ) -> list[QueryResult]:
        """See :meth:`esmsearch.client.SearchClient.search_by_embedding`."""
        deadline = self._timeout(timeout_s)
        request = search_by_embedding_request(
            vectors, query_ids, k, min_score, max_evalue=max_evalue, evalue_db_size=evalue_db_size
        )
        response = await self._unary(self.stub.SearchByEmbedding, request, deadline)
        return [QueryResult.from_proto(r, response.index_version) for r in response.results]

    async def embed(self, queries: Queries, *, timeout_s: float | None = _DEFAULT) -> Embeddings:
        """See :meth:`esmsearch.client.SearchClient.embed`."""
        deadline = self._timeout(timeout_s)
        records = records_from(queries)
        request = search_pb2.EmbedRequest(
            queries=[search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
        )
        return Embeddings.from_proto(await self._unary(self.stub.Embed, request, deadline))

    async def index_info(self, *, timeout_s: float | None = _DEFAULT) -> IndexInfo:
        """See :meth:`esmsearch.client.SearchClient.index_info`."""
        deadline = self._timeout(timeout_s)
        msg = await self._unary(self.stub.GetIndexInfo, search_pb2.GetIndexInfoRequest(), deadline)
        return IndexInfo.from_proto(msg)

    async def search_stream(
        self,
        batches: Iterable[Queries],
        *,
        k: int = 10,
        min_score: float | None = None,
        max_evalue: float | None = None,
        timeout_s: float | None = _DEFAULT,
        evalue_db_size: int | None = None,
    ) -> AsyncIterator[list[QueryResult]]:
        """See :meth:`esmsearch.client.SearchClient.search_stream`: one result list per batch."""
        deadline = self._timeout(timeout_s)
        check_bounds(min_score, max_evalue)
        check_db_size_arg(evalue_db_size)
        call = self.stub.SearchStream(timeout=deadline, metadata=self._metadata)
        try:
            with map_rpc_errors():
                for batch in batches:
                    records = records_from(batch)  # raises before sending a bad batch
                    queries = [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
                    await call.write(search_request(queries, k, min_score, max_evalue, evalue_db_size=evalue_db_size))
                    response = await call.read()
                    if response is grpc.aio.EOF or not isinstance(response, search_pb2.SearchResponse):
                        await _raise_status(call)
                        return
                    yield [QueryResult.from_proto(r, response.index_version) for r in response.results]
                await call.done_writing()
                await _raise_status(call)
        finally:
            if not call.done():
                call.cancel()

    async def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the channel is connected; raises UnavailableError after ``timeout_s`` s."""
        import asyncio

        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
        except TimeoutError as exc:
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE, f"no connection to {self.address} within {timeout_s} s"
            ) from exc
