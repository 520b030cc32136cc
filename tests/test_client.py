"""Client library: query forms, typed results, error mapping, timeouts, output formats."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from esmsearch.client import (
    TSV_COLUMNS,
    DeadlineExceededError,
    FailedPreconditionError,
    Hit,
    InternalError,
    InvalidArgumentError,
    PermissionDeniedError,
    QueryResult,
    ResourceExhaustedError,
    SearchClient,
    SearchError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    write_json,
    write_tsv,
)
from esmsearch.client.client import _split
from esmsearch.client.errors import error_from_rpc
from esmsearch.client.types import RequestLimits as ClientLimits
from esmsearch.errors import InvalidSequenceError
from esmsearch.sequences import read_fasta
from esmsearch.server import RequestLimits, SearchServer, ServerConfig, create_server
from esmsearch.store import Manifest
from esmsearch.v1 import search_pb2


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list:  # type: ignore[type-arg]
    return list(read_fasta(ecoli_fasta))


def test_search_fasta_path_gives_self_hits_in_order_with_version(client, ecoli_fasta, db, server) -> None:  # type: ignore[no-untyped-def]
    _, index_path = server
    version = Manifest.read(index_path).version
    results = client.search(ecoli_fasta, k=2)
    assert all(isinstance(r, QueryResult) for r in results)
    assert [r.query_id for r in results] == [r.record_id for r in db]
    for rec, result in zip(db, results, strict=True):
        assert result.index_version == version
        assert result.query_length == len(rec.sequence)
        top = result.hits[0]
        assert isinstance(top, Hit)
        assert (top.target_id, top.rank, top.target_length) == (rec.record_id, 1, len(rec.sequence))
        assert top.description == rec.description
        assert top.cosine_score >= 0.999
        assert result.hits[1].rank == 2


def test_search_mapping_and_list_forms(client, db) -> None:  # type: ignore[no-untyped-def]
    by_id = client.search({"second": db[2].sequence, "first": db[9].sequence}, k=1)
    assert [(r.query_id, r.hits[0].target_id) for r in by_id] == [
        ("second", db[2].record_id),
        ("first", db[9].record_id),
    ]
    listed = client.search([db[4].sequence, db[1].sequence], k=1)
    assert [(r.query_id, r.hits[0].target_id) for r in listed] == [
        ("query_1", db[4].record_id),
        ("query_2", db[1].record_id),
    ]


def test_min_score_filters_hits(client, db) -> None:  # type: ignore[no-untyped-def]
    (all_hits,) = client.search([db[3].sequence], k=40)
    cut = all_hits.hits[9].cosine_score
    (kept,) = client.search([db[3].sequence], k=40, min_score=cut)
    assert [h.target_id for h in kept.hits] == [h.target_id for h in all_hits.hits if h.cosine_score >= cut]
    assert len(kept.hits) < len(all_hits.hits) == 40


def test_index_info_is_typed(client, server) -> None:  # type: ignore[no-untyped-def]
    _, index_path = server
    m = Manifest.read(index_path)
    info = client.index_info()
    assert (info.model_name, info.checkpoint_sha256, info.dim, info.count) == (
        m.model_name,
        m.checkpoint_sha256,
        m.dim,
        m.count,
    )
    assert info.index_version == m.version
    assert info.limits.max_k == 1000


def test_server_errors_map_to_classes_keeping_code_and_details(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError) as info:
        client.search(["MKV"], k=0)
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details == "k must be in [1, 1000], got 0"
    assert isinstance(err.__cause__, grpc.RpcError)
    assert isinstance(err, SearchError)


def test_bad_sequence_is_caught_before_any_rpc(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidSequenceError) as info:
        client.search({"q7": "MKVJ"})
    assert (info.value.record_id, info.value.position) == ("q7", 4)


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        with (
            SearchClient(f"127.0.0.1:{port}", timeout_s=10.0) as c,
            pytest.raises(UnavailableError) as info,
        ):
            c.index_info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def own_server(small_index: Path) -> Iterator[tuple[SearchServer, SearchClient]]:
    """A server with small request limits, and a client of it."""
    limits = RequestLimits(max_queries_per_request=2, max_residues_per_query=200, max_residues_per_request=250)
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", limits=limits, max_workers=2))
    try:
        with SearchClient(f"127.0.0.1:{port}") as c:
            yield srv, c
    finally:
        srv.stop(0)


def test_resource_exhausted_is_mapped(own_server) -> None:  # type: ignore[no-untyped-def]
    _, client = own_server
    with pytest.raises(ResourceExhaustedError) as info:
        client.search(["MKV", "MKL", "MKI"], k=1, split_requests=False)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 queries, over the limit of 2" in info.value.details
    with pytest.raises(ResourceExhaustedError, match="201 residues, over the limit of 200"):
        client.search(["M" * 201], k=1)


def test_search_splits_requests_within_server_limits(own_server, db) -> None:  # type: ignore[no-untyped-def]
    _, client = own_server
    info = client.index_info()
    assert (info.limits.max_queries_per_request, info.limits.max_residues_per_request) == (2, 250)
    # 7 queries, 2 per request at most, and 167 + 159 > 250 residues forces a split too.
    picked = [r for r in db if len(r) in (167, 159, 111)] + [r for r in db if len(r) < 60][:4]
    results = client.search({r.record_id: r.sequence for r in picked}, k=1)
    assert [r.query_id for r in results] == [r.record_id for r in picked]
    assert [r.hits[0].target_id for r in results] == [r.record_id for r in picked]


def test_split_is_greedy_and_keeps_order() -> None:
    queries = [search_pb2.Query(query_id=str(i), sequence="M" * n) for i, n in enumerate([5, 5, 9, 1, 1, 1, 20])]
    limits = ClientLimits(max_k=10, max_queries_per_request=3, max_residues_per_query=100, max_residues_per_request=10)
    chunks = _split(queries, limits)
    assert [[q.query_id for q in c] for c in chunks] == [["0", "1"], ["2", "3"], ["4", "5"], ["6"]]
    unlimited = ClientLimits(max_k=0, max_queries_per_request=0, max_residues_per_query=0, max_residues_per_request=0)
    assert [len(c) for c in _split(queries, unlimited)] == [7]


def test_split_keeps_queries_times_k_within_the_hit_limit() -> None:
    queries = [search_pb2.Query(query_id=str(i), sequence="MKV") for i in range(7)]
    limits = ClientLimits(
        max_k=1000,
        max_queries_per_request=100,
        max_residues_per_query=100,
        max_residues_per_request=1000,
        max_hits_per_request=10,
    )
    assert [len(c) for c in _split(queries, limits, k=3)] == [3, 3, 1]
    assert [len(c) for c in _split(queries, limits, k=1)] == [7]
    assert [len(c) for c in _split(queries, limits, k=50)] == [1] * 7  # one query alone, even over the limit


def test_search_splits_by_hits_when_queries_times_k_exceed_the_server_limit(small_index: Path, db) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.server import AdmissionConfig

    config = ServerConfig(
        index=small_index, port=0, device="cpu", max_workers=2, admission=AdmissionConfig(max_hits_per_request=12)
    )
    srv, port = create_server(config)
    try:
        with SearchClient(f"127.0.0.1:{port}") as client:
            assert client.index_info().limits.max_hits_per_request == 12
            picked = list(db)[:7]
            results = client.search({r.record_id: r.sequence for r in picked}, k=5)  # 35 hits: 3 requests of <= 2
            assert [r.query_id for r in results] == [r.record_id for r in picked]
            assert all(len(r.hits) == 5 for r in results)
            with pytest.raises(InvalidArgumentError, match="max_hits_per_request"):
                client.search({r.record_id: r.sequence for r in picked}, k=5, split_requests=False)
    finally:
        srv.stop(0)


def test_timeout_is_honoured_per_call_and_by_default(own_server) -> None:  # type: ignore[no-untyped-def]
    srv, client = own_server
    # Hold the engine's model lock: the server cannot answer until it is released,
    # so the deadline expires deterministically (no sleeps).
    lock = srv.engine._model_lock  # noqa: SLF001 - test hook
    with lock:
        with pytest.raises(DeadlineExceededError) as info:
            client.search(["MKV"], k=1, timeout_s=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert isinstance(info.value, TimeoutError)
        with (
            SearchClient(client.address, timeout_s=0.2) as short,
            pytest.raises(DeadlineExceededError),
        ):
            short.search(["MKV"], k=1)  # the client's default deadline
    assert client.search(["MKV"], k=1)[0].query_id == "query_1"


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.ABORTED, SearchError),  # no dedicated class: the base
    ],
)
def test_error_from_rpc_table(code: grpc.StatusCode, cls: type[SearchError]) -> None:
    err = error_from_rpc(_FakeRpcError(code, "why"))
    assert type(err) is cls
    assert (err.code, err.details) == (code, "why")
    assert str(err) == f"{code.name}: why"


def test_close_is_idempotent_and_later_calls_fail(server) -> None:  # type: ignore[no-untyped-def]
    address, _ = server
    c = SearchClient(address)
    with c:
        assert c.stub.GetIndexInfo(search_pb2.GetIndexInfoRequest(), timeout=30).count == 40
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.search(["MKV"])
    with pytest.raises(ValueError, match="timeout_s"):
        SearchClient(address, timeout_s=0)


# -- formats -----------------------------------------------------------------------------

RESULTS = [
    QueryResult(
        "q1",
        120,
        "v1",
        [
            Hit("t1", "first target", 0.98765432, 1, 100, evalue=1.23456e-5),
            Hit("t2", "tab\tin\ndescription", -0.25, 2, 50, evalue=0.0),
        ],
    ),
    QueryResult("q2", 30, "v1", []),
    QueryResult("q3", 45, "v1", [Hit("t9", "", 0.5, 1, 7)]),
]


def test_write_tsv_one_hit_per_line_with_header() -> None:
    out = io.StringIO()
    write_tsv(RESULTS, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "query_id\ttarget_id\tcosine_score\trank\tquery_length\ttarget_length\tevalue\ttarget_description"
    )
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    assert lines[1:] == [
        "q1\tt1\t0.987654\t1\t120\t100\t1.23e-05\tfirst target",
        "q1\tt2\t-0.250000\t2\t120\t50\t0.00e+00\ttab in description",
        "q3\tt9\t0.500000\t1\t45\t7\tNA\t",  # an index without decoys: no E-value
    ]


def test_write_json_round_trips() -> None:
    out = io.StringIO()
    write_json(RESULTS, out)
    data = json.loads(out.getvalue())
    assert [q["query_id"] for q in data] == ["q1", "q2", "q3"]
    assert all(q["index_version"] == "v1" for q in data)
    assert data[0]["query_length"] == 120
    assert data[0]["hits"][0] == {
        "target_id": "t1",
        "cosine_score": 0.987654,
        "evalue": 1.23e-05,  # the 3 significant digits the TSV shows
        "rank": 1,
        "target_length": 100,
        "target_description": "first target",
    }
    assert data[0]["hits"][1]["evalue"] == 0.0
    assert data[1]["hits"] == []
    assert data[2]["hits"][0]["evalue"] is None  # JSON null: the index has no decoys


def test_embed_then_search_by_embedding_round_trip(client, db) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    emb = client.embed({"p": db[6].sequence, "q": db[11].sequence})
    assert emb.query_ids == ["p", "q"]
    assert emb.vectors.shape == (2, 32) and emb.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    info = client.index_info()
    assert (emb.checkpoint_sha256, emb.layer, emb.index_version) == (
        info.checkpoint_sha256,
        info.layer,
        info.index_version,
    )
    results = client.search_by_embedding(emb.vectors, query_ids=emb.query_ids, k=1)
    assert [(r.query_id, r.hits[0].target_id) for r in results] == [
        ("p", db[6].record_id),
        ("q", db[11].record_id),
    ]
    by_map = client.search_by_embedding({"only": emb.vectors[1]}, k=1)
    assert by_map[0].hits[0].target_id == db[11].record_id
    with pytest.raises(InvalidArgumentError, match="the index dimension is 32"):
        client.search_by_embedding(np.ones((1, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        client.search_by_embedding(np.ones(32, dtype=np.float32))


# -- evalue_db_size (issue 18 part 4) ----------------------------------------------------------
def _ratios(scaled: list, plain: list) -> list[float]:  # type: ignore[type-arg]
    out = []
    for a, b in zip(plain, scaled, strict=True):
        assert [h.target_id for h in a.hits] == [h.target_id for h in b.hits]
        out += [hb.evalue / ha.evalue for ha, hb in zip(a.hits, b.hits, strict=True)]
    return out


def test_evalue_db_size_keyword_scales_every_call(client, server, db) -> None:  # type: ignore[no-untyped-def]
    """search, search_stream, search_by_embedding and the asyncio client: N = 4000 (100 x the
    index's 40 sequences) multiplies every E-value by 100."""
    import asyncio

    import numpy as np

    from esmsearch.client import AsyncSearchClient

    queries = {r.record_id: r.sequence for r in db[:3]}
    plain = client.search(queries, k=8)
    np.testing.assert_allclose(_ratios(client.search(queries, k=8, evalue_db_size=4000), plain), 100, rtol=1e-5)
    [streamed] = list(client.search_stream([queries], k=8, evalue_db_size=4000))
    np.testing.assert_allclose(_ratios(streamed, plain), 100, rtol=1e-5)
    emb = client.embed(queries)
    by_vec = client.search_by_embedding(emb.vectors, query_ids=emb.query_ids, k=8)
    by_vec_scaled = client.search_by_embedding(emb.vectors, query_ids=emb.query_ids, k=8, evalue_db_size=4000)
    np.testing.assert_allclose(_ratios(by_vec_scaled, by_vec), 100, rtol=1e-5)

    async def run() -> tuple[list, list, list]:  # type: ignore[type-arg]
        async with AsyncSearchClient(server[0], timeout_s=60.0) as aio:
            a = await aio.search(queries, k=8, evalue_db_size=4000)
            b = await aio.search_by_embedding(emb.vectors, query_ids=emb.query_ids, k=8, evalue_db_size=4000)
            c = [batch async for batch in aio.search_stream([queries], k=8, evalue_db_size=4000)]
            return a, b, c[0]

    a, b, c = asyncio.run(run())
    for scaled, base in ((a, plain), (b, by_vec), (c, plain)):
        np.testing.assert_allclose(_ratios(scaled, base), 100, rtol=1e-5)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "10"])
