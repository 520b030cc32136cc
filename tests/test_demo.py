"""``bash scripts/demo.sh``, the README's first command, on a small slice of the data.

The full run (install included, the first 1,000 E. coli proteins) is timed by hand and
its figure is in the README; here the same script runs with ``DEMO_SKIP_INSTALL=1`` (the
test's own Python environment), 30 database proteins and 2 queries: every step runs,
hits come back through the CLI and the Python client, and no server is left behind,
also when a step fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "seqdb"


def _demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DEMO_SKIP_INSTALL": "1",
        "DEMO_SEQUENCES": "30",
        "DEMO_QUERIES": "2",
        "DEMO_WORK": str(tmp_path / "demo"),
        "TORCH_HOME": str(tmp_path / "torch-home"),  # no cached pretrained weights: the random-weight path
        **env,
    }
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=600, env=environ
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_runs_every_step_and_leaves_no_server(tmp_path: Path) -> None:
    assert SHARED.is_dir(), f"the demo reads {SHARED}"
    proc = _demo(tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for n in range(1, 7):
        assert f"] {n}/6 " in out
    assert "RANDOM-WEIGHT" in out  # the banner: no pretrained weights here
    assert "database: 30 E. coli proteins" in out and "queries: 2 yeast proteins" in out
    tsv = [line for line in out.splitlines() if line.startswith("sp|") and "\t" in line]
    assert len(tsv) == 2 * 3 and all(line.split("\t")[1].endswith("_ECOLI") for line in tsv)
    assert len(re.findall(r"_YEAST -> sp\|\w+\|\w+_ECOLI  cosine ", out)) == 2 * 2  # the Python client
    assert re.search(r"web page and HTTP API \(while the server runs\): http://127\.0\.0\.1:\d+/", out)
    assert "sequences             30" in out and "server stopped" in out
    pid = int((tmp_path / "demo" / "serve.pid").read_text())
    assert not _alive(pid)
    # A second run reuses every vector of the first (the nightly-rebuild path).
    again = _demo(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused 30, embedded 0" in again.stdout


def test_a_failing_step_is_named_and_stops_the_server(tmp_path: Path) -> None:
    proc = _demo(tmp_path, DEMO_MODEL=str(tmp_path / "missing.pt"))
    assert proc.returncode == 1
    assert "demo.sh: FAILED at step: 3/6 index" in proc.stderr
    assert "model checkpoint not found" in proc.stderr
    # A failure while the server runs (no queries to search) stops it too.
    proc = _demo(tmp_path, DEMO_QUERIES="0")
    assert proc.returncode != 0
    assert "demo.sh: FAILED at step: 5/6 search" in proc.stderr
    pid = int((tmp_path / "demo" / "serve.pid").read_text())
    assert not _alive(pid)
