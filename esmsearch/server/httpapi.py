"""HTTP/JSON API and web page of the search server, served in the gRPC server's process.

``esmsearch serve INDEX --http-port 8080`` (``ServerConfig.http_port``) serves, next to
gRPC and from the same objects -- engine, model scheduler (admission bounds and
deadlines), request validation and limits, bearer tokens, TLS certificate, request
log line and Prometheus metrics -- with no second hop through gRPC:

=========================  =====  =================================================================
endpoint                   token  answer
=========================  =====  =================================================================
``POST /v1/search``        yes    hits as compact JSON, or with ``?pretty`` as ``esmsearch search
                                  --format json`` prints them (the same code writes both), or TSV
                                  (``?format=tsv`` or ``Accept: text/tab-separated-values``)
``GET /v1/index``          yes    the served index, its model and the request limits (``GetIndexInfo``)
``GET /healthz``           no     200 while the process serves HTTP
``GET /readyz``            no     200 once model and index are loaded, 503 while draining (only that)
``GET /openapi.json``      no     the OpenAPI 3.1 document; ``/docs`` (Swagger UI) and ``/redoc``
``GET /``                  no     the web page (``esmsearch/server/web/``); it asks for a token
                                  when ``/v1/index`` answers 401
=========================  =====  =================================================================

Errors are JSON ``{"code", "message", "record_id"?, "position"?, "error_id"?}``: ``code``
is the gRPC status name that :func:`esmsearch.server.rpc.status_for` gives the
failure, and :data:`HTTP_STATUS` is the one table from those codes to HTTP statuses.
Every ``/v1`` request is logged and counted by :class:`~esmsearch.server.rpc.RpcObserver`
like an RPC, with the label ``http:<METHOD> <path>`` (``http:POST /v1/search``).

Why FastAPI (on Starlette) and uvicorn: the OpenAPI document and its interactive docs
come from the same pydantic model that parses the request body, so they cannot drift
from the code; Starlette gives routing, static files and an ASGI interface that
uvicorn serves with TLS and a graceful shutdown; all three are widely used and
actively maintained. ``fastapi-offline`` ships the Swagger UI and ReDoc assets that
FastAPI would otherwise load from a CDN, so the docs work on a machine without
internet access, like the web page, whose HTML, CSS and JavaScript are package data.

Threading: uvicorn runs one asyncio event loop in the thread ``esmsearch-http``.
Handlers never block it: model work goes to the :class:`DynamicBatcher` and is awaited
through its future; a client that disconnects marks its request inactive, so the
scheduler drops it before embedding, as it drops a cancelled gRPC call. A search
answer is converted and encoded in a worker thread (:func:`encode_answer`, query by
query), so that a large answer does not hold up ``/readyz`` and ``/healthz``
(``benchmarks/readyz_under_load.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import math
import socket
import ssl
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import grpc
import uvicorn
from fastapi import APIRouter, FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import esmsearch
from esmsearch.client.formats import results_to_jsonable, write_tsv
from esmsearch.client.types import IndexInfo, QueryResult
from esmsearch.errors import RequestExpiredError, ServerBusyError, ServerClosingError
from esmsearch.sequences import records_from_text
from esmsearch.server.engine import EngineResult
from esmsearch.server.rpc import Reject, RpcRecord, Status
from esmsearch.server.security import bearer_token_ok
from esmsearch.server.servicer import fill_results
from esmsearch.server.validation import check_evalue_db_size, check_k, check_max_evalue, check_queries
from esmsearch.v1 import search_pb2

if TYPE_CHECKING:
    from esmsearch.server.security import TlsConfig
    from esmsearch.server.servicer import HomologSearchServicer

__all__ = [
    "HTTP_STATUS",
    "TSV_MEDIA_TYPE",
    "WEB_DIR",
    "HttpServer",
    "create_http_app",
    "error_body",
    "http_status",
]

log = logging.getLogger("esmsearch.server")

#: HTTP status of each gRPC status code the server answers with: the one table between
#: the two. After Google's mapping of ``google.rpc.Code`` to HTTP (as grpc-gateway uses
#: it), with two choices of ours: RESOURCE_EXHAUSTED is 413 over a permanent limit and
#: 429 (with ``Retry-After``) only when a retry can succeed (see :func:`http_status`);
#: FAILED_PRECONDITION is 409, since the request cannot succeed against the server's
#: present state (a fixed index cannot reload) and retrying it unchanged is pointless,
#: which a 503 would suggest.
HTTP_STATUS: Final[Mapping[grpc.StatusCode, int]] = MappingProxyType(
    {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.FAILED_PRECONDITION: 409,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
        grpc.StatusCode.CANCELLED: 499,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.DATA_LOSS: 500,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
)
#: Media type of TSV answers (IANA ``text/tab-separated-values``).
TSV_MEDIA_TYPE: Final = "text/tab-separated-values; charset=utf-8"
#: The web page's static files (package data).
WEB_DIR: Final = Path(__file__).with_name("web")
_UNAUTHENTICATED_MESSAGE: Final = "missing or invalid bearer token (send the header 'Authorization: Bearer <token>')"
#: Seconds to wait for the HTTP thread to start or end.
_THREAD_WAIT_S: Final = 30.0


def http_status(status: Status) -> int:
    """The HTTP status answering ``status`` (:data:`HTTP_STATUS`; 429 for a busy server)."""
    if status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and status.retry_after_s is not None:
        return 429
    return HTTP_STATUS.get(status.code, 500)


def error_body(status: Status) -> dict[str, object]:
    """The JSON error object: ``code`` (gRPC status name), ``message``, and when known
    ``record_id`` (the query at fault), ``position`` (1-based residue) and ``error_id``
    (of an INTERNAL error, also in the server log)."""
    body: dict[str, object] = {"code": status.code.name, "message": status.details}
    if status.record_id is not None:
        body["record_id"] = status.record_id
    if status.position is not None:
        body["position"] = status.position
    if status.error_id:
        body["error_id"] = status.error_id
    return body


def _error_response(status: Status) -> JSONResponse:
    headers: dict[str, str] = {}
    if status.retry_after_s is not None:
        # RFC 9110 Retry-After: whole seconds; rounded up so a client never retries early.
        headers["Retry-After"] = str(max(1, math.ceil(status.retry_after_s)))
    if status.code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="esmsearch"'
    return JSONResponse(error_body(status), status_code=http_status(status), headers=headers)


# -- request and response models (they make the OpenAPI document) -------------------------


class QueryIn(BaseModel):
    """One query sequence."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        description="record id of the query, unique within the request: 1..256 printable characters, "
        "no whitespace (FASTA's first word)"
    )
    sequence: str = Field(
        description="protein sequence: the 20 standard amino acids and X B Z U O, any case, "
        "one trailing '*' allowed; no gaps or digits",
    )


