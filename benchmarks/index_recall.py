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

Indexes with lossy codes (PQ, SQ; :func:`esmsearch.vector_index.has_lossy_codes`)
are also searched as :class:`esmsearch.store.Index` searches them: ``k_factor x k``
candidates re-ranked exactly against the stored vectors, read from a memory-mapped
``.npy`` file (:func:`esmsearch.vector_index.search_reranked`). The table shows
recall@k and the median (p50) single-query latency with re-ranking off and on, side
by side, and their ratio; a second table sweeps ``k_factor`` (``--k-factors``) at the
stored search parameters, which is how ``DEFAULT_K_FACTOR`` was chosen.

Usage::

    python benchmarks/index_recall.py                    # 100,000 x 320, 1,000 queries
    python benchmarks/index_recall.py --n 20000 --queries 200 --threads 1
    # the re-ranking figures behind vector_index.DEFAULT_K_FACTOR
    # (benchmarks/results/index_recall_rerank_100k.txt):
    python benchmarks/index_recall.py --n 100000 --single-queries 100 --threads 2 \\
        --skip 'IVF1024,Flat;HNSW32;IVF4096,PQ32'

That last run took 2 minutes of CPU and 6 minutes of wall time on the shared
2-core machine (load average 7, under which PQ training took 2 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    p50_ms: float  # median single-query latency, re-ranking off
    score_error: float  # max |FAISS score - exact cosine of the returned row|
    rerank: Rerank | None  # None: exact codes, nothing to re-rank


@dataclass(frozen=True)
class Rerank:
    """Re-ranked search of a lossy index at one ``k_factor``."""

    k_factor: int
    recall: float
    p50_ms: float  # median single-query latency
    max_score_error: float  # max |returned score - exact cosine of the returned row|


Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


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
) -> tuple[np.ndarray, float, float, float]:
    """Returns (rows [q, k], batched ms/query, single ms/query, p50 single ms), best of ``repeats``.

    The minimum over repeats is reported (for single calls: per query) because the
    machine is shared: other processes only ever add time.
    """
    batched_ms = float("inf")
    rows = np.empty((0, k), np.int64)
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, rows = vi.search(index, queries, k)
        batched_ms = min(batched_ms, (time.perf_counter() - t0) * 1e3 / len(queries))
    single = single_call_ms(lambda q, kk: vi.search(index, q, kk), queries, k, n_single, repeats)
    return rows, batched_ms, float(np.mean(single)), float(np.median(single))


def single_call_ms(search: Searcher, queries: np.ndarray, k: int, n_single: int, repeats: int) -> np.ndarray:
    """Latency (ms) of one call per query for the first ``n_single`` queries, each its best of ``repeats``."""
    best = np.full(n_single, np.inf)
    for _ in range(repeats):
        for i in range(n_single):
            t0 = time.perf_counter()
            search(queries[i : i + 1], k)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best * 1e3


