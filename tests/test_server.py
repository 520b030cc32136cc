"""gRPC server: self-hits, validation status codes, limits, health, reflection, draining."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import reap
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmsearch.errors import IndexMismatchError
from esmsearch.sequences import read_fasta
from esmsearch.server import MAX_K, SERVICE_NAME, RequestLimits, ServerConfig, create_server
from esmsearch.store import Manifest
from esmsearch.v1 import search_pb2, search_pb2_grpc

Q = search_pb2.Query


@pytest.fixture(scope="module")
def channel(server: tuple[str, Path]) -> Iterator[grpc.Channel]:
    address, _ = server
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> search_pb2_grpc.HomologSearchStub:
    return search_pb2_grpc.HomologSearchStub(channel)


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list:  # type: ignore[type-arg]
    return list(read_fasta(ecoli_fasta))


def _error(stub: search_pb2_grpc.HomologSearchStub, request: search_pb2.SearchRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request, timeout=30)
    return info.value


# -- search results ----------------------------------------------------------------------


def test_every_database_sequence_finds_itself_at_rank_1(stub, db, server) -> None:  # type: ignore[no-untyped-def]
    _, index_path = server
    request = search_pb2.SearchRequest(queries=[Q(query_id=r.record_id, sequence=r.sequence) for r in db], k=3)
    response = stub.Search(request, timeout=60)
    assert response.index_version == Manifest.read(index_path).version
    assert [r.query_id for r in response.results] == [r.record_id for r in db]
    for rec, result in zip(db, response.results, strict=True):
        assert result.query_length == len(rec.sequence)
        assert len(result.hits) == 3
        top = result.hits[0]
        assert top.target_id == rec.record_id
        assert top.cosine_score >= 0.999
        assert top.target_length == len(rec.sequence)
        assert top.target_description == rec.description
        assert [h.rank for h in result.hits] == [1, 2, 3]
        scores = [h.cosine_score for h in result.hits]
        assert scores == sorted(scores, reverse=True)


def test_results_follow_query_order_and_lowercase_stop_is_accepted(stub, db) -> None:  # type: ignore[no-untyped-def]
    picked = [db[7], db[0], db[3]]
    request = search_pb2.SearchRequest(
        queries=[Q(query_id=f"q{i}", sequence=r.sequence.lower() + "*") for i, r in enumerate(picked)],
        k=1,
    )
    response = stub.Search(request, timeout=30)
    assert [r.query_id for r in response.results] == ["q0", "q1", "q2"]
    assert [r.hits[0].target_id for r in response.results] == [r.record_id for r in picked]
    assert [r.query_length for r in response.results] == [len(r.sequence) for r in picked]


def test_k_larger_than_index_returns_every_sequence_once(stub, db) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(queries=[Q(query_id="a", sequence=db[0].sequence)], k=MAX_K)
    (result,) = stub.Search(request, timeout=30).results
    assert len(result.hits) == len(db)
    assert {h.target_id for h in result.hits} == {r.record_id for r in db}
    assert [h.rank for h in result.hits] == list(range(1, len(db) + 1))


def test_min_score_drops_hits_below_it(stub, db) -> None:  # type: ignore[no-untyped-def]
    query = Q(query_id="a", sequence=db[5].sequence)
    (everything,) = stub.Search(search_pb2.SearchRequest(queries=[query], k=40), timeout=30).results
    threshold = everything.hits[4].cosine_score  # 5th best score
    (kept,) = stub.Search(search_pb2.SearchRequest(queries=[query], k=40, min_score=threshold), timeout=30).results
    expected = [h.target_id for h in everything.hits if h.cosine_score >= threshold]
    assert [h.target_id for h in kept.hits] == expected
    assert 5 <= len(kept.hits) < 40
    assert all(h.cosine_score >= threshold for h in kept.hits)
    assert [h.rank for h in kept.hits] == list(range(1, len(kept.hits) + 1))


def test_get_index_info_reports_the_manifest_and_limits(stub, server) -> None:  # type: ignore[no-untyped-def]
    _, index_path = server
    m = Manifest.read(index_path)
    info = stub.GetIndexInfo(search_pb2.GetIndexInfoRequest(), timeout=30)
    assert info.model_name == m.model_name
    assert info.checkpoint_sha256 == m.checkpoint_sha256
    assert (info.layer, info.dim, info.count) == (m.layer, m.dim, m.count) == (2, 32, 40)
    assert (info.pooling, info.normalisation, info.metric) == (m.pooling, m.normalisation, m.metric)
    assert info.index_version == m.version
    assert info.index_factory == m.index_factory
    assert info.built_at == m.built_at
    assert info.limits.max_k == MAX_K


# -- INVALID_ARGUMENT --------------------------------------------------------------------


def test_bad_residue_names_query_id_and_position(stub) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(
        queries=[Q(query_id="ok", sequence="MKTAYIAK"), Q(query_id="bad_one", sequence="MKTJAYI")],
        k=1,
    )
    err = _error(stub, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'bad_one'" in err.details()
    assert "residue 4" in err.details()
    assert "'J'" in err.details()


@pytest.mark.parametrize(
    ("queries", "k", "expected"),
    [
        ([], 5, "no queries"),
        ([("a", "MKV")], 0, "k must be in [1, 1000], got 0"),
        ([("a", "MKV")], -3, "got -3"),
        ([("a", "MKV")], MAX_K + 1, f"got {MAX_K + 1}"),
        (
            [("a", "MKV"), ("b", "MKL"), ("a", "MKI")],
            5,
            "'a': duplicate query_id (queries #1 and #3)",
        ),
        ([("a", "MKV"), ("", "MKL")], 5, "query #2 has an empty query_id"),
        ([("a", "")], 5, "'a': empty sequence"),
        ([("gap", "MK-V")], 5, "'gap' at residue 3"),
    ],
)
def test_invalid_requests_are_rejected_with_a_reason(stub, queries, k, expected) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(queries=[Q(query_id=i, sequence=s) for i, s in queries], k=k)
    err = _error(stub, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.details()


@pytest.mark.parametrize("min_score", [1.5, -1.01, float("nan")])
def test_min_score_outside_cosine_range_is_invalid(stub, min_score: float) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(queries=[Q(query_id="a", sequence="MKV")], k=1, min_score=min_score)
    err = _error(stub, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_score" in err.details()


def test_each_request_logs_one_line_with_code_and_timings(stub, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="esmsearch.server"):
        stub.Search(
            search_pb2.SearchRequest(queries=[Q(query_id="a", sequence="MKTAYIAK")], k=2),
            timeout=30,
        )
        _error(stub, search_pb2.SearchRequest(queries=[Q(query_id="a", sequence="MKV")], k=0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rpc=Search")]
    assert len(lines) == 2
    ok, bad = lines
    assert "code=OK" in ok and "queries=1" in ok and "residues=8" in ok
    for field in ("queue_ms=", "embed_ms=", "search_ms=", "total_ms="):
        assert field in ok
    assert "code=INVALID_ARGUMENT" in bad


# -- RESOURCE_EXHAUSTED ------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_stub(small_index: Path) -> Iterator[search_pb2_grpc.HomologSearchStub]:
    limits = RequestLimits(max_k=5, max_queries_per_request=3, max_residues_per_query=20, max_residues_per_request=30)
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", limits=limits, max_workers=2))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield search_pb2_grpc.HomologSearchStub(ch)
    finally:
        srv.stop(0)


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        (
            [("a", "MKV"), ("b", "MKV"), ("c", "MKV"), ("d", "MKV")],
            "4 queries, over the limit of 3",
        ),
        ([("long", "M" * 21)], "'long' has 21 residues, over the limit of 20 per query"),
        ([("a", "M" * 15), ("b", "M" * 15), ("c", "M")], "more than 30 residues in total"),
    ],
)
def test_requests_over_limits_are_resource_exhausted(limited_stub, queries, expected) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(queries=[Q(query_id=i, sequence=s) for i, s in queries], k=1)
    err = _error(limited_stub, request)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert expected in err.details()


def test_limits_are_inclusive_and_max_k_is_configurable(limited_stub) -> None:  # type: ignore[no-untyped-def]
    at_limit = search_pb2.SearchRequest(
        queries=[Q(query_id="a", sequence="M" * 20), Q(query_id="b", sequence="K" * 10)], k=5
    )
    response = limited_stub.Search(at_limit, timeout=30)
    assert [len(r.hits) for r in response.results] == [5, 5]
    err = _error(limited_stub, search_pb2.SearchRequest(queries=[Q(query_id="a", sequence="MKV")], k=6))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[1, 5]" in err.details()


def test_request_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="max_k"):
        RequestLimits(max_k=0)


# -- FAILED_PRECONDITION at startup ------------------------------------------------------


def test_server_refuses_a_model_that_does_not_match_the_index(small_index: Path, tmp_path: Path) -> None:
    from esmsearch.checkpoints import write_random_checkpoint

    other = write_random_checkpoint(
        "esm2_t6_8M_UR50D",
        tmp_path,
        seed=99,
        num_layers=2,
        embed_dim=32,
        attention_heads=4,
        name="esm2_other",
    )
    with pytest.raises(IndexMismatchError, match="checkpoint_sha256"):
        create_server(ServerConfig(index=small_index, port=0, device="cpu", model=str(other)))


# -- health, reflection, draining --------------------------------------------------------


def test_health_is_serving_for_overall_and_search_service(channel) -> None:  # type: ignore[no-untyped-def]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel) -> None:  # type: ignore[no-untyped-def]
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE_NAME == "esmsearch.v1.HomologSearch"
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services


def test_health_turns_not_serving_when_stop_begins(small_index: Path) -> None:
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=2))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert srv.wait_for_termination(0.05) is False  # serving: not terminated
        srv.begin_stop(5.0)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    srv.stop(5.0)
    assert srv.stopped and srv.wait_for_termination(0) is True
    srv.stop(5.0)  # idempotent: returns at once


def test_serve_prints_its_address_and_exits_0_on_sigterm(small_index: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from esmsearch.server import serve
        from esmsearch.server import ServerConfig
        sys.exit(serve(ServerConfig(index={str(small_index)!r}, port=0, device="cpu", grace_s=2.0)))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"serving {small_index} (40 sequences, model esm2_tiny_test, version "), line
        address = line.rsplit(" on ", 1)[1].strip()
        with grpc.insecure_channel(address) as ch:
            info = search_pb2_grpc.HomologSearchStub(ch).GetIndexInfo(search_pb2.GetIndexInfoRequest(), timeout=30)
        assert info.count == 40
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)


# -- Embed, SearchByEmbedding, SearchStream ----------------------------------------------


def test_embed_returns_the_index_vectors_of_database_sequences(stub, db, server) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from esmsearch.store import Index

    _, index_path = server
    picked = [0, 5, 39]
    request = search_pb2.EmbedRequest(queries=[Q(query_id=db[i].record_id, sequence=db[i].sequence) for i in picked])
    response = stub.Embed(request, timeout=30)
    assert [e.query_id for e in response.embeddings] == [db[i].record_id for i in picked]
    assert response.dim == 32 and response.layer == 2
    vectors = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
    with Index.open(index_path) as index:
        stored = np.asarray(index.embeddings())[picked]
        assert response.index_version == index.version
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, stored, atol=1e-5)


def test_search_by_embedding_matches_search_and_normalises(stub, db, server) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from esmsearch.store import Index

    _, index_path = server
    with Index.open(index_path) as index:
        stored = np.asarray(index.embeddings())[[3, 8]]
    request = search_pb2.SearchByEmbeddingRequest(
        embeddings=[
            search_pb2.Embedding(query_id="a", values=stored[0].tolist()),
            search_pb2.Embedding(query_id="b", values=(3.0 * stored[1]).tolist()),  # not unit
        ],
        k=4,
    )
    by_vector = stub.SearchByEmbedding(request, timeout=30)
    by_sequence = stub.Search(
        search_pb2.SearchRequest(
            queries=[
                Q(query_id="a", sequence=db[3].sequence),
                Q(query_id="b", sequence=db[8].sequence),
            ],
            k=4,
        ),
        timeout=30,
    )
    assert by_vector.index_version == by_sequence.index_version
    for v, s in zip(by_vector.results, by_sequence.results, strict=True):
        assert v.query_length == 0
        assert [h.target_id for h in v.hits] == [h.target_id for h in s.hits]
        assert [h.cosine_score for h in v.hits] == pytest.approx([h.cosine_score for h in s.hits], abs=1e-4)
    assert by_vector.results[1].hits[0].cosine_score <= 1.0001


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.1] * 31, "31 values, the index dimension is 32"),
        ([0.0] * 32, "a zero vector"),
        ([float("nan")] + [0.1] * 31, "non-finite values"),
    ],
)
def test_search_by_embedding_rejects_bad_vectors(stub, values, expected) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchByEmbeddingRequest(embeddings=[search_pb2.Embedding(query_id="v", values=values)], k=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.SearchByEmbedding(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"query 'v': embedding has {expected}" in info.value.details()


def test_search_stream_answers_in_order_and_stops_at_first_bad_request(stub, db) -> None:  # type: ignore[no-untyped-def]
    requests = [
        search_pb2.SearchRequest(queries=[Q(query_id="x", sequence=db[1].sequence)], k=1),
        search_pb2.SearchRequest(queries=[Q(query_id="y", sequence=db[2].sequence)], k=2),
        search_pb2.SearchRequest(queries=[Q(query_id="z", sequence="MKV")], k=0),
    ]
    stream = stub.SearchStream(iter(requests), timeout=30)
    first, second = next(stream), next(stream)
    assert first.results[0].hits[0].target_id == db[1].record_id
    assert [len(second.results[0].hits), second.results[0].hits[0].target_id] == [
        2,
        db[2].record_id,
    ]
    assert first.index_version == second.index_version != ""
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request #3: k must be in")


def test_stop_lets_in_flight_requests_finish_and_refuses_new_ones(small_index: Path, db) -> None:  # type: ignore[no-untyped-def]
    import threading

    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=2))
    entered, release = threading.Event(), threading.Event()
    original = srv.engine.embed

    def gated_embed(sequences):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(30)
        return original(sequences)

    srv.engine.embed = gated_embed  # type: ignore[method-assign]
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as ch:
        request = search_pb2.SearchRequest(queries=[Q(query_id="a", sequence=db[0].sequence)], k=1)
        future = search_pb2_grpc.HomologSearchStub(ch).Search.future(request, timeout=60)
        assert entered.wait(30)  # the request is inside the engine
        srv.begin_stop(30.0)
        with grpc.insecure_channel(address) as late:
            with pytest.raises(grpc.RpcError) as info:
                search_pb2_grpc.HomologSearchStub(late).Search(request, timeout=10)
            # Refused, never run: gRPC core answers a call that races its shutdown with
            # CANCELLED instead of UNAVAILABLE (about 1 run in 20 here), so both count.
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        release.set()
        response = future.result(timeout=30)
    assert response.results[0].hits[0].target_id == db[0].record_id
    srv.stop()
    assert srv.stopped


def test_cli_serve_defaults_are_the_servers() -> None:
    """The CLI repeats a few server defaults (so `--help` stays light); they must not drift."""
    from esmsearch.cli import build_parser
    from esmsearch.server import AdmissionConfig

    args = build_parser().parse_args(["serve", "some/index"])
    config = ServerConfig(index=Path("some/index"))
    assert args.max_workers == config.max_workers
    assert args.grace_s == config.grace_s
    assert args.port == config.port
    assert args.max_queries_in_flight == AdmissionConfig().max_queries_in_flight
    assert args.max_queued_residues == AdmissionConfig().max_queued_residues
    assert args.toks_per_batch == config.toks_per_batch
    assert args.reload_poll_s == config.reload_poll_s
    assert args.max_k == config.limits.max_k


# -- evalue_db_size (issue 18 part 4) ----------------------------------------------------------
def _evalues(response: search_pb2.SearchResponse) -> list[list[float]]:
    return [[h.evalue for h in r.hits] for r in response.results]


def test_evalue_db_size_scales_evalues_linearly_per_request(stub, db) -> None:  # type: ignore[no-untyped-def]
    """Search and SearchByEmbedding: N = 4000 (100 x the 40-sequence index) gives 100 x each
    E-value, on the same hits in the same order; unset (0) is the index's count."""
    queries = [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in db[:3]]
    plain = stub.Search(search_pb2.SearchRequest(queries=queries, k=10))
    unset = stub.Search(search_pb2.SearchRequest(queries=queries, k=10, evalue_db_size=0))
    scaled = stub.Search(search_pb2.SearchRequest(queries=queries, k=10, evalue_db_size=4000))
    assert _evalues(unset) == _evalues(plain)
    for a, b in zip(plain.results, scaled.results, strict=True):
        assert [h.target_id for h in a.hits] == [h.target_id for h in b.hits]
    for a_e, b_e in zip(_evalues(plain), _evalues(scaled), strict=True):
        assert min(a_e) > 1e-30  # far from the float32 floor, so the ratio is exact
        np.testing.assert_allclose(b_e, [100 * e for e in a_e], rtol=1e-5)
    vectors = stub.Embed(search_pb2.EmbedRequest(queries=queries)).embeddings
    by_vec = stub.SearchByEmbedding(search_pb2.SearchByEmbeddingRequest(embeddings=vectors, k=10))
    by_vec_scaled = stub.SearchByEmbedding(
        search_pb2.SearchByEmbeddingRequest(embeddings=vectors, k=10, evalue_db_size=4000)
    )
    for a_e, b_e in zip(_evalues(by_vec), _evalues(by_vec_scaled), strict=True):
        np.testing.assert_allclose(b_e, [100 * e for e in a_e], rtol=1e-5)


