"""The search engine behind the gRPC servicer: embed queries, FAISS search, metadata lookup.

Kept apart from the servicer so that a dynamic batcher can sit in front of
:meth:`SearchEngine.embed` and an index can be hot-swapped under the servicer
without either knowing about gRPC.

Threading: the model forward pass runs under one lock (one torch forward at a
time; torch itself uses all cores for it). FAISS search and metadata lookup run
outside the lock (``esmsearch.store.Index`` is thread-safe). Each request reads
the current index once and uses that one object for search, E-values and metadata,
so all its results come from one index version -- E-values included: they are
computed against the decoys of that version and scaled to a database size ``N``:
the request's ``evalue_db_size`` if it gives one, else the server's
(``esmsearch serve --evalue-db-size``), else that version's count
(:meth:`SearchEngine.evalue_db_size_for`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, overload

import numpy as np

from esmsearch.errors import ConfigError, EvaluesUnavailableError
from esmsearch.server.slot import IndexSlot

if TYPE_CHECKING:
    from esmsearch.embedding import Embedder
    from esmsearch.store import Index

__all__ = ["EngineHit", "EngineResult", "HitList", "SearchEngine", "check_db_size", "evalues_unavailable"]


class EngineHit(NamedTuple):
    """One hit (see ``Hit`` in search.proto).

    A named tuple rather than a frozen dataclass: large answers build one per hit
    (a million for 1,000 queries at k = 1,000), and a tuple is built in about half
    the time (:func:`hits_from_scores`). Immutable, fields by name as before.

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
class _HitColumns:
    """The hits of one answer, flat in query order, as plain Python values."""

    target_of_hit: list[int]  # per hit: index into the three target lists
    ids: list[str]
    descriptions: list[str]
    lengths: list[int]
    scores: list[float]  # per hit
    evalues: list[float] | None  # per hit; None for an index without decoys


class HitList(Sequence[EngineHit]):
    """The hits of one query, by descending cosine score: a read-only sequence of
    :class:`EngineHit`, each made when it is read (ranks 1..``len``).

    Why not a list of hit objects: the cyclic garbage collector walks every live
    container object at each full collection, with the GIL held. An answer of a million
    long-lived hit objects made each full collection in the server's process walk them
    all -- 4 s of collections to build 800,000 hits with the model loaded, stalling
    every thread. The columns here are plain strings, floats and ints, which the
    collector does not track; a hit made on reading is freed as soon as its reader (the
    gRPC/HTTP answer's conversion) moves on. Compares equal to any sequence of the same
    hits (a list of :class:`EngineHit` included).
    """

    __slots__ = ("_columns", "_start", "_stop")

    def __init__(self, columns: _HitColumns, start: int, stop: int) -> None:
        self._columns = columns
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, i: int) -> EngineHit: ...
    @overload
    def __getitem__(self, i: slice) -> list[EngineHit]: ...
    def __getitem__(self, i: int | slice) -> EngineHit | list[EngineHit]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"hit index {i} out of range for {n} hits")
        c, at = self._columns, self._start + j
        t = c.target_of_hit[at]
        ev = None if c.evalues is None else c.evalues[at]
        return EngineHit(c.ids[t], c.descriptions[t], c.scores[at], j + 1, c.lengths[t], ev)

    def __iter__(self) -> Iterator[EngineHit]:
        c, a, b = self._columns, self._start, self._stop
        of_hit = c.target_of_hit[a:b]
        columns = zip(
            map(c.ids.__getitem__, of_hit),
            map(c.descriptions.__getitem__, of_hit),
            c.scores[a:b],
            range(1, b - a + 1),
            map(c.lengths.__getitem__, of_hit),
            itertools.repeat(None, b - a) if c.evalues is None else c.evalues[a:b],
            strict=True,
        )
        hits: Iterator[EngineHit] = map(tuple.__new__, itertools.repeat(EngineHit), columns)
        return hits

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking equality, like list

    def __repr__(self) -> str:
        return f"HitList({list(self)!r})"


@dataclass(frozen=True)
class EngineResult:
    """Hits of a batch of queries and where the time went.

    Attributes:
        hits: one sequence of hits per query, in input order (a :class:`HitList` from
            the engine); each by descending cosine score.
        index_version: version of the index that produced every hit.
        queue_s: seconds spent waiting for the model lock.
        embed_s: seconds spent embedding (model forward + pooling).
        search_s: seconds spent in FAISS search plus metadata lookup.
    """

    hits: Sequence[Sequence[EngineHit]]
    index_version: str
    queue_s: float
    embed_s: float
    search_s: float


