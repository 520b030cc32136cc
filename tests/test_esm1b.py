"""ESM-1b / ESM-1v through fair-esm's checkpoints and esmsearch's fast encoder.

The reference is fair-esm 2.0.0's own ``ProteinBertModel`` forward (loaded with
``esm.pretrained.load_model_and_alphabet_local``), one padded batch or one
sequence per pass; comparisons are elementwise on real (non-padding) tokens.
Checkpoints are seeded random weights of the ESM-1b layout (learned positions,
embedding LayerNorm, no rotary), tiny (2 layers, dim 32) to keep the suite fast.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path
from typing import Any

import esm
import numpy as np
import pytest
import torch

from esmsearch.checkpoints import write_random_checkpoint
from esmsearch.embedding import WINDOW_RESIDUES, Embedder, load_model, plan_windows
from esmsearch.errors import ModelLoadError
from esmsearch.esm2_fast import Esm2Encoder
from esmsearch.store import Manifest

TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}
AA = "ACDEFGHIKLMNPQRSTVWY"
RECORDS = [
    ("long", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQT" * 3),
    ("short", "MAL"),
    ("ambig", "MXBZUOACDXXBZ"),
    ("one", "W"),
]


def _fair_esm(path: Path) -> tuple[Any, Any]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    return model.eval(), alphabet


@pytest.fixture(scope="module")
def esm1b_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(
        "esm1b_t33_650M_UR50S", tmp_path_factory.mktemp("esm1b"), seed=11, name="esm1b_tiny", **TINY
    )


@pytest.fixture(scope="module")
def reference(esm1b_checkpoint: Path) -> tuple[Any, Any]:
    return _fair_esm(esm1b_checkpoint)


def _residue_reps(reference: tuple[Any, Any], seq: str, layer: int) -> np.ndarray:
    """float64 [len(seq), dim]: fair-esm's per-residue representations of one sequence."""
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()([("s", seq)])
    with torch.no_grad():
        reps = model(tokens, repr_layers=[layer])["representations"][layer]
    return reps[0, 1 : len(seq) + 1].double().numpy()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_reference_is_the_esm1b_architecture(reference: tuple[Any, Any]) -> None:
    model, _ = reference
    assert type(model).__name__ == "ProteinBertModel" and model.model_version == "ESM-1b"
    assert model.emb_layer_norm_before is not None  # as the released ESM-1b
    assert model.embed_positions.max_positions == 1024
    assert model.layers[0].self_attn.rot_emb is None
    assert model.args.token_dropout is True


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_fast_encoder_matches_fair_esm_every_layer_with_padding_and_mask(
    reference: tuple[Any, Any], layer: int
) -> None:
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()(RECORDS)
    tokens[0, 5] = alphabet.mask_idx  # <mask> rescales the embeddings (token dropout)
    tokens[2, 3] = alphabet.mask_idx
    assert (tokens == alphabet.padding_idx).any()
    with torch.no_grad():
        expected = model(tokens, repr_layers=[layer])["representations"][layer]
    got = Esm2Encoder(model, layer)(tokens)
    real = tokens.ne(alphabet.padding_idx)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_tolerance_detects_a_missing_position_embedding(reference: tuple[Any, Any]) -> None:
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()(RECORDS[:2])
    encoder = Esm2Encoder(model, 2)
    real = tokens.ne(alphabet.padding_idx)
    with torch.no_grad():
        expected = model(tokens, repr_layers=[2])["representations"][2][real]
    encoder.embed_positions = None
    assert (encoder(tokens)[real] - expected).abs().max() > 1e-2


def test_encoder_refuses_more_tokens_than_learned_positions(reference: tuple[Any, Any]) -> None:
    model, alphabet = reference
    encoder = Esm2Encoder(model, 1)
    ok = torch.full((1024,), alphabet.get_idx("A"), dtype=torch.long)
    assert encoder.forward_packed(ok, [1024]).shape == (1024, 32)
    with pytest.raises(ValueError, match="1025 tokens exceeds the model's 1024 learned positions"):
        encoder.forward_packed(torch.cat([ok, ok[:1]]), [1025])


def test_embedder_matches_fair_esm_pooled_vectors(
    esm1b_checkpoint: Path, reference: tuple[Any, Any], ecoli_fasta: Path
) -> None:
    from esmsearch.sequences import read_fasta

    seqs = [r.sequence for r in read_fasta(ecoli_fasta)][:12]
    emb = Embedder(str(esm1b_checkpoint), device="cpu")
    assert (emb.family, emb.dim, emb.layer) == ("esm1b", 32, 2)
    out = emb.embed(seqs)
    expected = np.stack([_unit(_residue_reps(reference, s, 2).mean(axis=0)) for s in seqs])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert float((out * expected).sum(axis=1).min()) > 0.999999


