"""Index directory format: atomic write, open, verify, search (esmsearch.store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from esmsearch import vector_index
from esmsearch.errors import IndexFormatError, IndexNotFoundError
from esmsearch.sequences import sequence_sha256
from esmsearch.store import (
    DATA_FILES,
    EMBEDDINGS_FILE,
    FAISS_FILE,
    MANIFEST,
    Index,
    IndexWriter,
    Manifest,
    Target,
    publish_directory,
)

N, DIM = 25, 16


def _vectors(seed: int = 0, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fields() -> dict[str, Any]:
    return {
        "model_name": "esm2_fake",
        "model_source": "/nowhere/esm2_fake.pt",
        "checkpoint_sha256": "0" * 64,
        "layer": 2,
        "pooling": "mean_residues",
        "normalisation": "l2",
        "precision": "fp32",
        "metric": "inner_product",
        "dim": DIM,
        "index_factory": "Flat",
        "search_params": {},
        "source_fasta": "db.fasta",
        "source_fasta_sha256": "1" * 64,
        "tool_version": "test",
    }


def _rows(n: int = N) -> list[tuple[str, str, int, str]]:
    return [(f"seq{i}", f"protein number {i}", 10 + i, sequence_sha256("M" * (10 + i))) for i in range(n)]


def _write_index(parent: Path, name: str = "idx", seed: int = 0) -> tuple[Path, Manifest, np.ndarray]:
    vectors = _vectors(seed)
    with IndexWriter.temporary(parent) as w:
        w.add_metadata(_rows()[:10])
        w.add_metadata(_rows()[10:])  # appended in row order
        w.write_embeddings(vectors)
        w.write_faiss(vector_index.build(vectors, vector_index.IndexSpec("Flat")))
        manifest = w.finish(**_fields())
        publish_directory(w.directory, parent / name)
    return parent / name, manifest, vectors


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Path, Manifest, np.ndarray]:
    return _write_index(tmp_path)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_written_index_opens_verified(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, manifest, vectors = built
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, *DATA_FILES])
    assert [p.name for p in path.parent.iterdir()] == ["idx"]  # no temp dir left behind
    with Index.open(path, verify=True) as index:
        assert index.manifest == manifest
        assert index.count == N
        assert index.version == manifest.version
        assert set(manifest.files) == set(DATA_FILES)
        np.testing.assert_array_equal(index.embeddings(), vectors)
        rows = list(index.iter_metadata())
        assert [r[:4] for r in rows] == [(i, *_rows()[i][:3]) for i in range(N)]
        assert rows[3][4] == _rows()[3][3]
        assert set(index.file_sizes()) == {MANIFEST, *DATA_FILES}
    assert Manifest.read(path) == manifest
    assert json.loads((path / MANIFEST).read_text())["count"] == N


def test_search_self_hits(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, vectors = built
    with Index.open(path) as index:
        scores, rows = index.search(vectors, k=3)
    assert scores.shape == rows.shape == (N, 3)
    np.testing.assert_array_equal(rows[:, 0], np.arange(N))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # descending
    expected_second = np.sort(vectors @ vectors.T, axis=1)[:, -2]
    np.testing.assert_allclose(scores[:, 1], expected_second, atol=1e-5)


def test_search_k_larger_than_count_pads_with_minus_one(
    built: tuple[Path, Manifest, np.ndarray],
) -> None:
    path, _, vectors = built
    with Index.open(path) as index:
        scores, rows = index.search(vectors[:2], k=N + 5)
    assert rows.shape == (2, N + 5)
    assert np.all(rows[:, N:] == -1)
    assert sorted(rows[0, :N].tolist()) == list(range(N))


def test_search_rejects_wrong_dimension(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, _ = built
    with Index.open(path) as index, pytest.raises(ValueError):
        index.search(np.zeros((1, DIM + 1), dtype=np.float32), k=1)


def test_targets_in_requested_order(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, _ = built
    with Index.open(path) as index:
        got = index.targets([7, 0, 24, 7])
        assert got == [
            Target(7, "seq7", "protein number 7", 17),
            Target(0, "seq0", "protein number 0", 10),
            Target(24, "seq24", "protein number 24", 34),
            Target(7, "seq7", "protein number 7", 17),
        ]
        assert index.targets([]) == []
        with pytest.raises(IndexFormatError):
            index.targets([N])


def test_checksum_mismatch_detected_with_verify(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, _ = built
    emb = path / EMBEDDINGS_FILE
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0xFF  # flip a byte of the last float
    emb.write_bytes(bytes(data))
    Index.open(path).close()  # without verify the shapes still agree
    with pytest.raises(IndexFormatError, match=EMBEDDINGS_FILE):
        Index.open(path, verify=True)


@pytest.mark.parametrize("name", DATA_FILES)
def test_missing_file(built: tuple[Path, Manifest, np.ndarray], name: str) -> None:
    path, _, _ = built
    (path / name).unlink()
    with pytest.raises(IndexFormatError, match=name):
        Index.open(path)


def test_no_manifest(tmp_path: Path, built: tuple[Path, Manifest, np.ndarray]) -> None:
    with pytest.raises(IndexNotFoundError):
        Index.open(tmp_path / "nothing")
    path, _, _ = built
    (path / MANIFEST).unlink()
    with pytest.raises(IndexNotFoundError):
        Index.open(path)


def _edit_manifest(path: Path, **changes: Any) -> None:
    data = json.loads((path / MANIFEST).read_text())
    data.update(changes)
    (path / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize("count", [N - 1, N + 1])
def test_count_mismatch(built: tuple[Path, Manifest, np.ndarray], count: int) -> None:
    path, _, _ = built
    _edit_manifest(path, count=count)
    with pytest.raises(IndexFormatError, match="inconsistent"):
        Index.open(path)


def test_dim_mismatch(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, _ = built
    _edit_manifest(path, dim=DIM * 2)
    with pytest.raises(IndexFormatError, match="dimension"):
        Index.open(path)


def test_bad_manifests(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, _ = built
    good = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable"):
        Index.open(path)
    (path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match="not a JSON object"):
        Index.open(path)
    data = json.loads(good)
    del data["checkpoint_sha256"]
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="checkpoint_sha256"):
        Index.open(path)
    (path / MANIFEST).write_text(good)
    _edit_manifest(path, format_version=999)
    with pytest.raises(IndexFormatError, match="format version"):
        Index.open(path)


def test_corrupt_faiss_file(built: tuple[Path, Manifest, np.ndarray]) -> None:
    path, _, _ = built
    (path / FAISS_FILE).write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match=FAISS_FILE):
        Index.open(path)


def test_failed_build_leaves_no_temp_directory(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), IndexWriter.temporary(tmp_path) as w:
        w.add_metadata(_rows())
        w.write_embeddings(_vectors())
        assert w.directory.parent == tmp_path and w.directory.is_dir()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unfinished_writer_is_removed(tmp_path: Path) -> None:
    with IndexWriter.temporary(tmp_path) as w:
        w.add_metadata(_rows())
    assert not w.directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_finish_rejects_row_count_mismatch(tmp_path: Path) -> None:
    vectors = _vectors()
    with pytest.raises(IndexFormatError), IndexWriter.temporary(tmp_path) as w:
        w.add_metadata(_rows()[:-1])  # one metadata row short
        w.write_embeddings(vectors)
        w.write_faiss(vector_index.build(vectors, vector_index.IndexSpec("Flat")))
        w.finish(**_fields())
    assert list(tmp_path.iterdir()) == []


def test_finish_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match=FAISS_FILE), IndexWriter.temporary(tmp_path) as w:
        w.add_metadata(_rows())
        w.write_embeddings(_vectors())
        w.finish(**_fields())
    assert list(tmp_path.iterdir()) == []


def test_publish_over_existing_requires_overwrite(tmp_path: Path) -> None:
    path, old_manifest, _ = _write_index(tmp_path, seed=0)
    before = _tree(path)
    vectors = _vectors(1)
    with IndexWriter.temporary(tmp_path) as w:
        w.add_metadata(_rows())
        w.write_embeddings(vectors)
        w.write_faiss(vector_index.build(vectors, vector_index.IndexSpec("Flat")))
        new_manifest = w.finish(**_fields())
        with pytest.raises(FileExistsError):
            publish_directory(w.directory, path)
        assert _tree(path) == before
        publish_directory(w.directory, path, overwrite=True)
    assert new_manifest.version != old_manifest.version
    with Index.open(path, verify=True) as index:
        assert index.manifest == new_manifest
        np.testing.assert_array_equal(index.embeddings(), vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # old version deleted, no temp dirs


def test_publish_refuses_to_replace_a_non_index_directory(tmp_path: Path) -> None:
    precious = tmp_path / "idx"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    vectors = _vectors()
    with (
        pytest.raises(IndexFormatError, match="not an esmsearch index"),
        IndexWriter.temporary(tmp_path) as w,
    ):
        w.add_metadata(_rows())
        w.write_embeddings(vectors)
        w.write_faiss(vector_index.build(vectors, vector_index.IndexSpec("Flat")))
        w.finish(**_fields())
        publish_directory(w.directory, precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_copied_index_opens(built: tuple[Path, Manifest, np.ndarray], tmp_path: Path) -> None:
    path, manifest, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    with Index.open(copy, verify=True) as index:
        assert index.manifest == manifest


def test_temporary_writer_directory_name(tmp_path: Path) -> None:
    with IndexWriter.temporary(tmp_path / "new_parent") as w:
        assert w.directory.parent == tmp_path / "new_parent"
        assert w.directory.name.startswith(".esmsearch-build-")
        assert w.directory.is_dir()
    assert list((tmp_path / "new_parent").iterdir()) == []


def test_writer_refuses_existing_directory_unless_resuming(tmp_path: Path) -> None:
    work = tmp_path / "work"
    with pytest.raises(RuntimeError), IndexWriter(work) as w:
        w.add_metadata(_rows()[:5])
        w.commit()
        w.keep_on_error = True
        raise RuntimeError("interrupted")
    assert work.is_dir()
    with pytest.raises(FileExistsError):
        IndexWriter(work)
    with IndexWriter(work, resume=True) as w:
        assert w.rows == 5
        w.truncate_rows(3)
        assert w.rows == 3
        w.add_metadata(_rows()[3:])
        vectors = _vectors()
        w.write_embeddings(vectors)
        w.write_faiss(vector_index.build(vectors, vector_index.IndexSpec("Flat")))
        w.finish(**_fields())
        publish_directory(w.directory, tmp_path / "idx")
    with Index.open(tmp_path / "idx", verify=True) as index:
        assert [r[1] for r in index.iter_metadata()] == [f"seq{i}" for i in range(N)]


def test_targets_not_held_up_by_a_lookup_in_flight(
    built: tuple[Path, Manifest, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread's metadata lookup, stopped inside SQLite, does not stop another's (issue 19)."""
    import sqlite3
    import threading

    path, _, _ = built
    entered, release = threading.Event(), threading.Event()
    stalled: list[threading.Thread] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real_connect(*args, **kwargs)

        def progress() -> int:  # SQLite calls this while it steps a statement
            if threading.current_thread() in stalled:
                entered.set()
                release.wait(30)
            return 0

        db.set_progress_handler(progress, 1)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)
    with Index.open(path) as index:
        slow = threading.Thread(target=index.targets, args=([3, 5],))
        stalled.append(slow)
        slow.start()
        try:
            assert entered.wait(30)
            got: list[Target] = []
            fast = threading.Thread(target=lambda: got.extend(index.targets([7, 0])))
            fast.start()
            fast.join(30)
            finished_while_stalled = not fast.is_alive()
        finally:
            release.set()
            slow.join(30)
        assert finished_while_stalled, "a lookup waited for another lookup in flight"
        assert [t.record_id for t in got] == ["seq7", "seq0"]
    with pytest.raises(sqlite3.ProgrammingError):  # every pooled connection closed with the index
        index.targets([0])


