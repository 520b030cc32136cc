"""E-values: calibration on held-out decoys, false positives on SCOPe, and their cost.

Three measurements, one run (``--scop`` adds the third), through the real indexer,
server and client:

1. **Calibration on held-out decoys.** A database of ``--db-size`` (20,000)
   shuffled sequences -- a seeded sample, with replacement, of the *E. coli* K-12
   proteome with each sequence's residues shuffled (seed ``--db-seed``, independent
   of the index's own decoys) -- is indexed with ``esmsearch`` like any database,
   which embeds its own ``--decoys`` (10,000) decoys (shuffles of a seeded sample of
   that database, decoy seed 0). ``--queries`` (200) real yeast proteins, a seeded
   sample of the *S. cerevisiae* proteome, are searched against it at k = 1000.
   Every database sequence is unrelated to every query, so under a calibrated null
   the mean number of hits per query with E <= x is x: the table gives observed /
   expected for x = 0.01, 0.1, 1, 10 (target: within a factor of 2), with a 95%
   bootstrap interval over queries, and a log-log plot of observed against expected.
2. **Cost.** Query latency of single-query ``Search`` RPCs (k = 10) against the same
   index with E-values and against a copy without its decoys (an "old" index, no
   E-values), alternating between the two servers query by query in the same run;
   the ratio of medians (target <= 1.10x). Also the time of the E-value computation
   alone (one matrix product with the decoys plus the Gumbel fit) per query.
3. **SCOPe** (``--scop``; Progres protocol, ``scop_sensitivity.load_dataset``): 400
   query domains against the 15,177 domains of SCOPe 2.08 40%, k = 1000; the mean
   number of false positives (hits to a labelled domain of another fold) per query
   with E <= 1 and E <= 0.01.

4. **Null database at large N** (``--null-db N``, on its own; issue 18 part 4). A
   database of ``N`` (>= 1,000,000 for the real measurement) short null sequences --
   random windows of 30-150 residues (``--null-min-len``/``--null-max-len``) of a
   seeded sample, with replacement, of the *E. coli* proteome, each shuffled -- is
   built with a small seeded random-weight ESM-2 (``--null-layers`` 2, ``--null-dim``
   64; written by ``esmsearch.checkpoints``, labelled "random model"), with the
   index's own ``--decoys``. ``--queries`` (200) windows of yeast proteins of the same
   lengths are searched through the real server and client at ``--k`` (1000); every
   hit is a null hit, so the mean number of hits per query with E <= x should be x.
   Printed: observed / expected at x = 0.01, 0.1, 1, 10 with the factor off
   (max(r, 1/r), target <= 2); the same scores re-scored offline with four tails
   (the GEV alone, i.e. the cliff before issue 18; esmsearch's GEV + tangent
   exponential tail; GEV + an exponential fitted to the upper block maxima (POT,
   Coles 2001 ch. 4); a Gumbel, xi = 0), with the number of hits whose E-value is
   exactly 0; and which tail fits the upper decoy block maxima better, on held-out
   blocks (fit on the even blocks, count exceedances in the odd ones). Writes
   ``evalue_null_calibration.{json,md}`` into ``--out``. The full run::

       python benchmarks/evalue_calibration.py --null-db 1000000 --device cuda

   and a small one on the 2-core machine (about 2 minutes)::

       python benchmarks/evalue_calibration.py --null-db 5000 --decoys 5000

With a random-weight checkpoint (the default, ``esmsearch.checkpoints``) part 1 is
still a valid measurement of the method -- the decoys and the held-out database are
both null sequences -- but E-values of real homologs, and the SCOPe figures, are
those of a model that knows no proteins: labelled "random model".

Usage (heavy: ~30,000 sequences embedded for part 1, ~25,000 more for part 3; run it
under the shared lock)::

    flock /tmp/esmsearch-bench.lock python benchmarks/evalue_calibration.py --scop

Writes ``evalue_calibration.json``, ``evalue_calibration.md`` and
``evalue_calibration.png`` into ``--out`` (default ``benchmarks/results/``). Work files
(checkpoint, FASTA, indexes) go to ``--work`` (default ``work/evalue-bench``) and are
reused by a later run with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_model as cpu_name

ROOT = Path(__file__).resolve().parent.parent
SEQDB = ROOT.parent / "shared" / "data" / "seqdb"
ECOLI = SEQDB / "UP000000625_83333_Ecoli_K12_2020.fasta"
YEAST = SEQDB / "UP000002311_559292_yeast.fasta.gz"
THRESHOLDS = (0.01, 0.1, 1.0, 10.0)
RANDOM_LABEL = "random model"


def device_name(device: str) -> str:
    """The model device in words: the CPU's name, or the CUDA device's."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA), host CPU {cpu_name()}"
    return f"CPU ({cpu_name()})"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def read_fasta(path: Path) -> list[tuple[str, str]]:
    from esmsearch.sequences import read_fasta as _read

    return [(r.record_id, r.sequence) for r in _read(path)]


