"""Property-based fuzzing of the servicer with random and hostile requests (hypothesis).

Each property: a request that an independent oracle (written here from the API
documentation, not from the server code) calls valid gets OK with well-formed
results; every other request gets exactly a documented error code with a reason;
afterwards the server still answers. The server's memory under hostile sizes is
measured in a fresh server process (its own peak RSS, VmHWM), never from the pytest
process's lifetime peak. A server with small limits is used so that limits are hit
often and cheaply.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import reap
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esmsearch.server import BatchingConfig, RequestLimits, ServerConfig, create_server
from esmsearch.v1 import search_pb2, search_pb2_grpc

LIMITS = RequestLimits(max_k=50, max_queries_per_request=5, max_residues_per_query=300, max_residues_per_request=600)
AMINO = "ACDEFGHIKLMNPQRSTVWYXBZUOacdefghiklmnpqrstvwy"
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # seeded: the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OK, INVALID, EXHAUSTED = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@pytest.fixture(scope="module")
def fuzz_server(small_index: Path) -> Iterator[tuple[search_pb2_grpc.HomologSearchStub, int]]:
    srv, port = create_server(
        ServerConfig(
            index=small_index, port=0, device="cpu", limits=LIMITS, max_workers=4, batching=BatchingConfig(enabled=True)
        )
    )
    try:
        assert srv.engine.index.manifest.dim == DIM
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield search_pb2_grpc.HomologSearchStub(ch), DIM
    finally:
        srv.stop(0)


sequences = st.one_of(
    st.text(alphabet=AMINO, min_size=0, max_size=400),  # mostly valid, some over the limit
    st.text(min_size=0, max_size=50),  # any unicode: control chars, surrogates-free text, digits
    st.text(alphabet=AMINO, min_size=1, max_size=30).map(lambda s: s + "*"),
    st.sampled_from(["", "*", "**", "M*K", " MKV", "MK V", "MKV\n", "ΜΚV", "MKV\x00", "-MKV", "ǅ"]),
)
query_ids = st.one_of(
    st.text(min_size=0, max_size=20),
    st.just(""),
    st.just("x" * 257),  # one character over the id limit
    st.just("x" * 256),
    st.just("q\tforged"),
    st.just("dup"),
)
hostile_queries = st.lists(st.tuples(query_ids, sequences), min_size=0, max_size=7)
valid_queries = st.lists(
    st.tuples(st.text(min_size=1, max_size=12), st.text(alphabet=AMINO, min_size=1, max_size=110)),
    min_size=1,
    max_size=LIMITS.max_queries_per_request,
    unique_by=lambda q: q[0],
)
queries = st.one_of(valid_queries, hostile_queries)  # about half well-formed
ks = st.one_of(
    st.integers(min_value=1, max_value=LIMITS.max_k),
    st.integers(min_value=-5, max_value=60),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
min_scores = st.one_of(
    st.none(),
    st.floats(min_value=-1, max_value=1, width=32),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
DIM = 32  # the tiny test checkpoint's embedding dimension (conftest)


def _call(fn, request):  # type: ignore[no-untyped-def]
    try:
        return OK, fn(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")  # search.proto: Query.sequence


def _valid_sequence(seq: str) -> bool:
    """search.proto's rule: one-letter residues, case-insensitive, one trailing '*' ignored."""
    raw = seq[:-1] if seq.endswith("*") else seq
    return bool(raw) and raw.isascii() and set(raw.upper()) <= RESIDUES


def _residues(seq: str) -> int:
    return len(seq) - seq.endswith("*")


def _valid_ids(ids: list[str]) -> bool:
    # The documented rule (FASTA's first word): 1..256 printable characters, no whitespace, unique.
    def one(i: str) -> bool:
        return 0 < len(i) <= 256 and i.isprintable() and not any(c.isspace() for c in i)

    return all(one(i) for i in ids) and len(set(ids)) == len(ids)


def _valid_k(k: int, min_score: float | None = None) -> bool:
    in_range = min_score is None or (not math.isnan(min_score) and -1 <= min_score <= 1)
    return 1 <= k <= LIMITS.max_k and in_range


