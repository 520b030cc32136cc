"""HTTP/JSON API: a real in-process server (gRPC + HTTP on free ports), called with httpx.

Every status code of the API: 200 (JSON and TSV, byte for byte what the CLI writes),
400 (naming the record and residue), 401, 409, 413, 429 with Retry-After, 500 with an
error id, 503 while draining, 504 past a deadline; plus TLS with the gRPC certificate,
logs and metrics shared with gRPC, the OpenAPI document and the offline docs page.

Synchronisation is by Events only: the model forward is gated (``Gate``) so that
requests wait behind it for as long as a test needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import reap
from pki import Pki

from esmsearch.cli import main
from esmsearch.client import SearchClient
from esmsearch.errors import (
    IndexFormatError,
    InvalidSequenceError,
    RequestExpiredError,
    RequestTooLargeError,
    ServerBusyError,
    ServerClosingError,
)
from esmsearch.sequences import SequenceRecord, read_fasta
from esmsearch.server import AdmissionConfig, BatchingConfig, RequestLimits, SearchServer, ServerConfig, create_server
from esmsearch.server.httpapi import HTTP_STATUS, error_body, http_status
from esmsearch.server.rpc import Reject, RpcRecord, status_for
from esmsearch.server.security import SecurityConfig, TlsConfig
from esmsearch.v1 import search_pb2, search_pb2_grpc

TOKEN = "http-token-0123456789abcdef"
SEARCH = "/v1/search"


@pytest.fixture(scope="module")
def db(ecoli_fasta: Path) -> list[SequenceRecord]:
    return list(read_fasta(ecoli_fasta))


def _fasta(records: Sequence[SequenceRecord]) -> str:
    return "".join(f">{r.record_id} {r.description}\n{r.sequence}\n" for r in records)


def _start(small_index: Path, **kw: Any) -> SearchServer:
    kw.setdefault("max_workers", 4)
    kw.setdefault("batching", BatchingConfig(enabled=False))
    srv, _ = create_server(ServerConfig(index=small_index, port=0, http_port=0, device="cpu", **kw))
    assert srv.http_port is not None
    return srv


def _client(srv: SearchServer, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=60, **kw)


@pytest.fixture(scope="module")
def srv(small_index: Path) -> Iterator[SearchServer]:
    server = _start(small_index)
    try:
        yield server
    finally:
        server.stop(1.0)


@pytest.fixture(scope="module")
def api(srv: SearchServer) -> Iterator[httpx.Client]:
    with _client(srv) as client:
        yield client


class Gate:
    """Wraps ``engine.embed``: holds every forward pass until released (the model is "busy")."""

    def __init__(self, srv: SearchServer) -> None:
        self.engine = srv.engine
        self.original = srv.engine.embed
        self.entered = threading.Event()
        self.release = threading.Event()
        srv.engine.embed = self  # type: ignore[method-assign]

    def __call__(self, sequences: Sequence[str]):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.release.wait(60)
        return self.original(sequences)


class Finished:
    """Records every request the observer finishes (log line + metrics written)."""

    def __init__(self, srv: SearchServer) -> None:
        self.records: list[RpcRecord] = []
        self._cond = threading.Condition()
        observer = srv.servicer.observer
        original = observer.finish

        def finish(rec: RpcRecord) -> None:
            original(rec)
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()

        observer.finish = finish  # type: ignore[method-assign]

    def wait_for(self, n: int) -> list[RpcRecord]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.records) >= n, timeout=60)
            return list(self.records)


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return dict(body)


# -- 200: the same JSON and TSV as the CLI --------------------------------------------------


def test_search_json_is_byte_for_byte_what_the_cli_prints(
    srv: SearchServer, api: httpx.Client, db: list[SequenceRecord], tmp_path: Path
) -> None:
    picked = [db[3], db[0], db[17], db[8], db[30]]
    fasta = tmp_path / "q.fasta"
    fasta.write_text(_fasta(picked))
    out = tmp_path / "cli.json"
    address = f"127.0.0.1:{srv.port}"
    assert main(["search", str(fasta), "--server", address, "-k", "3", "--format", "json", "-o", str(out)]) == 0
    cli = out.read_text()

    by_fasta = api.post(SEARCH, params={"pretty": ""}, json={"fasta": fasta.read_text(), "k": 3})
    by_list = api.post(
        SEARCH,
        params={"pretty": "true"},
        json={"queries": [{"id": r.record_id, "sequence": r.sequence} for r in picked], "k": 3},
    )
    for response in (by_fasta, by_list):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.text == cli
    results = json.loads(cli)
    assert [r["query_id"] for r in results] == [r.record_id for r in picked]
    assert all(r["hits"][0]["target_id"] == r["query_id"] and r["hits"][0]["rank"] == 1 for r in results)


@pytest.mark.parametrize("how", ["format=tsv", "Accept header"])
def test_search_tsv_is_byte_for_byte_what_the_cli_prints(
    srv: SearchServer, api: httpx.Client, db: list[SequenceRecord], tmp_path: Path, how: str
) -> None:
    picked = [db[5], db[11]]
    fasta = tmp_path / "q.fasta"
    fasta.write_text(_fasta(picked))
    out = tmp_path / "cli.tsv"
    assert main(["search", str(fasta), "--server", f"127.0.0.1:{srv.port}", "-k", "4", "-o", str(out)]) == 0
    body = {"fasta": fasta.read_text(), "k": 4}
    if how == "format=tsv":
        response = api.post(SEARCH, params={"format": "tsv"}, json=body)
    else:
        response = api.post(SEARCH, json=body, headers={"Accept": "text/tab-separated-values"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/tab-separated-values; charset=utf-8"
    assert response.text == out.read_text()
    lines = response.text.splitlines()
    assert lines[0].split("\t")[:3] == ["query_id", "target_id", "cosine_score"]
    assert len(lines) == 1 + 2 * 4


def test_a_bare_sequence_is_query_1_and_finds_itself(api: httpx.Client, db: list[SequenceRecord]) -> None:
    seq = db[9].sequence
    wrapped = "\n".join(seq[i : i + 60].lower() for i in range(0, len(seq), 60)) + "*"
    response = api.post(SEARCH, json={"fasta": wrapped, "k": 2, "min_score": 0.0})
    assert response.status_code == 200
    (result,) = response.json()
    assert result["query_id"] == "query_1"
    assert result["query_length"] == len(seq)
    assert result["hits"][0]["target_id"] == db[9].record_id
    assert result["hits"][0]["cosine_score"] == pytest.approx(1.0, abs=1e-4)


def test_index_info_is_what_get_index_info_answers(srv: SearchServer, api: httpx.Client) -> None:
    response = api.get("/v1/index")
    assert response.status_code == 200
    with SearchClient(f"127.0.0.1:{srv.port}", timeout_s=30) as client:
        assert response.json() == dataclasses.asdict(client.index_info())
    assert response.json()["count"] == 40
    assert response.json()["limits"]["max_k"] == 1000


# -- 400 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["queries", "fasta"])
def test_a_bad_residue_is_400_naming_the_record_and_position(api: httpx.Client, form: str) -> None:
    if form == "queries":
        body: dict[str, Any] = {"queries": [{"id": "ok", "sequence": "MKTAYIAK"}, {"id": "bad", "sequence": "MKJA"}]}
    else:
        body = {"fasta": ">ok\nMKTAYIAK\n>bad some description\nMK\nJA\n"}
    error = _error(api.post(SEARCH, json=body), 400, "INVALID_ARGUMENT")
    assert error["record_id"] == "bad"
    assert error["position"] == 3
    assert "'bad'" in error["message"] and "residue 3" in error["message"] and "'J'" in error["message"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "JSON decode error"),
        ({"json": {"fasta": "MKT", "kk": 3}}, "kk: Extra inputs are not permitted"),
        ({"json": {"fasta": "MKT", "k": "three"}}, "k: Input should be a valid integer"),
        ({"json": {"fasta": "MKT", "k": 0}}, "k must be in [1, 1000], got 0"),
        ({"json": {"fasta": "MKT", "k": 1001}}, "k must be in [1, 1000], got 1001"),
        ({"json": {"fasta": "MKT", "min_score": 1.5}}, "min_score must be a cosine score in [-1, 1]"),
        ({"json": {"fasta": "MKT", "queries": []}}, "either as 'queries' or as 'fasta', not both"),
        ({"json": {"k": 3}}, "request has no queries"),
        ({"json": {"queries": []}}, "request has no queries; send at least one"),
        ({"json": {"fasta": "  \n"}}, "'fasta' is empty"),
        ({"json": {"fasta": ">a\nMKT\n>a\nMKV\n"}}, "duplicate record id"),
        ({"json": {"queries": [{"id": "", "sequence": "MKT"}]}}, "query #1 has an empty query_id"),
        ({"json": {"fasta": "MKT", "timeout_s": 0}}, "timeout_s must be a number of seconds > 0"),
        ({"json": {"fasta": "MKT"}, "params": {"format": "xml"}}, "format: Input should be 'json' or 'tsv'"),
        ({"content": b'{"fasta": "MKT"}'}, "Content-Type: application/json"),
    ],
)
def test_invalid_requests_are_400_with_a_reason(api: httpx.Client, kwargs: dict[str, Any], expected: str) -> None:
    error = _error(api.post(SEARCH, **kwargs), 400, "INVALID_ARGUMENT")
    assert expected in error["message"]


#: Query ids that are not one printable word (FASTA's first-word rule) or are too long.
HOSTILE_IDS = {
    "tab": "q\tforged\t0.999999",
    "newline": "q\nforged\tseq0001\t1.000000",
    "carriage return": "q\rx",
    "space": "two words",
    "NUL": "q\x00x",
    "terminal escape": "q\x1b[31mred",
    "bidi override": "q\u202ex",
    "line separator": "q\u2028x",
    "257 characters": "q" * 257,
}


@pytest.mark.parametrize("name", list(HOSTILE_IDS))
def test_a_hostile_query_id_is_400_naming_the_record_never_a_forged_tsv_row(api: httpx.Client, name: str) -> None:
    qid = HOSTILE_IDS[name]
    body = {"queries": [{"id": "ok", "sequence": "MKTAYIAK"}, {"id": qid, "sequence": "MKTAYIAK"}], "k": 2}
    response = api.post(SEARCH, params={"format": "tsv"}, json=body)
    error = _error(response, 400, "INVALID_ARGUMENT")
    assert error["record_id"] == qid
    assert error["message"].startswith(f"query #2 ({qid[:40]!r}")  # by position, repr-escaped
    assert not any(c in error["message"] for c in "\t\n\r\x00\x1b\u202e\u2028")


def test_a_hostile_id_in_fasta_text_is_400_too(api: httpx.Client) -> None:
    error = _error(api.post(SEARCH, json={"fasta": ">q\x1b[2Jx desc\nMKTAYIAK\n"}), 400, "INVALID_ARGUMENT")
    assert error["message"].startswith("query #1 ('q\\x1b[2Jx')") and "non-printable" in error["message"]


def test_an_index_error_is_answered_with_a_reason_and_an_error_id_never_a_path(
    srv: SearchServer, api: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    original = srv.engine.embed

    def broken(sequences: Sequence[str]) -> Any:
        raise IndexFormatError("/srv/secret/versions/v2/manifest.json: unreadable manifest (Errno 5)")

    srv.engine.embed = broken  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="esmsearch.server"):
            response = api.post(SEARCH, json={"fasta": "MKTAYIAK"})
    finally:
        srv.engine.embed = original  # type: ignore[method-assign]
    error = _error(response, 409, "FAILED_PRECONDITION")
    assert "secret" not in response.text and "Errno" not in response.text
    assert "failed verification" in error["message"]
    assert re.fullmatch(r"[0-9a-f]{12}", error["error_id"]) and error["error_id"] in error["message"]
    logged = [r.getMessage() for r in caplog.records if error["error_id"] in r.getMessage()]
    assert any("/srv/secret/versions/v2/manifest.json" in m for m in logged)  # the log has both


def test_probes_say_only_ready_or_alive_without_a_token(token_srv: SearchServer) -> None:
    with _client(token_srv) as anonymous:
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}  # no version, no paths
        alive = anonymous.get("/healthz")
        assert alive.status_code == 200 and alive.json() == {"status": "alive"}


def test_unknown_paths_and_methods_answer_json_errors(api: httpx.Client) -> None:
    assert _error(api.get("/v1/nothing"), 404, "NOT_FOUND")
    assert _error(api.get(SEARCH), 405, "METHOD_NOT_ALLOWED")


# -- 409, 413 ----------------------------------------------------------------------------------


def test_max_evalue_filters_hits_and_carries_evalues(api: httpx.Client) -> None:
    query = next(iter(read_fasta(Path(__file__).parent / "data" / "ecoli_40.fasta")))
    every = api.post(SEARCH, json={"fasta": query.sequence, "k": 40}).json()[0]["hits"]
    assert all(isinstance(h["evalue"], float) for h in every)  # the index has decoys
    shown = sorted(set(h["evalue"] for h in every))  # rounded to 3 significant digits in JSON
    mid = len(shown) // 2
    bound = (shown[mid] + shown[mid + 1]) / 2  # between two shown values: rounding cannot blur it
    kept = api.post(SEARCH, json={"fasta": query.sequence, "k": 40, "max_evalue": bound}).json()[0]["hits"]
    assert [h["target_id"] for h in kept] == [h["target_id"] for h in every if h["evalue"] <= shown[mid]]
    assert 0 < len(kept) < len(every)


def test_max_evalue_on_an_index_without_decoys_is_409(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, ecoli_fasta: Path
) -> None:
    from esmsearch.indexer import build_index

    no_decoys = tmp_path_factory.mktemp("nodecoys") / "index"
    build_index(ecoli_fasta, no_decoys, model=str(tiny_checkpoint), device="cpu", decoys=0)
    server = _start(no_decoys)
    try:
        with _client(server) as client:
            error = _error(
                client.post(SEARCH, json={"fasta": "MKTAYIAK", "max_evalue": 1e-3}), 409, "FAILED_PRECONDITION"
            )
            assert "E-values" in error["message"]
            hits = client.post(SEARCH, json={"fasta": "MKTAYIAK", "k": 3}).json()[0]["hits"]
            assert [h["evalue"] for h in hits] == [None, None, None]  # served, without E-values
    finally:
        server.stop(1.0)


@pytest.fixture(scope="module")
def limited(small_index: Path) -> Iterator[tuple[SearchServer, httpx.Client]]:
    server = _start(small_index, limits=RequestLimits(max_queries_per_request=2, max_residues_per_query=50))
    try:
        with _client(server) as client:
            yield server, client
    finally:
        server.stop(1.0)


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([("a", "MKT"), ("b", "MKT"), ("c", "MKT")], "request has 3 queries, over the limit of 2"),
        ([("long", "M" * 51)], "query 'long' has 51 residues, over the limit of 50 per query"),
    ],
)
def test_over_a_request_limit_is_413_without_retry_after(
    limited: tuple[SearchServer, httpx.Client], queries: list[tuple[str, str]], expected: str
) -> None:
    _, client = limited
    body = {"queries": [{"id": i, "sequence": s} for i, s in queries]}
    response = client.post(SEARCH, json=body)
    error = _error(response, 413, "RESOURCE_EXHAUSTED")
    assert expected in error["message"]
    assert "retry-after" not in response.headers


def test_a_body_over_the_size_limit_is_413_before_it_is_sent(srv: SearchServer) -> None:
    # Only the headers go out: the answer comes from the Content-Length alone.
    assert srv.http_port is not None
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = raw.recv(65536)
            assert chunk, answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    error = json.loads(body)
    assert error["code"] == "RESOURCE_EXHAUSTED"
    assert "request body is larger than the limit" in error["message"]
    assert b"retry-after" not in head.lower()


def test_a_chunked_body_over_the_size_limit_is_413_while_read(api: httpx.Client) -> None:
    big = b'{"fasta": "' + b"A" * (8 << 20) + b'"}'
    # A generator body goes out chunked, without Content-Length: counted while read.
    response = api.post(SEARCH, content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))
    error = _error(response, 413, "RESOURCE_EXHAUSTED")
    assert "request body is larger than the limit" in error["message"]
    assert "retry-after" not in response.headers


# -- 429, 503, 504, 500: the model scheduler is shared ---------------------------------------


@contextlib.contextmanager
def _gated(small_index: Path, in_flight: int) -> Iterator[tuple[SearchServer, Gate, httpx.Client]]:
    """A server admitting ``in_flight`` queries, whose model waits for ``gate.release``."""
    server = _start(small_index, admission=AdmissionConfig(max_queries_in_flight=in_flight))
    gate = Gate(server)
    try:
        with _client(server) as client:
            yield server, gate, client
    finally:
        gate.release.set()
        server.stop(5.0)


def test_busy_is_429_with_retry_after_from_the_same_estimate_as_grpc(
    small_index: Path, db: list[SequenceRecord]
) -> None:
    with _gated(small_index, 1) as (server, gate, client):
        _busy(server, gate, client, db)


def _busy(server: SearchServer, gate: Gate, client: httpx.Client, db: list[SequenceRecord]) -> None:
    body = {"queries": [{"id": "q", "sequence": db[0].sequence}], "k": 1}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, SEARCH, json=body)
        assert gate.entered.wait(60)  # the admitted request holds the model
        busy = client.post(SEARCH, json=body)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                search_pb2_grpc.HomologSearchStub(channel).Search(
                    search_pb2.SearchRequest(queries=[search_pb2.Query(query_id="q", sequence="MKT")], k=1), timeout=30
                )
        gate.release.set()
        assert held.result(60).status_code == 200
    error = _error(busy, 429, "RESOURCE_EXHAUSTED")
    assert "server busy" in error["message"]
    ms = int(dict(info.value.trailing_metadata())["retry-after-ms"])
    assert busy.headers["retry-after"] == str(max(1, math.ceil(ms / 1e3)))
    assert server.batcher.admission.queries_in_flight == 0


def test_deadline_passed_while_queued_is_504(small_index: Path, db: list[SequenceRecord]) -> None:
    # Two queries admitted: the second waits in the queue behind the gated one.
    with _gated(small_index, 2) as (_server, gate, client), ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, SEARCH, json={"fasta": db[0].sequence, "k": 1})
        assert gate.entered.wait(60)
        late = client.post(SEARCH, json={"fasta": db[1].sequence, "k": 1, "timeout_s": 0.2})
        gate.release.set()
        assert held.result(60).status_code == 200
    error = _error(late, 504, "DEADLINE_EXCEEDED")
    assert "deadline passed" in error["message"]


def test_draining_answers_503_to_new_requests_while_in_flight_ones_finish(
    small_index: Path, db: list[SequenceRecord]
) -> None:
    server = _start(small_index)
    gate = Gate(server)
    try:
        with _client(server) as client, ThreadPoolExecutor(1) as pool:
            assert client.get("/readyz").json()["status"] == "ready"
            held = pool.submit(client.post, SEARCH, json={"fasta": db[2].sequence, "k": 2})
            assert gate.entered.wait(60)
            server.begin_stop(30.0)
            _error(client.get("/readyz"), 503, "UNAVAILABLE")
            assert client.get("/healthz").status_code == 200  # alive, not ready
            error = _error(client.post(SEARCH, json={"fasta": "MKTAYIAK"}), 503, "UNAVAILABLE")
            assert "draining" in error["message"]
            _error(client.get("/v1/index"), 503, "UNAVAILABLE")
            gate.release.set()
            finished = held.result(60)
        assert finished.status_code == 200
        assert finished.json()[0]["hits"][0]["target_id"] == db[2].record_id
        server.stop()
        with pytest.raises(httpx.ConnectError):  # stopped: the port is closed
            httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)
    finally:
        gate.release.set()
        server.stop(0)


def test_a_client_that_disconnects_while_queued_is_dropped_before_embedding(
    small_index: Path, db: list[SequenceRecord]
) -> None:
    server = _start(small_index, admission=AdmissionConfig(max_queries_in_flight=4))
    gate = Gate(server)
    finished = Finished(server)
    queued = threading.Semaphore(0)
    server.batcher.on_enqueue = lambda depth: queued.release()
    try:
        with _client(server) as client, ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.post, SEARCH, json={"fasta": db[0].sequence, "k": 1})
            assert queued.acquire(timeout=60) and gate.entered.wait(60)
            body = json.dumps({"fasta": db[1].sequence, "k": 1}).encode()
            with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as raw:
                raw.sendall(
                    b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                assert queued.acquire(timeout=60)  # the second request is queued behind the gate
            (gone,) = finished.wait_for(1)  # the socket closed: answered at once, not embedded
            assert gone.code == grpc.StatusCode.DEADLINE_EXCEEDED and gone.embed_s == 0.0
            gate.release.set()
            assert held.result(60).status_code == 200
            # A third request runs after the scheduler has passed the dropped one.
            assert client.post(SEARCH, json={"fasta": db[2].sequence, "k": 1}).status_code == 200
        assert server.metrics.registry.get_sample_value("esmsearch_dropped_requests_total") == 1.0
        assert server.batcher.admission.queries_in_flight == 0
    finally:
        gate.release.set()
        server.stop(5.0)


def test_an_internal_error_is_500_with_an_error_id_never_the_exception_text(
    srv: SearchServer, api: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    original = srv.engine.embed

    def broken(sequences: Sequence[str]) -> Any:
        raise RuntimeError("secret /srv/path")

    srv.engine.embed = broken  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="esmsearch.server"):
            response = api.post(SEARCH, json={"fasta": "MKTAYIAK"})
    finally:
        srv.engine.embed = original  # type: ignore[method-assign]
    error = _error(response, 500, "INTERNAL")
    assert "secret" not in response.text
    assert re.fullmatch(r"[0-9a-f]{12}", error["error_id"])
    assert error["error_id"] in error["message"]
    logged = [r for r in caplog.records if getattr(r, "fields", {}).get("error_id") == error["error_id"]]
    assert logged and logged[0].fields["rpc"] == "http:POST /v1/search"  # type: ignore[attr-defined]
    assert any(r.exc_info and "secret" in str(r.exc_info[1]) for r in caplog.records)


def test_the_status_table_covers_every_code_the_server_answers() -> None:
    busy = status_for(ServerBusyError("busy", retry_after_s=1.2))
    assert (http_status(busy), busy.retry_after_s) == (429, 1.2)
    cases: list[tuple[BaseException, int]] = [
        (Reject(grpc.StatusCode.INVALID_ARGUMENT, "x"), 400),
        (Reject(grpc.StatusCode.UNAUTHENTICATED, "x"), 401),
        (Reject(grpc.StatusCode.FAILED_PRECONDITION, "x"), 409),
        (Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, "x"), 413),
        (InvalidSequenceError("r", "bad", 7), 400),
        (RequestTooLargeError("x"), 413),
        (RequestExpiredError("x"), 504),
        (ServerClosingError("x"), 503),
        (IndexFormatError("x"), 409),
        (RuntimeError("x"), 500),
    ]
    for exc, expected in cases:
        assert http_status(status_for(exc)) == expected, exc
    assert error_body(status_for(InvalidSequenceError("r", "bad", 7))) == {
        "code": "INVALID_ARGUMENT",
        "message": "record 'r' at residue 7: bad",
        "record_id": "r",
        "position": 7,
    }
    assert all(400 <= HTTP_STATUS[c] < 600 for c in grpc.StatusCode if c != grpc.StatusCode.OK)


# -- tokens, TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_srv(small_index: Path) -> Iterator[SearchServer]:
    server = _start(small_index, security=SecurityConfig(tokens=frozenset({TOKEN})))
    try:
        yield server
    finally:
        server.stop(1.0)


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token-0123456789", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_a_missing_or_wrong_token_is_401(token_srv: SearchServer, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with _client(token_srv, headers=headers) as client:
        for response in (client.post(SEARCH, json={"fasta": "MKTAYIAK"}), client.get("/v1/index")):
            error = _error(response, 401, "UNAUTHENTICATED")
            assert "bearer token" in error["message"]
            assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_valid_token_is_accepted_and_health_docs_and_page_need_none(token_srv: SearchServer) -> None:
    with _client(token_srv, headers={"Authorization": f"bearer {TOKEN}"}) as client:
        assert client.post(SEARCH, json={"fasta": "MKTAYIAK", "k": 2}).status_code == 200
        assert client.get("/v1/index").json()["count"] == 40
    with _client(token_srv) as anonymous:
        for path in ("/healthz", "/readyz", "/", "/static/app.js", "/openapi.json", "/docs"):
            assert anonymous.get(path).status_code == 200, path
    refused = token_srv.metrics.registry.get_sample_value(
        "esmsearch_errors_total", {"rpc": "http:POST /v1/search", "code": "UNAUTHENTICATED"}
    )
    assert refused is not None and refused >= 1


def _tls_context(pki: Pki, *, client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


@pytest.mark.parametrize("mutual", [False, True])
def test_https_uses_the_grpc_servers_certificate(small_index: Path, pki: Pki, mutual: bool) -> None:
    tls = TlsConfig(pki.server_cert, pki.server_key, client_ca_file=pki.ca if mutual else None)
    server = _start(small_index, security=SecurityConfig(tls=tls))
    try:
        assert server.http is not None and server.http.scheme == "https"
        url = f"https://localhost:{server.http_port}"
        with httpx.Client(base_url=url, verify=_tls_context(pki, client_cert=True), timeout=30) as client:
            response = client.post(SEARCH, json={"fasta": "MKTAYIAK", "k": 2})
            assert response.status_code == 200 and len(response.json()[0]["hits"]) == 2
        with pytest.raises(httpx.TransportError):  # plaintext to the TLS port
            httpx.get(f"http://localhost:{server.http_port}/healthz", timeout=10)
        if mutual:
            with pytest.raises(httpx.TransportError):  # no client certificate
                with httpx.Client(base_url=url, verify=_tls_context(pki, client_cert=False), timeout=10) as client:
                    client.get("/v1/index")
    finally:
        server.stop(1.0)


# -- logs, metrics, docs ---------------------------------------------------------------------


def test_http_requests_are_logged_and_counted_like_rpcs(
    srv: SearchServer, api: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    registry = srv.metrics.registry
    label = {"rpc": "http:POST /v1/search"}
    before = registry.get_sample_value("esmsearch_requests_total", label) or 0.0
    errors_before = registry.get_sample_value("esmsearch_errors_total", {**label, "code": "INVALID_ARGUMENT"}) or 0.0
    with caplog.at_level(logging.INFO, logger="esmsearch.server"):
        assert api.post(SEARCH, json={"fasta": "MKTAYIAKQR", "k": 3}).status_code == 200
        assert api.post(SEARCH, json={"fasta": "MK1"}).status_code == 400
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("rpc") == "http:POST /v1/search"]
    assert [r.fields["code"] for r in lines] == ["OK", "INVALID_ARGUMENT"]  # type: ignore[attr-defined]
    ok = lines[0].fields  # type: ignore[attr-defined]
    assert (ok["queries"], ok["residues"], ok["k"]) == (1, 10, 3)
    assert ok["embed_ms"] > 0 and ok["peer"].startswith("ipv4:127.0.0.1:")
    assert registry.get_sample_value("esmsearch_requests_total", label) == before + 2
    assert registry.get_sample_value("esmsearch_errors_total", {**label, "code": "INVALID_ARGUMENT"}) == (
        errors_before + 1
    )
    assert registry.get_sample_value("esmsearch_stage_seconds_count", {**label, "stage": "embed"}) is not None


def test_openapi_documents_exactly_the_fields_search_returns(api: httpx.Client) -> None:
    doc = api.get("/openapi.json").json()
    assert {"/v1/search", "/v1/index", "/healthz", "/readyz"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    hit = api.post(SEARCH, json={"fasta": "MKTAYIAKQR", "k": 1}).json()[0]
    assert set(schemas["HitOut"]["properties"]) == set(hit["hits"][0])
    assert set(schemas["QueryResultOut"]["properties"]) == set(hit)
    assert {"queries", "fasta", "k", "min_score", "max_evalue", "evalue_db_size", "timeout_s"} == set(
        schemas["SearchBody"]["properties"]
    )
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    assert "429" in doc["paths"]["/v1/search"]["post"]["responses"]


def test_the_docs_page_loads_nothing_from_other_hosts(api: httpx.Client) -> None:
    for path in ("/docs", "/redoc"):
        html = api.get(path).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert assets, path
        for asset in assets:
            assert not re.match(r"(?i)^(https?:)?//", asset), (path, asset)
            assert api.get(asset).status_code == 200, asset


# -- configuration, CLI -----------------------------------------------------------------------


def test_config_validates_the_http_port(small_index: Path) -> None:
    from esmsearch.errors import ConfigError

    for bad in (-1, 65536, "8080", True):
        with pytest.raises(ConfigError, match="http_port"):
            ServerConfig(index=small_index, http_port=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="port and http_port must differ, both are 8080"):
        ServerConfig(index=small_index, port=8080, http_port=8080)
    assert ServerConfig(index=small_index, port=0, http_port=0).http_port == 0  # 0: two free ports
    assert ServerConfig(index=small_index).http_port is None


def test_a_busy_http_port_fails_create_server_and_releases_everything(small_index: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = {t.name for t in threading.enumerate()}
        with pytest.raises(OSError, match=f"cannot bind the HTTP port {port}"):
            create_server(ServerConfig(index=small_index, port=0, http_port=port, device="cpu"))
    assert not [t for t in threading.enumerate() if t.name not in before and t.name.startswith("esmsearch")]


def _readline(proc: subprocess.Popen[str], pattern: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert re.match(pattern, line), line
    return line


def test_cli_serve_with_http_port_prints_the_url_and_stops_on_sigterm(small_index: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "esmsearch.cli", "serve", str(small_index), "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        _readline(proc, r"serving .* on 127\.0\.0\.1:\d+$")
        url = _readline(proc, r"HTTP API and web page on http://127\.0\.0\.1:\d+/$").rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(url + "readyz", timeout=30) as response:
            assert json.load(response)["status"] == "ready"
        request = urllib.request.Request(
            url + "v1/search",
            data=json.dumps({"fasta": "MKTAYIAKQR", "k": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.load(response)[0]["hits"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        reap(proc)


# -- evalue_db_size (issue 18 part 4) ----------------------------------------------------------
def test_evalue_db_size_scales_evalues_over_http(api: httpx.Client, db: list[SequenceRecord]) -> None:
    """N = 4000, 100 x the index's 40 sequences: every E-value 100 x (to the JSON's 3 digits)."""
    body = {"fasta": _fasta(db[:3]), "k": 10}
    plain = api.post(SEARCH, json=body).json()
    scaled = api.post(SEARCH, json={**body, "evalue_db_size": 4000}).json()
    for a, b in zip(plain, scaled, strict=True):
        assert [h["target_id"] for h in a["hits"]] == [h["target_id"] for h in b["hits"]]
        for ha, hb in zip(a["hits"], b["hits"], strict=True):
            assert hb["evalue"] == pytest.approx(100 * ha["evalue"], rel=1e-2)
            assert ha["evalue"] > 0


@pytest.mark.parametrize("value", [0, -1, 1.5, "1000", True])
def test_bad_evalue_db_size_is_400_naming_the_field(api: httpx.Client, value: Any) -> None:
    error = _error(api.post(SEARCH, json={"fasta": "MKTAYIAKQR", "evalue_db_size": value}), 400, "INVALID_ARGUMENT")
    assert "evalue_db_size" in error["message"]


# -- transport bounds: body size before routing, a request cap from the admission bounds -----


def _raw_answer(port: int, head: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send only ``head`` (request line and headers, no body) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(head)
        answer = b""
        while True:  # the server closes the connection after the answer (its body was never read)
            chunk = raw.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_head, _, body = answer.partition(b"\r\n\r\n")
    return status_head, json.loads(body)


@pytest.mark.parametrize("path", [SEARCH, "/v1/nothing"])
def test_content_length_over_the_limit_is_413_before_routing_or_the_token_check(
    token_srv: SearchServer, path: str
) -> None:
    assert token_srv.http_port is not None
    head, error = _raw_answer(
        token_srv.http_port,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + b"Content-Length: 100000000\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 413 ")  # not 401 (no token) nor 404: the body is never read
    assert b"connection: close" in head.lower()
    assert error["code"] == "RESOURCE_EXHAUSTED" and "request body is larger than the limit" in error["message"]


def test_requests_beyond_the_cap_are_429_with_retry_after_and_probes_still_answer(small_index: Path) -> None:
    server = _start(small_index, max_workers=1, admission=AdmissionConfig(max_queries_in_flight=1))
    assert server.http is not None and server.http_port is not None
    config = server.config
    assert config.max_concurrent_requests == 2  # max_workers + max_queries_in_flight
    assert server.http._uvicorn.config.limit_concurrency == config.http_limit_concurrency == 4
    begun = threading.Semaphore(0)
    observer = server.servicer.observer
    original = observer.begin

    def begin(rpc: str, peer: str) -> RpcRecord:
        begun.release()
        return original(rpc, peer)

    observer.begin = begin  # type: ignore[method-assign]
    slow: list[socket.socket] = []
    try:
        for _ in range(2):  # two requests in flight, each waiting for the rest of its body
            sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
            slow.append(sock)
            sock.sendall(
                b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 40\r\n\r\n{"fasta": "MK'
            )
            assert begun.acquire(timeout=30)
        with _client(server) as client:
            refused = client.post(SEARCH, json={"fasta": "MKTAYIAK"})
            assert client.get("/readyz").status_code == 200  # probes are never refused by the cap
            assert client.get("/healthz").status_code == 200
            error = _error(refused, 429, "RESOURCE_EXHAUSTED")
            assert "2 HTTP requests in flight" in error["message"]
            assert refused.headers["retry-after"] == "1"
            for sock in slow:
                sock.close()
            slow.clear()
            assert server.http._ctx.traffic.wait_requests(0, 30)  # both noticed gone ...
            errors = server.metrics.registry.get_sample_value
            assert errors("esmsearch_errors_total", {"rpc": "http:POST /v1/search", "code": "INTERNAL"}) is None
            assert errors("esmsearch_errors_total", {"rpc": "http:POST /v1/search", "code": "DEADLINE_EXCEEDED"}) == 2
            answered = client.post(SEARCH, json={"fasta": "MKTAYIAK"})  # room again once they left
            assert answered.status_code == 200, answered.text
    finally:
        for sock in slow:
            sock.close()
        server.stop(1.0)


# -- large answers: compact JSON, built off the event loop (issue 19) -----------------------


def test_search_json_is_compact_unless_pretty(api: httpx.Client, db: list[SequenceRecord]) -> None:
    body = {"fasta": _fasta([db[2], db[9]]), "k": 4}
    compact = api.post(SEARCH, json=body)
    off = api.post(SEARCH, params={"pretty": "false"}, json=body)
    pretty = api.post(SEARCH + "?pretty", json=body)
    assert compact.status_code == off.status_code == pretty.status_code == 200
    assert compact.text == off.text and compact.text.count("\n") == 1 and compact.text.endswith("]\n")
    assert ", " not in compact.text and '": ' not in compact.text  # no spaces after separators
    assert pretty.text.startswith('[\n  {\n    "query_id": ')
    assert json.loads(compact.text) == json.loads(pretty.text)
    assert [len(r["hits"]) for r in json.loads(compact.text)] == [4, 4]
    _error(api.post(SEARCH, params={"pretty": "maybe"}, json=body), 400, "INVALID_ARGUMENT")


def test_encode_answer_pretty_is_the_cli_json_query_by_query() -> None:
    """Encoded query by query, the pretty answer is what one json.dump of the whole list
    (the CLI's write_json) writes, empty hit lists and no queries included."""
    import io

    from esmsearch.client.formats import write_json, write_tsv
    from esmsearch.client.types import Hit, QueryResult
    from esmsearch.server.engine import EngineHit, EngineResult
    from esmsearch.server.httpapi import encode_answer

    hits = [
        [EngineHit("t1", "a\tb \u00e9", 0.875, 1, 30, 1.25e-5), EngineHit("t2", "", 0.5, 2, 31, None)],
        [],
        [EngineHit("t3", 'say "x"', -0.25, 1, 7, 3.0)],
    ]
    ids, lengths = ["q1", "q2", "q3"], [10, 20, 30]
    cli = [
        QueryResult(
            qid,
            n,
            "v1",
            [Hit(h.target_id, h.target_description, h.cosine_score, h.rank, h.target_length, h.evalue) for h in qh],
        )
        for qid, n, qh in zip(ids, lengths, hits, strict=True)
    ]
    for queries in (slice(0, 3), slice(1, 2), slice(0, 0)):
        part = EngineResult(hits[queries], "v1", 0.0, 0.0, 0.0)
        want_json, want_tsv = io.StringIO(), io.StringIO()
        write_json(cli[queries], want_json)
        write_tsv(cli[queries], want_tsv)
        pretty = b"".join(encode_answer(part, ids[queries], lengths[queries], indent=2))
        assert pretty == want_json.getvalue().encode()
        assert b"".join(encode_answer(part, ids[queries], lengths[queries], tsv=True)) == want_tsv.getvalue().encode()
        compact = b"".join(encode_answer(part, ids[queries], lengths[queries]))
        assert json.loads(compact) == json.loads(want_json.getvalue()) and b"\n" not in compact[:-1]


def test_readyz_answers_while_a_large_answer_is_being_encoded(
    srv: SearchServer, api: httpx.Client, db: list[SequenceRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's conversion runs off the event loop: /readyz and /healthz answer while a
    search answer is stopped in the middle of being built (ordered by events, no timing)."""
    from esmsearch.server import httpapi

    building, release = threading.Event(), threading.Event()
    real_fill = httpapi.fill_results

    def stalled_fill(*args: Any, **kwargs: Any) -> None:
        building.set()
        release.wait(30)
        real_fill(*args, **kwargs)

    monkeypatch.setattr(httpapi, "fill_results", stalled_fill)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(api.post, SEARCH, json={"fasta": _fasta(db[:3]), "k": 5})
        try:
            assert building.wait(30), "the search never reached the answer's conversion"
            with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=10) as probe:
                ready, alive = probe.get("/readyz"), probe.get("/healthz")
            answered_while_building = not release.is_set() and not answer.done()
        finally:
            release.set()
        response = answer.result(60)
    assert answered_while_building
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert alive.status_code == 200
    assert response.status_code == 200 and [len(r["hits"]) for r in response.json()] == [5, 5, 5]


def test_queries_times_k_over_the_hit_limit_is_400_naming_the_limit(small_index: Path) -> None:
    server = _start(small_index, admission=AdmissionConfig(max_hits_per_request=5))
    try:
        with _client(server) as client:
            response = client.post(SEARCH, json={"fasta": ">a\nMKTAYIAK\n>b\nMKVLAAGI\n", "k": 3})
            error = _error(response, 400, "INVALID_ARGUMENT")
            assert "6 hits" in error["message"] and "limit of 5 hits per request" in error["message"]
            assert "retry-after" not in response.headers
            assert client.post(SEARCH, json={"fasta": "MKTAYIAK", "k": 5}).status_code == 200
    finally:
        server.stop(1.0)
