"""The FAISS stages of a build: train, then add, each out of core and journaled apart.

:func:`train_faiss` trains an empty index of the build's factory on a seeded
sample of ``embeddings.npy`` and writes it to ``trained.faiss``;
:func:`add_faiss` reads it back, streams every stored vector into it and writes
``index.faiss`` (with the inverted lists in ``index.ivfdata`` when they exceed the
memory budget). Splitting the two lets a build killed while adding resume without
training again. Together they do what
:func:`esmsearch.vector_index.build_out_of_core` does, through the same steps of
:mod:`esmsearch.vector_index` (``builds_on_disk``, ``train_on_sample`` with the same
sample and seed, ``add_in_ram`` or the on-disk merge), so the index is the same
(:func:`build_faiss` runs both; ``tests/test_build_stages.py`` compares them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esmsearch.errors import IndexFormatError
from esmsearch.store import unit_float32

if TYPE_CHECKING:
    from esmsearch.vector_index import IndexSpec, OutOfCoreBuild

__all__ = [
    "FAISS_BLOCK_ROWS",
    "TRAINED_FILE",
    "Trained",
    "add_faiss",
    "build_faiss",
    "iter_stored_vectors",
    "npy_layout",
    "train_faiss",
]

log = logging.getLogger(__name__)

#: Rows per block read from ``embeddings.npy`` while the FAISS index is built: a
#: multiple of :data:`esmsearch.vector_index.ADD_CHUNK_ROWS` (65,536), so the
#: ``index.add`` calls are those of an in-memory build; 262,144 x 1,280 float32 is
#: 1.3 GB at ESM-2 650M's dim (336 MB at 320).
FAISS_BLOCK_ROWS = 262_144
#: The trained, empty index written by :func:`train_faiss`, in the work directory.
TRAINED_FILE = "trained.faiss"
#: Seed of the training sample and of FAISS k-means (as in ``build_out_of_core``).
TRAIN_SEED = 0


def npy_layout(path: Path) -> tuple[int, int, np.dtype[Any], int]:
    """``(rows, dim, dtype, header bytes)`` of a 2-D C-ordered float32/float16 ``.npy`` file.

    Raises:
        IndexFormatError: another shape, order or dtype.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        offset = fh.tell()
    if len(shape) != 2 or fortran or dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise IndexFormatError(
            f"{path} is {dtype} {list(shape)}{' (Fortran order)' if fortran else ''}, expected float32 or "
            "float16 [n, dim] in C order"
        )
    return int(shape[0]), int(shape[1]), dtype, offset


