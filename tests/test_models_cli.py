"""``esmsearch models`` and the model table behind it (esmsearch.models)."""

from __future__ import annotations

import argparse
import json

import esm
import pytest
import torch
from esm.model.esm1 import ProteinBertModel
from esm.model.esm2 import ESM2

from esmsearch.cli import main
from esmsearch.models import ARCHITECTURES, MODEL_SOURCES, ModelArchitecture, human_count


def _fair_esm_parameters(arch: ModelArchitecture) -> int:
    """Parameters of fair-esm's own module of this shape, built on the meta device (no memory)."""
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device("meta"):
        if arch.family == "esm2":
            model: torch.nn.Module = ESM2(
                num_layers=arch.num_layers,
                embed_dim=arch.embed_dim,
                attention_heads=arch.attention_heads,
                alphabet=alphabet,
                token_dropout=True,
            )
        else:
            args = argparse.Namespace(
                arch="roberta_large",
                layers=arch.num_layers,
                embed_dim=arch.embed_dim,
                ffn_embed_dim=arch.ffn_embed_dim,
                attention_heads=arch.attention_heads,
                max_positions=1024,
                emb_layer_norm_before=True,
                token_dropout=True,
            )
            model = ProteinBertModel(args, alphabet)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_parameter_count_equals_fair_esm_module(name: str) -> None:
    arch = ARCHITECTURES[name]
    assert arch.parameters == _fair_esm_parameters(arch)


def test_parameter_counts_match_the_model_names() -> None:
    # the released names round the same counts: 8M, 35M, 150M, 650M, 3B, 15B
    nominal = {"8M": 8e6, "35M": 35e6, "150M": 150e6, "650M": 650e6, "3B": 3e9, "15B": 15e9}
    for arch in ARCHITECTURES.values():
        label = arch.name.split("_")[2]
        assert 0.9 < arch.parameters / nominal[label] < 1.1, arch.name


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "name",
        "family",
        "layers",
        "dim",
        "params",
        "default",
        "layer",
        "positions",
        "hub",
        "id",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1 : 1 + len(ARCHITECTURES)]}
    assert set(rows) == set(ARCHITECTURES)
    assert rows["esm2_t33_650M_UR50D"] == [
        "esm2_t33_650M_UR50D",
        "ESM-2",
        "33",
        "1280",
        "651M",
        "33",
        "rotary",
        "facebook/esm2_t33_650M_UR50D",
    ]
    assert rows["esm1b_t33_650M_UR50S"][1:] == [
        "ESM-1b",
        "33",
        "1280",
        "652M",
        "33",
        "learned",
        "facebook/esm1b_t33_650M_UR50S",
    ]
    assert rows["esm1v_t33_650M_UR90S_3"][1] == "ESM-1v"
    assert rows["esm2_t6_8M_UR50D"][2:6] == ["6", "320", "7.5M", "6"]
    for form, kind, _ in MODEL_SOURCES:
        assert f"  {form}" in out and f"[{kind}]" in out
    assert out.index("[hf-directory]") < out.index("[fair-esm-checkpoint]") < out.index("[fair-esm-pretrained]")
    assert out.index("[fair-esm-pretrained]") < out.index("[hf-hub]")


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["esm2_t36_3B_UR50D"] == {
        "name": "esm2_t36_3B_UR50D",
        "family": "esm2",
        "layers": 36,
        "embed_dim": 2560,
        "attention_heads": 40,
        "parameters": ARCHITECTURES["esm2_t36_3B_UR50D"].parameters,
        "default_layer": 36,
        "positions": "rotary",
        "context_residues": 1022,
        "hf_hub_id": "facebook/esm2_t36_3B_UR50D",
    }
    assert [s["kind"] for s in data["sources"]] == [
        "hf-directory",
        "fair-esm-checkpoint",
        "fair-esm-pretrained",
        "hf-hub",
    ]


def test_human_count() -> None:
    assert [human_count(n) for n in (999, 7_512_474, 148_140_154, 2_839_005_634)] == ["999", "7.5M", "148M", "2.8B"]


def test_unknown_family_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model family 'esm1'"):
        ModelArchitecture("esm1_t6_43M_UR50S", 6, 768, 12, "esm1")
