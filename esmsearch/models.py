"""The ESM models esmsearch embeds with: names, shapes, parameter counts and weight sources.

Two families share one fast encoder (:class:`esmsearch.esm2_fast.Esm2Encoder`):

* **ESM-2** (Lin et al. 2023, Science 379:1123; shapes from its Table S1): rotary
  position embeddings, pre-LayerNorm transformer, token dropout.
* **ESM-1b** (Rives et al. 2021, PNAS 118:e2016239118) and **ESM-1v** (Meier et al.
  2021, NeurIPS; five seeds of the ESM-1b architecture trained on UniRef90): the same
  layers without rotary embeddings, with learned absolute position embeddings for
  1,024 tokens and a LayerNorm on the embeddings (fair-esm's ``ProteinBertModel``,
  arch ``roberta_large``). PLMSearch (Liu et al. 2024, Nat Commun 15:2775) pools
  ESM-1b's last layer.

Both families read at most 1,024 tokens (1,022 residues + BOS + EOS), so esmsearch
embeds longer sequences in the same overlapping windows
(:data:`esmsearch.embedding.WINDOW_RESIDUES`). The original ESM-1 models
(``esm1_t34_670M_UR50S`` ...: sinusoidal positions, attention bias k/v) and the MSA
Transformer are not supported.

Where weights come from (``--model``, resolved in this order by
:func:`esmsearch.embedding.load_model`): see :data:`MODEL_SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHITECTURES",
    "CONTEXT_RESIDUES",
    "FAMILIES",
    "MODEL_SOURCES",
    "VOCAB_SIZE",
    "ModelArchitecture",
]

#: Tokens in fair-esm's ESM-1b/ESM-2 alphabet (``esm.data.Alphabet.from_architecture("ESM-1b")``).
VOCAB_SIZE = 33
#: Residues one forward pass reads: 1,024 positions minus BOS and EOS (both families).
CONTEXT_RESIDUES = 1022
#: Learned positions of ESM-1b/ESM-1v (fair-esm ``args.max_positions``).
ESM1B_MAX_POSITIONS = 1024

#: Family key -> name and reference.
FAMILIES: dict[str, str] = {
    "esm2": "ESM-2 (Lin et al. 2023, Science 379:1123)",
    "esm1b": "ESM-1b / ESM-1v (Rives et al. 2021, PNAS 118:e2016239118; Meier et al. 2021, NeurIPS)",
}

#: What ``--model`` accepts, in the order :func:`esmsearch.embedding.load_model` tries it:
#: (form, source kind recorded in the manifest, description).
MODEL_SOURCES: tuple[tuple[str, str, str], ...] = (
    (
        "DIR",
        "hf-directory",
        "local Hugging Face directory (save_pretrained / `hf download`): config.json + "
        "model.safetensors or pytorch_model.bin (sharded: *.index.json); ESM-2 or ESM-1b/1v",
    ),
    ("FILE.pt", "fair-esm-checkpoint", "local fair-esm checkpoint: ESM-2, ESM-1b or ESM-1v"),
    (
        "NAME",
        "fair-esm-pretrained",
        "a name in the table, downloaded by fair-esm into torch's hub cache on first use",
    ),
    (
        "ORG/NAME",
        "hf-hub",
        "Hugging Face Hub id (the 'hub id' column), fetched by huggingface_hub into its cache "
        "on first use (pip install 'esmsearch[hf]'); HF_HUB_OFFLINE=1 uses the cache only",
    ),
)


@dataclass(frozen=True)
class ModelArchitecture:
    """Shape of one released ESM model.

    Attributes:
        name: fair-esm pretrained name, e.g. ``esm2_t33_650M_UR50D``.
        num_layers: transformer layers.
        embed_dim: embedding (hidden) dimension = the pooled vector's dimension.
        attention_heads: attention heads per layer.
        family: ``"esm2"`` or ``"esm1b"`` (see :data:`FAMILIES`).
    """

    name: str
    num_layers: int
    embed_dim: int
    attention_heads: int
    family: str = "esm2"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")

    @property
    def ffn_embed_dim(self) -> int:
        """Feed-forward width: 4 x embed_dim in every released ESM-2 and ESM-1b model."""
        return 4 * self.embed_dim

    @property
    def default_layer(self) -> int:
        """Representation layer pooled by default: the last (with the final LayerNorm)."""
        return self.num_layers

    @property
    def positions(self) -> str:
        """``"rotary"`` (ESM-2) or ``"learned"`` (ESM-1b/ESM-1v)."""
        return "rotary" if self.family == "esm2" else "learned"

    @property
    def hf_hub_id(self) -> str:
        """The Hugging Face Hub id Meta published the same weights under."""
        return f"facebook/{self.name}"

    @property
    def parameters(self) -> int:
        """Parameters of fair-esm's module for this model (trunk, LM head and contact head).

        Counted from the layer shapes (the tests check it against fair-esm's own modules):
        token embedding ``V E``; per layer q/k/v/out projections ``4 (E^2 + E)``, two
        LayerNorms ``4 E``, feed-forward ``8 E^2 + 5 E``; final LayerNorm ``2 E``; LM
        head dense + LayerNorm + bias ``E^2 + 3 E + V`` (its output weight is the token
        embedding); contact regression ``L H + 1``. ESM-1b adds ``1026 E`` learned
        positions (1,024 + padding offset) and an embedding LayerNorm ``2 E``.
        """
        e, n_layers, v = self.embed_dim, self.num_layers, VOCAB_SIZE
        count = v * e + n_layers * (12 * e * e + 13 * e) + 2 * e + (e * e + 3 * e + v)
        count += n_layers * self.attention_heads + 1
        if self.family == "esm1b":
            count += (ESM1B_MAX_POSITIONS + 2) * e + 2 * e
        return count


def _esm1v(seed: int) -> ModelArchitecture:
    return ModelArchitecture(f"esm1v_t33_650M_UR90S_{seed}", 33, 1280, 20, "esm1b")


#: The released models esmsearch loads, by fair-esm pretrained name.
ARCHITECTURES: dict[str, ModelArchitecture] = {
    a.name: a
    for a in (
        ModelArchitecture("esm2_t6_8M_UR50D", 6, 320, 20),
        ModelArchitecture("esm2_t12_35M_UR50D", 12, 480, 20),
        ModelArchitecture("esm2_t30_150M_UR50D", 30, 640, 20),
        ModelArchitecture("esm2_t33_650M_UR50D", 33, 1280, 20),
        ModelArchitecture("esm2_t36_3B_UR50D", 36, 2560, 40),
        ModelArchitecture("esm2_t48_15B_UR50D", 48, 5120, 40),
        ModelArchitecture("esm1b_t33_650M_UR50S", 33, 1280, 20, "esm1b"),
        *(_esm1v(seed) for seed in range(1, 6)),
    )
}


def human_count(n: int) -> str:
    """``7_840_794 -> "7.8M"``, ``652_356_503 -> "652M"``, ``15_000_000_000 -> "15.0B"``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)
