"""Hostile input, tried and counted (issue 19, part 6).

Starts real servers (``esmsearch serve INDEX --port 0 --http-port 0 --device cpu`` on
loopback, as subprocesses) over an index of the 40 E. coli proteins in
``tests/data/ecoli_40.fasta``, built through the CLI with a seeded random 2-layer ESM-2
(dim 32: the model is not what is measured) and 40 decoys (E-values on). A second
server with ``--token-file`` takes the invalid-token probes.

Then, from ``--threads`` client threads, sends at least 2,000 generated bad requests
(every generator seeded) over gRPC and HTTP, in a seeded random order:

* gRPC, raw bytes on a raw channel (no serializer): random bytes, truncated and
  bit-flipped requests, over-long varints and lengths, invalid UTF-8 in string fields;
  to ``Search``, ``SearchByEmbedding`` and ``Embed``: INVALID_ARGUMENT, whether the
  local protobuf library decodes the bytes or not (for an undecodable message grpcio's
  own answer would be INTERNAL, "Exception deserializing request!", and it would keep
  the call's state forever: ``esmsearch.server.decoding``).
* gRPC, well-formed but bad (the generated stub): k zero, negative, huge, queries x k
  over ``max_hits_per_request``; NaN / inf / out-of-range min_score, max_evalue,
  evalue_db_size; embeddings with NaN, inf, the wrong dimension, zero vectors, too many;
  empty, 1.5 M-residue and 10 MB sequences, invalid residues; empty, duplicate and
  hostile query ids (tabs, newlines, 300 characters, control characters); a 10 MB
  request compressed with gzip to ~10 kB (a gzip bomb; gRPC decompresses requests);
  requests with an already expired deadline (timeout 1 ms); invalid bearer tokens.
* HTTP (``POST /v1/search``): malformed JSON, wrong JSON types, the same bad values as
  gRPC, NaN/Infinity literals, 10 MB bodies (raw socket: headers and the first 64 kB),
  hostile FASTA text, gzip bodies (``Content-Encoding: gzip``: the API does not decode
  request bodies, so a truncated gzip or a gzip bomb is just a body that is not JSON),
  slow-loris bodies (raw sockets that send a ``Content-Length`` and then the body a few
  bytes at a time over a few seconds, some never finishing), invalid tokens, timeout_s
  1 ms, wrong paths, methods and query parameters.

Meanwhile ``--valid-clients`` threads send valid searches (``SearchClient``, real E. coli
sequences, k = 10) all the time, and a prober thread asks the gRPC health service
(``Check``) every 100 ms. Expected answers: gRPC INVALID_ARGUMENT / RESOURCE_EXHAUSTED /
UNAUTHENTICATED / DEADLINE_EXCEEDED, never INTERNAL; HTTP 4xx
(504 for an expired ``timeout_s``, the API's documented answer), 429/503 only as "busy"
(counted apart), never 500. Printed: a table per category (tried, expected, busy,
unexpected), every unexpected answer, valid requests failed (target 0), the server's RSS
(``VmRSS``) before and after, the health checks (target: all SERVING), the error lines
of the server's log, and the CPU.

The whole set is sent ``--rounds`` times (default 2, reshuffled), with the RSS read
after each round: growth in every round would be a leak, growth in the first only the
allocator's high-water mark. Bounded: the bad requests stop after ``--budget-s`` seconds
(default 120) even if not all were sent; the whole run takes about a minute on 2 cores.
Loopback only.

Usage::

    python benchmarks/hostile_inputs.py [--seed 19] [--threads 4] [--valid-clients 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from _machine import cpu_model, proc_status_kib
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmsearch.v1 import search_pb2, search_pb2_grpc

HERE = Path(__file__).resolve().parent
FASTA = HERE.parent / "tests" / "data" / "ecoli_40.fasta"
SERVICE = "/esmsearch.v1.HomologSearch/"
DIM = 32  # the tiny checkpoint's embedding width
MAX_K = 1000  # the server's default max_k
TOKEN = "hostile-bench-token-0123456789"
TEN_MB = 10 * 1024 * 1024

# Expected outcomes, as labels: gRPC status names, HTTP status numbers as text.
G_INVALID = frozenset({"INVALID_ARGUMENT"})
G_EXHAUSTED = frozenset({"RESOURCE_EXHAUSTED"})
G_BAD = G_INVALID | G_EXHAUSTED
G_UNAUTH = frozenset({"UNAUTHENTICATED"})
G_DEADLINE = frozenset({"DEADLINE_EXCEEDED"})
G_UNDECODABLE = G_INVALID  # see esmsearch.server.decoding
H_400 = frozenset({"400"})
H_413 = frozenset({"413"})
H_401 = frozenset({"401"})
H_4XX = frozenset(str(s) for s in range(400, 500) if s != 429)
#: Answers a loaded server may give any request ("busy"): counted apart, not as failures.
BUSY = frozenset({"429", "503"})


@dataclass(frozen=True)
class Target:
    """Where the probes go: both servers' addresses and the channels to them."""

    grpc_address: str
    http_url: str
    token_grpc_address: str
    token_http_url: str
    channel: grpc.Channel
    token_channel: grpc.Channel
    http: httpx.Client


@dataclass(frozen=True)
class Probe:
    """One bad request: its category, a short description, how to send it, what may answer.

    ``send`` returns the answer's label (gRPC status name or HTTP status as text).
    """

    category: str
    what: str
    send: Callable[[Target], str]
    expected: frozenset[str]


@dataclass
class Tally:
    tried: int = 0
    expected: int = 0
    busy: int = 0
    busy_requests: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)


# -- senders -----------------------------------------------------------------------------------


