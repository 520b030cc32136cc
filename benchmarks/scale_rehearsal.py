"""Scale rehearsal: millions of sequences end to end through the real CLI (issue 18, part 5).

For each database size N (default 500,000, 1,000,000 and 2,000,000), in one run:

1. **Database.** N real-derived sequences, lengths 30-150 (seeded): half fragments of the
   shared proteomes (E. coli, yeast, *Nostoc*; ``../shared/data/seqdb``), half residue
   shuffles of such fragments. A second FASTA, the "next night's" database, has 1% of
   the records changed (same record id, a new fragment).
2. **Model.** A seeded random-weight ESM-2 of a *reduced* architecture (default 1 layer,
   dim 128, 8 heads; ``python -m esmsearch.checkpoints ... --name esm2_t1_128d_random``),
   small enough that embedding does not dominate the FAISS stages on 2 cores. Its
   rankings are meaningless: recall@10 below is served-vs-exact search over the *same*
   vectors (what the index type costs), never retrieval quality.
3. **First build**: ``esmsearch index build DB --root ROOT --index-factory auto``, run
   under ``benchmarks/_measure.py`` (wall time, peak RSS of the build process, which is
   also the driver: the rehearsal builds in one process). Stage times come from the
   manifest's ``build`` record.
4. **Kills**: the same build into a standalone directory, ``kill -9`` (the whole process
   group) at ``--kills`` seeded random moments of the first build's timeline (sorted,
   uniform in 5-95% of its wall time; attempt i is killed after the gap between moments
   i-1 and i, so every kill lands before the build could finish), each followed by
   ``--resume``; time lost per kill = (sum of every attempt's wall time - the first
   build's wall time) / kills. The finished build is compared with the first build file
   by file (the manifests' SHA-256 of embeddings, index, metadata, decoys).
   ``--kills-only`` runs just this phase against a first build an earlier run left in
   ``--work`` (its database, its ``build-first.usage.json`` and its version).
5. **Nightly rebuild**: the 1%-changed FASTA into ROOT (same factory): wall time and
   peak RSS against the first build, sequences reused/embedded.
6. **Explicit IVF-PQ**: the same FASTA into ROOT with ``--index-factory IVF<nlist>,PQ<m>``
   (everything reused: only the FAISS stages run).
7. **Serving**, for the auto version and the IVF-PQ version: ``esmsearch serve DIR`` ->
   RSS after start (``/proc/<pid>/status``), p50/p99 latency of one-query ``Search`` RPCs
   at 1 and 8 concurrent clients, recall@10 of the served hits against exact search
   (brute force over the version's ``embeddings.npy``) over ``--queries`` queries
   (fresh fragments, a seed other than the database's), and E-value calibration at
   that N: ``--queries`` shuffled queries (unrelated to every database sequence) searched
   at k = 100; observed number of hits with E <= 0.01, 0.1, 1, 10 against the expected
   ``E x queries``.

Results: one JSON line per N appended to ``--results`` and a table printed per N, with
the CPU named. Runs alone on the machine (not next to CI, test loops or other
benchmarks)::

    uptime; python benchmarks/scale_rehearsal.py; uptime
    python benchmarks/scale_rehearsal.py --smoke     # 3,000 sequences, a few minutes
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_model, proc_status_kib

HERE = Path(__file__).resolve().parent
SEQDB = HERE.parent.parent / "shared" / "data" / "seqdb"
SOURCES = (
    SEQDB / "UP000000625_83333_Ecoli_K12_2020.fasta",
    SEQDB / "UP000002311_559292_yeast.fasta.gz",
    SEQDB / "pLM-BLAST_examples_protein.fas",
)
#: Null queries come from here: SCOPe domains (many organisms), not the database's three
#: proteomes, whose overlapping fragments are composition twins of any query cut from them.
NULL_SOURCE = HERE.parent.parent / "shared" / "data" / "scop" / "astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"
AMINO = set("ACDEFGHIKLMNPQRSTVWY")
EVALUE_THRESHOLDS = (0.01, 0.1, 1.0, 10.0)
ESMSEARCH = [sys.executable, "-m", "esmsearch.cli"]


# -- data -------------------------------------------------------------------------------------
def read_sources(paths: tuple[Path, ...] = SOURCES) -> list[tuple[str, str]]:
    """(accession, residues) of every source protein, non-standard residues removed."""
    from Bio import SeqIO

    proteins = []
    for path in paths:
        handle = gzip.open(path, "rt") if path.suffix == ".gz" else open(path, encoding="utf-8")
        with handle:
            for rec in SeqIO.parse(handle, "fasta"):
                seq = "".join(c for c in str(rec.seq).upper() if c in AMINO)
                if len(seq) >= 30:
                    proteins.append((rec.id, seq))
    return proteins


def fragment(rng: random.Random, proteins: list[tuple[str, str]]) -> tuple[str, str]:
    """A seeded fragment of 30-150 residues of a random source protein: (description, residues)."""
    acc, seq = proteins[rng.randrange(len(proteins))]
    length = rng.randint(30, min(150, len(seq)))
    start = rng.randrange(len(seq) - length + 1)
    return f"fragment {acc} {start + 1}-{start + length}", seq[start : start + length]


def shuffled(rng: random.Random, residues: str) -> str:
    letters = list(residues)
    rng.shuffle(letters)
    return "".join(letters)


def database_records(n: int, seed: int, proteins: list[tuple[str, str]]) -> Iterator[tuple[str, str, str]]:
    """(record id, description, residues): even rows fragments, odd rows shuffled fragments."""
    rng = random.Random(seed)
    for i in range(n):
        desc, seq = fragment(rng, proteins)
        if i % 2:
            desc, seq = "shuffled " + desc, shuffled(rng, seq)
        yield f"s{i:08d}", desc, seq


def write_fasta(path: Path, records: Iterator[tuple[str, str, str]]) -> None:
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="ascii") as out:
        for rid, desc, seq in records:
            out.write(f">{rid} {desc}\n{seq}\n")
    os.replace(tmp, path)


def changed_records(
    n: int, seed: int, fraction: float, proteins: list[tuple[str, str]]
) -> Iterator[tuple[str, str, str]]:
    """The database of ``seed`` with ``fraction`` of its records given a new fragment (same ids)."""
    pick = random.Random(seed + 1)
    changed = set(pick.sample(range(n), int(round(n * fraction))))
    fresh = random.Random(seed + 2)
    for i, (rid, desc, seq) in enumerate(database_records(n, seed, proteins)):
        if i in changed:
            desc, seq = fragment(fresh, proteins)
            desc = "changed " + desc
        yield rid, desc, seq


# -- commands -----------------------------------------------------------------------------------
def measured(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` under _measure.py: wall_s, max_rss_kib, returncode (raises on failure)."""
    usage = log.with_suffix(".usage.json")
    with open(log, "w", encoding="utf-8") as out:
        rc = subprocess.call(
            [sys.executable, str(HERE / "_measure.py"), str(usage), "--", *cmd], stdout=out, stderr=out
        )
    result = json.loads(usage.read_text(encoding="utf-8"))
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log}")
    return dict(result)


