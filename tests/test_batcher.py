"""Dynamic batcher: merging, token budget, fault isolation, bounded queue, deadlines, drain.

Synchronisation is by Events and hooks only: the model forward is gated so that
requests pile up behind it, and the batcher's ``on_enqueue``/``on_batch`` hooks
say when a request is queued or a batch has run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import reap
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmsearch.errors import ConfigError, RequestExpiredError, ServerBusyError, ServerClosingError
from esmsearch.sequences import read_fasta
from esmsearch.server import SERVICE_NAME, ServerConfig, create_server
from esmsearch.server.admission import Admission, AdmissionConfig
from esmsearch.server.batcher import BatchingConfig, DynamicBatcher
from esmsearch.server.engine import SearchEngine
from esmsearch.store import Index
from esmsearch.v1 import search_pb2, search_pb2_grpc

Q = search_pb2.Query


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list:  # type: ignore[type-arg]
    return list(read_fasta(ecoli_fasta))


class Gate:
    """Wraps ``engine.embed``: records every call; the first call can be held."""

    def __init__(self, engine: SearchEngine, hold_first: bool = True) -> None:
        self.original = engine.embed
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.poison: str | None = None
        engine.embed = self  # type: ignore[method-assign]

    def __call__(self, sequences: Sequence[str]):  # type: ignore[no-untyped-def]
        self.calls.append(list(sequences))
        self.entered.set()
        assert self.release.wait(30)
        if self.poison is not None and self.poison in sequences:
            raise RuntimeError("poisoned batch")
        return self.original(sequences)


@pytest.fixture()
def engine(small_index: Path, tiny_embedder) -> Iterator[SearchEngine]:  # type: ignore[no-untyped-def]
    eng = SearchEngine(Index.open(small_index), tiny_embedder)
    yield eng
    eng.close()


class Counter:
    """Hook target: counts enqueues and batches, with an event per threshold."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int]] = []
        self.depth = 0
        self._cond = threading.Condition()

    def on_enqueue(self, depth: int) -> None:
        with self._cond:
            self.depth = depth
            self._cond.notify_all()

    def on_batch(self, n_requests: int, n_sequences: int, n_tokens: int) -> None:
        with self._cond:
            self.batches.append((n_requests, n_sequences, n_tokens))
            self._cond.notify_all()

    def wait_depth(self, depth: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.depth >= depth, timeout=30)


def _batcher(
    engine: SearchEngine, counter: Counter, admission: AdmissionConfig | None = None, **config: object
) -> DynamicBatcher:
    return DynamicBatcher(
        engine,
        BatchingConfig(**{"enabled": True, **config}),  # type: ignore[arg-type]
        admission=Admission(admission),
        on_batch=counter.on_batch,
        on_enqueue=counter.on_enqueue,
    )


def test_config_validates_itself() -> None:
    for bad in (
        {"max_wait_ms": -1.0},
        {"max_wait_ms": float("nan")},
        {"max_batch_toks": 0},
    ):
        with pytest.raises(ConfigError):
            BatchingConfig(**bad)  # type: ignore[arg-type]
    for bad in ({"max_queries_in_flight": 0}, {"max_queued_residues": 0}, {"max_queries_in_flight": True}):
        with pytest.raises(ConfigError):
            AdmissionConfig(**bad)  # type: ignore[arg-type]


def test_a_lone_request_does_not_wait_max_wait_ms_for_company(engine, db) -> None:  # type: ignore[no-untyped-def]
    counter = Counter()
    # Were the lone request held for max_wait_ms, the result would take two minutes.
    batcher = _batcher(engine, counter, max_wait_ms=120_000.0, max_batch_toks=100_000)
    try:
        result = batcher.submit_search([db[0].sequence], k=2).result(timeout=30)
        again = batcher.submit_search([db[1].sequence], k=2).result(timeout=30)
    finally:
        batcher.close()
    assert result.hits[0][0].target_id == db[0].record_id
    assert again.hits[0][0].target_id == db[1].record_id
    assert [b[:2] for b in counter.batches] == [(1, 1), (1, 1)]


