"""Server memory after start and query latency on a multi-million-vector index, next to a
1,000-vector index of the same model (issue 11, part 3).

Takes an index file that ``benchmarks/out_of_core.py`` built (default: its 5,000,000 x
320 ``IVF4096,PQ32``; ``--faiss`` for others, e.g. ``IVF4096,SQ8``) and the database
file it was built from, and wraps them into proper esmsearch index directories
(``index.faiss`` and ``embeddings.npy`` hard-linked, not copied; ``metadata.sqlite``
with one synthetic row per vector; ``manifest.json`` naming a random-weight
esm2_t6_8M checkpoint, whose width is 320). A second directory holds the first
1,000 vectors of the same database in a ``Flat`` index: a server that holds the
model and almost no index, the baseline.

For each directory, a fresh ``esmsearch serve DIR --device cpu`` process (index files
memory-mapped, the default) is started; once it prints its address (health SERVING)
its ``/proc/<pid>/status`` gives ``VmRSS`` (resident, private + file-backed),
``RssAnon`` (private) and ``RssFile`` (mapped file pages); then it answers, one at a
time, ``--queries`` ``Search`` RPCs (real E. coli proteins of <= 500 residues, k = 10:
embedding + search) and as many ``SearchByEmbedding`` RPCs (seeded random unit
vectors: search only), whose client-side latencies give p50/p95; the status is read
again afterwards. Printed: both servers side by side, and the difference (what the
large index costs beyond the model).

Usage (the 5M files must exist: run benchmarks/out_of_core.py first)::

    uptime; flock /tmp/esmsearch-bench.lock python benchmarks/serve_memory.py; uptime
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model, proc_status_kib

HERE = Path(__file__).resolve().parent
ECOLI = HERE.parent.parent / "shared" / "data" / "seqdb" / "UP000000625_83333_Ecoli_K12_2020.fasta"
BENCH = Path("/tmp/esmsearch-out-of-core-bench")
DIM = 320


def status_mib(pid: int) -> dict[str, float]:
    return {key: kib / 1024 for key, kib in proc_status_kib(pid).items()}


def make_index_dir(out: Path, faiss_file: Path, db: Path, rows: int | None, factory: str, checkpoint: Path) -> Path:
    """An esmsearch index directory around an existing FAISS file and .npy database."""
    import faiss

    from esmsearch import vector_index
    from esmsearch.embedding import Embedder
    from esmsearch.store import IndexWriter

    if (out / "manifest.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    emb = Embedder(str(checkpoint), device="cpu")
    vectors = np.load(db, mmap_mode="r")
    n = vectors.shape[0] if rows is None else rows
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    with IndexWriter(work) as w:
        if rows is None:
            os.link(db, w.embeddings_path())
            os.link(faiss_file, w.directory / "index.faiss")
            index = vector_index.read(faiss_file, mmap=True)
            ivf = faiss.extract_index_ivf(index)
            params = {"nprobe": int(ivf.nprobe)}
            del index
        else:
            sub = np.ascontiguousarray(vectors[:n], dtype=np.float32)
            w.write_embeddings(sub)
            w.write_faiss(vector_index.build(sub, vector_index.validate_factory(factory, DIM)))
            params = {}
        t0 = time.perf_counter()
        w.add_metadata(
            (f"synthetic{i:08d}", "synthetic vector", 300, hashlib.sha256(str(i).encode()).hexdigest())
            for i in range(n)
        )
        w.commit()
        print(f"# {out.name}: metadata for {n:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        w.finish(
            model_name=emb.model_name,
            model_source=emb.model_source,
            checkpoint_sha256=emb.checkpoint_sha256,
            layer=emb.layer,
            pooling="mean_residues",
            normalisation="l2",
            precision=emb.precision,
            metric="inner_product",
            dim=DIM,
            index_factory=factory,
            search_params=params,
            source_fasta="synthetic (benchmarks/out_of_core.py)",
            source_fasta_sha256="0" * 64,
            tool_version="benchmark",
        )
    os.rename(work, out)
    return out


def measure(index_dir: Path, queries: list[str], n_vectors: int) -> dict[str, float]:
    from esmsearch.client import SearchClient

    cmd = [sys.executable, "-m", "esmsearch.cli", "serve", str(index_dir), "--port", "0", "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        start_s = time.perf_counter() - t0
        address = line.rsplit(" on ", 1)[1].strip()
        after_start = status_mib(proc.pid)
        rng = np.random.default_rng(7)
        vecs = rng.standard_normal((n_vectors, DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        search_ms: list[float] = []
        vector_ms: list[float] = []
        with SearchClient(address, timeout_s=300) as client:
            for q in queries:
                t = time.perf_counter()
                client.search({"q": q}, k=10)
                search_ms.append((time.perf_counter() - t) * 1000)
            for v in vecs:
                t = time.perf_counter()
                client.search_by_embedding(v[None, :], k=10)
                vector_ms.append((time.perf_counter() - t) * 1000)
        after = status_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    return {
        "start_s": start_s,
        **{f"start_{k}": v for k, v in after_start.items()},
        **{f"after_{k}": v for k, v in after.items()},
        "search_p50": statistics.median(search_ms),
        "search_p95": float(np.percentile(search_ms, 95)),
        "vector_p50": statistics.median(vector_ms),
        "vector_p95": float(np.percentile(vector_ms, 95)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faiss", type=Path, default=BENCH / "ooc_IVF4096_PQ32_n5000000" / "index.faiss")
    parser.add_argument("--factory", default="IVF4096,PQ32", help="factory string of --faiss")
    parser.add_argument("--db", type=Path, default=BENCH / "db_5000000x320_f5000x10_s0.npy")
    parser.add_argument("--work", type=Path, default=Path("/tmp/esmsearch-serve-memory"))
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args(argv)

    from Bio import SeqIO

    from esmsearch.checkpoints import write_random_checkpoint

    print(f"# serve_memory: {cpu_model()}, {os.cpu_count()} cores; load average at start {os.getloadavg()}")
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = write_random_checkpoint("esm2_t6_8M_UR50D", args.work / "ckpt", seed=0)
    tag = args.factory.replace(",", "_")
    big = make_index_dir(args.work / f"index-{tag}", args.faiss, args.db, None, args.factory, checkpoint)
    small = make_index_dir(args.work / "index-flat-1k", args.faiss, args.db, 1000, "Flat", checkpoint)
    queries = []
    for rec in SeqIO.parse(str(ECOLI), "fasta"):
        if len(rec.seq) <= 500 and not set(str(rec.seq)) - set("ACDEFGHIKLMNPQRSTVWY"):
            queries.append(str(rec.seq))
        if len(queries) >= args.queries:
            break
    sizes = {d: sum(p.stat().st_size for p in d.iterdir()) / 2**30 for d in (big, small)}
    rows = []
    from esmsearch.store import Manifest

    count = Manifest.read(big).count
    big_label = f"{count / 1e6:g}M {args.factory}" if count >= 1_000_000 else f"{count:,} {args.factory}"
    for label, d in (("1k Flat (model only)", small), (big_label, big)):
        r = measure(d, queries, args.queries)
        rows.append((label, d, r))
        print(f"# measured {label}: {r}", flush=True)
    print(
        "\nserver\tindex files GiB\tstart s\tRSS after start MiB (anon + file)\tRSS after queries MiB (anon + file)"
        "\tSearch p50 / p95 ms\tSearchByEmbedding p50 / p95 ms"
    )
    for label, d, r in rows:
        print(
            f"{label}\t{sizes[d]:.2f}\t{r['start_s']:.1f}\t"
            f"{r['start_VmRSS']:.0f} ({r['start_RssAnon']:.0f} + {r['start_RssFile']:.0f})\t"
            f"{r['after_VmRSS']:.0f} ({r['after_RssAnon']:.0f} + {r['after_RssFile']:.0f})\t"
            f"{r['search_p50']:.1f} / {r['search_p95']:.1f}\t{r['vector_p50']:.2f} / {r['vector_p95']:.2f}"
        )
    base, large = rows[0][2], rows[1][2]
    print(
        f"\n{big_label} beyond the model, after start: {large['start_VmRSS'] - base['start_VmRSS']:.0f} MiB resident "
        f"({large['start_RssAnon'] - base['start_RssAnon']:.0f} MiB private); after {args.queries} + "
        f"{args.queries} queries: {large['after_VmRSS'] - base['after_VmRSS']:.0f} MiB resident "
        f"({large['after_RssAnon'] - base['after_RssAnon']:.0f} MiB private) (target <= 1,536 MiB)"
    )
    print(
        f"Search p50 {big_label} / 1k Flat: {large['search_p50']:.1f} / {base['search_p50']:.1f} ms = "
        f"{large['search_p50'] / base['search_p50']:.2f}x; SearchByEmbedding p50: {large['vector_p50']:.2f} / "
        f"{base['vector_p50']:.2f} ms"
    )
    print(f"# load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