def _grpc_code(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[no-any-return]
    return "OK"


def raw_call(method: str, body: bytes, *, timeout: float = 30.0, compress: bool = False) -> Callable[[Target], str]:
    def send(t: Target) -> str:
        call = t.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        compression = grpc.Compression.Gzip if compress else None
        return _grpc_code(lambda: call(body, timeout=timeout, compression=compression))

    return send


def stub_call(method: str, request: Any, *, timeout: float = 30.0, metadata: Any = None, token_server: bool = False):  # type: ignore[no-untyped-def]
    def send(t: Target) -> str:
        stub = search_pb2_grpc.HomologSearchStub(t.token_channel if token_server else t.channel)
        return _grpc_code(lambda: getattr(stub, method)(request, timeout=timeout, metadata=metadata))

    return send


def http_call(
    body: bytes | None,
    *,
    method: str = "POST",
    path: str = "/v1/search",
    headers: dict[str, str] | None = None,
    token_server: bool = False,
) -> Callable[[Target], str]:
    def send(t: Target) -> str:
        url = (t.token_http_url if token_server else t.http_url) + path
        hdrs = {"content-type": "application/json", **(headers or {})}
        try:
            r = t.http.request(method, url, content=body, headers=hdrs, timeout=60)
        except httpx.HTTPError as exc:
            return f"client error {type(exc).__name__}"
        return str(r.status_code)

    return send


def http_json(obj: Any, **kw: Any) -> Callable[[Target], str]:
    return http_call(json.dumps(obj, allow_nan=True).encode(), **kw)


def _read_status(sock: socket.socket, timeout_s: float) -> str:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, OSError):
        pass
    if not data:
        return "closed"
    parts = data.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) > 1 else "garbled"


def raw_http(head_length: int, first: bytes, *, path: str = "/v1/search") -> Callable[[Target], str]:
    """Headers announcing ``head_length`` body bytes, then only ``first`` of them; the status line."""

    def send(t: Target) -> str:
        host, port = t.http_url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {head_length}\r\n\r\n".encode()
            )
            try:
                sock.sendall(first)
            except OSError:
                pass
            return _read_status(sock, 30)

    return send


def slow_loris(body: bytes, *, finish: bool, pace_s: float, rng_seed: int) -> Callable[[Target], str]:
    """A body sent a few bytes at a time, ``pace_s`` apart; ``finish=False`` stops halfway and closes."""

    def send(t: Target) -> str:
        rng = random.Random(rng_seed)
        host, port = t.http_url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                f"POST /v1/search HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            end = len(body) if finish else len(body) // 2
            pos = 0
            while pos < end:
                step = rng.randint(1, 8)
                sock.sendall(body[pos : min(end, pos + step)])
                pos += step
                time.sleep(pace_s)
            if not finish:
                return "closed"  # we hang up: nothing to answer
            return _read_status(sock, 30)

    return send


# -- generators ------------------------------------------------------------------------------------


def read_fasta(path: Path) -> list[tuple[str, str]]:
    records: list[tuple[str, str]] = []
    for block in path.read_text(encoding="ascii").split(">")[1:]:
        header, _, seq = block.partition("\n")
        records.append((header.split()[0], seq.replace("\n", "")))
    return records


def hostile_ids(rng: random.Random) -> list[str]:
    """Query ids the API must refuse: empty, whitespace, control characters, over 256 characters."""
    fixed = [
        "",
        "q\tforged\trow",
        "q\nforged",
        "q\r\n",
        "x" * 300,
        "x" * 257,
        "q\x00",
        "\x1b[31mred",
        "q 1",
        "\u200bq",
        "q\u2028",
        "\x7f",
        " ",
        "é" * 600,
    ]
    control = [
        "q" + "".join(chr(rng.choice([*range(0, 32), 127])) for _ in range(rng.randint(1, 5))) for _ in range(10)
    ]
    return fixed + control


BAD_RESIDUES = "0123456789-. \t\n\r!@#$%^&()[]{}<>?/\\|\x00\x7f\u00e9\u03bc\u200b\ufeff*"


def bad_sequences(rng: random.Random, db: list[tuple[str, str]], n: int, chars: str = BAD_RESIDUES) -> list[str]:
    """Real sequences with 1-3 characters outside the alphabet inserted (a '*' only inside)."""
    out = []
    for _ in range(n):
        seq = list(rng.choice(db)[1])
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(0, len(seq) - 1)  # never last: a trailing '*' is allowed
            seq.insert(pos, rng.choice(chars))
        out.append("".join(seq))
    return out


def _decodable(message_type: Any, body: bytes) -> bool:
    try:
        message_type.FromString(body)
    except DecodeError:
        return False
    return True


def grpc_malformed(rng: random.Random, db: list[tuple[str, str]], n: int) -> Iterator[Probe]:
    methods = [
        ("Search", search_pb2.SearchRequest),
        ("SearchByEmbedding", search_pb2.SearchByEmbeddingRequest),
        ("Embed", search_pb2.EmbedRequest),
    ]
    valid = search_pb2.SearchRequest(
        queries=[search_pb2.Query(query_id=i, sequence=s) for i, s in db[:3]], k=5
    ).SerializeToString()
    fixed = [
        b"\x10" + b"\xff" * 11,  # k: a varint over 10 bytes
        b"\x0a\xff\xff\xff\xff\x0f",  # queries: length 4 GiB, no bytes
        b"\x0a\x05\x0a\x03\xff\xfe\xfd",  # query_id: invalid UTF-8
        b"\x0a\x06\x12\x04\xc3\x28AA",  # sequence: invalid UTF-8
        b"\x0b",  # start group, never ended
        b"\x0f",  # wire type 7 (invalid)
        b"\x00",  # field number 0
        b"\x0a\x02\x0a",  # nested length past its end
        b"\x1d\x00\x00",  # fixed32 min_score cut short
        b"\x12\x03abc",  # k sent as length-delimited
    ]
    for i in range(n):
        method, mtype = methods[i % len(methods)]
        kind = i % 4
        if i < len(fixed):
            body, what = fixed[i], f"fixed malformed #{i}"
        elif kind == 0:
            body, what = rng.randbytes(rng.randint(1, 200)), "random bytes"
        elif kind == 1:
            cut = rng.randint(1, len(valid) - 1)
            body, what = valid[:cut], f"valid request truncated at {cut}/{len(valid)}"
        elif kind == 2:
            b = bytearray(valid)
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            body, what = bytes(b), "valid request with flipped bytes"
        else:
            body = valid + rng.randbytes(rng.randint(1, 20))
            what = "valid request + random trailing bytes"
        # A mutation that still decodes may even be a valid request: OK is allowed only then.
        expected = G_BAD | frozenset({"OK"}) if _decodable(mtype, body) else G_UNDECODABLE
        yield Probe("grpc malformed protobuf", f"{method}: {what}: {body[:24]!r}", raw_call(method, body), expected)