def test_long_sequence_uses_the_same_windows(esm1b_checkpoint: Path, reference: tuple[Any, Any]) -> None:
    seq = "".join(random.Random(8).choice(AA) for _ in range(1500))
    emb = Embedder(str(esm1b_checkpoint), device="cpu")
    out = emb.embed([seq])
    assert emb.stats.windowed_sequences == 1
    parts = []
    for start, stop, keep_from, keep_to in plan_windows(len(seq)):
        assert stop - start <= WINDOW_RESIDUES
        parts.append(_residue_reps(reference, seq[start:stop], 2)[keep_from - start : keep_to - start])
    np.testing.assert_allclose(out[0], _unit(np.concatenate(parts).mean(axis=0)), atol=1e-5)


def test_load_model_records_kind_family_and_sha(esm1b_checkpoint: Path) -> None:
    loaded = load_model(str(esm1b_checkpoint))
    assert (loaded.model_source_kind, loaded.family, loaded.model_name) == (
        "fair-esm-checkpoint",
        "esm1b",
        "esm1b_tiny",
    )
    assert loaded.checkpoint_sha256 == hashlib.sha256(esm1b_checkpoint.read_bytes()).hexdigest()
    assert type(loaded.model).__name__ == "ProteinBertModel"


def test_esm1b_file_named_like_esm2_still_loads_as_esm1b(esm1b_checkpoint: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "esm2_misnamed.pt"
    renamed.write_bytes(esm1b_checkpoint.read_bytes())
    loaded = load_model(str(renamed))
    assert loaded.family == "esm1b" and type(loaded.model).__name__ == "ProteinBertModel"


def test_esm1v_checkpoint_without_contact_regression(tmp_path: Path) -> None:
    path = write_random_checkpoint("esm1v_t33_650M_UR90S_1", tmp_path, seed=2, name="esm1v_tiny", **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esm1v_tiny.pt"]
    loaded = load_model(str(path))
    assert loaded.family == "esm1b"
    # fair-esm's own loader needs no regression file for ESM-1v either (it only warns)
    with pytest.warns(UserWarning, match="Regression weights not found"):
        model, _ = _fair_esm(path)
    tokens = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        expected = model(tokens, repr_layers=[2])["representations"][2]
    torch.testing.assert_close(Esm2Encoder(loaded.model, 2)(tokens), expected, atol=1e-5, rtol=1e-5)


def test_esm1_and_msa_transformer_checkpoints_are_refused(tmp_path: Path) -> None:
    for arch in ("protein_bert_base", "msa_transformer"):
        path = tmp_path / f"{arch}.pt"
        torch.save({"args": argparse.Namespace(arch=arch), "model": {}}, path)
        with pytest.raises(ModelLoadError, match=f"fair-esm '{arch}' model .*ESM-2 or ESM-1b/ESM-1v"):
            load_model(str(path))


def test_random_esm1b_checkpoint_layout(tmp_path: Path) -> None:
    a = write_random_checkpoint("esm1b_t33_650M_UR50S", tmp_path / "a", seed=4, **TINY)
    b = write_random_checkpoint("esm1b_t33_650M_UR50S", tmp_path / "b", seed=4, **TINY)
    assert a.name == "esm1b_t33_650M_UR50S.pt"
    assert (a.parent / "esm1b_t33_650M_UR50S-contact-regression.pt").is_file()
    with torch.serialization.safe_globals([argparse.Namespace]):
        data_a = torch.load(a, map_location="cpu")
        data_b = torch.load(b, map_location="cpu")
    args = data_a["args"]
    assert "cfg" not in data_a
    assert (args.arch, args.encoder_layers, args.encoder_embed_dim, args.encoder_ffn_embed_dim) == (
        "roberta_large",
        2,
        32,
        128,
    )
    assert (args.encoder_attention_heads, args.max_positions, args.token_dropout) == (4, 1024, True)
    keys = set(data_a["model"])
    prefix = "encoder.sentence_encoder."
    assert {prefix + "embed_positions.weight", prefix + "emb_layer_norm_before.weight"} <= keys
    assert data_a["model"][prefix + "embed_positions.weight"].shape == (1026, 32)
    assert "encoder.lm_head.dense.weight" in keys
    assert not any("rot_emb" in k or "bias_k" in k for k in keys)
    for key in keys:
        assert torch.equal(data_a["model"][key], data_b["model"][key]), key


def test_index_build_and_model_check_with_esm1b(esm1b_checkpoint: Path, ecoli_fasta: Path, tmp_path: Path) -> None:
    from esmsearch.indexer import build_index

    result = build_index(ecoli_fasta, tmp_path / "idx", model=str(esm1b_checkpoint), device="cpu")
    manifest = Manifest.read(result.path)
    assert manifest.model_source_kind == "fair-esm-checkpoint"
    assert manifest.model_source == str(esm1b_checkpoint.resolve())
    assert manifest.checkpoint_sha256 == hashlib.sha256(esm1b_checkpoint.read_bytes()).hexdigest()
    assert (manifest.dim, manifest.layer) == (32, 2)
    emb = Embedder.for_manifest(manifest, device="cpu")
    assert emb.family == "esm1b"
