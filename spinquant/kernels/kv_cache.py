"""A KV cache that stores keys and values at their bit-width (int8, or two 4-bit codes a byte) + scales.

The fake-quant path quantizes the whole K/V after every cache update (per head and token, after the R3
Hadamard); since each token is quantized on its own, quantizing every token once when it enters the
cache gives the same values. `PackedKVLayer.update` does that: it applies the attention's `qk_transform`
to the new keys, quantizes both, appends the codes, and returns the dequantized full K/V marked as
done, so `spinquant_attention` skips its own transform of the keys and its KV quantizer.

    cache = packed_kv_cache(model)
    model.generate(ids, past_key_values=cache)      # or model(ids, past_key_values=cache, use_cache=True)
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..models.adapter import get_adapter
from ..models.attention import KV_MARK
from ..quant.quantizer import compute_qparams
from ..quant.spec import QuantSpec
from .cpu import pack_nibbles_raw, unpack_nibbles_raw


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=2)  # along the sequence


def quantize_tokens(x: torch.Tensor, spec: QuantSpec):
    """Per-token codes of x [b, h, s, d] under spec -> (codes uint8 [b, h, s, d] or two 4-bit codes a byte
    [b, h, s, d/2], scale and zero float32 [b, h, s, G, 1]); what the fake-quant KV quantizer computes."""
    scale, zero = compute_qparams(x, spec)
    g = x.shape[-1] if spec.granularity != "group" else spec.group_size
    xg = x.float().reshape(*x.shape[:-1], -1, g)
    u = (torch.clamp(torch.round(xg / scale) + zero, spec.qmin, spec.qmax) - spec.qmin).to(torch.uint8).reshape(x.shape)
    return (pack_nibbles_raw(u) if spec.bits <= 4 else u), scale, zero


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                      dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_tokens -> [b, h, s, d] in dtype."""
    u = unpack_nibbles_raw(codes) if spec.bits <= 4 else codes
    ug = u.float().reshape(*scale.shape[:-1], -1)
    return ((ug + spec.qmin - zero) * scale).reshape(*u.shape).to(dtype)


