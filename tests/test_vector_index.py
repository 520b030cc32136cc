"""Tests of esmsearch.vector_index: factory validation, auto choice, build, search, IO.

Data: 4,000 seeded vectors of dim 32 drawn from a 50-component Gaussian mixture and
L2-normalised, so nearest neighbours are meaningful (uniform random vectors in 32
dims would make approximate recall look arbitrary).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from esmsearch import vector_index as vi
from esmsearch.errors import ConfigError, InvalidIndexFactoryError

DIM = 32
N_DB = 4_000
N_QUERIES = 300

#: Supported example factory strings and the fraction of database queries whose
#: own row must come back at rank 1. Exact or near-exact storage (Flat, SQ8,
#: HNSW over full vectors, IVF with the default nprobe on clustered data) must
#: find itself almost always; PQ8 keeps 8 bytes of a 128-byte vector, so several
#: neighbours can share the self-hit's code and the rank-1 threshold is lower
#: (the self-hit must still be in the top 10 for >= 95% of queries).
SUPPORTED_SELF_HIT = {
    "Flat": 1.0,
    "IVF64,Flat": 0.98,
    "HNSW32": 0.98,
    "IVF64,SQ8": 0.98,
    "IVF64,PQ8": 0.9,
    "PQ8": 0.7,
    "OPQ4,IVF64,PQ8": 0.9,
}


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    # The 2-core test machine is shared; FAISS's OpenMP barriers on small inputs
    # slow down 5-10x when cores are oversubscribed, and one thread also makes
    # k-means bit-for-bit reproducible.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((50, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def db() -> np.ndarray:
    return _mixture(N_DB, seed=0)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return _mixture(N_QUERIES, seed=1)


@pytest.fixture(scope="module")
def built(db: np.ndarray) -> dict[str, object]:
    """Each supported factory built once on ``db`` (PQ training is the slow part)."""
    return {f: vi.build(db, vi.validate_factory(f, DIM), seed=0) for f in SUPPORTED_SELF_HIT}


def _exact_top_k(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q @ db.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


def _recall_at_k(rows: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, truth, strict=True)]))


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("factory", list(SUPPORTED_SELF_HIT))
def test_supported_factory_finds_self_at_rank_1(factory: str, db: np.ndarray, built: dict[str, faiss.Index]) -> None:
    index = built[factory]
    assert index.ntotal == N_DB and index.d == DIM
    scores, rows = vi.search(index, db[:N_QUERIES], 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert scores.shape == rows.shape == (N_QUERIES, 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "scores must be descending"
    self_rows = np.arange(N_QUERIES)
    assert np.mean(rows[:, 0] == self_rows) >= SUPPORTED_SELF_HIT[factory]
    assert np.mean((rows == self_rows[:, None]).any(axis=1)) >= 0.95
    # Scores are (approximate) cosines: true dot products of query and hit.
    true = np.einsum("qd,qkd->qk", db[:N_QUERIES], db[rows])
    assert np.mean(np.abs(scores - true)) < 0.1


def test_flat_is_exact_search(db: np.ndarray, held_out: np.ndarray, built: dict) -> None:
    scores, rows = vi.search(built["Flat"], held_out, 10)
    true_scores, true_rows = _exact_top_k(db, held_out, 10)
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)
    # Ties aside, the same rows in the same order.
    assert np.mean(rows == true_rows) > 0.999
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", held_out, db[rows]), atol=1e-5)


def test_validate_fills_default_search_params() -> None:
    ivf = vi.validate_factory(" IVF64,Flat ", DIM)
    assert ivf == vi.IndexSpec("IVF64,Flat", nprobe=vi.default_nprobe(64), ef_search=None)
    assert vi.validate_factory("HNSW32", DIM).ef_search == vi.DEFAULT_EF_SEARCH
    assert vi.validate_factory("Flat", DIM) == vi.IndexSpec("Flat")
    assert vi.validate_factory("IVF64,Flat", DIM, nprobe=7).nprobe == 7


# --------------------------------------------------------------------------- rejected


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        ("", "empty"),
        ("Flat,,", "could not parse"),
        ("IVF0,Flat", "nlist=0"),
        ("PQ7", "multiple of the number of subquantizers"),
        ("BinaryFlat", "could not parse"),
        ("nonsense", "could not parse"),
        ("HNSW32,PQ8", "L2"),
        ("IDMap,Flat", "ID-map"),
        ("PCA16,Flat", "PCAMatrix"),
        ("auto", "auto_spec"),
    ],
)
def test_bad_factory_rejected_with_its_name(factory: str, reason: str) -> None:
    with pytest.raises(InvalidIndexFactoryError) as info:
        vi.validate_factory(factory, DIM)
    assert repr(factory) in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize("factory", ["Flat,,", "PQ7", "nonsense"])
def test_faiss_error_is_chained(factory: str) -> None:
    with pytest.raises(InvalidIndexFactoryError) as info:
        vi.validate_factory(factory, DIM)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_search_param_for_wrong_index_type_rejected() -> None:
    with pytest.raises(InvalidIndexFactoryError, match="nprobe=8"):
        vi.validate_factory("Flat", DIM, nprobe=8)
    with pytest.raises(InvalidIndexFactoryError, match="ef_search=8"):
        vi.validate_factory("IVF64,Flat", DIM, ef_search=8)
    with pytest.raises(ConfigError, match="nlist=64"):
        vi.validate_factory("IVF64,Flat", DIM, nprobe=65)
    with pytest.raises(ConfigError):
        vi.IndexSpec("IVF64,Flat", nprobe=0)
    flat = vi.build(np.eye(DIM, dtype=np.float32), vi.IndexSpec("Flat"))
    with pytest.raises(InvalidIndexFactoryError, match="no IVF"):
        vi.apply_search_params(flat, vi.IndexSpec("Flat", nprobe=4))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("Flat", 0),
        ("HNSW32", 0),
        ("IVF64,Flat", 64),
        ("IVF4096,Flat", 4096),
        ("IVF64,SQ8", 64),
        ("PQ8", 256),
        ("IVF64,PQ8", 256),
        ("PQ8x4fs", 16),
        ("OPQ4,IVF16,PQ4", 256),
    ],
)
def test_min_training_vectors(factory: str, expected: int) -> None:
    spec = vi.validate_factory(factory, DIM)
    assert vi.min_training_vectors(spec, DIM) == expected
    assert vi.recommended_training_vectors(spec, DIM) == 39 * expected


def test_too_few_training_vectors_rejected_with_numbers(db: np.ndarray) -> None:
    spec = vi.validate_factory("IVF4096,Flat", DIM)
    with pytest.raises(InvalidIndexFactoryError) as info:
        vi.build(db[:1_000], spec)
    message = str(info.value)
    assert "'IVF4096,Flat'" in message and "4096" in message and "1000" in message


def test_training_sample_at_minimum_works_and_below_fails(db: np.ndarray) -> None:
    spec = vi.validate_factory("IVF64,Flat", DIM)
    index = vi.build(db, spec, train_sample=64)
    assert index.ntotal == N_DB
    with pytest.raises(InvalidIndexFactoryError, match="at least 64 training vectors.*got 63"):
        vi.build(db, spec, train_sample=63)


def test_build_is_deterministic_for_a_seed(db: np.ndarray, held_out: np.ndarray) -> None:
    spec = vi.validate_factory("IVF64,SQ8", DIM)
    a = vi.search(vi.build(db, spec, seed=3, train_sample=3_000), held_out, 5)
    b = vi.search(vi.build(db, spec, seed=3, train_sample=3_000), held_out, 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_build_from_chunks_equals_build(db: np.ndarray, held_out: np.ndarray) -> None:
    spec = vi.validate_factory("IVF64,Flat", DIM)
    whole = vi.build(db, spec, seed=0)
    chunked = vi.build_from_chunks(np.array_split(db, 7), spec, dim=DIM, train_vectors=db, seed=0)
    assert chunked.ntotal == N_DB
    for got, want in zip(vi.search(chunked, held_out, 10), vi.search(whole, held_out, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(InvalidIndexFactoryError, match="no train_vectors"):
        vi.build_from_chunks([db], spec, dim=DIM, train_vectors=None)


# --------------------------------------------------------------------------- search params


def test_nprobe_is_applied_and_changes_recall(db: np.ndarray, held_out: np.ndarray) -> None:
    _, truth = _exact_top_k(db, held_out, 10)
    recalls = {}
    for nprobe in (1, 64):
        index = vi.build(db, vi.validate_factory("IVF64,Flat", DIM, nprobe=nprobe), seed=0)
        assert faiss.extract_index_ivf(index).nprobe == nprobe
        recalls[nprobe] = _recall_at_k(vi.search(index, held_out, 10)[1], truth)
    # nprobe == nlist scans every list: IVF-Flat becomes exact.
    assert recalls[64] > 0.999
    assert recalls[1] < recalls[64] - 0.05


def test_ef_search_is_applied(built: dict[str, faiss.Index]) -> None:
    index = built["HNSW32"]
    hnsw_index: Any = faiss.downcast_index(index)  # borrows: `index` stays alive
    vi.apply_search_params(index, vi.IndexSpec("HNSW32", ef_search=77))
    assert hnsw_index.hnsw.efSearch == 77
    vi.apply_search_params(index, vi.validate_factory("HNSW32", DIM))
    assert hnsw_index.hnsw.efSearch == vi.DEFAULT_EF_SEARCH


# --------------------------------------------------------------------------- search API


def test_search_pads_missing_hits_and_accepts_one_vector(db: np.ndarray) -> None:
    index = vi.build(db[:3], vi.IndexSpec("Flat"))
    scores, rows = vi.search(index, db[0], 5)
    assert scores.shape == rows.shape == (1, 5)
    assert rows[0, 0] == 0 and np.all(rows[0, 3:] == -1)
    assert np.all(np.isneginf(scores[0, 3:])) and np.isfinite(scores[0, :3]).all()
    with pytest.raises(ConfigError):
        vi.search(index, db[:2], 0)
    with pytest.raises(ConfigError, match="dim 16"):
        vi.search(index, db[:2, :16], 1)


def test_rerank_restores_exact_order_from_pq_candidates(db: np.ndarray, held_out: np.ndarray, built: dict) -> None:
    true_scores, truth = _exact_top_k(db, held_out, 10)
    _, candidates = vi.search(built["IVF64,PQ8"], held_out, 100)
    assert _recall_at_k(candidates[:, :10], truth) < 0.9, "PQ8 alone is approximate"
    scores, rows = vi.rerank(held_out, candidates, db, 10)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (N_QUERIES, 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", held_out, db[rows]), atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert _recall_at_k(rows, truth) > 0.97
    # A query whose true neighbours are all candidates gets the exact answer, rank
    # for rank (up to near-ties, whose order float rounding may swap).
    complete = [i for i in range(N_QUERIES) if set(truth[i]) <= set(candidates[i])]
    assert len(complete) > N_QUERIES // 2
    np.testing.assert_allclose(scores[complete], true_scores[complete], atol=1e-6)
    assert np.mean(rows[complete] == truth[complete]) > 0.995


def test_rerank_renormalises_float16_rows(db: np.ndarray, held_out: np.ndarray, built: dict[str, faiss.Index]) -> None:
    half = db.astype(np.float16)
    _, candidates = vi.search(built["IVF64,PQ8"], held_out, 50)
    scores, rows = vi.rerank(held_out, candidates, half, 10)
    unit = half.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", held_out, unit[rows]), atol=1e-6, rtol=0)


def test_search_reranked_scores_k_factor_times_k_candidates(
    db: np.ndarray, held_out: np.ndarray, built: dict[str, faiss.Index], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vi, "RERANK_MIN_CANDIDATES", 0)  # k_factor x k alone (the floor: test_rerank)
    index = built["IVF64,PQ8"]
    _, truth = _exact_top_k(db, held_out, 10)
    scores, rows = vi.search_reranked(index, held_out, 10, db, 10)
    _, candidates = vi.search(index, held_out, 100)
    np.testing.assert_array_equal((scores, rows), vi.rerank(held_out, candidates, db, 10))
    assert _recall_at_k(rows, truth) > 0.97
    # k_factor 1: FAISS's own top k, re-scored exactly and re-ordered.
    _, own = vi.search(index, held_out, 10)
    _, one = vi.search_reranked(index, held_out, 10, db, 1)
    assert [set(r) for r in one] == [set(r) for r in own]
    s1, r1 = vi.search_reranked(index, held_out[0], 3, db, 10)  # one 1-D query
    assert s1.shape == r1.shape == (1, 3)
    with pytest.raises(ConfigError, match="k_factor"):
        vi.search_reranked(index, held_out, 10, db, 0)
    with pytest.raises(ConfigError, match="stored vectors"):
        vi.search_reranked(index, held_out, 10, db[:100], 10)


@pytest.mark.parametrize(
    ("factory", "lossy"),
    [
        ("Flat", False),
        ("IVF64,Flat", False),
        ("HNSW32", False),
        ("RR32,Flat", False),
        ("IVF64,PQ8,RFlat", False),  # FAISS's own exact refinement
        ("IVF64,SQ8", True),
        ("IVF64,SQfp16", True),
        ("SQ8", True),
        ("IVF64,PQ8", True),
        ("OPQ4,IVF64,PQ8", True),
        ("PQ8", True),
        ("PQ8x4fs", True),
        ("IVF64,PQ8x4fs", True),
        ("IVF64,SQ8,Refine(SQfp16)", True),
        ("HNSW32_SQ8", True),
        ("IVF4096_HNSW32,PQ32", True),
    ],
)
def test_has_lossy_codes_follows_the_faiss_structure(factory: str, lossy: bool) -> None:
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    assert vi.has_lossy_codes(index) is lossy


def test_validate_fills_k_factor_for_lossy_codes_only() -> None:
    assert vi.validate_factory("IVF64,PQ8", DIM).k_factor == vi.DEFAULT_K_FACTOR
    assert vi.validate_factory("IVF64,SQ8", DIM).k_factor == vi.DEFAULT_K_FACTOR
    assert vi.validate_factory("IVF64,PQ8", DIM, k_factor=3).k_factor == 3
    for exact in ("Flat", "IVF64,Flat", "HNSW32"):
        assert vi.validate_factory(exact, DIM).k_factor is None
    with pytest.raises(InvalidIndexFactoryError, match="k_factor=4"):
        vi.validate_factory("Flat", DIM, k_factor=4)
    with pytest.raises(ConfigError, match="k_factor"):
        vi.validate_factory("IVF64,PQ8", DIM, k_factor=0)
    budget = vi.estimate_index_bytes("IVF512,PQ8", 200_000, DIM)
    assert vi.auto_spec(200_000, DIM, memory_budget_bytes=budget).k_factor == vi.DEFAULT_K_FACTOR
    assert vi.auto_spec(200_000, DIM).k_factor is None


def test_rerank_pads_missing_candidates_and_checks_rows(db: np.ndarray) -> None:
    cand = np.array([[5, -1, 7], [-1, -1, -1]])
    scores, rows = vi.rerank(db[[5, 9]], cand, db, 4)
    assert rows[0, 0] == 5 and set(rows[0, :2]) == {5, 7} and np.all(rows[0, 2:] == -1)
    assert np.all(rows[1] == -1) and np.all(np.isneginf(scores[1])) and np.all(np.isneginf(scores[0, 2:]))
    with pytest.raises(ConfigError, match="outside"):
        vi.rerank(db[:1], np.array([[N_DB]]), db, 1)
    with pytest.raises(ConfigError, match="candidate rows"):
        vi.rerank(db[:2], np.array([[1]]), db, 1)
    with pytest.raises(ConfigError, match="k must be"):
        vi.rerank(db[:1], np.array([[1]]), db, 0)


# --------------------------------------------------------------------------- IO


def _mapped_files() -> set[str]:
    """Paths of the files mapped into this process (Linux ``/proc/self/maps``)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}