def _valid_queries(qs: list[tuple[str, str]]) -> bool:
    return (
        1 <= len(qs) <= LIMITS.max_queries_per_request
        and _valid_ids([q for q, _ in qs])
        and all(_valid_sequence(s) and _residues(s) <= LIMITS.max_residues_per_query for _, s in qs)
        and sum(_residues(s) for _, s in qs) <= LIMITS.max_residues_per_request
    )


@FUZZ
@given(qs=queries, k=ks, min_score=min_scores)
def test_search_gets_ok_or_a_precise_error(fuzz_server, qs, k, min_score) -> None:  # type: ignore[no-untyped-def]
    stub, _ = fuzz_server
    request = search_pb2.SearchRequest(queries=[search_pb2.Query(query_id=i, sequence=s) for i, s in qs], k=k)
    if min_score is not None:
        request.min_score = min_score
    code, payload = _call(stub.Search, request)
    event(code.name)
    assert code in (OK, INVALID, EXHAUSTED), (code, payload)
    assert (code == OK) == (_valid_queries(qs) and _valid_k(k, min_score)), (code, payload)
    if code != OK:
        assert payload  # a reason is always given
        return
    assert [r.query_id for r in payload.results] == [q for q, _ in qs]
    for (_, seq), result in zip(qs, payload.results, strict=True):
        assert 1 <= result.query_length <= LIMITS.max_residues_per_query
        assert result.query_length == len(seq) - seq.endswith("*")  # one trailing stop dropped
        assert len(result.hits) <= k
        assert [h.rank for h in result.hits] == list(range(1, len(result.hits) + 1))
        scores = [h.cosine_score for h in result.hits]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0001 <= s <= 1.0001 for s in scores)
        if min_score is not None:
            assert all(s >= min_score for s in scores)


vector_values = st.one_of(
    st.lists(st.floats(min_value=-1e3, max_value=1e3, width=32), min_size=DIM, max_size=DIM),
    st.lists(
        st.one_of(
            st.floats(min_value=-1e3, max_value=1e3, width=32),
            st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e38]),
        ),
        min_size=0,
        max_size=40,
    ),
)


@FUZZ
@given(vectors=st.lists(st.tuples(query_ids, vector_values), min_size=0, max_size=6), k=ks)
def test_search_by_embedding_gets_ok_or_a_precise_error(fuzz_server, vectors, k) -> None:  # type: ignore[no-untyped-def]
    stub, dim = fuzz_server
    request = search_pb2.SearchByEmbeddingRequest(
        embeddings=[search_pb2.Embedding(query_id=i, values=v) for i, v in vectors], k=k
    )
    code, payload = _call(stub.SearchByEmbedding, request)
    event(code.name)
    assert code in (OK, INVALID, EXHAUSTED), (code, payload)
    valid = (
        1 <= len(vectors) <= LIMITS.max_queries_per_request
        and _valid_k(k)
        and _valid_ids([i for i, _ in vectors])
        and all(len(v) == dim and all(math.isfinite(x) for x in v) and any(v) for _, v in vectors)
    )
    assert (code == OK) == valid, (code, payload)
    if code == OK:
        assert len(payload.results) == len(vectors)
    elif any(len(v) != dim for _, v in vectors) and vectors and len(vectors) <= LIMITS.max_queries_per_request:
        assert code == INVALID


@FUZZ
@given(qs=queries)
def test_embed_gets_ok_or_a_precise_error(fuzz_server, qs) -> None:  # type: ignore[no-untyped-def]
    stub, dim = fuzz_server
    request = search_pb2.EmbedRequest(queries=[search_pb2.Query(query_id=i, sequence=s) for i, s in qs])
    code, payload = _call(stub.Embed, request)
    event(code.name)
    assert code in (OK, INVALID, EXHAUSTED), (code, payload)
    assert (code == OK) == _valid_queries(qs), (code, payload)
    if code == OK:
        assert [e.query_id for e in payload.embeddings] == [q for q, _ in qs]
        assert all(len(e.values) == dim for e in payload.embeddings)
        norms = [math.sqrt(sum(x * x for x in e.values)) for e in payload.embeddings]
        assert all(abs(n - 1) < 1e-3 for n in norms)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=st.lists(st.tuples(queries, ks), min_size=1, max_size=4))
