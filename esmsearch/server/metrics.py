"""Prometheus metrics of the search server, served on their own HTTP port.

Every :class:`ServerMetrics` owns a private ``CollectorRegistry`` (so several servers
in one process, as in tests, never clash) and is exposed by
:meth:`ServerMetrics.start_http` in the Prometheus text format at ``/metrics``.
Metric names follow the Prometheus naming guide (base units: seconds; ``_total``
for counters):

=====================================  =========  ===========================================
name                                   type       meaning
=====================================  =========  ===========================================
esmsearch_requests_total{rpc}          counter    RPCs finished, any status
esmsearch_errors_total{rpc,code}       counter    RPCs finished with a status other than OK
esmsearch_queue_depth                  gauge      requests waiting for the model scheduler
esmsearch_queries_in_flight            gauge      query sequences admitted, not yet answered
esmsearch_queued_residues              gauge      residues of those sequences
esmsearch_dropped_requests_total       counter    queued requests dropped (deadline/cancel)
esmsearch_batches_total                counter    model batches run by the batcher
esmsearch_batch_sequences              histogram  sequences per batch
esmsearch_batch_tokens                 histogram  tokens (residues + 2 per sequence) per batch
esmsearch_stage_seconds{rpc,stage}     histogram  per-request latency of stage queue, embed,
                                                  search, total (seconds)
=====================================  =========  ===========================================
"""

from __future__ import annotations

import threading
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["LATENCY_BUCKETS_S", "ServerMetrics"]

#: Latency histogram buckets in seconds (0.5 ms .. 60 s).
LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS: Final = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576)


class ServerMetrics:
    """The server's Prometheus metrics (see the module docstring for the list).

    Attributes:
        registry: the private registry holding every metric below.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("esmsearch_requests", "RPCs finished, any status", ["rpc"], registry=r)
        self.errors = Counter("esmsearch_errors", "RPCs finished with a non-OK status", ["rpc", "code"], registry=r)
        self.queue_depth = Gauge("esmsearch_queue_depth", "Requests waiting for the model scheduler", registry=r)
        self.queries_in_flight = Gauge(
            "esmsearch_queries_in_flight", "Query sequences admitted and not yet answered", registry=r
        )
        self.queued_residues = Gauge(
            "esmsearch_queued_residues", "Residues of the query sequences admitted and not yet answered", registry=r
        )
        self.dropped = Counter(
            "esmsearch_dropped_requests",
            "Queued requests dropped before embedding (deadline passed or call cancelled)",
            registry=r,
        )
        self.batches = Counter("esmsearch_batches", "Model batches run by the batcher", registry=r)
        self.batch_sequences = Histogram(
            "esmsearch_batch_sequences", "Sequences per batch", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "esmsearch_batch_tokens",
            "Tokens per batch (residues + BOS + EOS per sequence)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "esmsearch_stage_seconds",
            "Per-request latency by stage (queue, embed, search, total) in seconds",
            ["rpc", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._http: object | None = None
        self._http_thread: threading.Thread | None = None

    def observe_batch(self, n_sequences: int, n_tokens: int, embed_s: float, search_s: float) -> None:
        """Record one batch of the dynamic batcher."""
        self.batches.inc()
        self.batch_sequences.observe(n_sequences)
        self.batch_tokens.observe(n_tokens)

    def observe_request(
        self,
        rpc: str,
        code: str,
        *,
        queue_s: float,
        embed_s: float,
        search_s: float,
        total_s: float,
    ) -> None:
        """Record one finished RPC (``code`` is a ``grpc.StatusCode`` name, e.g. ``"OK"``)."""
        self.requests.labels(rpc).inc()
        if code != "OK":
            self.errors.labels(rpc, code).inc()
        for stage, seconds in (
            ("queue", queue_s),
            ("embed", embed_s),
            ("search", search_s),
            ("total", total_s),
        ):
            self.stage_seconds.labels(rpc, stage).observe(seconds)

    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` in a daemon thread.

        Args:
            port: TCP port; 0 picks a free one.
            addr: interface to bind (default loopback only).

        Returns:
            The bound port.

        Raises:
            OSError: the port cannot be bound.
        """
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http, self._http_thread = server, thread
        return int(server.server_port)

    def stop_http(self) -> None:
        """Stop the HTTP endpoint, if started; idempotent."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
