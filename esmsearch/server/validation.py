"""Request validation and per-request limits, shared by the gRPC servicer and the HTTP API.

Every search request -- a gRPC ``SearchRequest``, a ``SearchStream`` message, an
``Embed`` or ``SearchByEmbedding`` request, or an HTTP ``POST /v1/search`` -- is checked
here before any model work is queued, so both interfaces refuse the same requests
with the same messages. A refusal is a :class:`esmsearch.server.rpc.Reject` carrying
its gRPC status code (INVALID_ARGUMENT for a malformed request, RESOURCE_EXHAUSTED
over a permanent limit), the offending query's record id and, for a bad residue, its
1-based position; :mod:`esmsearch.server.rpc` turns it into a gRPC status and
:mod:`esmsearch.server.httpapi` into an HTTP status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import grpc
import numpy as np

from esmsearch.errors import InvalidSequenceError
from esmsearch.protocol import DEFAULT_MAX_HITS_PER_REQUEST
from esmsearch.sequences import validate_sequence
from esmsearch.server.rpc import Reject
from esmsearch.v1 import search_pb2

if TYPE_CHECKING:
    from esmsearch.server.admission import AdmissionConfig
    from esmsearch.store import Index

__all__ = [
    "MAX_K",
    "MAX_QUERIES_PER_REQUEST",
    "MAX_QUERY_ID_BYTES",
    "MAX_QUERY_ID_CHARS",
    "MAX_RESIDUES_PER_QUERY",
    "MAX_RESIDUES_PER_REQUEST",
    "QueryLike",
    "RequestLimits",
    "check_count",
    "check_embeddings",
    "check_evalue_db_size",
    "check_ids",
    "check_k",
    "check_max_evalue",
    "check_queries",
    "id_problem",
]

#: Default largest ``k`` (hits per query). Larger values give INVALID_ARGUMENT.
MAX_K: Final = 1000
#: Default most queries in one Search request.
MAX_QUERIES_PER_REQUEST: Final = 1000
#: Default longest query in residues (titin, the longest known protein, has ~35,000).
MAX_RESIDUES_PER_QUERY: Final = 40_000
#: Default most residues in one Search request (about 3,000 average proteins).
MAX_RESIDUES_PER_REQUEST: Final = 1_000_000
#: Longest query id in characters (Unicode code points).
MAX_QUERY_ID_CHARS: Final = 256
#: Longest query id in bytes of UTF-8 (also checked; a 256-character id of 4-byte
#: characters would exceed it).
MAX_QUERY_ID_BYTES: Final = 1000


class QueryLike(Protocol):
    """A query as the checks read it: ``search_pb2.Query`` or anything with these two fields."""

    @property
    def query_id(self) -> str: ...

    @property
    def sequence(self) -> str: ...


@dataclass(frozen=True)
class RequestLimits:
    """Limits enforced on each Search request (``RequestLimits`` in search.proto).

    Attributes:
        max_k: largest ``k``; above it -> INVALID_ARGUMENT.
        max_queries_per_request: most queries per request; above -> RESOURCE_EXHAUSTED.
        max_residues_per_query: longest query in residues; above -> RESOURCE_EXHAUSTED.
        max_residues_per_request: most residues per request; above -> RESOURCE_EXHAUSTED.
        max_hits_per_request: most hits (queries x k) per request, as admission enforces
            it (:class:`~esmsearch.server.admission.AdmissionConfig`); reported so that
            clients split to fit.

    Raises:
        ValueError: a limit is below 1.
    """

    max_k: int = MAX_K
    max_queries_per_request: int = MAX_QUERIES_PER_REQUEST
    max_residues_per_query: int = MAX_RESIDUES_PER_QUERY
    max_residues_per_request: int = MAX_RESIDUES_PER_REQUEST
    max_hits_per_request: int = DEFAULT_MAX_HITS_PER_REQUEST

    def __post_init__(self) -> None:
        for name in (
            "max_k",
            "max_queries_per_request",
            "max_residues_per_query",
            "max_residues_per_request",
            "max_hits_per_request",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits.{name} must be an integer >= 1, got {value!r}")

    def within(self, admission: AdmissionConfig) -> RequestLimits:
        """These limits tightened so that any request within them can be admitted.

        A request with more queries or residues than the admission bounds could never
        run; the tightened limits refuse it at validation (RESOURCE_EXHAUSTED, no
        retry-after) and are what ``GetIndexInfo`` reports, so clients split to fit.
        """
        return RequestLimits(
            max_k=self.max_k,
            max_queries_per_request=min(self.max_queries_per_request, admission.max_queries_in_flight),
            max_residues_per_query=min(self.max_residues_per_query, admission.max_queued_residues),
            max_residues_per_request=min(self.max_residues_per_request, admission.max_queued_residues),
            max_hits_per_request=min(self.max_hits_per_request, admission.max_hits_per_request),
        )

    def to_proto(self) -> search_pb2.RequestLimits:
        return search_pb2.RequestLimits(
            max_k=self.max_k,
            max_queries_per_request=self.max_queries_per_request,
            max_residues_per_query=self.max_residues_per_query,
            max_residues_per_request=self.max_residues_per_request,
            max_hits_per_request=self.max_hits_per_request,
        )


def check_k(k: int, min_score: float | None, limits: RequestLimits) -> float | None:
    """Validate ``k`` (hits per query) and ``min_score`` (a cosine score, or ``None`` = unset).

    Returns:
        ``min_score`` unchanged (``None`` when unset).

    Raises:
        Reject: INVALID_ARGUMENT: ``k`` outside ``[1, limits.max_k]``, or ``min_score``
            NaN or outside [-1, 1].
    """
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if not 1 <= k <= limits.max_k:
        raise Reject(invalid, f"k must be in [1, {limits.max_k}], got {k}")
    if min_score is None:
        return None
    if math.isnan(min_score) or not -1.0 <= min_score <= 1.0:
        raise Reject(invalid, f"min_score must be a cosine score in [-1, 1], got {min_score}")
    return min_score


def check_count(n: int, limits: RequestLimits, what: str) -> None:
    """At least one and at most ``limits.max_queries_per_request`` queries (``what``: their name).

    Raises:
        Reject: INVALID_ARGUMENT for none, RESOURCE_EXHAUSTED for too many.
    """
    if n == 0:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"request has no {what}; send at least one")
    if n > limits.max_queries_per_request:
        raise Reject(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request has {n} {what}, over the limit of {limits.max_queries_per_request} "
            "per request; split it into several requests",
        )


def _show_id(qid: str) -> str:
    """A query id for a message: ``repr``-escaped (tabs, newlines, control characters
    visible) and cut to 40 characters."""
    return repr(qid[:40]) + ("..." if len(qid) > 40 else "")


def id_problem(qid: str) -> str | None:
    """What makes ``qid`` unusable as a query id, or ``None`` when it is fine.

    A query id is what FASTA's first-word rule gives (BLAST and MMseqs2 read ids the
    same way): 1..:data:`MAX_QUERY_ID_CHARS` printable characters (``str.isprintable``:
    no control, format or separator characters) and no whitespace, so that it survives
    a round trip through FASTA and through one-record-per-line TSV.
    """
    if not qid:
        return "query_id is empty; every query needs a unique id"
    if len(qid) > MAX_QUERY_ID_CHARS:
        return f"query_id has {len(qid)} characters, over the limit of {MAX_QUERY_ID_CHARS}"
    if len(qid.encode("utf-8", "surrogatepass")) > MAX_QUERY_ID_BYTES:
        return f"query_id is longer than {MAX_QUERY_ID_BYTES} bytes of UTF-8"
    for pos, char in enumerate(qid, start=1):
        if char.isspace():
            return f"query_id holds whitespace ({char!r} at character {pos}); ids are one word, as in FASTA"
        if not char.isprintable():
            return f"query_id holds a non-printable character ({char!r} at character {pos})"
    return None


def check_ids(ids: Sequence[str]) -> None:
    """Valid (:func:`id_problem`), unique query ids.

    Raises:
        Reject: INVALID_ARGUMENT naming the query by its 1-based number and its id
            (``repr``-escaped, cut to 40 characters), with ``record_id`` set.
    """
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    seen: dict[str, int] = {}
    for i, qid in enumerate(ids, start=1):
        if not qid:
            raise Reject(invalid, f"query #{i} has an empty query_id; every query needs a unique id")
        problem = id_problem(qid)
        if problem is not None:
            raise Reject(invalid, f"query #{i} ({_show_id(qid)}): {problem}", record_id=qid)
        if qid in seen:
            raise Reject(
                invalid,
                f"query {qid!r}: duplicate query_id (queries #{seen[qid]} and #{i}); "
                "query ids must be unique within a request",
                record_id=qid,
            )
        seen[qid] = i


def check_queries(queries: Sequence[QueryLike], limits: RequestLimits) -> list[str]:
    """Validate query ids, sequences and residue limits; return the normalised sequences.

    Args:
        queries: the request's queries, in order.
        limits: the limits to enforce.

    Returns:
        One upper-case residue string per query (trailing ``*`` dropped), in order.

    Raises:
        Reject: INVALID_ARGUMENT (bad id or residue: the message and ``record_id``
            name the query, ``position`` the residue) or RESOURCE_EXHAUSTED (over a
            limit), with a precise message.
    """
    check_count(len(queries), limits, "queries")
    check_ids([q.query_id for q in queries])
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    sequences: list[str] = []
    total = 0
    for query in queries:
        qid = query.query_id
        if len(query.sequence) > limits.max_residues_per_query + 1:  # +1: a trailing '*'
            raise Reject(
                exhausted,
                f"query {qid!r} has {len(query.sequence)} residues, over the limit of "
                f"{limits.max_residues_per_query} per query",
                record_id=qid,
            )
        try:
            seq = validate_sequence(qid, query.sequence)
        except InvalidSequenceError as exc:
            where = f" at residue {exc.position}" if exc.position is not None else ""
            raise Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"query {qid!r}{where}: {exc.reason}",
                record_id=qid,
                position=exc.position,
            ) from exc
        if len(seq) > limits.max_residues_per_query:
            raise Reject(
                exhausted,
                f"query {qid!r} has {len(seq)} residues, over the limit of {limits.max_residues_per_query} per query",
                record_id=qid,
            )
        total += len(seq)
        if total > limits.max_residues_per_request:
            raise Reject(
                exhausted,
                f"request has more than {limits.max_residues_per_request} residues in total "
                f"(reached {total} at query {qid!r}); split it into several requests",
            )
        sequences.append(seq)
    return sequences


def check_embeddings(embeddings: Sequence[search_pb2.Embedding], dim: int, limits: RequestLimits) -> np.ndarray:
    """Validate query vectors; return them L2-normalised.

    Args:
        embeddings: the request's query vectors, each with ``dim`` values.
        dim: the index's embedding dimension.
        limits: the limits to enforce (count of queries).

    Returns:
        float32 ``[n, dim]``, each row scaled to unit L2 norm.

    Raises:
        Reject: INVALID_ARGUMENT (wrong length, non-finite values, zero vector, bad
            ids) or RESOURCE_EXHAUSTED (too many), naming the query.
    """
    check_count(len(embeddings), limits, "embeddings")
    check_ids([e.query_id for e in embeddings])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    vectors = np.zeros((len(embeddings), dim), dtype=np.float32)
    for i, emb in enumerate(embeddings):
        if len(emb.values) != dim:
            raise Reject(
                invalid,
                f"query {emb.query_id!r}: embedding has {len(emb.values)} values, the index dimension is {dim}",
                record_id=emb.query_id,
            )
        vectors[i] = emb.values
    finite = np.asarray(np.isfinite(vectors).all(axis=1))
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    for bad in np.flatnonzero(~finite | (norms == 0)).tolist():
        what = "non-finite values" if not bool(finite[bad]) else "a zero vector"
        qid = embeddings[bad].query_id
        raise Reject(invalid, f"query {qid!r}: embedding has {what}", record_id=qid)
    normalised: np.ndarray = (vectors / norms[:, None]).astype(np.float32)
    return normalised


def check_max_evalue(max_evalue: float | None, index: Index) -> float | None:
    """Validate an E-value bound against the index about to answer; ``None`` when unset.

    Args:
        max_evalue: the request's bound (keep hits with E-value <= it), or ``None``.
        index: the index version the request will search.

    Raises:
        Reject: INVALID_ARGUMENT for a negative or NaN bound.
        EvaluesUnavailableError: the index has no decoys, hence no E-values to filter
            on (FAILED_PRECONDITION); checked before any model time is spent.
    """
    if max_evalue is None:
        return None
    if math.isnan(max_evalue) or max_evalue < 0:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"max_evalue must be an E-value >= 0, got {max_evalue}")
    if not index.has_evalues:
        from esmsearch.server.engine import evalues_unavailable

        raise evalues_unavailable(index)
    return max_evalue


def check_evalue_db_size(value: int | None, *, zero_is_unset: bool = True) -> int | None:
    """Validate a request's ``evalue_db_size`` (database size its E-values are scaled to).

    Args:
        value: the requested number of database sequences, or ``None`` for the
            server's default.
        zero_is_unset: 0 means unset too (proto3's default of the gRPC field); the
            HTTP API, where the field can be left out, passes ``False``.

    Returns:
        The size, >= 1, or ``None`` when unset.

    Raises:
        Reject: INVALID_ARGUMENT unless ``value`` is unset or a positive integer.
    """
    if value is None or (zero_is_unset and type(value) is int and value == 0):
        return None
    if type(value) is not int or value < 1:
        raise Reject(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"evalue_db_size must be a positive integer (a number of database sequences), got {value!r}",
        )
    return value
