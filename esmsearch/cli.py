"""The ``esmsearch`` console script.

::

    esmsearch index build DB.fasta[.gz] (-o INDEX_DIR | --root ROOT) [--model NAME|PATH|DIR|ORG/NAME]
                          [--layer N] [--toks-per-batch 4096] [--device auto|cpu|cuda] [--index-factory Flat]
                          [--chunk-residues 200000] [--store-dtype float32|float16] [--decoys 10000] [--decoy-seed 0]
                          [--distributed ray [--ray-address ADDR] [--workers N]
                           [--cpus-per-worker C] [--gpus-per-worker G]]
    esmsearch index info INDEX_DIR [--verify] [--json]
    esmsearch serve INDEX_DIR [--host 127.0.0.1] [--port 50051] [--http-port 8080]
    esmsearch search QUERY.fasta|- [--server HOST:PORT] [-k 10] [-e MAX_EVALUE] [--format tsv|json]
    esmsearch easy-search QUERY.fasta TARGET.fasta|INDEX_DIR|ROOT [-o OUT] [-k 10] [-e MAX_EVALUE]
                          [--format tsv|json] [--cache-dir DIR] [--model NAME|PATH] [--device auto|cpu|cuda]
    esmsearch models [--json]

Each subcommand is a plain function of the Python API (``esmsearch.indexer.build_index``,
``esmsearch.store.Index``, ``esmsearch.server.serve``, ``esmsearch.client.SearchClient``).
Exit status: 0 success, 1 failure (one ``esmsearch: error: ...`` line on stderr, no
traceback for user errors), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from esmsearch import __version__
from esmsearch.protocol import DEFAULT_MAX_HITS_PER_REQUEST, DEFAULT_MAX_QUERIES_IN_FLIGHT, DEFAULT_MAX_QUEUED_RESIDUES

__all__ = ["main"]

DEFAULT_MODEL = "esm2_t33_650M_UR50D"
# Repeated from esmsearch.significance so that `esmsearch --help` imports no numpy code.
DEFAULT_DECOYS = 10_000
# Server defaults, repeated here so that `esmsearch --help` does not import torch/grpc server code.
DEFAULT_MAX_WORKERS = 64
DEFAULT_GRACE_S = 10.0
DEFAULT_MAX_K = 1000
log = logging.getLogger("esmsearch")


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs CPU-feature probing at INFO
    # uvicorn's own start/stop chatter; the HTTP API logs each request through esmsearch.server.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- index build --------------------------------------------------------------------------
def cmd_index_build(args: argparse.Namespace) -> int:
    from esmsearch.errors import ConfigError
    from esmsearch.indexer import build_index, build_version

    _configure_logging(max(args.verbose, 1))
    if args.discard:
        from esmsearch.indexer.build import discard_partial

        removed = discard_partial(root=args.root) if args.root is not None else discard_partial(out_dir=args.output)
        print(f"removed the partial build {removed}" if removed is not None else "no partial build to remove")
        return 0
    distributed = None
    if args.distributed == "ray":
        from esmsearch.indexer.distributed import DistributedConfig

        distributed = DistributedConfig(
            address=args.ray_address,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            precision=args.precision,
        )
    else:
        given = [f for f, v in (("--ray-address", args.ray_address), ("--workers", args.workers)) if v is not None]
        if args.cpus_per_worker != 1:
            given.append("--cpus-per-worker")
        if args.gpus_per_worker:
            given.append("--gpus-per-worker")
        if given:
            raise ConfigError(f"{', '.join(given)} need --distributed ray")
    common: dict[str, Any] = dict(
        model=args.model,
        layer=args.layer,
        toks_per_batch=args.toks_per_batch,
        device=args.device,
        precision=args.precision,
        index_factory=args.index_factory,
        chunk_residues=args.chunk_residues,
        resume=args.resume,
        progress=not args.no_progress,
        decoys=args.decoys,
        decoy_seed=args.decoy_seed,
        store_dtype=args.store_dtype,
        distributed=distributed,
    )
    try:
        if args.root is not None:
            result = build_version(args.fasta, args.root, reuse=not args.no_reuse, keep_versions=args.keep, **common)
        else:
            result = build_index(args.fasta, args.output, overwrite=args.overwrite, **common)
    except Exception as exc:
        for note in getattr(exc, "__notes__", ()):  # e.g. how to resume the kept partial build
            print(f"esmsearch: note: {note}", file=sys.stderr)
        raise
    m = result.manifest
    print(
        f"built {result.path}: {result.sequences} sequences, {result.residues} residues, "
        f"model {m.model_name} layer {m.layer} dim {m.dim}, index {m.index_factory}, version {m.version}"
    )
    print(
        f"embedding at {m.precision} {result.embed_seconds:.1f} s ({result.residues_per_s:,.0f} residues/s), "
        f"total {result.seconds:.1f} s; {result.windowed_sequences} sequences longer than "
        f"{m.build.get('window_residues')} residues embedded in windows"
    )
    if m.decoys is None:
        print("decoys: none (--decoys 0): hits of this index carry no E-values")
    elif m.build.get("decoys_reused_from"):
        print(f"decoys: {m.decoys.count} reused from version {m.build['decoys_reused_from']} (E-values on)")
    else:
        print(
            f"decoys: {m.decoys.count} shuffled database sequences embedded in "
            f"{m.build.get('decoy_embed_seconds', 0.0):.1f} s (E-values on)"
        )
    dist = m.build.get("distributed")
    if dist:
        print(
            f"distributed on Ray {dist['ray_address']}: {dist['workers']} workers x {dist['cpus_per_worker']} CPUs "
            f"x {dist['gpus_per_worker']:g} GPUs on {len(dist['hosts'])} host(s), {dist['waves']} wave(s)"
        )
    if args.root is not None:
        r = result.reuse
        print(
            f"previous version {result.previous_version or '-'}: reused {r.reused}, embedded {r.embedded} "
            f"(added {r.added}, changed {r.changed}), removed {r.removed}; "
            f"about {result.seconds_saved:.1f} s of embedding saved; current -> {m.version}"
        )
    return 0


def cmd_index_versions(args: argparse.Namespace) -> int:
    from esmsearch.versions import IndexRoot

    root = IndexRoot(args.root)
    versions = root.list_versions()
    if not versions:
        print(f"esmsearch: error: no published versions in {args.root}", file=sys.stderr)
        return 1
    print("current\tversion\tsequences\tbuilt_at\tmodel")
    for v in versions:
        print(f"{'*' if v.is_current else ''}\t{v.version}\t{v.count}\t{v.built_at}\t{v.model_name}")
    return 0


def cmd_index_rollback(args: argparse.Namespace) -> int:
    from esmsearch.versions import IndexRoot

    root = IndexRoot(args.root)
    before = root.current_version()
    with root.lock():
        now = root.rollback(args.version)
    print(f"{args.root}: current {before} -> {now}")
    return 0


# -- index info ---------------------------------------------------------------------------
def cmd_index_info(args: argparse.Namespace) -> int:
    from esmsearch.store import Index
    from esmsearch.vector_index import RERANK_MIN_CANDIDATES
    from esmsearch.versions import IndexRoot

    path = args.index_dir
    if IndexRoot.is_root(path):
        path = IndexRoot(path).current_path()
    with Index.open(path, verify=args.verify) as index:
        m = index.manifest
        sizes = index.file_sizes()
        if index.k_factor is None:
            rerank = "none: the FAISS index stores exact vectors, its scores are exact cosines"
        else:
            source = "manifest" if "k_factor" in m.search_params else "default; the manifest predates k_factor"
            rerank = (
                f"k_factor {index.k_factor} ({source}): max({index.k_factor} x k, {RERANK_MIN_CANDIDATES}) candidates "
                f"from the compressed index "
                f"are re-scored exactly against embeddings.npy ({m.store_dtype}), so scores are exact cosines"
            )
        if args.json:
            data: dict[str, Any] = json.loads(m.to_json())
            data["file_sizes"] = sizes
            data["verified"] = bool(args.verify)
            print(json.dumps(data, indent=2, sort_keys=True))
            return 0
        rows = [
            ("index", str(index.path)),
            ("version", m.version),
            ("sequences", f"{m.count:,}"),
            ("model", m.model_name),
            ("model source", m.model_source),
            ("checkpoint sha256", m.checkpoint_sha256),
            ("layer", str(m.layer)),
            ("dim", str(m.dim)),
            ("pooling", f"{m.pooling}, {m.normalisation}-normalised; metric {m.metric} (cosine)"),
            ("precision", f"{m.precision} (queries are embedded at this precision)"),
            ("faiss index", m.index_factory + (f" {m.search_params}" if m.search_params else "")),
            ("re-ranking", rerank),
            ("stored embeddings", m.store_dtype),
            ("source fasta", f"{m.source_fasta} (sha256 {m.source_fasta_sha256[:16]}...)"),
            ("built", f"{m.built_at} by esmsearch {m.tool_version}"),
            (
                "decoys",
                "none: hits carry no E-values (built before E-values existed, or with --decoys 0)"
                if m.decoys is None
                else f"{m.decoys.count:,} ({m.decoys.method}, seed {m.decoys.seed}); per-query GEV fit to maxima "
                f"of blocks of {m.decoys.block_size}, shape {m.decoys.shape:+.4f}: E-values on",
            ),
        ]
        b = m.build
        if b:
            rows.append(
                (
                    "build",
                    f"{b.get('residues', 0):,} residues, {b.get('windowed_sequences', 0)} windowed, "
                    f"{b.get('embed_seconds')} s embedding ({b.get('residues_per_s')} residues/s) on "
                    f"{b.get('device')}",
                )
            )
            dist = b.get("distributed")
            if dist:
                rows.append(
                    (
                        "distributed",
                        f"Ray {dist.get('ray_address')}: {dist.get('workers')} workers x {dist.get('cpus_per_worker')} "
                        f"CPUs x {dist.get('gpus_per_worker', 0):g} GPUs on {', '.join(dist.get('hosts', []))}",
                    )
                )
        for name, size in sizes.items():
            rows.append((f"file {name}", _human_bytes(size)))
        rows.append(("total size", _human_bytes(sum(sizes.values()))))
        if args.verify:
            rows.append(("verified", "all file checksums and row counts match the manifest"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    return 0


# -- models -------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from esmsearch.models import ARCHITECTURES, CONTEXT_RESIDUES, FAMILIES, MODEL_SOURCES, human_count

    if args.json:
        data = {
            "models": [
                {
                    "name": a.name,
                    "family": a.family,
                    "layers": a.num_layers,
                    "embed_dim": a.embed_dim,
                    "attention_heads": a.attention_heads,
                    "parameters": a.parameters,
                    "default_layer": a.default_layer,
                    "positions": a.positions,
                    "context_residues": CONTEXT_RESIDUES,
                    "hf_hub_id": a.hf_hub_id,
                }
                for a in ARCHITECTURES.values()
            ],
            "families": FAMILIES,
            "sources": [{"form": form, "kind": kind, "description": text} for form, kind, text in MODEL_SOURCES],
        }
        print(json.dumps(data, indent=2))
        return 0
    header = ("name", "family", "layers", "dim", "params", "default layer", "positions", "hub id")
    rows = [
        (
            a.name,
            {"esm2": "ESM-2", "esm1b": "ESM-1b" if a.name.startswith("esm1b") else "ESM-1v"}[a.family],
            str(a.num_layers),
            str(a.embed_dim),
            human_count(a.parameters),
            str(a.default_layer),
            a.positions,
            a.hf_hub_id,
        )
        for a in ARCHITECTURES.values()
    ]
    numeric = {2, 3, 4, 5}
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print(
            "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    print()
    print(
        textwrap.fill(
            f"Every model reads {CONTEXT_RESIDUES:,} residues per window (longer sequences: overlapping windows); "
            "a vector is the mean over residues of one representation layer (--layer, default the last), "
            "L2-normalised.",
            width=100,
        )
    )
    print()
    print("--model accepts, tried in this order (source kind recorded in the index manifest):")
    width = max(len(form) for form, _, _ in MODEL_SOURCES)
    for form, kind, text in MODEL_SOURCES:
        lead = f"  {form:<{width}}  "
        print(textwrap.fill(f"[{kind}] {text}", width=100, initial_indent=lead, subsequent_indent=" " * len(lead)))
    return 0


# -- serve --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from esmsearch.errors import ConfigError
    from esmsearch.server import AdmissionConfig, BatchingConfig, RequestLimits, ServerConfig, serve
    from esmsearch.server.logs import use_log_format
    from esmsearch.server.security import ADMIN_TOKENS_ENV, SecurityConfig, TlsConfig, load_tokens

    _configure_logging(max(args.verbose, 1))
    use_log_format(args.log_format)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    security = SecurityConfig(
        tls=tls,
        tokens=load_tokens(args.token_file),
        admin_tokens=load_tokens(args.admin_token_file, env_var=ADMIN_TOKENS_ENV),
        insecure_bind_any=args.insecure_bind_any,
    )
    config = ServerConfig(
        index=args.index_dir,
        limits=RequestLimits(max_k=args.max_k),
        host=args.host,
        port=args.port,
        model=args.model,
        device=args.device,
        max_workers=args.max_workers,
        toks_per_batch=args.toks_per_batch,
        reload_poll_s=args.reload_poll_s if args.reload_poll_s > 0 else None,
        batching=BatchingConfig(
            enabled=args.batching != "off",
            max_wait_ms=args.max_batch_wait_ms,
            max_batch_toks=args.batch_toks,
        ),
        admission=AdmissionConfig(
            max_queries_in_flight=args.max_queries_in_flight,
            max_queued_residues=args.max_queued_residues,
            max_hits_per_request=args.max_hits_per_request,
        ),
        security=security,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        grace_s=args.grace_s,
        mmap_index=not args.no_mmap,
        evalue_db_size=args.evalue_db_size,
    )
    return serve(config)


# -- search -------------------------------------------------------------------------------
def cmd_search(args: argparse.Namespace) -> int:
    from esmsearch.client import SearchClient, UnavailableError
    from esmsearch.client.channel import TOKEN_ENV, ClientCredentials, read_token_file

    _configure_logging(args.verbose)
    credentials = ClientCredentials(
        tls=args.tls or args.tls_ca is not None,
        root_cert_file=args.tls_ca,
        client_cert_file=args.tls_cert,
        client_key_file=args.tls_key,
        token=(read_token_file(args.token_file) if args.token_file else None) or os.environ.get(TOKEN_ENV) or None,
    )
    with SearchClient(args.server, timeout_s=args.timeout_s, credentials=credentials) as client:
        # Hits are written as each RPC answers (the next one is being searched meanwhile).
        results = client.iter_search(
            args.query,
            k=args.k,
            min_score=args.min_score,
            max_evalue=args.max_evalue,
            evalue_db_size=args.evalue_db_size,
        )
        try:
            _write_results(results, args)
        except UnavailableError as exc:
            raise UnavailableError(
                exc.code,
                f"cannot reach an esmsearch server at {args.server} (is `esmsearch serve` running?): {exc.details}",
            ) from exc
    return 0


def _write_results(results: Iterable[Any], args: argparse.Namespace) -> None:
    """Write results to ``-o`` (atomically: a failure part-way leaves no file) or stdout."""
    from esmsearch.client.formats import write_json, write_tsv
    from esmsearch.fsutil import open_text_atomic

    def write(out: IO[str]) -> None:
        if args.format == "json":
            write_json(results, out)
        else:
            write_tsv(results, out)

    if args.output:
        with open_text_atomic(args.output) as out:
            write(out)
    else:
        write(sys.stdout)


def cmd_easy_search(args: argparse.Namespace) -> int:
    from esmsearch.easy_search import EasySearchConfig, easy_search

    _configure_logging(args.verbose)
    config = EasySearchConfig(
        model=args.model,
        layer=args.layer,
        precision=args.precision,
        device=args.device,
        decoys=args.decoys,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    results = easy_search(
        args.query,
        args.target,
        k=args.k,
        min_score=args.min_score,
        max_evalue=args.max_evalue,
        evalue_db_size=args.evalue_db_size,
        config=config,
        default_model=DEFAULT_MODEL,
    )
    _write_results(results, args)
    return 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _db_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number of database sequences >= 1, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of database sequences >= 1, got {value}")
    return value


def _evalue(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an E-value >= 0 such as 0.001 or 1e-5, got {text!r}") from exc
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"expected an E-value >= 0, got {text}")
    return value


def _refuse_secret_flag(parser: argparse.ArgumentParser, flag: str, alternative: str) -> None:
    """Make ``flag`` (a secret on the command line) a usage error naming ``alternative``.

    Declared, rather than left out, so that argparse does not read it as an
    abbreviation of a longer flag (``--token`` of ``--token-file``), and so the error
    says what to use; the value is never echoed.
    """

    class Refuse(argparse.Action):
        def __call__(
            self, p: argparse.ArgumentParser, ns: argparse.Namespace, values: object, opt: object = None
        ) -> None:
            p.error(
                f"{flag} is not accepted: a secret on the command line is visible to every local user in the "
                f"process list; use {alternative}"
            )

    parser.add_argument(flag, nargs="?", action=Refuse, help=argparse.SUPPRESS)


#: ``--precision`` values of ``index build`` and ``easy-search``.
PRECISION_CHOICES = ("fp32", "bf16", "fp16", "int8", "auto")


def _add_result_arguments(p: argparse.ArgumentParser, *, evalue_help: str, db_size_help: str) -> None:
    """The hit filters and output flags ``search`` and ``easy-search`` share (one definition
    of their types and defaults): -k, --min-score, -e, --evalue-db-size, --format, -o."""
    p.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--min-score", type=float, default=None, help="drop hits with cosine score below this")
    p.add_argument("-e", "--max-evalue", type=_evalue, default=None, metavar="E", help=evalue_help)
    p.add_argument("--evalue-db-size", type=_db_size, default=None, metavar="N", help=db_size_help)
    p.add_argument("--format", choices=["tsv", "json"], default="tsv")
    p.add_argument("-o", "--output", type=Path, default=None, help="write results here instead of stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esmsearch",
        description="Protein remote-homology search with ESM-2 embeddings (index, serve, search).",
    )
    parser.add_argument("--version", action="version", version=f"esmsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{index,serve,search,easy-search,models}")

    index = sub.add_parser("index", help="build or inspect an index")
    isub = index.add_subparsers(dest="index_command", required=True, metavar="{build,info,versions,rollback}")

    b = isub.add_parser("build", help="embed a FASTA database and write an index directory or root version")
    b.add_argument("fasta", type=Path, help="database FASTA (plain or .gz)")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", type=Path, help="standalone index directory to create")
    where.add_argument(
        "--root",
        type=Path,
        help="versioned index root: build ROOT/versions/<version>, reusing unchanged vectors, and swap ROOT/current",
    )
    b.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="pretrained name, local fair-esm .pt file, local Hugging Face directory or Hub id such as "
        f"facebook/esm2_t33_650M_UR50D; ESM-2 or ESM-1b/ESM-1v (`esmsearch models`; default {DEFAULT_MODEL})",
    )
    b.add_argument(
        "--layer", type=int, default=None, help="representation layer (default: last; negative counts from the end)"
    )
    b.add_argument("--toks-per-batch", type=int, default=4096, help="token budget per forward pass (default 4096)")
    b.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    b.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISION_CHOICES,
        help="compute precision, recorded in the manifest; the server embeds queries at it "
        "(default fp32; auto = bf16 on CUDA with bf16 support and on CPUs with AMX, fp32 elsewhere; "
        "int8 = dynamic int8 GEMMs on the CPU, for models of 150M parameters and up)",
    )
    b.add_argument(
        "--index-factory", default="Flat", help="FAISS factory string (Flat, IVF1024,Flat, HNSW32, ...) or auto"
    )
    b.add_argument(
        "--decoys",
        type=_non_negative_int,
        default=DEFAULT_DECOYS,
        metavar="N",
        help=f"shuffled database sequences embedded as the null behind E-values (default {DEFAULT_DECOYS:,}; "
        "a smaller database gets one per sequence, adding about the database's own embedding time to a "
        "first build; rebuilds reuse them). 0 = no E-values",
    )
    b.add_argument(
        "--decoy-seed",
        type=_non_negative_int,
        default=0,
        metavar="S",
        help="seed of the decoy sample and shuffles (default 0; recorded in the manifest)",
    )
    b.add_argument(
        "--chunk-residues",
        type=int,
        default=200_000,
        metavar="N",
        help="residues per streamed chunk: bounds memory, one shard and, with --distributed, one Ray block "
        "each (default 200,000)",
    )
    b.add_argument(
        "--store-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of the stored embeddings file (float16: half the disk; the FAISS index is built from "
        "float32 either way; default float32)",
    )
    b.add_argument(
        "--distributed",
        choices=["ray"],
        default=None,
        help="embed on a Ray cluster (pip install 'esmsearch[ray]'): a local Ray instance unless "
        "--ray-address or RAY_ADDRESS names one; needs an explicit --precision other than auto",
    )
    b.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="Ray cluster to join (ray://HOST:10001, HOST:6379, auto)"
    )
    b.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray actors, one model each (default: as many as the cluster's GPUs or CPUs fit)",
    )
    b.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        metavar="C",
        help="CPUs per Ray actor, also its torch thread count (default 1)",
    )
    b.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per Ray actor (default 0: embed on CPUs; 1: one GPU each)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at the output path (-o)")
    b.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="N",
        help="with --root: keep only the newest N versions (never the live one)",
    )
    b.add_argument(
        "--no-reuse", action="store_true", help="with --root: re-embed everything instead of reusing unchanged vectors"
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted or failed build of the same FASTA and model at its first unfinished stage "
        "(nothing journaled is redone; a different --index-factory keeps the vectors and redoes only FAISS)",
    )
    b.add_argument(
        "--discard",
        action="store_true",
        help="remove the partial build of this output (-o) or root (--root) and exit",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("-v", "--verbose", action="count", default=0)
    b.set_defaults(func=cmd_index_build)

    vs = isub.add_parser("versions", help="list the versions of an index root")
    vs.add_argument("root", type=Path)
    vs.set_defaults(func=cmd_index_versions)

    rb = isub.add_parser("rollback", help="point an index root's current at an earlier version")
    rb.add_argument("root", type=Path)
    rb.add_argument("version", nargs="?", default=None, help="version id (default: the one before the live one)")
    rb.set_defaults(func=cmd_index_rollback)

    i = isub.add_parser("info", help="describe an index directory (or the live version of a root)")
    i.add_argument("index_dir", type=Path)
    i.add_argument("--verify", action="store_true", help="check every file's sha256 against the manifest")
    i.add_argument("--json", action="store_true", help="print the manifest and sizes as JSON")
    i.set_defaults(func=cmd_index_info)

    s = sub.add_parser("serve", help="serve an index over gRPC (and HTTP/JSON with --http-port)")
    s.add_argument("index_dir", type=Path)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--model", default=None, help="override the model path recorded in the manifest (must match it)")
    s.add_argument("--device", default="auto")
    s.add_argument("--toks-per-batch", type=int, default=4096)
    s.add_argument(
        "--evalue-db-size",
        type=_db_size,
        default=None,
        metavar="N",
        help="scale E-values to N database sequences (like HMMER's -Z, BLAST's -dbsize), e.g. the whole "
        "database's size on every shard or replica; a request's evalue_db_size overrides it. "
        "Default: the served index's count",
    )
    s.add_argument(
        "--reload-poll-s",
        type=float,
        default=5.0,
        metavar="S",
        help="when INDEX_DIR is a versioned root: seconds between looks at ROOT/current for a new "
        "version (default 5; 0 = only on SIGHUP or the ReloadIndex RPC)",
    )
    s.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="dynamic batching: longest wait for more requests once a batch has one (default 2)",
    )
    s.add_argument(
        "--batch-toks",
        type=int,
        default=4096,
        metavar="N",
        help="dynamic batching: token budget of one batch, residues + 2 per sequence (default 4096)",
    )
    s.add_argument(
        "--max-queries-in-flight",
        type=int,
        default=DEFAULT_MAX_QUERIES_IN_FLIGHT,
        metavar="N",
        help="admission: most query sequences queued or being embedded; beyond it requests get "
        f"RESOURCE_EXHAUSTED with retry-after-ms (default {DEFAULT_MAX_QUERIES_IN_FLIGHT:,})",
    )
    s.add_argument(
        "--max-queued-residues",
        type=int,
        default=DEFAULT_MAX_QUEUED_RESIDUES,
        metavar="N",
        help="admission: most residues of those sequences (default "
        f"{DEFAULT_MAX_QUEUED_RESIDUES:,}); per-request limits are lowered to fit both",
    )
    s.add_argument(
        "--max-hits-per-request",
        type=int,
        default=DEFAULT_MAX_HITS_PER_REQUEST,
        metavar="N",
        help="admission: most hits one request may ask for, queries x k; beyond it INVALID_ARGUMENT "
        f"(HTTP 400), never retried (default {DEFAULT_MAX_HITS_PER_REQUEST:,})",
    )
    s.add_argument(
        "--max-k",
        type=int,
        default=DEFAULT_MAX_K,
        metavar="K",
        help=f"largest k (hits per query) a request may ask for (default {DEFAULT_MAX_K})",
    )
    s.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"gRPC worker threads, i.e. RPCs handled at once (default {DEFAULT_MAX_WORKERS})",
    )
    s.add_argument(
        "--no-mmap",
        action="store_true",
        help="read FAISS index files into memory instead of memory-mapping them (default: mmap, "
        "so a live reload does not hold two copies of the index)",
    )
    s.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="S",
        help=f"on SIGTERM/SIGINT, seconds in-flight requests get to finish (default {DEFAULT_GRACE_S:g})",
    )
    s.add_argument(
        "--batching",
        choices=["on", "off", "auto"],
        default="on",
        help=(
            "dynamic batching of concurrent requests into one packed forward pass (default on, on CPU "
            "and GPU alike; auto, the first release's default, now means on)"
        ),
    )
    s.add_argument(
        "--tls-cert", type=Path, default=None, help="server certificate chain (PEM); with --tls-key enables TLS"
    )
    s.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    s.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )
    s.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=(
            "accepted read bearer tokens, one per line (also: ESMSEARCH_TOKENS env, comma-separated); "
            "health checks need none"
        ),
    )
    s.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help=(
            "accepted admin bearer tokens, one per line (also: ESMSEARCH_ADMIN_TOKENS env): needed by "
            "ReloadIndex, which read tokens cannot call"
        ),
    )
    _refuse_secret_flag(s, "--token", "--token-file FILE or the ESMSEARCH_TOKENS environment variable")
    _refuse_secret_flag(
        s, "--admin-token", "--admin-token-file FILE or the ESMSEARCH_ADMIN_TOKENS environment variable"
    )
    s.add_argument(
        "--insecure-bind-any",
        action="store_true",
        help="allow a non-loopback --host without TLS and client authentication (tokens or --tls-client-ca); "
        "logged as a warning",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (default off)",
    )
    s.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the HTTP/JSON API (/v1/search, /v1/index, /docs) and the web page on "
        "HOST:PORT, with the same tokens, TLS and limits as gRPC (default off)",
    )
    s.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="request log lines as key=value text (default) or JSON lines",
    )
    s.add_argument("-v", "--verbose", action="count", default=0)
    s.set_defaults(func=cmd_serve)

    md = sub.add_parser("models", help="list the ESM models and the --model forms esmsearch loads")
    md.add_argument("--json", action="store_true", help="machine-readable output")
    md.set_defaults(func=cmd_models)

    q = sub.add_parser("search", help="search query sequences against a server")
    q.add_argument(
        "query",
        help="query FASTA file (plain or .gz), - for stdin, FASTA text, or one bare sequence "
        "(an existing file wins over a sequence of the same letters)",
    )
    q.add_argument(
        "--server",
        default="127.0.0.1:50051",
        help="HOST:PORT, or replicas as dns:///HOST:PORT or ipv4:A:PORT,B:PORT (round_robin over the healthy ones; "
        "default 127.0.0.1:50051)",
    )
    _add_result_arguments(
        q,
        evalue_help="drop hits with E-value above this (of the k nearest; like BLAST's -evalue, MMseqs2's -e); "
        "the index needs decoys. Default: keep all",
        db_size_help="scale E-values to N database sequences (like HMMER's -Z, BLAST's -dbsize). "
        "Default: the server's --evalue-db-size, else the index's count",
    )
    q.add_argument("--timeout-s", type=float, default=300.0, help="per-call deadline in seconds (default 300)")
    q.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    q.add_argument(
        "--tls-ca", type=Path, default=None, help="CA certificate (PEM) to verify the server with; implies --tls"
    )
    q.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    q.add_argument("--tls-key", type=Path, default=None, help="client private key (PEM) for mutual TLS")
    q.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file whose first line is the bearer token (default: the ESMSEARCH_TOKEN environment variable); "
        "sent over TLS, or in clear to a loopback --server only",
    )
    _refuse_secret_flag(q, "--token", "--token-file FILE or the ESMSEARCH_TOKEN environment variable")
    q.add_argument("-v", "--verbose", action="count", default=0)
    q.set_defaults(func=cmd_search)

    es = sub.add_parser(
        "easy-search",
        help="search query sequences against a FASTA, index or root in this process (no server; "
        "a FASTA target is indexed once into a cache)",
        description="MMseqs2's easy-search habit: QUERY against TARGET without a server. A FASTA TARGET is "
        "indexed once (E-values on) into a cache keyed by its sha256, the model, layer and precision; later "
        "calls reuse it. An index directory or root is searched as it is. Same output as `esmsearch search`.",
    )
    es.add_argument("query", help="query FASTA file (plain or .gz), - for stdin, FASTA text, or one bare sequence")
    es.add_argument("target", type=Path, help="target FASTA (plain or .gz), index directory or index root")
    _add_result_arguments(
        es,
        evalue_help="drop hits with E-value above this (like MMseqs2's -e). Default: keep all",
        db_size_help="scale E-values to N database sequences (HMMER's -Z). Default: the target's count",
    )
    es.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where FASTA targets are indexed (default $ESMSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/esmsearch, "
        "else ~/.cache/esmsearch)",
    )
    es.add_argument(
        "--model",
        default=None,
        help=f"model for indexing a FASTA target (default {DEFAULT_MODEL}); for an index target, overrides "
        "the source of its own model (same checkpoint)",
    )
    es.add_argument("--layer", type=int, default=None, help="representation layer for a FASTA target (default: last)")
    es.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISION_CHOICES,
        help="compute precision for a FASTA target (default fp32); queries use the index's",
    )
    es.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    es.add_argument(
        "--decoys",
        type=_non_negative_int,
        default=DEFAULT_DECOYS,
        metavar="N",
        help=f"decoys for a FASTA target's E-values (default {DEFAULT_DECOYS:,}; 0 = no E-values)",
    )
    es.add_argument("--no-progress", action="store_true", help="no progress bar while indexing a FASTA target")
    es.add_argument("-v", "--verbose", action="count", default=0)
    es.set_defaults(func=cmd_easy_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help/--version
        return int(exc.code or 0)
    from esmsearch.errors import EsmsearchError

    user_errors: tuple[type[BaseException], ...] = (EsmsearchError, FileNotFoundError, FileExistsError, PermissionError)
    try:
        from esmsearch.client.errors import SearchError

        user_errors += (SearchError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        return int(args.func(args))
    except user_errors as exc:
        print(f"esmsearch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("esmsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
