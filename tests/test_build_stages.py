"""The build pipeline's stages, each run on its own (esmsearch.indexer.build):
validate, plan reuse, embed chunks, assemble, build FAISS, count changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from esmsearch import vector_index
from esmsearch.embedding import Embedder
from esmsearch.errors import ConfigError, IndexFormatError
from esmsearch.indexer.build import (
    BuildConfig,
    EmbedOutcome,
    Prepared,
    PreviousVectors,
    assemble,
    build_faiss,
    count_changes,
    embed_chunks,
    open_work,
    plan_reuse,
    validate,
)
from esmsearch.sequences import read_fasta, sequence_sha256
from esmsearch.store import MANIFEST, Index, IndexWriter

DIM = 16


def _unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- validate -------------------------------------------------------------------------------


def test_validate_checks_input_model_and_factory(ecoli_fasta: Path, tiny_embedder: Embedder) -> None:
    prep = validate(ecoli_fasta, BuildConfig(model="unused", index_factory="HNSW8"), tiny_embedder)
    assert isinstance(prep, Prepared)
    records = list(read_fasta(ecoli_fasta))
    assert (prep.summary.sequences, prep.summary.residues) == (40, sum(len(r) for r in records))
    assert prep.summary.longest == max(len(r) for r in records)
    assert prep.spec.factory == "HNSW8" and prep.embedder is tiny_embedder
    with pytest.raises(ConfigError, match="not '-'"):
        validate(Path("-"), BuildConfig(model="unused"), tiny_embedder)


# -- plan reuse -----------------------------------------------------------------------------


def test_plan_reuse_without_a_live_version(tiny_embedder: Embedder) -> None:
    assert plan_reuse(tiny_embedder, None) is None


def test_plan_reuse_of_a_matching_version(tiny_embedder: Embedder, small_index: Path) -> None:
    with Index.open(small_index) as live:
        previous = plan_reuse(tiny_embedder, live)
        metadata = list(live.iter_metadata())
        stored = np.array(live.embeddings())
    assert isinstance(previous, PreviousVectors)
    assert (previous.version, previous.count) == (live.version, 40)
    np.testing.assert_array_equal(np.asarray(previous.embeddings), stored)
    for row, record_id, _desc, _length, sha in metadata:
        assert previous.sha_by_id[record_id] == sha
        assert stored[previous.row_by_sha[sha]].tolist() == stored[row].tolist()  # identical sequences may share


@pytest.mark.parametrize(
    ("field", "value"),
    [("precision", "bf16"), ("layer", 1), ("checkpoint_sha256", "0" * 64), ("pooling", "cls")],
)
def test_plan_reuse_refuses_a_version_built_otherwise(
    tiny_embedder: Embedder,
    small_index: Path,
    tmp_path: Path,
    field: str,
    value: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy = tmp_path / "other"
    shutil.copytree(small_index, copy)
    data = json.loads((copy / MANIFEST).read_text())
    data[field] = value
    (copy / MANIFEST).write_text(json.dumps(data))
    with Index.open(copy) as live, caplog.at_level("WARNING"):
        assert plan_reuse(tiny_embedder, live) is None
    assert f"not reusing vectors of {data['version']}" in caplog.text and field in caplog.text


# -- embed chunks ---------------------------------------------------------------------------


def test_embed_chunks_writes_one_shard_per_chunk_and_journals_it(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder
) -> None:
    cfg = BuildConfig(model="unused", chunk_residues=700)
    prep = validate(ecoli_fasta, cfg, tiny_embedder)
    work = tmp_path / "work"
    journal = open_work(work, prep, cfg, None)
    assert journal.data == {}
    with IndexWriter(work) as writer:  # unfinished: removed on exit, so inspect inside
        outcome = embed_chunks(writer, journal, prep, cfg, None)
        rows = list(writer.iter_metadata())
        vectors = np.concatenate([np.load(s) for s in outcome.shards])
        state = json.loads(journal.path.read_text())
    assert isinstance(outcome, EmbedOutcome)
    records = list(read_fasta(ecoli_fasta))
    assert (outcome.rows, outcome.embedded, outcome.reused) == (40, 40, 0)
    assert len(outcome.shards) >= 3
    assert [s.name for s in outcome.shards] == [f"shard-{i:06d}.npy" for i in range(len(outcome.shards))]
    np.testing.assert_allclose(vectors, tiny_embedder.embed([r.sequence for r in records]), atol=1e-6)
    assert [(r[1], r[4]) for r in rows] == [(r.record_id, sequence_sha256(r.sequence)) for r in records]
    assert (state["shards"], state["rows"], state["precision"]) == (len(outcome.shards), 40, "fp32")


def test_embed_chunks_copies_reused_vectors_instead_of_embedding(
    tmp_path: Path, ecoli_fasta: Path, small_index: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = BuildConfig(model="unused")
    prep = validate(ecoli_fasta, cfg, tiny_embedder)

    def no_model(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("every vector should have been reused")

    with Index.open(small_index) as live:
        previous = plan_reuse(tiny_embedder, live)
        stored = np.array(live.embeddings())
    monkeypatch.setattr(tiny_embedder, "embed", no_model)
    work = tmp_path / "work"
    journal = open_work(work, prep, cfg, previous)
    with IndexWriter(work) as writer:
        outcome = embed_chunks(writer, journal, prep, cfg, previous)
        vectors = np.concatenate([np.load(s) for s in outcome.shards])
    assert (outcome.reused, outcome.embedded, outcome.embed_seconds) == (40, 0, 0.0)
    np.testing.assert_array_equal(vectors, stored)


# -- assemble -------------------------------------------------------------------------------


def test_assemble_concatenates_shards_in_order(tmp_path: Path) -> None:
    parts = [_unit_vectors(n, seed) for seed, n in enumerate([5, 1, 7, 3])]
    shards = []
    for i, part in enumerate(parts):
        shards.append(tmp_path / f"shard-{i:06d}.npy")
        np.save(shards[-1], part)
    out = tmp_path / "embeddings.npy"
    assert assemble(shards, out, DIM) == 16
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (16, DIM)
    np.testing.assert_array_equal(got, np.concatenate(parts))
    assert assemble([], tmp_path / "empty.npy", DIM) == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, DIM)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((3, DIM + 1), np.float32), np.zeros((3, DIM), np.float64), np.zeros(DIM, np.float32)],
    ids=["dim", "dtype", "1-d"],
)
def test_assemble_rejects_a_malformed_shard_naming_it(tmp_path: Path, bad: np.ndarray) -> None:
    good = tmp_path / "shard-000000.npy"
    np.save(good, _unit_vectors(2, 0))
    wrong = tmp_path / "shard-000001.npy"
    np.save(wrong, bad)
    with pytest.raises(IndexFormatError, match="shard-000001"):
        assemble([good, wrong], tmp_path / "embeddings.npy", DIM)


# -- build FAISS ----------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_build_faiss_indexes_stored_vectors(tmp_path: Path, factory: str) -> None:
    vectors = _unit_vectors(50, seed=9)
    embeddings = tmp_path / "embeddings.npy"
    np.save(embeddings, vectors)
    out = tmp_path / "index.faiss"
    spec = vector_index.validate_factory(factory, DIM)
    assert build_faiss(embeddings, spec, out).ntotal == 50
    index = vector_index.read(out)
    assert (index.ntotal, index.d) == (50, DIM)
    scores, rows = vector_index.search(index, vectors, 2)
    np.testing.assert_array_equal(rows[:, 0], np.arange(50))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    expected_second = np.sort(vectors @ vectors.T, axis=1)[:, -2]
    if factory == "Flat":
        np.testing.assert_allclose(scores[:, 1], expected_second, atol=1e-5)


# -- count changes --------------------------------------------------------------------------


def test_count_changes_against_the_previous_version(small_index: Path, tiny_embedder: Embedder) -> None:
    with Index.open(small_index) as live:
        previous = plan_reuse(tiny_embedder, live)
        old = [(r[1], r[4]) for r in live.iter_metadata()]
    assert previous is not None
    new = old[3:] + [(old[5][0] + "_x", old[5][1]), ("brand_new", "f" * 64)]
    new[0] = (new[0][0], "e" * 64)  # one changed sequence
    outcome = EmbedOutcome((), len(new), reused=37, embedded=2, reused_residues=100, embed_seconds=1.0,
                           embedded_residues=20, windowed_sequences=0)  # fmt: skip
    counts = count_changes(outcome, new, previous)
    assert (counts.added, counts.changed, counts.removed) == (2, 1, 3)
    assert (counts.reused, counts.embedded, counts.reused_residues) == (37, 2, 100)
    first_build = count_changes(outcome, new, None)
    assert (first_build.added, first_build.changed, first_build.removed, first_build.reused) == (0, 0, 0, 37)
