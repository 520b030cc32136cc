"""Serving load test: gRPC search with dynamic batching on and off, bounded admission, vs the in-process floor.

One run, same machine, same checkpoint, same index, same queries:

* **floor**: the query embedded and searched in-process, no gRPC:
  ``Embedder.embed([seq])`` + ``Index.search(vec, k)``, one query at a time;
  measured before and after the server runs (both printed, to show drift from
  other load on the machine).
* **server modes** (``--modes``, default all): ``on`` (concurrent requests merged
  into one packed forward), ``off`` (each request its own forward), each with the
  default admission bounds (1,024 queries in flight: never reached by these
  clients, so as good as unbounded), and ``<mode>,admit=N`` with
  ``--max-queries-in-flight N`` (``--bounded-in-flight``, default 8): the
  comparison of OK-request latency with and without a bound on work in flight.
  Each mode is ``esmsearch.server.create_server`` in a child process on loopback
  (``max_workers`` 64), driven by 1, 8 and 32 concurrent client threads, each with
  its own channel, each sending one-query ``Search`` requests (k=10) back to back
  for ``--seconds`` per level, without client retries: a RESOURCE_EXHAUSTED answer
  is counted as "refused", anything else non-OK as an error.

Printed per level: OK requests/s, p50/p95/p99 latency in ms of OK requests, refusals
and errors, the modes side by side, the throughput ratio of each mode to ``off`` and
of 8 and 32 clients to 1 client, and p50(1 client)/p50(floor).

Model: a seeded random-weight checkpoint of the esm2_t6_8M_UR50D architecture
(:func:`esmsearch.checkpoints.write_random_checkpoint`): speed is real, retrieval
quality is meaningless. Database: the first ``--db-limit`` proteins of the E. coli
K-12 proteome (all 4,391 when 0); ``--index DIR`` reuses a built index. Queries:
``--n-queries`` yeast proteins of at most 500 residues, sampled with ``--seed``.

Usage::

    python benchmarks/serve_load.py --db-limit 500 --seconds 10
    python benchmarks/serve_load.py --index /tmp/ecoli_index --seconds 20
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _machine import cpu_model as _cpu_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "seqdb"
ECOLI = DATA / "UP000000625_83333_Ecoli_K12_2020.fasta"
YEAST = DATA / "UP000002311_559292_yeast.fasta.gz"
K = 10
PAIRED: dict[str, tuple[float, float, int]] = {}
DEVICE = ["cpu"]
#: Server modes compared: label -> (batching enabled, max queries in flight or None = default).
MODES: dict[str, tuple[bool, int | None]] = {}


@dataclass
class Level:
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_s: list[float]
    refused: int = 0

    @property
    def qps(self) -> float:
        return self.requests / self.seconds

    def pct_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(self.latencies_s, q) * 1e3)


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def sample_queries(n: int, seed: int, max_len: int = 500) -> list[str]:
    from esmsearch.sequences import read_fasta

    pool = [r.sequence for r in read_fasta(YEAST) if len(r.sequence) <= max_len]
    return random.Random(seed).sample(pool, n)


def build_or_reuse_index(args: argparse.Namespace, work: Path) -> Path:
    from esmsearch.checkpoints import write_random_checkpoint
    from esmsearch.indexer import build_index
    from esmsearch.sequences import read_fasta

    if args.index is not None and (Path(args.index) / "manifest.json").exists():
        return Path(args.index)
    ckpt_dir = work / "ckpt" if args.index is None else Path(args.index).with_name(Path(args.index).name + ".ckpt")
    ckpt = write_random_checkpoint(args.arch, ckpt_dir, seed=0)
    fasta = work / "db.fasta"
    with fasta.open("w") as out:
        for i, rec in enumerate(read_fasta(ECOLI)):
            if args.db_limit and i >= args.db_limit:
                break
            out.write(f">{rec.record_id} {rec.description}\n{rec.sequence}\n")
    out_dir = work / "index" if args.index is None else Path(args.index)
    t0 = time.perf_counter()
    result = build_index(fasta, out_dir, model=str(ckpt), device=DEVICE[0])
    print(f"built index of {result.manifest.count if hasattr(result, 'manifest') else '?'} "
          f"proteins in {time.perf_counter() - t0:.1f} s -> {out_dir}", flush=True)  # fmt: skip
    return out_dir


def measure_floor(index_dir: Path, queries: list[str], seconds: float, *, in_thread: bool) -> list[float]:
    """Per-query seconds of Embedder.embed + Index.search in this process, cycling queries.

    ``in_thread``: run in a fresh worker thread (as the server runs the model: in its
    batcher thread or a gRPC worker thread) instead of the main thread. On a CPU
    oversubscribed by other processes the two can differ several-fold (torch's
    OpenMP team in the main thread), so both are measured and printed.
    """
    if in_thread:
        box: list[list[float]] = []
        t = threading.Thread(target=lambda: box.append(measure_floor(index_dir, queries, seconds, in_thread=False)))
        t.start()
        t.join()
        return box[0]
    from esmsearch.embedding import Embedder
    from esmsearch.store import Index

    with Index.open(index_dir) as index:
        embedder = Embedder.for_manifest(index.manifest, device=DEVICE[0])
        for q in queries:  # warm-up: every query shape once, as the server gets
            index.search(embedder.embed([q]), K)
        out: list[float] = []
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end or len(out) < len(queries):
            q = queries[i % len(queries)]
            t0 = time.perf_counter()
            index.search(embedder.embed([q]), K)
            out.append(time.perf_counter() - t0)
            i += 1
            if len(out) >= 10 * len(queries):
                break
    return out


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from esmsearch.server import AdmissionConfig, BatchingConfig, ServerConfig, create_server
    cfg = BatchingConfig(enabled={enabled}, max_wait_ms={wait}, max_batch_toks={toks})
    in_flight = {in_flight}
    admission = AdmissionConfig() if in_flight is None else AdmissionConfig(max_queries_in_flight=in_flight)
    srv, port = create_server(ServerConfig(index={index!r}, port=0, device={device!r}, max_workers=64,
                                           batching=cfg, admission=admission))
    print(port, flush=True)
    sys.stdin.read()
    srv.stop(5.0)
    """
)


