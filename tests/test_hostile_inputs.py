"""A compact set of hostile requests (issue 19, part 6; the full run is ``benchmarks/hostile_inputs.py``).

About 100 bad requests over gRPC (the session's ``server`` fixture) and HTTP (a module
server with ``http_port``): malformed protobuf bytes, wrong JSON types, bad k, NaN/inf
and wrong-dimension embeddings, empty, invalid and 10 MB sequences, hostile and
duplicate query ids, a gzip bomb, expired deadlines, wrong paths. Each must get its
documented answer -- never INTERNAL (an undecodable request message too is
INVALID_ARGUMENT, see :mod:`esmsearch.server.decoding`) and never a 5xx other than 504
for an expired ``timeout_s`` -- and the server must still answer a valid search
afterwards; undecodable messages must not leave gRPC call state behind. Every
generator is seeded.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.message import DecodeError

from esmsearch.server import SearchServer, ServerConfig, create_server
from esmsearch.v1 import search_pb2, search_pb2_grpc

DIM = 32  # the tiny test checkpoint's embedding width (conftest)
SEED = 19
TEN_MB = 10 * 1024 * 1024
MAX_K = 1000  # the default RequestLimits.max_k
HOSTILE_IDS = ["", "q\tforged", "q\nforged", "x" * 300, "\x1b[31m", "q 1", "q\x00", "\u200bq"]
BAD_SEQUENCES = ["", "*", "**", "MK1V", "MK-V", "MK V", "MK\x00V", "MKµV", "MK*V", "MK\u200bV"]
INVALID = {"INVALID_ARGUMENT"}
EXHAUSTED = {"RESOURCE_EXHAUSTED"}
REAL = "MKRISTTITTTITITTGNGAG"  # a valid sequence


def _q(qid: str, seq: str) -> search_pb2.Query:
    return search_pb2.Query(query_id=qid, sequence=seq)


def _decodes(body: bytes) -> bool:
    try:
        search_pb2.SearchRequest.FromString(body)
    except DecodeError:
        return False
    return True


def grpc_cases() -> list[tuple[str, str, Any, set[str], dict[str, Any]]]:
    """``(what, method, request or raw bytes, expected status names, call kwargs)``."""
    rng = random.Random(SEED)
    one = [_q("q", REAL)]
    emb = search_pb2.Embedding
    cases: list[tuple[str, str, Any, set[str], dict[str, Any]]] = []
    valid = search_pb2.SearchRequest(queries=one, k=5).SerializeToString()
    raw = [
        b"\x10" + b"\xff" * 11,  # varint over 10 bytes
        b"\x0a\xff\xff\xff\xff\x0f",  # length 4 GiB, no bytes
        b"\x0a\x05\x0a\x03\xff\xfe\xfd",  # query_id: invalid UTF-8
        b"\x0b",  # group never ended
        b"\x0f",  # wire type 7
        b"\x0a\x02\x0a",  # nested length past the end
        *(rng.randbytes(rng.randint(1, 60)) for _ in range(8)),
        *(valid[: rng.randint(1, len(valid) - 1)] for _ in range(4)),
    ]
    for body in raw:
        # Undecodable or not, the request is at fault (grpcio alone would answer INTERNAL, and leak).
        expected = INVALID
        cases.append((f"raw bytes {body[:16]!r}", "raw:Search", body, expected, {}))
    for k in (0, -1, MAX_K + 1, 2**31 - 1):
        cases.append((f"k={k}", "Search", search_pb2.SearchRequest(queries=one, k=k), INVALID, {}))
        req = search_pb2.SearchByEmbeddingRequest(embeddings=[emb(query_id="e", values=[0.1] * DIM)], k=k)
        cases.append((f"embedding k={k}", "SearchByEmbedding", req, INVALID, {}))
    many = [_q(f"m{i}", "MKV") for i in range(200)]
    cases.append(("200 queries x k=1000", "Search", search_pb2.SearchRequest(queries=many, k=1000), INVALID, {}))
    for ms in (float("nan"), float("inf"), 1.5):
        cases.append(
            (f"min_score={ms}", "Search", search_pb2.SearchRequest(queries=one, k=5, min_score=ms), INVALID, {})
        )
    cases.append(
        ("evalue_db_size=-1", "Search", search_pb2.SearchRequest(queries=one, k=5, evalue_db_size=-1), INVALID, {})
    )
    for what, values in (
        ("NaN", [float("nan")] + [0.1] * (DIM - 1)),
        ("inf", [0.1] * (DIM - 1) + [float("inf")]),
        ("zero vector", [0.0] * DIM),
        ("dim 0", []),
        ("dim 31", [0.1] * (DIM - 1)),
        ("dim 33", [0.1] * (DIM + 1)),
    ):
        req = search_pb2.SearchByEmbeddingRequest(embeddings=[emb(query_id="e", values=values)], k=5)
        cases.append((f"embedding {what}", "SearchByEmbedding", req, INVALID, {}))
    cases.append(("no embeddings", "SearchByEmbedding", search_pb2.SearchByEmbeddingRequest(k=5), INVALID, {}))
    for seq in BAD_SEQUENCES:
        cases.append(
            (f"sequence {seq!r}", "Search", search_pb2.SearchRequest(queries=[_q("q", seq)], k=5), INVALID, {})
        )
        cases.append((f"Embed sequence {seq!r}", "Embed", search_pb2.EmbedRequest(queries=[_q("q", seq)]), INVALID, {}))
    for n, what in ((1_500_000, "1.5 M residues"), (TEN_MB, "10 MB")):
        req = search_pb2.SearchRequest(queries=[_q("q", "A" * n)], k=5)
        cases.append((f"sequence of {what}", "Search", req, EXHAUSTED, {}))
    for qid in HOSTILE_IDS:
        cases.append(
            (
                f"id {qid!r}",
                "Search",
                search_pb2.SearchRequest(queries=[_q("ok", REAL), _q(qid, REAL)], k=5),
                INVALID,
                {},
            )
        )
        req = search_pb2.SearchByEmbeddingRequest(embeddings=[emb(query_id=qid, values=[0.1] * DIM)], k=5)
        cases.append((f"embedding id {qid!r}", "SearchByEmbedding", req, INVALID, {}))
    cases.append(
        ("duplicate ids", "Search", search_pb2.SearchRequest(queries=[_q("d", REAL), _q("d", "MKV")], k=5), INVALID, {})
    )
    bomb = search_pb2.SearchRequest(queries=[_q("bomb", "A" * TEN_MB)], k=5).SerializeToString()
    cases.append(
        ("10 MB request gzip-compressed", "raw:Search", bomb, EXHAUSTED, {"compression": grpc.Compression.Gzip})
    )
    cases.append(
        (
            "timeout 1 ms",
            "Search",
            search_pb2.SearchRequest(queries=one, k=5),
            {"DEADLINE_EXCEEDED"},
            {"timeout": 0.001},
        )
    )
    return cases


def test_hostile_grpc_requests_get_their_documented_status_and_the_server_still_answers(server, client) -> None:  # type: ignore[no-untyped-def]
    address, _ = server
    answers = []
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = search_pb2_grpc.HomologSearchStub(channel)
        raw = channel.unary_unary(
            "/esmsearch.v1.HomologSearch/Search", request_serializer=None, response_deserializer=None
        )
        for what, method, request, expected, kwargs in grpc_cases():
            call = raw if method == "raw:Search" else getattr(stub, method)
            try:
                call(request, **{"timeout": 60, **kwargs})
                got = "OK"
            except grpc.RpcError as exc:
                got = exc.code().name
            answers.append((what, got, expected))
    wrong = [(what, got, sorted(expected)) for what, got, expected in answers if got not in expected]
    assert not wrong, wrong
    assert len(answers) >= 60
    (result,) = client.search({"after": REAL}, k=3)
    assert result.query_id == "after" and len(result.hits) == 3


def _live_rpc_states() -> int:
    from grpc._server import _RPCState  # grpcio's per-call state (ImportError if renamed: revisit the test)

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is _RPCState)  # type(): no attribute lookups


def test_undecodable_messages_are_invalid_argument_and_leave_no_call_state_behind(server, caplog) -> None:  # type: ignore[no-untyped-def]
    """grpcio alone answers INTERNAL and keeps every such call alive (~19 KB each, forever)."""
    caplog.set_level(logging.INFO, logger="esmsearch.server")
    address, _ = server
    bodies = [b"\x0b", b"\x0f", b"\x0a\x02\x0a", b"\x10" + b"\xff" * 11]
    assert not any(_decodes(b) for b in bodies)
    with grpc.insecure_channel(address) as channel:
        paths = [
            "/esmsearch.v1.HomologSearch/Search",
            "/esmsearch.v1.HomologSearch/SearchByEmbedding",
            "/esmsearch.v1.HomologSearch/Embed",
            "/esmsearch.v1.HomologSearch/GetIndexInfo",
            "/grpc.health.v1.Health/Check",
        ]
        calls = [channel.unary_unary(p, request_serializer=None, response_deserializer=None) for p in paths]
        # Reflection is a bidirectional stream: the same guard covers request streams.
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )
        codes: list[str] = []
        before = _live_rpc_states()
        for i in range(200):
            call = calls[i % len(calls)]
            try:
                call(bodies[i % len(bodies)], timeout=30)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                if i < len(calls):
                    assert "does not decode" in (exc.details() or ""), exc.details()
        for body in bodies:
            try:
                list(reflect(iter([body]), timeout=30))
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        time.sleep(0.5)  # let the server's completion queue retire the calls
        after = _live_rpc_states()
    assert set(codes) == {"INVALID_ARGUMENT"}, sorted(set(codes))
    assert "rpc=SearchByEmbedding code=INVALID_ARGUMENT" in caplog.text  # logged and counted like any RPC
    assert after - before < 20, f"{after - before} gRPC call states left behind by 204 undecodable requests"


@pytest.fixture(scope="module")
def http_srv(small_index: Path) -> Iterator[SearchServer]:
    srv, _ = create_server(ServerConfig(index=small_index, port=0, http_port=0, device="cpu", max_workers=4))
    try:
        yield srv
    finally:
        srv.stop(1.0)


def http_cases() -> list[tuple[str, str, bytes, set[int]]]:
    """``(what, path, body, expected HTTP statuses)``; valid UTF-8 bodies (undecodable ones: below)."""
    rng = random.Random(SEED)
    good = {"queries": [{"id": "q", "sequence": REAL}], "k": 5}
    good_bytes = json.dumps(good).encode()
    q = good["queries"]
    cases: list[tuple[str, str, bytes, set[int]]] = []
    for _ in range(6):
        body = bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 80)))  # ASCII garbage
        cases.append((f"garbage {body[:16]!r}", "/v1/search", body, {400}))
        cut = rng.randint(0, len(good_bytes) - 1)
        cases.append((f"JSON cut at {cut}", "/v1/search", good_bytes[:cut], {400}))
    for body in (b"[]", b"null", b"1", b'"x"', b"{}", b"[" * 500 + b"]" * 500):
        cases.append((f"not a search {body[:16]!r}", "/v1/search", body, {400}))
    wrong: list[dict[str, Any]] = [
        {"queries": q, "k": "ten"},
        {"queries": q, "k": 1.5},
        {"queries": q, "k": None},
        {"queries": "MKV"},
        {"queries": [{"id": 1, "sequence": "MKV"}]},
        {"queries": [{"id": "a", "sequence": None}]},
        {"queries": [{"id": "a"}]},
        {"queries": q, "extra": 1},
        {"queries": q, "evalue_db_size": 1.0},
        {"queries": q, "fasta": ">a\nMKV\n"},
        {"fasta": 5},
        {},
    ]
    cases += [(json.dumps(obj), "/v1/search", json.dumps(obj).encode(), {400}) for obj in wrong]
    for k in (0, -1, MAX_K + 1, 10**30):
        cases.append((f"k={k}", "/v1/search", json.dumps({**good, "k": k}).encode(), {400}))
    for key, literal in (
        ("min_score", "NaN"),
        ("min_score", "Infinity"),
        ("timeout_s", "0"),
        ("timeout_s", "NaN"),
        ("k", "NaN"),
    ):
        cases.append((f"{key}={literal}", "/v1/search", good_bytes[:-1] + f', "{key}": {literal}}}'.encode(), {400}))
    for seq in BAD_SEQUENCES:
        body = json.dumps({"queries": [{"id": "q", "sequence": seq}], "k": 5}).encode()
        cases.append((f"sequence {seq!r}", "/v1/search", body, {400}))
    big = json.dumps({"queries": [{"id": "q", "sequence": "A" * 1_500_000}], "k": 5}).encode()
    cases.append(("1.5 M residues", "/v1/search", big, {413}))
    for qid in HOSTILE_IDS:
        body = json.dumps({"queries": [{"id": "ok", "sequence": REAL}, {"id": qid, "sequence": REAL}], "k": 5}).encode()
        cases.append((f"id {qid!r}", "/v1/search?format=tsv", body, {400}))
    dup = json.dumps({"fasta": f">d\n{REAL}\n>d\nMKV\n", "k": 5}).encode()
    cases.append(("duplicate FASTA ids", "/v1/search", dup, {400}))
    cases.append(("timeout_s 1 ms", "/v1/search", json.dumps({**good, "timeout_s": 0.001}).encode(), {504}))
    cases.append(("?format=xml", "/v1/search?format=xml", good_bytes, {400}))
    cases.append(("?pretty=maybe", "/v1/search?pretty=maybe", good_bytes, {400}))
    cases.append(("unknown path", "/v2/search", good_bytes, {404, 405}))
    return cases


def test_hostile_http_requests_get_4xx_never_500_and_the_server_still_answers(http_srv: SearchServer) -> None:
    answers = []
    with httpx.Client(base_url=f"http://127.0.0.1:{http_srv.http_port}", timeout=60) as api:
        for what, path, body, expected in http_cases():
            r = api.post(path, content=body, headers={"content-type": "application/json"})
            answers.append((what, r.status_code, expected))
        assert api.get("/v1/search").status_code == 405
        # 10 MB announced, 64 kB sent: 413 before the rest is read.
        with socket.create_connection(("127.0.0.1", http_srv.http_port), timeout=30) as raw:
            raw.sendall(
                f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {TEN_MB}\r\n\r\n".encode()
                + b"A" * 65536
            )
            status_line = raw.recv(4096).split(b"\r\n", 1)[0]
        answers.append(("10 MB Content-Length", int(status_line.split()[1]), {413}))
        wrong = [(what, got, sorted(expected)) for what, got, expected in answers if got not in expected]
        assert not wrong, wrong
        assert len(answers) >= 50
        r = api.post("/v1/search", json={"queries": [{"id": "after", "sequence": REAL}], "k": 3})
        assert r.status_code == 200 and [len(x["hits"]) for x in r.json()] == [3]


@pytest.mark.parametrize(
    "body",
    [
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",  # a gzip header (truncated gzip upload)
        bytes(random.Random(SEED).randrange(128, 256) for _ in range(40)),  # binary, not UTF-8
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,  # nested past the recursion limit
        b"[" * 50_000 + b"]" * 50_000,
    ],
    ids=["truncated-gzip", "binary", "deeply-nested-objects", "deeply-nested-arrays"],
)
def test_an_undecodable_http_body_is_400_not_500(http_srv: SearchServer, body: bytes) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_srv.http_port}", timeout=60) as api:
        r = api.post("/v1/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "INVALID_ARGUMENT" and "not a JSON document" in r.json()["message"]
