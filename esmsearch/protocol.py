"""What server and client agree on besides ``search.proto``: names, metadata keys, default limits.

One place for the constants both sides use, importable without torch, FAISS or the
server (the client and ``esmsearch --help`` import it):

* the service name (also the health-check service name the servers report);
* the trailing-metadata keys of a busy server's retry hint: gRPC's standard
  ``grpc-retry-pushback-ms`` (gRFC A6, understood by every gRPC client that has a
  ``retryPolicy`` in its service config) and esmsearch's own ``retry-after-ms``
  (kept for clients written against earlier servers);
* the default admission bounds of ``esmsearch serve``.

Retry hints, as the server sends them (``esmsearch.server.rpc.status_for``):

==========================================  ========================  =================
answer                                      ``grpc-retry-pushback-ms``  ``retry-after-ms``
==========================================  ========================  =================
RESOURCE_EXHAUSTED, admission full now      ms to wait (>= 0)         ms to wait
RESOURCE_EXHAUSTED, over a permanent limit  ``-1`` (do not retry)     absent
anything else                               absent                    absent
==========================================  ========================  =================

A6 says a client with a retry policy waits exactly the pushback before its next
attempt, and never retries when the pushback is negative; so one standard trailer
tells every gRPC client both *when* and *whether* to retry.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_MAX_HITS_PER_REQUEST",
    "DEFAULT_MAX_QUERIES_IN_FLIGHT",
    "DEFAULT_MAX_QUEUED_RESIDUES",
    "NO_RETRY_PUSHBACK",
    "RETRY_AFTER_KEY",
    "RETRY_PUSHBACK_KEY",
    "SERVICE_NAME",
]

#: Fully-qualified name of the search service, and the health-check service name the
#: servers report SERVING/NOT_SERVING under (``package esmsearch.v1; service HomologSearch``).
SERVICE_NAME: Final = "esmsearch.v1.HomologSearch"
#: gRPC's standard server pushback trailer (gRFC A6 "gRPC Retry Design"): an integer
#: number of milliseconds as ASCII digits; a negative value means "do not retry".
RETRY_PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
#: The pushback value of an answer that no retry can change (a permanent limit).
NO_RETRY_PUSHBACK: Final = "-1"
#: esmsearch's own retry hint on RESOURCE_EXHAUSTED from a busy server (milliseconds,
#: ASCII digits); absent when retrying cannot help. Same value as the pushback.
RETRY_AFTER_KEY: Final = "retry-after-ms"

#: Default most query sequences admitted (queued or being embedded/searched) at once:
#: >= the default per-request limit of 1,000 queries, so any valid request can be admitted.
DEFAULT_MAX_QUERIES_IN_FLIGHT: Final = 1024
#: Default most residues admitted at once (>= the default per-request limit of 1,000,000).
DEFAULT_MAX_QUEUED_RESIDUES: Final = 1_048_576
#: Default most hits one request may ask for (queries x k): 100 queries at the largest
#: default k (1,000), or a full request of 1,000 queries at k = 100. A hit is ~100-200 bytes on the wire,
#: so the default answer is at most ~20 MB.
DEFAULT_MAX_HITS_PER_REQUEST: Final = 100_000
