"""Memory of a rebuild's reuse lookups over a live version: Python dicts vs SQLite.

A nightly rebuild looks up, for every new sequence, whether the live version holds it
(sequence sha256 -> row), and counts added/changed/removed record ids. Side by side in
one run, each in a fresh process over the same index version:

* **dicts** (the baseline, what ``PreviousVectors`` did before): ``row_by_sha`` and
  ``sha_by_id`` built from every metadata row;
* **sqlite** (now): :class:`esmsearch.indexer.datatypes.PreviousVectors`, the lookups in
  a private temporary SQLite database and the version's own ``metadata.sqlite``.

Each process then looks up every row's sha256 in chunks of 5,000 (the reuse plan of a
rebuild with nothing changed) and computes the change counts against the same rows.
Printed: seconds to set up, seconds for the lookups, and the peak RSS growth
(``ru_maxrss`` after minus before, MiB) of each, with the ratio.

Usage::

    python benchmarks/reuse_lookup_memory.py INDEX_DIR     # e.g. a scale-rehearsal version
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

CHILD = r"""
import json, resource, sqlite3, sys, time
from pathlib import Path
index_dir, way = Path(sys.argv[1]), sys.argv[2]
db = sqlite3.connect((index_dir / "metadata.sqlite").resolve().as_uri() + "?mode=ro", uri=True)
def rows():
    yield from db.execute("SELECT record_id, sha256 FROM sequences ORDER BY row")
shas = [s for (s,) in db.execute("SELECT sha256 FROM sequences ORDER BY row")]  # the queries, in both ways
from esmsearch.store import Index
from esmsearch.indexer.datatypes import PreviousVectors
index = Index.open(index_dir, mmap=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if way == "dicts":
    row_by_sha, sha_by_id = {}, {}
    for row, record_id, _d, _l, sha in index.iter_metadata():
        row_by_sha.setdefault(sha, row)
        sha_by_id[record_id] = sha
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    found = 0
    for start in range(0, len(shas), 5000):
        found += sum(1 for s in shas[start:start + 5000] if row_by_sha.get(s) is not None)
    new_ids = dict(rows())
    counts = (sum(1 for r in new_ids if r not in sha_by_id),
              sum(1 for r, s in new_ids.items() if r in sha_by_id and sha_by_id[r] != s),
              sum(1 for r in sha_by_id if r not in new_ids))
else:
    previous = PreviousVectors(index)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    found = 0
    for start in range(0, len(shas), 5000):
        found += sum(1 for r in previous.rows_of(shas[start:start + 5000]) if r is not None)
    counts = previous.changes(rows())
    previous.close()
lookups = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"setup_s": setup, "lookups_s": lookups, "rss_growth_mib": (peak - base) / 1024,
                  "found": found, "counts": counts, "rows": len(shas)}))
"""


def run(index_dir: Path, way: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(index_dir), way], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    index_dir = Path(sys.argv[1])
    results = {way: run(index_dir, way) for way in ("dicts", "sqlite")}
    d, s = results["dicts"], results["sqlite"]
    assert d["found"] == s["found"] == d["rows"] and d["counts"] == s["counts"] == [0, 0, 0], results
    print(f"# reuse lookups over {d['rows']:,} rows of {index_dir}; {cpu_model()}")
    print("way\tsetup s\tlookups+counts s\tpeak RSS growth MiB")
    for way, r in results.items():
        print(f"{way}\t{r['setup_s']:.1f}\t{r['lookups_s']:.1f}\t{r['rss_growth_mib']:.0f}")
    ratio = s["rss_growth_mib"] / d["rss_growth_mib"] if d["rss_growth_mib"] else float("nan")
    time_ratio = (s["setup_s"] + s["lookups_s"]) / (d["setup_s"] + d["lookups_s"])
    print(f"sqlite / dicts: RSS growth {ratio:.3f}x, time {time_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
