"""Shards: the durable, journaled pieces the embed and decoy stages write, and their assembly.

One writer (:class:`ShardSet`) serves the database (``shards/shard-NNNNNN.npy``)
and the decoys (``decoy-shards/decoy-NNNNNN.npy``): each shard is written to a
temporary name, fsynced, renamed, and its directory fsynced, before the caller
journals it; a running :func:`~esmsearch.indexer.journal.chain_digest` over the
finished shards lets a resume check them. :func:`assemble` concatenates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from esmsearch import fsutil
from esmsearch.errors import ConfigError, IndexFormatError
from esmsearch.fsutil import file_sha256
from esmsearch.indexer.journal import FileDigest, chain_digest
from esmsearch.sequences import SequenceRecord
from esmsearch.store import STORE_DTYPES

__all__ = [
    "DECOY_SHARDS",
    "SHARDS",
    "ShardSet",
    "assemble",
    "chunk_records",
    "gather_rows",
    "residue_ranges",
    "write_shard",
]

#: Work subdirectory holding the database shards of a build in progress.
SHARDS = "shards"
#: Work subdirectory holding the decoy shards of a build in progress.
DECOY_SHARDS = "decoy-shards"


class ShardSet:
    """Numbered ``.npy`` shards in one directory: ``<directory>/<prefix>-NNNNNN.npy``.

    Args:
        directory: created if missing.
        prefix: ``shard`` (database) or ``decoy``.
    """

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        directory.mkdir(exist_ok=True)

    def path(self, number: int) -> Path:
        """The shard file of chunk ``number``."""
        return self.directory / f"{self.prefix}-{number:06d}.npy"

    def paths(self, count: int) -> list[Path]:
        """The first ``count`` shard files, in order."""
        return [self.path(n) for n in range(count)]

    def keep_first(self, count: int) -> None:
        """Delete every file but the finished shards ``0 .. count - 1`` (temporary ones too)."""
        finished = {p.name for p in self.paths(count)}
        for stale in self.directory.glob("*"):
            if stale.name not in finished:
                stale.unlink()

    def matches(self, count: int, chain: str) -> bool:
        """Whether the first ``count`` shards exist and their chained sha256 is ``chain``."""
        return _chain_matches(self.paths(count), chain)

    def write(self, number: int, vectors: np.ndarray, chain: str) -> str:
        """Write chunk ``number`` durably (:func:`write_shard`); returns ``chain`` extended by it."""
        shard = self.path(number)
        write_shard(shard, vectors)
        return chain_digest(chain, file_sha256(shard))


def chunk_records(records: Iterator[SequenceRecord], chunk_residues: int) -> Iterator[list[SequenceRecord]]:
    """Group records, in order, into chunks of at least ``chunk_residues`` residues (the last may hold fewer)."""
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


def _chain_matches(shards: Sequence[Path], chain: str) -> bool:
    """Whether ``shards`` all exist and their chained sha256 is ``chain``."""
    try:
        return FileDigest.of_files(shards).sha256 == chain
    except OSError:
        return False


def write_shard(shard: Path, vectors: np.ndarray) -> None:
    """Write one chunk's vectors durably: temp file, fsync, rename, fsync the shard dir."""
    tmp = shard.with_name(shard.stem + ".tmp.npy")
    np.save(tmp, vectors)
    fsutil.fsync_file(tmp)
    os.replace(tmp, shard)
    fsutil.fsync_dir(shard.parent)


def residue_ranges(sequences: Sequence[str], chunk_residues: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of ``sequences`` of about ``chunk_residues`` residues each."""
    ranges: list[tuple[int, int]] = []
    start = size = 0
    for i, seq in enumerate(sequences):
        size += len(seq)
        if size >= chunk_residues:
            ranges.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(sequences):
        ranges.append((start, len(sequences)))
    return ranges


def gather_rows(shards: Sequence[Path], rows: np.ndarray) -> np.ndarray:
    """float32 ``[len(rows), dim]`` vectors of database ``rows`` (sorted) from chunk shards."""
    parts = []
    start = 0
    for shard in shards:
        part: np.ndarray = np.load(shard, mmap_mode="r")
        stop = start + part.shape[0]
        inside = rows[(rows >= start) & (rows < stop)]
        if inside.size:
            parts.append(np.asarray(part[inside - start], dtype=np.float32))
        start = stop
    return np.concatenate(parts)


def assemble(shards: Sequence[Path], out: Path, dim: int, *, store_dtype: str = "float32") -> int:
    """Stage ``assemble``: concatenate chunk shards, in order, into one ``.npy`` file.

    Streams shard by shard into a memory-mapped ``out`` (memory bounded by one shard).

    Args:
        shards: ``.npy`` files, each float32 ``[n_i, dim]``, in row order.
        out: the ``embeddings.npy`` to write: ``[sum(n_i), dim]`` in ``store_dtype``.
        dim: embedding dimension.
        store_dtype: ``float32`` (a plain copy) or ``float16`` (rounded to nearest: half
            the size; see :data:`esmsearch.store.STORE_DTYPES`).

    Returns:
        The number of rows written.

    Raises:
        IndexFormatError: a shard is not a float32 ``[n, dim]`` array.
        ConfigError: ``store_dtype`` is not one of :data:`esmsearch.store.STORE_DTYPES`.
        OSError: a shard cannot be read or ``out`` written.
    """
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
    sizes: list[int] = []
    for shard in shards:
        part: np.ndarray = np.load(shard, mmap_mode="r")
        if part.ndim != 2 or part.shape[1] != dim or part.dtype != np.float32:
            raise IndexFormatError(f"shard {shard} is {part.dtype} {list(part.shape)}, expected float32 [n, {dim}]")
        sizes.append(int(part.shape[0]))
    rows = sum(sizes)
    vectors = np.lib.format.open_memmap(out, mode="w+", dtype=np.dtype(store_dtype), shape=(rows, dim))
    start = 0
    for shard, size in zip(shards, sizes, strict=True):
        vectors[start : start + size] = np.load(shard)
        start += size
    vectors.flush()
    del vectors
    return rows
