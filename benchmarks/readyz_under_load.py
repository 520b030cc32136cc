"""``/readyz`` latency while the HTTP API builds a large search answer.

One run, one in-process server (``create_server`` with ``http_port``) over an index of
E. coli proteins built with a seeded random 2-layer ESM-2 (dim 32: the model is not
what is measured). One request of ``--queries`` queries at ``-k`` (default 500 x 2,000
= 1M hits) is posted to ``/v1/search`` while a prober thread asks ``GET /readyz`` back
to back on its own connection, for the whole life of the big request. Two ways, side by
side in the same run and server:

* **on loop** -- what the server did before issue 19: the answer converted and encoded on
  the asyncio event loop (``run_in_threadpool`` replaced by a direct call), indented
  JSON (the old default);
* **worker thread** -- now: converted and encoded in a worker thread, compact JSON, sent
  one piece per query.

The big request's client and the prober each run in their own process (a prober in
the server's process would wait for the server's GIL itself, as no real probe does). A
first row probes for 10 s with no request at all: the machine's own noise (a shared
VM's steal time shows there).

``--gc-freeze`` calls ``gc.freeze()`` after the server has started, as ``esmsearch
serve`` does (``create_server``, used here, does not): the objects of start-up (torch,
the model, the index; hundreds of thousands) then leave the cyclic garbage collector's
generations, whose full collections -- 100+ ms each with them, holding the GIL,
several during a 1M-hit answer -- were the worst case of the worker-thread row.

``--switch-interval-ms 1 0.5`` adds worker-thread rows with ``sys.setswitchinterval`` set
to each value (Python's default is 5 ms): whether the loop's waits for the GIL handover
are what the slowest probes wait for.

Printed per way: wall seconds of the big request, the number of probes, p50 / p99 / max
``/readyz`` latency in ms (target: answers within 50 ms), and the CPU with the load
average (the machine's other load shows in these figures).

Usage::

    python benchmarks/readyz_under_load.py [--queries 500] [-k 2000] [--db 2200]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

ECOLI = Path(__file__).resolve().parents[2] / "shared" / "data" / "seqdb" / "UP000000625_83333_Ecoli_K12_2020.fasta"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3


#: The big request's client, in its own process (its own GIL: receiving and parsing a
#: few hundred MB must not be charged to the server). argv: URL, params JSON, body file.
_CLIENT = """
import json, sys, httpx
url, params, body = sys.argv[1], json.loads(sys.argv[2]), open(sys.argv[3], "rb").read()
r = httpx.post(url, params=params, content=body, headers={"content-type": "application/json"}, timeout=600)
assert r.status_code == 200, r.text[:500]
print(len(r.content), sum(len(q["hits"]) for q in r.json()))
"""


#: The prober, in its own process as a load balancer's or kubelet's probe is (inside the
#: server's process its own GIL waits would be charged to the server). argv: base URL,
#: stop-file path. Prints one "start_s latency_s" line per probe, times from its start.
_PROBER = """
import os, sys, time, httpx
base, stop = sys.argv[1], sys.argv[2]
with httpx.Client(base_url=base, timeout=120) as client:
    client.get("/readyz")  # connect first: the connection is not what is measured
    print("ready", flush=True)
    begin, out = time.perf_counter(), []
    while not os.path.exists(stop):
        t0 = time.perf_counter()
        r = client.get("/readyz")
        out.append((t0 - begin, time.perf_counter() - t0))
        assert r.status_code == 200, r.text
