"""Recall and speed of FAISS index types against exact search (Flat), side by side.

Synthetic, seeded data shaped like ESM-2 embeddings (dim 320 = esm2_t6_8M): a
two-level Gaussian mixture (``--families`` x ``--subfamilies``), L2-normalised, so that nearest
neighbours are structured as in a protein-family database rather than uniform
noise (on which approximate recall means little). Queries are held-out points of
the same mixture. No ESM model is involved: this measures the index layer only.

For each index type it prints, as a Markdown table: build time (train + add),
serialised size, query time per query (batched: all queries in one call; single:
one call per query), recall@k against exact Flat search, and the speed-up over
Flat in both modes.

Usage::

    python benchmarks/index_recall.py                    # 100,000 x 320, 1,000 queries
    python benchmarks/index_recall.py --n 20000 --queries 200 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np

from esmsearch import vector_index as vi


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    label: str
    params: str
    build_s: float
    size_mb: float
    batched_ms: float
    single_ms: float
    recall: float


def mixture(n: int, dim: int, n_families: int, n_subfamilies: int, seed: int, latent_dim: int = 32) -> np.ndarray:
    """Returns float32 [n, dim] L2-normalised points of a seeded two-level Gaussian mixture.

    Like protein families and their subfamilies, in a ``latent_dim``-dimensional
    space mapped to ``dim`` by a fixed random linear map (embeddings of real
    models have a low intrinsic dimension; in 320 independent dimensions every
    cluster would be perfectly separated and any index would look exact). Family
    centres are N(0, I); each has ``n_subfamilies`` subfamily centres at family +
    0.8 N(0, I); a point is a random subfamily centre + 0.6 N(0, I) in latent
    space, plus 0.1 N(0, I) isotropic noise in ``dim``. The centres and the map
    are shared across seeds (seed 12345), so another seed gives held-out points
    of the same mixture.
    """
    crng = np.random.default_rng(12345)
    families = crng.standard_normal((n_families, latent_dim), dtype=np.float32)
    subfamilies = np.repeat(families, n_subfamilies, axis=0)
    subfamilies += 0.8 * crng.standard_normal(subfamilies.shape, dtype=np.float32)
    projection = crng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(latent_dim)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    step = 50_000
    for start in range(0, n, step):
        m = min(step, n - start)
        z = subfamilies[rng.integers(0, len(subfamilies), m)]
        z += 0.6 * rng.standard_normal((m, latent_dim), dtype=np.float32)
        x = z @ projection + 0.1 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def time_search(
    index: faiss.Index, queries: np.ndarray, k: int, n_single: int, repeats: int
) -> tuple[np.ndarray, float, float]:
    """Returns (rows [q, k], batched ms/query, single ms/query), best of ``repeats``.

    The minimum over repeats is reported because the machine is shared: other
    processes only ever add time.
    """
    batched_ms = single_ms = float("inf")
    rows = np.empty((0, k), np.int64)
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, rows = vi.search(index, queries, k)
        batched_ms = min(batched_ms, (time.perf_counter() - t0) * 1e3 / len(queries))
        t0 = time.perf_counter()
        for i in range(n_single):
            vi.search(index, queries[i : i + 1], k)
        single_ms = min(single_ms, (time.perf_counter() - t0) * 1e3 / n_single)
    return rows, batched_ms, single_ms


def recall_at_k(rows: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows found in the approximate top-k."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(rows, truth, strict=True))
    return hits / (k * len(truth))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=320, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out queries")
    parser.add_argument("--single-queries", type=int, default=200, help="queries timed one call each (latency mode)")
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's, = cores)")
    parser.add_argument("--families", type=int, default=200, help="top-level mixture components")
    parser.add_argument("--subfamilies", type=int, default=20, help="second-level components per family")
    parser.add_argument("-k", type=int, default=10, help="recall@k")
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=8.0,
        help="memory budget for the second auto_spec row (MB)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument(
        "--skip",
        default="",
        help="';'-separated factory strings to skip (Flat, the baseline, cannot be)",
    )
    parser.add_argument(
        "--train-sample",
        type=int,
        default=None,
        help="train on at most this many database vectors (default: all)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    n_single = min(args.single_queries, args.queries)
    skip = {s.strip() for s in args.skip.split(";") if s.strip()} - {"Flat"}

    print(
        f"# index recall benchmark: n={args.n} dim={args.dim} queries={args.queries} "
        f"k={args.k} families={args.families}x{args.subfamilies} "
        f"threads={faiss.omp_get_max_threads()} "
        f"faiss={faiss.__version__} load_avg={os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    db = mixture(args.n, args.dim, args.families, args.subfamilies, seed=args.seed)
    queries = mixture(args.queries, args.dim, args.families, args.subfamilies, seed=args.seed + 1)
    print(f"data: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    budget = int(args.budget_mb * 1e6)
    auto = vi.auto_spec(args.n, args.dim)
    auto_budget = vi.auto_spec(args.n, args.dim, memory_budget_bytes=budget)
    # (label, factory, list of search-param specs to try on one build)
    plan: list[tuple[str, str, list[vi.IndexSpec]]] = [
        ("Flat (exact)", "Flat", [vi.IndexSpec("Flat")]),
        (
            "IVF1024,Flat",
            "IVF1024,Flat",
            [vi.IndexSpec("IVF1024,Flat", nprobe=p) for p in (8, 32, vi.default_nprobe(1024))],
        ),
        (
            "HNSW32",
            "HNSW32",
            [vi.IndexSpec("HNSW32", ef_search=e) for e in (32, vi.DEFAULT_EF_SEARCH)],
        ),
        (
            "IVF1024,PQ32",
            "IVF1024,PQ32",
            [vi.IndexSpec("IVF1024,PQ32", nprobe=p) for p in (16, vi.default_nprobe(1024))],
        ),
        (
            "IVF4096,PQ32",
            "IVF4096,PQ32",
            [vi.IndexSpec("IVF4096,PQ32", nprobe=p) for p in (64, vi.default_nprobe(4096))],
        ),
        ("auto_spec (no budget)", auto.factory, [auto]),
        (f"auto_spec ({args.budget_mb:g} MB)", auto_budget.factory, [auto_budget]),
    ]

    rows: list[Row] = []
    truth: np.ndarray | None = None
    flat_batched = flat_single = float("nan")
    built: dict[str, tuple[faiss.Index, float, float]] = {}
    for label, factory, specs in plan:
        if factory in skip:
            continue
        if factory in built:
            index, build_s, size_mb = built[factory]
        else:
            t0 = time.perf_counter()
            index = vi.build(db, specs[0], seed=args.seed, train_sample=args.train_sample)
            build_s = time.perf_counter() - t0
            size_mb = faiss.serialize_index(index).nbytes / 1e6
            built[factory] = (index, build_s, size_mb)
        for spec in specs:
            vi.apply_search_params(index, spec)
            found, batched_ms, single_ms = time_search(index, queries, args.k, n_single, args.repeats)
            if truth is None:  # the first plan entry is exact Flat
                truth, flat_batched, flat_single = found, batched_ms, single_ms
            params = ", ".join(
                f"{k}={v}" for k, v in (("nprobe", spec.nprobe), ("efSearch", spec.ef_search)) if v is not None
            )
            shown = label if factory == label or "(" not in label else f"{label}: {factory}"
            rows.append(
                Row(
                    shown,
                    params or "-",
                    build_s,
                    size_mb,
                    batched_ms,
                    single_ms,
                    recall_at_k(found, truth),
                )
            )
            print(
                f"done {shown} {params}: recall={rows[-1].recall:.3f} build={build_s:.1f}s",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\nn={args.n:,} dim={args.dim} queries={args.queries:,} (single-query timing on "
        f"{n_single}, best of {args.repeats}) k={args.k} "
        f"threads={faiss.omp_get_max_threads()} faiss {faiss.__version__}"
        "\n"
    )
    print(
        "| index | search params | build s | size MB | batched ms/query | single ms/query "
        f"| recall@{args.k} | speed-up vs Flat (batched / single) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.label} | {r.params} | {r.build_s:.1f} | {r.size_mb:.1f} | "
            f"{r.batched_ms:.3f} | {r.single_ms:.3f} | {r.recall:.3f} | "
            f"{flat_batched / r.batched_ms:.1f}x / {flat_single / r.single_ms:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
