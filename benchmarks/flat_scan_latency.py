"""What exact (``Flat``) search costs per query at the sizes ``--index-factory auto`` keeps it.

``vector_index.auto_spec`` picks ``Flat`` up to :data:`esmsearch.vector_index.FLAT_MAX_VECTORS`
(1,000,000) vectors whatever the dimension. This script measures one FAISS
``IndexFlatIP`` search (k = 10) over ``n`` random L2-normalised float32 vectors for each
``--dims`` (ESM-2's widths: 320 for t6_8M, 1,280 for t33_650M; 128 for the scale
rehearsal's model), with one query per call (a lone request) and, side by side, ``--batch``
queries per call (a merged batch), and prints the median of ``--repeats`` calls, the
per-query time of each and their ratio, with the index size and the CPU. Random vectors:
a Flat scan's cost does not depend on the values.

Usage::

    python benchmarks/flat_scan_latency.py [--n 1000000] [--dims 128 320 1280] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402


def median_call_s(index: faiss.Index, queries: np.ndarray, repeats: int, k: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries, k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 320, 1280])
    p.add_argument("--batch", type=int, default=16, help="queries per call in the batched way")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args(argv)
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, FAISS {faiss.__version__} with {faiss.omp_get_max_threads()} "
        f"threads; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"IndexFlatIP over n = {args.n:,} vectors, k = {args.k}, median of {args.repeats} calls")
    print(f"{'dim':>5} {'index GiB':>9} {'1 query ms':>10} {f'{args.batch} per call, ms/query':>22} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for dim in args.dims:
        x = rng.standard_normal((args.n, dim), dtype=np.float32)
        faiss.normalize_L2(x)
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        queries = np.ascontiguousarray(x[: args.batch])
        one = median_call_s(index, queries[:1], args.repeats, args.k)
        batched = median_call_s(index, queries, args.repeats, args.k) / args.batch
        gib = args.n * dim * 4 / 2**30
        print(f"{dim:>5} {gib:>9.2f} {one * 1e3:>10.0f} {batched * 1e3:>22.1f} {one / batched:>6.2f}")
        del index, x
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
