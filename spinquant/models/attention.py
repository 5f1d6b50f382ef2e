"""The `spinquant` attention implementation: sdpa plus two optional per-module hooks, applied after RoPE
and after the KV cache update (so they see exactly what attention consumes):

- `module.qk_transform(t)`: applied to queries and keys [b, heads, seq, head_dim] (online R3 rotation);
- `module.kv_quantizer(k, v) -> (k, v)`: fake-quantizes keys and values (KV-cache quantization).

With neither hook set, it is sdpa. K/V coming from a packed KV cache already went through both. A single
decoding token with grouped KV heads on the CPU takes a faster, equivalent route (`_decode_gqa`).
"""
from __future__ import annotations

import torch.nn.functional as F
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
    if query.shape[2] == 1 and key.shape[1] < query.shape[1] and query.device.type == "cpu":
        return _decode_gqa(query, key, value, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _decode_gqa(query, key, value, attention_mask, scaling):
    """One query token with grouped KV heads: the query heads of each KV head are packed as rows of one
    [b, kv_heads, groups, d] query, the same computation as sdpa's `enable_gqa`, which on the CPU runs
    ~30x slower in bf16 (4.3 ms vs 0.13 ms per layer for Llama-3.2-1B's shapes at 513 cached tokens).
    Returns (output [b, 1, heads, d], None) like `sdpa_attention_forward`."""
    b, h, _, d = query.shape
    kvh = key.shape[1]
    q = query.reshape(b, kvh, h // kvh, d)
    mask = attention_mask[..., -1:, :] if attention_mask is not None else None  # [b, 1, 1, kv_len] broadcasts
    if mask is not None and mask.shape[1] != 1:  # a per-head mask: pack its heads like the query's
        mask = mask.reshape(b, kvh, h // kvh, -1)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, spinquant_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_spinquant_attention(model) -> None:
    """Route the model's attention through `spinquant_attention` (idempotent)."""
    model.config._attn_implementation = NAME