class SearchBody(BaseModel):
    """A search: the queries (``queries`` or ``fasta``, exactly one) and what to return."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"queries": [{"id": "q1", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"}], "k": 10},
                {"fasta": ">q1 my query\nMKTAYIAKQRQISFVKSHFSRQ\n", "k": 5, "min_score": 0.5},
            ]
        },
    )

    queries: list[QueryIn] | None = Field(None, description="the queries as a list of {id, sequence}")
    fasta: str | None = Field(
        None,
        description="the queries as FASTA text (record id = first word of each header), "
        "or one bare protein sequence (record id query_1)",
    )
    k: int = Field(10, description="hits per query, 1..max_k (see GET /v1/index)")
    min_score: float | None = Field(
        None, description="drop hits whose cosine score is below this, in [-1, 1]; higher = closer"
    )
    max_evalue: float | None = Field(
        None,
        description="drop hits whose E-value is above this (lower = more significant); "
        "needs a server that computes E-values (409 otherwise)",
    )
    evalue_db_size: StrictInt | None = Field(
        None,
        description="number of database sequences the E-values are scaled to (HMMER's -Z, BLAST's "
        "-dbsize), a positive integer; default: the server's --evalue-db-size, else the index's count",
    )
    timeout_s: float | None = Field(
        None,
        description="deadline in seconds (> 0): a request still queued for the model when it "
        "passes is dropped and answered 504; default none",
    )


class HitOut(BaseModel):
    """One hit, as ``esmsearch search --format json`` writes it."""

    target_id: str = Field(description="record id of the database sequence")
    cosine_score: float = Field(description="cosine similarity in [-1, 1], higher = closer (6 decimals)")
    evalue: float | None = Field(
        description="expected number of unrelated database sequences scoring at least as high for this query, "
        ">= 0, lower = more significant (3 significant digits); null when the index has no decoys"
    )
    rank: int = Field(description="1-based rank by descending cosine score")
    target_length: int = Field(description="length of the database sequence in residues")
    target_description: str = Field(description="rest of the database sequence's FASTA header")


class QueryResultOut(BaseModel):
    """The hits of one query."""

    query_id: str = Field(description="the query's record id")
    query_length: int = Field(description="query length in residues")
    index_version: str = Field(description="version of the index that answered")
    hits: list[HitOut]


class ErrorOut(BaseModel):
    """A refused or failed request."""

    code: str = Field(description="gRPC status name, e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE")
    message: str = Field(description="what is wrong, naming the query and residue where one is at fault")
    record_id: str | None = Field(None, description="record id of the query at fault")
    position: int | None = Field(None, description="1-based position of the bad residue in that query")
    error_id: str | None = Field(None, description="id of an internal error; the server log has its details")


_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorOut, "description": "invalid request (names the query and residue)"},
    401: {"model": ErrorOut, "description": "missing or invalid bearer token"},
    409: {"model": ErrorOut, "description": "not possible on this server (e.g. E-values without decoys)"},
    413: {"model": ErrorOut, "description": "over a request limit: split the queries"},
    429: {"model": ErrorOut, "description": "server busy: retry after the Retry-After header's seconds"},
    500: {"model": ErrorOut, "description": "internal error (error_id in the server log)"},
    503: {"model": ErrorOut, "description": "the server is draining for shutdown"},
    504: {"model": ErrorOut, "description": "timeout_s passed before the model ran the request"},
}


# -- transport limits -------------------------------------------------------------------------

#: Paths the request cap never refuses: probes must answer while the server is full.
_PROBES: Final = frozenset({"/healthz", "/readyz"})
#: Retry-After of a request refused by the request cap (seconds, RFC 9110).
_CAP_RETRY_AFTER_S: Final = 1.0


class _TransportLimits:
    """ASGI middleware: the HTTP request cap and the body size limit, before routing and
    before any byte of the body is read.

    * A request whose ``Content-Length`` is over ``max_body_bytes`` is answered 413 at
      once (``Connection: close``; its body is never read). A body without
      ``Content-Length`` (chunked) is cut off at the limit while it is read
      (:func:`_read_body`, 413 as well).
    * Beyond ``max_requests`` requests in flight (``ServerConfig.max_concurrent_requests``;
      the probes ``/healthz`` and ``/readyz`` are not counted and always answered) a
      request is answered 429 with ``Retry-After`` at once, as a busy admission is.

    Both refusals are logged and counted by the servicer's observer like every request.
    uvicorn's own ``limit_concurrency`` stays behind this as a backstop on connections.
    """

    def __init__(self, app: ASGIApp, *, ctx: _Context) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = self.ctx
        length = b""
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                length = value
        if length.isdigit() and int(length) > ctx.max_body_bytes:
            refusal = Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large(ctx.max_body_bytes))
            await self._refuse(refusal, scope, receive, send)
            return
        if scope.get("path") in _PROBES:
            await self.app(scope, receive, send)  # never counted nor refused
            return
        if not ctx.traffic.open_request(ctx.max_requests):
            busy = ServerBusyError(
                f"server busy: {ctx.traffic.requests} HTTP requests in flight, the limit is {ctx.max_requests}; "
                f"retry after {_CAP_RETRY_AFTER_S:.0f} s",
                retry_after_s=_CAP_RETRY_AFTER_S,
            )
            await self._refuse(busy, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            ctx.traffic.close_request()

    async def _refuse(self, refusal: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        observer = self.ctx.servicer.observer
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        rec = observer.begin(f"http:{scope.get('method', '')} {scope.get('path', '')}", peer)
        status = observer.resolve(rec, refusal)
        response = _error_response(status)
        response.headers["Connection"] = "close"  # an unread body must not be parsed as the next request
        observer.finish(rec)
        await response(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes; split the queries into several requests"


# -- shared state ---------------------------------------------------------------------------


class _Traffic:
    """API requests in flight, all HTTP requests in flight (probes aside), and whether the
    server drains (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._requests = 0
        self._draining = False

    @property
    def requests(self) -> int:
        """HTTP requests in flight, probes aside (what the request cap counts)."""
        return self._requests

    def open_request(self, limit: int) -> bool:
        """Count one HTTP request in; ``False`` (not counted) when ``limit`` are in flight."""
        with self._cond:
            if self._requests >= limit:
                return False
            self._requests += 1
            return True

    def close_request(self) -> None:
        with self._cond:
            self._requests -= 1
            self._cond.notify_all()

    def wait_requests(self, at_most: int, timeout_s: float) -> bool:
        """Wait until at most ``at_most`` HTTP requests are in flight; ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._requests <= at_most, timeout=max(0.0, timeout_s))

    @property
    def draining(self) -> bool:
        return self._draining

    def enter(self) -> bool:
        """Count one request in; ``False`` (not counted) while draining."""
        with self._cond:
            if self._draining:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; ``False`` if ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=max(0.0, timeout_s))


@dataclass(frozen=True)
class _Context:
    servicer: HomologSearchServicer
    tokens: frozenset[str]
    max_body_bytes: int
    max_requests: int
    traffic: _Traffic
    started: threading.Event


def _context(request: Request) -> _Context:
    ctx = request.app.state.esmsearch
    assert isinstance(ctx, _Context)
    return ctx


def _peer(request: Request) -> str:
    client = request.client
    if client is None:
        return ""
    host, port = client.host, client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _validation_message(exc: RequestValidationError, request: Request) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    message = "invalid request: " + "; ".join(parts)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and "json" not in content_type.lower():
        message += " (send the body as JSON with the header 'Content-Type: application/json')"
    return message


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes before more of it is read."""
    too_large = _too_large(limit)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large)
            chunks.append(chunk)
    except ClientDisconnect as exc:  # gone before its body arrived: not a server fault
        raise RequestExpiredError("the client disconnected before its request body was read") from exc
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the already read ``body`` once, then the connection's own
    (which then reports the client's disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _ApiRoute(APIRoute):
    """Every ``/v1`` endpoint: drain check, token, body limit, one log line and metrics, errors.

    The HTTP twin of the servicer's RPC wrapper: each request gets an
    :class:`RpcRecord` (label ``http:<METHOD> <path>``), every failure is answered
    through :meth:`RpcObserver.resolve` (the one exception -> status mapping) and
    :data:`HTTP_STATUS`, and :meth:`RpcObserver.finish` writes the log line and metrics.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        rpc = f"http:{','.join(sorted(self.methods or ()))} {self.path}"

        async def observed(request: Request) -> Response:
            ctx = _context(request)
            observer = ctx.servicer.observer
            rec = observer.begin(rpc, _peer(request))
            request.state.esmsearch_record = rec
            status: Status | None = None
            entered = False
            try:
                entered = ctx.traffic.enter()
                if not entered:
                    raise ServerClosingError("the server is draining for shutdown; retry on another replica")
                if ctx.tokens and not bearer_token_ok(request.headers.getlist("authorization"), ctx.tokens):
                    raise Reject(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED_MESSAGE)
                body = await _read_body(request, ctx.max_body_bytes)
                response = await handler(Request(request.scope, _replay(body, request.receive)))
            except RequestValidationError as exc:
                status = observer.resolve(
                    rec, Reject(grpc.StatusCode.INVALID_ARGUMENT, _validation_message(exc, request))
                )
            except StarletteHTTPException as exc:
                # FastAPI's own answer to a body it cannot parse (json.loads raising
                # UnicodeDecodeError on non-UTF-8 bytes, gzip included, or RecursionError
                # on deep nesting): the client's fault, never INTERNAL.
                if exc.status_code != 400:
                    raise
                status = observer.resolve(
                    rec,
                    Reject(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "the request body is not a JSON document this API can read: send UTF-8 JSON "
                        "(not compressed), nested at most a few levels deep",
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - every failure is answered, INTERNAL with an id
                status = observer.resolve(rec, exc)
            finally:
                if entered:
                    ctx.traffic.leave()
                observer.finish(rec)
            return _error_response(status) if status is not None else response

        return observed


def _record(request: Request) -> RpcRecord:
    rec = request.state.esmsearch_record
    assert isinstance(rec, RpcRecord)
    return rec


# -- search ---------------------------------------------------------------------------------


def _queries(body: SearchBody) -> list[search_pb2.Query]:
    """The request's queries from ``queries`` or ``fasta`` (validated later, with the gRPC checks)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if body.queries is not None and body.fasta is not None:
        raise Reject(invalid, "give the queries either as 'queries' or as 'fasta', not both")
    if body.fasta is not None:
        if not body.fasta.strip():
            raise Reject(invalid, "'fasta' is empty; give FASTA text or one protein sequence")
        # Parsed as text only: nothing sent over the network is ever opened as a path.
        records = records_from_text(body.fasta)
        return [search_pb2.Query(query_id=r.record_id, sequence=r.sequence) for r in records]
    if body.queries is None:
        raise Reject(invalid, "request has no queries; give 'queries' (a list of {id, sequence}) or 'fasta'")
    return [search_pb2.Query(query_id=q.id, sequence=q.sequence) for q in body.queries]


def _check_timeout(timeout_s: float | None) -> float | None:
    if timeout_s is not None and not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_s must be a number of seconds > 0, got {timeout_s}")
    return timeout_s


async def _watch_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _model_result(future: Future[Any], receive: Receive, gone: threading.Event, timeout_s: float | None) -> Any:
    """Wait for the scheduler's answer without blocking the event loop.

    Raises:
        RequestExpiredError: ``timeout_s`` passed or the client disconnected first (the
            request, marked inactive, is dropped by the scheduler if still queued).
        Exception: what the scheduler set on ``future``.
    """
    loop = asyncio.get_running_loop()
    answered = asyncio.Event()

    def wake(_future: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the HTTP loop closed: nobody waits any more
            loop.call_soon_threadsafe(answered.set)

    future.add_done_callback(wake)
    answer = asyncio.ensure_future(answered.wait())
    disconnect = asyncio.ensure_future(_watch_disconnect(receive))
    try:
        await asyncio.wait({answer, disconnect}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        answer.cancel()
        disconnect.cancel()
    if not future.done():
        gone.set()
        if disconnect.done() and not disconnect.cancelled():
            raise RequestExpiredError("the client disconnected before its answer")
        raise RequestExpiredError("deadline passed while waiting for the model")
    return future.result()


def _wants_tsv(fmt: str | None, accept: str) -> bool:
    if fmt is not None:
        return fmt == "tsv"
    return "text/tab-separated-values" in accept.lower()


def _indent(pretty: str | None) -> int | None:
    """JSON indentation asked by the ``pretty`` query parameter: 2, or ``None`` (compact)."""
    if pretty is None or pretty.strip().lower() in ("false", "0", "no", "off"):
        return None
    if pretty.strip().lower() in ("", "true", "1", "yes", "on"):
        return 2
    raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"pretty must be true or false (or bare ?pretty), got {pretty!r}")


def encode_answer(
    result: EngineResult,
    ids: Sequence[str],
    lengths: Sequence[int],
    *,
    tsv: bool = False,
    indent: int | None = None,
) -> list[bytes]:
    """The body of a search answer, in pieces: TSV, or a JSON list with one object per query.

    Each query goes through the gRPC answer's own conversion
    (:func:`~esmsearch.server.servicer.fill_results`) and then the CLI's writers
    (:func:`~esmsearch.client.formats.write_tsv`,
    :func:`~esmsearch.client.formats.results_to_jsonable`), so HTTP, gRPC and the CLI
    share one shape. Query by query, straight into UTF-8 bytes, because every step that
    holds the GIL stalls the event loop for as long as it runs: no object per hit
    outlives its query (the garbage collector never walks a million of them), and no call
    encodes, joins or copies the whole answer at once (json's C encoder, ``str.encode``
    and the event loop's socket buffer would, for hundreds of MB): the pieces, one per
    query, are sent one after another. Meant for a worker thread: it takes seconds for a
    million hits.

    Args:
        result: the engine's answer.
        ids: query ids, in request order.
        lengths: query lengths in residues.
        tsv: TSV with a header line instead of JSON.
        indent: JSON indentation: ``2`` gives byte for byte ``esmsearch search --format
            json``'s output; ``None`` is compact (no spaces, one line).

    Returns:
        UTF-8 text ending with a newline, in pieces (``b"".join`` them for the whole).
    """
    out: list[bytes] = []
    text = io.StringIO()
    if tsv:
        write_tsv([], text)  # the header line
    else:
        text.write("[")
    for i, (qid, length, hits) in enumerate(zip(ids, lengths, result.hits, strict=True)):
        message = search_pb2.SearchResponse()
        fill_results(message, [qid], [length], [hits])
        query = QueryResult.from_proto(message.results[0], result.index_version)
        if tsv:
            write_tsv([query], text, header=False)
        elif indent is None:
            text.write(("," if i else "") + json.dumps(results_to_jsonable([query])[0], separators=(",", ":")))
        else:  # as one json.dump(..., indent=indent) of the whole list writes each element
            element = json.dumps(results_to_jsonable([query])[0], indent=indent)
            text.write((",\n" if i else "\n") + textwrap.indent(element, " " * indent, lambda _line: True))
        out.append(text.getvalue().encode())
        text.seek(0)
        text.truncate()
    if not tsv:
        text.write("\n]\n" if indent is not None and ids else "]\n")
    out.append(text.getvalue().encode())
    return out


router = APIRouter(route_class=_ApiRoute, dependencies=[Security(HTTPBearer(auto_error=False))])


@router.post(
    "/v1/search",
    summary="Search query sequences",
    response_model=list[QueryResultOut],
    responses={
        200: {
            "description": "one object per query, in request order (JSON as `esmsearch search --format json`), "
            "or one hit per line (TSV as `esmsearch search --format tsv`)",
            "content": {"text/tab-separated-values": {"schema": {"type": "string"}}},
        },
        **_ERRORS,
    },
)
async def search(
    request: Request,
    body: SearchBody,
    fmt: Annotated[
        Literal["json", "tsv"] | None,
        Query(alias="format", description="json (default) or tsv; also Accept: text/tab-separated-values"),
    ] = None,
    pretty: Annotated[
        str | None,
        Query(
            description="`?pretty` or `?pretty=true`: JSON indented by 2 spaces, byte for byte what "
            "`esmsearch search --format json` prints; default (or `false`): compact JSON on one line"
        ),
    ] = None,
) -> Response:
    """Embed the queries and return each one's ``k`` nearest database sequences by cosine score.

    The queries go through the same validation, limits, admission bounds and model
    scheduler as gRPC ``Search``. The answer is compact JSON, or with ``?pretty`` byte
    for byte what ``esmsearch search --format json`` writes; it is converted and encoded
    in a worker thread, so that a large answer never holds up ``/readyz``, ``/healthz``
    or other requests on the event loop.
    """
    rec = _record(request)
    servicer = _context(request).servicer
    queries = _queries(body)
    rec.queries, rec.k = len(queries), body.k
    sequences = check_queries(queries, servicer.limits)
    min_score = check_k(body.k, body.min_score, servicer.limits)
    # Checked against the index served now; the batch re-checks the version it runs on.
    max_evalue = check_max_evalue(body.max_evalue, servicer.engine.index)
    evalue_db_size = check_evalue_db_size(body.evalue_db_size, zero_is_unset=False)
    timeout_s = _check_timeout(body.timeout_s)
    indent = _indent(pretty)
    rec.residues = sum(len(s) for s in sequences)
    gone = threading.Event()
    future = servicer.batcher.submit_search(
        sequences,
        body.k,
        min_score,
        max_evalue=max_evalue,
        is_active=lambda: not gone.is_set(),
        timeout_s=timeout_s,
        evalue_db_size=evalue_db_size,
    )
    result = await _model_result(future, request.receive, gone, timeout_s)
    assert isinstance(result, EngineResult)
    rec.queue_s, rec.embed_s, rec.search_s = result.queue_s, result.embed_s, result.search_s
    tsv = _wants_tsv(fmt, request.headers.get("accept", ""))
    ids, lengths = [q.query_id for q in queries], [len(s) for s in sequences]
    # Off the event loop: a million hits take seconds to convert and encode.
    pieces = await run_in_threadpool(encode_answer, result, ids, lengths, tsv=tsv, indent=indent)
    media_type = TSV_MEDIA_TYPE if tsv else "application/json"
    if len(pieces) <= 2:
        return Response(b"".join(pieces), media_type=media_type)
    # Sent piece by piece (each a thread hop away from the loop), with the length known.
    length = str(sum(len(p) for p in pieces))
    return StreamingResponse(iter(pieces), media_type=media_type, headers={"content-length": length})


@router.get("/v1/index", summary="The served index and the request limits", response_model=IndexInfo, responses=_ERRORS)
async def index_info(request: Request) -> Response:
    """Model, index version and size, and the per-request limits (gRPC ``GetIndexInfo``)."""
    info = IndexInfo.from_proto(_context(request).servicer.index_info())
    return JSONResponse(dataclasses.asdict(info))


# -- the application --------------------------------------------------------------------------


def create_http_app(
    servicer: HomologSearchServicer,
    *,
    tokens: frozenset[str] = frozenset(),
    max_body_bytes: int = 4 << 20,
    max_requests: int = 1024,
) -> FastAPI:
    """The ASGI application: the ``/v1`` API over ``servicer``'s engine and scheduler, health, docs, page.

    Args:
        servicer: the gRPC servicer whose engine, scheduler, limits and observer
            (logs, metrics, status mapping) the API shares.
        tokens: accepted bearer tokens; empty = no token needed.
        max_body_bytes: largest request body; beyond it -> 413, by ``Content-Length``
            before the body is read, else while it is read.
        max_requests: most requests in flight (probes not counted); beyond it -> 429
            with ``Retry-After`` (``ServerConfig.max_concurrent_requests``).

    Returns:
        A FastAPI application (``app.state.esmsearch`` holds the shared parts).
    """
    started = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        started.set()
        yield

    app = FastAPIOffline(
        title="esmsearch",
        version=esmsearch.__version__,
        summary="Protein remote-homology search with ESM-2 embeddings: HTTP/JSON API",
        description=(
            "Search protein sequences against the served index by cosine similarity of mean-pooled "
            "ESM-2 embeddings. The same server answers gRPC (`esmsearch.v1.HomologSearch`). "
            "When the server has tokens, send `Authorization: Bearer <token>` to every `/v1` endpoint."
        ),
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # no request to swagger.io's validator
    )
    ctx = _Context(
        servicer=servicer,
        tokens=frozenset(tokens),
        max_body_bytes=max_body_bytes,
        max_requests=max_requests,
        traffic=_Traffic(),
        started=started,
    )
    app.state.esmsearch = ctx
    app.include_router(router)
    app.add_middleware(_TransportLimits, ctx=ctx)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods get the API's error shape too.
        return JSONResponse(
            {"code": HTTPStatus(exc.status_code).name, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.get("/healthz", summary="Liveness: the process serves HTTP", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="Readiness: model and index loaded, not draining",
        tags=["health"],
        responses={503: {"model": ErrorOut, "description": "draining for shutdown"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        ctx = _context(request)
        if ctx.traffic.draining:
            status = Status(grpc.StatusCode.UNAVAILABLE, "the server is draining for shutdown")
            return _error_response(status)
        # Readiness only: no index version, no paths (probes need no token; GET /v1/index has them).
        return JSONResponse({"status": "ready"})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn serving an :func:`create_http_app` application in a thread of this process.

    Binds when built (so a busy port fails :func:`esmsearch.server.create_server`),
    serves after :meth:`start`, and stops in the server's stop sequence: :meth:`begin_drain`
    (``/readyz`` and new ``/v1`` requests answer 503), then :meth:`stop` (in-flight
    requests get until the deadline, then uvicorn shuts down and its thread is joined).

    Args:
        app: the application.
        host: interface to bind (the gRPC server's).
        port: TCP port, 0 = a free one.
        tls: the gRPC server's TLS material (same certificate, key and client CA), or
            ``None`` for plain HTTP.
        limit_concurrency: uvicorn's cap on open connections and tasks (a plain 503
            beyond it; ``ServerConfig.http_limit_concurrency``), ``None`` = none.

    Attributes:
        port: the bound port.
        scheme: ``https`` with TLS, else ``http``.

    Raises:
        OSError: the address cannot be bound.
        ssl.SSLError: the TLS files cannot be used.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str,
        port: int,
        tls: TlsConfig | None = None,
        limit_concurrency: int | None = None,
    ) -> None:
        self._app = app
        self._ctx = app.state.esmsearch
        assert isinstance(self._ctx, _Context)
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        try:
            config = uvicorn.Config(
                app,
                log_config=None,  # logging is configured by the entry points only
                access_log=False,  # RpcObserver writes each request's line
                proxy_headers=False,  # log the real peer
                server_header=False,
                lifespan="on",
                limit_concurrency=limit_concurrency,
                http="h11",
                loop="asyncio",
                ssl_certfile=str(tls.cert_file) if tls is not None else None,
                ssl_keyfile=str(tls.key_file) if tls is not None else None,
                ssl_ca_certs=str(tls.client_ca_file) if tls is not None and tls.client_ca_file else None,
                ssl_cert_reqs=ssl.CERT_REQUIRED if tls is not None and tls.client_ca_file else ssl.CERT_NONE,
            )
            config.load()  # TLS and app errors surface here, in the caller's thread
        except BaseException:
            self._sock.close()
            raise
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._ended = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._uvicorn.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
        finally:
            self._ended.set()
            self._ctx.started.set()  # wakes start() if uvicorn ended before the app started

    def start(self) -> None:
        """Serve in the thread ``esmsearch-http``; returns once the application has started.

        Raises:
            OSError: uvicorn did not start.
        """
        self._thread = threading.Thread(target=self._run, name="esmsearch-http", daemon=True)
        self._thread.start()
        if not self._ctx.started.wait(_THREAD_WAIT_S) or self._ended.is_set():
            self._uvicorn.should_exit = True
            raise OSError(f"the HTTP server did not start: {self._error!r}")

    def begin_drain(self) -> None:
        """``/readyz`` and new ``/v1`` requests answer 503 from now on; idempotent."""
        self._ctx.traffic.drain()

    def stop(self, deadline: float) -> None:
        """Drain, wait for in-flight ``/v1`` requests until ``deadline`` (``time.monotonic()``),
        then shut uvicorn down and join its thread; idempotent."""
        self.begin_drain()
        if self._thread is None:
            self._sock.close()
            return
        if not self._ctx.traffic.wait_idle(deadline - time.monotonic()):
            log.warning("HTTP requests still in flight at the end of the grace period; closing their connections")
        self._uvicorn.config.timeout_graceful_shutdown = max(0, math.ceil(deadline - time.monotonic()))
        self._uvicorn.should_exit = True
        self._thread.join(_THREAD_WAIT_S + max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("HTTP thread still running %.0f s after stop", _THREAD_WAIT_S)
