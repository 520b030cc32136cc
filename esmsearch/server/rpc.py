"""Errors, logs and metrics of every RPC, in one place.

Every RPC the server answers -- the search service's methods, GetIndexInfo and
ReloadIndex included, calls that the bearer-token check refuses, and every request
to the HTTP API (:mod:`esmsearch.server.httpapi`, logged with an ``rpc`` label such
as ``http:POST /v1/search``) -- ends in
:meth:`RpcObserver.finish`, which writes the request's one log line and records its
metrics; every failure is turned into a gRPC status by :func:`status_for`, which is
the only mapping from exceptions to status codes on the server side:

=================================================  ==================================
exception                                          status
=================================================  ==================================
:class:`Reject` (validation in the servicer)       its own code and details
:class:`~esmsearch.errors.InvalidSequenceError`    INVALID_ARGUMENT
:class:`~esmsearch.errors.FastaFormatError`        INVALID_ARGUMENT (FASTA text sent over HTTP)
:class:`~esmsearch.errors.ServerBusyError`         RESOURCE_EXHAUSTED + pushback/``retry-after-ms``
:class:`~esmsearch.errors.RequestTooLargeError`    RESOURCE_EXHAUSTED + pushback ``-1``
:class:`~esmsearch.errors.RequestExpiredError`     DEADLINE_EXCEEDED
:class:`~esmsearch.errors.ServerClosingError`      UNAVAILABLE
:class:`~esmsearch.errors.EvaluesUnavailableError` FAILED_PRECONDITION, its own message
:class:`~esmsearch.errors.IndexDirectoryError`     FAILED_PRECONDITION, a reason + an error id
anything else                                      INTERNAL, details = an error id
=================================================  ==================================

A request message that does not decode never reaches this table: gRPC would answer
INTERNAL (and keep the call); :mod:`esmsearch.server.decoding` answers INVALID_ARGUMENT.

Client-facing details never carry exception text from the filesystem, FAISS, SQLite
or the model loader (it holds server paths): messages esmsearch composes about the
request itself (a bad residue, a limit, a deadline) are sent as they are, because they
tell the caller what to fix; anything else is answered with a reason chosen by the
exception's class (:func:`public_reason`) and an error id (:func:`new_error_id`), and
the server log has the same id next to the full text (and, for INTERNAL, the
traceback), so an operator can find it from a user's report.

A busy server's RESOURCE_EXHAUSTED carries the time to wait twice in its trailing
metadata (integer milliseconds as ASCII digits): gRPC's standard
``grpc-retry-pushback-ms`` (gRFC A6; what every gRPC client's ``retryPolicy`` obeys)
and esmsearch's ``retry-after-ms`` (as qdrant-client and HTTP's ``Retry-After``; kept
for earlier clients). An answer over a permanent limit carries pushback ``-1`` (A6:
"do not retry") and no ``retry-after-ms``; see :mod:`esmsearch.protocol`.
The HTTP API turns these gRPC codes into HTTP statuses with one table
(``esmsearch.server.httpapi.HTTP_STATUS``) and the retry hint into ``Retry-After``.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NoReturn

import grpc

from esmsearch.errors import (
    EvaluesUnavailableError,
    FastaFormatError,
    IndexDirectoryError,
    IndexFormatError,
    IndexMismatchError,
    IndexNotFoundError,
    InvalidSequenceError,
    RequestExpiredError,
    RequestTooLargeError,
    ServerBusyError,
    ServerClosingError,
)
from esmsearch.protocol import NO_RETRY_PUSHBACK, RETRY_AFTER_KEY, RETRY_PUSHBACK_KEY

if TYPE_CHECKING:
    from esmsearch.server.metrics import ServerMetrics

__all__ = [
    "RETRY_AFTER_KEY",
    "Reject",
    "RpcObserver",
    "RpcRecord",
    "Status",
    "new_error_id",
    "public_reason",
    "status_for",
]

log = logging.getLogger("esmsearch.server")


class Reject(Exception):
    """A request refused by validation with this status code and details (never logged as a bug).

    Attributes:
        code: the gRPC status code to answer with.
        details: the message for the client.
        record_id: the query (record id) at fault, when one is; ``None`` otherwise.
        position: 1-based residue position of a bad residue in that query, or ``None``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        record_id: str | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.record_id = record_id
        self.position = position


