"""Distributed embedding on Ray Data (esmsearch.indexer.distributed), on a local Ray
instance of 2 CPUs with the tiny test model: equal to a single-process build, rebuild
reuse before distribution, a killed worker, a killed driver resumed, bounded retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is part of dev")

from esmsearch.embedding import Embedder  # noqa: E402
from esmsearch.errors import ConfigError, DistributedError  # noqa: E402
from esmsearch.indexer import build_index, build_version, partial_build_dir  # noqa: E402
from esmsearch.indexer.distributed import DistributedConfig, EmbedActor  # noqa: E402
from esmsearch.sequences import read_fasta  # noqa: E402
from esmsearch.store import Index  # noqa: E402

# Actor subclasses below travel to the workers by value (this module is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHUNK = 500  # residues per chunk: the 40 test proteins (2,346 residues) make 5 blocks


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, ecoli_fasta: Path, tiny_embedder: Embedder) -> Path:
    out = tmp_path_factory.mktemp("single") / "index"
    build_index(ecoli_fasta, out, model="unused", embedder=tiny_embedder, chunk_residues=CHUNK)
    return out


def assert_same_index(got: Path, want: Path) -> None:
    """Same rows and vectors (within 1e-6); and, when ``got`` has decoys, the same decoys."""
    with Index.open(got, verify=True) as a, Index.open(want) as b:
        assert [r[1:] for r in a.iter_metadata()] == [r[1:] for r in b.iter_metadata()]
        np.testing.assert_allclose(np.asarray(a.embeddings()), np.asarray(b.embeddings()), rtol=0, atol=1e-6)
        if a.manifest.decoys is not None:
            assert b.manifest.decoys is not None
            da, db = a.manifest.decoys, b.manifest.decoys
            assert (da.count, da.seed, da.method, da.block_size) == (db.count, db.seed, db.method, db.block_size)
            assert da.shape == pytest.approx(db.shape, abs=1e-4)
            np.testing.assert_allclose(np.load(got / "decoys.npy"), np.load(want / "decoys.npy"), rtol=0, atol=1e-6)


def recording_actor(log_file: Path) -> type[EmbedActor]:
    """An actor appending ``<block> <sequences>`` to ``log_file`` for each block it embeds.

    (Paths travel as class attributes: the workers were started before a test could
    set environment variables for them.)"""

    class RecordingActor(EmbedActor):
        def embed_block(self, number: int, sequences: list[str]) -> np.ndarray:
            vectors = super().embed_block(number, sequences)
            with open(log_file, "a", encoding="utf-8") as fh:
                fh.write(f"{number} {len(sequences)}\n")
            return vectors

    return RecordingActor


def kill_once_actor(marker: Path) -> type[EmbedActor]:
    """An actor that kills its own worker process on block 1, the first time any worker reaches it."""

    class KillOnceActor(EmbedActor):
        def embed_block(self, number: int, sequences: list[str]) -> np.ndarray:
            if number == 1:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass  # the retry, on a restarted worker
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os._exit(1)  # the worker process dies mid-task
            return super().embed_block(number, sequences)

    return KillOnceActor


class AlwaysKillActor(EmbedActor):
    def embed_block(self, number: int, sequences: list[str]) -> np.ndarray:
        if number == 2:
            os._exit(1)
        return super().embed_block(number, sequences)


def test_distributed_build_equals_the_single_process_build(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, single_process: Path
) -> None:
    out = tmp_path / "dist"
    # Small waves: three Ray datasets in a row, each with its own actor pool.
    config = DistributedConfig(workers=2, wave_residues=1_200)
    result = build_index(ecoli_fasta, out, model=str(tiny_checkpoint), chunk_residues=CHUNK, distributed=config)
    assert result.manifest.decoys is not None  # the decoys went through Ray too, and equal the local ones
    assert_same_index(out, single_process)
    dist = result.manifest.build["distributed"]
    assert (dist["backend"], dist["workers"], dist["cpus_per_worker"], dist["device"]) == ("ray", 2, 1, "cpu")
    # 2 waves of database blocks and 2 of decoy blocks (40 decoys = shuffles of the 40 sequences)
    assert dist["waves"] == 4 and dist["worker_embed_seconds"] > 0
    assert result.manifest.precision == "fp32" and result.embedded_residues == 2346
    assert result.residues_per_s > 0


def test_rebuild_reuse_runs_before_distribution(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_checkpoint: Path,
    tiny_embedder: Embedder,
    single_process: Path,
) -> None:
    records = list(read_fasta(ecoli_fasta))
    changed = tmp_path / "v2.fasta"
    with open(changed, "w", encoding="ascii") as fh:
        for i, rec in enumerate(records):
            seq = rec.sequence[:-1] + ("A" if rec.sequence[-1] != "A" else "G") if i in (3, 17, 30) else rec.sequence
            fh.write(f">{rec.record_id} {rec.description}\n{seq}\n")
        fh.write(">brand_new\nMKTAYIAKQRQISFVKSHFSRQ\n")
    root = tmp_path / "root"
    build_version(ecoli_fasta, root, model="unused", embedder=tiny_embedder, chunk_residues=CHUNK, decoys=0)
    log_file = tmp_path / "blocks.log"
    config = DistributedConfig(workers=2, actor_cls=recording_actor(log_file))
    result = build_version(
        changed, root, model=str(tiny_checkpoint), chunk_residues=CHUNK, distributed=config, decoys=0
    )
    r = result.reuse
    assert (r.reused, r.embedded, r.changed, r.added) == (37, 4, 3, 1)
    sent = [tuple(map(int, line.split())) for line in log_file.read_text().splitlines()]
    assert sum(n for _block, n in sent) == 4  # only new or changed sequences travelled
    assert all(n > 0 for _block, n in sent)  # blocks whose vectors were all reused were not sent
    scratch = tmp_path / "scratch"
    build_index(changed, scratch, model="unused", embedder=tiny_embedder, chunk_residues=CHUNK, decoys=0)
    assert_same_index(result.path, scratch)


def test_a_killed_worker_is_restarted_and_its_block_retried(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, single_process: Path
) -> None:
    marker = tmp_path / "killed.pid"
    out = tmp_path / "dist"
    config = DistributedConfig(workers=2, actor_cls=kill_once_actor(marker))
    build_index(ecoli_fasta, out, model=str(tiny_checkpoint), chunk_residues=CHUNK, distributed=config)
    assert int(marker.read_text()) > 0  # a worker really died mid-task
    assert_same_index(out, single_process)


def test_a_block_that_keeps_killing_its_worker_fails_after_the_retries_and_resumes(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, single_process: Path
) -> None:
    out = tmp_path / "dist"
    config = DistributedConfig(workers=1, actor_cls=AlwaysKillActor, max_retries=1)
    with pytest.raises(DistributedError, match=r"after up to 1 retries\); blocks [0-2]\.\.4 of this wave"):
        build_index(ecoli_fasta, out, model=str(tiny_checkpoint), chunk_residues=CHUNK, distributed=config)
    assert not out.exists()
    state = json.loads((partial_build_dir(out) / "build-state.json").read_text())
    assert state["shards"] <= 2  # block 2 never completed; 0 and 1 may have been journaled
    build_index(
        ecoli_fasta,
        out,
        model=str(tiny_checkpoint),
        chunk_residues=CHUNK,
        distributed=DistributedConfig(workers=2),
        resume=True,
    )
    assert_same_index(out, single_process)


# The subprocess driver joins this module's Ray cluster, builds, and after its first
# journaled chunk blocks forever: the test SIGKILLs it at that known point.
_KILLED_DRIVER = textwrap.dedent(
    """
    import sys, threading
    import ray
    from esmsearch.indexer import build, build_index
    from esmsearch.indexer.distributed import DistributedConfig

    fasta, out, ckpt, address = sys.argv[1:5]
    real_save = build.BuildJournal.save
    def save(self):
        real_save(self)
        if self.state is not None and self.state.shards >= 1:
            print("JOURNALED", flush=True)
            threading.Event().wait()  # until SIGKILL
    build.BuildJournal.save = save
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    config = DistributedConfig(workers=2)
    build_index(fasta, out, model=ckpt, chunk_residues=int(sys.argv[5]), distributed=config, decoys=0)
    print("FINISHED", flush=True)
    """
)


def test_a_killed_driver_resumes_from_its_journaled_shards(
    tmp_path: Path,
    ecoli_fasta: Path,
    tiny_checkpoint: Path,
    single_process: Path,
    local_ray: str,
) -> None:
    out = tmp_path / "dist"
    script = tmp_path / "driver.py"
    script.write_text(_KILLED_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ecoli_fasta), str(out), str(tiny_checkpoint), local_ray, str(CHUNK)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the driver has journaled a chunk
        assert line.strip() == "JOURNALED", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    state = json.loads((partial_build_dir(out) / "build-state.json").read_text())
    assert state["shards"] == 1 and not out.exists()
    log_file = tmp_path / "blocks.log"
    config = DistributedConfig(workers=2, actor_cls=recording_actor(log_file))
    with pytest.raises(ConfigError, match="cannot resume"):  # other settings than the killed build
        build_index(
            ecoli_fasta,
            out,
            model=str(tiny_checkpoint),
            chunk_residues=CHUNK + 1,
            distributed=config,
            resume=True,
            decoys=0,
        )
    build_index(
        ecoli_fasta, out, model=str(tiny_checkpoint), chunk_residues=CHUNK, distributed=config, resume=True, decoys=0
    )
    sent = sorted(int(line.split()[0]) for line in log_file.read_text().splitlines())
    assert sent == [1, 2, 3, 4]  # block 0 was journaled before the kill: not embedded again
    assert_same_index(out, single_process)


def test_distributed_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="explicit precision"):
        DistributedConfig(precision="auto")
    with pytest.raises(ConfigError, match="CUDA only"):
        DistributedConfig(precision="fp16")
    with pytest.raises(ConfigError, match="workers"):
        DistributedConfig(workers=0)
    assert DistributedConfig(gpus_per_worker=1).device == "cuda"
    with pytest.raises(ConfigError, match="differs from the distributed workers' precision 'fp32'"):
        build_index("unused.fasta", "unused", model="unused", precision="bf16", distributed=DistributedConfig())


def test_more_workers_than_the_cluster_fits_is_refused(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path
) -> None:
    out = tmp_path / "dist"
    with pytest.raises(DistributedError, match="fits 2 workers of 1 CPUs"):
        build_index(ecoli_fasta, out, model=str(tiny_checkpoint), distributed=DistributedConfig(workers=3))
    with pytest.raises(DistributedError, match="fits 0 workers"):
        build_index(ecoli_fasta, out, model=str(tiny_checkpoint), distributed=DistributedConfig(gpus_per_worker=1))


def test_cli_distributed_build(
    tmp_path: Path, ecoli_fasta: Path, tiny_checkpoint: Path, single_process: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esmsearch.cli import main

    out = tmp_path / "cli"
    args = ["index", "build", str(ecoli_fasta), "-o", str(out), "--model", str(tiny_checkpoint), "--no-progress"]
    assert main([*args, "--distributed", "ray", "--precision", "auto"]) == 1
    assert "needs an explicit precision" in capsys.readouterr().err
    assert main([*args, "--distributed", "ray", "--workers", "2", "--cpus-per-worker", "1"]) == 0
    printed = capsys.readouterr().out
    # one wave of database blocks, one of decoy blocks
    assert "distributed on Ray" in printed and "2 workers x 1 CPUs x 0 GPUs on 1 host(s), 2 wave(s)" in printed
    with Index.open(out) as index:
        assert index.manifest.build["distributed"]["workers"] == 2
    assert_same_index(out, single_process)  # one 200,000-residue block here, five there: same vectors


def test_waves_are_bounded_in_sequences_when_nothing_needs_embedding(tiny_embedder: Embedder) -> None:
    """A rebuild reusing every vector sends empty blocks: a wave must still end every
    ``wave_sequences`` database rows, or the driver holds the whole FASTA's records."""
    from esmsearch.indexer.blocks import EmbedBlock
    from esmsearch.indexer.distributed import RayBlockEmbedder

    embedder = RayBlockEmbedder(DistributedConfig(wave_sequences=5), tiny_embedder)
    embedder.workers = 1  # as if entered; no wave needs the cluster
    waves: list[list[int]] = []

    def run_wave(wave: list[EmbedBlock], on_residues: object) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        waves.append([b.number for b in wave])
        for block in wave:
            yield block, np.empty((0, tiny_embedder.dim), dtype=np.float32)

    embedder._run_wave = run_wave  # type: ignore[method-assign]
    blocks = [EmbedBlock(n, (), rows=2) for n in range(7)]
    assert [b.number for b, _ in embedder.embed_blocks(blocks, None)] == list(range(7))
    assert waves == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ConfigError, match="wave_sequences"):
        DistributedConfig(wave_sequences=0)