class SearchEngine:
    """Embeds query sequences with the index's model and searches the index.

    Args:
        index: an opened index version.
        embedder: the model; must match ``index.manifest``.
        evalue_db_size: database size ``N`` E-values are scaled to when a request
            gives none (``esmsearch serve --evalue-db-size``; HMMER's ``-Z``), >= 1;
            ``None`` = the served version's count.

    Raises:
        IndexMismatchError: the embedder's checkpoint, layer, pooling, normalisation
            or dimension differ from the index manifest.
        ConfigError: ``evalue_db_size`` is not an integer >= 1.
    """

    def __init__(self, index: Index, embedder: Embedder, *, evalue_db_size: int | None = None) -> None:
        check_db_size(evalue_db_size, "evalue_db_size")
        embedder.check_manifest(index.manifest)
        self._slot = IndexSlot(index)
        self.embedder = embedder
        self.evalue_db_size = evalue_db_size
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
        evalue_db_size: int | None = None,
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
            evalue_db_size: default database size of E-values (see the class), or ``None``.

        Raises:
            IndexNotFoundError, IndexFormatError: no usable index at ``index_dir``.
            ModelLoadError: the model cannot be loaded.
            IndexMismatchError: the model does not match the index manifest.
            ConfigError: ``evalue_db_size`` is not an integer >= 1.
        """
        from esmsearch.embedding import Embedder
        from esmsearch.store import Index

        index = Index.open(index_dir, mmap=mmap)
        try:
            embedder = Embedder.for_manifest(index.manifest, model=model, device=device, toks_per_batch=toks_per_batch)
            return cls(index, embedder, evalue_db_size=evalue_db_size)
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
        evalue_db_size: int | None = None,
    ) -> list[HitList]:
        """k nearest database sequences of each query vector, with E-values.

        Args:
            vectors: float32 ``[q, dim]``, L2-normalised.
            k: hits per query, >= 1 (fewer come back if the index is smaller).
            min_score: drop hits with cosine score below this; ``None`` keeps all.
            max_evalue: drop hits with E-value above this; ``None`` keeps all.
            index: the index to search (default: the current one).
            evalue_db_size: database size the E-values are scaled to, >= 1; ``None``:
                see :meth:`evalue_db_size_for`.

        Returns:
            One list per query, by descending cosine score, ranks 1.. after filtering;
            each hit has an E-value if the index has decoys.

        Raises:
            IndexFormatError: a hit's row has no metadata (a corrupt index).
            EvaluesUnavailableError: ``max_evalue`` given for an index without decoys.
        """
        if index is None:
            with self.lease_index() as leased:
                return self.search_vectors(
                    vectors, k, min_score, max_evalue=max_evalue, index=leased, evalue_db_size=evalue_db_size
                )
        idx = index
        if max_evalue is not None and not idx.has_evalues:
            raise evalues_unavailable(idx)
        k_eff = max(1, min(k, idx.count))
        scores, rows = idx.search(vectors, k_eff)
        db_size = self.evalue_db_size_for(evalue_db_size, idx)
        evalues = idx.evalues(vectors, scores, db_size) if idx.has_evalues else None
        return hits_from_scores(idx, scores, rows, k_eff, min_score, evalues=evalues, max_evalue=max_evalue)

    def search(
        self,
        sequences: Sequence[str],
        k: int,
        min_score: float | None = None,
        *,
        max_evalue: float | None = None,
        evalue_db_size: int | None = None,
    ) -> EngineResult:
        """Embed ``sequences`` and return their ``k`` nearest database sequences.

        Args:
            sequences: validated residue strings (see
                :func:`esmsearch.sequences.validate_sequence`).
            k: hits per query, >= 1.
            min_score: drop hits with cosine score below this, in [-1, 1]; ``None`` keeps all.
            max_evalue: drop hits with E-value above this, >= 0; ``None`` keeps all.
            evalue_db_size: database size the E-values are scaled to, >= 1; ``None``:
                see :meth:`evalue_db_size_for`.

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
            hits = self.search_vectors(
                vectors, k, min_score, max_evalue=max_evalue, index=index, evalue_db_size=evalue_db_size
            )
            search_s = time.perf_counter() - t0
        return EngineResult(hits, index.version, queue_s, embed_s, search_s)

    def evalue_db_size_for(self, requested: int | None, index: Index) -> int:
        """The database size ``N`` E-values of a request are scaled to: the request's own
        (``evalue_db_size``), else the server's (:attr:`evalue_db_size`), else ``index.count``.

        Raises:
            ConfigError: ``requested`` is not an integer >= 1 (callers validate first).
        """
        check_db_size(requested, "evalue_db_size")
        if requested is not None:
            return requested
        if self.evalue_db_size is not None:
            return self.evalue_db_size
        return index.count

    def close(self) -> None:
        """Close the index once no request uses it (the model is freed with the engine)."""
        self._slot.close()


def check_db_size(value: int | None, name: str) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value`` is ``None`` or an integer >= 1."""
    if value is None:
        return
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer (a number of database sequences), got {value!r}")


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
) -> list[HitList]:
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
        One :class:`HitList` per query, by descending cosine score, ranks 1.. after
        filtering. Each distinct row's metadata is looked up once; no per-hit object is
        made until a hit is read.

    Raises:
        EvaluesUnavailableError: ``max_evalue`` without ``evalues``.
        IndexFormatError: a kept row has no metadata (a corrupt index).
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
    # Vectorised: the kept hits in row-major order (query by query, by rank) as flat
    # columns; .tolist() gives the same Python floats as float() on each float32, without
    # a numpy scalar per hit.
    per_query = np.count_nonzero(keep, axis=1).tolist()
    distinct, which = np.unique(rows[keep], return_inverse=True)
    targets = index.targets(distinct.tolist())  # one metadata lookup per distinct row
    columns = _HitColumns(
        target_of_hit=which.reshape(-1).tolist(),
        ids=[t.record_id for t in targets],
        descriptions=[t.description for t in targets],
        lengths=[t.length for t in targets],
        scores=scores[keep].tolist(),
        evalues=ev[keep].tolist() if ev is not None else None,
    )
    out: list[HitList] = []
    start = 0
    for n in per_query:
        out.append(HitList(columns, start, start + n))
        start += n
    return out
