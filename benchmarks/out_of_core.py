"""Out-of-core FAISS index builds: time, peak RSS, size and recall@10, next to the in-memory build.

Measures :func:`esmsearch.vector_index.build_out_of_core` (issue 11, part 2) on
``--n`` (default 5,000,000) synthetic vectors of dim 320 (esm2_t6_8M's), for
each ``--specs`` factory string (default ``IVF<nlist>,PQ32`` and ``IVF<nlist>,SQ8``
with their inverted lists in RAM, the default when they fit the memory budget, and
``IVF<nlist>,SQ8`` forced onto on-disk lists with a 1 GiB budget, i.e. 256 MiB
shards), and, as the baseline, :func:`esmsearch.vector_index.build`
over the whole array in RAM against the out-of-core build of the same spec at
``--baseline-n`` (default 1,000,000, where the in-memory build fits).

Data (seeded, reproducible chunk by chunk, never all in RAM): a two-level
Gaussian mixture like ``benchmarks/index_recall.py``'s, scaled up --
``--families`` (5,000) family centres ~ N(0, I) in a 32-dimensional latent
space, ``--subfamilies`` (10) subfamily centres per family at family + 0.8 N(0, I)
(50,000 centres in all); a point is a random subfamily centre + 0.6 N(0, I),
mapped to 320 dimensions by a fixed random linear map, plus 0.1 N(0, I) isotropic
noise, then L2-normalised. Chunk ``i`` of 100,000 rows is drawn from
``numpy.random.default_rng([seed, i])``; the 1,000 held-out queries come from
another stream of the same mixture. The database is written once to a float32
``.npy`` file in ``--work-dir`` (6.4 GB at 5M x 320; reused by later runs with the
same parameters) and streamed from it with plain file reads, not a memory map,
so a build's resident memory counts what it holds, not the page cache.

Each build runs in a fresh process under ``benchmarks/_measure.py``, whose
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the build's peak RSS (Linux counts
file pages a process has mapped, such as on-disk lists being written, too). The
out-of-core chunk source is ``--chunk-rows`` rows per chunk, the training sample
:func:`~esmsearch.vector_index.default_training_sample_size` (or
``--points-per-centroid`` x nlist). Recall@10 is the mean overlap of each query's
10 hits with its exact 10 nearest database rows (inner product, computed chunked
over the file), searched on the index read back with ``mmap=True`` at the
search parameters stored in it (``nprobe`` = ``default_nprobe(nlist)``), and two
more ways: at 4x that nprobe (what storing a larger one would give), and with the
top 100 candidates re-ranked exactly by :func:`~esmsearch.vector_index.rerank`
against the database file, memory-mapped (the second stage that lifts PQ's recall).
``--nlist`` defaults to 4096, not the 8,192 that ``auto_spec`` picks at 5M: on 2
cores the k-means training and the assignment of every vector both scale with
nlist, and 8,192 would take the full run past 90 minutes.

Usage::

    nice -n 10 python benchmarks/out_of_core.py                       # 5M, writes results/out_of_core_5M.txt
    python benchmarks/out_of_core.py --n 200000 --baseline-n 100000 --nlist 256   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _machine import cpu_model

from esmsearch import vector_index as vi

HERE = Path(__file__).resolve().parent
MEASURE = HERE / "_measure.py"
LATENT_DIM = 32
GEN_CHUNK_ROWS = 100_000


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Mixture:
    """The seeded two-level Gaussian mixture (see the module docstring)."""

    dim: int
    families: int
    subfamilies: int
    seed: int

    def centres_and_map(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (subfamily centres float32 [families * subfamilies, 32], map float32 [32, dim])."""
        rng = np.random.default_rng([self.seed, 12345])
        families = rng.standard_normal((self.families, LATENT_DIM), dtype=np.float32)
        centres = np.repeat(families, self.subfamilies, axis=0)
        centres += 0.8 * rng.standard_normal(centres.shape, dtype=np.float32)
        projection = rng.standard_normal((LATENT_DIM, self.dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
        return centres, projection

    def chunk(self, stream: int, index: int, rows: int, centres: np.ndarray, projection: np.ndarray) -> np.ndarray:
        """Rows of chunk ``index`` of ``stream`` (0: database, 1: queries): float32 [rows, dim], unit norm."""
        rng = np.random.default_rng([self.seed, stream, index])
        z = centres[rng.integers(0, len(centres), rows)]
        z += 0.6 * rng.standard_normal((rows, LATENT_DIM), dtype=np.float32)
        x: np.ndarray = z @ projection + 0.1 * rng.standard_normal((rows, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def write_database(path: Path, n: int, mix: Mixture) -> float:
    """Writes ``n`` database rows to ``path`` (float32 .npy), chunk by chunk; returns seconds."""
    t0 = time.perf_counter()
    centres, projection = mix.centres_and_map()
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, mix.dim))
    for i, start in enumerate(range(0, n, GEN_CHUNK_ROWS)):
        rows = min(GEN_CHUNK_ROWS, n - start)
        out[start : start + rows] = mix.chunk(0, i, rows, centres, projection)
    out.flush()
    del out
    os.replace(tmp, path)
    return time.perf_counter() - t0


def npy_layout(path: Path) -> tuple[int, int, int]:
    """(rows, dim, header bytes) of a C-ordered float32 .npy file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran or dtype != np.float32 or len(shape) != 2:
        raise ValueError(f"{path} is not a C-ordered float32 matrix")
    return int(shape[0]), int(shape[1]), offset


def read_chunks(path: Path, n: int, chunk_rows: int) -> Iterator[np.ndarray]:
    """Yields the first ``n`` rows of ``path`` in chunks, by plain reads (no memory map)."""
    _, dim, offset = npy_layout(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            chunk = np.fromfile(fh, dtype=np.float32, count=rows * dim).reshape(rows, dim)
            yield chunk
            del chunk


def exact_top_k(path: Path, n: int, queries: np.ndarray, k: int, chunk_rows: int = 250_000) -> np.ndarray:
    """Exact inner-product top-``k`` rows of each query over the first ``n`` rows, chunked: int64 [q, k]."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    start = 0
    for chunk in read_chunks(path, n, chunk_rows):
        flat = faiss.IndexFlatIP(chunk.shape[1])
        flat.add(chunk)
        scores, rows = flat.search(queries, k)
        scores_all = np.concatenate([best_scores, scores], axis=1)
        rows_all = np.concatenate([best_rows, rows + start], axis=1)
        order = np.argsort(-scores_all, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores_all, order, axis=1)
        best_rows = np.take_along_axis(rows_all, order, axis=1)
        start += chunk.shape[0]
    return best_rows


def recall_at_k(rows: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows found in the approximate top-k."""
    k = truth.shape[1]
    hits: int = sum(len(np.intersect1d(a, b)) for a, b in zip(rows, truth, strict=True))
    return hits / (k * len(truth))


# --------------------------------------------------------------------------- workers (one fresh process per build)


def worker(args: argparse.Namespace) -> int:
    """Builds one index (``--worker ooc|inmem``) and writes its phase timings as JSON."""
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    spec = vi.IndexSpec.from_json(json.loads(args.spec_json))
    sample_size = args.sample_size or None  # 0: the index needs no training
    db = Path(args.db)
    _, dim, _ = npy_layout(db)
    out = Path(args.index)
    t0 = time.perf_counter()
    info: dict[str, object] = {}
    if args.worker == "ooc":
        passes: list[float] = []

        def chunks() -> Iterator[np.ndarray]:
            passes.append(time.perf_counter())
            return read_chunks(db, args.n, args.chunk_rows)

        ondisk = {"auto": None, "on": True, "off": False}[args.ondisk]
        result = vi.build_out_of_core(
            chunks,
            args.n,
            dim,
            spec,
            out,
            sample_size=sample_size,
            seed=args.seed,
            ondisk=ondisk,
            memory_budget_bytes=args.budget,
        )
        end = time.perf_counter()
        train_s = (passes[1] - passes[0]) if len(passes) == 2 else 0.0
        info.update(
            train_rows=result.train_rows,
            ondisk=result.ondisk,
            shards=result.shards,
            sample_train_s=train_s,
            add_s=end - (passes[-1] if passes else t0),
        )
    else:
        x = np.concatenate(list(read_chunks(db, args.n, args.chunk_rows)))  # the whole database in RAM
        t_load = time.perf_counter()
        index = vi.build(x, spec, seed=args.seed, train_sample=sample_size)
        t_build = time.perf_counter()
        vi.write(index, out)
        info.update(train_rows=min(sample_size or 0, args.n), ondisk=False, shards=0, load_s=t_load - t0)
        info.update(build_s=t_build - t_load)
    info["total_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(info), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------- driver


@dataclass
class Row:
    """One line of the results table."""

    label: str
    n: int
    factory: str
    nprobe: int | None
    train_rows: int
    lists: str
    train_s: float
    add_s: float
    wall_s: float
    rss_gib: float
    size_mb: float
    quality: Quality


def run_build(
    args: argparse.Namespace,
    mode: str,
    spec: vi.IndexSpec,
    n: int,
    db: Path,
    out_dir: Path,
    sample_size: int,
    ondisk: str,
    budget_gb: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs one build in a fresh measured process; returns (worker timings, _measure usage)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    measure_json, result_json = out_dir / "measure.json", out_dir / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--db", str(db), "--n", str(n)]
    cmd += ["--spec-json", json.dumps(spec.to_json()), "--index", str(out_dir / "index.faiss")]
    cmd += ["--result", str(result_json), "--chunk-rows", str(args.chunk_rows), "--seed", str(args.seed)]
    cmd += ["--sample-size", str(sample_size), "--ondisk", ondisk, "--threads", str(args.threads or 0)]
    if budget_gb is not None:
        cmd += ["--budget", str(int(budget_gb * (1 << 30)))]
    print(f"  $ {shlex.join(cmd[1:4])} ... ({mode}, {spec.factory}, n={n:,})", file=sys.stderr, flush=True)
    rc = subprocess.call([sys.executable, str(MEASURE), str(measure_json), "--", *cmd])
    if rc != 0:
        raise SystemExit(f"build {mode} {spec.factory} n={n} failed with exit status {rc}")
    return json.loads(result_json.read_text()), json.loads(measure_json.read_text())


@dataclass(frozen=True)
class Quality:
    """Recall of one index, searched after reading it back memory-mapped."""

    recall: float  # at the stored search parameters
    recall_wide: float  # at WIDE_NPROBE_FACTOR x nprobe (capped at nlist)
    recall_reranked: float  # RERANK_CANDIDATES_PER_HIT x k candidates at the stored parameters, re-ranked exactly
    ms_per_query: float  # batched, stored parameters


#: nprobe multiplier of the "wide" recall column.
WIDE_NPROBE_FACTOR = 4
#: Candidates per hit re-ranked exactly (vector_index.rerank) for the "re-ranked" column.
RERANK_CANDIDATES_PER_HIT = 10


def evaluate(index_path: Path, spec: vi.IndexSpec, queries: np.ndarray, truth: np.ndarray, db: Path) -> Quality:
    """Recall@k of the index read back with ``mmap=True``, three ways (see :class:`Quality`)."""
    k = truth.shape[1]
    index = vi.read(index_path, mmap=True)
    vi.apply_search_params(index, spec)
    vi.search(index, queries[:10], k)  # touch the mapped pages a little before timing
    t0 = time.perf_counter()
    _, rows = vi.search(index, queries, k)
    ms = (time.perf_counter() - t0) * 1e3 / len(queries)
    _, candidates = vi.search(index, queries, RERANK_CANDIDATES_PER_HIT * k)
    vectors = np.load(db, mmap_mode="r")
    _, reranked = vi.rerank(queries, candidates, vectors, k)
    wide = recall = recall_at_k(rows, truth)
    if spec.nprobe is not None:
        nlist = faiss.extract_index_ivf(index).nlist
        vi.apply_search_params(index, vi.IndexSpec(spec.factory, nprobe=min(nlist, WIDE_NPROBE_FACTOR * spec.nprobe)))
        wide = recall_at_k(vi.search(index, queries, k)[1], truth)
    return Quality(recall, wide, recall_at_k(reranked, truth), ms)


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("index.")) / 1e6


def label_n(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=320, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out queries")
    parser.add_argument("-k", type=int, default=10, help="recall@k")
    parser.add_argument(
        "--nlist",
        type=int,
        default=4096,
        help="IVF lists for the default specs (auto_spec would pick 8192 at 5M; 4096 halves the 2-core "
        "training and assignment time)",
    )
    parser.add_argument(
        "--specs",
        default="IVF{nlist},PQ32;IVF{nlist},SQ8;IVF{nlist},SQ8@ondisk",
        help="';'-separated factory strings; a '@ondisk' suffix forces on-disk lists with --ondisk-budget-gb",
    )
    parser.add_argument(
        "--baseline-n", type=int, default=1_000_000, help="size of the in-memory vs out-of-core comparison (0: skip)"
    )
    parser.add_argument("--baseline-spec", default="IVF{nlist},SQ8", help="factory string of the baseline pair")
    parser.add_argument(
        "--points-per-centroid",
        type=int,
        default=None,
        help="training sample = this x nlist (default: vector_index.default_training_sample_size)",
    )
    parser.add_argument("--ondisk", choices=["auto", "on", "off"], default="auto", help="on-disk inverted lists")
    parser.add_argument(
        "--ondisk-budget-gb",
        type=float,
        default=1.0,
        help="memory budget of '@ondisk' builds (GiB): each shard's lists take at most a quarter of it",
    )
    parser.add_argument("--budget-gb", type=float, default=None, help="memory budget of the lists (default: RAM/2)")
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="rows per streamed chunk")
    parser.add_argument("--families", type=int, default=5_000)
    parser.add_argument("--subfamilies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: FAISS's = cores)")
    parser.add_argument("--work-dir", default="/tmp/esmsearch-out-of-core-bench", help="data and indexes")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/out_of_core_<n>.txt)")
    # worker-only arguments
    parser.add_argument("--worker", choices=["ooc", "inmem"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--spec-json", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--sample-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    t_start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    mix = Mixture(args.dim, args.families, args.subfamilies, args.seed)
    n_db = max(args.n, args.baseline_n)
    db = work / f"db_{n_db}x{args.dim}_f{args.families}x{args.subfamilies}_s{args.seed}.npy"
    log: list[str] = []

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        log.append(line)

    if not db.exists():
        say(f"data: writing {n_db:,} x {args.dim} float32 to {db} ({n_db * args.dim * 4 / 1e9:.1f} GB) ...")
        say(f"data: {write_database(db, n_db, mix):.0f} s")
    else:
        say(f"data: reusing {db}")
    centres, projection = mix.centres_and_map()
    queries = mix.chunk(1, 0, args.queries, centres, projection)

    truths: dict[int, np.ndarray] = {}

    def truth_for(n: int) -> np.ndarray:
        if n not in truths:
            cache = work / f"truth_{db.stem}_n{n}_q{args.queries}_k{args.k}.npy"
            if cache.exists():
                truths[n] = np.load(cache)
            else:
                t0 = time.perf_counter()
                truths[n] = exact_top_k(db, n, queries, args.k)
                np.save(cache, truths[n])
                say(f"exact top-{args.k} over {n:,} rows for {args.queries} queries: {time.perf_counter() - t0:.0f} s")
        return truths[n]

    def sample_size_for(spec: vi.IndexSpec, n: int) -> int:
        if args.points_per_centroid is None:
            return vi.default_training_sample_size(spec, args.dim, n)
        return min(n, int(args.points_per_centroid) * vi.min_training_vectors(spec, args.dim))

    rows: list[Row] = []

    def measure(label: str, mode: str, factory: str, n: int) -> Row:
        factory, _, suffix = factory.partition("@")
        ondisk, budget_gb = ("on", args.ondisk_budget_gb) if suffix == "ondisk" else (args.ondisk, args.budget_gb)
        spec = vi.validate_factory(factory.format(nlist=args.nlist), args.dim)
        sample = sample_size_for(spec, n)
        out_dir = work / f"{mode}_{spec.factory.replace(',', '_')}{'_ondisk' if suffix else ''}_n{n}"
        timing, usage = run_build(args, mode, spec, n, db, out_dir, sample, ondisk, budget_gb)
        quality = evaluate(out_dir / "index.faiss", spec, queries, truth_for(n), db)
        if mode == "ooc":
            train_s, add_s = float(timing["sample_train_s"]), float(timing["add_s"])
        else:
            train_s, add_s = float("nan"), float("nan")
        row = Row(
            label=label,
            n=n,
            factory=spec.factory,
            nprobe=spec.nprobe,
            train_rows=int(timing["train_rows"]),
            lists="on disk" if timing["ondisk"] else "in RAM",
            train_s=train_s,
            add_s=add_s,
            wall_s=float(usage["wall_s"]),
            rss_gib=int(usage["max_rss_kib"]) / (1 << 20),
            size_mb=dir_size_mb(out_dir),
            quality=quality,
        )
        rows.append(row)
        say(
            f"done {label} {spec.factory} n={n:,}: wall {row.wall_s:.0f} s, peak RSS {row.rss_gib:.2f} GiB, "
            f"{row.size_mb:.0f} MB, {quality} (timings {json.dumps(timing)})"
        )
        return row

    say(
        f"# out-of-core benchmark: n={args.n:,} dim={args.dim} queries={args.queries} k={args.k} "
        f"mixture={args.families}x{args.subfamilies} threads={faiss.omp_get_max_threads()} faiss={faiss.__version__}"
    )
    for factory in [s.strip() for s in args.specs.split(";") if s.strip()]:
        measure("out-of-core", "ooc", factory, args.n)
    ratio_lines: list[str] = []
    if args.baseline_n:
        base = measure("baseline: in-memory build()", "inmem", args.baseline_spec, args.baseline_n)
        ooc = measure("out-of-core", "ooc", args.baseline_spec, args.baseline_n)
        ratio_lines.append(
            f"at n={args.baseline_n:,} ({base.factory}): peak RSS out-of-core / in-memory = "
            f"{ooc.rss_gib:.2f} / {base.rss_gib:.2f} GiB = {ooc.rss_gib / base.rss_gib:.2f}x; "
            f"wall {ooc.wall_s:.0f} / {base.wall_s:.0f} s = {ooc.wall_s / base.wall_s:.2f}x; "
            f"recall@{args.k} {ooc.quality.recall:.3f} / {base.quality.recall:.3f}"
        )

    def fmt(x: float) -> str:
        return "-" if x != x else f"{x:.0f}"

    table = [
        f"| build | n | index | nprobe | train rows | lists | sample+train s | add s | wall s | peak RSS GiB "
        f"| size MB | recall@{args.k} | ms/query | recall@{args.k}, {WIDE_NPROBE_FACTOR}x nprobe "
        f"| recall@{args.k}, top {RERANK_CANDIDATES_PER_HIT * args.k} re-ranked |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r.label} | {r.n:,} | {r.factory} | {r.nprobe} | {r.train_rows:,} | {r.lists} | {fmt(r.train_s)} | "
            f"{fmt(r.add_s)} | {r.wall_s:.0f} | {r.rss_gib:.2f} | {r.size_mb:,.0f} | {r.quality.recall:.3f} | "
            f"{r.quality.ms_per_query:.2f} | {r.quality.recall_wide:.3f} | {r.quality.recall_reranked:.3f} |"
        )
    header = [
        f"# python benchmarks/out_of_core.py {shlex.join(sys.argv[1:] if argv is None else argv)}",
        f"# {time.strftime('%Y-%m-%d %H:%M')}, CPU: {cpu_model()} x {os.cpu_count()} cores, FAISS threads "
        f"{faiss.omp_get_max_threads()}, faiss {faiss.__version__}, numpy {np.__version__}, "
        f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"total {time.perf_counter() - t_start:.0f} s",
        f"# data: {args.families}x{args.subfamilies} two-level Gaussian mixture, dim {args.dim}, seed {args.seed}; "
        f"{args.queries} held-out queries; chunks of {args.chunk_rows:,} rows; peak RSS = ru_maxrss of the build's "
        "own fresh process (benchmarks/_measure.py); recall on the index read back with mmap=True",
    ]
    report = "\n".join([*header, "", *table, "", *ratio_lines, ""])
    print(report)
    out = Path(args.out) if args.out else HERE / "results" / f"out_of_core_{label_n(args.n)}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\nlog:\n" + "\n".join(log) + "\n", encoding="utf-8")
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
