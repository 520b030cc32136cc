"""Server memory during a live reload of a large index: memory-mapped vs read into RAM.

A versioned root holds two versions of an index of ``--vectors`` seeded random unit
vectors (dim 320, the esm2_t6_8M width; Flat by default) built for a random-weight
esm2_t6_8M checkpoint. For each mode (``--no-mmap``: FAISS file read into the
process, the behaviour before memory-mapped serving; default: memory-mapped), a fresh
``esmsearch serve ROOT`` process serves version 1; the script searches once, points
``current`` at version 2, calls ``ReloadIndex`` while a sampler reads the server's
``/proc/<pid>/status`` every 5 ms, searches again, and reports:

* ``RssAnon``: private memory (what a reload must not double),
* ``VmHWM``: peak resident set, private + file-backed (page cache of mapped files),

before the reload, peak during it, and after; both modes side by side with the ratio.
Linux only (``/proc``). Random weights: memory figures only.

Usage::

    python benchmarks/reload_memory.py --vectors 100000 [--factory Flat] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model as _cpu_model
from _machine import proc_status_kib as _status_kib

DIM = 320


def _write_version(root: Path, name: str, checkpoint: Path, n: int, seed: int, factory: str) -> str:
    from esmsearch import vector_index
    from esmsearch.embedding import Embedder
    from esmsearch.sequences import sequence_sha256
    from esmsearch.store import IndexWriter

    emb = Embedder(str(checkpoint), device="cpu")
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = vector_index.validate_factory(factory, DIM)
    work = root / f".build-{name}"
    with IndexWriter(work) as w:
        w.add_metadata((f"seq{i}", "", 100, sequence_sha256("M" * (1 + i % 50))) for i in range(n))
        w.write_embeddings(vectors)
        w.write_faiss(vector_index.build(vectors, spec))
        manifest = w.finish(
            model_name=emb.model_name,
            model_source=emb.model_source,
            checkpoint_sha256=emb.checkpoint_sha256,
            layer=emb.layer,
            pooling="mean_residues",
            normalisation="l2",
            metric="inner_product",
            dim=DIM,
            index_factory=spec.factory,
            search_params={k: v for k, v in spec.to_json().items() if k != "factory" and v is not None},
            source_fasta="synthetic",
            source_fasta_sha256="0" * 64,
            tool_version="benchmark",
            **({"precision": emb.precision} if "precision" in _manifest_fields() else {}),
        )
        (root / "versions").mkdir(parents=True, exist_ok=True)
        os.rename(work, root / "versions" / manifest.version)
    return manifest.version


def _manifest_fields() -> set[str]:
    import dataclasses

    from esmsearch.store import Manifest

    return {f.name for f in dataclasses.fields(Manifest)}


def _point_current(root: Path, version: str) -> None:
    from esmsearch.versions import IndexRoot

    IndexRoot(root).set_current(version)


def _measure(root: Path, v1: str, v2: str, mmap: bool) -> dict[str, dict[str, int]]:
    from esmsearch.client import SearchClient

    _point_current(root, v1)
    cmd = [sys.executable, "-m", "esmsearch.cli", "serve", str(root), "--port", "0", "--device", "cpu"]
    cmd += ["--reload-poll-s", "0"] + ([] if mmap else ["--no-mmap"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().rsplit(" on ", 1)[1].strip()
        query = np.random.default_rng(7).standard_normal((1, DIM)).astype(np.float32)
        with SearchClient(address, timeout_s=300) as client:
            client.search_by_embedding(query, k=10)  # touch the whole index once
            before = _status_kib(proc.pid)
            peak = dict(before)
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    for key, value in _status_kib(proc.pid).items():
                        peak[key] = max(peak.get(key, 0), value)
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample)
            sampler.start()
            _point_current(root, v2)
            t0 = time.perf_counter()
            outcome = client.reload_index(timeout_s=300)
            reload_s = time.perf_counter() - t0
            assert outcome.reloaded and outcome.index_version == v2
            client.search_by_embedding(query, k=10)
            stop.set()
            sampler.join()
            after = _status_kib(proc.pid)
        return {"before": before, "peak": peak, "after": after, "reload_ms": {"value": round(reload_s * 1e3)}}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stdout.close()  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)

    from esmsearch.checkpoints import write_random_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="esmsearch-reload-mem-"))
    try:
        checkpoint = write_random_checkpoint("esm2_t6_8M_UR50D", work / "ckpt", seed=0)
        root = work / "root"
        v1 = _write_version(root, "v1", checkpoint, args.vectors, 1, args.factory)
        v2 = _write_version(root, "v2", checkpoint, args.vectors, 2, args.factory)
        size_mib = sum(p.stat().st_size for p in (root / "versions" / v1).iterdir()) / 2**20
        results = {mode: _measure(root, v1, v2, mmap=(mode == "mmap")) for mode in ("read", "mmap")}
        print(
            f"# reload of a {args.vectors:,}-vector {args.factory} index (dim {DIM}, {size_mib:.0f} MiB per version "
            f"on disk); CPU: {_cpu_model()}, {os.cpu_count()} logical CPUs"
        )
        print("| mode | RssAnon before | RssAnon peak during reload | RssAnon after | VmHWM peak | reload ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode, r in results.items():
            label = "read into RAM (--no-mmap, as before)" if mode == "read" else "memory-mapped (default)"
            print(
                f"| {label} | {r['before']['RssAnon'] / 1024:.0f} MiB | {r['peak']['RssAnon'] / 1024:.0f} MiB | "
                f"{r['after']['RssAnon'] / 1024:.0f} MiB | {r['peak']['VmHWM'] / 1024:.0f} MiB | "
                f"{r['reload_ms']['value']} |"
            )
        growth = {m: r["peak"]["RssAnon"] - r["before"]["RssAnon"] for m, r in results.items()}
        print(
            f"RssAnon growth during reload: read {growth['read'] / 1024:.0f} MiB, "
            f"mmap {growth['mmap'] / 1024:.0f} MiB; "
            f"peak RssAnon mmap/read = {results['mmap']['peak']['RssAnon'] / results['read']['peak']['RssAnon']:.2f}"
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
