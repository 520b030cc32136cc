"""Hugging Face ESM checkpoints: loading, equality with transformers, conversion, errors.

All offline. The Hugging Face references are transformers' own classes:
``EsmModel.from_pretrained(DIR)`` on a directory written by ``save_pretrained`` from
a seeded random ``EsmModel`` built with ``EsmConfig`` in the esm2_t6_8M shape (the
published ``facebook/esm2_t6_8M_UR50D`` config values), and ``EsmForMaskedLM`` for
the conversion utility. Hub ids are exercised against huggingface_hub's real cache
layout with ``HF_HUB_OFFLINE`` set, never the network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from esmsearch.checkpoints import write_random_checkpoint
from esmsearch.embedding import Embedder, load_model, resolve_model_spec
from esmsearch.errors import IndexMismatchError, ModelLoadError
from esmsearch.esm2_fast import Esm2Encoder
from esmsearch.hf_convert import HfEsmConfig, convert_fair_esm_to_hf, hf_state_to_fair_esm, main
from esmsearch.store import Manifest

#: facebook/esm2_t6_8M_UR50D's config.json, shape and all (layer_norm_eps 1e-5, rotary, token dropout).
T6_CONFIG: dict[str, Any] = {
    "vocab_size": 33,
    "hidden_size": 320,
    "num_hidden_layers": 6,
    "num_attention_heads": 20,
    "intermediate_size": 1280,
    "max_position_embeddings": 1026,
    "position_embedding_type": "rotary",
    "token_dropout": True,
    "emb_layer_norm_before": False,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "mask_token_id": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
#: The ESM-1b layout (facebook/esm1b_t33_650M_UR50S's config) at a tiny size.
ESM1B_TINY_CONFIG: dict[str, Any] = {
    **T6_CONFIG,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "position_embedding_type": "absolute",
    "emb_layer_norm_before": True,
}
TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}
SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVK", "MAL", "MXBZUOACDXXBZ", "W"]


def _save_random_hf(config: dict[str, Any], out: Path, seed: int) -> Path:
    from transformers import EsmConfig, EsmModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = EsmModel(EsmConfig(**config))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_t6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_random_hf(T6_CONFIG, tmp_path_factory.mktemp("hf") / "esm2_t6_random", seed=0)


@pytest.fixture(scope="module")
def hf_esm1b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_random_hf(ESM1B_TINY_CONFIG, tmp_path_factory.mktemp("hf") / "esm1b_tiny_random", seed=1)


def _padded_tokens_with_masks() -> torch.Tensor:
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(SEQS)])
    tokens[0, 4] = alphabet.mask_idx
    tokens[0, 9] = alphabet.mask_idx
    tokens[2, 2] = alphabet.mask_idx
    assert (tokens == alphabet.padding_idx).sum() > 0
    return tokens


@pytest.mark.parametrize("fixture", ["hf_t6", "hf_esm1b"])
def test_representations_equal_transformers_hidden_states(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import EsmModel

    directory: Path = request.getfixturevalue(fixture)
    reference = EsmModel.from_pretrained(directory).eval()
    tokens = _padded_tokens_with_masks()
    real = tokens.ne(1)
    with torch.no_grad():
        out = reference(tokens, attention_mask=real.long(), output_hidden_states=True)
    loaded = load_model(str(directory))
    n_layers = reference.config.num_hidden_layers
    assert len(out.hidden_states) == n_layers + 1
    for layer in range(n_layers + 1):
        ours = Esm2Encoder(loaded.model, layer)(tokens)
        torch.testing.assert_close(ours[real], out.hidden_states[layer][real], atol=1e-5, rtol=0)
    # the last layer is last_hidden_state, with the final LayerNorm
    torch.testing.assert_close(ours[real], out.last_hidden_state[real], atol=1e-5, rtol=0)


def test_loaded_hf_model_records_kind_name_and_weights_sha(hf_t6: Path) -> None:
    loaded = load_model(str(hf_t6))
    assert (loaded.model_source_kind, loaded.family) == ("hf-directory", "esm2")
    assert loaded.model_name == "esm2_t6_random"
    assert loaded.model_source == str(hf_t6.resolve())
    assert loaded.checkpoint_sha256 == hashlib.sha256((hf_t6 / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.model.num_layers == 6 and loaded.model.embed_dim == 320
    assert all(m.eps == 1e-5 for m in loaded.model.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize("family", ["esm2_t6_8M_UR50D", "esm1b_t33_650M_UR50S"])
def test_converted_fair_esm_checkpoint_gives_same_pooled_vectors(
    family: str, tmp_path: Path, ecoli_fasta: Path
) -> None:
    from esmsearch.sequences import read_fasta

    name = "esm2_conv" if family.startswith("esm2") else "esm1b_conv"
    checkpoint = write_random_checkpoint(family, tmp_path / "fair", seed=5, name=name, **TINY)
    hf_dir = convert_fair_esm_to_hf(checkpoint, tmp_path / "hf" / name)
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in hf_dir.iterdir()}
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no work directory left
    seqs = [r.sequence for r in read_fasta(ecoli_fasta)] + [
        "".join("ACDEFGHIKLMNPQRSTVWY"[i % 20] for i in range(1400))
    ]
    fair = Embedder(str(checkpoint), device="cpu")
    hf = Embedder(str(hf_dir), device="cpu")
    assert (hf.model_source_kind, hf.family) == ("hf-directory", fair.family)
    a, b = fair.embed(seqs), hf.embed(seqs)
    assert float((a * b).sum(axis=1).min()) >= 0.999999
    assert hf.checkpoint_sha256 != fair.checkpoint_sha256  # another file, another identity


def test_converted_directory_is_what_transformers_loads(tmp_path: Path) -> None:
    """The conversion utility against transformers' own loader: logits of the MLM head agree."""
    from transformers import EsmForMaskedLM

    for family, name in (("esm2_t6_8M_UR50D", "esm2_c"), ("esm1b_t33_650M_UR50S", "esm1b_c")):
        checkpoint = write_random_checkpoint(family, tmp_path, seed=6, name=name, **TINY)
        out = tmp_path / f"hf_{name}"
        assert main([str(checkpoint), "-o", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["position_embedding_type"] == ("rotary" if family.startswith("esm2") else "absolute")
        hf = EsmForMaskedLM.from_pretrained(out).eval()
        fair = load_model(str(checkpoint)).model
        tokens = _padded_tokens_with_masks()
        real = tokens.ne(1)
        with torch.no_grad():
            expected = fair(tokens)["logits"]
            got = hf(tokens, attention_mask=real.long()).logits
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_conversion_refuses_to_overwrite(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(tiny_checkpoint), "-o", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([str(tiny_checkpoint), "-o", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_manifest_records_hf_source_and_server_check_compares_weights(
    hf_esm1b: Path, tmp_path: Path, ecoli_fasta: Path
) -> None:
    from esmsearch.indexer import build_index

    result = build_index(ecoli_fasta, tmp_path / "idx", model=str(hf_esm1b), device="cpu")
    manifest = Manifest.read(result.path)
    assert manifest.model_source_kind == "hf-directory"
    assert manifest.model_source == str(hf_esm1b.resolve())
    assert manifest.model_name == "esm1b_tiny_random"
    assert manifest.checkpoint_sha256 == hashlib.sha256((hf_esm1b / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((result.path / "manifest.json").read_text())["model_source_kind"] == "hf-directory"
    assert Embedder.for_manifest(manifest, device="cpu").family == "esm1b"
    other = _save_random_hf(ESM1B_TINY_CONFIG, tmp_path / "other", seed=2)
    with pytest.raises(IndexMismatchError, match="checkpoint_sha256"):
        Embedder.for_manifest(manifest, model=str(other), device="cpu")


def test_legacy_manifest_without_source_kind() -> None:
    base: dict[str, Any] = {
        "format_version": 2,
        "version": "v",
        "model_name": "m",
        "checkpoint_sha256": "0" * 64,
        "layer": 1,
        "pooling": "mean_residues",
        "normalisation": "l2",
        "precision": "fp32",
        "metric": "inner_product",
        "dim": 8,
        "count": 0,
        "index_factory": "Flat",
        "search_params": {},
        "source_fasta": "x",
        "source_fasta_sha256": "0" * 64,
        "files": {},
        "built_at": "t",
        "tool_version": "0",
    }
    assert Manifest.from_dict({**base, "model_source": "/abs/m.pt"}).model_source_kind == "fair-esm-checkpoint"
    assert Manifest.from_dict({**base, "model_source": "esm2_t6_8M_UR50D"}).model_source_kind == "fair-esm-pretrained"
    kept = Manifest.from_dict({**base, "model_source": "facebook/x", "model_source_kind": "hf-hub"})
    assert kept.model_source_kind == "hf-hub"


# -- variants of the Hugging Face layout ------------------------------------------------------


def _vectors(spec: str) -> np.ndarray:
    return Embedder(spec, device="cpu").embed(SEQS)


def test_pytorch_model_bin_and_legacy_names_load_the_same(hf_esm1b: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(hf_esm1b / "model.safetensors"))
    renamed = {}
    for key, tensor in state.items():  # transformers 4 wrote LayerNorm.weight/bias, transformers 5 gamma/beta
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        renamed[f"esm.{key}"] = tensor.to(torch.float16)  # EsmForMaskedLM prefix, half precision storage
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(hf_esm1b / "config.json", directory / "config.json")
    torch.save(renamed, directory / "pytorch_model.bin")
    loaded = load_model(str(directory))
    assert loaded.checkpoint_sha256 == hashlib.sha256((directory / "pytorch_model.bin").read_bytes()).hexdigest()
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    ref = _vectors(str(hf_esm1b))
    half = _vectors(str(directory))
    assert float((ref * half).sum(axis=1).min()) > 0.999  # fp16 rounding of the stored weights only


def test_sharded_safetensors(hf_t6: Path, tmp_path: Path) -> None:
    from transformers import EsmModel

    directory = tmp_path / "sharded"
    EsmModel.from_pretrained(hf_t6).save_pretrained(directory, max_shard_size="5MB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (directory / "model.safetensors.index.json").is_file()
    loaded = load_model(str(directory))
    lines = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in shards)
    assert loaded.checkpoint_sha256 == hashlib.sha256(lines.encode()).hexdigest()
    np.testing.assert_allclose(_vectors(str(directory)), _vectors(str(hf_t6)), atol=1e-6)
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=f"shard .*{shards[-1].name}.* is missing"):
        load_model(str(directory))


def test_rotary_inv_freq_from_the_file_wins(hf_t6: Path) -> None:
    from safetensors.torch import load_file

    config = HfEsmConfig.read(hf_t6 / "config.json")
    state = dict(load_file(str(hf_t6 / "model.safetensors")))
    custom = torch.linspace(1.0, 0.001, 8)
    state = {k: v for k, v in state.items() if not k.endswith("inv_freq")}
    state["encoder.layer.3.attention.self.rotary_embeddings.inv_freq"] = custom
    mapped = hf_state_to_fair_esm(state, config)
    assert torch.equal(mapped["layers.3.self_attn.rot_emb.inv_freq"], custom)
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.equal(mapped["layers.0.self_attn.rot_emb.inv_freq"], default)


# -- errors: one clear message naming the file ------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_name_the_file(hf_t6: Path, tmp_path: Path) -> None:
    directory = _copy(hf_t6, tmp_path / "cut")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=f"cannot read Hugging Face weights {weights}: corrupt") as ei:
        load_model(str(directory))
    assert ei.value.__cause__ is not None


def test_garbage_bin_names_the_file(hf_t6: Path, tmp_path: Path) -> None:
    directory = tmp_path / "garbage"
    directory.mkdir()
    shutil.copy(hf_t6 / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: corrupt"):
        load_model(str(directory))


def test_missing_weights_name_the_directory(hf_t6: Path, tmp_path: Path) -> None:
    directory = tmp_path / "config_only"
    directory.mkdir()
    shutil.copy(hf_t6 / "config.json", directory)
    with pytest.raises(ModelLoadError, match=f"no weights in Hugging Face directory {directory}: expected one of"):
        load_model(str(directory))


def test_missing_tensor_and_wrong_shape_name_the_file(hf_t6: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(hf_t6 / "model.safetensors"))
    directory = _copy(hf_t6, tmp_path / "missing")
    weights = directory / "model.safetensors"
    save_file({k: v for k, v in state.items() if "layer.2.intermediate" not in k}, str(weights))
    with pytest.raises(ModelLoadError, match=f"{weights}: missing tensors for layers.2.fc1.bias"):
        load_model(str(directory))
    bad = dict(state)
    bad["embeddings.word_embeddings.weight"] = torch.zeros(33, 16)
    save_file(bad, str(weights))
    with pytest.raises(ModelLoadError, match=r"embed_tokens.weight' has shape \(33, 16\), config.json implies"):
        load_model(str(directory))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "bert"}, "model_type 'bert' is not 'esm'"),
        ({"is_folding_model": True}, "ESMFold"),
        ({"vocab_size": 35}, "vocab_size is 35, expected 33"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"num_hidden_layers": "six"}, "'num_hidden_layers' must be an integer"),
        ({"position_embedding_type": "relative_key"}, "neither 'rotary' nor 'absolute'"),
        ({"intermediate_size": 1000}, "not 4 x hidden_size"),
        ({"num_hidden_layers": 4}, "unexpected tensor 'encoder.layer.[45]"),
    ],
)
def test_bad_config_is_one_clear_error(hf_t6: Path, tmp_path: Path, change: dict[str, Any], message: str) -> None:
    directory = _copy(hf_t6, tmp_path / "bad")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message) as ei:
        load_model(str(directory))
    assert str(directory) in str(ei.value)


