"""Embedding throughput: fair-esm's reference extraction vs esmsearch, side by side.

One run, same sequences, same random-weight checkpoint, same machine:

(a) **reference**: exactly what fair-esm's ``scripts/extract.py`` does for
    ``--include mean``: ``esm.FastaBatchedDataset`` +
    ``get_batch_indices(toks_per_batch=4096, extra_toks_per_seq=1)`` + a DataLoader
    with ``alphabet.get_batch_converter(truncation_seq_length=1022)`` +
    ``model(toks, repr_layers=[layer])`` under ``torch.no_grad`` + mean over
    ``1 : len + 1``; fp32. The vectors are then L2-normalised for comparison.
(b) **esmsearch**: ``esmsearch.embedding.Embedder(...).embed(sequences)`` (the
    public API; float32 ``[n, dim]``, L2-normalised) when that class exists;
    otherwise :class:`esmsearch.esm2_fast.Esm2Encoder` with a length-sorted
    token-budget batching and masked residue mean (printed as "encoder-direct").
    When the Embedder exists, the encoder-direct figure is printed too, so any
    gap between the two is the Embedder's own overhead.

Printed: residues/s of each, the speed ratio (b)/(a), and the minimum over
sequences of the cosine between (a) and (b). bf16 is also run (and its min cosine
printed) when the CPU has native bf16 (:func:`esmsearch.esm2_fast.cpu_supports_fast_bf16`)
or when ``--bf16`` forces it.

Sequences: a seeded random sample (``--seed``) of ``--n-seqs`` records of at most
``--max-residues`` (default 1022) residues from the E. coli K-12 proteome, so that
fair-esm's truncation and esmsearch's windowing of long sequences do not make the
two differ by construction.

Usage::

    python benchmarks/embed_throughput.py --arch esm2_t6_8M_UR50D --threads 2
    python benchmarks/embed_throughput.py --arch esm2_t12_35M_UR50D
    python benchmarks/embed_throughput.py --arch esm1b_t33_650M_UR50S --n-seqs 24

Any architecture of ``esmsearch.models.ARCHITECTURES`` works, ESM-1b/ESM-1v included
(the reference is then fair-esm's ``ProteinBertModel`` forward).
"""

from __future__ import annotations

import argparse
import importlib.util
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


def encoder_direct_embed(  # type: ignore[no-untyped-def]
    model,
    alphabet,
    records: Sequence[tuple[str, str]],
    layer: int,
    toks_per_batch: int,
    precision: str,
) -> Callable[[], np.ndarray]:
    """Esm2Encoder with length-sorted token-budget batches; returns a closure doing one pass."""
    from esmsearch.esm2_fast import Esm2Encoder

    encoder = Esm2Encoder(model, layer, precision=precision)
    converter = alphabet.get_batch_converter()
    order = sorted(range(len(records)), key=lambda i: len(records[i][1]))
    batches: list[list[int]] = []
    buf: list[int] = []
    for i in order:
        padded = (len(records[i][1]) + 2) * (len(buf) + 1)  # sorted: this one is the longest
        if buf and padded > toks_per_batch:
            batches.append(buf)
            buf = []
        buf.append(i)
    if buf:
        batches.append(buf)

    def run() -> np.ndarray:
        out = np.empty((len(records), model.embed_tokens.embedding_dim), dtype=np.float32)
        for batch in batches:
            _, _, toks = converter([records[i] for i in batch])
            reps = encoder(toks)  # (B, T, E) float32
            lengths = torch.tensor([len(records[i][1]) for i in batch], device=reps.device)
            pos = torch.arange(toks.shape[1], device=reps.device)
            residue = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])  # (B, T)
            summed = torch.einsum("bte,bt->be", reps, residue.to(reps.dtype))
            mean = summed / lengths[:, None].to(reps.dtype)
            out[batch] = torch.nn.functional.normalize(mean, dim=1).cpu().numpy()
        return out

    return run


def embedder_available() -> bool:
    if importlib.util.find_spec("esmsearch.embedding") is None:
        return False
    import esmsearch.embedding as emb

    return hasattr(emb, "Embedder")


