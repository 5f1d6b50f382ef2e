"""The `spinquant` attention implementation: sdpa plus two optional per-module hooks, applied after RoPE
and after the KV cache update (so they see exactly what attention consumes):

- `module.qk_transform(t)`: applied to queries and keys [b, heads, seq, head_dim] (online R3 rotation);
- `module.kv_quantizer(k, v) -> (k, v)`: fake-quantizes keys and values (KV-cache quantization).

With neither hook set, it is exactly sdpa. K/V coming from a packed KV cache already went through both.
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "spinquant"


def spinquant_attention(module, query, key, value, attention_mask, **kwargs):
    # K/V from a packed KV cache (spinquant.kernels.kv_cache) were transformed and quantized on entry
    done = getattr(key, "_spinquant_kv_done", False)
    transform = getattr(module, "qk_transform", None)
    if transform is not None:
        query = transform(query)
        key = key if done else transform(key)
    kvq = getattr(module, "kv_quantizer", None)
    if kvq is not None and not done:
        key, value = kvq(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, spinquant_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_spinquant_attention(model) -> None:
    """Route the model's attention through `spinquant_attention` (idempotent)."""
    model.config._attn_implementation = NAME