def test_requests_queued_behind_a_forward_are_merged_into_one_batch(engine, db) -> None:  # type: ignore[no-untyped-def]
    gate, counter = Gate(engine), Counter()
    batcher = _batcher(engine, counter, max_wait_ms=0.0, max_batch_toks=100_000)
    try:
        first = batcher.submit_search([db[0].sequence], k=2)
        assert gate.entered.wait(30)  # the first request is inside the model
        picked = [db[1], db[2], db[3], db[4]]
        futures = [batcher.submit_search([r.sequence], k=3) for r in picked]
        counter.wait_depth(len(picked))
        gate.release.set()
        results = [f.result(timeout=30) for f in futures]
        first.result(timeout=30)
    finally:
        batcher.close()
    # one forward for the first request, then ONE forward for the four queued ones
    assert [len(c) for c in gate.calls] == [1, 4]
    assert [b[:2] for b in counter.batches] == [(1, 1), (4, 4)]
    for rec, res in zip(picked, results, strict=True):
        assert len(res.hits[0]) == 3
        assert res.hits[0][0].target_id == rec.record_id  # each gets its own answer
    # the batched answer equals the unbatched one
    alone = engine.search([picked[2].sequence], 3)
    assert [h.target_id for h in alone.hits[0]] == [h.target_id for h in results[2].hits[0]]
    np.testing.assert_allclose(
        [h.cosine_score for h in alone.hits[0]],
        [h.cosine_score for h in results[2].hits[0]],
        atol=1e-5,
    )