def iter_stored_vectors(path: Path, block_rows: int = FAISS_BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Stream ``embeddings.npy`` as float32 unit vectors, ``block_rows`` rows at a time.

    Plain file reads into one block at a time (not a memory map, so the build's
    resident memory is one block, not the page cache of the whole file); float16
    rows are cast and re-normalised (:func:`esmsearch.store.unit_float32`).

    Args:
        path: a float32 or float16 ``[n, dim]`` ``.npy`` file.
        block_rows: rows per yielded block, >= 1.

    Yields:
        float32 ``[<= block_rows, dim]`` blocks, in row order.

    Raises:
        IndexFormatError: not a 2-D float32/float16 array, or the file is truncated.
    """
    rows, dim, dtype, offset = npy_layout(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        for start in range(0, rows, block_rows):
            n = min(block_rows, rows - start)
            buf = np.empty((n, dim), dtype=dtype)
            got = fh.readinto(buf.data.cast("B"))
            if got != buf.nbytes:
                raise IndexFormatError(f"{path} is truncated: {got} of {buf.nbytes} bytes at row {start}")
            yield unit_float32(buf)


def _rows(embeddings: Path) -> tuple[int, int]:
    rows, dim, _dtype, _offset = npy_layout(embeddings)
    if rows == 0:
        raise IndexFormatError(f"{embeddings} holds no vectors")
    return rows, dim


@dataclass(frozen=True)
class Trained:
    """Output of :func:`train_faiss`.

    Attributes:
        path: the trained, empty index file, or None when the factory needs no
            training (Flat, HNSW): :func:`add_faiss` then starts from a fresh index.
        train_rows: rows of the training sample (0 without training).
    """

    path: Path | None
    train_rows: int


def train_faiss(
    embeddings: Path,
    spec: IndexSpec,
    out: Path,
    *,
    block_rows: int = FAISS_BLOCK_ROWS,
    sample_size: int | None = None,
) -> Trained:
    """Train an empty FAISS index of ``spec`` on a seeded sample of stored vectors; write it.

    The sample is :func:`esmsearch.vector_index.training_sample` of
    :func:`esmsearch.vector_index.default_training_sample_size` rows
    (``max(64 x nlist, 65,536)``, capped at the database; seed 0) gathered in one
    pass of :func:`iter_stored_vectors`; training is seeded the same way. Peak
    memory: the sample + one block + the trained index.

    Args:
        embeddings: ``.npy`` float32 or float16 ``[n, dim]``, L2-normalised.
        spec: the index type.
        out: where the trained index is written (atomically and durably); not
            written when ``spec`` needs no training.
        block_rows: rows read per block.
        sample_size: training rows (None = the default above).

    Raises:
        InvalidIndexFactoryError: FAISS rejects the spec, or too few vectors to train it.
        IndexFormatError: ``embeddings`` is not a float32/float16 ``[n, dim]`` array,
            or holds no vectors.
        OSError: ``out`` cannot be written.
    """
    from esmsearch import vector_index as vi

    rows, dim = _rows(embeddings)
    index = vi._instantiate(spec.factory, dim)
    if index.is_trained:
        out.unlink(missing_ok=True)
        return Trained(None, 0)
    train_rows = vi.train_on_sample(
        index,
        lambda: iter_stored_vectors(embeddings, block_rows),
        rows,
        dim,
        spec,
        sample_size=sample_size,
        seed=TRAIN_SEED,
    )
    vi.write(index, out)
    return Trained(out, train_rows)


def add_faiss(
    embeddings: Path,
    spec: IndexSpec,
    trained: Trained,
    out: Path,
    *,
    block_rows: int = FAISS_BLOCK_ROWS,
    ondisk: bool | None = None,
    memory_budget_bytes: int | None = None,
    on_rows: Callable[[int], object] | None = None,
) -> OutOfCoreBuild:
    """Add every stored vector, in row order, to the trained index and write ``out``.

    As stage 3 of :func:`esmsearch.vector_index.build_out_of_core`: into the index in
    RAM (peak memory: the trained index + its inverted lists,
    ``n x (code bytes + 8)``, + one block), or, for an IVF whose lists exceed
    ``memory_budget_bytes`` (default: half of physical RAM) or with ``ondisk``,
    into per-shard copies merged into ``<stem>.ivfdata`` beside ``out``
    (FAISS ``OnDiskInvertedLists``). The stored search parameters of ``spec`` are
    applied before writing. ``out`` (and the ``.ivfdata``) are written atomically
    and durably.

    Args:
        embeddings: ``.npy`` float32 or float16 ``[n, dim]``, L2-normalised (row i = sequence i).
        spec: the index type (the one :func:`train_faiss` trained).
        trained: from :func:`train_faiss`.
        out: the ``index.faiss`` file to write.
        block_rows: rows read per block.
        ondisk: force (True) or forbid (False) on-disk inverted lists; None decides by budget.
        memory_budget_bytes: bytes the inverted lists may take in RAM.
        on_rows: called with the rows of each block added (progress).

    Returns:
        What was written (``ntotal``, ``train_rows``, ``ivfdata_path``).

    Raises:
        InvalidIndexFactoryError: ``ondisk=True`` for an index without inverted lists.
        IndexFormatError: ``embeddings`` is malformed, or ``trained.path`` is not a
            trained index of ``spec`` at this dimension.
        ConfigError: a non-positive budget.
        OSError: ``out`` cannot be written.
    """
    import faiss

    from esmsearch import vector_index as vi

    rows, dim = _rows(embeddings)
    if trained.path is None:
        index = vi._instantiate(spec.factory, dim)
    else:
        try:
            index = faiss.read_index(str(trained.path))
        except RuntimeError as exc:
            raise IndexFormatError(f"cannot read the trained index {trained.path} ({exc})") from exc
    if not index.is_trained or index.d != dim or index.ntotal != 0:
        raise IndexFormatError(
            f"{trained.path or spec.factory} is not an empty trained index of dim {dim} "
            f"(trained {index.is_trained}, dim {index.d}, {index.ntotal} vectors)"
        )
    budget = vi.memory_budget(memory_budget_bytes)
    use_ondisk = vi.builds_on_disk(index, spec, rows, ondisk, budget)
    ivfdata = out.with_suffix(".ivfdata")

    def chunks() -> Iterator[np.ndarray]:
        return iter_stored_vectors(embeddings, block_rows)

    if use_ondisk:
        shards = vi._add_ondisk(index, chunks, rows, dim, spec, out, out.parent, budget, on_rows)
        return vi.OutOfCoreBuild(
            path=out, ivfdata_path=ivfdata, ntotal=rows, train_rows=trained.train_rows, shards=shards
        )
    vi.add_in_ram(index, chunks(), on_rows)
    if index.ntotal != rows:  # pragma: no cover - the file changed under us
        raise IndexFormatError(f"{embeddings}: added {index.ntotal} vectors, expected {rows}")
    vi.apply_search_params(index, spec)
    ivfdata.unlink(missing_ok=True)  # a stale one from an earlier factory
    vi.write(index, out)
    return vi.OutOfCoreBuild(path=out, ivfdata_path=None, ntotal=rows, train_rows=trained.train_rows, shards=0)


def build_faiss(
    embeddings: Path,
    spec: IndexSpec,
    out: Path,
    *,
    block_rows: int = FAISS_BLOCK_ROWS,
    ondisk: bool | None = None,
    memory_budget_bytes: int | None = None,
    on_rows: Callable[[int], object] | None = None,
) -> OutOfCoreBuild:
    """Train (:func:`train_faiss`, into ``<out dir>/trained.faiss``) and add (:func:`add_faiss`) in one call.

    The trained file is removed afterwards. Arguments, result and errors as for
    :func:`add_faiss`; the index equals
    :func:`esmsearch.vector_index.build_out_of_core`'s for the same vectors.
    """
    trained = train_faiss(embeddings, spec, out.parent / TRAINED_FILE, block_rows=block_rows)
    try:
        return add_faiss(
            embeddings,
            spec,
            trained,
            out,
            block_rows=block_rows,
            ondisk=ondisk,
            memory_budget_bytes=memory_budget_bytes,
            on_rows=on_rows,
        )
    finally:
        if trained.path is not None:
            trained.path.unlink(missing_ok=True)
