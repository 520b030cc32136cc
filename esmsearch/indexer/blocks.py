"""The model stage's interface: blocks of sequences in, their vectors out, in order.

Shared by the single-process build (:class:`LocalBlockEmbedder`) and the Ray one
(:class:`esmsearch.indexer.distributed.RayBlockEmbedder`), so neither module
imports the other's pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from esmsearch.embedding import Embedder

__all__ = ["BlockEmbedder", "EmbedBlock", "LocalBlockEmbedder"]


@dataclass(frozen=True)
class EmbedBlock:
    """The sequences of one chunk that need the model (reused ones are not in it).

    Attributes:
        number: the chunk's number (= its shard's number), increasing in input order.
        sequences: residue strings, validated, in input order; may be empty (a chunk
            whose vectors were all reused).
        rows: database rows of the chunk, reused ones included (0 = unknown; the
            driver holds that many records until the block comes back, so a
            distributed embedder counts them to bound a wave).
    """

    number: int
    sequences: tuple[str, ...]
    rows: int = 0

    @property
    def residues(self) -> int:
        return sum(len(s) for s in self.sequences)


class BlockEmbedder(Protocol):
    """The embed stages' model: embeds blocks and returns them **in the order given**.

    Implementations: :class:`LocalBlockEmbedder` (this process) and
    :class:`esmsearch.indexer.distributed.RayBlockEmbedder` (an actor pool on Ray
    Data). A test may pass its own.
    """

    def embed_blocks(
        self, blocks: Iterable[EmbedBlock], on_residues: Callable[[int], object] | None
    ) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        """Yield ``(block, vectors)`` for every block, in input order.

        ``vectors`` is float32 ``[len(block.sequences), dim]``, L2-normalised, row i =
        ``block.sequences[i]``. ``on_residues`` is called with residues as they are
        embedded (for a progress bar).
        """
        ...

    @property
    def embed_seconds(self) -> float:
        """Seconds spent embedding so far (wall time of the model work)."""
        ...


def _as_none_callback(fn: Callable[[int], object] | None) -> Callable[[int], None] | None:
    if fn is None:
        return None

    def call(n: int) -> None:
        fn(n)

    return call


class LocalBlockEmbedder:
    """:class:`BlockEmbedder` running one :class:`Embedder` in this process.

    ``embed_seconds`` sums the time inside :meth:`Embedder.embed`.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._seconds = 0.0

    @property
    def embed_seconds(self) -> float:
        return self._seconds

    def embed_blocks(
        self, blocks: Iterable[EmbedBlock], on_residues: Callable[[int], object] | None
    ) -> Iterator[tuple[EmbedBlock, np.ndarray]]:
        for block in blocks:
            if not block.sequences:
                yield block, np.empty((0, self.embedder.dim), dtype=np.float32)
                continue
            t0 = time.perf_counter()
            vectors = self.embedder.embed(list(block.sequences), on_batch=_as_none_callback(on_residues))
            self._seconds += time.perf_counter() - t0
            yield block, vectors
