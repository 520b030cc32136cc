"""Index build pipeline (esmsearch.indexer.build_index)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from esmsearch.embedding import Embedder
from esmsearch.errors import (
    ConfigError,
    FastaFormatError,
    InvalidIndexFactoryError,
    InvalidSequenceError,
)
from esmsearch.indexer import build_index
from esmsearch.indexer.build import partial_build_dir
from esmsearch.sequences import read_fasta
from esmsearch.store import DATA_FILES, DECOYS_FILE, Index, Manifest


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def embed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every Embedder.embed call (number of sequences), still embedding."""
    calls: list[int] = []
    original = Embedder.embed

    def recording(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        calls.append(len(sequences))
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(Embedder, "embed", recording)
    return calls


def test_manifest_fields(small_index: Path, tiny_checkpoint: Path, ecoli_fasta: Path) -> None:
    m = Manifest.read(small_index)
    assert m.count == 40
    assert m.dim == 32
    assert m.layer == 2
    assert m.model_name == "esm2_tiny_test"
    assert m.model_source == str(tiny_checkpoint.resolve())
    assert m.checkpoint_sha256 == _sha(tiny_checkpoint)
    assert m.index_factory == "Flat"
    assert (m.pooling, m.normalisation, m.metric) == ("mean_residues", "l2", "inner_product")
    assert m.source_fasta == str(ecoli_fasta)
    assert m.source_fasta_sha256 == _sha(ecoli_fasta)
    assert set(m.files) == {*DATA_FILES, DECOYS_FILE}
    assert m.decoys is not None and m.decoys.count == 40  # one decoy per sequence of a small database
    for name, digest in m.files.items():
        assert _sha(small_index / name) == digest
    assert m.build["sequences"] == 40
    assert m.build["windowed_sequences"] == 0
    assert m.build["residues"] == sum(len(r) for r in read_fasta(ecoli_fasta))
    assert not any(p.name.startswith(".") for p in small_index.parent.iterdir())


def test_metadata_and_vectors_match_fasta(small_index: Path, ecoli_fasta: Path, tiny_embedder: Embedder) -> None:
    records = list(read_fasta(ecoli_fasta))
    with Index.open(small_index, verify=True) as index:
        meta = list(index.iter_metadata())
        assert [(row, rid, desc, n) for row, rid, desc, n, _ in meta] == [
            (i, r.record_id, r.description, len(r.sequence)) for i, r in enumerate(records)
        ]
        stored = np.array(index.embeddings())
        scores, rows = index.search(stored[:5], k=1)
    expected = tiny_embedder.embed([r.sequence for r in records])
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_small_chunks_give_same_vectors(
    tmp_path: Path,
    ecoli_fasta: Path,
    small_index: Path,
    tiny_embedder: Embedder,
    embed_calls: list[int],
) -> None:
    out = tmp_path / "chunked"
    result = build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, chunk_residues=200)
    assert len(embed_calls) >= 5  # really streamed in many chunks
    assert sum(embed_calls) == 40 + 40  # each sequence and each of its 40 decoys once
    assert result.sequences == 40
    with Index.open(out, verify=True) as a, Index.open(small_index) as b:
        np.testing.assert_allclose(np.array(a.embeddings()), np.array(b.embeddings()), atol=1e-5)
        assert list(a.iter_metadata()) == list(b.iter_metadata())
        assert a.null is not None and b.null is not None  # chunking changes no decoy either
        np.testing.assert_allclose(np.array(a.null.decoys), np.array(b.null.decoys), atol=1e-5)
        assert a.manifest.decoys is not None and a.manifest.decoys.same_decoys(b.manifest.decoys)
        assert b.manifest.decoys is not None
        assert a.manifest.decoys.shape == pytest.approx(b.manifest.decoys.shape, abs=1e-4)


def test_gzip_database(tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, small_index: Path) -> None:
    import gzip

    gz = tmp_path / "db.fasta.gz"
    gz.write_bytes(gzip.compress(ecoli_fasta.read_bytes()))
    result = build_index(gz, tmp_path / "gz_index", model="unused", embedder=tiny_embedder)
    assert result.manifest.source_fasta_sha256 == _sha(gz)
    with Index.open(tmp_path / "gz_index") as a, Index.open(small_index) as b:
        np.testing.assert_allclose(np.array(a.embeddings()), np.array(b.embeddings()), atol=1e-5)


def test_bad_record_at_end_fails_before_embedding(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, embed_calls: list[int]
) -> None:
    bad = tmp_path / "bad.fasta"
    bad.write_text(ecoli_fasta.read_text() + ">last_one broken\nMKTAYI-AK\n")
    out = tmp_path / "idx"
    with pytest.raises(InvalidSequenceError) as ei:
        build_index(bad, out, model="unused", embedder=tiny_embedder)
    assert ei.value.record_id == "last_one"
    assert ei.value.position == 7
    assert embed_calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]


