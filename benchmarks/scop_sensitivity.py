"""SCOPe remote-homology sensitivity and speed: esmsearch vs MMseqs2 vs BLASTp.

One command runs the same queries against the same database through

* **esmsearch**: ``esmsearch index build`` + ``esmsearch serve`` + ``esmsearch search``
  through the real gRPC server and client (service overhead included);
* **MMseqs2** (Debian ``mmseqs2``): the steps of ``easy-search -s 7.5 -e 10000
  --max-seqs 2000`` run one by one (``createdb`` of queries and targets,
  ``createindex`` of the targets, then ``search`` + ``convertalis``), so that its
  search phase against a prebuilt database is timed on its own;
* **BLASTp** (Debian ``ncbi-blast+``): ``makeblastdb`` + ``blastp -evalue 10000
  -max_target_seqs 2000 -outfmt 6``;

all with the same thread count, and scores every tool's hits with the SCOPe
sensitivity of :mod:`esmsearch.evaluation` (Foldseek / Progres measure) at family,
superfamily and fold level. MMseqs2 and BLASTp hits are ranked by E-value (lower
is better), esmsearch hits by cosine score (higher is better).

Datasets (``--dataset``):

* ``progres208`` (default; Greener & Jamali 2025 protocol): the 400 query domains
  of ``progres_test_unseen_sid.txt`` searched against all 15,177 domains of
  ``progres_astral_40_upper_scope2.08.fa``; the 15,127 domains of
  ``progres_search_all_scope2.08_sid_sccs.txt`` carry labels, hits to the 50
  unlabelled ones are skipped.
* ``scope207``: SCOPe 2.07 ASTRAL 40% all-against-all (14,323 domains, labels from
  the FASTA headers), queries sampled with ``--max-queries`` (default 400 there).

Measurements per tool: wall time (s), CPU time (user + sys of the tool's process
tree, s) and peak RSS (largest single process of the tree, MiB), each taken by
``benchmarks/_measure.py`` around every tool process; for esmsearch the index
build, the server (whole life: load + serve) and the search client are summed (wall,
CPU) and maximised (RSS); the server's RSS is reported separately too.

**Search phase** (its own column): queries against a database built beforehand --
esmsearch: the client searches against the running server (index built and server
SERVING); MMseqs2: ``search`` + ``convertalis`` against the target DB with its
``createindex`` done; BLASTp: ``blastp`` against the ``makeblastdb`` database. Every
tool keeps up to 2,000 targets per query (esmsearch: ``-k 2000`` with the server
started at ``--max-k 2000``).

With the default model (a seeded random-weight ``esm2_t6_8M_UR50D`` checkpoint,
written on the fly) the esmsearch rows measure speed only and are labelled so; pass
``--model esm2_t6_8M_UR50D`` (pretrained name, downloads on first use) or
``--model /path/to/esm2_t33_650M_UR50D.pt`` to get quality numbers::

    python benchmarks/scop_sensitivity.py                      # default run
    python benchmarks/scop_sensitivity.py --model esm2_t33_650M_UR50D --device cuda

Writes ``scop_sensitivity_<dataset>.md`` (table), ``..._curves.png`` (cumulative
sensitivity curves), ``..._results.json`` into ``--out`` (default
``benchmarks/results/``), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from esmsearch.evaluation import (
    LEVELS,
    ScopLabel,
    SelfHit,
    SensitivityResult,
    cumulative_curve,
    evaluate,
    read_astral_fasta_labels,
    read_hits_tsv,
    read_sid_sccs,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "scop"
MEASURE = Path(__file__).resolve().parent / "_measure.py"
DEFAULT_ARCH = "esm2_t6_8M_UR50D"
RANDOM_LABEL = "random weights: speed only"


class BenchmarkError(RuntimeError):
    """A tool is missing or one of its runs failed."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """Queries, database and labels of one benchmark set."""

    name: str
    description: str
    queries: list[str]
    database: list[str]
    sequences: dict[str, str]
    labels: dict[str, ScopLabel]
    n_queries_total: int


def read_fasta(path: Path) -> dict[str, str]:
    """Read a FASTA file into id (first header word) -> uppercased sequence."""
    records: dict[str, list[str]] = {}
    current: list[str] | None = None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(">"):
                rid = line[1:].split()[0]
                if rid in records:
                    raise BenchmarkError(f"{path}: duplicate record id {rid!r}")
                current = records[rid] = []
            elif current is not None:
                current.append(line.strip())
    return {rid: "".join(parts).upper() for rid, parts in records.items()}


def write_fasta(sequences: Mapping[str, str], ids: Sequence[str], path: Path) -> None:
    """Write ``ids`` as FASTA, 60 residues a line."""
    with open(path, "w", encoding="utf-8") as out:
        for rid in ids:
            seq = sequences[rid]
            out.write(f">{rid}\n")
            for i in range(0, len(seq), 60):
                out.write(seq[i : i + 60] + "\n")


def sample_queries(queries: list[str], max_queries: int | None, seed: int) -> list[str]:
    """A seeded random sample of ``max_queries`` queries, kept in input order."""
    if max_queries is None or max_queries >= len(queries):
        return list(queries)
    keep = set(random.Random(seed).sample(queries, max_queries))
    return [q for q in queries if q in keep]


def load_dataset(
    name: str, data_dir: Path, max_queries: int | None, seed: int, max_targets: int | None = None
) -> Dataset:
    """Load ``progres208`` or ``scope207`` from ``data_dir`` (see the module docstring)."""
    if name == "progres208":
        sequences = read_fasta(data_dir / "progres_astral_40_upper_scope2.08.fa")
        labels = read_sid_sccs(data_dir / "progres_search_all_scope2.08_sid_sccs.txt")
        all_queries = list(read_sid_sccs(data_dir / "progres_test_unseen_sid.txt"))
        description = (
            "SCOPe 2.08 40% (Progres protocol): test_unseen queries vs all "
            f"{len(sequences):,} domains ({len(labels):,} labelled)"
        )
    elif name == "scope207":
        path = data_dir / "astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"
        sequences = read_fasta(path)
        labels = read_astral_fasta_labels(path)
        all_queries = list(sequences)
        description = f"SCOPe 2.07 40% all-against-all ({len(sequences):,} domains)"
        if max_queries is None:
            max_queries = 400
    else:
        raise BenchmarkError(f"unknown dataset {name!r}")
    missing = [q for q in all_queries if q not in sequences]
    if missing:
        raise BenchmarkError(f"{len(missing)} queries lack a sequence, e.g. {missing[:3]}")
    queries = sample_queries(all_queries, max_queries, seed)
    database = list(sequences)
    if max_targets is not None and max_targets < len(database):
        # Smoke-test mode: the queries plus a seeded sample of the other domains.
        qset = set(queries)
        others = [d for d in database if d not in qset]
        keep = qset | set(random.Random(seed).sample(others, max(0, max_targets - len(qset))))
        database = [d for d in database if d in keep]
        description += f", database sampled to {len(database):,} domains (smoke test)"
    return Dataset(
        name=name,
        description=description,
        queries=queries,
        database=database,
        sequences=sequences,
        labels=labels,
        n_queries_total=len(all_queries),
    )


# --------------------------------------------------------------------- measuring


@dataclass
class Usage:
    """Resources of one or more tool processes (summed wall/CPU, max RSS)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_mib: float = 0.0
    steps: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, step: str, record: Mapping[str, float]) -> None:
        cpu = float(record["user_s"]) + float(record["sys_s"])
        rss = float(record["max_rss_kib"]) / 1024.0
        self.wall_s += float(record["wall_s"])
        self.cpu_s += cpu
        self.max_rss_mib = max(self.max_rss_mib, rss)
        self.steps[step] = {"wall_s": float(record["wall_s"]), "cpu_s": cpu, "max_rss_mib": rss}


