"""int8 against fp32 embeddings: cosine agreement and top-10 neighbour overlap, one run.

The same ``--n-seqs`` *E. coli* proteins as ``benchmarks/embed_throughput.py`` (same
sampling and seed) are embedded by ``esmsearch.embedding.Embedder`` at ``fp32`` and at
``int8`` with one random-weight checkpoint of ``--arch``. Printed:

* the cosine of each protein's int8 vector to its fp32 vector: minimum, 1st
  percentile, median (the issue's bar for offering int8: minimum >= 0.999);
* top-10 overlap: every protein searched against the other ``n - 1`` by exact cosine,
  once with fp32 and once with int8 vectors; the mean fraction of the fp32 top 10
  found in the int8 top 10 (a stand-in for a search's hit list; the SCOPe search of
  the issue was not run);
* the wall time of each pass (one pass each, no warm-up: speed is measured side by
  side by ``embed_throughput.py``).

Random weights: agreement is that of the arithmetic, not of retrieval quality.

    python benchmarks/int8_agreement.py --arch esm2_t30_150M_UR50D --n-seqs 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import DEFAULT_FASTA, load_sequences  # noqa: E402

from esmsearch.checkpoints import write_random_checkpoint  # noqa: E402
from esmsearch.embedding import Embedder  # noqa: E402
from esmsearch.models import ARCHITECTURES  # noqa: E402


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k, neighbours among the other rows by cosine."""
    out = []
    for vectors in (a, b):
        scores = vectors @ vectors.T
        np.fill_diagonal(scores, -np.inf)
        out.append(np.argsort(-scores, axis=1)[:, :k])
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(out[0], out[1], strict=True)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="esm2_t30_150M_UR50D", choices=sorted(ARCHITECTURES))
    p.add_argument("--n-seqs", type=int, default=300)
    p.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    p.add_argument("--max-residues", type=int, default=1022)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    records = load_sequences(args.fasta, args.n_seqs, args.max_residues, args.seed)
    seqs = [s for _, s in records]
    print(
        f"arch {args.arch} (random weights, seed {args.seed}), {len(seqs)} E. coli proteins, "
        f"{sum(map(len, seqs))} residues; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(args.arch, tmp, seed=args.seed)
        for precision in ("fp32", "int8"):
            embedder = Embedder(str(ckpt), device="cpu", precision=precision)
            t0 = time.perf_counter()
            vectors[precision] = embedder.embed(seqs)
            print(f"{precision}: {time.perf_counter() - t0:.1f} s for one pass")
    cos = np.sum(vectors["fp32"] * vectors["int8"], axis=1)
    print(
        f"cosine int8 vs fp32 over {len(cos)} proteins: min {cos.min():.6f}, "
        f"1st percentile {np.percentile(cos, 1):.6f}, median {np.median(cos):.6f}"
    )
    overlap = top_k_overlap(vectors["fp32"], vectors["int8"])
    print(f"top-10 overlap (each protein against the other {len(seqs) - 1}): {overlap:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
