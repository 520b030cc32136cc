"""Admission control: bounded work in flight, retry-after, permanent limits, deadlines before embedding.

Synchronisation is by Events only: the model forward is gated so that requests
pile up behind it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmsearch.cli import main
from esmsearch.client import ResourceExhaustedError, SearchClient
from esmsearch.client.retry import NO_RETRY, RetryPolicy
from esmsearch.errors import ConfigError, RequestExpiredError, RequestTooLargeError, ServerBusyError
from esmsearch.protocol import DEFAULT_MAX_HITS_PER_REQUEST
from esmsearch.sequences import read_fasta
from esmsearch.server import AdmissionConfig, BatchingConfig, ServerConfig, create_server
from esmsearch.server.admission import Admission
from esmsearch.server.batcher import DynamicBatcher
from esmsearch.server.engine import SearchEngine
from esmsearch.server.rpc import Reject
from esmsearch.store import Index
from esmsearch.v1 import search_pb2, search_pb2_grpc

Q = search_pb2.Query


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list:  # type: ignore[type-arg]
    return list(read_fasta(ecoli_fasta))


class Gate:
    """Wraps ``engine.embed``: records every call; holds each call until released."""

    def __init__(self, engine: SearchEngine) -> None:
        self.original = engine.embed
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        engine.embed = self  # type: ignore[method-assign]

    def __call__(self, sequences: Sequence[str]):  # type: ignore[no-untyped-def]
        self.calls.append(list(sequences))
        self.entered.set()
        assert self.release.wait(60)
        return self.original(sequences)


# -- Admission alone ----------------------------------------------------------------------


def test_admission_counts_work_and_releases_it() -> None:
    adm = Admission(AdmissionConfig(max_queries_in_flight=3, max_queued_residues=100))
    a = adm.admit(2, 40)
    b = adm.admit(1, 60)
    assert (adm.queries_in_flight, adm.queued_residues) == (3, 100)
    with pytest.raises(ServerBusyError):
        adm.admit(1, 1)  # queries full
    adm.release(b)
    with pytest.raises(ServerBusyError):
        adm.admit(1, 61)  # residues full (40 + 61 > 100)
    c = adm.admit(1, 60)
    adm.release(a)
    adm.release(c)
    assert (adm.queries_in_flight, adm.queued_residues) == (0, 0)


def test_a_request_larger_than_the_bounds_is_refused_for_good() -> None:
    adm = Admission(AdmissionConfig(max_queries_in_flight=2, max_queued_residues=100))
    with pytest.raises(RequestTooLargeError, match="3 queries"):
        adm.admit(3, 10)
    with pytest.raises(RequestTooLargeError, match="101 residues"):
        adm.admit(1, 101)
    assert adm.queries_in_flight == 0  # nothing was admitted


def test_retry_after_follows_the_work_ahead_at_the_measured_rate() -> None:
    adm = Admission(AdmissionConfig(max_queries_in_flight=1, max_queued_residues=10_000))
    adm.admit(1, 2_000)
    with pytest.raises(ServerBusyError) as before:
        adm.admit(1, 10)
    assert before.value.retry_after_s == pytest.approx(0.1)  # no rate measured yet: the default hint
    adm.observe_rate(1_000, 1.0)  # 1,000 residues/s
    with pytest.raises(ServerBusyError) as after:
        adm.admit(1, 10)
    assert after.value.retry_after_s == pytest.approx(2.0)  # 2,000 residues ahead at 1,000/s


# -- deadlines re-checked right before the forward pass -------------------------------------


@pytest.fixture()
def engine(small_index: Path, tiny_embedder) -> Iterator[SearchEngine]:  # type: ignore[no-untyped-def]
    eng = SearchEngine(Index.open(small_index), tiny_embedder)
    yield eng
    eng.close()


def test_a_caller_gone_between_dequeue_and_forward_is_not_embedded(engine: SearchEngine, db) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(engine)
    gate.release.set()
    checks: list[bool] = []

    def leaves_after_first_look() -> bool:  # alive when dequeued, gone at the last look
        checks.append(True)
        return len(checks) == 1

    batcher = DynamicBatcher(engine, BatchingConfig(enabled=False))
    try:
        doomed = batcher.submit_search([db[5].sequence], k=1, is_active=leaves_after_first_look)
        with pytest.raises(RequestExpiredError):
            doomed.result(timeout=30)
        assert batcher.search([db[6].sequence], k=1).hits[0][0].target_id == db[6].record_id
    finally:
        batcher.close()
    assert len(checks) == 2  # looked at twice: when dequeued and right before embedding
    assert all(db[5].sequence not in call for call in gate.calls)
    assert batcher.admission.queries_in_flight == 0  # dropped work is released


def test_a_deadline_that_passes_while_queued_drops_the_request(engine: SearchEngine, db) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(engine)
    batcher = DynamicBatcher(engine, BatchingConfig(enabled=False))
    try:
        first = batcher.submit_search([db[0].sequence], k=1)
        assert gate.entered.wait(30)
        with pytest.raises(RequestExpiredError, match="deadline"):
            batcher.search([db[7].sequence], k=1, timeout_s=0.05)  # the caller gives up after 50 ms
        gate.release.set()
        first.result(timeout=30)
        batcher.search([db[8].sequence], k=1)  # runs after the expired one was dequeued
    finally:
        batcher.close()
    assert all(db[7].sequence not in call for call in gate.calls)


# -- through gRPC -----------------------------------------------------------------------------


@pytest.fixture()
def two_in_flight(small_index: Path) -> Iterator[tuple[object, Gate, str]]:
    srv, port = create_server(
        ServerConfig(
            index=small_index,
            port=0,
            device="cpu",
            max_workers=32,
            batching=BatchingConfig(enabled=False),
            admission=AdmissionConfig(max_queries_in_flight=2),
        )
    )
    gate = Gate(srv.engine)
    try:
        yield srv, gate, f"127.0.0.1:{port}"
    finally:
        gate.release.set()
        srv.stop(0)


def test_sixteen_concurrent_requests_with_two_in_flight_are_ok_or_busy_with_retry_after(two_in_flight, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, address = two_in_flight
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        calls = [
            stub.Search.future(
                search_pb2.SearchRequest(queries=[Q(query_id=f"q{i}", sequence=db[i].sequence)], k=1), timeout=60
            )
            for i in range(16)
        ]
        # Everything beyond the two admitted requests is refused at once, while the model is held.
        finished = threading.Semaphore(0)
        for call in calls:
            call.add_done_callback(lambda _call: finished.release())
        for _ in range(14):
            assert finished.acquire(timeout=60)
        gate.release.set()
        outcomes = []
        for i, call in enumerate(calls):
            try:
                outcomes.append(("OK", call.result(timeout=60).results[0].hits[0].target_id == db[i].record_id))
            except grpc.RpcError as exc:
                trailing = dict(exc.trailing_metadata() or ())
                # gRPC's standard pushback (what any gRPC client's retry policy obeys) and the legacy hint
                pushback = trailing.get("grpc-retry-pushback-ms", "")
                outcomes.append((exc.code().name, pushback.isdigit() and trailing.get("retry-after-ms") == pushback))
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert sorted(outcomes) == [("OK", True)] * 2 + [("RESOURCE_EXHAUSTED", True)] * 14
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert srv.batcher.admission.queries_in_flight == 0


def test_client_retries_a_busy_server_within_its_deadline(two_in_flight, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, address = two_in_flight
    refusals = threading.Event()
    observe = srv.metrics.observe_request

    def spy(rpc: str, code: str, **kw: float) -> None:
        observe(rpc, code, **kw)
        if code == "RESOURCE_EXHAUSTED":
            refusals.set()

    srv.metrics.observe_request = spy
    patient = RetryPolicy(max_attempts=50, rng=random.Random(0))
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        held = [
            stub.Search.future(
                search_pb2.SearchRequest(queries=[Q(query_id="h", sequence=db[i].sequence)], k=1), timeout=60
            )
            for i in (0, 1)
        ]
        assert gate.entered.wait(30)
        with SearchClient(address, timeout_s=60, retry=patient) as client:
            result: list[object] = []
            caller = threading.Thread(target=lambda: result.append(client.search({"late": db[2].sequence}, k=1)))
            caller.start()
            assert refusals.wait(30)  # the first attempt was refused as busy ...
            gate.release.set()  # ... and once there is room a retry gets through
            caller.join(60)
        for f in held:
            f.result(timeout=60)
    assert result and result[0][0].hits[0].target_id == db[2].record_id  # type: ignore[index]


def test_over_a_permanent_limit_is_refused_once_and_reported_in_the_limits(two_in_flight, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, address = two_in_flight
    gate.release.set()
    with SearchClient(address, timeout_s=30, retry=RetryPolicy(max_attempts=5)) as client:
        assert client.index_info().limits.max_queries_per_request == 2  # tightened to the admission bound
        before = srv.metrics.registry.get_sample_value(
            "esmsearch_errors_total", {"rpc": "Search", "code": "RESOURCE_EXHAUSTED"}
        )
        with pytest.raises(ResourceExhaustedError) as info:
            client.search([r.sequence for r in db[:3]], k=1, split_requests=False)
        after = srv.metrics.registry.get_sample_value(
            "esmsearch_errors_total", {"rpc": "Search", "code": "RESOURCE_EXHAUSTED"}
        )
        assert info.value.retry_after_s is None
        assert (after or 0) - (before or 0) == 1  # never retried
        results = client.search([r.sequence for r in db[:3]], k=1)  # split to fit: 2 + 1
    assert [r.hits[0].target_id for r in results] == [r.record_id for r in db[:3]]


def test_no_retry_policy_surfaces_the_busy_hint(two_in_flight, db) -> None:  # type: ignore[no-untyped-def]
    srv, gate, address = two_in_flight
    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        held = [
            stub.Search.future(
                search_pb2.SearchRequest(queries=[Q(query_id="h", sequence=db[i].sequence)], k=1), timeout=60
            )
            for i in (0, 1)
        ]
        assert gate.entered.wait(30)
        with SearchClient(address, timeout_s=30, retry=NO_RETRY) as client:
            with pytest.raises(ResourceExhaustedError) as info:
                client.search({"x": db[3].sequence}, k=1, split_requests=False)
        gate.release.set()
        for f in held:
            f.result(timeout=60)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0


# -- output counted, transport bounded -----------------------------------------------------


def test_hits_per_request_are_admitted_and_refused_for_good_as_invalid_argument() -> None:
    adm = Admission(AdmissionConfig(max_hits_per_request=1000))
    adm.release(adm.admit(10, 100, hits=1000))  # exactly at the limit
    with pytest.raises(Reject) as info:
        adm.admit(10, 100, hits=1010)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1,010 hits" in info.value.details and "limit of 1,000 hits per request" in info.value.details
    assert adm.queries_in_flight == 0  # nothing was admitted
    assert AdmissionConfig().max_hits_per_request == DEFAULT_MAX_HITS_PER_REQUEST == 100_000
    with pytest.raises(ConfigError):
        AdmissionConfig(max_hits_per_request=0)


def test_serve_flag_sets_the_hit_limit(small_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import esmsearch.server

    seen: list[ServerConfig] = []
    monkeypatch.setattr(esmsearch.server, "serve", lambda config: seen.append(config) or 0)
    assert main(["serve", str(small_index), "--max-hits-per-request", "5000"]) == 0
    assert seen[0].admission.max_hits_per_request == 5000


def test_grpc_refuses_rpcs_beyond_the_cap_derived_from_the_admission_bounds(small_index: Path, db) -> None:  # type: ignore[no-untyped-def]
    config = ServerConfig(
        index=small_index,
        port=0,
        device="cpu",
        max_workers=1,
        batching=BatchingConfig(enabled=False),
        admission=AdmissionConfig(max_queries_in_flight=1),
    )
    assert config.max_concurrent_requests == config.max_workers + config.admission.max_queries_in_flight == 2
    srv, port = create_server(config)
    gate = Gate(srv.engine)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # no service config: no retries
            stub = search_pb2_grpc.HomologSearchStub(ch)

            def call(i: int) -> grpc.Future:
                request = search_pb2.SearchRequest(queries=[Q(query_id=f"q{i}", sequence=db[i].sequence)], k=1)
                return stub.Search.future(request, timeout=60)

            held = call(0)
            assert gate.entered.wait(30)  # it holds the only worker thread, inside the model
            late = [call(1), call(2)]  # one waits for the thread, the other is one RPC too many
            done = threading.Semaphore(0)
            for f in late:
                f.add_done_callback(lambda _f: done.release())
            assert done.acquire(timeout=30)  # refused at once, while the model is still held
            refused = [f for f in late if f.done()]
            assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.release.set()
            assert held.result(timeout=60).results[0].hits[0].target_id == db[0].record_id
            (waited,) = [f for f in late if f is not refused[0]]
            assert waited.result(timeout=60).results
    finally:
        gate.release.set()
        srv.stop(0)


def test_the_server_is_composed_of_one_frozen_config_and_frozen_parts(small_index: Path) -> None:
    import dataclasses
    import inspect

    from esmsearch.server import SearchServer
    from esmsearch.server.app import ServerParts

    assert list(inspect.signature(SearchServer.__init__).parameters) == ["self", "config", "parts"]
    srv, port = create_server(ServerConfig(index=small_index, port=0, device="cpu", max_workers=2))
    try:
        assert isinstance(srv.parts, ServerParts) and srv.parts.port == port == srv.port
        assert srv.engine is srv.parts.engine and srv.batcher is srv.parts.batcher
        with pytest.raises(dataclasses.FrozenInstanceError):
            srv.parts.port = 1  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            srv.config.max_workers = 1  # type: ignore[misc]
        with pytest.raises(ValueError, match="port"):
            dataclasses.replace(srv.parts, port=0)
    finally:
        srv.stop(0)
