"""Seeded random-weight ESM-2 checkpoints (esmsearch.checkpoints)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from esmsearch.checkpoints import ARCHITECTURES, Esm2Architecture, main, write_random_checkpoint
from esmsearch.embedding import load_model

TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}


def _load(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu")  # type: ignore[no-any-return]


def test_same_seed_gives_identical_tensors(tmp_path: Path) -> None:
    a = _load(write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path / "a", seed=7, **TINY))["model"]
    b = _load(write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path / "b", seed=7, **TINY))["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_different_seeds_give_different_weights(tmp_path: Path) -> None:
    a = _load(write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path / "a", seed=1, **TINY))["model"]
    b = _load(write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path / "b", seed=2, **TINY))["model"]
    key = "encoder.sentence_encoder.embed_tokens.weight"
    assert not torch.equal(a[key], b[key])
    key = "encoder.sentence_encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[key], b[key])


def test_global_rng_state_is_left_untouched(tmp_path: Path) -> None:
    torch.manual_seed(99)
    expected = torch.rand(5)
    torch.manual_seed(99)
    write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path, seed=3, **TINY)
    assert torch.equal(torch.rand(5), expected)


def test_file_layout_matches_fair_esm_release(tmp_path: Path) -> None:
    path = write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path, seed=5, name="esm2_layout", **TINY)
    assert path == tmp_path / "esm2_layout.pt"
    data = _load(path)
    cfg = data["cfg"]["model"]
    assert isinstance(cfg, argparse.Namespace)
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == (2, 32, 4)
    assert cfg.token_dropout is True
    assert cfg.random_weights_seed == 5
    keys = set(data["model"])
    assert "encoder.sentence_encoder.embed_tokens.weight" in keys
    assert "encoder.sentence_encoder.emb_layer_norm_after.weight" in keys
    assert "encoder.lm_head.dense.weight" in keys
    assert not any("contact_head" in k for k in keys)
    regression = _load(tmp_path / "esm2_layout-contact-regression.pt")["model"]
    assert set(regression) == {"contact_head.regression.weight", "contact_head.regression.bias"}


def test_t6_architecture_shapes_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["esm2_t6_8M_UR50D", "-o", str(tmp_path), "--seed", "0"]) == 0
    path = tmp_path / "esm2_t6_8M_UR50D.pt"
    assert capsys.readouterr().out.strip() == str(path)
    sd = _load(path)["model"]
    prefix = "encoder.sentence_encoder."
    assert sd[prefix + "embed_tokens.weight"].shape == (33, 320)
    assert sd[prefix + "layers.5.fc1.weight"].shape == (4 * 320, 320)
    assert prefix + "layers.6.fc1.weight" not in sd
    loaded = load_model(str(path))
    assert loaded.model.num_layers == 6
    assert loaded.model.embed_dim == 320
    assert loaded.model.attention_heads == 20
    assert loaded.model_name == "esm2_t6_8M_UR50D"


def test_architecture_table_matches_published_models() -> None:
    shapes = {n: (a.num_layers, a.embed_dim, a.attention_heads, a.family) for n, a in ARCHITECTURES.items()}
    assert shapes == {
        "esm2_t6_8M_UR50D": (6, 320, 20, "esm2"),
        "esm2_t12_35M_UR50D": (12, 480, 20, "esm2"),
        "esm2_t30_150M_UR50D": (30, 640, 20, "esm2"),
        "esm2_t33_650M_UR50D": (33, 1280, 20, "esm2"),
        "esm2_t36_3B_UR50D": (36, 2560, 40, "esm2"),
        "esm2_t48_15B_UR50D": (48, 5120, 40, "esm2"),
        "esm1b_t33_650M_UR50S": (33, 1280, 20, "esm1b"),
        **{f"esm1v_t33_650M_UR90S_{i}": (33, 1280, 20, "esm1b") for i in range(1, 6)},
    }


def test_custom_architecture_object(tmp_path: Path) -> None:
    arch = Esm2Architecture("esm2_custom", 1, 16, 2)
    path = write_random_checkpoint(arch, tmp_path, seed=0)
    assert path.name == "esm2_custom.pt"
    cfg = _load(path)["cfg"]["model"]
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == (1, 16, 2)


def test_unknown_architecture_and_bad_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown ESM architecture"):
        write_random_checkpoint("esm1_t34_670M_UR50S", tmp_path)
    with pytest.raises(ValueError, match="must start with 'esm2'"):
        write_random_checkpoint("esm2_t6_8M_UR50D", tmp_path, name="tiny", **TINY)
    with pytest.raises(ValueError, match="must not start with 'esm2'"):
        write_random_checkpoint("esm1b_t33_650M_UR50S", tmp_path, name="esm2_like", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_main_writes_a_reduced_architecture(tmp_path: Path) -> None:
    # The scale rehearsal's model: a reshaped ESM-2 under its own name, loadable by fair-esm's loader.
    rc = main(
        ["esm2_t6_8M_UR50D", "-o", str(tmp_path), "--layers", "2", "--embed-dim", "128", "--heads", "8"]
        + ["--name", "esm2_t2_128d_random", "--seed", "3"]
    )
    assert rc == 0
    ckpt = _load(tmp_path / "esm2_t2_128d_random.pt")
    cfg = ckpt["cfg"]["model"]
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == (2, 128, 8)
    loaded = load_model(str(tmp_path / "esm2_t2_128d_random.pt"))
    assert loaded.family == "esm2"
    assert loaded.model.num_layers == 2 and loaded.model.embed_dim == 128


@pytest.mark.parametrize(
    "extra",
    [
        ["--layers", "2"],  # reshaped but keeps the pretrained name
        ["--embed-dim", "130", "--heads", "8", "--name", "esm2_x"],  # heads do not divide the dim
        ["--layers", "0", "--name", "esm2_x"],
        ["--layers", "2", "--name", "not_esm2"],  # fair-esm would pick the ESM-1b loader
    ],
)
def test_main_rejects_bad_reshapes(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        main(["esm2_t6_8M_UR50D", "-o", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert not list(tmp_path.glob("*.pt"))
