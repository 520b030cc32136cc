"""asyncio client (same methods as the blocking one) and the streaming search helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from esmsearch.client import InvalidArgumentError
from esmsearch.client.aio import AsyncSearchClient
from esmsearch.errors import InvalidSequenceError
from esmsearch.sequences import read_fasta

T = TypeVar("T")


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list:  # type: ignore[type-arg]
    return list(read_fasta(ecoli_fasta))


def _run(server: tuple[str, Path], body: Callable[[AsyncSearchClient], Awaitable[T]]) -> T:
    address, _ = server

    async def go() -> T:
        async with AsyncSearchClient(address, timeout_s=60) as client:
            return await body(client)

    return asyncio.run(go())


def test_async_methods_match_the_blocking_client(server, client, db) -> None:  # type: ignore[no-untyped-def]
    queries = {r.record_id: r.sequence for r in db[:6]}

    async def body(ac: AsyncSearchClient) -> Any:
        info = await ac.index_info()
        results = await ac.search(queries, k=3, min_score=-1.0)
        emb = await ac.embed(queries)
        by_vec = await ac.search_by_embedding(emb.vectors, query_ids=emb.query_ids, k=3)
        return info, results, emb, by_vec

    info, results, emb, by_vec = _run(server, body)
    assert info == client.index_info()
    sync = client.search(queries, k=3, min_score=-1.0)
    assert [r.query_id for r in results] == list(queries)
    assert [[h.target_id for h in r.hits] for r in results] == [[h.target_id for h in r.hits] for r in sync]
    assert all(r.hits[0].target_id == r.query_id for r in results)
    np.testing.assert_allclose(emb.vectors, client.embed(queries).vectors, atol=1e-6)
    assert [[h.target_id for h in r.hits] for r in by_vec] == [[h.target_id for h in r.hits] for r in results]


def test_async_errors_map_to_the_same_classes(server) -> None:  # type: ignore[no-untyped-def]
    async def body(ac: AsyncSearchClient) -> None:
        with pytest.raises(InvalidArgumentError, match="k must be in"):
            await ac.search(["MKV"], k=0, split_requests=False)
        with pytest.raises(InvalidSequenceError):
            await ac.search({"bad": "MK1V"})
        await ac.close()
        with pytest.raises(ValueError, match="closed"):
            await ac.index_info()

    _run(server, body)


def test_async_search_stream_yields_one_list_per_batch_then_stops_at_a_bad_one(server, db) -> None:  # type: ignore[no-untyped-def]
    batches = [{r.record_id: r.sequence for r in db[i : i + 3]} for i in (0, 3, 6)]

    async def body(ac: AsyncSearchClient) -> Any:
        got = [res async for res in ac.search_stream(batches, k=2)]
        bad = []
        with pytest.raises(InvalidArgumentError, match="request #2: "):
            async for res in ac.search_stream([batches[0], {"x" * 1001: "MKV"}], k=2):
                bad.append(res)
        return got, bad

    got, bad = _run(server, body)
    assert [[r.query_id for r in lst] for lst in got] == [list(b) for b in batches]
    assert all(r.hits[0].target_id == r.query_id for lst in got for r in lst)
    assert len(bad) == 1


def test_sync_search_stream_reads_batches_on_demand_and_keeps_order(client, db) -> None:  # type: ignore[no-untyped-def]
    pulled: list[int] = []

    def batches():  # type: ignore[no-untyped-def]
        for i in range(0, 12, 3):
            pulled.append(i)
            yield [r.sequence for r in db[i : i + 3]]

    stream = client.search_stream(batches(), k=1)
    assert pulled == []  # nothing is read before the stream is iterated
    first = next(stream)
    rest = list(stream)
    assert len(pulled) == 4
    results = [first, *rest]
    assert [len(x) for x in results] == [3, 3, 3, 3]
    assert [r.hits[0].target_id for lst in results for r in lst] == [r.record_id for r in db[:12]]


def test_sync_search_stream_raises_a_bad_batch_locally(client, db) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidSequenceError):
        list(client.search_stream([[db[0].sequence], {"x": "MK1V"}], k=1))


def test_async_client_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        AsyncSearchClient("127.0.0.1:1", timeout_s=0)
