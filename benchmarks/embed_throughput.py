"""Embedding throughput: fair-esm's reference extraction vs esmsearch, side by side, with FLOP/s.

One run, same sequences, same random-weight checkpoint, same device:

(a) **reference**: exactly what fair-esm's ``scripts/extract.py`` does for
    ``--include mean``: ``esm.FastaBatchedDataset`` +
    ``get_batch_indices(toks_per_batch=4096, extra_toks_per_seq=1)`` + a DataLoader
    with ``alphabet.get_batch_converter(truncation_seq_length=1022)`` +
    ``model(toks, repr_layers=[layer])`` under ``torch.no_grad`` + mean over
    ``1 : len + 1``; fp32. The vectors are then L2-normalised for comparison.
(b) **esmsearch**: ``esmsearch.embedding.Embedder(...).embed(sequences)`` (the
    public API, packed batches; float32 ``[n, dim]``, L2-normalised), once per
    precision in ``--precisions``.

Printed per method: wall time, residues/s, the speed ratio to (a), the minimum over
sequences of the cosine to (a), the model FLOPs achieved per second, and the
utilisation: achieved FLOP/s over the device's own matrix-product rate at the
model's shapes (``--toks-per-batch`` tokens times each weight matrix of a layer,
sampled after the warm-up and after every timed pass of the same run, best sample
used and printed with the lowest, in the method's dtype); on CUDA also the MFU
against ``--peak-tflops`` (dense bf16 peak of the GPU; H100/H200 SXM: 989).

FLOPs (multiply-add = 2): per token of a sequence of ``L`` tokens (residues + BOS +
EOS) and per layer run, ``24 E^2`` for the q/k/v, output and feed-forward GEMMs
(``2 * (3E^2 + E^2 + 2 * 4E^2)``) plus ``4 L E`` for the two attention products;
the LM and contact heads are not counted (neither path needs them). For
esm2_t12_35M on E. coli proteins that is about 73 MFLOP per residue.

Sequences: a seeded random sample (``--seed``) of ``--n-seqs`` records of at most
``--max-residues`` (default 1022) residues from the E. coli K-12 proteome, so that
fair-esm's truncation and esmsearch's windowing of long sequences do not make the
two differ by construction.

Usage::

    python benchmarks/embed_throughput.py --arch esm2_t6_8M_UR50D --threads 2
    python benchmarks/embed_throughput.py --arch esm2_t12_35M_UR50D --precisions fp32,bf16
    python benchmarks/embed_throughput.py --arch esm2_t33_650M_UR50D --device cuda --precisions fp32,bf16,fp16
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FASTA = ROOT.parent / "shared" / "data" / "seqdb" / "UP000000625_83333_Ecoli_K12_2020.fasta"
TRUNCATION_SEQ_LENGTH = 1022  # fair-esm scripts/extract.py default
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The matmul rate a precision's utilisation is measured against: int8 GEMMs are
#: judged against the fp32 rate (the speed they replace), not against an int8 peak.
_RATE_OF = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "fp32"}


def load_sequences(fasta: Path, n_seqs: int, max_residues: int, seed: int) -> list[tuple[str, str]]:
    """Seeded random sample of ``(record_id, sequence)`` with at most ``max_residues`` residues."""
    from esmsearch.sequences import read_fasta

    records = [(r.record_id, r.sequence) for r in read_fasta(fasta) if len(r.sequence) <= max_residues]
    if n_seqs > len(records):
        raise SystemExit(f"only {len(records)} records of <= {max_residues} residues in {fasta}")
    return random.Random(seed).sample(records, n_seqs)


def load_model(ckpt: Path):  # type: ignore[no-untyped-def]
    """Load a fair-esm checkpoint the safe way (argparse.Namespace allow-listed)."""
    import argparse as _argparse

    import esm

    regression = ckpt.with_name(f"{ckpt.stem}-contact-regression.pt")
    with torch.serialization.safe_globals([_argparse.Namespace]):
        model_data = torch.load(ckpt, map_location="cpu")
        regression_data = torch.load(regression, map_location="cpu")
    model, alphabet = esm.pretrained.load_model_and_alphabet_core(ckpt.stem, model_data, regression_data)
    return model.eval(), alphabet


def reference_embed(model, alphabet, records: Sequence[tuple[str, str]], layer: int, device: str = "cpu") -> np.ndarray:  # type: ignore[no-untyped-def]
    """fair-esm scripts/extract.py (``--include mean``); L2-normalised float32 [n, dim]."""
    import esm

    labels = [r[0] for r in records]
    dataset = esm.FastaBatchedDataset(labels, [r[1] for r in records])
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    data_loader = torch.utils.data.DataLoader(
        dataset,
        collate_fn=alphabet.get_batch_converter(TRUNCATION_SEQ_LENGTH),
        batch_sampler=batches,
    )
    means: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch_labels, strs, toks in data_loader:
            out = model(toks.to(device), repr_layers=[layer], return_contacts=False)
            rep = out["representations"][layer].to(device="cpu")
            for i, label in enumerate(batch_labels):
                truncate_len = min(TRUNCATION_SEQ_LENGTH, len(strs[i]))
                means[label] = rep[i, 1 : truncate_len + 1].mean(0).clone()
    vecs = torch.stack([means[label] for label in labels]).numpy().astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def model_flops(lengths: Sequence[int], layers: int, embed_dim: int) -> float:
    """Model FLOPs of embedding sequences of ``lengths`` residues through ``layers`` layers.

    Per token of an ``L``-token sequence (residues + BOS + EOS) and per layer:
    ``24 E^2`` (q/k/v, output, two feed-forward GEMMs) + ``4 L E`` (attention's two
    products); multiply-add counted as 2.
    """
    total = 0.0
    for n in lengths:
        tokens = n + 2
        total += layers * (24.0 * embed_dim**2 * tokens + 4.0 * embed_dim * tokens**2)
    return total


def matmul_rate(embed_dim: int, tokens: int, dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """FLOP/s of the device's matrix products at one layer's GEMM shapes.

    ``[tokens, E] @ [E, n]`` for the q/k/v (n = 3E), output (E) and first feed-forward
    (4E) weights and ``[tokens, 4E] @ [4E, E]`` for the second, in ``dtype``; best of
    ``repeats`` after a warm-up.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [
        (embed_dim, 3 * embed_dim),
        (embed_dim, embed_dim),
        (embed_dim, 4 * embed_dim),
        (4 * embed_dim, embed_dim),
    ]
    mats = [
        (
            torch.randn(tokens, k, generator=gen).to(device=device, dtype=dtype),
            torch.randn(k, n, generator=gen).to(device=device, dtype=dtype),
        )
        for k, n in shapes
    ]
    flops = sum(2.0 * tokens * k * n for k, n in shapes)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            for x, w in mats:
                torch.mm(x, w)
            sync()
            best = min(best, time.perf_counter() - t0)
    return flops / best


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def time_interleaved(
    methods: dict[str, Callable[[], np.ndarray]],
    residues: int,
    repeats: int,
    between: Callable[[], None] | None = None,
) -> dict[str, tuple[np.ndarray, float]]:
    """Warm up every method once, then time them in turn ``repeats`` times.

    Interleaving and keeping each method's best wall time makes the comparison
    fair on a shared, noisy machine (other load hits all methods alike).
    ``between`` (if given) runs after the warm-up and after every timed pass, outside
    the timers: the matrix-product rate is sampled there, next to the passes it judges.

    Every method returns numpy vectors, so CUDA work has finished when its timer stops.

    Returns:
        name -> (vectors of the last run, best wall seconds).
    """
    for fn in methods.values():
        fn()  # warm-up (allocator, oneDNN primitive caches, rotary tables, CUDA kernels)
    if between is not None:
        between()
    best_s = {name: float("inf") for name in methods}
    cpu_s = {name: float("inf") for name in methods}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            vectors[name] = fn()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            best_s[name] = min(best_s[name], wall)
            cpu_s[name] = min(cpu_s[name], cpu)
            if between is not None:
                between()
    for name in methods:
        print(
            f"{name:<34s} {best_s[name]:8.2f} s wall ({cpu_s[name]:7.2f} s CPU)  "
            f"{residues / best_s[name]:10.0f} residues/s",
            flush=True,
        )
    return {name: (vectors[name], best_s[name]) for name in methods}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)))