def test_negative_evalue_db_size_is_invalid_argument_naming_the_field(stub) -> None:  # type: ignore[no-untyped-def]
    query = search_pb2.Query(query_id="q", sequence="MKTAYIAKQR")
    for request, method in (
        (search_pb2.SearchRequest(queries=[query], k=3, evalue_db_size=-5), stub.Search),
        (
            search_pb2.SearchByEmbeddingRequest(
                embeddings=[search_pb2.Embedding(query_id="q", values=[1.0] * 32)], k=3, evalue_db_size=-1
            ),
            stub.SearchByEmbedding,
        ),
    ):
        with pytest.raises(grpc.RpcError) as info:
            method(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "evalue_db_size" in info.value.details()


def test_serve_evalue_db_size_is_the_default_and_a_request_overrides_it(small_index: Path, stub, db) -> None:  # type: ignore[no-untyped-def]
    """Precedence: request > server (--evalue-db-size) > the index's count."""
    queries = [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in db[:2]]
    plain = _evalues(stub.Search(search_pb2.SearchRequest(queries=queries, k=5)))
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=4, evalue_db_size=400))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            own = search_pb2_grpc.HomologSearchStub(channel)
            served = _evalues(own.Search(search_pb2.SearchRequest(queries=queries, k=5), timeout=60))
            asked = _evalues(own.Search(search_pb2.SearchRequest(queries=queries, k=5, evalue_db_size=40), timeout=60))
    finally:
        srv.stop(1.0)
    for p, s, a in zip(plain, served, asked, strict=True):
        np.testing.assert_allclose(s, [10 * e for e in p], rtol=1e-5)
        np.testing.assert_allclose(a, p, rtol=1e-5)
    from esmsearch.cli import build_parser

    assert build_parser().parse_args(["serve", "x", "--evalue-db-size", "1000000"]).evalue_db_size == 1_000_000
    for bad in ("0", "-3", "1.5", "many"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["serve", "x", "--evalue-db-size", bad])
        assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="evalue_db_size"):
        ServerConfig(index=small_index, evalue_db_size=0)