def kill_delays(rng: random.Random, first_wall_s: float, kills: int) -> tuple[list[float], list[float]]:
    """``kills`` sorted moments (s) uniform in 5-95% of the first build's wall time, and the
    per-attempt delays that put each kill at its moment of the build's timeline (the gaps:
    a resumed attempt skips what the killed ones journaled, so it picks up near there)."""
    moments = sorted(rng.uniform(0.05, 0.95) * first_wall_s for _ in range(kills))
    return moments, [b - a for a, b in zip([0.0, *moments], moments, strict=False)]


def killed_build(cmd: list[str], kill_after_s: list[float], log: Path) -> dict[str, Any]:
    """The build ``cmd``, killed (SIGKILL to its process group) after each delay, resumed each time."""
    attempts = []
    with open(log, "w", encoding="utf-8") as out:
        for i, delay in enumerate([*kill_after_s, None]):
            argv = cmd + (["--resume"] if i else [])
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
            try:
                rc = proc.wait(timeout=delay)
                finished = True
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                finished = False
            attempts.append({"wall_s": time.perf_counter() - t0, "killed": not finished, "returncode": rc})
            if finished:
                if rc != 0:
                    raise RuntimeError(f"attempt {i} of {' '.join(argv)} exited {rc}; see {log}")
                break
    return {"attempts": attempts, "wall_s": sum(a["wall_s"] for a in attempts)}


def manifest(index_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    return data


def live_version(root: Path) -> Path:
    return (root / "current").resolve()


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}