class _Codes:
    """Per-token codes of x [b, h, s, d] under spec: packed uint8/int8 storage + float32 scale/zero [b, h, s, G, 1]."""

    def __init__(self, spec: QuantSpec):
        self.spec, self.codes, self.scale, self.zero = spec, None, None, None

    def append(self, x: torch.Tensor) -> None:
        codes, scale, zero = quantize_tokens(x, self.spec)
        self.codes, self.scale, self.zero = _cat(self.codes, codes), _cat(self.scale, scale), _cat(self.zero, zero)

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_tokens(self.codes, self.scale, self.zero, self.spec, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


class _OwnedLayer(CacheLayerMixin):
    """A cache layer whose state is entirely ours: transformers' public layer contract (`update`,
    `get_seq_length`, `get_mask_sizes`, `get_max_length`, `lazy_initialization`, `reset`) and nothing read
    from its own layer classes' internals (a 5.x release dropped `DynamicLayer.dtype`, which broke a subclass).
    Subclasses store K/V in `_store(k, v)` and return the full K/V from it."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    applies_attention_hooks = True  # K/V leave `update` transformed (R3) and quantized: spinquant_attention skips both

    def __init__(self):
        super().__init__()
        self._len = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._store(key_states, value_states)
        setattr(keys, KV_MARK, True)
        setattr(values, KV_MARK, True)
        self._len = keys.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self._len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0  # (kv length, kv offset) as transformers' dynamic layers

    def get_max_length(self) -> int:
        return -1  # grows without bound

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized, self._len = False, 0


class PackedKVLayer(_OwnedLayer):
    """One decoder layer's K/V as codes; `update` returns the dequantized full K/V [b, kv_heads, seq, head_dim]."""

    def __init__(self, k_spec: QuantSpec, v_spec: QuantSpec, key_transform=None):
        super().__init__()
        for name, s in (("keys", k_spec), ("values", v_spec)):
            if not s.enabled or s.granularity not in ("token", "channel", "group"):
                raise ValueError(f"packed KV cache needs a quantized per-token (or grouped) spec for {name}, "
                                 f"got {s.short()}")
        self.k_spec, self.v_spec, self.key_transform = k_spec, v_spec, key_transform
        self.k, self.v = _Codes(k_spec), _Codes(v_spec)

    def _store(self, key_states, value_states):
        if self.key_transform is not None:
            key_states = self.key_transform(key_states)
        self.k.append(key_states)
        self.v.append(value_states)
        return self.k.values(self.dtype), self.v.values(self.dtype)

    def reset(self) -> None:
        super().reset()
        self.k, self.v = _Codes(self.k_spec), _Codes(self.v_spec)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


class RotatedKeyLayer(_OwnedLayer):
    """16-bit K/V whose keys are stored after the attention's online R3 transform: each key is rotated once
    when it enters the cache, not again at every decoding step."""

    def __init__(self, key_transform):
        super().__init__()
        self.key_transform = key_transform

    def _store(self, key_states, value_states):
        self.keys = _cat(self.keys, self.key_transform(key_states))
        self.values = _cat(self.values, value_states)
        return self.keys, self.values


def packed_kv_cache(model) -> Cache:
    """A cache for `model`: a `PackedKVLayer` wherever attention quantizes K/V, a `RotatedKeyLayer` where it
    only rotates Q/K (R3), plain layers elsewhere."""
    a = get_adapter(model)
    layers = []
    for layer in a.decoder_layers(model):
        attn = a.attention(layer)
        kvq, rot = getattr(attn, "kv_quantizer", None), getattr(attn, "qk_transform", None)
        if kvq is not None:
            layers.append(PackedKVLayer(kvq.k_spec, kvq.v_spec, rot))
        else:
            layers.append(RotatedKeyLayer(rot) if rot is not None else DynamicLayer())
    return Cache(layers=layers)


def cache_nbytes(cache: Cache) -> int:
    """Bytes the cache holds (codes + scales for packed layers, K/V tensors for plain ones)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, PackedKVLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
    return total


# ---- static (preallocated) caches of the lean decode path (spinquant.decode) ---------------------------
class StaticKV:
    """One layer's K/V in preallocated buffers of the compute dtype for `max_len` tokens: a token is written once at
    its position (no concatenation). Keys are stored transposed, [b, kv_heads, head_dim, max_len], so that one
    query's scores are vertical multiply-adds (native.attend_one_token); values [b, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype):
        self.kt = torch.zeros(batch, kv_heads, head_dim, max_len, dtype=dtype)
        self.v = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [b, kv_heads, s, head_dim] at positions start .. start + s - 1."""
        self.kt[..., start:start + k.shape[2]] = k.transpose(-1, -2)
        self.v[:, :, start:start + v.shape[2]] = v

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions 0 .. end - 1 [b, kv_heads, end, head_dim] (views; K's is strided)."""
        return self.kt[..., :end].transpose(-1, -2), self.v[:, :, :end]

    def flat(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K transposed [b·kv_heads, head_dim, L] and V [b·kv_heads, L, head_dim], contiguous, L >= end (here the
        buffers themselves, L = max_len)."""
        b, h, d, L = self.kt.shape
        return self.kt.view(b * h, d, L), self.v.view(b * h, L, d)

    def nbytes(self) -> int:
        return 2 * self.v.numel() * self.v.element_size()


class StaticPackedKV:
    """One layer's K/V as codes at their bit-width in preallocated buffers (uint8, or two 4-bit codes a byte, plus
    float32 scale / zero per token and group): each token is quantized once when written, exactly as
    `PackedKVLayer` does; `read` dequantizes the prefix."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 k_spec: QuantSpec, v_spec: QuantSpec):
        self.dtype, self.specs = dtype, (k_spec, v_spec)
        self.bufs = []
        for s in self.specs:
            if not s.enabled or s.granularity not in ("token", "channel", "group"):
                raise ValueError(f"a packed static KV cache needs per-token (or grouped) K/V specs, got {s.short()}")
            G = head_dim // s.group_size if s.granularity == "group" else 1
            width = head_dim // 2 if s.bits <= 4 else head_dim
            self.bufs.append((torch.zeros(batch, kv_heads, max_len, width, dtype=torch.uint8),
                              torch.zeros(batch, kv_heads, max_len, G, 1), torch.zeros(batch, kv_heads, max_len, G, 1)))

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for x, spec, bufs in zip((k, v), self.specs, self.bufs):
            for buf, t in zip(bufs, quantize_tokens(x, spec)):
                buf[:, :, start:start + x.shape[2]] = t

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (dequantize_tokens(c[:, :, :end], s[:, :, :end], z[:, :, :end], spec, self.dtype)
                for (c, s, z), spec in zip(self.bufs, self.specs))
        return k, v

    def flat(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized K (transposed) [b·kv_heads, head_dim, end] and V [b·kv_heads, end, head_dim], contiguous."""
        k, v = self.read(end)
        return k.transpose(-1, -2).reshape(-1, k.shape[-1], end).contiguous(), v.reshape(-1, end, v.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in self.bufs for t in bufs)
