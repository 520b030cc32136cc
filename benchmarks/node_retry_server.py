"""A stand-in esmsearch server for ``benchmarks/node_retry.sh``: busy, then answering.

``GetIndexInfo`` answers from the real server's status mapping
(:func:`esmsearch.server.rpc.status_for`), so the trailers a third-party client sees
are the ones ``esmsearch serve`` sends. The scenario comes from the call's
``x-scenario`` metadata:

* ``busy``: the first 3 attempts get RESOURCE_EXHAUSTED from a full admission
  (:class:`~esmsearch.errors.ServerBusyError`, retry after 200 ms: trailers
  ``grpc-retry-pushback-ms: 200`` and ``retry-after-ms: 200``), then an answer;
* ``permanent``: every attempt gets RESOURCE_EXHAUSTED over a permanent limit
  (:class:`~esmsearch.errors.RequestTooLargeError`: ``grpc-retry-pushback-ms: -1``);
* ``unavailable``: the first 2 attempts get UNAVAILABLE without a trailer, then an answer.

Prints ``PORT`` once listening; on SIGTERM prints one line per attempt,
``attempt SCENARIO N T_MS`` (ms since the scenario's first attempt).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import defaultdict
from concurrent import futures

import grpc

from esmsearch.errors import RequestTooLargeError, ServerBusyError
from esmsearch.server.rpc import status_for
from esmsearch.v1 import search_pb2, search_pb2_grpc


class Busy(search_pb2_grpc.HomologSearchServicer):
    def __init__(self) -> None:
        self.attempts: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def GetIndexInfo(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        scenario = dict(context.invocation_metadata()).get("x-scenario", "busy")
        with self.lock:
            self.attempts[scenario].append(time.monotonic())
            n = len(self.attempts[scenario])
        exc: Exception | None = None
        if scenario == "busy" and n <= 3:
            exc = ServerBusyError("server busy: admission full", retry_after_s=0.2)
        elif scenario == "permanent":
            exc = RequestTooLargeError("request has 5000 queries, over the server's limit of 1024")
        elif scenario == "unavailable" and n <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if exc is not None:
            status = status_for(exc)
            context.set_trailing_metadata(status.trailing_metadata)
            context.abort(status.code, status.details)
        return search_pb2.IndexInfo(count=n, index_version="node-retry")


def main() -> int:
    servicer = Busy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    search_pb2_grpc.add_HomologSearchServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)
    for scenario, times in servicer.attempts.items():
        for i, t in enumerate(times, start=1):
            print(f"attempt {scenario} {i} {1e3 * (t - times[0]):.0f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
