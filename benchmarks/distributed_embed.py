"""Distributed embedding on Ray Data vs one process, side by side in one run (issue 11, part 1).

Builds the same index three ways from the first ``--n-seqs`` proteins of the *E. coli*
K-12 proteome (``../shared/data/seqdb``) with a random-weight checkpoint of
``--arch`` (default esm2_t6_8M_UR50D; speed only):

* ``single 1x2``: the in-process build (``build_index``), torch with 2 threads -- the
  baseline a 2-core machine runs today;
* ``ray 1x1``: ``--distributed ray`` with 1 worker of 1 CPU (torch 1 thread);
* ``ray 2x1``: 2 workers of 1 CPU each.

All three use the same chunks (``--chunk-residues``, one Ray block each) and write the
same index; the vectors are checked to agree within 1e-6. Each configuration runs
``--repeats`` times, interleaved (single, 1x1, 2x1, single, ...), on one local Ray
instance started once with ``num_cpus`` = the machine's cores (its start-up is printed
apart). Figures per run: the embedding stage's wall time (for Ray: from the wave's start
to its last block, so actor start-up and model loading on the workers are *included*),
residues/s over it, and the whole build's wall time; then the medians and the two
ratios the issue sets targets for:

* scaling = ray 2x1 residues/s / ray 1x1 residues/s (target >= 1.7),
* overhead = single 1x2 residues/s / ray 2x1 residues/s - 1 (target <= 15 %).

Run it on an otherwise idle machine, under the shared lock::

    uptime; flock /tmp/esmsearch-bench.lock python benchmarks/distributed_embed.py; uptime

Prints the CPU model and the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model

HERE = Path(__file__).resolve().parent
ECOLI = HERE.parent.parent / "shared" / "data" / "seqdb" / "UP000000625_83333_Ecoli_K12_2020.fasta"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="esm2_t6_8M_UR50D")
    parser.add_argument("--fasta", type=Path, default=ECOLI)
    parser.add_argument("--n-seqs", type=int, default=1000, help="first N proteins of --fasta")
    parser.add_argument("--max-len", type=int, default=1000, help="skip proteins longer than this")
    parser.add_argument("--chunk-residues", type=int, default=20_000, help="residues per chunk = Ray block")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)

    import ray
    import torch
    from Bio import SeqIO

    from esmsearch.checkpoints import write_random_checkpoint
    from esmsearch.indexer import build_index
    from esmsearch.indexer.distributed import DistributedConfig
    from esmsearch.store import Index

    versions = f"torch {torch.__version__}, ray {ray.__version__}"
    print(f"# distributed_embed: {cpu_model()}, {os.cpu_count()} cores, {versions}")
    print(f"# load average at start: {load_average()}")
    work = args.work or Path(tempfile.mkdtemp(prefix="esmsearch-dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = write_random_checkpoint(args.arch, work / "ckpt", seed=0)
    fasta = work / "db.fasta"
    n = residues = 0
    with open(fasta, "w", encoding="ascii") as out:
        for rec in SeqIO.parse(str(args.fasta), "fasta"):
            seq = str(rec.seq).upper()
            if len(seq) > args.max_len or set(seq) - set("ACDEFGHIKLMNPQRSTVWY"):
                continue
            out.write(f">{rec.id}\n{seq}\n")
            n += 1
            residues += len(seq)
            if n >= args.n_seqs:
                break
    print(f"# data: {n} proteins, {residues:,} residues (<= {args.max_len} each) of {args.fasta.name}")
    print(f"# model: {args.arch} random weights (speed only), chunk = Ray block = {args.chunk_residues:,} residues")

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"# local Ray start-up (once, not in the figures below): {time.perf_counter() - t0:.1f} s")

    configs: list[tuple[str, DistributedConfig | None]] = [
        ("single 1x2", None),
        ("ray 1x1", DistributedConfig(workers=1, cpus_per_worker=1)),
        ("ray 2x1", DistributedConfig(workers=2, cpus_per_worker=1)),
    ]
    rates: dict[str, list[float]] = {name: [] for name, _ in configs}
    reference: np.ndarray | None = None
    print("run\tconfig\tembed_s\tresidues_per_s\tbuild_wall_s\tmax_abs_diff")
    for repeat in range(args.repeats):
        for name, dist in configs:
            out = work / f"index-{name.replace(' ', '_')}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            torch.set_num_threads(2)
            t0 = time.perf_counter()
            result = build_index(
                fasta,
                out,
                model=str(checkpoint),
                device="cpu",
                chunk_residues=args.chunk_residues,
                distributed=dist,
            )
            wall = time.perf_counter() - t0
            with Index.open(out) as index:
                vectors = np.asarray(index.embeddings())
            if reference is None:
                reference = vectors
            diff = float(np.abs(vectors - reference).max())
            rate = result.embedded_residues / result.embed_seconds
            rates[name].append(rate)
            print(f"{repeat}\t{name}\t{result.embed_seconds:.1f}\t{rate:,.0f}\t{wall:.1f}\t{diff:.1e}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            if diff > 1e-6:
                print(f"ERROR: {name} vectors differ from the first build by {diff}", file=sys.stderr)
                return 1
    ray.shutdown()
    med = {name: statistics.median(r) for name, r in rates.items()}
    print("\nconfig\tmedian residues/s")
    for name, _ in configs:
        print(f"{name}\t{med[name]:,.0f}")
    scaling = med["ray 2x1"] / med["ray 1x1"]
    overhead = med["single 1x2"] / med["ray 2x1"] - 1.0
    print(
        f"\nscaling ray 2x1 / ray 1x1 = {med['ray 2x1']:,.0f} / {med['ray 1x1']:,.0f} = {scaling:.2f}x (target >= 1.7x)"
    )
    print(
        f"overhead single 1x2 / ray 2x1 = {med['single 1x2']:,.0f} / {med['ray 2x1']:,.0f} "
        f"= {overhead * 100:+.1f} % (target <= +15 %)"
    )
    print(f"# load average at end: {load_average()}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
