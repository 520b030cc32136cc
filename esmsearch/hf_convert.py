"""Hugging Face ESM checkpoints <-> fair-esm modules.

esmsearch runs every model through one fast encoder built on fair-esm's modules
(:class:`esmsearch.esm2_fast.Esm2Encoder`). A model in the Hugging Face layout
(``transformers.EsmModel`` / ``EsmForMaskedLM``, as ``save_pretrained`` writes it and
as ``facebook/esm2_t33_650M_UR50D`` is published) is therefore read into a fair-esm
module: :func:`load_hf_directory`. The key mapping is the one of transformers'
``models/esm/convert_esm.py`` (which built the published Hugging Face checkpoints
from fair-esm's), read backwards:

Hugging Face name (``esm.`` prefix of ``EsmForMaskedLM`` dropped) -> fair-esm name:

* ``embeddings.word_embeddings`` -> ``embed_tokens``
* ``embeddings.position_embeddings`` (absolute positions: ESM-1b) -> ``embed_positions``
* ``embeddings.layer_norm`` (``emb_layer_norm_before``: ESM-1b) -> ``emb_layer_norm_before``
* ``encoder.layer.N.attention.self.{query,key,value}`` -> ``layers.N.self_attn.{q,k,v}_proj``
* ``encoder.layer.N.attention.output.dense`` -> ``layers.N.self_attn.out_proj``
* ``encoder.layer.N.attention.LayerNorm`` -> ``layers.N.self_attn_layer_norm``
* ``encoder.layer.N.intermediate.dense`` -> ``layers.N.fc1``
* ``encoder.layer.N.output.dense`` -> ``layers.N.fc2``
* ``encoder.layer.N.LayerNorm`` -> ``layers.N.final_layer_norm``
* ``encoder.emb_layer_norm_after`` -> ``emb_layer_norm_after``
* ``...rotary_embeddings.inv_freq`` (rotary: ESM-2) -> ``layers.N.self_attn.rot_emb.inv_freq``
* ``contact_head.regression``, ``lm_head.{dense,layer_norm,bias}`` -> the same names
  (optional: pooling uses neither head)

LayerNorm parameters stored under the legacy names ``gamma``/``beta`` (as
transformers 5 writes them) are read as ``weight``/``bias``; ``pooler.*`` and other
task heads are ignored. The rotary ``inv_freq`` is taken from the file when present
(per layer, or one shared tensor), else computed as fair-esm does
(``1 / rope_theta ** (arange(0, head_dim, 2) / head_dim)``). ``layer_norm_eps``
is applied to every LayerNorm. Weights are read with safetensors (or ``torch.load``
with ``weights_only=True`` for ``pytorch_model.bin``); transformers itself is only
needed to *write* the Hugging Face layout.

The other direction, :func:`convert_fair_esm_to_hf`, writes a fair-esm checkpoint
(ESM-2 or ESM-1b/ESM-1v) as a Hugging Face directory through
``transformers.EsmForMaskedLM.save_pretrained`` plus an ``EsmTokenizer``
(``vocab.txt``), so that ``EsmModel.from_pretrained(DIR)`` loads it::

    python -m esmsearch.hf_convert checkpoints/esm2_t6_8M_UR50D.pt -o hf/esm2_t6_8M_UR50D

Hub ids (``facebook/esm2_t33_650M_UR50D``) are fetched by :func:`fetch_hf_hub` with
``huggingface_hub.snapshot_download`` into the Hugging Face cache
(``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` only the cache is used.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esmsearch import fsutil
from esmsearch.errors import ModelLoadError
from esmsearch.hf_format import (
    _INV_FREQ_SUFFIX,
    _LAYER_KEYS,
    _TOP_KEYS,
    HF_CONFIG,
    WEIGHT_FILES,
    HfEsmConfig,
    HfModel,
    fetch_hf_hub,
    find_weights,
    hf_state_to_fair_esm,
    is_hf_directory,
    load_hf_directory,
    weights_sha256,
)
from esmsearch.models import ESM1B_MAX_POSITIONS

if TYPE_CHECKING:
    import torch

__all__ = [
    "HF_CONFIG",
    "WEIGHT_FILES",
    "HfEsmConfig",
    "HfModel",
    "convert_fair_esm_to_hf",
    "fair_esm_state_to_hf",
    "fetch_hf_hub",
    "find_weights",
    "hf_state_to_fair_esm",
    "is_hf_directory",
    "load_hf_directory",
    "main",
    "weights_sha256",
]

log = logging.getLogger(__name__)


def fair_esm_state_to_hf(model: Any) -> dict[str, torch.Tensor]:
    """State dict of ``transformers.EsmForMaskedLM`` for a fair-esm ESM-2 or ESM-1b module.

    The inverse of :func:`hf_state_to_fair_esm` (``esm.`` prefix, LM head, contact
    head); rotary ``inv_freq`` is left to the caller (its key differs between
    transformers versions), the LM decoder weight is tied to the token embedding.
    """
    fair_to_hf = {v: k for k, v in _TOP_KEYS.items()}
    sub_to_hf = {v: k for k, v in _LAYER_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("rot_emb.inv_freq") or key == "lm_head.weight":
            continue
        if key in fair_to_hf:
            hf_key = fair_to_hf[key]
        else:
            found = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", key)
            if found is None or found.group(2) not in sub_to_hf:
                raise ModelLoadError(f"fair-esm tensor {key!r} has no Hugging Face counterpart")
            hf_key = f"encoder.layer.{found.group(1)}.{sub_to_hf[found.group(2)]}.{found.group(3)}"
        out[hf_key if hf_key.startswith("lm_head.") else f"esm.{hf_key}"] = tensor.detach().clone()
    return out


def convert_fair_esm_to_hf(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a fair-esm checkpoint (ESM-2 or ESM-1b/ESM-1v) as a Hugging Face directory.

    The directory holds ``config.json`` (``EsmConfig``: the checkpoint's shape,
    ``layer_norm_eps`` 1e-5, dropout 0 as in the published ``facebook/esm*``
    configs), ``model.safetensors`` (``EsmForMaskedLM.save_pretrained``) and the
    tokenizer files with ``vocab.txt``. It is written beside ``out_dir`` and renamed
    into place once complete, so a failure leaves no partial directory.

    Args:
        checkpoint: fair-esm ``.pt`` file or pretrained name (see
            :func:`esmsearch.embedding.load_model`).
        out_dir: destination directory.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ModelLoadError: the checkpoint cannot be loaded, or transformers is missing.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    import torch

    from esmsearch.embedding import load_model

    try:
        from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer
    except ImportError as exc:
        raise ModelLoadError("writing the Hugging Face layout needs transformers: pip install 'esmsearch[hf]'") from exc
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    loaded = load_model(str(checkpoint))
    model = loaded.model
    first_attn = model.layers[0].self_attn
    embed_dim = int(model.embed_tokens.embedding_dim)
    esm1b = loaded.family == "esm1b"
    config = EsmConfig(
        vocab_size=len(loaded.alphabet.all_toks),
        mask_token_id=loaded.alphabet.mask_idx,
        pad_token_id=loaded.alphabet.padding_idx,
        hidden_size=embed_dim,
        num_hidden_layers=int(model.num_layers),
        num_attention_heads=int(first_attn.num_heads),
        intermediate_size=int(model.layers[0].fc1.out_features),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=int(model.embed_positions.weight.shape[0]) if esm1b else ESM1B_MAX_POSITIONS + 2,
        position_embedding_type="absolute" if esm1b else "rotary",
        token_dropout=bool(model.args.token_dropout if esm1b else model.token_dropout),
        emb_layer_norm_before=bool(esm1b and model.emb_layer_norm_before is not None),
        layer_norm_eps=float(model.emb_layer_norm_after.eps),
        architectures=["EsmForMaskedLM"],
    )
    hf_model: Any = EsmForMaskedLM(config)
    state = fair_esm_state_to_hf(model)
    inv_freq = None if esm1b else first_attn.rot_emb.inv_freq.detach().clone()
    for key in hf_model.state_dict():
        if key.endswith(_INV_FREQ_SUFFIX) and inv_freq is not None:
            state[key] = inv_freq
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # lm_head.decoder.weight is tied to the token embedding; position_ids is a non-persistent buffer.
    missing = [k for k in missing if k != "lm_head.decoder.weight" and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(f"cannot map {checkpoint} onto EsmForMaskedLM: missing {missing}, unexpected {unexpected}")
    hf_model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():
            hf_model.save_pretrained(work)
        (work / "vocab.txt").write_text("\n".join(loaded.alphabet.all_toks) + "\n", encoding="utf-8")
        tokenizer: Any = EsmTokenizer
        tokenizer(vocab_file=str(work / "vocab.txt")).save_pretrained(work)
        for f in work.iterdir():
            fsutil.fsync_file(f)
        fsutil.fsync_dir(work)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        fsutil.fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m esmsearch.hf_convert CHECKPOINT -o OUT_DIR [--overwrite]``; prints the directory."""
    parser = argparse.ArgumentParser(
        prog="python -m esmsearch.hf_convert",
        description="Write a fair-esm ESM-2 / ESM-1b checkpoint in the Hugging Face layout "
        "(config.json, model.safetensors, vocab.txt), loadable with transformers.EsmModel.from_pretrained.",
    )
    parser.add_argument("checkpoint", help="fair-esm .pt file or pretrained name")
    parser.add_argument("-o", "--out-dir", required=True, type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        path = convert_fair_esm_to_hf(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except (ModelLoadError, FileExistsError) as exc:
        print(f"esmsearch.hf_convert: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
