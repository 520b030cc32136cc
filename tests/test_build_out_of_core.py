"""The builder's FAISS stage out of core (IVF trained on a sample, on-disk lists) and
float16 embedding storage (--store-dtype): manifest, verification, rebuild reuse."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from esmsearch import vector_index
from esmsearch.cli import main
from esmsearch.embedding import Embedder
from esmsearch.errors import ConfigError, IndexFormatError
from esmsearch.indexer import build_index, build_version
from esmsearch.indexer.build import iter_stored_vectors
from esmsearch.sequences import read_fasta
from esmsearch.store import EMBEDDINGS_FILE, IVFDATA_FILE, MANIFEST, Index, unit_float32
from esmsearch.versions import IndexRoot, verify_index


@pytest.fixture(scope="module")
def float32_index(tmp_path_factory: pytest.TempPathFactory, ecoli_fasta: Path, tiny_embedder: Embedder) -> Path:
    out = tmp_path_factory.mktemp("f32") / "index"
    build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder)
    return out


@pytest.fixture(scope="module")
def float16_index(tmp_path_factory: pytest.TempPathFactory, ecoli_fasta: Path, tiny_embedder: Embedder) -> Path:
    out = tmp_path_factory.mktemp("f16") / "index"
    build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, store_dtype="float16")
    return out


def test_float16_store_halves_the_embeddings_file_and_is_in_the_manifest(
    float32_index: Path, float16_index: Path
) -> None:
    with Index.open(float16_index, verify=True) as f16, Index.open(float32_index) as f32:
        assert (f16.manifest.store_dtype, f32.manifest.store_dtype) == ("float16", "float32")
        stored16, stored32 = f16.embeddings(), f32.embeddings()
        assert stored16.dtype == np.float16 and stored16.shape == stored32.shape == (40, 32)
        data16 = (float16_index / EMBEDDINGS_FILE).stat().st_size - 128  # .npy header: 128 bytes
        data32 = (float32_index / EMBEDDINGS_FILE).stat().st_size - 128
        assert data16 * 2 == data32
        # float16 is float32 rounded to nearest; cast back and re-normalised it stays a unit vector.
        np.testing.assert_array_equal(np.asarray(stored16), np.asarray(stored32).astype(np.float16))
        unit = unit_float32(np.asarray(stored16))
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
        assert float(np.min(np.sum(unit * np.asarray(stored32), axis=1))) > 0.9999
        # The FAISS index holds the re-normalised float32 vectors: self-hits score 1.
        scores, rows = f16.search(unit, 1)
        np.testing.assert_array_equal(rows[:, 0], np.arange(40))
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert verify_index(float16_index).self_hits_at_rank1 == 40


def test_a_manifest_whose_store_dtype_differs_from_the_file_fails_verification(
    tmp_path: Path, float16_index: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(float16_index, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["store_dtype"] = "float32"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=r"embeddings\.npy is float16 .* manifest says float32"):
        Index.open(copy, verify=True)
    manifest["store_dtype"] = "bfloat16"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="store_dtype 'bfloat16'"):
        Index.open(copy)


def test_store_dtype_is_validated(ecoli_fasta: Path, tmp_path: Path, tiny_embedder: Embedder) -> None:
    with pytest.raises(ConfigError, match="store_dtype"):
        build_index(ecoli_fasta, tmp_path / "x", model="unused", embedder=tiny_embedder, store_dtype="int8")
    assert not (tmp_path / "x").exists()


def test_rebuild_reuse_across_store_dtypes(tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder) -> None:
    calls: list[int] = []
    real = tiny_embedder.embed

    def counting(sequences, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(sequences))
        return real(sequences, *args, **kwargs)

    tiny_embedder.embed = counting  # type: ignore[method-assign]
    try:  # no decoys: only database sequences reach the counting model
        root = tmp_path / "root"
        build = functools.partial(build_version, ecoli_fasta, root, model="unused", embedder=tiny_embedder, decoys=0)
        first = build()  # float32
        assert first.reuse.embedded == 40 and sum(calls) == 40
        # float32 -> float16: every vector reused (rounded on storage).
        second = build(store_dtype="float16")
        assert (second.reuse.reused, second.reuse.embedded, sum(calls)) == (40, 0, 40)
        with Index.open(first.path) as a, Index.open(second.path) as b:
            np.testing.assert_array_equal(np.asarray(b.embeddings()), np.asarray(a.embeddings()).astype(np.float16))
        # float16 -> float16: reused as they are.
        third = build(store_dtype="float16")
        assert (third.reuse.reused, sum(calls)) == (40, 40)
        with Index.open(second.path) as b, Index.open(third.path) as c:
            np.testing.assert_array_equal(np.asarray(c.embeddings()), np.asarray(b.embeddings()))
        # float16 -> float32: not reused (they would not equal fresh vectors), re-embedded.
        fourth = build()
        assert (fourth.reuse.reused, fourth.reuse.embedded, sum(calls)) == (0, 40, 80)
        with Index.open(first.path) as a, Index.open(fourth.path) as d:
            np.testing.assert_array_equal(np.asarray(d.embeddings()), np.asarray(a.embeddings()))
    finally:
        del tiny_embedder.embed


def test_iter_stored_vectors_streams_blocks_as_float32_unit_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((23, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "f32.npy", x)
    np.save(tmp_path / "f16.npy", x.astype(np.float16))
    blocks = list(iter_stored_vectors(tmp_path / "f32.npy", block_rows=5))
    assert [b.shape[0] for b in blocks] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(blocks), x)
    half = np.concatenate(list(iter_stored_vectors(tmp_path / "f16.npy", block_rows=7)))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, unit_float32(x.astype(np.float16)), atol=0)
    np.save(tmp_path / "f64.npy", x.astype(np.float64))
    with pytest.raises(IndexFormatError, match="expected float32 or float16"):
        next(iter_stored_vectors(tmp_path / "f64.npy"))
    with open(tmp_path / "f32.npy", "r+b") as fh:  # truncate the last rows
        fh.truncate((tmp_path / "f32.npy").stat().st_size - 40)
    with pytest.raises(IndexFormatError, match="truncated"):
        list(iter_stored_vectors(tmp_path / "f32.npy", block_rows=5))


def test_ivf_index_is_built_out_of_core_from_a_seeded_sample(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder
) -> None:
    out = tmp_path / "ivf"
    result = build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, index_factory="IVF2,Flat")
    build = result.manifest.build
    assert build["faiss_train_rows"] == 40 and build["faiss_ondisk_lists"] is False
    assert IVFDATA_FILE not in result.manifest.files and not (out / IVFDATA_FILE).exists()
    with Index.open(out, verify=True) as index:
        ivf = faiss.extract_index_ivf(index._faiss)
        assert (ivf.nlist, ivf.ntotal) == (2, 40)
        vectors = unit_float32(np.asarray(index.embeddings()))
        # The same rows an in-memory build trains on (seed 0, whole database): same index.
        reference = vector_index.build(vectors, vector_index.validate_factory("IVF2,Flat", 32))
        vector_index.apply_search_params(reference, vector_index.IndexSpec("IVF2,Flat", nprobe=2))
        index._faiss.nprobe = 2
        got = index.search(vectors, 5)
        want = vector_index.search(reference, vectors, 5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)


def test_ivf_lists_beyond_the_memory_budget_go_on_disk_and_survive_publishing(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vector_index, "default_memory_budget_bytes", lambda: 64 * 40)  # ~1/3 of the lists
    root = tmp_path / "root"
    result = build_version(
        ecoli_fasta, root, model="unused", embedder=tiny_embedder, index_factory="IVF2,Flat", store_dtype="float16"
    )
    assert result.manifest.build["faiss_ondisk_lists"] is True
    published = IndexRoot(root).current_path()
    assert IVFDATA_FILE in result.manifest.files and (published / IVFDATA_FILE).is_file()
    assert not list(published.glob(".esmsearch-shards-*"))  # the per-shard work directory is gone
    records = list(read_fasta(ecoli_fasta))
    for mmap in (True, False):
        with Index.open(published, verify=True, mmap=mmap) as index:
            assert vector_index.ondisk_ivfdata_path(index._faiss) == (published / IVFDATA_FILE).resolve()
            vectors = unit_float32(np.asarray(index.embeddings()))
            index._faiss.nprobe = 2
            scores, rows = index.search(vectors, 1)
            np.testing.assert_array_equal(rows[:, 0], np.arange(40))
            assert [t.record_id for t in index.targets(rows[:3, 0])] == [r.record_id for r in records[:3]]
    # The lists are part of the checksummed contract.
    with open(published / IVFDATA_FILE, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IndexFormatError, match=r"index\.ivfdata sha256"):
        Index.open(published, verify=True)


def test_cli_store_dtype_and_ray_flags_without_distributed(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli16"
    args = ["index", "build", str(ecoli_fasta), "-o", str(out), "--model", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*args, "--store-dtype", "float16", "--no-progress"]) == 0
    assert json.loads((out / MANIFEST).read_text())["store_dtype"] == "float16"
    capsys.readouterr()
    assert main([*args, "--workers", "2", "--overwrite"]) == 1
    assert "--workers need --distributed ray" in capsys.readouterr().err
    assert main([*args, "--store-dtype", "bfloat16"]) == 2


def test_open_reads_metadata_lazily_and_verification_counts_every_row(tmp_path: Path, float32_index: Path) -> None:
    import shutil
    import sqlite3

    from esmsearch.fsutil import file_sha256

    copy = tmp_path / "copy"
    shutil.copytree(float32_index, copy)
    with sqlite3.connect(copy / "metadata.sqlite") as db:
        db.execute("DELETE FROM sequences WHERE row = 7")
    db.close()
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["metadata.sqlite"] = file_sha256(copy / "metadata.sqlite")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with Index.open(copy) as index:  # serving: the row count comes from MAX(row), not a scan
        assert index.count == 40
    with pytest.raises(IndexFormatError, match="metadata has 39 rows numbered up to 39"):
        Index.open(copy, verify=True)
