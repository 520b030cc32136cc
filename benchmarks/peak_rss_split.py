"""Peak resident memory of a command, split into anonymous and file-backed pages.

``ru_maxrss`` (what ``benchmarks/_measure.py`` reports) counts every resident page,
including pages of memory-mapped files -- a build that reads ``embeddings.npy`` through
a memory map shows the file's pages in its RSS although the kernel can drop them at
any time. This samples ``/proc/<pid>/status`` of the command (not its children) every
``--interval-s`` seconds and prints the peaks of ``VmRSS``, ``RssAnon`` (heap, the
FAISS index being built, model weights) and ``RssFile`` (mapped files), in MiB.

With ``--timeline-every N`` it also prints every Nth sample as it goes (clock time,
``RssAnon``, ``RssFile``, and the anonymous MiB of the largest mappings from
``/proc/<pid>/smaps``: ``[heap]`` is the malloc heap, ``[anon]`` unnamed mappings --
large arrays, thread arenas, FAISS's buffers), so growth can be matched to the
command's stages by its log lines.

Usage::

    python benchmarks/peak_rss_split.py [--interval-s 0.2] [--timeline-every N] -- CMD [ARGS...]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, proc_status_kib  # noqa: E402


def anonymous_by_mapping(pid: int, top: int = 4) -> str:
    """The ``top`` mappings of ``pid`` by anonymous memory (smaps ``Anonymous:``), in MiB."""
    groups: collections.Counter[str] = collections.Counter()
    name = ""
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0] and len(parts) >= 5:
                name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Anonymous:":
                groups[name] += int(parts[1])
    return "  ".join(f"{k}={v >> 10}" for k, v in groups.most_common(top))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--interval-s", type=float, default=0.2)
    p.add_argument("--timeline-every", type=int, default=0, help="print every Nth sample (0: peaks only)")
    args = p.parse_args(argv[:split])
    cmd = argv[split + 1 :]
    peaks = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    t0 = time.perf_counter()
    samples = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        try:
            status = proc_status_kib(proc.pid)
        except (FileNotFoundError, ProcessLookupError, KeyError):
            break
        for key in peaks:
            peaks[key] = max(peaks[key], status.get(key, 0) / 1024)
        if args.timeline_every and samples % args.timeline_every == 0:
            try:
                mappings = anonymous_by_mapping(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            print(
                f"{datetime.datetime.now():%H:%M:%S} anon {status.get('RssAnon', 0) >> 10} "
                f"file {status.get('RssFile', 0) >> 10}   {mappings}",
                flush=True,
            )
        samples += 1
        time.sleep(args.interval_s)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    print(f"# peak_rss_split: {' '.join(cmd)}; {cpu_model()}")
    print(f"exit {rc}, wall {wall:.1f} s; peak MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