def write_fasta(records: Sequence[tuple[str, str]], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for rid, seq in records:
            out.write(f">{rid}\n")
            for i in range(0, len(seq), 60):
                out.write(seq[i : i + 60] + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- inputs
def heldout_database(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` shuffled E. coli sequences: seeded sample with replacement, residues shuffled."""
    from esmsearch.significance import shuffle_residues

    source = [s for _, s in read_fasta(ECOLI)]
    rng = np.random.default_rng([seed, 2])
    picks = rng.integers(0, len(source), size=n)
    shuffled = shuffle_residues((source[i] for i in picks), seed + 1_000_003)
    return [(f"null_{i + 1:06d}", s) for i, s in enumerate(shuffled)]


def yeast_queries(n: int, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of ``n`` yeast proteins, in proteome order."""
    with gzip.open(YEAST, "rt") as fh:
        text = fh.read()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"yeast-{os.getpid()}.fasta"
    tmp.write_text(text)
    try:
        records = read_fasta(tmp)
    finally:
        tmp.unlink()
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(records), size=n, replace=False).tolist())
    return [records[i] for i in keep]


def checkpoint(arch: str, work: Path) -> Path:
    from esmsearch.checkpoints import write_random_checkpoint

    path = work / "checkpoints" / f"{arch}.pt"
    if not path.is_file():
        write_random_checkpoint(arch, work / "checkpoints", seed=0)
    return path


def build(fasta: Path, out: Path, model: Path, decoys: int, label: str, device: str) -> dict[str, Any]:
    """Build (or reuse) an index with ``decoys`` decoys; returns its build figures."""
    from esmsearch.indexer import build_index
    from esmsearch.store import Manifest

    if (out / "manifest.json").is_file():
        m = Manifest.read(out)
        from esmsearch.fsutil import file_sha256

        same = (
            m.source_fasta_sha256 == file_sha256(fasta)
            and m.decoys is not None
            and m.decoys.count == min(decoys, m.count)
        )
        if same:
            print(f"[{label}] reusing {out} (version {m.version})", flush=True)
            return {"reused": True, **m.build}
    print(f"[{label}] building {out} (load {load_average()})", flush=True)
    t0 = time.perf_counter()
    result = build_index(fasta, out, model=str(model), device=device, decoys=decoys, progress=True, overwrite=True)
    wall = time.perf_counter() - t0
    b = result.manifest.build
    print(
        f"[{label}] built in {wall:.0f} s: {result.sequences} sequences ({b['embed_seconds']:.0f} s), "
        f"{result.manifest.decoys.count if result.manifest.decoys else 0} decoys ({b['decoy_embed_seconds']:.0f} s); "
        f"load {load_average()}",
        flush=True,
    )
    return {"reused": False, "wall_s": round(wall, 1), **b}


def strip_decoys(index: Path, out: Path) -> Path:
    """A copy of ``index`` without its decoys (hard links + a rewritten manifest): an "old" index."""
    from esmsearch import fsutil
    from esmsearch.store import DATA_FILES, MANIFEST, Manifest

    m = Manifest.read(index)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in DATA_FILES:
        os.link(index / name, out / name)
    files = {k: v for k, v in m.files.items() if k in DATA_FILES}
    fsutil.write_text_atomic(out / MANIFEST, dataclasses.replace(m, decoys=None, files=files).to_json())
    return out


# ------------------------------------------------------------------------------ measuring
def serve(index: Path, device: str):  # type: ignore[no-untyped-def]
    from esmsearch.server import ServerConfig, create_server

    server, port = create_server(ServerConfig(index=index, port=0, device=device, max_workers=4))
    return server, f"127.0.0.1:{port}"


def search_all(index: Path, queries: Sequence[tuple[str, str]], k: int, device: str) -> tuple[list[Any], np.ndarray]:
    """Search every query (Search RPCs); also their vectors (Embed RPC, the same embedding path)."""
    from esmsearch.client import SearchClient

    server, address = serve(index, device)
    try:
        with SearchClient(address, timeout_s=3600.0) as client:
            # a few queries per call: the server bounds the hits per request (queries x k)
            chunk = max(1, 50_000 // k)
            results = []
            for at in range(0, len(queries), chunk):
                results += client.search(dict(queries[at : at + chunk]), k=k)
            vectors = client.embed(dict(queries)).vectors
            return results, vectors
    finally:
        server.stop(1.0)


def save_scores(index_dir: Path, vectors: np.ndarray, out: Path, prefix: str, top_k: int | None) -> None:
    """Save the queries' cosine scores against the index's decoys and database (float32), for
    offline study of the null: ``<prefix>_decoy_scores.npy`` [q, n_decoys] in decoy order, and
    ``<prefix>_db_scores.npy`` [q, n] (or, with ``top_k``, ``<prefix>_db_top.npz`` with the
    top-k scores and rows)."""
    from esmsearch.store import Index

    out.mkdir(parents=True, exist_ok=True)
    with Index.open(index_dir) as index:
        assert index.null is not None
        np.save(out / f"{prefix}_decoy_scores.npy", vectors @ np.asarray(index.null.decoys).T)
        db = np.asarray(index.embeddings())
        scores = vectors @ db.T
        if top_k is None:
            np.save(out / f"{prefix}_db_scores.npy", scores)
        else:
            rows = np.argsort(-scores, axis=1)[:, :top_k].astype(np.int32)
            np.savez(out / f"{prefix}_db_top.npz", scores=np.take_along_axis(scores, rows, axis=1), rows=rows)


def bootstrap_ci(values: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def calibration(results: Sequence[Any], k: int) -> dict[str, Any]:
    evalues = [np.array([h.evalue for h in r.hits], dtype=np.float64) for r in results]
    if any(h.evalue is None for r in results for h in r.hits):
        raise SystemExit("hits without E-values: the index has no decoys")
    truncated = sum(1 for e in evalues if len(e) == k and e[-1] <= max(THRESHOLDS))
    rows = []
    for x in THRESHOLDS:
        counts = np.array([(e <= x).sum() for e in evalues], dtype=np.float64)
        lo, hi = bootstrap_ci(counts)
        rows.append(
            {
                "x": x,
                "observed_mean": float(counts.mean()),
                "ratio": float(counts.mean() / x),
                "ci95": [lo, hi],
                "queries_with_any": int((counts > 0).sum()),
            }
        )
    grid = np.logspace(-3, 2, 26)
    curve = [float(np.mean([(e <= x).sum() for e in evalues])) for x in grid]
    return {"rows": rows, "grid": grid.tolist(), "curve": curve, "truncated_queries": truncated}


def latency(
    with_e: Path, without_e: Path, queries: Sequence[tuple[str, str]], rounds: int, device: str
) -> dict[str, Any]:
    from esmsearch.client import SearchClient
    from esmsearch.store import Index

    server_a, addr_a = serve(with_e, device)
    server_b, addr_b = serve(without_e, device)
    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        with SearchClient(addr_a, timeout_s=600.0) as ca, SearchClient(addr_b, timeout_s=600.0) as cb:
            for client in (ca, cb):  # warm-up: first forward passes, channels
                client.search({queries[0][0]: queries[0][1]}, k=10, split_requests=False)
            for r in range(rounds):
                for i, (qid, seq) in enumerate(queries):
                    order = [("with", ca), ("without", cb)]
                    if (i + r) % 2:
                        order.reverse()
                    for name, client in order:
                        t0 = time.perf_counter()
                        res = client.search({qid: seq}, k=10, split_requests=False)
                        times[name].append(time.perf_counter() - t0)
                        assert (res[0].hits[0].evalue is None) == (name == "without")
    finally:
        server_a.stop(1.0)
        server_b.stop(1.0)
    # The E-value step alone, in process: one query's fit against the decoys plus its E-values.
    with Index.open(with_e) as index:
        vec = np.asarray(index.embeddings()[:1], dtype=np.float32)
        scores, _ = index.search(vec, 10)
        index.evalues(vec, scores)
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            index.evalues(vec, scores)
        evalue_ms = (time.perf_counter() - t0) / reps * 1e3
        decoys = index.manifest.decoys.count if index.manifest.decoys else 0
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    mean = {name: statistics.fmean(v) * 1e3 for name, v in times.items()}
    return {
        "requests_each": len(times["with"]),
        "median_ms": med,
        "mean_ms": mean,
        "ratio_median": med["with"] / med["without"],
        "ratio_mean": mean["with"] / mean["without"],
        "evalue_step_ms_per_query": evalue_ms,
        "decoys": decoys,
    }


def scop_false_positives(
    work: Path,
    model: Path,
    decoys: int,
    device: str,
    save: Path | None = None,
    max_queries: int | None = None,
    max_targets: int | None = None,
) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scop_sensitivity import DATA, load_dataset

    dataset = load_dataset("progres208", DATA, max_queries, 0, max_targets)
    fasta = work / f"scop_db_{len(dataset.database)}.fasta"
    if not fasta.is_file():
        write_fasta([(d, dataset.sequences[d]) for d in dataset.database], fasta)
    index = work / f"scop-index-{len(dataset.database)}"
    figures = build(fasta, index, model, decoys, "scop", device)
    t0 = time.perf_counter()
    results, vectors = search_all(index, [(q, dataset.sequences[q]) for q in dataset.queries], 1000, device)
    search_s = time.perf_counter() - t0
    if save is not None:
        save_scores(index, vectors, save, "scop", top_k=1000)
    fp = {1.0: [], 0.01: []}  # type: dict[float, list[int]]
    tp = {1.0: [], 0.01: []}  # type: dict[float, list[int]]
    for r in results:
        qlab = dataset.labels[r.query_id]
        for x in fp:
            n_fp = n_tp = 0
            for h in r.hits:
                lab = dataset.labels.get(h.target_id)
                if lab is None or h.target_id == r.query_id or h.evalue is None or h.evalue > x:
                    continue
                if lab.fold != qlab.fold:
                    n_fp += 1
                else:
                    n_tp += 1
            fp[x].append(n_fp)
            tp[x].append(n_tp)
    return {
        "dataset": dataset.description,
        "queries": len(results),
        "build": figures,
        "search_s": round(search_s, 1),
        "mean_false_positives": {str(x): float(np.mean(v)) for x, v in fp.items()},
        "mean_true_positives": {str(x): float(np.mean(v)) for x, v in tp.items()},
    }


# ------------------------------------------------------------------------------ cost only
def cost_only(arch: str, work: Path, decoys: int, rounds: int) -> str:
    """The E-value step against the query embedding it follows, in process, same run.

    Embeds single yeast queries with the random-weight ``arch`` checkpoint on the CPU and,
    alternating with it, computes one query's E-values for k = 10 hits against ``decoys``
    synthetic decoys of the model's width (the step's speed does not depend on their
    values). A server adds the same step to each query's embedding plus FAISS search, so
    ``1 + evalue_ms / embed_ms`` bounds the latency ratio with / without E-values from above.
    """
    from esmsearch.embedding import Embedder
    from esmsearch.significance import DecoyNull, DecoySettings

    model = checkpoint(arch, work)
    embedder = Embedder(str(model), device="cpu")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((decoys, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    settings = DecoySettings.for_database(decoys, decoys)
    assert settings is not None
    null = DecoyNull(vectors, dataclasses.replace(settings, shape=-0.07))
    queries = [s for _, s in yeast_queries(50, 1)][: max(1, rounds)]
    embedder.embed(queries[:1])  # warm-up
    embed_ms, evalue_ms, residues = [], [], []
    for seq in queries:
        t0 = time.perf_counter()
        q = embedder.embed([seq])
        t1 = time.perf_counter()
        scores = np.sort(rng.uniform(0.8, 1.0, size=(1, 10)).astype(np.float32), axis=1)[:, ::-1]
        null.evalues(q, scores, 1_000_000)
        t2 = time.perf_counter()
        embed_ms.append((t1 - t0) * 1e3)
        evalue_ms.append((t2 - t1) * 1e3)
        residues.append(len(seq))
    e, v = statistics.median(embed_ms), statistics.median(evalue_ms)
    return (
        f"{arch} on {cpu_name()} (load {load_average()}): {len(queries)} single yeast queries "
        f"(median {statistics.median(residues):.0f} residues): embedding median {e:.1f} ms, E-value step "
        f"({decoys:,} decoys of dim {embedder.dim}, k = 10) median {v:.2f} ms = {v / e * 100:.2f}% of the "
        f"embedding, so at most {1 + v / e:.3f}x per query"
    )


# ------------------------------------------------------------------------- method comparison
def compare_methods(scores_dir: Path, db_size: int, decoys: int, plot_path: Path | None = None) -> str:
    """Observed / expected hits per query for candidate null models, from saved scores.

    Reads ``null_decoy_scores.npy`` [q, n_decoys] and ``null_db_scores.npy`` [q, n] (written
    by ``--save-scores``) and fits, per query, on the decoy scores:

    * Gumbel (maximum likelihood) to block maxima of the raw cosines ``s``;
    * Gumbel (L-moments) to block maxima of ``u = -ln(1 - s)``;
    * GEV with a free shape per query (L-moments) on ``u``;
    * GEV on ``u`` with one regional shape (esmsearch's method); here the shape comes from
      these queries' own decoy maxima (the index estimates it from database pseudo-queries).

    With ``scop_decoy_scores.npy`` and ``scop_db_top.npz`` present, also the mean SCOPe
    false positives per query of esmsearch's method, the shape estimated from the query
    domains without their own decoys (as the indexer does for its pseudo-queries).
    With ``plot_path``, a log-log plot of observed against expected for each model.
    """
    from esmsearch.significance import (
        GevFit,
        block_maxima,
        evalues_from_fit,
        fit_gev,
        l_moments,
        regional_shape,
        shape_from_lskewness,
        tail_transform,
    )

    d = np.load(scores_dir / "null_decoy_scores.npy").astype(np.float64)
    s = np.load(scores_dir / "null_db_scores.npy").astype(np.float64)
    n = s.shape[1]
    xs = (0.01, 0.1, 1.0, 10.0, 100.0)
    block = 100
    rows = []
    grid = np.logspace(-3, 2, 26)
    curves: dict[str, list[float]] = {}

    def add(name: str, e: np.ndarray) -> None:
        curves[name] = [float((e <= x).sum(axis=1).mean()) for x in grid]
        counts = [float((e <= x).sum(axis=1).mean()) for x in xs]
        zero = int((e == 0).sum())
        rows.append(
            f"| {name} | " + " | ".join(f"{c / x:.2f}" for c, x in zip(counts, xs, strict=True)) + f" | {zero} |"
        )

    def gumbel_mle(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Maximum likelihood: beta solves beta = mean(x) - sum(x w) / sum(w), w = exp(-x / beta).
        y = m - m.min(axis=1, keepdims=True)
        lo, hi = np.zeros(len(y)), y.mean(axis=1)
        for _ in range(200):
            b = 0.5 * (lo + hi)
            w = np.exp(-y / b[:, None])
            g = b - y.mean(axis=1) + (y * w).sum(axis=1) / w.sum(axis=1)
            lo, hi = np.where(g < 0, b, lo), np.where(g > 0, b, hi)
        b = 0.5 * (lo + hi)
        mu = m.min(axis=1) - b * np.log(np.exp(-y / b[:, None]).mean(axis=1))
        return mu, b

    def gumbel_evalues(scores: np.ndarray, mu: np.ndarray, beta: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            t = np.exp(-(scores - mu[:, None]) / beta[:, None])
        return n * -np.expm1(-t / block)

    m_s = block_maxima(d, block)
    add("Gumbel on s (the issue's proposal)", gumbel_evalues(s, *gumbel_mle(m_s)))
    m_u = block_maxima(tail_transform(d), block)
    mu, sig = fit_gev(m_u, 0.0)
    add("Gumbel on u = -ln(1 - s)", evalues_from_fit(s, GevFit(mu, sig, 0.0, block), n))
    _, _, t3 = l_moments(m_u)
    e_free = np.empty_like(s)
    for i in range(len(s)):
        xi = min(0.5, max(-0.5, shape_from_lskewness(float(t3[i]))))
        mu_i, sig_i = fit_gev(m_u[i : i + 1], xi)
        e_free[i] = evalues_from_fit(s[i : i + 1], GevFit(mu_i, sig_i, xi, block), n)[0]
    add("GEV on u, free shape per query", e_free)
    xi = regional_shape(m_u)
    mu, sig = fit_gev(m_u, xi)
    add(f"GEV on u, one regional shape ({xi:+.3f}; esmsearch)", evalues_from_fit(s, GevFit(mu, sig, xi, block), n))
    lines = [
        f"Observed / expected hits per query, {len(s)} queries vs {n:,} held-out null sequences, "
        f"fits to {d.shape[1]:,} decoys in blocks of {block}:",
        "",
        "| null model | " + " | ".join(f"E <= {x:g}" for x in xs) + " | null hits with E = 0 |",
        "|---|" + "---:|" * (len(xs) + 1),
        *rows,
    ]
    if plot_path is not None:
        plot_curves(grid, curves, plot_path, f"{len(s)} yeast queries vs {n:,} shuffled sequences (random model)")
    scop_d, scop_top = scores_dir / "scop_decoy_scores.npy", scores_dir / "scop_db_top.npz"
    if scop_d.is_file() and scop_top.is_file():
        lines += ["", scop_rescore(np.load(scop_d), np.load(scop_top), decoys)]
    return "\n".join(lines)


def scop_rescore(decoy_scores: np.ndarray, top: Any, decoys: int) -> str:
    """esmsearch's E-values of saved SCOPe hits: mean false positives per query."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scop_sensitivity import DATA, load_dataset

    from esmsearch.significance import (
        DecoySettings,
        GevFit,
        block_maxima,
        evalues_from_fit,
        fit_gev,
        regional_shape,
        sample_decoy_rows,
        tail_transform,
    )

    dataset = load_dataset("progres208", DATA, None, 0)
    n = len(dataset.database)
    settings = DecoySettings.for_database(n, decoys)
    assert settings is not None
    column_of = {int(r): j for j, r in enumerate(sample_decoy_rows(n, settings))}
    row_of = {d: i for i, d in enumerate(dataset.database)}
    u = tail_transform(decoy_scores)
    own = np.array([column_of.get(row_of[q], -1) for q in dataset.queries])
    excluded = u.copy()
    has = np.flatnonzero(own >= 0)
    excluded[has, own[has]] = np.median(excluded[has], axis=1)  # as DecoyNull.block_maxima(exclude=...)
    xi = regional_shape(block_maxima(excluded, settings.block_size))
    m = block_maxima(u, settings.block_size)  # at search time the query's own decoy stays in
    mu, sig = fit_gev(m, xi)
    e = evalues_from_fit(top["scores"].astype(np.float64), GevFit(mu, sig, xi, settings.block_size), n)
    fp = {1.0: 0, 0.01: 0}
    same = {1.0: 0, 0.01: 0}
    for qi, q in enumerate(dataset.queries):
        qlab = dataset.labels[q]
        for r, ev in zip(top["rows"][qi], e[qi], strict=True):
            target = dataset.database[r]
            lab = dataset.labels.get(target)
            if lab is None or target == q:
                continue
            for x in fp:
                if ev <= x:
                    if lab.fold != qlab.fold:
                        fp[x] += 1
                    else:
                        same[x] += 1
    nq = len(dataset.queries)
    return (
        f"SCOPe ({nq} queries, {RANDOM_LABEL}), esmsearch's method with the shape {xi:+.3f} from the query "
        f"domains without their own decoys: mean false positives (another fold) per query with E <= 1: "
        f"{fp[1.0] / nq:.3f}, with E <= 0.01: {fp[0.01] / nq:.3f} (same-fold hits, self excluded: "
        f"{same[1.0] / nq:.3f} and {same[0.01] / nq:.3f})."
    )


# ------------------------------------------------------------------------------- report
def plot_curves(grid: np.ndarray, curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Observed hits per query with E <= x against x, one line per null model, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.fill_between(grid, grid / 2, grid * 2, color="0.9", label="within 2x")
    ax.plot(grid, grid, color="0.4", lw=1, ls="--", label="expected = observed")
    for name, curve in curves.items():
        c = np.array(curve)
        ax.plot(grid[c > 0], c[c > 0], "o-", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("E-value threshold x (expected false hits per query)")
    ax.set_ylabel("observed hits per query with E <= x")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(cal: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(cal["grid"])
    curve = np.array(cal["curve"])
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.fill_between(grid, grid / 2, grid * 2, color="0.9", label="within 2x")
    ax.plot(grid, grid, color="0.4", lw=1, ls="--", label="expected = observed")
    positive = curve > 0
    ax.plot(grid[positive], curve[positive], "o-", ms=3, label="observed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("E-value threshold x (expected false hits per query)")
    ax.set_ylabel("observed hits per query with E <= x")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    cal = report["calibration"]
    lines = [
        f"# E-value calibration ({report['arch']}, {RANDOM_LABEL})",
        "",
        f"Model device: {report['device']}; load average at start {report['load_start']}, at end {report['load_end']}.",
        "",
        f"Held-out null database: {report['db_size']:,} shuffled E. coli sequences (seed {report['db_seed']}); "
        f"index decoys: {report['index_decoys']['count']:,} (block size {report['index_decoys']['block_size']}, "
        f"shape {report['index_decoys']['shape']:+.4f}); "
        f"{report['queries']} yeast queries, k = {report['k']}; queries whose k hits all had E <= 10: "
        f"{cal['truncated_queries']}.",
        "",
        "| E-value threshold x | expected hits per query | observed hits per query (95% CI) | observed / expected "
        "| queries with any |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in cal["rows"]:
        lo, hi = row["ci95"]
        lines.append(
            f"| {row['x']:g} | {row['x']:g} | {row['observed_mean']:.3f} ({lo:.3f}-{hi:.3f}) | {row['ratio']:.2f} "
            f"| {row['queries_with_any']} |"
        )
    lat = report["latency"]
    lines += [
        "",
        f"Latency, single-query Search RPCs (k = 10), {lat['requests_each']} each, alternating: "
        f"median {lat['median_ms']['with']:.1f} ms with E-values vs {lat['median_ms']['without']:.1f} ms without "
        f"= **{lat['ratio_median']:.3f}x** (means {lat['mean_ms']['with']:.1f} / {lat['mean_ms']['without']:.1f} ms "
        f"= {lat['ratio_mean']:.3f}x); the E-value step alone: {lat['evalue_step_ms_per_query']:.2f} ms per query "
        f"({lat['decoys']:,} decoys).",
    ]
    if "scop" in report:
        s = report["scop"]
        lines += [
            "",
            f"SCOPe ({s['dataset']}; {s['queries']} queries, k = 1000, {RANDOM_LABEL}): mean false positives "
            f"(another fold) per query with E <= 1: {s['mean_false_positives']['1.0']:.3f}; with E <= 0.01: "
            f"{s['mean_false_positives']['0.01']:.3f} (true positives, same fold, self excluded: "
            f"{s['mean_true_positives']['1.0']:.3f} and {s['mean_true_positives']['0.01']:.3f}); index build "
            f"{s['build'].get('total_seconds')} s, search {s['search_s']} s.",
        ]
    lines += ["", f"Command: `{report['command']}`; total wall time {report['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------ null database
def window(seq: str, length: int, rng: np.random.Generator) -> str:
    """A random window of ``length`` residues of ``seq`` (all of it if shorter)."""
    if len(seq) <= length:
        return seq
    start = int(rng.integers(0, len(seq) - length + 1))
    return seq[start : start + length]


def write_null_database(path: Path, n: int, seed: int, min_len: int, max_len: int) -> None:
    """``n`` shuffled windows of E. coli proteins, streamed to a FASTA file in chunks."""
    from esmsearch.significance import shuffle_residues

    source = [s for _, s in read_fasta(ECOLI)]
    rng = np.random.default_rng([seed, 4])
    tmp = path.with_suffix(".tmp")
    chunk = 100_000
    with open(tmp, "w", encoding="utf-8") as out:
        for at in range(0, n, chunk):
            m = min(chunk, n - at)
            picks = rng.integers(0, len(source), size=m)
            lengths = rng.integers(min_len, max_len + 1, size=m)
            windows = [window(source[i], int(k), rng) for i, k in zip(picks, lengths, strict=True)]
            shuffled = shuffle_residues(windows, seed + 7919 * (at // chunk + 1))
            out.write("".join(f">null_{at + j + 1:08d}\n{s}\n" for j, s in enumerate(shuffled)))
    os.replace(tmp, path)


def null_queries(n: int, seed: int, min_len: int, max_len: int) -> list[tuple[str, str]]:
    """Windows of ``n`` sampled yeast proteins, lengths uniform in ``[min_len, max_len]``."""
    rng = np.random.default_rng([seed, 5])
    return [(rid, window(seq, int(rng.integers(min_len, max_len + 1)), rng)) for rid, seq in yeast_queries(n, seed)]


def small_checkpoint(work: Path, layers: int, dim: int, heads: int) -> Path:
    """A seeded random-weight reduced ESM-2 (``layers`` layers, dimension ``dim``)."""
    from esmsearch.checkpoints import write_random_checkpoint

    name = f"esm2_t{layers}_{dim}d_random"
    path = work / "checkpoints" / f"{name}.pt"
    if not path.is_file():
        write_random_checkpoint(
            "esm2_t6_8M_UR50D",
            work / "checkpoints",
            seed=0,
            num_layers=layers,
            embed_dim=dim,
            attention_heads=heads,
            name=name,
        )
    return path


def ratio_row(evalues: Sequence[np.ndarray], xs: Sequence[float] = THRESHOLDS) -> list[float]:
    """Observed / expected null hits per query at each threshold."""
    return [float(np.mean([(e <= x).sum() for e in evalues]) / x) for x in xs]


def factor(r: float) -> float:
    """How far a ratio is from 1, either way (inf for no hits at all)."""
    return math.inf if r <= 0 else max(r, 1.0 / r)


def tail_variants(
    hit_scores: Sequence[np.ndarray], decoy_scores: np.ndarray, shape: float, block: int, n: int
) -> dict[str, list[np.ndarray]]:
    """E-values of the same hits under four tails of the per-query null (see the module docstring).

    Args:
        hit_scores: per query, float64 ``[k]`` cosine scores of its hits.
        decoy_scores: float64 ``[q, decoys]`` the queries' scores against the index's decoys.
        shape: the index's GEV shape; block: decoys per block; n: the database size.
    """
    from esmsearch.significance import GevFit, block_maxima, evalues_from_fit, fit_gev, tail_join, tail_transform

    m = block_maxima(tail_transform(decoy_scores), block)
    mu, sig = fit_gev(m, shape)
    fit = GevFit(mu, np.maximum(sig, 1e-9), shape, block)
    join = tail_join(fit)
    # POT: exponential fitted (MLE = mean excess) to the top 20% of each query's block maxima
    top = max(3, m.shape[1] // 5)
    srt = np.sort(m, axis=1)
    threshold = srt[:, -top - 1]
    beta_pot = np.maximum((srt[:, -top:] - threshold[:, None]).mean(axis=1), 1e-9)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("gev", "tail", "pot", "gumbel")}
    mu0, sig0 = fit_gev(m, 0.0)
    for i, scores in enumerate(hit_scores):
        s = np.asarray(scores, dtype=np.float64)[None, :]
        one = GevFit(mu[i : i + 1], fit.scale[i : i + 1], shape, block)
        out["tail"].append(evalues_from_fit(s, one, n)[0])
        u = tail_transform(s)[0]
        z = (u - mu[i]) / fit.scale[i]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if shape == 0.0:
                t = np.exp(-z)
            else:
                a = 1.0 + shape * z
                t = np.where(a > 0, np.power(np.maximum(a, 0.0), -1.0 / shape), 0.0 if shape < 0 else np.inf)
            out["gev"].append(n * -np.expm1(-t / block))  # the formula before issue 18: E = 0 past the end point
            if join is not None:
                u_j, log_t_j = join[0][i], join[1][i]
                t_pot = np.where(u > u_j, np.exp(log_t_j - (u - u_j) / beta_pot[i]), t)
            else:
                t_pot = t
            out["pot"].append(n * -np.expm1(-t_pot / block))
            t0 = np.exp(-(u - mu0[i]) / max(sig0[i], 1e-9))
            out["gumbel"].append(n * -np.expm1(-t0 / block))
    return out


def heldout_maxima_fit(decoy_scores: np.ndarray, shape: float, block: int) -> list[str]:
    """Which tail fits the upper decoy block maxima: fit on the even blocks, count how many odd
    blocks exceed the level each model gives an exceedance probability p per block."""
    from esmsearch.significance import block_maxima, fit_gev, tail_transform

    m = block_maxima(tail_transform(decoy_scores), block)
    fit_m, test_m = m[:, 0::2], m[:, 1::2]
    if fit_m.shape[1] < 3 or test_m.shape[1] < 1:
        return ["(too few blocks for the held-out check)"]
    mu, sig = fit_gev(fit_m, shape)
    mu0, sig0 = fit_gev(fit_m, 0.0)
    top = max(3, fit_m.shape[1] // 5)
    srt = np.sort(fit_m, axis=1)
    thr = srt[:, -top - 1]
    beta = (srt[:, -top:] - thr[:, None]).mean(axis=1)
    p_thr = top / fit_m.shape[1]  # empirical exceedance probability of the threshold
    lines = [
        f"Held-out upper block maxima ({test_m.size:,} odd blocks of {block} decoys, models fitted on the even "
        "blocks): observed / expected number of blocks whose maximum exceeds the level each model puts at "
        "exceedance probability p per block",
        "",
        "| model | " + " | ".join(f"p = {p:g}" for p in (0.1, 0.03, 0.01, 0.003)) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, level in (
        (f"GEV, the index's shape {shape:+.3f}", lambda p: mu + sig * ((-np.log1p(-p)) ** -shape - 1) / shape),
        ("Gumbel (xi = 0)", lambda p: mu0 - sig0 * np.log(-np.log1p(-p))),
        ("exponential over the top 20% (POT)", lambda p: thr + beta * np.log(p_thr / p)),
    ):
        cells = []
        for p in (0.1, 0.03, 0.01, 0.003):
            if name.startswith("GEV") and shape == 0.0:
                lv = mu0 - sig0 * np.log(-np.log1p(-p))
            else:
                lv = level(p)
            observed = float((test_m > lv[:, None]).sum())
            cells.append(f"{observed / (p * test_m.size):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def shape_sensitivity(
    hit_scores: Sequence[np.ndarray],
    decoy_scores: np.ndarray,
    shapes: Sequence[tuple[str, float]],
    block: int,
    n: int,
) -> list[str]:
    """The same hits re-scored with the index's fit (GEV + tangent tail) at other regional shapes.

    Args:
        hit_scores: per query, float64 ``[k]`` cosine scores of its hits.
        decoy_scores: float64 ``[q, decoys]`` the queries' scores against the index's decoys.
        shapes: ``(where the shape comes from, xi)`` pairs.
        block: decoys per block; n: the database size.
    """
    lines = [
        "| regional shape from | xi | " + " | ".join(f"E <= {x:g}" for x in THRESHOLDS) + " |",
        "|---|---:|" + "---:|" * len(THRESHOLDS),
    ]
    for name, shape in shapes:
        ev = evalues_at(hit_scores, decoy_scores, shape, block, n)
        lines.append(f"| {name} | {shape:+.4f} | " + " | ".join(f"{r:.2f}" for r in ratio_row(ev)) + " |")
    return lines


def decoy_count_sensitivity(
    args: argparse.Namespace,
    index_dir: Path,
    model: Path,
    db_fasta: Path,
    query_vectors: np.ndarray,
    hit_scores: Sequence[np.ndarray],
) -> list[str]:
    """The same hits, observed / expected, with larger decoy sets than the index's.

    For each count in ``args.decoy_counts``: that many decoys made as a build makes them
    (:func:`esmsearch.significance.decoy_sequences`, the index's seed), embedded offline
    with the index's model (cached in ``args.work``), the regional shape estimated from
    the index's pseudo-queries as a build does (:meth:`DecoyNull.estimate_shape`), and
    each query's GEV (+ tangent tail) fitted to its block maxima at block sizes 100 and
    1,000. A larger block puts the fitted block maxima further into the tail that
    E <= 1 at this N needs (per-sequence probability 1 / N), so less is extrapolated.
    """
    from esmsearch.embedding import Embedder
    from esmsearch.sequences import read_fasta as read_records
    from esmsearch.significance import (
        DecoyNull,
        DecoySettings,
        decoy_sequences,
        pseudo_query_rows,
        sample_decoy_rows,
    )
    from esmsearch.store import Index, Manifest

    m = Manifest.read(index_dir)
    assert m.decoys is not None
    rows = pseudo_query_rows(m.count, m.decoys.seed)
    with Index.open(index_dir) as index:
        pseudo = np.asarray(index.embeddings()[rows], dtype=np.float32)
    lines = [
        "| decoys | block size | blocks per query | regional shape | "
        + " | ".join(f"E <= {x:g}" for x in THRESHOLDS)
        + " | decoy scoring per query |",
        "|---:|---:|---:|---:|" + "---:|" * len(THRESHOLDS) + "---:|",
    ]
    embedder = None
    for count in args.decoy_counts:
        cache = args.work / f"decoys-{count}-seed{m.decoys.seed}-{index_dir.name}.npy"
        if cache.is_file():
            decoys = np.load(cache)
        else:
            if embedder is None:
                embedder = Embedder(str(model), layer=m.layer, device=args.device)
            settings = DecoySettings(count=count, seed=m.decoys.seed)
            sequences = decoy_sequences(
                (r.sequence for r in read_records(db_fasta, unique_ids=None)), m.count, settings
            )
            t0 = time.perf_counter()
            decoys = embedder.embed(sequences)
            print(f"[decoys] embedded {count:,} decoys in {time.perf_counter() - t0:.0f} s", flush=True)
            np.save(cache, decoys)
        t0 = time.perf_counter()
        decoy_scores = (query_vectors @ decoys.T).astype(np.float64)
        per_query_ms = (time.perf_counter() - t0) * 1000 / len(query_vectors)
        for block in (100, 1000):
            if count // block < 30:
                continue
            settings = DecoySettings(count=count, seed=m.decoys.seed, block_size=block)
            column_of = {int(row): j for j, row in enumerate(sample_decoy_rows(m.count, settings))}
            own = np.array([column_of.get(int(r), -1) for r in rows], dtype=np.int64)
            shape = DecoyNull(decoys, settings).estimate_shape(pseudo, own)
            ev = evalues_at(hit_scores, decoy_scores, shape, block, m.count)
            lines.append(
                f"| {count:,} | {block:,} | {count // block:,} | {shape:+.4f} | "
                + " | ".join(f"{r:.2f}" for r in ratio_row(ev))
                + f" | {per_query_ms:.2f} ms |"
            )
            # Each query's own shape from its own block maxima (a three-parameter fit per
            # query, no regional estimate), clamped to the range a manifest accepts.
            own_shapes = per_query_shapes(decoy_scores, block)
            ev = [
                evalues_at([h], decoy_scores[i : i + 1], float(xi), block, m.count)[0]
                for i, (h, xi) in enumerate(zip(hit_scores, own_shapes, strict=True))
            ]
            lines.append(
                f"| {count:,} | {block:,} | {count // block:,} | per query: median {np.median(own_shapes):+.3f}, "
                f"IQR {np.percentile(own_shapes, 25):+.3f}..{np.percentile(own_shapes, 75):+.3f} | "
                + " | ".join(f"{r:.2f}" for r in ratio_row(ev))
                + f" | {per_query_ms:.2f} ms |"
            )
    return lines


def per_query_shapes(decoy_scores: np.ndarray, block: int) -> np.ndarray:
    """float64 ``[q]``: each query's GEV shape from the L-skewness of its own block maxima."""
    from esmsearch.significance import (
        MAX_SHAPE,
        MIN_SHAPE,
        block_maxima,
        l_moments,
        shape_from_lskewness,
        tail_transform,
    )

    _, _, t3 = l_moments(block_maxima(tail_transform(decoy_scores), block))
    return np.array([min(MAX_SHAPE, max(MIN_SHAPE, shape_from_lskewness(float(t)))) for t in t3])


def evalues_at(
    hit_scores: Sequence[np.ndarray], decoy_scores: np.ndarray, shape: float, block: int, n: int
) -> list[np.ndarray]:
    """Per query, the E-values of its hits under the index's method (GEV + tangent tail)."""
    from esmsearch.significance import GevFit, block_maxima, evalues_from_fit, fit_gev, tail_transform

    maxima = block_maxima(tail_transform(decoy_scores), block)
    mu, sig = fit_gev(maxima, shape)
    scale = np.maximum(sig, 1e-9)
    return [
        evalues_from_fit(
            np.asarray(h, dtype=np.float64)[None, :], GevFit(mu[i : i + 1], scale[i : i + 1], shape, block), n
        )[0]
        for i, h in enumerate(hit_scores)
    ]


def real_windows(n: int, seed: int, min_len: int, max_len: int) -> list[tuple[str, str]]:
    """``n`` unshuffled windows of E. coli proteins (what the null database's sequences were before shuffling)."""
    source = [s for _, s in read_fasta(ECOLI)]
    rng = np.random.default_rng([seed, 6])
    out = []
    for i in range(n):
        seq = source[int(rng.integers(0, len(source)))]
        out.append((f"ecoli_window_{i}", window(seq, int(rng.integers(min_len, max_len + 1)), rng)))
    return out


def null_run(args: argparse.Namespace) -> int:
    """``--null-db N``: calibration against a null database of N short shuffled sequences."""
    from esmsearch.store import Index, Manifest

    t_start = time.perf_counter()
    load_start = load_average()
    print(f"CPU: {cpu_name()}; model device: {device_name(args.device)}; load average: {load_start}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = small_checkpoint(args.work, args.null_layers, args.null_dim, args.null_heads)
    label = f"{model.stem} ({RANDOM_LABEL})"
    tag = f"{args.null_db}_seed{args.db_seed}_len{args.null_min_len}-{args.null_max_len}"
    db_fasta = args.work / f"null_short_{tag}.fasta"
    if not db_fasta.is_file():
        t0 = time.perf_counter()
        write_null_database(db_fasta, args.null_db, args.db_seed, args.null_min_len, args.null_max_len)
        print(f"wrote {db_fasta} in {time.perf_counter() - t0:.0f} s", flush=True)
    index_dir = args.work / f"null-short-index-{tag}-{model.stem}"
    build_figures = build(db_fasta, index_dir, model, args.decoys, "null db", args.device)
    queries = null_queries(args.queries, args.query_seed, args.null_min_len, args.null_max_len)
    t0 = time.perf_counter()
    results, vectors = search_all(index_dir, queries, args.k, args.device)
    search_s = time.perf_counter() - t0
    cal = calibration(results, args.k)
    m = Manifest.read(index_dir)
    assert m.decoys is not None
    with Index.open(index_dir) as index:
        assert index.null is not None
        decoy_scores = (vectors @ np.asarray(index.null.decoys).T).astype(np.float64)
    hit_scores = [np.array([h.cosine_score for h in r.hits], dtype=np.float64) for r in results]
    served = [np.array([h.evalue for h in r.hits], dtype=np.float64) for r in results]
    variants = tail_variants(hit_scores, decoy_scores, m.decoys.shape, m.decoys.block_size, m.count)
    names = {
        "gev": "GEV alone (E = 0 past its end point; before issue 18)",
        "tail": "GEV + tangent exponential tail (esmsearch, recomputed)",
        "pot": "GEV + exponential fitted to the top 20% of block maxima (POT)",
        "gumbel": "Gumbel on u (xi = 0)",
    }
    lines = [
        f"# E-value calibration on a null database of {m.count:,} sequences ({label})",
        "",
        f"{m.count:,} shuffled windows ({args.null_min_len}-{args.null_max_len} residues) of E. coli proteins "
        f"(seed {args.db_seed}); index decoys {m.decoys.count:,} in blocks of {m.decoys.block_size}, shape "
        f"{m.decoys.shape:+.4f}; {len(queries)} yeast windows as queries, k = {args.k} through the server and "
        f"client ({cal['truncated_queries']} queries had all k hits at E <= 10). CPU: {cpu_name()}; model "
        f"device: {device_name(args.device)}; load average {load_start} at start.",
        "",
        "| E <= x | expected per query | observed per query (95% CI) | observed / expected | factor | within 2x |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in cal["rows"]:
        lo, hi = row["ci95"]
        f = factor(row["ratio"])
        lines.append(
            f"| {row['x']:g} | {row['x']:g} | {row['observed_mean']:.4f} ({lo:.4f}-{hi:.4f}) | {row['ratio']:.2f} "
            f"| {f:.2f} | {'yes' if f <= 2 else 'NO'} |"
        )
    lines += [
        "",
        "The same hits re-scored offline with other tails (observed / expected; hits with E exactly 0):",
        "",
        "| tail | " + " | ".join(f"E <= {x:g}" for x in THRESHOLDS) + " | hits with E = 0 |",
        "|---|" + "---:|" * (len(THRESHOLDS) + 1),
        "| served by the server (float32) | "
        + " | ".join(f"{r:.2f}" for r in ratio_row(served))
        + f" | {int(sum((e == 0).sum() for e in served))} |",
    ]
    for key, name in names.items():
        ev = variants[key]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r:.2f}" for r in ratio_row(ev))
            + f" | {int(sum((e == 0).sum() for e in ev))} |"
        )
    lines += ["", *heldout_maxima_fit(decoy_scores, m.decoys.shape, m.decoys.block_size)]
    # Where the index's shape comes from: its pseudo-queries are database sequences, here
    # shuffled ones; a real database's are real proteins. The same hits at other shapes:
    from esmsearch.significance import PSEUDO_QUERIES, regional_shape

    real = real_windows(PSEUDO_QUERIES, args.db_seed, args.null_min_len, args.null_max_len)
    _, real_vectors = search_all(index_dir, real, 1, args.device)
    with Index.open(index_dir) as index:
        assert index.null is not None
        shape_real = regional_shape(index.null.block_maxima(np.asarray(real_vectors, dtype=np.float32)))
        shape_queries = regional_shape(index.null.block_maxima(np.asarray(vectors, dtype=np.float32)))
    n_pseudo = min(PSEUDO_QUERIES, m.count)
    shapes = [
        (f"the index's {n_pseudo} pseudo-queries (shuffled database sequences; served)", m.decoys.shape),
        (f"{len(real)} real (unshuffled) E. coli windows, as a real database's pseudo-queries", shape_real),
        (f"the {len(queries)} yeast queries themselves", shape_queries),
    ]
    lines += [
        "",
        "Shape sensitivity: the same hits, observed / expected, with the index's fit (GEV + tangent tail) "
        "at the regional shape estimated from other sequences against the same decoys:",
        "",
        *shape_sensitivity(hit_scores, decoy_scores, shapes, m.decoys.block_size, m.count),
    ]
    if args.decoy_counts:
        lines += [
            "",
            "Decoy-count sensitivity: the same hits, observed / expected, with larger decoy sets made and "
            "embedded as a build does (same seed), the shape re-estimated from the index's pseudo-queries, "
            "at block sizes 100 and 1,000:",
            "",
            *decoy_count_sensitivity(args, index_dir, model, db_fasta, vectors, hit_scores),
        ]
    wall = time.perf_counter() - t_start
    command = "python benchmarks/evalue_calibration.py " + " ".join(args.argv)
    lines += [
        "",
        f"Command: `{command}`; build {build_figures.get('wall_s', 'reused')} s, search {search_s:.0f} s, "
        f"total {wall:.0f} s; load average at end {load_average()}.",
        "",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evalue_null_calibration.md").write_text(text)
    report = {
        "model": label,
        "cpu": cpu_name(),
        "device": device_name(args.device),
        "db_size": m.count,
        "decoys": m.decoys.to_json(),
        "queries": len(queries),
        "k": args.k,
        "calibration": cal,
        "variants": {key: ratio_row(variants[key]) for key in names},
        "shapes": {name: shape for name, shape in shapes},
        "build": build_figures,
        "search_s": round(search_s, 1),
        "wall_s": round(wall, 1),
        "command": command,
    }
    (args.out / "evalue_null_calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="esm2_t6_8M_UR50D", help="random-weight ESM-2 architecture")
    p.add_argument("--db-size", type=int, default=20_000, help="held-out null database size")
    p.add_argument("--db-seed", type=int, default=1, help="seed of the held-out null database")
    p.add_argument("--decoys", type=int, default=10_000, help="decoys of the index (esmsearch index build --decoys)")
    p.add_argument("--queries", type=int, default=200, help="yeast queries")
    p.add_argument("--query-seed", type=int, default=0)
    p.add_argument("--k", type=int, default=1000, help="hits per query")
    p.add_argument("--latency-queries", type=int, default=50, help="queries of the latency comparison")
    p.add_argument("--latency-rounds", type=int, default=2)
    p.add_argument("--scop", action="store_true", help="also the SCOPe false-positive figures (heavy)")
    p.add_argument("--scop-max-queries", type=int, default=None, help="SCOPe smoke test: fewer queries")
    p.add_argument("--scop-max-targets", type=int, default=None, help="SCOPe smoke test: a sampled database")
    p.add_argument("--build-only", action="store_true", help="build the indexes and stop")
    p.add_argument("--device", default="cpu", help="model device of the builds and servers (cpu, cuda)")
    p.add_argument(
        "--save-scores", type=Path, default=None, help="also save the queries' decoy and database scores here"
    )
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only time the E-value step against single-query embedding on the CPU, and stop",
    )
    p.add_argument(
        "--compare-methods",
        type=Path,
        default=None,
        metavar="DIR",
        help="only compare null models on scores saved by --save-scores in DIR, and stop",
    )
    p.add_argument(
        "--null-db",
        type=int,
        default=None,
        metavar="N",
        help="only the null-database calibration at N short shuffled sequences (>= 1,000,000 for the real run)",
    )
    p.add_argument(
        "--decoy-counts",
        type=lambda t: [int(x) for x in t.split(",") if x],
        default=[],
        help="--null-db: also re-score the hits with these larger decoy sets (e.g. 100000), embedded offline",
    )
    p.add_argument("--null-min-len", type=int, default=30, help="shortest null sequence / query window")
    p.add_argument("--null-max-len", type=int, default=150, help="longest null sequence / query window")
    p.add_argument("--null-layers", type=int, default=2, help="layers of the small random-weight model")
    p.add_argument("--null-dim", type=int, default=64, help="embedding dimension of the small random-weight model")
    p.add_argument("--null-heads", type=int, default=4, help="attention heads of the small random-weight model")
    p.add_argument("--work", type=Path, default=ROOT / "work" / "evalue-bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.null_db is not None:
        return null_run(args)
    if args.cost_only:
        print(cost_only(args.arch, args.work, args.decoys, args.latency_queries))
        return 0
    if args.compare_methods is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        print(compare_methods(args.compare_methods, args.db_size, args.decoys, args.out / "evalue_methods.png"))
        return 0
    t_start = time.perf_counter()
    load_start = load_average()
    print(f"CPU: {cpu_name()}; model device: {device_name(args.device)}; load average: {load_start}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.arch, args.work)
    db_fasta = args.work / f"null_db_{args.db_size}_seed{args.db_seed}.fasta"
    if not db_fasta.is_file():
        write_fasta(heldout_database(args.db_size, args.db_seed), db_fasta)
    index = args.work / f"null-index-{args.db_size}"
    build_figures = build(db_fasta, index, model, args.decoys, "null db", args.device)
    if args.build_only:
        return 0
    queries = yeast_queries(args.queries, args.query_seed)
    t0 = time.perf_counter()
    results, vectors = search_all(index, queries, args.k, args.device)
    search_s = time.perf_counter() - t0
    if args.save_scores is not None:
        save_scores(index, vectors, args.save_scores, "null", top_k=None)
    cal = calibration(results, args.k)
    print("calibration (observed / expected hits per query):", flush=True)
    for row in cal["rows"]:
        print(
            f"  E <= {row['x']:g}: observed {row['observed_mean']:.3f} per query (95% CI {row['ci95'][0]:.3f}-"
            f"{row['ci95'][1]:.3f}), ratio {row['ratio']:.2f}",
            flush=True,
        )
    lat = latency(
        index,
        strip_decoys(index, args.work / "null-index-nodecoys"),
        queries[: args.latency_queries],
        args.latency_rounds,
        args.device,
    )
    print(
        f"latency: median {lat['median_ms']['with']:.1f} ms with E-values, {lat['median_ms']['without']:.1f} ms "
        f"without: {lat['ratio_median']:.3f}x; E-value step {lat['evalue_step_ms_per_query']:.2f} ms/query",
        flush=True,
    )
    from esmsearch.store import Manifest

    m = Manifest.read(index)
    report: dict[str, Any] = {
        "arch": args.arch,
        "cpu": cpu_name(),
        "device": device_name(args.device),
        "load_start": load_start,
        "db_size": args.db_size,
        "db_seed": args.db_seed,
        "index_decoys": m.decoys.to_json() if m.decoys else None,
        "queries": len(queries),
        "k": args.k,
        "build": build_figures,
        "search_s": round(search_s, 1),
        "calibration": cal,
        "latency": lat,
        "command": "python benchmarks/evalue_calibration.py" + (" " + " ".join(argv) if argv else ""),
    }
    write_report(report, args, t_start)  # now, and again with the SCOPe figures
    if args.scop:
        report["scop"] = scop_false_positives(
            args.work,
            model,
            args.decoys,
            args.device,
            args.save_scores,
            args.scop_max_queries,
            args.scop_max_targets,
        )
        print(f"SCOPe: {json.dumps(report['scop']['mean_false_positives'])} false positives per query", flush=True)
        write_report(report, args, t_start)
    print(markdown(report))
    return 0


def write_report(report: dict[str, Any], args: argparse.Namespace, t_start: float) -> None:
    """Write the JSON, Markdown and PNG outputs of what has been measured so far."""
    report["load_end"] = load_average()
    report["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evalue_calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "evalue_calibration.md").write_text(markdown(report))
    plot(
        report["calibration"],
        args.out / "evalue_calibration.png",
        f"{args.arch} ({RANDOM_LABEL}): {report['queries']} yeast queries vs {args.db_size:,} shuffled sequences",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
