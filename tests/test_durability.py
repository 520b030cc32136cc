"""Durable, atomic publication: fsync order, atomic --overwrite, fault injection at
every step, and paths that need quoting (esmsearch.fsutil, store, versions, indexer).

The fault-injection tests wrap every step that changes what a path names or makes
it durable (``os.replace``, ``os.rename``, ``os.symlink``, ``shutil.rmtree``,
``fsutil.exchange``, ``fsutil.fsync_file``, ``fsutil.fsync_dir``). They check two
things: before and after every single step (where a crash could stop the process)
the destination holds a whole index; and when step N raises, for every N, the build
fails cleanly and the destination still holds a whole index, old or new.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from esmsearch import fsutil
from esmsearch.embedding import Embedder
from esmsearch.indexer import build_index, build_version
from esmsearch.sequences import read_fasta
from esmsearch.store import Index
from esmsearch.versions import IndexRoot

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
STEPS: list[tuple[Any, str]] = [
    (os, "replace"),
    (os, "rename"),
    (os, "symlink"),
    (shutil, "rmtree"),
    (fsutil, "exchange"),
    (fsutil, "fsync_file"),
    (fsutil, "fsync_dir"),
]


def _fasta(path: Path, n: int, seed: int, prefix: str) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(
        "".join(
            f">{prefix}{i} synthetic\n{''.join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(20, 50))))}\n"
            for i in range(n)
        )
    )
    return path


def _ids(fasta: Path) -> list[str]:
    return [r.record_id for r in read_fasta(fasta)]


class InjectedFault(OSError):
    def __init__(self, step: str) -> None:
        super().__init__(errno.EIO, f"injected failure at {step}")


@dataclass
class Steps:
    """Wraps every durability step: records it, optionally checks an invariant around
    it, and raises instead of performing step number ``fail_at`` (1-based)."""

    fail_at: int | None = None
    check: Callable[[], None] | None = None
    trace: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    checks: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for module, name in STEPS:
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            self.trace.append((name, tuple(str(a) for a in args)))
            if self.check is not None:
                self.check()
                self.checks += 1
            if len(self.trace) == self.fail_at:
                raise InjectedFault(f"step {len(self.trace)} ({name} {args})")
            result = func(*args, **kwargs)
            if self.check is not None:
                self.check()
                self.checks += 1
            return result

        return step


def _whole_index_either(path: Path, old_version: str, old_fasta: Path, new_fasta: Path) -> str:
    """Assert ``path`` holds the whole old index or a whole index of ``new_fasta``."""
    with Index.open(path, verify=True) as index:
        version = index.version
    return _whole_index(path, {version: _ids(old_fasta) if version == old_version else _ids(new_fasta)})


def _whole_index(path: Path, allowed: dict[str, list[str]]) -> str:
    """Assert ``path`` is a complete, checksum-verified index whose version is one of
    ``allowed`` (version -> record ids); return the version."""
    with Index.open(path, verify=True) as index:
        assert index.version in allowed, f"{path} holds unexpected version {index.version}"
        assert [m[1] for m in index.iter_metadata()] == allowed[index.version]
        return index.version


@pytest.fixture()
def embedder(tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> Embedder:
    """``tiny_embedder`` with each sequence's vector computed once and then replayed:
    these tests run hundreds of builds and are about files, not the model."""
    cache: dict[str, np.ndarray] = {}
    real = tiny_embedder.embed

    def embed(sequences: Any, **kwargs: Any) -> np.ndarray:
        missing = [s for s in dict.fromkeys(sequences) if s not in cache]
        if missing:
            cache.update(zip(missing, real(missing), strict=True))
        return np.stack([cache[s] for s in sequences]) if sequences else real([])

    monkeypatch.setattr(tiny_embedder, "embed", embed)
    return tiny_embedder


@pytest.fixture()
def two_databases(tmp_path: Path) -> tuple[Path, Path]:
    return _fasta(tmp_path / "old.fasta", 8, seed=1, prefix="old"), _fasta(tmp_path / "new.fasta", 10, 2, "new")


# -- standalone --overwrite -----------------------------------------------------------------


def _old_standalone(tmp_path: Path, old_fasta: Path, embedder: Embedder) -> tuple[Path, str]:
    template = tmp_path / "template" / "idx"
    result = build_index(old_fasta, template, model="unused", embedder=embedder)
    return template, result.manifest.version


def test_overwrite_holds_a_whole_index_before_and_after_every_step(
    tmp_path: Path, two_databases: tuple[Path, Path], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_fasta, new_fasta = two_databases
    template, old_version = _old_standalone(tmp_path, old_fasta, embedder)
    out = tmp_path / "live" / "idx"
    shutil.copytree(template, out)
    seen: list[str] = []

    def check() -> None:
        version = _whole_index_either(out, old_version, old_fasta, new_fasta)
        if seen and seen[-1] != old_version:
            assert version == seen[-1]  # once the new index is in, it stays
        seen.append(version)

    steps = Steps(check=check)
    steps.install(monkeypatch)
    result = build_index(new_fasta, out, model="unused", embedder=embedder, chunk_residues=100, overwrite=True)
    assert steps.checks >= 2 * 15
    assert seen[0] == old_version and seen[-1] == result.manifest.version
    assert [name for name, _ in steps.trace].count("exchange") == 1  # the atomic swap, no rename-aside
    assert sorted(p.name for p in out.parent.iterdir()) == ["idx"]


@pytest.mark.parametrize("exchange_supported", [True, False], ids=["exchange", "rename-aside"])
def test_overwrite_failing_at_every_step_leaves_old_or_new_index(
    tmp_path: Path,
    two_databases: tuple[Path, Path],
    embedder: Embedder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    exchange_supported: bool,
) -> None:
    old_fasta, new_fasta = two_databases
    template, old_version = _old_standalone(tmp_path, old_fasta, embedder)
    if not exchange_supported:

        def unsupported(a: Any, b: Any) -> None:
            raise fsutil.ExchangeNotSupportedError(errno.EINVAL, "not on this filesystem")

        monkeypatch.setattr(fsutil, "exchange", unsupported)
    outcomes = []
    for n in range(1, 200):
        out = tmp_path / f"run{n}" / "idx"
        shutil.copytree(template, out)
        with monkeypatch.context() as mp:
            steps = Steps(fail_at=n)
            steps.install(mp)
            try:
                result = build_index(new_fasta, out, model="unused", embedder=embedder, overwrite=True)
            except InjectedFault:
                result = None
        version = _whole_index_either(out, old_version, old_fasta, new_fasta)
        outcomes.append("old" if version == old_version else "new")
        if result is not None:
            assert len(steps.trace) < n  # every step has had its failure
            assert version == result.manifest.version
            break
    else:
        pytest.fail("the build never finished")
    assert n > 15
    # The new index appears only at the publishing steps, and then stays.
    n_new = outcomes.count("new")
    assert outcomes == ["old"] * (n - n_new) + ["new"] * n_new and 1 <= n_new <= 4
    if not exchange_supported:
        assert "replacing it by rename-aside" in caplog.text


# -- versioned roots ------------------------------------------------------------------------


def test_root_current_is_whole_before_and_after_every_step(
    tmp_path: Path, two_databases: tuple[Path, Path], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_fasta, new_fasta = two_databases
    root = tmp_path / "root"
    v1 = build_version(old_fasta, root, model="unused", embedder=embedder).manifest.version
    index_root = IndexRoot(root)
    names: list[str] = []

    def check() -> None:
        current = index_root.current_version()
        assert current is not None
        expected = _ids(old_fasta) if current == v1 else _ids(new_fasta)
        _whole_index(index_root.current_path(), {current: expected})
        names.append(current)

    steps = Steps(check=check)
    steps.install(monkeypatch)
    v2 = build_version(new_fasta, root, model="unused", embedder=embedder, chunk_residues=100)
    assert names[0] == v1 and names[-1] == v2.manifest.version
    assert set(names) == {v1, v2.manifest.version}
    assert steps.checks >= 2 * 15


def test_root_failing_at_every_step_keeps_current_whole(
    tmp_path: Path, two_databases: tuple[Path, Path], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_fasta, new_fasta = two_databases
    root = tmp_path / "root"
    v1 = build_version(old_fasta, root, model="unused", embedder=embedder).manifest.version
    index_root = IndexRoot(root)
    for n in range(1, 200):
        with monkeypatch.context() as mp:
            steps = Steps(fail_at=n)
            steps.install(mp)
            try:
                result = build_version(new_fasta, root, model="unused", embedder=embedder, keep_versions=2)
            except InjectedFault:
                result = None
        current = index_root.current_version()
        assert current is not None
        _whole_index(index_root.current_path(), {current: _ids(old_fasta) if current == v1 else _ids(new_fasta)})
        for info in index_root.list_versions():  # every listed version is whole too
            with Index.open(info.path, verify=True):
                pass
        if result is not None:
            assert len(steps.trace) < n
            assert current == result.manifest.version
            break
    else:
        pytest.fail("the build never finished")
    assert n > 15


# -- fsync order ----------------------------------------------------------------------------


def _index_of(trace: list[tuple[str, tuple[str, ...]]], pred: Callable[[str, tuple[str, ...]], bool]) -> list[int]:
    return [i for i, (name, args) in enumerate(trace) if pred(name, args)]


def manifest_in_at(trace: list[tuple[str, tuple[str, ...]]]) -> int:
    """Trace position of the manifest's rename into place."""
    [pos] = _index_of(trace, lambda n, a: n == "replace" and Path(a[1]).name == "manifest.json")
    return pos


