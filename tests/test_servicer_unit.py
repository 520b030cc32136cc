"""The servicer alone, without a network (grpc_testing): one test per status code it answers.

As in grpc's ``helloworld`` unit-test example: ``grpc_testing.server_from_dictionary``
runs the real :class:`HomologSearchServicer` in-process; the model scheduler is the
real one over the tiny test model, or a stand-in that raises what the real one raises,
so that each status code comes from the one mapping in :mod:`esmsearch.server.rpc`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc_testing
import pytest

from esmsearch.errors import RequestExpiredError, RequestTooLargeError, ServerBusyError, ServerClosingError
from esmsearch.protocol import RETRY_AFTER_KEY, RETRY_PUSHBACK_KEY
from esmsearch.server.admission import Admission, AdmissionConfig
from esmsearch.server.batcher import BatchingConfig, DynamicBatcher
from esmsearch.server.engine import SearchEngine
from esmsearch.server.rpc import Reject, RpcObserver, RpcRecord, status_for
from esmsearch.server.servicer import HomologSearchServicer, RequestLimits
from esmsearch.store import Index
from esmsearch.v1 import search_pb2

SERVICE = search_pb2.DESCRIPTOR.services_by_name["HomologSearch"]
Q = search_pb2.Query


@pytest.fixture(scope="module")
def engine(small_index: Path, tiny_embedder) -> Iterator[SearchEngine]:  # type: ignore[no-untyped-def]
    eng = SearchEngine(Index.open(small_index), tiny_embedder)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def batcher(engine: SearchEngine) -> Iterator[DynamicBatcher]:
    b = DynamicBatcher(engine, BatchingConfig(enabled=False), admission=Admission(AdmissionConfig()))
    yield b
    b.close()


class Refusing:
    """Stands in for the scheduler: raises ``exc`` for every model request."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def search(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc

    embed = search_vectors = search


def _server(servicer: HomologSearchServicer) -> grpc_testing.Server:
    return grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())


class FinishedRpcs(RpcObserver):
    """An observer that also tells when each RPC's log line and metrics are written.

    grpc_testing reports an aborted RPC's termination from inside ``context.abort``,
    before the servicer's wrapper has logged it; tests wait here instead.
    """

    def __init__(self, metrics: Any = None) -> None:
        super().__init__(metrics)
        self.finished: list[tuple[str, grpc.StatusCode]] = []
        self._cond = threading.Condition()

    def finish(self, rec: RpcRecord) -> None:
        super().finish(rec)
        with self._cond:
            self.finished.append((rec.rpc, rec.code))
            self._cond.notify_all()

    def wait_for(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.finished) >= n, timeout=30)


def _call(servicer: HomologSearchServicer, method: str, request: Any) -> tuple[Any, grpc.StatusCode, str]:
    observer = servicer.observer
    before = len(observer.finished) if isinstance(observer, FinishedRpcs) else 0
    rpc = _server(servicer).invoke_unary_unary(SERVICE.methods_by_name[method], (), request, None)
    response, _trailing, code, details = rpc.termination()
    if isinstance(observer, FinishedRpcs):
        observer.wait_for(before + 1)
    return response, code, details


def _search(seq: str, k: int = 1) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(queries=[Q(query_id="q1", sequence=seq)], k=k)


def test_ok_search_finds_the_query_itself(engine: SearchEngine, batcher: DynamicBatcher, ecoli_fasta: Path) -> None:
    from esmsearch.sequences import read_fasta

    first = next(iter(read_fasta(ecoli_fasta)))
    response, code, _ = _call(HomologSearchServicer(engine, batcher), "Search", _search(first.sequence, k=3))
    assert code == grpc.StatusCode.OK
    assert response.results[0].hits[0].target_id == first.record_id
    assert response.index_version == engine.index.version