def time_interleaved(
    methods: dict[str, Callable[[], np.ndarray]], residues: int, repeats: int
) -> dict[str, tuple[np.ndarray, float]]:
    """Warm up every method once, then time them in turn ``repeats`` times.

    Interleaving and keeping each method's best wall time makes the comparison
    fair on a shared, noisy machine (other load hits all methods alike).

    Returns:
        name -> (vectors of the last run, best residues/s).
    """
    for fn in methods.values():
        fn()  # warm-up (allocator, oneDNN primitive caches, rotary tables)
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
    for name in methods:
        print(
            f"{name:<34s} {best_s[name]:8.2f} s wall ({cpu_s[name]:7.2f} s CPU)  "
            f"{residues / best_s[name]:10.0f} residues/s"
        )
    return {name: (vectors[name], residues / best_s[name]) for name in methods}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)))


def main(argv: Sequence[str] | None = None) -> int:
    from esmsearch.checkpoints import ARCHITECTURES, write_random_checkpoint
    from esmsearch.esm2_fast import cpu_supports_fast_bf16

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="esm2_t6_8M_UR50D", choices=sorted(ARCHITECTURES))
    parser.add_argument("--n-seqs", type=int, default=300)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for both paths (default cpu)")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16", "auto"],
        help="precision of esmsearch's Embedder (b); the reference is always fp32 (default fp32)",
    )
    parser.add_argument("--fasta", type=Path, default=DEFAULT_FASTA)
    parser.add_argument("--max-residues", type=int, default=TRUNCATION_SEQ_LENGTH)
    parser.add_argument("--seed", type=int, default=0, help="sequence sample and checkpoint seed")
    parser.add_argument(
        "--toks-per-batch",
        type=int,
        default=None,
        help="esmsearch token budget per batch (default: the Embedder's own default, "
        "4096 for encoder-direct); the reference always uses fair-esm's 4096",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes per method, interleaved; the best is reported (default 1)",
    )
    parser.add_argument("--bf16", action="store_true", help="also run bf16 even without native CPU bf16")
    parser.add_argument("--layer", type=int, default=None, help="representation layer (default: last)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    records = load_sequences(args.fasta, args.n_seqs, args.max_residues, args.seed)
    residues = sum(len(s) for _, s in records)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(args.arch, tmp, seed=args.seed)
        model, alphabet = load_model(ckpt)
        model = model.to(args.device)
        layer = model.num_layers if args.layer is None else args.layer
        print(
            f"arch {args.arch} (random weights, seed {args.seed}), layer {layer}, "
            f"{len(records)} sequences, {residues} residues "
            f"(max {max(len(s) for _, s in records)}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"fast bf16 CPU: {cpu_supports_fast_bf16()}"
        )

        seqs = [s for _, s in records]
        direct_tpb = args.toks_per_batch or 4096
        ref_name = "(a) fair-esm extract.py fp32"
        methods: dict[str, Callable[[], np.ndarray]] = {
            ref_name: lambda: reference_embed(model, alphabet, records, layer, args.device),
            f"    encoder-direct fp32 (tpb {direct_tpb})": encoder_direct_embed(
                model, alphabet, records, layer, direct_tpb, "fp32"
            ),
        }
        run_bf16 = args.bf16 or cpu_supports_fast_bf16()
        if embedder_available():
            from esmsearch.embedding import Embedder

            kwargs = {} if args.toks_per_batch is None else {"toks_per_batch": args.toks_per_batch}
            embedder = Embedder(str(ckpt), device=args.device, precision=args.precision, **kwargs)
            methods[f"(b) esmsearch Embedder {embedder.precision}"] = lambda: embedder.embed(seqs)
            if run_bf16 and embedder.precision != "bf16":
                embedder_bf16 = Embedder(str(ckpt), device=args.device, precision="bf16", **kwargs)
                methods["(b) esmsearch Embedder bf16"] = lambda: embedder_bf16.embed(seqs)
        else:
            print("    (esmsearch.embedding.Embedder not available yet: (b) = encoder-direct)")
            if run_bf16:
                methods[f"    encoder-direct bf16 (tpb {direct_tpb})"] = encoder_direct_embed(
                    model, alphabet, records, layer, direct_tpb, "bf16"
                )
        timings = time_interleaved(methods, residues, args.repeats)

    ref, ref_rate = timings.pop(ref_name)
    results = [(name.strip(), vec, rate) for name, (vec, rate) in timings.items()]
    for name, vec, rate in results:
        print(f"{name:<34s} ratio vs (a) {rate / ref_rate:5.2f}x   min cosine vs (a) {min_cosine(ref, vec):.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