def _q(qid: str, seq: str) -> search_pb2.Query:
    return search_pb2.Query(query_id=qid, sequence=seq)


def grpc_values(rng: random.Random, db: list[tuple[str, str]]) -> Iterator[Probe]:
    one = [_q(*db[0])]
    for k in (0, -1, -1000, -(2**31), MAX_K + 1, 2**31 - 1, 10**6):
        yield Probe(
            "grpc k zero/negative/huge",
            f"Search k={k}",
            stub_call("Search", search_pb2.SearchRequest(queries=one, k=k)),
            G_INVALID,
        )
        emb = search_pb2.Embedding(query_id="e", values=[1.0] * DIM)
        yield Probe(
            "grpc k zero/negative/huge",
            f"SearchByEmbedding k={k}",
            stub_call("SearchByEmbedding", search_pb2.SearchByEmbeddingRequest(embeddings=[emb], k=k)),
            G_INVALID,
        )
    many = [_q(f"m{i}", "MKV") for i in range(200)]
    yield Probe(
        "grpc k zero/negative/huge",
        "200 queries x k=1000 (> max_hits)",
        stub_call("Search", search_pb2.SearchRequest(queries=many, k=1000)),
        G_BAD,
    )
    nan, inf = float("nan"), float("inf")
    for ms in (nan, inf, -inf, 1.5, -1.01, 1e30):
        yield Probe(
            "grpc NaN/inf/range",
            f"min_score={ms}",
            stub_call("Search", search_pb2.SearchRequest(queries=one, k=5, min_score=ms)),
            G_INVALID,
        )
    for me in (nan, -1.0, -inf, -1e-300):
        yield Probe(
            "grpc NaN/inf/range",
            f"max_evalue={me}",
            stub_call("Search", search_pb2.SearchRequest(queries=one, k=5, max_evalue=me)),
            G_INVALID,
        )
    for n in (-1, -(2**63)):
        yield Probe(
            "grpc NaN/inf/range",
            f"evalue_db_size={n}",
            stub_call("Search", search_pb2.SearchRequest(queries=one, k=5, evalue_db_size=n)),
            G_INVALID,
        )
    # Embeddings: NaN / inf at random places, wrong dimensions, zero vectors, too many.
    for i in range(60):
        values = [rng.uniform(-1, 1) for _ in range(DIM)]
        bad = rng.choice([nan, inf, -inf])
        values[rng.randrange(DIM)] = bad
        yield Probe(
            "grpc embedding NaN/inf/dim",
            f"SearchByEmbedding value {bad}",
            stub_call(
                "SearchByEmbedding",
                search_pb2.SearchByEmbeddingRequest(
                    embeddings=[search_pb2.Embedding(query_id=f"e{i}", values=values)], k=5
                ),
            ),
            G_INVALID,
        )
    for d in (0, 1, DIM - 1, DIM + 1, 320, 1280, 5000):
        yield Probe(
            "grpc embedding NaN/inf/dim",
            f"SearchByEmbedding dim {d}",
            stub_call(
                "SearchByEmbedding",
                search_pb2.SearchByEmbeddingRequest(
                    embeddings=[search_pb2.Embedding(query_id="e", values=[0.1] * d)], k=5
                ),
            ),
            G_INVALID,
        )
    yield Probe(
        "grpc embedding NaN/inf/dim",
        "zero vector",
        stub_call(
            "SearchByEmbedding",
            search_pb2.SearchByEmbeddingRequest(
                embeddings=[search_pb2.Embedding(query_id="e", values=[0.0] * DIM)], k=5
            ),
        ),
        G_INVALID,
    )
    yield Probe(
        "grpc embedding NaN/inf/dim",
        "no embeddings",
        stub_call("SearchByEmbedding", search_pb2.SearchByEmbeddingRequest(k=5)),
        G_INVALID,
    )
    lots = [search_pb2.Embedding(query_id=f"e{i}", values=[0.1] * DIM) for i in range(2000)]
    yield Probe(
        "grpc embedding NaN/inf/dim",
        "2000 embeddings",
        stub_call("SearchByEmbedding", search_pb2.SearchByEmbeddingRequest(embeddings=lots, k=1)),
        G_BAD,
    )
    # Sequences: empty, huge, invalid residues; Search and Embed alike.
    for seq, what, exp in (
        ("", "empty", G_INVALID),
        ("*", "only a stop", G_INVALID),
        ("**", "two stops", G_INVALID),
        ("A" * 1_500_000, "1.5 M residues", G_EXHAUSTED),
        ("A" * TEN_MB, "10 MB", G_EXHAUSTED),
    ):
        for method, req in (
            ("Search", search_pb2.SearchRequest(queries=[_q("q", seq)], k=5)),
            ("Embed", search_pb2.EmbedRequest(queries=[_q("q", seq)])),
        ):
            yield Probe("grpc empty/10 MB sequence", f"{method} {what}", stub_call(method, req, timeout=60), exp)
    yield Probe(
        "grpc empty/10 MB sequence", "Search no queries", stub_call("Search", search_pb2.SearchRequest(k=5)), G_INVALID
    )
    for i, seq in enumerate(bad_sequences(rng, db, 200)):
        method = "Search" if i % 2 else "Embed"
        req = (
            search_pb2.SearchRequest(queries=[_q("q", seq)], k=5)
            if i % 2
            else search_pb2.EmbedRequest(queries=[_q("q", seq)])
        )
        yield Probe("grpc invalid residues", f"{method} {seq[:30]!r}...", stub_call(method, req), G_INVALID)
    # Ids: hostile ids (alone and among valid queries), duplicates.
    ids = hostile_ids(rng)
    for rep in range(4):
        for qid in ids:
            queries = [_q(f"ok{j}", db[j][1]) for j in range(rep)] + [_q(qid, db[5][1])]
            rng.shuffle(queries)
            method = ("Search", "Embed")[rep % 2]
            req = (
                search_pb2.SearchRequest(queries=queries, k=5)
                if method == "Search"
                else search_pb2.EmbedRequest(queries=queries)
            )
            yield Probe("grpc hostile/duplicate ids", f"{method} id {qid[:40]!r}", stub_call(method, req), G_INVALID)
            emb = search_pb2.Embedding(query_id=qid, values=[0.1] * DIM)
            yield Probe(
                "grpc hostile/duplicate ids",
                f"SearchByEmbedding id {qid[:40]!r}",
                stub_call("SearchByEmbedding", search_pb2.SearchByEmbeddingRequest(embeddings=[emb], k=5)),
                G_INVALID,
            )
    for n in (2, 3, 10):
        dup = [_q("same", db[j][1]) for j in range(n)]
        yield Probe(
            "grpc hostile/duplicate ids",
            f"{n} duplicate ids",
            stub_call("Search", search_pb2.SearchRequest(queries=dup, k=5)),
            G_INVALID,
        )
    # gzip bombs: a 10 MB (and a 3 MB, under the size limit) request compressed to kilobytes.
    for size in (TEN_MB, 3 * 1024 * 1024, 64 * 1024 * 1024):
        body = search_pb2.SearchRequest(queries=[_q("bomb", "A" * size)], k=5).SerializeToString()
        for _ in range(3):
            yield Probe(
                "grpc gzip bomb",
                f"Search {size >> 20} MB gzip-compressed",
                raw_call("Search", body, compress=True, timeout=60),
                G_EXHAUSTED,
            )
    # Already expired deadlines on valid requests.
    for i in range(60):
        qid, seq = db[i % len(db)]
        method = ("Search", "Embed", "SearchByEmbedding")[i % 3]
        if method == "Search":
            req: Any = search_pb2.SearchRequest(queries=[_q(qid, seq)], k=5)
        elif method == "Embed":
            req = search_pb2.EmbedRequest(queries=[_q(qid, seq)])
        else:
            req = search_pb2.SearchByEmbeddingRequest(
                embeddings=[search_pb2.Embedding(query_id=qid, values=[0.1] * DIM)], k=5
            )
        # SearchByEmbedding (no model) may be answered within the 1 ms: OK allowed there only.
        expected = G_DEADLINE | frozenset({"OK"}) if method == "SearchByEmbedding" else G_DEADLINE
        yield Probe("grpc expired deadline", f"{method} timeout 1 ms", stub_call(method, req, timeout=0.001), expected)
    # Tokens (the token server).
    valid = search_pb2.SearchRequest(queries=one, k=5)
    bad_auth: list[Any] = [
        None,
        (("authorization", "Bearer wrong"),),
        (("authorization", "Bearer " + TOKEN[:-1]),),
        (("authorization", "Bearer " + TOKEN + "x"),),
        (("authorization", "bearer"),),
        (("authorization", "Basic " + TOKEN),),
        (("authorization", TOKEN),),
        (("authorization", "Bearer  " + TOKEN[::-1]),),
        (("authorization", "Bearer " + "A" * 8000),),
        (("authorization", "Bearer wrong"), ("authorization", "Bearer " + TOKEN)),
        (("x-token", TOKEN),),
    ]
    for rep in range(6):
        for md in bad_auth:
            method = ("Search", "GetIndexInfo", "Embed")[rep % 3]
            req = {
                "Search": valid,
                "GetIndexInfo": search_pb2.GetIndexInfoRequest(),
                "Embed": search_pb2.EmbedRequest(queries=one),
            }[method]
            label = "none" if md is None else str([v[:20] for _, v in md])
            # Metadata over gRPC's soft limit (grpc.max_metadata_size, 8 KiB) is refused by gRPC
            # itself with RESOURCE_EXHAUSTED at random, up to the hard limit: allowed for that one.
            oversized = md is not None and sum(len(k) + len(v) for k, v in md) > 8000
            yield Probe(
                "grpc invalid token",
                f"{method} authorization {label}",
                stub_call(method, req, metadata=md, token_server=True),
                G_UNAUTH | G_EXHAUSTED if oversized else G_UNAUTH,
            )


