"""Rebuilds of a versioned index root: incremental reuse, the build lock, refused
verification, and a rebuild killed midway (the live version and server unaffected,
``resume`` completes).

Every build uses the session's tiny seeded ESM-2 (``tiny_checkpoint``) on a
synthetic, seeded FASTA of short sequences, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from esmsearch.errors import IndexFormatError
from esmsearch.indexer import build_index, build_version
from esmsearch.store import Index
from esmsearch.versions import BuildLockedError, IndexRoot

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def random_records(n: int, seed: int, prefix: str = "seq") -> dict[str, str]:
    """``n`` seeded random proteins of 30..90 residues: record id -> sequence."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}{i:04d}": "".join(rng.choice(list(AMINO_ACIDS), size=int(rng.integers(30, 91)))) for i in range(n)
    }


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{rid} synthetic\n{seq}\n" for rid, seq in records.items()))
    return path


def mutate(records: dict[str, str], *, changed: int, removed: int, added: int, seed: int) -> dict[str, str]:
    """Change one residue of ``changed`` records, drop ``removed``, append ``added`` new ones."""
    rng = np.random.default_rng(seed)
    ids = list(records)
    picks = rng.choice(len(ids), size=changed + removed, replace=False)
    out = dict(records)
    for i in picks[:changed]:
        rid = ids[int(i)]
        seq = out[rid]
        pos = int(rng.integers(len(seq)))
        new = next(a for a in AMINO_ACIDS if a != seq[pos])
        out[rid] = seq[:pos] + new + seq[pos + 1 :]
    for i in picks[changed:]:
        del out[ids[int(i)]]
    out.update(random_records(added, seed + 1000, prefix=f"new{seed}_"))
    return out


@pytest.fixture()
def root_v1(tmp_path: Path, tiny_checkpoint: Path, tiny_embedder) -> tuple[Path, dict[str, str], str]:  # type: ignore[no-untyped-def]
    """A root with one published version of 100 synthetic sequences."""
    records = random_records(100, seed=7)
    fasta = write_fasta(tmp_path / "db_v1.fasta", records)
    root = tmp_path / "root"
    result = build_version(fasta, root, model=str(tiny_checkpoint), embedder=tiny_embedder)
    return root, records, result.manifest.version


def test_incremental_rebuild_reuses_unchanged_vectors_and_equals_a_scratch_build(
    tmp_path: Path,
    tiny_checkpoint: Path,
    tiny_embedder,
    root_v1,  # type: ignore[no-untyped-def]
) -> None:
    root, records, v1 = root_v1
    # 10% changed, 5% removed, 5% added.
    new_records = mutate(records, changed=10, removed=5, added=5, seed=11)
    assert len(new_records) == 100
    fasta2 = write_fasta(tmp_path / "db_v2.fasta", new_records)

    result = build_version(fasta2, root, model=str(tiny_checkpoint), embedder=tiny_embedder)
    r = result.reuse
    assert (r.reused, r.embedded, r.added, r.changed, r.removed) == (85, 15, 5, 10, 5)
    assert result.previous_version == v1
    assert IndexRoot(root).current_version() == result.manifest.version != v1

    scratch_dir = tmp_path / "scratch"
    build_index(fasta2, scratch_dir, model=str(tiny_checkpoint), embedder=tiny_embedder)
    with (
        Index.open(IndexRoot(root).current_path(), verify=True) as inc,
        Index.open(scratch_dir) as full,
    ):
        inc_meta = list(inc.iter_metadata())
        full_meta = list(full.iter_metadata())
        assert [m[1] for m in inc_meta] == [m[1] for m in full_meta] == list(new_records)
        assert inc_meta == full_meta  # ids, descriptions, lengths, sha256 row by row
        inc_vec = np.asarray(inc.embeddings())
        full_vec = np.asarray(full.embeddings())
        assert inc_vec.shape == full_vec.shape == (100, 32)
        np.testing.assert_allclose(inc_vec, full_vec, rtol=0, atol=1e-6)
        queries = full_vec[::7]
        s_inc, rows_inc = inc.search(queries, 5)
        s_full, rows_full = full.search(queries, 5)
        np.testing.assert_array_equal(rows_inc, rows_full)
        np.testing.assert_allclose(s_inc, s_full, rtol=0, atol=1e-5)
        # A changed record's vector really is new (not the stale one from v1).
    with Index.open(IndexRoot(root).version_path(v1)) as old:
        old_ids = [m[1] for m in old.iter_metadata()]
        old_vec = np.asarray(old.embeddings())
    changed_ids = [rid for rid in new_records if rid in records and records[rid] != new_records[rid]]
    assert len(changed_ids) == 10
    for rid in changed_ids:
        assert not np.allclose(old_vec[old_ids.index(rid)], inc_vec[list(new_records).index(rid)], atol=1e-6)