def test_shards_are_fsynced_before_they_are_journaled_and_publishes_fsync_their_directory(
    tmp_path: Path, two_databases: tuple[Path, Path], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, new_fasta = two_databases
    root = tmp_path / "root"
    # (trace position, chunks the journal names) each time the database / decoy count changes
    journaled_at: dict[str, list[tuple[int, int]]] = {"shards": [], "decoy_shards": []}
    stage_at: dict[str, int] = {}  # stage -> trace position when the journal first names it
    steps = Steps()
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "build-state.json":
            import json

            data = json.loads(Path(src).read_text())
            for key, seen in journaled_at.items():
                value = data.get(key)
                if value is not None and (not seen or seen[-1][1] != value):
                    seen.append((len(steps.trace), value))
            for stage in data["stages"]:
                stage_at.setdefault(stage, len(steps.trace))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    steps.install(monkeypatch)
    result = build_version(new_fasta, root, model="unused", embedder=embedder, chunk_residues=100)
    trace = steps.trace
    # Database shards and decoy shards alike: fsynced, renamed, directory fsynced, then journaled.
    for key, prefix, directory in (("shards", "shard", "shards"), ("decoy_shards", "decoy", "decoy-shards")):
        n_shards = max(s for _, s in journaled_at[key])
        assert n_shards >= 3, key
        for k in range(n_shards):
            shard = f"{prefix}-{k:06d}"
            fsynced = _index_of(trace, lambda n, a, s=shard: n == "fsync_file" and Path(a[0]).name == f"{s}.tmp.npy")
            renamed = _index_of(trace, lambda n, a, s=shard: n == "replace" and Path(a[1]).name == f"{s}.npy")
            dir_synced = _index_of(trace, lambda n, a, d=directory: n == "fsync_dir" and Path(a[0]).name == d)
            journaled = [pos for pos, shards in journaled_at[key] if shards == k + 1]
            assert len(fsynced) == len(renamed) == len(journaled) == 1, shard
            assert fsynced[0] < renamed[0] < journaled[0] - 1
            assert any(renamed[0] < d < journaled[0] for d in dir_synced), shard
    # decoys.npy is written after the last decoy shard and fsynced before the journal says so
    decoys_synced = _index_of(trace, lambda n, a: n == "fsync_file" and Path(a[0]).name == "decoys.npy")
    assert journaled_at["decoy_shards"][-1][0] < decoys_synced[0] < stage_at["decoys"]
    # every stage is journaled in order, after its outputs are fsynced
    assert sorted(stage_at, key=stage_at.__getitem__) == [
        "validate",
        "embed",
        "decoys",
        "assemble",
        "train",
        "add",
        "verify",
    ]
    synced = _index_of(trace, lambda n, a: n == "fsync_file" and Path(a[0]).name == "embeddings.npy")
    assert synced[0] < stage_at["assemble"]
    # vector_index.write: temporary file fsynced, then renamed onto index.faiss
    placed = _index_of(trace, lambda n, a: n == "replace" and Path(a[1]).name == "index.faiss")
    assert len(placed) == 1 and stage_at["train"] < placed[0] < stage_at["add"]
    assert stage_at["add"] < manifest_in_at(trace) < stage_at["verify"]
    versions_dir = root / "versions"
    added = _index_of(trace, lambda n, a: n == "rename" and Path(a[1]).parent == versions_dir)
    swapped = _index_of(trace, lambda n, a: n == "replace" and Path(a[1]) == root / "current")
    assert len(added) == len(swapped) == 1
    assert (trace[added[0] + 1][0], Path(trace[added[0] + 1][1][0])) == ("fsync_dir", versions_dir)
    assert (trace[swapped[0] + 1][0], Path(trace[swapped[0] + 1][1][0])) == ("fsync_dir", root)
    assert added[0] < swapped[0]
    manifest_in = _index_of(trace, lambda n, a: n == "replace" and Path(a[1]).name == "manifest.json")
    assert len(manifest_in) == 1 and trace[manifest_in[0] + 1][0] == "fsync_dir"
    data_fsynced = {Path(a[0]).name for n, a in trace[: manifest_in[0]] if n == "fsync_file"}
    assert {"index.faiss", "embeddings.npy", "metadata.sqlite", "decoys.npy"} <= data_fsynced
    assert IndexRoot(root).current_version() == result.manifest.version


def test_standalone_publish_fsyncs_the_parent(
    tmp_path: Path, two_databases: tuple[Path, Path], embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_fasta, new_fasta = two_databases
    out = tmp_path / "idx"
    steps = Steps()
    steps.install(monkeypatch)
    build_index(old_fasta, out, model="unused", embedder=embedder)
    renamed = _index_of(steps.trace, lambda n, a: n == "rename" and Path(a[1]) == out)
    assert len(renamed) == 1
    assert steps.trace[renamed[0] + 1] == ("fsync_dir", (str(tmp_path),))
    steps.trace.clear()
    build_index(new_fasta, out, model="unused", embedder=embedder, overwrite=True)
    swapped = _index_of(steps.trace, lambda n, a: n == "exchange")
    assert len(swapped) == 1 and Path(steps.trace[swapped[0]][1][1]) == out
    assert steps.trace[swapped[0] + 1] == ("fsync_dir", (str(tmp_path),))
    assert steps.trace[swapped[0] + 2][0] == "rmtree"  # the old index, only after the swap is durable
    assert _ids(new_fasta) == [m[1] for m in Index.open(out).iter_metadata()]


# -- fsutil ---------------------------------------------------------------------------------


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    try:
        fsutil.exchange(a, b)
    except fsutil.ExchangeNotSupportedError:
        pytest.skip("this filesystem cannot exchange")
    assert ((a / "which").read_text(), (b / "which").read_text()) == ("b", "a")
    with pytest.raises(OSError) as excinfo:
        fsutil.exchange(a, tmp_path / "missing")
    assert excinfo.value.errno == errno.ENOENT
    assert not isinstance(excinfo.value, fsutil.ExchangeNotSupportedError)
    assert ((a / "which").read_text(), (b / "which").read_text()) == ("b", "a")


def test_exchange_without_renameat2_is_not_supported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "_renameat2", lambda: None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(fsutil.ExchangeNotSupportedError):
        fsutil.exchange(tmp_path / "a", tmp_path / "b")


def test_fsync_dir_skips_only_filesystems_that_cannot_sync_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsutil.fsync_dir(tmp_path)
    for code in (errno.EINVAL, errno.ENOTSUP):
        monkeypatch.setattr(os, "fsync", lambda fd, code=code: (_ for _ in ()).throw(OSError(code, "no")))
        fsutil.fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        fsutil.fsync_dir(tmp_path)
    (tmp_path / "x").write_text("x")
    with pytest.raises(OSError, match="disk gone"):
        fsutil.fsync_file(tmp_path / "x")


def test_write_text_atomic_keeps_the_old_content_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    fsutil.write_text_atomic(path, "old")
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "injected")))
    with pytest.raises(OSError, match="injected"):
        fsutil.write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_file_sha256_is_the_one_helper() -> None:
    import esmsearch.embedding
    import esmsearch.indexer.build
    import esmsearch.sequences
    import esmsearch.store

    assert esmsearch.sequences.file_sha256 is fsutil.file_sha256
    for module in (esmsearch.embedding, esmsearch.store, esmsearch.indexer.build):
        assert not hasattr(module, "_sha256") and not hasattr(module, "_file_sha256")
    assert not hasattr(esmsearch.store, "_fsync_dir")