def main(argv: Sequence[str] | None = None) -> int:
    from esmsearch.checkpoints import ARCHITECTURES, write_random_checkpoint
    from esmsearch.embedding import Embedder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="esm2_t6_8M_UR50D", choices=sorted(ARCHITECTURES))
    parser.add_argument("--n-seqs", type=int, default=300)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for both paths (default cpu)")
    parser.add_argument(
        "--precisions",
        default="fp32",
        help="comma-separated precisions of esmsearch's Embedder (b), each timed side by side; "
        "the reference is always fp32 (default fp32)",
    )
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--max-residues", type=int, default=TRUNCATION_SEQ_LENGTH)
    parser.add_argument("--seed", type=int, default=0, help="sequence sample and checkpoint seed")
    parser.add_argument(
        "--toks-per-batch",
        type=int,
        default=4096,
        help="esmsearch token budget of a packed batch (default 4096); the reference always uses fair-esm's 4096",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed passes per method, interleaved; the best is reported"
    )
    parser.add_argument("--layer", type=int, default=None, help="representation layer (default: last)")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU (default 989: H100/H200 SXM)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip (a): esmsearch only")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    records = load_sequences(args.fasta, args.n_seqs, args.max_residues, args.seed)
    residues = sum(len(s) for _, s in records)
    on_cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(args.arch, tmp, seed=args.seed)
        model, alphabet = load_model(ckpt)
        model = model.to(args.device)
        layer = model.num_layers if args.layer is None else args.layer
        flops = model_flops([len(s) for _, s in records], layer, model.embed_tokens.embedding_dim)
        print(
            f"arch {args.arch} (random weights, seed {args.seed}), layer {layer}, "
            f"{len(records)} sequences, {residues} residues (max {max(len(s) for _, s in records)}), "
            f"{flops / residues / 1e6:.1f} MFLOP/residue; {device_name(args.device)}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        seqs = [s for _, s in records]
        ref_name = "(a) fair-esm extract.py fp32"
        methods: dict[str, Callable[[], np.ndarray]] = {}
        if not args.no_reference:
            methods[ref_name] = lambda: reference_embed(model, alphabet, records, layer, args.device)
        precision_of: dict[str, str] = {ref_name: "fp32"}
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            embedder = Embedder(
                str(ckpt), device=args.device, precision=precision, toks_per_batch=args.toks_per_batch, layer=layer
            )
            name = f"(b) esmsearch Embedder {embedder.precision}"
            methods[name] = lambda e=embedder: e.embed(seqs)  # type: ignore[misc]
            precision_of[name] = embedder.precision
        # The rate is sampled after the warm-up and after every timed pass, and the best
        # sample is the yardstick: a shared machine's speed drifts over minutes, and a
        # single sample taken in a slow moment would inflate every utilisation.
        rate_samples: dict[str, list[float]] = {p: [] for p in sorted({_RATE_OF[q] for q in precision_of.values()})}

        def sample_rates() -> None:
            for p, samples in rate_samples.items():
                samples.append(
                    matmul_rate(model.embed_tokens.embedding_dim, args.toks_per_batch, _DTYPES[p], args.device)
                )

        timings = time_interleaved(methods, residues, args.repeats, between=sample_rates)
        peaks = {p: max(samples) for p, samples in rate_samples.items()}
    for p, rate in peaks.items():
        low = min(rate_samples[p])
        print(
            f"matrix products at the model's shapes ({args.toks_per_batch} tokens), {p}: {rate / 1e9:,.0f} GFLOP/s "
            f"(best of {len(rate_samples[p])} samples taken between the passes; lowest {low / 1e9:,.0f})"
        )
    ref_vec = timings[ref_name][0] if ref_name in timings else None
    ref_s = timings[ref_name][1] if ref_name in timings else None
    for name, (vec, wall) in timings.items():
        achieved = flops / wall
        precision = precision_of[name]
        parts = [f"{name:<34s} {residues / wall:10,.0f} residues/s", f"{achieved / 1e9:10,.1f} GFLOP/s"]
        parts.append(f"utilisation {achieved / peaks[_RATE_OF[precision]]:6.1%} of {_RATE_OF[precision]} matmul")
        if on_cuda:
            parts.append(f"MFU {achieved / (args.peak_tflops * 1e12):6.2%}")
        if ref_vec is not None and ref_s is not None and name != ref_name:
            parts.append(f"ratio vs (a) {ref_s / wall:5.2f}x")
            parts.append(f"min cosine vs (a) {min_cosine(ref_vec, vec):.7f}")
        print("  ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
