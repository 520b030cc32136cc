"""The search engine behind the gRPC servicer: embed queries, FAISS search, metadata lookup.

Kept apart from the servicer so that a dynamic batcher can sit in front of
:meth:`SearchEngine.embed` and an index can be hot-swapped under the servicer
without either knowing about gRPC.

Threading: the model forward pass runs under one lock (one torch forward at a
time; torch itself uses all cores for it). FAISS search and metadata lookup run
outside the lock (``esmsearch.store.Index`` is thread-safe). Each request reads
the current index once and uses that one object for search, E-values and metadata,
so all its results come from one index version -- E-values included: they are
computed against the decoys of that version and scaled to its size.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from esmsearch.errors import EvaluesUnavailableError
from esmsearch.server.slot import IndexSlot

if TYPE_CHECKING:
    from esmsearch.embedding import Embedder
    from esmsearch.store import Index

__all__ = ["EngineHit", "EngineResult", "SearchEngine", "evalues_unavailable"]


@dataclass(frozen=True)
class EngineHit:
    """One hit (see ``Hit`` in search.proto).

    Attributes:
        target_id: database record id.
        target_description: rest of the database FASTA header.
        cosine_score: cosine similarity in [-1, 1], higher = closer.
        rank: 1-based rank among the query's hits (after ``min_score`` and
            ``max_evalue`` filtering).
        target_length: database sequence length in residues.
        evalue: E-value, >= 0, lower = more significant (float32 precision; see
            :mod:`esmsearch.significance`); ``None`` when the index has no decoys.
    """

    target_id: str
    target_description: str
    cosine_score: float
    rank: int
    target_length: int
    evalue: float | None = None


@dataclass(frozen=True)
class EngineResult:
    """Hits of a batch of queries and where the time went.

    Attributes:
        hits: one list per query, in input order; each by descending cosine score.
        index_version: version of the index that produced every hit.
        queue_s: seconds spent waiting for the model lock.
        embed_s: seconds spent embedding (model forward + pooling).
        search_s: seconds spent in FAISS search plus metadata lookup.
    """

    hits: list[list[EngineHit]]
    index_version: str
    queue_s: float
    embed_s: float
    search_s: float


class SearchEngine:
    """Embeds query sequences with the index's model and searches the index.

    Args:
        index: an opened index version.
        embedder: the model; must match ``index.manifest``.

    Raises:
        IndexMismatchError: the embedder's checkpoint, layer, pooling, normalisation
            or dimension differ from the index manifest.
    """

    def __init__(self, index: Index, embedder: Embedder) -> None:
        embedder.check_manifest(index.manifest)
        self._slot = IndexSlot(index)
        self.embedder = embedder
        self._model_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike[str],
        *,
        model: str | None = None,
        device: str = "auto",
        toks_per_batch: int = 4096,
        mmap: bool = True,
    ) -> SearchEngine:
        """Open the index at ``index_dir`` and load the model its manifest names.

        Args:
            index_dir: an index version directory (with ``manifest.json``).
            model: fair-esm pretrained name or ``.pt`` path overriding the manifest's
                model source (it must still be the same checkpoint).
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            toks_per_batch: token budget per forward pass.
            mmap: memory-map the FAISS index (see :func:`esmsearch.vector_index.read`)
                instead of reading it into the process's own memory.

        Raises:
            IndexNotFoundError, IndexFormatError: no usable index at ``index_dir``.
            ModelLoadError: the model cannot be loaded.
            IndexMismatchError: the model does not match the index manifest.
        """
        from esmsearch.embedding import Embedder
        from esmsearch.store import Index

        index = Index.open(index_dir, mmap=mmap)
        try:
            embedder = Embedder.for_manifest(index.manifest, model=model, device=device, toks_per_batch=toks_per_batch)
            return cls(index, embedder)
        except BaseException:
            index.close()
            raise

    @property
    def index(self) -> Index:
        """The index currently served (to search it, use :meth:`lease_index`)."""
        return self._slot.current

    @property
    def _index(self) -> Index:
        return self._slot.current

    @contextlib.contextmanager
    def lease_index(self) -> Iterator[Index]:
        """Use the current index for one request: a concurrent :meth:`swap_index`
        does not close it until the block ends (reference counting)."""
        with self._slot.lease() as index:
            yield index

    def swap_index(self, index: Index) -> Index:
        """Serve ``index`` for requests that start from now on (live reload).

        Requests in flight finish on the index they leased, which is closed once the
        last of them ends. See :class:`esmsearch.server.reload.IndexReloader`.

        Returns:
            The index served before.

        Raises:
            IndexMismatchError: ``index`` was built with other model settings than the
                loaded model (checkpoint, layer, pooling, normalisation, dimension);
                nothing is swapped.
        """
        self.embedder.check_manifest(index.manifest)
        return self._slot.swap(index)

    def embed(self, sequences: Sequence[str]) -> tuple[np.ndarray, float, float]:
        """Embed validated sequences under the model lock.

        Returns:
            ``(vectors, queue_s, embed_s)``: float32 ``[n, dim]`` L2-normalised
            embeddings in input order, seconds waited for the lock, seconds embedding.
        """
        t0 = time.perf_counter()
        with self._model_lock:
            t1 = time.perf_counter()
            vectors = self.embedder.embed(sequences)
        t2 = time.perf_counter()
        return vectors, t1 - t0, t2 - t1

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        min_score: float | None = None,
        *,
        max_evalue: float | None = None,
        index: Index | None = None,
    ) -> list[list[EngineHit]]:
        """k nearest database sequences of each query vector, with E-values.

        Args:
            vectors: float32 ``[q, dim]``, L2-normalised.
            k: hits per query, >= 1 (fewer come back if the index is smaller).
            min_score: drop hits with cosine score below this; ``None`` keeps all.
            max_evalue: drop hits with E-value above this; ``None`` keeps all.
            index: the index to search (default: the current one).

        Returns:
            One list per query, by descending cosine score, ranks 1.. after filtering;
            each hit has an E-value if the index has decoys.

        Raises:
            IndexFormatError: a hit's row has no metadata (a corrupt index).
            EvaluesUnavailableError: ``max_evalue`` given for an index without decoys.
        """
        if index is None:
            with self.lease_index() as leased:
                return self.search_vectors(vectors, k, min_score, max_evalue=max_evalue, index=leased)
        idx = index
        if max_evalue is not None and not idx.has_evalues:
            raise evalues_unavailable(idx)
        k_eff = max(1, min(k, idx.count))
        scores, rows = idx.search(vectors, k_eff)
        evalues = idx.evalues(vectors, scores) if idx.has_evalues else None
        return hits_from_scores(idx, scores, rows, k_eff, min_score, evalues=evalues, max_evalue=max_evalue)

    def search(
        self,
        sequences: Sequence[str],
        k: int,
        min_score: float | None = None,
        *,
        max_evalue: float | None = None,
    ) -> EngineResult:
        """Embed ``sequences`` and return their ``k`` nearest database sequences.

        Args:
            sequences: validated residue strings (see
                :func:`esmsearch.sequences.validate_sequence`).
            k: hits per query, >= 1.
            min_score: drop hits with cosine score below this, in [-1, 1]; ``None`` keeps all.
            max_evalue: drop hits with E-value above this, >= 0; ``None`` keeps all.

        Returns:
            An :class:`EngineResult` naming the one index version that answered.

        Raises:
            EvaluesUnavailableError: ``max_evalue`` given for an index without decoys.
        """
        with self.lease_index() as index:  # one version for the whole request
            if max_evalue is not None and not index.has_evalues:
                raise evalues_unavailable(index)
            vectors, queue_s, embed_s = self.embed(sequences)
            t0 = time.perf_counter()
            hits = self.search_vectors(vectors, k, min_score, max_evalue=max_evalue, index=index)
            search_s = time.perf_counter() - t0
        return EngineResult(hits, index.version, queue_s, embed_s, search_s)

    def close(self) -> None:
        """Close the index once no request uses it (the model is freed with the engine)."""
        self._slot.close()


def evalues_unavailable(index: Index) -> EvaluesUnavailableError:
    """The error for ``max_evalue`` asked of ``index``, which has no decoys (-> FAILED_PRECONDITION)."""
    return EvaluesUnavailableError(
        f"max_evalue needs E-values, but index version {index.version} has no decoys (built before "
        "E-values existed, or with --decoys 0); drop max_evalue or rebuild the index with decoys"
    )


def hits_from_scores(
    index: Index,
    scores: np.ndarray,
    rows: np.ndarray,
    k: int,
    min_score: float | None,
    *,
    evalues: np.ndarray | None = None,
    max_evalue: float | None = None,
) -> list[list[EngineHit]]:
    """Turn FAISS output into hits, keeping the first ``k`` columns of each row.

    Args:
        index: the index that produced ``scores``/``rows`` (for metadata).
        scores: float32 ``[q, k_searched]`` cosine scores, descending per row.
        rows: int64 ``[q, k_searched]`` database rows (-1 = none).
        k: hits per query to keep, >= 1 (<= ``k_searched`` columns are used).
        min_score: drop hits with cosine score below this; ``None`` keeps all.
        evalues: float32 ``[q, k_searched]`` E-values of ``scores``
            (:meth:`esmsearch.store.Index.evalues`), or ``None`` for an index without decoys.
        max_evalue: drop hits whose float32 E-value, as sent to clients, is above
            this; ``None`` keeps all.

    Returns:
        One list per query, by descending cosine score, ranks 1.. after filtering.

    Raises:
        EvaluesUnavailableError: ``max_evalue`` without ``evalues``.
    """
    if max_evalue is not None and evalues is None:
        raise evalues_unavailable(index)
    scores, rows = scores[:, :k], rows[:, :k]
    keep = rows >= 0
    if min_score is not None:
        keep &= scores >= np.float32(min_score)
    ev = None
    if evalues is not None:
        ev = np.asarray(evalues[:, :k], dtype=np.float32)
        if max_evalue is not None:
            keep &= ev.astype(np.float64) <= max_evalue
    targets = index.targets([int(r) for r in rows[keep]])
    out: list[list[EngineHit]] = []
    t = 0
    for qi in range(rows.shape[0]):
        hits: list[EngineHit] = []
        for j in np.flatnonzero(keep[qi]):
            target = targets[t]
            t += 1
            hits.append(
                EngineHit(
                    target_id=target.record_id,
                    target_description=target.description,
                    cosine_score=float(scores[qi, j]),
                    rank=len(hits) + 1,
                    target_length=target.length,
                    evalue=float(ev[qi, j]) if ev is not None else None,
                )
            )
        out.append(hits)
    return out
