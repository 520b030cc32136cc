"""Fast ESM-2 trunk for embedding: only the representation layer that pooling needs.

:class:`Esm2Encoder` wraps a loaded fair-esm :class:`esm.model.esm2.ESM2` and returns
the same per-token representations as
``model(tokens, repr_layers=[layer])["representations"][layer]`` (fair-esm 2.0.0),
while doing less work per batch:

* runs only transformer layers ``1..layer`` (fair-esm always runs all of them),
  and never the LM head, the contact head or the per-head attention-weight
  averaging that fair-esm computes even when nobody asks for it;
* replaces fair-esm's explicit ``bmm -> masked_fill -> softmax -> bmm`` attention
  (which materialises ``[B*H, T, T]`` float32 tensors several times per layer) by
  :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean
  key-padding mask (a fused, memory-efficient kernel on CPU and CUDA);
* precomputes the rotary cos/sin tables once (grown on demand, sliced per batch);
* keeps the batch-first ``(B, T, E)`` layout end to end (no transposes) and runs
  under :func:`torch.inference_mode`.

The math is fair-esm's, term by term (``esm/model/esm2.py``, ``esm/modules.py``,
``esm/multihead_attention.py``, ``esm/rotary_embedding.py``):

* embedding: ``x = embed_scale * embed_tokens(tokens)``; with token dropout (all
  released ESM-2 models) ``<mask>`` rows are zeroed and
  ``x = x * (1 - 0.15 * 0.8) / (1 - n_mask / n_non_padding)`` per sequence, then
  padding rows are zeroed. This is the layer-0 representation.
* each layer (pre-LayerNorm): ``x += out_proj(attn(LN1(x)))``;
  ``x += fc2(gelu(fc1(LN2(x))))`` with the exact (erf) GELU; attention scales
  ``q`` by ``head_dim ** -0.5`` *before* the rotary embedding (RoFormer, Su et al.
  2021, GPT-NeoX layout: ``x * cos + rotate_half(x) * sin`` with
  ``inv_freq = 1 / 10000 ** (arange(0, head_dim, 2) / head_dim)``), padding keys
  masked out.
* the last layer's representation has ``emb_layer_norm_after`` applied
  (fair-esm applies it only there).
* ESM-1b/ESM-1v (``esm/model/esm1.py``, ``ProteinBertModel`` with arch
  ``roberta_large``) run through the same code: no rotary map; instead the learned
  position embedding (row ``position + padding_idx + 1``) is added after the token
  dropout scaling, then ``emb_layer_norm_before`` where the checkpoint has it.

Precision and measured agreement (cosine of the residue-mean-pooled vectors vs
fair-esm fp32 ``scripts/extract.py``; random-weight checkpoints from
:func:`esmsearch.checkpoints.write_random_checkpoint`, seed 0; a seeded sample of
E. coli K-12 proteins of <= 1022 residues; AMD EPYC Zen 3 with AVX2, no
AVX512/AMX, torch 2.13 CPU; ``benchmarks/embed_throughput.py`` prints it):

* ``"fp32"`` (default): shares the model's weights (see :meth:`Esm2Encoder._fused_qkv`
  for the q/k/v projections). Min cosine 0.9999999 over 300 sequences (esm2_t6_8M)
  and 60 sequences (esm2_t12_35M); elementwise within 1e-6 of fair-esm on the
  tiny test model (the tests hold it to atol 1e-5).
* ``"bf16"``: :func:`torch.autocast` to bfloat16 (weights stay shared; matmuls
  and attention in bf16, LayerNorm and residual stream in fp32). Min cosine
  0.9999904 (t6_8M) and 0.9999870 (t12_35M) over 60 sequences: inside the 0.9999
  bar, with a margin of only ~1e-5 and on random weights -- check it again with
  pretrained weights before relying on it. Only fast where the CPU has AMX
  (:func:`cpu_supports_fast_bf16`): on an Intel Xeon with AVX512-BF16 but no AMX,
  bf16 measured slower than fp32 (1,284-1,359 vs 1,894-2,052 residues/s), and
  without either oneDNN emulates it.
* ``"fp16"``: CUDA only (:func:`torch.autocast` to float16); raises
  :class:`~esmsearch.errors.ConfigError` on CPU. Not measured (no GPU here).

``"auto"`` resolves through :func:`default_precision`: bf16 on CUDA devices with
bf16 support and on CPUs with AMX, fp32 elsewhere. Since the precision
changes the vectors (slightly), resolve it once when an index is built and record
the result; queries must use the index's precision.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from esmsearch.errors import ConfigError

if TYPE_CHECKING:
    from esm.model.esm1 import ProteinBertModel
    from esm.model.esm2 import ESM2

__all__ = [
    "PRECISIONS",
    "Esm2Encoder",
    "cpu_supports_fast_bf16",
    "default_precision",
    "resolve_precision",
]

#: Accepted values of the ``precision`` argument.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
#: Fewest parameters of a model int8 is offered for: the "150M" ESM-2 (esm2_t30_150M_UR50D,
#: 148M by count) and larger; smaller models are fast in fp32 and lose more to int8.
INT8_MIN_PARAMETERS = 140_000_000

#: fair-esm's token-dropout constant: 15% of tokens masked, 80% of those as <mask>
#: (esm/model/esm2.py, ``mask_ratio_train``).
_MASK_RATIO_TRAIN = 0.15 * 0.8


@functools.cache
def cpu_supports_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products faster than float32: it has AMX.

    Reads the ``flags`` line of ``/proc/cpuinfo`` (Linux); without it (other OSes)
    the answer is ``False``. AVX512-BF16 alone does not count: on an Intel Xeon with
    ``avx512_bf16`` and no AMX, bf16 embedding measured slower than fp32 (1,284-1,359
    vs 1,894-2,052 residues/s), and without either oneDNN emulates bf16 matmuls.

    Returns:
        True when the flags include ``amx_bf16``.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return _cpuinfo_has_amx_bf16(text)


def _cpuinfo_has_amx_bf16(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of ``/proc/cpuinfo`` text lists ``amx_bf16``."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "amx_bf16" in line.partition(":")[2].split()
    return False


def default_precision(device: str | torch.device) -> str:
    """Precision that ``"auto"`` stands for on ``device``.

    bf16 only where it is faster than fp32: CUDA devices with bf16 support, and
    CPUs with AMX (:func:`cpu_supports_fast_bf16`); its pooled vectors measured
    within the 0.9999 cosine bar of fp32 (module docstring). fp32 everywhere else.

    Args:
        device: the torch device the model runs on.

    Returns:
        ``"bf16"`` or ``"fp32"``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if dev.type == "cpu":
        return "bf16" if cpu_supports_fast_bf16() else "fp32"
    return "fp32"


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Validate ``precision`` for ``device`` and resolve ``"auto"``.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the torch device the model runs on.

    Returns:
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        ConfigError: unknown precision; ``"fp16"`` on a non-CUDA device; ``"bf16"``
            on a CUDA device without bf16 support (the message names the device).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        return default_precision(dev)
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"precision 'fp16' needs a CUDA device; got device {str(dev)!r} (use 'fp32' or 'bf16')")
    if precision == "int8" and dev.type != "cpu":
        raise ConfigError(f"precision 'int8' runs on the CPU only; got device {str(dev)!r} (use 'bf16' or 'fp16')")
    if precision == "bf16" and dev.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision 'bf16' is not supported by CUDA device {str(dev)!r} (use 'fp32' or 'fp16')")
    return precision


class Esm2Encoder(torch.nn.Module):
    """ESM-2 trunk up to one representation layer, with fused attention.

    Args:
        model: a loaded fair-esm ESM-2 (``esm.pretrained.load_model_and_alphabet*``),
            or an ESM-1b/ESM-1v ``ProteinBertModel`` (learned positions, no rotary);
            its weights are shared, not copied. Put it on the target device and in
            eval mode before wrapping (the encoder never uses dropout).
        layer: representation layer, ``0..model.num_layers`` (0 = embeddings).
        precision: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` (CUDA only) or
            ``"auto"`` (see :func:`default_precision`).

    Raises:
        ConfigError: ``layer`` out of range, unknown precision, or fp16 off CUDA.
    """

    def __init__(self, model: ESM2 | ProteinBertModel, layer: int, *, precision: str = "fp32") -> None:
        super().__init__()
        if not 0 <= layer <= model.num_layers:
            raise ConfigError(f"representation layer must be in 0..{model.num_layers}; got {layer}")
        device = model.embed_tokens.weight.device
        self.layer = layer
        self.num_layers = model.num_layers
        self.precision = resolve_precision(precision, device)
        self.padding_idx = model.padding_idx
        self.mask_idx = model.mask_idx
        self.token_dropout = _token_dropout(model)
        self.embed_scale = model.embed_scale
        self.embed_tokens = model.embed_tokens
        # ESM-1b/ESM-1v (fair-esm ProteinBertModel, arch "roberta_large") differ from
        # ESM-2 only in their positions: learned absolute embeddings added to the token
        # embeddings (then a LayerNorm where the checkpoint has one) instead of rotary.
        self.embed_positions: Any = getattr(model, "embed_positions", None)
        self.emb_layer_norm_before: Any = getattr(model, "emb_layer_norm_before", None) or None
        # Shared modules: a plain slice of the model's ModuleList, no weight copies.
        self.layers = torch.nn.ModuleList(list(model.layers[:layer]))
        self.final_layer_norm = model.emb_layer_norm_after if layer == model.num_layers else None
        first_attn: Any = model.layers[0].self_attn
        self.num_heads = int(first_attn.num_heads)
        self.head_dim = int(model.embed_tokens.embedding_dim) // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.rotary = first_attn.rot_emb is not None
        layers: list[Any] = list(self.layers)  # fair-esm modules are untyped
        self._inv_freqs: list[torch.Tensor] = [lay.self_attn.rot_emb.inv_freq for lay in layers] if self.rotary else []
        # Every released model has the same inv_freq in every layer; share one table then.
        self._shared_rotary = all(torch.equal(f, self._inv_freqs[0]) for f in self._inv_freqs[1:])
        self._rotary_len = 0
        self._rotary: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._qkv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._int8: list[tuple[Any, Any, Any, Any]] | None = None

    # ------------------------------------------------------------------ rotary
    def _rotary_tables(self, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin tables ``float32 [seq_len, head_dim]`` per layer (as esm/rotary_embedding.py).

        Built once for a generous length and sliced: ``t_i * inv_freq_j`` is an
        elementwise product, so a slice equals fair-esm's per-length table bit for bit.
        """
        if seq_len > self._rotary_len:
            new_len = max(seq_len, 1026, 2 * self._rotary_len)
            tables: list[tuple[torch.Tensor, torch.Tensor]] = []
            for i, inv_freq in enumerate(self._inv_freqs):
                if i > 0 and self._shared_rotary:
                    tables.append(tables[0])
                    continue
                t = torch.arange(new_len, device=inv_freq.device).type_as(inv_freq)
                freqs = torch.einsum("i,j->ij", t, inv_freq)
                emb = torch.cat((freqs, freqs), dim=-1)
                tables.append((emb.cos(), emb.sin()))
            self._rotary = tables
            self._rotary_len = new_len
        return [(c[:seq_len], s[:seq_len]) for c, s in self._rotary]

    @staticmethod
    def _apply_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of q and k together, as esm/rotary_embedding.py.

        ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``,
        written per half: ``[x1 c - x2 s, x2 c + x1 s]`` (``cos``/``sin`` repeat
        the same frequencies in both halves).

        Args:
            qk: ``(N, 2, H, D)``: q and k of ``N`` packed tokens (a strided view into
                the fused qkv projection).
            cos, sin: float32 ``(N, D)``: each token's row of the tables (by its
                position within its own sequence).

        Returns:
            contiguous ``(N, 2, H, D)``.
        """
        half = qk.shape[-1] // 2
        cos_b = cos[:, None, None, :]  # (N, 1, 1, D)
        sin_b = sin[:, None, None, :half]
        out = qk * cos_b
        out[..., :half].addcmul_(qk[..., half:], sin_b, value=-1.0)
        out[..., half:].addcmul_(qk[..., :half], sin_b)
        return out

    def _int8_linears(self) -> list[tuple[Any, Any, Any, Any]]:
        """Per layer, int8 packed (q/k/v, output, fc1, fc2) weights for dynamic int8 GEMMs.

        Weights are quantized once, symmetric per output channel (``scale = max|w| /
        127``); activations are quantized per batch by fbgemm/oneDNN at run time
        (PyTorch's dynamic quantization, ``torch.ops.quantized.linear_dynamic``, the
        kernel behind ``torch.ao.nn.quantized.dynamic.Linear``).
        """
        if self._int8 is None:
            import warnings

            packed = []
            with warnings.catch_warnings(), torch.no_grad():
                # torch 2.13 marks quantized tensors deprecated (pytorch#184982) but still runs them.
                warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
                layers: list[Any] = list(self.layers)
                for i, lay in enumerate(layers):
                    qkv_w, qkv_b = self._fused_qkv(i)
                    weights = [
                        (qkv_w, qkv_b),
                        (lay.self_attn.out_proj.weight, lay.self_attn.out_proj.bias),
                        (lay.fc1.weight, lay.fc1.bias),
                        (lay.fc2.weight, lay.fc2.bias),
                    ]
                    packed.append(tuple(_prepack_int8(w.detach().float(), b.detach().float()) for w, b in weights))
            self._int8 = packed
        return self._int8

    def _fused_qkv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused ``(3E, E)`` weight and ``(3E,)`` bias of layer ``index``'s q/k/v projections.

        One GEMM with ``3E`` outputs is markedly faster than three with ``E`` on
        CPU. To avoid a copy of the weights, the model's own ``q_proj``/``k_proj``/
        ``v_proj`` parameters are re-pointed at slices of the fused tensors (same
        values, shared storage). Rebuilt when that sharing was broken, e.g. after
        ``.to(device)`` moved the parameters.
        """
        attn: Any = self.layers[index].self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        cached = self._qkv_cache.get(index)
        if cached is not None:
            weight, bias = cached
            e = weight.shape[1]
            if all(
                p.weight.data_ptr() == weight[i * e].data_ptr()
                and p.bias.data_ptr() == bias[i * e :].data_ptr()
                and p.weight.device == weight.device
                and p.weight.dtype == weight.dtype
                for i, p in enumerate(projections)
            ):
                return cached
        with torch.no_grad():
            weight = torch.cat([p.weight.detach() for p in projections])
            bias = torch.cat([p.bias.detach() for p in projections])
            e = weight.shape[1]
            for i, p in enumerate(projections):
                p.weight.data = weight[i * e : (i + 1) * e]
                p.bias.data = bias[i * e : (i + 1) * e]
        self._qkv_cache[index] = (weight, bias)
        return weight, bias

    # ----------------------------------------------------------------- forward
    def _embed_packed(
        self, tokens: torch.Tensor, seq_id: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings ``[N, E]`` of a packed batch, with fair-esm's token-dropout rescaling.

        fair-esm: ``x * (1 - 0.15 * 0.8) / (1 - n_mask / n_tokens)`` per sequence, where
        ``n_tokens`` counts the sequence's non-padding tokens (BOS and EOS included).
        ESM-1b then adds its learned positional embedding, row ``position + padding_idx + 1``
        (fair-esm's ``LearnedPositionalEmbedding`` counts from ``padding_idx + 1``), and
        applies ``emb_layer_norm_before`` where the checkpoint has it.
        """
        x: torch.Tensor = self.embed_scale * self.embed_tokens(tokens)  # (N, E)
        if self.token_dropout:
            is_mask = tokens == self.mask_idx
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            n_mask = torch.zeros(lengths.shape[0], dtype=x.dtype, device=x.device)
            n_mask.index_add_(0, seq_id, is_mask.to(x.dtype))
            scale = (1 - _MASK_RATIO_TRAIN) / (1 - n_mask / lengths.to(x.dtype))  # (B,)
            x = x * scale[seq_id].unsqueeze(-1)
        if self.embed_positions is not None:
            x = x + F.embedding(positions + (self.padding_idx + 1), self.embed_positions.weight)
        if self.emb_layer_norm_before is not None:
            norm = self.emb_layer_norm_before
            x = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
        return x

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: _Packing) -> torch.Tensor:
        """Attention within each sequence of a packed batch.

        Args:
            q, k, v: ``(N, H, D)`` (q not yet scaled: ``scale`` applies head_dim**-0.5).

        Returns:
            ``(N, H, D)``.
        """
        if packing.varlen is not None:
            cu, max_len = packing.varlen
            return _varlen_attn(q, k, v, cu, max_len, self.scaling)
        out = torch.empty_like(v)
        for start, stop in packing.bounds:
            # (L, H, D) -> (1, H, L, D) views; one SDPA per sequence, no mask, no padding.
            # 4-D on purpose: PyTorch picks its fused (flash) CPU kernel only for 4-D
            # inputs; 3-D ones fall back to the unfused math path (bmm, a "safe"
            # softmax with extra passes, bmm), which measured 5x slower per call
            # (400 residues, t12 shapes) and took half of the forward pass.
            o = F.scaled_dot_product_attention(
                q[start:stop].transpose(0, 1)[None],
                k[start:stop].transpose(0, 1)[None],
                v[start:stop].transpose(0, 1)[None],
                scale=self.scaling,
            )
            out[start:stop] = o[0].transpose(0, 1)
        return out

    def _layers_packed(
        self,
        x: torch.Tensor,
        packing: _Packing,
        qkv_params: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        n_tokens, embed_dim = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        tables = self._rotary_tables(packing.max_len) if self.rotary else []
        layers: list[Any] = list(self.layers)  # fair-esm modules are untyped
        int8 = self._int8_linears() if self.precision == "int8" else None
        for i, (lay, (qkv_weight, qkv_bias)) in enumerate(zip(layers, qkv_params, strict=True)):
            ln1, ln2 = lay.self_attn_layer_norm, lay.final_layer_norm
            out_proj = lay.self_attn.out_proj
            h = F.layer_norm(x, (embed_dim,), ln1.weight, ln1.bias, ln1.eps)
            if int8 is not None:
                x = self._int8_layer(x, h, int8[i], lay, tables[i] if self.rotary else None, packing)
                continue
            qkv = F.linear(h, qkv_weight, qkv_bias).view(n_tokens, 3, heads, head_dim)
            if self.rotary:
                # Rotary positions restart at every sequence: gather the table by position.
                cos_t, sin_t = tables[i]
                cos, sin = cos_t[packing.positions], sin_t[packing.positions]  # (N, D)
                qk = self._apply_rotary(qkv[:, :2], cos, sin)  # (N, 2, H, D)
            else:  # ESM-1b: positions were added to the embeddings
                qk = qkv[:, :2]
            # fair-esm scales q by head_dim**-0.5 before the (linear) rotary map; the
            # attention's `scale` applies the same factor.
            o = self._attention(qk[:, 0], qk[:, 1], qkv[:, 2], packing)
            x = x + F.linear(o.reshape(n_tokens, embed_dim), out_proj.weight, out_proj.bias)

            h = F.layer_norm(x, (embed_dim,), ln2.weight, ln2.bias, ln2.eps)
            # exact (erf) GELU, as esm.modules.gelu
            h = F.gelu(F.linear(h, lay.fc1.weight, lay.fc1.bias))
            x = x + F.linear(h, lay.fc2.weight, lay.fc2.bias)
        if self.final_layer_norm is not None:
            norm: Any = self.final_layer_norm
            x = F.layer_norm(x, (embed_dim,), norm.weight, norm.bias, norm.eps)
        return x

    def _int8_layer(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        packed: tuple[Any, Any, Any, Any],
        lay: Any,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        packing: _Packing,
    ) -> torch.Tensor:
        """One layer with dynamic int8 GEMMs (``h`` = LN1(x) already computed).

        ``rotary`` is the layer's (cos, sin) table, or None for ESM-1b (learned
        positions already added to the embeddings).
        """
        n_tokens, embed_dim = x.shape
        linear = torch.ops.quantized.linear_dynamic
        qkv = linear(h, packed[0], True).view(n_tokens, 3, self.num_heads, self.head_dim)
        if rotary is not None:
            cos_t, sin_t = rotary
            qk = self._apply_rotary(qkv[:, :2], cos_t[packing.positions], sin_t[packing.positions])
        else:
            qk = qkv[:, :2]
        o = self._attention(qk[:, 0], qk[:, 1], qkv[:, 2], packing)
        x = x + linear(o.reshape(n_tokens, embed_dim), packed[1], True)
        ln2 = lay.final_layer_norm
        h = F.layer_norm(x, (embed_dim,), ln2.weight, ln2.bias, ln2.eps)
        h = F.gelu(linear(h, packed[2], True))
        out: torch.Tensor = x + linear(h, packed[3], True)
        return out

    def forward_packed(self, tokens: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Per-token representations of one layer for sequences packed end to end.

        Every token of every sequence is one row: embedding, LayerNorm, the q/k/v,
        output and feed-forward GEMMs run on ``[sum(lengths), E]`` at once; rotary
        positions restart at every sequence; attention runs within each sequence
        (flash varlen attention on CUDA in bf16/fp16 where the build has
        ``torch.nn.attention.varlen``, one SDPA call per sequence otherwise). No
        padding token is ever computed.

        Args:
            tokens: int64 ``[N]``: the sequences' tokens (BOS, residues, EOS each,
                fair-esm's alphabet) concatenated, ``N = sum(lengths)``; moved to the
                model's device.
            lengths: tokens of each sequence, in order; each >= 1.

        Returns:
            float32 ``[N, E]``: row ``i`` equals fair-esm's
            ``model(tokens_b, repr_layers=[layer])["representations"][layer]`` at that
            token when the sequence is run alone (fair-esm 2.0.0; within float
            rounding), including ``emb_layer_norm_after`` when ``layer == num_layers``.

        Raises:
            ValueError: ``tokens`` is not 1-D or ``lengths`` does not add up to it, or
                (ESM-1b) a sequence is longer than the learned positional table (1,024
                tokens in the released models).
        """
        if tokens.ndim != 1:
            raise ValueError(f"packed tokens must be 1-D [N]; got shape {tuple(tokens.shape)}")
        if sum(lengths) != tokens.shape[0] or any(n < 1 for n in lengths):
            raise ValueError(f"lengths {list(lengths)[:8]}... must be >= 1 and add up to {tokens.shape[0]} tokens")
        if self.embed_positions is not None and max(lengths) > self.embed_positions.max_positions:
            raise ValueError(
                f"a sequence of {max(lengths)} tokens exceeds the model's "
                f"{self.embed_positions.max_positions} learned positions"
            )
        device = self.embed_tokens.weight.device
        # Outside inference mode: the fused tensors become the model's own parameters'
        # storage and must stay usable by ordinary (autograd-aware) code.
        with torch.no_grad():
            qkv_params = [self._fused_qkv(i) for i in range(len(self.layers))]
        with torch.inference_mode():
            tokens = tokens.to(device)
            packing = _Packing.of(lengths, device, use_varlen=self._use_varlen(device))
            x = self._embed_packed(tokens, packing.seq_id, packing.lengths, packing.positions)
            if self.precision in ("fp32", "int8"):
                return self._layers_packed(x, packing, qkv_params)
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(device_type=device.type, dtype=dtype):
                x = self._layers_packed(x, packing, qkv_params)
            return x.float()

    def _use_varlen(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.precision in ("bf16", "fp16") and _varlen_attn_available()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token representations of one layer for a padded batch (fair-esm's layout).

        The rows are unpadded and run through :meth:`forward_packed` (the one code
        path), then put back in place.

        Args:
            tokens: int64 ``[B, T]``, fair-esm ``BatchConverter`` output (BOS,
                residues, EOS, ``padding_idx`` padding after the EOS); moved to the
                model's device.

        Returns:
            float32 ``[B, T, E]``: the same values as
            ``model(tokens, repr_layers=[layer])["representations"][layer]``
            (fair-esm 2.0.0), including ``emb_layer_norm_after`` when
            ``layer == num_layers`` and the embedding (token-dropout scaling applied)
            when ``layer == 0``. Padding positions are zero; pool over residues only.

        Raises:
            ValueError: ``tokens`` is not 2-D.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be 2-D [B, T]; got shape {tuple(tokens.shape)}")
        with torch.inference_mode():
            keep = tokens.ne(self.padding_idx)
            lengths = keep.sum(1).tolist()
            packed = self.forward_packed(tokens[keep], lengths)
            out = torch.zeros((*tokens.shape, packed.shape[-1]), dtype=packed.dtype, device=packed.device)
            out[keep.to(packed.device)] = packed
            return out


def _token_dropout(model: Any) -> bool:
    """Whether ``model`` rescales embeddings for ``<mask>`` tokens (ESM-2: an attribute; ESM-1b: its args)."""
    flag = getattr(model, "token_dropout", None)
    if flag is None:
        flag = getattr(getattr(model, "args", None), "token_dropout", False)
    return bool(flag)


class _Packing:
    """Where each sequence of a packed batch lies: bounds, per-token sequence id and position."""

    __slots__ = ("bounds", "lengths", "max_len", "positions", "seq_id", "varlen")

    def __init__(
        self,
        bounds: list[tuple[int, int]],
        lengths: torch.Tensor,
        seq_id: torch.Tensor,
        positions: torch.Tensor,
        max_len: int,
        varlen: tuple[torch.Tensor, int] | None,
    ) -> None:
        self.bounds = bounds
        self.lengths = lengths
        self.seq_id = seq_id
        self.positions = positions
        self.max_len = max_len
        self.varlen = varlen

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device, *, use_varlen: bool) -> _Packing:
        bounds = []
        start = 0
        for n in lengths:
            bounds.append((start, start + int(n)))
            start += int(n)
        lens = torch.tensor([int(n) for n in lengths], dtype=torch.long)
        seq_id = torch.repeat_interleave(torch.arange(len(lengths)), lens)
        starts = torch.cumsum(lens, 0) - lens
        positions = torch.arange(start) - starts[seq_id]
        max_len = max(int(n) for n in lengths)
        varlen = None
        if use_varlen:
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
            varlen = (cu.to(device), max_len)
        return cls(bounds, lens.to(device), seq_id.to(device), positions.to(device), max_len, varlen)


def _prepack_int8(weight: torch.Tensor, bias: torch.Tensor) -> Any:
    """fbgemm/oneDNN packed int8 weight (symmetric, per output channel) with its fp32 bias."""
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, bias)


@functools.cache
def _varlen_attn_available() -> bool:
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


def _varlen_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Flash varlen attention (``torch.nn.attention.varlen.varlen_attn``) of ``(N, H, D)`` tensors."""
    from torch.nn.attention.varlen import varlen_attn

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    out = varlen_attn(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, max_len, max_len, scale=scale)
    return out if isinstance(out, torch.Tensor) else out[0]
