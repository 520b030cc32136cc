"""Server memory kept per undecodable request: bare grpcio against esmsearch's guard.

grpcio's synchronous server never frees a call whose request message fails to
decode (see ``esmsearch/server/decoding.py``). This script shows it on a bare
``grpc.server`` with one unary method (request deserializer
``SearchRequest.FromString``), without any esmsearch server code, and side by side the
same server with :class:`esmsearch.server.decoding.RequestDecodingInterceptor`. Each
way runs in its own subprocess: ``--requests`` undecodable messages (``b"\\x0b"``, a
protobuf group that never ends) from one client in the same process, then the status
codes answered, the live ``grpc._server._RPCState`` objects after a ``gc.collect()``
(calls gRPC still holds), and the process's VmRSS before and after, in KiB per request.

Run it after a grpcio upgrade: if the bare server stops keeping call states, the bug
is fixed upstream and the guard only changes INTERNAL into INVALID_ARGUMENT.

Usage::

    python benchmarks/grpc_undecodable_leak.py [--requests 8000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, proc_status_kib  # noqa: E402


def one_way(guarded: bool, requests: int) -> dict[str, object]:
    import grpc
    from grpc._server import _RPCState

    from esmsearch.server.decoding import RequestDecodingInterceptor
    from esmsearch.v1 import search_pb2

    def behaviour(request: object, context: grpc.ServicerContext) -> bytes:
        return b""

    handler = grpc.method_handlers_generic_handler(
        "bench.Leak",
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=search_pb2.SearchRequest.FromString,
                response_serializer=lambda b: b,
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[RequestDecodingInterceptor()] if guarded else [],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    codes: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/bench.Leak/Call", request_serializer=None, response_deserializer=None)
        for _ in range(50):  # warm-up: the channel, threads and allocator pools
            try:
                call(b"\x0b", timeout=10)
            except grpc.RpcError:
                pass
        gc.collect()
        rss_before = proc_status_kib(os.getpid(), ("VmRSS",))["VmRSS"]
        states_before = sum(1 for o in gc.get_objects() if type(o) is _RPCState)
        t0 = time.perf_counter()
        for _ in range(requests):
            try:
                call(b"\x0b", timeout=10)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        gc.collect()
        states_after = sum(1 for o in gc.get_objects() if type(o) is _RPCState)
        rss_after = proc_status_kib(os.getpid(), ("VmRSS",))["VmRSS"]
    server.stop(1.0)
    return {
        "codes": codes,
        "states_left": states_after - states_before,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "wall_s": wall,
        "grpcio": grpc.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=8000)
    p.add_argument("--way", choices=("bare", "guarded"), help=argparse.SUPPRESS)  # one subprocess's way
    args = p.parse_args(argv)
    if args.way:
        print(json.dumps(one_way(args.way == "guarded", args.requests)))
        return 0
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.requests} undecodable request messages (b'\\x0b') to a one-method grpc.server, per way:")
    print(
        f"{'way':<42} {'answers':<24} {'call states left':>16} {'RSS MiB before':>14} {'after':>7} {'KiB/request':>11}"
    )
    growth = {}
    for way, label in (("bare", "bare grpcio"), ("guarded", "grpcio + RequestDecodingInterceptor")):
        out = subprocess.run(
            [sys.executable, __file__, "--way", way, "--requests", str(args.requests)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per = (r["rss_after_kib"] - r["rss_before_kib"]) / args.requests
        growth[way] = per
        answers = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        print(
            f"{label:<42} {answers:<24} {r['states_left']:>16} {r['rss_before_kib'] / 1024:>14.0f} "
            f"{r['rss_after_kib'] / 1024:>7.0f} {per:>11.2f}"
        )
    print(
        f"grpcio {r['grpcio']}; RSS growth per request, bare / guarded: "
        f"{growth['bare']:.2f} / {growth['guarded']:.2f} KiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
