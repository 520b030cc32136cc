"""Failure injection into the staged build (esmsearch.indexer.build), then ``--resume``.

A failure is injected between every pair of stages (right after the journal records
a stage) and inside embed, decoys, train and add, as an exception in this process
and as ``kill -9`` of a subprocess running ``esmsearch index build`` with a hook
that SIGKILLs the process at the chosen point (deterministic, not timed). Each time
the partial build must be kept, and ``--resume`` must give the vectors, ids and
FAISS results of an uninterrupted build, embedding nothing the journal recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from esmsearch import vector_index
from esmsearch.cli import main
from esmsearch.embedding import Embedder
from esmsearch.errors import ConfigError
from esmsearch.indexer import journal as journal_module
from esmsearch.indexer.build import BuildResult, build_index, build_version, partial_build_dir
from esmsearch.indexer.journal import Stage
from esmsearch.indexer.shards import chunk_records
from esmsearch.sequences import read_fasta
from esmsearch.store import Index

FACTORY = "IVF4,Flat"  # trained, so every stage writes something
CHUNK = 500  # residues: many chunks in the 40-sequence FASTA


class Injected(RuntimeError):
    pass


def _build(fasta: Path, out: Path, embedder: Embedder, **kwargs: Any) -> BuildResult:
    kwargs.setdefault("index_factory", FACTORY)
    return build_index(fasta, out, model="unused", embedder=embedder, chunk_residues=CHUNK, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ecoli_fasta: Path, tiny_embedder: Embedder) -> Path:
    """An uninterrupted build of the same FASTA and settings."""
    out = tmp_path_factory.mktemp("reference") / "idx"
    _build(ecoli_fasta, out, tiny_embedder)
    return out


def _assert_same_index(path: Path, reference: Path, factory: str = FACTORY) -> None:
    """Same vectors, ids and FAISS search results as ``reference`` (and a whole, verified index)."""
    with Index.open(path, verify=True) as a, Index.open(reference) as b:
        assert a.manifest.index_factory == factory
        assert [m[1:] for m in a.iter_metadata()] == [m[1:] for m in b.iter_metadata()]
        va, vb = np.array(a.embeddings()), np.array(b.embeddings())
        np.testing.assert_allclose(va, vb, atol=1e-6)
        np.testing.assert_allclose(np.load(path / "decoys.npy"), np.load(reference / "decoys.npy"), atol=1e-6)
        assert a.manifest.decoys == b.manifest.decoys
        queries = vb[::3]
        scores_a, rows_a = a.search(queries, 5)
        scores_b, rows_b = b.search(queries, 5)
        if factory == b.manifest.index_factory:
            np.testing.assert_array_equal(rows_a, rows_b)
            np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)
        assert (rows_a[:, 0] == np.arange(0, len(vb), 3)).all()  # self-hits at rank 1
    assert not partial_build_dir(path).exists()
    assert not (path / "build-state.json").exists()


def _journal(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((partial_build_dir(out) / "build-state.json").read_text())
    return data


def _resume(fasta: Path, out: Path, embedder: Embedder, **kwargs: Any) -> BuildResult:
    return _build(fasta, out, embedder, resume=True, **kwargs)


def _embedded_residues(result: BuildResult) -> tuple[int, int]:
    """Database and decoy residues embedded by this run."""
    return result.embedded_residues, int(result.manifest.build["decoy_embedded_residues"])


# -- exceptions between every pair of stages --------------------------------------------------


@pytest.mark.parametrize("stage", [s for s in Stage if s not in (Stage.PUBLISH,)])
def test_exception_after_each_stage_then_resume_redoes_only_what_follows(
    stage: Stage,
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_embedder: Embedder,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_record = journal_module.BuildJournal.record

    def record(self: journal_module.BuildJournal, done: Stage, rec: journal_module.StageRecord) -> None:
        real_record(self, done, rec)
        if done == stage:
            raise Injected(f"after {done}")

    out = tmp_path / "idx"
    with monkeypatch.context() as mp:
        mp.setattr(journal_module.BuildJournal, "record", record)
        with pytest.raises(Injected) as failure:
            _build(ecoli_fasta, out, tiny_embedder)
    assert any("--resume" in note for note in failure.value.__notes__)
    assert not out.exists()
    state = _journal(out)
    assert set(state["stages"]) == {s.value for s in Stage if s.position <= stage.position}

    def _version_in_journal(stage: Stage) -> str:
        return str(state["stages"][stage.value]["info"]["version"])

    result = _resume(ecoli_fasta, out, tiny_embedder)
    _assert_same_index(out, reference)
    if stage == Stage.VERIFY:  # only publishing was left: the sealed manifest is the first run's
        assert (result.embedded_residues, result.embed_seconds) == (0, 0.0)
        assert result.manifest.version == _version_in_journal(stage)
        return
    database, decoys = _embedded_residues(result)
    if stage.position >= Stage.EMBED.position:
        assert database == 0  # nothing journaled is embedded again
    else:
        assert database == result.residues
    if stage.position >= Stage.DECOYS.position:
        assert decoys == 0
    else:
        assert decoys > 0
    assert result.manifest.build["resumed"] is True


# -- exceptions inside embed, decoys, train and add -------------------------------------------


def _fail_on_call(n: int, real: Callable[..., Any]) -> Callable[..., Any]:
    calls = [0]

    def fail(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise Injected(f"call {n}")
        return real(*args, **kwargs)

    return fail


def _fail_writing(name: str) -> Callable[..., Any]:
    real = vector_index.write

    def write(index: Any, path: Any) -> None:
        if Path(path).name == name:
            raise Injected(f"writing {name}")
        real(index, path)

    return write


@pytest.mark.parametrize("where", ["embed", "decoys", "train", "add"])
def test_exception_inside_a_stage_then_resume(
    where: str,
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_embedder: Embedder,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "idx"
    with monkeypatch.context() as mp:
        if where == "embed":  # the 4th database chunk
            mp.setattr(tiny_embedder, "embed", _fail_on_call(4, tiny_embedder.embed))
        elif where == "decoys":  # the 2nd decoy chunk, after every database chunk
            chunks = len(list(chunk_records(read_fasta(ecoli_fasta), CHUNK)))
            mp.setattr(tiny_embedder, "embed", _fail_on_call(chunks + 2, tiny_embedder.embed))
        elif where == "train":
            mp.setattr(vector_index, "_train", _fail_on_call(1, vector_index._train))
        else:  # after every vector is added, before index.faiss is in place
            mp.setattr(vector_index, "write", _fail_writing("index.faiss"))
        with pytest.raises(Injected):
            _build(ecoli_fasta, out, tiny_embedder)
    state = _journal(out)
    result = _resume(ecoli_fasta, out, tiny_embedder)
    _assert_same_index(out, reference)
    database, decoys = _embedded_residues(result)
    if where == "embed":
        assert 3 <= state["shards"] and "embed" not in state["stages"]
        assert 0 < database < result.residues  # the journaled chunks were not redone
    elif where == "decoys":
        assert "embed" in state["stages"] and "decoys" not in state["stages"] and state["decoy_shards"] > 0
        with Index.open(reference) as ref:
            assert database == 0 and 0 < decoys < ref.manifest.build["decoy_embedded_residues"]
    else:
        last = "assemble" if where == "train" else "train"
        assert set(state["stages"]) == {s.value for s in Stage if s.position <= Stage(last).position}
        assert (database, decoys) == (0, 0)


# -- FAISS settings changed on resume ---------------------------------------------------------


@pytest.mark.parametrize("after", [Stage.ASSEMBLE, Stage.TRAIN, Stage.VERIFY])
def test_resume_with_another_factory_keeps_the_vectors_and_redoes_faiss(
    after: Stage,
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_embedder: Embedder,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_record = journal_module.BuildJournal.record

    def record(self: journal_module.BuildJournal, done: Stage, rec: journal_module.StageRecord) -> None:
        real_record(self, done, rec)
        if done == after:
            raise Injected(f"after {done}")

    out = tmp_path / "idx"
    with monkeypatch.context() as mp:
        mp.setattr(journal_module.BuildJournal, "record", record)
        with pytest.raises(Injected):
            _build(ecoli_fasta, out, tiny_embedder)
    result = _resume(ecoli_fasta, out, tiny_embedder, index_factory="Flat")
    assert _embedded_residues(result) == (0, 0)
    assert result.manifest.index_factory == "Flat"
    assert result.manifest.build["faiss_train_rows"] == 0
    _assert_same_index(out, reference, factory="Flat")


def test_resume_with_other_vector_settings_is_refused_and_discard_removes_it(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    with monkeypatch.context() as mp:
        mp.setattr(vector_index, "_train", _fail_on_call(1, vector_index._train))
        with pytest.raises(Injected):
            _build(ecoli_fasta, out, tiny_embedder)
    with pytest.raises(ConfigError, match="store_dtype"):
        _resume(ecoli_fasta, out, tiny_embedder, store_dtype="float16")
    assert partial_build_dir(out).is_dir()
    fasta_arg = str(ecoli_fasta)
    assert main(["index", "build", fasta_arg, "-o", str(out), "--discard"]) == 0
    assert not partial_build_dir(out).exists() and not out.exists()
    assert main(["index", "build", fasta_arg, "-o", str(out), "--discard"]) == 0  # nothing left: still fine


def test_a_changed_output_of_a_journaled_stage_is_redone(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    with monkeypatch.context() as mp:
        mp.setattr(vector_index, "_train", _fail_on_call(1, vector_index._train))
        with pytest.raises(Injected):
            _build(ecoli_fasta, out, tiny_embedder)
    embeddings = partial_build_dir(out) / "embeddings.npy"
    vectors = np.load(embeddings)
    vectors[0] = 0.0
    np.save(embeddings, vectors)  # corrupted after assemble was journaled, shards gone
    result = _resume(ecoli_fasta, out, tiny_embedder)
    # assemble needs the shards, which are gone once it was journaled: the digest
    # mismatch sends the resume back to the first stage whose outputs it can trust
    assert result.embedded_residues == result.residues
    _assert_same_index(out, reference)


def test_versioned_root_failure_after_embedding_keeps_the_work_and_resume_completes(
    tmp_path: Path, ecoli_fasta: Path, tiny_embedder: Embedder, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    with monkeypatch.context() as mp:
        mp.setattr(vector_index, "write", _fail_writing("index.faiss"))
        with pytest.raises(Injected):
            build_version(
                ecoli_fasta, root, model="unused", embedder=tiny_embedder, chunk_residues=CHUNK, index_factory=FACTORY
            )
    assert (root / ".build.partial" / "embeddings.npy").is_file()
    result = build_version(
        ecoli_fasta,
        root,
        model="unused",
        embedder=tiny_embedder,
        chunk_residues=CHUNK,
        index_factory=FACTORY,
        resume=True,
    )
    assert _embedded_residues(result) == (0, 0)
    assert not (root / ".build.partial").exists()
    assert not (result.path / "build-state.json").exists()
    with Index.open(result.path, verify=True) as a, Index.open(reference) as b:
        np.testing.assert_allclose(np.array(a.embeddings()), np.array(b.embeddings()), atol=1e-6)


# -- kill -9 -----------------------------------------------------------------------------------

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    from esmsearch import vector_index
    from esmsearch.embedding import Embedder
    from esmsearch.indexer import journal

    where = os.environ["ESMSEARCH_TEST_KILL_AT"]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where.startswith("after:"):
        real_record = journal.BuildJournal.record

        def record(self, stage, rec):
            real_record(self, stage, rec)
            if stage.value == where[6:]:
                die()

        journal.BuildJournal.record = record
    elif where == "embed":
        real_embed = Embedder.embed
        calls = []

        def embed(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                die()
            return real_embed(self, *args, **kwargs)

        Embedder.embed = embed
    elif where == "train":
        vector_index._train = die
    elif where == "add":
        real_write = vector_index.write

        def write(index, path):
            if Path(path).name == "index.faiss":
                die()
            real_write(index, path)

        vector_index.write = write
    from esmsearch.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("where", ["embed", "after:decoys", "train", "add", "after:verify"])
def test_kill_9_at_a_chosen_point_then_resume(
    where: str, tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, tiny_embedder: Embedder, reference: Path
) -> None:
    out = tmp_path / "idx"
    args = [str(ecoli_fasta), "-o", str(out), "--model", str(tiny_checkpoint), "--device", "cpu"]
    args += ["--index-factory", FACTORY, "--chunk-residues", str(CHUNK), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, "index", "build", *args],
        env={**os.environ, "ESMSEARCH_TEST_KILL_AT": where},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists() and partial_build_dir(out).is_dir()
    state = _journal(out)
    result = _resume(ecoli_fasta, out, tiny_embedder)
    _assert_same_index(out, reference)
    if where == "embed":
        assert state["shards"] >= 3 and 0 < result.embedded_residues < result.residues
    elif where == "after:verify":  # only publishing was left: the sealed manifest is the killed run's
        assert result.embedded_residues == 0
        assert result.manifest.version == state["stages"]["verify"]["info"]["version"]
    else:
        assert _embedded_residues(result) == (0, 0)


def test_cli_failure_says_how_to_resume_and_resume_finishes(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_checkpoint: Path,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from esmsearch.errors import InvalidIndexFactoryError

    out = tmp_path / "idx"
    argv = ["index", "build", str(ecoli_fasta), "-o", str(out), "--model", str(tiny_checkpoint), "--device", "cpu"]
    argv += ["--index-factory", FACTORY, "--chunk-residues", str(CHUNK), "--no-progress"]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise InvalidIndexFactoryError("injected training failure")

    with monkeypatch.context() as mp:
        mp.setattr(vector_index, "_train", refuse)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "esmsearch: error: injected training failure" in err
    assert f"note: the build's work is kept in {partial_build_dir(out)}" in err and "--resume" in err
    assert main([*argv, "--resume"]) == 0
    _assert_same_index(out, reference)
