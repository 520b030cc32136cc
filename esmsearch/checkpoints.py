"""Seeded random-weight ESM-2 checkpoints in fair-esm's own file format.

Machines without internet access (CI, build hosts) cannot download the pretrained
ESM-2 weights. Tests and benchmarks therefore write checkpoints of the *real*
ESM-2 architectures holding seeded random weights, laid out exactly as fair-esm's
released files are, so that the real loading code (:func:`esmsearch.embedding.load_model`,
which goes through ``esm.pretrained.load_model_and_alphabet_core``) runs on them.

Format (fair-esm 2.0.0, ``esm/pretrained.py``, ``_load_model_and_alphabet_core_v2``):

* ``<name>.pt``: ``{"cfg": {"model": argparse.Namespace(encoder_layers=...,
  encoder_embed_dim=..., encoder_attention_heads=..., token_dropout=True, ...)},
  "model": state_dict}`` with keys prefixed ``encoder.sentence_encoder.`` (trunk)
  and ``encoder.`` (LM head), as in the released files.
* ``<name>-contact-regression.pt``: ``{"model": {"contact_head.regression.weight",
  "contact_head.regression.bias"}}``.

The file stem must start with ``esm2`` because fair-esm picks the ESM-2 loader by
name. Speed and memory measured with these checkpoints hold for the pretrained
weights (same shapes, same FLOPs); retrieval quality does not.

Command line::

    python -m esmsearch.checkpoints esm2_t6_8M_UR50D -o checkpoints/ --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARCHITECTURES", "Esm2Architecture", "write_random_checkpoint"]


@dataclass(frozen=True)
class Esm2Architecture:
    """Shape of one released ESM-2 model (Lin et al. 2023, Science 379:1123, Table S1)."""

    name: str
    num_layers: int
    embed_dim: int
    attention_heads: int


#: The released ESM-2 architectures, by fair-esm pretrained name.
ARCHITECTURES: dict[str, Esm2Architecture] = {
    a.name: a
    for a in (
        Esm2Architecture("esm2_t6_8M_UR50D", 6, 320, 20),
        Esm2Architecture("esm2_t12_35M_UR50D", 12, 480, 20),
        Esm2Architecture("esm2_t30_150M_UR50D", 30, 640, 20),
        Esm2Architecture("esm2_t33_650M_UR50D", 33, 1280, 20),
        Esm2Architecture("esm2_t36_3B_UR50D", 36, 2560, 40),
    )
}


def _atomic_save(obj: object, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_random_checkpoint(
    architecture: str | Esm2Architecture,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_layers: int | None = None,
    embed_dim: int | None = None,
    attention_heads: int | None = None,
    name: str | None = None,
) -> Path:
    """Write a seeded random-weight ESM-2 checkpoint in fair-esm's format.

    Args:
        architecture: a key of :data:`ARCHITECTURES` (e.g. ``"esm2_t6_8M_UR50D"``)
            or an :class:`Esm2Architecture`.
        out_dir: directory to write into (created if missing).
        seed: seed of torch's generator used for the weights; the same seed gives
            byte-identical weights.
        num_layers, embed_dim, attention_heads: override the architecture's shape
            (tests use a tiny 2-layer, dim-32 model).
        name: file stem; must start with ``esm2``. Defaults to the architecture name,
            so the file is ``<out_dir>/esm2_t6_8M_UR50D.pt``.

    Returns:
        Path of the model ``.pt`` file; the contact-regression file lies beside it.

    Raises:
        ValueError: unknown architecture, or a name not starting with ``esm2``.
    """
    import torch
    from esm.model.esm2 import ESM2

    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown ESM-2 architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
        arch = ARCHITECTURES[architecture]
    else:
        arch = architecture
    layers = num_layers if num_layers is not None else arch.num_layers
    dim = embed_dim if embed_dim is not None else arch.embed_dim
    heads = attention_heads if attention_heads is not None else arch.attention_heads
    stem = name or arch.name
    if not stem.startswith("esm2"):
        raise ValueError(f"checkpoint name {stem!r} must start with 'esm2' (fair-esm picks its loader by name)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, token_dropout=True)
    finally:
        torch.random.set_rng_state(state)
    trunk: dict[str, torch.Tensor] = {}
    regression: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("contact_head.regression."):
            regression[key] = tensor.clone()
        elif key.startswith("lm_head."):
            trunk[f"encoder.{key}"] = tensor.clone()
        else:
            trunk[f"encoder.sentence_encoder.{key}"] = tensor.clone()
    cfg = argparse.Namespace(
        arch="esm2",
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=4 * dim,
        encoder_attention_heads=heads,
        token_dropout=True,
        max_positions=1024,
        random_weights_seed=seed,  # marks the file as random, never pretrained
    )
    model_path = out / f"{stem}.pt"
    _atomic_save({"cfg": {"model": cfg}, "model": trunk}, model_path)
    _atomic_save({"model": regression}, out / f"{stem}-contact-regression.pt")
    return model_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esmsearch.checkpoints",
        description="Write a seeded random-weight ESM-2 checkpoint in fair-esm's format "
        "(for tests and speed benchmarks; its rankings are meaningless).",
    )
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("-o", "--out-dir", default="checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_random_checkpoint(args.architecture, args.out_dir, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
