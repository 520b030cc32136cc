"""Typed, immutable results returned by :class:`esmsearch.client.SearchClient`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esmsearch.v1 import search_pb2

__all__ = ["DecoySettings", "Embeddings", "Hit", "IndexInfo", "QueryResult", "ReloadResult", "RequestLimits"]


@dataclass(frozen=True)
class Hit:
    """One database sequence found for a query.

    Attributes:
        target_id: record id of the database sequence (first word of its FASTA header).
        description: rest of the database sequence's FASTA header (may be empty).
        cosine_score: cosine similarity of query and target embeddings, in [-1, 1],
            higher = closer (float32 precision).
        rank: 1-based rank within the query's hits, by descending cosine_score.
        target_length: length of the database sequence in residues.
        evalue: E-value: the expected number of database sequences unrelated to the
            query scoring at least ``cosine_score`` against it, in [0, database size];
            lower = more significant (float32 precision). ``None`` when the served
            index has no decoys (:attr:`IndexInfo.decoys` is ``None``).
    """

    target_id: str
    description: str
    cosine_score: float
    rank: int
    target_length: int
    evalue: float | None = None

    @classmethod
    def from_proto(cls, msg: search_pb2.Hit) -> Hit:
        # Hot path (one call per hit: 800,000 for 400 queries at k = 2,000): the frozen
        # dataclass __init__ sets each field through object.__setattr__; filling the
        # instance dict directly builds the same object (== and hash agree) in half the time.
        hit = object.__new__(cls)
        hit.__dict__.update(
            target_id=msg.target_id,
            description=msg.target_description,
            cosine_score=msg.cosine_score,
            rank=msg.rank,
            target_length=msg.target_length,
            evalue=msg.evalue if msg.HasField("evalue") else None,
        )
        return hit


@dataclass(frozen=True)
class QueryResult:
    """The hits of one query.

    Attributes:
        query_id: the query's record id (FASTA id, mapping key, or ``query_<n>``
            for a plain list of sequences, 1-based).
        query_length: query length in residues.
        index_version: version of the index that answered (same for every query of
            one request).
        hits: hits by descending cosine_score (rank 1 first); at most ``k``.
    """

    query_id: str
    query_length: int
    index_version: str
    hits: list[Hit]

    @classmethod
    def from_proto(cls, msg: search_pb2.QueryResult, index_version: str) -> QueryResult:
        return cls(
            query_id=msg.query_id,
            query_length=int(msg.query_length),
            index_version=index_version,
            hits=[Hit.from_proto(h) for h in msg.hits],
        )


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits the server enforces (see ``RequestLimits`` in search.proto).

    Attributes:
        max_k: largest accepted ``k``.
        max_queries_per_request: most queries in one Search call.
        max_residues_per_query: longest accepted query, in residues.
        max_residues_per_request: most residues summed over one Search call.
        max_hits_per_request: most hits (queries x k) one Search call may ask for;
            0 = not reported (a server older than this field).
    """

    max_k: int
    max_queries_per_request: int
    max_residues_per_query: int
    max_residues_per_request: int
    max_hits_per_request: int = 0

    @classmethod
    def from_proto(cls, msg: search_pb2.RequestLimits) -> RequestLimits:
        return cls(
            max_k=int(msg.max_k),
            max_queries_per_request=int(msg.max_queries_per_request),
            max_residues_per_query=int(msg.max_residues_per_query),
            max_residues_per_request=int(msg.max_residues_per_request),
            max_hits_per_request=int(msg.max_hits_per_request),
        )


@dataclass(frozen=True)
class DecoySettings:
    """The decoys behind an index's E-values (``DecoySettings`` in search.proto).

    Attributes:
        count: number of decoys (shuffled database sequences).
        seed: seed of their sample and shuffles.
        method: how they were made (e.g. ``"shuffled_database_sample"``).
        block_size: decoys per block whose maximum each query's extreme-value null describes.
        shape: the index's GEV shape of those block maxima (of ``-ln(1 - cosine)``).
    """

    count: int
    seed: int
    method: str
    block_size: int
    shape: float = 0.0

    @classmethod
    def from_proto(cls, msg: search_pb2.DecoySettings) -> DecoySettings:
        return cls(
            count=int(msg.count),
            seed=int(msg.seed),
            method=msg.method,
            block_size=int(msg.block_size),
            shape=float(msg.shape),
        )