@pytest.mark.parametrize("factory", list(SUPPORTED_SELF_HIT))
@pytest.mark.parametrize("mmap", [False, True])
def test_write_read_round_trip(factory: str, mmap: bool, tmp_path: Path, built: dict, held_out: np.ndarray) -> None:
    index = built[factory]
    path = tmp_path / "index.faiss"
    vi.write(index, path)
    loaded = vi.read(path, mmap=mmap)
    vi.apply_search_params(loaded, vi.validate_factory(factory, DIM))
    assert loaded.ntotal == index.ntotal
    for got, want in zip(vi.search(loaded, held_out, 10), vi.search(index, held_out, 10), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("factory", list(SUPPORTED_SELF_HIT))
def test_mmap_read_maps_the_file_and_searches_identically(
    factory: str, tmp_path: Path, built: dict, held_out: np.ndarray
) -> None:
    """Every family is really memory-mapped (HNSW: its vectors), and answers exactly as a normal read."""
    path = tmp_path / "index.faiss"
    vi.write(built[factory], path)
    spec = vi.validate_factory(factory, DIM)
    plain = vi.read(path)
    assert str(path.resolve()) not in _mapped_files(), "a normal read copies the file"
    mapped = vi.read(path, mmap=True)
    assert str(path.resolve()) in _mapped_files()
    vi.apply_search_params(plain, spec)
    vi.apply_search_params(mapped, spec)
    for got, want in zip(vi.search(mapped, held_out, 10), vi.search(plain, held_out, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    del mapped
    assert str(path.resolve()) not in _mapped_files(), "the mapping goes with the index"


def test_write_is_atomic_and_replaces(tmp_path: Path, built: dict) -> None:
    path = tmp_path / "index.faiss"
    path.write_bytes(b"old")
    vi.write(built["Flat"], path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"], "no temporary file is left"
    assert vi.read(path).ntotal == N_DB
    with pytest.raises(OSError, match="missing-dir"):
        vi.write(built["Flat"], tmp_path / "missing-dir" / "index.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_read_normally_gives_a_writable_index(tmp_path: Path, built: dict, db: np.ndarray) -> None:
    path = tmp_path / "index.faiss"
    vi.write(built["IVF64,Flat"], path)
    index = vi.read(path)
    index.add(db[:10])  # lists read into RAM, not mapped read-only
    assert index.ntotal == N_DB + 10


def test_read_missing_or_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        vi.read(tmp_path / "nope.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index")
    with pytest.raises(OSError, match="bad.faiss"):
        vi.read(bad)


# --------------------------------------------------------------------------- IndexSpec / auto


def test_index_spec_json_round_trip() -> None:
    spec = vi.IndexSpec("IVF1024,PQ32", nprobe=16, ef_search=None)
    assert vi.IndexSpec.from_json(spec.to_json()) == spec
    reranked = vi.IndexSpec("IVF1024,PQ32", nprobe=16, k_factor=7)
    assert reranked.to_json()["k_factor"] == 7 and vi.IndexSpec.from_json(reranked.to_json()) == reranked
    assert vi.IndexSpec.from_json({"factory": "IVF1024,PQ32", "nprobe": 16}).k_factor is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="k_factor"):
            vi.IndexSpec("IVF1024,PQ32", k_factor=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown"):
        vi.IndexSpec.from_json({"factory": "Flat", "metric": "ip"})
    with pytest.raises(ConfigError):
        vi.IndexSpec.from_json({"nprobe": 3})


def test_auto_spec_small_database_is_flat() -> None:
    assert vi.auto_spec(1_000, 320) == vi.IndexSpec("Flat")
    assert vi.auto_spec(500_000, 320) == vi.IndexSpec("Flat")
    # Too small to train anything else, whatever the budget.
    assert vi.auto_spec(5_000, 320, memory_budget_bytes=1).factory == "Flat"


def test_auto_spec_large_database_is_ivf() -> None:
    n = 5_000_000
    spec = vi.auto_spec(n, 320)
    assert spec.factory.startswith("IVF") and spec.factory.endswith(",Flat")
    probe = faiss.index_factory(320, spec.factory)  # keep alive: extract_index_ivf borrows
    nlist = faiss.extract_index_ivf(probe).nlist
    assert nlist & (nlist - 1) == 0, "nlist is a power of two"
    assert 2 * np.sqrt(n) <= nlist <= 8 * np.sqrt(n)
    assert vi.min_training_vectors(spec, 320) * 39 <= n
    assert spec.nprobe == vi.default_nprobe(nlist)
    huge = vi.auto_spec(100_000_000, 320)
    assert "_HNSW32" in huge.factory and huge.ef_search is not None


def test_auto_spec_small_budget_compresses() -> None:
    n, dim = 200_000, 320
    budget = 20_000_000  # Flat would need 256 MB
    spec = vi.auto_spec(n, dim, memory_budget_bytes=budget)
    assert ",PQ" in spec.factory
    assert vi.estimate_index_bytes(spec.factory, n, dim) <= budget
    assert vi.min_training_vectors(spec, dim) <= n
    assert vi.auto_spec(n, dim, memory_budget_bytes=400_000_000).factory == "Flat"
    sq8 = vi.auto_spec(2_000_000, dim, memory_budget_bytes=1_000_000_000)  # Flat: 2.56 GB
    assert sq8.factory.endswith(",SQ8")
    assert vi.estimate_index_bytes(sq8.factory, 2_000_000, dim) <= 1_000_000_000
    assert int(spec.factory.rsplit("PQ", 1)[1]) <= dim // 4
    with pytest.raises(ConfigError, match="too small"):
        vi.auto_spec(n, dim, memory_budget_bytes=1_000)


def test_auto_spec_choice_builds_and_searches() -> None:
    # A budget below Flat's 1.28 MB on 10,000 x 32 forces an approximate index,
    # which must train on the database it was chosen for.
    x = np.concatenate([_mixture(5_000, seed=5), _mixture(5_000, seed=6)])
    spec = vi.auto_spec(10_000, DIM, memory_budget_bytes=1_000_000)
    assert spec.factory != "Flat"
    index = vi.build(x, spec)
    _, rows = vi.search(index, x[:100], 10)
    assert np.mean((rows == np.arange(100)[:, None]).any(axis=1)) >= 0.9


@pytest.mark.parametrize(
    ("n", "nlist"),
    [(1, 1), (9_984, 256), (10_000, 256), (100_000, 1024), (1_000_000, 4096), (2_000_000, 4096), (60_000_000, 32768)],
)
def test_auto_nlist_is_about_4_sqrt_n_with_39_points_per_list(n: int, nlist: int) -> None:
    got = vi.auto_nlist(n)
    assert got == nlist
    assert got == 1 or n >= vi.FAISS_POINTS_PER_CENTROID * got
