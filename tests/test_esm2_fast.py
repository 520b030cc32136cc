"""Esm2Encoder must reproduce fair-esm 2.0.0's representations, layer by layer.

Each comparison is elementwise on residue/BOS/EOS positions (padding positions
are meaningless in both implementations). The tolerance (atol 1e-5 on values of
order 1) is far below what a wrong rotary embedding, a missing final layer norm
or a missing token-dropout scale (x0.88) produces; ``test_detects_*`` checks that.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import esm
import numpy as np
import pytest
import torch

from esmsearch import esm2_fast
from esmsearch.checkpoints import write_random_checkpoint
from esmsearch.errors import ConfigError
from esmsearch.esm2_fast import (
    Esm2Encoder,
    cpu_supports_fast_bf16,
    default_precision,
    resolve_precision,
)

ATOL = 1e-5
RTOL = 1e-5

MIXED = [
    (
        "long",
        "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQT"
        "LGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPF"
        "LPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAIGHGLLIRLAGIRTR",
    ),
    ("short", "MAL"),
    ("ambig", "MXBZUOACDXXBZ"),
    ("mid", "GSHMSLFDFFKNKGSAATATDRLKLADLGLSQRALEAV"),
    ("one", "W"),
]


def _load(path: Path) -> tuple[torch.nn.Module, esm.data.Alphabet]:
    regression = path.with_name(f"{path.stem}-contact-regression.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        model_data = torch.load(path, map_location="cpu")
        regression_data = torch.load(regression, map_location="cpu")
    model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, model_data, regression_data)
    return model.eval(), alphabet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, esm.data.Alphabet]:
    path = write_random_checkpoint(
        "esm2_t6_8M_UR50D",
        tmp_path_factory.mktemp("tiny_fast"),
        seed=7,
        num_layers=2,
        embed_dim=32,
        attention_heads=4,
        name="esm2_tiny_fast",
    )
    return _load(path)


@pytest.fixture(scope="module")
def t6(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, esm.data.Alphabet]:
    path = write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path_factory.mktemp("t6_fast"), seed=3)
    return _load(path)


def _tokens(alphabet: esm.data.Alphabet, records: list[tuple[str, str]]) -> torch.Tensor:
    _, _, tokens = alphabet.get_batch_converter()(records)
    return tokens


def _reference(model: torch.nn.Module, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, repr_layers=[layer])["representations"][layer]


def _assert_close_on_tokens(ours: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor, padding_idx: int) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    real = tokens != padding_idx  # (B, T)
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_every_layer_matches_fair_esm_on_mixed_padded_batch(tiny, layer: int) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    tokens = _tokens(alphabet, MIXED)
    assert (tokens == alphabet.padding_idx).any()  # the batch really is padded
    ours = Esm2Encoder(model, layer)(tokens)
    _assert_close_on_tokens(ours, _reference(model, tokens, layer), tokens, alphabet.padding_idx)


def test_t6_8m_architecture_matches_all_layers(t6) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = t6
    tokens = _tokens(alphabet, MIXED[:4])
    with torch.no_grad():
        ref = model(tokens, repr_layers=list(range(model.num_layers + 1)))["representations"]
    for layer in range(model.num_layers + 1):
        ours = Esm2Encoder(model, layer)(tokens)
        _assert_close_on_tokens(ours, ref[layer], tokens, alphabet.padding_idx)


def test_batch_of_one_without_padding_matches(tiny) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    tokens = _tokens(alphabet, [MIXED[0]])
    assert not (tokens == alphabet.padding_idx).any()
    ours = Esm2Encoder(model, model.num_layers)(tokens)
    torch.testing.assert_close(ours, _reference(model, tokens, model.num_layers), atol=ATOL, rtol=RTOL)


def test_sequence_alone_equals_sequence_in_padded_batch(tiny) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    encoder = Esm2Encoder(model, model.num_layers)
    batch = encoder(_tokens(alphabet, MIXED))
    for i, record in enumerate(MIXED):
        alone = encoder(_tokens(alphabet, [record]))
        n = len(record[1]) + 2
        torch.testing.assert_close(batch[i, :n], alone[0], atol=ATOL, rtol=RTOL)


def test_mask_tokens_follow_token_dropout_rescaling(tiny) -> None:  # type: ignore[no-untyped-def]
    # <mask> tokens change mask_ratio_observed per sequence: 1 / (1 - ratio) differs by row.
    model, alphabet = tiny
    tokens = _tokens(alphabet, MIXED[:3])
    tokens[0, 3] = alphabet.mask_idx
    tokens[0, 9] = alphabet.mask_idx
    tokens[2, 2] = alphabet.mask_idx
    for layer in (0, model.num_layers):
        ours = Esm2Encoder(model, layer)(tokens)
        _assert_close_on_tokens(ours, _reference(model, tokens, layer), tokens, alphabet.padding_idx)


def test_shares_weights_and_runs_only_needed_layers(tiny) -> None:  # type: ignore[no-untyped-def]
    model, _ = tiny
    encoder = Esm2Encoder(model, 1)
    assert len(encoder.layers) == 1
    assert encoder.layers[0] is model.layers[0]
    assert encoder.embed_tokens.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert encoder.final_layer_norm is None
    assert Esm2Encoder(model, model.num_layers).final_layer_norm is model.emb_layer_norm_after


# --- the test above would catch these mistakes: check that it does -----------------


def _max_error(model: torch.nn.Module, alphabet: esm.data.Alphabet, encoder: Esm2Encoder, layer: int) -> float:
    tokens = _tokens(alphabet, MIXED)
    real = tokens != alphabet.padding_idx
    return float((encoder(tokens) - _reference(model, tokens, layer))[real].abs().max())


def test_detects_wrong_rotary_embedding(tiny) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    encoder = Esm2Encoder(model, model.num_layers)
    encoder._apply_rotary = lambda qk, cos, sin: qk  # type: ignore[method-assign]  # no rotary at all
    assert _max_error(model, alphabet, encoder, model.num_layers) > 100 * ATOL


def test_detects_missing_final_layer_norm(tiny) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    encoder = Esm2Encoder(model, model.num_layers)
    encoder.final_layer_norm = None
    assert _max_error(model, alphabet, encoder, model.num_layers) > 100 * ATOL


def test_detects_missing_token_dropout_scale(tiny) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    encoder = Esm2Encoder(model, 0)
    encoder.token_dropout = False
    assert _max_error(model, alphabet, encoder, 0) > 100 * ATOL


# --- precision ---------------------------------------------------------------------


def _pooled(reps: torch.Tensor, records: list[tuple[str, str]]) -> torch.Tensor:
    return torch.stack([reps[i, 1 : len(s) + 1].mean(0) for i, (_, s) in enumerate(records)])


def test_bf16_pooled_cosine_is_close(t6) -> None:  # type: ignore[no-untyped-def]
    # bf16 is slow without AMX/AVX512-BF16 but still correct; check the agreement
    # the module docstring documents (>= 0.9999 on the t6_8M architecture).
    model, alphabet = t6
    records = MIXED[:4]
    tokens = _tokens(alphabet, records)
    ref = _pooled(_reference(model, tokens, model.num_layers), records)
    ours = _pooled(Esm2Encoder(model, model.num_layers, precision="bf16")(tokens), records)
    assert ours.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    assert float(cosine.min()) >= 0.9999
    assert float(cosine.min()) < 1.0 - 1e-7  # really ran in reduced precision


def test_fp32_pooled_cosine_meets_bar(t6) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = t6
    records = MIXED
    tokens = _tokens(alphabet, records)
    ref = _pooled(_reference(model, tokens, model.num_layers), records)
    ours = _pooled(Esm2Encoder(model, model.num_layers)(tokens), records)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    assert float(cosine.min()) >= 0.9999


def test_fp16_on_cpu_and_bad_settings_raise_config_error(tiny) -> None:  # type: ignore[no-untyped-def]
    model, _ = tiny
    with pytest.raises(ConfigError, match="fp16"):
        Esm2Encoder(model, 1, precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        Esm2Encoder(model, 1, precision="fp64")
    with pytest.raises(ConfigError, match="layer"):
        Esm2Encoder(model, model.num_layers + 1)
    with pytest.raises(ConfigError, match="layer"):
        Esm2Encoder(model, -1)


def test_auto_precision_follows_native_bf16(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import esmsearch.esm2_fast as fast

    model, _ = tiny
    monkeypatch.setattr(fast, "cpu_supports_fast_bf16", lambda: False)
    assert default_precision("cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert Esm2Encoder(model, 1, precision="auto").precision == "fp32"
    monkeypatch.setattr(fast, "cpu_supports_fast_bf16", lambda: True)
    assert default_precision("cpu") == "bf16"
    assert Esm2Encoder(model, 1, precision="auto").precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("cuda") == "fp32"


def test_cpu_supports_fast_bf16_reads_cpu_flags() -> None:
    flags_line = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
        "",
    )
    expected = "amx_bf16" in flags_line.split()  # AMX only: avx512_bf16 alone measured slower than fp32
    assert cpu_supports_fast_bf16() is expected


def test_rejects_non_2d_tokens(tiny) -> None:  # type: ignore[no-untyped-def]
    model, alphabet = tiny
    tokens = _tokens(alphabet, MIXED[:1])
    with pytest.raises(ValueError, match="2-D"):
        Esm2Encoder(model, 1)(tokens[0])


# -- int8 (dynamic int8 GEMMs on the CPU, opt-in for large models) --------------------------


def test_int8_is_refused_for_small_models_and_off_the_cpu(tiny_checkpoint: Path) -> None:
    from esmsearch.embedding import Embedder
    from esmsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="150M parameters and up"):
        Embedder(str(tiny_checkpoint), device="cpu", precision="int8")
    with pytest.raises(ConfigError, match="runs on the CPU only"):
        esm2_fast.resolve_precision("int8", "cuda")


def test_int8_path_agrees_with_fp32_and_really_quantizes(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esmsearch.embedding import Embedder

    monkeypatch.setattr(esm2_fast, "INT8_MIN_PARAMETERS", 0)  # the tiny model stands in for a large one
    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMSLFDFFKNKGSAATATDRLKLKLEGTKDE" * 4]
    fp32 = Embedder(str(tiny_checkpoint), device="cpu").embed(seqs)
    int8 = Embedder(str(tiny_checkpoint), device="cpu", precision="int8").embed(seqs)
    cosines = (fp32 * int8).sum(axis=1)
    assert cosines.min() > 0.99  # close ...
    assert np.abs(fp32 - int8).max() > 1e-6  # ... but not the fp32 path under another name


def test_cpu_attention_uses_the_fused_sdpa_kernel(tiny) -> None:  # type: ignore[no-untyped-def]
    """Per-sequence attention must reach PyTorch's fused CPU kernel, not the math fallback.

    The fallback (taken for 3-D inputs) gives the same numbers but measured 5x slower
    per call and half of a t12 forward pass, so only the dispatch shows the difference.
    """
    from torch.profiler import ProfilerActivity, profile

    model, alphabet = tiny
    tokens = _tokens(alphabet, MIXED)
    encoder = Esm2Encoder(model, model.num_layers)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder(tokens)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
