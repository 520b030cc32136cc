"""ESM loading, batching, pooling and normalisation: one code path for database and queries.

A database sequence and a query with the same residues get the same vector, because
the indexer and the server both call :meth:`Embedder.embed`.

Models: ESM-2 and ESM-1b/ESM-1v (:mod:`esmsearch.models`), from fair-esm names or
``.pt`` files, Hugging Face directories or Hub ids (:func:`load_model`); all run
through the one fast encoder (:mod:`esmsearch.esm2_fast`).

Method
------
* Tokens: fair-esm's ESM-2 alphabet (ESM-1b's is the same), ``<cls>`` (BOS) + residues + ``<eos>``, padded
  with ``<pad>`` (as ``esm.data.BatchConverter`` does).
* Batches: work items sorted by length (longest first) and *packed*: the tokens of
  all items of a batch are concatenated (no padding) and run through
  :meth:`esmsearch.esm2_fast.Esm2Encoder.forward_packed`, under a token budget
  ``toks_per_batch`` counting ``sum(len + 2)`` real tokens (fair-esm's
  ``FastaBatchedDataset.get_batch_indices`` counts ``n_items * (max_len + 2)``
  padded ones); input order is restored.
* Pooling: mean over residue positions only (no BOS/EOS/padding) of one
  representation layer (default: the last, which fair-esm returns after the final
  layer norm), then L2 normalisation. Inner product of two vectors is then their
  cosine similarity in [-1, 1], higher = closer.
* Long sequences: ESM-2 was trained with at most 1024 tokens (1022 residues + BOS +
  EOS), and ESM-1b has 1024 learned positions. Longer sequences are never truncated: they are cut into windows of
  :data:`WINDOW_RESIDUES` residues overlapping by at least :data:`WINDOW_OVERLAP`;
  every residue takes its representation from the window in which it lies
  furthest from an edge (the overlap is split at its midpoint), and the mean runs
  over all residues of the sequence. A sequence that fits is one window, so its
  vector is identical to the direct embedding.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esmsearch.errors import ConfigError, IndexMismatchError, ModelLoadError
from esmsearch.fsutil import file_sha256
from esmsearch.sequences import RESIDUE_ALPHABET, validate_sequence

if TYPE_CHECKING:
    import torch

    from esmsearch.esm2_fast import Esm2Encoder
    from esmsearch.store import Manifest

__all__ = [
    "POOLING",
    "NORMALISATION",
    "WINDOW_OVERLAP",
    "WINDOW_RESIDUES",
    "EmbedStats",
    "Embedder",
    "LoadedModel",
    "SOURCE_KINDS",
    "load_model",
    "resolve_device",
    "resolve_model_spec",
]

log = logging.getLogger(__name__)

#: Residues per window: ESM-2's 1024-token context minus BOS and EOS (fair-esm's
#: ``truncation_seq_length=1022`` in ``scripts/extract.py``).
WINDOW_RESIDUES = 1022
#: Minimum residues shared by consecutive windows of a long sequence; each residue
#: is then at least WINDOW_OVERLAP / 2 = 128 residues from the edge of the window
#: it is taken from (except at the sequence ends).
WINDOW_OVERLAP = 256
#: Pooling recorded in manifests: mean over residue positions (no BOS/EOS/padding).
POOLING = "mean_residues"
#: Normalisation recorded in manifests.
NORMALISATION = "l2"


#: Source kinds :func:`load_model` records (``Manifest.model_source_kind``), in the order it tries them.
SOURCE_KINDS: tuple[str, ...] = ("hf-directory", "fair-esm-checkpoint", "fair-esm-pretrained", "hf-hub")
#: A Hugging Face Hub id: ``org/name`` (letters, digits, ``-``, ``_``, ``.``), as the Hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class LoadedModel:
    """A fair-esm ESM-2 or ESM-1b model with what the index manifest records about it.

    Attributes:
        model: ``esm.model.esm2.ESM2`` or (ESM-1b/ESM-1v) ``esm.model.esm1.ProteinBertModel``.
        alphabet: fair-esm's ``Alphabet``.
        model_name: pretrained name, hub id, or the file / directory name.
        model_source: what loads it again: pretrained name, hub id, or absolute path.
        checkpoint_sha256: sha256 of the weights file (``.pt``, ``model.safetensors``
            or ``pytorch_model.bin``; shards: :func:`esmsearch.hf_format.weights_sha256`).
        model_source_kind: one of :data:`SOURCE_KINDS`.
        family: ``"esm2"`` or ``"esm1b"`` (:data:`esmsearch.models.FAMILIES`).
    """

    model: Any
    alphabet: Any
    model_name: str
    model_source: str
    checkpoint_sha256: str
    model_source_kind: str = "fair-esm-checkpoint"
    family: str = "esm2"


@contextlib.contextmanager
def _allow_namespace_unpickling() -> Iterator[None]:
    # fair-esm checkpoints pickle argparse.Namespace in their config; torch >= 2.6
    # loads with weights_only=True and rejects it unless allow-listed.
    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        yield


def _looks_like_path(spec: str) -> bool:
    return (
        spec.endswith(".pt")
        or spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or ("/" in spec and not _HUB_ID.match(spec))
    )


def resolve_model_spec(spec: str) -> tuple[str, str]:
    """Decide what ``--model`` names, without loading anything.

    Order: an existing directory (a Hugging Face directory when it holds
    ``config.json``); an existing file (a fair-esm ``.pt`` checkpoint); a known
    fair-esm pretrained name (:data:`esmsearch.models.ARCHITECTURES`); an
    ``org/name`` that is no local path (a Hugging Face Hub id); else an error.

    Returns:
        ``(source kind, location)``: one of :data:`SOURCE_KINDS` and the absolute
        path, name or hub id.

    Raises:
        ModelLoadError: a directory without ``config.json``; a file of the Hugging
            Face layout given instead of its directory; a path that does not exist;
            an unknown name (the message lists the known ones and the other forms).
    """
    from esmsearch.hf_format import HF_CONFIG, WEIGHT_FILES
    from esmsearch.models import ARCHITECTURES

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / HF_CONFIG).is_file():
            raise ModelLoadError(
                f"{path.resolve()} is a directory without {HF_CONFIG}: not a Hugging Face model directory "
                "(save_pretrained writes config.json and model.safetensors)"
            )
        return "hf-directory", str(path.resolve())
    if path.is_file():
        if path.name == HF_CONFIG or path.name in WEIGHT_FILES or path.suffix == ".safetensors":
            raise ModelLoadError(
                f"{path.resolve()} is one file of a Hugging Face model: pass its directory ({path.resolve().parent})"
            )
        return "fair-esm-checkpoint", str(path.resolve())
    if spec in ARCHITECTURES:
        return "fair-esm-pretrained", spec
    if _HUB_ID.match(spec) and not spec.endswith(".pt"):
        return "hf-hub", spec
    if _looks_like_path(spec):
        raise ModelLoadError(f"model checkpoint not found: {path.resolve()}")
    raise ModelLoadError(
        f"unknown model {spec!r}: give a pretrained name ({', '.join(ARCHITECTURES)}), a path to a local "
        "fair-esm .pt checkpoint, a local Hugging Face model directory, or a Hugging Face Hub id such as "
        "facebook/esm2_t33_650M_UR50D (`esmsearch models` lists them)"
    )


def load_model(spec: str) -> LoadedModel:
    """Load an ESM-2 or ESM-1b/ESM-1v model as a fair-esm module.

    Args:
        spec: resolved by :func:`resolve_model_spec`, in this order:

            * a local Hugging Face directory (``config.json`` + ``model.safetensors``
              or ``pytorch_model.bin``, as ``save_pretrained`` writes them), read by
              :func:`esmsearch.hf_format.load_hf_directory`;
            * a local fair-esm ``.pt`` checkpoint (ESM-2, or ESM-1b/ESM-1v: fairseq's
              ``args`` with arch ``roberta_large``); its ``<stem>-contact-regression.pt``
              may lie beside it (optional: pooling does not use the contact head);
            * a fair-esm pretrained name (``esm2_t6_8M_UR50D`` ... ``esm2_t48_15B_UR50D``,
              ``esm1b_t33_650M_UR50S``, ``esm1v_t33_650M_UR90S_1..5``), downloaded by
              fair-esm into torch's hub cache on first use;
            * a Hugging Face Hub id (``facebook/esm2_t33_650M_UR50D``), fetched with
              huggingface_hub into its cache on first use (:func:`esmsearch.hf_format.fetch_hf_hub`).

    Returns:
        The model in eval mode on the CPU, its alphabet, name, source, weights sha256,
        source kind and family.

    Raises:
        ModelLoadError: unknown name, missing or corrupt file, a checkpoint of another
            architecture (ESM-1, MSA Transformer, ESMFold), or a download that fails
            (the message says how to pass a local copy instead).
    """
    kind, location = resolve_model_spec(spec)
    if kind == "hf-directory":
        return _load_hf(Path(location), kind, name=Path(location).name, source=location)
    if kind == "hf-hub":
        from esmsearch.hf_format import fetch_hf_hub

        return _load_hf(fetch_hf_hub(location), kind, name=location, source=location)
    if kind == "fair-esm-checkpoint":
        return _load_fair_esm_file(Path(location))
    return _load_fair_esm_pretrained(location)


def _load_hf(directory: Path, kind: str, *, name: str, source: str) -> LoadedModel:
    from esmsearch.hf_format import load_hf_directory

    hf = load_hf_directory(directory)
    return LoadedModel(hf.model, hf.alphabet, name, source, hf.weights_sha256, kind, hf.config.family)


def _fair_esm_family(model_data: object, path: Path) -> str:
    """``"esm2"`` (fair-esm's ``cfg`` layout) or ``"esm1b"`` (``args`` with arch ``roberta_large``)."""
    if not isinstance(model_data, dict) or "model" not in model_data:
        raise ModelLoadError(
            f"{path} is not a fair-esm ESM-2 or ESM-1b checkpoint (expected keys 'cfg' or 'args', and 'model')"
        )
    if "cfg" in model_data:
        return "esm2"
    arch = getattr(model_data.get("args"), "arch", None)
    if arch == "roberta_large":
        return "esm1b"
    if arch is None:
        raise ModelLoadError(
            f"{path} is not a fair-esm ESM-2 or ESM-1b checkpoint (expected keys 'cfg' or 'args', and 'model')"
        )
    raise ModelLoadError(
        f"{path} holds a fair-esm {arch!r} model (ESM-1 or MSA Transformer), which esmsearch does not embed "
        "with: use ESM-2 or ESM-1b/ESM-1v"
    )


def _load_fair_esm_file(path: Path) -> LoadedModel:
    import esm
    import torch

    try:
        with _allow_namespace_unpickling():
            model_data = torch.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read model checkpoint {path}: not a fair-esm .pt file or corrupt ({exc})"
        ) from exc
    family = _fair_esm_family(model_data, path)
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    regression_data = None
    if regression_path.is_file():
        try:
            with _allow_namespace_unpickling():
                regression_data = torch.load(str(regression_path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot read {regression_path}: corrupt ({exc})") from exc
    name = path.stem
    # fair-esm chooses its loader by the name prefix: "esm2..." -> ESM-2, anything else -> v1 (ESM-1b).
    if family == "esm2":
        core_name = name if name.startswith("esm2") else f"esm2_{name}"
    else:
        core_name = name if not name.startswith("esm2") else f"esm1b_{name}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Regression weights not found")
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(core_name, model_data, regression_data)
    except Exception as exc:
        label = "an ESM-2" if family == "esm2" else "an ESM-1b"
        raise ModelLoadError(f"cannot build {label} model from {path}: {exc}") from exc
    model.eval()
    return LoadedModel(model, alphabet, name, str(path), file_sha256(path), "fair-esm-checkpoint", family)


def _load_fair_esm_pretrained(spec: str) -> LoadedModel:
    import esm
    import torch

    from esmsearch.models import ARCHITECTURES

    try:
        with _allow_namespace_unpickling(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Regression weights not found")
            model, alphabet = esm.pretrained.load_model_and_alphabet_hub(spec)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot download pretrained model {spec!r} ({type(exc).__name__}: {exc}). "
            f"Without internet access, fetch https://dl.fbaipublicfiles.com/fair-esm/models/{spec}.pt "
            f"elsewhere and pass its local path: --model /path/to/{spec}.pt "
            f"(or a local Hugging Face directory of {ARCHITECTURES[spec].hf_hub_id})"
        ) from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{spec}.pt"
    sha = file_sha256(cached) if cached.is_file() else "unknown"
    model.eval()
    return LoadedModel(model, alphabet, spec, spec, sha, "fair-esm-pretrained", ARCHITECTURES[spec].family)


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N`` to a torch device (``auto`` picks CUDA when available).

    Raises:
        ConfigError: an unknown device string, or CUDA asked for but not available.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        return torch.device(device)
    raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


@dataclass
class EmbedStats:
    """Counters over the lifetime of an :class:`Embedder` (all calls to ``embed``)."""

    sequences: int = 0
    residues: int = 0
    windowed_sequences: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def residues_per_s(self) -> float:
        return self.residues / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _WorkItem:
    seq_index: int
    start: int  # window start in the sequence (0-based residue)
    stop: int  # window end (exclusive)
    keep_from: int  # residues [keep_from, keep_to) of the sequence are taken from this window
    keep_to: int


def plan_windows(
    length: int, window: int = WINDOW_RESIDUES, overlap: int = WINDOW_OVERLAP
) -> list[tuple[int, int, int, int]]:
    """Cut a sequence of ``length`` residues into overlapping windows.

    Returns:
        ``[(start, stop, keep_from, keep_to), ...]`` in residue coordinates (0-based,
        end-exclusive): window ``[start, stop)`` contributes residues
        ``[keep_from, keep_to)``; the keep ranges tile ``[0, length)`` exactly.
        A sequence of at most ``window`` residues is one window.
    """
    if length <= window:
        return [(0, length, 0, length)]
    if not 0 <= overlap < window:
        raise ConfigError(f"window overlap {overlap} must be in [0, {window})")
    stride = window - overlap
    n = math.ceil((length - window) / stride) + 1
    # Spread the windows evenly so every overlap is >= `overlap`.
    starts = [round(i * (length - window) / (n - 1)) for i in range(n)]
    out = []
    for i, s in enumerate(starts):
        e = s + window
        keep_from = 0 if i == 0 else (s + starts[i - 1] + window) // 2
        keep_to = length if i == n - 1 else (starts[i + 1] + e) // 2
        out.append((s, e, keep_from, keep_to))
    return out


class Embedder:
    """Embed protein sequences with an ESM-2 or ESM-1b model into L2-normalised vectors.

    Args:
        model: pretrained name, local ``.pt`` checkpoint, local Hugging Face
            directory or Hub id (see :func:`load_model`).
        layer: representation layer, 0 (token embeddings) .. num_layers; ``None`` or
            ``-1`` means the last layer. Negative values count from the end.
        toks_per_batch: token budget per forward pass (fair-esm's ``scripts/extract.py``
            default is 4096): the packed batch holds ``sum(len + 2) <= toks_per_batch``
            tokens (residues plus BOS and EOS of each sequence or window).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32`` (default), ``bf16``, ``fp16`` (CUDA only) or ``auto`` (bf16
            on CUDA devices with bf16 support and on CPUs with AMX, else fp32; see
            :func:`esmsearch.esm2_fast.default_precision`). The resolved value is in
            :attr:`precision`, recorded in index manifests (``Manifest.precision``)
            and compared by :meth:`check_manifest`.

    Raises:
        ModelLoadError: see :func:`load_model`.
        ConfigError: bad layer, budget, device or precision.
    """

    def __init__(
        self,
        model: str,
        *,
        layer: int | None = None,
        toks_per_batch: int = 4096,
        device: str = "auto",
        precision: str = "fp32",
    ) -> None:
        if toks_per_batch < WINDOW_RESIDUES + 2:
            raise ConfigError(
                f"toks_per_batch={toks_per_batch} must be at least {WINDOW_RESIDUES + 2} "
                "(one full-length window plus BOS and EOS)"
            )
        from esmsearch.esm2_fast import resolve_precision

        self.device = resolve_device(device)
        precision = resolve_precision(precision, self.device)
        loaded = load_model(model)
        esm_model = loaded.model
        num_layers = int(esm_model.num_layers)
        if layer is None:
            layer = num_layers
        if layer < 0:
            layer = num_layers + 1 + layer
        if not 0 <= layer <= num_layers:
            raise ConfigError(f"layer {layer} out of range for a {num_layers}-layer model (0..{num_layers})")
        if precision == "int8":
            from esmsearch.esm2_fast import INT8_MIN_PARAMETERS

            n_params = sum(p.numel() for p in esm_model.parameters())
            if n_params < INT8_MIN_PARAMETERS:
                raise ConfigError(
                    "precision 'int8' is offered for models of 150M parameters and up (esm2_t30_150M_UR50D and "
                    f"larger); {loaded.model_name} has {n_params / 1e6:.1f}M: use fp32"
                )
        self.model_name = loaded.model_name
        self.model_source = loaded.model_source
        self.checkpoint_sha256 = loaded.checkpoint_sha256
        self.model_source_kind = loaded.model_source_kind
        self.family = loaded.family
        self.layer = layer
        self.num_layers = num_layers
        self.dim = int(esm_model.embed_tokens.embedding_dim)
        self.toks_per_batch = toks_per_batch
        self.precision = precision
        self.stats = EmbedStats()
        self._alphabet = loaded.alphabet
        self._model = esm_model.to(self.device)
        self._encoder = self._make_encoder()
        table = np.full(256, -1, dtype=np.int64)
        for ch in sorted(RESIDUE_ALPHABET):  # validate_sequence upper-cases; only these reach the table
            table[ord(ch)] = loaded.alphabet.get_idx(ch)
        self._token_table = table

    def _make_encoder(self) -> Esm2Encoder:
        from esmsearch.esm2_fast import Esm2Encoder

        return Esm2Encoder(self._model, self.layer, precision=self.precision).to(self.device)

    # -- properties recorded in manifests -------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        """The model settings an index records and a server must match."""
        return {
            "model_name": self.model_name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "layer": self.layer,
            "pooling": POOLING,
            "normalisation": NORMALISATION,
            "precision": self.precision,
            "dim": self.dim,
        }

    def check_manifest(self, manifest: Manifest) -> None:
        """Raise :class:`IndexMismatchError` unless this model produces ``manifest``'s vectors.

        Compared: checkpoint sha256, layer, pooling, normalisation, precision and
        dimension -- everything that changes a vector (the model name is informative
        only: a renamed copy of the same file matches).

        Raises:
            IndexMismatchError: naming each differing setting with both values.
        """
        diffs = []
        for key in ("checkpoint_sha256", "layer", "pooling", "normalisation", "precision", "dim"):
            mine, theirs = self.settings[key], getattr(manifest, key)
            if mine != theirs:
                diffs.append(f"{key}: index has {theirs!r}, model has {mine!r}")
        if diffs:
            raise IndexMismatchError(
                f"model {self.model_source} does not match the index built with "
                f"{manifest.model_source or manifest.model_name}: " + "; ".join(diffs)
            )

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        *,
        model: str | None = None,
        device: str = "auto",
        toks_per_batch: int = 4096,
        precision: str | None = None,
    ) -> Embedder:
        """Load the model an index was built with (or ``model``) and check it matches.

        Queries are embedded at the index's precision (``manifest.precision``) unless
        ``precision`` says otherwise -- and then it must resolve to the same value.

        Args:
            manifest: the index's manifest.
            model: any :func:`load_model` form (pretrained name, ``.pt`` path,
                Hugging Face directory or Hub id) overriding the manifest's model
                source; its weights must still be the same file (checkpoint sha256).
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            toks_per_batch: token budget per forward pass.
            precision: ``None`` (default: the manifest's) or a value for
                :class:`Embedder`, which must resolve to the manifest's.

        Raises:
            ModelLoadError: the model cannot be loaded.
            IndexMismatchError: the device cannot run the index's precision (e.g. an
                fp16 index on a CPU; the message names both), or the model's
                checkpoint/layer/pooling/normalisation/precision/dim differ from the
                manifest.
            ConfigError: a bad device or ``toks_per_batch``.
        """
        from esmsearch.esm2_fast import resolve_precision

        if precision is None:
            precision = manifest.precision
            dev = resolve_device(device)
            try:
                resolve_precision(precision, dev)
            except ConfigError as exc:
                raise IndexMismatchError(
                    f"index {manifest.version} was built at precision {precision!r}, which device "
                    f"{str(dev)!r} cannot run ({exc}); serve it on a device that can, or rebuild the index "
                    "at a precision this device runs"
                ) from exc
        emb = cls(
            model or manifest.model_source or manifest.model_name,
            layer=manifest.layer,
            toks_per_batch=toks_per_batch,
            device=device,
            precision=precision,
        )
        emb.check_manifest(manifest)
        return emb

    # -- embedding --------------------------------------------------------------------------
    def _plan(self, lengths: Sequence[int]) -> list[list[_WorkItem]]:
        items: list[_WorkItem] = []
        for i, n in enumerate(lengths):
            for s, e, kf, kt in plan_windows(n):
                items.append(_WorkItem(i, s, e, kf, kt))
        items.sort(key=lambda it: it.stop - it.start, reverse=True)
        batches: list[list[_WorkItem]] = []
        current: list[_WorkItem] = []
        tokens = 0
        for it in items:
            n = it.stop - it.start + 2
            if current and tokens + n > self.toks_per_batch:
                batches.append(current)
                current, tokens = [], 0
            current.append(it)
            tokens += n
        if current:
            batches.append(current)
        return batches

    def embed(
        self,
        sequences: Sequence[str],
        *,
        progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed sequences into L2-normalised vectors, in input order.

        Args:
            sequences: residue strings (upper or lower case; one trailing ``*`` allowed).
            progress: show a tqdm bar in residues/s on stderr.
            on_batch: called after each forward pass with the number of residues it
                completed (for callers that keep their own progress bar).

        Returns:
            float32 ``[len(sequences), dim]``, each row of unit L2 norm; 2-D even for
            one or zero sequences.

        Raises:
            InvalidSequenceError: a sequence is empty or has an invalid residue
                (record id ``#<1-based index>``).
        """
        import torch

        seqs = [validate_sequence(f"#{i + 1}", s) for i, s in enumerate(sequences)]
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        if not seqs:
            return out
        lengths = [len(s) for s in seqs]
        batches = self._plan(lengths)
        sums = torch.zeros((len(seqs), self.dim), dtype=torch.float64)
        counts = torch.zeros(len(seqs), dtype=torch.float64)
        windowed = sum(1 for n in lengths if n > WINDOW_RESIDUES)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(lengths), unit="res", unit_scale=True, desc="embedding", leave=False)
        alphabet = self._alphabet
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for batch in batches:
                    item_lengths = [it.stop - it.start + 2 for it in batch]
                    n_tokens = sum(item_lengths)
                    tokens = np.empty(n_tokens, dtype=np.int64)
                    keep = np.zeros(n_tokens, dtype=np.float32)
                    at = 0
                    for it, width in zip(batch, item_lengths, strict=True):
                        window = seqs[it.seq_index][it.start : it.stop]
                        tokens[at] = alphabet.cls_idx
                        tokens[at + 1 : at + width - 1] = self._token_table[
                            np.frombuffer(window.encode("ascii"), dtype=np.uint8)
                        ]
                        tokens[at + width - 1] = alphabet.eos_idx
                        keep[at + 1 + it.keep_from - it.start : at + 1 + it.keep_to - it.start] = 1.0
                        at += width
                    tok = torch.from_numpy(tokens).to(self.device, non_blocking=True)
                    reps = self._encoder.forward_packed(tok, item_lengths)  # (N, E)
                    weight = torch.from_numpy(keep).to(reps.device)
                    item_of_token = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(item_lengths)).to(
                        reps.device
                    )
                    pooled = torch.zeros((len(batch), self.dim), dtype=torch.float32, device=reps.device)
                    pooled.index_add_(0, item_of_token, reps * weight[:, None])  # (B, E) sums
                    idx = torch.tensor([it.seq_index for it in batch], dtype=torch.long)
                    sums.index_add_(0, idx, pooled.double().cpu())
                    done = int(keep.sum())
                    counts.index_add_(
                        0, idx, torch.tensor([it.keep_to - it.keep_from for it in batch], dtype=torch.float64)
                    )
                    if bar is not None:
                        bar.update(done)
                    if on_batch is not None:
                        on_batch(done)
        finally:
            if bar is not None:
                bar.close()
        means = sums / counts[:, None]
        norms = means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[:] = (means / norms).numpy().astype(np.float32)
        self.stats.sequences += len(seqs)
        self.stats.residues += sum(lengths)
        self.stats.windowed_sequences += windowed
        self.stats.batches += len(batches)
        self.stats.seconds += time.perf_counter() - t0
        return out