def test_targets_from_many_threads_agree(built: tuple[Path, Manifest, np.ndarray]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path, _, _ = built
    rng = np.random.default_rng(3)
    asks = [rng.integers(0, N, 40).tolist() for _ in range(64)]
    with Index.open(path) as index:
        expected = [[Target(r, f"seq{r}", f"protein number {r}", 10 + r) for r in rows] for rows in asks]
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(index.targets, asks)) == expected
        assert list(index.iter_metadata())[7][:4] == (7, "seq7", "protein number 7", 17)


def test_hits_from_scores_one_lookup_per_distinct_row_and_no_per_hit_objects(
    built: tuple[Path, Manifest, np.ndarray],
) -> None:
    """Large answers: each distinct row's metadata read once; hits held as columns, so the
    garbage collector tracks no object per hit (issue 19); same hits as built one by one."""
    import gc

    from esmsearch.server.engine import EngineHit, hits_from_scores

    path, _, vectors = built
    rng = np.random.default_rng(5)
    q, k = 400, N
    scores = -np.sort(-rng.random((q, k), dtype=np.float32), axis=1)
    rows = np.stack([rng.permutation(N) for _ in range(q)]).astype(np.int64)
    rows[0, -3:] = -1  # fewer hits than k
    evalues = rng.random((q, k), dtype=np.float32) * 10
    with Index.open(path) as index:
        asked: list[list[int]] = []
        real_targets = index.targets

        def counting(rows_asked: Any) -> list[Target]:
            asked.append([int(r) for r in rows_asked])
            return real_targets(rows_asked)

        index.targets = counting  # type: ignore[method-assign]
        gc.collect()
        tracked_before = len(gc.get_objects())
        hits = hits_from_scores(index, scores, rows, k, 0.2, evalues=evalues, max_evalue=8.0)
        tracked_growth = len(gc.get_objects()) - tracked_before
        n_hits = sum(len(h) for h in hits)
        assert n_hits > 5000
        assert tracked_growth < n_hits / 10, f"{tracked_growth} tracked objects for {n_hits} hits"
        assert len(asked) == 1 and sorted(set(asked[0])) == asked[0]  # distinct rows, one lookup
        for qi in (0, 1, q - 1):
            want = []
            for j in range(k):
                if rows[qi, j] >= 0 and scores[qi, j] >= np.float32(0.2) and float(evalues[qi, j]) <= 8.0:
                    r = int(rows[qi, j])
                    want.append(
                        EngineHit(
                            f"seq{r}",
                            f"protein number {r}",
                            float(scores[qi, j]),
                            len(want) + 1,
                            10 + r,
                            float(evalues[qi, j]),
                        )
                    )
            assert list(hits[qi]) == want and hits[qi] == want and len(hits[qi]) == len(want)
            assert hits[qi][-1] == want[-1] and hits[qi][:2] == want[:2]
            assert type(hits[qi][0].cosine_score) is float and type(hits[qi][0].rank) is int