def test_duplicate_at_end_fails_before_model_load(tmp_path: Path, ecoli_fasta: Path, embed_calls: list[int]) -> None:
    first_header = ecoli_fasta.read_text().splitlines()[0]
    bad = tmp_path / "dup.fasta"
    bad.write_text(ecoli_fasta.read_text() + first_header + "\nMKT\n")
    # the model does not exist: the FASTA error must come first
    with pytest.raises(InvalidSequenceError, match="duplicate"):
        build_index(bad, tmp_path / "idx", model=str(tmp_path / "esm2_absent.pt"))
    assert embed_calls == []


def test_build_keeps_no_record_id_set_in_memory(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every record id in a dict is ~150 bytes of heap per sequence (300 MB at 2M,
    # measured in the scale rehearsal's rebuild): validation checks ids on disk, and the
    # stages that re-read the validated FASTA (embed, decoys) keep no id set at all.
    from esmsearch import sequences

    kinds: list[bool] = []
    original = sequences.RecordIdSet.__init__

    def recording(self: sequences.RecordIdSet, *, on_disk: bool = False) -> None:
        kinds.append(on_disk)
        original(self, on_disk=on_disk)

    monkeypatch.setattr(sequences.RecordIdSet, "__init__", recording)
    build_index(ecoli_fasta, tmp_path / "idx", model="unused", embedder=tiny_embedder)
    assert kinds == [True]  # validation's, on disk; none for the re-reads


def test_large_flat_index_warns_that_every_query_scans_it(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_embedder: Embedder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from esmsearch import vector_index

    n = sum(1 for _ in read_fasta(ecoli_fasta))
    flat_bytes = 4 * tiny_embedder.dim * n
    monkeypatch.setattr(vector_index, "FLAT_SCAN_WARN_BYTES", flat_bytes - 1)
    with caplog.at_level("WARNING", logger="esmsearch.indexer.build"):
        build_index(ecoli_fasta, tmp_path / "flat", model="unused", embedder=tiny_embedder)
    warned = [r.getMessage() for r in caplog.records if "every query scans" in r.getMessage()]
    assert len(warned) == 1
    assert f"{n} x {tiny_embedder.dim} float32" in warned[0]
    assert f"IVF{vector_index.auto_nlist(n)},Flat" in warned[0]
    caplog.clear()
    monkeypatch.setattr(vector_index, "FLAT_SCAN_WARN_BYTES", flat_bytes)  # at the limit: no warning
    with caplog.at_level("WARNING", logger="esmsearch.indexer.build"):
        build_index(ecoli_fasta, tmp_path / "flat2", model="unused", embedder=tiny_embedder)
    assert not [r for r in caplog.records if "every query scans" in r.getMessage()]


def test_empty_fasta_rejected(tmp_path: Path, tiny_embedder: Embedder) -> None:
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    with pytest.raises(FastaFormatError, match="no FASTA records"):
        build_index(empty, tmp_path / "idx", model="unused", embedder=tiny_embedder)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("factory", ["nonsense", "IVF1024,Flat", "PQ7"])
def test_bad_factory_rejected_before_embedding(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, embed_calls: list[int], factory: str
) -> None:
    with pytest.raises(InvalidIndexFactoryError):
        build_index(
            ecoli_fasta,
            tmp_path / "idx",
            model="unused",
            embedder=tiny_embedder,
            index_factory=factory,
        )
    assert embed_calls == []
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_rejected(tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder) -> None:
    with pytest.raises(ConfigError):
        build_index(ecoli_fasta, tmp_path / "idx", model="unused", embedder=tiny_embedder, chunk_residues=0)
    with pytest.raises(ConfigError):
        build_index(ecoli_fasta, tmp_path / "idx", model="unused", embedder=tiny_embedder, index_factory=" ")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_without_overwrite(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, embed_calls: list[int]
) -> None:
    out = tmp_path / "idx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder)
    assert embed_calls == []
    assert _tree(out) == {"keep.txt": b"mine"}


def test_failed_build_leaves_existing_index_untouched(
    tmp_path: Path,
    ecoli_fasta: Path,
    small_index: Path,
    tiny_embedder: Embedder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    out = tmp_path / "idx"
    shutil.copytree(small_index, out)
    before = _tree(out)
    original = Embedder.embed
    calls = []

    def failing(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        calls.append(len(sequences))
        if len(calls) == 3:
            raise RuntimeError("GPU fell over")
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(Embedder, "embed", failing)
    with pytest.raises(RuntimeError, match="GPU fell over"):
        build_index(
            ecoli_fasta,
            out,
            model="unused",
            embedder=tiny_embedder,
            chunk_residues=500,
            overwrite=True,
        )
    assert len(calls) == 3
    assert _tree(out) == before
    names = {p.name for p in tmp_path.iterdir()}
    assert not any(n.startswith(".esmsearch-build-") or ".old-" in n for n in names)
    # the work done so far is kept for --resume, and nothing else
    assert names == {"idx", partial_build_dir(out).name}

    # resuming finishes the build with the vectors of an uninterrupted one
    resumed_calls: list[int] = []

    def recording(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        resumed_calls.append(len(sequences))
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(Embedder, "embed", recording)
    build_index(
        ecoli_fasta,
        out,
        model="unused",
        embedder=tiny_embedder,
        chunk_residues=500,
        overwrite=True,
        resume=True,
    )
    # the chunks embedded before the failure were not redone (then the 40 decoys are embedded)
    assert 0 < sum(resumed_calls) - 40 < 40
    assert {p.name for p in tmp_path.iterdir()} == {"idx"}
    with Index.open(out, verify=True) as a, Index.open(small_index) as b:
        np.testing.assert_allclose(np.array(a.embeddings()), np.array(b.embeddings()), atol=1e-5)
        assert list(a.iter_metadata()) == list(b.iter_metadata())
        assert a.version != b.version


def test_overwrite_replaces_existing_index(
    tmp_path: Path, ecoli_fasta: Path, small_index: Path, tiny_embedder: Embedder
) -> None:
    out = tmp_path / "idx"
    first = build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, index_factory="Flat")
    second = build_index(
        ecoli_fasta,
        out,
        model="unused",
        embedder=tiny_embedder,
        overwrite=True,
        index_factory="HNSW8",
    )
    assert second.manifest.version != first.manifest.version
    assert Manifest.read(out).index_factory == "HNSW8"
    assert {p.name for p in tmp_path.iterdir()} == {"idx"}


def test_inner_layer_build(tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "idx"
    result = build_index(ecoli_fasta, out, model=str(tiny_checkpoint), layer=1, device="cpu")
    assert result.manifest.layer == 1
    emb = Embedder(str(tiny_checkpoint), layer=1, device="cpu")
    seqs = [r.sequence for r in read_fasta(ecoli_fasta)][:5]
    with Index.open(out) as index:
        np.testing.assert_allclose(np.array(index.embeddings()[:5]), emb.embed(seqs), atol=1e-5)


def test_resume_with_other_settings_is_refused(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_embedder: Embedder,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "idx"
    original = Embedder.embed

    def failing(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        monkeypatch.setattr(Embedder, "embed", _raise)
        return original(self, sequences, **kwargs)

    def _raise(self: Embedder, sequences: Any, **kwargs: Any) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(Embedder, "embed", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, chunk_residues=500)
    partial = partial_build_dir(out)
    assert partial.is_dir() and not out.exists()
    kept = _tree(partial)
    monkeypatch.setattr(Embedder, "embed", original)
    with pytest.raises(ConfigError, match="layer"):
        build_index(
            ecoli_fasta,
            out,
            model=str(tiny_checkpoint),
            layer=1,
            device="cpu",
            chunk_residues=500,
            resume=True,
        )
    assert _tree(partial) == kept  # refused resume leaves the partial build alone
    # without resume the stale partial build is replaced by a fresh build
    build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, chunk_residues=500)
    assert not partial.exists()
    assert Manifest.read(out).count == 40


def test_build_version_reuses_unchanged_vectors(
    tmp_path: Path, ecoli_fasta: Path, small_index: Path, tiny_embedder: Embedder
) -> None:
    from esmsearch.indexer import build_version
    from esmsearch.versions import IndexRoot

    records = list(read_fasta(ecoli_fasta))
    first = tmp_path / "v1.fasta"
    first.write_text("".join(f">{r.record_id} {r.description}\n{r.sequence}\n" for r in records[:30]))
    changed = records[5].sequence[:-1] + ("W" if records[5].sequence[-1] != "W" else "A")
    second = tmp_path / "v2.fasta"
    second.write_text(
        "".join(f">{r.record_id} {r.description}\n{changed if i == 5 else r.sequence}\n" for i, r in enumerate(records))
    )
    root = tmp_path / "root"
    r1 = build_version(first, root, model="unused", embedder=tiny_embedder)
    assert r1.reuse.embedded == 30 and r1.reuse.reused == 0
    r2 = build_version(second, root, model="unused", embedder=tiny_embedder)
    assert (
        r2.reuse.reused,
        r2.reuse.embedded,
        r2.reuse.added,
        r2.reuse.changed,
        r2.reuse.removed,
    ) == (29, 11, 10, 1, 0)
    assert r2.previous_version == r1.manifest.version
    assert IndexRoot(root).current_version() == r2.manifest.version
    with Index.open(IndexRoot(root).current_path(), verify=True) as index:
        got = np.array(index.embeddings())
    expected = tiny_embedder.embed([changed if i == 5 else r.sequence for i, r in enumerate(records)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
