#!/usr/bin/env python
"""Query latency and failures of a live server while index versions are swapped under it.

One run, side by side:

* **steady**: concurrent clients hammer an in-process server (port 0) on a
  versioned root for ``--phase-s`` seconds while nothing changes (the baseline);
* **swapping**: the same load while two new versions are built with
  :func:`esmsearch.indexer.build_version` (incremental: ``--changed`` sequences
  changed, a few added and removed each time), each picked up with the
  ``ReloadIndex`` RPC, and then one rollback -- also reloaded.

Printed: requests, failures, requests per version, throughput and p50/p95/p99/max
latency of each phase and the swapping/steady ratios, plus build and reload times.
A request counts as failed on any exception; a response naming a version that was
never published also counts as failed.

The model is a seeded random-weight ESM-2 (``--arch``, default the 8M-parameter
``esm2_t6_8M_UR50D``) written in fair-esm's format: latencies are real for that
architecture; retrieval quality is not measured here.

Usage::

    python benchmarks/swap_under_load.py [--sequences 2000] [--threads 4] [--phase-s 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def random_records(n: int, seed: int, prefix: str) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}{i:06d}": "".join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(50, 300)))) for i in range(n)
    }


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    with path.open("w") as fh:
        for rid, seq in records.items():
            fh.write(f">{rid}\n{seq}\n")
    return path


def next_release(records: dict[str, str], changed: int, seed: int) -> dict[str, str]:
    """Change one residue of ``changed`` records, drop ``changed // 2``, add ``changed // 2``."""
    rng = np.random.default_rng(seed)
    ids = list(records)
    n_removed = changed // 2
    picks = rng.choice(len(ids), size=changed + n_removed, replace=False)
    out = dict(records)
    for i in picks[:changed]:
        rid = ids[int(i)]
        seq = out[rid]
        pos = int(rng.integers(len(seq)))
        out[rid] = seq[:pos] + next(a for a in AMINO_ACIDS if a != seq[pos]) + seq[pos + 1 :]
    for i in picks[changed:]:
        del out[ids[int(i)]]
    out.update(random_records(n_removed, seed + 10_000, prefix=f"r{seed}_"))
    return out


@dataclass
class Outcome:
    sent_s: float
    latency_s: float
    version: str | None
    error: str | None


class Hammer:
    """``threads`` clients each sending one-query Search requests back to back."""

    def __init__(self, address: str, queries: list[str], threads: int, k: int) -> None:
        from esmsearch.client import SearchClient

        self.client = SearchClient(address, timeout_s=120.0)
        self.queries = queries
        self.k = k
        self.outcomes: list[Outcome] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(threads)]

    def _run(self, worker: int) -> None:
        rng = np.random.default_rng(1000 + worker)
        while not self._stop.is_set():
            seq = self.queries[int(rng.integers(len(self.queries)))]
            t0 = time.perf_counter()
            try:
                res = self.client.search({f"w{worker}": seq}, k=self.k)
                out = Outcome(t0, time.perf_counter() - t0, res[0].index_version, None)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                out = Outcome(t0, time.perf_counter() - t0, None, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.outcomes.append(out)
                self._lock.notify_all()

    def wait_after(self, t0: float, n: int, timeout_s: float = 600.0) -> None:
        """Block until ``n`` requests sent at or after ``t0`` have been answered."""
        with self._lock:
            if not self._lock.wait_for(lambda: sum(o.sent_s >= t0 for o in self.outcomes) >= n, timeout=timeout_s):
                raise TimeoutError(f"fewer than {n} responses within {timeout_s} s")

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120.0)
        self.client.close()

    def between(self, t0: float, t1: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if t0 <= o.sent_s < t1]


