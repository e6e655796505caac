"""A model's shape without its weights: from a model directory's config.json, or from the shipped
table of well-known architectures (rayft/assets/model_shapes.json) by hub id; and the parameter
counts the planner derives from it.

The counts follow the layouts transformers builds for these families: Llama-style decoders
(RMSNorm, gated MLP, no biases; Qwen2 adds q/k/v biases, Gemma 2 four norms per layer, Mixtral
experts and a router) and OPT-style ones (LayerNorm, biases, plain MLP, learned positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from rayft.errors import RayftError


class ShapeError(RayftError):
    """The planner cannot tell the model's shape."""


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "llama" (RMSNorm, gated MLP) or "opt" (LayerNorm, biases, plain MLP)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    experts: int = 1
    experts_per_token: int = 1
    qkv_bias: bool = False
    norms_per_layer: int = 2
    positions: int = 0  # learned position embeddings (OPT)
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Linear layers of one decoder layer: name -> (in, out, copies), as PEFT names them."""
        h, f = self.hidden, self.intermediate
        out = {
            "q_proj": (h, self.q_dim, 1),
            "k_proj": (h, self.kv_dim, 1),
            "v_proj": (h, self.kv_dim, 1),
            "o_proj": (self.q_dim, h, 1),
        }
        if self.family == "opt":
            return out | {"fc1": (h, f, 1), "fc2": (f, h, 1)}
        if self.experts > 1:  # Mixtral: w1/w3 gate and up, w2 down, per expert; a router `gate`
            e = self.experts
            return out | {"w1": (h, f, e), "w3": (h, f, e), "w2": (f, h, e), "gate": (h, e, 1)}
        return out | {"gate_proj": (h, f, 1), "up_proj": (h, f, 1), "down_proj": (f, h, 1)}

    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers: what 4-bit quantization stores in nf4
        (embeddings, norms, biases and the LM head stay in the compute dtype)."""
        return self.layers * sum(i * o * n for i, o, n in self.linears().values())

    def layer_params(self) -> int:
        h, f = self.hidden, self.intermediate
        n = sum(i * o * c for i, o, c in self.linears().values())
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.family == "opt":  # biases of every linear, LayerNorm weight and bias
            n += self.q_dim + 2 * self.kv_dim + h + f + h + 2 * h * self.norms_per_layer
        else:
            n += h * self.norms_per_layer
        return n

    def params(self) -> int:
        norm = 2 * self.hidden if self.family == "opt" else self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embed + self.positions * self.hidden + norm

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Key and value of one token in every layer: the KV cache's unit."""
        return 2 * self.layers * self.kv_dim * dtype_bytes


@cache
def known() -> dict[str, dict[str, Any]]:
    text = resources.files("rayft.assets").joinpath("model_shapes.json").read_text()
    return json.loads(text)["models"]


def from_config(config: dict[str, Any], name: str, source: str = "") -> Shape:
    """A Shape from config.json's keys (those of Llama, Mistral, Mixtral, Qwen2, Gemma 2, Phi-3,
    SmolLM2 and OPT)."""
    kind = config.get("model_type", "llama")
    try:
        h, layers = config["hidden_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        inter = config.get("intermediate_size") or config["ffn_dim"]
        vocab = config["vocab_size"]
    except KeyError as e:
        raise ShapeError(
            f"{name}: config.json has no {e.args[0]!r}; the planner reads decoder-only models of "
            "the Llama, Mistral, Mixtral, Qwen2, Gemma 2, Phi-3 and OPT families"
        ) from None
    opt = kind == "opt"
    max_pos = config.get("max_position_embeddings") or 2048
    return Shape(
        name=name,
        family="opt" if opt else "llama",
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or h // heads,
        intermediate=inter,
        vocab=vocab,
        tied=bool(config.get("tie_word_embeddings", opt)),
        max_positions=max_pos,
        experts=config.get("num_local_experts") or 1,
        experts_per_token=config.get("num_experts_per_tok") or 1,
        qkv_bias=kind == "qwen2" or bool(config.get("attention_bias")),
        norms_per_layer=4 if kind in ("gemma2", "gemma3") else 2,
        # OPT's learned positions carry 2 offset rows (OPTLearnedPositionalEmbedding)
        positions=max_pos + config.get("position_offset", 2) if opt else 0,
        source=source,
    )


def resolve(base: str) -> Shape:
    """The shape of `model.base`: a local directory's config.json, a registry model already
    cached, or the shipped table by hub id. Never downloads."""
    from rayft import models

    path = Path(base).expanduser()
    if base in models.REGISTRY:
        path = models.cache_dir(base)
        if not (path / "config.json").exists():
            # the registry's SmolLM2 is SmolLM2-135M-Instruct's architecture
            if base == "smollm2-135m-instruct":
                return resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
            raise ShapeError(f"model '{base}' is not cached; run `rayft models pull {base}`")
    if (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        return from_config(config, base, f"{path / 'config.json'}")
    table = known()
    if base in table:
        return from_config(table[base], base, table[base]["source"])
    lower = {k.lower(): k for k in table}
    if base.lower() in lower:
        key = lower[base.lower()]
        return from_config(table[key], key, table[key]["source"])
    raise ShapeError(
        f"{base}: no config.json there and not in the planner's table of known models; point "
        "model.base at a local model directory (its config.json is enough), or use one of: "
        + ", ".join(sorted(k for k in table if "/" in k)[:12])
        + ", ..."
    )