def run_level(address: str, queries: list[str], clients: int, seconds: float, seed: int) -> Level:
    import grpc

    from esmsearch.v1 import search_pb2, search_pb2_grpc

    lat: list[list[float]] = [[] for _ in range(clients)]
    errs = [0] * clients
    refused = [0] * clients
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        with grpc.insecure_channel(address) as ch:
            stub = search_pb2_grpc.HomologSearchStub(ch)
            grpc.channel_ready_future(ch).result(timeout=30)
            barrier.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                seq = queries[rng.randrange(len(queries))]
                req = search_pb2.SearchRequest(queries=[search_pb2.Query(query_id=f"c{c}q{n}", sequence=seq)], k=K)
                t0 = time.perf_counter()
                try:
                    stub.Search(req, timeout=120)
                    lat[c].append(time.perf_counter() - t0)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused[c] += 1
                    else:
                        errs[c] += 1
                n += 1

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    all_lat = [x for per in lat for x in per]
    return Level(clients, len(all_lat), sum(errs), elapsed, all_lat, sum(refused))


def warm_up(address: str, queries: list[str]) -> None:
    """Send every query once, as the floor's warm-up does."""
    import grpc

    from esmsearch.v1 import search_pb2, search_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        stub = search_pb2_grpc.HomologSearchStub(ch)
        for i, seq in enumerate(queries):
            req = search_pb2.SearchRequest(queries=[search_pb2.Query(query_id=f"w{i}", sequence=seq)], k=K)
            stub.Search(req, timeout=300)


def paired(address: str, index_dir: Path, queries: list[str], seconds: float) -> tuple[list[float], list[float]]:
    """Alternate one in-process query (the floor) and one gRPC query, same query each time.

    Pairs see the same background load, so their p50 ratio is robust to the load
    drifts of a shared machine. Runs in a worker thread (as the server runs its model).
    """
    import grpc

    from esmsearch.embedding import Embedder
    from esmsearch.store import Index
    from esmsearch.v1 import search_pb2, search_pb2_grpc

    floor: list[float] = []
    served: list[float] = []

    def body() -> None:
        with Index.open(index_dir) as index, grpc.insecure_channel(address) as ch:
            embedder = Embedder.for_manifest(index.manifest, device=DEVICE[0])
            stub = search_pb2_grpc.HomologSearchStub(ch)
            for q in queries:  # warm-up
                index.search(embedder.embed([q]), K)
            end = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < end or i < len(queries):
                q = queries[i % len(queries)]
                t0 = time.perf_counter()
                index.search(embedder.embed([q]), K)
                t1 = time.perf_counter()
                req = search_pb2.SearchRequest(queries=[search_pb2.Query(query_id=f"p{i}", sequence=q)], k=K)
                stub.Search(req, timeout=300)
                t2 = time.perf_counter()
                floor.append(t1 - t0)
                served.append(t2 - t1)
                i += 1

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return floor, served