@dataclass(frozen=True)
class IndexInfo:
    """Description of the served index and server (see ``IndexInfo`` in search.proto).

    Attributes:
        model_name: ESM-2 model name recorded in the index manifest.
        checkpoint_sha256: hex sha256 of the model checkpoint the index was built with.
        layer: pooled representation layer.
        pooling: pooling of residue representations (e.g. ``"mean"``).
        normalisation: vector normalisation (e.g. ``"l2"``).
        metric: FAISS metric (e.g. ``"inner_product"``).
        dim: embedding dimension.
        count: number of database sequences.
        index_version: version of the served index.
        index_factory: FAISS factory string (``"Flat"`` = exact search).
        built_at: build time, ISO 8601 UTC.
        tool_version: esmsearch version that built the index.
        source_fasta_sha256: hex sha256 of the database FASTA file.
        server_version: esmsearch version of the server.
        limits: the server's request limits.
        reload_error: why the server's last attempt to load a new version of its
            index root failed (the version above keeps serving); ``""`` if none.
        decoys: the decoys behind the index's E-values; ``None`` when it has none
            (hits then carry no E-value and ``max_evalue`` is refused).
    """

    model_name: str
    checkpoint_sha256: str
    layer: int
    pooling: str
    normalisation: str
    metric: str
    dim: int
    count: int
    index_version: str
    index_factory: str
    built_at: str
    tool_version: str
    source_fasta_sha256: str
    server_version: str
    limits: RequestLimits
    reload_error: str = ""
    decoys: DecoySettings | None = None

    @property
    def has_evalues(self) -> bool:
        """Whether hits of the served index carry E-values."""
        return self.decoys is not None

    @classmethod
    def from_proto(cls, msg: search_pb2.IndexInfo) -> IndexInfo:
        return cls(
            model_name=msg.model_name,
            checkpoint_sha256=msg.checkpoint_sha256,
            layer=int(msg.layer),
            pooling=msg.pooling,
            normalisation=msg.normalisation,
            metric=msg.metric,
            dim=int(msg.dim),
            count=int(msg.count),
            index_version=msg.index_version,
            index_factory=msg.index_factory,
            built_at=msg.built_at,
            tool_version=msg.tool_version,
            source_fasta_sha256=msg.source_fasta_sha256,
            server_version=msg.server_version,
            limits=RequestLimits.from_proto(msg.limits),
            reload_error=msg.reload_error,
            decoys=DecoySettings.from_proto(msg.decoys) if msg.HasField("decoys") else None,
        )


@dataclass(frozen=True)
class ReloadResult:
    """Outcome of :meth:`SearchClient.reload_index` (``ReloadIndexResponse`` in search.proto).

    Attributes:
        reloaded: the call swapped in a new index version.
        index_version: version serving requests that start from now on.
        previous_version: version served before the call (== ``index_version`` if
            not reloaded).
    """

    reloaded: bool
    index_version: str
    previous_version: str

    @classmethod
    def from_proto(cls, msg: search_pb2.ReloadIndexResponse) -> ReloadResult:
        return cls(
            reloaded=bool(msg.reloaded),
            index_version=msg.index_version,
            previous_version=msg.previous_version,
        )


@dataclass(frozen=True)
class Embeddings:
    """Query embeddings computed by the server (``EmbedResponse`` in search.proto).

    Attributes:
        query_ids: the queries' ids, in input order.
        vectors: float32 ``[n_queries, dim]``, each row L2-normalised (unit length),
            so the inner product of two rows is their cosine similarity.
        model_name: model recorded in the served index's manifest.
        checkpoint_sha256: hex sha256 of the model checkpoint.
        layer: mean-pooled representation layer.
        index_version: index version being served when the vectors were computed.
    """

    query_ids: list[str]
    vectors: np.ndarray
    model_name: str
    checkpoint_sha256: str
    layer: int
    index_version: str

    @classmethod
    def from_proto(cls, msg: search_pb2.EmbedResponse) -> Embeddings:
        vectors = np.zeros((len(msg.embeddings), msg.dim), dtype=np.float32)
        for i, emb in enumerate(msg.embeddings):
            vectors[i] = emb.values
        return cls(
            query_ids=[e.query_id for e in msg.embeddings],
            vectors=vectors,
            model_name=msg.model_name,
            checkpoint_sha256=msg.checkpoint_sha256,
            layer=int(msg.layer),
            index_version=msg.index_version,
        )
