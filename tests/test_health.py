"""The health service's Watch streams: closing channels while statuses change never stalls the server.

grpcio-health-checking's own servicer deadlocks here (see esmsearch/server/health.py);
the test drives exactly that race: clients open a Watch stream and close their
channel at once while another thread keeps setting statuses.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmsearch.server.health import HealthServicer

SERVICE = "esmsearch.v1.HomologSearch"
STATUSES = (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


def _watch_then_close(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
        next(stream)  # the first status arrived: the stream is registered
    # leaving the block closes the channel: the server runs the stream's close callback


def test_closing_watch_streams_while_statuses_change_never_stalls_the_server() -> None:
    servicer = HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            servicer.set(SERVICE, STATUSES[i % 2])
            i += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    pool = futures.ThreadPoolExecutor(max_workers=4)
    try:
        for f in [pool.submit(_watch_then_close, address) for _ in range(300)]:
            f.result(timeout=60)  # the stock servicer stalls here (TimeoutError), not forever
        stop.set()
        flipper.join(timeout=30)
        assert not flipper.is_alive(), "set() never returned: a send is stuck"
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
            )
        assert answer.status in STATUSES
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        server.stop(0).wait(10)