def test_search_stream_ends_at_the_first_bad_request(fuzz_server, batches) -> None:  # type: ignore[no-untyped-def]
    stub, _ = fuzz_server
    requests = [
        search_pb2.SearchRequest(queries=[search_pb2.Query(query_id=i, sequence=s) for i, s in qs], k=k)
        for qs, k in batches
    ]
    answered = 0
    try:
        for _ in stub.SearchStream(iter(requests), timeout=60):
            answered += 1
        code = OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert exc.details().startswith(f"request #{answered + 1}: ")
    assert code in (OK, INVALID, EXHAUSTED)
    assert answered == len(requests) if code == OK else answered < len(requests)
    first_bad = next((n for n, (qs, k) in enumerate(batches) if not (_valid_queries(qs) and _valid_k(k))), None)
    assert answered == (len(requests) if first_bad is None else first_bad)


def _by_vector(values: list[float]) -> search_pb2.SearchByEmbeddingRequest:
    return search_pb2.SearchByEmbeddingRequest(embeddings=[search_pb2.Embedding(query_id="v", values=values)], k=1)


def _peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM) in KiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_hostile_sizes_are_refused_and_the_server_keeps_serving(small_index: Path) -> None:
    """In a fresh server process: 20 MB requests are refused and its peak RSS grows by little."""
    script = textwrap.dedent(
        f"""
        import sys
        from esmsearch.server import RequestLimits, ServerConfig, serve
        limits = RequestLimits(max_k={LIMITS.max_k}, max_queries_per_request={LIMITS.max_queries_per_request},
                               max_residues_per_query={LIMITS.max_residues_per_query},
                               max_residues_per_request={LIMITS.max_residues_per_request})
        sys.exit(serve(ServerConfig(index={str(small_index)!r}, port=0, device="cpu", limits=limits, grace_s=5)))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().rsplit(" on ", 1)[1].strip()
        with grpc.insecure_channel(address) as ch:
            stub = search_pb2_grpc.HomologSearchStub(ch)
            warm = search_pb2.SearchRequest(queries=[search_pb2.Query(query_id="a", sequence="MKTAYIAKQR")], k=3)
            assert len(stub.Search(warm, timeout=60).results[0].hits) == 3  # model and index touched
            rss_before = _peak_rss_kib(proc.pid)
            one = search_pb2.Query(query_id="a", sequence="M" * 301)
            huge = search_pb2.Query(query_id="h", sequence="M" * 20_000_000)  # 20 MB: over the message cap
            mkv = search_pb2.Query(query_id="a", sequence="MKV")
            cases = [
                (stub.Search, search_pb2.SearchRequest(queries=[one], k=1), EXHAUSTED),
                (stub.Search, search_pb2.SearchRequest(queries=[huge], k=1), EXHAUSTED),
                (stub.Search, search_pb2.SearchRequest(queries=[mkv], k=2**31 - 1), INVALID),
                (stub.Embed, search_pb2.EmbedRequest(queries=[huge]), EXHAUSTED),
                (stub.SearchByEmbedding, _by_vector([1.0] * (DIM + 1)), INVALID),
                (stub.SearchByEmbedding, _by_vector([1.0] * 3_000_000), EXHAUSTED),
            ]  # fmt: skip
            for _ in range(3):
                for fn, request, expected in cases:
                    code, details = _call(fn, request)
                    assert code == expected, (code, details)
            assert len(stub.Search(warm, timeout=60).results[0].hits) == 3  # still serving
            growth_kib = _peak_rss_kib(proc.pid) - rss_before
        # 18 hostile requests, six of 12-20 MB: refused before they are buffered whole.
        assert growth_kib < 64 * 1024, f"server peak RSS grew by {growth_kib} KiB"
    finally:
        reap(proc)
