"""Hit metadata lookups: one locked SQLite connection vs a pool vs memory-mapped arrays.

A hit's record id, description and length come from the index's ``metadata.sqlite``.
Three ways to read them, side by side in one run on one synthetic metadata database
(``--rows`` sequences, UniRef-like ids and descriptions, the schema
:class:`esmsearch.store.IndexWriter` writes):

* **locked** -- the lookup before issue 19: one connection shared by all threads behind
  one lock, ``IN (...)`` statements of 900 rows (copied here so it stays measurable);
* **pooled** -- :class:`esmsearch.store.MetadataReader`, what :meth:`Index.targets`
  uses now: a pool of read-only connections (``mode=ro`` URIs, ``PRAGMA mmap_size``),
  one per concurrent lookup (as many as CPUs, 2 to 8), no global lock, each 900-row
  chunk fetched as one JSON text (one GIL hand-over per chunk, not per row);
* **arrays** -- a prototype of the alternative: ids, descriptions and lengths written
  once into flat files (UTF-8 blobs plus int64 offsets, int32 lengths) and
  memory-mapped; its one-off build time is printed too (an index build would have to
  write these files).

Workload: ``--hits`` hit rows drawn uniformly from the database, in answers of
``--hits-per-answer`` (each answer looks up its distinct rows once and returns one
target per hit, in order, as ``Index.targets`` does), spread over 1 and 8 threads.
Printed: wall seconds and hits/s of each, their ratio to ``locked``, and the
latency of small (100-hit) lookups made while one answer of ``--hits`` hits is being
looked up in another thread: what one large answer does to every other request.

Usage::

    python benchmarks/metadata_lookup.py [--rows 200000] [--hits 1000000]

The figures depend on the machine: the CPU and load average are printed with them.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

from esmsearch import fsutil  # noqa: E402
from esmsearch.store import MetadataReader, Target  # noqa: E402

Lookup = Callable[[Sequence[int]], list[Target]]


def make_db(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` rows into a fresh ``metadata.sqlite`` with the index's schema."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 1500, n).tolist()
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE sequences (row INTEGER PRIMARY KEY, record_id TEXT NOT NULL, "
        "description TEXT NOT NULL, length INTEGER NOT NULL, sha256 TEXT NOT NULL)"
    )
    db.executemany(
        "INSERT INTO sequences VALUES (?, ?, ?, ?, ?)",
        (
            (
                i,
                f"UniRef50_A0A{i:07d}",
                f"Uncharacterized protein {i} n=3 Tax=Saccharomyces cerevisiae TaxID=559292 RepID=A0A{i:07d}",
                lengths[i],
                f"{i:064x}",
            )
            for i in range(n)
        ),
    )
    db.commit()
    db.execute("VACUUM")
    db.close()


class LockedLookup:
    """The lookup before issue 19: one connection, one lock, 900-row IN statements."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(fsutil.sqlite_uri(path, mode="ro"), uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def __call__(self, rows: Sequence[int]) -> list[Target]:
        wanted = sorted({int(r) for r in rows if r >= 0})
        found: dict[int, Target] = {}
        with self._lock:
            for start in range(0, len(wanted), 900):
                chunk = wanted[start : start + 900]
                marks = ",".join("?" * len(chunk))
                for row, rid, desc, length in self._db.execute(
                    f"SELECT row, record_id, description, length FROM sequences WHERE row IN ({marks})", chunk
                ):
                    found[row] = Target(row, rid, desc, length)
        return [found[int(r)] for r in rows]

    def close(self) -> None:
        self._db.close()


class PooledLookup:
    """What ``Index.targets`` does now (:class:`MetadataReader`)."""

    def __init__(self, path: Path) -> None:
        self._reader = MetadataReader(path)

    def __call__(self, rows: Sequence[int]) -> list[Target]:
        found = self._reader.lookup(rows)
        return [found[int(r)] for r in rows]

    def close(self) -> None:
        self._reader.close()