def test_second_concurrent_build_fails_with_build_locked_error(
    tmp_path: Path,
    tiny_checkpoint: Path,
    tiny_embedder,
    root_v1,  # type: ignore[no-untyped-def]
) -> None:
    root, records, v1 = root_v1
    fasta2 = write_fasta(tmp_path / "db_v2.fasta", mutate(records, changed=3, removed=0, added=0, seed=3))
    index_root = IndexRoot(root)
    with index_root.lock():  # another build holds the lock
        with pytest.raises(BuildLockedError, match=f"pid {os.getpid()}"):
            build_version(fasta2, root, model=str(tiny_checkpoint), embedder=tiny_embedder)
    assert index_root.current_version() == v1
    assert [v.version for v in index_root.list_versions()] == [v1]
    # Once the lock is released the build goes through.
    result = build_version(fasta2, root, model=str(tiny_checkpoint), embedder=tiny_embedder)
    assert index_root.current_version() == result.manifest.version


def test_failed_verification_leaves_current_untouched_and_no_new_version(
    tmp_path: Path,
    tiny_checkpoint: Path,
    tiny_embedder,
    root_v1,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from esmsearch import vector_index
    from esmsearch.indexer import build as build_module

    root, records, v1 = root_v1
    real_add = build_module.add_faiss

    def add_over_shuffled_rows(embeddings, spec, trained, out, **kwargs):  # type: ignore[no-untyped-def]
        built = real_add(embeddings, spec, trained, out, **kwargs)
        vectors = np.load(embeddings)
        perm = np.random.default_rng(0).permutation(len(vectors))
        vector_index.write(vector_index.build(np.ascontiguousarray(vectors[perm]), spec), out)
        return built

    monkeypatch.setattr(build_module, "add_faiss", add_over_shuffled_rows)
    fasta2 = write_fasta(tmp_path / "db_v2.fasta", mutate(records, changed=2, removed=1, added=1, seed=5))
    index_root = IndexRoot(root)
    versions_before = sorted(p.name for p in index_root.versions_dir.iterdir())
    with pytest.raises(IndexFormatError, match="self-search check") as failure:
        build_version(fasta2, root, model=str(tiny_checkpoint), embedder=tiny_embedder)
    assert any("--resume" in note for note in failure.value.__notes__)
    assert index_root.current_version() == v1
    assert sorted(p.name for p in index_root.versions_dir.iterdir()) == versions_before == [v1]
    # the vectors are kept; the FAISS stages built from them are to be redone
    state = json.loads((index_root.partial_dir / "build-state.json").read_text())
    assert {"embed", "decoys", "assemble"} <= set(state["stages"]) and "train" not in state["stages"]
    with Index.open(index_root.current_path(), verify=True) as live:
        assert live.version == v1 and live.count == 100
    monkeypatch.undo()
    resumed = build_version(fasta2, root, model=str(tiny_checkpoint), embedder=tiny_embedder, resume=True)
    assert resumed.embedded_residues == 0 and resumed.manifest.build["decoy_embedded_residues"] == 0
    assert index_root.current_version() == resumed.manifest.version != v1
    assert not index_root.partial_dir.exists()


def test_crash_while_embedding_keeps_current_and_resume_completes(
    tmp_path: Path,
    tiny_checkpoint: Path,
    tiny_embedder,
    root_v1,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """In-process crash (an exception from the model on the 3rd chunk)."""
    root, records, v1 = root_v1
    new_records = mutate(records, changed=10, removed=5, added=5, seed=11)
    fasta2 = write_fasta(tmp_path / "db_v2.fasta", new_records)
    calls = {"n": 0}
    real_embed = tiny_embedder.embed

    def failing_embed(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash while embedding")
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(tiny_embedder, "embed", failing_embed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_version(fasta2, root, model=str(tiny_checkpoint), embedder=tiny_embedder, chunk_residues=300)
    index_root = IndexRoot(root)
    assert index_root.current_version() == v1
    assert [v.version for v in index_root.list_versions()] == [v1]
    state = json.loads((index_root.partial_dir / "build-state.json").read_text())
    assert state["shards"] >= 1
    embedded_on_resume: list[int] = []

    def counting_embed(sequences, *args, **kwargs):  # type: ignore[no-untyped-def]
        embedded_on_resume.append(len(sequences))
        return real_embed(sequences, *args, **kwargs)

    monkeypatch.setattr(tiny_embedder, "embed", counting_embed)
    result = build_version(
        fasta2,
        root,
        model=str(tiny_checkpoint),
        embedder=tiny_embedder,
        chunk_residues=300,
        resume=True,
    )
    r = result.reuse
    assert (r.reused, r.embedded, r.added, r.changed, r.removed) == (85, 15, 5, 10, 5)
    assert 0 < sum(embedded_on_resume) < 15  # resumed: the journaled chunks were not redone
    assert index_root.current_version() == result.manifest.version
    assert not index_root.partial_dir.exists()


# The subprocess builds with small chunks and, after its first journaled chunk, blocks
# inside the model call forever: the parent then SIGKILLs it at a known point.
_KILLED_BUILD = textwrap.dedent(
    """
    import sys, threading
    from esmsearch.embedding import Embedder
    from esmsearch.indexer import build_version

    fasta, root, ckpt = sys.argv[1:4]
    emb = Embedder(ckpt, device="cpu")
    real = emb.embed
    calls = [0]
    def embed(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            print("BLOCKED", flush=True)
            threading.Event().wait()  # until SIGKILL
        return real(*args, **kwargs)
    emb.embed = embed
    build_version(fasta, root, model=ckpt, embedder=emb, chunk_residues=300)
    print("FINISHED", flush=True)
    """
)


def test_killed_rebuild_leaves_current_and_live_server_unaffected_then_resume_completes(
    tmp_path: Path,
    tiny_checkpoint: Path,
    tiny_embedder,
    root_v1,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from esmsearch.client import SearchClient
    from esmsearch.server import ServerConfig, create_server

    root, records, v1 = root_v1
    index_root = IndexRoot(root)
    new_records = mutate(records, changed=10, removed=5, added=5, seed=11)
    fasta2 = write_fasta(tmp_path / "db_v2.fasta", new_records)
    query = {"q1": next(iter(records.values()))}

    server, port = create_server(ServerConfig(index=root, port=0, device="cpu", max_workers=4, reload_poll_s=None))
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout_s=60.0) as client:
            assert client.search(query, k=3)[0].index_version == v1
            script = tmp_path / "killed_build.py"
            script.write_text(_KILLED_BUILD)
            proc = subprocess.Popen(
                [sys.executable, str(script), str(fasta2), str(root), str(tiny_checkpoint)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()  # blocks until the build is stuck in chunk 2
                assert line.strip() == "BLOCKED", proc.stderr.read() if proc.stderr else ""
                state = json.loads((index_root.partial_dir / "build-state.json").read_text())
                assert state["shards"] >= 1
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
                for pipe in (proc.stdout, proc.stderr):  # no unclosed-file ResourceWarning
                    if pipe is not None:
                        pipe.close()

            # current and the live server are unaffected.
            assert index_root.current_version() == v1
            assert [v.version for v in index_root.list_versions()] == [v1]
            reload = client.reload_index()
            assert (reload.reloaded, reload.index_version) == (False, v1)
            result = client.search(query, k=3)[0]
            assert result.index_version == v1
            assert result.hits[0].target_id == "seq0000"
            assert client.index_info().reload_error == ""

            # Resume (same settings, same chunking) completes from the journal.
            embedded_on_resume: list[int] = []
            real_embed = tiny_embedder.embed

            def counting_embed(sequences, *args, **kwargs):  # type: ignore[no-untyped-def]
                embedded_on_resume.append(len(sequences))
                return real_embed(sequences, *args, **kwargs)

            monkeypatch.setattr(tiny_embedder, "embed", counting_embed)
            resumed = build_version(
                fasta2,
                root,
                model=str(tiny_checkpoint),
                embedder=tiny_embedder,
                chunk_residues=300,
                resume=True,
            )
            r = resumed.reuse
            assert (r.reused, r.embedded, r.added, r.changed, r.removed) == (85, 15, 5, 10, 5)
            assert 0 < sum(embedded_on_resume) < 15  # the journaled chunk was not redone
            v2 = resumed.manifest.version
            assert index_root.current_version() == v2
            assert client.reload_index().index_version == v2
            assert client.search(query, k=3)[0].index_version == v2
    finally:
        server.stop(1.0)