# -- serving --------------------------------------------------------------------------------------
class Server:
    """``esmsearch serve DIR`` on a free loopback port, stopped on exit."""

    def __init__(self, index_dir: Path, log: Path) -> None:
        self._log = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        cmd = [*ESMSEARCH, "serve", str(index_dir), "--port", "0", "--device", "cpu", "--reload-poll-s", "0"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if " on " not in line:
            self.__exit__()
            raise RuntimeError(f"server did not start: {line!r}; see {log}")
        self.start_s = time.perf_counter() - t0
        self.address = line.rsplit(" on ", 1)[1].strip()

    def rss_mib(self) -> dict[str, float]:
        return {k: v / 1024 for k, v in proc_status_kib(self.proc.pid).items()}

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def latencies_ms(address: str, queries: list[str], clients: int) -> list[float]:
    """Per-request latency of one-query Search RPCs (k = 10), ``clients`` threads sharing the queries."""
    from esmsearch.client import SearchClient

    out: list[float] = []
    lock = threading.Lock()

    def worker(part: list[str]) -> None:
        mine = []
        with SearchClient(address, timeout_s=300) as client:
            for seq in part:
                t = time.perf_counter()
                client.search({"q": seq}, k=10)
                mine.append((time.perf_counter() - t) * 1000)
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=worker, args=(queries[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def exact_top(embeddings: Path, queries: np.ndarray, k: int, block_rows: int = 262_144) -> np.ndarray:
    """Rows of the exact top-k inner products, int64 [q, k], streaming ``embeddings`` (.npy) in blocks."""
    db = np.load(embeddings, mmap_mode="r")
    best_s = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    best_r = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for start in range(0, db.shape[0], block_rows):
        block = np.asarray(db[start : start + block_rows], dtype=np.float32)
        scores = queries @ block.T
        rows = np.broadcast_to(np.arange(start, start + block.shape[0]), scores.shape)
        s = np.concatenate([best_s, scores], axis=1)
        r = np.concatenate([best_r, rows], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
    return best_r


def serve_and_measure(index_dir: Path, queries: list[str], nulls: list[str], work: Path, tag: str) -> dict[str, Any]:
    from esmsearch.client import SearchClient
    from esmsearch.store import Index

    out: dict[str, Any] = {}
    with Server(index_dir, work / f"serve-{tag}.log") as server:
        out["start_s"] = server.start_s
        out["rss_after_start_mib"] = server.rss_mib()
        latencies_ms(server.address, queries[:8], 1)  # warm-up
        for clients in (1, 8):
            lat = latencies_ms(server.address, queries, clients)
            out[f"p50_ms_{clients}"] = statistics.median(lat)
            out[f"p99_ms_{clients}"] = float(np.percentile(lat, 99))
        with SearchClient(server.address, timeout_s=600) as client:
            named = {f"q{i}": s for i, s in enumerate(queries)}
            served = client.search(named, k=10)
            vectors = client.embed(named).vectors
            null_results = client.search({f"n{i}": s for i, s in enumerate(nulls)}, k=100)
        out["rss_after_queries_mib"] = server.rss_mib()
    rows = exact_top(index_dir / "embeddings.npy", np.asarray(vectors, dtype=np.float32), 10)
    with Index.open(index_dir, mmap=True) as index:
        exact_ids = [[t.record_id for t in index.targets([int(r) for r in row if r >= 0])] for row in rows]
    recalls = [
        len({h.target_id for h in res.hits[:10]} & set(ids)) / max(1, len(ids))
        for res, ids in zip(served, exact_ids, strict=True)
    ]
    out["recall_at_10"] = float(np.mean(recalls))
    out["nprobe_sweep"] = nprobe_sweep(index_dir, np.asarray(vectors, dtype=np.float32), rows)
    evalues = [h.evalue for res in null_results for h in res.hits if h.evalue is not None]
    out["evalue_zero_hits"] = sum(1 for e in evalues if e == 0.0)
    out["calibration"] = {
        str(t): {"observed": sum(1 for e in evalues if e <= t), "expected": t * len(nulls)} for t in EVALUE_THRESHOLDS
    }
    return out


def recall_and_latency(index: Any, vectors: np.ndarray, exact_rows: np.ndarray) -> tuple[float, list[float]]:
    """recall@10 of ``index.search`` (a ``store.Index``: the server's search path) against
    ``exact_rows`` over all ``vectors``, and single-query search latencies (ms) of the first 100."""
    _, rows = index.search(vectors, 10)
    recall = float(
        np.mean(
            [
                len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, int((b >= 0).sum()))
                for a, b in zip(rows, exact_rows, strict=True)
            ]
        )
    )
    lat = []
    for v in vectors[:100]:
        t = time.perf_counter()
        index.search(v[None, :], 10)
        lat.append((time.perf_counter() - t) * 1000)
    return recall, lat


def nprobe_sweep(index_dir: Path, vectors: np.ndarray, exact_rows: np.ndarray) -> list[dict[str, float]]:
    """recall@10 and single-query p50 (ms) in-process at the stored nprobe and 2x/4x/8x it.

    Same search path as the server (``store.Index.search``, re-ranking for PQ); only
    the IVF ``nprobe`` is changed, so one run shows what a stored nprobe would need
    to reach a recall target. Empty for indexes without inverted lists.
    """
    import faiss

    from esmsearch.store import Index

    out: list[dict[str, float]] = []
    with Index.open(index_dir, mmap=True) as index:
        try:
            ivf = faiss.extract_index_ivf(index._faiss)
        except RuntimeError:
            return out
        stored = int(ivf.nprobe)
        for nprobe in sorted({min(ivf.nlist, stored * f) for f in (1, 2, 4, 8)}):
            ivf.nprobe = nprobe
            recall, lat = recall_and_latency(index, vectors, exact_rows)
            out.append({"nprobe": nprobe, "recall_at_10": recall, "p50_ms": statistics.median(lat)})
        ivf.nprobe = stored
    return out


# -- one size ------------------------------------------------------------------------------------------
def pq_factory(n: int, dim: int) -> str:
    from esmsearch.vector_index import auto_nlist

    nlist = auto_nlist(n)
    m = max(d for d in range(1, dim // 4 + 1) if dim % d == 0 and d <= 32)
    return f"IVF{nlist},PQ{m}"


def kill_phase(
    n: int, args: argparse.Namespace, build: list[str], db: Path, work: Path, first_wall_s: float, reference: Path
) -> dict[str, Any]:
    """kill -9 the build of ``db`` at ``args.kills`` random moments, ``--resume`` after each,
    and compare the finished build's files with ``reference`` (the uninterrupted first build)."""
    moments, delays = kill_delays(random.Random(args.seed + n), first_wall_s, args.kills)
    if args.kill_sizes is not None and n not in args.kill_sizes:
        print(f"# kills: skipped at n={n:,} (--kill-sizes)", flush=True)
        return {"moments_s": [], "delays_s": [], "attempts": [], "killed": 0, "lost_s_per_kill": 0.0, "same_rows": None}
    out = work / "killed"
    if out.exists():
        shutil.rmtree(out)
    killed = killed_build(
        [*build, str(db), "-o", str(out), "--index-factory", "auto"], delays, work / "build-killed.log"
    )
    kills = sum(1 for a in killed["attempts"] if a["killed"])
    ref, got = manifest(reference), manifest(out)
    result = {
        "moments_s": moments,
        "delays_s": delays,
        "attempts": killed["attempts"],
        "killed": kills,
        "wall_s": killed["wall_s"],
        "first_wall_s": first_wall_s,
        "lost_s_per_kill": (killed["wall_s"] - first_wall_s) / kills if kills else 0.0,
        "same_rows": got["count"] == ref["count"],
        "same_files": {name: got["files"].get(name) == digest for name, digest in ref["files"].items()},
        "resumed_embedded_residues": got["build"].get("embedded_residues"),
    }
    print(f"# kills: {result}", flush=True)
    return result


def first_build_version(root: Path, db: Path) -> Path:
    """The version in ``root`` built first from ``db`` (nothing reused): the rehearsal's first build."""
    for version in sorted((root / "versions").iterdir()):
        m = manifest(version)
        if m.get("source_fasta") == str(db) and m["build"].get("reused_sequences") == 0:
            return version
    raise SystemExit(f"no first build of {db} left in {root}: run the whole rehearsal for this size")


def kills_only(n: int, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """The kill phase alone, against the first build an earlier run left in ``args.work``."""
    work = args.work / f"n{n}"
    db = work / "db.fasta"
    first = json.loads((work / "build-first.usage.json").read_text(encoding="utf-8"))
    reference = first_build_version(work / "root", db)
    build = [*ESMSEARCH, "index", "build", "--model", str(checkpoint), "--device", "cpu", "--no-progress"]
    return {
        "n": n,
        "cpu": cpu_model(),
        "model": checkpoint.stem,
        "seed": args.seed,
        "kills_only": True,
        "first_build": {"wall_s": first["wall_s"], "version": reference.name},
        "kills": kill_phase(n, args, build, db, work, first["wall_s"], reference),
    }


def rehearse(n: int, args: argparse.Namespace, checkpoint: Path, proteins: list[tuple[str, str]]) -> dict[str, Any]:
    work = args.work / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "db.fasta"
    db2 = work / "db-1pct-changed.fasta"
    t0 = time.perf_counter()
    write_fasta(db, database_records(n, args.seed, proteins))
    write_fasta(db2, changed_records(n, args.seed, 0.01, proteins))
    print(f"# n={n:,}: databases written in {time.perf_counter() - t0:.0f} s", flush=True)
    build = [*ESMSEARCH, "index", "build", "--model", str(checkpoint), "--device", "cpu", "--no-progress"]
    root = work / "root"
    result: dict[str, Any] = {"n": n, "cpu": cpu_model(), "model": checkpoint.stem, "seed": args.seed}

    first = measured([*build, str(db), "--root", str(root), "--index-factory", "auto"], work / "build-first.log")
    v1 = live_version(root)
    m1 = manifest(v1)
    result["first_build"] = {
        "wall_s": first["wall_s"],
        "peak_rss_mib": first["max_rss_kib"] / 1024,
        "factory": m1["index_factory"],
        "stages_s": {k: v for k, v in m1["build"].items() if k.endswith("_seconds")},
        "files_bytes": dir_bytes(v1),
    }
    print(f"# first build: {result['first_build']}", flush=True)

    result["kills"] = kill_phase(n, args, build, db, work, first["wall_s"], v1)

    nightly = measured([*build, str(db2), "--root", str(root), "--index-factory", "auto"], work / "build-nightly.log")
    m2 = manifest(live_version(root))
    v2 = live_version(root)
    result["nightly_1pct"] = {
        "wall_s": nightly["wall_s"],
        "peak_rss_mib": nightly["max_rss_kib"] / 1024,
        "embedded": m2["build"].get("embedded_sequences"),
        "reused": m2["build"].get("reused_sequences"),
        "wall_vs_first": nightly["wall_s"] / first["wall_s"],
    }
    print(f"# nightly: {result['nightly_1pct']}", flush=True)

    factory = pq_factory(n, int(m1["dim"]))
    pq = measured([*build, str(db2), "--root", str(root), "--index-factory", factory], work / "build-pq.log")
    v3 = live_version(root)
    m3 = manifest(v3)
    result["pq_build"] = {
        "factory": factory,
        "wall_s": pq["wall_s"],
        "peak_rss_mib": pq["max_rss_kib"] / 1024,
        "embedded": m3["build"].get("embedded_sequences"),
        "search_params": m3.get("search_params"),
        "files_bytes": dir_bytes(v3),
    }
    print(f"# IVF-PQ build: {result['pq_build']}", flush=True)

    qrng = random.Random(args.seed + 10_000)
    queries = [fragment(qrng, proteins)[1] for _ in range(args.queries)]
    # Null queries: shuffled windows of SCOPe domains. (Shuffles of the queries above, as
    # a first version did, keep their composition, and their source regions sit in the
    # database ~5 times over as overlapping fragments: with a composition-dominated
    # random-weight model those are near-twins, not nulls -- 531 hits at E <= 0.01 for
    # an expected 2 at n = 500,000.)
    scop = read_sources((NULL_SOURCE,))
    nulls = [shuffled(qrng, fragment(qrng, scop)[1]) for _ in range(args.queries)]
    for tag, version in (("auto", v2), ("pq", v3)):
        result[f"serve_{tag}"] = serve_and_measure(version, queries, nulls, work, f"{tag}")
        print(f"# serve {tag} ({manifest(version)['index_factory']}): {result[f'serve_{tag}']}", flush=True)
    return result


def print_kills(k: dict[str, Any]) -> None:
    if not k["killed"]:
        print("kill -9 + --resume: not run at this size (--kill-sizes)")
        return
    moments = ", ".join(f"{m:.0f}" for m in k.get("moments_s", []))
    print(
        f"kill -9 x{k['killed']} (at {moments} s of the first build's timeline) + --resume: "
        f"lost {k['lost_s_per_kill']:.0f} s per kill, same rows: {k['same_rows']}, "
        f"same files: {k.get('same_files')}"
    )


def print_table(r: dict[str, Any]) -> None:
    fb, nb, pb = r["first_build"], r["nightly_1pct"], r["pq_build"]
    print(f"\n## n = {r['n']:,} ({r['model']}, random weights: speed/memory only), {r['cpu']}")
    print(f"first build ({fb['factory']}): {fb['wall_s']:.0f} s, peak RSS {fb['peak_rss_mib']:.0f} MiB")
    print("  stages: " + ", ".join(f"{k} {v:.0f}" for k, v in fb["stages_s"].items() if isinstance(v, (int, float))))
    emb = fb["files_bytes"].get("embeddings.npy", 0)
    idx = sum(v for k, v in fb["files_bytes"].items() if k.startswith("index."))
    print(
        f"  embeddings {emb / 2**20:.0f} MiB, index {idx / 2**20:.0f} MiB ({(emb + idx) / r['n']:.0f} bytes/sequence)"
    )
    print_kills(r["kills"])
    print(
        f"nightly rebuild, 1% changed: {nb['wall_s']:.0f} s ({nb['wall_vs_first']:.2f}x first), peak RSS "
        f"{nb['peak_rss_mib']:.0f} MiB ({nb['peak_rss_mib'] / fb['peak_rss_mib']:.2f}x), embedded {nb['embedded']}"
    )
    print(f"{pb['factory']} (reuses every vector): {pb['wall_s']:.0f} s, peak RSS {pb['peak_rss_mib']:.0f} MiB")
    print(
        "served\tRSS after start MiB\tp50/p99 ms 1 client\tp50/p99 ms 8 clients\trecall@10\tE=0 hits"
        "\tobs/exp E<=0.01,0.1,1,10"
    )
    for tag in ("auto", "pq"):
        s = r[f"serve_{tag}"]
        cal = " ".join(f"{c['observed']}/{c['expected']:g}" for c in s["calibration"].values())
        print(
            f"{tag}\t{s['rss_after_start_mib']['VmRSS']:.0f}\t{s['p50_ms_1']:.1f}/{s['p99_ms_1']:.1f}\t"
            f"{s['p50_ms_8']:.1f}/{s['p99_ms_8']:.1f}\t{s['recall_at_10']:.3f}\t{s['evalue_zero_hits']}\t{cal}"
        )
        for row in s.get("nprobe_sweep", []):
            print(
                f"  {tag} in-process nprobe {row['nprobe']}: "
                f"recall@10 {row['recall_at_10']:.3f}, p50 {row['p50_ms']:.2f} ms"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500000,1000000,2000000", help="database sizes, comma-separated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/esmsearch-scale-rehearsal"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "scale_rehearsal.jsonl")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument(
        "--kill-sizes",
        type=lambda t: {int(x) for x in t.split(",")},
        default=None,
        help="sizes at which the kill -9 / --resume phase runs (default: every size; it repeats the whole build)",
    )
    parser.add_argument(
        "--kills-only",
        action="store_true",
        help="only the kill -9 / --resume phase, against the first build an earlier run left in --work",
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one tiny size (3,000), 20 queries, 1 kill")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.queries, args.kills = "3000", 20, 1
        args.results = args.work / "smoke.jsonl"
    print(f"# scale_rehearsal: {cpu_model()}, {os.cpu_count()} cores; load average at start {os.getloadavg()}")
    args.work.mkdir(parents=True, exist_ok=True)
    name = f"esm2_t{args.layers}_{args.embed_dim}d_random"
    checkpoint = args.work / f"{name}.pt"
    if not checkpoint.exists():
        subprocess.check_call(
            [sys.executable, "-m", "esmsearch.checkpoints", "esm2_t6_8M_UR50D", "-o", str(args.work)]
            + ["--layers", str(args.layers), "--embed-dim", str(args.embed_dim), "--heads", str(args.heads)]
            + ["--name", name, "--seed", str(args.seed)],
            stdout=subprocess.DEVNULL,
        )
    proteins = read_sources()
    for n in (int(s) for s in args.sizes.split(",")):
        r = kills_only(n, args, checkpoint) if args.kills_only else rehearse(n, args, checkpoint, proteins)
        r["load_average_end"] = os.getloadavg()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as out:
            out.write(json.dumps(r) + "\n")
        if args.kills_only:
            print(f"\n## n = {n:,} ({r['model']}, random weights), {r['cpu']}: kills only")
            print_kills(r["kills"])
        else:
            print_table(r)
    print(f"# load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
