"""Tests of out-of-core index builds (esmsearch.vector_index.build_out_of_core).

Data: 4,000 seeded vectors of dim 32 from a 50-component Gaussian mixture,
L2-normalised (as in tests/test_vector_index.py), streamed in uneven chunks that
include an empty one. The reference for every out-of-core build is the in-memory
:func:`vector_index.build` with the same seed and training-sample size: both train
on the same rows, so their results must be identical, not just close.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from esmsearch import vector_index as vi
from esmsearch.errors import ConfigError, InvalidIndexFactoryError

DIM = 32
N_DB = 4_000
SAMPLE = 2_000
SEED = 3
#: Chunk boundaries: uneven sizes, an empty chunk, a one-row chunk.
CUTS = [0, 1, 700, 700, 1_950, 2_600, 3_999, N_DB]


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    # One thread makes FAISS k-means bit-for-bit reproducible between the two
    # builds compared, and keeps the shared 2-core machine usable.
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
def queries() -> np.ndarray:
    return _mixture(200, seed=1)


def _chunks(x: np.ndarray, cuts: list[int] = CUTS) -> list[np.ndarray]:
    return [x[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class OneChunkAtATime:
    """A chunk source that records how many of its chunks were alive at once.

    Each chunk is a fresh array (not a view of a shared database), created only
    when the consumer asks for it; the source drops its own reference after the
    yield, so any chunk still alive when the next one is made is held by the
    consumer. A build that listed all chunks, or kept them, would show more than
    one alive.
    """

    def __init__(self, x: np.ndarray, n_chunks: int) -> None:
        self.x = x
        self.n_chunks = n_chunks
        self.passes = 0
        self.max_alive = 0
        self._refs: list[weakref.ref[np.ndarray]] = []

    def __call__(self) -> Iterator[np.ndarray]:
        self.passes += 1
        for part in np.array_split(np.arange(len(self.x)), self.n_chunks):
            chunk = self.x[part[0] : part[-1] + 1].copy()
            self._refs = [r for r in self._refs if r() is not None]
            self._refs.append(weakref.ref(chunk))
            self.max_alive = max(self.max_alive, len(self._refs))
            yield chunk
            del chunk


def _same_results(a: faiss.Index, b: faiss.Index, q: np.ndarray, k: int = 10) -> None:
    for got, want in zip(vi.search(a, q, k), vi.search(b, q, k), strict=True):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- equals in-memory


@pytest.mark.parametrize("ondisk", [False, True], ids=["in-ram-lists", "ondisk-lists"])
@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF32,SQ8", "IVF16,PQ4"])
def test_out_of_core_equals_in_memory_build(
    factory: str, ondisk: bool, db: np.ndarray, queries: np.ndarray, tmp_path: Path
) -> None:
    spec = vi.validate_factory(factory, DIM)
    reference = vi.build(db, spec, seed=SEED, train_sample=SAMPLE)
    # A small budget gives several shards, one boundary falling inside a chunk.
    budget = 4 * 600 * (faiss.extract_index_ivf(reference).code_size + 8)
    result = vi.build_out_of_core(
        _chunks(db),
        N_DB,
        DIM,
        spec,
        tmp_path / "index.faiss",
        sample_size=SAMPLE,
        seed=SEED,
        ondisk=ondisk,
        memory_budget_bytes=budget,
    )
    assert result.path == tmp_path / "index.faiss" and result.ntotal == N_DB and result.train_rows == SAMPLE
    assert result.ondisk is ondisk
    if ondisk:
        assert result.ivfdata_path == tmp_path / "index.ivfdata" and result.ivfdata_path.is_file()
        assert result.shards == 7  # ceil(4000 / 600)
    else:
        assert result.ivfdata_path is None and result.shards == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["index.faiss"] + (["index.ivfdata"] if ondisk else [])
    ), "no temporary or shard files are left"
    for mmap in (False, True):
        loaded = vi.read(result.path, mmap=mmap)
        assert loaded.ntotal == N_DB
        assert faiss.extract_index_ivf(loaded).nprobe == spec.nprobe, "search params are stored"
        assert (vi.ondisk_ivfdata_path(loaded) is not None) is ondisk
        _same_results(loaded, reference, queries)


def test_ondisk_lists_equal_in_ram_lists_with_one_shard_per_row_block(
    db: np.ndarray, queries: np.ndarray, tmp_path: Path
) -> None:
    spec = vi.validate_factory("IVF64,Flat", DIM, nprobe=64)  # exhaustive: every row is reachable
    in_ram = vi.build_out_of_core(_chunks(db), N_DB, DIM, spec, tmp_path / "ram.faiss", seed=SEED, ondisk=False)
    code = DIM * 4 + 8
    ondisk = vi.build_out_of_core(
        _chunks(db),
        N_DB,
        DIM,
        spec,
        tmp_path / "disk.faiss",
        seed=SEED,
        ondisk=True,
        memory_budget_bytes=4 * 1_000 * code,
    )
    assert ondisk.shards == 4
    a, b = vi.read(in_ram.path), vi.read(ondisk.path, mmap=True)
    _same_results(a, b, queries, k=50)
    # Every database row is stored once under its own id: it finds itself first.
    _, rows = vi.search(b, db, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(N_DB))


def test_flat_and_hnsw_need_no_training_pass(db: np.ndarray, queries: np.ndarray, tmp_path: Path) -> None:
    for factory in ("Flat", "HNSW32"):
        source = OneChunkAtATime(db, 5)
        spec = vi.validate_factory(factory, DIM)
        result = vi.build_out_of_core(source, N_DB, DIM, spec, tmp_path / f"{factory}.faiss")
        assert source.passes == 1 and result.train_rows == 0 and not result.ondisk
        index = vi.read(result.path)
        assert index.ntotal == N_DB
        _, rows = vi.search(index, db[:300], 1)
        assert np.mean(rows[:, 0] == np.arange(300)) >= 0.98
    _same_results(vi.read(tmp_path / "Flat.faiss"), vi.build(db, vi.IndexSpec("Flat")), queries)


# --------------------------------------------------------------------------- memory: lazy chunks


@pytest.mark.parametrize(
    ("factory", "ondisk"), [("IVF64,Flat", False), ("IVF64,Flat", True), ("IVF16,PQ4", True), ("Flat", None)]
)
def test_chunks_are_read_lazily_one_at_a_time(
    factory: str, ondisk: bool | None, db: np.ndarray, tmp_path: Path
) -> None:
    source = OneChunkAtATime(db, 10)
    spec = vi.validate_factory(factory, DIM)
    rows_seen: list[int] = []
    result = vi.build_out_of_core(
        source,
        N_DB,
        DIM,
        spec,
        tmp_path / "index.faiss",
        sample_size=SAMPLE,
        ondisk=ondisk,
        memory_budget_bytes=100_000,
        on_rows=rows_seen.append,
    )
    assert source.max_alive == 1, "at most one chunk may be alive at a time"
    assert source.passes == (1 if factory == "Flat" else 2)
    assert sum(rows_seen) == N_DB and len(rows_seen) == 10
    assert result.ntotal == N_DB


def test_float16_chunks_are_converted_per_chunk(db: np.ndarray, queries: np.ndarray, tmp_path: Path) -> None:
    half = db.astype(np.float16)
    spec = vi.validate_factory("IVF64,Flat", DIM)
    result = vi.build_out_of_core(_chunks(half), N_DB, DIM, spec, tmp_path / "i.faiss", sample_size=SAMPLE, seed=SEED)
    _same_results(
        vi.read(result.path), vi.build(half.astype(np.float32), spec, seed=SEED, train_sample=SAMPLE), queries
    )


# --------------------------------------------------------------------------- training sample


def _row_tagged(n: int) -> np.ndarray:
    """Vectors whose first component is their row number (to see which rows a sample took)."""
    x = np.zeros((n, DIM), dtype=np.float32)
    x[:, 0] = np.arange(n)
    return x


def test_training_sample_is_seeded_uniform_and_from_every_chunk() -> None:
    n, n_chunks, size = 20_000, 10, 2_000
    x = _row_tagged(n)
    parts = np.array_split(x, n_chunks)
    a = vi.training_sample(parts, n, DIM, size, seed=5)
    b = vi.training_sample(lambda: iter(parts), n, DIM, size, seed=5)
    c = vi.training_sample(parts, n, DIM, size, seed=6)
    assert a.dtype == np.float32 and a.shape == (size, DIM)
    np.testing.assert_array_equal(a, b)
    rows = a[:, 0].astype(np.int64)
    assert np.all(np.diff(rows) > 0), "distinct rows, in database order"
    np.testing.assert_array_equal(a, x[rows])  # whole rows, unchanged
    assert len(np.intersect1d(rows, c[:, 0].astype(np.int64))) < size // 2, "another seed draws other rows"
    per_chunk = np.bincount(rows // (n // n_chunks), minlength=n_chunks)
    # Binomial(2000, 0.1): mean 200, sd 13.4; 120..280 is +-6 sd.
    assert per_chunk.min() >= 120 and per_chunk.max() <= 280, per_chunk
    # Uniform over rows, not over chunks: halve one chunk's neighbour and its share halves.
    uneven = [x[:1_000], x[1_000:20_000]]
    share = np.mean(vi.training_sample(uneven, n, DIM, size, seed=5)[:, 0] < 1_000)
    assert 0.03 <= share <= 0.07


def test_training_sample_larger_than_database_takes_every_row() -> None:
    x = _row_tagged(500)
    np.testing.assert_array_equal(vi.training_sample(_chunks(x, [0, 123, 500]), 500, DIM, 10_000), x)


def test_out_of_core_trains_on_the_rows_build_trains_on(db: np.ndarray) -> None:
    # The same sampled rows make the same coarse quantiser (centroids compared exactly).
    spec = vi.validate_factory("IVF64,Flat", DIM)
    reference = vi.build(db, spec, seed=SEED, train_sample=SAMPLE)
    sample = vi.training_sample(_chunks(db), N_DB, DIM, SAMPLE, seed=SEED)
    ivf = faiss.extract_index_ivf(reference)
    mine = vi.build(sample, spec, seed=SEED)  # trains on all of `sample`
    np.testing.assert_array_equal(
        faiss.extract_index_ivf(mine).quantizer.reconstruct_n(0, 64), ivf.quantizer.reconstruct_n(0, 64)
    )


def test_default_training_sample_size_policy() -> None:
    ivf64 = vi.validate_factory("IVF64,Flat", DIM)
    assert vi.default_training_sample_size(ivf64, DIM, 10_000_000) == 65_536  # floor
    assert vi.default_training_sample_size(ivf64, DIM, 4_000) == 4_000  # never above n_total
    big = vi.validate_factory("IVF8192,SQ8", 320)
    assert vi.default_training_sample_size(big, 320, 5_000_000) == vi.TRAIN_POINTS_PER_CENTROID * 8192
    assert vi.FAISS_POINTS_PER_CENTROID <= vi.TRAIN_POINTS_PER_CENTROID <= 256
    assert vi.default_training_sample_size(vi.validate_factory("Flat", DIM), DIM, 10**6) == 0
    assert vi.default_training_sample_size(vi.validate_factory("HNSW32", DIM), DIM, 10**6) == 0


# --------------------------------------------------------------------------- on-disk decision, files


def test_ondisk_is_chosen_when_lists_exceed_the_budget(db: np.ndarray, tmp_path: Path) -> None:
    spec = vi.validate_factory("IVF64,SQ8", DIM)
    list_bytes = N_DB * (DIM + 8)  # SQ8: one byte per dimension, plus an 8-byte id
    at = vi.build_out_of_core(_chunks(db), N_DB, DIM, spec, tmp_path / "a.faiss", memory_budget_bytes=list_bytes)
    over = vi.build_out_of_core(_chunks(db), N_DB, DIM, spec, tmp_path / "b.faiss", memory_budget_bytes=list_bytes - 1)
    assert not at.ondisk and over.ondisk
    assert over.ivfdata_path == tmp_path / "b.ivfdata"
    forced_off = vi.build_out_of_core(
        _chunks(db), N_DB, DIM, spec, tmp_path / "c.faiss", memory_budget_bytes=1_000, ondisk=False
    )
    assert not forced_off.ondisk


def test_ondisk_index_opens_after_its_directory_is_renamed(db: np.ndarray, queries: np.ndarray, tmp_path: Path) -> None:
    spec = vi.validate_factory("IVF64,Flat", DIM)
    built = tmp_path / "build-tmp"
    built.mkdir()
    vi.build_out_of_core(_chunks(db), N_DB, DIM, spec, built / "index.faiss", seed=SEED, ondisk=True)
    expected = vi.search(vi.read(built / "index.faiss"), queries, 10)
    published = tmp_path / "published"
    os.rename(built, published)
    # Another index now sits at the path recorded inside the first one: reading
    # must use the file beside the index, not the recorded path.
    built.mkdir()
    other = _mixture(N_DB, seed=7)
    vi.build_out_of_core(_chunks(other), N_DB, DIM, spec, built / "index.faiss", seed=SEED, ondisk=True)
    for mmap in (False, True):
        index = vi.read(published / "index.faiss", mmap=mmap)
        assert vi.ondisk_ivfdata_path(index) == published.resolve() / "index.ivfdata"
        for got, want in zip(vi.search(index, queries, 10), expected, strict=True):
            np.testing.assert_array_equal(got, want)
        del index
    (published / "index.ivfdata").unlink()
    with pytest.raises(OSError, match="index.faiss"):
        vi.read(published / "index.faiss")


def test_files_are_fsynced_before_they_are_renamed_into_place(
    db: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", os.path.basename(os.fspath(src))))
        events.append(("replaced", os.path.basename(os.fspath(dst))))
        real_replace(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    spec = vi.validate_factory("IVF64,Flat", DIM)
    vi.build_out_of_core(_chunks(db), N_DB, DIM, spec, tmp_path / "index.faiss", ondisk=True)
    renames = [(i, name) for i, (kind, name) in enumerate(events) if kind == "replace"]
    assert [events[i + 1][1] for i, _ in renames] == ["index.ivfdata", "index.faiss"], "lists first, then the index"
    for i, tmp_name in renames:
        assert ("fsync", tmp_name) in events[:i], f"{tmp_name} renamed before fsync"
    assert events[-1] == ("fsync", tmp_path.name), "the directory is fsynced last"


# --------------------------------------------------------------------------- bad inputs


def test_dimension_mismatch_is_a_config_error(db: np.ndarray, tmp_path: Path) -> None:
    spec = vi.validate_factory("IVF64,Flat", DIM)
    parts = _chunks(db)
    parts[3] = parts[3][:, :16]
    with pytest.raises(ConfigError, match="chunk 3 has vectors of dim 16, expected 32"):
        vi.build_out_of_core(parts, N_DB, DIM, spec, tmp_path / "index.faiss")
    with pytest.raises(ConfigError, match="2-D"):
        vi.build_out_of_core([db[0]], 1, DIM, vi.IndexSpec("Flat"), tmp_path / "index.faiss")
    with pytest.raises(ConfigError, match="floating point"):
        vi.build_out_of_core([np.ones((4, DIM), np.int32)], 4, DIM, vi.IndexSpec("Flat"), tmp_path / "index.faiss")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ondisk", [False, True])
def test_row_count_mismatch_is_a_config_error(ondisk: bool, db: np.ndarray, tmp_path: Path) -> None:
    spec = vi.validate_factory("IVF64,Flat", DIM)
    with pytest.raises(ConfigError, match="chunks hold 3999 vectors but n_total is 4000"):
        vi.build_out_of_core([db[:3999]], N_DB, DIM, spec, tmp_path / "index.faiss", ondisk=ondisk)
    with pytest.raises(ConfigError, match="more than n_total=3000"):
        vi.build_out_of_core(_chunks(db), 3_000, DIM, spec, tmp_path / "index.faiss", ondisk=ondisk)
    assert list(tmp_path.iterdir()) == []


def test_failure_in_the_add_pass_leaves_no_files(db: np.ndarray, tmp_path: Path) -> None:
    """The second pass differs from the first (a source changed underneath): nothing is left."""
    passes = []

    def changing() -> Iterator[np.ndarray]:
        passes.append(1)
        yield db[:2_000]
        yield db[2_000:] if len(passes) == 1 else db[2_000:3_000]

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    spec = vi.validate_factory("IVF64,Flat", DIM)
    with pytest.raises(ConfigError, match="chunks hold 3000 vectors"):
        vi.build_out_of_core(
            changing, N_DB, DIM, spec, out / "index.faiss", ondisk=True, work_dir=work, memory_budget_bytes=100_000
        )
    assert len(passes) == 2
    assert list(out.iterdir()) == [] and list(work.iterdir()) == []


def test_too_few_vectors_to_train_names_the_numbers(db: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(InvalidIndexFactoryError) as info:
        vi.build_out_of_core(
            _chunks(db[:1_000], [0, 500, 1_000]), 1_000, DIM, vi.validate_factory("IVF4096,Flat", DIM), tmp_path / "i"
        )
    assert "'IVF4096,Flat'" in str(info.value) and "4096" in str(info.value) and "1000" in str(info.value)
    with pytest.raises(InvalidIndexFactoryError, match="at least 64 training vectors.*got 63"):
        vi.build_out_of_core(
            _chunks(db), N_DB, DIM, vi.validate_factory("IVF64,Flat", DIM), tmp_path / "i", sample_size=63
        )
    assert list(tmp_path.iterdir()) == []


def test_ondisk_needs_an_ivf(db: np.ndarray, tmp_path: Path) -> None:
    for factory in ("Flat", "HNSW32", "PQ4"):
        with pytest.raises(InvalidIndexFactoryError, match="no inverted lists"):
            vi.build_out_of_core(_chunks(db), N_DB, DIM, vi.validate_factory(factory, DIM), tmp_path / "i", ondisk=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_total": 0}, "n_total must be a positive integer"),
        ({"dim": -1}, "dim must be a positive integer"),
        ({"sample_size": 0}, "sample_size must be a positive integer"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes must be a positive integer"),
        ({"ondisk": "yes"}, "ondisk must be True, False or None"),
    ],
)
def test_bad_arguments_are_config_errors(
    kwargs: dict[str, object], message: str, db: np.ndarray, tmp_path: Path
) -> None:
    args: dict[str, object] = {"n_total": N_DB, "dim": DIM}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        vi.build_out_of_core(_chunks(db), spec=vi.IndexSpec("Flat"), path=tmp_path / "i", **args)  # type: ignore[arg-type]


def test_one_shot_iterator_is_rejected(db: np.ndarray, tmp_path: Path) -> None:
    one_shot: Callable[[], Iterator[np.ndarray]] = lambda: iter(_chunks(db))  # noqa: E731
    with pytest.raises(ConfigError, match="read them twice"):
        vi.build_out_of_core(one_shot(), N_DB, DIM, vi.IndexSpec("Flat"), tmp_path / "i")
    with pytest.raises(ConfigError, match="read them twice"):
        vi.training_sample(one_shot(), N_DB, DIM, 10)
    with pytest.raises(InvalidIndexFactoryError, match="nonsense"):
        vi.build_out_of_core(_chunks(db), N_DB, DIM, vi.IndexSpec("nonsense"), tmp_path / "i")