def test_metadata_pool_is_opened_up_front_and_waits_when_all_are_lent(
    built: tuple[Path, Manifest, np.ndarray], tmp_path: Path
) -> None:
    """Every pooled connection is opened with the index, so a version directory moved away
    while served still answers concurrent lookups; beyond the pool a lookup waits."""
    import sqlite3
    import threading

    from esmsearch.store import METADATA_FILE, MetadataReader

    path, _, _ = built
    with Index.open(path) as index:
        moved = tmp_path / "pruned"
        path.rename(moved)  # what VersionRoot.prune does to an old version
        lent = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with index._metadata.connection():
                lent.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert lent.wait(30)
            assert [t.record_id for t in index.targets([4, 2])] == ["seq4", "seq2"]  # another connection
        finally:
            release.set()
            holder.join(30)

    reader = MetadataReader(moved / METADATA_FILE, connections=1)
    got: list[dict[int, Target]] = []
    with reader.connection():
        waiter = threading.Thread(target=lambda: got.append(reader.lookup([1])))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive() and not got  # waits for the one connection
    waiter.join(30)
    assert got == [{1: Target(1, "seq1", "protein number 1", 11)}]
    reader.close()
    with pytest.raises(sqlite3.ProgrammingError):
        reader.lookup([1])


def test_metadata_lookup_returns_stored_text_exactly_with_and_without_sqlite_json(tmp_path: Path) -> None:
    import sqlite3

    from esmsearch.store import MetadataReader

    odd = ['quote " and \\ backslash', "tab\tnew\nline", "ünïcødé ✓ 𝔸", "", "nul\x00inside", "  spaces  "]
    db = sqlite3.connect(tmp_path / "metadata.sqlite")
    db.execute(
        "CREATE TABLE sequences (row INTEGER PRIMARY KEY, record_id TEXT NOT NULL, "
        "description TEXT NOT NULL, length INTEGER NOT NULL, sha256 TEXT NOT NULL)"
    )
    db.executemany(
        "INSERT INTO sequences VALUES (?, ?, ?, ?, ?)",
        [(i, f"id{i}|{text[:3]}", text, 2**40 + i, "0" * 64) for i, text in enumerate(odd)],
    )
    db.commit()
    db.close()
    want = {i: Target(i, f"id{i}|{text[:3]}", text, 2**40 + i) for i, text in enumerate(odd)}
    for use_json in (True, False):
        reader = MetadataReader(tmp_path / "metadata.sqlite", connections=2)
        reader._json = reader._json and use_json
        assert reader.lookup(np.array([5, 0, 3, 1, 2, 4, 3, -1, 99])) == {**want}
        assert reader.lookup([]) == {}
        reader.close()