def summarise(name: str, outcomes: list[Outcome], seconds: float, published: set[str]) -> dict[str, float]:
    ok = [o for o in outcomes if o.error is None and o.version in published]
    failed = [o for o in outcomes if o not in ok]
    lat_ms = np.array([o.latency_s * 1e3 for o in ok]) if ok else np.zeros(1)
    by_version: dict[str, int] = {}
    for o in ok:
        by_version[str(o.version)] = by_version.get(str(o.version), 0) + 1
    stats = {
        "requests": float(len(outcomes)),
        "failed": float(len(failed)),
        "rps": len(ok) / seconds,
        "p50": float(np.percentile(lat_ms, 50)),
        "p95": float(np.percentile(lat_ms, 95)),
        "p99": float(np.percentile(lat_ms, 99)),
        "max": float(lat_ms.max()),
    }
    print(
        f"{name:<9} requests {len(outcomes):6d}  failed {len(failed):3d}  "
        f"{stats['rps']:7.1f} req/s  "
        f"latency ms p50 {stats['p50']:7.1f}  p95 {stats['p95']:7.1f}  p99 {stats['p99']:7.1f}  "
        f"max {stats['max']:7.1f}"
    )
    print(f"{'':<9} responses per version: {by_version}")
    for o in failed[:5]:
        print(f"{'':<9} FAILED: {o.error or f'unknown version {o.version}'}")
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="esm2_t6_8M_UR50D", help="ESM-2 architecture (random weights)")
    parser.add_argument("--sequences", type=int, default=2000, help="database sequences (50..300 residues)")
    parser.add_argument("--changed", type=int, default=100, help="sequences changed per new version")
    parser.add_argument("--threads", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds of the steady phase")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from esmsearch.checkpoints import write_random_checkpoint
    from esmsearch.embedding import Embedder
    from esmsearch.indexer import build_version
    from esmsearch.server import ServerConfig, create_server
    from esmsearch.versions import IndexRoot

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp is not None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = write_random_checkpoint(args.arch, work / "ckpt", seed=0, name=f"{args.arch}_random")
        embedder = Embedder(str(ckpt), device="cpu")
        root = work / "root"
        releases = [random_records(args.sequences, seed=1, prefix="db")]
        releases.append(next_release(releases[0], args.changed, seed=2))
        releases.append(next_release(releases[1], args.changed, seed=3))
        t0 = time.perf_counter()
        v1 = build_version(write_fasta(work / "r1.fasta", releases[0]), root, model=str(ckpt), embedder=embedder)
        print(
            f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
            f"model {args.arch} (random weights); "
            f"{args.sequences} sequences, {v1.residues} residues"
        )
        print(f"v1 built from scratch in {time.perf_counter() - t0:.1f} s: {v1.manifest.version}")

        server, port = create_server(ServerConfig(index=root, port=0, device="cpu", max_workers=8, reload_poll_s=None))
        from esmsearch.client import SearchClient

        admin = SearchClient(f"127.0.0.1:{port}", timeout_s=300.0)
        queries = list(releases[0].values())[:: max(1, args.sequences // 200)]
        hammer = Hammer(f"127.0.0.1:{port}", queries, args.threads, args.k)
        published = {v1.manifest.version}
        try:
            hammer.start()
            # steady phase (baseline)
            s0 = time.perf_counter()
            while time.perf_counter() - s0 < args.phase_s:
                time.sleep(0.1)  # benchmark pacing, not synchronisation
            s1 = time.perf_counter()
            # swapping phase: two incremental rebuilds + reloads, one rollback + reload
            events = []
            swaps: list[tuple[float, str]] = []  # (reload returned, version served from then on)
            for n, release in enumerate(releases[1:], start=2):
                tb = time.perf_counter()
                res = build_version(
                    write_fasta(work / f"r{n}.fasta", release),
                    root,
                    model=str(ckpt),
                    embedder=embedder,
                )
                published.add(res.manifest.version)
                tr = time.perf_counter()
                outcome = admin.reload_index()
                te = time.perf_counter()
                assert outcome.index_version == res.manifest.version, outcome
                swaps.append((te, outcome.index_version))
                hammer.wait_after(te, 2 * args.threads)
                r = res.reuse
                events.append(
                    f"v{n} {res.manifest.version}: built in {tr - tb:.1f} s under load "
                    f"(reused {r.reused}, embedded {r.embedded}: "
                    f"added {r.added}, changed {r.changed}; "
                    f"removed {r.removed}); ReloadIndex (verify + swap) {1e3 * (te - tr):.0f} ms"
                )
            tb = time.perf_counter()
            back = IndexRoot(root).rollback()
            tr = time.perf_counter()
            outcome = admin.reload_index()
            te = time.perf_counter()
            assert outcome.index_version == back, outcome
            swaps.append((te, back))
            hammer.wait_after(te, 2 * args.threads)
            events.append(
                f"rollback to {back}: {1e3 * (tr - tb):.0f} ms (verify + swap link); "
                f"ReloadIndex {1e3 * (te - tr):.0f} ms"
            )
            s2 = time.perf_counter()
        finally:
            hammer.stop()
            admin.close()
            server.stop(5.0)
        for line in events:
            print(line)
        print(f"{args.threads} client threads, one query per request, k={args.k}")
        steady = summarise("steady", hammer.between(s0, s1), s1 - s0, published)
        swapping = summarise("swapping", hammer.between(s1, s2), s2 - s1, published)
        print(
            "swapping/steady ratio: "
            + ", ".join(f"{key} {swapping[key] / steady[key]:.2f}x" for key in ("rps", "p50", "p95", "p99", "max"))
        )
        # Requests sent after a reload returned must be answered by the version it swapped in.
        ends = [t for t, _ in swaps[1:]] + [float("inf")]
        stale = sum(
            1
            for (start, version), end in zip(swaps, ends, strict=True)
            for o in hammer.between(start, end)
            if o.error is None and o.sent_s + o.latency_s < end and o.version != version
        )
        print(f"requests sent after a reload but answered by an older version: {stale}")
        total_failed = int(steady["failed"] + swapping["failed"]) + stale
        print(f"failed requests in total: {total_failed}")
        return 1 if total_failed else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