def measure_rerank(
    index: faiss.Index,
    stored: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    k_factor: int,
    n_single: int,
    repeats: int,
) -> Rerank:
    """Recall, p50 latency and score error of ``search_reranked`` at ``k_factor``."""
    k = truth.shape[1]

    def search(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return vi.search_reranked(index, q, kk, stored, k_factor)

    scores, rows = search(queries, k)
    err = max_score_error(queries, scores, rows, stored)
    p50 = float(np.median(single_call_ms(search, queries, k, n_single, repeats)))
    return Rerank(k_factor, recall_at_k(rows, truth), p50, err)


def recall_at_k(rows: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows found in the approximate top-k."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(rows, truth, strict=True))
    return float(hits / (k * len(truth)))


def max_score_error(queries: np.ndarray, scores: np.ndarray, rows: np.ndarray, stored: np.ndarray) -> float:
    """Largest |returned score - exact cosine of the query and the returned stored row|."""
    exact = np.einsum("qd,qkd->qk", queries, np.asarray(stored[np.maximum(rows, 0)], dtype=np.float32))
    return float(np.max(np.abs(np.where(rows >= 0, scores - exact, 0.0))))


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
    parser.add_argument(
        "--k-factor",
        type=int,
        default=vi.DEFAULT_K_FACTOR,
        help="candidates per hit re-ranked in the main table (default: DEFAULT_K_FACTOR)",
    )
    parser.add_argument(
        "--k-factors",
        default="1,2,5,10,20",
        help="comma-separated k_factor values swept for lossy indexes at their stored parameters ('' = none)",
    )
    args = parser.parse_args(argv)
    sweep = [int(f) for f in args.k_factors.split(",") if f.strip()]
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
    # Re-ranking reads the stored vectors as the server does: a memory-mapped .npy
    # (in the page cache after the first pass, as on a warm server).
    tmp = tempfile.TemporaryDirectory(prefix="index-recall-")
    np.save(Path(tmp.name) / "embeddings.npy", db)
    stored = np.load(Path(tmp.name) / "embeddings.npy", mmap_mode="r")
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
    sweeps: list[tuple[str, str, list[Rerank]]] = []
    done: dict[tuple[str, str], Row] = {}
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
            params = ", ".join(
                f"{k}={v}" for k, v in (("nprobe", spec.nprobe), ("efSearch", spec.ef_search)) if v is not None
            )
            shown = label if factory == label or "(" not in label else f"{label}: {factory}"
            if (factory, params) in done:  # an auto_spec row that repeats an earlier one
                rows.append(dataclasses.replace(done[(factory, params)], label=shown))
                continue
            vi.apply_search_params(index, spec)
            found, batched_ms, single_ms, p50_off = time_search(index, queries, args.k, n_single, args.repeats)
            if truth is None:  # the first plan entry is exact Flat
                truth, flat_batched, flat_single = found, batched_ms, single_ms
            score_error = max_score_error(queries, *vi.search(index, queries, args.k), stored)
            rerank = None
            if vi.has_lossy_codes(index):
                rerank = measure_rerank(index, stored, queries, truth, args.k_factor, n_single, args.repeats)
                stored_params = spec == specs[-1]  # the last spec of a plan entry is the default/stored one
                if stored_params and sweep:
                    sweeps.append(
                        (
                            shown,
                            params,
                            [measure_rerank(index, stored, queries, truth, f, n_single, args.repeats) for f in sweep],
                        )
                    )
            rows.append(
                Row(
                    shown,
                    params or "-",
                    build_s,
                    size_mb,
                    batched_ms,
                    single_ms,
                    recall_at_k(found, truth),
                    p50_off,
                    score_error,
                    rerank,
                )
            )
            done[(factory, params)] = rows[-1]
            print(
                f"done {shown} {params}: recall={rows[-1].recall:.3f}"
                + (f" re-ranked={rerank.recall:.3f}" if rerank else "")
                + f" build={build_s:.1f}s",
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
        f"| recall@{args.k} | speed-up vs Flat (batched / single) "
        f"| recall@{args.k} re-ranked (k_factor {args.k_factor}) | p50 ms off / on (ratio) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rr = r.rerank
        print(
            f"| {r.label} | {r.params} | {r.build_s:.1f} | {r.size_mb:.1f} | "
            f"{r.batched_ms:.3f} | {r.single_ms:.3f} | {r.recall:.3f} | "
            f"{flat_batched / r.batched_ms:.1f}x / {flat_single / r.single_ms:.1f}x | "
            + (
                f"{rr.recall:.3f} | {r.p50_ms:.3f} / {rr.p50_ms:.3f} ({rr.p50_ms / r.p50_ms:.2f}x) |"
                if rr
                else f"exact codes: not re-ranked | {r.p50_ms:.3f} |"
            )
        )
    for label, params, results in sweeps:
        print(f"\nk_factor sweep, {label} at its stored parameters ({params}); stored vectors memory-mapped\n")
        off = next(r for r in rows if r.label == label and r.params == params)
        print(f"| k_factor | candidates | recall@{args.k} | p50 ms | p50 vs no re-rank | max score error |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| off | {args.k} | {off.recall:.3f} | {off.p50_ms:.3f} | 1.00x | {off.score_error:.1e} |")
        for x in results:
            print(
                f"| {x.k_factor} | {x.k_factor * args.k} | {x.recall:.3f} | {x.p50_ms:.3f} | "
                f"{x.p50_ms / off.p50_ms:.2f}x | {x.max_score_error:.1e} |"
            )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