def test_a_merged_batch_builds_each_requests_own_k_only(engine, db) -> None:  # type: ignore[no-untyped-def]
    gate, counter = Gate(engine), Counter()
    index = engine.index
    assert index.has_evalues
    shapes: list[tuple[int, int]] = []
    evalues = index.evalues

    def spy(vectors: np.ndarray, scores: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        shapes.append(scores.shape)
        return evalues(vectors, scores, *args, **kwargs)  # type: ignore[arg-type]

    index.evalues = spy  # type: ignore[method-assign]
    batcher = _batcher(engine, counter, max_wait_ms=0.0, max_batch_toks=100_000)
    try:
        first = batcher.submit_search([db[0].sequence], k=1)
        assert gate.entered.wait(30)  # the first request is inside the model
        small = batcher.submit_search([db[1].sequence, db[2].sequence], k=2)
        large = batcher.submit_search([db[3].sequence], k=5)
        counter.wait_depth(2)
        gate.release.set()
        small_hits, large_hits = small.result(timeout=30).hits, large.result(timeout=30).hits
        first.result(timeout=30)
    finally:
        batcher.close()
        del index.evalues
    assert [b[:2] for b in counter.batches] == [(1, 1), (2, 3)]  # the two were merged
    assert [len(h) for h in small_hits] == [2, 2] and [len(h) for h in large_hits] == [5]
    # E-values of each request's own columns only, never the batch's largest k for all
    assert sorted(shapes[1:]) == [(1, 5), (2, 2)]
    alone = engine.search([db[1].sequence, db[2].sequence], 2)
    for got, want in zip(small_hits, alone.hits, strict=True):
        assert [h.target_id for h in got] == [h.target_id for h in want]
        np.testing.assert_allclose([h.evalue for h in got], [h.evalue for h in want], rtol=1e-4)


def test_token_budget_bounds_a_batch(engine, db) -> None:  # type: ignore[no-untyped-def]
    gate, counter = Gate(engine), Counter()
    seqs = [r.sequence for r in db[1:5]]
    toks = [len(s) + 2 for s in seqs]
    budget = toks[0] + toks[1]  # room for exactly the first two queued requests
    batcher = _batcher(engine, counter, max_wait_ms=0.0, max_batch_toks=budget)
    try:
        first = batcher.submit_search([db[0].sequence[:10]], k=1)
        assert gate.entered.wait(30)
        futures = [batcher.submit_search([s], k=1) for s in seqs]
        counter.wait_depth(4)
        gate.release.set()
        for f in futures + [first]:
            f.result(timeout=30)
    finally:
        batcher.close()
    assert [len(c) for c in gate.calls][:2] == [1, 2]
    assert all(n_tok <= budget for _, _, n_tok in counter.batches[1:])
    assert sum(b[1] for b in counter.batches) == 5


def test_a_failing_request_does_not_fail_the_others_of_its_batch(engine, db) -> None:  # type: ignore[no-untyped-def]
    gate, counter = Gate(engine), Counter()
    gate.poison = db[2].sequence
    batcher = _batcher(engine, counter, max_wait_ms=0.0)
    try:
        first = batcher.submit_search([db[0].sequence], k=1)
        assert gate.entered.wait(30)
        good1 = batcher.submit_search([db[1].sequence], k=1)
        bad = batcher.submit_search([db[2].sequence], k=1)
        good2 = batcher.submit_embed([db[3].sequence])
        counter.wait_depth(3)
        gate.release.set()
        assert good1.result(timeout=30).hits[0][0].target_id == db[1].record_id
        vectors, version, _, _ = good2.result(timeout=30)
        assert vectors.shape == (1, engine.index.manifest.dim) and version == engine.index.version
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.result(timeout=30)
        first.result(timeout=30)
    finally:
        batcher.close()
    assert [db[1].sequence, db[2].sequence, db[3].sequence] in gate.calls  # tried together first


def test_expired_request_is_dropped_before_embedding(engine, db) -> None:  # type: ignore[no-untyped-def]
    gate, counter = Gate(engine), Counter()
    batcher = _batcher(engine, counter, max_wait_ms=0.0)
    alive = threading.Event()
    alive.set()
    try:
        first = batcher.submit_search([db[0].sequence], k=1)
        assert gate.entered.wait(30)
        doomed = batcher.submit_search([db[5].sequence], k=1, is_active=alive.is_set)
        kept = batcher.submit_search([db[6].sequence], k=1)
        counter.wait_depth(2)
        alive.clear()  # the client goes away while queued
        gate.release.set()
        with pytest.raises(RequestExpiredError):
            doomed.result(timeout=30)
        assert kept.result(timeout=30).hits[0][0].target_id == db[6].record_id
        first.result(timeout=30)
    finally:
        batcher.close()
    assert all(db[5].sequence not in call for call in gate.calls)


def test_full_admission_refuses_and_close_fails_queued_requests(engine, db) -> None:  # type: ignore[no-untyped-def]
    gate, counter = Gate(engine), Counter()
    batcher = _batcher(engine, counter, AdmissionConfig(max_queries_in_flight=3))
    first = batcher.submit_search([db[0].sequence], k=1)
    assert gate.entered.wait(30)
    queued = [batcher.submit_search([db[i].sequence], k=1) for i in (1, 2)]
    with pytest.raises(ServerBusyError, match="server busy") as busy:
        batcher.submit_search([db[3].sequence], k=1)
    assert busy.value.retry_after_s > 0
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.release.set()
    closer.join(30)
    assert first.result(timeout=30).hits[0][0].target_id == db[0].record_id
    for f in queued:  # never run: the batcher stopped after the batch in progress
        with pytest.raises(ServerClosingError):
            f.result(timeout=30)
    with pytest.raises(ServerClosingError):
        batcher.submit_search([db[3].sequence], k=1)


# -- through gRPC ------------------------------------------------------------------------


@pytest.fixture()
def gated_server(small_index: Path) -> Iterator[tuple[object, Gate, Counter, str]]:
    srv, port = create_server(
        ServerConfig(
            index=small_index,
            port=0,
            device="cpu",
            max_workers=8,
            batching=BatchingConfig(enabled=True, max_wait_ms=0.0),
            admission=AdmissionConfig(max_queries_in_flight=3),
        )
    )
    gate, counter = Gate(srv.engine), Counter()
    assert srv.batcher is not None
    srv.batcher.on_batch, srv.batcher.on_enqueue = counter.on_batch, counter.on_enqueue
    try:
        yield srv, gate, counter, f"127.0.0.1:{port}"
    finally:
        gate.release.set()
        srv.stop(0)


def _search(seq: str, qid: str = "q", k: int = 1) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(queries=[Q(query_id=qid, sequence=seq)], k=k)


def test_grpc_queue_full_is_resource_exhausted_and_deadline_expiry_drops(gated_server, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, counter, address = gated_server
    finished = threading.Event()
    observe = srv.metrics.observe_request

    def spy(rpc: str, code: str, **kw: float) -> None:
        observe(rpc, code, **kw)
        if code == "DEADLINE_EXCEEDED":
            finished.set()

    srv.metrics.observe_request = spy
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        first = stub.Search.future(_search(db[0].sequence), timeout=60)
        assert gate.entered.wait(30)
        short = stub.Search.future(_search(db[7].sequence), timeout=1.0)  # will expire queued
        long = stub.Search.future(_search(db[8].sequence), timeout=60)
        counter.wait_depth(2)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(_search(db[9].sequence), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in info.value.details()
        assert dict(info.value.trailing_metadata())["retry-after-ms"].isdigit()
        with pytest.raises(grpc.RpcError) as info:
            short.result(timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert finished.wait(30)  # the server has given up on it too
        gate.release.set()
        assert long.result(timeout=30).results[0].hits[0].target_id == db[8].record_id
        assert first.result(timeout=30).results[0].hits[0].target_id == db[0].record_id
    assert all(db[7].sequence not in call for call in gate.calls)  # never embedded
    assert srv.metrics.registry.get_sample_value("esmsearch_dropped_requests_total") == 1


def test_embed_and_search_stream_go_through_the_batcher(gated_server, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, counter, address = gated_server
    gate.release.set()
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        stub.Embed(search_pb2.EmbedRequest(queries=[Q(query_id="e", sequence=db[0].sequence)]), timeout=30)
        assert counter.batches == [(1, 1, len(db[0].sequence) + 2)]
        responses = list(stub.SearchStream(iter([_search(db[1].sequence), _search(db[2].sequence, k=2)]), timeout=30))
    assert [r.results[0].hits[0].target_id for r in responses] == [db[1].record_id, db[2].record_id]
    assert len(counter.batches) == 3
    assert gate.calls == [[db[0].sequence], [db[1].sequence], [db[2].sequence]]


def test_sigterm_drains_requests_held_in_the_batcher(small_index: Path, db) -> None:  # type: ignore[no-untyped-def]
    script = textwrap.dedent(
        f"""
        import sys
        from esmsearch.server import BatchingConfig, ServerConfig, engine, serve
        original = engine.SearchEngine.embed
        def gated(self, sequences):
            print("ENTERED", flush=True)
            sys.stdin.readline()
            return original(self, sequences)
        engine.SearchEngine.embed = gated
        sys.exit(serve(ServerConfig(index={str(small_index)!r}, port=0, device="cpu", grace_s=30.0,
                                    batching=BatchingConfig(enabled=True))))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        address = proc.stdout.readline().rsplit(" on ", 1)[1].strip()
        with grpc.insecure_channel(address) as ch:
            stub = search_pb2_grpc.HomologSearchStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            future = stub.Search.future(_search(db[0].sequence), timeout=60)
            assert proc.stdout.readline().strip() == "ENTERED"  # held inside the batcher's forward
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert future.result(timeout=30).results[0].hits[0].target_id == db[0].record_id
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)


def test_a_call_without_deadline_is_answered_through_the_batcher(gated_server, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, counter, address = gated_server
    gate.release.set()
    with grpc.insecure_channel(address) as ch:
        response = search_pb2_grpc.HomologSearchStub(ch).Search(_search(db[3].sequence))  # no timeout
    assert response.results[0].hits[0].target_id == db[3].record_id
    assert len(counter.batches) == 1


def test_batching_is_on_by_default_on_the_cpu_too(small_index: Path) -> None:
    srv, _ = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=2))  # defaults
    try:
        assert srv.batcher is srv.servicer.batcher and srv.batcher.merges
    finally:
        srv.stop(0)


@pytest.mark.parametrize(
    ("flags", "merges"),
    [([], True), (["--batching", "on"], True), (["--batching", "auto"], True), (["--batching", "off"], False)],
)
def test_serve_batching_flag_reaches_the_server_config(
    flags: list[str], merges: bool, small_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import esmsearch.server
    from esmsearch.cli import main

    seen: list[ServerConfig] = []
    monkeypatch.setattr(esmsearch.server, "serve", lambda config: seen.append(config) or 0)
    assert main(["serve", str(small_index), "--port", "0", *flags]) == 0
    assert [c.batching.enabled for c in seen] == [merges]
