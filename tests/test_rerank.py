"""Exact scores from compressed indexes: :meth:`esmsearch.store.Index.search` re-ranks.

An index whose FAISS codes are lossy (PQ, SQ) is searched for ``k_factor x k``
candidates, which are re-scored against ``embeddings.npy`` (memory-mapped), so every
returned score is the exact cosine of the query and the stored vector. Indexes that
store exact vectors (Flat, HNSW-Flat) are searched as before.

Data: 4,000 seeded vectors of dim 32 from a 50-component Gaussian mixture,
L2-normalised (as in ``tests/test_vector_index.py``), written through
:class:`esmsearch.store.IndexWriter` with the FAISS index from
:mod:`esmsearch.vector_index`; one test builds through :func:`esmsearch.indexer.build_index`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from esmsearch import vector_index as vi
from esmsearch.errors import ConfigError
from esmsearch.sequences import sequence_sha256
from esmsearch.store import MANIFEST, Index, IndexWriter, publish_directory, unit_float32

DIM = 32
N_DB = 4_000
N_QUERIES = 200
K = 10
#: 8 bytes per 128-byte vector: recall@10 of the codes alone is far from 1 here.
PQ_FACTORY = "IVF64,PQ8"


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    # Shared 2-core machine; one thread also makes k-means reproducible.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((50, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def db() -> np.ndarray:
    return _mixture(N_DB, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _mixture(N_QUERIES, seed=1)


@pytest.fixture(scope="module")
def pq_faiss(db: np.ndarray) -> faiss.Index:
    """The IVF-PQ FAISS index of ``db`` (trained once: training is the slow part)."""
    return vi.build(db, vi.validate_factory(PQ_FACTORY, DIM), seed=0)


def _write(
    parent: Path,
    name: str,
    vectors: np.ndarray,
    index: faiss.Index,
    search_params: dict[str, Any],
    factory: str,
    store_dtype: str = "float32",
) -> Path:
    """An index directory as the build writes one (``search_params`` = the manifest's)."""
    with IndexWriter.temporary(parent) as w:
        w.add_metadata((f"seq{i}", "", 10, sequence_sha256("M" * 10)) for i in range(len(vectors)))
        w.write_embeddings(vectors, store_dtype=store_dtype)
        w.write_faiss(index)
        w.finish(
            model_name="esm2_fake",
            model_source="/nowhere/esm2_fake.pt",
            checkpoint_sha256="0" * 64,
            layer=2,
            pooling="mean_residues",
            normalisation="l2",
            precision="fp32",
            metric="inner_product",
            dim=DIM,
            index_factory=factory,
            search_params=search_params,
            source_fasta="db.fasta",
            source_fasta_sha256="1" * 64,
            tool_version="test",
            store_dtype=store_dtype,
        )
        publish_directory(w.directory, parent / name)
    return parent / name


def _params(spec: vi.IndexSpec) -> dict[str, Any]:
    # What esmsearch.indexer.build stores as the manifest's search_params.
    return {k: v for k, v in spec.to_json().items() if k != "factory" and v is not None}


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory: pytest.TempPathFactory, db: np.ndarray, pq_faiss: faiss.Index) -> Path:
    spec = vi.validate_factory(PQ_FACTORY, DIM)
    return _write(tmp_path_factory.mktemp("pq"), "pq", db, pq_faiss, _params(spec), PQ_FACTORY)


def _truth(db: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


def _recall(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(rows, truth, strict=True)]))


