"""Admission control: one bound on the work a server accepts, whatever the RPC, batching on or off.

Every request that searches or needs the model -- Search, each SearchStream message,
SearchByEmbedding, Embed, and their HTTP twins -- is *admitted* before any work is
queued or done for it, and *released* when it has been answered, failed or dropped.
Two limits bound what is admitted at once:

* ``max_queries_in_flight``: query sequences (or query vectors) queued, being
  embedded or being searched;
* ``max_queued_residues``: residues of those sequences (the model's work grows with
  residues, so this bounds the backlog in time as well as in memory; a query vector
  has none).

and one bounds each request's output:

* ``max_hits_per_request``: queries x k, the most hits one answer may hold (E-values,
  metadata lookups and the response all grow with it).

A request that does not fit *now* gets :class:`~esmsearch.errors.ServerBusyError`
(RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms`` and ``retry-after-ms`` trailing
metadata): the estimate is the time the work ahead of it needs at the recently
measured embedding rate, so a client that waits that long finds room. A request that
could *never* fit -- more queries or residues than the limits themselves -- gets
:class:`~esmsearch.errors.RequestTooLargeError` (RESOURCE_EXHAUSTED, pushback ``-1``:
retrying it is pointless, it must be split). A request asking for more hits than
``max_hits_per_request`` is INVALID_ARGUMENT (a :class:`~esmsearch.server.rpc.Reject`
naming the limit and the request's figure), never retried: lower k or send fewer
queries. The limits reported to clients in ``GetIndexInfo.limits`` already take the
first two bounds into account, so the client library splits its requests to fit.

This is the "bounded queue + explicit back-pressure" of Triton Inference Server and
of gRPC's own ``maximum_concurrent_rpcs``, counted in model work rather than in RPCs;
the transport caps (:attr:`esmsearch.server.config.ServerConfig.max_concurrent_requests`)
are derived from these bounds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Final

import grpc

from esmsearch.errors import ConfigError, RequestTooLargeError, ServerBusyError
from esmsearch.protocol import (
    DEFAULT_MAX_HITS_PER_REQUEST,
    DEFAULT_MAX_QUERIES_IN_FLIGHT,
    DEFAULT_MAX_QUEUED_RESIDUES,
)
from esmsearch.server.rpc import Reject

__all__ = [
    "DEFAULT_MAX_HITS_PER_REQUEST",
    "DEFAULT_MAX_QUERIES_IN_FLIGHT",
    "DEFAULT_MAX_QUEUED_RESIDUES",
    "Admission",
    "AdmissionConfig",
    "Ticket",
]

#: retry-after hint before any embedding rate has been measured, and its bounds (ms).
_RETRY_AFTER_DEFAULT_MS: Final = 100
_RETRY_AFTER_MIN_MS: Final = 10
_RETRY_AFTER_MAX_MS: Final = 30_000
#: Weight of the newest batch in the moving average of the embedding rate.
_RATE_EMA_WEIGHT: Final = 0.3


@dataclass(frozen=True)
class AdmissionConfig:
    """Bounds on the model work admitted at once (see the module docstring).

    Attributes:
        max_queries_in_flight: query sequences (or vectors) queued, being embedded or
            being searched, >= 1.
        max_queued_residues: residues of those sequences, >= 1.
        max_hits_per_request: most hits one request may ask for (queries x k), >= 1
            (``esmsearch serve --max-hits-per-request``, default
            :data:`~esmsearch.protocol.DEFAULT_MAX_HITS_PER_REQUEST`).

    Raises:
        ConfigError: a bound is not an integer >= 1.
    """

    max_queries_in_flight: int = DEFAULT_MAX_QUERIES_IN_FLIGHT
    max_queued_residues: int = DEFAULT_MAX_QUEUED_RESIDUES
    max_hits_per_request: int = DEFAULT_MAX_HITS_PER_REQUEST

    def __post_init__(self) -> None:
        for name in ("max_queries_in_flight", "max_queued_residues", "max_hits_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Ticket:
    """What one admitted request holds until it is released."""

    queries: int
    residues: int


class Admission:
    """Thread-safe accounting of admitted work against an :class:`AdmissionConfig`.

    Args:
        config: the bounds.
    """

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self._lock = threading.Lock()
        self._queries = 0
        self._residues = 0
        self._residues_per_s: float | None = None

    @property
    def queries_in_flight(self) -> int:
        """Query sequences admitted and not yet released."""
        return self._queries

    @property
    def queued_residues(self) -> int:
        """Residues admitted and not yet released."""
        return self._residues

    def admit(self, queries: int, residues: int, hits: int = 0) -> Ticket:
        """Admit a request of ``queries`` sequences (or vectors), ``residues`` residues and
        ``hits`` hits asked for (queries x k; 0 for Embed), or refuse it.

        Returns:
            A :class:`Ticket` to pass to :meth:`release` exactly once.

        Raises:
            Reject: INVALID_ARGUMENT: ``hits`` is over ``max_hits_per_request`` (the
                message names the limit and the request's figure; never retried).
            RequestTooLargeError: the request alone exceeds a bound (permanent: split it).
            ServerBusyError: it does not fit next to the work admitted now; its
                ``retry_after_s`` estimates when it would.
        """
        cfg = self.config
        if hits > cfg.max_hits_per_request:
            raise Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request asks for {hits:,} hits ({queries:,} queries x k = {hits // max(1, queries):,}), over the "
                f"server's limit of {cfg.max_hits_per_request:,} hits per request (max_hits_per_request); "
                "lower k or send fewer queries per request",
            )
        if queries > cfg.max_queries_in_flight:
            raise RequestTooLargeError(
                f"request has {queries} queries, over the server's limit of {cfg.max_queries_in_flight} "
                "queries in flight; split it into smaller requests"
            )
        if residues > cfg.max_queued_residues:
            raise RequestTooLargeError(
                f"request has {residues} residues, over the server's limit of {cfg.max_queued_residues} "
                "queued residues; split it into smaller requests"
            )
        with self._lock:
            if (
                self._queries + queries > cfg.max_queries_in_flight
                or self._residues + residues > cfg.max_queued_residues
            ):
                ahead = self._residues
                retry_after_s = self._retry_after_s(ahead)
                raise ServerBusyError(
                    f"server busy: {self._queries} queries ({ahead} residues) in flight, limits "
                    f"{cfg.max_queries_in_flight} queries and {cfg.max_queued_residues} residues; "
                    f"retry after {retry_after_s * 1e3:.0f} ms",
                    retry_after_s=retry_after_s,
                )
            self._queries += queries
            self._residues += residues
        return Ticket(queries, residues)

    def release(self, ticket: Ticket) -> None:
        """Return an admitted request's share (answered, failed or dropped)."""
        with self._lock:
            self._queries -= ticket.queries
            self._residues -= ticket.residues

    def observe_rate(self, residues: int, seconds: float) -> None:
        """Feed one forward pass (``residues`` embedded in ``seconds``) into the rate estimate."""
        if residues <= 0 or not seconds > 0:
            return
        rate = residues / seconds
        with self._lock:
            old = self._residues_per_s
            self._residues_per_s = rate if old is None else (1 - _RATE_EMA_WEIGHT) * old + _RATE_EMA_WEIGHT * rate

    def _retry_after_s(self, residues_ahead: int) -> float:
        rate = self._residues_per_s
        if rate is None:
            ms = float(_RETRY_AFTER_DEFAULT_MS)
        else:
            ms = 1e3 * residues_ahead / rate
        ms = min(float(_RETRY_AFTER_MAX_MS), max(float(_RETRY_AFTER_MIN_MS), math.ceil(ms)))
        return ms / 1e3
