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

import logging
import os
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

__all__ = ["BuildConfig", "BuildResult", "build_index", "scan_fasta"]

log = logging.getLogger(__name__)


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
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=summary.residues, unit="res", unit_scale=True, desc=f"embedding {summary.sequences} seqs", file=sys.stderr)
    windowed_before = emb.stats.windowed_sequences
    embed_seconds = 0.0
    with IndexWriter(out.parent if str(out.parent) else Path(".")) as writer:
        shard_dir = writer.directory / "shards"
        shard_dir.mkdir()
        shards: list[Path] = []
        try:
            for chunk in _chunks(read_fasta(cfg.fasta), cfg.chunk_residues):
                t0 = time.perf_counter()
                vectors = emb.embed([r.sequence for r in chunk], on_batch=bar.update if bar else None)
                embed_seconds += time.perf_counter() - t0
                shard = shard_dir / f"shard-{len(shards):06d}.npy"
                np.save(shard, vectors)
                shards.append(shard)
                writer.add_metadata(
                    (r.record_id, r.description, len(r.sequence), sequence_sha256(r.sequence)) for r in chunk
                )
        finally:
            if bar is not None:
                bar.close()
        vectors_all = np.lib.format.open_memmap(
            writer.embeddings_path(), mode="w+", dtype=np.float32, shape=(writer.rows, emb.dim)
        )
        row = 0
        for shard in shards:
            part = np.load(shard)
            vectors_all[row : row + len(part)] = part
            row += len(part)
            shard.unlink()
        vectors_all.flush()
        shard_dir.rmdir()
        index = vector_index.build(np.asarray(vectors_all), spec)
        del vectors_all
        writer.write_faiss(index)
        windowed = emb.stats.windowed_sequences - windowed_before
        seconds = time.perf_counter() - t_start
        build_info: dict[str, Any] = {
            "sequences": summary.sequences,
            "residues": summary.residues,
            "longest_sequence": summary.longest,
            "windowed_sequences": windowed,
            "window_residues": WINDOW_RESIDUES,
            "window_overlap": WINDOW_OVERLAP,
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