def measured_cmd(json_path: Path, cmd: Sequence[str]) -> list[str]:
    return [sys.executable, str(MEASURE), str(json_path), "--", *cmd]


def run_measured(step: str, cmd: Sequence[str], work: Path, usage: Usage, env: Mapping[str, str] | None = None) -> None:
    """Run ``cmd`` to completion under the measuring wrapper; raise on failure."""
    json_path = work / f"usage_{step}.json"
    log_path = work / f"{step}.log"
    print(f"[{step}] {' '.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.run(measured_cmd(json_path, cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchmarkError(f"{step} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    record = json.loads(json_path.read_text())
    usage.add(step, record)
    print(
        f"[{step}] wall {record['wall_s']:.1f} s, CPU {record['user_s'] + record['sys_s']:.1f} s,"
        f" peak RSS {record['max_rss_kib'] / 1024:.0f} MiB",
        flush=True,
    )


def require(executables: Sequence[str], package: str) -> dict[str, str]:
    """Paths of ``executables`` on PATH; BenchmarkError naming the apt package if missing."""
    found = {}
    for exe in executables:
        path = shutil.which(exe)
        if path is None:
            raise BenchmarkError(
                f"{exe!r} not found on PATH: install the Debian package {package} "
                f"(apt-get update && apt-get install -y {package})"
            )
        found[exe] = path
    return found


# ------------------------------------------------------------------------ runners


@dataclass
class ToolRun:
    """The hits and resources of one tool run."""

    tool: str
    model: str
    hits_path: Path
    higher_is_better: bool
    score_name: str
    usage: Usage
    speed_only: bool = False
    notes: list[str] = field(default_factory=list)
    #: Wall seconds of the search phase (queries against the prebuilt database).
    search_s: float = 0.0
    #: esmsearch only: seconds the server spent embedding the queries (model forward and
    #: pooling) within the search phase, from its request log (:func:`query_embed_s`).
    query_embed_s: float = 0.0


#: The ``embed_ms`` field of the server's request log line (esmsearch.server.rpc).
_EMBED_MS = re.compile(r"\bembed_ms=([0-9.]+)")


def query_embed_s(server_log: Path) -> float:
    """Seconds the esmsearch server spent embedding queries: the sum of ``embed_ms`` over
    its successful ``Search`` request log lines.

    ``embed_ms`` is the embedding time of the model batch that answered the request; the
    client sends its RPCs one after another, so no batch is counted twice.
    """
    total_ms = 0.0
    for line in server_log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "rpc=Search " in line and "code=OK " in line and (m := _EMBED_MS.search(line)):
            total_ms += float(m.group(1))
    return total_ms / 1e3


def run_mmseqs(query_fa: Path, db_fa: Path, work: Path, threads: int) -> ToolRun:
    """MMseqs2 at sensitivity 7.5, E-value <= 10000, up to 2000 hits per query.

    The steps of ``easy-search`` run one by one so that the search phase (``search`` +
    ``convertalis`` against a prebuilt, indexed target DB) is timed on its own.
    """
    exe = require(["mmseqs"], "mmseqs2")["mmseqs"]
    out = work / "mmseqs.m8"
    usage = Usage()
    mm = work / "mmseqs"
    mm.mkdir(exist_ok=True)
    qdb, tdb, adb = mm / "queryDB", mm / "targetDB", mm / "alnDB"
    threads_arg = ["--threads", str(threads)]
    run_measured("mmseqs_createdb_targets", [exe, "createdb", str(db_fa), str(tdb)], work, usage)
    run_measured(
        "mmseqs_createindex",
        [exe, "createindex", str(tdb), str(mm / "tmp_index"), "-s", "7.5", *threads_arg],
        work,
        usage,
    )
    run_measured("mmseqs_createdb_queries", [exe, "createdb", str(query_fa), str(qdb)], work, usage)
    search = Usage()
    run_measured(
        "mmseqs_search",
        [exe, "search", str(qdb), str(tdb), str(adb), str(mm / "tmp_search"), "-s", "7.5", "-e", "10000",
         "--max-seqs", "2000", *threads_arg],
        work,
        search,
    )  # fmt: skip
    run_measured(
        "mmseqs_convertalis", [exe, "convertalis", str(qdb), str(tdb), str(adb), str(out), *threads_arg], work, search
    )
    for step, record in search.steps.items():
        usage.add(step, {"wall_s": record["wall_s"], "user_s": record["cpu_s"], "sys_s": 0.0,
                         "max_rss_kib": record["max_rss_mib"] * 1024})  # fmt: skip
    version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
    return ToolRun(
        "MMseqs2", f"mmseqs {version} -s 7.5", out, False, "E-value", usage,
        search_s=search.wall_s, notes=["search phase = search + convertalis against the indexed target DB"],
    )  # fmt: skip


def run_blast(query_fa: Path, db_fa: Path, work: Path, threads: int) -> ToolRun:
    """makeblastdb + blastp, E-value <= 10000, up to 2000 target sequences per query."""
    exes = require(["makeblastdb", "blastp"], "ncbi-blast+")
    usage = Usage()
    db = work / "blastdb" / "db"
    db.parent.mkdir(exist_ok=True)
    run_measured(
        "blast_makeblastdb",
        [exes["makeblastdb"], "-in", str(db_fa), "-dbtype", "prot", "-out", str(db)],
        work,
        usage,
    )
    out = work / "blastp.tsv"
    run_measured(
        "blast_blastp",
        [
            exes["blastp"],
            "-query",
            str(query_fa),
            "-db",
            str(db),
            "-evalue",
            "10000",
            "-max_target_seqs",
            "2000",
            "-outfmt",
            "6",
            "-num_threads",
            str(threads),
            "-out",
            str(out),
        ],
        work,
        usage,
    )
    version = subprocess.run([exes["blastp"], "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return ToolRun(
        "BLASTp", version.strip(), out, False, "E-value", usage, search_s=usage.steps["blast_blastp"]["wall_s"]
    )


def is_random_checkpoint(model: str) -> bool:
    """True when ``model`` is a checkpoint file written by ``write_random_checkpoint``.

    Such files carry ``random_weights_seed`` in their config Namespace
    (:mod:`esmsearch.checkpoints`). Loaded with torch's safe-globals allow-list.
    """
    path = Path(model)
    if not path.is_file():
        return False
    import argparse as _argparse

    import torch

    with torch.serialization.safe_globals([_argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt.get("cfg", {}).get("model") if isinstance(ckpt, dict) else None
    return cfg is not None and hasattr(cfg, "random_weights_seed")


def split_fasta(path: Path, out_dir: Path, max_records: int) -> list[Path]:
    """Split a FASTA file into files of at most ``max_records`` records, in order."""
    records = read_fasta(path)
    ids = list(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = []
    for start in range(0, len(ids), max_records):
        chunk = out_dir / f"queries_{start // max_records:04d}.fasta"
        write_fasta(records, ids[start : start + max_records], chunk)
        chunks.append(chunk)
    return chunks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll the standard gRPC health service until it reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchmarkError(f"esmsearch server exited early (code {proc.returncode})")
            try:
                # wait_for_ready blocks until the port accepts connections (bounded).
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)  # readiness polling interval of a benchmark, not test sync
    raise BenchmarkError(f"esmsearch server at {address} not SERVING after {timeout_s:.0f} s")


def esmsearch_executable() -> str:
    beside = Path(sys.executable).parent / "esmsearch"
    if beside.exists():
        return str(beside)
    found = shutil.which("esmsearch")
    if found is None:
        raise BenchmarkError("'esmsearch' console script not found: install the project (pip install -e .)")
    return found


def run_esmsearch(
    query_fa: Path,
    db_fa: Path,
    work: Path,
    threads: int,
    model: str,
    device: str,
    toks_per_batch: int | None,
    k: int,
    server_timeout_s: float,
    precision: str = "fp32",
) -> ToolRun:
    """Index build + server + client search through the real CLI."""
    exe = esmsearch_executable()
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), ESMSEARCH_THREADS=str(threads))
    usage = Usage()
    index_dir = work / "esm_index"
    build = [exe, "index", "build", str(db_fa), "-o", str(index_dir), "--model", model]
    build += ["--device", device, "--precision", precision]
    if toks_per_batch:
        build += ["--toks-per-batch", str(toks_per_batch)]
    run_measured("esmsearch_index_build", build, work, usage, env=env)
    query_chunks = split_fasta(query_fa, work / "esm_query_chunks", max_records=1000)

    port = free_port()
    address = f"127.0.0.1:{port}"
    server_json = work / "usage_esmsearch_server.json"
    server_log = open(work / "esmsearch_server.log", "wb")  # noqa: SIM115 - closed below
    serve = [exe, "serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port)]
    serve += ["--device", device, "--max-k", str(max(k, 1000))]
    # Each client call carries up to 1000 queries (the chunks above) x k hits: allow it.
    serve += ["--max-hits-per-request", str(1000 * max(k, 1000))]
    if toks_per_batch:
        serve += ["--toks-per-batch", str(toks_per_batch)]
    print(f"[esmsearch_server] {' '.join(serve)}", flush=True)
    server = subprocess.Popen(measured_cmd(server_json, serve), stdout=server_log, stderr=subprocess.STDOUT, env=env)
    out = work / "esmsearch.tsv"
    try:
        t0 = time.perf_counter()
        wait_serving(address, server, server_timeout_s)
        ready_s = time.perf_counter() - t0
        print(f"[esmsearch_server] SERVING after {ready_s:.1f} s", flush=True)
        # One client call per chunk of <= 1000 queries (the client splits within the limits too).
        search_usage = Usage()
        with open(out, "wb") as stdout:
            for i, chunk_fa in enumerate(query_chunks):
                step = f"esmsearch_search_{i}"
                search_json = work / f"usage_{step}.json"
                cmd = [exe, "search", str(chunk_fa), "--server", address, "-k", str(k)]
                cmd += ["--format", "tsv", "--timeout-s", "3600"]
                print(f"[{step}] {' '.join(cmd)} >> {out}", flush=True)
                with open(work / f"{step}.log", "wb") as log:
                    rc = subprocess.run(measured_cmd(search_json, cmd), stdout=stdout, stderr=log, env=env).returncode
                if rc != 0:
                    tail = (work / f"{step}.log").read_text(errors="replace")[-2000:]
                    raise BenchmarkError(f"esmsearch search failed (exit {rc}):\n{tail}")
                search_usage.add(step, json.loads(search_json.read_text()))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGINT)
            server.send_signal(signal.SIGINT)  # second SIGINT: the wrapper kills the server
            server.wait(timeout=30)
        server_log.close()
    server_record = json.loads(server_json.read_text())
    usage.add("esmsearch_server", server_record)
    usage.add(
        "esmsearch_search",
        {
            "wall_s": search_usage.wall_s,
            "user_s": search_usage.cpu_s,
            "sys_s": 0.0,
            "max_rss_kib": search_usage.max_rss_mib * 1024.0,
        },
    )
    # The server and the client overlap in time: wall time is build + (server start
    # to SERVING) + search, not the sum of the server's and the client's lives.
    usage.wall_s = usage.steps["esmsearch_index_build"]["wall_s"] + ready_s + usage.steps["esmsearch_search"]["wall_s"]
    usage.steps["esmsearch_server_ready"] = {"wall_s": ready_s}
    speed_only = is_random_checkpoint(model)
    label = Path(model).stem if Path(model).is_file() else model
    notes = [f"server ready after {ready_s:.1f} s", f"k={k}, {device}, {precision}"]
    embed_s = query_embed_s(work / "esmsearch_server.log")
    return ToolRun(
        "esmsearch",
        label + (f" ({RANDOM_LABEL})" if speed_only else ""),
        out,
        True,
        "cosine",
        usage,
        speed_only=speed_only,
        notes=notes,
        search_s=usage.steps["esmsearch_search"]["wall_s"],
        query_embed_s=embed_s,
    )


# ------------------------------------------------------------------------ report


@dataclass
class Row:
    tool: str
    model: str
    n_queries: int
    n_targets: int
    sensitivity_foldseek: dict[str, float]
    sensitivity_progres_family: float
    n_queries_per_level: dict[str, int]
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    speed_only: bool
    steps: dict[str, dict[str, float]]
    notes: list[str]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)  # Foldseek convention
    command: str = ""
    search_s: float = 0.0
    query_embed_s: float = 0.0


def score(run: ToolRun, dataset: Dataset) -> tuple[SensitivityResult, SensitivityResult]:
    """Sensitivity of ``run`` under the Foldseek and the Progres self-hit conventions."""
    if run.tool == "esmsearch":
        hits = read_hits_tsv(
            run.hits_path,
            header=True,
            query_column="query_id",
            target_column="target_id",
            score_column="cosine_score",
        )
    else:
        hits = read_hits_tsv(run.hits_path, score_column=10)
    common = dict(
        queries=dataset.queries,
        labels=dataset.labels,
        database=dataset.database,
        higher_is_better=run.higher_is_better,
    )
    return (
        evaluate(hits, self_hit=SelfHit.EXCLUDE, **common),  # type: ignore[arg-type]
        evaluate(hits, self_hit=SelfHit.COUNT, **common),  # type: ignore[arg-type]
    )


def fmt_sens(value: float, speed_only: bool) -> str:
    text = f"{value:.3f}"
    return f"({text})" if speed_only else text


def markdown(rows: Sequence[Row], dataset: Dataset, args: argparse.Namespace) -> str:
    lines = [
        f"# SCOPe sensitivity and speed: {dataset.description}",
        "",
        f"Queries: {len(dataset.queries)} of {dataset.n_queries_total}"
        + (f" (seeded random sample, seed {args.seed})" if len(dataset.queries) < dataset.n_queries_total else "")
        + f"; targets: {len(dataset.database):,}. Threads: {args.threads} for every tool. "
        f"Machine: {os.cpu_count()} CPU cores visible, {platform_line()}; 1-min load "
        f"average when the report was written: {os.getloadavg()[0]:.1f} (other work on the "
        "machine inflates wall times; CPU times are less affected).",
        "",
        "Sensitivity = mean over queries of the fraction of true positives ranked above the "
        "first false positive (another fold); family = same family, superfamily = same "
        "superfamily & other family, fold = same fold & other superfamily "
        "(`esmsearch.evaluation`). **Family (Foldseek)** excludes the self hit; **family "
        "(Progres)** counts it as a family true positive; superfamily and fold are the same "
        "under both. MMseqs2/BLASTp ranked by E-value, esmsearch by cosine. **Search phase "
        "minus query embedding** (esmsearch only): the search phase less the seconds its server "
        "spent embedding the queries (from its request log), with its share of the search phase "
        "(target <= 15%): the cost of everything but the model. Wall time = "
        "database build + search (esmsearch: index build + server start until SERVING + "
        "client search); CPU = user+sys of all tool processes; peak RSS = largest single "
        "process.",
        "",
        "| tool | model | queries x targets | family (Foldseek) | family (Progres) "
        "| superfamily | fold | search phase (s) | search phase minus query embedding (s) "
        "| wall time (s) | CPU time (s) | peak RSS (MiB) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row.sensitivity_foldseek
        notes = list(row.notes)
        steps = ", ".join(f"{name}: {v['wall_s']:.1f} s" for name, v in row.steps.items() if "wall_s" in v)
        notes.append(f"steps (wall): {steps}")
        if row.speed_only:
            notes.insert(0, f"**{RANDOM_LABEL}**; sensitivities in brackets are meaningless")
        search = f"{row.search_s:.1f}" if row.search_s > 0 else "-"
        rest = "-"
        if row.search_s > 0 and row.query_embed_s > 0:
            rest_s = row.search_s - row.query_embed_s
            rest = f"{rest_s:.1f} ({rest_s / row.search_s:.0%})"
        lines.append(
            f"| {row.tool} | {row.model} | {row.n_queries} x {row.n_targets:,} "
            f"| {fmt_sens(s['family'], row.speed_only)} "
            f"| {fmt_sens(row.sensitivity_progres_family, row.speed_only)} "
            f"| {fmt_sens(s['superfamily'], row.speed_only)} "
            f"| {fmt_sens(s['fold'], row.speed_only)} "
            f"| {search} | {rest} | {row.wall_s:.1f} | {row.cpu_s:.1f} | {row.max_rss_mib:.0f} | {'; '.join(notes)} |"
        )
    if rows:
        n = rows[0].n_queries_per_level
        lines += [
            "",
            "Queries entering each mean (at least one true positive at that level, Foldseek "
            f"convention): family {n['family']}, superfamily {n['superfamily']}, "
            f"fold {n['fold']}.",
        ]
    commands = list(dict.fromkeys(r.command for r in rows if r.command))
    lines += ["", "Command(s): " + "; ".join(f"`{c}`" for c in commands), ""]
    return "\n".join(lines)


def platform_line() -> str:
    import platform

    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo", encoding="utf-8")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {platform.system()} {platform.release()}"


def plot(rows: Sequence[Row], dataset: Dataset, path: Path) -> None:
    """Cumulative sensitivity curves (Foldseek Fig. 2 style), one panel per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, level in zip(axes, LEVELS, strict=True):
        for row in rows:
            fraction, sens = cumulative_curve(row.per_query[level].values())
            mean = row.sensitivity_foldseek[level]
            label = f"{row.tool} ({mean:.3f})"
            if row.speed_only:
                label = f"{row.tool}, {RANDOM_LABEL} ({mean:.3f})"
            xs = [0.0, *fraction.tolist()]
            ys = [sens[0] if sens.size else 0.0, *sens.tolist()]
            ax.step(xs, ys, where="pre", label=label, linestyle="--" if row.speed_only else "-")
        title = level + (" (self hit excluded)" if level == "family" else "")
        ax.set_title(f"{title}, n={rows[0].n_queries_per_level[level]} queries")
        ax.set_xlabel("fraction of queries")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("sensitivity up to the 1st FP")
    fig.suptitle(f"Cumulative sensitivity: {dataset.description}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[Row], dataset: Dataset, args: argparse.Namespace) -> str:
    """Write table, JSON and plot into ``args.out``, merged with earlier rows if ``--append``.

    With ``--append``, rows of *other* tools already in ``args.out``'s JSON for the same
    dataset, queries and database are kept (e.g. baselines and esmsearch run separately).
    """
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scop_sensitivity_{dataset.name}"
    json_path = args.out / f"{stem}_results.json"
    key = {
        "dataset": dataset.name,
        "queries": sorted(dataset.queries),
        "n_targets": len(dataset.database),
    }
    merged = list(rows)
    if args.append and json_path.exists():
        old = json.loads(json_path.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in key} == key:
            mine = {r.tool for r in rows}
            kept = [Row(**r) for r in old["rows"] if r["tool"] not in mine]
            for row in kept:
                # Rows written before the search phase had its own field: BLASTp's search
                # phase is its blastp step, the same value run_blast() records today.
                if row.search_s == 0 and "blast_blastp" in row.steps:
                    row.search_s = row.steps["blast_blastp"]["wall_s"]
            merged = kept + merged
    order = {"MMseqs2": 0, "BLASTp": 1, "esmsearch": 2}
    merged.sort(key=lambda r: order.get(r.tool, 3))
    table = markdown(merged, dataset, args)
    (args.out / f"{stem}.md").write_text(table, encoding="utf-8")
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**key, "rows": [asdict(r) for r in merged]}), encoding="utf-8")
    os.replace(tmp, json_path)
    if merged:
        plot(merged, dataset, args.out / f"{stem}_curves.png")
    return table


# -------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["progres208", "scope207"], default="progres208")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="SCOPe files (default %(default)s)")
    parser.add_argument(
        "--tools",
        default="mmseqs2,blastp,esmsearch",
        help="comma-separated subset of mmseqs2, blastp, esmsearch (default %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="esmsearch model: fair-esm pretrained name or .pt checkpoint path "
        f"(default: a seeded random-weight {DEFAULT_ARCH} checkpoint, speed only)",
    )
    parser.add_argument("--device", default="cpu", help="esmsearch device (default %(default)s)")
    parser.add_argument(
        "--arch",
        default=DEFAULT_ARCH,
        help="architecture of the random-weight checkpoint used when --model is not given (default %(default)s)",
    )
    parser.add_argument(
        "--precision", default="fp32", help="esmsearch index precision: fp32, bf16, fp16, auto (default %(default)s)"
    )
    parser.add_argument("--toks-per-batch", type=int, default=None)
    parser.add_argument(
        "-k",
        type=int,
        default=2000,
        help="esmsearch hits per query (default %(default)s, as the baselines' --max-seqs / "
        "-max_target_seqs; the server is started with --max-k to allow it)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for every tool")
    parser.add_argument(
        "--max-queries",
        type=int,
        default=None,
        help="seeded random sample of queries (default: all for progres208, 400 for scope207)",
    )
    parser.add_argument(
        "--max-targets",
        type=int,
        default=None,
        help="smoke tests only: shrink the database to the queries plus a seeded sample",
    )
    parser.add_argument("--seed", type=int, default=0, help="query and database sampling seed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept; default: temp, removed")
    parser.add_argument("--server-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep rows of other tools already in --out for the same queries and database",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - {"mmseqs2", "blastp", "esmsearch"}
    if unknown:
        print(f"error: unknown tools {sorted(unknown)}", file=sys.stderr)
        return 2
    try:
        # Fail early, before any long run, if a tool is missing.
        if "mmseqs2" in tools:
            require(["mmseqs"], "mmseqs2")
        if "blastp" in tools:
            require(["makeblastdb", "blastp"], "ncbi-blast+")
        if "esmsearch" in tools:
            esmsearch_executable()
        try:
            import matplotlib  # noqa: F401 - fail early when the plot cannot be drawn
        except ImportError as exc:
            raise BenchmarkError("matplotlib is needed for the plot: pip install matplotlib") from exc
        dataset = load_dataset(args.dataset, args.data_dir, args.max_queries, args.seed, args.max_targets)
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="scop_bench_"))
        work.mkdir(parents=True, exist_ok=True)
        query_fa, db_fa = work / "queries.fasta", work / "db.fasta"
        write_fasta(dataset.sequences, dataset.queries, query_fa)
        write_fasta(dataset.sequences, dataset.database, db_fa)
        print(f"{dataset.description}; {len(dataset.queries)} queries; work dir {work}", flush=True)

        rows: list[Row] = []
        table = ""
        command = "python benchmarks/scop_sensitivity.py " + " ".join(args.argv)
        for tool in ("mmseqs2", "blastp", "esmsearch"):
            if tool not in tools:
                continue
            if tool == "mmseqs2":
                run = run_mmseqs(query_fa, db_fa, work, args.threads)
            elif tool == "blastp":
                run = run_blast(query_fa, db_fa, work, args.threads)
            else:
                model = args.model
                if model is None:
                    from esmsearch.checkpoints import write_random_checkpoint

                    model = str(write_random_checkpoint(args.arch, work / "checkpoints", seed=0))
                run = run_esmsearch(
                    query_fa,
                    db_fa,
                    work,
                    args.threads,
                    model,
                    args.device,
                    args.toks_per_batch,
                    args.k,
                    args.server_timeout_s,
                    args.precision,
                )
            rows.append(make_row(run, dataset, command))
            table = write_report(rows, dataset, args)  # after every tool: partial results kept
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def make_row(run: ToolRun, dataset: Dataset, command: str) -> Row:
    """Score one tool run under both self-hit conventions."""
    foldseek, progres = score(run, dataset)
    return Row(
        tool=run.tool,
        model=run.model,
        n_queries=len(dataset.queries),
        n_targets=len(dataset.database),
        sensitivity_foldseek={lv: foldseek.mean(lv) for lv in LEVELS},
        sensitivity_progres_family=progres.mean("family"),
        n_queries_per_level={lv: foldseek.n_queries(lv) for lv in LEVELS},
        wall_s=run.usage.wall_s,
        cpu_s=run.usage.cpu_s,
        max_rss_mib=run.usage.max_rss_mib,
        speed_only=run.speed_only,
        steps=run.usage.steps,
        notes=run.notes,
        per_query={lv: dict(foldseek.per_query[lv]) for lv in LEVELS},
        command=command,
        search_s=run.search_s,
        query_embed_s=run.query_embed_s,
    )


if __name__ == "__main__":
    sys.exit(main())