def test_invalid_argument_names_the_query_and_residue(engine: SearchEngine, batcher: DynamicBatcher) -> None:
    _, code, details = _call(HomologSearchServicer(engine, batcher), "Search", _search("MKJV"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("query 'q1' at residue 3: invalid residue 'J'")


def test_resource_exhausted_over_a_request_limit_has_no_retry_after(
    engine: SearchEngine, batcher: DynamicBatcher
) -> None:
    servicer = HomologSearchServicer(engine, batcher, limits=RequestLimits(max_residues_per_query=5))
    _, code, details = _call(servicer, "Search", _search("MKVLAAGIV"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 5 per query" in details


def test_resource_exhausted_when_busy_carries_retry_after(engine: SearchEngine) -> None:
    busy = Refusing(ServerBusyError("server busy: test", retry_after_s=0.25))
    _, code, details = _call(HomologSearchServicer(engine, busy), "Search", _search("MKV"))  # type: ignore[arg-type]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == "server busy: test"
    # grpc_testing drops trailing metadata on abort; the mapping sets it (real gRPC: test_admission.py):
    # gRPC's standard pushback, which every gRPC client's retry policy obeys, and the legacy hint.
    assert status_for(busy.exc).trailing_metadata == ((RETRY_PUSHBACK_KEY, "250"), (RETRY_AFTER_KEY, "250"))


def test_resource_exhausted_over_an_admission_bound_has_no_retry_after(engine: SearchEngine) -> None:
    too_large = Refusing(RequestTooLargeError("request has 3 queries, over the server's limit"))
    _, code, _ = _call(
        HomologSearchServicer(engine, too_large),
        "Embed",
        search_pb2.EmbedRequest(queries=[Q(query_id="a", sequence="MKV")]),
    )  # type: ignore[arg-type]  # noqa: E501
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # pushback -1: gRPC clients with a retry policy never retry it (gRFC A6); no legacy hint
    assert status_for(too_large.exc).trailing_metadata == ((RETRY_PUSHBACK_KEY, "-1"),)


def test_deadline_exceeded_when_the_caller_left_before_embedding(engine: SearchEngine) -> None:
    expired = Refusing(RequestExpiredError("the caller went away"))
    _, code, details = _call(HomologSearchServicer(engine, expired), "Search", _search("MKV"))  # type: ignore[arg-type]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "the caller went away"


def test_unavailable_while_closing(engine: SearchEngine) -> None:
    closing = Refusing(ServerClosingError("the server is shutting down"))
    _, code, _ = _call(HomologSearchServicer(engine, closing), "Search", _search("MKV"))  # type: ignore[arg-type]
    assert code == grpc.StatusCode.UNAVAILABLE


def test_failed_precondition_for_a_reload_of_a_fixed_index(engine: SearchEngine, batcher: DynamicBatcher) -> None:
    _, code, details = _call(HomologSearchServicer(engine, batcher), "ReloadIndex", search_pb2.ReloadIndexRequest())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "fixed index directory" in details


def test_internal_error_answers_an_id_never_the_exception_text(
    engine: SearchEngine, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Refusing(RuntimeError("cannot open /srv/secret/path/index.faiss"))
    servicer = HomologSearchServicer(engine, broken, observer=FinishedRpcs())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="esmsearch.server"):
        _, code, details = _call(servicer, "Search", _search("MKV"))
    assert code == grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error ([0-9a-f]{12}); the server log has its details under this id", details)
    assert match is not None, details
    assert "secret" not in details
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, under the id
    assert "secret" in caplog.text


def test_every_rpc_is_logged_and_counted_once(engine: SearchEngine, batcher: DynamicBatcher) -> None:
    from esmsearch.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    observer = FinishedRpcs(metrics)
    servicer = HomologSearchServicer(engine, batcher, observer=observer)
    _call(servicer, "GetIndexInfo", search_pb2.GetIndexInfoRequest())
    _call(servicer, "ReloadIndex", search_pb2.ReloadIndexRequest())
    _call(servicer, "Search", _search("MKJV"))
    sample = metrics.registry.get_sample_value
    assert sample("esmsearch_requests_total", {"rpc": "GetIndexInfo"}) == 1
    assert sample("esmsearch_requests_total", {"rpc": "ReloadIndex"}) == 1
    assert sample("esmsearch_errors_total", {"rpc": "ReloadIndex", "code": "FAILED_PRECONDITION"}) == 1
    assert sample("esmsearch_errors_total", {"rpc": "Search", "code": "INVALID_ARGUMENT"}) == 1
    assert observer.finished == [
        ("GetIndexInfo", grpc.StatusCode.OK),
        ("ReloadIndex", grpc.StatusCode.FAILED_PRECONDITION),
        ("Search", grpc.StatusCode.INVALID_ARGUMENT),
    ]


# -- query ids and client-facing errors (issue 19, part 5) ----------------------------------------

HOSTILE_IDS = ["q\tforged", "q\nforged", "two words", "q\x00", "q\x1b[31m", "q\u202ex", "q\x85x", "q" * 257]


@pytest.mark.parametrize("qid", HOSTILE_IDS)
def test_a_hostile_query_id_is_invalid_argument_for_every_rpc(
    engine: SearchEngine, batcher: DynamicBatcher, qid: str
) -> None:
    servicer = HomologSearchServicer(engine, batcher)
    dim = engine.index.manifest.dim
    queries = [Q(query_id="ok", sequence="MKV"), Q(query_id=qid, sequence="MKV")]
    requests = {
        "Search": search_pb2.SearchRequest(queries=queries, k=1),
        "Embed": search_pb2.EmbedRequest(queries=queries),
        "SearchByEmbedding": search_pb2.SearchByEmbeddingRequest(
            embeddings=[search_pb2.Embedding(query_id=q.query_id, values=[1.0] * dim) for q in queries], k=1
        ),
    }
    for method, request in requests.items():
        _, code, details = _call(servicer, method, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert details.startswith(f"query #2 ({qid[:40]!r}"), details  # by position, repr-escaped
        assert not any(c in details for c in "\t\n\x00\x1b\u202e\x85"), details


def test_a_printable_one_word_id_of_256_characters_is_accepted(engine: SearchEngine, batcher: DynamicBatcher) -> None:
    qid = "sp|P69905|HBA_HUMAN/1-142;é" + "x" * (256 - 27)
    assert len(qid) == 256
    response, code, _ = _call(
        HomologSearchServicer(engine, batcher),
        "Search",
        search_pb2.SearchRequest(queries=[Q(query_id=qid, sequence="MKVLAAGIV")], k=1),
    )
    assert code == grpc.StatusCode.OK and response.results[0].query_id == qid


def test_an_index_error_answers_a_reason_and_an_error_id_never_the_path(
    engine: SearchEngine, caplog: pytest.LogCaptureFixture
) -> None:
    from esmsearch.errors import IndexFormatError

    broken = Refusing(IndexFormatError("/srv/secret/versions/v2/index.faiss: checksum mismatch"))
    servicer = HomologSearchServicer(engine, broken, observer=FinishedRpcs())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="esmsearch.server"):
        _, code, details = _call(servicer, "Search", _search("MKV"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    match = re.fullmatch(r"the index version failed verification \(.*\); error id ([0-9a-f]{12}) \(.*\)", details)
    assert match is not None, details
    assert "secret" not in details and "checksum mismatch" not in details
    logged = [r.getMessage() for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and "/srv/secret/versions/v2/index.faiss: checksum mismatch" in logged[0]


def test_reload_error_names_versions_a_reason_and_an_error_id_never_a_path(
    engine: SearchEngine, batcher: DynamicBatcher, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    from esmsearch.server.reload import IndexReloader
    from esmsearch.versions import IndexRoot

    root = IndexRoot(tmp_path / "secret-root")
    root.create()
    os.symlink(Path("versions") / "20990101T000000.000Z-pruned", root.current_link)  # deleted by retention
    reloader = IndexReloader(engine, root, poll_s=None)
    servicer = HomologSearchServicer(engine, batcher, reloader=reloader)
    with caplog.at_level(logging.ERROR, logger="esmsearch.server"):
        _, code, details = _call(servicer, "ReloadIndex", search_pb2.ReloadIndexRequest())
    info, _, _ = _call(servicer, "GetIndexInfo", search_pb2.GetIndexInfoRequest())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    for text in (details, info.reload_error):
        assert "20990101T000000.000Z-pruned" in text and engine.index.version in text
        assert "secret-root" not in text and str(tmp_path) not in text
    match = re.search(r"error id ([0-9a-f]{12})", info.reload_error)
    assert match is not None and details == info.reload_error
    logged = [r.getMessage() for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and str(root.path) in logged[0]  # the log has the path, under the same id


# -- every RPC that does work passes the same admission, which also counts output -------------


def _embedding_request(engine: SearchEngine, n: int = 1, k: int = 1) -> search_pb2.SearchByEmbeddingRequest:
    dim = engine.index.manifest.dim
    return search_pb2.SearchByEmbeddingRequest(
        embeddings=[search_pb2.Embedding(query_id=f"v{i}", values=[1.0] * dim) for i in range(n)], k=k
    )


@pytest.mark.parametrize("rpc", ["Search", "SearchByEmbedding", "Embed"])
def test_every_working_rpc_is_refused_when_the_server_is_full(engine: SearchEngine, rpc: str) -> None:
    batcher = DynamicBatcher(
        engine, BatchingConfig(enabled=False), admission=Admission(AdmissionConfig(max_queries_in_flight=1))
    )
    held = batcher.admission.admit(1, 10)  # another request holds all the room there is
    requests = {
        "Search": _search("MKV"),
        "SearchByEmbedding": _embedding_request(engine),
        "Embed": search_pb2.EmbedRequest(queries=[Q(query_id="a", sequence="MKV")]),
    }
    try:
        _, code, details = _call(HomologSearchServicer(engine, batcher), rpc, requests[rpc])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("server busy")
        batcher.admission.release(held)
        response, code, _ = _call(HomologSearchServicer(engine, batcher), rpc, requests[rpc])
        assert code == grpc.StatusCode.OK  # room again: the same request is answered
    finally:
        batcher.close()
    assert batcher.admission.queries_in_flight == 0  # released however it ended


@pytest.mark.parametrize("rpc", ["Search", "SearchByEmbedding"])
def test_queries_times_k_over_the_hit_limit_is_invalid_argument_naming_it(engine: SearchEngine, rpc: str) -> None:
    batcher = DynamicBatcher(
        engine, BatchingConfig(enabled=False), admission=Admission(AdmissionConfig(max_hits_per_request=10))
    )
    over = {
        "Search": search_pb2.SearchRequest(queries=[Q(query_id=f"q{i}", sequence="MKVLA") for i in range(3)], k=4),
        "SearchByEmbedding": _embedding_request(engine, n=3, k=4),
    }
    within = {
        "Search": search_pb2.SearchRequest(queries=[Q(query_id=f"q{i}", sequence="MKVLA") for i in range(2)], k=5),
        "SearchByEmbedding": _embedding_request(engine, n=2, k=5),
    }
    try:
        _, code, details = _call(HomologSearchServicer(engine, batcher), rpc, over[rpc])
        response, ok, _ = _call(HomologSearchServicer(engine, batcher), rpc, within[rpc])
    finally:
        batcher.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 hits" in details and "limit of 10 hits per request" in details and "max_hits_per_request" in details
    assert status_for(Reject(code, details)).trailing_metadata == ()  # nothing that invites a retry
    assert ok == grpc.StatusCode.OK and [len(r.hits) for r in response.results] == [5, 5]
    assert batcher.admission.queries_in_flight == 0
