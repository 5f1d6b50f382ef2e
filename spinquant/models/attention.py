"""The `spinquant` attention implementation: sdpa plus two optional per-module hooks, applied after RoPE
and after the KV cache update (so they see exactly what attention consumes):

- `module.qk_transform(t)`: applied to queries and keys [b, heads, seq, head_dim] (online R3 rotation);
- `module.kv_quantizer(k, v) -> (k, v)`: fake-quantizes keys and values (KV-cache quantization).

With neither hook set, it is sdpa. K/V coming from one of our caches (spinquant.kernels.kv_cache) already went
through both on entry; the attention must not apply them again (R3 twice is R3·R3 = I: silently unrotated keys).
The cache says so explicitly: a forward pre-hook on each attention module reads the cache the decoder layer passes
(`cache` / `past_key_values`) and whether its layer `applies_attention_hooks`. The K/V tensors our cache returns
also carry a mark; a marked K/V in a call the hook saw no such cache for (a transformers change in how the cache
reaches the attention) is an error, never a second rotation. A single decoding token with grouped KV heads on the
CPU takes a faster, equivalent route (`_decode_gqa`).
"""
from __future__ import annotations

import weakref

import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "spinquant"


KV_MARK = "_spinquant_kv_done"  # set on K/V tensors returned by our cache layers (a cross-check only)
CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # the names transformers has given the attention's cache
_FROM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> this call's K/V are done
_HOOKED: weakref.WeakSet = weakref.WeakSet()


def _note_cache(module, args, kwargs):
    """Forward pre-hook: whether this call's cache layer applies the attention hooks on entry."""
    cache = next((kwargs[k] for k in CACHE_ARGS if kwargs.get(k) is not None), None)
    layers, idx = getattr(cache, "layers", None), getattr(module, "layer_idx", None)
    _FROM_CACHE[module] = bool(layers is not None and idx is not None and idx < len(layers)
                               and getattr(layers[idx], "applies_attention_hooks", False))


def spinquant_attention(module, query, key, value, attention_mask, **kwargs):
    done = _FROM_CACHE.get(module, False)  # K/V transformed and quantized on entry by our cache
    if not done and getattr(key, KV_MARK, False):
        raise RuntimeError(f"layer {getattr(module, 'layer_idx', '?')}: keys come from spinquant's cache, which "
                           "already applied R3 / KV quantization, but the attention was not told that this call's cache "
                           f"is ours (the decoder layer passed none of {CACHE_ARGS}); applying them again would undo R3. "
                           "transformers changed how the cache reaches the attention: update CACHE_ARGS")
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
    """Route the model's attention through `spinquant_attention`, each attention module told per call whether its
    cache applies the hooks (idempotent)."""
    from .adapter import get_adapter
    model.config._attn_implementation = NAME
    a = get_adapter(model)
    for layer in a.decoder_layers(model):
        attn = a.attention(layer)
        if attn not in _HOOKED:
            attn.register_forward_pre_hook(_note_cache, with_kwargs=True)
            _HOOKED.add(attn)