def test_bad_evalue_db_size_is_refused_before_any_rpc(value) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.client.client import search_by_embedding_request

    with SearchClient("127.0.0.1:1") as offline:  # nothing listens there: no RPC may be tried
        with pytest.raises(ValueError, match="evalue_db_size"):
            offline.search(["MKV"], evalue_db_size=value)
        with pytest.raises(ValueError, match="evalue_db_size"):
            list(offline.search_stream([["MKV"]], evalue_db_size=value))
    with pytest.raises(ValueError, match="evalue_db_size"):
        search_by_embedding_request([[1.0, 0.0]], None, 3, None, evalue_db_size=value)


def test_cli_search_evalue_db_size(server, tmp_path: Path, db) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    fasta = tmp_path / "q.fasta"
    fasta.write_text("".join(f">{r.record_id}\n{r.sequence}\n" for r in db[:2]))
    outs = []
    for extra in ([], ["--evalue-db-size", "4000"]):
        out = tmp_path / f"out{len(extra)}.json"
        argv = ["search", str(fasta), "--server", server[0], "-k", "5", "--format", "json", "-o", str(out)]
        assert main(argv + extra) == 0
        outs.append(json.loads(out.read_text()))
    for a, b in zip(*outs, strict=True):
        for ha, hb in zip(a["hits"], b["hits"], strict=True):
            assert hb["evalue"] == pytest.approx(100 * ha["evalue"], rel=1e-2)
    assert main(["search", str(fasta), "--server", server[0], "--evalue-db-size", "0"]) == 2


