"""Family adapters: where a decoder family keeps its embedding, layers, norms and projections.

A family is described once by attribute paths; Llama 2/3/3.2, Mistral and Qwen2/2.5 are all the Llama
family (they differ only in config: GQA, tied embeddings, q/k/v bias). A new family is one
`FamilyAdapter(...)` plus `register_family`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no family adapter."""


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"  # the module computing RoPE's (cos, sin) for position ids
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"

    # ---- navigation -------------------------------------------------------------------------
    def embedding(self, model) -> nn.Embedding:
        return model.get_submodule(self.embed)

    def decoder_layers(self, model) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def head(self, model) -> nn.Linear:
        return model.get_submodule(self.lm_head)

    def norm(self, model) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def rotary_embedding(self, model) -> nn.Module:
        return model.get_submodule(self.rotary)

    def linear_names(self) -> dict[str, str]:
        """Role -> path inside a decoder layer, in forward order."""
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o, "gate": self.gate, "up": self.up,
                "down": self.down}

    def layer_linears(self, layer) -> dict[str, nn.Linear]:
        return {role: layer.get_submodule(path) for role, path in self.linear_names().items()}

    def attention(self, layer) -> nn.Module:
        return layer.get_submodule(self.attn)

    # ---- shapes (of a loaded model, or of its config alone: checks run before any weight is read) --------
    @staticmethod
    def head_dim(model) -> int:
        c = getattr(model, "config", model)
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def linear_in_features(self, config) -> dict[str, int]:
        """Role -> input width of each decoder linear, from the model's config (a `PretrainedConfig`)."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        return {"q": hidden, "k": hidden, "v": hidden, "o": heads * self.head_dim(config), "gate": hidden,
                "up": hidden, "down": config.intermediate_size}

    @staticmethod
    def num_heads(model) -> int:
        return model.config.num_attention_heads

    @staticmethod
    def num_kv_heads(model) -> int:
        return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads

    @staticmethod
    def tied_embeddings(model) -> bool:
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        return head is not None and head.weight.data_ptr() == emb.weight.data_ptr()


LLAMA = FamilyAdapter(name="llama", model_types=("llama", "mistral", "qwen2"))

FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    for mt in adapter.model_types:
        FAMILIES[mt] = adapter
    return adapter


register_family(LLAMA)


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def adapter_for_model_type(model_type: str) -> FamilyAdapter:
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}: no family adapter. Supported model_type values: "
            f"{', '.join(supported_model_types())} (families: {', '.join(sorted({a.name for a in FAMILIES.values()}))}). "
            f"Add a family with spinquant.models.register_family(FamilyAdapter(...)).")
    return FAMILIES[model_type]


def get_adapter(model) -> FamilyAdapter:
    """The family adapter of a loaded HF model (by config.model_type)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type; expected a HF causal LM")
    return adapter_for_model_type(model_type)