# -- paths that need quoting ----------------------------------------------------------------


@pytest.mark.parametrize("dirname", ["what?mode=rw", "hash#tag", "per%25cent", "sp ace é"])
def test_sqlite_uri_quotes_the_path(tmp_path: Path, dirname: str) -> None:
    directory = tmp_path / dirname
    directory.mkdir()
    db_path = directory / "m.sqlite"
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (42)")
    db.close()
    uri = fsutil.sqlite_uri(db_path)
    assert uri.startswith("file:///") and uri.endswith("?mode=ro")
    path_part = uri[len("file://") : -len("?mode=ro")]
    assert "?" not in path_part and "#" not in path_part and " " not in path_part
    assert urllib.parse.unquote(path_part) == str(db_path.resolve())
    ro = sqlite3.connect(uri, uri=True)
    try:
        assert ro.execute("SELECT x FROM t").fetchone() == (42,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.execute("INSERT INTO t VALUES (1)")
    finally:
        ro.close()
    assert sorted(p.name for p in directory.iterdir()) == ["m.sqlite"]  # no stray database created


def test_index_in_a_directory_named_with_uri_characters(
    tmp_path: Path, two_databases: tuple[Path, Path], embedder: Embedder
) -> None:
    old_fasta, _ = two_databases
    out = tmp_path / "odd?name#with%20chars" / "idx"
    build_index(old_fasta, out, model="unused", embedder=embedder)
    with Index.open(out, verify=True) as index:
        assert [t.record_id for t in index.targets([0, 7])] == ["old0", "old7"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "index.faiss", "embeddings.npy", "metadata.sqlite", "decoys.npy"]
    )


def test_open_text_atomic_leaves_no_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "hits.tsv"
    with pytest.raises(RuntimeError, match="mid-way"), fsutil.open_text_atomic(path) as out:
        out.write("query_id\ttarget_id\n")
        raise RuntimeError("mid-way")
    assert list(tmp_path.iterdir()) == []
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), fsutil.open_text_atomic(path) as out:
        out.write("new")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.tsv"]
    with fsutil.open_text_atomic(path) as out:
        out.write("new")
        assert path.read_text() == "old"  # not visible until the block ends
    assert path.read_text() == "new"