@dataclass(frozen=True)
class Status:
    """A gRPC status to answer with.

    Attributes:
        code: the status code.
        details: the message sent to the client.
        trailing_metadata: extra trailing metadata (``retry-after-ms``), possibly empty.
        error_id: the id of an INTERNAL error (also in the server log), else ``""``.
        retry_after_s: seconds after which a retry should find room (RESOURCE_EXHAUSTED
            from a busy server only; the same estimate as ``retry-after-ms``); ``None``
            when retrying cannot help.
        record_id: the query (record id) at fault, when the failure names one.
        position: 1-based position of the bad residue in that query, when known.
    """

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()
    error_id: str = ""
    retry_after_s: float | None = None
    record_id: str | None = None
    position: int | None = None


#: Settings an index and the served model must share (``Embedder.check_manifest``): the
#: names a model-mismatch reason may show the client.
_MODEL_SETTINGS: Final = ("checkpoint_sha256", "layer", "pooling", "normalisation", "precision", "dim")


def new_error_id() -> str:
    """A fresh error id: 12 random hex digits, shown to the client and logged with the details."""
    return secrets.token_hex(6)


def public_reason(exc: BaseException) -> str:
    """Why ``exc`` happened, in words safe for a client: chosen by its class, never its text.

    An index-directory error's text names server paths (``/srv/index/versions/...``), the
    model's file and the OS's or FAISS's own message; the reason names only the kind of
    failure and, for a model mismatch, which of :data:`_MODEL_SETTINGS` differ.
    """
    if isinstance(exc, EvaluesUnavailableError):
        return str(exc)  # composed from the request and the index version only
    if isinstance(exc, IndexMismatchError):
        text = str(exc)
        differing = [name for name in _MODEL_SETTINGS if f"{name}:" in text]
        where = f" (differing: {', '.join(differing)})" if differing else ""
        return f"the index version was built with other model settings than the served model{where}"
    if isinstance(exc, IndexNotFoundError):
        return "the index version is missing (not published, or deleted by retention)"
    if isinstance(exc, IndexFormatError):
        return "the index version failed verification (manifest, checksums or row counts)"
    if isinstance(exc, IndexDirectoryError):
        return "the index directory cannot be used"
    return "internal error"


def status_for(exc: BaseException) -> Status:
    """The status a failed RPC answers with (the table in the module docstring)."""
    codes = grpc.StatusCode
    if isinstance(exc, Reject):
        # Validation's RESOURCE_EXHAUSTED is over a permanent limit: pushback -1 (gRFC A6).
        never = ((RETRY_PUSHBACK_KEY, NO_RETRY_PUSHBACK),) if exc.code == codes.RESOURCE_EXHAUSTED else ()
        return Status(exc.code, exc.details, never, record_id=exc.record_id, position=exc.position)
    if isinstance(exc, InvalidSequenceError):
        return Status(codes.INVALID_ARGUMENT, str(exc), record_id=exc.record_id, position=exc.position)
    if isinstance(exc, FastaFormatError):
        return Status(codes.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ServerBusyError):
        ms = max(1, round(exc.retry_after_s * 1e3))
        hints = ((RETRY_PUSHBACK_KEY, str(ms)), (RETRY_AFTER_KEY, str(ms)))
        return Status(codes.RESOURCE_EXHAUSTED, str(exc), hints, retry_after_s=ms / 1e3)
    if isinstance(exc, RequestTooLargeError):
        # A negative pushback tells gRPC clients with a retry policy not to retry (gRFC A6).
        return Status(codes.RESOURCE_EXHAUSTED, str(exc), ((RETRY_PUSHBACK_KEY, NO_RETRY_PUSHBACK),))
    if isinstance(exc, RequestExpiredError):
        return Status(codes.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, ServerClosingError):
        return Status(codes.UNAVAILABLE, str(exc))
    if isinstance(exc, EvaluesUnavailableError):  # composed from the request and the index version
        return Status(codes.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, IndexDirectoryError):
        error_id = new_error_id()
        return Status(
            codes.FAILED_PRECONDITION,
            f"{public_reason(exc)}; error id {error_id} (the server log has the details)",
            error_id=error_id,
        )
    error_id = new_error_id()
    return Status(
        codes.INTERNAL,
        f"internal error {error_id}; the server log has its details under this id",
        error_id=error_id,
    )


