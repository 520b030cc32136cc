"""Exceptions raised by esmsearch, all of them, in one tree (as httpx draws its own)::

    EsmsearchError                      base of everything esmsearch raises on purpose
    ├── InvalidSequenceError            a FASTA record or query sequence is unusable (ValueError)
    │   └── DuplicateRecordError        a record id occurs twice in one input
    ├── FastaFormatError                the input is not FASTA at all (ValueError)
    ├── ModelLoadError                  a model name or checkpoint cannot be loaded
    ├── IndexDirectoryError             base of index-directory problems
    │   ├── IndexNotFoundError          no index (manifest.json) at the given path (FileNotFoundError)
    │   ├── IndexFormatError            manifest, checksums or files are inconsistent
    │   ├── IndexMismatchError          model settings differ from the index's manifest
    │   └── EvaluesUnavailableError     E-values asked of an index built without decoys
    ├── BuildLockedError                another build holds a versioned root's lock
    ├── DistributedError                a distributed (Ray) build cannot reach its cluster or a block failed for good
    ├── InvalidIndexFactoryError        a FAISS factory string is rejected (ValueError)
    ├── ConfigError                     a setting is out of its valid range (ValueError)
    ├── ServerRefusal                   the server will not run a (valid) request now
    │   ├── ServerBusyError             admission full: RESOURCE_EXHAUSTED + retry-after-ms
    │   ├── RequestTooLargeError        over a permanent limit: RESOURCE_EXHAUSTED, no retry-after
    │   ├── RequestExpiredError         deadline passed / caller gone before embedding: DEADLINE_EXCEEDED
    │   └── ServerClosingError          the server is draining: UNAVAILABLE
    └── SearchError                     esmsearch.client.errors: a failed RPC, seen by a client
        ├── InvalidArgumentError        INVALID_ARGUMENT, OUT_OF_RANGE
        ├── ResourceExhaustedError      RESOURCE_EXHAUSTED (.retry_after_s: None = permanent)
        ├── FailedPreconditionError     FAILED_PRECONDITION
        ├── UnauthenticatedError        UNAUTHENTICATED
        ├── PermissionDeniedError       PERMISSION_DENIED
        ├── UnavailableError            UNAVAILABLE
        ├── DeadlineExceededError       DEADLINE_EXCEEDED (also a TimeoutError)
        ├── NotFoundError               NOT_FOUND
        ├── UnimplementedError          UNIMPLEMENTED
        ├── CancelledError              CANCELLED
        └── InternalError               INTERNAL, UNKNOWN, DATA_LOSS (details carry an error id)

The client-side classes live in :mod:`esmsearch.client.errors` (they need grpc for
their status code, and the client imports without torch or faiss); everything else is
defined here. Library code raises these, chained with ``raise ... from exc`` where a
lower-layer error is the cause; it never logs and returns ``None``. The server maps
each class to one gRPC status in one place (:mod:`esmsearch.server.rpc`).
"""

from __future__ import annotations

__all__ = [
    "BuildLockedError",
    "ConfigError",
    "DistributedError",
    "DuplicateRecordError",
    "EsmsearchError",
    "EvaluesUnavailableError",
    "FastaFormatError",
    "IndexDirectoryError",
    "IndexFormatError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "InvalidIndexFactoryError",
    "InvalidSequenceError",
    "ModelLoadError",
    "RequestExpiredError",
    "RequestTooLargeError",
    "ServerBusyError",
    "ServerClosingError",
    "ServerRefusal",
]


class EsmsearchError(Exception):
    """Base class of every error esmsearch raises on purpose."""


class InvalidSequenceError(EsmsearchError, ValueError):
    """A sequence record is unusable (bad residue, empty, ...).

    Attributes:
        record_id: id of the offending record (first word of its FASTA header),
            or ``"#<n>"`` (1-based) when the input had no ids.
        position: 1-based residue position of the offending character, or
            ``None`` when the problem is not at one position.
        reason: short human-readable reason.
    """

    def __init__(self, record_id: str, reason: str, position: int | None = None) -> None:
        self.record_id = record_id
        self.reason = reason
        self.position = position
        where = f" at residue {position}" if position is not None else ""
        super().__init__(f"record {record_id!r}{where}: {reason}")


class DuplicateRecordError(InvalidSequenceError):
    """A record id occurs more than once in one input."""

    def __init__(self, record_id: str, first_index: int, second_index: int) -> None:
        super().__init__(
            record_id,
            f"duplicate record id (records #{first_index} and #{second_index}); record ids must be unique",
        )
        self.first_index = first_index
        self.second_index = second_index


class FastaFormatError(EsmsearchError, ValueError):
    """The input is not FASTA (no '>' header before sequence data, unreadable gzip, ...)."""


class ModelLoadError(EsmsearchError):
    """A model name or checkpoint path cannot be loaded."""


class IndexDirectoryError(EsmsearchError):
    """Base class of index-directory problems."""


class IndexNotFoundError(IndexDirectoryError, FileNotFoundError):
    """No index (manifest.json) exists at the given path."""


class IndexFormatError(IndexDirectoryError):
    """An index directory is inconsistent: bad manifest, checksum or row count."""


class IndexMismatchError(IndexDirectoryError):
    """The loaded model's settings differ from those recorded in an index manifest."""


class EvaluesUnavailableError(IndexDirectoryError):
    """E-values (or an E-value filter) were asked of an index that has no decoys.

    Indexes built before E-values existed, or with ``--decoys 0``, serve hits
    without E-values; the server answers FAILED_PRECONDITION to ``max_evalue``.
    """


class BuildLockedError(EsmsearchError):
    """Another build holds a versioned index root's lock file (two builds never overlap)."""


class DistributedError(EsmsearchError):
    """A distributed build (:mod:`esmsearch.indexer.distributed`) failed: the Ray cluster
    cannot be reached, a worker cannot load the model, or a block failed after Ray's
    retries. The journaled chunks are kept: ``--resume`` continues from them."""


class InvalidIndexFactoryError(EsmsearchError, ValueError):
    """A FAISS index factory string is rejected (syntax, metric or dimension)."""


class ConfigError(EsmsearchError, ValueError):
    """A configuration value is outside its valid range."""


class ServerRefusal(EsmsearchError):
    """The server will not run a valid request now (admission, deadline or shutdown)."""


class ServerBusyError(ServerRefusal):
    """The admitted work is at its bounds; retrying after ``retry_after_s`` should find room.

    Attributes:
        retry_after_s: seconds the work ahead needs at the measured embedding rate.
    """

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLargeError(ServerRefusal):
    """A request exceeds a permanent limit of the server; it must be split, never retried."""


class RequestExpiredError(ServerRefusal):
    """A request's caller went away (deadline passed or call cancelled) before it was embedded."""


class ServerClosingError(ServerRefusal):
    """The server is draining for shutdown and takes no more model work."""
