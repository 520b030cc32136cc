"""Versioned roots: current pointer, rollback, retention, CLI versions/rollback/info."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esmsearch.cli import main
from esmsearch.embedding import Embedder
from esmsearch.errors import ConfigError, IndexNotFoundError
from esmsearch.indexer import build_version
from esmsearch.versions import IndexRoot


@pytest.fixture(scope="module")
def root3(
    tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Embedder, ecoli_fasta: Path
) -> tuple[Path, list[str]]:
    """A root with three published versions of the same FASTA (the last is current)."""
    root = tmp_path_factory.mktemp("roots") / "root"
    versions = []
    for _ in range(3):
        result = build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder)
        versions.append(result.manifest.version)
    return root, versions


def test_versions_are_listed_oldest_first_and_current_is_the_newest(root3: tuple[Path, list[str]]) -> None:
    root, versions = root3
    r = IndexRoot(root)
    listed = r.list_versions()
    assert [v.version for v in listed] == versions
    assert [v.is_current for v in listed] == [False, False, True]
    assert r.current_version() == versions[-1]
    assert os.readlink(root / "current") == os.path.join("versions", versions[-1])
    assert all(v.count == 40 for v in listed)


def test_second_build_reused_every_vector(tiny_embedder: Embedder, ecoli_fasta: Path, tmp_path: Path) -> None:
    first = build_version(ecoli_fasta, tmp_path / "r", model="unused", embedder=tiny_embedder)
    second = build_version(ecoli_fasta, tmp_path / "r", model="unused", embedder=tiny_embedder)
    assert first.reuse.reused == 0 and first.reuse.embedded == 40
    assert second.reuse.reused == 40 and second.reuse.embedded == 0
    assert second.previous_version == first.manifest.version


def test_rollback_defaults_to_the_previous_version_then_explicit(tmp_path: Path, root3: tuple[Path, list[str]]) -> None:
    root, versions = root3
    r = IndexRoot(root)
    try:
        assert r.rollback() == versions[1]
        assert r.current_version() == versions[1]
        assert r.rollback() == versions[0]
        with pytest.raises(IndexNotFoundError, match="no version older"):
            r.rollback()
        assert r.rollback(versions[2]) == versions[2]
        with pytest.raises(IndexNotFoundError, match="no version 'nope'"):
            r.rollback("nope")
        assert r.current_version() == versions[2]
    finally:
        r.set_current(versions[-1])


def test_prune_keeps_the_newest_and_never_the_live_one(
    tiny_embedder: Embedder, ecoli_fasta: Path, tmp_path: Path
) -> None:
    root = tmp_path / "r"
    versions = [
        build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder).manifest.version for _ in range(3)
    ]
    r = IndexRoot(root)
    r.set_current(versions[0])  # the live one is the oldest
    deleted = r.prune(1)
    assert deleted == [versions[1]]
    assert [v.version for v in r.list_versions()] == [versions[0], versions[2]]
    assert r.current_version() == versions[0]
    with pytest.raises(ConfigError):
        r.prune(0)


def test_keep_versions_on_build_prunes(tiny_embedder: Embedder, ecoli_fasta: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    for _ in range(3):
        last = build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder, keep_versions=2)
    listed = IndexRoot(root).list_versions()
    assert len(listed) == 2
    assert listed[-1].version == last.manifest.version and listed[-1].is_current


def test_empty_root_has_no_current(tmp_path: Path) -> None:
    r = IndexRoot(tmp_path / "empty")
    r.create()
    assert r.current_version() is None
    assert r.list_versions() == []
    with pytest.raises(IndexNotFoundError, match="no published index version"):
        r.current_path()


def test_cli_versions_rollback_and_info_on_root(
    root3: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, versions = root3
    try:
        assert main(["index", "versions", str(root)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split("\t") == ["current", "version", "sequences", "built_at", "model"]
        assert [line.split("\t")[1] for line in out[1:]] == versions
        assert out[-1].startswith("*\t")

        assert main(["index", "rollback", str(root)]) == 0
        assert versions[1] in capsys.readouterr().out
        assert IndexRoot(root).current_version() == versions[1]

        assert main(["index", "info", str(root)]) == 0
        info = capsys.readouterr().out
        assert versions[1] in info and "40" in info

        assert main(["index", "rollback", str(root), "no-such-version"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("esmsearch: error:") and "no-such-version" in err
    finally:
        IndexRoot(root).set_current(versions[-1])


def test_cli_versions_on_empty_dir_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "versions", str(tmp_path)]) == 1
    assert "no published versions" in capsys.readouterr().err