print("\\n".join(f"{a} {b}" for a, b in out))
"""


def probe_while(base_url: str, busy: Callable[[], Any], work: Path) -> tuple[float, list[tuple[float, float]]]:
    """Run ``busy()`` while another process times ``GET /readyz`` back to back.

    Returns:
        ``(busy seconds, [(start of the probe in s since probing began, latency s), ...])``.
    """
    stop = work / "stop-probing"
    stop.unlink(missing_ok=True)
    prober = subprocess.Popen([sys.executable, "-c", _PROBER, base_url, str(stop)], stdout=subprocess.PIPE, text=True)
    assert prober.stdout is not None
    assert prober.stdout.readline().strip() == "ready"
    t_begin = time.perf_counter()
    try:
        busy()
    finally:
        busy_s = time.perf_counter() - t_begin
        stop.touch()
        out, _ = prober.communicate(timeout=120)
    probes = [(float(a), float(b)) for a, b in (line.split() for line in out.splitlines() if line.strip())]
    return busy_s, probes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=500, help="queries in the big request")
    p.add_argument("-k", type=int, default=2000, help="hits per query")
    p.add_argument("--db", type=int, default=2200, help="database sequences (>= k), from E. coli, <= 400 residues")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="call gc.freeze() once the server has started (what start-up could do; see the module docstring)",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        nargs="*",
        default=[],
        help="also the worker-thread way with sys.setswitchinterval set to each of these (Python's default: 5 ms)",
    )
    args = p.parse_args(argv)
    if args.db < args.k:
        p.error("--db must be >= -k")

    from esmsearch.checkpoints import write_random_checkpoint
    from esmsearch.indexer import build_index
    from esmsearch.sequences import read_fasta
    from esmsearch.server import (
        AdmissionConfig,
        BatchingConfig,
        RequestLimits,
        ServerConfig,
        create_server,
        httpapi,
    )

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); load average at start {os.getloadavg()[0]:.2f}")
    records = [r for r in read_fasta(ECOLI) if len(r.sequence) <= 400][: args.db]
    with tempfile.TemporaryDirectory(prefix="esmsearch-readyz-bench-") as tmp:
        work = Path(tmp)
        fasta = work / "db.fasta"
        fasta.write_text("".join(f">{r.record_id} {r.description}\n{r.sequence}\n" for r in records))
        ckpt = write_random_checkpoint(
            "esm2_t6_8M_UR50D", work, seed=1234, num_layers=2, embed_dim=32, attention_heads=4, name="esm2_tiny"
        )
        t0 = time.perf_counter()
        build_index(fasta, work / "index", model=str(ckpt), device="cpu", decoys=200)
        print(f"index: {len(records)} E. coli proteins, built in {time.perf_counter() - t0:.1f} s")
        n_hits = args.queries * args.k
        limits: dict[str, Any] = {
            "max_k": args.k,
            "max_queries_per_request": args.queries,
            "max_residues_per_request": 400 * args.queries,
        }
        admission: dict[str, Any] = {}
        if "max_hits_per_request" in {f.name for f in dataclasses.fields(AdmissionConfig)}:
            admission["max_hits_per_request"] = n_hits
        srv, _port = create_server(
            ServerConfig(
                index=work / "index",
                port=0,
                http_port=0,
                device="cpu",
                limits=RequestLimits(**limits),
                admission=AdmissionConfig(**admission),
                batching=BatchingConfig(enabled=False),
                grace_s=1.0,
            )
        )
        base_url = f"http://127.0.0.1:{srv.http_port}"
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
            print(f"gc.freeze(): {gc.get_freeze_count()} objects left out of every collection from now on")
        queries = records[: args.queries]
        body = work / "body.json"
        body.write_text(
            json.dumps({"queries": [{"id": r.record_id, "sequence": r.sequence} for r in queries], "k": args.k})
        )
        real_run_in_threadpool = httpapi.run_in_threadpool

        async def on_loop(func: Callable[..., Any], *a: Any, **kw: Any) -> Any:
            return func(*a, **kw)

        rows = []
        default_switch = sys.getswitchinterval()
        try:
            # Baseline: the same probing with no request at all (the machine's own noise).
            busy_s, probes = probe_while(base_url, lambda: time.sleep(10.0), work)
            rows.append(("idle (no request)", busy_s, 0, probes))
            ways: list[tuple[str, Any, dict[str, str], float]] = [
                ("on loop", on_loop, {"pretty": "true"}, default_switch),
                ("worker thread", real_run_in_threadpool, {}, default_switch),
            ]
            ways += [
                (f"worker, switch {ms:g} ms", real_run_in_threadpool, {}, ms / 1e3) for ms in args.switch_interval_ms
            ]
            for name, runner, params, switch_s in ways:
                httpapi.run_in_threadpool = runner  # type: ignore[assignment]
                sys.setswitchinterval(switch_s)
                answer: list[str] = []

                def big(params: dict[str, str] = params, answer: list[str] = answer) -> None:
                    cmd = [sys.executable, "-c", _CLIENT, base_url + "/v1/search", json.dumps(params), str(body)]
                    answer.append(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

                busy_s, probes = probe_while(base_url, big, work)
                size, got = (int(x) for x in answer[0].split())
                assert got == n_hits, (got, n_hits)
                rows.append((name, busy_s, size, probes))
        finally:
            httpapi.run_in_threadpool = real_run_in_threadpool
            sys.setswitchinterval(default_switch)
            srv.stop(1.0)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(
        f"\none request of {args.queries} queries x k={args.k} = {n_hits} hits; /readyz probed back to back meanwhile"
    )
    print(
        f"{'answer built':<18} {'request s':>9} {'MB':>6} {'probes':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'> 50 ms':>7}  slowest (at s: ms)"
    )
    for name, busy_s, size, probes in rows:
        lat = [latency for _at, latency in probes]
        slowest = sorted(probes, key=lambda p: -p[1])[:3]
        print(
            f"{name:<18} {busy_s:9.1f} {size / 1e6:6.1f} {len(lat):6d} {statistics.median(lat) * 1e3:8.1f} "
            f"{_pct(lat, 99):8.1f} {max(lat) * 1e3:8.1f} {sum(x > 0.05 for x in lat):7d}  "
            + ", ".join(f"{at:.1f}: {latency * 1e3:.0f}" for at, latency in slowest)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