def test_unreadable_config_and_vocab_name_the_file(hf_t6: Path, tmp_path: Path) -> None:
    directory = _copy(hf_t6, tmp_path / "cfg")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"cannot read Hugging Face config {directory / 'config.json'}"):
        load_model(str(directory))
    directory = _copy(hf_t6, tmp_path / "vocab")
    (directory / "vocab.txt").write_text("\n".join(["<pad>", "<cls>"] + ["A"] * 31))
    with pytest.raises(ModelLoadError, match="vocab.txt does not list fair-esm's ESM alphabet"):
        load_model(str(directory))


# -- resolution order and the Hub -------------------------------------------------------------


def test_resolution_order(hf_t6: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_spec(str(hf_t6)) == ("hf-directory", str(hf_t6.resolve()))
    assert resolve_model_spec(str(tiny_checkpoint)) == ("fair-esm-checkpoint", str(tiny_checkpoint.resolve()))
    assert resolve_model_spec("esm1b_t33_650M_UR50S") == ("fair-esm-pretrained", "esm1b_t33_650M_UR50S")
    assert resolve_model_spec("facebook/esm2_t33_650M_UR50D") == ("hf-hub", "facebook/esm2_t33_650M_UR50D")
    # a local directory of the same name as a hub id wins
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hf_t6, tmp_path / "facebook" / "esm2_t33_650M_UR50D")
    kind, location = resolve_model_spec("facebook/esm2_t33_650M_UR50D")
    assert (kind, Path(location)) == ("hf-directory", (tmp_path / "facebook" / "esm2_t33_650M_UR50D").resolve())
    for path_like in ("./nowhere/model", "no/such/dir/model", "checkpoints/esm2_x.pt", "~/absent.pt"):
        with pytest.raises(ModelLoadError, match="model checkpoint not found"):
            resolve_model_spec(path_like)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="directory without config.json"):
        resolve_model_spec("empty")
    with pytest.raises(ModelLoadError, match="one file of a Hugging Face model: pass its directory"):
        resolve_model_spec(str(hf_t6 / "model.safetensors"))


