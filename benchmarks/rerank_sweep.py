"""recall@10 and latency of a compressed index against exact search, over k_factor x nprobe.

Follow-up of ``benchmarks/scale_rehearsal.py``: its served IVF-PQ recall@10 at 500,000
sequences stayed at 0.909 from nprobe 128 to 1,024, so the loss is in the re-ranking
candidates (``k_factor x k`` from the PQ codes), not in the inverted lists. This script
sweeps both on one index version, in this process, through ``store.Index.search`` (the
server's search path: FAISS proposes ``k_factor x k`` candidates at the given nprobe,
re-ranked exactly against ``embeddings.npy``):

* queries: the rehearsal's own (``--queries`` fragments of the shared proteomes, seed
  ``--seed`` + 10,000), embedded with the version's model;
* exact top-10: brute force over the version's ``embeddings.npy``;
* per (k_factor, nprobe): recall@10 over all queries, and p50 / p99 of single-query
  search latency in ms (100 queries, search only: no embedding, no E-values).

The sweep runs without the candidate floor (``RERANK_MIN_CANDIDATES`` = 0); a last row
gives the shipped rule, ``max(stored k_factor x k, RERANK_MIN_CANDIDATES)`` at the stored
nprobe. The first row is the baseline of the latency ratio.

Usage::

    python benchmarks/rerank_sweep.py VERSION_DIR [--k-factors 10,20,50,100] [--nprobe-factors 1,2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402
from scale_rehearsal import exact_top, fragment, read_sources, recall_and_latency  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("version", type=Path, help="an index version directory with PQ or SQ codes")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k-factors", default="10,20,50,100")
    p.add_argument("--nprobe-factors", default="1,2")
    args = p.parse_args(argv)

    import faiss

    from esmsearch.embedding import Embedder
    from esmsearch.store import Index

    qrng = random.Random(args.seed + 10_000)
    proteins = read_sources()
    queries = [fragment(qrng, proteins)[1] for _ in range(args.queries)]
    with Index.open(args.version, mmap=True) as index:
        manifest = index.manifest
        stored_kf = index.k_factor
    if stored_kf is None:
        raise SystemExit(f"{args.version}: {manifest.index_factory} stores exact vectors; nothing to sweep")
    embedder = Embedder.for_manifest(manifest, device="cpu")
    vectors = np.asarray(embedder.embed(queries), dtype=np.float32)
    exact = exact_top(args.version / "embeddings.npy", vectors, 10)
    print(f"# rerank_sweep: {args.version} ({manifest.index_factory}, {manifest.count:,} rows); {cpu_model()}")
    print(f"# {args.queries} queries; stored k_factor {stored_kf}, nprobe {manifest.search_params.get('nprobe')}")
    print("k_factor\tmin candidates\tnprobe\trecall@10\tp50 ms\tp99 ms\tp50 vs first row")
    from esmsearch import vector_index

    floor = vector_index.RERANK_MIN_CANDIDATES
    baseline = None
    # The k_factor sweep without the candidate floor, then the shipped rule (stored k_factor + floor).
    runs = [(int(x), 0) for x in args.k_factors.split(",")] + [(stored_kf, floor)]
    for kf, min_candidates in runs:
        vector_index.RERANK_MIN_CANDIDATES = min_candidates
        with Index.open(args.version, mmap=True, k_factor=kf) as index:
            ivf = faiss.extract_index_ivf(index._faiss)
            stored_nprobe = int(ivf.nprobe)
            for f in (int(x) for x in args.nprobe_factors.split(",")):
                ivf.nprobe = min(ivf.nlist, stored_nprobe * f)
                recall, lat = recall_and_latency(index, vectors, exact)
                p50, p99 = statistics.median(lat), float(np.percentile(lat, 99))
                baseline = baseline or p50
                print(
                    f"{kf}\t{min_candidates}\t{ivf.nprobe}\t{recall:.3f}\t{p50:.2f}\t{p99:.2f}\t{p50 / baseline:.2f}x",
                    flush=True,
                )
                if min_candidates:
                    break  # the shipped rule: at the stored nprobe only
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
