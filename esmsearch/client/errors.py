"""Exceptions raised by :class:`esmsearch.client.SearchClient`.

Every failed RPC is mapped from its gRPC status code to one class, keeping the
code and the server's details, and chained to the original ``grpc.RpcError``
(``raise ... from exc``)::

    EsmsearchError                       (esmsearch.errors)
    └── SearchError                      any failed RPC; .code, .details
        ├── InvalidArgumentError         INVALID_ARGUMENT: bad sequence, k, min_score, ids
        ├── ResourceExhaustedError       RESOURCE_EXHAUSTED: over a server request limit
        ├── FailedPreconditionError      FAILED_PRECONDITION: model/index mismatch
        ├── UnauthenticatedError         UNAUTHENTICATED: missing or wrong bearer token
        ├── PermissionDeniedError        PERMISSION_DENIED
        ├── UnavailableError             UNAVAILABLE: server down, draining or unreachable
        ├── DeadlineExceededError        DEADLINE_EXCEEDED: timeout_s elapsed
        ├── NotFoundError                NOT_FOUND
        ├── UnimplementedError           UNIMPLEMENTED: RPC not served by this server
        ├── CancelledError               CANCELLED
        └── InternalError                INTERNAL / UNKNOWN / DATA_LOSS: server-side bug

Bad query sequences are usually caught before any RPC, by
:func:`esmsearch.sequences.records_from`, which raises
:class:`esmsearch.errors.InvalidSequenceError` (record id and residue position).
"""

from __future__ import annotations

import grpc

from esmsearch.errors import EsmsearchError

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "PermissionDeniedError",
    "SearchError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc",
]


class SearchError(EsmsearchError):
    """A search-service RPC failed.

    Attributes:
        code: the gRPC status code the server (or the channel) returned.
        details: the status details string (for server-side validation errors it
            names the query id and the reason).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")


class InvalidArgumentError(SearchError):
    """INVALID_ARGUMENT: the request is malformed (bad sequence, k, min_score or ids)."""


class ResourceExhaustedError(SearchError):
    """RESOURCE_EXHAUSTED: the request exceeds one of the server's request limits."""


class FailedPreconditionError(SearchError):
    """FAILED_PRECONDITION: the server's model does not match its index."""


class UnauthenticatedError(SearchError):
    """UNAUTHENTICATED: the server requires a bearer token and none or a wrong one was sent."""


class PermissionDeniedError(SearchError):
    """PERMISSION_DENIED: the caller is authenticated but not allowed this call."""


class UnavailableError(SearchError):
    """UNAVAILABLE: the server is unreachable, not yet loaded, or draining."""


class DeadlineExceededError(SearchError, TimeoutError):
    """DEADLINE_EXCEEDED: the call did not finish within its ``timeout_s``."""


class NotFoundError(SearchError):
    """NOT_FOUND."""


class UnimplementedError(SearchError):
    """UNIMPLEMENTED: the server does not serve this RPC (an older server revision)."""


class CancelledError(SearchError):
    """CANCELLED: the call was cancelled."""


class InternalError(SearchError):
    """INTERNAL, UNKNOWN or DATA_LOSS: a server-side failure."""


_BY_CODE: dict[grpc.StatusCode, type[SearchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_from_rpc(exc: grpc.RpcError) -> SearchError:
    """Map a failed call's ``grpc.RpcError`` to the matching :class:`SearchError` subclass.

    The caller raises the result ``from exc``. Codes without a dedicated class
    map to :class:`SearchError` itself.
    """
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(exc)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, SearchError)
    return cls(code, details or "")
