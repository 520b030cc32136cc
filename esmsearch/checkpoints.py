"""Seeded random-weight ESM-2 and ESM-1b checkpoints in fair-esm's own file format.

Machines without internet access (CI, build hosts) cannot download the pretrained
ESM weights. Tests and benchmarks therefore write checkpoints of the *real*
architectures (:data:`esmsearch.models.ARCHITECTURES`) holding seeded random weights,
laid out exactly as fair-esm's released files are, so that the real loading code
(:func:`esmsearch.embedding.load_model`, which goes through
``esm.pretrained.load_model_and_alphabet_core``) runs on them. For the Hugging Face
layout, convert one with :mod:`esmsearch.hf_convert`.

Formats (fair-esm 2.0.0, ``esm/pretrained.py``):

* ESM-2 (``_load_model_and_alphabet_core_v2``): ``<name>.pt`` holds
  ``{"cfg": {"model": argparse.Namespace(encoder_layers=..., encoder_embed_dim=...,
  encoder_attention_heads=..., token_dropout=True, ...)}, "model": state_dict}``.
* ESM-1b / ESM-1v (``_load_model_and_alphabet_core_v1``, fairseq's layout):
  ``{"args": argparse.Namespace(arch="roberta_large", encoder_layers=...,
  encoder_embed_dim=..., encoder_ffn_embed_dim=..., encoder_attention_heads=...,
  max_positions=1024, token_dropout=True, ...), "model": state_dict}``; the state
  holds ``emb_layer_norm_before`` (fair-esm enables that LayerNorm when the key is
  present, as in the released ESM-1b; Hugging Face's ``facebook/esm1b_t33_650M_UR50S``
  config has ``emb_layer_norm_before: true``).
* Both: state-dict keys prefixed ``encoder.sentence_encoder.`` (trunk) and
  ``encoder.`` (LM head), as in the released files;
  ``<name>-contact-regression.pt`` beside it holds ``{"model":
  {"contact_head.regression.weight", "contact_head.regression.bias"}}`` (not for
  ESM-1v, which was released without one).

fair-esm picks its loader by file name: an ESM-2 file stem must start with ``esm2``,
an ESM-1b/ESM-1v one must not. Speed and memory measured with these checkpoints hold
for the pretrained weights (same shapes, same FLOPs); retrieval quality does not.

Command line::

    python -m esmsearch.checkpoints esm2_t6_8M_UR50D -o checkpoints/ --seed 0
    python -m esmsearch.checkpoints esm1b_t33_650M_UR50S -o checkpoints/ --seed 0
    # a reduced ESM-2 (2 layers, dim 128) for scale rehearsals where embedding must not dominate
    python -m esmsearch.checkpoints esm2_t6_8M_UR50D --layers 2 --embed-dim 128 --heads 8 \
        --name esm2_t2_128d_random -o checkpoints/
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esmsearch.models import ARCHITECTURES, ESM1B_MAX_POSITIONS, ModelArchitecture

__all__ = ["ARCHITECTURES", "Esm2Architecture", "ModelArchitecture", "write_random_checkpoint"]

#: Former name of :class:`esmsearch.models.ModelArchitecture` (ESM-2 only then).
Esm2Architecture = ModelArchitecture


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
    architecture: str | ModelArchitecture,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_layers: int | None = None,
    embed_dim: int | None = None,
    attention_heads: int | None = None,
    name: str | None = None,
) -> Path:
    """Write a seeded random-weight ESM-2 or ESM-1b checkpoint in fair-esm's format.

    Args:
        architecture: a key of :data:`ARCHITECTURES` (e.g. ``"esm2_t6_8M_UR50D"``,
            ``"esm1b_t33_650M_UR50S"``) or a :class:`ModelArchitecture`.
        out_dir: directory to write into (created if missing).
        seed: seed of torch's generator used for the weights; the same seed gives
            byte-identical weights.
        num_layers, embed_dim, attention_heads: override the architecture's shape
            (tests use a tiny 2-layer, dim-32 model).
        name: file stem. ESM-2 stems must start with ``esm2`` and ESM-1b stems must
            not (fair-esm picks its loader by name). Defaults to the architecture
            name, so the file is ``<out_dir>/esm2_t6_8M_UR50D.pt``.

    Returns:
        Path of the model ``.pt`` file; the contact-regression file lies beside it
        (except for ESM-1v names, as released).

    Raises:
        ValueError: unknown architecture, or a name fair-esm would load with the
            wrong loader.
    """
    import torch

    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown ESM architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
        arch = ARCHITECTURES[architecture]
    else:
        arch = architecture
    layers = num_layers if num_layers is not None else arch.num_layers
    dim = embed_dim if embed_dim is not None else arch.embed_dim
    heads = attention_heads if attention_heads is not None else arch.attention_heads
    stem = name or arch.name
    if arch.family == "esm2" and not stem.startswith("esm2"):
        raise ValueError(f"checkpoint name {stem!r} must start with 'esm2' (fair-esm picks its loader by name)")
    if arch.family == "esm1b" and stem.startswith("esm2"):
        raise ValueError(
            f"ESM-1b checkpoint name {stem!r} must not start with 'esm2' (fair-esm picks its loader by name)"
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model, cfg = _random_model(arch.family, layers, dim, heads, seed)
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
    model_path = out / f"{stem}.pt"
    _atomic_save({**cfg, "model": trunk}, model_path)
    if "esm1v" not in stem:  # fair-esm: ESM-1v has no contact regression (_has_regression_weights)
        _atomic_save({"model": regression}, out / f"{stem}-contact-regression.pt")
    return model_path


def _random_model(family: str, layers: int, dim: int, heads: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """A freshly initialised fair-esm module and the config part of its checkpoint."""
    import esm
    from esm.model.esm1 import ProteinBertModel
    from esm.model.esm2 import ESM2

    if family == "esm2":
        model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, token_dropout=True)
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
        return model, {"cfg": {"model": cfg}}
    args = argparse.Namespace(
        arch="roberta_large",
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=4 * dim,
        encoder_attention_heads=heads,
        max_positions=ESM1B_MAX_POSITIONS,
        token_dropout=True,
        random_weights_seed=seed,  # marks the file as random, never pretrained
    )
    # ProteinBertModel reads the names fair-esm's v1 loader derives (encoder_ prefix dropped).
    module_args = argparse.Namespace(
        arch="roberta_large",
        layers=layers,
        embed_dim=dim,
        ffn_embed_dim=4 * dim,
        attention_heads=heads,
        max_positions=ESM1B_MAX_POSITIONS,
        token_dropout=True,
        emb_layer_norm_before=True,
    )
    model = ProteinBertModel(module_args, esm.data.Alphabet.from_architecture("roberta_large"))
    return model, {"args": args}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esmsearch.checkpoints",
        description="Write a seeded random-weight ESM-2 or ESM-1b/ESM-1v checkpoint in fair-esm's format "
        "(for tests and speed benchmarks; its rankings are meaningless).",
    )
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("-o", "--out-dir", default="checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=_positive_int, default=None, help="override the number of layers")
    parser.add_argument("--embed-dim", type=_positive_int, default=None, help="override the embedding dimension")
    parser.add_argument(
        "--heads", type=_positive_int, default=None, help="override the attention heads (must divide --embed-dim)"
    )
    parser.add_argument(
        "--name", default=None, help="file stem (default: the architecture's name; ESM-2 stems start with 'esm2')"
    )
    args = parser.parse_args(argv)
    arch = ARCHITECTURES[args.architecture]
    dim = args.embed_dim if args.embed_dim is not None else arch.embed_dim
    heads = args.heads if args.heads is not None else arch.attention_heads
    if dim % heads:
        parser.error(f"--embed-dim {dim} is not a multiple of --heads {heads}")
    reshaped = (args.layers, args.embed_dim, args.heads) != (None, None, None)
    if reshaped and args.name is None:
        parser.error("--layers/--embed-dim/--heads need --name: a reshaped model must not carry a pretrained name")
    try:
        path = write_random_checkpoint(
            args.architecture,
            args.out_dir,
            seed=args.seed,
            num_layers=args.layers,
            embed_dim=args.embed_dim,
            attention_heads=args.heads,
            name=args.name,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