@dataclass
class RpcRecord:
    """One request's figures, for its single log line and its metrics."""

    rpc: str
    peer: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    queries: int = 0
    residues: int = 0
    k: int = 0
    queue_s: float = 0.0
    embed_s: float = 0.0
    search_s: float = 0.0
    error_id: str = ""
    t0: float = field(default_factory=time.perf_counter)


class RpcObserver:
    """Logs and counts every finished RPC, and answers failures with their status.

    Args:
        metrics: Prometheus sink, or ``None`` for logs only.
    """

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self.metrics = metrics

    def start(self, rpc: str, context: grpc.ServicerContext) -> RpcRecord:
        """A record for one request (message, for streams) of ``rpc``."""
        return RpcRecord(rpc, peer=_peer(context))

    def begin(self, rpc: str, peer: str) -> RpcRecord:
        """A record for one request that did not come through gRPC (an HTTP request)."""
        return RpcRecord(rpc, peer=peer)

    def resolve(self, rec: RpcRecord, exc: BaseException) -> Status:
        """The status ``exc`` is answered with (:func:`status_for`), noted in ``rec``.

        Failures answered with an error id are logged here with that id and the
        exception's text (unexpected ones with their traceback); the client sees only
        a reason and the id.
        """
        status = status_for(exc)
        rec.code = status.code
        rec.error_id = status.error_id
        if status.error_id and status.code == grpc.StatusCode.INTERNAL:
            log.error("rpc=%s error_id=%s failed", rec.rpc, status.error_id, exc_info=exc)
        elif status.error_id:
            log.error("rpc=%s error_id=%s code=%s: %s", rec.rpc, status.error_id, status.code.name, exc)
        return status

    def fail(self, context: grpc.ServicerContext, rec: RpcRecord, exc: BaseException, prefix: str = "") -> NoReturn:
        """Answer ``exc`` with its status (:meth:`resolve`) through ``context.abort``.

        Raises:
            Exception: what ``context.abort`` raises to end the RPC (always).
        """
        status = self.resolve(rec, exc)
        if status.trailing_metadata:
            context.set_trailing_metadata(status.trailing_metadata)
        context.abort(status.code, prefix + status.details)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def refuse(self, rpc: str, context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
        """Answer a call refused before any servicer code runs (a bad token, an undecodable message).

        Writes the call's one log line and records its metrics with ``code``, then ends
        it through ``context.abort(code, details)``.

        Raises:
            Exception: what ``context.abort`` raises to end the RPC (always).
        """
        rec = self.start(rpc, context)
        rec.code = code
        self.finish(rec)
        context.abort(code, details)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def finish(self, rec: RpcRecord) -> None:
        """Write the request's log line and record its metrics."""
        total_s = time.perf_counter() - rec.t0
        fields: dict[str, object] = {
            "rpc": rec.rpc,
            "code": rec.code.name,
            "peer": rec.peer,
            "queries": rec.queries,
            "residues": rec.residues,
            "k": rec.k,
            "queue_ms": round(rec.queue_s * 1e3, 1),
            "embed_ms": round(rec.embed_s * 1e3, 1),
            "search_ms": round(rec.search_s * 1e3, 1),
            "total_ms": round(total_s * 1e3, 1),
        }
        if rec.error_id:
            fields["error_id"] = rec.error_id
        log.info(
            "rpc=%s code=%s peer=%s queries=%d residues=%d k=%d "
            "queue_ms=%.1f embed_ms=%.1f search_ms=%.1f total_ms=%.1f%s",
            rec.rpc,
            rec.code.name,
            rec.peer,
            rec.queries,
            rec.residues,
            rec.k,
            rec.queue_s * 1e3,
            rec.embed_s * 1e3,
            rec.search_s * 1e3,
            total_s * 1e3,
            f" error_id={rec.error_id}" if rec.error_id else "",
            extra={"fields": fields},  # for esmsearch.server.logs.JsonLinesFormatter
        )
        if self.metrics is not None:
            self.metrics.observe_request(
                rec.rpc,
                rec.code.name,
                queue_s=rec.queue_s,
                embed_s=rec.embed_s,
                search_s=rec.search_s,
                total_s=total_s,
            )


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001 - a test double or a closed call: the log line still goes out
        return ""
