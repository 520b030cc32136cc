"""Exceptions raised by :class:`esmsearch.client.SearchClient`.

Every failed RPC is mapped from its gRPC status code to one class, keeping the
code and the server's details, and chained to the original ``grpc.RpcError``
(``raise ... from exc``) -- in one place, :func:`map_rpc_errors`, which every call
of the blocking and asyncio clients runs inside (httpx's ``map_httpcore_exceptions``
pattern)::

    EsmsearchError                       (esmsearch.errors)
    └── SearchError                      any failed RPC; .code, .details
        ├── InvalidArgumentError         INVALID_ARGUMENT: bad sequence, k, min_score, ids
        ├── ResourceExhaustedError       RESOURCE_EXHAUSTED: server busy (.retry_after_s) or
        │                                over a permanent request limit (.retry_after_s None)
        ├── FailedPreconditionError      FAILED_PRECONDITION: model/index mismatch
        ├── UnauthenticatedError         UNAUTHENTICATED: missing or wrong bearer token
        ├── PermissionDeniedError        PERMISSION_DENIED
        ├── UnavailableError             UNAVAILABLE: server down, draining or unreachable
        ├── DeadlineExceededError        DEADLINE_EXCEEDED: timeout_s elapsed
        ├── NotFoundError                NOT_FOUND
        ├── UnimplementedError           UNIMPLEMENTED: RPC not served by this server
        ├── CancelledError               CANCELLED
        └── InternalError                INTERNAL / UNKNOWN / DATA_LOSS: server-side bug (details
                                         carry an error id that the server log has too)

Bad query sequences are usually caught before any RPC, by
:func:`esmsearch.sequences.records_from`, which raises
:class:`esmsearch.errors.InvalidSequenceError` (record id and residue position).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from esmsearch.errors import EsmsearchError
from esmsearch.protocol import RETRY_AFTER_KEY  # re-exported: the server's retry hint key

__all__ = [
    "RETRY_AFTER_KEY",
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
    "map_rpc_errors",
    "retry_after_s",
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
    """RESOURCE_EXHAUSTED: the server is busy, or the request exceeds one of its limits.

    Attributes:
        retry_after_s: seconds the server asked the client to wait before retrying
            (its ``retry-after-ms`` trailing metadata) when it was busy; ``None`` when
            the request is over a permanent limit and retrying cannot succeed.
    """

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(code, details)
        self.retry_after_s = retry_after_s


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


def trailer_text(exc: grpc.RpcError, name: str) -> str | None:
    """The first trailing-metadata value ``name`` of a failed call as text, or ``None`` when absent."""
    trailing = getattr(exc, "trailing_metadata", None)
    if not callable(trailing):
        return None
    try:
        metadata = trailing() or ()
    except Exception:  # noqa: BLE001 - some RpcError shapes cannot report metadata
        return None
    for key, value in metadata:
        if key == name:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return None


def retry_after_s(exc: grpc.RpcError) -> float | None:
    """The ``retry-after-ms`` hint of a failed call in seconds, or ``None`` when absent or malformed."""
    text = trailer_text(exc, RETRY_AFTER_KEY)
    return int(text) / 1e3 if text is not None and text.isdigit() else None


def error_from_rpc(exc: grpc.RpcError) -> SearchError:
    """Map a failed call's ``grpc.RpcError`` to the matching :class:`SearchError` subclass.

    The caller raises the result ``from exc``. Codes without a dedicated class
    map to :class:`SearchError` itself; RESOURCE_EXHAUSTED keeps the server's
    ``retry-after-ms`` hint as :attr:`ResourceExhaustedError.retry_after_s`.
    """
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(exc)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(code, details or "", retry_after_s(exc))
    cls = _BY_CODE.get(code, SearchError)
    return cls(code, details or "")


@contextlib.contextmanager
def map_rpc_errors() -> Iterator[None]:
    """Turn a ``grpc.RpcError`` raised inside the block into its :class:`SearchError` class.

    Raises:
        SearchError: (a subclass of) for any failed RPC, chained ``from`` the gRPC error.
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc
