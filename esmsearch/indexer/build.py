"""Build an index directory from a protein FASTA file.

Pipeline (each stage a plain function so tests can swap one):

1. validate the whole FASTA first (ids, residues, duplicates): a bad record at the
   end of a large database fails in seconds, before any embedding work;
2. load the model and check the FAISS factory string against its dimension;
3. stream records in chunks of about ``chunk_residues`` residues, embed each chunk
   (length-sorted token-budget batches inside it), append its vectors to a shard
   file and its metadata to SQLite -- memory is bounded by one chunk, not the database;
4. concatenate shards into ``embeddings.npy``, build the FAISS index, write the
   manifest, verify, and rename the directory into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esmsearch import __version__
from esmsearch.embedding import NORMALISATION, POOLING, WINDOW_OVERLAP, WINDOW_RESIDUES, Embedder
from esmsearch.errors import ConfigError
from esmsearch.sequences import SequenceRecord, file_sha256, read_fasta, sequence_sha256
from esmsearch.store import IndexWriter, Manifest, publish_directory

__all__ = ["BuildConfig", "BuildResult", "build_index", "partial_build_dir", "scan_fasta"]

log = logging.getLogger(__name__)

#: Journal of a build in progress, inside the partial build directory.
STATE_FILE = "build-state.json"


def partial_build_dir(out_dir: Path) -> Path:
    """Work directory of a build of ``out_dir``: ``<parent>/.<name>.partial``.

    A build writes here and renames it to ``out_dir`` when complete; an interrupted
    build leaves it for ``--resume``.
    """
    return out_dir.parent / f".{out_dir.name}.partial"


class _BuildState:
    """Atomically rewritten JSON journal: input/model settings and chunks completed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def load(self) -> None:
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {self.path} is missing or unreadable ({exc}); remove its directory") from exc

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, sort_keys=True), encoding="utf-8")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one index build; validates itself.

    Attributes:
        fasta: database FASTA (plain or gzip).
        out_dir: destination index directory.
        model: ESM-2 pretrained name or local ``.pt`` path.
        layer: representation layer (None = last).
        toks_per_batch: token budget per forward pass.
        device: ``auto|cpu|cuda|cuda:N``.
        precision: ``fp32|bf16|fp16``.
        index_factory: FAISS factory string or ``auto``.
        chunk_residues: residues embedded per chunk (bounds memory; one shard each).
        overwrite: replace an existing index at ``out_dir``.
        resume: continue an interrupted build from its last completed chunk.
        progress: show a progress bar on stderr.
    """

    fasta: Path
    out_dir: Path
    model: str
    layer: int | None = None
    toks_per_batch: int = 4096
    device: str = "auto"
    precision: str = "fp32"
    index_factory: str = "Flat"
    chunk_residues: int = 200_000
    overwrite: bool = False
    resume: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.chunk_residues < 1:
            raise ConfigError(f"chunk_residues must be >= 1, got {self.chunk_residues}")
        if not self.index_factory.strip():
            raise ConfigError("index factory must not be empty")
        out = Path(self.out_dir)
        if (out.exists() or out.is_symlink()) and not self.overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


@dataclass(frozen=True)
class BuildResult:
    """What a build produced and how fast."""

    manifest: Manifest
    path: Path
    sequences: int
    residues: int
    windowed_sequences: int
    seconds: float
    embed_seconds: float

    @property
    def residues_per_s(self) -> float:
        return self.residues / self.embed_seconds if self.embed_seconds > 0 else 0.0


@dataclass(frozen=True)
class FastaSummary:
    sequences: int
    residues: int
    longest: int
    sha256: str


def scan_fasta(path: Path) -> FastaSummary:
    """Validate every record of ``path`` and count sequences and residues.

    Raises:
        FileNotFoundError, FastaFormatError, InvalidSequenceError, DuplicateRecordError.
    """
    n = residues = longest = 0
    for rec in read_fasta(path):
        n += 1
        residues += len(rec.sequence)
        longest = max(longest, len(rec.sequence))
    if n == 0:
        from esmsearch.errors import FastaFormatError

        raise FastaFormatError(f"{path}: no FASTA records")
    return FastaSummary(n, residues, longest, file_sha256(path))


def _chunks(records: Iterator[SequenceRecord], chunk_residues: int) -> Iterator[list[SequenceRecord]]:
    chunk: list[SequenceRecord] = []
    size = 0
    for rec in records:
        chunk.append(rec)
        size += len(rec.sequence)
        if size >= chunk_residues:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def build_index(
    fasta_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str,
    layer: int | None = None,
    toks_per_batch: int = 4096,
    device: str = "auto",
    precision: str = "fp32",
    index_factory: str = "Flat",
    chunk_residues: int = 200_000,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    embedder: Embedder | None = None,
) -> BuildResult:
    """Embed a FASTA database and write an index directory at ``out_dir``.

    Args:
        fasta_path: database FASTA, plain or gzip.
        out_dir: destination; must not exist unless ``overwrite``.
        model: ESM-2 pretrained name or local fair-esm ``.pt`` path.
        layer: representation layer (None = last).
        toks_per_batch: token budget per forward pass.
        device: ``auto|cpu|cuda|cuda:N``.
        precision: ``fp32|bf16|fp16``.
        index_factory: FAISS factory string (``Flat``, ``IVF1024,Flat``, ``HNSW32``, ...)
            or ``auto`` (chosen from database size; see :func:`esmsearch.vector_index.auto_spec`).
        chunk_residues: residues per streamed chunk (memory bound).
        overwrite: replace an existing index at ``out_dir``.
        resume: continue an interrupted build of the same FASTA with the same model
            settings from its last completed chunk (kept in
            :func:`partial_build_dir`); the result equals an uninterrupted build.
        progress: show a progress bar in residues/s on stderr.
        embedder: reuse an already loaded :class:`Embedder` (its settings win over
            ``model``/``layer``/``device``/``precision``/``toks_per_batch``).

    Returns:
        :class:`BuildResult` with the manifest and timings.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        FileNotFoundError, FastaFormatError, InvalidSequenceError, DuplicateRecordError:
            bad database FASTA (found before any embedding).
        ModelLoadError: the model cannot be loaded.
        InvalidIndexFactoryError: bad factory string (found before any embedding).
        ConfigError: a setting out of range.

    On any error nothing is left at ``out_dir`` and an existing index there is untouched.
    A failure after embedding started keeps the work done in :func:`partial_build_dir`
    for ``resume``; a failure before it (bad input, model, factory) leaves nothing.
    """
    from esmsearch import vector_index

    cfg = BuildConfig(
        fasta=Path(fasta_path),
        out_dir=Path(out_dir),
        model=model,
        layer=layer,
        toks_per_batch=toks_per_batch,
        device=device,
        precision=precision,
        index_factory=index_factory,
        chunk_residues=chunk_residues,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
    )
    t_start = time.perf_counter()
    summary = scan_fasta(cfg.fasta)
    log.info("validated %s: %d sequences, %d residues", cfg.fasta, summary.sequences, summary.residues)
    emb = embedder or Embedder(
        cfg.model, layer=cfg.layer, toks_per_batch=cfg.toks_per_batch, device=cfg.device, precision=cfg.precision
    )
    if cfg.index_factory == "auto":
        spec = vector_index.auto_spec(summary.sequences, emb.dim)
    else:
        spec = vector_index.validate_factory(cfg.index_factory, emb.dim)
    need = vector_index.min_training_vectors(spec, emb.dim)
    if need > summary.sequences:
        from esmsearch.errors import InvalidIndexFactoryError

        raise InvalidIndexFactoryError(
            f"index factory {spec.factory!r} needs at least {need} training vectors, "
            f"but {cfg.fasta} has {summary.sequences} sequences; use a smaller nlist or 'Flat'"
        )

    out = cfg.out_dir
    work = partial_build_dir(out)
    state_expected = {
        "fasta_sha256": summary.sha256,
        "chunk_residues": cfg.chunk_residues,
        "precision": emb.precision,
        **emb.settings,
    }
    state = _BuildState(work / STATE_FILE)
    resuming = False
    if work.exists():
        if cfg.resume:
            state.load()
            mismatch = {k: (state.data.get(k), v) for k, v in state_expected.items() if state.data.get(k) != v}
            if mismatch:
                details = "; ".join(f"{k}: partial build has {a!r}, this build {b!r}" for k, (a, b) in mismatch.items())
                raise ConfigError(f"cannot resume the partial build at {work}: {details}; remove it or drop --resume")
            resuming = True
        else:
            log.warning("removing the partial build left at %s (pass --resume to continue one)", work)
            shutil.rmtree(work)
    elif cfg.resume:
        log.info("no partial build at %s; starting from the beginning", work)

    bar = None
    windowed_before = emb.stats.windowed_sequences
    embed_seconds = 0.0
    with IndexWriter(work, resume=resuming) as writer:
        shard_dir = writer.directory / "shards"
        shard_dir.mkdir(exist_ok=True)
        done_shards = int(state.data.get("shards", 0)) if resuming else 0
        done_rows = int(state.data.get("rows", 0)) if resuming else 0
        if resuming:
            writer.truncate_rows(done_rows)
            for stale in shard_dir.glob("*"):
                if not (stale.suffix == ".npy" and stale.stem.startswith("shard-") and int(stale.stem[6:]) < done_shards):
                    stale.unlink()
            log.info("resuming %s: %d sequences already embedded", work, done_rows)
        else:
            state.data = dict(state_expected, shards=0, rows=0)
            state.save()
        writer.keep_on_error = True  # from here on a failure leaves a resumable state
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=summary.residues,
                unit="res",
                unit_scale=True,
                desc=f"embedding {summary.sequences} seqs",
                file=sys.stderr,
            )
        shards: list[Path] = []
        try:
            for n_chunk, chunk in enumerate(_chunks(read_fasta(cfg.fasta), cfg.chunk_residues)):
                shard = shard_dir / f"shard-{n_chunk:06d}.npy"
                if n_chunk < done_shards:
                    shards.append(shard)
                    if bar is not None:
                        bar.update(sum(len(r.sequence) for r in chunk))
                    continue
                t0 = time.perf_counter()
                vectors = emb.embed([r.sequence for r in chunk], on_batch=bar.update if bar else None)
                embed_seconds += time.perf_counter() - t0
                tmp = shard.with_suffix(".tmp.npy")
                np.save(tmp, vectors)
                os.replace(tmp, shard)
                shards.append(shard)
                writer.add_metadata(
                    (r.record_id, r.description, len(r.sequence), sequence_sha256(r.sequence)) for r in chunk
                )
                writer.commit()
                state.data.update(shards=n_chunk + 1, rows=writer.rows)
                state.save()
        except BaseException:
            log.error(
                "build interrupted after %d of %d sequences; the embedded part is kept in %s: "
                "rerun the same command with --resume to continue",
                writer.rows,
                summary.sequences,
                work,
            )
            raise
        finally:
            if bar is not None:
                bar.close()
        if writer.rows != summary.sequences:
            raise ConfigError(
                f"partial build at {work} holds {writer.rows} rows but {cfg.fasta} has "
                f"{summary.sequences} sequences; remove it and build again"
            )
        vectors_all = np.lib.format.open_memmap(
            writer.embeddings_path(), mode="w+", dtype=np.float32, shape=(writer.rows, emb.dim)
        )
        row = 0
        for shard in shards:
            part = np.load(shard)
            vectors_all[row : row + len(part)] = part
            row += len(part)
        vectors_all.flush()
        index = vector_index.build(np.asarray(vectors_all), spec)
        del vectors_all
        writer.write_faiss(index)
        del index
        shutil.rmtree(shard_dir)
        state.path.unlink()
        windowed = emb.stats.windowed_sequences - windowed_before
        seconds = time.perf_counter() - t_start
        build_info: dict[str, Any] = {
            "sequences": summary.sequences,
            "residues": summary.residues,
            "longest_sequence": summary.longest,
            "windowed_sequences": windowed,
            "window_residues": WINDOW_RESIDUES,
            "window_overlap": WINDOW_OVERLAP,
            "resumed_from_row": done_rows,
            "embed_seconds": round(embed_seconds, 3),
            "total_seconds": round(seconds, 3),
            "residues_per_s": round(summary.residues / embed_seconds, 1) if embed_seconds else None,
            "device": str(emb.device),
            "precision": emb.precision,
            "toks_per_batch": emb.toks_per_batch,
        }
        manifest = writer.finish(
            model_name=emb.model_name,
            model_source=emb.model_source,
            checkpoint_sha256=emb.checkpoint_sha256,
            layer=emb.layer,
            pooling=POOLING,
            normalisation=NORMALISATION,
            metric="inner_product",
            dim=emb.dim,
            index_factory=spec.factory,
            search_params={k: v for k, v in spec.to_json().items() if k != "factory" and v is not None},
            source_fasta=str(cfg.fasta),
            source_fasta_sha256=summary.sha256,
            tool_version=__version__,
            build=build_info,
        )
        writer.keep_on_error = False  # a failure to publish discards the finished copy
        publish_directory(writer.directory, out, overwrite=cfg.overwrite)
    if windowed:
        log.info("%d sequences longer than %d residues were embedded in overlapping windows", windowed, WINDOW_RESIDUES)
    return BuildResult(
        manifest=manifest,
        path=out,
        sequences=summary.sequences,
        residues=summary.residues,
        windowed_sequences=windowed,
        seconds=time.perf_counter() - t_start,
        embed_seconds=embed_seconds,
    )
