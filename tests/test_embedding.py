"""Model loading, batching, pooling and windowing (esmsearch.embedding).

The reference vectors are computed independently with fair-esm itself
(``esm.pretrained.load_model_and_alphabet_local`` + ``BatchConverter`` +
``model(tokens, repr_layers=[layer])``), one sequence per forward pass, so there is
no padding and no esmsearch code in the reference path.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esmsearch.checkpoints import write_random_checkpoint
from esmsearch.embedding import (
    WINDOW_OVERLAP,
    WINDOW_RESIDUES,
    Embedder,
    load_model,
    plan_windows,
    resolve_device,
)
from esmsearch.errors import ConfigError, IndexMismatchError, InvalidSequenceError, ModelLoadError
from esmsearch.store import Manifest

AA = "ACDEFGHIKLMNPQRSTVWY"


def _random_protein(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(AA) for _ in range(n))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> tuple[Any, Any]:
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(tiny_checkpoint))
    model.eval()
    return model, alphabet


def _reference_residue_reps(reference: tuple[Any, Any], seq: str, layer: int) -> np.ndarray:
    """float64 [len(seq), dim]: fair-esm's per-residue representations of one sequence."""
    model, alphabet = reference
    _, _, tokens = alphabet.get_batch_converter()([("s", seq)])
    with torch.no_grad():
        reps = model(tokens, repr_layers=[layer])["representations"][layer]
    return reps[0, 1 : len(seq) + 1].double().numpy()


def _reference_vector(reference: tuple[Any, Any], seq: str, layer: int) -> np.ndarray:
    v = _reference_residue_reps(reference, seq, layer).mean(axis=0)
    return v / np.linalg.norm(v)


# -- load_model -------------------------------------------------------------------------


def test_local_checkpoint_loads_and_records_name_and_sha(tiny_checkpoint: Path) -> None:
    loaded = load_model(str(tiny_checkpoint))
    assert loaded.model_name == "esm2_tiny_test"
    assert loaded.model_source == str(tiny_checkpoint.resolve())
    assert loaded.checkpoint_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert loaded.model.num_layers == 2
    assert loaded.model.embed_dim == 32
    assert not loaded.model.training


def test_contact_regression_file_is_optional(tiny_checkpoint: Path, tmp_path: Path) -> None:
    lone = tmp_path / "esm2_lone.pt"
    shutil.copy(tiny_checkpoint, lone)
    loaded = load_model(str(lone))
    assert loaded.model_name == "esm2_lone"
    ref = load_model(str(tiny_checkpoint))
    w = "embed_tokens.weight"
    assert torch.equal(loaded.model.state_dict()[w], ref.model.state_dict()[w])


def test_stem_without_esm2_prefix_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "my_model.pt"
    shutil.copy(tiny_checkpoint, other)
    loaded = load_model(str(other))
    assert loaded.model_name == "my_model"
    assert loaded.model.num_layers == 2


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "esm2_absent.pt"))


def test_garbage_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "esm2_garbage.pt"
    bad.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    with pytest.raises(ModelLoadError, match="corrupt") as ei:
        load_model(str(bad))
    assert ei.value.__cause__ is not None


def test_truncated_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "esm2_cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(bad))
    assert ei.value.__cause__ is not None


def test_corrupt_contact_regression_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_checkpoint, tmp_path / "esm2_x.pt")
    (tmp_path / "esm2_x-contact-regression.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="contact-regression"):
        load_model(str(tmp_path / "esm2_x.pt"))


def test_non_esm_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "esm2_other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ModelLoadError, match="not a fair-esm ESM-2 or ESM-1b checkpoint"):
        load_model(str(path))


@pytest.mark.parametrize("name", ["esm2_t99_1T_UR50D", "esm1_t34_670M_UR50S", "prot_bert", "esm_msa1b_t12_100M_UR50S"])
def test_unknown_pretrained_name_says_how_to_pass_a_local_checkpoint(name: str) -> None:
    with pytest.raises(ModelLoadError) as ei:
        load_model(name)
    msg = str(ei.value)
    assert repr(name) in msg
    assert "local" in msg and ".pt" in msg
    assert "esm2_t33_650M_UR50D" in msg


def test_offline_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import esm

    calls: list[str] = []

    def offline(name: str) -> None:
        calls.append(name)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(esm.pretrained, "load_model_and_alphabet_hub", offline)
    with pytest.raises(ModelLoadError) as ei:
        load_model("esm2_t6_8M_UR50D")
    assert calls == ["esm2_t6_8M_UR50D"]
    msg = str(ei.value)
    assert "URLError" in msg
    assert "--model /path/to/esm2_t6_8M_UR50D.pt" in msg
    assert isinstance(ei.value.__cause__, urllib.error.URLError)


# -- configuration ----------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "", "CPU"):
        with pytest.raises(ConfigError):
            resolve_device(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": 3},
        {"layer": -4},
        {"toks_per_batch": WINDOW_RESIDUES + 1},
        {"toks_per_batch": 0},
        {"device": "tpu"},
        {"precision": "fp64"},
        {"precision": "fp16"},  # CPU
    ],
)
def test_bad_settings_are_config_errors(tiny_checkpoint: Path, kwargs: dict[str, Any]) -> None:
    settings_ = {"device": "cpu", **kwargs}
    with pytest.raises(ConfigError):
        Embedder(str(tiny_checkpoint), **settings_)


def test_layer_selection(tiny_checkpoint: Path) -> None:
    ckpt = str(tiny_checkpoint)
    assert Embedder(ckpt, device="cpu").layer == 2
    assert Embedder(ckpt, device="cpu", layer=-1).layer == 2
    assert Embedder(ckpt, device="cpu", layer=-2).layer == 1
    assert Embedder(ckpt, device="cpu", layer=-3).layer == 0
    assert Embedder(ckpt, device="cpu", layer=0).layer == 0
    assert Embedder(ckpt, device="cpu", toks_per_batch=WINDOW_RESIDUES + 2).toks_per_batch == WINDOW_RESIDUES + 2


# -- embedding --------------------------------------------------------------------------


def test_shape_dtype_and_unit_norms(tiny_embedder: Embedder) -> None:
    seqs = ["MKTAYIAKQR", "acdefghik*", "M"]
    out = tiny_embedder.embed(seqs)
    assert out.shape == (3, 32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    one = tiny_embedder.embed(["MKTAYIAKQR"])
    assert one.shape == (1, 32) and one.dtype == np.float32
    np.testing.assert_allclose(one[0], out[0], atol=1e-6)
    none = tiny_embedder.embed([])
    assert none.shape == (0, 32) and none.dtype == np.float32


def test_lowercase_and_stop_give_same_vector(tiny_embedder: Embedder) -> None:
    out = tiny_embedder.embed(["MKTAYIAKQR", "mktayiakqr*"])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_invalid_sequence_names_its_index(tiny_embedder: Embedder) -> None:
    with pytest.raises(InvalidSequenceError) as ei:
        tiny_embedder.embed(["MKT", "MK-T"])
    assert ei.value.record_id == "#2"
    assert ei.value.position == 3


def test_input_order_restored(tiny_embedder: Embedder) -> None:
    rng = random.Random(1)
    seqs = [_random_protein(rng, n) for n in (7, 300, 40, 120, 3, 250)]
    out = tiny_embedder.embed(seqs)
    perm = [3, 0, 5, 1, 4, 2]
    out_perm = tiny_embedder.embed([seqs[i] for i in perm])
    np.testing.assert_allclose(out_perm, out[perm], atol=1e-5)
    # rows differ from each other, so a wrong order could not pass
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_padding_invariance(tiny_embedder: Embedder, tiny_checkpoint: Path) -> None:
    rng = random.Random(2)
    seqs = [_random_protein(rng, n) for n in (5, 333, 50, 1, 180, 700)]
    batched = tiny_embedder.embed(seqs)
    alone = np.stack([tiny_embedder.embed([s])[0] for s in seqs])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # a minimal token budget (one packed batch holds at most 1,026 of these 1,281 tokens)
    # splits the same input into several batches
    small = Embedder(str(tiny_checkpoint), device="cpu", toks_per_batch=WINDOW_RESIDUES + 2)
    before = small.stats.batches
    np.testing.assert_allclose(small.embed(seqs), alone, atol=1e-5)
    assert small.stats.batches - before >= 2


@pytest.mark.parametrize("layer", [2, 1, 0])
def test_matches_fair_esm_reference(tiny_checkpoint: Path, reference: tuple[Any, Any], layer: int) -> None:
    emb = Embedder(str(tiny_checkpoint), device="cpu", layer=layer)
    rng = random.Random(3)
    seqs = [_random_protein(rng, n) for n in (12, 260, 75)] + ["MKTXBZUOAC"]
    out = emb.embed(seqs)
    expected = np.stack([_reference_vector(reference, s, layer) for s in seqs])
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_layers_differ(tiny_checkpoint: Path) -> None:
    seq = ["MKTAYIAKQRQISFVKSHFSRQ"]
    vecs = [Embedder(str(tiny_checkpoint), device="cpu", layer=layer).embed(seq)[0] for layer in (0, 1, 2)]
    assert np.abs(vecs[0] - vecs[1]).max() > 1e-3
    assert np.abs(vecs[1] - vecs[2]).max() > 1e-3


def test_on_batch_reports_residues(tiny_embedder: Embedder) -> None:
    done: list[int] = []
    tiny_embedder.embed(["MKTAY", "ACD"], on_batch=done.append)
    assert sum(done) == 8


def test_stats_count_sequences_and_residues(tiny_checkpoint: Path) -> None:
    emb = Embedder(str(tiny_checkpoint), device="cpu")
    emb.embed(["MKTAY", "ACD"])
    emb.embed(["GG"])
    assert (emb.stats.sequences, emb.stats.residues, emb.stats.windowed_sequences) == (3, 10, 0)
    assert emb.stats.batches == 2
    assert emb.stats.residues_per_s > 0


# -- windowing --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(length=st.integers(min_value=1, max_value=30_000))
def test_plan_windows_tiles_the_sequence(length: int) -> None:
    windows = plan_windows(length)
    assert windows[0][0] == 0 and windows[0][2] == 0
    assert windows[-1][1] == length and windows[-1][3] == length
    for i, (start, stop, keep_from, keep_to) in enumerate(windows):
        assert 0 <= start < stop <= length
        assert stop - start <= WINDOW_RESIDUES
        assert start <= keep_from < keep_to <= stop
        if i:
            prev = windows[i - 1]
            assert keep_from == prev[3]  # keep ranges are contiguous: they tile [0, length)
            assert prev[1] - start >= WINDOW_OVERLAP  # overlap with the previous window
            assert start > prev[0]
    if length <= WINDOW_RESIDUES:
        assert windows == [(0, length, 0, length)]
    else:
        assert all(stop - start == WINDOW_RESIDUES for start, stop, _, _ in windows)


def test_plan_windows_bad_overlap() -> None:
    with pytest.raises(ConfigError):
        plan_windows(5000, window=100, overlap=100)


def test_full_length_sequence_is_one_window(tiny_checkpoint: Path, reference: tuple[Any, Any]) -> None:
    emb = Embedder(str(tiny_checkpoint), device="cpu")
    seq = _random_protein(random.Random(4), WINDOW_RESIDUES)
    assert plan_windows(len(seq)) == [(0, WINDOW_RESIDUES, 0, WINDOW_RESIDUES)]
    out = emb.embed([seq])
    np.testing.assert_allclose(out[0], _reference_vector(reference, seq, 2), atol=1e-5)
    assert emb.stats.windowed_sequences == 0


def test_long_sequence_pools_planned_windows(tiny_checkpoint: Path, reference: tuple[Any, Any]) -> None:
    emb = Embedder(str(tiny_checkpoint), device="cpu")
    rng = random.Random(5)
    seq = _random_protein(rng, 2500)
    short = _random_protein(rng, 90)
    out = emb.embed([short, seq])
    assert emb.stats.windowed_sequences == 1

    windows = plan_windows(len(seq))
    assert len(windows) >= 3
    parts = []
    for start, stop, keep_from, keep_to in windows:
        reps = _reference_residue_reps(reference, seq[start:stop], 2)
        parts.append(reps[keep_from - start : keep_to - start])
    per_residue = np.concatenate(parts)
    assert per_residue.shape == (2500, 32)
    expected = per_residue.mean(axis=0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(out[1], expected, atol=1e-5)
    np.testing.assert_allclose(out[0], _reference_vector(reference, short, 2), atol=1e-5)

    # every residue contributes: change one near the end (only in the last window)
    pos = 2490
    mutated = seq[:pos] + ("W" if seq[pos] != "W" else "A") + seq[pos + 1 :]
    assert np.abs(emb.embed([mutated])[0] - out[1]).max() > 1e-6
    assert emb.stats.windowed_sequences == 2


# -- manifest checks --------------------------------------------------------------------


def test_check_manifest(tiny_embedder: Embedder, small_index: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(small_index)
    tiny_embedder.check_manifest(manifest)  # same model: no error
    other_ckpt = write_random_checkpoint(
        "esm2_t6_8M_UR50D",
        tmp_path,
        seed=4321,
        num_layers=2,
        embed_dim=32,
        attention_heads=4,
        name="esm2_tiny_test",
    )
    other = Embedder(str(other_ckpt), device="cpu")
    assert other.model_name == manifest.model_name  # same name, different weights
    with pytest.raises(IndexMismatchError, match="checkpoint_sha256"):
        other.check_manifest(manifest)
    inner = Embedder(manifest.model_source, device="cpu", layer=1)
    with pytest.raises(IndexMismatchError, match="layer"):
        inner.check_manifest(manifest)


def test_for_manifest(small_index: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(small_index)
    emb = Embedder.for_manifest(manifest, device="cpu")
    assert emb.layer == manifest.layer
    assert emb.checkpoint_sha256 == manifest.checkpoint_sha256
    renamed = tmp_path / "esm2_renamed.pt"
    shutil.copy(tiny_checkpoint, renamed)
    assert Embedder.for_manifest(manifest, model=str(renamed), device="cpu").model_name == "esm2_renamed"
    other_ckpt = write_random_checkpoint(
        "esm2_t6_8M_UR50D", tmp_path / "o", seed=99, num_layers=2, embed_dim=32, attention_heads=4
    )
    with pytest.raises(IndexMismatchError):
        Embedder.for_manifest(manifest, model=str(other_ckpt), device="cpu")
