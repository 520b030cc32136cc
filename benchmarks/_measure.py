"""Run one command and write its resource usage as JSON (helper of the benchmarks).

Usage::

    python benchmarks/_measure.py OUT.json -- CMD [ARGS...]

The wrapper is a fresh process, so ``getrusage(RUSAGE_CHILDREN)`` after the command
exits covers exactly that command's process tree (every descendant that was waited
for): ``user_s`` + ``sys_s`` is the tree's total CPU time and ``max_rss_kib`` the
peak resident set size of its *largest single process* (Linux ``ru_maxrss`` of
``RUSAGE_CHILDREN`` is a maximum over descendants, not a sum of concurrent ones).
The wrapper's own (small) usage is not included. SIGTERM and SIGINT are forwarded
to the command, so a server can be stopped gracefully and still be measured; a
second SIGINT kills it.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from types import FrameType


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: _measure.py OUT.json -- CMD [ARGS...]", file=sys.stderr)
        return 2
    out_path, cmd = argv[0], argv[2:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    interrupts = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
        proc.send_signal(signal.SIGKILL if interrupts > 1 else signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    wall_s = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(
            {
                "cmd": cmd,
                "returncode": rc,
                "wall_s": wall_s,
                "user_s": usage.ru_utime,
                "sys_s": usage.ru_stime,
                "max_rss_kib": usage.ru_maxrss,
            },
            out,
        )
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