def run_mode(args: argparse.Namespace, index_dir: Path, queries: list[str], mode: str) -> list[Level]:
    enabled, in_flight = MODES[mode]
    script = SERVER_SCRIPT.format(
        enabled=enabled,
        wait=args.max_wait_ms,
        toks=args.batch_toks,
        in_flight=in_flight,
        index=str(index_dir),
        device=args.device,
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        address = f"127.0.0.1:{port}"
        warm_up(address, queries)
        levels = []
        for clients in args.levels:
            lv = run_level(address, queries, clients, args.seconds, args.seed)
            print(
                f"  batching={mode:<12} clients={clients:>2}: "
                f"{lv.qps:7.2f} req/s  p50 {lv.pct_ms(50):7.1f} ms  p95 {lv.pct_ms(95):7.1f} ms  "
                f"p99 {lv.pct_ms(99):7.1f} ms  refused {lv.refused}  errors {lv.errors}  (load {_loadavg()})",
                flush=True,
            )
            levels.append(lv)
        if args.paired_seconds > 0 and in_flight is None:
            floor, served = paired(address, index_dir, queries, args.paired_seconds)
            f50, s50 = np.median(floor) * 1e3, np.median(served) * 1e3
            print(
                f"  batching={mode:<12} paired 1-client vs floor over {len(floor)} pairs: "
                f"p50 served {s50:.1f} ms, floor {f50:.1f} ms, ratio {s50 / f50:.3f}  (load {_loadavg()})",
                flush=True,
            )
            PAIRED[mode] = (s50, f50, len(floor))
        proc.stdin.close()
        proc.wait(60)
        return levels
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="esm2_t6_8M_UR50D")
    p.add_argument(
        "--db-limit",
        type=int,
        default=0,
        help="index only the first N E. coli proteins (0 = all 4,391)",
    )
    p.add_argument(
        "--index",
        type=Path,
        default=None,
        help="reuse this index directory (built there first if missing)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per concurrency level")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--n-queries", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--batch-toks", type=int, default=4096)
    p.add_argument("--device", default="cpu", help="cpu or cuda for the server and the floor (default cpu)")
    p.add_argument("--modes", default="on,off", help="batching modes to compare: on, off (default both)")
    p.add_argument(
        "--bounded-in-flight",
        type=int,
        default=8,
        help="also run each mode with --max-queries-in-flight N (0 = skip; default 8)",
    )
    p.add_argument(
        "--paired-seconds",
        type=float,
        default=20.0,
        help="seconds of alternating floor/served pairs per mode",
    )
    args = p.parse_args(argv)
    DEVICE[0] = args.device
    for mode in args.modes.split(","):
        MODES[mode] = (mode == "on", None)
    if args.bounded_in_flight > 0:
        for mode in args.modes.split(","):
            MODES[f"{mode},admit={args.bounded_in_flight}"] = (mode == "on", args.bounded_in_flight)

    import torch

    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else _cpu_model()
    print(
        f"machine: {where}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {_loadavg()}"
    )
    with tempfile.TemporaryDirectory(prefix="esmsearch-serve-load-") as tmp:
        index_dir = build_or_reuse_index(args, Path(tmp))
        queries = sample_queries(args.n_queries, args.seed)
        lengths = [len(q) for q in queries]
        print(
            f"queries: {len(queries)} yeast proteins <= 500 residues (median {statistics.median(lengths):.0f}), k={K}"
        )
        floors: dict[str, list[float]] = {}
        for where in ("main thread", "worker thread"):
            floors[where] = measure_floor(index_dir, queries, args.seconds, in_thread=where != "main thread")
            print(
                f"floor (in-process embed+search, 1 query, {where}): "
                f"p50 {np.median(floors[where]) * 1e3:.1f} ms over {len(floors[where])} queries",
                flush=True,
            )
        results = {}
        for mode in MODES:
            results[mode] = run_mode(args, index_dir, queries, mode)
        floor_after = measure_floor(index_dir, queries, args.seconds, in_thread=True)
        f50_after = float(np.median(floor_after)) * 1e3
        print(f"floor again after the server runs (worker thread): p50 {f50_after:.1f} ms")

    print()
    print("OK req/s, p50/p95/p99 latency of OK requests (ms), refused (RESOURCE_EXHAUSTED) and errors per mode")
    print("mode             clients |    req/s    p50    p95    p99 refused errors | vs 1 client | vs off")
    base = "off" if "off" in results else next(iter(results))
    for mode, levels in results.items():
        one = next((lv for lv in levels if lv.clients == 1), levels[0])
        for i, lv in enumerate(levels):
            ref = results[base][i] if mode != base else None
            print(
                f"{mode:<16} {lv.clients:>7} | {lv.qps:8.2f} {lv.pct_ms(50):6.1f} {lv.pct_ms(95):6.1f} "
                f"{lv.pct_ms(99):6.1f} {lv.refused:7d} {lv.errors:6d} | {lv.qps / one.qps:10.2f}x | "
                + (f"{lv.qps / ref.qps:5.2f}x" if ref is not None and ref.qps > 0 else "    -")
            )
    floor = min(float(np.median(floors["worker thread"])) * 1e3, f50_after)
    print(f"floor used below: the lower worker-thread floor p50, {floor:.1f} ms")
    for name in results:
        one = next((lv for lv in results[name] if lv.clients == 1), None)
        if one is not None:
            p50 = one.pct_ms(50)
            print(f"p50(1 client, batching {name}) / floor p50 = {p50:.1f} / {floor:.1f} ms = {p50 / floor:.3f}")
    for name in results:
        if name in PAIRED:
            s50, f50, n = PAIRED[name]
            ratio = s50 / f50
            print(
                f"paired (batching {name}, {n} pairs): p50 served / p50 floor = {s50:.1f} / {f50:.1f} ms = {ratio:.3f}"
            )
    print(f"load average at end: {_loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