def _plain_pq(path: Path, q: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """The FAISS index of ``path`` searched alone, at the manifest's parameters."""
    m = json.loads((path / MANIFEST).read_text())
    index = vi.read(path / "index.faiss")
    vi.apply_search_params(index, vi.IndexSpec.from_json({"factory": m["index_factory"], **m["search_params"]}))
    return vi.search(index, q, k)


def _exact_scores(q: np.ndarray, stored: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine of each query and each returned stored row (float32 store as is, float16 re-normalised)."""
    assert np.all(rows >= 0)
    vecs = unit_float32(np.asarray(stored[rows.ravel()])).reshape(*rows.shape, DIM)
    out: np.ndarray = np.einsum("qd,qkd->qk", q, vecs)
    return out


def test_pq_scores_are_exact_cosines_of_stored_vectors(pq_index: Path, db: np.ndarray, queries: np.ndarray) -> None:
    with Index.open(pq_index) as index:
        assert index.k_factor == vi.DEFAULT_K_FACTOR
        scores, rows = index.search(queries, K)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (N_QUERIES, K)
    np.testing.assert_allclose(scores, _exact_scores(queries, db, rows), atol=1e-5, rtol=0)
    assert np.all(np.diff(scores, axis=1) <= 0), "scores must be descending"
    # The codes alone give visibly different (approximate) scores.
    pq_scores, pq_rows = _plain_pq(pq_index, queries)
    assert np.max(np.abs(pq_scores - _exact_scores(queries, db, pq_rows))) > 1e-2


def test_rerank_recall_beats_the_codes_alone(pq_index: Path, db: np.ndarray, queries: np.ndarray) -> None:
    truth = _truth(db, queries)
    with Index.open(pq_index) as index:
        _, rows = index.search(queries, K)
    plain = _recall(_plain_pq(pq_index, queries)[1], truth)
    reranked = _recall(rows, truth)
    assert plain < 0.9, "IVF64,PQ8 alone is approximate on this data"
    assert reranked >= 0.95 and reranked > plain + 0.05


def test_float16_store_gives_cosines_of_the_float16_vectors(
    tmp_path: Path, db: np.ndarray, queries: np.ndarray, pq_faiss: faiss.Index
) -> None:
    spec = vi.validate_factory(PQ_FACTORY, DIM)
    path = _write(tmp_path, "pq16", db, pq_faiss, _params(spec), PQ_FACTORY, store_dtype="float16")
    with Index.open(path) as index:
        stored = index.embeddings()
        assert stored.dtype == np.float16
        scores, rows = index.search(queries, K)
    np.testing.assert_allclose(scores, _exact_scores(queries, stored, rows), atol=1e-5, rtol=0)
    # Not the raw float16 dot product: the rows are re-normalised (float16 moves norms by ~1e-3).
    raw = np.einsum("qd,qkd->qk", queries, np.asarray(stored[rows], dtype=np.float32))
    assert not np.allclose(scores, raw, atol=1e-6, rtol=0)
    assert _recall(rows, _truth(db, queries)) >= 0.95


def test_manifest_without_k_factor_loads_with_the_default(
    tmp_path: Path, db: np.ndarray, queries: np.ndarray, pq_faiss: faiss.Index
) -> None:
    old = _write(tmp_path, "old", db, pq_faiss, {"nprobe": vi.default_nprobe(64)}, PQ_FACTORY)
    assert "k_factor" not in json.loads((old / MANIFEST).read_text())["search_params"]
    with Index.open(old) as index:
        assert index.k_factor == vi.DEFAULT_K_FACTOR
        scores, rows = index.search(queries, K)
    np.testing.assert_allclose(scores, _exact_scores(queries, db, rows), atol=1e-5, rtol=0)
    assert _recall(rows, _truth(db, queries)) >= 0.95


def test_stored_k_factor_and_open_override_are_used(
    tmp_path: Path, db: np.ndarray, queries: np.ndarray, pq_faiss: faiss.Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the candidate floor, k_factor=1 re-scores FAISS's own top k: the same
    # rows, exact scores, exact order.
    monkeypatch.setattr(vi, "RERANK_MIN_CANDIDATES", 0)
    params = {"nprobe": vi.default_nprobe(64), "k_factor": 1}
    one = _write(tmp_path, "one", db, pq_faiss, params, PQ_FACTORY)
    _, pq_rows = _plain_pq(one, queries)
    with Index.open(one) as index:
        assert index.k_factor == 1
        scores, rows = index.search(queries, K)
    assert [set(r) for r in rows] == [set(r) for r in pq_rows]
    np.testing.assert_allclose(scores, _exact_scores(queries, db, rows), atol=1e-5, rtol=0)
    with Index.open(one, k_factor=vi.DEFAULT_K_FACTOR) as index:
        assert index.k_factor == vi.DEFAULT_K_FACTOR
        assert _recall(index.search(queries, K)[1], _truth(db, queries)) >= 0.95
    with pytest.raises(ConfigError, match="k_factor"):
        Index.open(one, k_factor=0)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_exact_indexes_are_not_reranked(
    tmp_path: Path, db: np.ndarray, queries: np.ndarray, factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = vi.validate_factory(factory, DIM)
    assert spec.k_factor is None
    built = vi.build(db, spec)
    path = _write(tmp_path, factory, db, built, _params(spec), factory)
    expected = vi.search(built, queries, K)

    def no_rerank(*args: object, **kwargs: object) -> None:
        raise AssertionError("an index of exact vectors must not be re-ranked")

    monkeypatch.setattr(vi, "rerank", no_rerank)
    monkeypatch.setattr(vi, "search_reranked", no_rerank)
    with Index.open(path, k_factor=5) as index:  # an override does not apply to exact codes
        assert index.k_factor is None
        scores, rows = index.search(queries, K)
    np.testing.assert_array_equal(rows, expected[1])
    np.testing.assert_array_equal(scores, expected[0])


def test_sq8_is_reranked(tmp_path: Path, db: np.ndarray, queries: np.ndarray) -> None:
    spec = vi.validate_factory("IVF64,SQ8", DIM)
    assert spec.k_factor == vi.DEFAULT_K_FACTOR
    path = _write(tmp_path, "sq8", db, vi.build(db, spec), _params(spec), spec.factory)
    with Index.open(path) as index:
        assert index.k_factor == vi.DEFAULT_K_FACTOR
        scores, rows = index.search(queries, K)
    np.testing.assert_allclose(scores, _exact_scores(queries, db, rows), atol=1e-5, rtol=0)


def test_k_larger_than_the_index_pads(tmp_path: Path, db: np.ndarray, pq_faiss: faiss.Index) -> None:
    small = db[:300]
    spec = vi.validate_factory("PQ8x4", DIM)  # 4-bit codes: trainable on 300 vectors
    path = _write(tmp_path, "small", small, vi.build(small, spec), _params(spec), spec.factory)
    with Index.open(path) as index:
        scores, rows = index.search(small[:3], 400)
    assert rows.shape == (3, 400)
    assert np.all(rows[:, 300:] == -1) and np.all(np.isneginf(scores[:, 300:]))
    assert [sorted(r[:300]) for r in rows] == [list(range(300))] * 3
    assert np.all(rows[:, 0] == np.arange(3))


def test_build_index_stores_k_factor_and_serves_exact_scores(
    tmp_path: Path, tiny_checkpoint: Path, ecoli_fasta: Path
) -> None:
    from esmsearch.indexer import build_index

    out = tmp_path / "pq"
    # 4-bit PQ trains on the 40 sequences (16 centroids per sub-quantiser).
    build_index(ecoli_fasta, out, model=str(tiny_checkpoint), device="cpu", index_factory="PQ8x4", decoys=0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["search_params"]["k_factor"] == vi.DEFAULT_K_FACTOR
    with Index.open(out) as index:
        stored = index.embeddings()
        q = unit_float32(np.asarray(stored[:5]))
        scores, rows = index.search(q, 5)
    np.testing.assert_allclose(scores, _exact_scores(q, stored, rows), atol=1e-5, rtol=0)
    assert np.all(rows[:, 0] == np.arange(5))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def _info_fields(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    from esmsearch.cli import main

    assert main(["index", "info", str(path)]) == 0
    fields = {}
    for line in capsys.readouterr().out.splitlines():
        key, _, value = line.partition("  ")
        fields[key.strip()] = value.strip()
    return fields


def test_index_info_shows_k_factor(
    tmp_path: Path, db: np.ndarray, pq_faiss: faiss.Index, pq_index: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = _info_fields(pq_index, capsys)["re-ranking"]
    assert stored.startswith(f"k_factor {vi.DEFAULT_K_FACTOR} (manifest)") and "float32" in stored
    old = _write(tmp_path, "old", db, pq_faiss, {"nprobe": 4}, PQ_FACTORY, store_dtype="float16")
    default = _info_fields(old, capsys)["re-ranking"]
    assert default.startswith(f"k_factor {vi.DEFAULT_K_FACTOR} (default") and "float16" in default
    flat = _write(tmp_path, "flat", db, vi.build(db, vi.IndexSpec("Flat")), {}, "Flat")
    assert _info_fields(flat, capsys)["re-ranking"].startswith("none")


def test_candidate_floor_deepens_small_k(
    db: np.ndarray, queries: np.ndarray, pq_faiss: faiss.Index, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """max(k_factor x k, RERANK_MIN_CANDIDATES) candidates: at k_factor 1 the floor alone
    lifts recall above FAISS's own top k, and every returned score stays exact."""
    truth = _truth(db, queries)
    monkeypatch.setattr(vi, "RERANK_MIN_CANDIDATES", 0)
    _, shallow = vi.search_reranked(pq_faiss, queries, K, db, 1)
    monkeypatch.setattr(vi, "RERANK_MIN_CANDIDATES", 50 * K)
    scores, deep = vi.search_reranked(pq_faiss, queries, K, db, 1)
    assert _recall(deep, truth) > _recall(shallow, truth)
    assert _recall(deep, truth) >= 0.95
    np.testing.assert_allclose(scores, _exact_scores(queries, db, deep), atol=1e-5, rtol=0)
    # The floor never exceeds the database: a tiny k over a small index still works.
    monkeypatch.setattr(vi, "RERANK_MIN_CANDIDATES", 10 * pq_faiss.ntotal)
    _, everything = vi.search_reranked(pq_faiss, queries, K, db, 1)
    assert _recall(everything, truth) >= _recall(deep, truth)
