"""Reading Hugging Face ESM checkpoints into fair-esm modules (see :mod:`esmsearch.hf_convert`).

The reading half of :mod:`esmsearch.hf_convert`, kept apart so that
:mod:`esmsearch.embedding` (which loads models) and :mod:`esmsearch.hf_convert`
(whose converter loads fair-esm checkpoints through :mod:`esmsearch.embedding`)
import it without importing each other. The key mapping and its source are
described in :mod:`esmsearch.hf_convert`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esmsearch import fsutil
from esmsearch.errors import ModelLoadError
from esmsearch.models import ESM1B_MAX_POSITIONS, VOCAB_SIZE

if TYPE_CHECKING:
    import torch

__all__ = [
    "HF_CONFIG",
    "WEIGHT_FILES",
    "HfEsmConfig",
    "HfModel",
    "fetch_hf_hub",
    "find_weights",
    "hf_state_to_fair_esm",
    "is_hf_directory",
    "load_hf_directory",
    "weights_sha256",
]

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
#: Weight files of a Hugging Face directory, in the order they are looked for.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: fair-esm's ESM-1b/ESM-2 alphabet: padding and mask token ids (``esm.data.Alphabet``).
_PAD_IDX = 1
_MASK_IDX = 32

# encoder.layer.N.<HF sub-module> -> layers.N.<fair-esm sub-module>
_LAYER_KEYS = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_TOP_KEYS = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "embeddings.position_embeddings.weight": "embed_positions.weight",
    "embeddings.layer_norm.weight": "emb_layer_norm_before.weight",
    "embeddings.layer_norm.bias": "emb_layer_norm_before.bias",
    "encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "contact_head.regression.weight": "contact_head.regression.weight",
    "contact_head.regression.bias": "contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_INV_FREQ_SUFFIX = "rotary_embeddings.inv_freq"
#: fair-esm state keys a Hugging Face checkpoint may lack (heads pooling does not use).
_OPTIONAL_PREFIXES = ("lm_head.", "contact_head.")


@dataclass(frozen=True)
class HfEsmConfig:
    """The parts of a Hugging Face ``EsmConfig`` (``config.json``) that shape the model.

    Attributes:
        num_layers: ``num_hidden_layers``.
        embed_dim: ``hidden_size``.
        attention_heads: ``num_attention_heads``.
        ffn_embed_dim: ``intermediate_size``.
        family: ``"esm2"`` (``position_embedding_type: rotary``) or ``"esm1b"``
            (``absolute``: learned positions).
        token_dropout: rescale embeddings for ``<mask>`` tokens (all released models).
        emb_layer_norm_before: a LayerNorm on the embeddings (ESM-1b).
        layer_norm_eps: epsilon of every LayerNorm.
        max_position_embeddings: rows of the learned position table (ESM-1b: 1,026).
        rope_theta: rotary base period (10,000 in ESM-2).
    """

    num_layers: int
    embed_dim: int
    attention_heads: int
    ffn_embed_dim: int
    family: str
    token_dropout: bool
    emb_layer_norm_before: bool
    layer_norm_eps: float
    max_position_embeddings: int
    rope_theta: float

    @classmethod
    def read(cls, path: Path) -> HfEsmConfig:
        """Read and check ``config.json``.

        Raises:
            ModelLoadError: unreadable JSON, not an ESM config (``model_type`` other
                than ``esm``, an ESMFold config), or a shape esmsearch cannot run
                (vocabulary other than fair-esm's 33 tokens, another activation,
                rotary with an embedding LayerNorm, or fewer than 1,024 learned
                positions); the message names the file and the field.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read Hugging Face config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path}: not a JSON object")

        def integer(name: str, default: int | None = None) -> int:
            value = data.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelLoadError(f"{path}: field {name!r} must be an integer; got {value!r}")
            return value

        def number(name: str, default: float) -> float:
            value = data.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ModelLoadError(f"{path}: field {name!r} must be a number; got {value!r}")
            return float(value)

        if data.get("model_type") != "esm":
            raise ModelLoadError(f"{path}: model_type {data.get('model_type')!r} is not 'esm' (an ESM-2/ESM-1b model)")
        if data.get("is_folding_model"):
            raise ModelLoadError(f"{path}: an ESMFold model (is_folding_model); give its ESM-2 language model")
        checks = {"vocab_size": VOCAB_SIZE, "pad_token_id": _PAD_IDX, "mask_token_id": _MASK_IDX}
        for name, expected in checks.items():
            if data.get(name, expected) != expected:
                raise ModelLoadError(
                    f"{path}: {name} is {data.get(name)!r}, expected {expected} (fair-esm's ESM alphabet)"
                )
        if data.get("hidden_act", "gelu") != "gelu":
            raise ModelLoadError(f"{path}: hidden_act {data.get('hidden_act')!r} is not ESM's 'gelu'")
        position = data.get("position_embedding_type", "absolute")
        if position not in ("rotary", "absolute"):
            raise ModelLoadError(f"{path}: position_embedding_type {position!r} is neither 'rotary' nor 'absolute'")
        config = cls(
            num_layers=integer("num_hidden_layers"),
            embed_dim=integer("hidden_size"),
            attention_heads=integer("num_attention_heads"),
            ffn_embed_dim=integer("intermediate_size"),
            family="esm2" if position == "rotary" else "esm1b",
            token_dropout=bool(data.get("token_dropout", False)),
            emb_layer_norm_before=bool(data.get("emb_layer_norm_before", False)),
            layer_norm_eps=number("layer_norm_eps", 1e-12),
            max_position_embeddings=integer("max_position_embeddings", 1026),
            rope_theta=number("rope_theta", 10000.0),
        )
        if config.num_layers < 1 or config.embed_dim < 1 or config.attention_heads < 1:
            raise ModelLoadError(f"{path}: num_hidden_layers, hidden_size and num_attention_heads must be >= 1")
        if config.embed_dim % config.attention_heads:
            raise ModelLoadError(
                f"{path}: hidden_size {config.embed_dim} is not a multiple of num_attention_heads "
                f"{config.attention_heads}"
            )
        if config.family == "esm2":
            if config.emb_layer_norm_before:
                raise ModelLoadError(
                    f"{path}: a rotary (ESM-2) model with emb_layer_norm_before is not an ESM-2 layout"
                )
            if config.ffn_embed_dim != 4 * config.embed_dim:
                raise ModelLoadError(
                    f"{path}: intermediate_size {config.ffn_embed_dim} is not 4 x hidden_size as in ESM-2"
                )
        elif config.max_position_embeddings < ESM1B_MAX_POSITIONS + 2:
            raise ModelLoadError(
                f"{path}: max_position_embeddings {config.max_position_embeddings} gives fewer than "
                f"{ESM1B_MAX_POSITIONS} learned positions, shorter than esmsearch's 1,022-residue windows"
            )
        return config