def _offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_offline_without_cache_names_the_local_directory_alternative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    _offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(ModelLoadError) as ei:
        load_model("facebook/esm2_t33_650M_UR50D")
    msg = str(ei.value)
    assert "cannot fetch Hugging Face model 'facebook/esm2_t33_650M_UR50D'" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "local directory: --model /path/to/esm2_t33_650M_UR50D" in msg
    assert "hf download facebook/esm2_t33_650M_UR50D --local-dir esm2_t33_650M_UR50D" in msg
    assert isinstance(ei.value.__cause__, LocalEntryNotFoundError)


def test_hub_id_loads_from_the_cache_offline(hf_t6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--esm2_tiny_random"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_t6, repo / "snapshots" / commit)
    _offline_hub(monkeypatch, cache)
    loaded = load_model("facebook/esm2_tiny_random")
    assert (loaded.model_source_kind, loaded.model_name, loaded.model_source) == (
        "hf-hub",
        "facebook/esm2_tiny_random",
        "facebook/esm2_tiny_random",
    )
    assert loaded.checkpoint_sha256 == hashlib.sha256((hf_t6 / "model.safetensors").read_bytes()).hexdigest()
    np.testing.assert_allclose(_vectors("facebook/esm2_tiny_random"), _vectors(str(hf_t6)), atol=0)


def test_server_serves_an_index_built_from_a_hf_directory(hf_esm1b: Path, tmp_path: Path, ecoli_fasta: Path) -> None:
    """The server loads the manifest's Hugging Face directory, checks its weights and answers searches."""
    from esmsearch.client import SearchClient
    from esmsearch.indexer import build_index
    from esmsearch.sequences import read_fasta
    from esmsearch.server import ServerConfig, create_server

    index = build_index(ecoli_fasta, tmp_path / "idx", model=str(hf_esm1b), device="cpu").path
    records = list(read_fasta(ecoli_fasta))[:3]
    server, port = create_server(ServerConfig(index=index, port=0, device="cpu", max_workers=4))
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout_s=60.0) as client:
            info = client.index_info()
            assert info.model_name == "esm1b_tiny_random"
            assert info.checkpoint_sha256 == hashlib.sha256((hf_esm1b / "model.safetensors").read_bytes()).hexdigest()
            results = client.search({r.record_id: r.sequence for r in records}, k=3)
    finally:
        server.stop(1.0)
    for record, result in zip(records, results, strict=True):
        assert result.hits[0].target_id == record.record_id
        assert result.hits[0].cosine_score == pytest.approx(1.0, abs=1e-4)
    other = _save_random_hf(ESM1B_TINY_CONFIG, tmp_path / "other", seed=3)
    with pytest.raises(IndexMismatchError, match="checkpoint_sha256"):
        create_server(ServerConfig(index=index, port=0, device="cpu", model=str(other)))