def test_iter_search_keeps_two_rpcs_in_flight_and_the_input_order(own_server, db) -> None:  # type: ignore[no-untyped-def]
    import threading

    from esmsearch.client import PIPELINED_REQUESTS

    _, client = own_server
    picked = [r for r in db if len(r) < 120][:7]  # 2 queries per request: 4 RPCs
    expected = client.search({r.record_id: r.sequence for r in picked}, k=2)
    real_search = client.stub.Search
    lock, second_started = threading.Lock(), threading.Event()
    in_flight, most = [0], [0]

    def counting_search(request, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            if in_flight[0] >= 2:
                second_started.set()
        # The first RPC answers only once the second one is out (or after 10 s, when the
        # client sends one at a time and the assertion below fails).
        second_started.wait(10.0)
        try:
            return real_search(request, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    client.stub.Search = counting_search
    try:
        results = client.iter_search({r.record_id: r.sequence for r in picked}, k=2)
        assert most[0] == 0  # nothing is sent before iteration starts
        got = list(results)
    finally:
        client.stub.Search = real_search
    assert most[0] == PIPELINED_REQUESTS == 2
    assert got == expected
    assert [r.query_id for r in got] == [r.record_id for r in picked]


def test_iter_search_rejects_invalid_queries_at_the_call(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidSequenceError):
        client.iter_search(["MKV", "MK#V"], k=1)  # raised without iterating
    with pytest.raises(ValueError, match="max_evalue"):
        client.iter_search(["MKV"], k=1, max_evalue=-1.0)


def test_cli_search_output_file_is_not_left_half_written(own_server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from esmsearch.cli import main

    _, client = own_server
    fasta = tmp_path / "q.fasta"
    # RPC 1 (two short queries) succeeds; RPC 2 (201 residues, over the server's
    # per-query limit of 200) fails RESOURCE_EXHAUSTED after RPC 1's hits were converted.
    fasta.write_text(">a\nMKVLAAGIVG\n>b\nMKTAYIAKQR\n>c\n" + "M" * 201 + "\n")
    out = tmp_path / "hits.tsv"
    assert main(["search", str(fasta), "--server", client.address, "-k", "1", "-o", str(out)]) == 1
    assert "201 residues, over the limit of 200" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.fasta"]
    out.write_text("earlier results\n")
    assert main(["search", str(fasta), "--server", client.address, "-k", "1", "-o", str(out)]) == 1
    assert out.read_text() == "earlier results\n"
    fasta.write_text(">a\nMKVLAAGIVG\n>b\nMKTAYIAKQR\n>c\nMKV\n")
    assert main(["search", str(fasta), "--server", client.address, "-k", "1", "-o", str(out)]) == 0
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == ["query_id", "a", "b", "c"]
