"""Memory and time of the FASTA duplicate-id check: record ids in a dict vs on disk.

Every FASTA read checks that record ids are unique. Kept in a Python dict (the
baseline; what ``read_fasta`` did for every input before) the ids cost heap in
proportion to the database; kept in a temporary SQLite database
(:class:`esmsearch.sequences.RecordIdSet` with ``on_disk=True``, what the index
builder's validation now uses) they cost SQLite's bounded page cache and a
temporary file. Side by side in one run, each way in a fresh process over the same
FASTA (written once: ``--n`` records of 30-60 residues, ids either in sorted order,
``s00000001``..., or UniRef-like in random order, ``UniRef50_A0A...``):

* seconds to read and validate the whole FASTA (``read_fasta(unique_ids=...)``),
* peak RSS growth while reading (``VmRSS`` sampled every 20,000 records, minus
  ``VmRSS`` before; the sampling slows the reader by well under 1%), MiB,
* RSS still held after the reader finished and freed its ids (``VmRSS`` after minus
  before, MiB): what a build carried into its later stages.

The third way, ``none`` (no check: a validated file re-read), is the floor.

Usage::

    python benchmarks/fasta_id_check_memory.py [--n 2000000] [--order random|sorted]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

from esmsearch.sequences import RecordIdSet  # noqa: E402

CHILD = r"""
import gc, json, sys, time
from pathlib import Path
from esmsearch.sequences import read_fasta
def rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
path, way = sys.argv[1], sys.argv[2]
unique_ids = None if way == "none" else way
gc.collect()
before = rss_kib()
peak = before
n = 0
t0 = time.perf_counter()
for _ in read_fasta(path, unique_ids=unique_ids):
    n += 1
    if n % 20_000 == 0:
        peak = max(peak, rss_kib())
seconds = time.perf_counter() - t0
gc.collect()
print(json.dumps({"records": n, "seconds": seconds, "peak_growth_mib": (peak - before) / 1024,
    "held_after_mib": (rss_kib() - before) / 1024}))
"""


def write_fasta(path: Path, n: int, order: str, seed: int) -> None:
    rng = random.Random(seed)
    numbers = list(range(n))
    if order == "random":
        rng.shuffle(numbers)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    with open(path, "w", encoding="ascii") as out:
        for i in numbers:
            rid = f"UniRef50_A0A{i:07d}" if order == "random" else f"s{i:08d}"
            out.write(f">{rid}\n{''.join(rng.choices(letters, k=rng.randint(30, 60)))}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--order", choices=("random", "sorted"), default="random")
    p.add_argument("--work", type=Path, default=Path("/tmp/esmsearch-fasta-id-check"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    fasta = args.work / f"ids-{args.order}-{args.n}.fasta"
    if not fasta.exists():
        write_fasta(fasta, args.n, args.order, args.seed)
    print(f"# fasta_id_check_memory: {args.n:,} records, ids in {args.order} order; {cpu_model()}")
    results = {}
    for way in ("memory", "disk", "none"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(fasta), way], check=True, capture_output=True, text=True)
        results[way] = json.loads(out.stdout)
        r = results[way]
        print(
            f"{way:>6}: {r['seconds']:6.1f} s, peak RSS growth {r['peak_growth_mib']:7.1f} MiB, "
            f"held after {r['held_after_mib']:7.1f} MiB ({r['records']:,} records)"
        )
    mem, disk = results["memory"], results["disk"]
    print(
        f"disk / memory: time {disk['seconds'] / mem['seconds']:.2f}x, peak RSS growth "
        f"{disk['peak_growth_mib'] / max(mem['peak_growth_mib'], 1e-9):.3f}x (memory: "
        f"{mem['peak_growth_mib'] / max(args.n, 1) * 2**20:.0f} bytes per record; disk: SQLite's page cache, "
        f"at most {RecordIdSet.CACHE_KIB / 1024:.0f} MiB whatever the count)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
