"""The wheel users get from a package index: built, installed into fresh venvs, used.

One module-scoped wheel, two fresh virtual environments:

* no extras: ``esmsearch.client`` imports with torch, faiss and fair-esm absent (not
  blocked: not installed), a search request is built and serialised, ``esmsearch --help``
  runs;
* the ``server`` extra (the CPU torch installed first, as the README says): ``esmsearch
  index build`` builds an index from the installed wheel's code and ``serve --help`` runs.

Needs the package registries (as ``.ci/run`` does); pip's cache makes reruns quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build (.ci/run installs the same first)


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)], cwd=out)
    (built,) = out.glob("esmsearch-*.whl")
    return built


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    return path / "bin"


def test_wheel_carries_the_generated_grpc_code_and_the_web_page(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "esmsearch/v1/search_pb2.py",
        "esmsearch/v1/search_pb2_grpc.py",
        "esmsearch/v1/search_pb2.pyi",
        "esmsearch/py.typed",
        "esmsearch/server/web/index.html",
        "esmsearch/server/web/app.js",
        "esmsearch/server/web/style.css",
        "esmsearch/client/__init__.py",
        "esmsearch/indexer/build.py",
    ):
        assert name in names, f"{name} missing from {wheel.name}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "esmsearch = esmsearch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_client_from_the_wheel_without_torch(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "client-venv")
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp_path)
    code = (
        "import importlib.util, sys\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('torch', 'faiss', 'esm')), 'server deps present'\n"
        "import esmsearch, esmsearch.client\n"
        "from esmsearch.client import SearchClient, write_tsv\n"
        "from esmsearch.client.client import search_request\n"
        "assert esmsearch.__file__.startswith(sys.prefix), esmsearch.__file__\n"
        "from esmsearch.v1 import search_pb2\n"
        "req = search_request([search_pb2.Query(query_id='q', sequence='MKTAYIAKQR')], 3, None, None)\n"
        "print(len(req.SerializeToString()) > 0, esmsearch.__version__)\n"
    )
    proc = _run([str(bin_dir / "python"), "-c", code], cwd=tmp_path)
    assert proc.stdout.split()[0] == "True"
    help_out = _run([str(bin_dir / "esmsearch"), "--help"], cwd=tmp_path).stdout
    assert "easy-search" in help_out and "serve" in help_out


def test_server_extra_from_the_wheel_builds_and_serves(wheel: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    bin_dir = _venv(tmp_path / "server-venv")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, TORCH], cwd=tmp_path)
    _run([*pip, f"{wheel}[server]"], cwd=tmp_path)
    fasta = REPO / "tests" / "data" / "ecoli_40.fasta"
    out = tmp_path / "index"
    esmsearch = str(bin_dir / "esmsearch")
    build = [esmsearch, "index", "build", str(fasta), "-o", str(out), "--model", str(tiny_checkpoint)]
    proc = _run([*build, "--device", "cpu", "--decoys", "40", "--no-progress"], cwd=tmp_path)
    assert f"built {out}: 40 sequences" in proc.stdout
    info = _run([esmsearch, "index", "info", str(out)], cwd=tmp_path).stdout
    assert "40" in info
    assert "--http-port" in _run([esmsearch, "serve", "--help"], cwd=tmp_path).stdout
    where = _run(
        [str(bin_dir / "python"), "-c", "import esmsearch.server, sys; print(esmsearch.server.__file__)"], cwd=tmp_path
    )
    assert where.stdout.strip().startswith(str(tmp_path / "server-venv"))
