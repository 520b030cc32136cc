"""FAISS index types for cosine search over L2-normalised embeddings.

This module knows FAISS and nothing about index directories: it validates a FAISS
``index_factory`` string, picks one automatically from the corpus size and a memory
budget (in the spirit of autofaiss), trains and fills an index, sets its search-time
parameters, searches it, and writes/reads it. :mod:`esmsearch.store` decides where
the file lives and records the :class:`IndexSpec` in ``manifest.json``.

Conventions shared by every function here:

* Vectors are ``float32 [n, dim]``, L2-normalised; the metric is inner product, so
  scores are cosine similarities in ``[-1, 1]``, **higher is closer** (approximate
  for compressed codes such as PQ/SQ, :func:`has_lossy_codes`; :func:`search_reranked`
  makes them exact from the stored vectors, which is how :mod:`esmsearch.store`
  searches such indexes, ``k_factor * k`` candidates per query).
* Row ``i`` of an index is database sequence ``i``; no id maps are used. FAISS
  returns row ``-1`` where it found fewer than ``k`` hits.

Supported factory strings (tested in ``tests/test_vector_index.py``)::

    Flat                exact brute force (IndexFlatIP); the default up to ~1M vectors
    IVF64,Flat          inverted lists, uncompressed vectors; search param nprobe
    IVF64,SQ8           inverted lists, 8-bit scalar-quantised vectors
    IVF64,PQ8           inverted lists, product-quantised codes (8 bytes/vector)
    OPQ4,IVF64,PQ8      the same after a learned rotation (OPQ)
    PQ8                 product quantisation, exhaustive scan
    HNSW32              graph index over uncompressed vectors; search param efSearch
    IVF4096_HNSW32,PQ32 IVF whose coarse quantiser is an HNSW graph (large nlist;
                        what auto_spec emits from nlist 2^14; validated, not built,
                        in the tests)

Any other string FAISS parses is accepted when the resulting index computes inner
products and is not in the rejected families listed in :func:`validate_factory`.

Databases larger than RAM (DESIGN.md "Scale"): :func:`build_out_of_core` streams
the vectors twice from a chunk source, trains on a seeded uniform sample
(:func:`training_sample`, sized by :func:`default_training_sample_size`), adds
chunk by chunk, and for an IVF whose lists exceed a memory budget writes them to
an on-disk ``.ivfdata`` file beside the index (FAISS ``OnDiskInvertedLists``).
:func:`read` with ``mmap=True`` maps every family read-only, so a server can open
a new version next to the live one without doubling its memory.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from esmsearch.errors import ConfigError, InvalidIndexFactoryError

__all__ = [
    "ADD_CHUNK_ROWS",
    "ChunkSource",
    "DEFAULT_K_FACTOR",
    "FLAT_MAX_VECTORS",
    "FLAT_SCAN_WARN_BYTES",
    "FAISS_POINTS_PER_CENTROID",
    "IndexSpec",
    "OutOfCoreBuild",
    "RERANK_MIN_CANDIDATES",
    "TRAIN_POINTS_PER_CENTROID",
    "add_in_ram",
    "apply_search_params",
    "auto_nlist",
    "auto_spec",
    "build",
    "build_from_chunks",
    "build_out_of_core",
    "builds_on_disk",
    "default_memory_budget_bytes",
    "default_nprobe",
    "default_training_sample_size",
    "estimate_index_bytes",
    "has_lossy_codes",
    "memory_budget",
    "min_training_vectors",
    "ondisk_ivfdata_path",
    "read",
    "recommended_training_vectors",
    "rerank",
    "search",
    "search_reranked",
    "train_on_sample",
    "training_sample",
    "validate_factory",
    "write",
]

#: Rows added to an index per ``index.add`` call, bounding temporary memory
#: (65,536 x 1,280 float32 = 320 MiB at ESM-2 650M's dim).
ADD_CHUNK_ROWS = 65_536

#: Largest corpus for which :func:`auto_spec` picks exact search (the 1M boundary
#: autofaiss and the FAISS wiki "Guidelines to choose an index" use; DESIGN.md "Scale").
#: At 1M x 1,280 float32 a Flat index is 5 GB and one query scans all of it: 0.9 s per
#: lone query on 2 cores (0.09 s at dim 128; benchmarks/flat_scan_latency.py), so on
#: small CPUs an IVF index pays off well below this count at ESM-2 650M's width.
FLAT_MAX_VECTORS = 1_000_000

#: Size of a Flat index (``4 x dim x n`` bytes, all scanned by every query) above which
#: an index build warns that queries will be slow and names the faster choices: 1 GiB is
#: ~170 ms per lone query on 2 CPU cores (1,000,000 x 1,280 float32, 4.8 GiB, took
#: 901 ms; benchmarks/flat_scan_latency.py, Intel Xeon, 2 cores).
FLAT_SCAN_WARN_BYTES = 1 << 30

#: FAISS k-means warns below 39 training points per centroid
#: (``faiss/Clustering.cpp``, ``min_points_per_centroid``) and subsamples above
#: 256 (``max_points_per_centroid``).
FAISS_POINTS_PER_CENTROID = 39
_FAISS_MAX_POINTS_PER_CENTROID = 256

#: Below this many vectors :func:`auto_spec` always picks Flat: neither IVF nor an
#: 8-bit PQ (256 centroids per sub-quantiser) can be trained as FAISS recommends
#: (39 x 256 = 9,984 points), and a Flat index of 10,000 x 1,280 float32 is only
#: 51 MB, so a memory budget below that is not worth approximating for.
_AUTO_MIN_APPROX_VECTORS = 10_000

#: Above this nlist :func:`auto_spec` makes the IVF coarse quantiser an HNSW32
#: graph instead of a flat scan: assigning a vector to one of 2^14 centroids by
#: brute force costs 2^14 x dim multiply-adds, more than an HNSW walk (autofaiss
#: switches at the same order of magnitude).
_AUTO_HNSW_QUANTIZER_MIN_NLIST = 1 << 14

#: Bytes per vector of FAISS's inverted-list ids (int64).
_IVF_ID_BYTES = 8

#: Vector transforms that preserve inner products (orthogonal rotations). Others
#: (PCA centring, L2norm, ITQ...) change scores so they would not be cosines.
_INNER_PRODUCT_PRESERVING_TRANSFORMS = ("OPQMatrix", "RandomRotationMatrix")

#: Index families rejected although FAISS builds them with METRIC_INNER_PRODUCT.
_REJECTED_INDEX_CLASSES = {
    "IndexIDMap": "ID-map wrappers are not needed: row i is database sequence i",
    "IndexIDMap2": "ID-map wrappers are not needed: row i is database sequence i",
    "IndexShards": "sharding is done by the server, not inside one index file",
    "IndexReplicas": "replication is done by the server, not inside one index file",
}


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS index type and its search-time parameters.

    Attributes:
        factory: FAISS ``index_factory`` string, for example ``"Flat"``,
            ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"``.
        nprobe: number of inverted lists probed per query (IVF indexes only);
            ``None`` leaves FAISS's value (1 for a fresh index).
        ef_search: HNSW ``efSearch``, the size of the search frontier (HNSW
            indexes, or the HNSW coarse quantiser of ``IVF..._HNSW..``); ``None``
            leaves FAISS's value (16).
        k_factor: for indexes with lossy codes (PQ, SQ; :func:`has_lossy_codes`),
            search ``k_factor * k`` candidates and re-rank them exactly against the
            stored embeddings (:func:`search_reranked`). ``None`` on an index with
            lossy codes means :data:`DEFAULT_K_FACTOR` (what an index built before
            this field existed gets); ignored for indexes that store exact vectors.
            Not a FAISS parameter: :func:`apply_search_params` leaves it alone.

    Raises:
        ConfigError: ``factory`` is not a non-empty string, or ``nprobe`` /
            ``ef_search`` / ``k_factor`` is not a positive integer.
    """

    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ConfigError(f"index factory must be a non-empty string, got {self.factory!r}")
        for name in ("nprobe", "ef_search", "k_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        """Returns the spec as a JSON-serialisable dict (for ``manifest.json``)."""
        return {"factory": self.factory, "nprobe": self.nprobe, "ef_search": self.ef_search, "k_factor": self.k_factor}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IndexSpec:
        """Builds a spec from :meth:`to_json`'s output.

        Raises:
            ConfigError: a key is missing or unknown, or a value is invalid.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"index spec must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"factory", "nprobe", "ef_search", "k_factor"}
        if unknown:
            raise ConfigError(f"unknown index spec keys: {sorted(unknown)}")
        if "factory" not in d:
            raise ConfigError("index spec has no 'factory'")
        return cls(
            factory=d["factory"], nprobe=d.get("nprobe"), ef_search=d.get("ef_search"), k_factor=d.get("k_factor")
        )


# --------------------------------------------------------------------------- helpers


def _instantiate(factory: str, dim: int) -> faiss.Index:
    """Calls ``faiss.index_factory`` with inner product, mapping errors.

    Raises:
        InvalidIndexFactoryError: FAISS cannot parse or build the string at ``dim``.
    """
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # FAISS messages start with the C++ location; the last line says why.
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected by FAISS"
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", reason)
        raise InvalidIndexFactoryError(f"index factory {factory!r} is invalid for dim {dim}: {reason}") from exc


def _extract_ivf(index: faiss.Index) -> Any | None:
    """Returns the IndexIVF inside ``index`` (through transforms/refines) or ``None``."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _inner(index: faiss.Index) -> list[Any]:
    """Returns ``index`` downcast plus every index it wraps, outermost first."""
    out: list[Any] = []
    todo: list[Any] = [index]
    while todo:
        cur = faiss.downcast_index(todo.pop(0))
        out.append(cur)
        if isinstance(cur, faiss.IndexPreTransform):
            todo.append(cur.index)
        elif isinstance(cur, faiss.IndexRefine):
            todo.extend([cur.base_index, cur.refine_index])
        elif isinstance(cur, faiss.IndexHNSW):
            todo.append(cur.storage)
        elif isinstance(cur, faiss.IndexIVF):
            todo.append(cur.quantizer)
        elif hasattr(cur, "index") and isinstance(getattr(cur, "index", None), faiss.Index):
            todo.append(cur.index)
    return out


def _transforms(pre: Any) -> list[Any]:
    """Returns the downcast vector transforms of an IndexPreTransform, in order."""
    chain: Any = pre.chain  # a SWIG std::vector; faiss's stubs call it a list
    return [faiss.downcast_VectorTransform(chain.at(i)) for i in range(chain.size())]


def _search_parameter_names(index: faiss.Index) -> set[str]:
    ps = faiss.ParameterSpace()
    ps.initialize(index)
    return {ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())}


def _as_vectors(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """Returns ``x`` as C-contiguous float32 [n, dim] or raises ConfigError."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ConfigError(f"{what} must be a 2-D array [n, dim], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ConfigError(f"{what} have dim {arr.shape[1]}, expected {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"{what} must be floating point, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------- public API


def default_nprobe(nlist: int) -> int:
    """Default IVF ``nprobe`` for ``nlist`` lists: ``nlist / 16``, clamped to [1, 256].

    Scanning 1/16 of the lists is a recall-first default: on the clustered
    synthetic vectors of ``benchmarks/index_recall.py`` (100,000 x 320),
    IVF1024,Flat had recall@10 1.000 at nprobe=64 and 0.993 at nprobe=8 (0.994 /
    0.939 at 20,000 vectors, where lists are sparser). Lower it per index when
    speed matters more. The cap of 256 keeps very large nlist from scanning too
    much (the FAISS wiki's "Guidelines to choose an index" tunes nprobe in the
    same 1..256 range).

    Args:
        nlist: number of inverted lists, >= 1.

    Returns:
        nprobe in ``[1, min(nlist, 256)]``.
    """
    return max(1, min(nlist, 256, nlist // 16))


#: Default HNSW efSearch set by :func:`validate_factory` and :func:`auto_spec`.
#: FAISS's own default (16) is below typical k=10..100 needs (efSearch should be
#: >= k); HNSW32 with 128 had recall@10 1.000 on the benchmark's 100,000 x 320
#: clustered vectors (0.999 at efSearch=32), about 3x slower than efSearch=32.
DEFAULT_EF_SEARCH = 128


#: Default :attr:`IndexSpec.k_factor`: an index with lossy codes (PQ, SQ) is searched
#: for ``10 * k`` candidates, which are re-ranked exactly (:func:`search_reranked`).
#: Measured with ``benchmarks/index_recall.py --n 100000 --single-queries 100 --threads 2
#: --skip 'IVF1024,Flat;HNSW32;IVF4096,PQ32'`` (clustered synthetic 100,000 x 320,
#: 1,000 held-out queries, k = 10; "Intel(R) Xeon(R) Processor", 2 shared cores): at
#: the stored nprobe 64, IVF1024,PQ32 had recall@10 0.759 from its codes and 0.971 /
#: 0.998 / 0.999 / 1.000 re-ranked with k_factor 2 / 5 / 10 / 20, at a p50
#: single-query latency of 0.26 ms without re-ranking and 0.39 / 0.45 / 0.48 / 0.62 ms
#: with (about +0.2 ms, mostly fixed numpy overhead; IVF1024,PQ40: 0.782 -> 0.982 /
#: 0.999 / 1.000 / 1.000). At 200,000 vectors the codes alone fell to 0.643
#: (IVF1024,PQ32) and 0.564 (IVF2048,PQ16) and k_factor 2 / 5 / 10 gave 0.890 / 0.997
#: / 1.000 and 0.827 / 0.993 / 0.999: the candidates needed grow with the database
#: as near neighbours crowd, and at 5,000,000 x 320 (IVF4096,PQ32,
#: ``benchmarks/results/out_of_core_5M.txt``) the top 100 re-ranked (k_factor 10)
#: gave 0.986 against 0.466 from the codes. 10 is the smallest tested factor with a
#: margin over the 0.95 target at the sizes where PQ is chosen, for ~0.2 ms per query
#: over a PQ search that takes ~20 ms there. Reading 10 x k stored rows per query
#: (100 x 5 KiB at dim 1,280 for k = 10) is cheap from the page cache; from a cold
#: disk it is up to 100 random reads.
DEFAULT_K_FACTOR = 10

#: Fewest candidates :func:`search_reranked` takes from compressed codes per query,
#: whatever ``k_factor * k`` says: small ``k`` needs a deeper candidate list than
#: ``k_factor`` alone gives once near neighbours crowd. Measured in the scale
#: rehearsal (``benchmarks/rerank_sweep.py`` on its 500,000 x 128 IVF2048,PQ32
#: version, embeddings of a 1-layer random-weight ESM-2, which crowd far more than
#: the clustered synthetic vectors above; "Intel(R) Xeon(R) Processor", 2 cores):
#: recall@10 0.909 / 0.957 / 0.988 / 0.996 with 100 / 200 / 500 / 1,000 candidates
#: (k_factor 10 / 20 / 50 / 100 at k = 10, nprobe 128; the same at nprobe 256, so
#: the loss was in the candidates, not in the lists), at a single-query search p50 of
#: 1.79 / 2.06 / 2.46 / 3.08 ms. 500 rows are 250 KiB of ``embeddings.npy`` at dim 128
#: (2.5 MiB at dim 1,280) per query; for large ``k`` the ``k_factor * k`` term rules
#: and this floor costs nothing.
RERANK_MIN_CANDIDATES = 500


def has_lossy_codes(index: faiss.Index) -> bool:
    """Whether the scores FAISS returns for ``index`` approximate the stored vectors'.

    Decided from the FAISS index's structure, not from its factory string: follows
    the part that produces the final scores (through ``IndexPreTransform``
    rotations, to an ``IndexRefine``'s refinement index, to an HNSW graph's
    storage) down to the index that holds the codes. Only ``IndexFlat`` (raw
    float32 vectors) and ``IndexIVFFlat`` (raw float32 vectors in inverted lists)
    score exactly; every other code (``IndexPQ``, ``IndexIVFPQ`` and their
    FastScan variants, ``IndexScalarQuantizer``/``IndexIVFScalarQuantizer``
    including fp16, additive quantisers...) is lossy. An index type not known here
    counts as lossy, so it is re-ranked: that costs time, never correctness.

    Args:
        index: any FAISS index, filled or empty (e.g. fresh from ``index_factory``).

    Returns:
        ``True`` when the scores are approximations (re-rank them), ``False`` when
        they are exact inner products of float32 vectors (to float rounding).
    """
    cur: Any = faiss.downcast_index(index)
    while True:
        if isinstance(cur, faiss.IndexPreTransform):
            cur = faiss.downcast_index(cur.index)
        elif isinstance(cur, faiss.IndexRefine):
            cur = faiss.downcast_index(cur.refine_index)
        elif isinstance(cur, faiss.IndexHNSW):
            cur = faiss.downcast_index(cur.storage)
        else:
            break
    return not isinstance(cur, (faiss.IndexFlat, faiss.IndexIVFFlat))


def validate_factory(
    factory: str,
    dim: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: int | None = None,
) -> IndexSpec:
    """Checks a FAISS factory string cheaply, before anything is embedded.

    Instantiates ``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``
    (allocates an empty, untrained index; no training) and rejects:

    * strings FAISS cannot parse (``""``, ``"Flat,,"``, ``"nonsense"``, binary
      index strings such as ``"BinaryFlat"``, which FAISS's float factory does not
      know);
    * dimension mismatches (``"PQ7"`` at dim 32: 7 sub-quantisers must divide dim);
    * indexes that do not compute inner products (``"LSH"``, ``"HNSW32,PQ8"``,
      which FAISS silently builds with L2);
    * transforms that change inner products (``"PCA64,..."`` centres vectors,
      ``"L2norm"``...); only rotations (``OPQ``, ``RR``) are allowed;
    * ``IDMap``/``IDMap2`` wrappers, which we do not need;
    * an IVF with ``nlist < 1`` (``"IVF0,Flat"``, which FAISS parses);
    * search parameters the index does not have (``nprobe`` on a non-IVF index,
      ``ef_search`` on an index without HNSW, ``k_factor`` on an index that stores
      exact vectors, see :func:`has_lossy_codes`).

    The word ``"auto"`` is not accepted here; use :func:`auto_spec`.

    Args:
        factory: FAISS index factory string; surrounding whitespace is stripped.
        dim: embedding dimension, >= 1.
        nprobe: IVF probes at search time; ``None`` picks :func:`default_nprobe`
            for IVF indexes.
        ef_search: HNSW efSearch; ``None`` picks :data:`DEFAULT_EF_SEARCH` for
            indexes with an HNSW graph.
        k_factor: candidates per hit re-ranked exactly; ``None`` picks
            :data:`DEFAULT_K_FACTOR` for indexes with lossy codes (PQ, SQ).

    Returns:
        The validated :class:`IndexSpec`, with defaults filled in.

    Raises:
        InvalidIndexFactoryError: the string is rejected; the message names the
            string and the reason, chained from FAISS's error where there is one.
        ConfigError: ``dim`` < 1 or a search parameter is not a positive integer.
    """
    if not isinstance(factory, str):
        raise InvalidIndexFactoryError(f"index factory must be a string, got {factory!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive integer, got {dim!r}")
    text = factory.strip()
    if not text:
        raise InvalidIndexFactoryError(f"index factory {factory!r} is empty")
    if text.lower() == "auto":
        raise InvalidIndexFactoryError(
            f"index factory {factory!r} is not a FAISS string; resolve it with auto_spec() first"
        )
    index = _instantiate(text, dim)

    def reject(reason: str) -> InvalidIndexFactoryError:
        return InvalidIndexFactoryError(f"index factory {text!r} is not supported: {reason}")

    for part in _inner(index):
        name = type(part).__name__
        if name in _REJECTED_INDEX_CLASSES:
            raise reject(_REJECTED_INDEX_CLASSES[name])
        if name.startswith("IndexBinary"):
            raise reject("binary indexes do not compute inner products of float vectors")
        if isinstance(part, faiss.IndexPreTransform):
            for transform in _transforms(part):
                vt = type(transform).__name__
                if vt not in _INNER_PRODUCT_PRESERVING_TRANSFORMS:
                    raise reject(
                        f"transform {vt} changes inner products, so scores would not be "
                        "cosine similarities (only OPQ and RR rotations are allowed)"
                    )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise reject("FAISS builds this index type with L2 distance only, not inner product")
    ivf = _extract_ivf(index)
    if ivf is not None and ivf.nlist < 1:
        raise reject(f"an IVF needs at least 1 inverted list, got nlist={ivf.nlist}")

    params = _search_parameter_names(index)
    has_hnsw = "efSearch" in params or "quantizer_efSearch" in params
    if nprobe is not None:
        if ivf is None:
            raise reject(f"nprobe={nprobe} given but the index has no inverted lists (IVF)")
        if isinstance(nprobe, int) and not isinstance(nprobe, bool) and nprobe > ivf.nlist:
            raise ConfigError(f"nprobe={nprobe} exceeds nlist={ivf.nlist} of {text!r}")
    if ef_search is not None and not has_hnsw:
        raise reject(f"ef_search={ef_search} given but the index has no HNSW graph")
    lossy = has_lossy_codes(index)
    if k_factor is not None and not lossy:
        raise reject(f"k_factor={k_factor} given but the index stores exact vectors, so there is nothing to re-rank")
    if nprobe is None and ivf is not None:
        nprobe = default_nprobe(ivf.nlist)
    if ef_search is None and has_hnsw:
        ef_search = DEFAULT_EF_SEARCH
    if k_factor is None and lossy:
        k_factor = DEFAULT_K_FACTOR
    return IndexSpec(factory=text, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)


def min_training_vectors(spec: IndexSpec, dim: int) -> int:
    """Smallest number of training vectors FAISS can train ``spec`` on.

    This is the hard minimum: k-means refuses fewer points than centroids
    (``faiss/Clustering.cpp``), so the result is the largest centroid count any
    part of the index trains: ``nlist`` for an IVF, ``2**nbits`` (256 for the usual
    8-bit codes) per PQ/OPQ/residual quantiser, 1 for a scalar quantiser, 0 for
    indexes needing no training (Flat, HNSW32). FAISS warns below
    :func:`recommended_training_vectors` (39 points per centroid).

    Args:
        spec: index spec (its factory must be valid at ``dim``).
        dim: embedding dimension.

    Returns:
        Minimum number of training vectors, >= 0.

    Raises:
        InvalidIndexFactoryError: the factory string is invalid at ``dim``.
    """
    return _training_centroids(_instantiate(spec.factory, dim))


def recommended_training_vectors(spec: IndexSpec, dim: int) -> int:
    """Training vectors FAISS trains ``spec`` on without warning (39 per centroid).

    Args:
        spec: index spec (its factory must be valid at ``dim``).
        dim: embedding dimension.

    Returns:
        ``39 * min_training_vectors(spec, dim)`` (0 when no training is needed).

    Raises:
        InvalidIndexFactoryError: the factory string is invalid at ``dim``.
    """
    return FAISS_POINTS_PER_CENTROID * min_training_vectors(spec, dim)


def _training_centroids(index: faiss.Index) -> int:
    if index.is_trained:
        return 0
    need = 1
    for part in _inner(index):
        if isinstance(part, faiss.IndexIVF):
            need = max(need, int(part.nlist))
        if isinstance(part, faiss.IndexPreTransform):
            for vt in _transforms(part):
                if isinstance(vt, faiss.OPQMatrix):
                    need = max(need, 1 << 8)  # OPQ trains an internal 8-bit PQ
        for attr in ("pq", "rq", "lsq", "aq"):
            quantizer = getattr(part, attr, None)
            nbits = getattr(quantizer, "nbits", None)
            if nbits is not None:
                # nbits is a scalar for PQ and a vector for additive quantisers.
                try:
                    bits = int(nbits)
                except TypeError:
                    bits = max(int(nbits.at(i)) for i in range(nbits.size()))
                need = max(need, 1 << bits)
    return need


def estimate_index_bytes(factory: str, n_vectors: int, dim: int) -> int:
    """Rough in-memory size of a filled index, for :func:`auto_spec`'s budget.

    Counts per-vector storage only (vectors or codes, IVF ids, HNSW links at
    ~2*M int32 per vector on level 0) plus IVF centroids; ignores small constant
    tables. Good to ~10%, which is what a memory budget needs.

    Args:
        factory: one of the shapes :func:`auto_spec` emits (``Flat``,
            ``IVF<n>[_HNSW32],Flat``, ``IVF<n>[_HNSW32],PQ<m>``, ``HNSW<M>``).
        n_vectors: number of database vectors.
        dim: embedding dimension.

    Returns:
        Estimated size in bytes.

    Raises:
        InvalidIndexFactoryError: ``factory`` is not one of the shapes above.
    """
    flat = 4 * dim
    m = re.fullmatch(r"IVF(\d+)(_HNSW(\d+))?,(Flat|PQ(\d+)|SQ8)", factory)
    if factory == "Flat":
        return n_vectors * flat
    if m is not None:
        nlist = int(m.group(1))
        quantizer = nlist * flat + (nlist * 2 * int(m.group(3)) * 4 if m.group(2) else 0)
        if m.group(4) == "Flat":
            code = flat
        elif m.group(4) == "SQ8":
            code = dim
        else:
            code = int(m.group(5))
        return n_vectors * (code + _IVF_ID_BYTES) + quantizer
    h = re.fullmatch(r"HNSW(\d+)", factory)
    if h is not None:
        return n_vectors * (flat + 2 * int(h.group(1)) * 4)
    raise InvalidIndexFactoryError(f"cannot estimate the size of index factory {factory!r}")


def auto_nlist(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: the power of two nearest ``4 sqrt(n)`` (FAISS wiki
    "Guidelines to choose an index": 4..16 sqrt(n)), halved until k-means has the 39
    training points per centroid FAISS asks for (:data:`FAISS_POINTS_PER_CENTROID`); >= 1."""
    nlist = 1 << max(0, round(math.log2(4 * math.sqrt(max(1, n_vectors)))))
    while nlist > 1 and n_vectors < FAISS_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    return nlist


def auto_spec(n_vectors: int, dim: int, *, memory_budget_bytes: int | None = None) -> IndexSpec:
    """Picks an index type from corpus size and memory budget (after autofaiss).

    Rules, in order (autofaiss ``get_optimal_index_keys_v2`` and the FAISS wiki
    "Guidelines to choose an index" are the sources of the shape of this):

    1. ``n_vectors < 10,000``: ``Flat``. Neither IVF nor 8-bit PQ can be trained
       as FAISS recommends (39 x 256 = 9,984 points), and the Flat index is at
       most 51 MB at dim 1,280, so it is used whatever the budget.
    2. ``n_vectors <= 1,000,000`` (:data:`FLAT_MAX_VECTORS`) and ``4 * dim *
       n_vectors`` bytes fit the budget (or there is none): ``Flat`` -- exact,
       no training, and fast enough at this size (DESIGN.md "Scale").
    3. Otherwise an IVF with ``nlist`` = the power of two nearest ``4 *
       sqrt(n_vectors)`` (FAISS wiki: 4..16 sqrt(n)), halved until ``n_vectors >=
       39 * nlist`` so k-means has the 39 points per centroid FAISS asks for. From
       ``nlist >= 2**14`` the coarse quantiser is ``HNSW32`` (``IVF<nlist>_HNSW32``)
       because a brute-force assignment to that many centroids dominates cost.
       ``nprobe`` = :func:`default_nprobe`.

       a. ``IVF<nlist>,Flat`` when the uncompressed vectors (+ 8-byte ids) fit the
          budget (or there is none): best recall at a given speed.
       b. else ``IVF<nlist>,SQ8`` (one byte per dimension, 4x smaller) when that
          fits: no codebook to learn, and cosine errors of ~1e-3.
       c. else ``IVF<nlist>,PQ<m>`` with the largest ``m`` (bytes per vector, a
          divisor of ``dim`` no larger than ``dim / 4``, so each 8-bit
          sub-quantiser covers >= 4 dims as in the FAISS wiki's examples; larger
          m trains slowly -- PQ160 at dim 320 took minutes on 20,000 vectors --
          and SQ8 is the better choice at that size) that fits; PQ is the way to
          shrink vectors 10-100x (Jegou et al. 2011, "Product quantization for
          nearest neighbor search").

    HNSW over all vectors is not chosen automatically: on CPU its build time
    (hours at 10M vectors) and ~256 extra bytes per vector make IVF the better
    default; pass ``"HNSW32"`` explicitly when query latency matters most.

    Args:
        n_vectors: number of database vectors, >= 1.
        dim: embedding dimension, >= 1.
        memory_budget_bytes: bytes the filled index may take in RAM; ``None``
            means unlimited.

    Returns:
        A validated :class:`IndexSpec` (factory plus ``nprobe`` / ``ef_search``).

    Raises:
        ConfigError: a non-positive argument, or a budget too small even for the
            most compressed choice (``PQ`` with the smallest divisor of ``dim``).
    """
    for name, value in (("n_vectors", n_vectors), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if memory_budget_bytes is not None and (
        isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 1
    ):
        raise ConfigError(f"memory_budget_bytes must be a positive integer or None, got {memory_budget_bytes!r}")

    def fits(factory: str) -> bool:
        return memory_budget_bytes is None or (estimate_index_bytes(factory, n_vectors, dim) <= memory_budget_bytes)

    if n_vectors < _AUTO_MIN_APPROX_VECTORS:
        return validate_factory("Flat", dim)
    if n_vectors <= FLAT_MAX_VECTORS and fits("Flat"):
        return validate_factory("Flat", dim)

    nlist = auto_nlist(n_vectors)
    ivf = f"IVF{nlist}" + ("_HNSW32" if nlist >= _AUTO_HNSW_QUANTIZER_MIN_NLIST else "")

    if fits(f"{ivf},Flat"):
        return validate_factory(f"{ivf},Flat", dim)
    if fits(f"{ivf},SQ8"):
        return validate_factory(f"{ivf},SQ8", dim)
    for m in sorted((d for d in range(1, dim // 4 + 1) if dim % d == 0), reverse=True):
        if fits(f"{ivf},PQ{m}"):
            return validate_factory(f"{ivf},PQ{m}", dim)
    smallest = estimate_index_bytes(f"{ivf},PQ1", n_vectors, dim)
    raise ConfigError(
        f"memory budget of {memory_budget_bytes} bytes is too small for {n_vectors} vectors "
        f"of dim {dim}: even {ivf},PQ1 needs about {smallest} bytes"
    )


def _train(index: faiss.Index, train: np.ndarray, spec: IndexSpec, dim: int, seed: int) -> None:
    need = _training_centroids(index)
    if train.shape[0] < need:
        raise InvalidIndexFactoryError(
            f"index factory {spec.factory!r} needs at least {need} training vectors "
            f"(FAISS recommends {FAISS_POINTS_PER_CENTROID * need}), got {train.shape[0]}; "
            "use a smaller nlist/PQ or 'Flat' for a database this small"
        )
    for part in _inner(index):
        cp = getattr(part, "cp", None)
        if cp is not None and hasattr(cp, "seed"):
            cp.seed = seed
        pq = getattr(part, "pq", None)
        if pq is not None and hasattr(pq, "cp"):
            pq.cp.seed = seed
        if getattr(part, "do_polysemous_training", False):
            # index_factory turns polysemous training on for "PQ<m>" unless the
            # string ends in "np"; it only serves Hamming-threshold search (ht),
            # which we never use, and its simulated annealing takes 10-20x the
            # PQ k-means time (Douze et al. 2016, "Polysemous codes").
            part.do_polysemous_training = False
    try:
        index.train(train)
    except RuntimeError as exc:
        raise InvalidIndexFactoryError(
            f"training index factory {spec.factory!r} on {train.shape[0]} vectors failed: {exc}"
        ) from exc


def _sample_rows(n: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted row ids of a seeded sample of ``train_sample`` rows, or None for all."""
    if train_sample is None or train_sample >= n:
        return None
    if train_sample < 1:
        raise ConfigError(f"train_sample must be positive, got {train_sample}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=train_sample, replace=False))


def build(
    vectors: np.ndarray,
    spec: IndexSpec,
    *,
    seed: int = 0,
    train_sample: int | None = None,
) -> faiss.Index:
    """Builds a filled index of ``vectors``, row i = ``vectors[i]``.

    Trains when the index type needs it, on a seeded sample of at most
    ``train_sample`` rows (all rows when ``None``; FAISS k-means itself subsamples
    to 256 points per centroid), then adds every vector in chunks of
    :data:`ADD_CHUNK_ROWS`, then applies the spec's search parameters.

    Args:
        vectors: float32 [n, dim], L2-normalised (not re-normalised here).
        spec: index spec, normally from :func:`validate_factory` or
            :func:`auto_spec`.
        seed: seed for the training sample and FAISS k-means.
        train_sample: at most this many rows are used for training.

    Returns:
        The trained, filled ``faiss.Index`` with ``ntotal == n``.

    Raises:
        InvalidIndexFactoryError: the factory is invalid at ``dim``, or the
            database has fewer vectors than the index needs for training (the
            message gives both numbers).
        ConfigError: ``vectors`` is not a 2-D float array.
    """
    x = _as_vectors(vectors, None, "database vectors")
    dim = x.shape[1]
    index = _instantiate(spec.factory, dim)
    if not index.is_trained:
        rows = _sample_rows(x.shape[0], train_sample, seed)
        _train(index, x if rows is None else x[rows], spec, dim, seed)
    for start in range(0, x.shape[0], ADD_CHUNK_ROWS):
        index.add(x[start : start + ADD_CHUNK_ROWS])
    apply_search_params(index, spec)
    return index


def build_from_chunks(
    chunks: Iterable[np.ndarray],
    spec: IndexSpec,
    *,
    dim: int,
    train_vectors: np.ndarray | None,
    seed: int = 0,
) -> faiss.Index:
    """Builds an index from vectors streamed in chunks (e.g. from disk shards).

    Trains on ``train_vectors`` (a sample the caller drew, for instance every
    k-th row of each shard) and then adds each chunk in order, so row numbers
    follow the concatenation of the chunks.

    Args:
        chunks: iterable of float32 [n_i, dim] arrays, L2-normalised.
        spec: index spec.
        dim: embedding dimension.
        train_vectors: float32 [n_train, dim] training sample; required when the
            index type needs training, ignored otherwise.
        seed: seed for FAISS k-means.

    Returns:
        The trained, filled ``faiss.Index`` with ``ntotal == sum(n_i)``.

    Raises:
        InvalidIndexFactoryError: invalid factory, or training needed and
            ``train_vectors`` missing or too few (with the numbers).
        ConfigError: a chunk or the training sample has the wrong shape.
    """
    index = _instantiate(spec.factory, dim)
    if not index.is_trained:
        if train_vectors is None:
            raise InvalidIndexFactoryError(
                f"index factory {spec.factory!r} needs training "
                f"(>= {_training_centroids(index)} vectors) but no train_vectors were given"
            )
        _train(index, _as_vectors(train_vectors, dim, "training vectors"), spec, dim, seed)
    for chunk in chunks:
        x = _as_vectors(chunk, dim, "database vectors")
        for start in range(0, x.shape[0], ADD_CHUNK_ROWS):
            index.add(x[start : start + ADD_CHUNK_ROWS])
    apply_search_params(index, spec)
    return index


# --------------------------------------------------------------------------- out-of-core builds

#: Default training points per centroid of the largest k-means an index trains
#: (``nlist`` for an IVF, 256 per PQ sub-quantiser), used by
#: :func:`default_training_sample_size`. FAISS warns below 39
#: (:data:`FAISS_POINTS_PER_CENTROID`) and subsamples above 256; the FAISS wiki
#: ("Guidelines to choose an index") advises 30..256 x nlist. Training time grows
#: linearly with the sample, recall hardly at all: on 1,000,000 x 320 clustered
#: vectors (``benchmarks/out_of_core.py --n 1000000 --nlist 1024 --specs IVF1024,SQ8
#: --points-per-centroid P``, results/out_of_core_sample_sweep_1M.txt) IVF1024,SQ8 at
#: nprobe 64 had recall@10 0.976 / 0.975 / 0.975 / 0.979 for P = 39 / 64 / 128 /
#: 256, while sample + training took 13 / 6 / 36 / 78 s (shared machine, +-2x). 64
#: keeps a margin over FAISS's warning threshold at 1/4 of the largest useful cost.
TRAIN_POINTS_PER_CENTROID = 64

#: Floor of the default training sample: 65,536 rows (= FAISS's PQ training cap of
#: 256 points x 256 centroids) whatever the centroid count, so that a scalar
#: quantiser, which learns each dimension's range from the sample, and the PQ of an
#: IVF with a small nlist see enough vectors.
_MIN_DEFAULT_TRAIN_SAMPLE = 65_536

#: One on-disk shard's inverted lists take at most 1/4 of the memory budget.
_ONDISK_SHARD_BUDGET_FRACTION = 4


def default_memory_budget_bytes() -> int:
    """Memory the inverted lists of :func:`build_out_of_core` may take: half of physical RAM.

    Half leaves room for the trained quantiser, one chunk, the training sample and
    the rest of the process, and for a server that maps the previous version while
    a new one is built on the same machine.

    Returns:
        Bytes (``os.sysconf`` page size x physical pages / 2; 8 GiB where the
        platform does not report physical memory).
    """
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30
    return max(1, total // 2)


def default_training_sample_size(spec: IndexSpec, dim: int, n_total: int) -> int:
    """Training rows :func:`build_out_of_core` draws when no ``sample_size`` is given.

    Policy: ``min(n_total, max(TRAIN_POINTS_PER_CENTROID * c, 65,536))`` where
    ``c`` is :func:`min_training_vectors` (``nlist`` for an IVF, 256 for 8-bit PQ,
    1 for a scalar quantiser), and 0 for indexes that need no training (Flat,
    HNSW). With the default of 64 points per centroid this is
    ``max(64 * nlist, 65,536)`` rows: 524,288 for IVF8192 (671 MB of float32 at
    dim 320), well under the 256 x nlist above which FAISS k-means subsamples
    anyway. See :data:`TRAIN_POINTS_PER_CENTROID` for the measurements.

    Args:
        spec: index spec (valid at ``dim``).
        dim: embedding dimension.
        n_total: database vectors, >= 1.

    Returns:
        Sample size in rows, in ``[0, n_total]``.

    Raises:
        InvalidIndexFactoryError: the factory string is invalid at ``dim``.
    """
    centroids = min_training_vectors(spec, dim)
    if centroids == 0:
        return 0
    per_centroid = max(FAISS_POINTS_PER_CENTROID, TRAIN_POINTS_PER_CENTROID)
    return min(n_total, max(per_centroid * centroids, _MIN_DEFAULT_TRAIN_SAMPLE))


ChunkSource = Callable[[], Iterable[np.ndarray]] | Iterable[np.ndarray]
"""Vectors streamed in row order: a function returning a fresh iterable of float
``[n_i, dim]`` arrays on each call (e.g. a generator function reading shards from
disk), or a re-iterable collection of arrays such as a list. A one-shot iterator
(a generator object) is rejected: out-of-core builds read the chunks twice."""


def _chunk_iterable(chunks: ChunkSource) -> Iterable[np.ndarray]:
    """One pass over ``chunks`` (calls it when it is a function)."""
    if callable(chunks):
        return chunks()
    if isinstance(chunks, Iterator) or not isinstance(chunks, Iterable):
        raise ConfigError(
            "chunks must be a function returning a fresh iterable of arrays (or a list of arrays): "
            f"out-of-core builds read them twice, and {type(chunks).__name__} can be read only once"
        )
    return chunks


def _iter_chunks(chunks: ChunkSource, n_total: int, dim: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first_row, chunk)`` over one pass, checking shapes and the row count.

    Holds no reference to a chunk once the consumer asks for the next one, so at
    most one chunk is alive if the consumer drops its own reference too.

    Raises:
        ConfigError: a chunk is not a 2-D float array of width ``dim``, or the
            chunks hold more or fewer than ``n_total`` rows.
    """
    start = 0
    number = -1
    # No enumerate(): its reused result tuple would keep the previous chunk alive
    # while the source makes the next one.
    for chunk in _chunk_iterable(chunks):
        number += 1
        arr = np.asarray(chunk)
        del chunk
        if arr.ndim != 2:
            raise ConfigError(f"chunk {number} must be a 2-D array [n, dim], got shape {arr.shape}")
        if arr.shape[1] != dim:
            raise ConfigError(f"chunk {number} has vectors of dim {arr.shape[1]}, expected {dim}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"chunk {number} must be floating point, got dtype {arr.dtype}")
        if start + arr.shape[0] > n_total:
            raise ConfigError(
                f"chunks hold more than n_total={n_total} vectors (chunk {number} ends at row {start + arr.shape[0]})"
            )
        yield start, arr
        start += arr.shape[0]
        del arr
    if start != n_total:
        raise ConfigError(f"chunks hold {start} vectors but n_total is {n_total}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def training_sample(
    chunks: ChunkSource,
    n_total: int,
    dim: int,
    sample_size: int,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Draws a seeded, uniform sample of rows from vectors streamed in chunks.

    The rows are chosen before reading, as ``sort(numpy.random.default_rng(seed)
    .choice(n_total, sample_size, replace=False))`` (every row equally likely, no
    row twice), then gathered in one pass, so only the sample and one chunk are in
    memory. These are exactly the rows :func:`build` trains on for the same
    ``seed`` and ``train_sample``, which makes an out-of-core build reproduce an
    in-memory one.

    Args:
        chunks: the database in row order (see :data:`ChunkSource`); read once.
        n_total: rows the chunks hold, >= 1.
        dim: embedding dimension, >= 1.
        sample_size: rows to draw, >= 1; all rows (in order) when >= ``n_total``.
        seed: seed of the row choice.

    Returns:
        float32 ``[min(sample_size, n_total), dim]``, the sampled rows in database
        order.

    Raises:
        ConfigError: a non-positive size, a chunk of the wrong shape or dtype, or
            chunks holding other than ``n_total`` rows.
    """
    n_total = _positive_int("n_total", n_total)
    dim = _positive_int("dim", dim)
    sample_size = _positive_int("sample_size", sample_size)
    chosen = _sample_rows(n_total, sample_size, seed)
    rows = np.arange(n_total, dtype=np.int64) if chosen is None else chosen
    out = np.empty((rows.shape[0], dim), dtype=np.float32)
    filled = 0
    for start, x in _iter_chunks(chunks, n_total, dim):
        end = int(np.searchsorted(rows, start + x.shape[0], side="left"))
        if end > filled:
            out[filled:end] = x[rows[filled:end] - start]
        filled = end
        del x
    return out


@dataclass(frozen=True)
class OutOfCoreBuild:
    """What :func:`build_out_of_core` wrote.

    Attributes:
        path: the FAISS index file.
        ivfdata_path: the on-disk inverted lists beside it (``<stem>.ivfdata``),
            or ``None`` when the lists are inside ``path``.
        ntotal: vectors in the index (= ``n_total``).
        train_rows: rows of the training sample (0 when the index needs no training).
        shards: per-shard indexes merged into the on-disk lists (0 when in RAM).
    """

    path: Path
    ivfdata_path: Path | None
    ntotal: int
    train_rows: int
    shards: int

    @property
    def ondisk(self) -> bool:
        """Whether the inverted lists live in :attr:`ivfdata_path`."""
        return self.ivfdata_path is not None


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def build_out_of_core(
    chunks: ChunkSource,
    n_total: int,
    dim: int,
    spec: IndexSpec,
    path: str | os.PathLike[str],
    *,
    sample_size: int | None = None,
    seed: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
    ondisk: bool | None = None,
    memory_budget_bytes: int | None = None,
    on_rows: Callable[[int], object] | None = None,
) -> OutOfCoreBuild:
    """Builds an index file from vectors streamed in chunks, never holding them all.

    Stages:

    1. **Sample** (indexes that need training: IVF, PQ, SQ, OPQ): one pass over
       ``chunks`` gathers a seeded uniform sample (:func:`training_sample`) of
       ``sample_size`` rows (default :func:`default_training_sample_size`).
    2. **Train** on it, seeded as :func:`build` does (FAISS k-means ``seed``,
       polysemous training off). Flat and HNSW need no training: stages 1-2 are
       skipped and the filled index itself holds every vector (Flat: ``4 * dim``
       bytes per vector, HNSW32: ~+256 bytes of links), so for them this only
       saves the database copy that :func:`build` needs.
    3. **Add** a second pass of ``chunks`` in row order (row i = i-th vector),
       :data:`ADD_CHUNK_ROWS` per ``index.add`` call, either

       * into the index in RAM, written to ``path`` at the end (peak memory: the
         trained index + the inverted lists, ``n_total * (code_size + 8)`` bytes,
         + one chunk + the sample while training), or
       * **on disk** (IVF only): into per-shard copies of the trained index, each
         holding at most 1/4 of ``memory_budget_bytes`` of codes, written to a
         work directory and merged with FAISS's ``merge_ondisk``
         (``faiss/contrib/ondisk.py``: ``OnDiskInvertedLists.merge_from_multiple``)
         into ``<stem>.ivfdata`` beside ``path``. Peak memory: the trained index +
         one shard + one chunk; the merge maps the shard files and the output
         (page cache, not heap). FAISS prints one line, ``resizing <file> to <n>
         bytes``, to stdout while it sizes the ``.ivfdata`` file.

    ``ondisk=None`` goes on disk when the IVF's inverted lists,
    ``n_total * (code_size + 8 id bytes)``, exceed ``memory_budget_bytes``.

    Files are written atomically and durably: each to a temporary name in
    ``path``'s directory, fsynced, then ``os.replace``-d into place (``.ivfdata``
    first), and the directory fsynced. The index file records the ``.ivfdata``
    file's absolute path, but :func:`read` opens it from the index file's own
    directory (FAISS ``IO_FLAG_ONDISK_SAME_DIR``), so the directory holding both
    may be moved or renamed afterwards; keep the two files together and do not
    rename the ``.ivfdata`` file.

    Args:
        chunks: float ``[n_i, dim]`` arrays in row order, L2-normalised (not
            re-normalised here), read twice (see :data:`ChunkSource`); any float
            dtype (float16 is converted per chunk).
        n_total: total rows in ``chunks``, >= 1; checked on both passes.
        dim: embedding dimension, >= 1.
        spec: index spec, e.g. from :func:`validate_factory` or :func:`auto_spec`;
            its search parameters are stored in the file.
        path: the index file to write (its directory must exist); an existing
            file is replaced.
        sample_size: training rows; ``None`` = :func:`default_training_sample_size`.
        seed: seed of the training sample and of FAISS k-means.
        work_dir: where per-shard index files go (a fresh subdirectory, removed
            afterwards); ``None`` = ``path``'s directory. Needs about the final
            ``.ivfdata`` size free.
        ondisk: ``True`` forces on-disk inverted lists, ``False`` forbids them,
            ``None`` decides from the budget.
        memory_budget_bytes: bytes the inverted lists may take in RAM; ``None`` =
            :func:`default_memory_budget_bytes` (half of physical RAM).
        on_rows: called with the number of rows after each chunk is added (for a
            progress bar).

    Returns:
        The files written and the sizes used (:class:`OutOfCoreBuild`).

    Raises:
        InvalidIndexFactoryError: invalid factory at ``dim``; ``ondisk=True``
            for an index without inverted lists; fewer rows (``n_total`` or
            ``sample_size``) than the index needs to train (with the numbers).
        ConfigError: a non-positive size or budget, a chunk of the wrong shape or
            dtype, chunks holding other than ``n_total`` rows, or a one-shot
            iterator for ``chunks``.
        OSError: a file cannot be written (nothing is left at ``path`` then).
    """
    n_total = _positive_int("n_total", n_total)
    dim = _positive_int("dim", dim)
    if sample_size is not None:
        sample_size = _positive_int("sample_size", sample_size)
    budget = memory_budget(memory_budget_bytes)
    if ondisk is not None and not isinstance(ondisk, bool):
        raise ConfigError(f"ondisk must be True, False or None, got {ondisk!r}")
    if not callable(chunks):
        _chunk_iterable(chunks)  # rejects a one-shot iterator before any work
    out = Path(path)
    index = _instantiate(spec.factory, dim)
    use_ondisk = builds_on_disk(index, spec, n_total, ondisk, budget)
    train_rows = train_on_sample(index, chunks, n_total, dim, spec, sample_size=sample_size, seed=seed)
    if use_ondisk:
        shards = _add_ondisk(index, chunks, n_total, dim, spec, out, work_dir, budget, on_rows)
        ivfdata: Path | None = out.with_suffix(".ivfdata")
    else:
        add_in_ram(index, _arrays(_iter_chunks(chunks, n_total, dim)), on_rows)
        apply_search_params(index, spec)
        write(index, out)
        shards, ivfdata = 0, None
    return OutOfCoreBuild(path=out, ivfdata_path=ivfdata, ntotal=n_total, train_rows=train_rows, shards=shards)


# -- the steps of an out-of-core build, shared with esmsearch.indexer.faiss_stage ---------------


def memory_budget(memory_budget_bytes: int | None) -> int:
    """Bytes the inverted lists may take in RAM: the argument, or :func:`default_memory_budget_bytes`.

    Raises:
        ConfigError: a budget that is not a positive integer.
    """
    if memory_budget_bytes is None:
        return default_memory_budget_bytes()
    return _positive_int("memory_budget_bytes", memory_budget_bytes)


def builds_on_disk(index: faiss.Index, spec: IndexSpec, n_total: int, ondisk: bool | None, budget: int) -> bool:
    """Whether ``index``'s inverted lists go on disk: ``ondisk``, or (None) when they exceed ``budget``.

    The lists take ``n_total * (code bytes + 8 id bytes)``.

    Raises:
        InvalidIndexFactoryError: ``ondisk=True`` for an index without inverted lists (IVF).
    """
    ivf = _extract_ivf(index)
    if ondisk and ivf is None:
        raise InvalidIndexFactoryError(
            f"index factory {spec.factory!r} has no inverted lists (IVF), so it cannot be built on disk"
        )
    if ondisk is not None:
        return ondisk
    return ivf is not None and n_total * (int(ivf.code_size) + _IVF_ID_BYTES) > budget


def train_on_sample(
    index: faiss.Index,
    chunks: ChunkSource,
    n_total: int,
    dim: int,
    spec: IndexSpec,
    *,
    sample_size: int | None = None,
    seed: int = 0,
) -> int:
    """Train ``index`` (in place) on a seeded sample of ``chunks``, if it needs training.

    The sample is :func:`training_sample` of ``sample_size`` rows (None =
    :func:`default_training_sample_size`, capped at ``n_total``); training is seeded
    with ``seed`` as :func:`build` does.

    Returns:
        The sample's rows (0 when ``index`` needs no training: Flat, HNSW).

    Raises:
        InvalidIndexFactoryError: fewer rows than the index needs to train (with the numbers).
        ConfigError: see :func:`training_sample`.
    """
    if index.is_trained:
        return 0
    need = _training_centroids(index)
    size = min(default_training_sample_size(spec, dim, n_total) if sample_size is None else sample_size, n_total)
    if size < need:
        raise InvalidIndexFactoryError(
            f"index factory {spec.factory!r} needs at least {need} training vectors "
            f"(FAISS recommends {FAISS_POINTS_PER_CENTROID * need}), got {size} "
            f"(sample of {n_total} database vectors); use a smaller nlist/PQ or 'Flat' for a database this small"
        )
    sample = training_sample(chunks, n_total, dim, size, seed=seed)
    _train(index, sample, spec, dim, seed)
    return int(sample.shape[0])


def _arrays(pairs: Iterator[tuple[int, np.ndarray]]) -> Iterator[np.ndarray]:
    """The arrays of ``(start, array)`` pairs, holding none of them once the consumer moves on."""
    for _start, x in pairs:
        yield x
        del x  # (a generator expression would keep the last one alive while the next is read)


def add_in_ram(index: faiss.Index, blocks: Iterable[np.ndarray], on_rows: Callable[[int], object] | None) -> None:
    """Add ``blocks`` (float ``[n_i, dim]``, in row order) to ``index`` in RAM, :data:`ADD_CHUNK_ROWS` per call.

    ``on_rows`` (progress) is called with each block's rows once it is added.
    """
    for x in blocks:
        for s in range(0, x.shape[0], ADD_CHUNK_ROWS):
            index.add(np.ascontiguousarray(x[s : s + ADD_CHUNK_ROWS], dtype=np.float32))
        if on_rows is not None:
            on_rows(x.shape[0])
        del x


def _add_ondisk(
    trained: faiss.Index,
    chunks: ChunkSource,
    n_total: int,
    dim: int,
    spec: IndexSpec,
    out: Path,
    work_dir: str | os.PathLike[str] | None,
    budget: int,
    on_rows: Callable[[int], object] | None,
) -> int:
    """Stage 3 of :func:`build_out_of_core` on disk; returns the number of shards merged."""
    from faiss.contrib.ondisk import merge_ondisk

    ivf = faiss.extract_index_ivf(trained)
    shard_rows = max(1, budget // _ONDISK_SHARD_BUDGET_FRACTION // (int(ivf.code_size) + _IVF_ID_BYTES))
    final_ivfdata = out.with_suffix(".ivfdata")
    tmp_ivfdata, tmp_index = _temp_name(final_ivfdata), _temp_name(out)
    try:
        work = Path(tempfile.mkdtemp(prefix=".esmsearch-shards-", dir=work_dir or out.parent))
    except OSError as exc:
        raise OSError(f"cannot create a shard work directory in {work_dir or out.parent}: {exc}") from exc
    shard_files: list[str] = []
    try:
        shard: Any = None

        def flush() -> None:
            name = str(work / f"shard-{len(shard_files):05d}.faiss")
            faiss.write_index(shard, name)
            shard_files.append(name)

        for start, x in _iter_chunks(chunks, n_total, dim):
            pos = 0
            while pos < x.shape[0]:
                if shard is None:
                    shard = faiss.clone_index(trained)
                take = min(x.shape[0] - pos, shard_rows - shard.ntotal)
                for s in range(pos, pos + take, ADD_CHUNK_ROWS):
                    e = min(s + ADD_CHUNK_ROWS, pos + take)
                    ids = np.arange(start + s, start + e, dtype=np.int64)
                    shard.add_with_ids(np.ascontiguousarray(x[s:e], dtype=np.float32), ids)
                pos += take
                if shard.ntotal >= shard_rows:
                    flush()
                    shard = None
            if on_rows is not None:
                on_rows(x.shape[0])
            del x
        if shard is not None:
            flush()
            shard = None
        merged = faiss.clone_index(trained)
        merge_ondisk(merged, shard_files, str(tmp_ivfdata))
        if merged.ntotal != n_total:  # pragma: no cover - FAISS invariant
            raise OSError(f"on-disk merge produced {merged.ntotal} vectors, expected {n_total}")
        # The file records this path; readers use IO_FLAG_ONDISK_SAME_DIR anyway.
        merged_ivf: Any = faiss.extract_index_ivf(merged)
        lists: Any = faiss.downcast_InvertedLists(merged_ivf.invlists)
        lists.filename = str(final_ivfdata.resolve())
        apply_search_params(merged, spec)
        faiss.write_index(merged, str(tmp_index))
        del lists, merged_ivf, merged  # unmaps the .ivfdata
        _fsync_path(tmp_ivfdata)
        _fsync_path(tmp_index)
        os.replace(tmp_ivfdata, final_ivfdata)
        os.replace(tmp_index, out)
        _fsync_dir(out.parent)
    except RuntimeError as exc:
        raise OSError(f"cannot build on-disk inverted lists for {os.fspath(out)!r}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in (tmp_ivfdata, tmp_index):
            leftover.unlink(missing_ok=True)
    return len(shard_files)


def ondisk_ivfdata_path(index: faiss.Index) -> Path | None:
    """The ``.ivfdata`` file whose inverted lists ``index`` maps, or ``None``.

    For an index from :func:`build_out_of_core` with on-disk lists read by
    :func:`read`, this is ``<index file's directory>/<stem>.ivfdata`` (so
    :mod:`esmsearch.store` can checksum it); ``None`` for any index whose lists,
    if any, are inside the index file.
    """
    ivf = _extract_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists):
        return Path(lists.filename)
    return None


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Sets ``spec.nprobe`` / ``spec.ef_search`` on ``index`` (in place).

    Uses ``faiss.ParameterSpace``, which reaches through OPQ/refine wrappers.
    ``ef_search`` sets ``efSearch`` of an HNSW index, or ``quantizer_efSearch`` of
    an IVF with an HNSW coarse quantiser. ``None`` fields leave the index as is.
    Call this after :func:`read` too: it is how the manifest's values win.

    Raises:
        InvalidIndexFactoryError: the index lacks the parameter (``nprobe`` on a
            non-IVF index, ``ef_search`` without HNSW).
    """
    if spec.nprobe is None and spec.ef_search is None:
        return
    names = _search_parameter_names(index)
    ps = faiss.ParameterSpace()
    if spec.nprobe is not None:
        if "nprobe" not in names:
            raise InvalidIndexFactoryError(f"nprobe={spec.nprobe} cannot be set: index {spec.factory!r} has no IVF")
        ps.set_index_parameter(index, "nprobe", spec.nprobe)
    if spec.ef_search is not None:
        name = "efSearch" if "efSearch" in names else "quantizer_efSearch"
        if name not in names:
            raise InvalidIndexFactoryError(
                f"ef_search={spec.ef_search} cannot be set: index {spec.factory!r} has no HNSW"
            )
        ps.set_index_parameter(index, name, spec.ef_search)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Finds the ``k`` nearest database rows of each query by inner product.

    Args:
        index: a filled index (from :func:`build` or :func:`read`).
        queries: float32 [q, dim], L2-normalised; a 1-D [dim] vector is taken as
            one query (the result is still 2-D).
        k: hits per query, >= 1; may exceed ``index.ntotal`` (the tail is padded).

    Returns:
        ``(scores, rows)``: float32 [q, k] cosine scores, descending (higher is
        closer; approximate for PQ/SQ codes), ``-inf`` where there is no hit; and
        int64 [q, k] database rows, ``-1`` where there is no hit.

    Raises:
        ConfigError: ``k`` < 1 or ``queries`` of the wrong shape.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    q = _as_vectors(q, index.d, "queries")
    if q.shape[0] == 0:
        return np.empty((0, int(k)), np.float32), np.empty((0, int(k)), np.int64)
    scores, rows = index.search(q, int(k))
    scores = np.asarray(scores, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    scores[rows < 0] = -np.inf
    return scores, rows


#: Candidate vector elements gathered at once by :func:`rerank` (8 Mi float32 =
#: 32 MiB): queries are re-ranked in blocks of ``max(1, this // (c * dim))``, so a
#: batch of 256 queries with 100 candidates at dim 1,280 takes 64 queries per block.
_RERANK_BLOCK_ELEMENTS = 8 << 20


def rerank(queries: np.ndarray, rows: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-scores candidate rows exactly against the stored vectors and keeps the best ``k``.

    The usual second stage of compressed (PQ) indexes: search for ``c > k``
    candidates, then rank them by exact inner product with the uncompressed
    vectors (FAISS ``IndexRefine`` does the same with vectors held in RAM; here they
    can be a read-only memory map of the index's stored embeddings, of which only
    the candidate rows are read, in ascending row order). Jegou et al. 2011
    ("Searching in one billion vectors: re-rank with source coding") describe the
    scheme.

    Args:
        queries: float32 ``[q, dim]``, L2-normalised.
        rows: int64 ``[q, c]`` candidate rows, e.g. ``search(index, queries, c)[1]``;
            ``-1`` entries are ignored.
        vectors: float ``[n, dim]`` database vectors, L2-normalised (a
            ``numpy.load(..., mmap_mode="r")`` array is fine). float32 rows are used
            as stored; rows of any other dtype (float16 storage) are cast to float32
            and L2-normalised again, as :func:`esmsearch.store.unit_float32` does, so
            the score is the cosine of the query and the float16-rounded vector.
        k: hits per query, >= 1.

    Returns:
        ``(scores, rows)``: float32 ``[q, k]`` exact cosine scores (float32
        arithmetic), descending (higher is closer), ``-inf`` where there is no hit;
        int64 ``[q, k]`` rows, ``-1`` where there is no hit (fewer than ``k`` valid
        candidates).

    Raises:
        ConfigError: ``k`` < 1, shapes that do not match, or a candidate row
            outside ``[0, n)``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if vectors.ndim != 2:
        raise ConfigError(f"stored vectors must be a 2-D array [n, dim], got shape {vectors.shape}")
    q = _as_vectors(queries, int(vectors.shape[1]), "queries")
    cand = np.asarray(rows)
    if cand.ndim != 2 or cand.shape[0] != q.shape[0] or not np.issubdtype(cand.dtype, np.integer):
        raise ConfigError(f"candidate rows must be an integer array [{q.shape[0]}, c], got {cand.dtype} {cand.shape}")
    if cand.size and int(cand.max()) >= vectors.shape[0]:
        raise ConfigError(f"candidate row {int(cand.max())} is outside the {vectors.shape[0]} stored vectors")
    k = int(k)
    renormalise = vectors.dtype != np.float32
    out_scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    out_rows = np.full((q.shape[0], k), -1, dtype=np.int64)
    step = max(1, _RERANK_BLOCK_ELEMENTS // max(1, cand.shape[1] * q.shape[1]))
    for lo in range(0, q.shape[0], step):
        block = cand[lo : lo + step].astype(np.int64)  # (b, c)
        valid = block >= 0
        unique, inverse = np.unique(block[valid], return_inverse=True)  # sorted: sequential reads
        if unique.size == 0:
            continue
        gathered = np.ascontiguousarray(vectors[unique], dtype=np.float32)  # (u, dim)
        if renormalise:
            norms = np.linalg.norm(gathered, axis=1, keepdims=True)
            gathered /= np.maximum(norms, np.float32(1e-12))
        slot = np.zeros(block.shape, dtype=np.int64)  # invalid candidates score unique[0], then -inf
        slot[valid] = inverse
        # Batched matrix-vector products (b, c, dim) @ (b, dim, 1): several times faster
        # than an einsum over flattened pairs.
        scores = np.matmul(gathered[slot], q[lo : lo + block.shape[0], :, None])[..., 0]  # (b, c)
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        top = min(k, block.shape[1])
        best = order[:, :top]
        out_scores[lo : lo + block.shape[0], :top] = np.take_along_axis(scores, best, axis=1)
        out_rows[lo : lo + block.shape[0], :top] = np.take_along_axis(block, best, axis=1)
    out_rows[np.isneginf(out_scores)] = -1
    return out_scores, out_rows


def search_reranked(
    index: faiss.Index, queries: np.ndarray, k: int, vectors: np.ndarray, k_factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` for ``k_factor * k`` candidates, then :func:`rerank` them to ``k``.

    How :class:`esmsearch.store.Index` searches an index with lossy codes
    (:func:`has_lossy_codes`): the compressed index proposes candidates, the
    stored vectors score them. Every returned score is the exact cosine of the
    query and the stored vector (see :func:`rerank` for float16 storage), and a hit
    the codes ranked at most ``max(k_factor * k, RERANK_MIN_CANDIDATES)``-th can rise
    into the top ``k``.

    FAISS's own ``IndexRefineFlat`` is not used: it keeps every vector in its
    refinement index, in RAM or inside the index file (a second copy of
    ``embeddings.npy`` on disk), and cannot score against a memory-mapped ``.npy``
    file or float16 storage; :func:`rerank` reads only the candidate rows.

    Args:
        index: a filled index.
        queries: float32 ``[q, dim]``, L2-normalised (1-D: one query).
        k: hits per query, >= 1.
        vectors: ``[index.ntotal, dim]`` stored vectors (float32 or float16; a
            memory map is fine), row ``i`` = index row ``i``.
        k_factor: candidates per hit, >= 1. The candidate count is
            ``max(k_factor * k, RERANK_MIN_CANDIDATES)`` (:data:`RERANK_MIN_CANDIDATES`),
            at most ``ntotal`` and never below ``k``.

    Returns:
        ``(scores, rows)`` as :func:`search` returns them: float32 ``[q, k]`` exact
        cosine scores, descending, ``-inf`` where there is no hit; int64 ``[q, k]``
        rows, ``-1`` where there is no hit.

    Raises:
        ConfigError: ``k`` or ``k_factor`` < 1, ``queries`` of the wrong shape, or
            ``vectors`` whose shape does not match the index.
    """
    if isinstance(k_factor, bool) or not isinstance(k_factor, (int, np.integer)) or k_factor < 1:
        raise ConfigError(f"k_factor must be a positive integer, got {k_factor!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if vectors.ndim != 2 or vectors.shape != (index.ntotal, index.d):
        raise ConfigError(f"stored vectors are {vectors.shape}, the index has {(index.ntotal, index.d)}")
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    candidates = max(int(k), min(max(int(k) * int(k_factor), RERANK_MIN_CANDIDATES), int(index.ntotal)))
    q = _as_vectors(q, index.d, "queries")
    _, rows = search(index, q, candidates)
    return rerank(q, rows, vectors, int(k))


def write(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Writes ``index`` to ``path`` with ``faiss.write_index``, atomically and durably.

    The file is written under a temporary name in the same directory, fsynced and
    ``os.replace``-d onto ``path`` (then the directory is fsynced), so readers see
    the old file or the complete new one, never a partial one. For an index with
    on-disk inverted lists only the list offsets and the ``.ivfdata`` path are
    written; the ``.ivfdata`` file must stay beside it (see
    :func:`build_out_of_core`).

    Raises:
        OSError: the file cannot be written (FAISS's error chained); nothing is
            left behind then.
    """
    p = Path(path)
    tmp = _temp_name(p)
    try:
        faiss.write_index(index, os.fspath(tmp))
        _fsync_path(tmp)
        os.replace(tmp, p)
    except RuntimeError as exc:
        raise OSError(f"cannot write FAISS index to {os.fspath(path)!r}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(p.parent)


def _map_ondisk_lists(index: faiss.Index, directory: Path) -> None:
    """Maps the on-disk inverted lists of ``index`` (read with ``IO_FLAG_SKIP_IVF_DATA``)
    from ``directory``, whatever directory the file recorded."""
    ivf = _extract_ivf(index)
    if ivf is None:
        return
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.filename = str(directory / Path(lists.filename).name)
        lists.do_mmap()


def read(path: str | os.PathLike[str], *, mmap: bool = False) -> faiss.Index:
    """Reads an index written by :func:`write` or :func:`build_out_of_core`.

    With ``mmap``, the bulk of the index is memory-mapped read-only instead of
    copied to the heap, so opening a new version beside a live one (a reload)
    does not double RAM, and processes serving the same file share its page
    cache. By family, with FAISS 1.15 (``tests/test_vector_index.py`` checks, for
    each, that the file is mapped and that results equal a normal read):

    * ``Flat``, ``PQ``/``SQ`` without IVF (``IndexFlatCodes``) and IVF with its
      inverted lists inside the file (``IVF..,Flat/SQ8/PQ``, ``OPQ..,IVF..``):
      ``IO_FLAG_MMAP_IFC`` (512), FAISS's zero-copy reader; codes and lists stay
      in the mapped file (measured: +0.3 MB of heap to open a 384 MB Flat file,
      +2 MB for a 387 MB IVF256,Flat). ``IO_FLAG_MMAP`` is not used: it maps
      nothing of a Flat index (which is read into RAM), and it implies
      ``IO_FLAG_SKIP_IVF_DATA``, which leaves on-disk lists unmapped (FAISS 1.15
      then crashes with SIGSEGV at the first search).
    * ``HNSW``: also ``IO_FLAG_MMAP_IFC``, which maps the stored vectors; FAISS
      cannot map the graph, so its neighbour lists are read into RAM (measured:
      82 of 466 MB for HNSW32 at 300,000 x 320).
    * IVF with on-disk lists (a ``.ivfdata`` file from :func:`build_out_of_core`):
      the small index file is read (mapped with ``mmap``) and the lists are
      always memory-mapped (``OnDiskInvertedLists``), in both modes.

    On-disk lists are opened read-only from **the index file's own directory**
    (by the recorded file's name), not from the absolute path recorded at build
    time, so an index directory can be moved or renamed. This is what FAISS's
    ``IO_FLAG_ONDISK_SAME_DIR`` does, done here instead because that flag prints
    to stdout and does not work with the zero-copy reader: the file is read with
    ``IO_FLAG_SKIP_IVF_DATA`` and the lists are mapped afterwards. A file whose
    lists are inside it rejects that flag, and is then read again without it
    (the first attempt stops after the coarse quantiser).

    Args:
        path: index file.
        mmap: memory-map the index. **Read-only use only**: adding vectors to a
            mapped index aborts the process inside FAISS (``MaybeOwnedVector``
            assertion), and the file must not be rewritten in place while mapped
            (:func:`write` replaces it by rename, which is safe).

    Returns:
        The index. Its stored search parameters are FAISS's serialised ones;
        call :func:`apply_search_params` with the manifest's spec.

    Raises:
        FileNotFoundError: no file at ``path``.
        OSError: the file is not a FAISS index, or its ``.ivfdata`` file is missing
            or unreadable (FAISS's error chained).
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no FAISS index file at {p!r}")
    flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    try:
        try:
            index = faiss.read_index(p, flags | faiss.IO_FLAG_SKIP_IVF_DATA)
        except RuntimeError as exc:
            if "could not load ArrayInvertedLists" not in str(exc):
                raise
            return faiss.read_index(p, flags)  # the lists are inside the file
        _map_ondisk_lists(index, Path(p).resolve().parent)
        return index
    except RuntimeError as exc:
        raise OSError(f"cannot read FAISS index {p!r}: {exc}") from exc