class ArrayLookup:
    """Prototype: ids/descriptions as memory-mapped UTF-8 blobs + int64 offsets, int32 lengths."""

    def __init__(self, path: Path, directory: Path) -> None:
        t0 = time.perf_counter()
        db = sqlite3.connect(fsutil.sqlite_uri(path, mode="ro"), uri=True)
        ids, descs, lengths = [], [], []
        for rid, desc, length in db.execute("SELECT record_id, description, length FROM sequences ORDER BY row"):
            ids.append(rid.encode())
            descs.append(desc.encode())
            lengths.append(length)
        db.close()
        for name, parts in (("ids", ids), ("descs", descs)):
            (directory / f"{name}.bin").write_bytes(b"".join(parts))
            np.save(directory / f"{name}.off.npy", np.cumsum([0] + [len(p) for p in parts], dtype=np.int64))
        np.save(directory / "lengths.npy", np.asarray(lengths, dtype=np.int32))
        self.build_s = time.perf_counter() - t0
        self._files = [open(directory / f"{name}.bin", "rb") for name in ("ids", "descs")]  # noqa: SIM115
        self._ids, self._descs = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in self._files)
        self._ids_off = np.load(directory / "ids.off.npy", mmap_mode="r")
        self._descs_off = np.load(directory / "descs.off.npy", mmap_mode="r")
        self._lengths = np.load(directory / "lengths.npy", mmap_mode="r")

    def __call__(self, rows: Sequence[int]) -> list[Target]:
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        ids, descs = self._ids, self._descs
        i0, i1 = self._ids_off[uniq].tolist(), self._ids_off[uniq + 1].tolist()
        d0, d1 = self._descs_off[uniq].tolist(), self._descs_off[uniq + 1].tolist()
        targets = [
            Target(r, ids[a:b].decode(), descs[c:d].decode(), n)
            for r, a, b, c, d, n in zip(uniq.tolist(), i0, i1, d0, d1, self._lengths[uniq].tolist(), strict=True)
        ]
        return [targets[i] for i in inverse.tolist()]

    def close(self) -> None:
        self._ids.close()
        self._descs.close()
        for f in self._files:
            f.close()


def run_answers(lookup: Lookup, answers: list[list[int]], threads: int) -> float:
    """Wall seconds to look up every answer, spread over ``threads`` threads."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for got, rows in zip(pool.map(lookup, answers), answers, strict=True):
            assert len(got) == len(rows)
    return time.perf_counter() - t0


def small_lookups_during_big(lookup: Lookup, big: list[int], n_rows: int, seed: int = 1) -> list[float]:
    """Latencies (s) of 100-hit lookups made while ``big`` is looked up in another thread."""
    rng = np.random.default_rng(seed)
    started = threading.Event()

    def big_answer() -> None:
        started.set()
        lookup(big)

    worker = threading.Thread(target=big_answer)
    worker.start()
    started.wait()
    latencies = []
    while worker.is_alive() or not latencies:
        rows = rng.integers(0, n_rows, 100).tolist()
        t0 = time.perf_counter()
        lookup(rows)
        latencies.append(time.perf_counter() - t0)
    worker.join()
    return latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="sequences in the metadata database")
    p.add_argument("--hits", type=int, default=1_000_000, help="hit rows looked up per measurement")
    p.add_argument("--hits-per-answer", type=int, default=10_000, help="hits per lookup call (one answer)")
    p.add_argument("--threads", default="1,8", help="comma-separated thread counts")
    args = p.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); load average {os.getloadavg()[0]:.2f}")
    print(f"SQLite {sqlite3.sqlite_version}, threadsafety {sqlite3.threadsafety}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="esmsearch-metadata-bench-") as tmp:
        work = Path(tmp)
        path = work / "metadata.sqlite"
        t0 = time.perf_counter()
        make_db(path, args.rows)
        print(
            f"metadata.sqlite: {args.rows} rows, {path.stat().st_size / 2**20:.1f} MiB, written in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        all_rows = rng.integers(0, args.rows, args.hits).tolist()
        answers = [all_rows[i : i + args.hits_per_answer] for i in range(0, args.hits, args.hits_per_answer)]
        lookups: dict[str, LockedLookup | PooledLookup | ArrayLookup] = {
            "locked": LockedLookup(path),
            "pooled": PooledLookup(path),
            "arrays": ArrayLookup(path, work),
        }
        arrays = lookups["arrays"]
        assert isinstance(arrays, ArrayLookup)
        print(f"arrays: one-off build from SQLite {arrays.build_s:.2f} s")
        check = all_rows[:1000]
        reference = lookups["locked"](check)
        for name, fn in lookups.items():
            if fn(check) != reference:
                raise SystemExit(f"{name} disagrees with locked")

        print(f"\n{args.hits} hits in answers of {args.hits_per_answer} (wall s, hits/s, speed-up vs locked)")
        print(f"{'threads':>7}  " + "  ".join(f"{name:>24}" for name in lookups))
        for threads in thread_counts:
            walls = {name: run_answers(fn, answers, threads) for name, fn in lookups.items()}
            cells = [f"{w:6.2f} s {args.hits / w / 1e3:7.0f}k/s x{walls['locked'] / w:4.1f}" for w in walls.values()]
            print(f"{threads:>7}  " + "  ".join(f"{c:>24}" for c in cells))

        print(f"\n100-hit lookups while one {args.hits}-hit answer is looked up in another thread (ms)")
        print(f"{'':>7}  {'n':>6} {'p50':>8} {'p99':>8} {'max':>8}")
        for name, fn in lookups.items():
            lat = sorted(small_lookups_during_big(fn, all_rows, args.rows))
            p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
            print(f"{name:>7}  {len(lat):6d} {statistics.median(lat) * 1e3:8.2f} {p99 * 1e3:8.2f} {lat[-1] * 1e3:8.2f}")
        for fn in lookups.values():
            fn.close()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
