"""Precision is part of the index contract: recorded in the manifest (resolved, never
``auto``), used by the server for queries, compared for rebuild reuse, shown by
``index info``, and refused when the serving device cannot run it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from esmsearch import esm2_fast
from esmsearch.cli import main
from esmsearch.embedding import Embedder
from esmsearch.errors import IndexFormatError, IndexMismatchError
from esmsearch.indexer import build_index, build_version
from esmsearch.sequences import read_fasta
from esmsearch.store import MANIFEST, PRECISIONS, Index, Manifest

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def bf16_embedder(tiny_checkpoint: Path) -> Embedder:
    return Embedder(str(tiny_checkpoint), device="cpu", precision="bf16")


@pytest.fixture(scope="module")
def bf16_index(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, ecoli_fasta: Path) -> Path:
    """``ecoli_fasta`` built at bf16 on the CPU (autocast runs there, slowly) through the public API."""
    out = tmp_path_factory.mktemp("bf16") / "ecoli40_bf16"
    build_index(ecoli_fasta, out, model=str(tiny_checkpoint), device="cpu", precision="bf16")
    return out


def _start_server(index_dir: Path) -> tuple[Any, int]:
    """An in-process server on a free port over ``index_dir`` (CPU, no reload polling)."""
    from esmsearch.server import ServerConfig, create_server

    return create_server(ServerConfig(index=index_dir, port=0, device="cpu", reload_poll_s=None))


def _stop_server(server: Any) -> None:
    server.stop(1.0)


def _small_fasta(path: Path, n: int = 12, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(
        "".join(f">s{i}\n{''.join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(20, 60))))}\n" for i in range(n))
    )
    return path


def _edit_manifest(index_dir: Path, edit: Any) -> None:
    data = json.loads((index_dir / MANIFEST).read_text())
    edit(data)
    (index_dir / MANIFEST).write_text(json.dumps(data))


# -- the manifest field ---------------------------------------------------------------------


def test_built_index_records_resolved_precision_as_top_level_field(bf16_index: Path, small_index: Path) -> None:
    data = json.loads((bf16_index / MANIFEST).read_text())
    assert data["precision"] == "bf16"
    assert "precision" not in data["build"]  # one source of truth, not a build-info blob
    assert Manifest.read(bf16_index).precision == "bf16"
    assert Manifest.read(small_index).precision == "fp32"


def test_auto_is_resolved_before_it_reaches_the_manifest(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fasta = _small_fasta(tmp_path / "db.fasta", n=4)
    monkeypatch.setattr(esm2_fast, "cpu_supports_fast_bf16", lambda: True)  # as on a CPU with AMX
    result = build_index(fasta, tmp_path / "amx", model=str(tiny_checkpoint), device="cpu", precision="auto")
    assert result.manifest.precision == "bf16"
    monkeypatch.setattr(esm2_fast, "cpu_supports_fast_bf16", lambda: False)
    result = build_index(fasta, tmp_path / "no_amx", model=str(tiny_checkpoint), device="cpu", precision="auto")
    assert result.manifest.precision == "fp32"
    assert json.loads((tmp_path / "no_amx" / MANIFEST).read_text())["precision"] == "fp32"


@pytest.mark.parametrize("bad", ["auto", "fp8", "FP32", None, 16])
def test_unknown_precision_in_manifest_is_index_format_error(small_index: Path, tmp_path: Path, bad: object) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(small_index, copy)
    _edit_manifest(copy, lambda d: d.update(precision=bad))
    with pytest.raises(IndexFormatError, match="precision") as excinfo:
        Manifest.read(copy)
    assert repr(bad) in str(excinfo.value) and str(copy) in str(excinfo.value)
    with pytest.raises(IndexFormatError, match="precision"):
        Index.open(copy)


@pytest.mark.parametrize(
    ("build_precision", "expected"),
    [(None, "fp32"), ("fp32", "fp32"), ("bf16", "bf16")],
)
def test_old_manifest_without_top_level_precision_still_loads(
    small_index: Path, tmp_path: Path, build_precision: str | None, expected: str
) -> None:
    copy = tmp_path / "old"
    shutil.copytree(small_index, copy)

    def to_old_style(data: dict[str, Any]) -> None:
        data["format_version"] = 1  # what the first releases wrote
        del data["precision"]
        data["build"].pop("precision", None)
        if build_precision is not None:
            data["build"]["precision"] = build_precision  # where the first releases kept it

    _edit_manifest(copy, to_old_style)
    assert "precision" not in json.loads((copy / MANIFEST).read_text())
    assert Manifest.read(copy).precision == expected
    with Index.open(copy, verify=True) as index:
        assert index.manifest.precision == expected


def test_old_fp32_manifest_is_served(small_index: Path, tmp_path: Path) -> None:
    from esmsearch.client import SearchClient

    copy = tmp_path / "old"
    shutil.copytree(small_index, copy)
    _edit_manifest(copy, lambda d: (d.update(format_version=1), d.pop("precision"), d["build"].pop("precision", None)))
    first = next(read_fasta(Path(__file__).parent / "data" / "ecoli_40.fasta"))
    server, port = _start_server(copy)
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout_s=60.0) as client:
            hit = client.search({first.record_id: first.sequence}, k=1)[0].hits[0]
    finally:
        _stop_server(server)
    assert hit.target_id == first.record_id and hit.cosine_score >= 0.99999


def test_manifest_precisions_are_the_resolved_ones() -> None:
    assert esm2_fast.PRECISIONS == ("auto", *PRECISIONS)


# -- the `auto` policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16", False),  # Xeon with AVX512-BF16, no AMX: bf16 measured slower
        ("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),
        ("fpu sse2 avx2", False),
        ("fpu amx_tile", False),
    ],
)
def test_fast_bf16_means_amx(flags: str, expected: bool) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert esm2_fast._cpuinfo_has_amx_bf16(cpuinfo) is expected
    assert esm2_fast._cpuinfo_has_amx_bf16("processor\t: 0\n") is False


# -- the server embeds at the index's precision -------------------------------------------


def test_for_manifest_uses_the_index_precision(bf16_index: Path, small_index: Path) -> None:
    assert Embedder.for_manifest(Manifest.read(bf16_index), device="cpu").precision == "bf16"
    assert Embedder.for_manifest(Manifest.read(small_index), device="cpu").precision == "fp32"
    with pytest.raises(IndexMismatchError, match="precision: index has 'bf16', model has 'fp32'"):
        Embedder.for_manifest(Manifest.read(bf16_index), device="cpu", precision="fp32")


def test_check_manifest_compares_precision(tiny_embedder: Embedder, bf16_embedder: Embedder, bf16_index: Path) -> None:
    manifest = Manifest.read(bf16_index)
    bf16_embedder.check_manifest(manifest)
    with pytest.raises(IndexMismatchError, match="precision: index has 'bf16', model has 'fp32'"):
        tiny_embedder.check_manifest(manifest)


def test_fp16_index_is_refused_on_a_cpu_naming_both(small_index: Path, tmp_path: Path) -> None:
    copy = tmp_path / "fp16"
    shutil.copytree(small_index, copy)
    _edit_manifest(copy, lambda d: d.update(precision="fp16"))
    with pytest.raises(IndexMismatchError) as excinfo:
        Embedder.for_manifest(Manifest.read(copy), device="cpu")
    message = str(excinfo.value)
    assert "'fp16'" in message and "'cpu'" in message
    with pytest.raises(IndexMismatchError, match="fp16.*cpu"):
        _start_server(copy)


def test_bf16_index_self_hits_through_the_server(
    bf16_index: Path, ecoli_fasta: Path, tiny_checkpoint: Path, bf16_embedder: Embedder, tiny_embedder: Embedder
) -> None:
    from esmsearch.client import SearchClient

    records = list(read_fasta(ecoli_fasta))
    queries = {r.record_id: r.sequence for r in records}
    server, port = _start_server(bf16_index)
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout_s=60.0) as client:
            assert client.index_info().count == len(records)
            results = client.search(queries, k=1)
            served = np.asarray(client.embed(queries).vectors)
    finally:
        _stop_server(server)
    assert [r.query_id for r in results] == list(queries)
    for result in results:
        assert result.hits[0].target_id == result.query_id
        assert result.hits[0].cosine_score >= 0.999999, result.query_id
    # The server really embedded at bf16: its vectors are the local bf16 ones, and fp32
    # vectors of the same sequences differ from them by far more.
    sequences = [r.sequence for r in records]
    off_bf16 = float(np.abs(served - bf16_embedder.embed(sequences)).max())
    off_fp32 = float(np.abs(served - tiny_embedder.embed(sequences)).max())
    assert off_bf16 <= 1e-6
    assert off_fp32 > 1e-4
    with Index.open(bf16_index) as index:
        fp32_scores, _ = index.search(tiny_embedder.embed(sequences), 1)
    assert float(fp32_scores.min()) < 0.999999  # an fp32 query would miss the bar


# -- rebuild reuse needs equal precision ----------------------------------------------------


def test_rebuild_reuses_only_vectors_of_equal_precision(
    tmp_path: Path, tiny_embedder: Embedder, bf16_embedder: Embedder
) -> None:
    fasta = _small_fasta(tmp_path / "db.fasta")
    root = tmp_path / "root"
    v1 = build_version(fasta, root, model="unused", embedder=tiny_embedder)
    assert (v1.reuse.reused, v1.reuse.embedded, v1.manifest.precision) == (0, 12, "fp32")
    v2 = build_version(fasta, root, model="unused", embedder=bf16_embedder)
    assert (v2.reuse.reused, v2.reuse.embedded, v2.manifest.precision) == (0, 12, "bf16")
    v3 = build_version(fasta, root, model="unused", embedder=bf16_embedder)
    assert (v3.reuse.reused, v3.reuse.embedded, v3.manifest.precision) == (12, 0, "bf16")
    with Index.open(v3.path) as index:
        np.testing.assert_array_equal(
            np.asarray(index.embeddings()), bf16_embedder.embed([r.sequence for r in read_fasta(fasta)])
        )


# -- index info -----------------------------------------------------------------------------


def test_index_info_shows_precision(bf16_index: Path, small_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "info", str(bf16_index)]) == 0
    lines = capsys.readouterr().out.splitlines()
    precision_lines = [line for line in lines if line.startswith("precision ")]
    assert len(precision_lines) == 1 and precision_lines[0].split()[1] == "bf16"
    assert main(["index", "info", str(small_index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"