def http_probes(rng: random.Random, db: list[tuple[str, str]]) -> Iterator[Probe]:
    good = {"queries": [{"id": db[0][0], "sequence": db[0][1]}], "k": 5}
    good_bytes = json.dumps(good).encode()
    # Malformed bodies.
    for i in range(150):
        kind = i % 5
        if kind == 0:
            body, what = rng.randbytes(rng.randint(0, 300)), "random bytes"
        elif kind == 1:
            cut = rng.randint(0, len(good_bytes) - 1)
            body, what = good_bytes[:cut], f"JSON truncated at {cut}"
        elif kind == 2:
            b = bytearray(good_bytes)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.choice(b'{}[]",:\x00\xff')
            body, what = bytes(b), "JSON with flipped bytes"
        elif kind == 3:
            body = rng.choice([b"[]", b"null", b"1", b'"text"', b"true", b"{}", b'{"queries": null}', b"[" * 100_000])
            what = "JSON that is not a search"
        else:
            body, what = good_bytes + rng.randbytes(rng.randint(1, 10)), "JSON + trailing bytes"
        # A flipped byte may leave valid JSON and a valid search: 200 allowed only then.
        exp = H_400 | frozenset({"200"}) if kind == 2 else H_400
        yield Probe("http malformed JSON", f"{what}: {body[:24]!r}", http_call(body), exp)
    yield Probe(
        "http malformed JSON", "deeply nested arrays (100,000 '[')", http_call(b"[" * 100_000 + b"]" * 100_000), H_400
    )
    yield Probe(
        "http malformed JSON", "deeply nested objects", http_call(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), H_400
    )
    yield Probe(
        "http malformed JSON", "text/plain body", http_call(good_bytes, headers={"content-type": "text/plain"}), H_400
    )
    yield Probe("http malformed JSON", "no body", http_call(None), H_400)
    # Wrong JSON types.
    q = good["queries"]
    wrong: list[dict[str, Any]] = [
        {"queries": q, "k": "ten"},
        {"queries": q, "k": 1.5},
        {"queries": q, "k": []},
        {"queries": q, "k": {}},
        {"queries": q, "k": None},
        {"queries": "MKV"},
        {"queries": [1, 2]},
        {"queries": [{"id": 1, "sequence": "MKV"}]},
        {"queries": [{"id": "a", "sequence": 5}]},
        {"queries": [{"id": "a", "sequence": None}]},
        {"queries": [{"id": "a"}]},
        {"queries": [{"sequence": "MKV"}]},
        {"queries": [{"id": "a", "sequence": "MKV", "extra": 1}]},
        {"queries": q, "unknown": True},
        {"queries": q, "min_score": "high"},
        {"queries": q, "max_evalue": [1]},
        {"queries": q, "evalue_db_size": 1.0},
        {"queries": q, "evalue_db_size": "5"},
        {"queries": q, "timeout_s": "fast"},
        {"fasta": 5},
        {"fasta": ["MKV"]},
        {"queries": q, "fasta": ">a\nMKV\n"},
        {},
        {"k": 5},
        {"queries": []},
    ]
    for _rep in range(4):
        for obj in wrong:
            yield Probe("http wrong JSON types", json.dumps(obj)[:60], http_json(obj), H_400 | H_413)
    # k and floats.
    for k in (0, -1, -(2**63), MAX_K + 1, 2**31, 10**30):
        yield Probe("http k zero/negative/huge", f"k={k}", http_json({**good, "k": k}), H_400)
    many = [{"id": f"m{i}", "sequence": "MKV"} for i in range(200)]
    yield Probe(
        "http k zero/negative/huge", "200 queries x k=1000", http_json({"queries": many, "k": 1000}), H_400 | H_413
    )
    floats = [
        ("min_score", "NaN"),
        ("min_score", "Infinity"),
        ("min_score", "-Infinity"),
        ("min_score", "1e400"),
        ("min_score", "1.5"),
        ("max_evalue", "NaN"),
        ("max_evalue", "-1"),
        ("max_evalue", "-Infinity"),
        ("timeout_s", "0"),
        ("timeout_s", "-1"),
        ("timeout_s", "NaN"),
        ("timeout_s", "Infinity"),
        ("evalue_db_size", "-5"),
        ("evalue_db_size", "0"),
        ("k", "NaN"),
        ("k", "Infinity"),
    ]
    for _rep in range(3):
        for key, literal in floats:
            body = good_bytes[:-1] + f', "{key}": {literal}}}'.encode()
            yield Probe("http NaN/inf/range", f"{key}={literal}", http_call(body), H_400)
    # Sequences.
    for seq, what, exp in (
        ("", "empty", H_400),
        ("*", "only a stop", H_400),
        ("A" * 1_500_000, "1.5 M residues", H_413),
    ):
        yield Probe(
            "http empty/10 MB sequence", what, http_json({"queries": [{"id": "q", "sequence": seq}], "k": 5}), exp
        )
    for what, fasta in (("empty fasta", ""), ("blank fasta", "  \n "), ("header only", ">q\n"), ("no id", ">\nMKV\n")):
        yield Probe("http empty/10 MB sequence", what, http_json({"fasta": fasta, "k": 5}), H_400)
    for _ in range(5):
        yield Probe(
            "http empty/10 MB sequence",
            "10 MB body (Content-Length, 64 kB sent)",
            raw_http(TEN_MB, b'{"queries":[{"id":"q","sequence":"' + b"A" * 65536),
            H_413,
        )
        yield Probe("http empty/10 MB sequence", "1 GB Content-Length", raw_http(1 << 30, b"{"), H_413)
    # In FASTA text whitespace inside a sequence is a line break or ignored: not inserted there.
    no_space = "".join(c for c in BAD_RESIDUES if not c.isspace())
    for i in range(200):
        if i % 2:
            seq = bad_sequences(rng, db, 1)[0]
            obj: dict[str, Any] = {"queries": [{"id": "q", "sequence": seq}], "k": 5}
        else:
            seq = bad_sequences(rng, db, 1, no_space)[0]
            obj = {"fasta": f">q\n{seq}\n", "k": 5}
        yield Probe("http invalid residues", f"{seq[:30]!r}...", http_json(obj), H_400)
    # Ids.
    ids = hostile_ids(rng)
    for rep in range(3):
        for qid in ids:
            queries = [{"id": f"ok{j}", "sequence": db[j][1]} for j in range(rep)] + [{"id": qid, "sequence": db[5][1]}]
            rng.shuffle(queries)
            yield Probe(
                "http hostile/duplicate ids",
                f"id {qid[:40]!r} (?format=tsv)",
                http_json({"queries": queries, "k": 5}, path="/v1/search?format=tsv"),
                H_400,
            )
        for qid in ids:
            if qid and not any(c.isspace() for c in qid):  # else FASTA's first word may be a valid id
                yield Probe(
                    "http hostile/duplicate ids",
                    f"fasta id {qid[:40]!r}",
                    http_json({"fasta": f">{qid}\nMKVL\n", "k": 5}),
                    H_400,
                )
    for n in (2, 5):
        dup = [{"id": "same", "sequence": db[j][1]} for j in range(n)]
        yield Probe("http hostile/duplicate ids", f"{n} duplicate ids", http_json({"queries": dup, "k": 5}), H_400)
        yield Probe(
            "http hostile/duplicate ids",
            f"{n} duplicate ids in FASTA",
            http_json({"fasta": "".join(f">same\n{db[j][1]}\n" for j in range(n)), "k": 5}),
            H_400,
        )
    # gzip bodies: not decoded by the API, so never JSON.
    gz = gzip.compress(good_bytes)
    bomb = gzip.compress(b'{"queries": [{"id": "q", "sequence": "' + b"A" * TEN_MB + b'"}], "k": 5}')
    zeros = gzip.compress(b"\0" * (64 * 1024 * 1024))
    for _i in range(30):
        cut = rng.randint(1, len(gz) - 1)
        yield Probe(
            "http gzip truncated/bomb",
            f"truncated gzip {cut}/{len(gz)}",
            http_call(gz[:cut], headers={"content-encoding": "gzip"}),
            H_400 | H_413 | frozenset({"415"}),
        )
    for body, what in (
        (gz, "whole gzip of a valid search"),
        (bomb, "10 MB gzip bomb"),
        (zeros, "64 MB of zeros gzip bomb"),
    ):
        for _ in range(5):
            yield Probe(
                "http gzip truncated/bomb",
                f"{what} ({len(body)} bytes)",
                http_call(body, headers={"content-encoding": "gzip"}),
                H_400 | H_413 | frozenset({"415"}),
            )
    # Expired deadlines.
    for i in range(40):
        qid, seq = db[i % len(db)]
        yield Probe(
            "http expired deadline",
            "timeout_s 0.001",
            http_json({"queries": [{"id": qid, "sequence": seq}], "k": 5, "timeout_s": 0.001}),
            frozenset({"504"}),
        )
    # Tokens (the token server).
    bad_auth: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Bearer " + TOKEN[:-1]},
        {"authorization": "bearer"},
        {"authorization": "Basic " + TOKEN},
        {"authorization": TOKEN},
        {"authorization": "Bearer " + "A" * 8000},
        {"x-token": TOKEN},
    ]
    for rep in range(5):
        for hdrs in bad_auth:
            method, path, body = ("POST", "/v1/search", good_bytes) if rep % 2 else ("GET", "/v1/index", None)
            label = str({k: v[:20] for k, v in hdrs.items()})
            yield Probe(
                "http invalid token",
                f"{method} {path} {label}",
                http_call(body, method=method, path=path, headers=hdrs, token_server=True),
                H_401,
            )
    # Paths, methods, parameters.
    misc = [
        ("GET", "/v1/search", None),
        ("PUT", "/v1/search", good_bytes),
        ("DELETE", "/v1/index", None),
        ("POST", "/v1/../etc/passwd", good_bytes),
        ("POST", "/v1/search?format=xml", good_bytes),
        ("POST", "/v1/search?pretty=maybe", good_bytes),
        ("GET", "/v2/search", None),
        ("POST", "/v1/search/" + "a" * 5000, good_bytes),
    ]
    for _rep in range(3):
        for method, path, body in misc:
            yield Probe(
                "http paths/methods/params", f"{method} {path[:50]}", http_call(body, method=method, path=path), H_4XX
            )


