"""HTTP/JSON vs gRPC on the same server: what the HTTP API costs per search request.

One run, one in-process server (``create_server`` with ``http_port``), one index, one
set of queries. Each query is searched, one request at a time, three ways, in
alternating order so that drift in the machine's load hits all three alike:

* **floor**: the server's own model scheduler called in-process
  (``server.batcher.search``: validation aside, what both transports end in);
* **gRPC**: ``Search`` through a ``grpc`` channel on loopback (raw stub, no retries);
* **HTTP**: ``POST /v1/search`` with the FASTA record as JSON through ``httpx`` on
  loopback, answered with the CLI's JSON.

Printed: p50 and p90 latency in ms of each, the ratios HTTP/gRPC and each transport
over the floor, the CPU (from /proc/cpuinfo) and the load average at start and end.
The client runs in the server's process (one GIL for both sides, for both transports).

Model: whatever the index was built with; the figures in docs/http-api.md use a seeded
random-weight ``esm2_t6_8M_UR50D`` (speed is real, rankings are not).

Usage::

    python benchmarks/http_vs_grpc.py --index INDEX_DIR [--n-queries 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "seqdb"
YEAST = DATA / "UP000002311_559292_yeast.fasta.gz"


def _cpu() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, required=True, help="an index directory (esmsearch index build)")
    p.add_argument("--n-queries", type=int, default=16, help="yeast proteins of at most --max-len residues")
    p.add_argument("--max-len", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5, help="passes over the queries (each pass: all three ways)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    import grpc
    import httpx

    from esmsearch.sequences import SequenceRecord, read_fasta
    from esmsearch.server import BatchingConfig, ServerConfig, create_server
    from esmsearch.v1 import search_pb2, search_pb2_grpc

    pool = [r for r in read_fasta(YEAST) if len(r.sequence) <= args.max_len]
    queries = random.Random(args.seed).sample(pool, args.n_queries)
    print(f"CPU: {_cpu()}, {os.cpu_count()} cores; load average at start {_loadavg()}")
    print(
        f"index {args.index}; {len(queries)} yeast queries <= {args.max_len} residues, k={args.k}, {args.rounds} rounds"
    )
    srv, port = create_server(
        ServerConfig(
            index=args.index, port=0, http_port=0, device="cpu", batching=BatchingConfig(enabled=False), grace_s=1.0
        )
    )
    times: dict[str, list[float]] = {"floor": [], "gRPC": [], "HTTP": []}
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=300) as http,
        ):
            stub = search_pb2_grpc.HomologSearchStub(channel)

            def floor(rec: SequenceRecord) -> None:
                srv.batcher.search([rec.sequence], args.k)

            def via_grpc(rec: SequenceRecord) -> None:
                query = search_pb2.Query(query_id=rec.record_id, sequence=rec.sequence)
                response = stub.Search(search_pb2.SearchRequest(queries=[query], k=args.k), timeout=300)
                assert len(response.results[0].hits) == args.k

            def via_http(rec: SequenceRecord) -> None:
                fasta = f">{rec.record_id}\n{rec.sequence}\n"
                response = http.post("/v1/search", json={"fasta": fasta, "k": args.k})
                assert response.status_code == 200 and len(response.json()[0]["hits"]) == args.k

            ways: list[tuple[str, Callable[[SequenceRecord], None]]] = [
                ("floor", floor),
                ("gRPC", via_grpc),
                ("HTTP", via_http),
            ]
            for _name, way in ways:  # warm-up, not timed
                way(queries[0])
            for r in range(args.rounds):
                for i, rec in enumerate(queries):
                    shift = (r * len(queries) + i) % 3
                    for name, way in ways[shift:] + ways[:shift]:
                        t0 = time.perf_counter()
                        way(rec)
                        times[name].append(time.perf_counter() - t0)
    finally:
        srv.stop(1.0)
    print(f"load average at end {_loadavg()}")
    print(f"{'way':<6} {'requests':>8} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for name, values in times.items():
        mean = statistics.fmean(values) * 1e3
        print(f"{name:<6} {len(values):>8} {_pct(values, 50):>8.1f} {_pct(values, 90):>8.1f} {mean:>8.1f}")
    p50 = {name: _pct(values, 50) for name, values in times.items()}
    print(
        f"p50 ratios: HTTP/gRPC {p50['HTTP'] / p50['gRPC']:.3f}x, gRPC/floor {p50['gRPC'] / p50['floor']:.3f}x, "
        f"HTTP/floor {p50['HTTP'] / p50['floor']:.3f}x; p50 HTTP - gRPC = {p50['HTTP'] - p50['gRPC']:+.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