@dataclass
class HfModel:
    """A Hugging Face ESM checkpoint read into a fair-esm module.

    Attributes:
        model: ``esm.model.esm2.ESM2`` (rotary) or ``esm.model.esm1.ProteinBertModel``
            (ESM-1b layout), eval mode, CPU, float32.
        alphabet: fair-esm's ``Alphabet`` (the same 33 tokens as ``vocab.txt``).
        config: the parsed ``config.json``.
        weights: the weight file(s) read (shards in order).
        weights_sha256: see :func:`weights_sha256`.
    """

    model: Any
    alphabet: Any
    config: HfEsmConfig
    weights: list[Path]
    weights_sha256: str


def is_hf_directory(path: Path) -> bool:
    """Whether ``path`` is a directory holding a Hugging Face ``config.json``."""
    return path.is_dir() and (path / HF_CONFIG).is_file()


def find_weights(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: one file, or the shards an index names.

    safetensors is preferred over ``pytorch_model.bin`` when both exist (as
    transformers does).

    Raises:
        ModelLoadError: no weight file, or an index that is unreadable or names a
            missing shard (the message names the file).
    """
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read shard index {path}: {exc}") from exc
        files = [directory / shard for shard in shards]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"shard {f} named by {path} is missing")
        return files
    raise ModelLoadError(
        f"no weights in Hugging Face directory {directory}: expected one of {', '.join(WEIGHT_FILES)} "
        "beside config.json (as save_pretrained writes them)"
    )


def weights_sha256(files: Sequence[Path]) -> str:
    """sha256 identifying a model's weights: the file's own sha256, or for shards the
    sha256 of the lines ``"<shard name> <shard sha256>\\n"`` in shard-name order."""
    if len(files) == 1:
        return fsutil.file_sha256(files[0])
    lines = "".join(f"{f.name} {fsutil.file_sha256(f)}\n" for f in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _read_weights(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    import torch

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                try:
                    from safetensors.torch import load_file
                except ImportError as exc:
                    raise ModelLoadError(
                        f"reading {path} needs the safetensors package: pip install 'esmsearch[hf]'"
                    ) from exc
                part = load_file(str(path), device="cpu")
            else:
                part = torch.load(str(path), map_location="cpu", weights_only=True)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors, pickle and zip errors have no common base
            raise ModelLoadError(
                f"cannot read Hugging Face weights {path}: corrupt or truncated ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ModelLoadError(f"{path} is not a state dict of tensors")
        state.update(part)
    return state


def hf_state_to_fair_esm(
    state: Mapping[str, torch.Tensor], config: HfEsmConfig, *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ESM state dict onto fair-esm's names (table in the module docstring).

    Args:
        state: tensors of ``EsmModel`` or ``EsmForMaskedLM`` (``esm.`` prefix).
        config: the model's config.
        source: named in errors (the weight file).

    Returns:
        fair-esm state dict of the trunk (plus LM/contact heads where present),
        including every layer's ``rot_emb.inv_freq`` for rotary models.

    Raises:
        ModelLoadError: an ESM trunk tensor is missing or unknown, or a layer index is
            out of range (the message names ``source`` and the key).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    inv_freqs: dict[int | None, torch.Tensor] = {}
    for raw_key, tensor in state.items():
        key = raw_key.removeprefix("esm.")
        if key.endswith(".gamma"):
            key = key[: -len(".gamma")] + ".weight"
        elif key.endswith(".beta"):
            key = key[: -len(".beta")] + ".bias"
        if key.endswith(_INV_FREQ_SUFFIX):
            found = re.match(r"^encoder\.layer\.(\d+)\.", key)
            inv_freqs[int(found.group(1)) if found else None] = tensor
            continue
        if key in _TOP_KEYS:
            if key == "embeddings.position_embeddings.weight" and config.family == "esm2":
                continue  # transformers ignores it in rotary models too
            out[_TOP_KEYS[key]] = tensor
            continue
        layer = _LAYER_RE.match(key)
        if layer is not None:
            index, sub, kind = int(layer.group(1)), layer.group(2), layer.group(3)
            if sub not in _LAYER_KEYS or index >= config.num_layers:
                raise ModelLoadError(f"{source}: unexpected tensor {raw_key!r} for a {config.num_layers}-layer ESM")
            out[f"layers.{index}.{_LAYER_KEYS[sub]}.{kind}"] = tensor
            continue
        if key.startswith(("embeddings.", "encoder.")) and key != "embeddings.position_ids":
            raise ModelLoadError(f"{source}: unexpected tensor {raw_key!r} in the ESM trunk")
        # pooler.*, lm_head.decoder.weight (tied to the token embedding), task heads: unused.
    if config.family == "esm2":
        head_dim = config.embed_dim // config.attention_heads
        default = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        for i in range(config.num_layers):
            out[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv_freqs.get(i, inv_freqs.get(None, default))
    return out


def _fair_esm_module(config: HfEsmConfig) -> tuple[Any, Any]:
    import esm
    from esm.model.esm1 import ProteinBertModel
    from esm.model.esm2 import ESM2

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    if config.family == "esm2":
        model: Any = ESM2(
            num_layers=config.num_layers,
            embed_dim=config.embed_dim,
            attention_heads=config.attention_heads,
            alphabet=alphabet,
            token_dropout=config.token_dropout,
        )
    else:
        args = argparse.Namespace(
            arch="roberta_large",
            layers=config.num_layers,
            embed_dim=config.embed_dim,
            ffn_embed_dim=config.ffn_embed_dim,
            attention_heads=config.attention_heads,
            max_positions=config.max_position_embeddings - 2,
            token_dropout=config.token_dropout,
            emb_layer_norm_before=config.emb_layer_norm_before,
        )
        model = ProteinBertModel(args, alphabet)
    for module in model.modules():
        if module.__class__.__name__.endswith("LayerNorm") and hasattr(module, "eps"):
            module.eps = config.layer_norm_eps
    return model, alphabet


def _check_vocab(directory: Path, alphabet: Any) -> None:
    vocab = directory / "vocab.txt"
    if not vocab.is_file():
        return
    try:
        tokens = vocab.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {vocab}: {exc}") from exc
    if tokens != list(alphabet.all_toks):
        raise ModelLoadError(
            f"{vocab} does not list fair-esm's ESM alphabet in order ({len(tokens)} tokens, first "
            f"{tokens[:5]}; expected {list(alphabet.all_toks)[:5]}...)"
        )


def load_hf_directory(directory: str | os.PathLike[str]) -> HfModel:
    """Read a Hugging Face ESM-2 or ESM-1b directory into a fair-esm module.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` or
            ``pytorch_model.bin`` (or sharded ``*.index.json`` + shards), as
            ``save_pretrained`` writes them; an optional ``vocab.txt`` must list
            fair-esm's alphabet.

    Returns:
        The model (eval mode, CPU, float32 whatever the stored dtype), alphabet,
        config, weight files and their sha256.

    Raises:
        ModelLoadError: missing or unreadable ``config.json`` or weights, a corrupt
            or truncated weight file, a tensor missing, unknown or of the wrong shape
            (each message names the file).
    """
    path = Path(directory)
    config_path = path / HF_CONFIG
    if not config_path.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory: {HF_CONFIG} not found")
    config = HfEsmConfig.read(config_path)
    files = find_weights(path)
    source = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} shards)"
    state = hf_state_to_fair_esm(_read_weights(files), config, source=source)
    model, alphabet = _fair_esm_module(config)
    _check_vocab(path, alphabet)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.startswith(_OPTIONAL_PREFIXES))
    if missing:
        raise ModelLoadError(
            f"{source}: missing tensors for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    for key, tensor in state.items():
        if key not in expected:
            raise ModelLoadError(f"{source}: tensor {key!r} does not fit a {config.family} model")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)  # copies, casting to the module's float32
    model.eval()
    return HfModel(model, alphabet, config, files, weights_sha256(files))


def fetch_hf_hub(repo_id: str, *, cache_dir: str | Path | None = None) -> Path:
    """Fetch ``config.json``, ``vocab.txt`` and the weights of a Hub model; return its snapshot directory.

    safetensors weights are fetched when the repository has them, else
    ``pytorch_model.bin``. Already cached files are not fetched again; with
    ``HF_HUB_OFFLINE=1`` only the cache is used.

    Args:
        repo_id: Hugging Face Hub id such as ``facebook/esm2_t33_650M_UR50D``.
        cache_dir: cache to use (default: huggingface_hub's, ``HF_HUB_CACHE``).

    Raises:
        ModelLoadError: huggingface_hub is not installed, or the model can be
            neither fetched nor found in the cache (offline, unknown id, gated
            repository ...); the message says how to pass a local directory instead.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} looks like a Hugging Face Hub id, which needs huggingface_hub: "
            "pip install 'esmsearch[hf]' (or pass a local directory or fair-esm checkpoint)"
        ) from exc
    first = ["config.json", "vocab.txt", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    fallback = ["config.json", "vocab.txt", "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=first, cache_dir=cache_dir))
        if not any((snapshot / name).is_file() for name in WEIGHT_FILES):
            snapshot = Path(snapshot_download(repo_id, allow_patterns=fallback, cache_dir=cache_dir))
    except Exception as exc:  # huggingface_hub raises HTTP, offline-cache and network errors without one base
        name = repo_id.rsplit("/", 1)[-1]
        raise ModelLoadError(
            f"cannot fetch Hugging Face model {repo_id!r} and no cached copy was found "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Without network access (or with HF_HUB_OFFLINE=1), download it where there is access "
            f"(`hf download {repo_id} --local-dir {name}`, or save_pretrained), copy that directory here "
            f"and pass it as a local directory: --model /path/to/{name}"
        ) from exc
    log.info("Hugging Face model %s: snapshot %s in %s", repo_id, snapshot.name, snapshot.parent)
    return snapshot


# -- fair-esm -> Hugging Face ---------------------------------------------------------------