def slow_probes(n: int, pace_s: float, good: bytes) -> Iterator[Probe]:
    for i in range(n):
        finish = i % 2 == 0
        body = good[:-1] + b", k: oops}" if finish else good
        what = f"slow body {len(body)} bytes, {'finished (bad JSON)' if finish else 'abandoned halfway'}"
        yield Probe(
            "http slow-loris body",
            what,
            slow_loris(body, finish=finish, pace_s=pace_s, rng_seed=i),
            H_400 if finish else frozenset({"closed"}),
        )


# -- the run -------------------------------------------------------------------------------------------


#: ``--tracemalloc``: the server runs under this wrapper, which traces Python allocations
#: (10 frames) and writes a snapshot to $ESMSEARCH_BENCH_SNAPSHOT.<n> at each SIGUSR2.
TRACED_SERVER = """
import os, signal, sys, tracemalloc
tracemalloc.start(10)
count = [0]
def dump(_signum, _frame):
    count[0] += 1
    path = f"{os.environ['ESMSEARCH_BENCH_SNAPSHOT']}.{count[0]}"
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR2, dump)
from esmsearch.cli import main
sys.argv[0] = "esmsearch"
sys.exit(main())
"""


def start_server(
    index: Path, log: Path, extra: list[str], snapshot: Path | None = None
) -> tuple[subprocess.Popen[str], str, str]:
    launcher = ["-c", TRACED_SERVER] if snapshot is not None else ["-m", "esmsearch.cli"]
    env = dict(os.environ, ESMSEARCH_BENCH_SNAPSHOT=str(snapshot)) if snapshot is not None else None
    cmd = [
        sys.executable,
        *launcher,
        "serve",
        str(index),
        "--port",
        "0",
        "--http-port",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
    logf = log.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, env=env)
    logf.close()
    assert proc.stdout is not None
    grpc_line = proc.stdout.readline()
    http_line = proc.stdout.readline()
    if " on " not in grpc_line or "http://" not in http_line:
        proc.kill()
        raise RuntimeError(f"server did not start: {grpc_line!r} {http_line!r}; see {log}")
    address = grpc_line.rsplit(" on ", 1)[1].strip()
    url = "http://" + http_line.rsplit("http://", 1)[1].strip().rstrip("/")
    return proc, address, url


def stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def build_index(work: Path) -> Path:
    index = work / "index"
    if (index / "manifest.json").is_file():
        return index
    py = sys.executable
    subprocess.run(
        [
            py,
            "-m",
            "esmsearch.checkpoints",
            "esm2_t6_8M_UR50D",
            "--layers",
            "2",
            "--embed-dim",
            str(DIM),
            "--heads",
            "4",
            "--name",
            "esm2_tiny_bench",
            "-o",
            str(work),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            py,
            "-m",
            "esmsearch.cli",
            "index",
            "build",
            str(FASTA),
            "-o",
            str(index),
            "--model",
            str(work / "esm2_tiny_bench.pt"),
            "--device",
            "cpu",
            "--decoys",
            "40",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return index


def take_snapshot(proc: subprocess.Popen[str], path: Path) -> Any:
    """Ask a ``--tracemalloc`` server for a snapshot (SIGUSR2) and load it once written."""
    import tracemalloc

    proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 120
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def snapshot_growth(first: Any, last: Any, top: int = 12) -> list[str]:
    """The allocation sites whose traced Python memory grew most between two snapshots."""
    diff = last.compare_to(first, "traceback")
    total = sum(d.size_diff for d in diff)
    lines = [
        f"traced Python memory: {sum(s.size for s in first.statistics('filename')) / 2**20:.1f} MiB after round 1, "
        f"{sum(s.size for s in last.statistics('filename')) / 2**20:.1f} MiB at the end ({total / 2**20:+.2f} MiB)",
        f"largest growth by allocation site (top {top}):",
    ]
    for d in diff[:top]:
        frame = d.traceback[-1] if len(d.traceback) else None
        where = f"{frame.filename}:{frame.lineno}" if frame else "?"
        lines.append(f"  {d.size_diff / 1024:+10.1f} KiB  {d.count_diff:+7d} blocks  {where}")
        for fr in list(d.traceback)[-4:-1][::-1]:
            lines.append(f"        from {fr.filename}:{fr.lineno}")
    return lines


def rss_mib(pid: int) -> tuple[float, float]:
    """``(VmRSS, RssAnon)`` of ``pid`` in MiB: resident in all, and its private (heap) part."""
    status = proc_status_kib(pid, ("VmRSS", "RssAnon"))
    return status["VmRSS"] / 1024, status["RssAnon"] / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--threads", type=int, default=4, help="threads sending bad requests")
    parser.add_argument("--valid-clients", type=int, default=8)
    parser.add_argument("--malformed", type=int, default=600, help="raw malformed protobuf requests")
    parser.add_argument("--slow", type=int, default=16, help="slow-loris connections")
    parser.add_argument(
        "--only", default="", help="send only the categories whose name starts with this (e.g. grpc, http)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="times the whole set of bad requests is sent")
    parser.add_argument("--budget-s", type=float, default=120.0, help="bad requests stop after this long")
    parser.add_argument(
        "--work", type=Path, default=None, help="directory for the index and logs (default: a temporary one)"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the server's Python allocations; print which sites grew from round 1 to the end "
        "(slows the server; RSS figures then include tracemalloc's own memory)",
    )
    args = parser.parse_args(argv)

    print(
        f"# hostile_inputs: {cpu_model()}, {os.cpu_count()} cores; load average at start {os.getloadavg()}", flush=True
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="esmsearch-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    index = build_index(work)
    print(f"# index built in {time.perf_counter() - t0:.1f} s: {index}", flush=True)
    (work / "tokens").write_text(TOKEN + "\n", encoding="utf-8")
    (work / "tokens").chmod(0o600)

    db = read_fasta(FASTA)
    rng = random.Random(args.seed)
    snapshot = work / "server.tracemalloc" if args.tracemalloc else None
    proc, address, url = start_server(index, work / "server.log", [], snapshot)
    tproc, taddress, turl = start_server(index, work / "token-server.log", ["--token-file", str(work / "tokens")])
    print(f"# servers: gRPC {address}, HTTP {url}; with tokens: gRPC {taddress}, HTTP {turl}", flush=True)
    stop = threading.Event()
    try:
        from esmsearch.client import SearchClient

        with SearchClient(address, timeout_s=60) as warm:
            for qid, seq in db[:8]:
                warm.search({qid: seq}, k=10)
        rss_before = rss_mib(proc.pid)
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        token_channel = grpc.insecure_channel(taddress)
        http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32))
        target = Target(address, url, taddress, turl, channel, token_channel, http)

        valid = Counter[bool]()
        valid_failures: list[str] = []
        health = Counter[str]()
        lock = threading.Lock()

        def valid_client(i: int) -> None:
            crng = random.Random(args.seed * 1000 + i)
            with SearchClient(address, timeout_s=60) as c:
                while not stop.is_set():
                    qid, seq = crng.choice(db)
                    try:
                        res = c.search({qid: seq}, k=10)
                        ok = len(res) == 1 and res[0].query_id == qid and len(res[0].hits) == 10
                        outcome = "ok" if ok else "wrong answer"
                    except Exception as exc:  # noqa: BLE001 - every failure is counted and printed
                        outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
                    with lock:
                        valid[outcome == "ok"] += 1
                        if outcome != "ok":
                            valid_failures.append(outcome)

        def health_prober() -> None:
            stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
            while not stop.wait(0.1):
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    state = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                except grpc.RpcError as exc:
                    state = exc.code().name
                health[state] += 1

        background = [threading.Thread(target=valid_client, args=(i,), daemon=True) for i in range(args.valid_clients)]
        background.append(threading.Thread(target=health_prober, daemon=True))
        for th in background:
            th.start()

        probes = list(grpc_malformed(rng, db, args.malformed)) + list(grpc_values(rng, db)) + list(http_probes(rng, db))
        probes = [p for p in probes if p.category.startswith(args.only)]
        rng.shuffle(probes)
        slow = list(
            slow_probes(
                args.slow, 0.25, json.dumps({"queries": [{"id": "q", "sequence": db[1][1][:40]}], "k": 5}).encode()
            )
        )
        slow = [p for p in slow if p.category.startswith(args.only)]
        tallies: dict[str, Tally] = defaultdict(Tally)
        deadline = time.monotonic() + args.budget_s
        t_start = time.perf_counter()

        def run(probe: Probe) -> None:
            if time.monotonic() > deadline:
                return
            try:
                got = probe.send(target)
            except Exception as exc:  # noqa: BLE001 - a client-side failure is an answer too
                got = f"client error {type(exc).__name__}: {str(exc)[:80]}"
            with lock:
                t = tallies[probe.category]
                t.tried += 1
                if got in probe.expected:
                    t.expected += 1
                elif got in BUSY or (got == "RESOURCE_EXHAUSTED" and "RESOURCE_EXHAUSTED" not in probe.expected):
                    t.busy += 1
                    t.busy_requests.append((probe.what, got))
                else:
                    t.unexpected.append((probe.what, got))

        rss_rounds: list[tuple[float, float]] = []
        snapshots: list[Any] = []
        for _round in range(args.rounds):  # the same requests again, in another order: growth per round = a leak
            rng.shuffle(probes)
            with (
                ThreadPoolExecutor(max_workers=args.slow) as slow_pool,
                ThreadPoolExecutor(max_workers=args.threads) as pool,
            ):
                slow_futures = [slow_pool.submit(run, p) for p in slow]
                for f in [pool.submit(run, p) for p in probes]:
                    f.result()
                for f in slow_futures:
                    f.result()
            rss_rounds.append(rss_mib(proc.pid))
            if snapshot is not None and _round == 0:
                snapshots.append(take_snapshot(proc, Path(f"{snapshot}.1")))
        bad_s = time.perf_counter() - t_start
        stop.set()
        for th in background:
            th.join(timeout=90)
        channel.close()
        token_channel.close()
        http.close()
        time.sleep(1.0)  # let the server finish what the clients abandoned before reading its RSS
        rss_after = rss_mib(proc.pid)
        if snapshot is not None:
            snapshots.append(take_snapshot(proc, Path(f"{snapshot}.2")))
        alive = proc.poll() is None and tproc.poll() is None
    finally:
        stop.set()
        stop_server(proc)
        stop_server(tproc)

    total = sum(t.tried for t in tallies.values())
    not_sent = args.rounds * (len(probes) + len(slow)) - total
    print(f"\nbad requests: {total} tried in {bad_s:.1f} s in {args.rounds} rounds ({not_sent} not sent: budget)")

    print("category\ttried\texpected status\tbusy (429/503/RESOURCE_EXHAUSTED)\tunexpected")
    for cat in sorted(tallies):
        t = tallies[cat]
        print(f"{cat}\t{t.tried}\t{t.expected}\t{t.busy}\t{len(t.unexpected)}")
    all_t = list(tallies.values())
    print(
        f"all\t{total}\t{sum(t.expected for t in all_t)}\t{sum(t.busy for t in all_t)}\t"
        f"{sum(len(t.unexpected) for t in all_t)}"
    )
    unexpected = [(cat, w, g) for cat, t in sorted(tallies.items()) for w, g in t.unexpected]
    if unexpected:
        print("\nunexpected answers, by category and answer (count; up to 3 of the requests):")
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for cat, what, got in unexpected:
            groups[cat, got].append(what)
        for (cat, got), whats in sorted(groups.items()):
            print(f"  {cat} -> {got}: {len(whats)}")
            for what in sorted(set(whats))[:3]:
                print(f"      {what}")
    busy = [(cat, w, g) for cat, t in sorted(tallies.items()) for w, g in t.busy_requests]
    if busy:
        print("\nbusy answers (category | request | answer):")
        for cat, what, got in busy[:20]:
            print(f"  {cat} | {what} | {got}")
    print(
        f"\nvalid requests ({args.valid_clients} SearchClient threads): {valid[True]} ok, "
        f"{valid[False]} failed (target 0)"
    )
    for failure in valid_failures[:10]:
        print(f"  failed: {failure}")
    print(f"health checks: {dict(health)} (target: all SERVING)")
    print(
        f"server RSS, VmRSS (RssAnon) MiB: {rss_before[0]:.0f} ({rss_before[1]:.0f}) before; after each round "
        f"{', '.join(f'{r:.0f} ({a:.0f})' for r, a in rss_rounds)}; at the end {rss_after[0]:.0f} "
        f"({rss_after[1]:.0f}), {rss_after[0] - rss_before[0]:+.0f} MiB"
    )
    print(f"servers alive at the end: {alive}")
    if len(snapshots) == 2:
        print("\n".join(snapshot_growth(*snapshots)))
    for name in ("server.log", "token-server.log"):
        lines = (work / name).read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [ln for ln in lines if "Traceback" in ln or " ERROR " in ln or "INTERNAL" in ln]
        print(f"{name}: {len(lines)} lines, {len(errors)} with Traceback/ERROR/INTERNAL")
        for ln in errors[:5]:
            print(f"  {ln[:200]}")
    print(f"# load average at end {os.getloadavg()}; work directory {work}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not unexpected and not valid[False] else 1


if __name__ == "__main__":
    sys.exit(main())
