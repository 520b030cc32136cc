"""The build pipeline's stages, each run on its own (esmsearch.indexer.build):
validate, plan reuse, embed chunks, assemble, build FAISS, count changes."""

from __future__ import annotations

import dataclasses
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
    Stage,
    assemble,
    build_faiss,
    count_changes,
    embed_chunks,
    open_work,
    plan_reuse,
    validate,
)
from esmsearch.indexer.journal import FileDigest
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
    rows = previous.rows_of([sha for *_, sha in metadata] + ["0" * 64])
    assert rows[-1] is None  # a sequence the version does not hold
    for (row, _id, _desc, _length, _sha), found in zip(metadata, rows[:-1], strict=True):
        assert found is not None and found <= row  # the first row holding that sequence
        assert stored[found].tolist() == stored[row].tolist()  # identical sequences may share
    # Every record unchanged: nothing added, changed or removed; twice (the table is rebuilt).
    same = [(record_id, sha) for _r, record_id, _d, _l, sha in metadata]
    assert previous.changes(iter(same)) == previous.changes(same) == (0, 0, 0)
    previous.close()


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
    assert not journal.resumed and journal.done(Stage.VALIDATE) and not journal.done(Stage.EMBED)
    with IndexWriter(work, resume=True) as writer:  # unfinished: removed on exit, so inspect inside
        outcome = embed_chunks(writer, journal, prep, cfg, None)
        rows = list(writer.iter_metadata())
        vectors = np.concatenate([np.load(s) for s in outcome.shards])
        state = json.loads(journal.path.read_text())
        digest = FileDigest.of_files(outcome.shards)
    assert isinstance(outcome, EmbedOutcome)
    records = list(read_fasta(ecoli_fasta))
    assert (outcome.rows, outcome.embedded, outcome.reused) == (40, 40, 0)
    assert len(outcome.shards) >= 3
    assert [s.name for s in outcome.shards] == [f"shard-{i:06d}.npy" for i in range(len(outcome.shards))]
    np.testing.assert_allclose(vectors, tiny_embedder.embed([r.sequence for r in records]), atol=1e-6)
    assert [(r[1], r[4]) for r in rows] == [(r.record_id, sequence_sha256(r.sequence)) for r in records]
    assert (state["shards"], state["rows"], state["settings"]["precision"]) == (len(outcome.shards), 40, "fp32")
    # the stage is journaled with the chained sha256 of its shards
    assert journal.done(Stage.EMBED)
    assert state["stages"]["embed"]["outputs"]["shards"] == dataclasses.asdict(digest)


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
    with IndexWriter(work, resume=True) as writer:
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


@pytest.mark.parametrize(("factory", "ondisk"), [("IVF8,Flat", False), ("IVF8,PQ4x4", False), ("IVF8,Flat", True)])
def test_train_then_add_equals_the_one_pass_out_of_core_build(tmp_path: Path, factory: str, ondisk: bool) -> None:
    """The journaled train and add stages build the index build_out_of_core builds."""
    from esmsearch.indexer.faiss_stage import TRAINED_FILE, add_faiss, train_faiss

    vectors = _unit_vectors(600, seed=4)
    embeddings = tmp_path / "embeddings.npy"
    np.save(embeddings, vectors)
    spec = vector_index.validate_factory(factory, DIM)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trained = train_faiss(embeddings, spec, tmp_path / "a" / TRAINED_FILE, block_rows=128)
    assert trained.path is not None and trained.train_rows == 600
    assert vector_index.read(trained.path).ntotal == 0  # written empty, before any vector is added
    staged = add_faiss(embeddings, spec, trained, tmp_path / "a" / "index.faiss", block_rows=128, ondisk=ondisk)
    whole = vector_index.build_out_of_core(
        lambda: [vectors[i : i + 128] for i in range(0, 600, 128)], 600, DIM, spec, tmp_path / "b" / "index.faiss",
        ondisk=ondisk,
    )  # fmt: skip
    assert (staged.ntotal, staged.train_rows, staged.ondisk) == (whole.ntotal, whole.train_rows, whole.ondisk)
    a, b = vector_index.read(staged.path), vector_index.read(whole.path)
    for index in (a, b):
        vector_index.apply_search_params(index, spec)
    scores_a, rows_a = vector_index.search(a, vectors[:50], 5)
    scores_b, rows_b = vector_index.search(b, vectors[:50], 5)
    np.testing.assert_array_equal(rows_a, rows_b)
    np.testing.assert_array_equal(scores_a, scores_b)


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


# -- module structure -----------------------------------------------------------------------


def _esmsearch_imports(module: str) -> set[str]:
    """Every ``esmsearch`` module ``module`` imports, at top level or inside functions."""
    import ast

    import esmsearch

    path = Path(esmsearch.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("esmsearch"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("esmsearch"))
    return found


@pytest.mark.parametrize(
    ("a", "b"),
    [("esmsearch.indexer.build", "esmsearch.indexer.distributed"), ("esmsearch.embedding", "esmsearch.hf_convert")],
)
def test_no_import_cycle(a: str, b: str) -> None:
    assert not (b in _esmsearch_imports(a) and a in _esmsearch_imports(b))


# -- verification cost ----------------------------------------------------------------------


def test_a_build_hashes_each_index_file_once_and_never_reads_faiss_into_the_heap(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import Counter

    from esmsearch import fsutil
    from esmsearch.indexer import build_index

    hashed: Counter[str] = Counter()
    real_sha = fsutil.file_sha256
    reads: list[bool] = []
    real_read = vector_index.read

    def sha(path: Path) -> str:
        hashed[Path(path).name] += 1
        return real_sha(path)

    def read(path: Path, *, mmap: bool = False) -> object:
        reads.append(mmap)
        return real_read(path, mmap=mmap)

    monkeypatch.setattr(fsutil, "file_sha256", sha)
    monkeypatch.setattr(vector_index, "read", read)
    out = tmp_path / "idx"
    build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, index_factory="IVF4,Flat")
    for name in ("embeddings.npy", "index.faiss", "decoys.npy", "metadata.sqlite"):
        assert hashed[name] == 1, (name, hashed)
    assert reads and all(reads)  # every open of index.faiss was memory-mapped
    with Index.open(out, verify=True) as index:  # and the recorded checksums are right
        assert index.count == 40
